"""``python -m fdn_core.cli``: the ``fdn`` command line without the console script."""

import sys

from fdn_core.cli import main

sys.exit(main())
