"""Class-balanced experts (Sharma et al., GCPR 2020): ``cbe_expert``, ``cbe_logits``,
``cbe_calibrate`` (methods/cbe.md).

Pipeline: a generalist (any stage whose model keeps its backbone under ``backbone.``, normally
``ce``) -> one ``cbe_expert`` per class split -> ``cbe_logits`` (every expert's raw logits on the
val and test splits, one Parquet column per expert) -> ``cbe_calibrate`` (joint calibration,
trained on the val logits, selected on val, reported on test).

Decisions (the fact sheet leaves them to us):

- Split rule: a class belongs to an expert iff ``low <= train count < high`` (``high=None`` is
  infinity), so a class with exactly 100 images is a many-shot expert's class. This is CBE's
  rule, kept apart from the report's many/medium/few groups (``ray_lt.metrics``).
- The expert's data view (``prepare_data``): in-split labels re-indexed 0..S-1 in increasing
  global-class order, one "open" label S. Train: every in-split image plus
  ``floor(N_split / open_ratio)`` out-of-split images drawn once, uniformly, without
  replacement, with ``numpy.random.default_rng([open_seed, 0])``. Val and test: every in-split
  image plus as many out-of-split images (fewer if there are fewer), drawn with streams 1 and 2,
  so the expert's own accuracy (open predictions count) selects its epoch.
- ``num_learnable``: -1 trains everything; k >= 1 trains the classifier and the last k - 1
  residual stages (CIFAR ResNet-32: layer3, layer2, layer1; torchvision: layer4 .. layer1); the
  stem trains only with -1. Our backbones have no 512-d FC after pooling, so the paper's "2 =
  classifier + FC" has no counterpart: the paper's k >= 3 is our k - 1. Frozen parts keep their
  BatchNorm statistics (eval mode) unless ``update_frozen_bn=True`` reproduces the original
  code, where frozen BatchNorms still re-estimate statistics on the expert's data.
- ``cbe_logits`` runs with ``epochs=0`` (evaluate and export only) as a normal Ray Train stage.
  Its saved weights are the generalist's (its primary logits); the experts are held outside the
  module tree so the artifact does not copy their weights, which stay in their own artifacts.
  Tables: ``val`` / ``test`` with ``index``, ``label`` (global), ``logits`` (generalist) and one
  raw-logit column per expert input (``expert0``...); ``experts`` with each expert's thresholds,
  open ratio and class mask over the C global classes.
- ``cbe_calibrate`` (``in_trial``: cheap, CPU) trains on float rows: the concatenated expert
  blocks, then K columns holding each image's true expert (one-hot). Those K columns are read
  only by the oracle routing, which uses the label by definition; the fused prediction never
  reads them. ``calibration``: "full" (prior offset log((1 + r) / 2) on each open logit, then a
  per-logit scale a and bias b, both initialised to 1, trained), "prior" (offset only) and
  "none" (raw fusion); the last two train nothing (``epochs`` must be 0). Fusion: softmax per
  expert block, drop the open slot, scatter to global classes, renormalise; the model returns
  log-probabilities, so the engine's cross-entropy on them is the NLL. Every calibrate stage
  also exports the oracle as a second head (``oracle_overall``...); ``routing="oracle"`` makes it
  the primary prediction (the report's oracle row).
- Its shot groups must come from the real training counts, not from its train rows (the val
  split, 20 per class): the view sets ``LTDataset.train_counts`` to the original counts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from ray_lt.data.spec import DataSpec, LTDataset, Split
from ray_lt.errors import ConfigError
from ray_lt.models import BACKBONES, HEADS, LTModel, freeze
from ray_lt.objective import OBJECTIVES, Batch, StageContext, UpstreamArtifact
from ray_lt.spec import StageSpec
from ray_lt.stages.baseline import lt_model

EXPERT_INPUT = re.compile(r"expert(0|[1-9][0-9]*)")
CALIBRATIONS = ("full", "prior", "none")
ROUTINGS = ("fused", "oracle")
STAGE_NAMES = ("layer4", "layer3", "layer2", "layer1")  # top-down; CIFAR ResNets stop at 3


def in_split(counts: np.ndarray, low: int, high: int | None) -> np.ndarray:
    """Boolean class mask of an expert: ``low <= count < high`` (``high=None``: no bound)."""
    counts = np.asarray(counts)
    return (counts >= low) & (counts < (math.inf if high is None else high))


def _span(low: int, high: int | None) -> str:
    return f"[{low}, {'inf' if high is None else high})"


def _known_counts(data: DataSpec) -> np.ndarray | None:
    """Training counts of datasets whose profile follows from the spec alone (no I/O)."""
    from ray_lt.data.splits import lt_counts

    n_max = {"cifar100_lt": 500, "cifar10_lt": 5000}.get(data.name)
    classes = {"cifar100_lt": 100, "cifar10_lt": 10}.get(data.name)
    if data.name == "synthetic_lt":
        n_max, classes = data.max_per_class, data.num_classes
    if n_max is None:
        return None
    return np.asarray(lt_counts(n_max, classes, data.imbalance))


def _take(split: Split, rows: np.ndarray, labels: np.ndarray) -> Split:
    return Split(
        images=np.ascontiguousarray(split.images[rows]),
        labels=labels.astype(np.int64),
        source_index=split.source_index[rows].astype(np.int64),
    )


def _draw(candidates: np.ndarray, n: int, seed: int, stream: int) -> np.ndarray:
    rng = np.random.default_rng([seed, stream])
    n = min(n, len(candidates))
    return np.sort(rng.choice(candidates, size=n, replace=False)) if n else candidates[:0]


def expert_view(
    data: LTDataset, low: int, high: int | None, open_ratio: float, seed: int
) -> LTDataset:
    """The expert's dataset: its classes re-indexed 0..S-1 plus an open class S (module doc).

    Args:
        data: the full dataset (its train counts decide the split).
        low, high: the split rule ``low <= count < high``.
        open_ratio: in-split training images per open image (> 0).
        seed: the draws' seed (train stream 0, val 1, test 2).
    """
    mask = in_split(data.class_counts, low, high)
    classes = np.flatnonzero(mask)
    s = len(classes)
    if s == 0:
        raise ConfigError(
            f"cbe_expert with low={low}, high={high} has no classes: no class of "
            f"'{data.name}' has a train count in {_span(low, high)} (counts "
            f"{int(data.class_counts.min())}..{int(data.class_counts.max())}); move the thresholds"
        )
    remap = np.full(data.num_classes, s, dtype=np.int64)
    remap[classes] = np.arange(s)
    splits = {}
    for stream, name in enumerate(("train", "val", "test")):
        split = getattr(data, name)
        inside = mask[split.labels]
        own = np.flatnonzero(inside)
        n_open = math.floor(len(own) / open_ratio) if name == "train" else len(own)
        other = _draw(np.flatnonzero(~inside), n_open, seed, stream)
        rows = np.concatenate([own, other])
        splits[name] = _take(split, rows, remap[split.labels[rows]])
    names = [data.class_names[c] for c in classes] + ["open"]
    return LTDataset(
        f"{data.name}:expert{_span(low, high)}",
        s + 1,
        names,
        **splits,
        mean=data.mean,
        std=data.std,
    )


def _stages(backbone: nn.Module) -> list[nn.Module]:
    return [getattr(backbone, n) for n in STAGE_NAMES if hasattr(backbone, n)]


def apply_num_learnable(model: LTModel, num_learnable: int) -> None:
    """Freeze by ``num_learnable`` (module doc): -1 all, k >= 1 head + last k - 1 stages."""
    if num_learnable == -1:
        return
    stages = _stages(model.backbone)
    if num_learnable > len(stages) + 1:
        raise ConfigError(
            f"cbe_expert num_learnable={num_learnable} exceeds this backbone's "
            f"{len(stages)} stages + classifier; use -1 or 1..{len(stages) + 1}"
        )
    freeze(model.backbone)
    for stage in stages[: num_learnable - 1]:
        for p in stage.parameters():
            p.requires_grad_(True)


def _backbone_params(up_params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    # weights_path seeded the generalist; its trained weights replace it, so never re-read it.
    kwargs = {k: v for k, v in (up_params.get("backbone_kwargs") or {}).items()}
    kwargs.pop("weights_path", None)
    return up_params.get("backbone", "resnet32"), kwargs


def rebuild(upstream: UpstreamArtifact, name: str, num_classes: int) -> LTModel:
    """An upstream ``LTModel`` from its spec doc and weights (``lt_model``), RNG untouched."""
    try:
        with torch.random.fork_rng(devices=[]):
            return lt_model(upstream.spec.get("spec", {}), num_classes, upstream.state_dict)
    except ConfigError as exc:
        raise ConfigError(f"input '{name}' ({upstream.key}): {exc}") from exc


def _need(inputs: Any, name: str, kind: str) -> Any:
    if name not in inputs:
        raise ConfigError(
            f"stage '{kind}' needs an input named '{name}'; got {sorted(inputs)}; "
            "build it with ray_lt.recipes.cbe.cbe(...)"
        )
    return inputs[name]


# --- experts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CBEExpertParams:
    low: int = 0
    high: int | None = None  # None: no upper bound (the many-shot expert)
    open_ratio: float = 16.0  # in-split training images per open image
    num_learnable: int = -1
    open_seed: int = 0  # seeds the open draws (train, val, test)
    update_frozen_bn: bool = False  # True: the original code's frozen-but-updating BatchNorms

    def __post_init__(self) -> None:
        if isinstance(self.low, bool) or not isinstance(self.low, int) or self.low < 0:
            raise ConfigError(f"cbe_expert low must be an int >= 0, got {self.low!r}")
        if self.high is not None and (not isinstance(self.high, int) or self.high <= self.low):
            raise ConfigError(
                f"cbe_expert high must be None or an int > low={self.low}, got {self.high!r}"
            )
        if isinstance(self.open_ratio, bool) or not (
            isinstance(self.open_ratio, int | float) and self.open_ratio > 0
        ):
            raise ConfigError(
                f"cbe_expert open_ratio must be > 0 (in-split images per open image, CBE: 16),"
                f" got {self.open_ratio!r}"
            )
        if not isinstance(self.num_learnable, int) or not (
            self.num_learnable == -1 or self.num_learnable >= 1
        ):
            raise ConfigError(
                f"cbe_expert num_learnable must be -1 (all) or >= 1 (1: classifier only), "
                f"got {self.num_learnable!r}"
            )


@OBJECTIVES.register("cbe_expert")
class CBEExpert:
    """An expert over one class split plus an open class, fine-tuned from the generalist."""

    version = "1"
    Params = CBEExpertParams

    def validate(self, params: CBEExpertParams, spec: StageSpec) -> None:
        """Driver-side: a generalist input, a reachable num_learnable, classes in the split."""
        up = _need(spec.input_dict, "generalist", "cbe_expert")
        backbone, kwargs = _backbone_params(up.param_dict)
        stages = _stages(BACKBONES.get(backbone)(**kwargs))
        if params.num_learnable > len(stages) + 1:
            raise ConfigError(
                f"cbe_expert num_learnable={params.num_learnable} exceeds {backbone}'s "
                f"{len(stages)} stages + classifier; use -1 or 1..{len(stages) + 1}"
            )
        counts = _known_counts(spec.data)
        if counts is not None and not in_split(counts, params.low, params.high).any():
            raise ConfigError(
                f"cbe_expert with low={params.low}, high={params.high} has no classes: no "
                f"class of '{spec.data.name}' has a train count in "
                f"{_span(params.low, params.high)} (counts {counts.min()}..{counts.max()}); "
                "move the thresholds"
            )

    def prepare_data(self, params: CBEExpertParams, data: LTDataset, inputs: Any) -> LTDataset:
        return expert_view(data, params.low, params.high, params.open_ratio, params.open_seed)

    def build(self, params: CBEExpertParams, ctx: StageContext) -> nn.Module:
        up = _need(ctx.inputs, "generalist", "cbe_expert")
        generalist = rebuild(up, "generalist", _up_classes(up))
        head = HEADS.get("linear")(generalist.feature_dim, ctx.num_classes)
        model = LTModel(generalist.backbone, head, ctx.num_classes)
        apply_num_learnable(model, params.num_learnable)
        if params.update_frozen_bn:
            model.backbone.update_batch_stats = True
        return model

    def loss(self, params: CBEExpertParams, model: nn.Module, batch: Batch, ctx: StageContext):
        _, logits = model(batch.x)
        return {"ce": F.cross_entropy(logits.float(), batch.y)}


def _up_classes(up: UpstreamArtifact) -> int:
    """Output width of an upstream's head, read from its weights."""
    for key in ("head.weight", "head.fc.weight", "head.linear.weight"):
        if key in up.state_dict:
            return int(up.state_dict[key].shape[0])
    heads = [v for k, v in up.state_dict.items() if k.startswith("head.") and v.ndim == 2]
    if not heads:
        raise ConfigError(f"upstream {up.key} has no 'head.*' weights; use a ce stage")
    return int(heads[0].shape[0])


