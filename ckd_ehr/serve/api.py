"""The HTTP API of the served student, without Ray: schemas, validation, rendering, responses.

Everything here is plain Python so it can be tested (and fuzzed) in-process; `app.py` puts
it behind Ray Serve. `create_app(backend, ...)` builds the FastAPI app around any backend
with `info` (ModelInfo) and `async predict(texts) -> [N, 25] probabilities`.

Rendering follows training exactly: a structured record is rendered with
`ckd_ehr.text.render_input` under the artifact's TextConfig, with the efficacy clauses of
the artifact's training efficacy table for the phenotypes its diagnosis codes belong to
(label order, as `ckd_ehr.eadf.run.fuse_batch` does). Diagnoses arrive as ICD-9-CM codes; no
ICD-9 titles ship with ckd-ehr (licensing), so a code is rendered as its title only when the
artifact carries a title map (`diagnosis_titles.json`, code -> title), else as the code.
Patient data never reaches a log: only counts, status codes and request ids are logged.
`guard.RequestGuard` sits in front of the API: request ids, admission (503 + Retry-After),
body limits counted as the bytes arrive (413).
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol, Sequence

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ckd_ehr.config import ServeConfig, TextConfig
from ckd_ehr.phenotypes import multi_hot, normalize_icd9, phenotype_names, phenotypes_of_code
from ckd_ehr.text import efficacy_for, render_input
from ckd_ehr.serve.guard import RequestGuard, request_id_var
from ckd_ehr.serve.metrics import ServeMetrics
from ckd_ehr.data.icd10 import dotted_icd10, load_crosswalk, normalize_icd10

log = logging.getLogger("ckd_ehr.serve")

STRUCTURED_FIELDS = ("diagnoses", "medications", "procedures")
# ICD-9-CM diagnosis code shapes after normalisation: 3-5 digits, V + 2-4 digits, E + 3-4 digits.
_ICD9_DX = re.compile(r"^(\d{3,5}|V\d{2,4}|E\d{3,4})$")
_ICD10_DX = re.compile(r"^[A-Z]\d[0-9A-Z](\.[0-9A-Z]{1,4})?$")
_MAX_WARNINGS = 50       # per record: bounded, so a hostile record cannot blow up the response
_MAX_ECHO = 40           # characters of an unknown code echoed back in a warning
_MAX_NGRAM = 12          # words of the longest vocabulary item looked for in free text
NO_DIAGNOSES = "no diagnosis codes: the prediction rests on the other items alone"
GUESSING = ("nothing in this record is an item the model saw in training (diagnosis codes and titles, drugs, "
            "procedures, phenotype names): its probabilities are a guess, not a reading of the record")


# --- request / response schemas ----------------------------------------------------------

class Record(BaseModel):
    """One visit: structured fields (rendered by the server as in training) or free `text`."""

    model_config = ConfigDict(extra="forbid")

    diagnoses: list[str] | None = Field(None, description="Diagnosis codes in ICD-9-CM ('4019' or '401.9') or, "
                                        "with icd_version 10, ICD-10-CM ('I5023' or 'I50.23').")
    icd_version: Literal[9, 10] = Field(9, description="ICD-CM version of `diagnoses` (MIMIC-IV: 10 from "
                                        "October 2015; one version per record, as per admission in MIMIC-IV).")
    medications: list[str] | None = Field(None, description="Drug names as in PRESCRIPTIONS.drug.")
    procedures: list[str] | None = Field(None, description="Procedure titles (short_title) or ICD-9 procedure codes, rendered as given.")
    text: str | None = Field(None, description="Already rendered input text (used as is, no efficacy clauses added).")

    @model_validator(mode="after")
    def _one_kind(self):
        structured = any(getattr(self, f) is not None for f in STRUCTURED_FIELDS)
        if self.text is not None and structured:
            raise ValueError("a record has either `text` or structured fields (diagnoses/medications/procedures), not both")
        if self.text is None and not structured:
            raise ValueError("a record needs `text` or at least one of diagnoses/medications/procedures")
        return self

    def n_chars(self) -> int:
        if self.text is not None:
            return len(self.text)
        # +1 per item (its separator), so a flood of empty items counts too
        return sum(len(s) + 1 for f in STRUCTURED_FIELDS for s in (getattr(self, f) or []))


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    records: list[Record] = Field(..., min_length=1, description="Visits to score (at most serve.max_records).")


class RecordResult(BaseModel):
    probabilities: dict[str, float] = Field(..., description="Phenotype name -> probability at the next visit.")
    predicted: list[str] = Field(..., description="Phenotypes whose probability reaches the served threshold.")
    warnings: list[str] = Field(default_factory=list, description="Unknown codes, items dropped by the text budget, "
                                "no diagnoses, nothing known to the model (its answer is then a guess).")
    model_version: str = Field(..., description="artifact_id of the served student.")


class PredictResponse(BaseModel):
    model_version: str
    request_id: str = Field("-", description="Id of this request (also the x-request-id header and in the server's logs).")
    results: list[RecordResult]


class PhenotypeInfo(BaseModel):
    index: int
    name: str
    threshold: float
    efficacy_drugs: list[str] = Field(default_factory=list, description="Drugs of the efficacy clause added for this phenotype.")


class PhenotypesResponse(BaseModel):
    model_version: str
    phenotypes: list[PhenotypeInfo]


class Health(BaseModel):
    status: str
    model_version: str


# --- the model as the API sees it --------------------------------------------------------

@dataclass
class ModelInfo:
    """What the API needs to know about the loaded student (all from the artifact)."""

    artifact_id: str
    label_names: list[str]
    thresholds: list[float]
    text_config: TextConfig
    efficacy: dict[str, list[str]] = field(default_factory=dict)
    """Phenotype name -> top drugs; empty for students trained without EADF."""
    diagnosis_titles: dict[str, str] = field(default_factory=dict)
    """Code as in VISITS (normalised ICD-9, dotted ICD-10-CM) -> title, when the artifact
    carries a title map."""
    icd10_crosswalk: str = "hcup_ccs"
    """The ICD-10-CM -> phenotype crosswalk the training run used (data.icd10_crosswalk)."""
    vocabulary: frozenset[str] | None = None
    """item_key of every item training saw (drugs, procedures, diagnosis titles and codes,
    phenotype names), from the artifact's vocabulary.json; None for an artifact without one
    (then no record is called a guess)."""
    render: Callable[..., str] | None = None
    """The student's own renderer (StudentPredictor.render: render_input, then the same
    section-by-section shrinking to max_length tokens as training); None = render_input only."""

    def __post_init__(self):
        if len(self.label_names) != len(self.thresholds):
            raise ValueError(f"{len(self.label_names)} label names but {len(self.thresholds)} thresholds")
        if list(self.label_names) != phenotype_names():
            raise ValueError("the artifact's label names are not the 25 phenotypes in label order")


class Backend(Protocol):
    info: ModelInfo

    async def predict(self, records: list["Record"]) -> tuple[np.ndarray, list[list[str]]]:
        """[N, 25] probabilities and each record's warnings (render_and_predict, off the event loop)."""
        ...


