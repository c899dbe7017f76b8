"""Rendering a visit as text, in the authors' released template (see NOTES.md): the one
renderer that samples (text_plain), EADF (text_eadf), the student's refitting and Serve use.

`render_input` renders, `efficacy_for` picks the clauses of a visit (the phenotypes present at
visit i, in label order, that have listed drugs), `diagnosis_title_column` the titles shown,
`text_units` finds the clinical items of a rendered text again (the units that multi-granularity
distillation aligns teacher and student on).
`render_input` takes options: which instruction (if any), and a character
budget per section applied section by section, so a long diagnosis list can never push the
efficacy clauses (added by EADF, rendered last) out of the text. Items that do not fit are
dropped whole and counted in the result, never cut silently mid-word.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

import numpy as np

from ckd_ehr.config import TextConfig
from ckd_ehr.phenotypes import phenotype_names

INSTRUCTION_PREFIX = "Determine that the patient has one or more of the following diseases at the next visit: "


SHORT_INSTRUCTION = "Predict the diseases of the patient's next visit from this visit."
Instruction = Literal["paper", "short", "none"]
INSTRUCTIONS: tuple[str, ...] = ("paper", "short", "none")


def instruction(kind: Instruction = "paper") -> str:
    """The prompt's instruction. `paper`: the release's, naming the 25 phenotypes (about 176
    SmolLM2 tokens); `short`: one sentence (13 tokens); `none`: no instruction (an MLAPH head
    reads pooled states, never a generated answer, so the instruction only costs tokens)."""
    if kind == "paper":
        return INSTRUCTION_PREFIX + ", ".join(phenotype_names()) + "."
    if kind == "short":
        return SHORT_INSTRUCTION
    if kind == "none":
        return ""
    raise ValueError(f"instruction must be one of {', '.join(INSTRUCTIONS)}, got {kind!r}")


@dataclass
class Rendered:
    text: str
    dropped: dict[str, int] = field(default_factory=dict)
    """Items left out per section because of its budget (0 when everything fit)."""


def _fit(items: Sequence[str], budget: int, sep: str = ", ") -> tuple[str, int]:
    """Join as many whole items as fit into `budget` characters; return (text, dropped)."""
    out: list[str] = []
    used = 0
    for item in items:
        cost = len(item) + (len(sep) if out else 0)
        if used + cost > budget:
            break
        out.append(item)
        used += cost
    return sep.join(out), len(items) - len(out)


def _clean(items: Sequence[str] | None) -> list[str]:
    return [str(s).strip() for s in (items or []) if s is not None and str(s).strip()]


SECTIONS = {
    "paper": ("The patient-acquired disease is ", "The patient had used the following medication: ",
              "The surgical operation performed by the patient: "),
    "compact": ("Diagnoses: ", "Medications: ", "Procedures: "),
}
"""The three sections' openings (diagnoses, drugs, procedures) per `text.render`: the release's
sentences, or one word each (the same items, about 13 fewer tokens)."""
SECTION_DIAGNOSES, SECTION_DRUGS, SECTION_PROCEDURES = SECTIONS["paper"]
EMPTY_SECTION = "None"
ITEM_SEP = ", "
CLAUSE_OPENINGS = {"paper": "The medications that maybe have therapeutic effect on {p} are ",
                   "short": "Effective for {p}: ", "compact": "{p}: "}
"""How a clause about phenotype {p} begins: per `text.clauses` style, and `compact` under
`text.render: compact`, where one lead (COMPACT_CLAUSES_LEAD) opens all the clauses."""
COMPACT_CLAUSES_LEAD = "Effective drugs: "


def knowledge_lead(cfg: TextConfig) -> str:
    """The words that open EADF's clauses in texts rendered with `cfg`: the compact rendering's
    one lead, else the first clause's opening up to its phenotype. The student's token bag
    (ckd_ehr.modeling.token_bag) splits a text there."""
    if cfg.render == "compact":
        return COMPACT_CLAUSES_LEAD.strip()
    return CLAUSE_OPENINGS[cfg.clauses if cfg.clauses in CLAUSE_OPENINGS else "paper"].split("{p}")[0].strip()


def efficacy_clause(phenotype: str, drugs: Sequence[str], style: str = "paper") -> str:
    """One EADF clause: the phenotype and its top drugs, in the release's wording, a short one,
    or the compact rendering's (`compact`)."""
    opening = CLAUSE_OPENINGS[style if style in CLAUSE_OPENINGS else "paper"]
    return opening.format(p=phenotype) + ", ".join(drugs) + ";"


