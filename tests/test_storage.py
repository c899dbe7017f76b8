"""storage: atomic writes, URIs through pyarrow.fs (local and S3 on a moto server)."""
import os

import pyarrow as pa
import pytest

from ckd_ehr import storage


def _roundtrip(base: str):
    t = pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]})
    path = storage.join(base, "d", "t.parquet")
    storage.write_parquet(t, path)
    assert storage.read_parquet(path).equals(t)
    storage.write_parquet(t.slice(0, 1), path)          # a rerun replaces, never appends
    assert storage.read_parquet(path).num_rows == 1
    storage.write_json(storage.join(base, "m.json"), {"k": [1, 2]})
    assert storage.read_json(storage.join(base, "m.json")) == {"k": [1, 2]}
    assert storage.exists(path) and not storage.exists(storage.join(base, "nope"))


def test_local_roundtrip_leaves_no_temporary_files(tmp_path):
    _roundtrip(str(tmp_path))
    leftovers = [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


def test_failed_write_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "t.parquet")
    storage.write_parquet(pa.table({"a": [1]}), path)

    with pytest.raises(Exception):  # noqa: B017 (whatever pyarrow raises: the point is the old file survives)
        storage.write_parquet("not a table", path)  # type: ignore[arg-type]
    assert storage.read_parquet(path).column("a").to_pylist() == [1]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_missing_file_error_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.parquet"):
        storage.read_parquet(str(tmp_path / "nothing.parquet"))


def test_upload_dir_replaces_local(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f.txt").write_text("1")
    dest = str(tmp_path / "art")
    storage.upload_dir(src, dest)
    (src / "sub" / "f.txt").write_text("2")
    storage.upload_dir(src, dest)
    assert (tmp_path / "art" / "sub" / "f.txt").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "src"]


def test_s3_roundtrip_and_artifact_dir(s3_bucket, tmp_path):
    base = f"{s3_bucket}/storage-test"
    _roundtrip(base)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f.txt").write_text("hello")
    storage.upload_dir(src, f"{base}/artifact")
    storage.upload_dir(src, f"{base}/artifact")
    with storage.local_dir(f"{base}/artifact") as local:
        assert (local / "sub" / "f.txt").read_text() == "hello"
    assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
