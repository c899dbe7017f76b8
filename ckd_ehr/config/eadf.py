"""Config of EADF: efficacy estimation per phenotype and drug, ranking, fusion."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Section


class EADFConfig(Section):
    ranking: Literal["efficacy", "frequency", "risk_ratio"] = "efficacy"
    """`efficacy`: lower confidence bound of the difference in resolution rate (ours; ranked when
    both arms have min_support pairs and the bound exceeds min_effect);
    `frequency`: how often the drug is given with the phenotype (what the authors' lists amount
    to; ranked when n_given >= min_support);
    `risk_ratio`: ratio of resolution rates (ranked when both arms have min_support pairs and it exceeds 1)."""
    top_k: int = Field(5, ge=1, le=50)
    """Drugs kept per phenotype (the paper appends 5)."""
    min_support: int = Field(10, ge=1)
    """Minimum visit pairs in each arm (given / not given) for a drug to be ranked."""
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    """Level of the Newcombe interval for the difference of two proportions."""
    min_effect: float = 0.0
    """A drug is kept only if its interval's lower bound exceeds this (efficacy ranking)."""
    batch_size: int = Field(4096, gt=0)
    """Rows per Ray Data batch when counting and fusing (partial counts are at most drugs x 25
    rows per batch, so larger batches also mean less to sum)."""
