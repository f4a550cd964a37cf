"""Tests for ray_lt.storefs on a local folder and on a pyarrow SubTreeFileSystem over one (which
takes the object-store branches: no atomic rename, no O_EXCL), with real files throughout."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from ray_lt.storefs import TEMP_FILE_RE, StoreFS, temp_files_of


@pytest.fixture(params=["local", "subtree"])
def store(request, tmp_path) -> tuple[StoreFS, Path]:
    """A StoreFS and the local folder behind its root."""
    if request.param == "local":
        return StoreFS(tmp_path / "root"), tmp_path / "root"
    fs = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
    return StoreFS("prefix", filesystem=fs), tmp_path / "bucket" / "prefix"


def write(root: Path, rel: str, data: bytes) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_root_paths_and_uris(store):
    fs, root = store
    assert root.is_dir()  # created on open
    assert fs.path("a", "b.json") == f"{fs.root}/a/b.json"
    if fs.local_path(fs.root) is not None:  # a local folder: usable in place, URIs are paths
        assert fs.uri == fs.root == str(root) and fs.child_uri("_train") == str(root / "_train")
    else:
        assert (fs.uri, fs.child_uri("_train")) == ("prefix", "prefix/_train")


def test_file_uri_opens_a_local_folder(tmp_path):
    fs = StoreFS(f"file://{tmp_path}/q")
    assert fs.uri == f"{tmp_path}/q" and fs.child_uri("_train") == f"{tmp_path}/q/_train"
    assert fs.local_path(fs.path("k")) == f"{tmp_path}/q/k"


def test_read_of_absent_is_none_and_atomic_write_leaves_no_temp_file(store):
    fs, root = store
    path = fs.path("_records", "a.json")
    assert fs.read_bytes(path) is None and not fs.exists(path) and fs.mtime(path) is None
    fs.makedirs(fs.path("_records"))
    fs.write_bytes(path, b'{"x": 1}')
    fs.write_bytes(path, b'{"x": 2}')
    assert fs.read_bytes(path) == b'{"x": 2}' and fs.exists(path)
    assert fs.mtime(path) == pytest.approx((root / "_records" / "a.json").stat().st_mtime)
    assert [p.name for p in (root / "_records").iterdir()] == ["a.json"]


def test_local_write_goes_through_a_matching_temp_file(tmp_path, monkeypatch):
    fs = StoreFS(tmp_path)
    seen: list[str] = []
    real = os.replace

    def spy(src: str, dst: str) -> None:
        seen.append(Path(src).name)
        real(src, dst)

    monkeypatch.setattr("ray_lt.storefs.os.replace", spy)
    fs.write_bytes(fs.path("x.lock"), b"1")
    (name,) = seen
    assert TEMP_FILE_RE.fullmatch(name) and temp_files_of("x.lock").fullmatch(name)
    assert not temp_files_of("y.lock").fullmatch(name)


def test_exclusive_create_is_exclusive_across_two_calls(store):
    fs, root = store
    fs.makedirs(fs.path("_locks"))
    path = fs.path("_locks", "k.lock")
    assert fs.create_exclusive(path, b"first")
    assert not fs.create_exclusive(path, b"second")
    assert (root / "_locks" / "k.lock").read_bytes() == b"first"
    token = {"token": "mine"}
    other = fs.path("_locks", "j.lock")
    mine = lambda got: json.loads(got)["token"] == "mine"  # noqa: E731
    assert fs.create_exclusive(other, json.dumps(token).encode(), mine)
    assert not fs.create_exclusive(other, json.dumps(token).encode(), mine)


def test_exclusive_create_on_a_local_disk_has_one_winner_among_threads(tmp_path):
    fs = StoreFS(tmp_path)
    path = fs.path("k.lock")
    barrier = threading.Barrier(8)
    won: list[bool] = []

    def racer(i: int) -> None:
        barrier.wait()
        won.append(fs.create_exclusive(path, str(i).encode()))

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(won) == [False] * 7 + [True]


def test_entries_list_files_and_sha256(store):
    fs, root = store
    assert fs.entries(fs.path("none")) == [] and fs.list_files(fs.path("none")) == {}
    write(root, "art/model.bin", b"abc")
    write(root, "art/tables/t.parquet", b"PAR1")
    by_name = {e.name: e for e in fs.entries(fs.path("art"))}
    assert set(by_name) == {"model.bin", "tables"}
    assert by_name["model.bin"].is_file and not by_name["model.bin"].is_dir
    assert by_name["tables"].is_dir and by_name["model.bin"].size == 3
    assert by_name["model.bin"].path == fs.path("art", "model.bin")
    stamp = (root / "art" / "model.bin").stat().st_mtime
    assert by_name["model.bin"].mtime == pytest.approx(stamp)
    deep = {e.name for e in fs.entries(fs.path("art"), recursive=True)}
    assert deep == {"model.bin", "tables", "t.parquet"}
    assert fs.list_files(fs.path("art")) == {"model.bin": 3, "tables/t.parquet": 4}
    assert fs.sha256(fs.path("art", "model.bin")) == hashlib.sha256(b"abc").hexdigest()


def test_upload_hashes_while_copying(store, tmp_path):
    fs, root = store
    src = write(tmp_path, "src/w.bin", b"weights" * 1000)
    sha, size = fs.upload(str(src), fs.path("_tmp", "k-1", "deep", "w.bin"))
    assert (sha, size) == (hashlib.sha256(b"weights" * 1000).hexdigest(), 7000)
    assert (root / "_tmp" / "k-1" / "deep" / "w.bin").read_bytes() == b"weights" * 1000


def test_rename_move_tree_and_copy_if_absent(store):
    fs, root = store
    write(root, "_locks/k.lock", b"held")
    fs.rename(fs.path("_locks", "k.lock"), fs.path("_locks", "k.stale-1"))
    assert not (root / "_locks/k.lock").exists()
    with pytest.raises(OSError):
        fs.rename(fs.path("_locks", "k.lock"), fs.path("_locks", "k.stale-2"))
    fs.copy_if_absent(fs.path("_locks", "k.stale-1"), fs.path("_locks", "k.lock"))
    assert (root / "_locks/k.lock").read_bytes() == b"held"
    write(root, "_locks/k.stale-3", b"other")
    fs.copy_if_absent(fs.path("_locks", "k.stale-3"), fs.path("_locks", "k.lock"))
    assert (root / "_locks/k.lock").read_bytes() == b"held"  # never overwrites
    fs.copy_if_absent(fs.path("_locks", "gone"), fs.path("_locks", "new"))  # src vanished
    assert not (root / "_locks/new").exists()

    write(root, "_tmp/a/manifest.json", b"{}")
    write(root, "_tmp/a/tables/t.parquet", b"PAR1")
    assert fs.move_tree(fs.path("_tmp", "a"), fs.path("_quarantine", "a-1"), last="manifest.json")
    assert not (root / "_tmp/a").exists()
    assert (root / "_quarantine/a-1/tables/t.parquet").read_bytes() == b"PAR1"
    assert not fs.move_tree(fs.path("_tmp", "a"), fs.path("_quarantine", "a-2"))  # vanished


def test_move_tree_if_absent_never_replaces(store):
    fs, root = store
    write(root, "_tmp/k-1/f", b"one")
    write(root, "_tmp/k-2/f", b"two")
    assert fs.move_tree_if_absent(fs.path("_tmp", "k-1"), fs.path("k"), last="f")
    assert not fs.move_tree_if_absent(fs.path("_tmp", "k-2"), fs.path("k"))
    assert (root / "k/f").read_bytes() == b"one" and (root / "_tmp/k-2/f").exists()


def test_remove_file_and_tree(store):
    fs, root = store
    write(root, "_records/a.json", b"{}")
    fs.remove_file(fs.path("_records", "a.json"))
    assert not (root / "_records/a.json").exists()
    with pytest.raises(FileNotFoundError):
        fs.remove_file(fs.path("_records", "a.json"))
    write(root, "_tmp/k-1/tables/t.parquet", b"PAR1")
    fs.remove_tree(fs.path("_tmp", "k-1"))
    assert not (root / "_tmp/k-1").exists()
    fs.remove_tree(fs.path("_tmp", "k-1"))  # best effort: a missing folder is fine


def test_makedirs_prepares_local_folders_only(store):
    fs, root = store
    fs.makedirs(fs.path("_train"))
    assert (root / "_train").is_dir() == (fs.local_path(fs.root) is not None)
    fs.makedirs(fs.path("_records", "deep"))  # a local write needs it; object stores do not
    fs.write_bytes(fs.path("_records", "deep", "r.json"), b"{}")
    assert (root / "_records/deep/r.json").read_bytes() == b"{}"
    with fs.open_write(fs.path("_tmp", "k-1", "w.bin")) as out:  # makes its own parents
        out.write(b"w")
    assert (root / "_tmp/k-1/w.bin").read_bytes() == b"w"
