"""EADF statistics, free of Ray: counting visit pairs, the Newcombe interval, ranking.

A visit pair (visit i, visit i+1) "resolves" phenotype p when p is present at visit i
(`phenotypes_current`) and absent at visit i+1 (`labels`). For each phenotype p and drug m,
among the pairs with p present we compare the resolution rate of pairs given m at visit i
with that of pairs not given m. The effect is the difference of the two rates; its Newcombe
(hybrid Wilson score) interval gives a lower bound that ranks drugs by efficacy, so a drug
that every patient gets (saline flush) and therefore has no comparison arm, or one with few
pairs, cannot rank high by being frequent.

Counting is additive, so the Ray path counts per batch (`partial_counts`) and sums; the
reference (`efficacy_table_reference`) counts the whole table with pandas in a different
way, and both feed the same `efficacy_from_counts`.
"""
from __future__ import annotations

from statistics import NormalDist
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from .config import EADFConfig
from .contracts import EFFICACY, ContractError
from .phenotypes import NUM_PHENOTYPES, phenotype_names

# Columns of SAMPLES the counting reads.
COUNT_COLUMNS = ["drugs", "phenotypes_current", "labels"]
# Rows of `partial_counts` with this drug name carry the per-phenotype totals (pairs with the
# phenotype present, and how many of them resolved). Real drug names are never empty:
# null and blank names are not counted as drugs.
TOTAL_KEY = ""
PARTIAL_SCHEMA = pa.schema([
    ("phenotype_index", pa.int32()),
    ("drug", pa.string()),
    ("n_given", pa.int64()),         # on TOTAL_KEY rows: pairs with the phenotype present
    ("resolved_given", pa.int64()),  # on TOTAL_KEY rows: ... of which resolved
])
RANKINGS = ("efficacy", "frequency", "risk_ratio")


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

def partial_counts(batch: pa.Table, where: str = "samples") -> pa.Table:
    """Counts of one batch of SAMPLES rows, in PARTIAL_SCHEMA (summable across batches).

    Per (phenotype, drug) with the phenotype present and the drug given: n_given and
    resolved_given; per phenotype (drug = TOTAL_KEY): pairs present and resolved.
    """
    present = multi_hot_matrix(batch.column("phenotypes_current"), where, "phenotypes_current")
    nxt = multi_hot_matrix(batch.column("labels"), where, "labels")
    resolved = present & ~nxt
    rows, names = _drug_items(batch.column("drugs"))
    n = present.shape[0]

    totals = pa.table({
        "phenotype_index": pa.array(np.arange(NUM_PHENOTYPES, dtype=np.int32)),
        "drug": pa.array([TOTAL_KEY] * NUM_PHENOTYPES, type=pa.string()),
        "n_given": pa.array(present.sum(axis=0).astype(np.int64)),
        "resolved_given": pa.array(resolved.sum(axis=0).astype(np.int64)),
    }, schema=PARTIAL_SCHEMA)
    if len(names) == 0:
        return totals

    enc = pc.dictionary_encode(names)
    codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    vocab = enc.dictionary
    # drug x row incidence; a drug listed twice in one visit counts once.
    inc = sp.csr_matrix((np.ones(len(codes), dtype=np.int64), (codes, rows)), shape=(len(vocab), n))
    inc.sum_duplicates()
    inc.data[:] = 1
    given = np.asarray(inc @ present.astype(np.int64))          # (drugs, 25)
    given_resolved = np.asarray(inc @ resolved.astype(np.int64))
    d, p = np.nonzero(given)
    pairs = pa.table({
        "phenotype_index": pa.array(p.astype(np.int32)),
        "drug": vocab.take(pa.array(d)),
        "n_given": pa.array(given[d, p].astype(np.int64)),
        "resolved_given": pa.array(given_resolved[d, p].astype(np.int64)),
    }, schema=PARTIAL_SCHEMA)
    return pa.concat_tables([totals, pairs])


