"""The worked example of docs/architecture.md runs as written: a new loss as one objective."""

from __future__ import annotations

import math
import re
import sys
import types
from pathlib import Path

import torch

from ray_lt.data import load_dataset
from ray_lt.engine import LocalSession, StageRun, run_stage
from ray_lt.objective import OBJECTIVES, Batch, StageContext, make_objective
from ray_lt.spec import StageSpec, TrainSpec
from ray_lt.stages.upstream import cross_entropy
from tests.conftest import TINY

DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"


def _focal_class():
    """Execute the doc's code block once (it registers the 'focal' kind) and return it."""
    if "focal" not in OBJECTIVES:
        block = re.search(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
        assert block, "docs/architecture.md has no python block"
        module = types.ModuleType("docs_focal")  # dataclasses look their module up
        sys.modules[module.__name__] = module
        exec(compile(block.group(1), str(DOC), "exec"), module.__dict__)  # noqa: S102
    return OBJECTIVES.get("focal")


def _spec(gamma: float, epochs: int = 1) -> StageSpec:
    return StageSpec(
        kind="focal",
        data=TINY,
        train=TrainSpec(epochs=epochs, batch_size=32, lr=0.05, schedule="cosine"),
        params={"backbone": "resnet8", "gamma": gamma},
    )


def test_focal_with_gamma_zero_is_cross_entropy():
    _focal_class()
    objective = make_objective(_spec(0.0))
    torch.manual_seed(0)
    data = load_dataset(TINY)
    ctx = StageContext(
        spec=objective.spec,
        data=data,
        device=torch.device("cpu"),
        inputs={},
        class_counts=torch.as_tensor(data.class_counts),
    )
    model = objective.build(ctx)
    x = torch.randn(8, 3, 32, 32)
    y = torch.arange(8) % data.num_classes
    batch = Batch(x=x, y=y, index=torch.arange(8), raw=x.to(torch.uint8), generator=None)
    focal = objective.loss(model, batch, ctx)["focal"]
    assert torch.allclose(focal, cross_entropy(model(x)[1], y), atol=1e-6)
    hard = make_objective(_spec(2.0)).loss(model, batch, ctx)["focal"]
    assert hard < focal  # the weights (1 - p_y)^2 are below 1


def test_focal_trains_through_the_one_loop(tmp_path):
    _focal_class()
    spec = _spec(2.0, epochs=2)
    run = StageRun(
        spec=spec,
        objective=OBJECTIVES.get("focal"),
        data=load_dataset(TINY),
        inputs={},
        out_dir=str(tmp_path / "out"),
    )
    summary = run_stage(run, LocalSession())
    assert summary["status"] == "ok"
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    assert all(math.isfinite(h["loss/focal"]) for h in summary["history"])
    assert (tmp_path / "out" / "model.safetensors").exists()
