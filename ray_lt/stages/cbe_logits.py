"""CBE's ``cbe_logits`` stage: every expert's raw logits on the val and test splits.

It runs with ``epochs=0`` (evaluate and export only) as a normal Ray Train stage. Its saved
weights are the generalist's (its primary logits); the experts are frozen helpers held outside
the module tree, so the artifact does not copy their weights, which stay in their own artifacts.
Tables: ``val`` / ``test`` with ``index``, ``label`` (global), ``logits`` (generalist) and one
raw-logit column per expert input (``expert0``...); ``experts`` with each expert's thresholds,
open ratio, whether it has an open output, and class mask over the C global classes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from ray_lt.errors import ConfigError
from ray_lt.models import freeze
from ray_lt.objective import OBJECTIVES, Batch, Objective, StageContext, make_objective
from ray_lt.stages.cbe import HINT, CBEExpertParams, in_split, span
from ray_lt.stages.upstream import frozen_input, need_input, rebuild_input

EXPERT_INPUT = re.compile(r"expert(0|[1-9][0-9]*)")


def expert_names(names: Iterable[str]) -> list[str]:
    """The ``expertN`` input names in numeric order (besides ``generalist``)."""
    names = [n for n in names if n != "generalist"]
    bad = [n for n in names if not EXPERT_INPUT.fullmatch(n)]
    if bad:
        raise ConfigError(
            f"cbe_logits inputs must be 'generalist' and expert0, expert1, ...; got {sorted(bad)}"
        )
    return sorted(names, key=lambda n: int(n[len("expert") :]))


def check_coverage(spans: list[tuple[str, int, int | None]]) -> None:
    """Expert splits must tile [0, inf): every class in exactly one expert (fusion needs it)."""
    if not spans:
        raise ConfigError("cbe_logits needs at least one expert input (expert0, ...)")
    ordered = sorted(spans, key=lambda s: s[1])
    edge: int | None = 0
    for name, low, high in ordered:
        if edge is None or low != edge:
            what = "overlaps" if edge is None or low < edge else "leaves a gap before"
            raise ConfigError(
                f"expert splits must tile [0, inf) without gaps or overlaps; {name} "
                f"{span(low, high)} {what} the previous split ending at "
                f"{'inf' if edge is None else edge}; e.g. (100, None), (20, 100), (0, 20)"
            )
        edge = high
    if edge is not None:
        raise ConfigError(
            f"expert splits must reach infinity; the highest ends at {edge}; set its high=None"
        )


class CBELogitsModel(nn.Module):
    """The generalist (saved, primary logits) and the experts (held outside the module tree)."""

    def __init__(self, generalist: nn.Module, experts: dict[str, nn.Module]) -> None:
        super().__init__()
        self.generalist = generalist
        self.experts = tuple(experts.items())  # a tuple: not registered, not saved

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.generalist(x)


@OBJECTIVES.register("cbe_logits")
class CBELogits(Objective):
    """Every expert's raw logits (and the generalist's) on val and test; trains nothing."""

    version = "1"

    def validate(self, counts: np.ndarray) -> None:
        """Input names and kinds; expert splits tile [0, inf); nothing to train."""
        need_input(self.spec, "generalist", HINT)
        if self.spec.train.epochs != 0:
            raise ConfigError(
                f"cbe_logits trains nothing; set epochs=0, got {self.spec.train.epochs}"
            )
        check_coverage([(name, p.low, p.high) for name, p in self._experts().items()])

    def build(self, ctx: StageContext) -> nn.Module:
        counts = ctx.data.class_counts
        self.validate(counts)
        generalist = rebuild_input(ctx, "generalist")
        experts = {
            name: frozen_input(
                ctx,
                name,
                num_classes=int(in_split(counts, p.low, p.high).sum()) + int(p.open_class),
            )
            for name, p in self._experts().items()
        }
        freeze(generalist)
        return CBELogitsModel(generalist, experts)

    def loss(self, model: nn.Module, batch: Batch, ctx: StageContext):
        raise ConfigError("cbe_logits trains nothing; set epochs=0 in its TrainSpec")

    def predict(self, model: nn.Module, x: torch.Tensor):
        features, logits = model(x)
        return features, logits, {name: expert(x)[1] for name, expert in model.experts}

    def export_tables(self, model: nn.Module, ctx: StageContext):
        counts, experts = ctx.data.class_counts, self._experts()
        masks = [in_split(counts, p.low, p.high).tolist() for p in experts.values()]
        table = {
            "name": list(experts),
            "low": pa.array([p.low for p in experts.values()], pa.int64()),
            "high": pa.array([p.high for p in experts.values()], pa.int64()),
            "open_ratio": [float(p.open_ratio) for p in experts.values()],
            "open_class": [bool(p.open_class) for p in experts.values()],
            "class_mask": pa.array(masks, pa.list_(pa.bool_())),
        }
        return {"experts": pa.table(table)}

    def _experts(self) -> dict[str, CBEExpertParams]:
        """Each expert input's params, in numeric order of the names."""
        inputs = self.spec.input_dict
        experts = {}
        for name in expert_names(inputs):
            if inputs[name].kind != "cbe_expert":
                raise ConfigError(
                    f"cbe_logits input '{name}' must be a cbe_expert, not {inputs[name].kind}"
                )
            experts[name] = make_objective(inputs[name]).params
        return experts
