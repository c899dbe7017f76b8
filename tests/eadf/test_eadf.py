"""EADF: the Newcombe interval, counting, ranking, Ray Data vs reference, fusion, edge cases."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from ckd_ehr import storage
from ckd_ehr.bench.eadf import WARD_DRUGS, planted_drug, random_samples
from ckd_ehr.config import EADFConfig, PipelineConfig, TextConfig
from ckd_ehr.contracts import (AUGMENTED_SAMPLES, EFFICACY, SAMPLES, ContractError, RunLayout,
                               check_schema)
from ckd_ehr.eadf.stats import (efficacy_from_counts, efficacy_table_reference, newcombe, partial_counts,
                                precision_at_k, reference_counts, split_counts, sum_partials, top_drugs,
                                z_value)
from ckd_ehr.phenotypes import NUM_PHENOTYPES, phenotype_names
from ckd_ehr.text import render_input

from helpers.eadf_samples import hot, samples_table

NAMES = phenotype_names()


def small_cohort() -> pa.Table:
    """Phenotype 0 present in 40 pairs: drug A given to 20 (15 resolve), not given to 20
    (5 resolve); Flush given to 38 of 40. Phenotype 1 present in 5 pairs, none with drugs
    (no treated pairs). 5 more pairs without any drugs or phenotypes."""
    rows = []
    for i in range(20):
        rows.append((["A", "Flush"] if i < 19 else ["A"], hot(0), hot() if i < 15 else hot(0)))
    for i in range(20):
        rows.append((["Flush"] if i < 19 else ["B"], hot(0), hot() if i < 5 else hot(0)))
    rows += [([], hot(1), hot(1))] * 5
    rows += [([], hot(), hot(2))] * 5
    return samples_table(rows)


def as_dict(table: pa.Table) -> dict:
    return {(r["phenotype_index"], r["drug"]): r for r in table.to_pylist()}


# --- statistics -----------------------------------------------------------------------------

def test_newcombe_matches_published_examples():
    # Newcombe (1998), Stat Med 17:873, Table II, method 10.
    z = z_value(0.95)
    for (k1, n1, k2, n2), (lo, hi) in [((56, 70, 48, 80), (0.0524, 0.3339)), ((9, 10, 3, 10), (0.1705, 0.8090)),
                                       ((5, 56, 0, 29), (-0.0381, 0.1926)), ((6, 7, 2, 7), (0.0582, 0.8062)),
                                       ((0, 10, 0, 20), (-0.1611, 0.2775)), ((10, 10, 0, 20), (0.6791, 1.0))]:
        lower, upper = newcombe(k1, n1, k2, n2, z)
        assert (round(float(lower), 4), round(float(upper), 4)) == (lo, hi)
    lower, upper = newcombe(3, 10, 0, 0, z)  # an empty arm has no interval
    assert np.isnan(lower) and np.isnan(upper)


def test_counts_and_ranking_on_a_hand_built_cohort():
    cfg = EADFConfig(min_support=10, top_k=5)
    table = efficacy_table_reference(small_cohort(), cfg)
    assert table.schema == EFFICACY
    rows = as_dict(table)
    a = rows[(0, "A")]
    assert (a["n_given"], a["resolved_given"], a["n_not_given"], a["resolved_not_given"]) == (20, 15, 20, 5)
    assert a["effect"] == pytest.approx(0.5)
    assert 0 < a["lower"] < 0.5 < a["upper"] and a["rank"] == 1 and a["score"] == a["lower"]
    assert a["risk_ratio"] == pytest.approx(3.0)
    flush = rows[(0, "Flush")]  # given to 38 of 40: the not-given arm (2) is below support
    assert (flush["n_given"], flush["n_not_given"], flush["rank"]) == (38, 2, None)
    assert rows[(0, "B")]["rank"] is None  # 1 pair: below support
    assert not any(p == 1 for p, _ in rows)  # phenotype with no treated pairs: no rows, no crash
    assert top_drugs(table, 5) == {0: ["A"]}
    # Frequency ranks by pairs given (only the given arm needs support): Flush first.
    freq = efficacy_from_counts(reference_counts(small_cohort()), cfg, "frequency")
    assert top_drugs(freq, 5) == {0: ["Flush", "A"]}
    assert set(freq["ranking"].to_pylist()) == {"frequency"}
    # Deterministic order: phenotype, rank (unranked last), drug.
    assert [(r["phenotype_index"], r["drug"]) for r in table.to_pylist()] == [(0, "A"), (0, "B"), (0, "Flush")]
    # Pairs without any drugs: totals only, an empty table of the right schema.
    no_drugs = efficacy_table_reference(samples_table([([], hot(0), hot())] * 3), cfg)
    assert no_drugs.num_rows == 0 and no_drugs.schema == EFFICACY
    # A stricter threshold leaves nothing ranked.
    assert top_drugs(efficacy_table_reference(small_cohort(), EADFConfig(min_effect=0.5)), 5) == {}


def test_batched_counts_sum_to_the_reference():
    tab = random_samples(600, seed=3)
    parts = [partial_counts(tab.slice(i, 97)) for i in range(0, tab.num_rows, 97)]
    counts = split_counts(sum_partials(pa.concat_tables(parts).to_pandas()))
    for adjust in ("none", "severity"):
        cfg = EADFConfig(min_support=5, adjust=adjust)
        assert efficacy_from_counts(counts, cfg).equals(efficacy_table_reference(tab, cfg))


def test_duplicate_and_blank_drug_names_are_counted_once_or_not_at_all():
    tab = samples_table([(["A", "A", " ", None], hot(0), hot())] + [([], hot(0), hot(0))])
    rows = as_dict(efficacy_table_reference(tab, EADFConfig(min_support=1)))
    assert list(rows) == [(0, "A")]
    assert (rows[(0, "A")]["n_given"], rows[(0, "A")]["n_not_given"]) == (1, 1)


def test_bad_multi_hot_value_names_file_field_and_value():
    tab = small_cohort()
    bad = tab.column("labels").to_pylist()
    bad[3] = [2] + bad[3][1:]
    tab = tab.set_column(tab.schema.get_field_index("labels"), "labels", pa.array(bad, type=SAMPLES.field("labels").type))
    with pytest.raises(ContractError, match=r"train\.parquet: field 'labels' has value 2 in row 3"):
        reference_counts(tab, where="train.parquet")
    with pytest.raises(ContractError, match="field 'labels' has value 2"):
        partial_counts(tab, where="train.parquet")


def test_efficacy_ranking_recovers_planted_drugs_better_than_frequency():
    tab = random_samples(4000, seed=1)
    cfg = EADFConfig(min_support=20)
    counts = reference_counts(tab)
    planted = {NAMES[p]: [planted_drug(p, j) for j in range(2)] for p in range(NUM_PHENOTYPES)}
    eff = precision_at_k(top_drugs(efficacy_from_counts(counts, cfg, "efficacy"), 5), planted, 5, WARD_DRUGS)
    freq = precision_at_k(top_drugs(efficacy_from_counts(counts, cfg, "frequency"), 5), planted, 5, WARD_DRUGS)
    assert eff["phenotypes_scored"] == NUM_PHENOTYPES
    # FDR-controlled lists: most planted drugs (recall), hardly anything else (precision of
    # the listed drugs; precision@k divides by k and so is bounded by 2/5 here).
    assert eff["mean_recall_at_k"] > 0.6 and eff["mean_recall_at_k"] > freq["mean_recall_at_k"] + 0.2
    listed = [d for v in eff["per_phenotype"].values() for d in v["top"]]
    assert sum(d.startswith("Planted-") for d in listed) >= 0.9 * len(listed)
    # Ward drugs (given more to sicker pairs, no effect) top the frequency lists, never the
    # efficacy lists; a few may pass the 95% bound by chance among 125 ward x phenotype tests.
    top_eff = [v["top"][0] for v in eff["per_phenotype"].values() if v["top"]]
    top_freq = [v["top"][0] for v in freq["per_phenotype"].values() if v["top"]]
    assert not set(top_eff) & set(WARD_DRUGS) and eff["ward_drugs_ranked_first"] == 0
    assert sum(d in WARD_DRUGS for d in top_freq) == NUM_PHENOTYPES
    assert eff["ward_drugs_in_top_k"] < freq["ward_drugs_in_top_k"] / 10


# --- Ray Data, fusion, the stage ----------------------------------------------------------------

def write_run(root, tables: dict[str, pa.Table], truth: dict | None = None) -> RunLayout:
    layout = RunLayout(str(root))
    for split, tab in tables.items():  # small row groups: several Ray Data blocks per file
        storage.write_parquet(tab, layout.samples(split), row_group_size=400)
    if truth is not None:
        storage.write_json(storage.join(layout.raw_dir, "ground_truth.json"), truth)
    return layout


def test_run_eadf_fuses_every_split_with_the_training_table(ray_local, tmp_path):
    """The CLI end to end: the Ray Data table equals the reference, every split is fused with
    the training table, rows and order kept; validity.json from the ground truth."""
    from ckd_ehr.cli import main
    from ckd_ehr.eadf.run import fuse_batch

    train = random_samples(2000, seed=4)  # large enough that phenotype 0 gets a list under FDR control
    val = random_samples(200, seed=5, split="val").slice(50, 120)
    test = small_cohort()  # no planted drugs here; a visit with no drugs
    truth = {"planted": {NAMES[p]: [planted_drug(p, j) for j in range(2)] for p in range(NUM_PHENOTYPES)},
             "ward_drugs": WARD_DRUGS}
    layout = write_run(tmp_path / "run", {"train": train, "val": val, "test": test}, truth)
    cfg = PipelineConfig(run_dir=str(tmp_path / "run"), eadf=EADFConfig(min_support=15, batch_size=400),
                         text=TextConfig(titles="short"))
    assert main(["eadf", "--run-dir", cfg.run_dir, "--set", "eadf.min_support=15", "--set", "eadf.batch_size=400",
                 "--set", "text.titles=short", "--set", "eadf.text_fit_report=false"]) == 0

    table = storage.read_parquet(layout.efficacy_table)
    assert table.equals(efficacy_table_reference(train, cfg))
    top = top_drugs(table, 5)
    assert top and all(len(v) <= 5 for v in top.values())
    for split, src in (("train", train), ("val", val), ("test", test)):
        out = storage.read_parquet(layout.augmented(split))
        assert out.schema.names == AUGMENTED_SAMPLES.names
        out = check_schema(out, AUGMENTED_SAMPLES, split)  # parquet reads timestamp[s] back as [ms]
        assert out["sample_id"].to_pylist() == src["sample_id"].to_pylist()
        assert out["text_plain"].to_pylist() == src["text_plain"].to_pylist()
        assert out.equals(check_schema(fuse_batch(src, top, cfg.text), AUGMENTED_SAMPLES, split))
        for i in (0, out.num_rows // 2, out.num_rows - 1):
            row = out.slice(i, 1).to_pylist()[0]
            present = [p for p in range(NUM_PHENOTYPES) if row["phenotypes_current"][p]]
            efficacy = {NAMES[p]: top[p] for p in present if p in top}
            expected = render_input(row["diagnosis_short_titles"], row["drugs"], row["procedure_titles"],
                                    efficacy=efficacy, cfg=cfg.text).text
            assert row["text_eadf"] == expected
    # A test-split row of phenotype 0 gets the training list of phenotype 0, not its own.
    first_test = storage.read_parquet(layout.augmented("test")).slice(0, 1).to_pylist()[0]["text_eadf"]
    assert f"therapeutic effect on {NAMES[0]} are {', '.join(top[0])}." in first_test

    validity = json.loads((tmp_path / "run" / "eadf" / "validity.json").read_text())
    eff, freq = validity["rankings"]["efficacy"], validity["rankings"]["frequency"]
    assert eff["mean_recall_at_k"] > freq["mean_recall_at_k"]


def test_row_reader_hands_out_a_files_rows_in_order_across_row_groups(tmp_path):
    """The fusion driver's reader of the input rows (beside the texts from the Ray tasks)."""
    import pyarrow.parquet as pq

    from ckd_ehr.eadf.run import _RowReader

    tab = small_cohort()
    pq.write_table(tab, tmp_path / "x.parquet", row_group_size=7)
    reader = _RowReader(str(tmp_path / "x.parquet"), batch_size=4)
    parts = [reader.take(k) for k in (3, 10, 1, tab.num_rows - 14)]
    # parquet reads timestamp[s] back as [ms]: compare in the SAMPLES schema
    assert check_schema(pa.concat_tables(parts), SAMPLES, "x").equals(tab)
    with pytest.raises(ContractError, match="expected 1 more rows"):
        reader.take(1)
    reader.close()