def render_input(
    diagnoses: Sequence[str] | None,
    drugs: Sequence[str] | None,
    procedures: Sequence[str] | None,
    efficacy: Mapping[str, Sequence[str]] | None = None,
    cfg: TextConfig | None = None,
) -> Rendered:
    """Render visit i. `diagnoses`/`procedures` are titles, `drugs` PRESCRIPTIONS.drug names,
    `efficacy` maps a phenotype present at visit i to its top drugs (EADF), in label order."""
    cfg = cfg or TextConfig()
    dx, n_dx = _fit(_clean(diagnoses), cfg.max_chars_diagnoses)
    rx, n_rx = _fit(_clean(drugs), cfg.max_chars_drugs)
    px, n_px = _fit(_clean(procedures), cfg.max_chars_procedures)
    compact = cfg.render == "compact"
    parts = [f"{opening}{items or EMPTY_SECTION}." for opening, items in zip(SECTIONS[cfg.render], (dx, rx, px))]
    dropped = {"diagnoses": n_dx, "drugs": n_rx, "procedures": n_px, "efficacy": 0}
    if efficacy:
        clauses = [efficacy_clause(p, d, "compact" if compact else cfg.clauses) for p, d in efficacy.items() if d]
        ef, dropped["efficacy"] = _fit(clauses, cfg.max_chars_efficacy, sep=" ")
        if ef:
            parts.append((COMPACT_CLAUSES_LEAD if compact else "") + ef[:-1] + ".")  # the release ends with '.'
    text = " ".join(parts)
    if cfg.instruction != "none":
        text = instruction(cfg.instruction) + " " + text
    return Rendered(text=text, dropped=dropped)


UNIT_KINDS = {"d": "diagnosis", "m": "medication", "p": "procedure", "c": "efficacy clause"}
"""Unit keys are the kind's letter and an ordinal: `d0` the first diagnosis shown, `m2` the
third drug, `p0` the first procedure, `c7` the clause about phenotype index 7 (label order)."""


