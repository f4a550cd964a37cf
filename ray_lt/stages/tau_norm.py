"""τ-normalisation (``tau_norm``), the post-hoc baseline of Kang et al., "Decoupling
representation and classifier for long-tailed recognition" (ICLR 2020).

Why: instance-sampled CE leaves the classifier rows of frequent classes with larger norms, which
biases the decision boundaries towards them. τ-norm rescales each row of the trained linear
classifier, w_i -> w_i / ||w_i||^τ, and trains nothing: τ = 0 keeps W, τ = 1 makes every row
unit-norm. Bias: dropped. We follow the official classifier-balancing script (``tau_norm.py``),
which scores features against the rescaled weight rows only (a dot product without the bias it
loads), so τ = 0 is the CE classifier *without its bias* and can differ slightly from CE.

Selection: the ``features`` input's model (normally a ``ce`` stage) is evaluated once on the
validation split; each τ of ``taus`` (default 0.0, 0.1, ..., 1.0; the official script sweeps
0..2 by hand) is then one matrix product of those features. The τ with the highest validation
overall accuracy wins (ties -> the smallest τ) and the stage's model is built with it, so the
engine's normal evaluation reports val and test for the chosen τ. The stage trains nothing
(``epochs=0``); the model stores the CE weight and τ as buffers (``head.weight``, ``head.tau``)
and the artifact's ``tables/tau_selection.parquet`` lists every τ with its validation accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from ray_lt.data.sources import image_source
from ray_lt.engine.evaluation import EVAL_BATCH, evaluate
from ray_lt.errors import ConfigError
from ray_lt.models import freeze
from ray_lt.objective import OBJECTIVES, Batch, Objective, StageContext
from ray_lt.stages.upstream import load_weights, need_input, rebuild_input, skeleton, to_layout

HINT = "a trained 'ce' stage (ray_lt.recipes.baseline('tau_norm', seed))"
TAUS = tuple(i / 10 for i in range(11))  # 0.0, 0.1, ..., 1.0
EPS = 1e-12  # a zero row stays zero instead of 0 / 0


def tau_normalize(weight: torch.Tensor, tau: float) -> torch.Tensor:
    """Each row w_i of ``weight`` [C, D] divided by ||w_i||_2 ** tau (tau = 0: W unchanged)."""
    return weight / weight.norm(dim=1, keepdim=True).clamp_min(EPS).pow(tau)


class TauNormHead(nn.Module):
    """``logits = f @ tau_normalize(W, tau).T`` in float32, no bias; W and tau are buffers."""

    def __init__(self, weight: torch.Tensor, tau: float) -> None:
        super().__init__()
        self.num_classes, self.in_dim = weight.shape
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("tau", torch.tensor(float(tau), dtype=torch.float64))
        self.selection: list[tuple[float, float]] = []  # (tau, val overall), set by the stage

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(features.device.type, enabled=False):
            weight = tau_normalize(self.weight.float(), float(self.tau))
            return F.linear(features.float(), weight)


def choose_tau(taus: tuple[float, ...], accuracies: list[float]) -> float:
    """The τ of the highest accuracy; among equal ones, the smallest τ."""
    best = max(accuracies)
    return min(t for t, a in zip(taus, accuracies, strict=True) if a == best)


@dataclass(frozen=True)
class TauNormParams:
    taus: tuple[float, ...] = TAUS

    def __post_init__(self) -> None:
        taus = self.taus
        numbers = isinstance(taus, tuple) and all(
            isinstance(t, int | float) and not isinstance(t, bool) and 0 <= t <= 1 for t in taus
        )
        if not (numbers and taus and len(set(taus)) == len(taus)):
            raise ConfigError(
                f"tau_norm taus must be a non-empty tuple of distinct numbers in [0, 1], got "
                f"{self.taus!r}; e.g. taus=(0.0, 0.1, ..., 1.0) (the default)"
            )
        object.__setattr__(self, "taus", tuple(float(t) for t in taus))


@OBJECTIVES.register("tau_norm")
class TauNorm(Objective):
    """The input's backbone and its classifier rows τ-normalised, τ chosen on val; no training."""

    version = "1"
    Params = TauNormParams

    def validate(self, counts: np.ndarray) -> None:
        """A ``features`` input with a linear head, and ``epochs=0``."""
        features = need_input(self.spec, "features", HINT)
        if self.spec.train.epochs != 0:
            raise ConfigError(
                f"tau_norm trains nothing; set epochs=0 in its TrainSpec, got "
                f"{self.spec.train.epochs}"
            )
        head = skeleton(features, len(counts)).head
        if not isinstance(head, nn.Linear):
            raise ConfigError(
                f"tau_norm needs an upstream linear head, got {type(head).__name__}; train the "
                "'features' stage with head='linear'"
            )

    def build(self, ctx: StageContext) -> nn.Module:
        data = ctx.data
        self.validate(data.class_counts)
        if not len(data.val.labels):
            raise ConfigError(
                f"tau_norm chooses τ on the validation split, and '{data.name}' has none; use a "
                "data spec with a validation split (val_per_class > 0)"
            )
        model = rebuild_input(ctx, "features")
        freeze(model)
        model = to_layout(model.to(ctx.device).eval(), ctx)
        source = image_source(data.val, data, ctx.device)
        val = evaluate(self, model, source, data, ctx.spec.train, ctx.device)  # features once
        weight, labels = model.head.weight.detach(), data.val.labels
        # the engine's own path for the val logits: same device, same batches, float32 head
        batches = val.features.to(ctx.device).split(EVAL_BATCH)
        accuracies = []
        for tau in self.params.taus:
            head = TauNormHead(weight, tau)
            preds = torch.cat([head(f).argmax(1) for f in batches]).cpu().numpy()
            accuracies.append(float((preds == labels).mean()))
        model.head = TauNormHead(weight.cpu(), choose_tau(self.params.taus, accuracies))
        model.head.selection = list(zip(self.params.taus, accuracies, strict=True))
        return model

    def loss(self, model: nn.Module, batch: Batch, ctx: StageContext):
        raise ConfigError("tau_norm trains nothing; set epochs=0 in its TrainSpec")

    def export_tables(self, model: nn.Module, ctx: StageContext):
        head = model.head
        taus, accuracies = zip(*head.selection, strict=True) if head.selection else ((), ())
        table = {
            "tau": pa.array(taus, pa.float64()),
            "val_overall": pa.array(accuracies, pa.float64()),
            "chosen": pa.array([t == float(head.tau) for t in taus], pa.bool_()),
        }
        return {"tau_selection": pa.table(table)}

    def rebuild(self, weights, num_classes: int, *, keep_head: bool = True) -> nn.Module:
        """The input's backbone with a τ-norm head (its CE weight and τ from ``weights``)."""
        model = skeleton(need_input(self.spec, "features", HINT), num_classes)
        model.head = TauNormHead(torch.zeros(num_classes, model.feature_dim), 0.0)
        return load_weights(model, weights, keep_head=keep_head, kind="tau_norm")