def test_empty_train_split_gives_an_empty_table_and_still_fuses(ray_local, s3_bucket):
    """Zero training pairs: an empty table, and every split is still written. The run
    directory is on S3 (moto), as on a multi-node cluster."""
    from ckd_ehr.eadf.run import run_eadf

    cohort = small_cohort()
    root = f"{s3_bucket}/eadf-empty-train"
    layout = write_run(root, {"train": cohort.slice(0, 0), "val": cohort, "test": cohort.slice(0, 0)})
    summary = run_eadf(PipelineConfig(run_dir=root, eadf=EADFConfig(text_fit_report=False)))
    assert summary["efficacy_rows"] == 0 and summary["rows"] == {"train": 0, "val": cohort.num_rows, "test": 0}
    assert storage.read_parquet(layout.efficacy_table).equals(efficacy_table_reference(cohort.slice(0, 0), EADFConfig()))
    val = storage.read_parquet(layout.augmented("val"))
    assert val["sample_id"].to_pylist() == cohort["sample_id"].to_pylist()
    assert "therapeutic effect" not in "".join(val["text_eadf"].to_pylist())
    assert storage.read_parquet(layout.augmented("test")).num_rows == 0
    assert not storage.exists(layout.eadf_validity)


def test_missing_split_or_column_is_a_clear_error(tmp_path):
    from ckd_ehr.eadf.run import run_eadf

    cohort = small_cohort()
    write_run(tmp_path, {"train": cohort, "val": cohort})
    with pytest.raises(FileNotFoundError, match=r"test\.parquet"):
        run_eadf(PipelineConfig(run_dir=str(tmp_path)))
    write_run(tmp_path, {"test": cohort.drop_columns(["drugs"])})
    with pytest.raises(ContractError, match=r"test\.parquet: missing column\(s\) drugs"):
        run_eadf(PipelineConfig(run_dir=str(tmp_path)))


