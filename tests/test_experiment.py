"""Bad input reaches the user as one line naming the cause and the fix, with a non-zero exit,
before Ray starts, and nothing already stored is touched."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ray_lt.errors import ConfigError, ExperimentError
from ray_lt.experiment import Experiment, load_experiment
from tests.conftest import tiny_ce

FIX = Path(__file__).parent / "fixtures"
ROOT = FIX.parent.parent


# One Python process serves every CLI case below: each case runs ``python -m ray_lt.sweep``'s own
# entry point (``main`` with its argv, environment and working folder), its file descriptor 2
# captured to a file, and a Python traceback written there for an exception that escapes, as the
# interpreter would print it. Starting the interpreter, Ray, torch and MLflow once instead of
# once per case is what makes these tests fast.
DRIVER = """
import json, os, sys, traceback
cases = json.loads(open(sys.argv[1]).read())
base = dict(os.environ)
for case in cases:
    os.environ.clear()
    os.environ.update({**base, **case["env"]})
    os.chdir(case["cwd"])
    sys.argv = ["ray_lt.sweep", *case["args"]]
    sys.stderr.flush()
    saved = os.dup(2)
    with open(case["stderr"], "w") as out:
        os.dup2(out.fileno(), 2)
        try:
            from ray_lt.sweep import main
            code = main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os.dup2(saved, 2)
    os.close(saved)
    with open(case["stderr"] + ".rc", "w") as rc:
        rc.write(str(code))
