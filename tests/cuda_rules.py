"""CUDA's rules, checked on the CPU: a ``TorchDispatchMode`` that raises where a CUDA kernel would refuse an op the
CPU's kernels accept.

    with CudaRules():
        labeller.label_maps(images)

Rules (each names the op and the tensors that break it):
- **norms**: ``layer_norm`` and ``group_norm`` read their weight and bias in the input's dtype on CUDA (an fp16
  input with fp32 parameters: "expected scalar type Half but found Float"); ``batch_norm`` takes parameters and
  running statistics in the input's dtype, or in fp32 for an fp16/bf16 input (its "mixed type"), nothing else.
- **dtypes**: matrix products, convolutions and attention (``mm``, ``addmm``, ``bmm``, ``baddbmm``,
  ``convolution`` and its backward, the oneDNN fused convolutions, ``scaled_dot_product_attention``'s kernels)
  take every floating operand (bias and attention mask included) in one dtype; a bool mask is not floating.
- **devices**: no op mixes tensors of two devices, except a 0-dim CPU tensor (a scalar, which CUDA reads from the
  host) and the ops that move or index across devices (copies, ``index`` with CPU indices). A CPU has one device:
  run the code under test on ``meta`` as the second one, and every tensor it makes without ``device=`` (on the
  CPU) meets the meta tensors in some op, as it would meet the GPU's.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten

LOW_PRECISION = (torch.float16, torch.bfloat16)
# Op names whose floating operands must all share one dtype (CUDA's GEMM, cuDNN and attention kernels).
SAME_DTYPE_OPS = frozenset({
    "mm", "addmm", "bmm", "baddbmm", "addbmm", "addmv", "mv", "dot", "vdot", "matmul", "_addmm_activation",
    "convolution", "_convolution", "convolution_backward", "cudnn_convolution", "mkldnn_convolution",
    "_convolution_pointwise", "conv2d", "linear",
    # Attention's forward kernels (their backward ones take the fp32 log-sum-exp the forward saved, by design).
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_fused_attention_overrideable",
})
# Layer and group norm: (index of the input, indices of weight and bias) in the aten op's arguments.
NORM_OPS = {"native_layer_norm": (0, (2, 3)), "native_group_norm": (0, (1, 2)),
            "native_layer_norm_backward": (1, (4, 5)), "native_group_norm_backward": (1, (4,))}
# Batch norm: (index of the input, indices of weight, bias, running mean and running variance).
BATCH_NORM_OPS = {"native_batch_norm": (0, (1, 2, 3, 4)), "_native_batch_norm_legit": (0, (1, 2, 3, 4)),
                  "_native_batch_norm_legit_no_training": (0, (1, 2, 3, 4)),
                  "_native_batch_norm_legit_functional": (0, (1, 2, 3, 4)), "batch_norm": (0, (1, 2, 3, 4))}
# Ops that take tensors on two devices by design.
CROSS_DEVICE_OPS = frozenset({"_to_copy", "copy_", "copy", "_copy_from", "_copy_from_and_resize", "index",
                              "index_put", "index_put_", "_index_put_impl_", "_pin_memory", "is_pinned", "set_",
                              "lift_fresh", "lift_fresh_copy", "to"})


class CudaRuleError(RuntimeError):
    """An op a CUDA kernel would refuse: the message names the rule, the op and the offending tensors."""


def _describe(tensor: torch.Tensor) -> str:
    return f"{str(tensor.dtype).removeprefix('torch.')}{tuple(tensor.shape)} on {tensor.device}"


def _tensor_at(args: tuple, index: int) -> torch.Tensor | None:
    value = args[index] if index < len(args) else None
    return value if isinstance(value, torch.Tensor) else None


def check_norm(name: str, args: tuple) -> None:
    """Layer and group norm: weight and bias in the input's dtype."""
    if name not in NORM_OPS:
        return
    at, params = NORM_OPS[name]
    x = _tensor_at(args, at)
    for index in params:
        p = _tensor_at(args, index)
        if x is not None and p is not None and p.dtype != x.dtype:
            raise CudaRuleError(f"{name}: weight/bias {_describe(p)} for input {_describe(x)}: CUDA's kernel reads "
                                "them in the input's dtype (compute the norm in fp32: LayerNormFp32)")


def check_batch_norm(name: str, args: tuple) -> None:
    """Batch norm: parameters in the input's dtype, or fp32 ones for an fp16/bf16 input."""
    if name not in BATCH_NORM_OPS:
        return
    at, params = BATCH_NORM_OPS[name]
    x = _tensor_at(args, at)
    dtypes = {p.dtype for p in (_tensor_at(args, i) for i in params) if p is not None}
    if x is None or not dtypes or dtypes == {x.dtype}:
        return
    if x.dtype in LOW_PRECISION and dtypes == {torch.float32}:
        return
    raise CudaRuleError(f"{name}: parameters in {sorted(map(str, dtypes))} for input {_describe(x)}: CUDA takes "
                        "them in the input's dtype or, for fp16/bf16 input, in fp32")


def check_same_dtype(name: str, tensors: list[torch.Tensor]) -> None:
    """Products, convolutions, attention: every floating operand in one dtype."""
    if name not in SAME_DTYPE_OPS:
        return
    floating = [t for t in tensors if t.is_floating_point()]
    if len({t.dtype for t in floating}) > 1:
        raise CudaRuleError(f"{name}: operands mix dtypes ({', '.join(map(_describe, floating))}); CUDA's kernels "
                            "take them in one dtype")


def check_one_device(name: str, tensors: list[torch.Tensor]) -> None:
    """No op on tensors of two devices (0-dim CPU tensors are scalars, which CUDA accepts)."""
    if name in CROSS_DEVICE_OPS:
        return
    devices = {t.device for t in tensors if not (t.device.type == "cpu" and t.dim() == 0)}
    if len(devices) > 1:
        raise CudaRuleError(f"{name}: tensors on {sorted(map(str, devices))} "
                            f"({', '.join(map(_describe, tensors))}); CUDA kernels take one device's tensors")


class CudaRules(TorchDispatchMode):
    """Raises :class:`CudaRuleError` on every op that breaks one of the rules of the module docstring; ``ops``
    counts the ops checked (a check that saw no op proves nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        check_norm(name, args)
        check_batch_norm(name, args)
        check_same_dtype(name, tensors)
        check_one_device(name, tensors)
        self.ops += 1
        return func(*args, **kwargs)
