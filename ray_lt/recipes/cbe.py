"""CBE's CIFAR recipe (ours: the paper gives ImageNet-LT / Places-LT settings only) and the
pipeline builder: generalist -> experts -> logits -> calibration.

- Generalist: the ``ce`` stage of ``ray_lt.recipes.baseline`` (same key as every CE baseline).
- Experts: fine-tuned from the generalist, SGD 0.9, lr 0.01 (a tenth of the generalist's, as
  Places' experts use), cosine over at most 100 epochs, batch 128, wd 5e-4, selected on the
  expert's val accuracy (in-split + an equal open set) with patience 15. Splits many
  [100, inf), medium [20, 100), few [0, 20), open ratio 16; num_learnable -1 / 2 / 1 (ResNet-32
  has no FC512: 2 = classifier + layer3, the counterpart of the paper's medium setting 3).
- Calibration: the original's, lr 0.1, momentum 0.9, wd 5e-4, batch 256, lr x0.1 every 30
  epochs (capped at 200), patience 30 on val accuracy, on the val split's logits.
- Options of the original code, off here because it has no CIFAR recipe (the ImageNet-LT and
  Places-LT experiment files turn them on): ``fc512`` (Linear -> 512 + ReLU after pooling; the
  CIFAR ResNets do not offer it) and ``update_frozen_bn`` (frozen BatchNorms re-estimate their
  statistics). Ablations: ``open_class=False`` (experts without the open output) and
  ``include_generalist=True`` (the extended ensemble).

Nothing here imports Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ray_lt.data.spec import DataSpec
from ray_lt.errors import ConfigError
from ray_lt.recipes import CIFAR100_LT_100, CIFAR_CE, SMOKE_DATA, SMOKE_TRAIN, baseline
from ray_lt.spec import StageSpec, TrainSpec

Splits = tuple[tuple[int, int | None], ...]
SPLITS: Splits = ((100, None), (20, 100), (0, 20))  # many, medium, few (low <= count < high)
NUM_LEARNABLE = (-1, 2, 1)
OPEN_RATIO = 16.0

CIFAR_EXPERT = TrainSpec(
    epochs=100,
    batch_size=128,
    lr=0.01,
    momentum=0.9,
    weight_decay=5e-4,
    schedule="cosine",
    select="best",
    patience=15,
)
CIFAR_CALIBRATION = TrainSpec(
    epochs=200,
    batch_size=256,
    lr=0.1,
    momentum=0.9,
    weight_decay=5e-4,
    schedule="step",
    milestones=tuple(range(30, 200, 30)),
    gamma=0.1,
    augment="none",
    select="best",
    patience=30,
    export_features=False,
)
# "prior" / "none" calibration and the logits stage train nothing: evaluate and export only.
EVAL_ONLY = TrainSpec(epochs=0, augment="none", export_features=False)

# Smoke: SMOKE_DATA's counts are 100 71 51 36 26 18 13 9 6 5, so these thresholds give the
# experts 3 / 3 / 4 classes; ResNet-8, 2 epochs.
SMOKE_SPLITS: Splits = ((50, None), (15, 50), (0, 15))
SMOKE_EXPERT = SMOKE_TRAIN.replace(lr=0.01, schedule="cosine", select="best", patience=15)
SMOKE_CALIBRATION = CIFAR_CALIBRATION.replace(epochs=5, milestones=(3,))


def splits_from_thresholds(thresholds: str | Sequence[int]) -> Splits:
    """``"20,100"`` or (20, 100) -> ((100, None), (20, 100), (0, 20)); one threshold, 2 experts.

    Args:
        thresholds: the split boundaries (train counts), any order, each > 0, no repeats.
    """
    if isinstance(thresholds, str):
        try:
            values = [int(t) for t in thresholds.replace("+", ",").split(",") if t.strip()]
        except ValueError:
            raise ConfigError(
                f"thresholds '{thresholds}' must be integers joined by ',', e.g. '20,100'"
            ) from None
    else:
        values = [int(t) for t in thresholds]
    if not values or min(values) <= 0 or len(set(values)) != len(values):
        raise ConfigError(
            f"thresholds {thresholds!r} must be distinct train counts > 0, e.g. '20,100'"
        )
    edges = sorted(values, reverse=True)
    highs: list[int | None] = [None, *edges]
    return tuple(zip([*edges, 0], highs, strict=True))


def _per_expert(value: Any, n: int, what: str) -> list[Any]:
    if isinstance(value, str):
        value = [float(v) if "." in v else int(v) for v in value.split(",")]
    if not isinstance(value, list | tuple):
        return [value] * n
    if len(value) != n:
        raise ConfigError(f"{what} has {len(value)} values for {n} experts; give one per expert")
    return list(value)


def expert(
    generalist: StageSpec,
    low: int,
    high: int | None,
    seed: int,
    *,
    open_ratio: float = OPEN_RATIO,
    num_learnable: int = -1,
    train: TrainSpec = CIFAR_EXPERT,
    update_frozen_bn: bool = False,
    open_class: bool = True,
) -> StageSpec:
    """One expert stage; its key depends on its own settings and the generalist only.

    Options enter the params only where they change the expert, so every other key stays:
    ``update_frozen_bn`` when something is frozen (``num_learnable != -1``), ``open_class``
    when False (the open ratio and the draws' seed then mean nothing and are left out).
    """
    params: dict[str, Any] = {"low": low, "high": high}
    if open_class:
        params.update(open_ratio=float(open_ratio))
    params["num_learnable"] = int(num_learnable)
    if open_class:
        params["open_seed"] = seed
    else:
        params["open_class"] = False
    if update_frozen_bn and num_learnable != -1:
        params["update_frozen_bn"] = True
    return StageSpec(
        kind="cbe_expert",
        name=f"expert_{low}_{'inf' if high is None else high}",
        data=generalist.data,
        train=train.replace(seed=seed),
        params=params,
        inputs={"generalist": generalist},
    )


def cbe(
    seed: int,
    *,
    splits: Splits | str = SPLITS,
    open_ratio: float | Sequence[float] | str = OPEN_RATIO,
    num_learnable: int | Sequence[int] | str = NUM_LEARNABLE,
    calibration: str = "full",
    routing: str = "fused",
    data: DataSpec = CIFAR100_LT_100,
    backbone: str = "resnet32",
    backbone_kwargs: dict[str, Any] | None = None,
    generalist_train: TrainSpec = CIFAR_CE,
    expert_train: TrainSpec | Sequence[TrainSpec] = CIFAR_EXPERT,
    calibration_train: TrainSpec = CIFAR_CALIBRATION,
    fc512: bool = False,
    update_frozen_bn: bool = False,
    open_class: bool = True,
    include_generalist: bool = False,
) -> StageSpec:
    """The final ``cbe_calibrate`` stage of a CBE pipeline.

    Args:
        seed: generalist, experts (init, sampling, open draws) and calibration seed.
        splits: ``(low, high)`` per expert, or thresholds as a string ("20,100").
        open_ratio, num_learnable: one value for every expert, or one per expert.
        calibration: "full", "prior" (offset only) or "none".
        routing: "fused", or "oracle" (each image scored by its true split's expert).
        backbone_kwargs: e.g. ``{"weights_path": ...}`` for a pretrained generalist.
        expert_train: one TrainSpec, or one per expert.
        fc512: the original backbone's Linear -> 512 + ReLU after pooling (torchvision
            backbones); ``num_learnable`` 2 then means classifier + that FC.
        update_frozen_bn: the original code's frozen BatchNorms that still re-estimate their
            statistics on the expert's data (default: they keep the generalist's).
        open_class: False is the ablation of experts without an open output.
        include_generalist: True is the extended ensemble: the generalist's logits are
            calibrated jointly with the experts' and multiply into the fused prediction.
    """
    if isinstance(splits, str):
        splits = splits_from_thresholds(splits)
    backbone_kwargs = {**(backbone_kwargs or {}), **({"fc512": True} if fc512 else {})}
    generalist = _generalist(seed, data, backbone, backbone_kwargs, generalist_train)
    options = {"update_frozen_bn": update_frozen_bn, "open_class": open_class}
    experts = _experts(generalist, splits, seed, open_ratio, num_learnable, expert_train, options)
    logits = StageSpec(
        kind="cbe_logits",
        name="logits",
        data=data,
        train=EVAL_ONLY,
        inputs={"generalist": generalist, **experts},
    )
    return _calibration(logits, seed, calibration, routing, calibration_train, include_generalist)


def _generalist(
    seed: int,
    data: DataSpec,
    backbone: str,
    backbone_kwargs: dict[str, Any],
    train: TrainSpec,
) -> StageSpec:
    """The CE generalist: the baselines' CE stage (shared key) unless the backbone is changed."""
    if not backbone_kwargs:
        return baseline("ce", seed, data=data, ce_train=train, backbone=backbone)
    return StageSpec(
        kind="ce",
        data=data,
        train=train.replace(seed=seed),
        params={"backbone": backbone, "backbone_kwargs": backbone_kwargs},
    )


