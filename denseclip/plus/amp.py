"""Mixed precision for DenseCLIP+ training: the forward pass under autocast in bf16 or fp16 (fp16 with loss
scaling, so small gradients do not underflow), the weights, optimizer and loss in fp32."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

TRAINING_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on GPUs that have it, ``fp16`` on older GPUs, ``fp32`` on CPUs (where autocast
    saves little and costs accuracy); any other value as given."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


@dataclass
class MixedPrecision:
    """How a training step runs on ``device_type``: the autocast ``dtype`` (None: fp32) and, for fp16, the
    ``scaler`` that scales the loss before ``backward`` and skips steps whose gradients overflowed."""

    device_type: str
    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def for_device(cls, precision: str, device: torch.device) -> MixedPrecision:
        """The mixed precision of ``precision`` (one of :data:`TRAINING_PRECISIONS`) on ``device``."""
        name = resolve_precision(precision, device)
        dtype = _DTYPES.get(name)
        scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        return cls(device.type, dtype, scaler)

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32")

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context the forward pass runs in (a no-op in fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """``loss.backward()`` and ``optimizer.step()``, through the loss scaler in fp16."""
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict:
        """The loss scaler's state (empty without one), saved with the optimizer's."""
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


FP32 = MixedPrecision("cpu")
