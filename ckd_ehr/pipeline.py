"""`ckd-ehr pipeline`: every stage in order in one run directory, with a manifest.

The manifest (RUN/manifest.json) records per stage: status, the hash of the config sections
the stage reads, its inputs (with fingerprints) and outputs (with row counts), timings and
package versions. `--resume` skips a stage whose config hash and input fingerprints match
a finished record; `--from`/`--to` pick a range. A failing stage is recorded as failed,
the finished ones stay intact, and the error names the stage.
"""
from __future__ import annotations

import logging
import os
import platform
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version

import pyarrow.parquet as pq

from ckd_ehr import storage
from ckd_ehr.config import PipelineConfig, config_hash, dump_yaml
from ckd_ehr.contracts import RunLayout
from ckd_ehr.stages import STAGES, Stage
from ckd_ehr.stages import stage as stage_named
from ckd_ehr.provenance import code_state, owner_state, run_owner
from ckd_ehr.ray_utils import check_shared_run_dir, init_ray

log = logging.getLogger(__name__)


class PipelineError(RuntimeError):
    """A stage failed; the message names it."""


def _rows(path: str) -> int | None:
    if not path.endswith(".parquet"):
        return None
    fs, inner = storage.resolve(path)
    try:
        return pq.ParquetFile(fs.open_input_file(inner)).metadata.num_rows
    except (FileNotFoundError, OSError):
        return None


