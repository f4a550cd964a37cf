"""Tests for ray_lt.artifacts on real files, real pyarrow filesystems and real processes."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from ray_lt.artifacts import (
    STORE_LAYOUT_VERSION,
    Artifact,
    ArtifactStore,
    read_json,
    stage_key,
    write_json_atomic,
)
from ray_lt.errors import ArtifactError, ConfigError, CorruptArtifactError

KEY = "teacher-0123456789abcdef"


def make_stage_dir(path: Path, seed: int = 0) -> Path:
    """Write what the engine writes: weights, a parquet table, metrics.json and spec.json."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    (path / "tables").mkdir(parents=True)
    save_file(
        {"fc.weight": torch.randn(4, 3, generator=g), "fc.bias": torch.zeros(4)},
        str(path / "model.safetensors"),
    )
    table = pa.table({"index": list(range(5)), "logit": [float(seed + i) for i in range(5)]})
    pq.write_table(table, path / "tables" / "logits.parquet")
    (path / "metrics.json").write_text(json.dumps({"acc": 0.5 + seed}))
    (path / "spec.json").write_text(json.dumps({"kind": "teacher", "seed": seed}))
    return path


def flip_byte(path: Path, offset: int = 10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# -- keys -------------------------------------------------------------------------------------


def test_stage_key_is_stable_and_order_free():
    a = stage_key("cbd_student", {"lr": 0.1, "opt": {"wd": 5e-4, "m": 0.9}}, {"t": "x-1"}, "3")
    b = stage_key("cbd_student", {"opt": {"m": 0.9, "wd": 5e-4}, "lr": 0.1}, {"t": "x-1"}, "3")
    assert a == b
    assert a.startswith("cbd_student-") and len(a) == len("cbd_student-") + 16
    others = [
        stage_key("cbd_teacher", {"lr": 0.1, "opt": {"wd": 5e-4, "m": 0.9}}, {"t": "x-1"}, "3"),
        stage_key("cbd_student", {"lr": 0.2, "opt": {"wd": 5e-4, "m": 0.9}}, {"t": "x-1"}, "3"),
        stage_key("cbd_student", {"lr": 0.1, "opt": {"wd": 5e-4, "m": 0.8}}, {"t": "x-1"}, "3"),
        stage_key("cbd_student", {"lr": 0.1, "opt": {"wd": 5e-4, "m": 0.9}}, {"t": "x-2"}, "3"),
        stage_key("cbd_student", {"lr": 0.1, "opt": {"wd": 5e-4, "m": 0.9}}, {"u": "x-1"}, "3"),
        stage_key("cbd_student", {"lr": 0.1, "opt": {"wd": 5e-4, "m": 0.9}}, {"t": "x-1"}, "4"),
    ]
    assert len({a, *others}) == len(others) + 1
    assert STORE_LAYOUT_VERSION == "1"


def test_stage_key_rejects_non_json_values_naming_the_key():
    with pytest.raises(ConfigError, match=r"opt\.betas\[1\]") as info:
        stage_key("teacher", {"opt": {"betas": [0.9, {0.99}]}}, {}, "1")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="'sched'"):
        stage_key("teacher", {"sched": object()}, {}, "1")
    with pytest.raises(ConfigError, match="not a valid name"):
        stage_key("../evil", {}, {}, "1")


def test_stage_key_is_computed_once_per_spec_and_unchanged(monkeypatch):
    import dataclasses

    from ray_lt import spec as spec_module
    from tests.conftest import tiny_ce, tiny_crt

    hashed: list[str] = []
    real = spec_module.stage_key

    def counting(kind, *args):
        hashed.append(kind)
        return real(kind, *args)

    monkeypatch.setattr(spec_module, "stage_key", counting)
    ce = tiny_ce()
    # Both values were computed with the code before keys were cached (and moved to spec.py).
    assert ce.key == "ce-0bebdb2bc9df4d69" and ce.key == ce.key
    assert hashed == ["ce"] and ce.__dict__["key"] == "ce-0bebdb2bc9df4d69"
    crt = tiny_crt(ce)
    assert crt.key == "crt-d4fa24f08c0285dc" and crt.key == crt.key
    assert hashed == ["ce", "crt"]  # the input's cached key was reused
    fresh = tiny_ce()  # equality, hashing and repr ignore the cache
    assert fresh == ce and hash(fresh) == hash(ce) and repr(fresh) == repr(ce)
    assert fresh.key == ce.key and hashed == ["ce", "crt", "ce"]
    renamed = dataclasses.replace(ce, name="other")  # a new spec hashes its own key
    assert renamed.key == ce.key and hashed == ["ce", "crt", "ce", "ce"]


