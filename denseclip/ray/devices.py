"""Which device a Ray actor runs its model on.

Ray gives a GPU actor its own GPU by setting ``CUDA_VISIBLE_DEVICES`` to that one device, so inside the actor
the GPU Ray assigned is ``cuda:0`` whatever ordinal the job asked for: ``cuda:1`` in a job spec means "a GPU",
not "the second GPU of some machine" (an actor sees one GPU, and ``cuda:1`` would fail with "invalid device
ordinal"). Ray Train workers get theirs from ``ray.train.torch.get_device()``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import ray

from denseclip.names import AUTO

# With this set, Ray leaves CUDA_VISIBLE_DEVICES alone: every GPU of the node stays visible, and the one Ray
# assigned keeps its node-wide ordinal.
_NOSET_CUDA = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


def assigned_device(requested: str, gpu_ids: Sequence[int | str], visible_devices_set: bool = True) -> str:
    """The torch device that honours ``requested`` (``auto``, ``cpu``, ``cuda`` or ``cuda:N``) inside an actor
    that Ray assigned the GPUs ``gpu_ids`` (node-wide ids, as ``ray.get_gpu_ids()`` gives them).

    ``auto`` is the GPU when Ray assigned one, else ``cpu``. ``cuda`` and ``cuda:N`` become the first assigned
    GPU: ``cuda:0`` when Ray set ``CUDA_VISIBLE_DEVICES`` (``visible_devices_set``, Ray's default), else
    ``cuda:<its node-wide id>``. Raises ValueError when a CUDA device is asked for but Ray assigned no GPU (the
    actor was scheduled without ``num_gpus``).
    """
    if requested == AUTO:
        requested = "cuda" if gpu_ids else "cpu"
    if not requested.startswith("cuda"):
        return requested
    if not gpu_ids:
        raise ValueError(f"device {requested!r}: Ray assigned no GPU to this actor (it was started without "
                         "num_gpus); label with --device cpu, or let the job reserve GPUs")
    return "cuda:0" if visible_devices_set else f"cuda:{int(gpu_ids[0])}"


def actor_device(requested: str) -> str:
    """:func:`assigned_device` for the calling Ray actor or task, made its current CUDA device: what CUDA opens
    on "the current device" (the context behind pinned host memory, cuBLAS and cuDNN handles, NCCL) then opens on
    the actor's GPU, not on GPU 0, where every actor of a node would crowd when all GPUs stay visible."""
    import torch  # here: the module is imported by stages that never touch torch

    if requested == AUTO and not ray.is_initialized():  # a Labeler used outside Ray: this process's GPU, if any
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if not requested.startswith(("cuda", AUTO)):
        return requested
    noset = os.environ.get(_NOSET_CUDA, "").lower() in ("1", "true")  # as Ray reads it
    device = assigned_device(requested, ray.get_gpu_ids(), visible_devices_set=not noset)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    return device
