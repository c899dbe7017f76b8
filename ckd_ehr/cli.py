"""`ckd-ehr`: one subcommand per pipeline stage.

Every subcommand takes `--config FILE` (YAML, see jobs/configs/) and any number of
`--set key.path=value` overrides; it builds one `PipelineConfig` and calls the stage's
library function. No logic lives here: the stage subcommands come from the one registry
(`ckd_ehr.stages`) that `ckd_ehr.pipeline` runs, and `jobs/run.py` (`ray job submit`) calls this CLI.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

log = logging.getLogger("ckd_ehr")


def _common(p: argparse.ArgumentParser, run_dir: bool = True) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config (see jobs/configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set split.seed=7 (repeatable)")
    if run_dir:
        p.add_argument("--run-dir", help="run directory (local path or s3:// URI); same as --set run_dir=...")


def load_cfg(args):
    # not at module level: `ckd-ehr --help` imports this module, and it stays light
    from ckd_ehr.config import PipelineConfig, load_config

    overrides = list(args.overrides)
    if getattr(args, "run_dir", None):
        overrides.append(f"run_dir={args.run_dir}")
    return load_config(PipelineConfig, args.config, overrides)


def _call(module: str, func: str, *a, **kw):
    return getattr(importlib.import_module(f"ckd_ehr.{module}"), func)(*a, **kw)


# --- handlers: each turns arguments into one library call ---------------------------------

def cmd_synth(args):
    cfg = load_cfg(args)
    synth = cfg.data.synth
    if args.patients is not None:
        synth = synth.model_copy(update={"patients": args.patients})
    if args.form:
        synth = synth.model_copy(update={"form": args.form})
    if args.seed is not None:
        synth = synth.model_copy(update={"seed": args.seed})
    # not at module level: `ckd-ehr --help` imports this module, and it stays light
    from ckd_ehr.config import SynthConfig, build
    synth = build(SynthConfig, synth.model_dump(), source="synth")
    return _call("data.synth.cohort", "write_cohort", args.out, synth)


def cmd_stage(stage):
    """`ckd-ehr <stage>`: the registry's function on the config, after the stage's own options."""
    def handler(args):
        cfg = load_cfg(args)
        if stage.name == "prepare" and args.mimic_dir:
            cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": "mimic",
                                                                            "mimic_dir": args.mimic_dir})})
        if stage.name == "evaluate" and args.allow_small:
            cfg = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"allow_small": True})})
        return stage.run(cfg)
    return handler


def cmd_pipeline(args):
    cfg = load_cfg(args)
    if args.mimic_dir:   # as `prepare --mimic-dir`: the MIMIC tables at DIR, whatever the config's data source
        # not at module level: imported only on this branch
        from ckd_ehr.config import PipelineConfig, build
        data = {**cfg.data.model_dump(), "source": "mimic", "mimic_dir": args.mimic_dir}
        cfg = build(PipelineConfig, {**cfg.model_dump(), "data": data}, source="--mimic-dir")
    return _call("pipeline", "run_pipeline", cfg, resume=args.resume,
                 from_stage=args.from_stage, to_stage=args.to_stage, dry_run=args.dry_run)


def cmd_status(args):
    return _call("pipeline", "run_status", load_cfg(args))


def cmd_study(args):
    if args.study_dir and not args.summarise_only:
        raise SystemExit("--study-dir goes with --summarise-only")
    return _call("study", "study_command", None if args.study_dir else load_cfg(args), study_dir=args.study_dir,
                 summarise_only=args.summarise_only, allow_mixed_commits=args.allow_mixed_commits)


def cmd_tune(args):
    cfg = load_cfg(args)
    return _call("tune.run", "run_tune", cfg, space_file=args.space, num_samples=args.num_samples,
                 experiment_dir=args.experiment_dir, resume=args.resume)


def cmd_tune_report(args):
    return _call("tune.run", "tune_report", args.experiment_dir, out_dir=args.out)


def cmd_serve(args):
    cfg = load_cfg(args)
    return _call("serve", "run_serve", cfg, artifact=args.artifact, blocking=True)


def cmd_export_hf(args):
    # not at module level: `ckd-ehr --help` imports this module, and it stays light
    from ckd_ehr.contracts import RunLayout
    from ckd_ehr.storage import exists

    cfg = load_cfg(args)
    layout = RunLayout(cfg.run_dir)
    metrics = args.metrics or (layout.metrics if exists(layout.metrics) else None)
    info = _call("student.export_hf", "export_hf", args.artifact or layout.student_artifact("ckd_ehr"), args.out,
                 metrics_path=metrics, data_source=args.data_source)
    print(f"ckd-ehr: exported {info['artifact_id']} to {args.out} ("
          + ("RESTRICTED: credentialed data, never share publicly" if info["restricted"] else "synthetic data") + ")")
    if args.push_to_hub:
        _call("student.export_hf", "push_to_hub", args.out, args.push_to_hub)
    return info


def cmd_bench(args):
    # bench eadf --validity: `--set synth.KEY=VALUE` sets a knob of its synthetic cohorts.
    args.synth_overrides = [o for o in args.overrides if o.startswith("synth.")]
    args.overrides = [o for o in args.overrides if not o.startswith("synth.")]
    cfg = load_cfg(args)
    return _call("bench", f"bench_{args.what.replace('-', '_')}", cfg, args)


def _add_model_commands(sub) -> None:
    """Subcommands on trained models: tune, tune-report, serve, export-hf."""
    p = sub.add_parser("tune", help="Ray Tune search over a space in tune_spaces/")
    _common(p)
    p.add_argument("--space", required=True, help="search space YAML (tune_spaces/*.yaml)")
    p.add_argument("--num-samples", type=int, help="trials (default: tune.num_samples)")
    p.add_argument("--experiment-dir", help="experiment directory (default RUN/tune/<space name>)")
    p.add_argument("--resume", action="store_true", help="restore an interrupted experiment")
    p.set_defaults(handler=cmd_tune)

    p = sub.add_parser("tune-report", help="CSV, best config YAML and plots of a Tune experiment")
    p.add_argument("experiment_dir", help="experiment directory")
    p.add_argument("--out", help="output directory (default: EXPERIMENT_DIR/report)")
    p.set_defaults(handler=cmd_tune_report)

    p = sub.add_parser("serve", help="serve a student artifact over HTTP with Ray Serve")
    _common(p)
    p.add_argument("--artifact", help="student artifact (default RUN/student/ckd_ehr/artifact)")
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("export-hf", help="a student artifact as a Hugging Face text-classification model + card")
    _common(p)
    p.add_argument("--artifact", help="student artifact (default RUN/student/ckd_ehr/artifact)")
    p.add_argument("--out", required=True, help="output directory (local or URI)")
    p.add_argument("--metrics", help="evaluate metrics.json for the card (default RUN/evaluate/metrics.json)")
    p.add_argument("--data-source", choices=["synthetic", "mimic"],
                   help="data the student was trained on, for artifacts that do not record it (else: restricted)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="upload after export (refused for credentialed data)")
    p.set_defaults(handler=cmd_export_hf)


def _add_bench_command(sub) -> None:
    """`ckd-ehr bench WHAT`: every benchmark's options on one subcommand."""
    p = sub.add_parser("bench", help="benchmarks that print figures")
    _common(p)
    p.add_argument("what", choices=["synth", "prepare", "eadf", "teacher", "soft-labels", "speedup", "serve",
                                    "padding", "zero3-load", "ceiling", "synth-signal", "train"])
    p.add_argument("--arch-only", action="store_true", help="speedup: random models from configs (Qwen2.5 vs BERT)")
    p.add_argument("--train-run", action="store_true", help="teacher: also a short end-to-end Ray Train run")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="teacher: cuda = the full-size GPU check (MFU of 7B LoRA training and scoring, "
                        "ckd_ehr.bench.deepspeed_gpu); cpu/auto = the in-process benchmark")
    p.add_argument("--patients", type=int, help="cohort size for data benchmarks")
    p.add_argument("--form", choices=["demo", "full", "mimic4"], help="synth/prepare: the cohort's table form")
    p.add_argument("--samples", type=int, help="samples for model benchmarks")
    p.add_argument("--model", choices=["student", "teacher"], help="train: which model's training to time")
    p.add_argument("--steps", type=int, help="train: optimiser steps timed per lever (default 20)")
    p.add_argument("--levers", help="train: comma-separated levers (default all: today,compact,top_layers,bf16,all)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per load level (serve)")
    p.add_argument("--validity", action="store_true",
                   help="eadf: precision / recall of the listed drugs on synthetic cohorts, null control, PNG")
    p.add_argument("--artifact", help="serve: student artifact (default RUN/student/ckd_ehr/artifact)")
    p.add_argument("--url", help="serve: measure this running endpoint instead of deploying one")
    p.add_argument("--records", choices=["long", "short"], default="long",
                   help="serve: record shape: long (full stay: ~20 drugs, 6-15 codes) or short (4 diagnoses, 2 drugs, 1 procedure)")
    p.add_argument("--replicas",
                   help="serve: replicas of the endpoint, each with cores/replicas torch threads (default: one per "
                        "core), or `config`: the serve section as `ckd-ehr serve` starts it")
    p.add_argument("--precisions", default="fp32,int8,bf16", help="serve: serve.precision values to measure")
    p.add_argument("--load-generator", choices=["wrk", "python"], default="wrk",
                   help="serve: wrk (compiled; `apt-get install wrk`) or the Python aiohttp generator")
    p.add_argument("--retry", default="honour",
                   help="serve: comma-separated client behaviours on a 503: honour (wait Retry-After), at-once (wrk only)")
    p.add_argument("--levels", help="serve: comma-separated client counts (default 1,16,64,400)")
    p.add_argument("--client-nice", type=int, default=19,
                   help="serve: niceness added to the load generator (CPU share; Ray workers run at nice 15)")
    p.add_argument("--agreement-samples", type=int, default=1000,
                   help="serve: samples for each precision's probability comparison with fp32 (0: skip)")
    p.add_argument("--repeats", type=int, help="eadf: alternating Ray Data / reference runs (medians; default 3)")
    p.add_argument("--out", help="write the figures as JSON here")
    p.add_argument("--check-only", action="store_true",
                   help="ceiling: only the HistGradientBoosting check of the stored ceiling's form, on --patients "
                        "(default 50,000), recorded in the stored file")
    p.add_argument("--no-check", action="store_true",
                   help="ceiling: skip the HistGradientBoosting check of the model's form (faster)")
    p.set_defaults(handler=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    # not at module level: `ckd-ehr --help` imports this module, and it stays light
    from ckd_ehr.stages import STAGES

    parser = argparse.ArgumentParser(
        prog="ckd-ehr",
        description="CKD-EHR on Ray: next-visit phenotype prediction by clinical knowledge distillation.",
        epilog="Every stage reads and writes a run directory laid out in ckd_ehr/contracts/layout.py.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="more log output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic cohort in MIMIC-III table format")
    _common(p, run_dir=False)
    p.add_argument("--out", required=True, help="output directory for the tables")
    p.add_argument("--patients", type=int, help="number of patients (MIMIC-III scale: 46520)")
    p.add_argument("--form", choices=["demo", "full", "mimic4"],
                   help="demo: .csv lowercase; full: .csv.gz UPPERCASE quoted; mimic4: MIMIC-IV hosp/*.csv.gz")
    p.add_argument("--seed", type=int, help="generator seed")
    p.set_defaults(handler=cmd_synth)

    for stage in STAGES:   # one subcommand per stage of the registry (ckd_ehr/stages.py)
        p = sub.add_parser(stage.command, help=stage.help)
        _common(p)
        p.set_defaults(handler=cmd_stage(stage))
        if stage.name == "prepare":
            p.add_argument("--mimic-dir",
                           help="directory with the MIMIC-III tables (.csv or .csv.gz) or MIMIC-IV's hosp/")
        if stage.name == "evaluate":
            p.add_argument("--allow-small", action="store_true",
                           help="evaluate a test split too small to judge (the report says so in a banner)")

    p = sub.add_parser("pipeline", help="run every stage in order in one run directory")
    _common(p)
    p.add_argument("--resume", action="store_true", help="skip stages whose config and inputs are unchanged")
    p.add_argument("--from", dest="from_stage", help="first stage to run")
    p.add_argument("--to", dest="to_stage", help="last stage to run")
    p.add_argument("--dry-run", action="store_true",
                   help="print which stages would run and why (with --resume: what changed), run nothing")
    p.add_argument("--mimic-dir",
                   help="directory with the MIMIC-III tables (.csv or .csv.gz) or MIMIC-IV's hosp/: "
                        "same as --set data.source=mimic --set data.mimic_dir=DIR")
    p.set_defaults(handler=cmd_pipeline)

    p = sub.add_parser("status", help="each stage's state in a run directory (a stage whose job was stopped: failed)")
    _common(p)
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("study", help="the study: every row over seeds on one split, contrasts with intervals")
    _common(p)
    p.add_argument("--summarise-only", action="store_true",
                   help="no training: collect the finished runs into RUN/study and rebuild its tables "
                        "(with --study-dir: from that directory alone)")
    p.add_argument("--study-dir", help="a study directory (RUN/study or a copy, e.g. under docs/study/) to "
                                       "summarise from alone, with --summarise-only")
    p.add_argument("--allow-mixed-commits", action="store_true",
                   help="summarise runs that trained at different code, naming each code state")
    p.set_defaults(handler=cmd_study)

    _add_model_commands(sub)
    _add_bench_command(sub)
    return parser


def quiet_cpu_deepspeed() -> None:
    """DeepSpeed, imported by transformers and peft even where it never runs, logs a WARNING
    ("Setting accelerator to CPU. If you have GPU ... unable to detect it") on every machine
    without CUDA. Naming the CPU accelerator, as that message asks, is the same choice without
    the warning; it is made only without CUDA and never over a DS_ACCELERATOR already set. Set
    before Ray starts, so Ray's workers inherit it."""
    if "DS_ACCELERATOR" in os.environ:
        return
    # not at module level: `ckd-ehr --help` imports this module, and it stays light
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_cpu_deepspeed()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    start = time.time()
    try:
        args.handler(args)
    except KeyboardInterrupt:
        print("ckd-ehr: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line unless --debug
        if args.debug:
            raise
        print(f"ckd-ehr {args.command}: error: {exc}", file=sys.stderr)
        return 1
    log.info("%s finished in %.1fs", args.command, time.time() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
