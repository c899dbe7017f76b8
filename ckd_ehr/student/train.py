"""What the student is, for the generic Ray Train loop in ckd_ehr.training.

Distribution (ddp / deepspeed), length-grouped batches, the LR schedule, checkpoints,
best-by-metric, resume and failure injection all live in ckd_ehr.training; this file
supplies the model, the data, the collate and the loss as picklable callables.

The driver tokenises once (after fitting texts to max_length) and puts the token ids in the
object store; each worker fetches them in `load_data` instead of re-reading parquet. The one
function that builds the student's task for its stage and for Tune is
ckd_ehr.student.run.build_student_task.
"""
from __future__ import annotations

import os


from ckd_ehr.modeling.collate import pad_batch, stack_rows
from ckd_ehr.modeling.losses import DistillLoss
from ckd_ehr.training import TRAINABLE, TrainTask
from ckd_ehr.student.data import Encoded


class BuildStudent:
    def __init__(self, model_path: str, pooling: str, seed: int):
        self.model_path, self.pooling, self.seed = model_path, pooling, seed

    def __call__(self):
        from ckd_ehr.student.model import build_student

        return build_student(self.model_path, self.pooling, seed=self.seed)


def examples(data: Encoded, with_teacher: bool, train: bool = False) -> list[dict]:
    """Encoded split -> the loop's example dicts (`length` drives length grouping; `train`
    marks training examples, whose loss may be class-balanced and distilled)."""
    out = []
    for i, ids in enumerate(data.input_ids):
        e = {"input_ids": ids, "length": len(ids), "labels": data.labels[i], "train": train}
        if with_teacher and data.teacher_probs is not None:
            e["teacher_probs"] = data.teacher_probs[i]
            e["teacher_logits"] = data.teacher_logits[i]
        out.append(e)
    return out


class StudentData:
    """On each worker: fetch the tokenised splits from the object store. Validation carries
    no teacher outputs, so its loss is the plain hard BCE for every variant."""

    def __init__(self, train: Encoded, val: Encoded):
        from ckd_ehr.training import ObjectStoreValue

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
        return pad_batch([e["input_ids"] for e in batch], self.pad_id), targets


class StudentParamGroups:
    """AdamW groups: the encoder at `lr`, the head at `head_lr` (None: `lr`). Picklable."""

    def __init__(self, lr: float, head_lr: float | None, weight_decay: float):
        self.lr, self.head_lr, self.weight_decay = lr, head_lr, weight_decay

    def __call__(self, model) -> list[dict]:
        return [{"params": [p for p in model.encoder.parameters() if p.requires_grad], "lr": self.lr,
                 "weight_decay": self.weight_decay, "name": "encoder"},
                {"params": list(model.head.parameters()), "lr": self.head_lr or self.lr,
                 "weight_decay": self.weight_decay, "name": "head"}]


def student_task(cfg, model_path: str, load_data, pad_id: int, distill: bool, pos_weight=None) -> TrainTask:
    """cfg: StudentConfig; load_data: e.g. StudentData. `distill` False = hard-label variant
    (alpha 1, beta 0); pos_weight [25] (negatives / positives on training labels) balances the
    hard term of training batches."""
    return TrainTask(build_model=BuildStudent(model_path, cfg.pooling, cfg.seed),
                     load_data=load_data, collate=StudentCollate(pad_id),
                     loss_fn=DistillLoss(cfg.distill, hard_only=not distill, pos_weight=pos_weight),
                     param_groups=StudentParamGroups(cfg.lr, cfg.head_lr, cfg.weight_decay))


def student_from_checkpoint(ckpt_dir: str, model_path: str, pooling: str, device: str = "cpu"):
    """The trained StudentModel from a checkpoint of ckd_ehr.training (trainable.safetensors
    holds every parameter of the student: nothing is frozen)."""
    from safetensors.torch import load_file

    from ckd_ehr.student.model import build_student

    model = build_student(model_path, pooling)
    missing, unexpected = model.load_state_dict(load_file(os.path.join(ckpt_dir, TRAINABLE)), strict=False)
    if unexpected or [k for k in missing if not k.startswith("encoder.pooler")]:
        raise RuntimeError(f"{ckpt_dir}: checkpoint does not match the student "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device).eval()
