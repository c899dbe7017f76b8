"""Teacher model: a decoder LLM backbone with LoRA adapters and the MLAPH head (25 logits).

The Multi-Label Adaptive Projection Head maps pooled hidden states straight to one logit per
phenotype (BCE), instead of reading labels from vocabulary logits. Three poolings:

- `last`: each sequence's TRUE last token, found from the attention mask, so it is right
  whatever the padding side (the release picked a pad token under right padding);
- `mean`: mean over the attended tokens only;
- `label_attention`: one learned query per phenotype attends over the token states, then a
  per-phenotype projection (25 separate dot products) gives that phenotype's logit.

Only LoRA and head parameters train; the backbone is frozen by peft.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..phenotypes import NUM_PHENOTYPES

POOLINGS = ("last", "mean", "label_attention")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last attended token; works for left and right padding."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(dim=1)


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
        mask = attention_mask.to(hidden.device).bool()
        if self.pooling == "last":
            idx = last_token_index(mask)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
            return self.proj(pooled)
        if self.pooling == "mean":
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
            return self.proj(pooled)
        # label_attention: scores [B, L, K], softmax over the attended tokens of each sequence.
        scores = torch.einsum("blh,kh->blk", hidden, self.queries) / math.sqrt(self.hidden_size)
        scores = scores.masked_fill(~mask.unsqueeze(-1), torch.finfo(scores.dtype).min)
        attn = scores.softmax(dim=1)
        pooled = torch.einsum("blk,blh->bkh", attn, hidden)       # [B, K, H]: one vector per label
        return (pooled * self.weight).sum(-1) + self.bias


class TeacherModel(nn.Module):
    """backbone (AutoModel, usually peft-wrapped) + MLAPH. forward -> logits [B, num_labels]."""

    def __init__(self, backbone: nn.Module, head: MLAPH):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return self.head(out.last_hidden_state, attention_mask)


def load_backbone(model: str, gguf_file: str | None = None, dtype: str | torch.dtype = "float32",
                  attn_implementation: str = "sdpa") -> nn.Module:
    """The base decoder (no LM head) from a local dir, cached hub id, `pkg:NAME`, or a GGUF file."""
    from transformers import AutoModel

    from ..models import resolve_model_path

    torch_dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
    kwargs = {"dtype": torch_dtype, "attn_implementation": attn_implementation}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file  # dequantised to `dtype` on load
    return AutoModel.from_pretrained(resolve_model_path(model), **kwargs)


def add_lora(backbone: nn.Module, rank: int, alpha: float, dropout: float, target_modules: list[str]) -> nn.Module:
    """Wrap the backbone with LoRA adapters; peft freezes every base weight."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    cfg = PeftLoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                         bias="none")
    return get_peft_model(backbone, cfg)


def build_teacher(cfg, seed: int | None = None) -> TeacherModel:
    """A fresh trainable teacher from a TeacherConfig: backbone + LoRA + randomly initialised head."""
    if seed is not None:
        torch.manual_seed(seed)
    backbone = load_backbone(cfg.model, cfg.gguf_file, cfg.dtype, cfg.attn_implementation)
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input grads, so the frozen embeddings stay frozen.
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    backbone = add_lora(backbone, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
    head = MLAPH(backbone.config.hidden_size, NUM_PHENOTYPES, cfg.pooling)
    return TeacherModel(backbone, head)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def param_groups(model: TeacherModel, lr: float, head_lr: float | None, weight_decay: float = 0.0) -> list[dict]:
    """AdamW groups: LoRA at `lr`, the head at `head_lr` (the release trains it at 1e-4)."""
    lora = [p for n, p in model.backbone.named_parameters() if p.requires_grad]
    head = [p for p in model.head.parameters() if p.requires_grad]
    return [{"params": lora, "lr": lr, "weight_decay": weight_decay, "name": "lora"},
            {"params": head, "lr": head_lr or lr, "weight_decay": weight_decay, "name": "head"}]
