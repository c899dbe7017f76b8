"""Finding and streaming the CSV tables of a MIMIC-style directory, MIMIC-III, MIMIC-IV and the
synthetic cohort alike: a table's file whatever its casing and compression (`find_table`), its
header (`read_header`), its wanted columns as string record batches (`stream_table`), block by
block so the largest table never sits in memory whole. A file that cannot be found, read,
decompressed or parsed is a MimicError naming it and how far the read got."""
from __future__ import annotations

import csv
import io
import posixpath
from typing import Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs

from ckd_ehr.data.rules import MimicError
from ckd_ehr.storage import resolve

DEFAULT_BLOCK_SIZE = 16 << 20  # bytes of CSV per streamed block
GZIP_MAGIC = b"\x1f\x8b"


def find_table(mimic_dir: str, name: str) -> tuple[str, str]:
    """(path, form) of table `name` in `mimic_dir`; form is 'csv' or 'csv.gz'.

    File names match case-insensitively; two files for one table (NAME.csv beside
    NAME.csv.gz, or two casings) are an error naming both: which one is current cannot be
    known (a stale plain copy beside the release's gzip is the usual case)."""
    fs, inner = resolve(mimic_dir)
    info = fs.get_file_info(inner)
    if info.type != pafs.FileType.Directory:
        raise MimicError(f"{mimic_dir}: not a directory (data.mimic_dir must hold the MIMIC tables)")
    wanted = {f"{name.lower()}.csv": "csv", f"{name.lower()}.csv.gz": "csv.gz"}
    hits = sorted((f.path, wanted[posixpath.basename(f.path).lower()])
                  for f in fs.get_file_info(pafs.FileSelector(inner))
                  if f.type == pafs.FileType.File and posixpath.basename(f.path).lower() in wanted)
    if len(hits) > 1:
        names = " and ".join(posixpath.basename(h) for h, _ in hits)
        raise MimicError(f"{mimic_dir}: {len(hits)} files for table {name}: {names}; which one is current "
                         f"cannot be known: remove or move the others")
    if hits:
        return _outer_path(mimic_dir, inner, hits[0][0]), hits[0][1]
    raise TableNotFound(f"{mimic_dir}: table {name} not found (looked for {name}.csv and {name}.csv.gz)")


class TableNotFound(MimicError):
    """No file for a table (`find_table`)."""


def _outer_path(mimic_dir: str, inner_dir: str, inner_file: str) -> str:
    """The file's path in the same spelling as `mimic_dir` (keeps the URI scheme)."""
    return mimic_dir.rstrip("/") + "/" + posixpath.relpath(inner_file, inner_dir)


def _open(path: str):
    """An input stream of the file's text, decompressed if its name ends in .gz; a name that
    does not match the bytes (gzip named .csv, plain text named .gz) is an error naming it."""
    fs, inner = resolve(path)
    gz_name = path.lower().endswith(".gz")
    try:
        with fs.open_input_stream(inner, compression=None) as f:
            magic = f.read(2)
    except OSError as exc:
        raise MimicError(f"{path}: cannot be read ({exc})") from exc
    if not magic:
        raise MimicError(f"{path}: empty file (0 bytes, no header line)")
    if gz_name and magic != GZIP_MAGIC:
        raise MimicError(f"{path}: named .gz but not gzip-compressed (starts with {magic!r}); "
                         f"rename it without .gz if it is plain CSV")
    if not gz_name and magic == GZIP_MAGIC:
        raise MimicError(f"{path}: holds gzip-compressed bytes but is named {posixpath.basename(path)}; "
                         f"rename it to {posixpath.basename(path)}.gz")
    return fs.open_input_stream(inner, compression="gzip" if gz_name else None)


def _read_error(path: str, exc: Exception, rows: int) -> MimicError:
    """A read or decompression error, with the file's name and how far the read got."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = f"after {rows} data row(s)" if rows else "in its first rows"
    if isinstance(exc, (UnicodeDecodeError,)) or "UTF8" in text or "UTF-8" in text:
        return MimicError(f"{path}: not UTF-8 text {where} (Latin-1 or another encoding?): {text}; "
                          f"convert the file to UTF-8")
    if path.lower().endswith(".gz") and isinstance(exc, (OSError, EOFError)):
        return MimicError(f"{path}: gzip data corrupt or truncated {where}: {text}; "
                          f"copy the file again from the release")
    return MimicError(f"{path}: not a readable CSV table {where}: {text}")


def read_header(path: str) -> list[str]:
    """Column names of a CSV file (quoted or not), as written."""
    try:
        with _open(path) as stream:
            head = b""
            while b"\n" not in head:
                chunk = stream.read(1 << 16)
                if not chunk:
                    break
                head += chunk
        line = head.split(b"\n", 1)[0].decode("utf-8-sig").rstrip("\r")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise _read_error(path, exc, 0) from exc
    if not line.strip():
        raise MimicError(f"{path}: empty file (no header line)")
    return next(csv.reader(io.StringIO(line)))


def resolve_columns(path: str, header: list[str], wanted: tuple[str, ...]) -> dict[str, str]:
    """Map each wanted lowercase name to its spelling in `header`; error names the missing ones."""
    by_lower = {h.strip().lower(): h for h in header}
    missing = [w for w in wanted if w not in by_lower]
    if missing:
        sep = ""
        for c in (";", "\t", "|"):
            if len(header) == 1 and c in header[0]:
                sep = f" (one column: is the file separated by {c!r}, not ','?)"
                break
        raise MimicError(f"{path}: missing column(s) {', '.join(missing)} "
                         f"(header has: {', '.join(h.strip() for h in header)}){sep}")
    return {w: by_lower[w] for w in wanted}


def stream_table(path: str, columns: tuple[str, ...], block_size: int = DEFAULT_BLOCK_SIZE,
                 ) -> Iterator[pa.RecordBatch]:
    """Yield record batches of `columns` (lowercase names, all strings; '' -> null).

    Quoted values may hold commas, quotes and line breaks; lines may end in CRLF."""
    spelled = resolve_columns(path, read_header(path), columns)
    convert = pacsv.ConvertOptions(
        include_columns=[spelled[c] for c in columns],
        column_types={spelled[c]: pa.string() for c in columns},
        # Only an empty field is missing here: a drug called 'NA' is still a drug (the
        # parsers treat null-like ids, codes and dates as missing: rules.nullify).
        null_values=[""], strings_can_be_null=True, quoted_strings_can_be_null=True,
    )
    rows = 0
    with _open(path) as stream:
        try:
            reader = pacsv.open_csv(stream, read_options=pacsv.ReadOptions(block_size=block_size),
                                    parse_options=pacsv.ParseOptions(newlines_in_values=True),
                                    convert_options=convert)
            for batch in reader:
                rows += batch.num_rows
                yield pa.RecordBatch.from_arrays(batch.columns, names=list(columns))
        except (pa.ArrowInvalid, OSError, EOFError, UnicodeDecodeError) as exc:
            raise _read_error(path, exc, rows) from exc
