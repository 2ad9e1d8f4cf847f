"""The labelling stage: the ``Labeler`` actor with its error and out-of-memory policy, and what one actor
sustains, measured where it runs (which sizes the stage on GPUs)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time

import numpy as np
import ray

from denseclip.config import LabelerConfig
from denseclip.images import ImageDecodeError, check_rgb_image, decode_image
from denseclip.predictor import DenseCLIP
from denseclip.ray.devices import actor_device
from denseclip.ray.labeling.commit import encode_batch
from denseclip.ray.labeling.plan import LabelingPlan, Throughput
from denseclip.ray.labeling.read import _objects, read_shard_rows

log = logging.getLogger(__name__)

# A batch whose actor dies is retried on a restarted actor this often; a batch that kills every actor it
# meets fails the job instead of looping forever. Actors themselves restart without limit (lost nodes).
# A model failure that is not the image's fault (see Labeler) ends the actor on purpose, to the same effect.
MAX_TASK_RETRIES = 3
# Images taken from the first shard to measure decoding and labelling rates before a GPU run is planned.
PROBE_IMAGES = 16
_NO_MAP = np.zeros((0, 0), dtype=np.uint8)


def measure_throughput(config: LabelerConfig, classes: list[list[str]], samples: list[bytes],
                       rounds: int = 3) -> Throughput | None:
    """Decode ``samples`` (image bytes) on one CPU and label them ``rounds`` times after a warm-up, with the
    labeller of ``config``: run where an actor would run (a Ray task with its resources). None if no sample
    decodes."""
    images = []
    start = time.perf_counter()
    for data in samples:
        with contextlib.suppress(ImageDecodeError):
            images.append(decode_image(data))
    decode_rate = len(samples) / (time.perf_counter() - start)
    if not images:
        return None
    # A one-GPU Ray task sees its GPU as cuda:0 (or by its node-wide ordinal), whatever ordinal the job named.
    labeler = DenseCLIP.from_config(dataclasses.replace(config, device=actor_device(config.device)), classes)
    labeler.label_maps(images[:config.batch_size])
    start = time.perf_counter()
    for _ in range(rounds):
        for i in range(0, len(images), config.batch_size):
            labeler.label_maps(images[i:i + config.batch_size])
    return Throughput(rounds * len(images) / (time.perf_counter() - start), decode_rate)


def probe_throughput(plan: LabelingPlan, config: LabelerConfig, classes: list[list[str]],
                     gpus: float) -> Throughput | None:
    """:func:`measure_throughput` on a GPU node of the connected cluster, on the first images of the first shard
    to label; None where there is no GPU now or no decodable image to measure with."""
    if gpus < 1 or not plan.todo:
        return None
    samples = []
    for row in read_shard_rows(plan.todo[0], plan.storage_options):
        if not row["error"]:
            samples.append(row["data"])
        if len(samples) == PROBE_IMAGES:
            break
    if not samples:
        return None
    probe = ray.remote(measure_throughput).options(num_gpus=1, num_cpus=1)
    return ray.get(probe.remote(config, classes, samples))


# How running out of memory reads in an error's message, lower-cased: torch's allocators and CUDA's own words,
# and the allocation failures of the CUDA libraries a labeller calls, which take their workspace when called
# (cuBLAS, cuDNN, nvJPEG). cuDNN 9 names them "internal error ... allocation failed", cuDNN 8 often said
# "internal error" alone: an internal error that is no memory shortage fails again on one image and is re-raised.
OUT_OF_MEMORY_MESSAGES = (
    "out of memory", "can't allocate memory", "not enough memory", "cudaerrormemoryallocation",
    "cublas_status_alloc_failed", "cudnn_status_alloc_failed", "cudnn_status_internal_error",
    "cusolver_status_alloc_failed", "cufft_alloc_failed", "cusparse_status_alloc_failed",
    "nvjpeg_status_allocator_failure",
)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says memory ran out: a CUDA out-of-memory error, a CPU allocation failure (torch raises
    a plain RuntimeError naming its allocator), Python's MemoryError, or a CUDA library that could not allocate
    its workspace (:data:`OUT_OF_MEMORY_MESSAGES`)."""
    import torch

    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    message = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(words in message for words in OUT_OF_MEMORY_MESSAGES)