# --- logits ----------------------------------------------------------------------------------


def expert_names(names: Any) -> list[str]:
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
                f"{_span(low, high)} {what} the previous split ending at "
                f"{'inf' if edge is None else edge}; e.g. (100, None), (20, 100), (0, 20)"
            )
        edge = high
    if edge is not None:
        raise ConfigError(
            f"expert splits must reach infinity; the highest ends at {edge}; set its high=None"
        )


@dataclass(frozen=True)
class CBELogitsParams:
    """No parameters: the inputs (generalist, expert0, ...) decide everything."""


class CBELogitsModel(nn.Module):
    """The generalist (saved, primary logits) and the experts (held outside the module tree)."""

    def __init__(self, generalist: nn.Module, experts: dict[str, nn.Module]) -> None:
        super().__init__()
        self.generalist = generalist
        self.experts = tuple(experts.items())  # a tuple: not registered, not saved

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.generalist(x)


def _expert_params(up: UpstreamArtifact) -> CBEExpertParams:
    return CBEExpertParams(**up.spec.get("spec", {}).get("params", {}))


@OBJECTIVES.register("cbe_logits")
class CBELogits:
    """Every expert's raw logits (and the generalist's) on val and test; trains nothing."""

    version = "1"
    Params = CBELogitsParams

    def validate(self, params: Any, spec: StageSpec) -> None:
        """Driver-side: input names and kinds; expert splits tile [0, inf)."""
        _need(spec.input_dict, "generalist", "cbe_logits")
        if spec.train.epochs != 0:
            raise ConfigError(f"cbe_logits trains nothing; set epochs=0, got {spec.train.epochs}")
        spans = []
        for name in expert_names(spec.input_dict):
            up = spec.input_dict[name]
            if up.kind != "cbe_expert":
                raise ConfigError(f"cbe_logits input '{name}' must be a cbe_expert, not {up.kind}")
            p = CBEExpertParams(**up.param_dict)
            spans.append((name, p.low, p.high))
        check_coverage(spans)

    def build(self, params: Any, ctx: StageContext) -> nn.Module:
        generalist = rebuild(
            _need(ctx.inputs, "generalist", "cbe_logits"), "generalist", ctx.num_classes
        )
        experts = {}
        for name in expert_names(ctx.inputs):
            up = ctx.inputs[name]
            p = _expert_params(up)
            s = int(in_split(ctx.data.class_counts, p.low, p.high).sum())
            gen = up.spec["spec"]["inputs"]["generalist"]  # the expert's backbone, linear head
            gen = {**gen, "params": {**gen.get("params", {}), "head": "linear", "head_kwargs": {}}}
            fake = UpstreamArtifact(up.key, {"spec": gen}, up.state_dict)
            expert = rebuild(fake, name, s + 1)
            freeze(expert)
            expert.eval().to(ctx.device)
            if ctx.device.type == "cuda" and ctx.spec.train.channels_last:
                expert.to(memory_format=torch.channels_last)
            experts[name] = expert
        freeze(generalist)
        return CBELogitsModel(generalist, experts)

    def loss(self, params: CBELogitsParams, model: nn.Module, batch: Batch, ctx: StageContext):
        raise ConfigError("cbe_logits trains nothing; set epochs=0 in its TrainSpec")

    def predict(self, params: Any, model: nn.Module, x: torch.Tensor):
        model = getattr(model, "module", model)
        features, logits = model(x)
        return features, logits, {name: e(x)[1] for name, e in model.experts}

    def export_tables(self, params: Any, model: nn.Module, ctx: StageContext):
        model = getattr(model, "module", model)
        counts = ctx.data.class_counts
        rows = []
        for name, _ in model.experts:
            p = _expert_params(ctx.inputs[name])
            rows.append(
                (name, p.low, p.high, float(p.open_ratio), in_split(counts, p.low, p.high))
            )
        masks = [r[4].tolist() for r in rows]
        return {
            "experts": pa.table(
                {
                    "name": [r[0] for r in rows],
                    "low": pa.array([r[1] for r in rows], pa.int64()),
                    "high": pa.array([r[2] for r in rows], pa.int64()),
                    "open_ratio": [r[3] for r in rows],
                    "class_mask": pa.array(masks, pa.list_(pa.bool_())),
                }
            )
        }


