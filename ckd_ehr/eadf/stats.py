"""EADF statistics, free of Ray: counting visit pairs, per-patient clusters, strata, the table.

A visit pair (visit i, visit i+1) "resolves" phenotype p when p is present at visit i
(`phenotypes_current`) and absent at visit i+1 (`labels`). For each phenotype p and drug m,
among the pairs with p present we compare the resolution rate of pairs given m at visit i
with that of pairs not given m. The effect is the difference of the two rates (crude, or
Mantel-Haenszel over severity strata); its interval's lower bound ranks drugs, and a one-sided
score test with Benjamini-Hochberg decides which are listed (eadf_inference), so a drug that
every patient gets (saline flush), one with few pairs, or one of thousands of chance
comparisons does not make the list.

What is counted, per phenotype p and drug m (and per phenotype over all its pairs, under the
drug name TOTAL_KEY, a pseudo-drug "given" to every pair):
- per severity stratum k (of the pair and the phenotype: phenotypes present at visit i,
  binned, times one or two-plus codes of p recorded at visit i; `severity_strata`): pairs n
  and resolved y (COUNT rows);
- per-patient sums over patients c, for the design effect of each arm: sum n_c^2, n_c y_c,
  y_c^2, and the cross sums with the patient's totals of p (T_c): T_n n_c, T_y y_c, T_n y_c,
  T_y n_c (CLUSTER rows), from which eadf_inference.design_effect gets both arms.

Counting is additive, so the Ray path counts per batch (`partial_counts`) and sums
(`sum_partials`). Per-patient squares are additive only over whole patients: a batch sums
the squares of the patients wholly inside it and hands its first and last patient on as
CARRY rows (their plain sums), completed when all partials are summed; a RANGE row per batch
(first and last subject_id, sorted or not) lets the sum check that no other patient was split,
i.e. that the file is ordered by subject_id and batches are contiguous. The reference
(`reference_counts`) counts the whole table with pandas in a different way; both feed the
same `efficacy_from_counts`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ckd_ehr.config import EADFConfig
from ckd_ehr.contracts import EFFICACY, ContractError
from ckd_ehr.eadf.inference import (benjamini_hochberg, cmh_score_p, design_effect, mantel_haenszel_rd, newcombe,
                             wilson, z_value)
from ckd_ehr.phenotypes import NUM_PHENOTYPES, code_to_phenotype_table, phenotype_names

__all__ = ["COUNT_COLUMNS", "PARTIAL_SCHEMA", "Counts", "partial_counts", "sum_partials", "split_counts",
           "reference_counts", "efficacy_from_counts", "efficacy_table_reference", "top_drugs",
           "precision_at_k", "multi_hot_matrix", "newcombe", "wilson", "z_value", "severity_strata",
           "phenotype_code_counts", "n_strata"]

# Columns of SAMPLES the counting reads (diagnosis_codes for the code strata).
COUNT_COLUMNS = ["subject_id", "drugs", "phenotypes_current", "labels", "diagnosis_codes"]
# The pseudo-drug given to every pair: its rows carry the per-phenotype totals. Real drug
# names are never empty: null and blank names are not counted as drugs.
TOTAL_KEY = ""
KIND_COUNT, KIND_CLUSTER, KIND_CARRY, KIND_RANGE = 0, 1, 2, 3
SUMS = ["n", "y", "nn", "ny", "yy", "tnn", "tyy", "tny", "tyn"]
KEYS = ["kind", "phenotype_index", "drug", "stratum", "subject_id"]
PARTIAL_SCHEMA = pa.schema([
    ("kind", pa.int8()),              # KIND_COUNT / KIND_CLUSTER / KIND_CARRY / KIND_RANGE
    ("phenotype_index", pa.int32()),  # -1 on RANGE rows
    ("drug", pa.string()),
    ("stratum", pa.int32()),          # COUNT rows: severity stratum; -1 otherwise
    ("subject_id", pa.int64()),       # CARRY: the patient; RANGE: first patient of the batch; else -1
    ("n", pa.int64()),                # COUNT, CARRY: pairs; RANGE: last patient of the batch
    ("y", pa.int64()),                # COUNT, CARRY: resolved; RANGE: 1 if the batch is sorted by patient
    ("nn", pa.int64()), ("ny", pa.int64()), ("yy", pa.int64()),      # CLUSTER: sum n_c^2, n_c y_c, y_c^2
    ("tnn", pa.int64()), ("tyy", pa.int64()), ("tny", pa.int64()), ("tyn", pa.int64()),  # ... T_n n_c, T_y y_c, T_n y_c, T_y n_c
])
RANKINGS = ("efficacy", "frequency", "risk_ratio")


@dataclass
class Counts:
    """Summed counts of a SAMPLES table.

    strata:   phenotype_index, drug, stratum, n, y (drug TOTAL_KEY: all pairs with the phenotype)
    clusters: phenotype_index, drug, nn, ny, yy, tnn, tyy, tny, tyn (per-patient sums)
    """

    strata: pd.DataFrame
    clusters: pd.DataFrame


# --- input checks -------------------------------------------------------------------------

def multi_hot_matrix(col: pa.ChunkedArray | pa.Array, where: str, field: str) -> np.ndarray:
    """A 25-wide multi-hot column as an (n, 25) bool matrix; bad values raise ContractError."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks else pa.array([], type=col.type)
    if isinstance(col.type, pa.ExtensionType):  # Ray may hand tensors as an extension type
        col = col.storage
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise ContractError(f"{where}: field '{field}' is null in row {row}")
    if len(col) == 0:
        return np.zeros((0, NUM_PHENOTYPES), dtype=bool)
    values = col.flatten()
    if values.null_count or len(values) != len(col) * NUM_PHENOTYPES:
        raise ContractError(f"{where}: field '{field}' must hold {NUM_PHENOTYPES} non-null 0/1 values per row")
    mat = values.to_numpy(zero_copy_only=False).reshape(len(col), NUM_PHENOTYPES)
    bad = (mat != 0) & (mat != 1)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ContractError(f"{where}: field '{field}' has value {mat[r, c]} in row {r}, column {c}; expected 0 or 1")
    return mat.astype(bool)