def split_counts(summed: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Summed partial counts -> (per phenotype x drug counts, per phenotype totals)."""
    is_total = summed["drug"] == TOTAL_KEY
    totals = (summed[is_total].rename(columns={"n_given": "n_present", "resolved_given": "resolved_present"})
              [["phenotype_index", "n_present", "resolved_present"]])
    return summed[~is_total].reset_index(drop=True), totals.reset_index(drop=True)


def sum_partials(partials: pd.DataFrame) -> pd.DataFrame:
    """Sum partial counts (PARTIAL_SCHEMA rows from many batches) by (phenotype, drug)."""
    return (partials.groupby(["phenotype_index", "drug"], as_index=False, sort=True)[["n_given", "resolved_given"]]
            .sum())


def reference_counts(samples: pa.Table, where: str = "samples") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Counts of a whole SAMPLES table with plain pandas, one phenotype at a time.

    Deliberately independent of `partial_counts` (explode + groupby instead of a sparse
    product) so that comparing the two checks the counting, not only the summing.
    """
    present = multi_hot_matrix(samples.column("phenotypes_current"), where, "phenotypes_current")
    nxt = multi_hot_matrix(samples.column("labels"), where, "labels")
    rows, names = _drug_items(samples.column("drugs"))
    given = pd.DataFrame({"row": rows, "drug": names.to_pandas()}).drop_duplicates()
    counts, totals = [], []
    for p in range(NUM_PHENOTYPES):
        resolved = present[:, p] & ~nxt[:, p]
        totals.append((p, int(present[:, p].sum()), int(resolved.sum())))
        sub = given[present[given["row"].to_numpy(), p]]
        if sub.empty:
            continue
        sub = sub.assign(resolved=resolved[sub["row"].to_numpy()].astype(np.int64))
        g = sub.groupby("drug", sort=True)["resolved"].agg(["size", "sum"]).reset_index()
        counts.append(pd.DataFrame({"phenotype_index": p, "drug": g["drug"], "n_given": g["size"],
                                    "resolved_given": g["sum"]}))
    counts_df = (pd.concat(counts, ignore_index=True) if counts else
                 pd.DataFrame({"phenotype_index": [], "drug": [], "n_given": [], "resolved_given": []}))
    return counts_df, pd.DataFrame(totals, columns=["phenotype_index", "n_present", "resolved_present"])


# --- the interval ---------------------------------------------------------------------------

def z_value(confidence: float) -> float:
    return NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)


def wilson(k: np.ndarray, n: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of k/n (vectorised); NaN where n == 0."""
    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = k / n
        denom = 1.0 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z / denom * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo = np.where(k == 0, 0.0, np.clip(centre - half, 0.0, 1.0))  # exact at the ends, no float fuzz
    hi = np.where(k == n, 1.0, np.clip(centre + half, 0.0, 1.0))
    nan = np.isnan(p)
    return np.where(nan, np.nan, lo), np.where(nan, np.nan, hi)


def newcombe(k1, n1, k2, n2, z: float) -> tuple[np.ndarray, np.ndarray]:
    """Newcombe's hybrid score interval (his method 10) of p1 - p2; NaN where an arm is empty."""
    k1, n1, k2, n2 = (np.asarray(a, dtype=np.float64) for a in (k1, n1, k2, n2))
    with np.errstate(divide="ignore", invalid="ignore"):
        p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1, z)
    l2, u2 = wilson(k2, n2, z)
    d = p1 - p2
    lower = d - np.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    upper = d + np.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return lower, upper


# --- ranking ------------------------------------------------------------------------------

def _float_col(values: np.ndarray) -> pa.Array:
    """float64 column with null where the statistic is undefined (NaN or infinite)."""
    values = np.asarray(values, dtype=np.float64)
    return pa.array(values, type=pa.float64(), mask=~np.isfinite(values))


