"""EADF on Ray Data: the efficacy table from the training pairs, fused into every split's text.

`run_eadf(cfg)` (`ckd-ehr eadf --run-dir RUN`):
  1. counts: read RUN/data/samples/train.parquet (the COUNT_COLUMNS) with Ray Data; each
     batch emits its partial counts per (phenotype, drug, stratum) and per patient cluster
     (eadf_stats.partial_counts), in the task that read it; the driver sums them. It never
     sees the pairs or the prescriptions, only partial counts.
  2. ranking on that small result (eadf_stats.efficacy_from_counts) -> RUN/eadf/efficacy_table.parquet
  3. fusion: every split is re-rendered from its structured fields with the efficacy clauses
     of the phenotypes present at visit i, always from the table fitted on training patients
     -> RUN/eadf/samples/{split}.parquet (same rows, same order, text_plain kept).
  4. validity: precision and recall of the listed drugs (FDR-controlled) and precision@k of
     the efficacy and frequency rankings against the planted drugs when
     RUN/raw/ground_truth.json exists -> RUN/eadf/validity.json
"""
from __future__ import annotations

import contextlib
import logging
import posixpath
import time
import uuid
from typing import Iterator, Mapping, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data
from ray.data import DataContext

from ckd_ehr import storage
from ckd_ehr.config import PipelineConfig, TextConfig
from ckd_ehr.contracts import (AUGMENTED_SAMPLES, AUGMENTED_WITH_CONTROLS, CONTROL_TEXTS, SAMPLES, SPLITS, ContractError,
                               RunLayout, check_schema)
from ckd_ehr.eadf.stats import (COUNT_COLUMNS, PARTIAL_SCHEMA, Counts, efficacy_from_counts, efficacy_table_reference,
                         multi_hot_matrix, partial_counts, precision_at_k, split_counts, sum_partials,
                         top_drugs)
from ckd_ehr.eadf.validity import listing_validity
from ckd_ehr.phenotypes import phenotype_names
from ckd_ehr.text import CONTROL_KINDS, control_efficacy, diagnosis_title_column, efficacy_for, render_input
from ckd_ehr.ray_utils import init_ray

log = logging.getLogger(__name__)
PATH_COL = "path"  # the input file of each row, from read_parquet(include_paths=True)

__all__ = ["run_eadf", "efficacy_table_ray", "efficacy_table_reference", "fuse_batch", "fused_texts",
           "fuse_splits", "counts_ray"]


def _num_rows(path: str) -> int:
    fs, inner = storage.resolve(path)
    if fs.get_file_info(inner).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{path}: no such file (has `ckd-ehr prepare` run?)")
    return storage.parquet_num_rows(path)


def _check_columns(path: str, columns: list[str] | None = None) -> None:
    """Fail early, naming the file, if a SAMPLES file lacks a column or has the wrong type."""
    fs, inner = storage.resolve(path)
    with fs.open_input_file(inner) as f:
        schema = pq.ParquetFile(f).schema_arrow
    wanted = pa.schema([SAMPLES.field(c) for c in columns]) if columns else SAMPLES
    check_schema(schema.empty_table(), wanted, path)


def _read_blocks(configured: int | None = None) -> int:
    """Blocks a read is cut into: `eadf.read_blocks`, else one per CPU of the cluster now. Ray
    Data's default cuts a one-row-group file into dozens of blocks, which made counting slower
    on 2 cores (docs/benchmarks.md, "EADF on Ray Data")."""
    return configured or max(1, int(ray.cluster_resources().get("CPU", 1)))


def _read_ds(path: str, columns: list[str] | None = None, blocks: int | None = None):
    fs, inner = storage.resolve(path)
    ds = ray.data.read_parquet(inner, filesystem=fs, override_num_blocks=_read_blocks(blocks))
    return ds.select_columns(columns) if columns else ds


# --- counting on Ray Data -----------------------------------------------------------------

