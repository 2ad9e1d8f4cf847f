"""Label WebDataset shards with DenseCLIP on Ray and write the Parquet mask store.

``denseclip label`` as a file, for ``ray job submit --working-dir . -- python pipelines/label.py ...``; the command
lives in ``denseclip/commands/label.py`` (``--help`` for its options).
"""

import sys

from denseclip.commands.label import main

if __name__ == "__main__":
    sys.exit(main())