# -- store basics -----------------------------------------------------------------------------


def test_put_open_round_trip(tmp_path):
    import torch
    from safetensors.torch import load_file

    src = make_stage_dir(tmp_path / "out")
    store = ArtifactStore(tmp_path / "store")
    assert not store.contains(KEY) and store.lookup(KEY) is None
    art = store.put(KEY, src)
    assert isinstance(art, Artifact) and art.key == KEY
    assert store.contains(KEY) and store.keys() == [KEY]
    again = store.open(KEY)
    assert again.uri == os.path.join(store.uri, KEY)
    assert again.files() == [
        "metrics.json",
        "model.safetensors",
        "spec.json",
        "tables/logits.parquet",
    ]
    assert again.spec() == {"kind": "teacher", "seed": 0}
    assert again.metrics() == {"acc": 0.5}
    assert again.table("logits").equals(pq.read_table(src / "tables" / "logits.parquet"))
    expected = load_file(str(src / "model.safetensors"))
    got = again.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert again.local_dir() == os.path.join(store.uri, KEY)
    manifest = read_json(store.fs, os.path.join(store.uri, KEY, "manifest.json"))
    assert manifest["files"]["spec.json"]["size"] == (src / "spec.json").stat().st_size
    with pytest.raises(ArtifactError, match=r"no table 'feats'.*\['logits'\]"):
        again.table("feats")
    with pytest.raises(ArtifactError, match=r"no weights 'ema'.*\['model'\]"):
        again.state_dict("ema")
    assert not list((tmp_path / "store" / "_tmp").iterdir())


def test_store_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel = ArtifactStore("rel/store")
    assert rel.uri == str(tmp_path / "rel" / "store") and os.path.isdir(rel.uri)
    via_uri = ArtifactStore(f"file://{tmp_path}/uri-store")
    assert via_uri.uri == str(tmp_path / "uri-store")
    via_uri.put(KEY, make_stage_dir(tmp_path / "out"))
    assert ArtifactStore(tmp_path / "uri-store").keys() == [KEY]
    assert via_uri.train_dir() == str(tmp_path / "uri-store" / "_train")
    with pytest.raises(ArtifactError, match="nosuchscheme://bucket/x") as info:
        ArtifactStore("nosuchscheme://bucket/x")
    assert "s3://" in str(info.value) and "\n" not in str(info.value)


def test_bad_keys_and_missing_artifacts(tmp_path):
    store = ArtifactStore(tmp_path)
    with pytest.raises(ArtifactError, match="invalid"):
        store.open("../escape")
    with pytest.raises(ArtifactError, match="no artifact") as info:
        store.open(KEY)
    assert not isinstance(info.value, CorruptArtifactError)
    with pytest.raises(ArtifactError, match="not a folder"):
        store.put(KEY, tmp_path / "missing")


# -- corruption and completeness --------------------------------------------------------------


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda d: flip_byte(d / "model.safetensors", 40), "model.safetensors"),
        (lambda d: flip_byte(d / "tables" / "logits.parquet", 30), "tables/logits.parquet"),
        (lambda d: (d / "spec.json").unlink(), "spec.json"),
        (lambda d: (d / "stray.bin").write_bytes(b"x"), "stray.bin"),
    ],
)
def test_corrupt_artifact_is_quarantined_not_deleted(tmp_path, damage, named):
    store = ArtifactStore(tmp_path / "store")
    store.put(KEY, make_stage_dir(tmp_path / "out"))
    folder = tmp_path / "store" / KEY
    damage(folder)
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    assert store.contains(KEY)  # cheap: no checksum
    assert store.lookup(KEY) is None
    assert not folder.exists() and not store.contains(KEY) and store.keys() == []
    (moved,) = (tmp_path / "store" / "_quarantine").iterdir()
    assert moved.name.startswith(f"{KEY}-")
    assert sorted(p.relative_to(moved) for p in moved.rglob("*")) == before
    # a fresh put works after quarantine, and open() names the damaged file
    store.put(KEY, make_stage_dir(tmp_path / "out2"))
    damage(folder)
    with pytest.raises(CorruptArtifactError, match="it will be retrained") as info:
        store.open(KEY)
    assert named in str(info.value) and KEY in str(info.value)
    assert len(list((tmp_path / "store" / "_quarantine").iterdir())) == 2