@pytest.mark.slow   # prepares a 6,000-patient cohort
def test_validity_on_the_synthetic_cohort(tmp_path):
    """On a seeded synthetic cohort (6,000 patients) the FDR-controlled efficacy lists are
    almost only planted drugs and find a fair share of them; the frequency ranking lists ward
    drugs. (The validity benchmark, `ckd-ehr bench eadf --validity`, measures this over seeds
    and sizes with a null control.)

    Counted with the reference path: run_eadf's Ray path is checked equal to it above.
    """
    from ckd_ehr.eadf.validity import listing_validity
    from ckd_ehr.data.prepare import run_prepare

    cfg = PipelineConfig(run_dir=str(tmp_path))
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={
        "source": "synthetic", "synth": cfg.data.synth.model_copy(update={"patients": 6000, "seed": 7})})})
    run_prepare(cfg)
    truth = json.loads((tmp_path / "raw" / "ground_truth.json").read_text())
    ward = truth["ward_drugs"]
    counts = reference_counts(storage.read_parquet(RunLayout(str(tmp_path)).samples("train")))
    table = efficacy_from_counts(counts, cfg.eadf, "efficacy")
    listing = listing_validity(table, truth, cfg.eadf)
    assert listing["listed"] >= 10 and listing["precision"] >= 0.85 and listing["recall"] >= 0.15
    assert listing["ward_listed"] == 0
    eff, freq = (precision_at_k(top_drugs(efficacy_from_counts(counts, cfg.eadf, r), 5), truth["planted"], 5, ward)
                 for r in ("efficacy", "frequency"))
    assert eff["phenotypes_scored"] == NUM_PHENOTYPES and ward
    # Frequency lists are full of ward drugs; efficacy lists hold none.
    assert freq["ward_drugs_in_top_k"] >= 25 and eff["ward_drugs_in_top_k"] == 0


