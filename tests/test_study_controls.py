"""The study's control variants through the real stages (Ray Data EADF, Ray Train students):
(b-names) and (d-oracle), on a private copy of the shared tiny run ((b-random) differs from
(b-names) only in the column it reads, whose rendering tests/test_eadf.py checks)."""
from __future__ import annotations

import numpy as np
import pytest
import yaml

from ckd_ehr import storage
from ckd_ehr.cli import main
from ckd_ehr.contracts import RunLayout
from ckd_ehr.evaluation.metrics import to_matrix

pytestmark = pytest.mark.slow


def test_control_variants_train_and_are_evaluated(tiny_run_copy, tmp_path):
    cfg = {**tiny_run_copy, "eadf": {**tiny_run_copy.get("eadf", {}), "control_texts": True,
                                     "text_fit_report": False},
           "student": {**tiny_run_copy["student"], "variants": ["ckd_ehr", "hard_names", "oracle_distill"]}}
    cfg_file = tmp_path / "controls.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    layout = RunLayout(cfg["run_dir"])
    assert main(["eadf", "--config", str(cfg_file)]) == 0
    aug = storage.read_parquet(layout.augmented("train")).to_pylist()
    with_clauses = [r for r in aug if r["text_eadf"] != r["text_plain"]]
    assert with_clauses and all("none listed" in r["text_names"] for r in with_clauses)
    assert all(r["text_names"] == r["text_random"] == r["text_eadf"] == r["text_plain"]
               for r in aug if r["text_eadf"] == r["text_plain"])   # no clause: every text is the plain one

    assert main(["student", "--config", str(cfg_file)]) == 0
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

    assert main(["evaluate", "--config", str(cfg_file), "--allow-small"]) == 0
    models = storage.read_json(layout.metrics)["models"]
    assert {"hard_names", "oracle_distill"} <= set(models) and "hard_random" not in models
    assert models["hard_names"]["role"].startswith("(b-names)")
