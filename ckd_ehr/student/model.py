"""The student: any Hugging Face encoder (AutoModel) + one linear layer to 25 logits.

Pooling is configurable and defaults to a mask-aware mean of the last hidden states:
MiniLM (the embedded default) was trained as a sentence encoder with mean pooling, and
a mean over the true tokens (pads excluded) does not depend on which side is padded.
`cls` takes the [CLS] hidden state (position 0, the classic BERT classifier input). Both are
ckd_ehr.modeling.pooling's, shared with the teacher.
"""
from __future__ import annotations

import os
from pathlib import Path
import warnings

import numpy as np
import torch
from torch import nn
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

from ckd_ehr.phenotypes import NUM_PHENOTYPES
from ckd_ehr.modeling.collate import predict_sorted
from ckd_ehr.modeling.paths import resolve_model_path
from ckd_ehr.modeling.pooling import pool
from ckd_ehr.modeling.token_bag import TokenBag, multi_hot
from ckd_ehr.modeling.pooling import label_attention_pool, label_attention_weights
from ckd_ehr.modeling.units import unit_attention, unit_relations, unit_vectors
from ckd_ehr.modeling.probe import LinearProbe, load_linear

STUDENT_POOLINGS = ("mean", "cls", "label_attention")

HEAD_FILE = "head.safetensors"