def test_truncated_or_missing_manifest_is_not_contained(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    store.put(KEY, make_stage_dir(tmp_path / "out"))
    manifest = tmp_path / "store" / KEY / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:25])
    assert not store.contains(KEY) and store.keys() == []
    other = "student-fedcba9876543210"
    store.put(other, make_stage_dir(tmp_path / "out2"))
    (tmp_path / "store" / other / "manifest.json").unlink()
    assert not store.contains(other) and store.keys() == []
    assert store.lookup(other) is None and (tmp_path / "store" / other).exists()  # incomplete
    with pytest.raises(ArtifactError, match="incomplete"):
        store.open(other)
    art = store.put(other, make_stage_dir(tmp_path / "out3", seed=3))  # replaces the leftover
    assert art.metrics() == {"acc": 3.5} and store.keys() == [other]
    assert len(list((tmp_path / "store" / "_quarantine").iterdir())) == 1


def test_keys_ignore_leftovers_and_store_folders(tmp_path):
    store = ArtifactStore(tmp_path)
    store.put(KEY, make_stage_dir(tmp_path / "out"))
    leftover = tmp_path / "_tmp" / f"{KEY}-deadbeef"
    make_stage_dir(leftover)
    (leftover / "manifest.json").write_text('{"files": {}}')
    for name in ["_quarantine", "_locks", "_train", "_other"]:
        (tmp_path / name / "x").mkdir(parents=True)
        (tmp_path / name / "manifest.json").write_text('{"files": {}}')
    assert store.keys() == [KEY]


def test_concurrent_put_of_one_key_keeps_one_valid_artifact(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    sources = [make_stage_dir(tmp_path / f"out{i}", seed=i) for i in range(4)]
    barrier = threading.Barrier(len(sources))
    results: list[Artifact] = []

    def writer(src: Path) -> None:
        barrier.wait()
        results.append(ArtifactStore(tmp_path / "store").put(KEY, src))

    threads = [threading.Thread(target=writer, args=(s,)) for s in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and store.keys() == [KEY]
    winner = store.open(KEY).metrics()
    assert all(r.metrics() == winner for r in results)
    assert not (tmp_path / "store" / "_quarantine").exists()
    assert not list((tmp_path / "store" / "_tmp").iterdir())


def test_json_helpers(tmp_path):
    target = tmp_path / "a" / "b.json"
    write_json_atomic(target, {"x": [1, 2.5]})
    write_json_atomic(target, {"x": [3]})
    assert read_json(pafs.LocalFileSystem(), str(target)) == {"x": [3]}
    assert [p.name for p in target.parent.iterdir()] == ["b.json"]
    with pytest.raises(ArtifactError, match="cannot read"):
        read_json(pafs.LocalFileSystem(), str(tmp_path / "none.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_json(pafs.LocalFileSystem(), str(tmp_path / "bad.json"))


# -- a non-local filesystem (SubTreeFileSystem): copy-based publish, download -----------------


def test_non_local_filesystem_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_LT_CACHE", str(tmp_path / "cache"))
    fs = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
    store = ArtifactStore("prefix", filesystem=fs)
    art = store.put(KEY, make_stage_dir(tmp_path / "out"))
    assert store.keys() == [KEY] and art.table("logits").num_rows == 5
    assert store.put(KEY, make_stage_dir(tmp_path / "out2", seed=2)).metrics() == {"acc": 0.5}
    local = Path(store.local_dir(KEY))
    assert local == tmp_path / "cache" / KEY
    assert json.loads((local / "spec.json").read_text()) == {"kind": "teacher", "seed": 0}
    flip_byte(local / "model.safetensors", 50)  # a damaged cache copy is downloaded again
    assert Path(store.local_dir(KEY)) == local and store.open(KEY).state_dict()
    flip_byte(tmp_path / "bucket/prefix" / KEY / "spec.json", 3)
    assert store.lookup(KEY) is None
    assert len(list((tmp_path / "bucket/prefix/_quarantine").iterdir())) == 1
