"""Stage 4, soft labels: the teacher scores every sample the student reads with Ray Data
(`run`, `run_soft_labels`); `quality` measures them against the truth."""


def __getattr__(name):
    if name == "run_soft_labels":
        # not at module level: imported only on this branch
        from ckd_ehr.soft_labels.run import run_soft_labels

        return run_soft_labels
    raise AttributeError(name)
