"""How much of each sample's text the models see: `evaluate/text_fit.json`, written by the evaluate
stage (it reads the teacher's and the student's tokenizers and budgets, which EADF does not
declare: a student setting must not rerun EADF and the teacher).

Per split and per model (teacher, student), the share of samples whose EADF text keeps every
patient item (diagnoses, drugs, procedures) and every efficacy clause:
- `chars`: the text config's character budgets (prepare and EADF render section by section;
  an item past its section's budget is dropped, for both arms alike);
- `tokens`: the model's token budget: the teacher's prompt (instruction, chat template) within
  teacher.max_length; the student's text within student.max_length (longer ones are fitted by
  section budgets, ckd_ehr.student.data.fit_texts: patient items go first, clauses last).
A sample counts as whole for a model when both hold. The demo is sized so that at least 95%
of samples are whole for both models.
"""
from __future__ import annotations

import logging

import numpy as np

from ckd_ehr import storage
from ckd_ehr.contracts import SPLITS, RunLayout
from ckd_ehr.phenotypes import phenotype_names
from ckd_ehr.text import diagnosis_title_column, efficacy_for, render_input
from ckd_ehr.modeling.paths import resolve_model_path
from ckd_ehr.modeling.prompts import encode_texts, load_tokenizer

log = logging.getLogger(__name__)


def _items(value) -> list:
    """A list column's cell as pandas gives it (an array, or None) -> a list."""
    return [] if value is None else list(value)


def _within_chars(df, top: dict, text_cfg) -> np.ndarray:
    """True where rendering the sample drops nothing under the character budgets."""

    names = phenotype_names()
    by_name = {names[p]: drugs for p, drugs in top.items()}
    dx_col = diagnosis_title_column(text_cfg)
    out = np.ones(len(df), dtype=bool)
    for i, (dx, rx, px, present) in enumerate(zip(df[dx_col], df["drugs"], df["procedure_titles"],
                                                   df["phenotypes_current"])):
        eff = efficacy_for(np.asarray(present), by_name)
        dropped = render_input(_items(dx), _items(rx), _items(px), efficacy=eff or None, cfg=text_cfg).dropped
        out[i] = not any(dropped.values())
    return out


def text_fit_report(cfg, layout: RunLayout) -> dict:
    """text_fit.json's content (see module doc), written to layout.text_fit."""
    # not at module level: transformers, loaded only when this runs
    from transformers import AutoTokenizer

    from ckd_ehr.eadf.stats import top_drugs

    top = top_drugs(storage.read_parquet(layout.efficacy_table), cfg.eadf.top_k)

    tc, sc = cfg.teacher, cfg.student
    # Counting, never truncating: tokenizers told no limit, so they do not warn that a text is
    # longer than the model's (that is what this report measures).
    teacher_tok = load_tokenizer(tc)
    teacher_tok.model_max_length = 10**9
    student_tok = AutoTokenizer.from_pretrained(resolve_model_path(sc.model), model_max_length=10**9)
    report = {"rule": "a sample is whole for a model when its EADF text drops no item or clause under the "
                      "character budgets and fits the model's token budget",
              "teacher": {"model": tc.model, "max_length": tc.max_length, "instruction": tc.instruction},
              "student": {"model": sc.model, "max_length": sc.max_length},
              "splits": {}}
    for split in SPLITS:
        df = storage.read_parquet(layout.augmented(split)).to_pandas()
        if not len(df):
            continue
        chars = _within_chars(df, top, cfg.text)
        texts = df["text_eadf"].tolist()
        t_len = np.array([len(x) for x in encode_texts(texts, teacher_tok, 10**9, tc.use_chat_template,
                                                        tc.instruction)])
        s_len = np.array([len(x) for x in student_tok(texts, add_special_tokens=True)["input_ids"]])
        entry = {"samples": len(df), "within_char_budgets": round(float(chars.mean()), 4)}
        for name, lengths, limit in (("teacher", t_len, tc.max_length), ("student", s_len, sc.max_length)):
            fits = lengths <= limit
            entry[name] = {"share_whole": round(float((fits & chars).mean()), 4),
                           "share_within_tokens": round(float(fits.mean()), 4),
                           "tokens_mean": round(float(lengths.mean()), 1),
                           "tokens_p95": round(float(np.percentile(lengths, 95)), 1)}
        report["splits"][split] = entry
        log.info("text fit %s: whole for the teacher %.3f, for the student %.3f (chars %.3f; tokens mean %.0f / %.0f)",
                 split, entry["teacher"]["share_whole"], entry["student"]["share_whole"], entry["within_char_budgets"],
                 entry["teacher"]["tokens_mean"], entry["student"]["tokens_mean"])
    storage.write_json(layout.text_fit, report)
    return report
