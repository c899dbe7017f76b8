"""Config of the EHR data layer: source tables, synthetic cohort, split, text rendering."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ckd_ehr.config.base import Section
from ckd_ehr.config.synth import SynthConfig

RELEASE_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
"""How MIMIC-III and MIMIC-IV write every timestamp the loaders read."""
DATE_COLUMNS = ("admittime", "dischtime", "dob", "startdate", "starttime")
"""The timestamp columns the loaders parse (MIMIC-III's dob and startdate, MIMIC-IV's starttime)."""


class DataConfig(Section):
    source: Literal["synthetic", "mimic"] = "synthetic"
    """`synthetic`: generate a cohort into RUN/raw first; `mimic`: read tables from mimic_dir."""
    mimic_dir: str | None = None
    """Directory with the MIMIC-III tables (demo .csv or full-release .csv.gz) or the MIMIC-IV
    release (the directory holding hosp/, or hosp/ itself)."""
    release: Literal["auto", "mimic3", "mimic4"] = "auto"
    """Which MIMIC release the tables are. `auto`: MIMIC-IV if the directory has hosp/ (or its
    diagnoses_icd has icd_version), else MIMIC-III; so the synthetic cohort's form decides too."""
    icd_versions: list[Literal[9, 10]] = [9, 10]
    """MIMIC-IV: keep only admissions coded in these ICD versions (9: before October 2015,
    10: after). Both by default: MIMIC-IV's later half is ICD-10 only. MIMIC-III is all 9."""
    icd10_crosswalk: Literal["hcup_ccs", "cms_gem"] = "hcup_ccs"
    """ICD-10-CM -> the 25 phenotypes (see ckd_ehr/data/icd10.py). `hcup_ccs`: HCUP's CCS for
    ICD-10-CM (the benchmark's own classification, one category per code); `cms_gem`: the CMS
    GEMs to ICD-9-CM, then the ICD-9 definitions (majority rule for one-to-many)."""
    synth: SynthConfig = SynthConfig()
    """The synthetic cohort (used when source is `synthetic`)."""
    strict: bool = False
    """Turn every repair into an error: a duplicate row, a null-like code, an unparseable value,
    an event of an unknown admission... (otherwise each is repaired, counted and listed in
    data/prepare_report.json and the closing lines of `ckd-ehr prepare`; see docs/data.md)."""
    date_formats: dict[str, str] = {}
    """strptime format per timestamp column (admittime, dischtime, dob, startdate, starttime),
    e.g. `{admittime: "%m/%d/%Y %H:%M"}`; a column not named uses the release's
    `%Y-%m-%d %H:%M:%S`. One format per column: a value it does not parse is counted, and more
    than max_bad_fraction of them stops the run. `%z` reads a timezone suffix (as UTC)."""
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0)
    """Share of a column's rows that may be unparseable (or, for dischtime, before admittime)
    and be repaired (dropped or set to null, counted); above it the run stops naming the file,
    column, count and an example."""
    csv_block_mb: int = Field(16, ge=1, le=1024)
    """Size of the CSV blocks tables are streamed in (PRESCRIPTIONS is 4.2M rows in the full
    release and is never read whole); larger is a little faster and uses more memory."""

    @model_validator(mode="after")
    def _mimic_needs_dir(self):
        if self.source == "mimic" and not self.mimic_dir:
            raise ValueError("data.source is 'mimic' but data.mimic_dir is not set")
        unknown = sorted(set(self.date_formats) - set(DATE_COLUMNS))
        if unknown:
            raise ValueError(f"data.date_formats: unknown column(s) {unknown}; the timestamp columns are "
                             f"{', '.join(DATE_COLUMNS)}")
        no_directive = {c: f for c, f in self.date_formats.items() if "%" not in f}
        if no_directive:
            raise ValueError(f"data.date_formats: {no_directive} is not a strptime format (no % directive)")
        if not self.icd_versions or len(set(self.icd_versions)) != len(self.icd_versions):
            raise ValueError(f"data.icd_versions must list 9 and/or 10 once each, got {self.icd_versions}")
        return self


class SplitConfig(Section):
    train: float = Field(0.7, gt=0.0, lt=1.0)
    """Fraction of patients in the training split."""
    val: float = Field(0.1, ge=0.0, lt=1.0)
    """Fraction of patients in the validation split."""
    test: float = Field(0.2, ge=0.0, lt=1.0)
    """Fraction of patients in the test split."""
    seed: int = 13
    """Seed of the patient split: a patient's split depends only on this and its subject_id."""

    @model_validator(mode="after")
    def _sums_to_one(self):
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"split fractions must sum to 1, got train={self.train} + val={self.val} "
                f"+ test={self.test} = {total:g}"
            )
        return self


class TextConfig(Section):
    instruction: Literal["paper", "short", "none"] = "none"
    """Prefix the sample text with an instruction (ckd_ehr.text.instruction): `paper` names the
    25 phenotypes, `short` is one sentence, `none` (default) adds nothing: the student's head
    reads pooled states, and the teacher adds its own (TeacherConfig.instruction)."""
    titles: Literal["short", "long"] = "long"
    """ICD-9 diagnosis titles: D_ICD_DIAGNOSES.short_title or long_title (the release uses long)."""
    render: Literal["paper", "compact"] = "paper"
    """How a visit is written: `paper` = the release's sentences ("The patient-acquired disease is
    ..."); `compact` = the same items under one-word headings ("Diagnoses: ...; Medications:
    ...; Procedures: ...", clauses as "Effective drugs: P: A, B; ..."): fewer tokens per text,
    and (a) and (b) still differ by the clauses only."""
    clauses: Literal["paper", "short"] = "paper"
    """Wording of the EADF efficacy clauses: `paper` = the release's "The medications that
    maybe have therapeutic effect on P are A, B;" (about 12 tokens of wording per clause);
    `short` = "Effective for P: A, B;" with the same phenotype and drugs in fewer tokens, so
    that clauses and every patient item fit a 512-token encoder."""
    max_chars_diagnoses: int = Field(1500, gt=0)
    """Character budget of the diagnoses section; items past it are dropped and counted."""
    max_chars_drugs: int = Field(1200, gt=0)
    """Character budget of the medication section."""
    max_chars_procedures: int = Field(400, gt=0)
    """Character budget of the procedures section."""
    max_chars_efficacy: int = Field(2400, gt=0)
    """Character budget of the efficacy clauses (EADF); applied on its own so it is never cut by the others."""
