"""torchvision ResNets (and ResNet-10) as feature backbones, optionally from local weights.

Why it exists: the ImageNet-LT / iNat / Places recipes of the seed methods (docs/methods/) use
torchvision-layout ResNets: ResNet-10 for CBE, ResNet-50/101/152 for CBD, ResNeXt-50 32x4d for
SSD-LT. Each builder returns the torchvision model with ``fc`` replaced by ``nn.Identity`` so it
yields pooled features (or, with ``fc512``, by CBE's Linear -> 512 + ReLU), and a
``feature_dim`` attribute. Keeping the torchvision module names means
torchvision-format state dicts load unchanged. It must never download anything (workers are often
offline): pretrained weights come only from a local file the user names.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ray_lt.errors import ConfigError

# Registry keys ``factory.py`` registers, each the name of a torchvision constructor but
# ResNet-10 (one BasicBlock per stage: CBE's and the decoupling baselines' backbone), which
# torchvision does not ship.
TORCHVISION_ARCHS = (
    "resnet10",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
)


def _build(arch: str, zero_init_residual: bool) -> nn.Module:
    """A torchvision model with random weights (never a download).

    torchvision is imported here, not at the top: importing it pulls in ``torch._dynamo`` (about
    1.5 s of CPU), which every process that merely imports the model registry (the sweep driver,
    each trial, each worker of a CIFAR stage) would otherwise pay.
    """
    from torchvision.models import resnet as tv

    if arch == "resnet10":
        return tv.ResNet(tv.BasicBlock, [1, 1, 1, 1], zero_init_residual=zero_init_residual)
    return getattr(tv, arch)(weights=None, zero_init_residual=zero_init_residual)


_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")


#: Width of CBE's extra fully connected layer after pooling (``fc512``).
FC512 = 512


def torchvision_backbone(
    arch: str,
    *,
    zero_init_residual: bool = False,
    weights_path: str | None = None,
    fc512: bool = False,
) -> nn.Module:
    """A torchvision ResNet without its classifier: forward gives pooled ``[B, feature_dim]``.

    Args:
        arch: a key of ``TORCHVISION_ARCHS`` (``"resnet10"``, ``"resnet50"``, ...).
        zero_init_residual: start the last BN of every residual branch at zero (Goyal et al.;
            CBD's backbones do this).
        weights_path: a local ``.safetensors`` / ``.pt`` / ``.pth`` state dict in torchvision
            layout to start from; ``fc.*`` keys are ignored. ``None`` keeps the random init.
        fc512: put Linear(width -> 512) + ReLU after pooling, as ``fc`` (CBE's backbones have
            it, and CBE's ``num_learnable`` counts it); the feature is then 512-d. It is always
            freshly initialised: pretrained files carry no such layer.
    """
    if arch not in TORCHVISION_ARCHS:
        known = ", ".join(TORCHVISION_ARCHS)
        raise ConfigError(f"unknown torchvision architecture '{arch}'; known: {known}")
    model = _build(arch, bool(zero_init_residual))
    feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    if fc512:
        model.fc = nn.Sequential(nn.Linear(feature_dim, FC512), nn.ReLU(inplace=True))
        feature_dim = FC512
    model.feature_dim = feature_dim
    if weights_path is not None:
        load_backbone_weights(model, weights_path)
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a local weights file, never unpickling arbitrary objects.

    Args:
        path: a ``.safetensors`` file (read with safetensors) or a ``.pt`` / ``.pth`` file (read
            with ``torch.load(weights_only=True)``); a ``{"state_dict": ...}`` wrapper is unpacked.
    """
    path = Path(path)
    if path.suffix not in _WEIGHT_SUFFIXES:
        raise ConfigError(
            f"weights file '{path}' has suffix '{path.suffix}'; use one of "
            f"{', '.join(_WEIGHT_SUFFIXES)}"
        )
    if not path.is_file():
        raise ConfigError(f"weights file '{path}' does not exist; check weights_path")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any reader failure is a bad user file, reported in one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"cannot read weights file '{path}': {first}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ConfigError(
            f"weights file '{path}' does not hold a state dict of named tensors; "
            "save model.state_dict()"
        )
    return state


def load_backbone_weights(model: nn.Module, path: str | Path) -> None:
    """Load a state dict into ``model`` in place, ignoring classifier (``fc.*``) keys.

    Args:
        model: a backbone whose parameter names follow torchvision.
        path: the weights file (see ``read_state_dict``). A ``module.`` prefix on every key (a
            DDP-wrapped save) is stripped. Missing, extra or mis-shaped keys are a ConfigError.
    """
    state = read_state_dict(path)
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or bad_shape:
        parts = [
            f"{label} {keys[:3]}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", bad_shape),
            )
            if keys
        ]
        raise ConfigError(
            f"weights file '{path}' does not fit this backbone: {'; '.join(parts)}; "
            "save the state dict of the same architecture"
        )
    # strict but for ``fc.*``: an ``fc512`` layer keeps its fresh initialisation
    missing_fc = model.load_state_dict(state, strict=False).missing_keys
    assert all(k.startswith("fc.") for k in missing_fc), missing_fc