def _versions() -> dict[str, str]:

    out = {"python": platform.python_version()}
    for pkg in ("ckd-ehr", "ray", "torch", "transformers", "peft", "deepspeed", "pyarrow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def stage_hash(stage: Stage, cfg: PipelineConfig) -> str:
    """Hash of the config a stage declares (Stage.sections: sections, or `section.field`)."""
    data = cfg.model_dump(mode="json")

    def value(entry: str):
        out = data
        for part in entry.split("."):
            out = out[part]
        return out

    return config_hash({k: value(k) for k in stage.sections})


def read_manifest(layout: RunLayout) -> dict:
    if storage.exists(layout.manifest):
        return storage.read_json(layout.manifest)
    return {"stages": {}}


def select_stages(from_stage: str | None, to_stage: str | None) -> list[Stage]:
    def index(name: str) -> int:
        try:
            return STAGES.index(stage_named(name))
        except KeyError as exc:
            raise PipelineError(exc.args[0]) from None

    start = index(from_stage) if from_stage else 0
    stop = index(to_stage) if to_stage else len(STAGES) - 1
    if start > stop:
        raise PipelineError(f"--from {from_stage} comes after --to {to_stage}")
    return list(STAGES[start:stop + 1])


def _same_config(record: dict, stage: Stage, cfg: PipelineConfig) -> bool:
    """Whether a stage's manifest record finished at the config it declares now."""
    return record.get("status") == "done" and record.get("config_hash") == stage_hash(stage, cfg)


def plan_resume(cfg: PipelineConfig, manifest: dict, stages: list[Stage] | None = None) -> dict[str, str]:
    """What `--resume` would rerun, without running anything: {stage: why} for each stage that is
    not done, whose declared config sections changed (stage_hash), or that reads an output or a
    cache of a stage planned before it (its input will be rewritten). Stages not named are skipped as
    unchanged (their input files, if touched by hand, are checked when the pipeline runs)."""
    stages = list(STAGES) if stages is None else stages
    layout = RunLayout(cfg.run_dir)
    plan: dict[str, str] = {}
    rewritten: dict[str, str] = {}   # output path -> the planned stage that writes it
    for stage in stages:
        record = manifest.get("stages", {}).get(stage.name, {})
        why = None
        if record.get("status") != "done":
            why = f"status {record.get('status', 'never run')}"
        elif not _same_config(record, stage, cfg):
            why = f"config changed in its sections ({', '.join(stage.sections)})"
        else:
            upstream = sorted({rewritten[p] for p in (*stage.inputs(cfg, layout), *stage.optional_inputs(cfg, layout),
                                                      *stage.caches(cfg, layout)) if p in rewritten})
            if upstream:
                why = f"reads the output of {', '.join(upstream)}"
        if why:
            plan[stage.name] = why
            # a cache the stage writes is rewritten too (the teacher's frozen states, which the
            # soft-label stage reads); a stage that only reads one adds nothing to it
            rewritten.update({p: stage.name for p in (*stage.outputs(cfg, layout), *stage.caches(cfg, layout))
                              if p not in rewritten})
    return plan


def ray_job_status(submission_id: str) -> str | None:
    """The status of a Ray job on the connected cluster (RUNNING, STOPPED, ...), None if unknown."""
    # not at module level: ray, loaded only when this runs
    from ray.util.state import list_jobs

    jobs = list_jobs(filters=[("submission_id", "=", submission_id)], raise_on_missing_output=False)
    if not jobs:
        return None
    status = jobs[0].status
    return str(getattr(status, "value", status)).rsplit(".", 1)[-1].upper()


def abandoned_stages(manifest: dict, job_status=None) -> dict[str, tuple[str, str]]:
    """Stages the manifest says are running: name -> (owner state, why). A job that was stopped
    or killed cannot write on its way out, so its stage stays "running" until a reader asks
    whether its owner (ckd_ehr.provenance.run_owner) still lives."""
    out = {}
    for name, record in manifest.get("stages", {}).items():
        if record.get("status") == "running":
            out[name] = owner_state(record.get("owner") or {}, record.get("started_s", 0.0), job_status)
    return out


def _abandoned(why: str) -> str:
    return f"abandoned: {why} before the stage finished (stopped or killed)"


def settle_abandoned(manifest: dict, layout: RunLayout, job_status=None) -> None:
    """Before a run: a stage left running by an owner that is gone is marked failed (and so
    reruns); one whose owner still runs stops this run (two runs would write the same files)."""
    changed = False
    for name, (state, why) in abandoned_stages(manifest, job_status).items():
        if state == "alive":
            raise PipelineError(f"stage {name} is still running in {layout.root} ({why}): wait for it or stop it")
        if state == "gone":
            manifest["stages"][name].update(status="failed", error=_abandoned(why))
            log.warning("stage %s: marked failed, %s before it finished", name, why)
            changed = True
        else:
            log.warning("stage %s is marked running and %s: it reruns", name, why)
    if changed:
        storage.write_json(layout.manifest, manifest)


def _required_inputs(stage: Stage, cfg: PipelineConfig, layout: RunLayout) -> dict[str, str]:
    """The stage's input fingerprints; PipelineError naming those that are missing."""
    inputs = {p: storage.fingerprint(p) for p in stage.inputs(cfg, layout) if p}
    missing = [p for p, fp in inputs.items() if fp is None]
    if missing:
        raise PipelineError(f"stage {stage.name}: input(s) missing: {', '.join(missing)} "
                            f"(run the earlier stages first, or drop --from)")
    return inputs


def run_pipeline(cfg: PipelineConfig, resume: bool = False, from_stage: str | None = None,
                 to_stage: str | None = None, dry_run: bool = False) -> dict:
    """Run the selected stages in order; return the manifest. `dry_run`: print and return what
    would run ({"plan": {stage: why}}, plan_resume under `resume`), touching nothing."""

    layout = RunLayout(cfg.run_dir)
    stages = select_stages(from_stage, to_stage)
    if dry_run:
        plan = plan_resume(cfg, read_manifest(layout), stages) if resume else {s.name: "selected" for s in stages}
        for s in stages:
            print(f"{s.name:<12} {'run: ' + plan[s.name] if s.name in plan else 'skip: unchanged'}")
        return {"plan": plan}
    storage.makedirs(cfg.run_dir)
    manifest = read_manifest(layout)
    manifest["versions"] = _versions()
    manifest["config"] = cfg.model_dump(mode="json")
    storage.write_text(layout.path("config.yaml"), dump_yaml(cfg))
    if stages:
        _required_inputs(stages[0], cfg, layout)   # a missing input is reported before Ray starts
    init_ray(cfg.ray)
    check_shared_run_dir(cfg.run_dir)   # before any stage writes where another node would read
    settle_abandoned(manifest, layout, ray_job_status)

    for i, stage in enumerate(stages, 1):
        record = manifest["stages"].get(stage.name, {})
        inputs = _required_inputs(stage, cfg, layout)
        chash = stage_hash(stage, cfg)
        if (resume and _same_config(record, stage, cfg) and record.get("inputs") == inputs
                and all(storage.fingerprint(p) is not None for p in record.get("outputs", {}))):
            log.info("[%d/%d] %s: unchanged, skipped (--resume)", i, len(stages), stage.name)
            record["skipped"] = True
            continue
        log.info("[%d/%d] %s: running", i, len(stages), stage.name)
        started = time.time()
        record = {"status": "running", "config_hash": chash, "inputs": inputs,
                  "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "started_s": started,
                  "owner": run_owner(), "code": code_state()}
        manifest["stages"][stage.name] = record
        storage.write_json(layout.manifest, manifest)
        try:
            result = stage.run(cfg)
        except Exception as exc:
            record.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                          seconds=round(time.time() - started, 1))
            storage.write_json(layout.manifest, manifest)
            raise PipelineError(f"stage {stage.name} failed: {exc}") from exc
        record.update(
            status="done", seconds=round(time.time() - started, 1), skipped=False,
            finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            outputs={p: {"rows": _rows(p), "fingerprint": storage.fingerprint(p)} for p in stage.outputs(cfg, layout)},
            summary=result if isinstance(result, dict) else None,
        )
        storage.write_json(layout.manifest, manifest)

    print(summary_table(manifest, [s.name for s in stages]))
    if "evaluate" in {s.name for s in stages} and storage.exists(layout.metrics):
        found = (storage.read_json(layout.metrics).get("summary") or {}).get("text")
        if found:   # the run's last lines say what it found, not only where the report is
            print(f"\nWhat this run found: {found}")
    report = layout.report_html
    if storage.exists(report):
        print(f"report: {report}")
    return manifest


