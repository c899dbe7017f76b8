"""The training loop in this process (no Ray): what each Ray Train worker runs, behind a
LocalReporter. For tests that need a trained model but not the Ray Train wiring."""
from __future__ import annotations


def fit_in_process(cfg, task, directory) -> tuple[dict, dict, str]:
    """TrainLoop behind a LocalReporter: (last metrics, best metrics, best checkpoint dir)."""
    from ckd_ehr.training import LocalReporter, TrainLoop, WorkerContext

    reporter = LocalReporter(str(directory))
    last = TrainLoop(cfg, task, WorkerContext(), reporter).run()
    best_dir, best = reporter.best(cfg.best_metric)
    return last, best, best_dir
