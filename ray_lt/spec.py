"""Stage specs: plain, frozen, JSON-serialisable descriptions of one training stage.

A spec is built once at the edge (an experiment's pipeline function) and passed down typed. Its
``key`` is the content address of the artifact it produces: kind, data, training settings,
objective parameters, the keys of its inputs and the stage-code version. Everything that does not
change the result (resources, where the data lives, fault injection) stays out of the key.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ray_lt.data.spec import DataSpec
from ray_lt.errors import ConfigError
from ray_lt.store_layout import NAME_RE, STORE_LAYOUT_VERSION

ENGINE_VERSION = "1"


def _check_json(value: Any, where: str, kind: str) -> None:
    """Raise ConfigError naming the first value under ``where`` that JSON cannot hold exactly."""
    if value is None or isinstance(value, bool | int | float | str):
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(
                    f"stage {kind!r}: config {where or 'root'} has key {k!r}; use str keys only"
                )
            _check_json(v, f"{where}.{k}" if where else k, kind)
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_json(v, f"{where}[{i}]", kind)
        return
    raise ConfigError(
        f"stage {kind!r}: config key {where!r} holds {type(value).__name__} {value!r:.60}, which "
        "is not JSON-serialisable; use str, int, float, bool, None, list or dict"
    )


def stage_key(
    kind: str, config: Mapping[str, Any], input_keys: Mapping[str, str], code_version: str
) -> str:
    """Return the content key of a stage: ``<kind>-<16 hex digits of sha256>``.

    The key names the stage's folder in the artifact store, so ``kind`` must be a safe name, and
    it must not change for an unchanged stage, so the hashed text is canonical JSON.

    Args:
        kind: registry name of the stage objective (letters, digits, ``_.-``).
        config: the stage's hyperparameters; plain JSON values only (dict order is irrelevant).
        input_keys: upstream input name -> that stage's key.
        code_version: version of the stage code; bump it to invalidate stored artifacts.
    """
    if not isinstance(kind, str) or not NAME_RE.match(kind):
        raise ConfigError(f"stage kind {kind!r} is not a valid name; use letters, digits, _ . -")
    _check_json(dict(config), "", kind)
    for name, key in input_keys.items():
        if not isinstance(name, str) or not isinstance(key, str):
            raise ConfigError(f"stage {kind!r}: input {name!r} -> {key!r} must map str to str key")
    if not isinstance(code_version, str):
        raise ConfigError(f"stage {kind!r}: code_version {code_version!r} must be a str")
    payload = {
        "kind": kind,
        "config": config,
        "inputs": dict(input_keys),
        "code_version": code_version,
        "layout": STORE_LAYOUT_VERSION,
    }
    # json writes floats with float.__repr__, the shortest exact round-trip form.
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def _check_keys(cls: type, values: Mapping[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")


def from_mapping(cls: type, values: Mapping[str, Any] | None) -> Any:
    """Build a frozen dataclass from a mapping; unknown keys are an error, lists become tuples."""
    values = dict(values or {})
    _check_keys(cls, values)
    fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**fixed)


@dataclass(frozen=True)
class TrainSpec:
    """What the engine owns: epochs, batches, optimiser, schedule, sampling, augmentation.

    Defaults are the CIFAR cross-entropy recipe with LDAM-DRW's schedule: 200 epochs of SGD at
    lr 0.1, the rate cut to 1% at epoch 160 and to 0.01% at epoch 180.
    """

    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 2e-4
    schedule: str = "step"  # "step" (x gamma at each milestone), "cosine" (to 0), "constant"
    milestones: tuple[int, ...] = (160, 180)
    gamma: float = 0.01  # LDAM-DRW: x0.01 at 160, x0.0001 at 180
    warmup_epochs: int = 0  # linear warm-up from lr/warmup_epochs, per step
    sampler: str = "instance"
    sampler_params: tuple[tuple[str, Any], ...] = ()
    augment: str = "crop_flip"
    eval_every: int = 1  # evaluate the test (and val) split every N epochs and at the end
    seed: int = 0  # init, sampling and augmentation
    amp: bool = True  # bf16 autocast on CUDA (CPU always runs fp32)
    channels_last: bool = True  # on CUDA
    export_features: bool = True  # features beside logits in the exported tables
    # Model selection: "last" epoch (the methods' protocol) or the "best" epoch by
    # ``select_metric`` (evaluated every epoch); ``patience`` > 0 stops after that many epochs
    # without a gain in ``select_metric`` (CBE's experts and calibration).
    select: str = "last"
    select_metric: str = "val_overall"
    patience: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1:
            raise ConfigError(
                f"epochs ({self.epochs}) must be >= 0 (0: evaluate and export only) and "
                f"batch_size ({self.batch_size}) >= 1"
            )
        if self.select not in ("last", "best"):
            raise ConfigError(f"unknown select '{self.select}'; use 'last' or 'best'")
        if self.patience < 0:
            raise ConfigError(f"patience must be >= 0 (0: off), got {self.patience}")
        if self.schedule not in ("step", "cosine", "constant"):
            raise ConfigError(f"unknown schedule '{self.schedule}'; known: constant, cosine, step")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if isinstance(self.sampler_params, Mapping):
            object.__setattr__(self, "sampler_params", tuple(sorted(self.sampler_params.items())))

    def replace(self, **changes: Any) -> TrainSpec:
        """A copy with some fields changed (unknown names are an error)."""
        _check_keys(TrainSpec, changes)
        return dataclasses.replace(self, **changes)


# TrainSpec fields added after stores existed: hashed into a key only when not at the default.
_LATER_TRAIN_FIELDS = {"select": "last", "select_metric": "val_overall", "patience": 0}


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage needs; never part of the key.

    ``num_workers=0`` runs the stage inline, in the trial's own process on its CPU, with the same
    engine: for stages so small that a ``TorchTrainer``'s worker-group start (about 20 s) would
    dominate them, such as sweeps of many tiny trials. Inline stages resume from the same
    per-epoch checkpoints.
    """

    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # fractions pack several trials on one GPU

    def __post_init__(self) -> None:
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ConfigError(
                f"Resources(num_workers={self.num_workers!r}): use an int >= 1, or 0 to run the "
                "stage inline in the trial's process"
            )
        if not self.cpus_per_worker >= 0 or not self.gpus_per_worker >= 0:
            raise ConfigError(
                f"Resources(cpus_per_worker={self.cpus_per_worker!r}, gpus_per_worker="
                f"{self.gpus_per_worker!r}): both must be numbers >= 0"
            )
        if self.num_workers == 0 and self.gpus_per_worker:
            raise ConfigError(
                "Resources(num_workers=0) runs the stage inline on the trial's CPU; it cannot ask "
                f"for gpus_per_worker={self.gpus_per_worker}; use num_workers=1 for a GPU stage"
            )

    @property
    def inline(self) -> bool:
        return self.num_workers == 0


