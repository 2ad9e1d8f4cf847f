"""Render the synthetic captioned world (shards, plain JPEG files, or COCO-Stuff's layout).

``denseclip render-world`` as a file, for ``ray job submit --working-dir . -- python pipelines/render_world.py ...``; the
command lives in ``denseclip/commands/render_world.py`` (``--help`` for its options).
"""

import sys

from denseclip.commands.render_world import main

if __name__ == "__main__":
    sys.exit(main())
