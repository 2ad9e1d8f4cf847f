"""Ray integration: the only package in ``denseclip`` that imports ``ray``; each module is one distributed job
(``labeling``: DenseCLIP labels for sharded images into the mask store)."""
