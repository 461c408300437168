"""``python -m earlyexit``: the command line (see :mod:`earlyexit.cli`)."""

import sys

from .cli import main

sys.exit(main())
