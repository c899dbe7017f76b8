"""Teacher model: a decoder LLM backbone with LoRA adapters and the MLAPH head (25 logits).

The Multi-Label Adaptive Projection Head maps pooled hidden states straight to one logit per
phenotype (BCE), instead of reading labels from vocabulary logits. Three poolings
(ckd_ehr.modeling.pooling, shared with the student):

- `last`: each sequence's TRUE last token, found from the attention mask, so it is right
  whatever the padding side (the release picked a pad token under right padding);
- `mean`: mean over the attended tokens only;
- `label_attention`: one learned query per phenotype attends over the token states, then a
  per-phenotype projection (25 separate dot products) gives that phenotype's logit.

Only LoRA and head parameters train; the backbone is frozen by peft.
"""
from __future__ import annotations

import contextlib
import math
import warnings
import json
import os

import torch
from torch import nn
import torch.distributed as dist

from ckd_ehr.phenotypes import NUM_PHENOTYPES
from ckd_ehr.modeling.pooling import label_attention_pool, label_attention_weights, pool
from ckd_ehr.modeling.units import unit_attention, unit_relations, unit_vectors
from ckd_ehr.modeling.paths import resolve_model_path

POOLINGS = ("last", "mean", "label_attention")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class MLAPH(nn.Module):
    """Pooling + projection to `num_labels` logits, in the head's own dtype (float32 unless an
    engine such as DeepSpeed bf16 cast the head too), whatever the backbone dtype; the logits
    are returned as float32."""

    def __init__(self, hidden_size: int, num_labels: int = NUM_PHENOTYPES, pooling: str = "last"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        self.hidden_size = hidden_size
        self.num_labels = num_labels
        if pooling == "label_attention":
            # Small init keeps the initial attention close to uniform (a mean pool).
            self.queries = nn.Parameter(torch.randn(num_labels, hidden_size) * 0.02)
            self.weight = nn.Parameter(torch.randn(num_labels, hidden_size) * (1.0 / math.sqrt(hidden_size)))
            self.bias = nn.Parameter(torch.zeros(num_labels))
        else:
            self.proj = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._logits(hidden, attention_mask).float()

    def _logits(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # The head's dtype, not a fixed float32: DeepSpeed's bf16 mode casts every parameter,
        # the head included, and a float32 input to a bf16 Linear fails.
        hidden = hidden.to((self.proj.weight if self.pooling != "label_attention" else self.weight).dtype)
        if self.pooling in ("last", "mean"):
            return self.proj(self.pool(hidden, attention_mask))
        pooled = label_attention_pool(hidden, attention_mask, self.queries)  # [B, K, H]: one vector per label
        return (pooled * self.weight).sum(-1) + self.bias

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, H]: what a linear probe reads. `last` / `mean` as named; `label_attention`: the
        mean, which is what label attention computes with zero queries (where load_probe starts it)."""
        return pool(hidden, mask, "mean" if self.pooling == "label_attention" else self.pooling)

    def attention(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, T, K] label attention over the tokens (pooling `label_attention` only)."""
        if self.pooling != "label_attention":
            raise ValueError(f"pooling {self.pooling!r} has no per-label attention (needs label_attention)")
        return label_attention_weights(hidden.to(self.weight.dtype), mask, self.queries)

    def load_probe(self, probe) -> None:
        """Start at a ckd_ehr.modeling.probe.LinearProbe fitted on `pool`'s features. For label
        attention: zero queries (uniform attention = the mean pool the probe saw) and the probe's
        weights as the per-label projections, so the head starts at the probe's logits exactly."""
        # not at module level: importable without pyarrow (the Ray-free GPU benchmark, ckd_ehr.bench.deepspeed_gpu)
        from ckd_ehr.modeling.probe import load_linear

        if self.pooling != "label_attention":
            load_linear(self.proj, probe)
            return
        with torch.no_grad():
            self.queries.zero_()
            self.weight.copy_(torch.as_tensor(probe.weight, dtype=self.weight.dtype))
            self.bias.copy_(torch.as_tensor(probe.bias, dtype=self.bias.dtype))


class TeacherModel(nn.Module):
    """backbone (AutoModel, usually peft-wrapped) + MLAPH. forward -> logits [B, num_labels]."""

    def __init__(self, backbone: nn.Module, head: MLAPH):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.split = 0   # decoder layers below this index are frozen and cached (freeze_below)

    def _hidden(self, input_ids, attention_mask, cached) -> torch.Tensor:
        if cached is not None:
            return self.top(cached, attention_mask)
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                cached: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self._hidden(input_ids, attention_mask, cached), attention_mask)

    def features(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 cached: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled hidden states [B, H] (float32): what the projection reads (last / mean pooling)."""
        return self.head.pool(self._hidden(input_ids, attention_mask, cached), attention_mask).float()

    # training only the top layers (ckd_ehr.modeling.frozen): the decoder's forward run over a
    # slice of its layers. With inputs_embeds it skips the embedding and builds the causal mask and
    # the rotary positions for the slice exactly as for the whole stack (Llama, Qwen2, Mistral:
    # decoders whose forward takes inputs_embeds as the embedding output, unscaled).

    def _decoder(self) -> nn.Module:
        inner = self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone
        if not (hasattr(inner, "layers") and hasattr(inner, "norm") and hasattr(inner, "embed_tokens")):
            raise ValueError(f"train_top_layers needs a decoder with embed_tokens, layers and norm, "
                             f"not {type(inner).__name__}")
        return inner

    @contextlib.contextmanager
    def _slice(self, layers: nn.ModuleList, norm: nn.Module):
        decoder = self._decoder()
        saved = decoder.layers, decoder.norm
        decoder.layers, decoder.norm = layers, norm
        try:
            yield decoder
        finally:
            decoder.layers, decoder.norm = saved

    def freeze_below(self, top: int) -> None:
        """Freeze the embeddings and every decoder layer below the top `top`, LoRA included."""
        layers = self._decoder().layers
        if not 1 <= top <= len(layers):
            raise ValueError(f"train_top_layers must be 1..{len(layers)} for this teacher, got {top}")
        self.split = len(layers) - top
        for module in (self._decoder().embed_tokens, *layers[: self.split]):
            for p in module.parameters():
                p.requires_grad_(False)

    @torch.no_grad()
    def bottom(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T, H]: the output of the decoder layers below the top (before the final norm)."""
        layers = self._decoder().layers
        with self._slice(layers[: self.split], nn.Identity()) as decoder:
            return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def top(self, cached: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T, H]: the top layers and the final norm over cached bottom states."""
        decoder = self._decoder()
        dtype = decoder.embed_tokens.weight.dtype
        with self._slice(decoder.layers[self.split:], decoder.norm) as d:
            return d(inputs_embeds=cached.to(dtype), attention_mask=attention_mask, use_cache=False).last_hidden_state

    def load_probe(self, probe) -> None:
        """Set the head to a ckd_ehr.modeling.probe.LinearProbe (linear probe, then fine-tune)."""
        self.head.load_probe(probe)

    @torch.no_grad()
    def unit_targets(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, units: torch.Tensor,
                     n_units: int, relation_layer: int | None) -> dict[str, torch.Tensor]:
        """The teacher's side of multi-granularity distillation for one padded batch, `units`
        [B, T] the unit of each token (ckd_ehr.modeling.units): `logits` [B, K]; with label
        attention pooling `unit_attention` [B, K, W]; with `relation_layer` (a hidden_states
        index: -1 the last layer) `unit_relation` [B, W, W] and `unit_present` [B, W]."""

        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                            output_hidden_states=relation_layer is not None)
        last = out.last_hidden_state
        res = {"logits": self.head(last, attention_mask)}
        if self.head.pooling == "label_attention":
            res["unit_attention"] = unit_attention(self.head.attention(last, attention_mask), units, n_units)
        if relation_layer is not None:
            vectors, present = unit_vectors(out.hidden_states[relation_layer], units, n_units)
            res["unit_relation"], res["unit_present"] = unit_relations(vectors, present), present
        return res


def load_backbone(model: str, gguf_file: str | None = None, dtype: str | torch.dtype = "float32",
                  attn_implementation: str = "sdpa", lm_head: bool = False, num_layers: int | None = None) -> nn.Module:
    """The base decoder (no LM head; with `lm_head`, the causal LM the generative teacher needs)
    from a local dir, cached hub id, `pkg:NAME`, or a GGUF file. Under an active transformers
    HfDeepSpeedConfig with ZeRO-3 (ckd_ehr.training sets one for `zero3_partitioned_init`) the
    decoder is built inside deepspeed.zero.Init: partitioned as it loads. `num_layers` keeps
    only the first that many decoder layers (keep_first_layers)."""
    # not at module level: transformers, loaded only when this runs
    from transformers import AutoModel, AutoModelForCausalLM


    # `auto` without a device to decide by (e.g. a CPU load of an artifact): float32.
    torch_dtype = _DTYPES.get(dtype, torch.float32) if isinstance(dtype, str) else dtype
    kwargs = {"dtype": torch_dtype, "attn_implementation": attn_implementation}
    path = resolve_model_path(model)
    if not lm_head and not gguf_file and _zero3_active() and _safetensors_files(path):
        return keep_first_layers(load_partitioned(path, torch_dtype, attn_implementation), num_layers)
    if gguf_file:
        kwargs["gguf_file"] = gguf_file  # dequantised to `dtype` on load
    return keep_first_layers((AutoModelForCausalLM if lm_head else AutoModel).from_pretrained(path, **kwargs),
                             num_layers)


def keep_first_layers(model: nn.Module, num_layers: int | None) -> nn.Module:
    """The decoder cut to its first `num_layers` layers (None: all), config included, so the
    hidden states it returns are those of layer `num_layers`. Why a teacher would: a CPU run
    pays per layer, and a linear probe on a middle layer of a small LLM reads the phenotypes
    about as well as on the last (README, "The demo": the layer sweep of SmolLM2-135M)."""
    if num_layers is None:
        return model
    decoder = model.model if hasattr(model, "model") and hasattr(model.model, "layers") else model
    if not hasattr(decoder, "layers"):
        raise ValueError(f"teacher.num_layers: {type(model).__name__} has no decoder layers to cut")
    have = len(decoder.layers)
    if not 1 <= num_layers <= have:
        raise ValueError(f"teacher.num_layers: {num_layers} is not between 1 and the model's {have} layers")
    decoder.layers = decoder.layers[:num_layers]
    cut_config(model.config, num_layers)
    return model


def cut_config(conf, num_layers: int) -> None:
    """A decoder config told it has its first `num_layers` layers (per-layer lists included)."""
    conf.num_hidden_layers = num_layers
    if isinstance(getattr(conf, "layer_types", None), list):
        conf.layer_types = conf.layer_types[:num_layers]


def _zero3_active() -> bool:
    # not at module level: transformers, loaded only when this runs
    from transformers.integrations import is_deepspeed_zero3_enabled

    return bool(is_deepspeed_zero3_enabled())


def _safetensors_files(path) -> dict[str, str]:
    """{checkpoint key: file} of a local safetensors checkpoint (one file or an index); {} if none."""

    # not at module level: safetensors, loaded only when this runs
    from safetensors import safe_open

    path = str(path)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        with safe_open(single, framework="pt") as f:
            return {k: single for k in f.keys()}
    return {}


def load_partitioned(path, dtype: torch.dtype, attn_implementation: str) -> nn.Module:
    """The backbone of a safetensors checkpoint under ZeRO-3, each rank reading only its own
    shard of every weight: no rank ever holds the whole model, nor even one whole weight.

    transformers' own ZeRO-3 `from_pretrained` reads the complete state dict on rank 0, and its
    `from_config` re-initialises every weight through full gathers (measured on a 0.5B model
    with 2 ranks: ~1.1 copies per rank at peak). Here the model is built with exactly the
    contexts `from_config` uses under ZeRO-3 (deepspeed.zero.Init: each parameter partitioned
    as it is created; no weight initialisation; RoPE buffers kept in float32), then every rank
    copies its slice of each flattened weight (DeepSpeed's layout: rank r holds elements
    [r x shard, (r+1) x shard)) from the memory-mapped checkpoint, reading only the rows that
    slice spans. No collective is needed."""
    # not at module level: safetensors, loaded only when this runs
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModel
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import deepspeed_config, prevent_arange_dtype_change
    from transformers.modeling_utils import set_zero3_state

    import deepspeed

    if not deepspeed.comm.is_initialized():
        # zero.Init reads the world size from deepspeed.comm while parsing its config, before
        # it would initialise it itself: wrap the process group (Ray Train's) now.
        deepspeed.init_distributed()
    conf = AutoConfig.from_pretrained(str(path))
    # set_zero3_state tells from_config that zero.Init is already active (so it neither nests
    # another nor re-initialises the weights by gathering them).
    with no_init_weights(), prevent_arange_dtype_change(), \
            deepspeed.zero.Init(config_dict_or_path=deepspeed_config()), set_zero3_state():
        backbone = AutoModel.from_config(conf, dtype=dtype, attn_implementation=attn_implementation)
    files = _safetensors_files(path)
    prefix = getattr(backbone, "base_model_prefix", "")
    missing = []
    for name, param in backbone.named_parameters():
        key = name if name in files else f"{prefix}.{name}"
        if key not in files:
            missing.append(name)
            continue
        shard = param.ds_tensor
        if shard is None or getattr(shard, "final_location", None) is not None:
            raise ValueError(f"{name}: ZeRO-3 partitioned loading supports shards in memory, not NVMe offload "
                             "(set zero3_partitioned_init: false)")
        rank = dist.get_rank(group=param.ds_process_group) if dist.is_initialized() else 0
        start = shard.ds_numel * rank
        end = min(start + shard.ds_numel, param.ds_numel)
        if start >= end:
            continue
        shape = tuple(param.ds_shape)
        row = math.prod(shape[1:]) if len(shape) > 1 else 1
        r0, r1 = start // row, -(-end // row)
        with safe_open(files[key], framework="pt") as f:
            stored = f.get_slice(key)
            if tuple(stored.get_shape()) != shape:
                raise ValueError(f"{files[key]}: {key} has shape {tuple(stored.get_shape())}, the model wants {shape}")
            rows = stored[r0:r1]
        with torch.no_grad():
            shard.narrow(0, 0, end - start).copy_(rows.reshape(-1)[start - r0 * row: end - r0 * row].to(shard.dtype))
    if missing:
        raise ValueError(f"{path}: checkpoint has no weights for {len(missing)} parameter(s) of "
                         f"{type(backbone).__name__} (e.g. {', '.join(missing[:3])})")
    return backbone


def add_lora(backbone: nn.Module, rank: int, alpha: float, dropout: float, target_modules: list[str]) -> nn.Module:
    """Wrap the backbone with LoRA adapters; peft freezes every base weight."""
    # not at module level: peft, loaded only when this runs
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    cfg = PeftLoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                         bias="none")
    with quiet_peft_deprecation():
        return get_peft_model(backbone, cfg)


@contextlib.contextmanager
def quiet_peft_deprecation():
    """peft reads transformers' deprecated `is_gradient_checkpointing` property when it wraps
    or loads a model: a FutureWarning in every worker's log about code that is not ours.
    Silenced here, for that one message only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def build_teacher(cfg, seed: int | None = None) -> TeacherModel:
    """A fresh trainable teacher from a TeacherConfig: backbone + LoRA + randomly initialised head."""
    if seed is not None:
        torch.manual_seed(seed)
    backbone = load_backbone(cfg.model, cfg.gguf_file, cfg.train_dtype(), cfg.attn_implementation,
                             num_layers=cfg.num_layers)
    if cfg.use_gradient_checkpointing():
        # Non-reentrant checkpointing needs no input grads, so the frozen embeddings stay frozen.
        if hasattr(backbone, "activation_checkpointing_enable"):  # transformers 5's name (the old one warns)
            backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    backbone = add_lora(backbone, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
    head = MLAPH(backbone.config.hidden_size, NUM_PHENOTYPES, cfg.pooling)
    model = TeacherModel(backbone, head)
    # How its prompts are built, read by predict_logits (load_teacher sets the same from teacher.json).
    model.use_chat_template, model.instruction_kind = cfg.use_chat_template, cfg.instruction
    return model


def teacher_model_size(cfg):
    """ckd_ehr.training.ModelSize of the teacher a TeacherConfig builds, from the backbone's
    config alone (built on the meta device: no weights read or allocated): backbone
    parameters, LoRA parameters (rank x (in + out) per adapted Linear) and the head's."""
    # not at module level: transformers, loaded only when this runs
    from transformers import AutoConfig, AutoModel

    from ckd_ehr.training import DTYPE_BYTES, ModelSize

    kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
    conf = AutoConfig.from_pretrained(resolve_model_path(cfg.model), **kwargs)
    if cfg.num_layers is not None:
        cut_config(conf, min(cfg.num_layers, conf.num_hidden_layers))
    with torch.device("meta"):
        backbone = AutoModel.from_config(conf)
    total = sum(p.numel() for p in backbone.parameters())
    targets = set(cfg.lora.target_modules)
    lora = sum(cfg.lora.rank * (m.in_features + m.out_features) for name, m in backbone.named_modules()
               if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets)
    head = MLAPH(conf.hidden_size, NUM_PHENOTYPES, cfg.pooling)
    head_n = sum(p.numel() for p in head.parameters())
    return ModelSize(total_params=total + lora + head_n, trainable_params=lora + head_n,
                     param_bytes=DTYPE_BYTES[cfg.train_dtype()], hidden_size=conf.hidden_size,
                     num_layers=conf.num_hidden_layers)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def param_groups(model: TeacherModel, lr: float, head_lr: float | None, weight_decay: float = 0.0,
                 query_lr: float | None = None) -> list[dict]:
    """AdamW groups: LoRA at `lr`, the head at `head_lr` (the release trains it at 1e-4); with
    `query_lr`, the label-attention queries in a group of their own at that rate."""
    lora = [p for n, p in model.backbone.named_parameters() if p.requires_grad]
    queries = getattr(model.head, "queries", None)
    own = query_lr is not None and queries is not None and queries.requires_grad
    head = [p for p in model.head.parameters() if p.requires_grad and not (own and p is queries)]
    groups = [{"params": lora, "lr": lr, "weight_decay": weight_decay, "name": "lora"},
              {"params": head, "lr": head_lr or lr, "weight_decay": weight_decay, "name": "head"}]
    if own:
        groups.append({"params": [queries], "lr": query_lr, "weight_decay": weight_decay, "name": "queries"})
    return groups