@dataclass(frozen=True)
class StageSpec:
    """One node of a pipeline DAG."""

    kind: str
    data: DataSpec
    train: TrainSpec
    params: tuple[tuple[str, Any], ...] = ()
    inputs: tuple[tuple[str, StageSpec], ...] = ()
    name: str = ""  # display name in logs and MLflow; not in the key
    resources: Resources = field(default_factory=Resources)

    def __post_init__(self) -> None:
        if isinstance(self.params, Mapping):
            object.__setattr__(self, "params", tuple(sorted(self.params.items())))
        if isinstance(self.inputs, Mapping):
            object.__setattr__(self, "inputs", tuple(sorted(self.inputs.items())))
        if not self.name:
            object.__setattr__(self, "name", self.kind)

    @property
    def param_dict(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def input_dict(self) -> dict[str, StageSpec]:
        return dict(self.inputs)

    def config(self) -> dict[str, Any]:
        """The part of the spec that decides the result (hashed into the key)."""
        train = dataclasses.asdict(self.train)
        for name, default in _LATER_TRAIN_FIELDS.items():
            if train[name] == default:  # keys of stages that never set them stay as they were
                del train[name]
        train["milestones"] = list(self.train.milestones)
        train["sampler_params"] = dict(self.train.sampler_params)
        return {"data": self.data.to_dict(), "train": train, "params": self.param_dict}

    @functools.cached_property
    def key(self) -> str:
        """The content key of this stage's artifact (``stage_key``), computed once per spec.

        A pipeline asks for keys many times and every key hashes the whole DAG below it, so the
        value is kept in the instance ``__dict__`` (a frozen dataclass has one; the fields, and so
        equality, hashing and ``repr``, do not include it). ``dataclasses.replace`` makes a new
        spec, which computes its own key.
        """
        from ray_lt.objective import get_objective  # objective imports this module

        version = f"{get_objective(self.kind).version}+engine{ENGINE_VERSION}"
        inputs = {name: spec.key for name, spec in self.inputs}
        return stage_key(self.kind, self.config(), inputs, version)

    def with_resources(self, resources: Resources) -> StageSpec:
        return dataclasses.replace(self, resources=resources)

    def to_dict(self) -> dict[str, Any]:
        """JSON form, inputs nested, resources included (for spec.json and the workers)."""
        return {
            "kind": self.kind,
            "name": self.name,
            **self.config(),
            "inputs": {name: spec.to_dict() for name, spec in self.inputs},
            "resources": dataclasses.asdict(self.resources),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StageSpec:
        train = dict(d["train"])
        train["sampler_params"] = tuple(sorted(dict(train.get("sampler_params", {})).items()))
        return cls(
            kind=d["kind"],
            name=d.get("name", ""),
            data=DataSpec.from_dict(d["data"]),
            train=from_mapping(TrainSpec, train),
            params=tuple(sorted(dict(d.get("params", {})).items())),
            inputs=tuple(sorted((n, cls.from_dict(s)) for n, s in d.get("inputs", {}).items())),
            resources=from_mapping(Resources, d.get("resources")),
        )


def walk(spec: StageSpec) -> list[StageSpec]:
    """Every stage of the DAG below and including ``spec``, dependencies first, each once."""
    order: list[StageSpec] = []
    seen: set[str] = set()

    def visit(node: StageSpec) -> None:
        for _, child in node.inputs:
            visit(child)
        k = node.key
        if k not in seen:
            seen.add(k)
            order.append(node)

    visit(spec)
    return order


def with_resources(
    spec: StageSpec, resources: Resources, *, only_default: bool = True
) -> StageSpec:
    """The DAG with ``resources`` on every stage (or only where a stage kept the default)."""
    inputs = tuple(
        (n, with_resources(s, resources, only_default=only_default)) for n, s in spec.inputs
    )
    keep = only_default and spec.resources != Resources()
    return dataclasses.replace(
        spec, inputs=inputs, resources=spec.resources if keep else resources
    )
