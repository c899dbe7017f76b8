"""What the teacher is, for the generic Ray Train loop in ckd_ehr.training, and its task built
from the run directory (`teacher_task`, for the teacher stage, ckd_ehr.teacher.run, and for Tune).

Reads RUN/eadf/samples/{train,val}.parquet (contracts.AUGMENTED_SAMPLES) through storage.py
on the driver, so the run dir may be a URI, and tokenises them there once; the workers fetch
the token ids from Ray's object store (as the student's do). Distribution, checkpoints and
fault tolerance live in ckd_ehr.training; this file only says what the teacher is.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ckd_ehr import storage
from ckd_ehr.config import TeacherConfig
from ckd_ehr.contracts import AUGMENTED_SAMPLES, ContractError, RunLayout, check_schema
from ckd_ehr.modeling.frozen import layer_cache_key
# One definition of class balancing for both models; the teacher's loss beside the student's.
from ckd_ehr.modeling.losses import BCELoss, balanced_pos_weight  # noqa: F401  (re-exported for callers)
from ckd_ehr.training import ObjectStoreValue, TrainTask, subset_indices
from ckd_ehr.teacher.artifact import SaveTeacherWeights
from ckd_ehr.modeling.prompts import load_tokenizer
from ckd_ehr.teacher.data import Collate, make_examples, pad_id
from ckd_ehr.teacher.model import build_teacher, param_groups, teacher_model_size



def read_texts_and_labels(path: str, text_column: str) -> tuple[list[str], np.ndarray]:
    """Texts and hard labels of an AUGMENTED_SAMPLES file; only those two columns are read
    and checked against the contract (a wrong file is an error naming it and the column). The
    student's reader, ckd_ehr.student.data.read_split, also joins soft labels."""
    wanted = pa.schema([AUGMENTED_SAMPLES.field(text_column), AUGMENTED_SAMPLES.field("labels")])
    try:
        table = storage.read_parquet(path, columns=wanted.names)
    except (pa.ArrowInvalid, KeyError):
        fs, inner = storage.resolve(path)
        present = set(pq.read_schema(inner, filesystem=fs).names)
        missing = [name for name in wanted.names if name not in present]
        raise ContractError(f"{path}: missing column(s) {', '.join(missing)}") from None
    table = check_schema(table, wanted, path)
    texts = [t or "" for t in table.column(text_column).to_pylist()]
    labels = np.asarray(table.column("labels").to_pylist(), dtype=np.int8).reshape(len(texts), -1)
    return texts, labels


class TeacherData:
    """Both splits tokenised once on the driver, fetched by each worker from the object store
    (training.ObjectStoreValue). Tokenises at the first call or pickling, so building a task
    that never trains costs nothing."""

    def __init__(self, tc, train_path: str, val_path: str):
        self.tc, self.train_path, self.val_path = tc, train_path, val_path
        self._examples: ObjectStoreValue | None = None

    def _tokenise(self):
        tc = self.tc
        tok = load_tokenizer(tc)
        out = []
        for path, is_train in ((self.train_path, True), (self.val_path, False)):
            texts, labels = read_texts_and_labels(path, tc.text_column)
            # Tokenise only the rows training.fit keeps (same selection, so its own is a no-op).
            keep = subset_indices(len(texts), tc.max_train_samples, tc.seed) if is_train else \
                np.arange(min(len(texts), tc.max_eval_samples or len(texts)))
            texts, labels = [texts[i] for i in keep], labels[keep]
            if tc.head == "generative":
                # not at module level: imported only on this branch
                from ckd_ehr.teacher.generative import make_generative_examples

                out.append(make_generative_examples(texts, labels, tok, tc.max_length, tc.use_chat_template,
                                                    tc.instruction, tc.seed))
            else:
                out.append(make_examples(texts, labels, tok, tc.max_length, tc.use_chat_template, tc.instruction))
        return out[0], out[1]

    def _stored(self) -> ObjectStoreValue:
        if self._examples is None:
            self._examples = ObjectStoreValue(self._tokenise())
        return self._examples

    def __getstate__(self) -> dict:
        self._stored()   # on the driver, before the task ships: workers only fetch
        return dict(self.__dict__)

    def __call__(self):
        return self._stored().get()


class BuildTeacher:
    def __init__(self, tc):
        self.tc = tc

    def __call__(self):
        if self.tc.head == "generative":
            # not at module level: imported only on this branch
            from ckd_ehr.teacher.generative import build_generative_teacher

            return build_generative_teacher(self.tc, load_tokenizer(self.tc), seed=self.tc.seed)
        return build_teacher(self.tc, seed=self.tc.seed)


class TeacherSize:
    """ModelSize for strategy `auto`, from the backbone's config (no weights loaded)."""

    def __init__(self, tc):
        self.tc = tc

    def __call__(self):
        return teacher_model_size(self.tc)


