"""Contract tests for ray_lt.models: every registered backbone x head builds, runs and trains."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ray_lt.errors import ConfigError, UnknownNameError
from ray_lt.models import BACKBONES, HEADS, LTModel, LWSHead, create_model, freeze
from ray_lt.models.resnet_tv import torchvision_backbone

FEATURE_DIMS = {
    "resnet32": 64,
    "resnet20": 64,
    "resnet8": 64,
    "resnet10": 512,
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "resnet101": 2048,
    "resnet152": 2048,
    "resnext50_32x4d": 2048,
}
NUM_CLASSES = 7


def test_registries_hold_the_documented_names():
    assert set(BACKBONES.names()) == set(FEATURE_DIMS)
    assert HEADS.names() == ["cosine", "linear", "lws"]


@pytest.mark.parametrize("head", HEADS.names())
@pytest.mark.parametrize("backbone", BACKBONES.names())
def test_forward_backward(backbone: str, head: str):
    torch.manual_seed(0)
    model = create_model(backbone, NUM_CLASSES, head=head)
    assert isinstance(model, LTModel)
    assert model.feature_dim == model.backbone.feature_dim == FEATURE_DIMS[backbone]
    assert model.num_classes == NUM_CLASSES
    model.train()
    features, logits = model(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, FEATURE_DIMS[backbone])
    assert logits.shape == (2, NUM_CLASSES)
    assert torch.isfinite(features).all() and torch.isfinite(logits).all()

    nn.functional.cross_entropy(logits, torch.tensor([0, 3])).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    no_grad = [n for n, p in trainable.items() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in trainable.values())
    head_trainable = [n for n, p in model.head.named_parameters() if p.requires_grad]
    if head == "lws":
        assert head_trainable == ["scale"]
        assert model.head.linear.weight.grad is None and model.head.linear.bias.grad is None
    elif head == "cosine":
        assert head_trainable == ["weight"]  # fixed scale is a buffer
    else:
        assert sorted(head_trainable) == ["bias", "weight"]


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_resnet32_matches_ldam_drw_layout():
    model = create_model("resnet32", 10)
    # 432 stem + 32 BN + stage1 23,360 + stage2 88,192 + stage3 351,488 + 650 classifier.
    assert _count(model) == 464_154
    assert _count(model.backbone) == 463_504
    convs = [m for m in model.backbone.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 31  # 1 stem + 3 stages x 5 blocks x 2; option-A shortcuts have no conv
    assert all(c.bias is None for c in convs)
    blocks = [len(getattr(model.backbone, f"layer{i}")) for i in (1, 2, 3)]
    assert blocks == [5, 5, 5]
    # Spatial sizes 32 -> 16 -> 8 and widths 16/32/64.
    x = torch.randn(2, 3, 32, 32)
    out = model.backbone.layer1(torch.relu(model.backbone.bn1(model.backbone.conv1(x))))
    assert out.shape == (2, 16, 32, 32)
    out = model.backbone.layer2(out)
    assert out.shape == (2, 32, 16, 16)
    assert model.backbone.layer3(out).shape == (2, 64, 8, 8)


def test_resnet32_option_a_shortcut_is_subsample_and_zero_pad():
    block = BACKBONES.get("resnet32")().layer2[0]
    x = torch.randn(1, 16, 8, 8)
    short = block.shortcut(x)
    assert short.shape == (1, 32, 4, 4)
    assert torch.equal(short[:, 8:24], x[:, :, ::2, ::2])
    assert short[:, :8].abs().sum() == 0 and short[:, 24:].abs().sum() == 0


def test_resnet32_kaiming_init():
    torch.manual_seed(0)
    conv = BACKBONES.get("resnet32")().layer3[1].conv1  # 64 -> 64, fan_in 576
    std = conv.weight.std().item()
    assert abs(std - (2 / 576) ** 0.5) < 0.005  # PyTorch's default would give ~0.024


def test_cosine_logits_bounded_by_scale():
    torch.manual_seed(0)
    head = HEADS.get("cosine")(16, 5, scale=3.5)
    logits = head(torch.randn(64, 16) * 100)
    assert logits.abs().max() <= 3.5 + 1e-5
    assert logits.abs().max() > 1.0  # not collapsed
    assert "scale" in dict(head.named_buffers())
    assert "scale" not in dict(head.named_parameters())
    # Aligning a feature with a class weight gives exactly the scale.
    target = head.weight[2].detach().unsqueeze(0) * 7.0
    assert head(target)[0, 2].item() == pytest.approx(3.5, abs=1e-5)


def test_cosine_learnt_scale_gets_gradient():
    head = HEADS.get("cosine")(8, 4, scale=10.0, learn_scale=True)
    assert isinstance(head.scale, nn.Parameter)
    head(torch.randn(3, 8)).logsumexp(1).sum().backward()
    assert head.scale.grad is not None and head.weight.grad is not None


def test_cosine_rejects_nonpositive_scale():
    with pytest.raises(ConfigError, match="scale"):
        create_model("resnet32", 3, head="cosine", head_kwargs={"scale": 0.0})


def test_lws_from_linear_reproduces_linear_logits():
    torch.manual_seed(0)
    linear = nn.Linear(12, 6)
    head = LWSHead.from_linear(linear)
    feats = torch.randn(5, 12)
    torch.testing.assert_close(head(feats), linear(feats))
    assert torch.equal(head.scale.detach(), torch.ones(6))
    assert [n for n, p in head.named_parameters() if p.requires_grad] == ["scale"]
    # W, b are copies: changing the source head later must not leak into the LWS head.
    with torch.no_grad():
        linear.weight.add_(1.0)
    assert not torch.allclose(head(feats), linear(feats))
    with torch.no_grad():
        head.scale.fill_(2.0)
        linear.weight.sub_(1.0)
    torch.testing.assert_close(head(feats), 2.0 * linear(feats))


def test_lws_swapped_into_trained_model():
    torch.manual_seed(0)
    model = create_model("resnet32", 4)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    _, before = model(x)
    freeze(model.backbone)
    model.head = LWSHead.from_linear(model.head)
    _, after = model(x)
    torch.testing.assert_close(before, after)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["head.scale"]


def test_freeze_stops_all_gradients():
    model = create_model("resnet32", 3)
    freeze(model)
    assert not any(p.requires_grad for p in model.parameters())


def test_linear_head_kaiming_init_option():
    torch.manual_seed(0)
    head = create_model("resnet32", 100, head_kwargs={"init": "kaiming"}).head
    assert abs(head.weight.std().item() - (2 / 64) ** 0.5) < 0.01
    with pytest.raises(ConfigError, match="init"):
        create_model("resnet32", 10, head_kwargs={"init": "xavier"})


def test_zero_init_residual():
    model = create_model("resnet18", 3, backbone_kwargs={"zero_init_residual": True})
    assert all(torch.all(b.bn2.weight == 0) for b in model.backbone.layer1)
    default = create_model("resnet18", 3)
    assert all(torch.all(b.bn2.weight == 1) for b in default.backbone.layer1)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_path_round_trip(tmp_path, suffix):
    torch.manual_seed(1)
    source = torchvision_backbone("resnet10")
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state["fc.weight"] = torch.zeros(1000, 512)  # a torchvision checkpoint's classifier: ignored
    state["fc.bias"] = torch.zeros(1000)
    path = tmp_path / f"backbone{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    torch.manual_seed(2)
    model = create_model("resnet10", 5, backbone_kwargs={"weights_path": str(path)})
    loaded = model.backbone.state_dict()
    assert set(loaded) == set(source.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(loaded[key], value), key
    source.eval()
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x)[0], source(x))


def test_weights_path_missing_file(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ConfigError, match="does not exist"):
        create_model("resnet18", 5, backbone_kwargs={"weights_path": str(missing)})


def test_weights_path_bad_suffix_and_wrong_architecture(tmp_path):
    bad = tmp_path / "w.bin"
    bad.write_bytes(b"x")
    with pytest.raises(ConfigError, match="suffix"):
        create_model("resnet18", 5, backbone_kwargs={"weights_path": str(bad)})
    path = tmp_path / "r10.safetensors"
    save_file(torchvision_backbone("resnet10").state_dict(), str(path))
    with pytest.raises(ConfigError, match="does not fit"):
        create_model("resnet18", 5, backbone_kwargs={"weights_path": str(path)})
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read"):
        create_model("resnet18", 5, backbone_kwargs={"weights_path": str(corrupt)})


def test_unknown_names_list_known_ones():
    with pytest.raises(UnknownNameError, match="resnet32") as err:
        create_model("resnet33", 10)
    assert "did you mean" in str(err.value)
    with pytest.raises(UnknownNameError, match="cosine"):
        create_model("resnet32", 10, head="cosin")


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_num_classes_must_be_positive_int(bad):
    with pytest.raises(ConfigError, match="num_classes"):
        create_model("resnet32", bad)


def test_unknown_kwargs_are_config_errors():
    with pytest.raises(ConfigError, match="weights_path"):
        create_model("resnet32", 10, backbone_kwargs={"weights_path": "x.pt"})
    with pytest.raises(ConfigError, match="scal"):
        create_model("resnet32", 10, head="linear", head_kwargs={"scale": 2.0})


def test_the_cifar_path_does_not_import_torchvision():
    """torchvision pulls in torch._dynamo (about 1.5 s of CPU); the driver, trials and CIFAR
    workers import these modules but build no torchvision backbone, so they must not pay it."""
    import subprocess
    import sys

    code = (
        "import sys, ray_lt.sweep, ray_lt.trial, ray_lt.models, ray_lt.stages\n"
        "from ray_lt.models import create_model\n"
        "print('torchvision' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
