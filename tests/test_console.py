"""The console a user watches: a line per stage and the summary; Ray's output in a log file.

The quickstart smoke sweep runs as a user runs it, in a subprocess whose output is a pipe (as
in CI or a log file), on a real local Ray with a real store and MLflow; then once more with
``--verbose`` on the same store, which brings Ray's worker output back. The first run is also
the quickstart's smoke test (its store and its report), so the suite pays for one quickstart
sweep, not two. The routing pieces are also checked on their own, with a real store and a real
artifact.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from ray_lt.artifacts import ArtifactStore
from ray_lt.console import (
    PROGRESS_MARK,
    QuietConsole,
    StageProgress,
    _without_false_alarms,
)
from tests.cli import run_cli, sweep_cmd
from tests.conftest import tiny_ce, tiny_crt

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "experiments" / "quickstart.py"
PREEMPTION_LINE = (
    "[2026-01-01 10:00:00,000 E 1 2] core_worker.cc:2465: Actor with class name: "
    "'PreemptionWatcher' and ID: 'ab' has constructor arguments in the object store and "
    "max_restarts > 0."
)


def _sweep(workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = sweep_cmd(QUICKSTART, workdir, "--smoke", *extra)
    return subprocess.run(
        cmd, cwd=workdir, env=dict(os.environ), capture_output=True, text=True, timeout=880
    )


@pytest.mark.ray
def test_quickstart_console_is_a_line_per_stage_and_the_summary(tmp_path):
    proc = _sweep(tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    lines = out.splitlines()
    assert len(lines) <= 40, out
    assert not [ln for ln in lines if " E " in ln or "ERROR" in ln], out
    log = re.search(r"Ray's own output \(workers, Tune\) goes to (\S+)", proc.stdout)
    assert log and Path(log.group(1)).is_relative_to(tmp_path / "store" / "_tune"), out
    text = Path(log.group(1)).read_text()
    assert "RayTrainWorker pid=" in text and "PreemptionWatcher" in text  # kept, not lost
    assert "RayTrainWorker" not in out and "Checkpoint successfully" not in out
    # every stage trains in a worker group here: its workers' epoch lines (which the terminal's
    # live view shows, test_live_view.py, on inline stages) reach the file
    assert re.search(r"\| stage 2/2 crt \| epoch 1/1 \| \d+ img/s \| ", text), text[-3000:]
    assert re.search(r"\| stage 1/2 ce \| epoch 2/2 \| \d+ img/s \| ", text), text[-3000:]
    # two trials share seed 0's CE: the store trains it once, the other trial reuses it
    ce = [ln for ln in lines if "| stage 1/2 ce |" in ln]
    assert sum("| trained in " in ln for ln in ce) == 1, out
    assert sum("| reused in " in ln for ln in ce) == 1, out
    assert all("seed=0" in ln and "lr=" in ln for ln in ce)
    assert any(
        re.search(r"\| stage 2/2 crt \| trained in [\d.]+s \| val_overall=0\.\d{4}", ln)
        for ln in lines
    ), out
    assert "\nsweep 'quickstart-smoke': 2 trials" in proc.stdout
    # the same runs report (this is also the quickstart's smoke test: one sweep serves both)
    keys = ArtifactStore(tmp_path / "store").keys()
    assert sum(k.startswith("ce-") for k in keys) == 1
    assert sum(k.startswith("crt-") for k in keys) == 2
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    report = run_cli("ray_lt.report", "experiments/quickstart.py", tmp_path, "--tracking-uri", uri)
    assert "| configuration |" in report.stdout
    assert "Downloading artifacts" not in report.stderr, report.stderr[-2000:]
    for name in ("table.md", "table.tex", "table.csv", "per_class.png", "index.html"):
        assert list(tmp_path.glob(f"reports/*/{name}")), name
    # --verbose: test_sweep_reliability.py::test_verbose_keeps_rays_worker_output_on_the_console


def test_worker_lines_go_to_the_file_and_progress_to_the_console(tmp_path, capsys):
    console = QuietConsole(str(tmp_path / "run" / "console.log"))
    console.open()
    try:
        console._worker_lines(
            {
                "pid": 7,
                "actor_name": "RayTrainWorker",
                "lines": ["Checkpoint successfully created", f"{PROGRESS_MARK}stage 1/2 ce | x"],
            }
        )
        console._worker_lines(
            {"pid": 8, "actor_name": "TrainController", "lines": [PREEMPTION_LINE]}
        )
    finally:
        console.close()
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "stage 1/2 ce | x" and "console.log" in out[0]
    log = (tmp_path / "run" / "console.log").read_text()
    assert "(RayTrainWorker pid=7) Checkpoint successfully created" in log
    assert "(TrainController pid=8)" in log and PROGRESS_MARK not in log


def test_verbose_console_drops_only_rays_false_alarm():
    printed: list[dict] = []
    _without_false_alarms({"pid": 8, "lines": [PREEMPTION_LINE, "kept"]}, printed.append)
    _without_false_alarms({"pid": 8, "lines": [PREEMPTION_LINE]}, printed.append)
    assert printed == [{"pid": 8, "lines": ["kept"]}]


def test_stage_progress_prints_start_and_end_of_each_stage(tmp_path, capsys):
    store = ArtifactStore(tmp_path / "store")
    ce = tiny_ce()
    crt = tiny_crt(ce)
    for spec, overall in ((ce, 0.25), (crt, 0.625)):
        src = tmp_path / spec.kind
        src.mkdir()
        (src / "metrics.json").write_text(f'{{"val": {{"overall": {overall}}}}}')
    store.put(crt.key, tmp_path / "crt")  # stored: no start line for it
    watch = StageProgress(None, "lr=0.1 seed=0", [ce, crt], "val_overall")
    watch.begin()
    watch.starting(ce)
    ce_artifact = store.put(ce.key, tmp_path / "ce")
    watch.log_stage(ce_artifact, reused=False, final=False)
    watch.log_stage(store.lookup(crt.key), reused=True, final=True)
    lines = [ln.removeprefix(PROGRESS_MARK) for ln in capsys.readouterr().out.splitlines()]
    assert lines[0] == "lr=0.1 seed=0 | stage 1/2 ce | start"
    assert re.fullmatch(
        r"lr=0.1 seed=0 \| stage 1/2 ce \| trained in [\d.]+s \| "
        r"val_overall=0.2500",
        lines[1],
    ), lines
    assert re.fullmatch(
        r"lr=0.1 seed=0 \| stage 2/2 crt \| reused in [\d.]+s \| "
        r"val_overall=0.6250",
        lines[2],
    ), lines
    assert len(lines) == 3


def test_stage_progress_leaves_a_worker_groups_stages_to_it(tmp_path, capsys):
    store = ArtifactStore(tmp_path / "store")
    ce = tiny_ce()
    crt = tiny_crt(ce)
    (tmp_path / "ce").mkdir()
    (tmp_path / "ce" / "metrics.json").write_text('{"val": {"overall": 0.5}}')
    watch = StageProgress(None, "lr=0.1 seed=0", [ce, crt], "val_overall")
    prefixes = watch.worker_progress([ce, crt])
    assert prefixes == {
        ce.key: "lr=0.1 seed=0 | stage 1/2 ce",
        crt.key: "lr=0.1 seed=0 | stage 2/2 crt",
    }
    watch.log_stage(store.put(ce.key, tmp_path / "ce"), reused=False, final=False)
    assert capsys.readouterr().out == ""  # the worker printed its lines as they happened
