"""Evaluate and report: metrics with patient-bootstrap intervals (`metrics`), the floor and
ceiling rows (`baselines`, `probe_rows`), the test-split evaluation (`evaluate`, `run_evaluate`)
and the HTML report (`report`, `run_report`)."""


def __getattr__(name):
    if name == "run_evaluate":
        # not at module level: imported only on this branch
        from ckd_ehr.evaluation.evaluate import run_evaluate

        return run_evaluate
    if name == "run_report":
        # not at module level: imported only on this branch
        from ckd_ehr.evaluation.report import run_report

        return run_report
    raise AttributeError(name)
