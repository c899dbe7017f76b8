"""Stage 1, EHR data: MIMIC-III / MIMIC-IV tables (or a synthetic cohort in the same format) ->
phenotype-labelled visit pairs split by patient (`run_prepare`, in `prepare`)."""


def __getattr__(name):
    if name == "run_prepare":   # lazy: the light modules (phenotypes, icd10) stay importable alone
        # not at module level: imported only on this branch
        from ckd_ehr.data.prepare import run_prepare

        return run_prepare
    raise AttributeError(name)
