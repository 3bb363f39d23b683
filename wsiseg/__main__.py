"""``python -m wsiseg``: the same command line as the ``wsiseg`` script (for environments without it on PATH)."""

import sys

from .cli import main

sys.exit(main())
