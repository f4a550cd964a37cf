"""SSD-LT (Li, Wang, Wu, ICCV 2021): ``ssd_feature`` (stage I) and ``ssd_distill`` (stage III).

Stage II (the balanced teacher) and the optional fine-tune are the shared ``lws`` stage
(stages/baseline.py), which rebuilds these stages' models through their ``lt_model``.

Stage I, ``ssd_feature``: CE on the engine's weak view (``TrainSpec.augment``, ``crop_flip`` on
CIFAR) plus ``ssl_weight`` x a MoCo loss whose key view is ``moco_v2`` (drawn here from the raw
batch with the stage's generator). The key encoder and key MLP are EMA copies (m 0.999) of the
query ones, updated under no_grad before the keys are computed; they are frozen (never in the
optimiser, so no weight decay) and marked ``update_batch_stats`` so they use batch statistics
like MoCo's. The queue of normalised keys and their labels, and its pointer, are buffers: they
are saved in checkpoints, so a resumed stage keeps its queue. Choices and limits:

- The queue starts as random unit vectors with label 0, as in the official code, so class-0
  queries see the initial entries masked until the queue has been filled once.
- Keys are enqueued after the loss, at ``(ptr + i) % K``: the engine keeps a short last batch
  (no drop_last), so the pointer wraps instead of requiring whole batches. ``K`` must still be a
  multiple of the batch and at most the training-set size (checked by ``validate`` on the driver
  and again at build).
- Under DDP the keys and labels of every rank are all-gathered before enqueueing. MoCo's
  shuffle-BN is not implemented: each rank's key encoder normalises its own batch.
- ``ssl_weight=0`` (the CE-only ablation) builds a plain backbone + linear head, no MLP or queue.
- The contrastive logits are computed in float32 even under bf16 autocast.

Stage III, ``ssd_distill``: a fresh network with a hard head (CE) and a soft head (KD from the
frozen teacher on the same augmented batch, ``T^2 KL(softmax(t/T) || softmax(s/T))`` summed over
classes, mean over the batch). Neither head gets the other's loss. Evaluation reports the hard
head as the primary logits and the soft head as ``logits_soft`` (metrics ``soft_*``). The
teacher (input ``teacher``: an ``lws`` stage for the balanced teacher, or an ``ssd_feature``
stage for the "plain teacher" ablation) lives in ``ctx.aux`` in eval mode, as the paper
describes; ``teacher_bn="train"`` reproduces the official code, which leaves it in train mode
(its BatchNorm uses, and re-estimates, batch statistics). ``kd_weight=0`` builds no soft head and
needs no teacher. This module must not change the engine's loop.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ray_lt.data import AUGMENTS, augment_batch
from ray_lt.data.spec import DataSpec
from ray_lt.data.splits import lt_counts
from ray_lt.errors import ConfigError
from ray_lt.models import LTModel, create_model, freeze, linear_head
from ray_lt.objective import OBJECTIVES, Batch, StageContext
from ray_lt.spec import StageSpec
from ray_lt.stages.baseline import lt_model
from ray_lt.stages.cbd import _channels_last

# n_max and classes of the datasets whose train size is a function of the DataSpec alone, so
# the queue size can be checked on the driver; other datasets are checked at build.
_KNOWN_SIZES = {"cifar10_lt": (5000, 10), "cifar100_lt": (500, 100)}
TEACHER_BN = ("eval", "train")


def train_size(data: DataSpec) -> int | None:
    """Training images of ``data`` without loading it (None when it cannot be known)."""
    if data.name == "synthetic_lt":
        return sum(lt_counts(data.max_per_class, data.num_classes, data.imbalance))
    if data.name in _KNOWN_SIZES:
        n_max, classes = _KNOWN_SIZES[data.name]
        return sum(lt_counts(n_max, classes, data.imbalance))
    return None


def queue_length(queue_size: int | None, batch_size: int, n_train: int | None) -> int | None:
    """The checked queue length K: ``queue_size``, or the largest whole-batch count that fits.

    A MoCo queue must hold whole batches and no more keys than there are training images; the
    answer is None only when ``queue_size`` is None and the training-set size is unknown.
    """
    if queue_size is None:
        if n_train is None:
            return None
        if n_train < batch_size:
            raise ConfigError(
                f"ssd_feature needs at least one batch ({batch_size}) of training images for its "
                f"queue, got {n_train}; lower the batch size"
            )
        return n_train // batch_size * batch_size
    if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
        raise ConfigError(f"ssd_feature queue_size must be an int >= 1, got {queue_size!r}")
    if queue_size % batch_size:
        lower = max(queue_size // batch_size, 1) * batch_size
        raise ConfigError(
            f"ssd_feature queue_size {queue_size} is not a multiple of the batch size "
            f"{batch_size}; use e.g. {lower} ({lower // batch_size} x {batch_size})"
        )
    if n_train is not None and queue_size > n_train:
        fit = n_train // batch_size * batch_size
        raise ConfigError(
            f"ssd_feature queue_size {queue_size} exceeds the {n_train} training images; use "
            f"at most {fit} (the largest multiple of the batch size {batch_size} <= {n_train})"
        )
    return queue_size


def _plain_from(spec: Mapping[str, Any], num_classes: int, state_dict, heads: tuple[str, ...]):
    """Backbone + linear ``head`` from an SSD artifact, dropping every other submodule."""
    p = spec.get("params", {}) or {}
    model = create_model(
        p.get("backbone", "resnet32"), num_classes, backbone_kwargs=p.get("backbone_kwargs") or {}
    )
    if state_dict is not None:
        keep = {k: v for k, v in state_dict.items() if k.split(".", 1)[0] in heads}
        model.load_state_dict(keep)
    return model


# --- stage I ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SSDFeatureParams:
    backbone: str = "resnet32"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    ssl_weight: float = 1.0  # lambda: CE : SSL = 1 : lambda; 0 = the CE-only ablation
    mask_labels: bool = True  # drop same-label queue entries from the negatives (SSD vs MoCo)
    # None: the largest multiple of the batch <= the training-set size, which gives the recipes'
    # values: 10,752 = 84 x 128 on CIFAR-100-LT IF100 and 115,712 = 452 x 256 on ImageNet-LT.
    queue_size: int | None = None
    embed_dim: int = 128
    hidden_dim: int | None = None  # None: the backbone width (CIFAR); 2048 on ImageNet-LT
    temperature: float = 0.2
    momentum: float = 0.999
    key_augment: str = "moco_v2"

    def __post_init__(self) -> None:
        if not self.ssl_weight >= 0:
            raise ConfigError(f"ssd_feature ssl_weight must be >= 0, got {self.ssl_weight}")
        if not self.temperature > 0:
            raise ConfigError(f"ssd_feature temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"ssd_feature momentum must be in [0, 1), got {self.momentum}")
        for name in ("embed_dim", "hidden_dim"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"ssd_feature {name} must be an int >= 1, got {value!r}")


def contrastive_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor,
    queue_labels: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    mask_labels: bool,
) -> torch.Tensor:
    """InfoNCE with the key as the only positive; same-label queue entries masked if asked.

    Args:
        q: normalised query embeddings [B, E].
        k: normalised key embeddings [B, E] (no gradient).
        queue: normalised past keys [K, E].
        queue_labels: their labels [K].
        labels: the queries' labels [B].
        temperature: tau.
        mask_labels: set logits of queue entries with the query's label to -inf.
    """
    with torch.autocast(q.device.type, enabled=False):
        q, k, queue = q.float(), k.float(), queue.float()
        pos = (q * k).sum(1, keepdim=True)
        neg = q @ queue.t()
        if mask_labels:
            neg = neg.masked_fill(queue_labels[None, :] == labels[:, None], float("-inf"))
        logits = torch.cat((pos, neg), 1) / temperature
        target = torch.zeros(len(q), dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, target)


def _projection(width: int, hidden: int, embed: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, embed))


class SSDFeatureModel(nn.Module):
    """Query backbone + linear head + projection MLP, their EMA copies, and a labelled queue.

    ``forward(x)`` returns ``(features, logits)`` (evaluation and ``lws`` see an ``LTModel``);
    ``forward(x, embed=True)`` adds the normalised query embedding (one DDP forward for both).

    Args:
        backbone: pooled-feature network with an int ``feature_dim``.
        num_classes: C.
        hidden_dim: MLP hidden width.
        embed_dim: embedding width.
        queue_size: K.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        hidden_dim: int,
        embed_dim: int,
        queue_size: int,
    ) -> None:
        super().__init__()
        width = int(backbone.feature_dim)
        self.backbone = backbone
        self.head = linear_head(width, num_classes)
        self.projection = _projection(width, hidden_dim, embed_dim)
        self.feature_dim, self.num_classes = width, num_classes
        self.key_backbone = copy.deepcopy(backbone)
        self.key_projection = copy.deepcopy(self.projection)
        for module in (self.key_backbone, self.key_projection):
            freeze(module)
            module.update_batch_stats = True  # the engine keeps them in train mode (MoCo)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, embed_dim), dim=1))
        self.register_buffer("queue_labels", torch.zeros(queue_size, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor, embed: bool = False):
        features = self.backbone(x)
        logits = self.head(features)
        if not embed:
            return features, logits
        return features, logits, F.normalize(self.projection(features), dim=1)

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        """key <- m * key + (1 - m) * query, for encoder and MLP parameters (not BN buffers)."""
        keys = [*self.key_backbone.parameters(), *self.key_projection.parameters()]
        queries = [*self.backbone.parameters(), *self.projection.parameters()]
        torch._foreach_lerp_(keys, [q.detach() for q in queries], 1.0 - m)

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float32 key embeddings of the key view."""
        return F.normalize(self.key_projection(self.key_backbone(x)).float(), dim=1)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        """Write keys and labels at the pointer (wrapping), every rank's under DDP."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            keys, labels = _all_gather(keys), _all_gather(labels)
        n, size = len(keys), len(self.queue)
        idx = (self.queue_ptr + torch.arange(n, device=keys.device)) % size
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_labels[idx] = labels
        self.queue_ptr.copy_((self.queue_ptr + n) % size)


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@OBJECTIVES.register("ssd_feature")
class SSDFeature:
    """Stage I: CE on the weak view + ``ssl_weight`` x label-masked MoCo on a MoCo-v2 view."""

    version = "1"
    Params = SSDFeatureParams

    def validate(self, params: SSDFeatureParams, spec: StageSpec) -> None:
        """Driver-side: the key augmentation exists, the queue fits the batch and the data."""
        AUGMENTS.get(params.key_augment)
        if params.ssl_weight > 0:
            queue_length(params.queue_size, spec.train.batch_size, train_size(spec.data))

    def build(self, params: SSDFeatureParams, ctx: StageContext) -> nn.Module:
        AUGMENTS.get(params.key_augment)
        backbone = create_model(
            params.backbone, ctx.num_classes, backbone_kwargs=params.backbone_kwargs
        ).backbone
        if params.ssl_weight == 0:
            return LTModel(backbone, linear_head(backbone.feature_dim, ctx.num_classes))
        n_train = len(ctx.data.train.labels)
        size = queue_length(params.queue_size, ctx.spec.train.batch_size, n_train)
        return SSDFeatureModel(
            backbone,
            ctx.num_classes,
            hidden_dim=params.hidden_dim or int(backbone.feature_dim),
            embed_dim=params.embed_dim,
            queue_size=size,
        )

    def loss(self, params: SSDFeatureParams, model: nn.Module, batch: Batch, ctx: StageContext):
        if params.ssl_weight == 0:
            _, logits = model(batch.x)
            return {"ce": F.cross_entropy(logits.float(), batch.y)}
        net = getattr(model, "module", model)
        _, logits, q = model(batch.x, embed=True)
        terms = {"ce": F.cross_entropy(logits.float(), batch.y)}
        with torch.no_grad():
            net.momentum_update(params.momentum)
            view = augment_batch(
                params.key_augment, batch.raw, batch.generator, ctx.data.mean, ctx.data.std
            )
            k = net.keys(_channels_last(view, ctx))
        # Clones: the queue is overwritten below, and autograd needs the values it multiplied.
        ssl = contrastive_loss(
            q,
            k,
            net.queue.clone(),
            net.queue_labels.clone(),
            batch.y,
            temperature=params.temperature,
            mask_labels=params.mask_labels,
        )
        terms["ssl"] = params.ssl_weight * ssl
        net.enqueue(k, batch.y)
        return terms

    @staticmethod
    def lt_model(spec: Mapping[str, Any], num_classes: int, state_dict=None) -> LTModel:
        """The encoder and linear classifier (what ``lws`` and a plain teacher use)."""
        return _plain_from(spec, num_classes, state_dict, ("backbone", "head"))


# --- stage III -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SSDDistillParams:
    backbone: str = "resnet32"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    kd_weight: float = 1.0  # CE : KD = 1 : kd_weight; 0 = no soft head, no teacher
    temperature: float = 2.0
    teacher_bn: str = "eval"  # "train": the official code's teacher in train mode

    def __post_init__(self) -> None:
        if not self.kd_weight >= 0:
            raise ConfigError(f"ssd_distill kd_weight must be >= 0, got {self.kd_weight}")
        if not self.temperature > 0:
            raise ConfigError(f"ssd_distill temperature must be > 0, got {self.temperature}")
        if self.teacher_bn not in TEACHER_BN:
            raise ConfigError(
                f"ssd_distill teacher_bn '{self.teacher_bn}' is unknown; use one of {TEACHER_BN}"
            )


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, summed over classes, batch mean."""
    with torch.autocast(student.device.type, enabled=False):
        log_s = F.log_softmax(student.float() / temperature, dim=1)
        log_t = F.log_softmax(teacher.float() / temperature, dim=1)
        kl = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")
        return kl * temperature**2


class SSDDistillModel(nn.Module):
    """Backbone with a hard (CE) and an optional soft (KD) linear head on the same feature.

    ``forward(x)`` gives ``(features, hard logits)``; ``forward(x, soft=True)`` adds the soft
    logits (one forward, so DDP sees every parameter used).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, soft_head: bool) -> None:
        super().__init__()
        width = int(backbone.feature_dim)
        self.backbone = backbone
        self.head = linear_head(width, num_classes)
        self.soft_head = linear_head(width, num_classes) if soft_head else None
        self.feature_dim, self.num_classes = width, num_classes

    def forward(self, x: torch.Tensor, soft: bool = False):
        features = self.backbone(x)
        hard = self.head(features)
        if not soft:
            return features, hard
        return features, hard, self.soft_head(features)