def counts_ray(path: str, batch_size: int = 4096, severity_bins=(3, 5, 7), code_strata: bool = True,
               blocks: int | None = None) -> Counts:
    """Summed counts of a SAMPLES file (eadf_stats.Counts).

    Batches are cut in file order (preserve_order), so each batch is a contiguous run of
    rows and, the file being ordered by patient, only its first and last patient can be
    split with a neighbour (eadf_stats carries those; sum_partials checks the ordering).
    Reading and counting run as ONE fused Ray Data task per read block (same resources, so
    Ray Data fuses them); the driver receives only the partial counts (at most drugs x 25 x
    strata rows per batch, never the pairs) and sums them: faster than a separate counting
    operator with a summing task, and than a hash-shuffle groupby (docs/benchmarks.md).
    """
    n = _num_rows(path)
    _check_columns(path, COUNT_COLUMNS)
    if n == 0:
        return split_counts(sum_partials(PARTIAL_SCHEMA.empty_table().to_pandas(), path))
    with _ordered_v1_reads():
        refs = (_read_ds(path, COUNT_COLUMNS, blocks)
                .map_batches(partial_counts, batch_format="pyarrow", batch_size=batch_size,
                             fn_kwargs={"where": path, "severity_bins": list(severity_bins),
                                        "code_strata": code_strata})
                .to_arrow_refs())
        partials = pa.concat_tables(ray.get(refs), promote_options="none") if refs else PARTIAL_SCHEMA.empty_table()
    return split_counts(sum_partials(partials.to_pandas(), path))


def efficacy_table_ray(path: str, cfg: PipelineConfig, ranking: str | None = None) -> pa.Table:
    """The EFFICACY table of a SAMPLES file, counted on Ray Data."""
    counts = counts_ray(path, cfg.eadf.batch_size, cfg.eadf.severity_bins, cfg.eadf.code_strata,
                        cfg.eadf.read_blocks)
    return efficacy_from_counts(counts, cfg.eadf, ranking)


# --- fusion -------------------------------------------------------------------------------

# Columns of SAMPLES the rendering of text_eadf reads (the Ray tasks read only these).
FUSE_COLUMNS = ["diagnosis_titles", "diagnosis_short_titles", "drugs", "procedure_titles", "phenotypes_current"]
_FUSE_SCHEMA = pa.schema([SAMPLES.field(c) for c in FUSE_COLUMNS])


def _visit_pieces(batch: pa.Table, top: Mapping[int, Sequence[str]], text: TextConfig, where: str):
    """What every rendering of SAMPLES rows reads: (diagnosis titles, drugs, procedures, each
    row's EADF clauses (phenotypes present at visit i, label order, with ranked drugs), the
    ranked drugs by phenotype name)."""
    names = phenotype_names()
    by_name = {names[p]: list(drugs) for p, drugs in top.items()}
    present = multi_hot_matrix(batch.column("phenotypes_current"), where, "phenotypes_current")
    dx = batch.column(diagnosis_title_column(text)).to_pylist()
    rx, px = batch.column("drugs").to_pylist(), batch.column("procedure_titles").to_pylist()
    clauses = [efficacy_for(present[i], by_name) for i in range(batch.num_rows)]
    return dx, rx, px, clauses, by_name


def fused_texts(batch: pa.Table, top: Mapping[int, Sequence[str]], text: TextConfig,
                where: str = "samples") -> pa.Array:
    """`text_eadf` of SAMPLES rows (only FUSE_COLUMNS are read): the visit re-rendered with
    efficacy clauses for the phenotypes present at visit i (label order) that have ranked drugs."""
    batch = check_schema(batch, _FUSE_SCHEMA, where)
    dx, rx, px, clauses, _ = _visit_pieces(batch, top, text, where)
    return pa.array([render_input(dx[i], rx[i], px[i], efficacy=clauses[i], cfg=text).text
                     for i in range(batch.num_rows)], type=pa.string())


