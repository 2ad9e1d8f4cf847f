"""DenseCLIP+ on Ray Train: the paper's Algorithm 1 (guided learning on DenseCLIP pseudo labels for N_g steps,
then optional self-training) as a ``TorchTrainer`` job over WebDataset shards, with periodic checkpoints,
recovery from worker failures, and an evaluation on validation shards written next to the final checkpoint.

    shards -> read + decode (Ray Data tasks) -> get_dataset_shard -> augment on the worker's device
        -> make_targets -> DDP train_step (autocast)
    every N steps: report metrics (+ a checkpoint); at the end: evaluate -> report.json + the final checkpoint

The validation set is split over the workers by Ray Data (every image scored by exactly one worker); their
confusion matrices and overlay samples are merged on every worker.

A run is one validated :class:`TrainJob` (the YAML specs in ``jobs/train_*.yaml``); the method's pieces
(target network, pseudo labels, losses, schedule) come from ``denseclip.plus``.

The package, in the order a run goes: ``job`` (the validated spec), ``data`` (shards -> Ray datasets of rows),
``worker`` (one worker's model and step), ``checkpoints`` (save, resume, progress), ``evaluation`` (validation and
``report.json``), ``run`` (the loop each worker runs, the ``TorchTrainer`` and the driver).
"""

from __future__ import annotations

import importlib

# Each name is imported from its module on first use: Ray Data's read tasks import ``data`` (and with it this
# package), and must not load torch and the training code for it (see ``data``).
_EXPORTS = {
    "job": ("DataSpec", "EvaluationSpec", "RunSpec", "TrainJob", "WorkerSpec"),
    "data": ("build_datasets", "decode_training_sample", "read_samples"),
    "worker": ("StepCallback", "StepContext", "build_worker", "train_on", "training_batch"),
    "checkpoints": ("META_FILE", "MODEL_FILE", "REPORT_FILE", "REPORT_FILES", "STATE_FILE", "load_target_checkpoint",
                    "read_checkpoint_meta", "restore_checkpoint", "save_checkpoint", "scoring_resize"),
    "evaluation": ("EVAL_BATCH", "REFERENCE_TEACHER", "evaluate_split"),
    "run": ("ReportCallback", "TrainResult", "TrainingData", "TrainingFailedError", "build_trainer", "check_inputs",
            "run_folder", "run_training", "train_loop_per_worker"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)


def __dir__() -> list[str]:
    return sorted(_MODULE_OF)