@OBJECTIVES.register("ssd_distill")
class SSDDistill:
    """Stage III: fresh network, CE on the hard head, KD from the frozen teacher on the soft."""

    version = "1"
    Params = SSDDistillParams

    def validate(self, params: SSDDistillParams, spec: StageSpec) -> None:
        """Driver-side: only a ``teacher`` input, and one when KD is on."""
        names = sorted(n for n, _ in spec.inputs)
        if names not in ([], ["teacher"]):
            raise ConfigError(
                f"ssd_distill takes one input named 'teacher', got {names}; "
                "use inputs={'teacher': <lws or ssd_feature spec>}"
            )
        if params.kd_weight > 0 and not names:
            raise ConfigError(
                f"ssd_distill has no 'teacher' input with kd_weight={params.kd_weight}; add "
                "inputs={'teacher': <lws spec>} or set kd_weight=0"
            )

    def build(self, params: SSDDistillParams, ctx: StageContext) -> nn.Module:
        self.validate(params, ctx.spec)
        if params.kd_weight > 0:
            if "teacher" not in ctx.inputs:
                raise ConfigError(
                    "ssd_distill input 'teacher' has no upstream artifact in this run; run the "
                    "stage through ray_lt.pipeline so its teacher is trained first"
                )
            up = ctx.inputs["teacher"]
            # The teacher's throwaway initialisation must not shift the student's seeded init.
            with torch.random.fork_rng(devices=[]):
                teacher = lt_model(up.spec["spec"], ctx.num_classes, up.state_dict)
            freeze(teacher)
            teacher.to(ctx.device).train(params.teacher_bn == "train")
            if ctx.device.type == "cuda" and ctx.spec.train.channels_last:
                teacher.to(memory_format=torch.channels_last)
            ctx.aux["teacher"] = teacher
        backbone = create_model(
            params.backbone, ctx.num_classes, backbone_kwargs=params.backbone_kwargs
        ).backbone
        return SSDDistillModel(backbone, ctx.num_classes, soft_head=params.kd_weight > 0)

    def loss(self, params: SSDDistillParams, model: nn.Module, batch: Batch, ctx: StageContext):
        if params.kd_weight == 0:
            _, hard = model(batch.x)
            return {"ce": F.cross_entropy(hard.float(), batch.y)}
        _, hard, soft = model(batch.x, soft=True)
        with torch.no_grad():
            _, target = ctx.aux["teacher"](batch.x)
        return {
            "ce": F.cross_entropy(hard.float(), batch.y),
            "kd": params.kd_weight * kd_loss(soft, target, params.temperature),
        }

    def predict(self, params: SSDDistillParams, model: nn.Module, x: torch.Tensor):
        """Hard head as the primary logits; the soft head as ``logits_soft`` (``soft_*``)."""
        if params.kd_weight == 0:
            return model(x)
        features, hard, soft = model(x, soft=True)
        return features, hard, {"logits_soft": soft}

    @staticmethod
    def lt_model(spec: Mapping[str, Any], num_classes: int, state_dict=None) -> LTModel:
        """Encoder and hard head, as the official fine-tune keeps (the soft head is dropped)."""
        return _plain_from(spec, num_classes, state_dict, ("backbone", "head"))
