"""`ray job submit` entrypoint: the whole pipeline.

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- \
        python jobs/pipeline.py --config jobs/configs/mimic3_full.yaml

Thin: everything happens in ckd_ehr.pipeline (the same function `ckd-ehr pipeline` calls).
Inside a job, Ray is already running: the stages join it (RAY_ADDRESS is set by Ray).
"""
import sys
from pathlib import Path

# The uploaded working directory (this checkout) wins over any installed ckd_ehr.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ckd_ehr.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
