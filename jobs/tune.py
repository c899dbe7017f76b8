"""`ray job submit` entrypoint: the `tune` stage alone.

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- \
        python jobs/tune.py --config jobs/configs/mimic3_full.yaml --run-dir s3://BUCKET/runs/NAME

Thin: it calls the same library function as `ckd-ehr tune`.
"""
import sys
from pathlib import Path

# The uploaded working directory (this checkout) wins over any installed ckd_ehr.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ckd_ehr.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
