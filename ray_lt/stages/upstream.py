"""The toolkit every stage kind shares: upstream models, frozen helpers, cross-entropy, layout.

- Rebuilding: an upstream's model is rebuilt by its own kind's ``Objective.rebuild`` from the
  spec and weights of its artifact (``rebuild``, ``rebuild_input``), with or without its head;
  ``skeleton`` gives the untrained architecture of a spec (feature widths, stage counts) for
  driver-side checks. ``plain_model`` and ``load_weights`` are the pieces ``rebuild`` uses.
- Frozen helpers (teachers, experts) beside the trained model: ``frozen`` / ``frozen_input``.
- ``cross_entropy`` and ``ce_terms``: the loss every method starts from.
- ``to_layout``: the channels_last rule (``StageContext.channels_last``) for views and helpers.

A rebuild runs under ``torch.random.fork_rng`` unless asked not to, so an upstream's throwaway
initialisation does not shift the stage's own seeded one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from ray_lt.errors import ConfigError
from ray_lt.models import LTModel, create_model, freeze
from ray_lt.objective import Batch, StageContext, UpstreamArtifact, make_objective
from ray_lt.spec import StageSpec

BACKBONE = "backbone."
T = TypeVar("T", torch.Tensor, nn.Module)


# --- inputs ----------------------------------------------------------------------------------


def need_input(spec: StageSpec, name: str, hint: str = "") -> StageSpec:
    """The spec of the stage's input ``name``; a one-line error naming the inputs it has."""
    inputs = spec.input_dict
    if name not in inputs:
        raise ConfigError(
            f"stage '{spec.kind}' needs an input named '{name}'; got {sorted(inputs)}"
            + (f"; {hint}" if hint else "")
        )
    return inputs[name]


def input_artifact(
    spec: StageSpec, inputs: Mapping[str, UpstreamArtifact], name: str
) -> UpstreamArtifact:
    """The artifact of input ``name`` (the spec must name it, the run must have trained it)."""
    need_input(spec, name)
    if name not in inputs:
        raise ConfigError(
            f"stage '{spec.kind}' input '{name}' has no upstream artifact in this run; run the "
            "stage through ray_lt.pipeline so its inputs are trained first"
        )
    return inputs[name]


# --- rebuilding ------------------------------------------------------------------------------


def plain_model(kind: str, arch: Mapping[str, Any], num_classes: int) -> LTModel:
    """``create_model`` from a stage's ``architecture()``, without a pretrained start: stored
    weights replace it, and a skeleton only needs its shapes."""
    if "backbone" not in arch:
        raise ConfigError(
            f"a '{kind}' stage's model cannot be rebuilt for use downstream: it names no "
            "backbone; use a stage with a backbone (ce, cbd_teacher, ...) as the input"
        )
    backbone_kwargs = dict(arch.get("backbone_kwargs") or {})
    backbone_kwargs.pop("weights_path", None)
    return create_model(
        arch["backbone"],
        num_classes,
        head=arch.get("head", "linear"),
        backbone_kwargs=backbone_kwargs,
        head_kwargs=dict(arch.get("head_kwargs") or {}),
    )


def load_weights(
    model: LTModel,
    weights: Mapping[str, torch.Tensor] | None,
    *,
    keep_head: bool,
    kind: str,
    backbone: str = "its backbone",
) -> nn.Module:
    """``model`` with a stage's stored weights, or (``keep_head=False``) its backbone with the
    ``backbone.*`` ones; ``weights=None`` leaves the skeleton untrained."""
    target = model if keep_head else model.backbone
    if weights is None:
        return target
    state = dict(weights)
    if not keep_head:
        state = {k[len(BACKBONE) :]: v for k, v in state.items() if k.startswith(BACKBONE)}
        if not state:
            raise ConfigError(
                f"the stored weights of a '{kind}' stage have no 'backbone.*' weights; use a "
                "stage whose model keeps its backbone under 'backbone.' (ce, cbd_teacher, ...)"
            )
    try:
        target.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        shape = f"backbone '{backbone}'" + (
            f" with {model.num_classes} outputs" if keep_head else ""
        )
        raise ConfigError(
            f"the stored weights of a '{kind}' stage do not fit {shape} ({first}); check that "
            "stage's params"
        ) from exc
    return target


def rebuild(upstream: UpstreamArtifact, num_classes: int, *, keep_head: bool = True) -> nn.Module:
    """An upstream's model from its artifact, rebuilt by its own kind (``Objective.rebuild``)."""
    doc = upstream.spec.get("spec")
    if not doc:
        raise ConfigError(f"artifact {upstream.key} has no stage spec in spec.json; re-run it")
    objective = make_objective(StageSpec.from_dict(doc))
    return objective.rebuild(upstream.state_dict, num_classes, keep_head=keep_head)


def rebuild_input(
    ctx: StageContext,
    name: str,
    *,
    keep_head: bool = True,
    num_classes: int | None = None,
    isolate_rng: bool = True,
) -> nn.Module:
    """Input ``name``'s model (``num_classes`` defaults to this stage's), errors naming it.

    ``isolate_rng=False`` lets the rebuild draw from the stage's seeded generator, as cRT and
    LWS always have (the head they add next is initialised after it).
    """
    upstream = input_artifact(ctx.spec, ctx.inputs, name)
    try:
        with torch.random.fork_rng(devices=[], enabled=isolate_rng):
            return rebuild(upstream, num_classes or ctx.num_classes, keep_head=keep_head)
    except ConfigError as exc:
        raise ConfigError(f"input '{name}' ({upstream.key}): {exc}") from exc


def skeleton(spec: StageSpec, num_classes: int, *, keep_head: bool = True) -> nn.Module:
    """The untrained model (or backbone) of a stage's spec, for its shapes; RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        return make_objective(spec).rebuild(None, num_classes, keep_head=keep_head)


# --- frozen helpers --------------------------------------------------------------------------


def frozen(module: nn.Module, ctx: StageContext, *, batch_stats: bool = False) -> nn.Module:
    """A helper beside the trained model (a teacher, an expert): never optimised, on the
    device, in eval mode, or in train mode with ``batch_stats`` (its BatchNorm then normalises
    with, and re-estimates, batch statistics). Keep it in ``ctx.aux`` or outside the module
    tree, so it is neither wrapped for DDP nor saved, and the engine's ``train()`` misses it."""
    freeze(module)
    module.to(ctx.device).train(batch_stats)
    return to_layout(module, ctx)


def frozen_input(
    ctx: StageContext,
    name: str,
    *,
    keep_head: bool = True,
    num_classes: int | None = None,
    batch_stats: bool = False,
) -> nn.Module:
    """Input ``name``'s model rebuilt (RNG untouched) and set up as a frozen helper."""
    module = rebuild_input(ctx, name, keep_head=keep_head, num_classes=num_classes)
    return frozen(module, ctx, batch_stats=batch_stats)


# --- loss and layout -------------------------------------------------------------------------


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy, computed in float32 (logits may be bf16 under autocast)."""
    return F.cross_entropy(logits.float(), labels)


def ce_terms(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    """Plain cross-entropy on the model's logits of the engine's view, as the term ``ce``."""
    _, logits = model(batch.x)
    return {"ce": cross_entropy(logits, batch.y)}


def to_layout(value: T, ctx: StageContext) -> T:
    """A view or helper in the stage's memory format (channels_last on CUDA when asked)."""
    if not ctx.channels_last:
        return value
    if isinstance(value, nn.Module):
        return value.to(memory_format=torch.channels_last)
    return value.contiguous(memory_format=torch.channels_last)