def _experts(
    generalist: StageSpec,
    splits: Splits,
    seed: int,
    open_ratio: float | Sequence[float] | str,
    num_learnable: int | Sequence[int] | str,
    expert_train: TrainSpec | Sequence[TrainSpec],
    options: dict[str, Any],
) -> dict[str, StageSpec]:
    """``expert0``, ``expert1``, ...: one per split, with its own (or the shared) settings."""
    n = len(splits)
    ratios = _per_expert(open_ratio, n, "open_ratio")
    learnable = _per_expert(num_learnable, n, "num_learnable")
    trains = _per_expert(
        list(expert_train) if not isinstance(expert_train, TrainSpec) else expert_train,
        n,
        "expert_train",
    )
    return {
        f"expert{i}": expert(
            generalist, low, high, seed, open_ratio=r, num_learnable=k, train=t, **options
        )
        for i, ((low, high), r, k, t) in enumerate(
            zip(splits, ratios, learnable, trains, strict=True)
        )
    }


def _calibration(
    logits: StageSpec,
    seed: int,
    calibration: str,
    routing: str,
    train: TrainSpec,
    include_generalist: bool,
) -> StageSpec:
    """The final ``cbe_calibrate`` stage on the logits table (trains only for "full")."""
    train = train if calibration == "full" else EVAL_ONLY
    params: dict[str, Any] = {"calibration": calibration, "routing": routing}
    if include_generalist:
        params["include_generalist"] = True
    return StageSpec(
        kind="cbe_calibrate",
        name=f"calibrate_{calibration}_{routing}" + ("_extended" if include_generalist else ""),
        data=logits.data,
        train=train.replace(seed=seed),
        params=params,
        inputs={"logits": logits},
    )