def control_texts(batch: pa.Table, top: Mapping[int, Sequence[str]], text: TextConfig,
                  where: str = "samples") -> dict[str, pa.Array]:
    """The study's control texts of SAMPLES rows (FUSE_COLUMNS + sample_id read): the visit
    rendered with text.control_efficacy's clauses for the phenotypes EADF gives clauses to."""
    batch = check_schema(batch, pa.schema([*_FUSE_SCHEMA, SAMPLES.field("sample_id")]), where)
    dx, rx, px, clauses, by_name = _visit_pieces(batch, top, text, where)
    ids = batch.column("sample_id").to_pylist()
    return {column: pa.array([
        render_input(dx[i], rx[i], px[i], cfg=text,
                     efficacy=control_efficacy(kind, ids[i], clauses[i], by_name)).text
        for i in range(batch.num_rows)], type=pa.string()) for column, kind in CONTROL_KINDS.items()}


def _rendered(batch: pa.Table, top, text: TextConfig, where: str, controls: bool) -> dict[str, pa.Array]:
    out = {"text_eadf": fused_texts(batch, top, text, where)}
    if controls:
        out.update(control_texts(batch, top, text, where))
    return out


def fuse_batch(batch: pa.Table, top: Mapping[int, Sequence[str]], text: TextConfig,
               where: str = "samples", controls: bool = False) -> pa.Table:
    """SAMPLES rows -> AUGMENTED_SAMPLES rows (fused_texts appended as `text_eadf`; with
    `controls`, AUGMENTED_WITH_CONTROLS: the control texts too)."""
    batch = check_schema(batch, SAMPLES, where)
    schema = AUGMENTED_WITH_CONTROLS if controls else AUGMENTED_SAMPLES
    for column, values in _rendered(batch, top, text, where, controls).items():
        batch = batch.append_column(schema.field(column), values)
    return batch


def _texts_with_paths(batch: pa.Table, top: Mapping[int, Sequence[str]], text: TextConfig,
                      where: str = "samples", controls: bool = False) -> pa.Table:
    """The Ray task of fusion: {path, text_eadf[, control texts]} of a batch read with include_paths."""
    paths = batch.column(PATH_COL)
    if len(paths):
        where = paths[0].as_py()  # errors name the file the batch came from
    return pa.table({PATH_COL: paths, **_rendered(batch, top, text, where, controls)})


class _RowReader:
    """The rows of one parquet file in order, taken `k` at a time (streamed, not all in memory)."""

    def __init__(self, path: str, batch_size: int):
        fs, inner = storage.resolve(path)
        self._file = fs.open_input_file(inner)
        self._batches = pq.ParquetFile(self._file).iter_batches(batch_size=batch_size)
        self._buffer: list[pa.RecordBatch] = []
        self._buffered = 0

    def take(self, k: int) -> pa.Table:
        while self._buffered < k:
            b = next(self._batches, None)
            if b is None:
                break
            self._buffer.append(b)
            self._buffered += b.num_rows
        table = pa.Table.from_batches(self._buffer) if self._buffer else None
        if table is None or table.num_rows < k:
            raise ContractError(f"fusion: expected {k} more rows, the file has {0 if table is None else table.num_rows}")
        rest = table.slice(k)
        self._buffer, self._buffered = rest.to_batches(), rest.num_rows
        return table.slice(0, k)

    def close(self) -> None:
        self._file.close()


@contextlib.contextmanager
def _ordered_v1_reads() -> Iterator[None]:
    """Ray Data reads in file order (preserve_order) through the V1 parquet datasource.

    V1 because Ray 2.60's default V2 read (ListFiles -> ReadFiles) adds a listing task that
    waits seconds for a worker and does not fuse with the next map_batches: about twice the
    time on 2 cores (docs/benchmarks.md, "EADF on Ray Data")."""

    ctx = DataContext.get_current()
    old = ctx.execution_options.preserve_order, ctx.use_datasource_v2
    ctx.execution_options.preserve_order, ctx.use_datasource_v2 = True, False
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.use_datasource_v2 = old