def encode_in_windows(encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      window: int, token_type_ids: torch.Tensor | None = None,
                      layer: int | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Last hidden states [B, T, H], also for T beyond the encoder's positions (BERT: 512).

    A longer row is cut into consecutive windows of `window` tokens, each encoded on its own
    (positions restart, no attention across windows) and put back in place, so mean pooling
    still covers every token: an EADF text keeps all its patient items and clauses instead of
    being cut. Windows holding only padding are not computed. Rows that fit take one pass,
    exactly as before. With `layer` (an index into hidden_states), also that layer's states:
    (last, layer)."""
    kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
    if layer is not None:
        kw["output_hidden_states"] = True

    def states(out):
        return out.last_hidden_state if layer is None else (out.last_hidden_state, out.hidden_states[layer])

    batch, width = input_ids.shape
    if width <= window:
        return states(encoder(input_ids=input_ids, attention_mask=attention_mask, **kw))
    n = -(-width // window)
    pad = n * window - width

    def cut(t: torch.Tensor) -> torch.Tensor:
        return nn.functional.pad(t, (0, pad), value=0).reshape(batch * n, window)

    ids, mask = cut(input_ids), cut(attention_mask)
    live = mask.any(dim=1)
    kw = {k: (cut(v)[live] if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    got = states(encoder(input_ids=ids[live], attention_mask=mask[live], **kw))

    def put_back(hidden: torch.Tensor) -> torch.Tensor:
        out = hidden.new_zeros(batch * n, window, hidden.shape[-1])
        out[live] = hidden
        return out.reshape(batch, n * window, -1)[:, :width]

    return put_back(got) if layer is None else tuple(put_back(h) for h in got)


def run_in_windows(run, x: torch.Tensor, attention_mask: torch.Tensor, window: int) -> torch.Tensor:
    """`run(x_window, mask_window)` -> [b, w, H] over consecutive windows of `window` tokens of
    x ([B, T] token ids or [B, T, H] hidden states), put back in place: [B, T, H]. The windows of
    encode_in_windows (positions restart, no attention across windows, all-padding windows not
    computed), for running a part of the encoder on its own (the frozen layers, the top layers).
    Windows are run in two groups, each padded only to its own longest window: a row's last,
    partial window (a 600-token row's 88 tokens) is not padded to a full window, which is about
    a tenth of the tokens of EADF texts; the results are the same (pads are masked)."""
    batch, width = attention_mask.shape
    if width <= window:
        return run(x, attention_mask)
    n = -(-width // window)
    pad = n * window - width

    def cut(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 2:
            return nn.functional.pad(t, (0, pad), value=0).reshape(batch * n, window)
        return nn.functional.pad(t, (0, 0, 0, pad), value=0).reshape(batch * n, window, t.shape[-1])

    mask = cut(attention_mask)
    lengths = mask.sum(dim=1)
    xs = cut(x)
    out = None
    for group in (lengths > window // 2, (lengths > 0) & (lengths <= window // 2)):
        if not group.any():
            continue
        w = int(lengths[group].max())
        got = run(xs[group][:, :w], mask[group][:, :w])
        if out is None:
            out = got.new_zeros(batch * n, window, got.shape[-1])
        out[group, :w] = got
    return out.reshape(batch, n * window, -1)[:, :width]


class StudentModel(nn.Module):
    """encoder + pooling + linear head -> 25 logits. For multi-granularity distillation
    (docs/method.md) it can also return, on training batches that carry `token_units`, its side
    of the unit terms: `unit_attention` from an auxiliary label-attention head (`unit_queries`,
    training only: the logits never read it, so the served model is the same architecture) and
    `unit_relation` from the hidden states of `relation_layer`. With a `token_bag`
    (ckd_ehr.modeling.token_bag) the logits add `bag_head` over the text's wordpiece set."""

    def __init__(self, encoder: nn.Module, pooling: str = "mean", num_labels: int = NUM_PHENOTYPES,
                 label_attention: bool = False, relation_layer: int | None = None,
                 token_bag: TokenBag | None = None):
        super().__init__()
        if pooling not in STUDENT_POOLINGS:
            raise ValueError(f"unknown pooling '{pooling}' ({' or '.join(STUDENT_POOLINGS)})")
        if token_bag is not None and pooling == "label_attention":
            raise ValueError("token_bag needs mean or cls pooling, not label_attention")
        # BERT's pooler (tanh layer over [CLS], trained for next-sentence prediction) is not
        # used by our pooling: dropped, so DDP sees no parameters without gradients.
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None
        self.encoder = encoder
        self.pooling = pooling
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)
        # zero: the bag adds nothing until the probe (or training) sets it
        self.token_bag = token_bag
        self.bag_head = nn.Linear(token_bag.width, num_labels, bias=False) if token_bag is not None else None
        if self.bag_head is not None:
            nn.init.zeros_(self.bag_head.weight)
            self.register_buffer("bag_lead", torch.tensor(token_bag.lead, dtype=torch.long), persistent=False)
        # `label_attention` pooling: one query per phenotype over the tokens (LAAT), each pooled
        # vector read by that phenotype's row of the head. Zero queries attend uniformly, i.e. the
        # mean pool: a probe fitted on mean-pooled features is then the model's exact start.
        self.pool_queries = nn.Parameter(torch.zeros(num_labels, encoder.config.hidden_size)) \
            if pooling == "label_attention" else None
        self.relation_layer = relation_layer
        self.split = 0   # layers below this index are frozen and cached (freeze_below)
        # Small init: the auxiliary label attention starts near uniform over the tokens.
        self.unit_queries = nn.Parameter(torch.randn(num_labels, encoder.config.hidden_size) * 0.02) \
            if label_attention else None

    @property
    def window(self) -> int:
        """Tokens the encoder takes in one pass (its position embeddings)."""
        return int(getattr(self.encoder.config, "max_position_embeddings", 512) or 512)

    # training only the top layers (ckd_ehr.modeling.frozen): the layers below are run once per
    # row and cached; `cached` hidden states then replace the input ids

    def _layers(self) -> nn.ModuleList:
        layers = getattr(getattr(self.encoder, "encoder", None), "layer", None)
        if layers is None or not hasattr(self.encoder, "embeddings") or self.encoder.config.is_decoder:
            raise ValueError(f"train_top_layers needs a BERT-like encoder (embeddings + encoder.layer), "
                             f"not {type(self.encoder).__name__}")
        return layers

    def freeze_below(self, top: int) -> None:
        """Freeze the embeddings and every layer below the top `top` (requires_grad False)."""
        layers = self._layers()
        if not 1 <= top <= len(layers):
            raise ValueError(f"train_top_layers must be 1..{len(layers)} for this encoder, got {top}")
        self.split = len(layers) - top
        for module in (self.encoder.embeddings, *layers[: self.split]):
            for p in module.parameters():
                p.requires_grad_(False)

    def _run_layers(self, hidden: torch.Tensor, attention_mask: torch.Tensor, layers) -> torch.Tensor:
        # not at module level: transformers, loaded only when this runs
        from transformers.masking_utils import create_bidirectional_mask

        mask = create_bidirectional_mask(config=self.encoder.config, inputs_embeds=hidden, attention_mask=attention_mask)
        for layer in layers:
            hidden = layer(hidden, mask)
        return hidden

    @torch.no_grad()
    def bottom(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra) -> torch.Tensor:
        """[B, T, H]: the frozen part's output (embeddings and the layers below the top), in windows."""
        layers = self._layers()[: self.split]
        return run_in_windows(lambda ids, m: self._run_layers(self.encoder.embeddings(input_ids=ids), m, layers),
                              input_ids, attention_mask, self.window)

    def top(self, cached: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T, H]: the top layers over the frozen part's cached output, in the same windows."""
        layers = self._layers()[self.split:]
        return run_in_windows(lambda h, m: self._run_layers(h, m, layers), cached, attention_mask, self.window)

    def _hidden(self, input_ids, attention_mask, cached, extra) -> torch.Tensor:
        if cached is not None:   # train_top_layers: the frozen layers' cached states
            return self.top(cached.to(self.head.weight.dtype), attention_mask)
        return encode_in_windows(self.encoder, input_ids, attention_mask, self.window, extra.get("token_type_ids"))

    def features(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 cached: torch.Tensor | None = None, **extra) -> torch.Tensor:
        """Pooled sentence vectors [B, H]: what a linear probe reads (the head itself under mean /
        cls pooling; the mean, which zero label-attention queries compute, under label_attention)."""
        hidden = self._hidden(input_ids, attention_mask, cached, extra)
        return pool(hidden, attention_mask, "mean" if self.pool_queries is not None else self.pooling)

    def bag(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, 2V] 0/1: the token bag of the rows (token_bag only)."""
        return multi_hot(input_ids, attention_mask, self.bag_lead, self.token_bag.vocab_size,
                         self.bag_head.weight.dtype)

    def logits(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
               input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T, H] -> [B, 25]: pooling and head (plus the bag head over `input_ids`, with a token bag)."""
        if self.pool_queries is None:
            out = self.head(pool(hidden, attention_mask, self.pooling))
            if self.bag_head is None:
                return out
            if input_ids is None:
                raise ValueError("a student with a token bag needs the token ids, also beside cached states")
            return out + self.bag_head(self.bag(input_ids, attention_mask)).to(out.dtype)

        pooled = label_attention_pool(hidden, attention_mask, self.pool_queries.to(hidden.dtype))   # [B, K, H]
        return (pooled * self.head.weight.to(pooled.dtype)).sum(-1) + self.head.bias.to(pooled.dtype)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_units: torch.Tensor | None = None, cached: torch.Tensor | None = None,
                **extra) -> torch.Tensor | dict[str, torch.Tensor]:
        """Logits [B, 25]; on a batch with `token_units` [B, T] (the unit of each token, -1 none),
        {'logits', 'unit_attention' [B, 25, W], 'unit_relation' [B, W, W]} as the model has them."""
        if token_units is None or (self.unit_queries is None and self.relation_layer is None):
            return self.logits(self._hidden(input_ids, attention_mask, cached, extra), attention_mask, input_ids)
        if cached is not None:
            raise ValueError("the multi-granularity unit terms need the whole encoder: leave train_top_layers unset")

        got = encode_in_windows(self.encoder, input_ids, attention_mask, self.window, extra.get("token_type_ids"),
                                layer=self.relation_layer)
        last, chosen = got if self.relation_layer is not None else (got, None)
        out = {"logits": self.logits(last, attention_mask, input_ids)}
        n_units = max(1, int(token_units.max()) + 1)
        if self.unit_queries is not None:
            attn = label_attention_weights(last, attention_mask, self.unit_queries)
            out["unit_attention"] = unit_attention(attn, token_units, n_units)
        if chosen is not None:
            vectors, present = unit_vectors(chosen, token_units, n_units)
            out["unit_relation"] = unit_relations(vectors, present)
        return out

    def load_probe(self, probe) -> None:
        """Set the head to a ckd_ehr.modeling.probe.LinearProbe (linear probe, then fine-tune); with a
        token bag the probe's weight is [25, H + 2V]: the pooled features', then the bag's."""

        hidden = self.head.in_features
        width = hidden + (self.bag_head.in_features if self.bag_head is not None else 0)
        if probe.weight.shape[1] != width:
            raise ValueError(f"probe of {probe.weight.shape[1]} features for a student reading {width}")
        load_linear(self.head, LinearProbe(probe.weight[:, :hidden], probe.bias, probe.c_value,
                                           probe.val_macro_auroc, probe.train_samples))
        if self.bag_head is not None:
            with torch.no_grad():
                self.bag_head.weight.copy_(torch.as_tensor(probe.weight[:, hidden:], dtype=self.bag_head.weight.dtype))


