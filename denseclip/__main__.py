"""``python -m denseclip <command> ...``: the ``denseclip`` command, from wherever the package is imported."""

import sys

from denseclip.cli import main

sys.exit(main())