def text_units(text: str, diagnoses: Sequence[str] | None, drugs: Sequence[str] | None,
               procedures: Sequence[str] | None) -> list[tuple[str, int, int]]:
    """The clinical items of a text that `render_input` rendered from these lists: (unit key,
    start, end) character spans, in text order, nothing of the instruction or the template.

    Read, not searched: each section holds a prefix of its (cleaned) item list joined by ", "
    (a budget drops whole items from the end), so the items are matched in order at known
    positions and a title that itself contains ", " is still one unit. Clauses are found by
    their opening (either wording) with one of the 25 phenotype names; each runs to the next
    clause or the end. A text not rendered from these lists raises ValueError. (One ambiguity
    remains: a first item literally named "None" whose section was emptied by its budget reads
    as that item.)"""
    units: list[tuple[str, int, int]] = []
    found = [(text.find(openings[0]), style) for style, openings in SECTIONS.items()]
    pos, style = min(((p, s) for p, s in found if p >= 0), default=(-1, "paper"))
    if pos < 0:
        raise ValueError(f"not a rendered visit (no {SECTION_DIAGNOSES!r}): {text[:80]!r}")
    for letter, marker, items in zip("dmp", SECTIONS[style], (diagnoses, drugs, procedures)):
        if not text.startswith(marker, pos):
            raise ValueError(f"expected {marker!r} at character {pos} of {text[:80]!r}...")
        pos += len(marker)
        matched = 0
        for item in _clean(items):
            if not text.startswith(item, pos):
                break
            units.append((f"{letter}{matched}", pos, pos + len(item)))
            matched += 1
            pos += len(item)
            if not text.startswith(ITEM_SEP, pos):
                break
            pos += len(ITEM_SEP)
        if not matched:
            if not text.startswith(EMPTY_SECTION, pos):
                raise ValueError(f"section {marker.strip()!r} of {text[:80]!r}... matches none of its items")
            pos += len(EMPTY_SECTION)
        if not text.startswith(".", pos):
            raise ValueError(f"section {marker.strip()!r} does not end after its items at character {pos}: "
                             f"{text[pos:pos + 40]!r} (a text rendered from other lists?)")
        pos += 1 + (text.startswith(" ", pos + 1))
    names = phenotype_names()
    if style == "compact" and text.startswith(COMPACT_CLAUSES_LEAD, pos):
        pos += len(COMPACT_CLAUSES_LEAD)
    styles = ("compact",) if style == "compact" else ("paper", "short")
    openings = [(k, CLAUSE_OPENINGS[s].format(p=name)) for k, name in enumerate(names) for s in styles]
    starts = []
    while pos < len(text):
        hit = next(((k, o) for k, o in openings if text.startswith(o, pos)), None)
        if hit is None:
            raise ValueError(f"expected an efficacy clause at character {pos}: {text[pos:pos + 40]!r}")
        starts.append((hit[0], pos))
        nxt = [text.find("; " + o, pos) for _, o in openings]
        nxt = [i for i in nxt if i >= 0]
        pos = min(nxt) + 2 if nxt else len(text)
    for j, (k, start) in enumerate(starts):
        end = starts[j + 1][1] - 1 if j + 1 < len(starts) else len(text)
        units.append((f"c{k}", start, end))
    return units


def diagnosis_title_column(cfg: TextConfig) -> str:
    """The SAMPLES / VISITS column whose titles the text shows (`text.titles`)."""
    return "diagnosis_titles" if cfg.titles == "long" else "diagnosis_short_titles"


def efficacy_for(present: Sequence[int], efficacy: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """The efficacy clauses' content of one visit: for each phenotype present at visit i
    (`present`: its 25-long multi-hot row), in label order, its listed drugs (`efficacy`:
    phenotype name -> top drugs); phenotypes without listed drugs get no clause."""
    names = phenotype_names()
    return {names[p]: list(efficacy[names[p]]) for p in range(len(present))
            if present[p] and efficacy.get(names[p])}


NO_DRUGS_LISTED = "none listed"
"""The drug list of a `names` control clause: the phenotype is named, no drug is."""
CONTROL_KINDS = {"text_names": "names", "text_random": "random"}
"""The study's control texts (AUGMENTED_SAMPLES columns, `eadf.control_texts: true`) and their kind."""


def control_efficacy(kind: str, sample_id: str, visit: Mapping[str, Sequence[str]],
                     efficacy: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """The control clauses of a visit whose EADF clauses are `visit` (efficacy_for's output);
    `efficacy` maps every phenotype to its listed drugs (the whole table's top_k).

    `names`: the same phenotypes, no drugs ("none listed"): what naming the present phenotypes
    alone adds. `random`: the same phenotypes, each with as many drugs as EADF listed for it,
    drawn without replacement from the drugs EADF lists for OTHER phenotypes (real listed drugs,
    paired with the wrong phenotype), seeded by (sample_id, phenotype): what the pairing adds.
    Both renderers (EADF's and the student's refitting) call this, so they draw the same drugs."""
    if kind == "names":
        return {p: [NO_DRUGS_LISTED] for p in visit}
    if kind != "random":
        raise ValueError(f"control kind must be names or random, got {kind!r}")
    out = {}
    for p, drugs in visit.items():
        pool = sorted({d for q, ds in efficacy.items() if q != p for d in ds} - set(drugs))
        seed = int(hashlib.sha256(f"{sample_id}|{p}".encode()).hexdigest()[:15], 16)
        k = min(len(drugs), len(pool))
        picked = np.random.default_rng(seed).choice(len(pool), size=k, replace=False) if k else []
        out[p] = [pool[i] for i in picked]
    return out