def run_status(cfg: PipelineConfig) -> dict:
    """`ckd-ehr status`: each stage's state in the run directory, a stage left running by a job
    that was stopped or killed shown as failed (read only: the next --resume records it). Asks
    Ray about the owner's job where a cluster is reachable (RAY_ADDRESS), else its host and pid."""
    layout = RunLayout(cfg.run_dir)
    if not storage.exists(layout.manifest):
        raise PipelineError(f"{layout.manifest}: no such file (nothing has run in {layout.root})")
    manifest = read_manifest(layout)
    job_status = None
    if os.environ.get("RAY_ADDRESS"):
        # not at module level: ray, loaded only when this runs
        import ray

        if not ray.is_initialized():
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        job_status = ray_job_status
    for name, (state, why) in abandoned_stages(manifest, job_status).items():
        record = manifest["stages"][name]
        if state == "gone":
            record.update(status="failed", error=_abandoned(why))
        record["owner_state"] = why
    lines = [f"{'stage':<12} {'status':<8} {'seconds':>8}  note"]
    for stage in STAGES:
        rec = manifest["stages"].get(stage.name, {})
        note = rec.get("error") or rec.get("owner_state") or ""
        lines.append(f"{stage.name:<12} {rec.get('status', '-'):<8} {rec.get('seconds', '-'):>8}  {note}")
    print("\n".join(lines))
    return manifest


def summary_table(manifest: dict, names: list[str]) -> str:
    lines = [f"{'stage':<12} {'status':<8} {'seconds':>8}  outputs (rows)"]
    for name in names:
        rec = manifest["stages"].get(name, {})
        status = "skipped" if rec.get("skipped") else rec.get("status", "-")
        outs = ", ".join(f"{p.rsplit('/', 2)[-2]}/{p.rsplit('/', 1)[-1]}" + (f" ({o['rows']})" if o.get("rows") is not None else "")
                         for p, o in rec.get("outputs", {}).items())
        lines.append(f"{name:<12} {status:<8} {rec.get('seconds', 0):>8}  {outs}")
    return "\n".join(lines)
