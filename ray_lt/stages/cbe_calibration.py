"""CBE's ``cbe_calibrate`` stage: joint calibration of the experts' logits, then fusion.

``in_trial`` (cheap, CPU): it trains on float rows read from a ``cbe_logits`` artifact's val
table: the concatenated expert blocks, then K columns holding each image's true expert
(one-hot). Those K columns are read only by the oracle routing, which uses the label by
definition; the fused prediction never reads them. ``calibration``: "full" (prior offset
log((1 + r) / 2) on each open logit, then a per-logit scale a and bias b, both initialised to 1,
trained), "prior" (offset only) and "none" (raw fusion); the last two train nothing (``epochs``
must be 0). Fusion: softmax per expert block, drop the open slot, scatter to global classes,
renormalise; the model returns log-probabilities, so the cross-entropy on them is the NLL. Every
calibrate stage also exports the oracle as a second head (``oracle_overall``...);
``routing="oracle"`` makes it the primary prediction (the report's oracle row). Its shot groups
come from the real training counts, not from its train rows (the val split, 20 per class): the
view sets ``LTDataset.train_counts`` to the original counts.

``include_generalist=True`` is the extended ensemble: the generalist's C logits (the
``cbe_logits`` tables' ``logits`` column) become one more calibrated block, after the expert
blocks, with its own per-logit a and b; the fused log-probability adds its log-softmax to the
experts' fused one and renormalises (a product of the two distributions, so the calibration can
weigh the generalist down by shrinking its scales). The oracle head stays experts-only, the
diagnostic of routing alone. An expert trained without an open class (``open_class=False``)
has no open slot: its block is its S class logits and no prior offset applies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from ray_lt.data.spec import LTDataset, Split
from ray_lt.errors import ConfigError
from ray_lt.objective import OBJECTIVES, Batch, Objective, StageContext, UpstreamArtifact
from ray_lt.stages.upstream import input_artifact, need_input

CALIBRATIONS = ("full", "prior", "none")
ROUTINGS = ("fused", "oracle")


@dataclass(frozen=True)
class CBECalibrateParams:
    calibration: str = "full"  # "full" | "prior" (offset only) | "none" (raw fusion)
    routing: str = "fused"  # "fused" | "oracle" (each image to its true split's expert)
    include_generalist: bool = False  # True: the extended ensemble (experts + generalist)

    def __post_init__(self) -> None:
        if self.calibration not in CALIBRATIONS:
            raise ConfigError(
                f"cbe_calibrate calibration '{self.calibration}' is unknown; use one of "
                f"{', '.join(CALIBRATIONS)}"
            )
        if self.routing not in ROUTINGS:
            raise ConfigError(
                f"cbe_calibrate routing '{self.routing}' is unknown; use one of "
                f"{', '.join(ROUTINGS)}"
            )


@dataclass(frozen=True)
class Layout:
    """Where each expert's block sits in a row, and which global classes it covers."""

    names: list[str]
    masks: np.ndarray  # bool [K, C]
    open_ratios: np.ndarray  # float [K]
    open_class: np.ndarray | None = None  # bool [K]; None: every expert has an open slot

    @property
    def has_open(self) -> list[bool]:
        if self.open_class is None:
            return [True] * len(self.names)
        return [bool(o) for o in self.open_class]

    @property
    def widths(self) -> list[int]:
        return [int(m.sum()) + int(o) for m, o in zip(self.masks, self.has_open, strict=True)]


def read_layout(up: UpstreamArtifact, num_classes: int) -> Layout:
    """The ``experts`` table of a ``cbe_logits`` artifact, checked: every class exactly once."""
    if "experts" not in up.tables:
        raise ConfigError(
            f"input 'logits' ({up.key}) has no experts table; it must be a cbe_logits stage"
        )
    t = up.tables["experts"].to_pydict()
    masks = np.asarray(t["class_mask"], dtype=bool).reshape(len(t["name"]), -1)
    cover = masks.sum(0) if len(masks) else np.zeros(num_classes)
    if masks.shape[1:] != (num_classes,) or (cover != 1).any():
        raise ConfigError(
            f"the experts of input 'logits' ({up.key}) must cover each of the {num_classes} "
            f"classes exactly once; classes covered 0 or >1 times: "
            f"{np.flatnonzero(cover != 1)[:10].tolist()}; fix the expert thresholds"
        )
    # artifacts from before the no-open ablation have no column: all their experts had one
    open_class = np.asarray(t.get("open_class", [True] * len(t["name"])), dtype=bool)
    return Layout(
        list(t["name"]), masks, np.asarray(t["open_ratio"], dtype=np.float64), open_class
    )