# --- the study's control texts ------------------------------------------------------------------

def test_control_clauses_keep_the_phenotypes_and_counts_not_the_drugs():
    from ckd_ehr.text import NO_DRUGS_LISTED, control_efficacy

    efficacy = {NAMES[p]: [f"drug{p}_{j}" for j in range(3)] for p in range(6)}
    visit = {NAMES[1]: efficacy[NAMES[1]], NAMES[4]: efficacy[NAMES[4]][:2]}
    names = control_efficacy("names", "s-1", visit, efficacy)
    assert names == {NAMES[1]: [NO_DRUGS_LISTED], NAMES[4]: [NO_DRUGS_LISTED]}
    rnd = control_efficacy("random", "s-1", visit, efficacy)
    assert list(rnd) == list(visit) and [len(v) for v in rnd.values()] == [3, 2]
    for p, drugs in rnd.items():
        assert not set(drugs) & set(efficacy[p])             # never the phenotype's own listed drugs
        assert set(drugs) <= {d for ds in efficacy.values() for d in ds}   # but drugs EADF lists elsewhere
    assert control_efficacy("random", "s-1", visit, efficacy) == rnd      # seeded by the sample
    draws = {tuple(control_efficacy("random", f"s-{i}", visit, efficacy)[NAMES[1]]) for i in range(20)}
    assert len(draws) > 5                                                  # and varies across samples
    with pytest.raises(ValueError, match="names or random"):
        control_efficacy("shuffled", "s-1", visit, efficacy)


