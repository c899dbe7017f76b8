"""The CKD-EHR student as a Hugging Face model: BertForSequenceClassification, pooled as trained.

Self-contained (torch + transformers only): `ckd-ehr export-hf` ships this file beside the
weights (save_pretrained copies the module of a class registered for an auto class), so
`AutoModelForSequenceClassification` / `pipeline("text-classification")` load it with
`trust_remote_code=True`, offline, where ckd_ehr is not installed. That is why the student's
`mean` / `cls` pooling (ckd_ehr.modeling.pooling) and windowed encoding
(ckd_ehr.student.model.encode_in_windows) are repeated here rather than imported;
tests/serve/test_serve_guard.py checks that the export gives the artifact's probabilities.

Why a subclass and not the stock class: stock BertForSequenceClassification feeds the
classifier tanh(pooler(h[CLS])). The student was trained on the mask-aware MEAN of the last
hidden states (or on h[CLS] itself, `cls`), with no pooler: the stock class cannot compute
that, and loading the student into it would silently give other probabilities. The subclass
changes only the pooling (no pooler layer at all); embeddings, encoder, classifier
(`classifier`, 25 outputs), config (`problem_type="multi_label_classification"`,
`id2label` = the 25 phenotypes) and tokenizer are the standard ones.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, BertModel
from transformers.modeling_outputs import SequenceClassifierOutput


class CkdEhrStudentConfig(BertConfig):
    model_type = "ckd-ehr-student"

    def __init__(self, student_pooling: str = "mean", **kwargs):
        super().__init__(**kwargs)
        self.student_pooling = student_pooling


class CkdEhrStudentForSequenceClassification(BertForSequenceClassification):
    """BertForSequenceClassification whose classifier reads the student's pooling, no pooler."""

    config_class = CkdEhrStudentConfig

    def __init__(self, config):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        # `label_attention` pooling: one query per label over the tokens, read by that label's row
        # of the classifier (ckd_ehr.modeling.pooling.label_attention_pool)
        self.label_queries = nn.Parameter(torch.zeros(config.num_labels, config.hidden_size)) \
            if config.student_pooling == "label_attention" else None
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, **kwargs):
        window = self.config.max_position_embeddings
        if input_ids is not None and input_ids.shape[1] > window and position_ids is None and inputs_embeds is None:
            # Longer than the encoder's positions: consecutive windows encoded on their own, as
            # ckd_ehr.student.model.encode_in_windows does in training (this file must stand alone).
            batch, width = input_ids.shape
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            n = -(-width // window)
            pad = n * window - width

            def cut(t):
                return nn.functional.pad(t, (0, pad), value=0).reshape(batch * n, window)

            ids, mask = cut(input_ids), cut(attention_mask)
            live = mask.any(dim=1)
            tt = None if token_type_ids is None else cut(token_type_ids)[live]
            h = self.bert(input_ids=ids[live], attention_mask=mask[live], token_type_ids=tt).last_hidden_state
            hidden = h.new_zeros(batch * n, window, h.shape[-1])
            hidden[live] = h
            hidden = hidden.reshape(batch, n * window, -1)[:, :width]
        else:
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                            position_ids=position_ids, inputs_embeds=inputs_embeds)
            hidden = out.last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)
        if self.label_queries is not None:
            scores = torch.einsum("blh,kh->blk", hidden, self.label_queries) / math.sqrt(hidden.shape[-1])
            scores = scores.masked_fill(~attention_mask.bool().unsqueeze(-1), torch.finfo(scores.dtype).min)
            pooled = torch.einsum("blk,blh->bkh", scores.softmax(dim=1), hidden)
            logits = (self.dropout(pooled) * self.classifier.weight).sum(-1) + self.classifier.bias
        else:
            if self.config.student_pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss = nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        return SequenceClassifierOutput(loss=loss, logits=logits)
