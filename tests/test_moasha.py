"""ray_lt.moasha: Pareto helpers on hand-worked cases, the scheduler on scripted result streams.

The scheduler is driven with real ``ray.tune.experiment.Trial`` objects built as stubs
(``Trial("__fake", trial_id=..., stub=True)`` needs no running Ray); no Ray instance is started.
Dominance is re-implemented here (``dominates``) so the property test does not trust the code
under test.
"""

from __future__ import annotations

import json
import math
import random

import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.schedulers.util import _set_search_properties_backwards_compatible

from ray_lt.errors import ERROR_KEY, ArtifactError, ConfigError
from ray_lt.moasha import MultiObjectiveASHA
from ray_lt.pareto import crowding_distance, non_dominated_sort, rung_decision

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP
MAXMAX = ["max", "max"]
INF = math.inf


def dominates(q, p, modes) -> bool:
    """q is at least as good as p on every objective and strictly better on one."""
    sign = [1 if m == "max" else -1 for m in modes]
    ge = all(s * a >= s * b for s, a, b in zip(sign, q, p, strict=True))
    gt = any(s * a > s * b for s, a, b in zip(sign, q, p, strict=True))
    return ge and gt


def make_trial(trial_id: str) -> Trial:
    return Trial("__fake", trial_id=trial_id, stub=True)


def scheduler(**kwargs) -> MultiObjectiveASHA:
    args = {"metrics": ["acc", "few"], "modes": MAXMAX, "max_t": 8, "grace_period": 1}
    return MultiObjectiveASHA(**{**args, **kwargs})


class Driver:
    """Feeds (trial, epoch, acc, few) reports to a scheduler as Tune would, one Trial each."""

    def __init__(self, sched: MultiObjectiveASHA):
        self.sched = sched
        self.trials: dict[str, Trial] = {}

    def trial(self, tid: str) -> Trial:
        if tid not in self.trials:
            self.trials[tid] = make_trial(tid)
            self.sched.on_trial_add(None, self.trials[tid])
        return self.trials[tid]

    def report(self, tid: str, epoch: float, acc: float, few: float) -> str:
        result = {"epoch": epoch, "acc": acc, "few": few}
        return self.sched.on_trial_result(None, self.trial(tid), result)

    def feed(self, stream) -> list[str]:
        return [self.report(*step) for step in stream]


# --- non_dominated_sort -----------------------------------------------------------------------


def test_non_dominated_sort_max_max_with_ties():
    points = [
        (0.9, 0.2),  # 0: best acc
        (0.5, 0.5),  # 1
        (0.2, 0.9),  # 2: best few
        (0.5, 0.5),  # 3: equal to 1 -> neither dominates the other, same front
        (0.4, 0.4),  # 4: dominated by 1 and 3 (worse on both); 0 and 2 trade off with it
        (0.9, 0.1),  # 5: dominated by 0 only (equal acc, lower few)
        (0.1, 0.1),  # 6: dominated by 4 (worse on both) and by 5 (lower acc, equal few)
    ]
    # F1 = {0, 1, 2, 3}; removing them leaves 4 and 5 trading off -> F2 = {4, 5}; F3 = {6}
    assert non_dominated_sort(points, MAXMAX) == [[0, 1, 2, 3], [4, 5], [6]]


def test_non_dominated_sort_mixed_modes():
    points = [(0.8, 1.0), (0.7, 0.5), (0.8, 1.2), (0.6, 0.5), (0.9, 2.0)]  # (acc, loss)
    # acc max, loss min: 2 has 0's acc and a higher loss -> dominated by 0; 3 has 1's loss and
    # a lower acc -> dominated by 1; 4 has the best acc -> non-dominated. F1 {0,1,4}, F2 {2,3}.
    assert non_dominated_sort(points, ["max", "min"]) == [[0, 1, 4], [2, 3]]
    # Flipped (acc min, loss max): now 2 dominates 0 and 3 dominates 1; 4 (worst acc, best
    # loss) still trades off with everything. F1 {2,3,4}, F2 {0,1}.
    assert non_dominated_sort(points, ["min", "max"]) == [[2, 3, 4], [0, 1]]
    # Both min: 3 = (0.6, 0.5) is at least as low as everyone and lower than each somewhere.
    # Then 1 (0.7, 0.5); then 0 (0.8, 1.0); then 2 (0.8, 1.2) and 4 (0.9, 2.0) -> 2 before 4.
    assert non_dominated_sort(points, ["min", "min"]) == [[3], [1], [0], [2], [4]]


