"""The commands of the ``denseclip`` command line, one module each with ``main(argv) -> exit code``.

``pipelines/<name>.py`` are the same commands as files, for ``ray job submit --working-dir .``.
"""

# command -> (module under denseclip.commands, one line of help), in the order a user meets them
COMMANDS = {
    "demo": ("demo", "the offline demo: DenseCLIP and DenseCLIP+ on the synthetic world"),
    "predict": ("predict", "label image files with any vocabulary"),
    "prepare": ("prepare", "convert a dataset on disk into WebDataset shards"),
    "label": ("label", "label WebDataset shards on Ray into a Parquet mask store"),
    "verify": ("verify", "check every part of a mask store against its record and manifest"),
    "export": ("export", "export a mask store to PNG label maps or COCO RLE"),
    "train": ("train", "train DenseCLIP+ on Ray Train"),
    "evaluate": ("evaluate", "score predictions, a labeller or a trained target against ground truth"),
    "reproduce": ("reproduce", "prepare, label, train and evaluate one paper reproduction"),
    "submit": ("submit", "submit a command to a Ray cluster as a job, with its token"),
    "render-world": ("render_world", "render the synthetic captioned world as shards"),
    "train-tiny-clip": ("train_tiny_clip", "train a tiny CLIP on a synthetic world's captions"),
}