# --- joint calibration -----------------------------------------------------------------------


@dataclass(frozen=True)
class CBECalibrateParams:
    calibration: str = "full"  # "full" | "prior" (offset only) | "none" (raw fusion)
    routing: str = "fused"  # "fused" | "oracle" (each image to its true split's expert)

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

    @property
    def widths(self) -> list[int]:
        return [int(m.sum()) + 1 for m in self.masks]


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
    return Layout(list(t["name"]), masks, np.asarray(t["open_ratio"], dtype=np.float64))


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
    up: UpstreamArtifact, split: Split, split_name: str, layout: Layout, prior: bool
) -> np.ndarray:
    """float32 [N, D + K]: expert blocks (open logit + log((1+r)/2) if ``prior``), true expert."""
    where = f"tables/{split_name}.parquet of input 'logits' ({up.key})"
    if split_name not in up.tables:
        raise ConfigError(
            f"input 'logits' ({up.key}) has no {split_name} table; the calibration needs "
            f"{split_name} logits (a dataset with a validation split)"
        )
    table = up.tables[split_name]
    check_order(table, split, where, split_name)
    blocks = []
    for name, width, r in zip(layout.names, layout.widths, layout.open_ratios, strict=True):
        z = _column(table, name, width, where).astype(np.float32, copy=True)
        if prior:
            z[:, -1] += np.float32(math.log((1.0 + r) / 2.0))
        blocks.append(z)
    expert_of = layout.masks.argmax(0)[split.labels]
    route = np.eye(len(layout.names), dtype=np.float32)[expert_of]
    return np.ascontiguousarray(np.concatenate([*blocks, route], axis=1), dtype=np.float32)