def test_non_dominated_sort_edge_cases():
    assert non_dominated_sort([], MAXMAX) == []
    assert non_dominated_sort([(1, 1)] * 3, MAXMAX) == [[0, 1, 2]]  # all equal: one front
    three = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 0, 0)]  # three objectives: unit vectors first
    assert non_dominated_sort(three, ["max"] * 3) == [[0, 1, 2], [3]]
    with pytest.raises(ValueError, match="one per mode"):
        non_dominated_sort([(1, 2, 3)], MAXMAX)


# --- crowding_distance ------------------------------------------------------------------------


def test_crowding_distance_hand_worked():
    # acc values 0.1, 0.5, 0.9 (range 0.8): the ends get inf, 0.5 gets (0.9 - 0.1) / 0.8 = 1;
    # few is the mirror image and adds another 1 -> 2.
    assert crowding_distance([(0.9, 0.1), (0.1, 0.9), (0.5, 0.5)]) == [INF, INF, 2.0]
    # Uneven spacing, both ranges 1. acc: 0.2 -> (0.6 - 0) = 0.6, 0.6 -> (1 - 0.2) = 0.8;
    # few: 0.8 -> (1 - 0.4) = 0.6, 0.4 -> (0.8 - 0) = 0.8. Sums 1.2 and 1.6.
    got = crowding_distance([(0, 1), (0.2, 0.8), (0.6, 0.4), (1, 0)])
    assert got == [INF, pytest.approx(1.2), pytest.approx(1.6), INF]


def test_crowding_distance_ties_and_no_spread():
    # Two equal inner points: neighbours are the nearest *distinct* values, 0 and 1, so each
    # gets (1 - 0) / 1 per objective = 2 in all; equal points get equal distances.
    assert crowding_distance([(0, 1), (0.5, 0.5), (0.5, 0.5), (1, 0)]) == [INF, 2.0, 2.0, INF]
    # few has no spread: it adds nothing (and marks no boundary); acc gives inf, 1, inf.
    assert crowding_distance([(0, 5), (0.5, 5), (1, 5)]) == [INF, 1.0, INF]
    # A single point or equal points have no spread at all.
    assert crowding_distance([(0.3, 0.3)]) == [0.0]
    assert crowding_distance([(0.3, 0.3), (0.3, 0.3)]) == [0.0, 0.0]
    assert crowding_distance([]) == []


def test_crowding_distance_ignores_direction():
    # Distances are absolute gaps over ranges, so negating an objective (a "min" metric seen
    # the other way round) changes nothing.
    points = [(0, 1), (0.2, 0.8), (0.6, 0.4), (1, 0)]
    flipped = [(a, -b) for a, b in points]
    assert crowding_distance(flipped) == crowding_distance(points)


# --- rung_decision ----------------------------------------------------------------------------


def test_rung_decision_small_rung_keeps_only_non_dominated():
    # rf 3, one point recorded: with the new one n = 2 < 3 -> floor(2 / 3) = 0 kept by rank,
    # so only a non-dominated newcomer continues.
    assert rung_decision([(1, 1)], (0.5, 0.5), MAXMAX, 3) is False
    assert rung_decision([(1, 1)], (1.5, 0.1), MAXMAX, 3) is True  # trades off with (1, 1)
    assert rung_decision([], (0.0, 0.0), MAXMAX, 3) is True  # first at the rung
    # rf 2, n = 2 -> top 1: (1, 1) alone; the dominated newcomer is out.
    assert rung_decision([(1, 1)], (0.5, 0.5), MAXMAX, 2) is False
    # n = 3, rf 2: the fraction rounds down, top floor(1.5) = 1 = (1, 1); (0.5, 0.5) is second
    # (it beats (0, 0)) but still out. With rf 1.5, top floor(3 / 1.5) = 2 takes it.
    assert rung_decision([(1, 1), (0, 0)], (0.5, 0.5), MAXMAX, 2) is False
    assert rung_decision([(1, 1), (0, 0)], (0.5, 0.5), MAXMAX, 1.5) is True