# --- plain functions: validation, rendering, responses -----------------------------------

class TooLarge(Exception):
    """The request is over a size limit (answered 413); `reason` is the metrics label."""

    def __init__(self, message: str, reason: str = "too_many_records"):
        super().__init__(message)
        self.reason = reason


def _clean(s: str) -> str:
    # JSON may carry lone surrogates; tokenizers cannot encode them. Replace, never fail.
    return s.encode("utf-8", "replace").decode("utf-8")


def check_limits(req: PredictRequest, cfg: ServeConfig) -> None:
    """Raise TooLarge when the request has too many records or a record is too long."""
    if len(req.records) > cfg.max_records:
        raise TooLarge(f"{len(req.records)} records; at most {cfg.max_records} per request")
    for i, rec in enumerate(req.records):
        n = rec.n_chars()
        if n > cfg.max_text_chars:
            raise TooLarge(f"record {i}: {n} characters; at most {cfg.max_text_chars}", "record_too_long")


def item_key(item: str) -> str:
    """An item as the vocabulary check compares it: lower case, words of letters and digits."""
    return " ".join(re.findall(r"[0-9a-z]+", item.casefold()))


def text_knows(text: str, vocabulary: frozenset[str]) -> bool:
    """Whether any vocabulary item appears in `text` as a run of whole words."""
    words = item_key(text).split()
    return any(" ".join(words[i:i + n]) in vocabulary
               for n in range(1, _MAX_NGRAM + 1) for i in range(len(words) - n + 1))