class CalibrationModel(nn.Module):
    """Per-logit z' = a * z + b per expert block, then the fusion into log-probabilities over C.

    Input rows: ``[N, D + K]`` (``calibration_rows``); ``forward`` returns ``(z', log p)`` with
    fused routing or, for ``routing="oracle"``, the true expert's classes only.
    """

    def __init__(self, layout: Layout, routing: str) -> None:
        super().__init__()
        widths = layout.widths
        offsets = np.cumsum([0, *widths])
        self.bounds = [(int(offsets[k]), int(offsets[k + 1])) for k in range(len(widths))]
        self.dim, self.routing = int(offsets[-1]), routing
        c = layout.masks.shape[1]
        expert_of = layout.masks.argmax(0)
        column = np.zeros(c, dtype=np.int64)
        for k, mask in enumerate(layout.masks):
            column[mask] = offsets[k] + np.arange(int(mask.sum()))
        self.register_buffer("column", torch.as_tensor(column))
        self.register_buffer("expert_of", torch.as_tensor(expert_of, dtype=torch.int64))
        self.scale = nn.Parameter(torch.ones(self.dim))
        self.bias = nn.Parameter(torch.ones(self.dim))

    def fuse(self, z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """log p over C: per-block softmax, open dropped, scattered, weighted, renormalised."""
        logq = torch.cat([F.log_softmax(z[:, s:e], dim=1) for s, e in self.bounds], dim=1)
        g = logq[:, self.column] + torch.log(weights)[:, self.expert_of]
        return g - torch.logsumexp(g, dim=1, keepdim=True)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = x[:, : self.dim].float() * self.scale + self.bias
        route = x[:, self.dim :].float()
        return z, self.fuse(z, torch.ones_like(route)), self.fuse(z, route)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, fused, oracle = self.heads(x)
        return z, oracle if self.routing == "oracle" else fused


@OBJECTIVES.register("cbe_calibrate")
class CBECalibrate:
    """Joint calibration of the experts' logits on the val split; NLL of the fused distribution."""

    version = "1"
    Params = CBECalibrateParams
    in_trial = True

    def validate(self, params: CBECalibrateParams, spec: StageSpec) -> None:
        up = _need(spec.input_dict, "logits", "cbe_calibrate")
        if up.kind != "cbe_logits":
            raise ConfigError(f"cbe_calibrate input 'logits' must be cbe_logits, not {up.kind}")
        if params.calibration != "full" and spec.train.epochs != 0:
            raise ConfigError(
                f"cbe_calibrate calibration='{params.calibration}' learns nothing; set "
                f"epochs=0 (got {spec.train.epochs}) or use calibration='full'"
            )
        if spec.train.augment != "none":
            raise ConfigError("cbe_calibrate trains on logits; set augment='none'")

    def prepare_data(self, params: CBECalibrateParams, data: LTDataset, inputs: Any) -> LTDataset:
        up = _need(inputs, "logits", "cbe_calibrate")
        layout = read_layout(up, data.num_classes)
        prior = params.calibration != "none"
        val = calibration_rows(up, data.val, "val", layout, prior)
        test = calibration_rows(up, data.test, "test", layout, prior)
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
        )

    def build(self, params: CBECalibrateParams, ctx: StageContext) -> nn.Module:
        up = _need(ctx.inputs, "logits", "cbe_calibrate")
        return CalibrationModel(read_layout(up, ctx.num_classes), params.routing)

    def loss(self, params: CBECalibrateParams, model: nn.Module, batch: Batch, ctx: StageContext):
        _, logp = model(batch.x)
        return {"nll": F.nll_loss(logp, batch.y)}

    def predict(self, params: CBECalibrateParams, model: nn.Module, x: torch.Tensor):
        z, fused, oracle = getattr(model, "module", model).heads(x)
        primary = oracle if params.routing == "oracle" else fused
        return z, primary, {"logits_oracle": oracle}
