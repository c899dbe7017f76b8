"""What the student is, for the generic Ray Train loop in ckd_ehr.training.

Distribution (ddp / deepspeed), length-grouped batches, the LR schedule, checkpoints,
best-by-metric, resume and failure injection all live in ckd_ehr.training; this file
supplies the model, the data, the collate and the loss as picklable callables, and builds
the task from the run directory (`build_student_task`, the one place, for the student stage and
for Tune), as ckd_ehr.teacher.train does for the teacher.

The driver tokenises once (after fitting texts to max_length) and puts the token ids in the
object store; each worker fetches them in `load_data` instead of re-reading parquet.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ckd_ehr.config import PipelineConfig
from ckd_ehr.contracts import RunLayout, student_variant
from ckd_ehr.modeling.collate import pad_batch, stack_rows
from ckd_ehr.modeling.losses import DistillLoss, balanced_pos_weight
from ckd_ehr.modeling.paths import resolve_model_path
from ckd_ehr.modeling.token_bag import token_bag_for
from ckd_ehr.student.data import (Encoded, align_units, encode, fit_texts, load_efficacy, read_split,
                                  read_unit_targets, variant_spec)
from ckd_ehr.student.model import build_student
from ckd_ehr.training import TRAINABLE, ObjectStoreValue, TrainTask
from ckd_ehr.training.batching import split_limit

log = logging.getLogger("ckd_ehr.student")


class BuildStudent:
    def __init__(self, model_path: str, pooling: str, seed: int, label_attention: bool = False,
                 relation_layer: int | None = None, attention_dropout: float | None = None, token_bag=None):
        self.model_path, self.pooling, self.seed = model_path, pooling, seed
        self.token_bag = token_bag   # ckd_ehr.modeling.token_bag.TokenBag or None
        self.label_attention, self.relation_layer = label_attention, relation_layer
        self.attention_dropout = attention_dropout

    def __call__(self):

        return build_student(self.model_path, self.pooling, seed=self.seed, label_attention=self.label_attention,
                             relation_layer=self.relation_layer, attention_dropout=self.attention_dropout,
                             token_bag=self.token_bag)


def examples(data: Encoded, with_teacher: bool, train: bool = False) -> list[dict]:
    """Encoded split -> the loop's example dicts (`length` drives length grouping; `train`
    marks training examples, whose loss may be class-balanced and distilled)."""
    out = []
    for i, ids in enumerate(data.input_ids):
        e = {"input_ids": ids, "length": len(ids), "labels": data.labels[i], "train": train}
        if with_teacher and data.teacher_probs is not None:
            e["teacher_probs"] = data.teacher_probs[i]
            e["teacher_logits"] = data.teacher_logits[i]
        if with_teacher and data.units is not None:
            e["token_units"] = data.units.token_units[i]
            for k in ("unit_attention", "unit_relation"):
                if getattr(data.units, k) is not None:
                    e[k] = getattr(data.units, k)[i]
        out.append(e)
    return out


def pad_unit_targets(batch: list[dict], width: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """token_units [B, width] (-1 padded) and the teacher's unit targets zero-padded to the
    batch's most units W: unit_attention [B, 25, W], unit_relation [B, W, W], unit_mask [B, W]."""
    n = max(1, max(e["unit_attention"].shape[-1] if "unit_attention" in e else len(e.get("unit_relation", []))
                   for e in batch))
    units = torch.full((len(batch), width), -1, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.bool)
    out = {}
    for j, e in enumerate(batch):
        units[j, : len(e["token_units"])] = torch.as_tensor(e["token_units"], dtype=torch.long)
        w = int(e["token_units"].max()) + 1 if len(e["token_units"]) else 0
        mask[j, :w] = True
    if "unit_attention" in batch[0]:
        att = torch.zeros((len(batch), batch[0]["unit_attention"].shape[0], n))
        for j, e in enumerate(batch):
            att[j, :, : e["unit_attention"].shape[-1]] = torch.as_tensor(e["unit_attention"])
        out["unit_attention"] = att
    if "unit_relation" in batch[0]:
        rel = torch.zeros((len(batch), n, n))
        for j, e in enumerate(batch):
            w = e["unit_relation"].shape[-1]
            rel[j, :w, :w] = torch.as_tensor(e["unit_relation"])
        out["unit_relation"] = rel
    out["unit_mask"] = mask
    return units, out


class StudentData:
    """On each worker: fetch the tokenised splits from the object store. Validation carries
    no teacher outputs, so its loss is the plain hard BCE for every variant."""

    def __init__(self, train: Encoded, val: Encoded):

        self.train, self.val = ObjectStoreValue(train), ObjectStoreValue(val)

    def __call__(self):
        return examples(self.train.get(), True, train=True), examples(self.val.get(), False)


