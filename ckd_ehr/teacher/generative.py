"""The generative teacher (`teacher.head: generative`; the teacher stage and soft labels build it
through ckd_ehr.teacher.train and the teacher artifact): the LLM reads its answer from its own
vocabulary, as the authors' LLaMA-Factory run did, instead of through the MLAPH projection head.

Training example: the prompt exactly as the MLAPH teacher's (ckd_ehr.modeling.prompts.encode_texts)
followed by the answer "Disease that the patient may acquire: A, B" (or "... None") and EOS;
the language-model loss counts the answer tokens only (the prompt's labels are -100). The
answer lists the present phenotypes in an order shuffled per sample and seed, so that the
likelihood of a name in the answer's first place says whether it belongs to the answer, not
where its label index puts it.

Scoring: per sample, one pass over prompt + answer prefix with the key-value cache kept, then
the 25 phenotype names scored as continuations in one pass on that cache, packed into one row
with a mask that lets each name see the context and itself only (`_names_packed`; kernels
without custom masks repeat the cache per name instead): score_j = mean log-probability of name j's tokens right after the prefix (mean, so long
names are not penalised for their length). Scores become probabilities through a per-phenotype
logistic calibration fitted on validation (`ScoreCalibration`); AUROC per phenotype does not
depend on it (a monotone map per phenotype), the soft labels and thresholds do.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ckd_ehr.phenotypes import phenotype_names
from ckd_ehr.modeling.prompts import encode_texts
from ckd_ehr.modeling.collate import pad_batch, stack_rows, pad_id
from ckd_ehr.teacher.model import add_lora, load_backbone, quiet_peft_deprecation
from ckd_ehr.contracts import TEACHER_ADAPTER
from ckd_ehr.teacher.data import predict_logits
from ckd_ehr.training import multilabel_metrics

ANSWER_PREFIX = "Disease that the patient may acquire:"
SCORE_PROMPTS = 4
"""Prompts scored together: their name pass holds 4 packed rows of the 25 names' tokens, i.e.
[4, ~135, vocabulary] logits (~110 MB in fp32 for SmolLM2's 49k vocabulary)."""
IGNORE = -100


def _enc(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class AnswerVocabulary:
    """The token pieces answers are built from, tokenised once: the answer is always the
    concatenation of these pieces, in training and in scoring alike (no boundary merges)."""

    prefix: list[int]
    names: list[list[int]]
    """Per phenotype (label order): the tokens of " <name>"."""
    separator: list[int]
    none: list[int]
    eos: list[int]

    @classmethod
    def build(cls, tokenizer) -> "AnswerVocabulary":
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        return cls(_enc(tokenizer, ANSWER_PREFIX), [_enc(tokenizer, " " + n) for n in phenotype_names()],
                   _enc(tokenizer, ","), _enc(tokenizer, " None"), eos)

    def answer(self, labels: Sequence[int], rng: np.random.Generator | None = None) -> list[int]:
        present = [j for j, y in enumerate(labels) if y]
        if rng is not None:
            present = [present[i] for i in rng.permutation(len(present))]
        out = list(self.prefix)
        for k, j in enumerate(present):
            out += (self.separator if k else []) + self.names[j]
        return out + (self.none if not present else []) + self.eos


def generative_example(prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """(input_ids, labels): the prompt is masked (IGNORE), only the answer is learned."""
    return list(prompt_ids) + list(answer_ids), [IGNORE] * len(prompt_ids) + list(answer_ids)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy over the unmasked labels ([B, T, V] logits, [B, T] labels)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             labels[:, 1:].reshape(-1), ignore_index=IGNORE)


def answer_loss(lm: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
    """lm_loss computed from the answer positions' logits only.

    Why: the answer is a few dozen tokens after a prompt of up to max_length, and the LM head's
    output is [tokens, vocabulary]: 49k (SmolLM2) to 152k (Qwen2.5) floats per token. Projecting
    every prompt position costs most of a step's time on a small model and ~0.6 GB of fp32
    logits per 1,024-token Qwen2.5 sample. transformers' `logits_to_keep` (a boolean [B, T]
    mask) projects only the positions that predict an answer token; the result equals lm_loss
    (tests/teacher/test_generative_teacher.py)."""
    predicts = labels[:, 1:] != IGNORE                                     # position t predicts label t+1
    keep = torch.nn.functional.pad(predicts, (0, 1), value=False)          # [B, T]
    logits = lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=keep).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels[:, 1:][predicts])


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s, dtype=torch.long), 1
    return ids, mask


@torch.inference_mode()
def phenotype_scores(model, prompt_ids: Sequence[int], vocab: AnswerVocabulary, pad_id: int = 0) -> np.ndarray:
    """[25] mean log-probabilities of each name right after the answer prefix (one prompt)."""
    return phenotype_scores_batch(model, [prompt_ids], vocab, pad_id)[0]


