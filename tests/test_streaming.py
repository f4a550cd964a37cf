"""JPEG datasets on the device or streamed through Ray Data: the automatic choice, the sampled
order and class frequencies of streamed epochs, and the same stage on both paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_lt.data import draw_epoch, load_dataset
from ray_lt.data.decode import decode_batch
from ray_lt.data.jpeg_datasets import DEVICE_BYTES_LIMIT, choose_placement, pixel_bytes
from ray_lt.data.sources import DeviceSource, StreamSource, row_seeds
from ray_lt.data.spec import DataSpec, clear_cache
from ray_lt.engine import LocalSession, StageRun, run_stage
from ray_lt.errors import ConfigError
from ray_lt.objective import get_objective
from ray_lt.spec import StageSpec, TrainSpec
from tests.image_trees import make_tree

# train counts 24 14 8 5 3 2: all three shot groups' worth of imbalance in 56 images
TREE = {"num_classes": 6, "max_per_class": 24, "imbalance": 12.0}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpeg")
    for name in ("imagenet_lt", "inat18"):
        make_tree(root, name, **TREE)
    return root


def test_placement_is_automatic_by_size_and_can_be_forced():
    imagenet_lt = 115_846 + 20_000 + 50_000
    assert pixel_bytes(imagenet_lt, 224) > DEVICE_BYTES_LIMIT
    assert choose_placement(DataSpec("imagenet_lt"), imagenet_lt) == "stream"
    assert choose_placement(DataSpec("imagenet_lt", image_size=32), imagenet_lt) == "device"
    forced = DataSpec("imagenet_lt", image_size=32, placement="stream")
    assert choose_placement(forced, imagenet_lt) == "stream"
    assert choose_placement(DataSpec("imagenet_lt", placement="device"), imagenet_lt) == "device"
    with pytest.raises(ConfigError, match="placement must be one of"):
        DataSpec("imagenet_lt", placement="gpu")
    with pytest.raises(ConfigError, match="image_size"):
        DataSpec("imagenet_lt", image_size=4)


def test_new_fields_leave_existing_keys_alone():
    # stores written before image_size / placement existed keep their stage keys
    assert "image_size" not in DataSpec().to_dict() and "placement" not in DataSpec().to_dict()
    spec = DataSpec("imagenet_lt", image_size=32, placement="stream")
    assert DataSpec.from_dict(spec.to_dict()) == spec


def test_small_tree_lives_on_the_device_a_forced_one_streams(tree):
    clear_cache()
    on_device = load_dataset(DataSpec("imagenet_lt", image_size=32), tree)
    assert not on_device.train.streamed and on_device.train.images.shape == (56, 3, 32, 32)
    assert on_device.class_counts.tolist() == [24, 14, 8, 5, 3, 2]
    streamed = load_dataset(DataSpec("imagenet_lt", image_size=32, placement="stream"), tree)
    # never loaded whole: the splits hold paths, the pixels stay in the files
    assert streamed.train.streamed and streamed.train.images.dtype.kind == "U"
    assert streamed.class_counts.tolist() == [24, 14, 8, 5, 3, 2]
    assert len(streamed.test) == len(on_device.test) and streamed.image_size == 32
    with pytest.raises(ConfigError, match="cannot stream"):
        load_dataset(DataSpec("synthetic_lt", placement="stream"))


@pytest.mark.ray
@pytest.mark.parametrize("sampler", ["class_balanced", "square_root"])
def test_streamed_epochs_keep_the_sampled_order_and_class_frequencies(ray_session, tree, sampler):
    data = load_dataset(DataSpec("inat18", image_size=32, placement="stream"), tree)
    labels = torch.as_tensor(data.train.labels)
    gen = torch.Generator().manual_seed(7)
    order = torch.cat([draw_epoch(sampler, labels, data.num_classes, gen) for _ in range(12)])
    source = StreamSource(data.train, data.image_root, 32, torch.device("cpu"), train_crop=True)
    rows, images = [], []
    for r, x in source.train_batches(order, batch_size=40, seed=3):
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32)
        rows.append(r)
        images.append(x)
    rows_t = torch.cat(rows)
    assert torch.equal(rows_t, order)  # the drawn order, exactly, through Ray Data
    # each row's pixels are its own crop: the same path and seed decode to the same bytes
    seeds = row_seeds(3, len(order))
    for i in (0, 101, len(order) - 1):
        path = f"{data.image_root}/{data.train.images[int(order[i])]}"
        expected = decode_batch([path], size=32, train=True, seeds=[int(seeds[i])])[0]
        assert np.array_equal(torch.cat(images)[i].numpy(), expected)
    # the class frequencies the sampler promises (672 draws; bounds are > 4 sigma wide)
    counts = np.bincount(data.train.labels[rows_t.numpy()], minlength=data.num_classes)
    n = data.class_counts.astype(float)
    weights = np.ones_like(n) if sampler == "class_balanced" else np.sqrt(n)
    expected_counts = len(order) * weights / weights.sum()
    sigma = np.sqrt(expected_counts * (1 - weights / weights.sum()))
    assert np.all(np.abs(counts - expected_counts) < 4.5 * sigma + 1), (counts, expected_counts)
    # and not the instance frequencies (24:2 for the extreme classes)
    assert counts[-1] > 0.25 * counts[0]


@pytest.mark.ray
def test_a_stage_on_streamed_data_equals_the_device_path(ray_session, tree, tmp_path):
    clear_cache()
    outputs = {}
    for placement in ("device", "stream"):
        spec = StageSpec(
            kind="ce",
            data=DataSpec("imagenet_lt", image_size=32, placement=placement),
            train=TrainSpec(epochs=0, batch_size=16, lr=0.01, augment="rrc_flip"),
            params={"backbone": "resnet8"},
        )
        data = load_dataset(spec.data, tree)
        out = tmp_path / placement
        summary = run_stage(
            StageRun(spec=spec, objective=get_objective("ce"), data=data, out_dir=str(out)),
            LocalSession(),
        )
        assert summary["status"] == "ok"
        import pyarrow.parquet as pq

        outputs[placement] = pq.read_table(out / "tables" / "test.parquet")
    # the evaluation crop is the same bytes on both paths, and the same init gives the same logits
    dev, stream = outputs["device"], outputs["stream"]
    assert dev["label"].to_pylist() == stream["label"].to_pylist()
    a = np.asarray(dev["logits"].to_pylist(), dtype=np.float32)
    b = np.asarray(stream["logits"].to_pylist(), dtype=np.float32)
    assert a.shape == (len(dev), 6) and np.allclose(a, b, atol=1e-5)


@pytest.mark.ray
def test_a_streamed_stage_trains_and_resumes_on_the_same_draws(ray_session, tree, tmp_path):
    spec = StageSpec(
        kind="ce",
        data=DataSpec("imagenet_lt", image_size=32, placement="stream"),
        train=TrainSpec(
            epochs=2, batch_size=16, lr=0.01, schedule="cosine", augment="rrc_flip_jitter"
        ),
        params={"backbone": "resnet8"},
    )
    data = load_dataset(spec.data, tree)
    straight = run_stage(
        StageRun(spec=spec, objective=get_objective("ce"), data=data), LocalSession()
    )
    ckpt = tmp_path / "ckpt"
    first = LocalSession(checkpoint_dir=str(ckpt))
    with pytest.raises(RuntimeError, match="injected"):
        run_stage(
            StageRun(
                spec=spec,
                objective=get_objective("ce"),
                data=data,
                fail_at_epoch=1,
                fault_marker=str(tmp_path / "fault"),
            ),
            first,
        )
    resumed = run_stage(
        StageRun(spec=spec, objective=get_objective("ce"), data=data),
        LocalSession(checkpoint_dir=str(ckpt)),
    )
    assert resumed["start_epoch"] == 1
    # the resumed epoch saw the same crops in the same order: the same loss, to float noise
    assert resumed["history"][-1]["loss"] == pytest.approx(straight["history"][-1]["loss"], 1e-4)


def test_device_source_batches_are_gathers():
    images = np.arange(5 * 3 * 2 * 2, dtype=np.uint8).reshape(5, 3, 2, 2)
    source = DeviceSource(images, torch.device("cpu"))
    order = torch.tensor([4, 0, 0, 2, 1])
    got = list(source.train_batches(order, batch_size=2, seed=0))
    assert [r.tolist() for r, _ in got] == [[4, 0], [0, 2], [1]]
    assert torch.equal(got[0][1], torch.from_numpy(images[[4, 0]]))
    assert [r.tolist() for r, _ in source.eval_batches(3)] == [[0, 1, 2], [3, 4]]