def load_encoder(path: str | os.PathLike, **kwargs) -> nn.Module:
    """AutoModel.from_pretrained without the pooler where the architecture has one (BERT-like:
    `add_pooling_layer=False`): the student never uses it. Loading a saved student with a
    pooler reported 'MISSING pooler.dense'; loading a pretrained encoder (which has one)
    without it would report the pooler's weights as UNEXPECTED: both are expected, so the
    pooler's keys (and only those) are ignored."""
    # not at module level: transformers, loaded only when this runs
    from transformers import AutoConfig, AutoModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    config = AutoConfig.from_pretrained(path)
    if getattr(config, "model_type", "") not in _POOLED_ENCODERS:
        return AutoModel.from_pretrained(path, **kwargs)
    return _without_pooler(MODEL_MAPPING[type(config)]).from_pretrained(path, add_pooling_layer=False, **kwargs)


def _without_pooler(base: type) -> type:
    """`base` ignoring the pooler's checkpoint keys; same __name__ (save_pretrained records the
    standard architecture), a module-level __qualname__ (so it pickles)."""
    qualname = f"_NoPooler{base.__name__}"
    if qualname not in globals():
        cls = type(base.__name__, (base,), {"_keys_to_ignore_on_load_unexpected": [r"^pooler\."],
                                            "__qualname__": qualname, "__module__": __name__})
        globals()[qualname] = cls
    return globals()[qualname]


