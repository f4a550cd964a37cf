"""``--dry-run``: the plan a sweep would run, against a real store, with Ray never started.

Counts are exact and known in advance: a grid experiment written here (CE per seed shared by
three cRT learning rates), the quickstart (Optuna: only its first batch is known) and the
CBD_ENS ablation grid. A stage is put in the store with the store's own ``put``, so the store
decides by its manifest that the key is complete.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from ray_lt.artifacts import ArtifactStore
from ray_lt.experiment import load_experiment
from ray_lt.plan import plan_sweep
from ray_lt.spec import walk
from ray_lt.sweep import main
from tests.conftest import requires_cifar

ROOT = Path(__file__).resolve().parent.parent

GRID = """
from ray import tune

from ray_lt.data.spec import DataSpec
from ray_lt.experiment import Experiment
from ray_lt.spec import StageSpec, TrainSpec

DATA = DataSpec(name="synthetic_lt", num_classes=4, max_per_class=48, imbalance=4.0)


def pipeline(config):
    ce = StageSpec(
        kind="ce",
        data=DATA,
        train=TrainSpec(epochs=2, batch_size=32, lr=0.05, seed=config["seed"]),
        params={"backbone": "resnet8"},
    )
    crt = TrainSpec(epochs=1, batch_size=32, lr=config["lr"], seed=config["seed"])
    if config["lr"] > 1:
        raise ValueError("lr above 1 diverges")
    return StageSpec(kind="crt", data=DATA, train=crt, inputs={"features": ce})


experiment = Experiment(
    name="grid-plan",
    pipeline=pipeline,
    param_space={"lr": tune.grid_search(LRS)},
    search="grid",
    seeds=(0, 1),
)
"""


def _grid_file(tmp_path: Path, lrs: list[float]) -> Path:
    path = tmp_path / "grid_plan.py"
    path.write_text(f"LRS = {lrs!r}\n" + textwrap.dedent(GRID))
    return path


def _store_stage(store: ArtifactStore, key: str, tmp_path: Path) -> None:
    """A complete artifact for ``key``, published the way a stage publishes one."""
    src = tmp_path / f"art-{key}"
    src.mkdir()
    (src / "metrics.json").write_text('{"val": {"overall": 0.5}}')
    store.put(key, src)


def _dry_run(capsys, *args: str) -> tuple[int, list[str], str]:
    import ray

    code = main([*args, "--dry-run"])
    out, err = capsys.readouterr()
    assert not ray.is_initialized()  # the plan never starts Ray
    return code, out.splitlines(), err


def test_grid_plan_counts_every_trial_and_reuses_what_the_store_holds(tmp_path, capsys):
    file = _grid_file(tmp_path, [0.01, 0.1, 0.5])
    store = ArtifactStore(tmp_path / "store")
    plan = plan_sweep(load_experiment(file))
    ce_seed0 = walk(next(t.final for t in plan.trials if t.seed == 0))[0]
    assert ce_seed0.kind == "ce"
    _store_stage(store, ce_seed0.key, tmp_path)
    before = sorted(p.name for p in (tmp_path / "store").iterdir())

    code, lines, err = _dry_run(capsys, str(file), "--store", str(tmp_path / "store"))
    assert code == 0, err
    assert "6 trials, showing every trial" in lines[0]
    assert sum(ln.startswith("trial ") for ln in lines) == 6
    held = [ln for ln in lines if ln.endswith("reused (in the store)")]
    assert len(held) == 3 and all("features: ce" in ln for ln in held)  # seed 0's three cRTs
    assert sum(ln.endswith("  train") for ln in lines) == 7
    assert lines[-2] == "unique stages in the sweep: 8: 1 in the store (reused), 7 to train"
    assert lines[-1] == "to train by kind: ce 1, crt 6"
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == before


def test_optuna_plan_shows_its_first_batch(tmp_path, capsys):
    file = ROOT / "experiments" / "quickstart.py"  # Optuna, 2 configurations x 2 seeds
    exp = load_experiment(file)
    plan = plan_sweep(exp)
    assert not plan.exact and plan.total == 4 and [t.seed for t in plan.trials] == [0, 1]
    assert plan.trials[0].config == plan.trials[1].config  # one suggestion, once per seed
    store = ArtifactStore(tmp_path / "store")
    _store_stage(store, walk(plan.trials[0].final)[0].key, tmp_path)  # seed 0's CE

    code, lines, err = _dry_run(capsys, str(file), "--store", str(tmp_path / "store"))
    assert code == 0, err
    assert "4 trials, showing the first batch of 2" in lines[0]
    assert lines[-2].startswith(
        "unique stages in this first batch: 4: 1 in the store (reused), 3 to train; later"
    )
    assert lines[-1] == "to train by kind: ce 1, crt 2"


def test_dry_run_does_not_create_a_missing_store(tmp_path, capsys):
    code, lines, err = _dry_run(
        capsys, str(_grid_file(tmp_path, [0.1])), "--store", str(tmp_path / "none")
    )
    assert code == 0, err
    assert lines[-2] == "unique stages in the sweep: 4: 0 in the store (reused), 4 to train"
    assert not (tmp_path / "none").exists()


@requires_cifar
def test_cbd_ens_plan_trains_each_teacher_once(tmp_path, capsys):
    file = ROOT / "experiments" / "cbd_ens.py"
    code, lines, err = _dry_run(capsys, str(file), "--store", str(tmp_path / "store"))
    assert code == 0, err
    assert "60 trials, showing every trial" in lines[0]
    teachers = [ln for ln in lines if "teacher_" in ln and ln.endswith("  train")]
    assert len(teachers) == 4
    assert lines[-2] == "unique stages in the sweep: 64: 0 in the store (reused), 64 to train"
    assert lines[-1] == "to train by kind: cbd_student 54, cbd_teacher 4, ce 3, crt 3"


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda tmp: tmp / "missing.py", "does not exist"),
        (lambda tmp: _write(tmp / "broken.py", "experiment = (\n"), "syntax error in"),
        # the first grid value is fine (the preflight's sample); the plan meets the bad one
        (lambda tmp: _grid_file(tmp, [0.1, 3.0]), "lr above 1 diverges"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, make, expected):
    code, lines, err = _dry_run(capsys, str(make(tmp_path)), "--store", str(tmp_path / "s"))
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(errors) == 1 and expected in errors[0], err
    assert "Traceback" not in err and not lines


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