def _column(table: pa.Table, name: str, width: int, where: str) -> np.ndarray:
    if name not in table.column_names:
        raise ConfigError(f"{where} has no column '{name}'; regenerate the cbe_logits stage")
    flat = table[name].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    if flat.size != table.num_rows * width:
        raise ConfigError(
            f"{where} column '{name}' has {flat.size // max(table.num_rows, 1)} values per row, "
            f"its class mask says {width}; regenerate the cbe_logits stage"
        )
    return flat.reshape(table.num_rows, width)


def check_order(table: pa.Table, split: Split, where: str, split_name: str) -> None:
    """The table's rows must be the split's images in its order (index, label, source row)."""
    n = len(split.labels)
    got = {c: table[c].to_numpy() for c in ("index", "label", "source_index")}
    want = {"index": np.arange(n), "label": split.labels, "source_index": split.source_index}
    for col, ref in want.items():
        if len(got[col]) != n or not np.array_equal(got[col], ref):
            bad = np.flatnonzero(got[col][:n] != ref[: len(got[col])])
            first = int(bad[0]) if len(bad) else min(n, len(got[col]))
            raise ConfigError(
                f"{where} and the dataset's {split_name} split list different samples (column "
                f"'{col}' differs first at row {first}; {len(got[col])} vs {n} rows); the "
                "calibration needs every expert's logits in the split's order: regenerate them "
                "with one cbe_logits stage on the same data spec"
            )


def calibration_rows(
    up: UpstreamArtifact,
    split: Split,
    split_name: str,
    layout: Layout,
    prior: bool,
    generalist: bool = False,
) -> np.ndarray:
    """float32 [N, D (+ C) + K]: expert blocks (open logit + log((1+r)/2) if ``prior``), the
    generalist's logits if ``generalist``, then the true expert one-hot."""
    where = f"tables/{split_name}.parquet of input 'logits' ({up.key})"
    if split_name not in up.tables:
        raise ConfigError(
            f"input 'logits' ({up.key}) has no {split_name} table; the calibration needs "
            f"{split_name} logits (a dataset with a validation split)"
        )
    table = up.tables[split_name]
    check_order(table, split, where, split_name)
    blocks = []
    members = zip(layout.names, layout.widths, layout.open_ratios, layout.has_open, strict=True)
    for name, width, r, has_open in members:
        z = _column(table, name, width, where).astype(np.float32, copy=True)
        if prior and has_open:
            z[:, -1] += np.float32(math.log((1.0 + r) / 2.0))
        blocks.append(z)
    if generalist:
        blocks.append(_column(table, "logits", layout.masks.shape[1], where).astype(np.float32))
    expert_of = layout.masks.argmax(0)[split.labels]
    route = np.eye(len(layout.names), dtype=np.float32)[expert_of]
    return np.ascontiguousarray(np.concatenate([*blocks, route], axis=1), dtype=np.float32)


