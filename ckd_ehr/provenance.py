"""What code a run trained at: the git commit and dirty state, read at run time, and a content
hash of the `ckd_ehr/` package, which exists also where there is no git metadata (a copy of the
tree, an installed wheel, a Ray worker's working_dir). Every stage of a pipeline run records it
in the run's manifest; the study lists it per seed and refuses to summarise seeds that trained
at different code unless told.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
from pathlib import Path

from ckd_ehr.config.base import JOB_CONFIG_ENV

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


# who runs a stage -----------------------------------------------------------------------------

TERMINAL_JOB_STATES = {"STOPPED", "SUCCEEDED", "FAILED"}


def run_owner() -> dict:
    """This process as a stage's owner: host, pid, and the Ray job submission id when the pipeline
    runs as a `ray job submit` entrypoint. A job stopped or killed cannot write on its way out;
    the next reader recognises its stage as abandoned by asking whether the owner still lives."""
    job = None
    if os.environ.get(JOB_CONFIG_ENV):
        try:
            job = json.loads(os.environ[JOB_CONFIG_ENV]).get("metadata", {}).get("job_submission_id")
        except ValueError:
            job = None
    return {"host": socket.gethostname(), "pid": os.getpid(), "job_submission_id": job}


def owner_state(owner: dict, started: float, job_status=None) -> tuple[str, str]:
    """("alive" | "gone" | "unknown", why) for a stage's recorded owner. `started`: when the stage
    started (epoch seconds), to tell a live owner from a reused pid; `job_status`: a function
    submission id -> Ray job status, or None where no cluster is reachable."""
    # not at module level: only the stage loop and `status` need it
    import psutil

    job = owner.get("job_submission_id")
    if job and job_status is not None:
        try:
            status = job_status(job)
        except Exception:   # no state API on this cluster (no dashboard): fall back to the pid
            status = ""
        if status is None:
            return "gone", f"Ray job {job} is not known to this cluster"
        if status in TERMINAL_JOB_STATES:
            return "gone", f"Ray job {job} is {status}"
        if status:
            return "alive", f"Ray job {job} is {status}"
    if owner.get("host") != socket.gethostname() or not owner.get("pid"):
        return "unknown", f"owner {owner} cannot be checked from {socket.gethostname()}"
    if owner["pid"] == os.getpid():
        return "gone", "an earlier run in this process ended without finishing it"
    try:
        created = psutil.Process(owner["pid"]).create_time()
    except psutil.NoSuchProcess:
        return "gone", f"process {owner['pid']} on {owner['host']} has ended"
    if created > started + 1:   # the pid was reused by a later process
        return "gone", f"process {owner['pid']} on {owner['host']} has ended (its pid is reused)"
    return "alive", f"process {owner['pid']} on {owner['host']} is running"
