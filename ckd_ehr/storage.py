"""Reading and writing through pyarrow.fs, so a run directory can be a local path or a URI.

On a multi-node cluster workers do not share a disk: every stage reads and writes through
these functions. Writes go to a temporary name in the same directory and are then moved
into place, so a crash never leaves a half-written file under the final name.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


_RECORDINGS: list[set[str]] = []
"""Open recordings (`recording`): every path resolved while one is open is added to each."""


def is_uri(path: str) -> bool:
    return "://" in str(path)


def canonical(path: str | os.PathLike) -> str:
    """A path as recordings hold it: a URI as written, a local path made absolute."""
    return str(path) if is_uri(str(path)) else os.path.abspath(str(path))


@contextlib.contextmanager
def recording() -> Iterator[set[str]]:
    """The set of every path this process reads, writes or looks up through this module (and
    through `resolve`, which Ray Data readers are given) while the block runs, as `canonical`
    gives them: ckd_ehr.stages checks a stage's against what it declares."""
    touched: set[str] = set()
    _RECORDINGS.append(touched)
    try:
        yield touched
    finally:
        _RECORDINGS.remove(touched)


_SCRATCH: list[str] = []
"""Open scratch directories (`scratch_dir`): nothing in them is a run's file."""


def _note(path: str | os.PathLike) -> None:
    if not _RECORDINGS:
        return
    where = canonical(path)
    if any(where == d or where.startswith(d + os.sep) for d in _SCRATCH):
        return
    for touched in _RECORDINGS:
        touched.add(where)


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[str]:
    """A local temporary directory, removed afterwards. What is read and written in it is no
    file of a run (an artifact staged before its upload), so recordings leave it out."""
    tmp = tempfile.mkdtemp(prefix=prefix)
    _SCRATCH.append(canonical(tmp))
    try:
        yield tmp
    finally:
        _SCRATCH.remove(canonical(tmp))
        shutil.rmtree(tmp, ignore_errors=True)


def _unrecorded(path: str) -> tuple[pafs.FileSystem, str]:
    if is_uri(path):
        fs, inner = pafs.FileSystem.from_uri(path)
        return fs, inner
    return pafs.LocalFileSystem(), os.path.abspath(path)


