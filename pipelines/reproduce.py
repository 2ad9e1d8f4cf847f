"""Reproduce a result with one command: prepare -> label -> train -> evaluate -> baseline.

``denseclip reproduce`` as a file, for ``ray job submit --working-dir . -- python pipelines/reproduce.py ...``; the
command lives in ``denseclip/commands/reproduce.py`` (``--help`` for its options).
"""

import sys

from denseclip.commands.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
