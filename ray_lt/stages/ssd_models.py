"""SSD-LT's networks and losses: stage I's MoCo model, stage III's two-headed student.

Stage I (``SSDFeatureModel``): the key encoder and key MLP are EMA copies (m 0.999) of the query
ones, updated under no_grad before the keys are computed; they are frozen (never in the
optimiser, so no weight decay) and marked ``update_batch_stats`` so they use batch statistics
like MoCo's. The queue of normalised keys and their labels, and its pointer, are buffers: they
are saved in checkpoints, so a resumed stage keeps its queue. Choices and limits:

- The queue starts as random unit vectors with label 0, as in the official code, so class-0
  queries see the initial entries masked until the queue has been filled once.
- Keys are enqueued after the loss, at ``(ptr + i) % K``: the engine keeps a short last batch
  (no drop_last), so the pointer wraps instead of requiring whole batches (``queue_length``).
- Under DDP the keys and labels of every rank are all-gathered before enqueueing. MoCo's
  shuffle-BN is not implemented: each rank's key encoder normalises its own batch.
- The contrastive logits are computed in float32 even under bf16 autocast.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ray_lt.errors import ConfigError
from ray_lt.models import freeze, linear_head


def queue_length(queue_size: int | None, batch_size: int, n_train: int) -> int:
    """The checked queue length K: ``queue_size``, or the largest whole-batch count that fits.

    A MoCo queue must hold whole batches and no more keys than there are training images.
    """
    if queue_size is None:
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
    if queue_size > n_train:
        fit = n_train // batch_size * batch_size
        raise ConfigError(
            f"ssd_feature queue_size {queue_size} exceeds the {n_train} training images; use "
            f"at most {fit} (the largest multiple of the batch size {batch_size} <= {n_train})"
        )
    return queue_size


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
