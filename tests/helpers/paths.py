"""Where the tests find the repository and the vendored open MIMIC demos."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The open MIMIC-III and MIMIC-IV demos (ODbL), vendored with their licence and checksums
# (tests/data/README.md): a clean clone needs nothing beside it.
DEMO_DATA = REPO / "tests" / "data"
