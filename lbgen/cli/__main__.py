"""`python -m lbgen.cli ...`: the `lbgen` command (a Ray Job's entrypoint may call it so)."""

import sys

from lbgen.cli import main

sys.exit(main())
