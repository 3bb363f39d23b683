"""``python -m wsiseg.cli``: the same command line as the ``wsiseg`` script."""

import sys

from .main import main

sys.exit(main())