def _drug_items(drugs: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(row index, drug name) of every non-blank drug of every row."""
    if isinstance(drugs, pa.ChunkedArray):
        drugs = drugs.combine_chunks() if drugs.num_chunks else pa.array([], type=drugs.type)
    if len(drugs) == 0:
        return np.zeros(0, dtype=np.int64), pa.array([], type=pa.string())
    flat = pc.list_flatten(drugs)
    parents = pc.list_parent_indices(drugs).to_numpy(zero_copy_only=False)
    keep = pc.and_(pc.is_valid(flat), pc.not_equal(pc.utf8_trim_whitespace(flat), ""))
    keep = keep.fill_null(False)
    return parents[keep.to_numpy(zero_copy_only=False)], flat.filter(keep).cast(pa.string())


# --- counting -----------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _code_phenotypes() -> tuple[pa.Array, np.ndarray, np.ndarray, np.ndarray]:
    """The ICD-9-CM -> phenotype map as arrays: codes, and per code its phenotypes (CSR:
    lengths, starts into the flat phenotype indices)."""
    table = code_to_phenotype_table()
    codes = sorted(table)
    lens = np.array([len(table[c]) for c in codes], dtype=np.int64)
    flat = np.array([p for c in codes for p in table[c]], dtype=np.int64)
    return pa.array(codes, type=pa.string()), lens, np.r_[0, np.cumsum(lens)[:-1]].astype(np.int64), flat


def phenotype_code_counts(codes: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(rows, 25): distinct diagnosis codes of each phenotype recorded in each row, codes
    matched exactly against the ICD-9-CM map (as SAMPLES stores them: no dots). Codes of no
    phenotype, and dotted ICD-10-CM codes (MIMIC-IV), count for none."""
    if isinstance(codes, pa.ChunkedArray):
        codes = codes.combine_chunks() if codes.num_chunks else pa.array([], type=codes.type)
    n = len(codes)
    if n == 0:
        return np.zeros((0, NUM_PHENOTYPES), dtype=np.int64)
    vocab, lens, starts, flat = _code_phenotypes()
    values = pc.list_flatten(codes)
    parents = pc.list_parent_indices(codes).to_numpy(zero_copy_only=False).astype(np.int64)
    idx = pc.index_in(values, value_set=vocab).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    hit = idx >= 0
    key = _unique_sorted(parents[hit] * len(vocab) + idx[hit])  # a code twice in a visit counts once
    row, k = key // len(vocab), key % len(vocab)
    rep = lens[k]
    offset = np.arange(int(rep.sum())) - np.repeat(np.cumsum(rep) - rep, rep)
    pheno = flat[np.repeat(starts[k], rep) + offset]
    return np.bincount(np.repeat(row, rep) * NUM_PHENOTYPES + pheno,
                       minlength=n * NUM_PHENOTYPES).reshape(n, NUM_PHENOTYPES)


def n_strata(bins: Sequence[int], code_strata: bool) -> int:
    return (len(bins) + 1) * (2 if code_strata else 1)


def severity_strata(present: np.ndarray, bins: Sequence[int], code_counts: np.ndarray | None = None) -> np.ndarray:
    """Severity stratum of each pair and phenotype, (rows, 25): the number of phenotypes
    present at visit i, cut at `bins` (lower edges of the strata above the first): [3, 5, 7]
    -> 0: 1-2, 1: 3-4, 2: 5-6, 3: 7+; with `code_counts` (phenotype_code_counts) each of
    these is split in two, one code of the phenotype recorded at visit i (2 k) or two and
    more (2 k + 1): what visit i shows of the severity of that phenotype itself."""
    base = np.searchsorted(np.asarray(bins, dtype=np.int64), present.sum(axis=1), side="right").astype(np.int64)
    out = np.broadcast_to(base[:, None], present.shape)
    return out.copy() if code_counts is None else 2 * out + (code_counts >= 2)


def _subject_ids(batch: pa.Table, where: str) -> np.ndarray:
    col = batch.column("subject_id")
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise ContractError(f"{where}: field 'subject_id' is null in row {row}")
    return col.to_numpy().astype(np.int64) if len(col) else np.zeros(0, dtype=np.int64)


def _unique_sorted(key: np.ndarray) -> np.ndarray:
    """np.unique of an int64 array by sorting (numpy's hash-based unique is several times
    slower on the ~10^5-10^6 keys of a batch)."""
    s = np.sort(key)
    return s[np.r_[True, s[1:] != s[:-1]]] if len(s) else s


def _given_items(batch: pa.Table) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """(row, drug code) of every distinct drug of every row, code 0 = TOTAL_KEY given to every
    row; and the drug names by code."""
    n = batch.num_rows
    rows, names = _drug_items(batch.column("drugs"))
    if len(names):
        enc = pc.dictionary_encode(names)
        codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64) + 1
        vocab = pa.concat_arrays([pa.array([TOTAL_KEY], type=pa.string()), enc.dictionary.cast(pa.string())])
    else:
        codes, vocab = np.zeros(0, dtype=np.int64), pa.array([TOTAL_KEY], type=pa.string())
    key = _unique_sorted(np.r_[np.arange(n, dtype=np.int64), codes * n + rows])  # a drug twice in a visit counts once
    return key % n, key // n, vocab


