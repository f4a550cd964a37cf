"""The SSD-LT CIFAR recipe as values, and the pipeline that builds its stages.

Stages: I ``ssd_feature`` (CE + label-masked MoCo) -> II ``lws`` (the balanced teacher) -> III
``ssd_distill`` (fresh network, hard head CE + soft head KD) -> optional ``lws`` fine-tune of the
stage-III hard head, its own stage so changing only its settings reuses stages I to III.

Schedule: the paper fixes 200 epochs for stage III (and, by the CE recipe it builds on, for stage
I) but not the schedule; SSD-LT's code uses cosine per epoch with no warm-up and weight decay
5e-4 on every stage, so stages I and III use the CE recipe's batch 128 and lr 0.1 with SSD's
cosine schedule and wd 5e-4 (no warm-up). Stage II and the fine-tune: the LWS recipe (10
epochs, lr 0.1, cosine, wd 5e-4) with class-aware sampling, 2 images per class visit. Stage I's
MLP is 64 -> 64 -> 128 on ResNet-32 (hidden width = feature width) and its queue 10,752 keys =
84 batches of 128, the largest that fits CIFAR-100-LT IF100's 10,847 images. Nothing here
imports Ray.
"""

from __future__ import annotations

from ray_lt.data.spec import DataSpec
from ray_lt.errors import ConfigError
from ray_lt.recipes import CIFAR100_LT_100, CIFAR_DECOUPLED, SMOKE_DATA, SMOKE_TRAIN
from ray_lt.spec import StageSpec, TrainSpec

CIFAR_SSD = TrainSpec(
    epochs=200,
    batch_size=128,
    lr=0.1,
    momentum=0.9,
    weight_decay=5e-4,
    schedule="cosine",
    warmup_epochs=0,
    eval_every=10,
)
CIFAR_SSD_LWS = CIFAR_DECOUPLED.replace(sampler="class_aware", sampler_params={"k": 2})
CIFAR_QUEUE = 10_752  # 84 x 128 <= 10,847
TEACHERS = ("lws", "plain")
# The report's columns: the hard head (primary logits) and the soft head (``logits_soft``).
REPORT_METRICS = tuple(
    f"{head}{group}" for head in ("", "soft_") for group in ("many", "medium", "few", "overall")
)

# Smoke: SMOKE_DATA (1,000-odd images), ResNet-8, 2 epochs; the queue holds 8 batches of 32.
SMOKE_SSD = SMOKE_TRAIN.replace(schedule="cosine", weight_decay=5e-4)
SMOKE_SSD_LWS = SMOKE_SSD.replace(epochs=1, sampler="class_aware", sampler_params={"k": 2})
SMOKE_QUEUE = 256


def ssd_feature(
    seed: int,
    *,
    ssl_weight: float = 1.0,
    mask_labels: bool = True,
    queue_size: int | None = CIFAR_QUEUE,
    data: DataSpec = CIFAR100_LT_100,
    train: TrainSpec = CIFAR_SSD,
    backbone: str = "resnet32",
    hidden_dim: int | None = None,
    key_augment: str = "moco_v2",
) -> StageSpec:
    """Stage I. ``ssl_weight=0`` is the CE-only ablation (queue settings then do not apply)."""
    params: dict = {"backbone": backbone, "ssl_weight": ssl_weight}
    if ssl_weight > 0:
        params.update(mask_labels=mask_labels, queue_size=queue_size, key_augment=key_augment)
        if hidden_dim is not None:
            params["hidden_dim"] = hidden_dim
    return StageSpec(
        kind="ssd_feature",
        name="ssd_stage1",
        data=data,
        train=train.replace(seed=seed),
        params=params,
    )


def lws(upstream: StageSpec, seed: int, *, train: TrainSpec, bn: str = "frozen", name: str):
    """An LWS stage; ``bn`` enters the params (and key) only when not the default."""
    return StageSpec(
        kind="lws",
        name=name,
        data=upstream.data,
        train=train.replace(seed=seed),
        params={} if bn == "frozen" else {"bn": bn},
        inputs={"features": upstream},
    )


def ssd_lt(
    seed: int,
    *,
    ssl_weight: float = 1.0,
    mask_labels: bool = True,
    teacher: str = "lws",
    kd_weight: float = 1.0,
    temperature: float = 2.0,
    finetune: bool = False,
    queue_size: int | None = CIFAR_QUEUE,
    lws_bn: str = "frozen",
    teacher_bn: str = "eval",
    data: DataSpec = CIFAR100_LT_100,
    backbone: str = "resnet32",
    hidden_dim: int | None = None,
    key_augment: str = "moco_v2",
    feature_train: TrainSpec = CIFAR_SSD,
    lws_train: TrainSpec = CIFAR_SSD_LWS,
    distill_train: TrainSpec = CIFAR_SSD,
    finetune_train: TrainSpec | None = None,
) -> StageSpec:
    """The SSD-LT pipeline's final stage: ``ssd_distill``, or the LWS fine-tune on its hard head.

    Args:
        seed: every stage's training seed.
        ssl_weight: lambda of stage I (0: CE only).
        mask_labels: mask same-label queue entries out of the negatives.
        teacher: "lws" (the balanced stage-II teacher) or "plain" (stage I as is).
        kd_weight: stage III's KD weight (0: no teacher, no soft head).
        temperature: KD temperature T.
        finetune: add the LWS fine-tune of the stage-III hard head as the final stage.
        queue_size: stage I's queue (None: the largest multiple of the batch that fits).
        lws_bn: BatchNorm behaviour of both LWS stages ("frozen" or "batch").
        teacher_bn: the teacher's mode in stage III ("eval" or "train").
        finetune_train: the fine-tune's TrainSpec (default: ``lws_train``).
    """
    if teacher not in TEACHERS:
        raise ConfigError(f"unknown SSD-LT teacher '{teacher}'; use one of {TEACHERS}")
    inputs = {}
    if kd_weight > 0:
        stage1 = ssd_feature(
            seed,
            ssl_weight=ssl_weight,
            mask_labels=mask_labels,
            queue_size=queue_size,
            data=data,
            train=feature_train,
            backbone=backbone,
            hidden_dim=hidden_dim,
            key_augment=key_augment,
        )
        inputs["teacher"] = (
            lws(stage1, seed, train=lws_train, bn=lws_bn, name="ssd_stage2")
            if teacher == "lws"
            else stage1
        )
    params = {"backbone": backbone, "kd_weight": kd_weight, "temperature": temperature}
    if teacher_bn != "eval":
        params["teacher_bn"] = teacher_bn
    distill = StageSpec(
        kind="ssd_distill",
        name="ssd_stage3",
        data=data,
        train=distill_train.replace(seed=seed),
        params=params,
        inputs=inputs,
    )
    if not finetune:
        return distill
    return lws(distill, seed, train=finetune_train or lws_train, bn=lws_bn, name="ssd_finetune")


def ssd_lt_smoke(seed: int, **options: object) -> StageSpec:
    """``ssd_lt`` on SMOKE_DATA with ResNet-8 and 2-epoch stages (1-epoch LWS), for CPUs."""
    recipe = {
        "data": SMOKE_DATA,
        "backbone": "resnet8",
        "queue_size": SMOKE_QUEUE,
        "feature_train": SMOKE_SSD,
        "lws_train": SMOKE_SSD_LWS,
        "distill_train": SMOKE_SSD,
        **options,
    }
    return ssd_lt(seed, **recipe)
