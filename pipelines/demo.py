"""The offline demo: DenseCLIP and DenseCLIP+ on the synthetic world with the shipped tiny CLIP, on CPU.

``denseclip demo`` as a file, for ``ray job submit --working-dir . -- python pipelines/demo.py ...``; the command
lives in ``denseclip/commands/demo.py`` (``--help`` for its options).
"""

import sys

from denseclip.commands.demo import main

if __name__ == "__main__":
    sys.exit(main())