def cbe_smoke(seed: int, **settings: Any) -> StageSpec:
    """``cbe`` on SMOKE_DATA with ResNet-8 and 2-epoch stages: seconds per stage on a CPU."""
    recipe: dict[str, Any] = {
        "splits": SMOKE_SPLITS,
        "data": SMOKE_DATA,
        "backbone": "resnet8",
        "generalist_train": SMOKE_TRAIN,
        "expert_train": SMOKE_EXPERT,
        "calibration_train": SMOKE_CALIBRATION,
    }
    return cbe(seed, **{**recipe, **settings})


def generalist(seed: int, *, smoke: bool = False) -> StageSpec:
    """The generalist alone (the report's first row): the CE baseline stage."""
    if smoke:
        return baseline("ce", seed, data=SMOKE_DATA, ce_train=SMOKE_TRAIN, backbone="resnet8")
    return baseline("ce", seed)


# Trial-config keys ``cbe_from_config`` passes to ``cbe`` as they are.
CONFIG_OPTIONS = ("calibration", "routing", "open_class", "include_generalist", "update_frozen_bn")


def cbe_from_config(config: dict[str, Any], *, smoke: bool = False, **recipe: Any) -> StageSpec:
    """A CBE pipeline from a flat trial config (the keys of ``search_spaces/cbe.py``).

    Keys: ``seed``; optional ``thresholds`` ("20,100"), ``open_ratio_<k>`` and
    ``num_learnable_<k>`` per expert (k = 0 is the highest split; missing ones take the
    recipe's defaults, extra ones beyond the number of experts are ignored), ``calibration``,
    ``routing``, ``open_class``, ``include_generalist``, ``update_frozen_bn``.
    """
    if "thresholds" in config:
        recipe["splits"] = splits_from_thresholds(config["thresholds"])
    n = len(recipe.get("splits", SMOKE_SPLITS if smoke else SPLITS))
    defaults = NUM_LEARNABLE if n == len(NUM_LEARNABLE) else (-1,) * (n - 1) + (1,)
    recipe["open_ratio"] = [float(config.get(f"open_ratio_{k}", OPEN_RATIO)) for k in range(n)]
    recipe["num_learnable"] = [
        int(config.get(f"num_learnable_{k}", defaults[k])) for k in range(n)
    ]
    for key in CONFIG_OPTIONS:
        if key in config:
            recipe[key] = config[key]
    build = cbe_smoke if smoke else cbe
    return build(int(config["seed"]), **recipe)
