"""Submit a command to a Ray cluster as a Ray job, with the cluster's token, and wait for it.

``denseclip submit`` as a file, for ``ray job submit --working-dir . -- python pipelines/submit.py ...``; the command
lives in ``denseclip/commands/submit.py`` (``--help`` for its options).
"""

import sys

from denseclip.commands.submit import main

if __name__ == "__main__":
    sys.exit(main())
