"""The study's control variants through the real stages (Ray Data EADF, Ray Train students,
evaluate), read from the suite's shared tiny run, which trains (b-names) and (d-oracle) beside
the primary students (tests/helpers/tiny_run.py). (b-random) differs from (b-names) only in the column
it reads, whose rendering tests/eadf/test_eadf.py checks."""
from __future__ import annotations

import numpy as np
import pytest

from ckd_ehr import storage
from ckd_ehr.contracts import RunLayout
from ckd_ehr.metrics import to_matrix

pytestmark = pytest.mark.slow


def test_control_variants_train_and_are_evaluated(tiny_run):
    layout = RunLayout(str(tiny_run.run_dir))
    aug = storage.read_parquet(layout.augmented("train")).to_pylist()
    with_clauses = [r for r in aug if r["text_eadf"] != r["text_plain"]]
    assert with_clauses and all("none listed" in r["text_names"] for r in with_clauses)
    assert all(r["text_names"] == r["text_random"] == r["text_eadf"] == r["text_plain"]
               for r in aug if r["text_eadf"] == r["text_plain"])   # no clause: every text is the plain one

    # (d-oracle) read the generator's probabilities as soft labels, in the samples' order
    soft = storage.read_parquet(layout.soft_labels("train", "oracle"))
    assert soft.column("sample_id").to_pylist() == [r["sample_id"] for r in aug]
    assert set(soft.column("teacher_id").to_pylist()) == {"latent_oracle"}
    probs = to_matrix(soft.column("probs").to_pylist())
    assert np.all((probs > 0) & (probs < 1)) and probs.std() > 0.01
    for v in ("hard_names", "oracle_distill"):   # hard_random reads its column the same way
        meta = storage.read_json(layout.student_meta(v))
        assert meta["text"]["column"] == {"hard_names": "text_names", "oracle_distill": "text_eadf"}[v]
        assert storage.exists(layout.predictions(v))

    models = storage.read_json(layout.metrics)["models"]
    assert {"hard_names", "oracle_distill"} <= set(models) and "hard_random" not in models
    assert models["hard_names"]["role"].startswith("(b-names)")
