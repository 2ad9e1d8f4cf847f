"""Score predictions, a labeller or a trained DenseCLIP+ target against ground truth.

``denseclip evaluate`` as a file, for ``ray job submit --working-dir . -- python pipelines/evaluate.py ...``; the
command lives in ``denseclip/commands/evaluate.py`` (``--help`` for its options).
"""

import sys

from denseclip.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