def test_rung_decision_dominated_but_ranked_in():
    # A (1, 1) dominates everything; D (0.5, 0.5) is dominated by A only. n = 5, rf 2 -> top
    # floor(5 / 2) = 2: F1 {A}, F2 {D} -> D is second and continues although dominated.
    recorded = [(1, 1), (0, 0), (0.1, 0.1), (0.2, 0.2)]
    assert rung_decision(recorded, (0.5, 0.5), MAXMAX, 2) is True


def test_rung_decision_cuts_a_front_by_crowding():
    # Recorded A (1,1), B (0.9,0.1), C (0.1,0.9), X (0,0), Y (0,0.05); new D (0.5,0.5).
    # Fronts: F1 {A}; F2 {B, C, D} (they trade off); F3 {Y}; F4 {X} (Y has X's acc, more few).
    # rf 2: n = 6 -> top 3 = A + two of F2. Crowding in F2: B and C are at the ends (inf),
    # D gets (0.9 - 0.1) / 0.8 twice = 2 -> B and C are kept, D is cut.
    recorded = [(1, 1), (0.9, 0.1), (0.1, 0.9), (0, 0), (0, 0.05)]
    assert rung_decision(recorded, (0.5, 0.5), MAXMAX, 2) is False
    # rf 1.5: top floor(6 / 1.5) = 4 = A + all of F2 -> D continues.
    assert rung_decision(recorded, (0.5, 0.5), MAXMAX, 1.5) is True


def test_rung_decision_breaks_equal_crowding_by_arrival():
    # A (1,1) dominates; B (0.9,0.1) and C (0.1,0.9) form F2, both at ends (inf crowding);
    # X (0,0) is F3. n = 4, rf 2 -> top 2 = A + one of {B, C}: the earlier arrival wins.
    a, b, c, x = (1, 1), (0.9, 0.1), (0.1, 0.9), (0, 0)
    assert rung_decision([a, b, x], c, MAXMAX, 2) is False  # B came first
    assert rung_decision([a, c, x], b, MAXMAX, 2) is False  # C came first
    # rf 1.25: top floor(4 / 1.25) = 3 -> both of F2 fit.
    assert rung_decision([a, b, x], c, MAXMAX, 1.25) is True


def test_rung_decision_mixed_modes():
    # acc max, loss min. Recorded (0.8, 0.3) and (0.6, 0.1); new (0.7, 0.2) trades off with
    # both (better acc than the second, lower loss than the first) -> non-dominated.
    modes = ["max", "min"]
    assert rung_decision([(0.8, 0.3), (0.6, 0.1)], (0.7, 0.2), modes, 2) is True
    # (0.7, 0.4) is dominated by (0.8, 0.3); n = 3, top 1 -> out.
    assert rung_decision([(0.8, 0.3), (0.6, 0.1)], (0.7, 0.4), modes, 2) is False


# --- the scheduler on scripted streams --------------------------------------------------------


def test_rungs_and_tune_interface():
    sched = scheduler()
    assert isinstance(sched, FIFOScheduler)
    assert sched.milestones == [1, 2, 4, 8]  # 1 * 2**k up to max_t 8
    assert scheduler(grace_period=2, reduction_factor=3, max_t=20).milestones == [2, 6, 18]
    # Tune checks ``scheduler.metric in result`` on every report: a list there would raise
    # TypeError, so the scheduler exposes no single metric.
    assert sched.metric is None
    trials = [make_trial("t1"), make_trial("t2")]

    class Controller:
        def get_trials(self):
            return trials

    assert sched.choose_trial_to_run(Controller()) is trials[0]  # FIFO: first PENDING


