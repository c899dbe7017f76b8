"""Checkpoints between the loop and its host: the `Reporter` protocol the loop reports through,
`LocalReporter` (the loop in this process: tests, debugging), and which checkpoint a stage
keeps (`pick_best` on a validation metric, `kept_checkpoint` best or last)."""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from typing import Any, ContextManager, Iterator, Protocol, Sequence


class Reporter(Protocol):
    """What the loop needs of its host (Ray Train, or a test)."""

    def latest_checkpoint(self) -> ContextManager[str | None]:
        """The directory of the checkpoint to resume from (None: a fresh start)."""

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        """Record metrics and, when given, the checkpoint in `checkpoint_dir` (copied now: the
        loop deletes the directory after the call)."""


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def pick_best(scored: Sequence[tuple[Any, dict]], metric: str) -> tuple[Any, dict] | None:
    """The (checkpoint, metrics) pair best on `metric` (min for val_loss, else max) among those
    with a finite score; None when no checkpoint has one."""
    finite_ones = [(c, m) for c, m in scored if finite(m.get(metric))]
    if not finite_ones:
        return None
    pick = min if metric == "val_loss" else max
    return pick(finite_ones, key=lambda cm: cm[1][metric])


def kept_checkpoint(scored: Sequence[tuple[Any, dict]], latest: tuple[Any, dict], metric: str,
                    keep: str = "best") -> tuple[Any, dict]:
    """The checkpoint a stage uses: `best` = pick_best over the scored checkpoints (the latest
    when none has a finite score); `last` = the latest, whatever validation says (a
    fixed-length recipe, e.g. to measure what the training steps themselves do)."""
    if keep not in ("best", "last"):
        raise ValueError(f"keep must be 'best' or 'last', got {keep!r}")
    if keep == "last":
        return latest
    return pick_best(scored, metric) or latest


class LocalReporter:
    """A Reporter for running the loop in this process (tests, debugging): each checkpoint is
    copied to `directory`/checkpoint_NNNNNN with its metrics beside it (checkpoint_NNNNNN.json),
    every report is kept in `.reports`; a new LocalReporter on the same directory sees the
    earlier checkpoints and resumes from the latest."""

    def __init__(self, directory: str):
        self.directory = directory
        self.reports: list[dict] = []
        os.makedirs(directory, exist_ok=True)
        self.checkpoints: list[tuple[str, dict]] = []
        for name in sorted(n for n in os.listdir(directory) if n.startswith("checkpoint_") and n.endswith(".json")):
            with open(os.path.join(directory, name)) as f:
                self.checkpoints.append((os.path.join(directory, name[: -len(".json")]), json.load(f)))

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        yield self.checkpoints[-1][0] if self.checkpoints else None

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            dest = os.path.join(self.directory, f"checkpoint_{len(self.checkpoints):06d}")
            shutil.copytree(checkpoint_dir, dest)
            with open(dest + ".json", "w") as f:
                json.dump(metrics, f)
            self.checkpoints.append((dest, dict(metrics)))

    def best(self, metric: str) -> tuple[str, dict] | None:
        """(directory, metrics) of the best checkpoint on `metric` (pick_best)."""
        return pick_best(self.checkpoints, metric)
