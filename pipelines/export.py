"""Export masks from a mask store to annotation-tool formats.

``denseclip export`` as a file, for ``ray job submit --working-dir . -- python pipelines/export.py ...``; the command
lives in ``denseclip/commands/export.py`` (``--help`` for its options).
"""

import sys

from denseclip.commands.export import main

if __name__ == "__main__":
    sys.exit(main())