def test_set_search_properties():
    sched = scheduler(modes=["max", "min"])
    # TuneConfig without a metric: Tune passes None, None (through its compatibility wrapper).
    assert _set_search_properties_backwards_compatible(sched.set_search_properties, None, None)
    assert sched.set_search_properties(["acc", "few"], ["max", "min"]) is True
    assert sched.set_search_properties("acc", "max") is False  # one objective: conflicts
    assert sched.set_search_properties("acc", None) is False
    assert sched.set_search_properties(["few", "acc"], None) is False  # other order
    assert sched.set_search_properties(None, "max") is False  # our modes are mixed
    assert scheduler().set_search_properties(None, "max") is True  # all "max": agrees


def test_stops_a_dominated_trial_at_rung_one():
    drv = Driver(scheduler())
    # A and B trade off; D (0.5, 0.5) is dominated by both. Rung 1 then holds A, B, D:
    # F1 {A, B}, F2 {D}; top floor(3 / 2) = 1 -> D is out.
    assert drv.feed([("A", 1, 0.8, 0.6), ("B", 1, 0.6, 0.8), ("D", 1, 0.5, 0.5)]) == [
        CONTINUE,
        CONTINUE,
        STOP,
    ]
    # C (0.7, 0.7) arrives later, n = 4, top 2 is A, B, but C is non-dominated -> continues.
    assert drv.report("C", 1, 0.7, 0.7) == CONTINUE
    assert list(drv.sched.records()[1]) == ["A", "B", "D", "C"]  # D is recorded all the same
    assert "num_stopped=1" in drv.sched.debug_string()
    assert "Rung epoch=1: 4 recorded, 3 non-dominated" in drv.sched.debug_string()


def test_decisions_use_only_what_was_recorded_so_far():
    # The same reports in two orders. D first: alone at rung 1, it continues; A and B then
    # arrive and are non-dominated. D last: it is dominated by A and B and stops.
    a, b, d = ("A", 1, 0.8, 0.6), ("B", 1, 0.6, 0.8), ("D", 1, 0.5, 0.5)
    assert Driver(scheduler()).feed([d, a, b]) == [CONTINUE, CONTINUE, CONTINUE]
    assert Driver(scheduler()).feed([a, b, d]) == [CONTINUE, CONTINUE, STOP]


def test_rungs_are_independent_under_out_of_order_arrival():
    drv = Driver(scheduler())
    # A races ahead to rung 2 with an excellent point before D reaches rung 1.
    assert drv.feed([("A", 1, 0.4, 0.4), ("A", 2, 0.95, 0.95)]) == [CONTINUE, CONTINUE]
    # At rung 1 only A's (0.4, 0.4) is recorded: D (0.5, 0.5) dominates it -> continues;
    # A's rung-2 point plays no part there.
    assert drv.report("D", 1, 0.5, 0.5) == CONTINUE
    # At rung 2 D (0.6, 0.6) meets A's (0.95, 0.95): n = 2, top 1 -> stops.
    assert drv.report("D", 2, 0.6, 0.6) == STOP
    assert drv.sched.records() == {
        1: {"A": (0.4, 0.4), "D": (0.5, 0.5)},
        2: {"A": (0.95, 0.95), "D": (0.6, 0.6)},
        4: {},
        8: {},
    }


def test_late_non_dominated_trial_continues():
    drv = Driver(scheduler())
    early = [(f"T{i}", 1, 0.5 + 0.05 * i, 0.5 + 0.05 * i) for i in range(6)]  # a chain
    drv.feed(early)  # T5 (0.75, 0.75) dominates all the others
    # Late L: worse acc than most but the best few -> non-dominated among 7 -> continues,
    # although a dominated point would now need to be in the top floor(7 / 2) = 3.
    assert drv.report("L", 1, 0.3, 0.9) == CONTINUE
    # Late M (0.52, 0.52) is dominated by T1..T5 and ranks below the top 3 -> stops.
    assert drv.report("M", 1, 0.52, 0.52) == STOP


