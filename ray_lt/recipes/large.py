"""Settings shared by the ImageNet-LT, Places-LT and iNaturalist 2018 experiment files.

The full recipes (the papers' settings) train at 224 px on a GPU cluster with the data streamed
through Ray Data. Their smoke variants run the same pipelines, with the same backbones, on a tiny
JPEG tree in the dataset's own format (``tests/image_trees.py`` makes one) at 32 px, one epoch
per stage, inline on a CPU: what a test or a user's first check needs, in seconds per stage.
"""

from __future__ import annotations

from typing import Any

from ray_lt.data.spec import DataSpec
from ray_lt.errors import ConfigError
from ray_lt.recipes import cbd
from ray_lt.recipes.ssd_lt import ssd_lt
from ray_lt.spec import Resources, StageSpec, TrainSpec

#: One GPU worker per stage with one CPU for its process: decoding runs in Ray Data tasks that
#: reserve their own CPUs anywhere in the cluster, so a worker that held 8 CPUs would only take
#: them away from the decoders on its node.
GPU_STAGE = Resources(num_workers=1, cpus_per_worker=1, gpus_per_worker=1)

SMOKE_IMAGE_SIZE = 32
#: Inline stages: a smoke stage is seconds of training, a worker group would add 20 s each.
SMOKE_RESOURCES = Resources(num_workers=0, cpus_per_worker=1)
SMOKE_TRAIN = TrainSpec(
    epochs=1,
    batch_size=16,
    lr=0.01,
    momentum=0.9,
    weight_decay=5e-4,
    schedule="cosine",
    augment="rrc_flip",
    eval_every=1,
    amp=False,
)
#: CBE's expert split thresholds for the smoke trees of ``tests/image_trees.make_tree`` with
#: num_classes=6, max_per_class=24, imbalance=12 (train counts 24 14 8 5 3 2): 2 / 2 / 2 classes.
SMOKE_CBE_SPLITS = ((10, None), (4, 10), (0, 4))


def smoke_data(name: str, placement: str = "auto") -> DataSpec:
    """A JPEG dataset at the smoke size; ``placement`` as in ``DataSpec``."""
    return DataSpec(name=name, image_size=SMOKE_IMAGE_SIZE, placement=placement)


# The pipelines the ImageNet-LT and iNat18 files share: only data, training settings and
# (for SSD-LT) the backbone and queue differ between datasets.


def cbd_ens(
    config: dict[str, Any],
    *,
    data: DataSpec,
    train: TrainSpec,
    zero_init_residual: bool = True,
) -> StageSpec:
    """CBD_ENS at ImageNet scale (the paper's): ResNet-50 teachers and student, cosine heads
    with a fixed scale of 20, alpha 0.4, beta 100; the student samples class-balanced.

    ``zero_init_residual`` (on, as in the official ResNets) starts the last BatchNorm of every
    residual block at γ = 0; ``False`` keeps torchvision's γ = 1.
    """
    return cbd(
        config["teachers"],
        config["seed"],
        alpha=0.4,
        beta=100.0,
        data=data,
        teacher_train=train,
        student_train=train.replace(sampler="class_balanced"),
        backbone="resnet50",
        scale=20.0,
        zero_init_residual=zero_init_residual,
    )


#: SSD-LT's BatchNorm modes of frozen networks, as ``ssd_lt``'s ``lws_bn`` / ``teacher_bn``.
SSD_BN: dict[str, dict[str, str]] = {
    "official": {"lws_bn": "batch", "teacher_bn": "train"},
    "frozen": {"lws_bn": "frozen", "teacher_bn": "eval"},
}


def ssd_lt_large(
    config: dict[str, Any],
    *,
    data: DataSpec,
    backbone: str,
    train: TrainSpec | None = None,
    lws_train: TrainSpec | None = None,
    queue_size: int = 0,
    bn: str = "official",
) -> StageSpec:
    """SSD-LT at ImageNet scale (the paper's): MLP 2048, T = 2, MoCo-v2 key view with blur.

    With ``train`` None it is the smoke variant: ``SMOKE_TRAIN`` with the weak view
    ``rrc_flip_jitter``, a 32-entry queue and the blur-free key view (32 px).

    Args:
        bn: a key of ``SSD_BN``: "official" (the official code: both LWS stages re-estimate the
            frozen encoder's BatchNorm statistics, the stage-III teacher runs in train mode) or
            "frozen" (ray-lt's CIFAR default: frozen statistics, teacher in eval mode).
    """
    if bn not in SSD_BN:
        raise ConfigError(f"ssd_lt_large bn '{bn}' is unknown; use one of {sorted(SSD_BN)}")
    smoke = train is None
    if smoke:
        train = SMOKE_TRAIN.replace(augment="rrc_flip_jitter")
        lws_train = train.replace(sampler="class_aware", sampler_params={"k": 2})
    return ssd_lt(
        config["seed"],
        finetune=config["finetune"],
        temperature=2.0,
        queue_size=32 if smoke else queue_size,
        data=data,
        backbone=backbone,
        hidden_dim=2048,
        key_augment="moco_v2" if smoke else "moco_v2_blur",
        feature_train=train,
        lws_train=lws_train,
        distill_train=train,
        **SSD_BN[bn],
    )
