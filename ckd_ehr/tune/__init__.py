"""Stage 6, Ray Tune: search spaces (`space`) and the search over a trained run (`run`, `run_tune`)."""


def __getattr__(name):
    if name == "run_tune":
        # not at module level: imported only on this branch
        from ckd_ehr.tune.run import run_tune

        return run_tune
    raise AttributeError(name)