def resolve(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI (s3://, gs://, file://)."""
    _note(path)
    return _unrecorded(str(path))


def join(base: str | os.PathLike, *parts: str) -> str:
    base = str(base)
    if is_uri(base):
        scheme, rest = base.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest, *parts)
    return os.path.join(base, *parts)


def exists(path: str | os.PathLike) -> bool:
    """Whether `path` exists. Not recorded (`recording`): looking for an optional file that is
    not there reads nothing, and reading one that is records it."""
    fs, inner = _unrecorded(str(path))
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def makedirs(path: str | os.PathLike) -> None:
    """Create `path` and its parents (not recorded: a directory holds nothing yet)."""
    fs, inner = _unrecorded(str(path))
    fs.create_dir(inner, recursive=True)


def _tmp_name(inner: str) -> str:
    head, tail = posixpath.split(inner) if "/" in inner else ("", inner)
    return posixpath.join(head, f".{tail}.tmp-{uuid.uuid4().hex[:8]}")


def _move_into_place(fs: pafs.FileSystem, tmp: str, final: str) -> None:
    if fs.get_file_info(final).type == pafs.FileType.File:
        fs.delete_file(final)
    fs.move(tmp, final)


@contextlib.contextmanager
def atomic_output_stream(path: str | os.PathLike):
    """A writable stream to `path` under a temporary name, moved into place on success and
    removed on failure (for files written in chunks: the one-shot writers are below)."""
    fs, inner = resolve(path)
    fs.create_dir(posixpath.dirname(inner), recursive=True)
    tmp = _tmp_name(inner)
    try:
        with fs.open_output_stream(tmp) as f:
            yield f
    except BaseException:
        try:
            fs.delete_file(tmp)
        except Exception:
            pass
        raise
    _move_into_place(fs, tmp, inner)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    fs, inner = resolve(path)
    fs.create_dir(posixpath.dirname(inner), recursive=True)
    tmp = _tmp_name(inner)
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    _move_into_place(fs, tmp, inner)


def read_bytes(path: str | os.PathLike) -> bytes:
    fs, inner = resolve(path)
    # compression=None: the file's own bytes (pyarrow would otherwise decompress a `.gz` by its name)
    with fs.open_input_stream(inner, compression=None) as f:
        return f.read()


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(read_text(path))


def write_parquet(table: pa.Table, path: str | os.PathLike, **kwargs) -> None:
    """Write one parquet file atomically (temporary name, then rename)."""
    fs, inner = resolve(path)
    fs.create_dir(posixpath.dirname(inner), recursive=True)
    tmp = _tmp_name(inner)
    try:
        pq.write_table(table, tmp, filesystem=fs, **kwargs)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.delete_file(tmp)
        raise
    _move_into_place(fs, tmp, inner)


def remove(path: str | os.PathLike) -> None:
    """Delete a file if it exists (local or URI)."""
    fs, inner = resolve(path)
    if fs.get_file_info(inner).type == pafs.FileType.File:
        fs.delete_file(inner)


def size(path: str | os.PathLike) -> int:
    """Bytes of one file, local or remote."""
    fs, inner = resolve(path)
    return int(fs.get_file_info(inner).size or 0)


def fingerprint(path: str | os.PathLike) -> str | None:
    """Size and mtime of a file, or of every file under a directory; None if absent. What a
    stage's inputs were, for the resume planner (a changed input reruns the stage) and for
    training-run names (a changed input starts a fresh run, never resumes a stale one)."""
    fs, inner = resolve(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        return None
    if info.type == pafs.FileType.File:
        return f"{info.size}:{info.mtime_ns}"
    files = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
    parts = sorted(f"{f.path[len(inner):]}:{f.size}:{f.mtime_ns}" for f in files if f.type == pafs.FileType.File)
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def list_files(directory: str | os.PathLike, suffix: str = "") -> list[str]:
    """Paths (as `join` builds them) of the files directly in `directory` whose names end with
    `suffix`, sorted; [] when the directory does not exist. Temporary names (`.name.tmp-*`,
    files being written) are never listed."""
    fs, inner = resolve(directory)
    if fs.get_file_info(inner).type != pafs.FileType.Directory:
        return []
    names = sorted(posixpath.basename(f.path) for f in fs.get_file_info(pafs.FileSelector(inner))
                   if f.type == pafs.FileType.File)
    return [join(directory, n) for n in names if n.endswith(suffix) and not n.startswith(".")]


def parquet_num_rows(path: str | os.PathLike) -> int:
    """Rows of a parquet file, from its footer (no data read)."""

    fs, inner = resolve(path)
    with fs.open_input_file(inner) as f:
        return pq.ParquetFile(f).metadata.num_rows


def read_parquet(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    fs, inner = resolve(path)
    if fs.get_file_info(inner).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{path}: no such file (has the stage that writes it run?)")
    return pq.read_table(inner, filesystem=fs, columns=columns)


def upload_dir(local_dir: str | os.PathLike, dest: str) -> None:
    """Copy a local directory to `dest` (local or URI), replacing what was there.

    On a local disk the copy goes to a temporary sibling that is then renamed, so readers
    never see a half-copied artifact. Object stores have no directory rename: there the old
    objects are deleted and each file is written whole (objects are atomic one by one).
    """
    fs, inner = resolve(dest)
    inner = inner.rstrip("/")
    fs.create_dir(posixpath.dirname(inner), recursive=True)
    exists_before = fs.get_file_info(inner).type == pafs.FileType.Directory
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = _tmp_name(inner)
        fs.create_dir(tmp, recursive=True)  # copy_files creates only subdirectories: a flat dir needs its root
        pafs.copy_files(str(local_dir), tmp, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        if exists_before:
            old = _tmp_name(inner)
            fs.move(inner, old)
            fs.move(tmp, inner)
            fs.delete_dir(old)
        else:
            fs.move(tmp, inner)
        return
    if exists_before:
        fs.delete_dir(inner)
    pafs.copy_files(str(local_dir), inner, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


@contextlib.contextmanager
def local_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A local directory holding the contents of `path` (itself when local, a copy for URIs)."""
    if not is_uri(str(path)):   # (not recorded: nothing is read here, and a local path may be a temporary one)
        yield Path(path)
        return
    fs, inner = resolve(path)
    tmp = tempfile.mkdtemp(prefix="ckd-ehr-")
    try:
        pafs.copy_files(inner, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield Path(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