def render_record(rec: Record, info: ModelInfo) -> tuple[str, list[str]]:
    """(model input text, warnings) for one record, rendered exactly as training did. Warned: an
    unknown code, a structured record without diagnoses, and (when the artifact carries its
    training vocabulary) a record in which nothing is known to the model."""
    if rec.text is not None:
        text = _clean(rec.text)
        guess = info.vocabulary is not None and not text_knows(text, info.vocabulary)
        return text, [GUESSING] if guess else []
    warnings: list[str] = []
    if rec.icd_version == 10:
        codes, present = _icd10_codes(rec.diagnoses or [], info)
    else:
        codes = [normalize_icd9(_clean(c)) for c in rec.diagnoses or []]
        codes = [c for c in codes if c]
        present = multi_hot(codes)
    titles = []
    for c in codes:
        title = info.diagnosis_titles.get(c)
        pattern = _ICD10_DX if rec.icd_version == 10 else _ICD9_DX
        known = title is not None or (rec.icd_version == 9 and bool(phenotypes_of_code(c))) or bool(pattern.match(c))
        if not known and len(warnings) < _MAX_WARNINGS:
            warnings.append(f"unknown diagnosis code '{c[:_MAX_ECHO]}' (rendered as given)")
        titles.append(title or c)
    efficacy = efficacy_for(present, info.efficacy)   # the clauses as EADF rendered them in training
    drugs = [_clean(s) for s in rec.medications or []]
    procs = [_clean(s) for s in rec.procedures or []]
    if not codes:
        warnings.append(NO_DIAGNOSES)
    if info.vocabulary is not None:
        known = bool(present.any()) or any(c in info.diagnosis_titles for c in codes) or \
            any(item_key(s) in info.vocabulary for s in drugs + procs)
        if not known:
            warnings.append(GUESSING)
    r = render_input(titles, drugs, procs, efficacy=efficacy or None, cfg=info.text_config)
    for section, n in r.dropped.items():
        if n:
            warnings.append(f"{n} {section} item(s) left out by the text budget")
    if info.render is not None:  # the student's renderer also fits the text to max_length
        return info.render(titles, drugs, procs, present), warnings
    return r.text, warnings


def _icd10_codes(raw: Sequence[str], info: ModelInfo) -> tuple[list[str], np.ndarray]:
    """ICD-10-CM codes as VISITS writes them (dotted) and their phenotypes through the
    training run's crosswalk, exactly as the MIMIC-IV loader maps them."""

    crosswalk = load_crosswalk(info.icd10_crosswalk)
    present = np.zeros(len(info.label_names), dtype=np.int8)
    codes = []
    for c in raw:
        code = normalize_icd10(_clean(c))
        if not code:
            continue
        present[list(crosswalk.lookup(code)[0])] = 1
        codes.append(dotted_icd10(code))
    return codes, present


def render_and_predict(records: Sequence[Record], info: ModelInfo,
                       predict_proba: Callable[[list[str]], np.ndarray]) -> tuple[np.ndarray, list[list[str]]]:
    """Render every record and score them in one batch: the CPU-bound part of a request, run in
    a worker thread (rendering tokenises to fit max_length; so does the forward pass)."""
    rendered = [render_record(r, info) for r in records]
    return predict_proba([t for t, _ in rendered]), [w for _, w in rendered]


def build_result(probs: Sequence[float], info: ModelInfo, warnings: list[str]) -> RecordResult:
    p = [float(x) for x in probs]
    return RecordResult(
        probabilities=dict(zip(info.label_names, p)),
        predicted=[n for n, x, t in zip(info.label_names, p, info.thresholds) if x >= t],
        warnings=warnings, model_version=info.artifact_id)


