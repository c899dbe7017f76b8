"""The synthetic cohort: a generator with known truth (catalog, model, tables), its MIMIC-III
and MIMIC-IV table writers, and the oracle and ceilings the truth makes computable."""
