"""What ``pip install`` gives a user: the ``ray-lt`` command, and ``search_spaces`` importable
from an experiment file anywhere (not only inside a checkout)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

RAY_LT = str(Path(sys.executable).with_name("ray-lt"))


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_console_command_lists_and_dispatches(tmp_path):
    shown = _run([RAY_LT, "--help"], tmp_path)
    assert shown.returncode == 0 and "sweep" in shown.stdout and "report" in shown.stdout
    unknown = _run([RAY_LT, "swep", "x.py"], tmp_path)
    assert unknown.returncode == 2 and "unknown command 'swep'" in unknown.stderr
    missing = _run([RAY_LT, "report", "nowhere.py"], tmp_path)
    errors = [ln for ln in missing.stderr.splitlines() if ln.startswith("error:")]
    assert missing.returncode == 2 and len(errors) == 1 and "does not exist" in errors[0]
    assert "Traceback" not in missing.stderr


def test_an_experiment_outside_the_checkout_imports_search_spaces(tmp_path):
    outside = tmp_path / "my_experiments"
    outside.mkdir()
    (outside / "mine.py").write_text(
        "from ray_lt.experiment import Experiment\n"
        "from search_spaces.optim import lr_wd\n\n"
        "experiment = Experiment(name='mine', pipeline=lambda config: None, "
        "param_space=lr_wd())\n",
        encoding="utf-8",
    )
    code = "from ray_lt.experiment import load_experiment; print(load_experiment('mine.py').name)"
    proc = _run([sys.executable, "-c", code], outside)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "mine"