class TeacherParamGroups:
    def __init__(self, tc):
        self.tc = tc

    def __call__(self, model):
        if self.tc.head == "generative":   # no head: one group, the LoRA weights
            return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": self.tc.lr,
                     "weight_decay": self.tc.weight_decay}]
        return param_groups(model, self.tc.lr, self.tc.head_lr, self.tc.weight_decay, self.tc.query_lr)


def teacher_feature_key(config: dict, dtype: str) -> str:
    """What besides the token ids decides the frozen teacher's pooled features (the probe's
    feature cache, ckd_ehr.modeling.feature_cache): backbone, layers kept, pooling, and the
    dtype and attention kernel the pass runs in. `config` is a TeacherConfig as a dict (as
    teacher.json holds it); `dtype` the resolved one (float32 on a CPU)."""
    return "teacher|" + "|".join(str(config.get(k)) for k in ("model", "gguf_file", "num_layers", "pooling",
                                                             "attn_implementation")) + f"|{dtype}"


def teacher_frozen_model_key(config: dict, dtype: str) -> str:
    """The model part of the frozen-layer cache key: the feature key without the pooling (the
    backbone's states below its top layers do not depend on it)."""
    return teacher_feature_key({**config, "pooling": "any"}, dtype)


def teacher_frozen_key(config: dict) -> str:
    """The frozen-layer cache key (ckd_ehr.modeling.frozen) of a teacher trained with
    `train_top_layers`: its model part, the top layers and the cache dtype, as the training loop
    builds it. `config` is a TeacherConfig as a dict (as teacher.json holds it)."""
    tc = TeacherConfig.model_validate(config)
    return layer_cache_key(teacher_frozen_model_key(config, tc.train_dtype()), tc.train_top_layers or 0,
                           tc.frozen_cache_dtype)


def teacher_frozen_cache(layout: RunLayout, meta: dict) -> tuple[str, str, int, str] | None:
    """(directory, key, top layers, dtype) of the frozen-layer states a teacher artifact's training
    cached (teacher.train_top_layers; `meta` its teacher.json), None when it cached none: the
    soft-label stage and evaluate's probe row run only the top layers on the rows found there."""
    tcfg = meta.get("config", {})
    if meta.get("head", "mlaph") != "mlaph" or not tcfg.get("train_top_layers"):
        return None
    directory = tcfg.get("frozen_cache_dir") or layout.teacher_frozen_cache
    if not storage.exists(directory):
        return None
    return directory, teacher_frozen_key(tcfg), int(tcfg["train_top_layers"]), tcfg.get("frozen_cache_dtype", "float32")


def teacher_task(tc, train_path: str, val_path: str, tokenizer=None, feature_cache: str | None = None,
                 frozen_cache: str | None = None) -> TrainTask:
    """The teacher's training task. `feature_cache`: where head_init probe keeps the frozen
    backbone's features; `frozen_cache`: where train_top_layers keeps the frozen layers' states
    (None: nowhere). Tune's trials pass the run's caches too, so they share them."""
    tokenizer = tokenizer or load_tokenizer(tc)
    if tc.head == "generative":   # the language-model loss on the answer; validation reports val_loss
        # not at module level: imported only on this branch
        from ckd_ehr.teacher.generative import GenerativeCollate, generative_loss

        return TrainTask(build_model=BuildTeacher(tc), load_data=TeacherData(tc, train_path, val_path),
                         collate=GenerativeCollate(pad_id(tokenizer)), loss_fn=generative_loss, eval_fn=None,
                         param_groups=TeacherParamGroups(tc), save_weights=SaveTeacherWeights(),
                         model_size=TeacherSize(tc))
    pos_weight = None
    if tc.pos_weight == "balanced":
        _, labels = read_texts_and_labels(train_path, tc.text_column)
        pos_weight = balanced_pos_weight(labels)
    # The frozen backbone's features of the probe's rows are kept: a teacher that keeps its probe
    # (step 0) gets its soft labels of those rows from them (ckd_ehr.soft_labels.scoring).
    task = TrainTask(build_model=BuildTeacher(tc), load_data=TeacherData(tc, train_path, val_path),
                     collate=Collate(pad_id(tokenizer)), loss_fn=BCELoss(pos_weight),
                     param_groups=TeacherParamGroups(tc), save_weights=SaveTeacherWeights(),
                     model_size=TeacherSize(tc), feature_cache=feature_cache,
                     feature_key=teacher_feature_key(tc.model_dump(mode="json"), tc.train_dtype()))
    task.frozen_cache = frozen_cache
    # (the loop adds the top layers and the cache dtype: teacher_frozen_key is the whole key)
    task.frozen_key = teacher_frozen_model_key(tc.model_dump(mode="json"), tc.train_dtype())
    return task