@torch.inference_mode()
def phenotype_scores_batch(model, prompts: Sequence[Sequence[int]], vocab: AnswerVocabulary,
                           pad_id: int = 0, packed: bool | None = None) -> np.ndarray:
    """[B, 25] name scores of B prompts: one cached pass over the B contexts (prompt + answer
    prefix, left-padded so that each ends at the last column), then one pass over the 25 names
    of each prompt on that cache (see the module docstring). Positions are given
    explicitly: a left-padded row's tokens count from its first real token, as when alone.
    `packed`: None = the packed name pass where the attention kernel takes a custom mask (sdpa,
    eager), else the repeated cache; True / False force one (tests)."""
    device = next(model.parameters()).device
    contexts = [list(p) + vocab.prefix for p in prompts]
    b, width, k = len(contexts), max(len(c) for c in contexts), len(vocab.names)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    ctx_mask = torch.zeros((b, width), dtype=torch.long)
    for i, c in enumerate(contexts):
        ids[i, width - len(c):], ctx_mask[i, width - len(c):] = torch.tensor(c, dtype=torch.long), 1
    ids, ctx_mask = ids.to(device), ctx_mask.to(device)
    out = model(input_ids=ids, attention_mask=ctx_mask, position_ids=(ctx_mask.cumsum(1) - 1).clamp(min=0),
                use_cache=True, logits_to_keep=1)                       # only the last position's logits
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)           # [B, V]: each name's first token
    impl = getattr(model.config, "_attn_implementation", "sdpa")
    if packed if packed is not None else impl in ("sdpa", "eager"):
        token_lp, name_mask = _names_packed(model, out.past_key_values, ctx_mask, vocab, first, impl == "sdpa")
    else:   # kernels without custom masks (flash attention): the cache repeated once per name
        token_lp, name_mask = _names_by_repeated_cache(model, out.past_key_values, ctx_mask, vocab, first, pad_id)
    m = name_mask.float()
    return ((token_lp * m).sum(1) / m.sum(1)).reshape(b, k).cpu().numpy()