def test_each_trial_is_ranked_once_per_rung():
    drv = Driver(scheduler())
    assert drv.report("A", 1, 0.9, 0.9) == CONTINUE
    # A second report inside rung 1 (a buffered or repeated result) is not ranked again.
    assert drv.report("A", 1.5, 0.1, 0.1) == CONTINUE
    # E's first evaluated report is at epoch 3 (it skipped rung 2's epoch): it is recorded at
    # rung 2, the highest it reached, and never at rung 1 afterwards.
    assert drv.report("E", 3, 0.2, 0.2) == CONTINUE  # first at rung 2
    assert drv.report("E", 1, 0.0, 0.0) == CONTINUE  # earlier rung than recorded: ignored
    assert drv.sched.records()[1] == {"A": (0.9, 0.9)}
    assert drv.sched.records()[2] == {"E": (0.2, 0.2)}
    # Past max_t (8) without stop_last_trials: recorded at rung 8 if new there, never stopped
    # for the budget; a non-dominated trial there continues.
    assert drv.report("E", 9, 0.2, 0.2) == CONTINUE
    assert drv.report("E", 10, 0.2, 0.2) == CONTINUE


def test_stop_last_trials_ends_every_trial_at_max_t():
    drv = Driver(scheduler(stop_last_trials=True))
    assert drv.report("A", 7, 0.9, 0.9) == CONTINUE
    assert drv.report("A", 8, 0.9, 0.9) == STOP  # budget spent, even though non-dominated
    drv = Driver(scheduler())
    assert drv.report("A", 8, 0.9, 0.9) == CONTINUE  # default: never stopped for the budget


def test_trial_complete_records_its_last_result():
    drv = Driver(scheduler())
    drv.report("A", 1, 0.9, 0.9)
    trial = drv.trial("B")
    drv.sched.on_trial_complete(None, trial, {"epoch": 2, "acc": 0.5, "few": 0.5})
    drv.sched.on_trial_complete(None, drv.trial("C"), {"epoch": 2})  # no metrics: nothing
    drv.sched.on_trial_remove(None, drv.trial("D"))
    assert drv.sched.records()[2] == {"B": (0.5, 0.5)}
    # F has to beat B's recorded (0.5, 0.5) at rung 2 (n = 2, top 1).
    assert drv.report("F", 2, 0.4, 0.4) == STOP


def test_results_after_a_trial_left_are_ignored():
    drv = Driver(scheduler())
    drv.report("A", 1, 0.9, 0.9)
    assert drv.report("D", 1, 0.1, 0.1) == STOP
    for gone, leave in (("D", "remove"), ("E", "error"), ("C", "complete")):
        trial = drv.trial(gone)
        if leave == "remove":
            drv.sched.on_trial_remove(None, trial)
        elif leave == "error":
            drv.sched.on_trial_error(None, trial)
        else:
            drv.sched.on_trial_complete(None, trial, {"epoch": 1})  # ended without a metric
        # A buffered result arriving afterwards (a later rung's, with a point that a live
        # trial there would be stopped for) is neither ranked nor recorded.
        assert drv.report(gone, 2, 0.0, 0.0) == CONTINUE
        assert drv.sched.on_trial_complete(None, trial, {"epoch": 4, "acc": 0, "few": 0}) is None
    assert drv.sched.records() == {1: {"A": (0.9, 0.9), "D": (0.1, 0.1)}, 2: {}, 4: {}, 8: {}}
    assert drv.sched.stopped() == {"D": 1.0} and drv.sched.num_stopped == 1
    # A trial Tune retries is added again and is ranked again from then on.
    drv.sched.on_trial_add(None, drv.trial("E"))
    assert drv.report("E", 2, 0.5, 0.5) == CONTINUE
    assert drv.sched.records()[2] == {"E": (0.5, 0.5)}


