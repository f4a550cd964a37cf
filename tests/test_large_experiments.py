"""The ImageNet-LT, Places-LT and iNat18 experiment files: their full recipes are the seeds'
backbones and settings, and their smoke variants run end to end through the CLI (real Ray, MLflow
and Parquet) on tiny JPEG trees in each dataset's own format, with the same backbones."""

from __future__ import annotations

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from ray_lt.artifacts import ArtifactStore
from ray_lt.experiment import load_experiment
from tests.cli import ROOT, smoke_sweep
from tests.image_trees import make_tree

TREE = {"num_classes": 6, "max_per_class": 24, "imbalance": 12.0, "val_per_class": 2}


def _stages(workdir) -> dict[str, dict]:
    """Stage kind -> metrics.json of every stored stage (by key prefix)."""
    store = ArtifactStore(workdir / "ray_lt_store")
    return {key: store.open(key).metrics() for key in store.keys()}


def _backbones(workdir) -> set[str]:
    store = ArtifactStore(workdir / "ray_lt_store")
    names = set()
    for key in store.keys():
        spec = store.open(key).spec()["spec"]
        if "backbone" in spec["params"]:
            names.add(spec["params"]["backbone"])
    return names


@pytest.mark.parametrize(
    "file, backbone",
    [
        ("experiments/cbd_ens_imagenet_lt.py", "resnet50"),
        ("experiments/cbd_ens_inat18.py", "resnet50"),
        ("experiments/ssd_lt_imagenet_lt.py", "resnext50_32x4d"),
        ("experiments/ssd_lt_inat18.py", "resnet50"),
        ("experiments/cbe_imagenet_lt.py", "resnet10"),
    ],
)
def test_full_recipes_name_the_seeds_backbones_at_224(file, backbone):
    exp = load_experiment(ROOT / file)
    config = {"seed": 0, "teachers": "vanilla1", "finetune": False, "calibration": "full"}
    from ray_lt.spec import walk

    stages = walk(exp.pipeline(config))
    assert {s.param_dict.get("backbone") for s in stages} - {None} == {backbone}
    assert {s.data.image_size for s in stages} == {224}
    assert {s.data.placement for s in stages} == {"auto"}
    assert exp.resources.gpus_per_worker == 1


@pytest.mark.ray
@pytest.mark.parametrize(
    "file, dataset, backbone, kinds",
    [
        ("experiments/cbd_ens_imagenet_lt.py", "imagenet_lt", "resnet50", {"cbd_teacher": 2}),
        ("experiments/cbd_ens_inat18.py", "inat18", "resnet50", {"cbd_student": 1}),
        (
            "experiments/ssd_lt_imagenet_lt.py",
            "imagenet_lt",
            "resnext50_32x4d",
            {"ssd_feature": 1},
        ),
        ("experiments/ssd_lt_inat18.py", "inat18", "resnet50", {"ssd_distill": 1}),
        ("experiments/cbe_imagenet_lt.py", "imagenet_lt", "resnet10", {"cbe_expert": 3}),
    ],
)
def test_smoke_on_a_tiny_tree(tmp_path, ray_head, file, dataset, backbone, kinds):
    tree = make_tree(tmp_path / "data", dataset, **TREE)
    smoke_sweep(file, tmp_path, "--data-root", str(tree), head=ray_head)
    stages = _stages(tmp_path)
    for kind, count in kinds.items():
        assert sum(k.startswith(f"{kind}-") for k in stages) == count, sorted(stages)
    assert _backbones(tmp_path) == {backbone}
    for metrics in stages.values():
        assert 0.0 <= metrics["test"]["overall"] <= 1.0


@pytest.mark.ray
def test_places_lt_smoke_starts_resnet152_from_user_weights(tmp_path, monkeypatch, ray_head):
    weights = torchvision.models.resnet152(weights=None).state_dict()
    weights = {k: v for k, v in weights.items() if not k.startswith("fc.")}
    with torch.no_grad():
        weights["conv1.weight"] = torch.full_like(weights["conv1.weight"], 0.01)
    path = tmp_path / "resnet152.safetensors"
    save_file(weights, str(path))
    monkeypatch.setenv("RAY_LT_RESNET152_WEIGHTS", str(path))
    tree = make_tree(tmp_path / "data", "places_lt", **TREE)
    smoke_sweep("experiments/cbe_places_lt.py", tmp_path, "--data-root", str(tree), head=ray_head)
    stages = _stages(tmp_path)
    assert sum(k.startswith("cbe_calibrate-") for k in stages) == 1
    assert _backbones(tmp_path) == {"resnet152"}
    # the generalist started from the file: its first conv is still near the constant 0.01
    # (a random init has mean ~0), after one epoch at lr 0.01
    store = ArtifactStore(tmp_path / "ray_lt_store")
    model = store.open(next(k for k in store.keys() if k.startswith("ce-"))).state_dict()
    conv1 = next(v for k, v in model.items() if k.endswith("conv1.weight") and v.shape[1] == 3)
    assert abs(float(conv1.mean()) - 0.01) < 0.003