def efficacy_from_counts(counts: pd.DataFrame, totals: pd.DataFrame, cfg: EADFConfig,
                         ranking: str | None = None) -> pa.Table:
    """The EFFICACY table from summed counts, ranked per phenotype by `ranking`.

    Rows: every (phenotype, drug) given at least once with the phenotype present. A row is
    ranked (rank 1 = best) when eligible:
      efficacy:   both arms have >= min_support pairs and the lower bound > min_effect;
      frequency:  n_given >= min_support (the not-given arm is not used);
      risk_ratio: both arms have >= min_support pairs and rate_given / rate_not_given > 1.
    Ties break on n_given (more first), then drug name. Statistics that are undefined (an
    empty arm, a zero denominator) are null.
    """
    ranking = ranking or cfg.ranking
    if ranking not in RANKINGS:
        raise ValueError(f"eadf.ranking = {ranking!r}: expected one of {', '.join(RANKINGS)}")
    names = phenotype_names()
    tot = totals.set_index("phenotype_index").reindex(range(NUM_PHENOTYPES), fill_value=0)
    df = counts[["phenotype_index", "drug", "n_given", "resolved_given"]].copy()
    df = df[df["n_given"] > 0]
    pi = df["phenotype_index"].to_numpy(dtype=np.int64)
    n_g = df["n_given"].to_numpy(dtype=np.int64)
    r_g = df["resolved_given"].to_numpy(dtype=np.int64)
    n_n = tot["n_present"].to_numpy(dtype=np.int64)[pi] - n_g
    r_n = tot["resolved_present"].to_numpy(dtype=np.int64)[pi] - r_g
    if (n_n < 0).any() or (r_n < 0).any() or (r_g > n_g).any():
        raise ContractError("eadf: inconsistent counts (a drug arm exceeds its phenotype's total)")

    with np.errstate(divide="ignore", invalid="ignore"):
        rate_g = r_g / n_g
        rate_n = np.where(n_n > 0, r_n / np.maximum(n_n, 1), np.nan)
        rr = np.where(rate_n > 0, rate_g / rate_n, np.nan)
    effect = rate_g - rate_n
    lower, upper = newcombe(r_g, n_g, r_n, n_n, z_value(cfg.confidence))
    support = (n_g >= cfg.min_support) & (n_n >= cfg.min_support)
    if ranking == "efficacy":
        score, eligible = lower, support & (np.nan_to_num(lower, nan=-np.inf) > cfg.min_effect)
    elif ranking == "frequency":
        score, eligible = n_g.astype(np.float64), n_g >= cfg.min_support
    else:
        score, eligible = rr, support & (np.nan_to_num(rr, nan=-np.inf) > 1.0)

    drug = df["drug"].astype(str).to_numpy()
    # Rank: eligible first, then by phenotype, score desc, n_given desc, drug asc.
    order = np.lexsort((drug, -n_g, -np.where(eligible, score, 0.0), ~eligible, pi))
    rank = np.zeros(len(df), dtype=np.int64)
    if len(df):
        pi_o, el_o = pi[order], eligible[order]
        new_group = np.r_[True, pi_o[1:] != pi_o[:-1]]
        idx = np.arange(len(order))
        start = np.maximum.accumulate(np.where(new_group, idx, 0))
        rank[order] = idx - start + 1
        rank[order[~el_o]] = 0
    out = pa.table({
        "phenotype_index": pa.array(pi.astype(np.int32)),
        "phenotype": pa.array([names[i] for i in pi], type=pa.string()),
        "drug": pa.array(drug, type=pa.string()),
        "n_given": pa.array(n_g), "resolved_given": pa.array(r_g),
        "n_not_given": pa.array(n_n), "resolved_not_given": pa.array(r_n),
        "rate_given": _float_col(rate_g), "rate_not_given": _float_col(rate_n),
        "effect": _float_col(effect), "lower": _float_col(lower), "upper": _float_col(upper),
        "risk_ratio": _float_col(rr), "score": _float_col(score),
        "rank": pa.array(rank.astype(np.int32), mask=rank == 0),
        "ranking": pa.array([ranking] * len(df), type=pa.string()),
    }, schema=EFFICACY)
    # Deterministic order: phenotype_index, rank (unranked last), drug.
    return out.sort_by([("phenotype_index", "ascending"), ("rank", "ascending"), ("drug", "ascending")])


def efficacy_table_reference(samples: pa.Table, cfg, ranking: str | None = None) -> pa.Table:
    """The EFFICACY table of a whole SAMPLES table, without Ray (tests and benchmark).

    `cfg` is a PipelineConfig or an EADFConfig.
    """
    ecfg = getattr(cfg, "eadf", cfg)
    counts, totals = reference_counts(samples)
    return efficacy_from_counts(counts, totals, ecfg, ranking)


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