def phenotypes_response(info: ModelInfo) -> PhenotypesResponse:
    return PhenotypesResponse(model_version=info.artifact_id, phenotypes=[
        PhenotypeInfo(index=i, name=n, threshold=float(t), efficacy_drugs=list(info.efficacy.get(n, [])))
        for i, (n, t) in enumerate(zip(info.label_names, info.thresholds))])


def token_digest(token: str) -> str:
    """sha256 of a bearer token: replicas keep the digest, never the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()


def token_ok(presented: str | None, digest: str | None) -> bool:
    """True when no token is configured, or the presented one matches (constant time)."""
    if not digest:
        return True
    if presented is None:
        return False
    return hmac.compare_digest(token_digest(presented), digest)


# --- the FastAPI app ---------------------------------------------------------------------

def _validation_message(err: RequestValidationError) -> list[dict[str, Any]]:
    # FastAPI echoes the offending input by default; leave it out (it may be patient data).
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in err.errors()[:_MAX_WARNINGS]]


def create_app(backend: Backend | Callable[[], Backend], cfg: ServeConfig, token_sha256: str | None = None,
               metrics: ServeMetrics | None = None) -> FastAPI:
    """The FastAPI app: POST /v1/predict, GET /v1/phenotypes, GET /healthz, /openapi.json (and
    the /docs page with serve.api_docs).

    `backend` may be a zero-argument callable returning the backend (Serve binds it late).
    `token_sha256`: digest of the bearer token; None = no authentication. `metrics` counts
    rejections by reason (and the backend counts records); None = a private ServeMetrics.
    """
    metrics = metrics if metrics is not None else ServeMetrics()
    get_backend: Callable[[], Backend] = backend if callable(backend) and not hasattr(backend, "predict") else (lambda: backend)
    # FastAPI's /docs page loads its scripts from a public CDN: blank on a network without the
    # internet, so it is off unless asked for; /openapi.json is always served.
    app = FastAPI(title="ckd-ehr student", version="1", docs_url="/docs" if cfg.api_docs else None, redoc_url=None,
                  description="Next-visit phenotype prediction by the CKD-EHR student (arXiv 2506.15118).")
    app.add_middleware(RequestGuard, cfg=cfg, metrics=metrics)
    app.state.metrics = metrics
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        metrics.rejected("invalid")
        log.info("predict %s: 422", request_id_var.get())
        return JSONResponse({"detail": _validation_message(err)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        # FastAPI answers a body it cannot decode (not UTF-8) with 400; to clients every
        # unreadable body is the same kind of error as malformed JSON: 422.
        code = 422 if err.status_code == 400 else err.status_code
        if code == 422:
            metrics.rejected("invalid")
        return JSONResponse({"detail": err.detail}, status_code=code, headers=getattr(err, "headers", None))

    def auth(request: Request) -> None:
        header = request.headers.get("authorization", "")
        presented = header[7:] if header[:7].lower() == "bearer " else None
        if not token_ok(presented, token_sha256):
            metrics.rejected("unauthorized")
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        return Health(status="ok", model_version=get_backend().info.artifact_id)

    @app.get("/v1/phenotypes", response_model=PhenotypesResponse, dependencies=[Depends(auth)])
    async def phenotypes_route() -> PhenotypesResponse:
        return phenotypes_response(get_backend().info)

    @app.post("/v1/predict", response_model=PredictResponse, dependencies=[Depends(auth)],
              responses={413: {"description": "too many records or a record too long"},
                         401: {"description": "missing or wrong bearer token"}})
    async def predict(req: PredictRequest) -> PredictResponse:
        b = get_backend()
        try:
            check_limits(req, cfg)
        except TooLarge as exc:
            metrics.rejected(exc.reason)
            log.info("predict %s: 413 %s (%d records)", request_id_var.get(), exc.reason, len(req.records))
            raise HTTPException(413, str(exc)) from None
        probs, warnings = await b.predict(req.records)
        results = [build_result(p, b.info, w) for p, w in zip(probs, warnings)]
        metrics.guessed_records(sum(GUESSING in w for w in warnings))
        rid = request_id_var.get()
        log.info("predict %s: 200 (%d records)", rid, len(results))
        return PredictResponse(model_version=b.info.artifact_id, request_id=rid, results=results)

    return app
