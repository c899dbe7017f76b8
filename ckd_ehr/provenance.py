"""What code a run trained at: the git commit and dirty state, read at run time, and a content
hash of the `ckd_ehr/` package, which exists also where there is no git metadata (a copy of the
tree, an installed wheel, a Ray worker's working_dir). Every stage of a pipeline run records it
in the run's manifest; the study lists it per seed and refuses to summarise seeds that trained
at different code unless told.
"""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
"""The ckd_ehr package directory whose files the content hash covers."""


def package_hash(root: Path = PACKAGE) -> str:
    """sha256 over every file under `root` (relative path and bytes, in sorted order), bytecode
    caches left out: equal for equal source, whatever the checkout or copy."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                       and p.suffix not in (".pyc", ".pyo")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=PACKAGE.parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _git_state() -> tuple[str | None, bool | None]:
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return None, None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return commit.strip(), None if status is None else bool(status.strip())


def code_state() -> dict:
    """{"commit": HEAD or None without git, "dirty": tracked files changed (None without git),
    "ckd_ehr_sha256": package_hash()}. Read anew on each call: code can change between the
    stages of a long run (a study once recorded its start commit beside later hashes)."""
    commit, dirty = _git_state()
    return {"commit": commit, "dirty": dirty, "ckd_ehr_sha256": package_hash()}


def short(state: dict | None) -> str:
    """'abc1234' (+ ' (dirty)') or 'no git', with the first 12 hex digits of the package hash."""
    if not state:
        return "unknown"
    commit = state.get("commit")
    head = "no git" if not commit else commit[:7] + (" (dirty)" if state.get("dirty") else "")
    return f"{head}, ckd_ehr {str(state.get('ckd_ehr_sha256'))[:12]}"