def _names_packed(model, cache, ctx_mask: torch.Tensor, vocab: AnswerVocabulary, first: torch.Tensor,
                  boolean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The 25 names of each prompt as ONE packed row of sum(len(name)) tokens on the prompt's
    cache: a 4D mask lets name j's tokens see the whole context and name j's own earlier tokens
    only, and each name's positions start where the context ends, so every name is scored as if
    it alone followed the prefix. Why: repeating the cache once per name copies it 25 times
    (~1 GB per 900-token SmolLM2 prompt, most of the scoring time on a CPU); packed, the names
    cost ~135 tokens per prompt. Returns ([B x 25, T] token log-probabilities, [B x 25, T] mask)."""
    device, b, k = ctx_mask.device, ctx_mask.shape[0], len(vocab.names)
    flat = [t for name in vocab.names for t in name]
    owner = torch.tensor([j for j, name in enumerate(vocab.names) for _ in name], device=device)
    offset = torch.tensor([i for name in vocab.names for i in range(len(name))], device=device)
    n = len(flat)
    own = (owner[:, None] == owner[None, :]) & (offset[None, :] <= offset[:, None])          # [N, N]
    allowed = torch.cat([ctx_mask.bool()[:, None, :].expand(b, n, -1), own.expand(b, n, n)], dim=2)[:, None]
    mask = allowed if boolean else \
        torch.zeros(allowed.shape, dtype=first.dtype, device=device).masked_fill(~allowed, torch.finfo(first.dtype).min)
    ids = torch.tensor(flat, device=device).repeat(b, 1)
    positions = ctx_mask.sum(1)[:, None] + offset[None, :]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=False).logits
    # back to [B x 25, T] (T = the longest name): name j's token i (i >= 1) is predicted at its
    # own token i - 1; token 0 at the prefix's last position (`first`)
    width = max(len(name) for name in vocab.names)
    starts = np.cumsum([0] + [len(name) for name in vocab.names[:-1]])
    token_lp = torch.zeros((b * k, width), dtype=torch.float32, device=device)
    name_mask = torch.zeros((b * k, width), dtype=torch.long, device=device)
    for j, (name, start) in enumerate(zip(vocab.names, starts)):
        rows = torch.arange(b, device=device) * k + j
        name_mask[rows, :len(name)] = 1
        token_lp[rows, 0] = first[:, name[0]]
        if len(name) > 1:
            scored = logits[:, start:start + len(name) - 1].float()                          # [B, len - 1, V]
            target = torch.tensor(name[1:], device=device)
            token_lp[rows, 1:len(name)] = scored[:, torch.arange(len(name) - 1), target] - torch.logsumexp(scored, dim=-1)
    return token_lp, name_mask


def _names_by_repeated_cache(model, cache, ctx_mask: torch.Tensor, vocab: AnswerVocabulary, first: torch.Tensor,
                             pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same scores from B x 25 rows, one per (prompt, name), on the cache repeated 25 times."""
    device, b, k = ctx_mask.device, ctx_mask.shape[0], len(vocab.names)
    cache.batch_repeat_interleave(k)                                       # row r: prompt r // k, name r % k
    names, name_mask = _pad(vocab.names, pad_id)
    names, name_mask = names.to(device).repeat(b, 1), name_mask.to(device).repeat(b, 1)
    attention = torch.cat([ctx_mask.repeat_interleave(k, dim=0), name_mask], dim=1)
    positions = ctx_mask.sum(1).repeat_interleave(k)[:, None] + torch.arange(names.shape[1], device=device)
    logits = model(input_ids=names, attention_mask=attention, position_ids=positions, cache=cache,
                   use_cache=False).logits
    token_lp = torch.empty(names.shape, dtype=torch.float32, device=device)
    token_lp[:, 0] = first[torch.arange(b, device=device).repeat_interleave(k), names[:, 0]]
    if names.shape[1] > 1:
        # log-softmax at the name's own tokens only: logit - logsumexp, without writing out the
        # [B x 25, T - 1, V] log-probabilities (the pass's largest tensor)
        scored = logits[:, :-1].float()
        token_lp[:, 1:] = scored.gather(-1, names[:, 1:].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scored, dim=-1)
    return token_lp, name_mask


@torch.inference_mode()
def phenotype_scores_uncached(model, prompt_ids: Sequence[int], vocab: AnswerVocabulary) -> np.ndarray:
    """The same scores from 25 separate full passes (the reference the cached pass must equal)."""
    device = next(model.parameters()).device
    out = []
    context = list(prompt_ids) + vocab.prefix
    for name in vocab.names:
        ids = torch.tensor([context + name], dtype=torch.long, device=device)
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        positions = range(len(context) - 1, len(context) + len(name) - 1)
        out.append(float(np.mean([logp[p, t].item() for p, t in zip(positions, name)])))
    return np.array(out, dtype=np.float32)


class ScoreCalibration:
    """Per phenotype, a logistic map score -> probability fitted on validation (Platt scaling);
    a phenotype without both classes in validation gets its validation rate."""

    def __init__(self, slope: np.ndarray, intercept: np.ndarray):
        self.slope, self.intercept = np.asarray(slope, np.float64), np.asarray(intercept, np.float64)

    @classmethod
    def fit(cls, scores: np.ndarray, labels: np.ndarray, c: float = 1.0) -> "ScoreCalibration":
        # not at module level: sklearn, loaded only when this runs
        from sklearn.linear_model import LogisticRegression

        scores, labels = np.asarray(scores, np.float64), np.asarray(labels) > 0
        slope, intercept = np.zeros(scores.shape[1]), np.zeros(scores.shape[1])
        for j in range(scores.shape[1]):
            y = labels[:, j]
            if y.all() or not y.any():
                rate = np.clip(y.mean(), 1e-4, 1 - 1e-4)
                intercept[j] = np.log(rate / (1 - rate))
                continue
            x = scores[:, j:j + 1]
            mu, sd = x.mean(), x.std() or 1.0
            lr = LogisticRegression(C=c).fit((x - mu) / sd, y)
            slope[j] = lr.coef_[0, 0] / sd
            intercept[j] = lr.intercept_[0] - lr.coef_[0, 0] * mu / sd
        return cls(slope, intercept)

    def logits(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores, np.float64) * self.slope + self.intercept

    def to_json(self) -> str:
        return json.dumps({"slope": self.slope.tolist(), "intercept": self.intercept.tolist()})

    @classmethod
    def from_json(cls, text: str) -> "ScoreCalibration":
        d = json.loads(text)
        return cls(np.array(d["slope"]), np.array(d["intercept"]))


class GenerativeTeacher(torch.nn.Module):
    """A causal LM (usually peft-wrapped) whose 25 phenotype logits come from its vocabulary.

    forward(input_ids, attention_mask) on a padded batch of prompts -> [B, 25]: per row, the
    cached name scores (phenotype_scores), through the calibration when it has one (after
    training: fitted on validation), else the raw scores. Same call as TeacherModel, so the
    length-sorted prediction and the soft-label actors score it unchanged.
    forward(input_ids, attention_mask, labels) -> the language-model loss (training)."""

    def __init__(self, lm: torch.nn.Module, vocab: AnswerVocabulary, pad_id: int,
                 calibration: ScoreCalibration | None = None):
        super().__init__()
        self.lm, self.vocab, self.pad_id, self.calibration = lm, vocab, pad_id, calibration
        self.num_labels = len(vocab.names)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None):
        if labels is not None:
            return answer_loss(self.lm, input_ids, attention_mask, labels)
        rows = [ids[m.bool()].tolist() for ids, m in zip(input_ids.cpu(), attention_mask.cpu())]
        # SCORE_PROMPTS prompts per pass: the name pass holds SCORE_PROMPTS x 25 rows of logits
        scores = np.concatenate([phenotype_scores_batch(self.lm, rows[i: i + SCORE_PROMPTS], self.vocab, self.pad_id)
                                 for i in range(0, len(rows), SCORE_PROMPTS)])
        out = self.calibration.logits(scores) if self.calibration is not None else scores
        return torch.as_tensor(out, dtype=torch.float32, device=input_ids.device)


