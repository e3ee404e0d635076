"""``python -m FDNRetrievalWeb [options]`` is ``fdn web [options]``."""

import sys

from fdn_core.cli import main

sys.exit(main(["web", *sys.argv[1:]]))
