"""Train a shipped tiny CLIP on captions of a synthetic world, on CPU.

``denseclip train-tiny-clip`` as a file, for ``ray job submit --working-dir . -- python pipelines/train_tiny_clip.py ...``; the
command lives in ``denseclip/commands/train_tiny_clip.py`` (``--help`` for its options).
"""

import sys

from denseclip.commands.train_tiny_clip import main

if __name__ == "__main__":
    sys.exit(main())
