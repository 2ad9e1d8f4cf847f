"""What running on a GPU needs beyond the model code: host <-> device copies that keep the device busy (a batch
travels in one pinned, non-blocking copy each way, and the host waits once per batch), and why a machine whose
``nvidia-smi`` lists GPUs cannot use them from torch (a driver older than the CUDA the torch wheel was built for).
On a CPU every function here does the plain thing, so the same code runs everywhere.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


def to_device(arrays: Sequence[np.ndarray], device: torch.device | str) -> list[torch.Tensor]:
    """Host arrays of one dtype (any shapes; read-only ones too) -> tensors of the same shapes on ``device``.

    To a GPU they travel in one non-blocking copy from one pinned buffer, each array written into it once: pinning
    arrays one by one costs an allocation and a copy apiece, and a non-blocking copy from pageable memory blocks.
    The results are then views of one device buffer, and nothing waits for the copy but the kernels that read
    it. Elsewhere each array becomes a tensor on ``device`` (on the CPU sharing the array's memory where torch
    can wrap it: a writeable, C-contiguous array; Ray hands out read-only ones, which are copied).
    """
    device = torch.device(device)
    if device.type != "cuda" or not arrays:
        return [torch.from_numpy(a if a.flags.writeable and a.flags.c_contiguous else np.array(a, order="C"))
                .to(device) for a in arrays]
    return _unpack(_pack(arrays, pin_memory=True).to(device, non_blocking=True), arrays)


def _pack(arrays: Sequence[np.ndarray], pin_memory: bool) -> torch.Tensor:
    """The elements of ``arrays`` (one dtype) one array after another in one flat host tensor."""
    dtypes = {a.dtype for a in arrays}
    if len(dtypes) > 1:
        raise ValueError(f"arrays of one dtype are copied at a time, got {sorted(map(str, dtypes))}")
    sizes = [a.size for a in arrays]
    dtype = torch.from_numpy(np.empty(0, arrays[0].dtype)).dtype
    flat = torch.empty(sum(sizes), dtype=dtype, pin_memory=pin_memory)
    for part, array in zip(np.split(flat.numpy(), np.cumsum(sizes)[:-1]), arrays):
        np.copyto(part.reshape(array.shape), array)
    return flat


def _unpack(flat: torch.Tensor, arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
    """Views of :func:`_pack`'s ``flat`` (or its copy on a device) in the shapes of ``arrays``."""
    return [part.view(a.shape) for part, a in zip(flat.split([a.size for a in arrays]), arrays)]


def to_host(groups: Sequence[Sequence[torch.Tensor]]) -> list[tuple[np.ndarray, ...]]:
    """Groups of device tensors (an image's label map and confidence, say) -> the same groups of numpy arrays, the
    host waiting once: every copy is queued without waiting (into pinned memory, which torch allocates for a
    non-blocking copy off a GPU), then each device's stream is synchronised once. On a CPU, views of the tensors'
    own memory."""
    on_host = [tuple(t.to("cpu", non_blocking=True) for t in group) for group in groups]
    for device in {t.device for group in groups for t in group if t.device.type == "cuda"}:
        torch.cuda.current_stream(device).synchronize()
    return [tuple(t.numpy() for t in group) for group in on_host]


# ------------------------------------------------------------------------------------------------ diagnosis
@dataclass(frozen=True)
class NvidiaSmi:
    """What ``nvidia-smi`` reports: the GPUs' names, the driver's version and the newest CUDA it runs."""

    gpus: tuple[str, ...]
    driver: str
    cuda: str


def parse_nvidia_smi(listing: str, summary: str) -> NvidiaSmi:
    """``nvidia-smi -L`` (``GPU 0: NVIDIA H100 80GB HBM3 (UUID: ...)`` per line) and plain ``nvidia-smi`` output
    (its header holds ``Driver Version: 535.104.05`` and ``CUDA Version: 12.2``) -> :class:`NvidiaSmi` (the versions
    are "unknown" where the header does not say)."""
    gpus = tuple(m.group(1).strip() for m in re.finditer(r"^GPU \d+: (.+?)(?: \(UUID: [^)]*\))?$", listing, re.MULTILINE))
    driver = re.search(r"Driver Version:\s*([\d.]+)", summary)
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", summary)
    return NvidiaSmi(gpus, driver.group(1) if driver else "unknown", cuda.group(1) if cuda else "unknown")


def nvidia_smi() -> NvidiaSmi | None:
    """What ``nvidia-smi`` reports on this machine; None without ``nvidia-smi`` or when it fails (no driver)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        listing, summary = (subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=60,
                                           check=True).stdout for args in (["-L"], []))
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_nvidia_smi(listing, summary)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


def cuda_unusable(smi: NvidiaSmi, torch_cuda: str | None, error: str) -> str:
    """Why torch cannot use the GPUs ``smi`` lists, in one paragraph: the GPUs, the driver and the newest CUDA it
    runs against the CUDA the torch wheel was built for (``torch_cuda``, None for a CPU-only wheel), torch's own
    ``error``, and what to do."""
    seen = f"nvidia-smi lists {len(smi.gpus)} GPU(s) ({', '.join(smi.gpus)}; driver {smi.driver}, CUDA {smi.cuda})"
    wheel = f"torch {torch.__version__}, built for CUDA {torch_cuda}" if torch_cuda else (
        f"torch {torch.__version__} is a CPU-only build")
    if torch_cuda is None:
        advice = "install a CUDA build of torch"
    elif smi.cuda != "unknown" and _version(smi.cuda) < _version(torch_cuda):
        advice = (f"the driver runs CUDA up to {smi.cuda}, older than the wheel's {torch_cuda}: install a driver "
                  f"for CUDA {torch_cuda} or newer, or a torch wheel built for CUDA {smi.cuda} or older")
    else:
        advice = "the driver is new enough for the wheel: check the device nodes, CUDA_VISIBLE_DEVICES and dmesg"
    return f"{seen}, but {wheel} cannot use them: {error or 'torch.cuda.is_available() is False'}. {advice}."


def cuda_problem() -> tuple[str, bool] | None:
    """None when torch can run a kernel on a CUDA GPU here; else ``(why, gpu_present)``: ``gpu_present`` when
    ``nvidia-smi`` lists GPUs that torch cannot use (a broken setup, :func:`cuda_unusable` says why), False on a
    machine without any GPU."""
    error = ""
    try:
        if torch.cuda.is_available():
            (torch.ones(1, device="cuda") + 1).cpu()  # a kernel: the wheel may lack this GPU's architecture
            return None
        torch.cuda.init()  # raises with the driver's own reason
    except (RuntimeError, AssertionError) as exc:
        error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    smi = nvidia_smi()
    if smi is None or not smi.gpus:
        return "no GPU on this machine (nvidia-smi lists none and torch sees none)", False
    return cuda_unusable(smi, torch.version.cuda, error), True
