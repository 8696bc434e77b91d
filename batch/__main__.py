"""``python -m batch``: see :mod:`batch.cli`."""

import sys

from batch.cli import main

sys.exit(main())
