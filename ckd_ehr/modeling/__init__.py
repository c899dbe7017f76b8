"""Model pieces shared by the teacher and the student, each written once.

- `collate`: pad token ids to a batch; batched prediction sorted by length, outputs in input order.
- `pooling`: hidden states -> head input (last, mean, cls; label attention).
- `losses`: the teacher's multi-label BCE and the student's distillation loss, side by side.
- `probe`: the linear probe (logistic regression on frozen pooled features).
- `paths`: where model weights come from (local paths, cached hub ids, `pkg:NAME`).
"""