def test_control_texts_are_fused_beside_the_eadf_text(ray_local, tmp_path):
    """`eadf.control_texts`: the Ray Data pass writes text_names / text_random beside text_eadf,
    the same as the in-process rendering; each differs from text_eadf only in the clauses."""
    from ckd_ehr.contracts import AUGMENTED_WITH_CONTROLS
    from ckd_ehr.eadf.run import fuse_batch, fuse_splits

    src = random_samples(300, seed=6)
    path = tmp_path / "samples.parquet"
    storage.write_parquet(src, str(path))
    text = TextConfig(titles="short", clauses="short")
    top = {p: [planted_drug(p, 0), planted_drug(p, 1)] for p in range(NUM_PHENOTYPES)}
    fuse_splits({str(path): str(tmp_path / "out.parquet")}, top, text, batch_size=64, controls=True)
    out = check_schema(storage.read_parquet(str(tmp_path / "out.parquet")), AUGMENTED_WITH_CONTROLS, "out")
    assert out.equals(check_schema(fuse_batch(src, top, text, controls=True), AUGMENTED_WITH_CONTROLS, "ref"))
    row = next(r for r in out.to_pylist() if "Effective for" in r["text_eadf"])
    cut = row["text_eadf"].index("Effective for")
    assert row["text_names"][:cut] == row["text_random"][:cut] == row["text_eadf"][:cut]
    assert "none listed" in row["text_names"] and row["text_random"] != row["text_eadf"]
    assert row["text_names"].count("Effective for") == row["text_eadf"].count("Effective for")
