"""CBD / CBD_ENS: teacher subsets as a search space, recipes, and a 15-trial sweep on a real
local Ray that must train the four standard teachers exactly once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ray_lt.artifacts import ArtifactStore
from ray_lt.errors import ConfigError
from ray_lt.recipes import cbd, parse_teacher, split_teachers
from ray_lt.spec import walk
from search_spaces.cbd import projection, seeds, teacher_subsets, teachers
from tests.cli import HEAD_ENV, ray_args

ROOT = Path(__file__).resolve().parent.parent


def test_fifteen_subsets_of_four_teachers():
    subsets = teacher_subsets()
    assert len(subsets) == 15 and subsets[0] == "vanilla1"
    assert "vanilla1+vanilla2+data_aug1+data_aug2" in subsets
    with pytest.raises(ConfigError, match="unknown teacher 'vanila1'"):
        teacher_subsets(["vanila1"])


def test_optuna_searches_the_subset_choice():
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(
        space={"teachers": teachers(), "alpha": tune.uniform(0.1, 0.9)},
        metric="val_overall",
        mode="max",
        seed=0,
    )
    seen = {searcher.suggest(f"t{i}")["teachers"] for i in range(12)}
    assert seen <= set(teacher_subsets()) and len(seen) > 1


def test_parse_teacher_and_subsets():
    assert parse_teacher("data_aug2") == ("data_aug", 2)
    assert split_teachers("vanilla1+data_aug2") == ["vanilla1", "data_aug2"]
    with pytest.raises(ConfigError, match="twice"):
        split_teachers("vanilla1+vanilla1")
    with pytest.raises(ConfigError, match="unknown teacher"):
        cbd("vanilla1+dataaug2", seed=0)


def test_students_share_teachers_by_key():
    a = cbd("vanilla1+data_aug1", seed=0)
    b = cbd("vanilla1", seed=1, alpha=0.6)
    keys_a = {s.key for s in walk(a) if s.kind == "cbd_teacher"}
    keys_b = {s.key for s in walk(b) if s.kind == "cbd_teacher"}
    assert len(keys_a) == 2 and keys_b < keys_a  # the student's seed is not the teacher's
    assert cbd("", seed=0, alpha=0.0).inputs == ()  # alpha 0: class-balanced from scratch


@pytest.mark.ray
def test_fifteen_trials_train_four_teachers(tmp_path, ray_head):
    env = {**os.environ, **HEAD_ENV, "RAY_LT_LOCK_HEARTBEAT_S": "2", "RAY_LT_LOCK_STALE_S": "30"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ray_lt.sweep",
            str(ROOT / "tests/fixtures/cbd_reuse.py"),
            "--store",
            str(tmp_path / "store"),
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'm.db'}",
            *ray_args(ray_head),
            "--num-workers",  # the race is between trials; worker groups race in test_sweep.py
            "0",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    keys = ArtifactStore(tmp_path / "store").keys()
    assert sum(k.startswith("cbd_teacher-") for k in keys) == 4
    assert sum(k.startswith("cbd_student-") for k in keys) == 15
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    exp = client.get_experiment_by_name("cbd-reuse")
    trained = client.search_runs(
        [exp.experiment_id],
        "tags.`ray_lt.stage_kind` = 'cbd_teacher' and tags.`ray_lt.reused` = 'false'",
        max_results=1000,
    )
    assert len(trained) == 4
    finished = client.search_runs(
        [exp.experiment_id],
        "tags.`ray_lt.role` = 'trial' and attributes.status = 'FINISHED'",
        max_results=1000,
    )
    assert len(finished) == 15


def test_projection_width_reaches_the_student_and_is_checked():
    from ray_lt.data import load_dataset
    from ray_lt.objective import get_objective

    assert projection()["proj_dim"].categories == [None, 128, 256]
    wide = cbd("", seed=0, alpha=0.0, proj_dim=256)
    assert wide.param_dict["proj_dim"] == 256 and wide.key != cbd("", seed=0, alpha=0.0).key
    bad = cbd("vanilla1", seed=0, proj_dim=256)
    objective = get_objective("cbd_student")
    with pytest.raises(ConfigError, match="proj_dim=256 must equal .* width 64"):
        objective(bad).validate(load_dataset(bad.data).class_counts)
    assert seeds(3) == (0, 1, 2)