# --- training: the task's pieces (ckd_ehr.teacher.train.teacher_task picks them for head: generative)

def make_generative_examples(texts: Sequence[str], labels, tokenizer, max_length: int, use_chat_template: bool,
                             instruction_kind: str, seed: int = 0) -> list[dict]:
    """Prompt (exactly as the MLAPH teacher's, within the same `max_length`) + answer: the
    answer comes on top of the prompt's budget, so both teachers read the same prompt tokens."""

    vocab = AnswerVocabulary.build(tokenizer)
    prompts = encode_texts(list(texts), tokenizer, max_length, use_chat_template, instruction_kind)
    labels = np.asarray(labels, dtype=np.int8)
    out = []
    for i, prompt in enumerate(prompts):
        rng = np.random.default_rng([seed, i])   # each sample's answer order, fixed for the run
        ids, lm_labels = generative_example(prompt, vocab.answer(labels[i], rng))
        out.append({"input_ids": ids, "lm_labels": lm_labels, "length": len(ids), "labels": labels[i]})
    return out


class GenerativeCollate:
    """Examples -> ({input_ids, attention_mask, labels: the LM targets}, 25 phenotype labels)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]):

        inputs = pad_batch([e["input_ids"] for e in examples], self.pad_token_id)
        inputs["labels"] = pad_batch([e["lm_labels"] for e in examples], IGNORE)["input_ids"]
        return inputs, stack_rows([e["labels"] for e in examples])


def generative_loss(outputs: torch.Tensor, targets, progress: float) -> torch.Tensor:
    """The model's forward with labels already is the LM loss (GenerativeTeacher.forward)."""
    return outputs


def build_generative_teacher(cfg, tokenizer, seed: int | None = None) -> GenerativeTeacher:
    """A fresh trainable generative teacher from a TeacherConfig: causal LM + LoRA, no head."""

    if seed is not None:
        torch.manual_seed(seed)
    lm = load_backbone(cfg.model, cfg.gguf_file, cfg.train_dtype(), cfg.attn_implementation, lm_head=True)
    if cfg.use_gradient_checkpointing():
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm = add_lora(lm, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
    model = GenerativeTeacher(lm, AnswerVocabulary.build(tokenizer), pad_id(tokenizer))
    model.use_chat_template, model.instruction_kind = cfg.use_chat_template, cfg.instruction
    return model


def fit_calibration(cfg, checkpoint_dir: str, tokenizer, val_texts: Sequence[str], val_labels: np.ndarray
                    ) -> tuple[ScoreCalibration, dict]:
    """After training: the best checkpoint's name scores on validation -> the per-phenotype
    calibration, and the validation metrics of the calibrated teacher (macro AUROC does not
    depend on the calibration; the thresholded metrics do, and are in-sample here)."""
    # not at module level: peft, loaded only when this runs
    from peft import PeftModel


    lm = load_backbone(cfg.model, cfg.gguf_file, "float32", cfg.attn_implementation, lm_head=True)
    with quiet_peft_deprecation():
        lm = PeftModel.from_pretrained(lm, f"{checkpoint_dir}/{TEACHER_ADAPTER}").merge_and_unload()
    teacher = GenerativeTeacher(lm, AnswerVocabulary.build(tokenizer), pad_id(tokenizer)).eval()
    scores = predict_logits(teacher, tokenizer, list(val_texts), batch_size=8, max_length=cfg.max_length,
                            use_chat_template=cfg.use_chat_template, instruction_kind=cfg.instruction)
    cal = ScoreCalibration.fit(scores, val_labels)
    metrics = {f"val_{k}": v for k, v in multilabel_metrics(cal.logits(scores), val_labels).items()}
    return cal, metrics