class StudentCollate:
    """Pad a batch to its own longest sample; targets are labels (+ teacher outputs)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]):
        targets = {"labels": stack_rows([e["labels"] for e in batch]), "train": bool(batch[0].get("train", False))}
        if "teacher_probs" in batch[0]:
            for k in ("teacher_probs", "teacher_logits"):
                targets[k] = stack_rows([e[k] for e in batch])
        inputs = pad_batch([e["input_ids"] for e in batch], self.pad_id)
        if "token_units" in batch[0]:   # multi-granularity terms: the model returns its unit outputs
            inputs["token_units"], unit_targets = pad_unit_targets(batch, inputs["input_ids"].shape[1])
            targets.update(unit_targets)
        return inputs, targets


class StudentParamGroups:
    """AdamW groups: the encoder at `lr`, the head at `head_lr` (None: `lr`), the auxiliary
    label-attention queries at `query_lr` (None: the head's rate). Picklable."""

    def __init__(self, lr: float, head_lr: float | None, weight_decay: float, query_lr: float | None = None):
        self.lr, self.head_lr, self.weight_decay, self.query_lr = lr, head_lr, weight_decay, query_lr

    def __call__(self, model) -> list[dict]:
        head_lr = self.head_lr or self.lr
        groups = [{"params": [p for p in model.encoder.parameters() if p.requires_grad], "lr": self.lr,
                   "weight_decay": self.weight_decay, "name": "encoder"},
                  {"params": list(model.head.parameters()) + ([] if getattr(model, "bag_head", None) is None
                                                              else list(model.bag_head.parameters())),
                   "lr": head_lr, "weight_decay": self.weight_decay, "name": "head"}]
        queries = [q for q in (model.unit_queries, model.pool_queries) if q is not None]
        if queries:
            groups.append({"params": queries, "lr": self.query_lr or head_lr, "weight_decay": self.weight_decay,
                           "name": "queries"})
        return groups


def student_task(cfg, model_path: str, load_data, pad_id: int, distill: bool, pos_weight=None,
                 unit_weights: tuple[float, float] = (0.0, 0.0), token_bag=None) -> TrainTask:
    """cfg: StudentConfig; load_data: e.g. StudentData. `distill` False = hard-label variant
    (alpha 1, beta 0); pos_weight [25] (negatives / positives on training labels) balances the
    hard term of training batches; unit_weights = (beta_label, beta_relation) of the
    multi-granularity terms (DistillConfig.unit_weights)."""
    label, relation = unit_weights if distill else (0.0, 0.0)
    loss = DistillLoss(cfg.distill, hard_only=not distill, pos_weight=pos_weight, unit_weights=(label, relation))
    return TrainTask(build_model=BuildStudent(model_path, cfg.pooling, cfg.seed, label_attention=label > 0,
                                              relation_layer=cfg.distill.relation_layer if relation > 0 else None,
                                              attention_dropout=cfg.attention_dropout, token_bag=token_bag),
                     load_data=load_data, collate=StudentCollate(pad_id), loss_fn=loss,
                     param_groups=StudentParamGroups(cfg.lr, cfg.head_lr, cfg.weight_decay, cfg.query_lr),
                     probe_targets_of=loss.probe_targets)


def student_from_checkpoint(ckpt_dir: str, model_path: str, pooling: str, device: str = "cpu", token_bag=None):
    """The trained StudentModel from a checkpoint of ckd_ehr.training: trainable.safetensors holds
    every parameter that trained; under train_top_layers (train_state.json) the frozen ones are
    the pretrained model's, loaded from `model_path`. `token_bag`: the TokenBag it trained with."""

    # not at module level: safetensors, loaded only when this runs
    from safetensors.torch import load_file


    model = build_student(model_path, pooling, token_bag=token_bag)
    frozen: set[str] = set()
    state_file = os.path.join(ckpt_dir, "train_state.json")
    top = json.load(open(state_file)).get("train_top_layers") if os.path.exists(state_file) else None
    if top:
        model.freeze_below(top)
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        model.requires_grad_(True)
    # The unit terms' auxiliary label attention trains with the student but is no part of it.
    weights = {k: v for k, v in load_file(os.path.join(ckpt_dir, TRAINABLE)).items() if k != "unit_queries"}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or [k for k in missing if not k.startswith("encoder.pooler") and k not in frozen]:
        raise RuntimeError(f"{ckpt_dir}: checkpoint does not match the student "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device).eval()


@dataclass
class Prepared:
    column: str
    distill: bool
    splits: dict[str, Encoded]
    texts: dict[str, list[str]]
    fit: dict[str, dict]


def prepare_variant(cfg: PipelineConfig, variant: str, tokenizer, efficacy: dict) -> Prepared:
    """Read, join, fit and tokenise train / val / test for one variant."""
    s = cfg.student
    layout = RunLayout(cfg.run_dir)
    column, distill = variant_spec(variant)
    label, relation = s.distill.unit_weights(variant)
    splits, texts, fit = {}, {}, {}
    for split in ("train", "val", "test"):
        # soft labels are read only where they are used: the training loss
        soft_path = layout.soft_labels(split, student_variant(variant).soft_labels) if distill and split == "train" else None
        samples, soft = read_split(layout.augmented(split), soft_path, split_limit(s, split), seed=s.seed)
        t, stats = fit_texts(samples, tokenizer, s.max_length, column, efficacy, cfg.text, s.fit_shrink)
        splits[split] = encode(samples, soft, t, tokenizer, s.max_length)
        texts[split], fit[split] = t, stats.as_dict()
        if soft_path is not None and (label > 0 or relation > 0):   # the unit terms' targets, aligned
            targets = read_unit_targets(layout.unit_targets(split), samples.column("sample_id").to_pylist())
            splits[split].units = align_units(samples, t, tokenizer, s.max_length, cfg.text, targets,
                                              attention=label > 0, relation=relation > 0)
            fit[split]["units"] = splits[split].units.stats
            log.info("student %s: unit terms (label %.3g, relation %.3g) on %s units per sample in common "
                     "of the teacher's %.1f", variant, label, relation,
                     f"{splits[split].units.stats['mean_units_common']:.1f}", splits[split].units.stats["mean_units_teacher"])
    return Prepared(column, distill, splits, texts, fit)


def data_fingerprint(prep: Prepared) -> str:
    """Hash of what training sees: token ids, labels and teacher outputs of train and val."""
    h = hashlib.sha256()
    for split in ("train", "val"):
        e = prep.splits[split]
        h.update(np.concatenate([np.asarray(x, dtype=np.int32) for x in e.input_ids] or [np.zeros(0, np.int32)]).tobytes())
        h.update(np.asarray([len(x) for x in e.input_ids], dtype=np.int32).tobytes())
        for arr in (e.labels, e.teacher_probs):
            if arr is not None:
                h.update(np.ascontiguousarray(arr).tobytes())
        if e.units is not None:   # the unit terms' targets and alignment
            for rows in (e.units.token_units, e.units.unit_attention or [], e.units.unit_relation or []):
                for arr in rows:
                    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]