def test_a_later_rung_first_then_the_earlier_one():
    drv = Driver(scheduler())
    drv.feed([("A", 1, 0.9, 0.9), ("A", 2, 0.9, 0.9), ("B", 1, 0.95, 0.2)])
    # B's rung-2 result arrives before C's rung-1 result; each is ranked at its own rung only.
    assert drv.report("B", 2, 0.5, 0.1) == STOP  # dominated by A at rung 2 (n = 2, top 1)
    assert drv.report("C", 1, 0.2, 0.95) == CONTINUE  # non-dominated at rung 1 (A, B, C)
    assert drv.report("C", 1, 0.0, 0.0) == CONTINUE  # a repeat inside the rung: not ranked
    assert drv.sched.stopped() == {"B": 2.0}
    assert drv.sched.records()[1] == {"A": (0.9, 0.9), "B": (0.95, 0.2), "C": (0.2, 0.95)}


@pytest.mark.parametrize(
    "result",
    [
        {"epoch": 1, "acc": 0.1},  # no "few": an epoch that evaluated only one metric
        {"epoch": 1},  # an epoch that did not evaluate
        {"epoch": 1, "acc": 0.1, "few": 0.1, ERROR_KEY: "diverged"},  # a failed configuration
        {ERROR_KEY: "bad config", "seed": 0},
        {"epoch": 1, "acc": float("nan"), "few": 0.1},
        {"acc": 0.1, "few": 0.1},  # no time attribute
        {"epoch": 0.5, "acc": 0.1, "few": 0.1},  # before the grace period
    ],
)
def test_unrankable_results_continue_and_record_nothing(result):
    drv = Driver(scheduler())
    drv.report("A", 1, 0.9, 0.9)  # a dominating point, so a recorded (0.1, 0.1) would stop
    assert drv.sched.on_trial_result(None, drv.trial("B"), result) == CONTINUE
    assert drv.sched.records()[1] == {"A": (0.9, 0.9)}
    assert all(not r for m, r in drv.sched.records().items() if m != 1)


# --- the property: a non-dominated point is never stopped -------------------------------------


def run_random_stream(rng: random.Random) -> tuple[int, int]:
    """One random asynchronous sweep; returns (stops, dominated points that continued)."""
    rf = rng.choice([2, 3, 1.5])
    modes = rng.choice([MAXMAX, ["max", "min"], ["min", "min"]])
    sched = scheduler(modes=modes, reduction_factor=rf, max_t=9)
    milestones = sched.milestones
    n_trials = rng.randint(2, 12)
    trials = {f"t{i}": make_trial(f"t{i}") for i in range(n_trials)}
    next_epoch = dict.fromkeys(trials, 1)
    shadow: dict[float, dict[str, tuple]] = {m: {} for m in milestones}  # the test's own record
    stops = dominated_kept = 0
    while next_epoch:
        tid = rng.choice(sorted(next_epoch))
        epoch = next_epoch[tid]
        next_epoch[tid] += 1
        if epoch > 10:
            del next_epoch[tid]
            continue
        if rng.random() < 0.2:  # no evaluation this epoch
            result = {"epoch": epoch, "loss": 1.0}
        else:  # coarse values so that ties are common
            point = (round(rng.random(), 1), round(rng.random(), 1))
            result = {"epoch": epoch, "acc": point[0], "few": point[1]}
        before = {m: list(r.values()) for m, r in shadow.items()}
        decision = sched.on_trial_result(None, trials[tid], result)
        rung = max((m for m in milestones if m <= epoch), default=None)
        # Recorded: the first evaluated report at the highest rung reached, unless the trial
        # is already recorded there or higher up. Anything else must CONTINUE.
        ranked = "acc" in result and rung is not None
        ranked = ranked and not any(tid in shadow[m] for m in milestones if m >= rung)
        if ranked:
            shadow[rung][tid] = point
            dominated = any(dominates(q, point, modes) for q in before[rung])
            small = len(before[rung]) + 1 < rf  # fewer than rf points: only F1 continues
            if decision == STOP:
                stops += 1
                assert dominated, (point, before[rung])
            elif dominated:
                dominated_kept += 1
                assert not small, (point, before[rung])
        else:
            assert decision == CONTINUE
        if decision == STOP:
            del next_epoch[tid]
        else:
            assert decision == CONTINUE
        assert sched.records() == shadow
    return stops, dominated_kept