@contextlib.contextmanager
def _parquet_writer(path: str, schema: pa.Schema) -> Iterator[pq.ParquetWriter]:
    """Stream record batches into one parquet file, atomically (temporary name, then rename),
    as storage.write_parquet does for whole tables."""
    fs, inner = storage.resolve(path)
    fs.create_dir(posixpath.dirname(inner), recursive=True)
    tmp = posixpath.join(posixpath.dirname(inner), f".{posixpath.basename(inner)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with pq.ParquetWriter(tmp, schema, filesystem=fs) as writer:
            yield writer
    except BaseException:
        with contextlib.suppress(Exception):
            fs.delete_file(tmp)
        raise
    if fs.get_file_info(inner).type == pafs.FileType.File:
        fs.delete_file(inner)
    fs.move(tmp, inner)


def fuse_splits(files: Mapping[str, str], top: Mapping[int, Sequence[str]], text: TextConfig,
                batch_size: int = 4096, controls: bool = False, blocks: int | None = None) -> dict[str, int]:
    """Fuse SAMPLES files {src: dst} in one Ray Data pass, streaming each result to its dst.

    One pass, not one per split: every Ray Data execution pays for starting its tasks.
    The Ray tasks read only FUSE_COLUMNS and return only `text_eadf` (with the input path);
    the driver streams the input rows in file order beside them and writes. Moving whole
    rows (both texts, titles) through the object store cost more than rendering them.
    Order is preserved, so each output has its input's rows in its input's order.
    `controls`: the study's control texts too (AUGMENTED_WITH_CONTROLS).
    """
    schema = AUGMENTED_WITH_CONTROLS if controls else AUGMENTED_SAMPLES
    rendered = ["text_eadf", *(CONTROL_TEXTS if controls else ())]
    expected = {src: _num_rows(src) for src in files}
    for src in files:
        _check_columns(src)
    written = dict.fromkeys(files, 0)
    with contextlib.ExitStack() as stack:
        writers = {src: stack.enter_context(_parquet_writer(dst, schema)) for src, dst in files.items()}
        for src, w in writers.items():  # an empty split still gets a file with the schema
            if expected[src] == 0:
                w.write_table(schema.empty_table())
        todo = [src for src in files if expected[src] > 0]
        if todo:
            fs, _ = storage.resolve(todo[0])
            by_inner = {storage.resolve(src)[1]: src for src in todo}
            readers = {src: _RowReader(src, batch_size) for src in todo}
            for r in readers.values():
                stack.callback(r.close)
            with _ordered_v1_reads():
                ds = (ray.data.read_parquet(list(by_inner), filesystem=fs, include_paths=True,
                                           override_num_blocks=_read_blocks(blocks))
                      .select_columns([*FUSE_COLUMNS, *(["sample_id"] if controls else []), PATH_COL])
                      .map_batches(_texts_with_paths, batch_format="pyarrow", batch_size=batch_size,
                                   fn_kwargs={"top": dict(top), "text": text, "where": ", ".join(todo),
                                              "controls": controls}))
                for b in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                    for inner, part in _runs_by_path(b):
                        src = by_inner[inner]
                        rows = check_schema(readers[src].take(part.num_rows), SAMPLES, src)
                        for column in rendered:
                            rows = rows.append_column(schema.field(column), part.column(column))
                        writers[src].write_table(check_schema(rows, schema, files[src]))
                        written[src] += part.num_rows
        for src in files:
            if written[src] != expected[src]:
                raise ContractError(f"{files[src]}: wrote {written[src]} rows, input {src} has {expected[src]}")
    return written


def _runs_by_path(batch: pa.Table) -> Iterator[tuple[str, pa.Table]]:
    """Contiguous runs of rows from the same input file (a batch may span two files)."""
    paths = batch.column(PATH_COL).to_pylist()
    start = 0
    for i in range(1, len(paths) + 1):
        if i == len(paths) or paths[i] != paths[start]:
            yield paths[start], batch.slice(start, i - start)
            start = i


# --- validity -----------------------------------------------------------------------------

def validity(counts: Counts, cfg: PipelineConfig, truth: dict) -> dict:
    """The listed drugs against the planted ones (precision, recall, powered recall, decoys;
    eadf_validity.listing_validity), and precision@k of the efficacy and frequency rankings."""
    planted = truth.get("planted") or {}
    ward = truth.get("ward_drugs") or []
    if not isinstance(planted, dict):
        raise ContractError(f"ground_truth.json: field 'planted' must map phenotype -> drugs, got {type(planted).__name__}")
    out = {"k": cfg.eadf.top_k, "min_support": cfg.eadf.min_support, "confidence": cfg.eadf.confidence,
           "fdr": cfg.eadf.fdr, "adjust": cfg.eadf.adjust, "clustering": cfg.eadf.clustering, "rankings": {}}
    for ranking in ("efficacy", "frequency", "risk_ratio"):
        table = efficacy_from_counts(counts, cfg.eadf, ranking)
        out["rankings"][ranking] = precision_at_k(top_drugs(table, cfg.eadf.top_k), planted,
                                                  cfg.eadf.top_k, ward)
        if ranking == "efficacy":
            out["listing"] = listing_validity(table, truth, cfg.eadf)
    return out


# --- the stage ----------------------------------------------------------------------------

def run_eadf(cfg: PipelineConfig) -> dict:
    """Efficacy table on the training split, fused text for every split, validity if known."""

    layout = RunLayout(cfg.run_dir)
    for split in SPLITS:  # fail before any work if prepare has not written every split
        _num_rows(layout.samples(split))
        _check_columns(layout.samples(split))
    init_ray(cfg.ray)
    t0 = time.perf_counter()
    train = layout.samples("train")
    log.info("eadf: counting visit pairs in %s", train)
    counts = counts_ray(train, cfg.eadf.batch_size, cfg.eadf.severity_bins, cfg.eadf.code_strata,
                        cfg.eadf.read_blocks)
    table = efficacy_from_counts(counts, cfg.eadf)
    storage.write_parquet(table, layout.efficacy_table)
    top = top_drugs(table, cfg.eadf.top_k)
    t_count = time.perf_counter() - t0
    log.info("eadf: %d phenotype x drug rows, %d phenotypes with ranked drugs (%s ranking) -> %s",
             table.num_rows, len(top), cfg.eadf.ranking, layout.efficacy_table)

    fused = fuse_splits({layout.samples(s): layout.augmented(s) for s in SPLITS}, top, cfg.text,
                        cfg.eadf.batch_size, controls=cfg.eadf.control_texts, blocks=cfg.eadf.read_blocks)
    rows = {s: fused[layout.samples(s)] for s in SPLITS}
    log.info("eadf: fused %s -> %s", ", ".join(f"{s} ({n} rows)" for s, n in rows.items()),
             storage.join(layout.root, "eadf", "samples"))

    summary = {
        "train_pairs": _num_rows(train),
        "efficacy_rows": table.num_rows,
        "ranked_rows": int(table["rank"].is_valid().to_numpy(zero_copy_only=False).sum()),
        "tested_rows": int(table["p_value"].is_valid().to_numpy(zero_copy_only=False).sum()),
        "phenotypes_with_drugs": len(top),
        "ranking": cfg.eadf.ranking,
        "rows": rows,
        "count_s": round(t_count, 3),
        "total_s": None,
    }
    truth_path = layout.ground_truth
    if storage.exists(truth_path):
        v = validity(counts, cfg, storage.read_json(truth_path))
        storage.write_json(layout.eadf_validity, v)
        summary["validity"] = {r: v["rankings"][r]["mean_precision_at_k"] for r in v["rankings"]}
        summary["validity"]["listed_precision"] = v["listing"]["precision"]
        summary["validity"]["listed_recall"] = v["listing"]["recall"]
        log.info("eadf: mean precision@%d efficacy %.3f, frequency %.3f -> %s", cfg.eadf.top_k,
                 v["rankings"]["efficacy"]["mean_precision_at_k"] or 0.0,
                 v["rankings"]["frequency"]["mean_precision_at_k"] or 0.0, layout.eadf_validity)
    summary["total_s"] = round(time.perf_counter() - t0, 3)
    return summary