# what encoder configs call the dropout on attention probabilities (BERT, RoBERTa, MPNet...; DistilBERT)
ATTENTION_DROPOUT_NAMES = ("attention_probs_dropout_prob", "attention_dropout")

# encoder families whose AutoModel takes add_pooling_layer (they build a pooler by default)
_POOLED_ENCODERS = {"bert", "roberta", "xlm-roberta", "camembert", "ernie", "mpnet"}


def quantize_int8(model: StudentModel) -> StudentModel:
    """Dynamic int8 quantisation of the encoder's linear layers (per-channel weights, activations
    quantised per batch) for CPU inference; the 25-way head stays fp32. In place; returns it."""


    with warnings.catch_warnings():  # torch.ao's deprecation notice (moving to torchao)
        warnings.simplefilter("ignore")
        model.encoder = quantize_dynamic(model.encoder, {nn.Linear: per_channel_dynamic_qconfig}, inplace=False)
    return model.eval()


class Bf16Encoder(nn.Module):
    """An encoder run under bf16 autocast, its hidden states handed back in fp32.

    Autocast runs the matrix products in bf16 and keeps LayerNorm, softmax and the residual
    sums in fp32, so pooling and the 25-way head see fp32 features. Measured on MiniLM-L6
    students (README "Serve"): largest probability difference from fp32 under 0.01, where
    casting the weights to bf16 as well doubled it and int8 reached 0.1-0.26."""

    def __init__(self, encoder: nn.Module, device_type: str = "cpu"):
        super().__init__()
        self.encoder = encoder
        self.device_type = device_type

    @property
    def config(self):
        return self.encoder.config

    def forward(self, **inputs):
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            out = self.encoder(**inputs)
        out.last_hidden_state = out.last_hidden_state.float()
        if getattr(out, "hidden_states", None) is not None:
            out.hidden_states = tuple(h.float() for h in out.hidden_states)
        return out


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Sapphire Rapids and later), where oneDNN's bf16
    matrix products are fast. Without AMX bf16 autocast ran slower than fp32 (README "Serve":
    0.61x on an AVX512-BF16 CPU without AMX; 1.7x in process on one with AMX)."""
    return bool(torch.cpu._is_amx_tile_supported())


def autocast_bf16(model: StudentModel, device: str = "cpu") -> StudentModel:
    """Run the encoder under bf16 autocast (Bf16Encoder); the head stays fp32. In place."""
    model.encoder = Bf16Encoder(model.encoder, torch.device(device).type)
    return model.eval()


def build_student(model: str, pooling: str = "mean", seed: int = 0, dtype: torch.dtype = torch.float32,
                  label_attention: bool = False, relation_layer: int | None = None,
                  attention_dropout: float | None = None, token_bag: TokenBag | None = None) -> StudentModel:
    """Pretrained encoder from `model` (directory, cached hub id or `pkg:NAME`), fresh head (and,
    for the unit terms, the auxiliary label attention / relation layer, see StudentModel).
    `attention_dropout` (None: the model's) sets the encoder config's attention-probability
    dropout, whatever the family calls it (StudentConfig.attention_dropout says why)."""
    # not at module level: transformers, loaded only when this runs
    from transformers import AutoConfig

    path = resolve_model_path(model)
    kwargs = {}
    if attention_dropout is not None:
        config = AutoConfig.from_pretrained(path)
        kwargs = {name: attention_dropout for name in ATTENTION_DROPOUT_NAMES if hasattr(config, name)}
    encoder = load_encoder(path, dtype=dtype, **kwargs)
    torch.manual_seed(seed)  # the head's initialisation is the only random part
    return StudentModel(encoder, pooling=pooling, label_attention=label_attention, relation_layer=relation_layer,
                        token_bag=token_bag)


def save_student(model: StudentModel, out_dir: str | os.PathLike) -> None:
    """`model/` (encoder save_pretrained) + `head.safetensors` under `out_dir` (local)."""
    # not at module level: safetensors, loaded only when this runs
    from safetensors.torch import save_file

    out = Path(out_dir)
    model.encoder.save_pretrained(out / "model")
    head = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
    if model.pool_queries is not None:   # label_attention pooling: its queries are part of the head
        head["queries"] = model.pool_queries.detach().cpu().contiguous()
    if model.bag_head is not None:   # token bag: its weights and what it needs from the tokenizer
        head["bag_weight"] = model.bag_head.weight.detach().cpu().contiguous()
        head["bag_lead"] = torch.tensor(model.token_bag.lead, dtype=torch.long)
        head["bag_vocab"] = torch.tensor([model.token_bag.vocab_size], dtype=torch.long)
    save_file(head, str(out / HEAD_FILE))


def load_student_model(in_dir: str | os.PathLike, pooling: str = "mean", device: str = "cpu") -> StudentModel:
    """Inverse of save_student."""
    # not at module level: safetensors, loaded only when this runs
    from safetensors.torch import load_file

    in_dir = Path(in_dir)
    encoder = load_encoder(in_dir / "model")
    head = load_file(str(in_dir / HEAD_FILE))
    bag_weight = head.pop("bag_weight", None)
    bag = TokenBag(tuple(head.pop("bag_lead").tolist()), int(head.pop("bag_vocab")[0])) if bag_weight is not None \
        else None
    model = StudentModel(encoder, pooling=pooling, token_bag=bag)
    queries = head.pop("queries", None)
    if (queries is None) != (model.pool_queries is None):
        raise ValueError(f"{in_dir / HEAD_FILE}: pooling {pooling!r} and the head's queries do not match")
    model.head.load_state_dict(head)
    with torch.no_grad():
        if queries is not None:
            model.pool_queries.copy_(queries)
        if bag_weight is not None:
            model.bag_head.weight.copy_(bag_weight)
    return model.to(device).eval()


class _PooledFeatures(nn.Module):
    """A student seen through its pooled features (what the head reads), for predict_sorted."""

    def __init__(self, model: StudentModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.features(input_ids, attention_mask)


def features_ids(model: StudentModel, input_ids: list[list[int]], pad_id: int, batch_size: int = 32,
                 device: str = "cpu") -> np.ndarray:
    """[N, H] pooled features of token id lists, in input order (batched as predict_ids)."""
    return predict_sorted(_PooledFeatures(model), input_ids, pad_id, batch_size, model.head.in_features,
                          device).outputs


def predict_ids(model: StudentModel, input_ids: list[list[int]], pad_id: int, batch_size: int = 32,
                device: str = "cpu") -> np.ndarray:
    """[N, 25] probabilities of token id lists, in input order. Sorted by length and padded per
    batch (ckd_ehr.modeling.collate.predict_sorted); the same function serves training-time
    evaluation, test predictions and the loaded artifact, so they agree exactly."""
    return predict_sorted(model, input_ids, pad_id, batch_size, model.head.out_features, device,
                          activation=torch.sigmoid).outputs
