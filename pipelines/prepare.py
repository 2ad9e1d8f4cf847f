"""Convert a dataset on disk into WebDataset tar shards (local folder or s3:// URL).

``denseclip prepare`` as a file, for ``ray job submit --working-dir . -- python pipelines/prepare.py ...``; the command
lives in ``denseclip/commands/prepare.py`` (``--help`` for its options).
"""

import sys

from denseclip.commands.prepare import main

if __name__ == "__main__":
    sys.exit(main())