@dataclass
class StudentTraining:
    """A variant's training task and what its stage needs besides: the prepared splits, the
    tokenizer, the efficacy table."""

    task: TrainTask
    prep: Prepared
    tokenizer: Any
    model_path: str
    pad_id: int
    efficacy_table: Any

    @property
    def token_bag(self):
        """ckd_ehr.modeling.token_bag.TokenBag with student.token_bag (the model builder's), else None."""
        return self.task.build_model.token_bag


def build_student_task(cfg: PipelineConfig, variant: str) -> StudentTraining:
    """The one place the student's TrainTask is built, for the student stage and for Tune:
    read, fit and tokenise the variant's splits, put train / val in the object store, and
    class-balance the hard term when cfg.student.distill.class_balanced."""
    # not at module level: transformers, loaded only when this runs
    from transformers import AutoTokenizer


    s = cfg.student
    layout = RunLayout(cfg.run_dir)
    model_path = resolve_model_path(s.model)
    # model_max_length: texts past 512 tokens are encoded in windows, not an error to warn about
    tokenizer = AutoTokenizer.from_pretrained(model_path, model_max_length=s.max_length)
    eff_table, efficacy = load_efficacy(layout.efficacy_table, cfg.eadf.top_k)
    prep = prepare_variant(cfg, variant, tokenizer, efficacy)
    train = prep.splits["train"]
    pos_weight = balanced_pos_weight(train.labels).tolist() if s.distill.class_balanced else None
    pad_id = tokenizer.pad_token_id or 0
    bag = token_bag_for(tokenizer, cfg.text) if s.token_bag else None
    task = student_task(s, model_path, StudentData(train, prep.splits["val"]), pad_id, prep.distill, pos_weight,
                        unit_weights=s.distill.unit_weights(variant), token_bag=bag)
    # Variants reading the same text (hard_plain / distill_plain, hard_eadf / ckd_ehr) share the
    # frozen encoder's features: the probe's feature pass runs once per text, not per variant.
    # label attention's probe reads the mean pool (what its zero queries compute)
    task.feature_cache = layout.probe_features
    task.feature_key = f"{s.model}|{'mean' if s.pooling == 'label_attention' else s.pooling}"
    task.frozen_cache, task.frozen_key = s.frozen_cache_dir or layout.student_frozen_cache, s.model
    return StudentTraining(task, prep, tokenizer, model_path, pad_id, eff_table)
