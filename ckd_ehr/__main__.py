import sys

from ckd_ehr.cli import main

sys.exit(main())
