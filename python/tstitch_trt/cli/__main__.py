"""`python -m tstitch_trt.cli ...`: the same as the `tstitch-trt` console script."""

import sys

from tstitch_trt.cli import main

sys.exit(main())