def test_never_stops_a_non_dominated_trial():
    rng = random.Random(20240611)
    totals = [run_random_stream(rng) for _ in range(150)]
    stops = sum(s for s, _ in totals)
    kept = sum(k for _, k in totals)
    assert stops > 50 and kept > 20  # the property was exercised both ways


# --- save / restore ---------------------------------------------------------------------------


def test_save_restore_round_trip_through_json(tmp_path):
    first = [("A", 1, 0.8, 0.6), ("B", 1, 0.6, 0.8), ("D", 1, 0.5, 0.5), ("A", 2, 0.9, 0.7)]
    later = [("C", 1, 0.55, 0.55), ("B", 2, 0.85, 0.65), ("E", 1, 0.9, 0.1), ("C", 2, 0.5, 0.5)]
    original = Driver(scheduler(modes=["max", "min"]))
    original.feed(first)
    path = tmp_path / "moasha.json"
    original.sched.save(str(path))
    raw = path.read_bytes()
    assert not raw.startswith(b"\x80")  # no pickle protocol header: plain text
    state = json.loads(raw.decode("utf-8"))
    assert state["format"] == "ray-lt.moasha" and state["config"]["metrics"] == ["acc", "few"]
    assert state["rungs"][0] == [["A", [0.8, 0.6]], ["B", [0.6, 0.8]], ["D", [0.5, 0.5]]]

    restored = Driver(scheduler(modes=["max", "min"]))
    restored.sched.restore(str(path))
    assert restored.sched.records() == original.sched.records()
    assert restored.sched.stopped() == original.sched.stopped() == {"B": 1.0}  # max / min
    assert restored.feed(later) == original.feed(later)
    assert restored.sched.debug_string() == original.sched.debug_string()
    assert list(tmp_path.iterdir()) == [path]  # the temporary file was renamed away


def test_restore_refuses_other_schedulers_and_bad_files(tmp_path):
    path = tmp_path / "moasha.json"
    scheduler().save(str(path))
    with pytest.raises(ConfigError, match="saved for") as err:
        scheduler(modes=["max", "min"]).restore(str(path))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="saved for"):
        scheduler(reduction_factor=3).restore(str(path))  # other rungs
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\x80\x04not json")
    with pytest.raises(ArtifactError, match="cannot read"):
        scheduler().restore(str(garbage))
    good = path.read_text()
    state = json.loads(good)
    state["rungs"][0] = [["A", [0.5]]]  # one value for two metrics
    path.write_text(json.dumps(state))
    with pytest.raises(ArtifactError, match="malformed"):
        scheduler().restore(str(path))
    state = json.loads(good)
    state["stopped"] = {"A": "epoch one"}
    path.write_text(json.dumps(state))
    with pytest.raises(ArtifactError, match="malformed 'stopped'"):
        scheduler().restore(str(path))
    path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ArtifactError, match="not MultiObjectiveASHA state"):
        scheduler().restore(str(path))


# --- argument validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"metrics": ["acc"], "modes": ["max"]}, "use ASHA for one objective"),
        ({"metrics": "acc", "modes": "max"}, "use ASHA for one objective"),
        ({"metrics": ["acc", "acc"]}, "repeat a name"),
        ({"modes": ["max"]}, "1 modes ['max'] for 2 metrics"),
        ({"modes": ["max", "maximize"]}, "mode 'maximize' for metric 'few' is unknown"),
        ({"reduction_factor": 1}, "reduction_factor 1 must be a number > 1"),
        ({"reduction_factor": 0.5}, "reduction_factor 0.5 must be a number > 1"),
        ({"grace_period": 0}, "grace_period 0 must be between 1 and max_t (8)"),
        ({"grace_period": 9}, "grace_period 9 must be between 1 and max_t (8)"),
        ({"time_attr": ""}, "time_attr '' must be a result key"),
    ],
)
def test_argument_validation(kwargs, message):
    with pytest.raises(ConfigError) as err:
        scheduler(**kwargs)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