def _table(kind: int, phenotype: np.ndarray, drug: pa.Array, n_rows: int, **cols) -> pa.Table:
    data = {"kind": pa.array(np.full(n_rows, kind, dtype=np.int8)),
            "phenotype_index": pa.array(np.asarray(phenotype, dtype=np.int32)), "drug": drug}
    for name in ("stratum", "subject_id"):
        data[name] = pa.array(np.asarray(cols.get(name, np.full(n_rows, -1)), dtype=PARTIAL_SCHEMA.field(name).type.to_pandas_dtype()))
    for name in SUMS:
        data[name] = pa.array(np.asarray(cols.get(name, np.zeros(n_rows)), dtype=np.int64))
    return pa.table(data, schema=PARTIAL_SCHEMA)


def partial_counts(batch: pa.Table, where: str = "samples", severity_bins: Sequence[int] = (3, 5, 7),
                   code_strata: bool = True) -> pa.Table:
    """Counts of one batch of SAMPLES rows, in PARTIAL_SCHEMA (summable across batches with
    `sum_partials`; see the module docstring for the row kinds)."""
    n = batch.num_rows
    if n == 0:
        return PARTIAL_SCHEMA.empty_table()
    present = multi_hot_matrix(batch.column("phenotypes_current"), where, "phenotypes_current")
    nxt = multi_hot_matrix(batch.column("labels"), where, "labels")
    resolved = present & ~nxt
    subject = _subject_ids(batch, where)
    item_row, item_drug, vocab = _given_items(batch)
    # One triple per (pair, drug given, phenotype present).
    n_present = present.sum(axis=1)
    _, pres_p = np.nonzero(present)
    first = np.cumsum(n_present) - n_present
    rep = n_present[item_row]
    t_item = np.repeat(np.arange(len(item_row)), rep)
    offset = np.arange(len(t_item)) - np.repeat(np.cumsum(rep) - rep, rep)
    t_row = item_row[t_item]
    t_p = pres_p[first[t_row] + offset].astype(np.int64)
    t_dp = item_drug[t_item] * NUM_PHENOTYPES + t_p  # (drug, phenotype) code
    t_y = resolved[t_row, t_p].astype(np.float64)
    n_dp = len(vocab) * NUM_PHENOTYPES

    # COUNT rows: pairs and resolved per (drug, phenotype, stratum).
    s_count = n_strata(severity_bins, code_strata)
    strata = severity_strata(present, severity_bins,
                             phenotype_code_counts(batch.column("diagnosis_codes")) if code_strata else None)
    key = t_dp * s_count + strata[t_row, t_p]
    cnt_n = np.bincount(key, minlength=n_dp * s_count)
    cnt_y = np.bincount(key, weights=t_y, minlength=n_dp * s_count)
    nz = np.flatnonzero(cnt_n)
    dp = nz // s_count
    parts = [_table(KIND_COUNT, dp % NUM_PHENOTYPES, vocab.take(pa.array(dp // NUM_PHENOTYPES)), len(nz),
                    stratum=nz % s_count, n=cnt_n[nz], y=cnt_y[nz])]

    # Per patient and (drug, phenotype): n_c, y_c; and the patient's totals T of the phenotype.
    patients, pat = np.unique(subject, return_inverse=True)
    # Grouped by sorting once (searchsorted of ~10^6 unsorted keys, or np.unique's inverse,
    # is several times slower): run starts give n_c, sums over runs y_c.
    pkey = pat[t_row] * n_dp + t_dp
    order = np.argsort(pkey, kind="stable")
    pkey = pkey[order]
    start = np.flatnonzero(np.r_[True, pkey[1:] != pkey[:-1]])
    n_c = np.diff(np.r_[start, len(pkey)]).astype(np.float64)
    y_c = np.add.reduceat(t_y[order], start)
    pkey = pkey[start]
    c, dp = pkey // n_dp, pkey % n_dp
    is_total = dp < NUM_PHENOTYPES  # drug code 0
    t_n = np.zeros((len(patients), NUM_PHENOTYPES))
    t_yy = np.zeros((len(patients), NUM_PHENOTYPES))
    t_n[c[is_total], dp[is_total]] = n_c[is_total]
    t_yy[c[is_total], dp[is_total]] = y_c[is_total]
    tn, ty = t_n[c, dp % NUM_PHENOTYPES], t_yy[c, dp % NUM_PHENOTYPES]
    # The first and last patient of the batch may continue in the next / previous batch.
    edge = (c == pat[0]) | (c == pat[-1])
    inner = ~edge
    sums = {name: np.bincount(dp[inner], weights=w[inner], minlength=n_dp).round().astype(np.int64)
            for name, w in (("n", n_c), ("nn", n_c * n_c), ("ny", n_c * y_c), ("yy", y_c * y_c), ("tnn", tn * n_c),
                            ("tyy", ty * y_c), ("tny", tn * y_c), ("tyn", ty * n_c))}
    nz = np.flatnonzero(sums.pop("n"))
    parts.append(_table(KIND_CLUSTER, nz % NUM_PHENOTYPES, vocab.take(pa.array(nz // NUM_PHENOTYPES)), len(nz),
                        **{k: v[nz] for k, v in sums.items()}))
    e = np.flatnonzero(edge)
    parts.append(_table(KIND_CARRY, dp[e] % NUM_PHENOTYPES, vocab.take(pa.array(dp[e] // NUM_PHENOTYPES)), len(e),
                        subject_id=patients[c[e]], n=n_c[e], y=y_c[e]))
    parts.append(_table(KIND_RANGE, [-1], pa.array([TOTAL_KEY]), 1, subject_id=[subject[0]], n=[subject[-1]],
                        y=[int((np.diff(subject) >= 0).all())]))
    return pa.concat_tables(parts)


def _check_ranges(ranges: pd.DataFrame, where: str) -> pd.DataFrame:
    """Batches must each be sorted by patient and, ordered, touch only at their ends: then
    no patient other than a batch's first or last one was split between batches."""
    if ranges.empty:
        return ranges
    first, last, ok = (ranges[c].to_numpy() for c in ("subject_id", "n", "y"))
    order = np.lexsort((last, first))
    first, last = first[order], last[order]
    if not ok.all() or (last[:-1] > first[1:]).any():
        raise ContractError(f"{where}: visit pairs are not grouped by patient (rows must be ordered by "
                            "subject_id, as prepare writes them): per-patient sums would be wrong")
    return pd.DataFrame({"kind": [KIND_RANGE], "phenotype_index": [-1], "drug": [TOTAL_KEY], "stratum": [-1],
                         "subject_id": [first.min()], "n": [last.max()], "y": [1],
                         **{k: [0] for k in SUMS[2:]}})


def sum_partials(partials: pd.DataFrame, where: str = "samples") -> pd.DataFrame:
    """Sum partial counts (PARTIAL_SCHEMA rows of all batches of one file): COUNT and CLUSTER
    rows by key; CARRY rows (a batch's edge patients) are summed per patient first, then
    squared into CLUSTER rows. Applying it again to its output gives the same output."""
    kind = partials["kind"].to_numpy()
    ranges = _check_ranges(partials[kind == KIND_RANGE], where)
    carry = partials[kind == KIND_CARRY]
    parts = [partials[(kind == KIND_COUNT) | (kind == KIND_CLUSTER)]]
    if len(carry):
        per = carry.groupby(["subject_id", "phenotype_index", "drug"], as_index=False, sort=False)[["n", "y"]].sum()
        tot = (per[per["drug"] == TOTAL_KEY][["subject_id", "phenotype_index", "n", "y"]]
               .rename(columns={"n": "tn", "y": "ty"}))
        per = per.merge(tot, on=["subject_id", "phenotype_index"], how="left").fillna({"tn": 0, "ty": 0})
        n_c, y_c, tn, ty = (per[c].to_numpy(dtype=np.int64) for c in ("n", "y", "tn", "ty"))
        parts.append(pd.DataFrame({
            "kind": KIND_CLUSTER, "phenotype_index": per["phenotype_index"].to_numpy(), "drug": per["drug"].to_numpy(),
            "stratum": -1, "subject_id": -1, "n": 0, "y": 0, "nn": n_c * n_c, "ny": n_c * y_c, "yy": y_c * y_c,
            "tnn": tn * n_c, "tyy": ty * y_c, "tny": tn * y_c, "tyn": ty * n_c}))
    out = pd.concat(parts, ignore_index=True).groupby(KEYS, as_index=False, sort=True)[SUMS].sum()
    return pd.concat([out, ranges], ignore_index=True) if len(ranges) else out


def split_counts(summed: pd.DataFrame) -> Counts:
    """Summed partial counts -> Counts."""
    kind = summed["kind"].to_numpy()
    strata = summed[kind == KIND_COUNT][["phenotype_index", "drug", "stratum", "n", "y"]]
    clusters = summed[kind == KIND_CLUSTER][["phenotype_index", "drug", *SUMS[2:]]]
    return Counts(strata.reset_index(drop=True), clusters.reset_index(drop=True))


def reference_counts(samples: pa.Table, where: str = "samples", severity_bins: Sequence[int] = (3, 5, 7),
                     code_strata: bool = True) -> Counts:
    """Counts of a whole SAMPLES table with plain pandas, one phenotype at a time.

    Deliberately independent of `partial_counts` (explode + groupby per patient instead of
    code arithmetic and batch carries, no ordering needed) so that comparing the two checks
    the counting, not only the summing.
    """
    present = multi_hot_matrix(samples.column("phenotypes_current"), where, "phenotypes_current")
    nxt = multi_hot_matrix(samples.column("labels"), where, "labels")
    subject = _subject_ids(samples, where)
    stratum = severity_strata(present, severity_bins,
                              phenotype_code_counts(samples.column("diagnosis_codes")) if code_strata else None)
    rows, names = _drug_items(samples.column("drugs"))
    n = samples.num_rows
    # Drugs as integer codes (0 = TOTAL_KEY, given to every pair); names back at the end.
    code, vocab = pd.factorize(pd.concat([pd.Series([TOTAL_KEY] * n, dtype=object), names.to_pandas()],
                                         ignore_index=True))
    given = pd.DataFrame({"row": np.r_[np.arange(n), rows], "drug": code}).drop_duplicates()
    strata, clusters = [], []
    for p in range(NUM_PHENOTYPES):
        resolved = present[:, p] & ~nxt[:, p]
        sub = given[present[given["row"].to_numpy(), p]]
        if sub.empty:
            continue
        r = sub["row"].to_numpy()
        sub = sub.assign(y=resolved[r].astype(np.int64), stratum=stratum[r, p], subject=subject[r])
        g = sub.groupby(["drug", "stratum"], sort=True)["y"].agg(["size", "sum"]).reset_index()
        strata.append(pd.DataFrame({"phenotype_index": p, "drug": g["drug"], "stratum": g["stratum"],
                                    "n": g["size"], "y": g["sum"]}))
        per = sub.groupby(["drug", "subject"], sort=False)["y"].agg(["size", "sum"]).reset_index()
        tot = per[per["drug"] == 0][["subject", "size", "sum"]].rename(columns={"size": "tn", "sum": "ty"})
        per = per.merge(tot, on="subject")
        per = per.assign(nn=per["size"] ** 2, ny=per["size"] * per["sum"], yy=per["sum"] ** 2,
                         tnn=per["tn"] * per["size"], tyy=per["ty"] * per["sum"], tny=per["tn"] * per["sum"],
                         tyn=per["ty"] * per["size"])
        c = per.groupby("drug", sort=True)[SUMS[2:]].sum().reset_index()
        clusters.append(c.assign(phenotype_index=p))
    for frame in strata + clusters:
        frame["drug"] = np.asarray(vocab, dtype=object)[frame["drug"].to_numpy()]
    strata_df = (pd.concat(strata, ignore_index=True) if strata else
                 pd.DataFrame({c: pd.Series(dtype="int64" if c != "drug" else object)
                               for c in ("phenotype_index", "drug", "stratum", "n", "y")}))
    cluster_df = (pd.concat(clusters, ignore_index=True)[["phenotype_index", "drug", *SUMS[2:]]] if clusters else
                  pd.DataFrame({c: pd.Series(dtype="int64" if c != "drug" else object)
                                for c in ("phenotype_index", "drug", *SUMS[2:])}))
    return Counts(strata_df, cluster_df)


# --- the table ------------------------------------------------------------------------------

def _float_col(values: np.ndarray) -> pa.Array:
    """float64 column with null where the statistic is undefined (NaN or infinite)."""
    values = np.asarray(values, dtype=np.float64)
    return pa.array(values, type=pa.float64(), mask=~np.isfinite(values))


def _arm_arrays(counts: Counts):
    """Per (phenotype, drug) row: phenotype index, drug, per-stratum given counts (rows, S),
    per-stratum phenotype totals (rows, S), cluster sums of the drug and of the totals."""
    st = counts.strata
    s_count = int(st["stratum"].max()) + 1 if len(st) else 1
    is_total = (st["drug"] == TOTAL_KEY).to_numpy()
    tot_n = np.zeros((NUM_PHENOTYPES, s_count))
    tot_y = np.zeros((NUM_PHENOTYPES, s_count))
    tp, ts = st["phenotype_index"].to_numpy()[is_total].astype(np.int64), st["stratum"].to_numpy()[is_total].astype(np.int64)
    np.add.at(tot_n, (tp, ts), st["n"].to_numpy()[is_total])
    np.add.at(tot_y, (tp, ts), st["y"].to_numpy()[is_total])
    drugs = st[~is_total]
    keys = pd.MultiIndex.from_arrays([drugs["phenotype_index"].astype(np.int64), drugs["drug"].astype(str)])
    codes, uniq = pd.factorize(keys, sort=True)
    n1k = np.zeros((len(uniq), s_count))
    y1k = np.zeros((len(uniq), s_count))
    sk = drugs["stratum"].to_numpy().astype(np.int64)
    np.add.at(n1k, (codes, sk), drugs["n"].to_numpy())
    np.add.at(y1k, (codes, sk), drugs["y"].to_numpy())
    pi = np.asarray(uniq.get_level_values(0), dtype=np.int64)
    drug = np.asarray(uniq.get_level_values(1), dtype=object).astype(str)
    cl = counts.clusters.set_index(["phenotype_index", "drug"])
    cl.index = pd.MultiIndex.from_arrays([cl.index.get_level_values(0).astype(np.int64),
                                          cl.index.get_level_values(1).astype(str)])
    given = cl.reindex(uniq, fill_value=0)[SUMS[2:]].to_numpy(dtype=np.float64)
    total_idx = pd.MultiIndex.from_arrays([pi, np.full(len(pi), TOTAL_KEY)])
    totals = cl.reindex(total_idx, fill_value=0)[SUMS[2:]].to_numpy(dtype=np.float64)
    return pi, drug, n1k, y1k, tot_n[pi], tot_y[pi], given, totals


def _ranks(pi: np.ndarray, drug: np.ndarray, n_g: np.ndarray, score: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """Rank within each phenotype (1 = best, 0 = not ranked): eligible first, then by score
    desc, n_given desc, drug asc."""
    order = np.lexsort((drug, -n_g, -np.where(eligible, np.nan_to_num(score), 0.0), ~eligible, pi))
    rank = np.zeros(len(pi), dtype=np.int64)
    if len(pi):
        pi_o, el_o = pi[order], eligible[order]
        new_group = np.r_[True, pi_o[1:] != pi_o[:-1]]
        idx = np.arange(len(order))
        start = np.maximum.accumulate(np.where(new_group, idx, 0))
        rank[order] = idx - start + 1
        rank[order[~el_o]] = 0
    return rank


def efficacy_from_counts(counts: Counts, cfg: EADFConfig, ranking: str | None = None) -> pa.Table:
    """The EFFICACY table from summed counts, ranked per phenotype by `ranking`.

    Rows: every (phenotype, drug) given at least once with the phenotype present. Tested
    (p-value, q-value) when both arms have >= min_support pairs. A row is ranked (rank 1 =
    best) when eligible:
      efficacy:   tested, q_value <= fdr (Benjamini-Hochberg over all tested pairs) and the
                  lower bound > min_effect; ordered by the lower bound;
      frequency:  n_given >= min_support (the not-given arm is not used);
      risk_ratio: both arms have >= min_support pairs and rate_given / rate_not_given > 1.
    Ties break on n_given (more first), then drug name. Statistics that are undefined (an
    empty arm, a zero denominator) are null. rate_*, risk_ratio are crude; effect, lower,
    upper follow cfg.adjust, on effective counts when cfg.clustering is `patient`.
    """
    ranking = ranking or cfg.ranking
    if ranking not in RANKINGS:
        raise ValueError(f"eadf.ranking = {ranking!r}: expected one of {', '.join(RANKINGS)}")
    names = phenotype_names()
    pi, drug, n1k, y1k, tot_nk, tot_yk, cl_g, cl_t = _arm_arrays(counts)
    n0k, y0k = tot_nk - n1k, tot_yk - y1k
    if (n0k < 0).any() or (y0k < 0).any() or (y1k > n1k).any():
        raise ContractError("eadf: inconsistent counts (a drug arm exceeds its phenotype's total)")
    n_g, r_g, n_n, r_n = n1k.sum(1), y1k.sum(1), n0k.sum(1), y0k.sum(1)

    if cfg.clustering == "patient":
        nn, ny, yy, tnn, tyy, tny, tyn = cl_g.T
        t_nn, t_ny, t_yy = cl_t[:, 0], cl_t[:, 1], cl_t[:, 2]
        deff_g = design_effect(n_g, r_g, nn, ny, yy)
        # Not given = the phenotype's pairs minus the given ones, per patient: (T - x)^2 expanded.
        deff_n = design_effect(n_n, r_n, t_nn - 2 * tnn + nn, t_ny - tny - tyn + ny, t_yy - 2 * tyy + yy)
    else:
        deff_g = deff_n = np.ones(len(pi))
    e1k, f1k = y1k / deff_g[:, None], n1k / deff_g[:, None]
    e0k, f0k = y0k / deff_n[:, None], n0k / deff_n[:, None]
    z = z_value(cfg.confidence)
    with np.errstate(divide="ignore", invalid="ignore"):
        rate_g = r_g / n_g
        rate_n = np.where(n_n > 0, r_n / np.maximum(n_n, 1), np.nan)
        rr = np.where(rate_n > 0, rate_g / rate_n, np.nan)
    if cfg.adjust == "severity":
        effect, var = mantel_haenszel_rd(e1k, f1k, e0k, f0k)
        half = z * np.sqrt(var)
        lower, upper = np.clip(effect - half, -1, 1), np.clip(effect + half, -1, 1)
        p_value = cmh_score_p(e1k, f1k, e0k, f0k)
    else:
        effect = rate_g - rate_n
        lower, upper = newcombe(e1k.sum(1), f1k.sum(1), e0k.sum(1), f0k.sum(1), z)
        p_value = cmh_score_p(e1k.sum(1), f1k.sum(1), e0k.sum(1), f0k.sum(1))
    support = (n_g >= cfg.min_support) & (n_n >= cfg.min_support)
    p_value = np.where(support, p_value, np.nan)
    q_value = benjamini_hochberg(p_value)
    if ranking == "efficacy":
        score = lower
        eligible = (support & (np.nan_to_num(q_value, nan=2.0) <= cfg.fdr)
                    & (np.nan_to_num(lower, nan=-np.inf) > cfg.min_effect))
    elif ranking == "frequency":
        score, eligible = n_g.astype(np.float64), n_g >= cfg.min_support
    else:
        score, eligible = rr, support & (np.nan_to_num(rr, nan=-np.inf) > 1.0)

    rank = _ranks(pi, drug, n_g, score, eligible)
    as_int = lambda a: pa.array(np.asarray(a).round().astype(np.int64))  # noqa: E731
    out = pa.table({
        "phenotype_index": pa.array(pi.astype(np.int32)),
        "phenotype": pa.array([names[i] for i in pi], type=pa.string()),
        "drug": pa.array(drug, type=pa.string()),
        "n_given": as_int(n_g), "resolved_given": as_int(r_g),
        "n_not_given": as_int(n_n), "resolved_not_given": as_int(r_n),
        "rate_given": _float_col(rate_g), "rate_not_given": _float_col(rate_n),
        "effect": _float_col(effect), "lower": _float_col(lower), "upper": _float_col(upper),
        "risk_ratio": _float_col(rr), "score": _float_col(score),
        "rank": pa.array(rank.astype(np.int32), mask=rank == 0),
        "ranking": pa.array([ranking] * len(pi), type=pa.string()),
        "p_value": _float_col(p_value), "q_value": _float_col(q_value),
        "design_effect_given": _float_col(deff_g), "design_effect_not_given": _float_col(deff_n),
        "adjust": pa.array([cfg.adjust] * len(pi), type=pa.string()),
    }, schema=EFFICACY)
    # Deterministic order: phenotype_index, rank (unranked last), drug.
    return out.sort_by([("phenotype_index", "ascending"), ("rank", "ascending"), ("drug", "ascending")])


def efficacy_table_reference(samples: pa.Table, cfg, ranking: str | None = None) -> pa.Table:
    """The EFFICACY table of a whole SAMPLES table, without Ray (tests and benchmark).

    `cfg` is a PipelineConfig or an EADFConfig.
    """
    ecfg = getattr(cfg, "eadf", cfg)
    counts = reference_counts(samples, severity_bins=ecfg.severity_bins, code_strata=ecfg.code_strata)
    return efficacy_from_counts(counts, ecfg, ranking)


def top_drugs(table: pa.Table, top_k: int) -> dict[int, list[str]]:
    """phenotype_index -> its ranked drugs with rank <= top_k, best first (ranked only)."""
    out: dict[int, list[str]] = {}
    ranked = table.filter(pc.and_(pc.is_valid(table["rank"]), pc.less_equal(table["rank"], top_k)))
    ranked = ranked.sort_by([("phenotype_index", "ascending"), ("rank", "ascending")])
    for p, d in zip(ranked["phenotype_index"].to_pylist(), ranked["drug"].to_pylist()):
        out.setdefault(p, []).append(d)
    return out


# --- validity against a synthetic ground truth ----------------------------------------------

def precision_at_k(top: Mapping[int, Sequence[str]], planted: Mapping[str, Sequence[str]], k: int,
                   ward_drugs: Sequence[str] = ()) -> dict:
    """precision@k (hits / k) and recall@k (hits / planted) of the top-k lists, per phenotype
    with planted drugs and their mean; how many ward drugs appear in the top-k lists, and in
    how many lists a ward drug is ranked first."""
    index = {name: i for i, name in enumerate(phenotype_names())}
    unknown = sorted(set(planted) - set(index))
    ward = set(ward_drugs)
    per, ward_hits = {}, 0
    for name, drugs in planted.items():
        if name not in index:
            continue
        got = list(top.get(index[name], []))[:k]
        hits = len(set(got) & set(drugs))
        per[name] = {"top": got, "planted": list(drugs), "hits": hits, "precision_at_k": hits / k,
                     "recall_at_k": hits / len(drugs) if drugs else None}
    ward_first = 0
    for drugs in top.values():
        ward_hits += len(set(list(drugs)[:k]) & ward)
        ward_first += bool(drugs) and drugs[0] in ward
    precisions = [v["precision_at_k"] for v in per.values()]
    recalls = [v["recall_at_k"] for v in per.values() if v["recall_at_k"] is not None]
    return {
        "k": k,
        "mean_precision_at_k": float(np.mean(precisions)) if precisions else None,
        "mean_recall_at_k": float(np.mean(recalls)) if recalls else None,
        "phenotypes_scored": len(per),
        "ward_drugs_in_top_k": ward_hits,
        "ward_drugs_ranked_first": ward_first,
        "unknown_phenotypes": unknown,
        "per_phenotype": per,
    }
