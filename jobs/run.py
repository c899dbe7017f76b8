"""`ray job submit` entrypoint: any `ckd-ehr` command, the stages of ckd_ehr/stages.py among them.

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- \
        python jobs/run.py pipeline --config jobs/configs/mimic3_full.yaml --run-dir s3://BUCKET/runs/NAME

    python jobs/run.py eadf --config ... / teacher / soft-labels / student / evaluate / tune --space ...

One file, not one per stage: the commands come from the same registry as `ckd-ehr` and the
pipeline, so a new stage needs no new script. Inside a job Ray is already running: the stages
join it (Ray sets RAY_ADDRESS).
"""
import sys
from pathlib import Path

# The uploaded working directory (this checkout) wins over any installed ckd_ehr.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ckd_ehr.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