class CalibrationModel(nn.Module):
    """Per-logit z' = a * z + b per expert block, then the fusion into log-probabilities over C.

    Input rows: ``[N, D + K]`` (``calibration_rows``), or ``[N, D + C + K]`` with the
    generalist's block; ``forward`` returns ``(z', log p)`` with fused routing or, for
    ``routing="oracle"``, the true expert's classes only.
    """

    def __init__(self, layout: Layout, routing: str, generalist: bool = False) -> None:
        super().__init__()
        widths = layout.widths
        offsets = np.cumsum([0, *widths])
        self.bounds = [(int(offsets[k]), int(offsets[k + 1])) for k in range(len(widths))]
        c = layout.masks.shape[1]
        # the generalist's block, after the experts' (None: the experts-only ensemble)
        self.general = (int(offsets[-1]), int(offsets[-1]) + c) if generalist else None
        self.dim, self.routing = int(offsets[-1]) + (c if generalist else 0), routing
        expert_of = layout.masks.argmax(0)
        column = np.zeros(c, dtype=np.int64)
        for k, mask in enumerate(layout.masks):
            column[mask] = offsets[k] + np.arange(int(mask.sum()))
        self.register_buffer("column", torch.as_tensor(column))
        self.register_buffer("expert_of", torch.as_tensor(expert_of, dtype=torch.int64))
        self.scale = nn.Parameter(torch.ones(self.dim))
        self.bias = nn.Parameter(torch.ones(self.dim))

    def fuse(
        self, z: torch.Tensor, weights: torch.Tensor, generalist: bool = False
    ) -> torch.Tensor:
        """log p over C: per-block softmax, open dropped, scattered, weighted, times the
        generalist's softmax when asked (and it is a member), renormalised."""
        logq = torch.cat([F.log_softmax(z[:, s:e], dim=1) for s, e in self.bounds], dim=1)
        g = logq[:, self.column] + torch.log(weights)[:, self.expert_of]
        if generalist and self.general is not None:
            g = g + F.log_softmax(z[:, self.general[0] : self.general[1]], dim=1)
        return g - torch.logsumexp(g, dim=1, keepdim=True)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = x[:, : self.dim].float() * self.scale + self.bias
        route = x[:, self.dim :].float()
        return z, self.fuse(z, torch.ones_like(route), True), self.fuse(z, route)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, fused, oracle = self.heads(x)
        return z, oracle if self.routing == "oracle" else fused


@OBJECTIVES.register("cbe_calibrate")
class CBECalibrate(Objective):
    """Joint calibration of the experts' logits on the val split; NLL of the fused distribution."""

    version = "1"
    Params = CBECalibrateParams
    in_trial = True

    def validate(self, counts: np.ndarray) -> None:
        """A cbe_logits input, epochs only for what learns, no image augmentation."""
        up, train = (
            need_input(self.spec, "logits", "build it with ray_lt.recipes.cbe.cbe(...)"),
            self.spec.train,
        )
        if up.kind != "cbe_logits":
            raise ConfigError(f"cbe_calibrate input 'logits' must be cbe_logits, not {up.kind}")
        if self.params.calibration != "full" and train.epochs != 0:
            raise ConfigError(
                f"cbe_calibrate calibration='{self.params.calibration}' learns nothing; set "
                f"epochs=0 (got {train.epochs}) or use calibration='full'"
            )
        if train.augment != "none":
            raise ConfigError("cbe_calibrate trains on logits; set augment='none'")

    def prepare_data(self, data: LTDataset, inputs: Mapping[str, UpstreamArtifact]) -> LTDataset:
        self.validate(data.class_counts)
        up = input_artifact(self.spec, inputs, "logits")
        layout = read_layout(up, data.num_classes)
        prior, general = self.params.calibration != "none", self.params.include_generalist
        val = calibration_rows(up, data.val, "val", layout, prior, general)
        test = calibration_rows(up, data.test, "test", layout, prior, general)
        return LTDataset(
            train_counts=data.class_counts,
            name=f"{data.name}:cbe_logits",
            num_classes=data.num_classes,
            class_names=list(data.class_names),
            train=Split(val, data.val.labels, data.val.source_index),
            val=Split(val.copy(), data.val.labels, data.val.source_index),
            test=Split(test, data.test.labels, data.test.source_index),
            mean=data.mean,
            std=data.std,
            many_inclusive=data.many_inclusive,
        )

    def build(self, ctx: StageContext) -> nn.Module:
        up = input_artifact(self.spec, ctx.inputs, "logits")
        layout = read_layout(up, ctx.num_classes)
        return CalibrationModel(layout, self.params.routing, self.params.include_generalist)

    def loss(self, model: nn.Module, batch: Batch, ctx: StageContext):
        _, logp = model(batch.x)
        return {"nll": F.nll_loss(logp, batch.y)}

    def predict(self, model: nn.Module, x: torch.Tensor):
        z, fused, oracle = model.heads(x)
        primary = oracle if self.params.routing == "oracle" else fused
        return z, primary, {"logits_oracle": oracle}
