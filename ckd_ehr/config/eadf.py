"""Config of EADF: efficacy estimation per phenotype and drug, ranking, fusion."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ckd_ehr.config.base import Section


class EADFConfig(Section):
    ranking: Literal["efficacy", "frequency", "risk_ratio"] = "efficacy"
    """`efficacy`: lower confidence bound of the difference in resolution rate (ours; ranked when
    both arms have min_support pairs, the pair passes the FDR threshold `fdr` and the bound
    exceeds min_effect);
    `frequency`: how often the drug is given with the phenotype (what the authors' lists amount
    to; ranked when n_given >= min_support);
    `risk_ratio`: ratio of resolution rates (ranked when both arms have min_support pairs and it exceeds 1)."""
    top_k: int = Field(5, ge=1, le=50)
    """Drugs kept per phenotype (the paper appends 5)."""
    min_support: int = Field(10, ge=1)
    """Minimum visit pairs in each arm (given / not given) for a drug to be tested and ranked
    ("enough support"; raw pair counts). Pairs below it get no p-value and do not count among
    the tests of the FDR correction."""
    fdr: float = Field(0.05, gt=0.0, lt=1.0)
    """Benjamini-Hochberg false discovery rate for listing a drug (efficacy ranking). Each tested
    phenotype x drug pair gets a one-sided p-value (Cochran-Mantel-Haenszel score test of "the
    drug raises the rate at which the phenotype is gone at the next visit", on effective counts);
    BH runs across ALL tested pairs of the table, not per phenotype: the listed drugs are one set
    of claims read together (every clause the student sees), and one family keeps the expected
    share of false clauses at `fdr` for the whole table. Per-phenotype BH would allow `fdr`
    per phenotype list, so under the null about 25 x fdr phenotypes could get a false drug."""
    clustering: Literal["patient", "none"] = "patient"
    """`patient`: pairs of one patient are correlated; intervals and tests use effective sample
    sizes, each arm's counts divided by its design effect (cluster-robust over binomial
    variance of the arm's resolution rate, from per-patient sums; eadf_inference.design_effect).
    Chosen over a cluster-robust variance of the difference because it keeps Newcombe's score
    interval and the score test (both behave at 0 or 100% resolved, where a sandwich variance
    collapses) and works the same under Mantel-Haenszel strata; it needs per-arm per-patient
    sums only, which stay additive across Ray Data batches (batches carry their first and last
    patient, the only ones a batch boundary can split). `none`: pairs counted as independent
    (what EADF did before; intervals too narrow when patients have many pairs)."""
    adjust: Literal["none", "severity"] = "none"
    """`none`: crude difference of resolution rates (Newcombe interval). `severity`:
    Mantel-Haenszel risk difference over strata of visit-i severity (number of phenotypes
    present at visit i, binned by `severity_bins`, each split by `code_strata`), Sato's
    variance, Wald interval on it; the p-value is the stratified CMH score test. Reduces
    confounding by indication (drugs given to less or more severe visits) without removing
    it: the strata only approximate severity."""
    code_strata: bool = True
    """Split each severity stratum by whether visit i records one, or two and more, distinct
    ICD-9-CM codes of the phenotype itself (a complication, a second manifestation: what a
    visit shows of how severe THAT phenotype is, which the count of phenotypes present does
    not): on confounded synthetic cohorts the count alone left the decoys' bias untouched
    (docs/benchmarks.md, "EADF validity"). Dotted ICD-10-CM codes (MIMIC-IV) match no code:
    those visits stay in the one-code stratum."""
    severity_bins: list[int] = Field(default_factory=lambda: [3, 5, 7])
    """Lower edges of the severity strata above the first, in phenotypes present at visit i:
    [3, 5, 7] gives 1-2, 3-4, 5-6, 7+ (on synthetic cohorts about 25/30/25/20% of pairs with a
    phenotype; fewer strata keep both arms populated per stratum)."""
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    """Level of the interval of the effect (Newcombe's for adjust `none`, MH +- z * Sato's
    standard error for `severity`); the ranking sorts by its lower bound."""
    min_effect: float = 0.0
    """A drug is kept only if its interval's lower bound exceeds this (efficacy ranking)."""
    batch_size: int = Field(4096, gt=0)
    """Rows per Ray Data batch when counting and fusing (partial counts are at most drugs x 25
    rows per batch, so larger batches also mean less to sum)."""
    read_blocks: int | None = Field(None, ge=1)
    """Blocks each Ray Data read is cut into (the counting and fusing tasks' parallelism). None:
    one per CPU of the cluster when the stage starts; on a cluster that scales from zero that is
    the head's few, so set it to the CPUs the autoscaler may add (e.g. the CPU group's maximum)."""
    control_texts: bool = False
    """Also render the study's control texts `text_names` (clauses naming the present phenotypes,
    no drugs) and `text_random` (as many drugs drawn from those listed for other phenotypes), see
    ckd_ehr.text.control_efficacy; the `hard_names` / `hard_random` student variants read them."""
    text_fit_report: bool = True
    """Write evaluate/text_fit.json in the evaluate stage (ckd_ehr.eadf.text_fit): per split and model, the share of samples
    whose EADF text keeps every patient item and clause. Loads both models' tokenizers."""

    @field_validator("severity_bins")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if any(b < 2 for b in v) or any(b2 <= b1 for b1, b2 in zip(v, v[1:])):
            raise ValueError(f"severity_bins must be increasing edges >= 2, got {v}")
        return v