class Labeler:
    """The DenseCLIP stage, a Ray Data callable class: the model and the text embeddings are loaded once per
    actor; each call labels a batch of images (rows whose ``error`` is set pass through unlabelled).

    Adds ``labels`` uint8 ``(H, W)`` and ``confidence`` uint8 ``(H, W)`` (probability x 255; each image's own size)
    and ``fingerprint`` (the weights' identity); drops ``image``. With ``encode``, the actor also encodes the
    maps (:func:`encode_batch`): its rows are ready to commit.

    Errors by cause: only a problem of the image itself becomes an error row (here: not a non-empty uint8
    RGB array, or a JPEG no decoder reads; decoding, size limits and keys are checked by the stages before).
    Running out of memory (decoding JPEGs on the device or labelling) frees the cache and retries the batch in
    halves, down to one image at a time at the same settings. Anything else the model raises (or memory that
    runs out for a single image) is no input error: the actor ends, so Ray starts a fresh one (a CUDA error can
    leave the device unusable for the process) and retries the batch, at most ``MAX_TASK_RETRIES`` times before
    the job fails; the batch's shard is never committed.
    """

    def __init__(self, config: LabelerConfig, classes: list[list[str]], torch_threads: int = 1,
                 encode: bool = False):
        import torch  # here, not at the top: the read/decode/encode task workers never need torch

        torch.set_num_threads(torch_threads)
        config = dataclasses.replace(config, device=actor_device(config.device))
        if config.pretrained == "random":
            torch.manual_seed(0)  # random-weight baselines: every actor, and a resumed run, draws the same weights
        self.dense_clip = DenseCLIP.from_config(config, classes)
        self.fingerprint = self.dense_clip.clip.fingerprint
        self.encode = encode
        # The Ray node this actor runs on, recorded with each part (which machines labelled what).
        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""

    def _free_memory(self) -> None:
        import gc

        import torch

        gc.collect()
        if self.dense_clip.clip.device.type == "cuda":
            torch.cuda.empty_cache()

    def _label(self, images: list, keys: list[str]) -> list[tuple[np.ndarray, np.ndarray] | str]:
        """Label ``images`` (checked arrays, or JPEG bytes decoded on the device first; ``keys`` name them), in
        smaller calls after running out of memory; a JPEG no decoder reads comes back as the reason (a str).
        Re-raises the model's other exceptions, and running out of memory on a single image."""
        results: list[tuple[np.ndarray, np.ndarray] | str] = []
        start, size = 0, len(images)
        while start < len(images):
            chunk = images[start:start + size]
            try:
                results += self._decode_and_label(chunk, keys[start:start + size])
                start += len(chunk)
                continue
            except (RuntimeError, MemoryError) as exc:  # what running out of memory raises (CUDA's is a RuntimeError)
                if size == 1 or not is_out_of_memory(exc):
                    raise
                log.warning("out of memory labelling %d images (%s); retrying %d at a time", size, exc,
                            max(1, size // 2))
            # Outside the except block: its traceback, which holds the failed call's tensors, is gone by now.
            size = max(1, size // 2)
            self._free_memory()
        return results

    def _decode_and_label(self, images: list, keys: list[str]) -> list[tuple[np.ndarray, np.ndarray] | str]:
        """:meth:`_label` of one call: the JPEG bytes among ``images`` decoded on the device, then everything that
        decoded labelled in one batch."""
        jpegs = [i for i, image in enumerate(images) if isinstance(image, bytes)]
        images = list(images)
        for i, image in zip(jpegs, self._decode_jpegs([images[i] for i in jpegs], [keys[i] for i in jpegs])):
            images[i] = image
        decoded = [i for i, image in enumerate(images) if not isinstance(image, str)]
        results: list = list(images)
        for i, maps in zip(decoded, self.dense_clip.label_maps([images[i] for i in decoded])):
            results[i] = maps
        return results

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            labelled = self.label_batch(batch)
        except Exception:  # no input error (see the class): a fresh actor retries the batch
            log.exception("the model failed on a batch of shard(s) %s; this actor exits so that Ray restarts it "
                          "and retries the batch (at most %d times)", sorted(set(batch["shard"])), MAX_TASK_RETRIES)
            sys.stderr.flush()
            os._exit(1)  # not an exception: Ray Data would fail the job on it without a retry
        labelled["node"] = np.full(len(labelled["key"]), self.node, dtype=object)
        return encode_batch(labelled) if self.encode else labelled

    def _decode_jpegs(self, blobs: list[bytes], keys: list[str]) -> list:
        """JPEG bytes -> ``(3, H, W)`` uint8 tensors decoded on the labeller's device, in one batched call; where
        that fails, image by image, with Pillow for what the device decoder refuses (an ``(H, W, 3)`` array)
        and the reason (a str) for what no decoder can read. Running out of memory is raised, not worked
        around: :meth:`_label` retries with fewer images."""
        import torch
        import torchvision

        if not blobs:
            return []
        rgb = torchvision.io.ImageReadMode.RGB
        device = self.dense_clip.device
        tensors = [torch.frombuffer(bytearray(blob), dtype=torch.uint8) for blob in blobs]
        try:
            return torchvision.io.decode_jpeg(tensors, mode=rgb, device=device)
        except RuntimeError as exc:
            if is_out_of_memory(exc):
                raise
            log.warning("decoding %d JPEGs on %s failed; decoding them one by one", len(blobs), device)
        decoded = []
        for tensor, blob, key in zip(tensors, blobs, keys):
            try:
                decoded.append(torchvision.io.decode_jpeg(tensor, mode=rgb, device=device))
            except RuntimeError as exc:
                if is_out_of_memory(exc):
                    raise
                try:
                    decoded.append(decode_image(blob, key))
                except ImageDecodeError as error:
                    decoded.append(error.reason)
        return decoded

    def label_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Decoded rows -> rows with ``labels``, ``confidence`` and ``fingerprint`` (see the class); rows with
        ``jpeg`` bytes (:func:`decode_batch` with ``defer_jpeg``) are decoded on the labeller's device, in the
        calls that label them. Raises what the model raises, except out-of-memory errors that smaller calls
        avoid."""
        errors = list(batch["error"])
        images = list(batch["image"])
        for i, error in enumerate(errors):
            if error:
                continue
            if "jpeg" in batch and batch["jpeg"][i]:
                images[i] = bytes(batch["jpeg"][i])
                continue
            try:
                check_rgb_image(images[i])
            except ValueError as exc:
                errors[i] = f"unusable image: {exc}"
        todo = [i for i, error in enumerate(errors) if not error]
        labels, confidence = [_NO_MAP] * len(errors), [_NO_MAP] * len(errors)
        for i, result in zip(todo, self._label([images[i] for i in todo], [str(batch["key"][i]) for i in todo])):
            if isinstance(result, str):
                errors[i] = result
            else:
                labels[i], confidence[i] = result
        return {"key": batch["key"], "shard": batch["shard"], "shard_total": batch["shard_total"],
                "error": _objects(errors), "labels": _objects(labels), "confidence": _objects(confidence),
                "fingerprint": np.full(len(errors), self.fingerprint, dtype=object)}