"""


def _args(tmp_path: Path, *args) -> list[str]:
    store = ["--store", str(tmp_path / "s"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    return [*map(str, args), *store]


def _run_cases(work: Path, cases: dict[str, dict]) -> dict[str, tuple[int, list[str], str]]:
    """Run every case ({"dir", "args", "env"}) in one process; (code, error lines, stderr) each."""
    plan = [
        {"cwd": str(c["dir"]), "args": c["args"], "env": c["env"],
         "stderr": str(work / f"{name}.stderr")}
        for name, c in cases.items()
    ]  # fmt: skip
    (work / "cases.json").write_text(json.dumps(plan))
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(work / "cases.json")],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {}
    for name in cases:
        stderr = (work / f"{name}.stderr").read_text()
        code = int((work / f"{name}.stderr.rc").read_text())
        lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
        results[name] = (code, lines, stderr)
    return results


BAD_INPUTS = [
    (FIX / "missing.py", {}, "does not exist"),
    (FIX / "broken_syntax.py", {}, "syntax error in"),
    (FIX / "no_experiment.py", {}, "defines no `experiment = Experiment(...)`"),
    (FIX / "bad_names.py", {"RAY_LT_TEST_BAD": "stage"}, "unknown stage kind 'cee'; known:"),
    (FIX / "bad_names.py", {"RAY_LT_TEST_BAD": "model"}, "unknown backbone 'resnet33'"),
    (FIX / "bad_names.py", {"RAY_LT_TEST_BAD": "dataset"}, "unknown dataset 'cifar1000_lt'"),
    (
        FIX / "bad_names.py",
        {"RAY_LT_TEST_BAD": "data", "RAY_LT_DATA": "/nonexistent/data"},
        "RAY_LT_DATA",
    ),
    (FIX / "bad_names.py", {"RAY_LT_TEST_BAD": "empty"}, "empty search space"),
    (FIX / "bad_names.py", {"RAY_LT_TEST_BAD": "impossible"}, "impossible search space"),
    (FIX / "bad_cbd.py", {"RAY_LT_TEST_BAD": "empty"}, "empty teacher list"),
    (FIX / "bad_cbd.py", {"RAY_LT_TEST_BAD": "unknown"}, "unknown teacher 'vanila2'"),
    (FIX / "bad_cbd.py", {"RAY_LT_TEST_BAD": "widths"}, "teacher0=64, teacher1=512"),
    (
        ROOT / "experiments/cbd_ens_imagenet_lt.py",
        {"RAY_LT_DATA": "/no/such/data"},
        "ImageNet_LT",
    ),
]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> dict[str, tuple[int, list[str], str, Path]]:
    """Every bad-input CLI case of this module, each in its own folder, run by one process."""
    work = tmp_path_factory.mktemp("cli")
    cases = {}
    for i, (file, env, _) in enumerate(BAD_INPUTS):
        folder = work / f"case{i}"
        folder.mkdir()
        cases[f"case{i}"] = {"dir": folder, "args": _args(folder, file), "env": env}
    # the store-intact case: a complete artifact is in the store before the CLI runs
    from ray_lt.artifacts import ArtifactStore

    intact = work / "intact"
    intact.mkdir()
    src = intact / "art"
    src.mkdir()
    (src / "metrics.json").write_text("{}")
    ArtifactStore(intact / "s").put("ce-0123456789abcdef", src)
    args = _args(intact, FIX / "bad_names.py")
    cases["intact"] = {"dir": intact, "args": args, "env": {"RAY_LT_TEST_BAD": "stage"}}
    results = _run_cases(work, cases)
    return {name: (*results[name], cases[name]["dir"]) for name in cases}


@pytest.mark.parametrize(
    "case", range(len(BAD_INPUTS)), ids=lambda i: f"{BAD_INPUTS[i][0].stem}-{BAD_INPUTS[i][2]}"
)
def test_bad_input_is_one_line_and_nonzero(cli_runs, case):
    code, lines, stderr, folder = cli_runs[f"case{case}"]
    expected = BAD_INPUTS[case][2]
    assert code == 2, stderr[-2000:]
    assert len(lines) == 1 and expected in lines[0], stderr[-2000:]
    assert "Traceback" not in stderr
    assert not (folder / "s" / "_tune").exists()  # failed before any trial ran


def test_bad_input_leaves_the_store_intact(cli_runs):
    from ray_lt.artifacts import ArtifactStore

    code, _, _, folder = cli_runs["intact"]
    assert code == 2 and ArtifactStore(folder / "s").lookup("ce-0123456789abcdef") is not None


def test_load_experiment_and_smoke_variant():
    exp = load_experiment(ROOT / "experiments" / "quickstart.py")
    assert exp.name == "quickstart" and exp.seeds == (0, 1)
    smoke = load_experiment(ROOT / "experiments" / "quickstart.py", smoke=True)
    assert smoke.name == "quickstart-smoke"
    with pytest.raises(ExperimentError, match="no smoke variant"):
        Experiment(name="x", pipeline=lambda c: tiny_ce()).variant(smoke=True)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"search": "bayes"}, "unknown search 'bayes'"),
        ({"mode": "maximum"}, "must be 'max' or 'min'"),
        ({"seeds": ()}, "seeds is empty"),
        ({"metric": ("a", "b"), "mode": ("max",) * 3}, "must be 'max' or 'min'"),
    ],
)
def test_experiment_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Experiment(name="x", pipeline=lambda c: tiny_ce(), **kwargs)


def _pipeline(config):
    return tiny_ce()


def _smoke_pipeline(config):
    return tiny_ce()


def test_smoke_overrides_change_only_the_fields_they_name():
    exp = Experiment(
        name="full",
        pipeline=_pipeline,
        param_space={"lr": 0.1},
        search="grid",
        seeds=(0, 1, 2),
        max_concurrent_trials=4,
        scheduler=None,
        report_metrics=("overall",),
        smoke={"pipeline": _smoke_pipeline, "seeds": (0,)},
    )
    smoke = exp.variant(smoke=True)
    assert smoke.pipeline is _smoke_pipeline and smoke.seeds == (0,)
    assert smoke.name == "full-smoke" and smoke.smoke is None
    for f in dataclasses.fields(Experiment):
        if f.name not in ("name", "pipeline", "seeds", "smoke"):
            assert getattr(smoke, f.name) == getattr(exp, f.name), f.name
    assert exp.variant(smoke=False) is exp
    assert load_experiment(ROOT / "experiments" / "quickstart.py").smoke.seeds == (0,)


@pytest.mark.parametrize(
    "overrides, name",
    [({}, "full-smoke"), ({"name": "tiny"}, "tiny"), ({"name": "full"}, "full-smoke")],
)
def test_smoke_name_rule(overrides, name):
    exp = Experiment(name="full", pipeline=_pipeline, smoke=overrides)
    assert exp.variant(smoke=True).name == name


@pytest.mark.parametrize(
    "smoke, match",
    [
        ({"seeds": (0,), "num_sample": 2}, "unknown smoke override 'num_sample'; valid fields: "),
        ({"smoke": {"seeds": (0,)}}, "smoke overrides cannot set 'smoke'"),
        ({"search": "bayes"}, "smoke variant: unknown search 'bayes'"),
        (["seeds"], "smoke must be a dict of the fields that differ"),
    ],
)
def test_bad_smoke_overrides_are_one_config_error_line(smoke, match):
    with pytest.raises(ConfigError, match=match) as info:
        Experiment(name="full", pipeline=_pipeline, smoke=smoke)
    assert "\n" not in str(info.value)
    if "num_sample" in match:
        assert "num_samples" in str(info.value) and "report_metrics" in str(info.value)
        assert "'smoke'" not in str(info.value).split("valid fields:")[1]


def test_smoke_as_a_whole_experiment_still_works():
    old = Experiment(name="full-smoke", pipeline=_smoke_pipeline, seeds=(0,))
    exp = Experiment(name="full", pipeline=_pipeline, seeds=(0, 1), search="grid", smoke=old)
    assert exp.variant(smoke=True) == old  # used as it is: no field of the parent leaks in
    assert exp.variant(smoke=True).search == "optuna"
    same = Experiment(name="full", pipeline=_smoke_pipeline)
    assert Experiment(name="full", pipeline=_pipeline, smoke=same).smoke.name == "full-smoke"
    nested = Experiment(name="s", pipeline=_smoke_pipeline, smoke={})
    with pytest.raises(ConfigError, match="has a smoke variant itself"):
        Experiment(name="full", pipeline=_pipeline, smoke=nested)


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.py")), ids=lambda p: p.name)
def test_every_experiment_file_loads_with_and_without_smoke(path):
    exp = load_experiment(path)
    smoke = load_experiment(path, smoke=True)
    assert smoke.name == f"{exp.name}-smoke" and smoke.smoke is None
    assert smoke.pipeline.__name__ == "smoke_pipeline"
