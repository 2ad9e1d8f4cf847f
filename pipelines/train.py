"""Train DenseCLIP+ on Ray Train: guided learning on DenseCLIP pseudo labels, then optional self-training.

``denseclip train`` as a file, for ``ray job submit --working-dir . -- python pipelines/train.py ...``; the command
lives in ``denseclip/commands/train.py`` (``--help`` for its options).
"""

import sys

from denseclip.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
