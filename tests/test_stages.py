"""Contract over every registered stage objective: one CPU step gives a finite loss, a gradient
on every trainable parameter, named loss terms, and (features, logits) of the right shapes."""

from __future__ import annotations

import math

import pytest
import torch

from ray_lt.data import augment_batch, load_dataset
from ray_lt.data.augment import second_view_images
from ray_lt.models import create_model
from ray_lt.objective import (
    OBJECTIVES,
    Batch,
    StageContext,
    UpstreamArtifact,
    get_objective,
    parse_params,
)
from ray_lt.spec import StageSpec
from tests.conftest import TINY, tiny_ce, tiny_crt


def _upstream(data) -> dict[str, UpstreamArtifact]:
    ce = tiny_ce()
    model = create_model("resnet8", data.num_classes)
    doc = {"key": ce.key, "spec": ce.to_dict()}
    art = UpstreamArtifact(key=ce.key, spec=doc, state_dict=model.state_dict())
    # "features" feeds crt / lws; "teacher0" cbd_student; "teacher" ssd_distill
    return {"features": art, "teacher0": art, "teacher": art}


# Objectives that do not train on augmented image batches, each covered by its own tests.
CONTRACT_EXEMPT = {
    "cbe_expert": "trains on its prepare_data view (tests/test_stages_cbe.py)",
    "cbe_logits": "evaluates only, epochs=0 (tests/test_stages_cbe.py)",
    "cbe_calibrate": "trains on float rows of logits (tests/test_stages_cbe.py)",
    "tau_norm": "post-hoc, trains nothing, epochs=0 (tests/test_tau_norm.py)",
}


def _contract_kinds() -> list[str]:
    get_objective("ce")  # registers every shipped stage
    # objectives registered by other test modules ("test_*") are not shipped stages
    names = [n for n in OBJECTIVES.names() if not n.startswith("test_")]
    return [n for n in names if n not in CONTRACT_EXEMPT]


def _spec_for(kind: str) -> StageSpec:
    if kind == "ce":
        return tiny_ce()
    if kind == "cbd_teacher":
        return StageSpec(
            kind=kind, data=TINY, train=tiny_ce().train, params={"backbone": "resnet8"}
        )
    if kind == "cbd_student":
        train = tiny_crt(tiny_ce()).train  # class-balanced, as CBD's student
        params = {"backbone": "resnet8"}
        return StageSpec(
            kind=kind, data=TINY, train=train, params=params, inputs={"teacher0": tiny_ce()}
        )
    if kind == "ssd_distill":
        params = {"backbone": "resnet8"}
        return StageSpec(
            kind=kind, data=TINY, train=tiny_ce().train, params=params,
            inputs={"teacher": tiny_ce()},
        )  # fmt: skip
    if kind == "ssd_feature":
        params = {"backbone": "resnet8", "queue_size": 32}
        return StageSpec(kind=kind, data=TINY, train=tiny_ce().train, params=params)
    return tiny_crt(tiny_ce(), kind=kind)


def test_exemptions_name_registered_stages():
    get_objective("ce")
    assert set(CONTRACT_EXEMPT) <= set(OBJECTIVES.names())


@pytest.mark.parametrize("kind", _contract_kinds())
def test_one_step_contract(kind):
    spec = _spec_for(kind)
    data = load_dataset(TINY)
    objective = get_objective(kind)(spec)
    ctx = StageContext(
        spec=spec,
        data=data,
        device=torch.device("cpu"),
        inputs=_upstream(data),
        class_counts=torch.as_tensor(data.class_counts),
    )
    model = objective.build(ctx)
    model.train()
    gen = torch.Generator().manual_seed(0)
    raw = torch.from_numpy(data.train.images[:8].copy())
    x = augment_batch("crop_flip", raw, gen, data.mean, data.std)
    y = torch.from_numpy(data.train.labels[:8].copy())
    scale = objective.second_view  # the engine's second view, drawn as on the device path
    view2 = None if scale is None else second_view_images(raw, gen, scale)
    batch = Batch(x=x, y=y, index=torch.arange(8), raw=raw, generator=gen, view2=view2)
    terms = objective.loss(model, batch, ctx)
    assert terms and all(isinstance(k, str) for k in terms)
    loss = sum(terms.values())
    assert math.isfinite(loss.item())
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, "an objective must train something"
    for name, p in trainable:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    feats, logits = model(x)
    assert logits.shape == (8, data.num_classes) and feats.shape[0] == 8


def test_unknown_param_is_an_error():
    from ray_lt.errors import ConfigError

    spec = StageSpec(kind="ce", data=TINY, train=tiny_ce().train, params={"backbnoe": "resnet8"})
    with pytest.raises(ConfigError, match="backbnoe"):
        parse_params(get_objective("ce"), spec)


def test_key_changes_with_what_changes_the_result():
    a = tiny_ce()
    assert a.key == tiny_ce().key
    assert a.key != tiny_ce(seed=1).key
    assert tiny_crt(a).key != tiny_crt(tiny_ce(seed=1)).key  # input keys enter the key
    from ray_lt.spec import Resources

    assert a.with_resources(Resources(gpus_per_worker=0.5)).key == a.key  # resources do not


def test_lt_model_rebuilds_stored_weights_with_clear_errors():
    from ray_lt.errors import ConfigError
    from ray_lt.stages.upstream import rebuild

    def lt_model(doc, num_classes, weights):  # an artifact of a stage with doc's kind and params
        artifact = UpstreamArtifact("k", {"spec": {**tiny_ce().to_dict(), **doc}}, weights)
        return rebuild(artifact, num_classes)

    spec = {"kind": "ce", "params": {"backbone": "resnet10"}}
    weights = create_model("resnet10", 4).state_dict()
    # a pretrained start is never re-read once the stage has stored weights
    seeded = {"kind": "ce", "params": {"backbone": "resnet10",
              "backbone_kwargs": {"weights_path": "/nonexistent/resnet10.pt"}}}  # fmt: skip
    model = lt_model(seeded, 4, weights)
    assert torch.equal(model.state_dict()["head.weight"], weights["head.weight"])
    with pytest.raises(ConfigError, match="'ce' stage do not fit backbone 'resnet10' with 5"):
        lt_model(spec, 5, weights)
