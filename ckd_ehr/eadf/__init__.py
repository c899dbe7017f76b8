"""Stage 2, EADF: efficacy statistics over training visit pairs (`stats`), their validity against
a known truth (`validity`), the Ray Data stage that ranks and fuses clauses into every split
(`run`, `run_eadf`), and what of each text the models see (`text_fit`)."""


def __getattr__(name):
    if name == "run_eadf":   # lazy: `stats` and `validity` stay importable without Ray
        # not at module level: imported only on this branch
        from ckd_ehr.eadf.run import run_eadf

        return run_eadf
    raise AttributeError(name)
