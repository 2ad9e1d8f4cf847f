"""CUDA's rules on every CPU run (tests/cuda_rules.py): the labeller (its text encoding included), the ViT heads,
the DenseCLIP+ teacher and training steps and a trained target's forward run in fp16 and bf16 under the dtype
rules CUDA's kernels impose, and on the meta device under its one-device rule; then the CPU twins of the
CUDA-only paths (host <-> device copies, out-of-memory halving with device JPEG decoding, actor devices, the
throughput probe's ordinal, the diagnosis of a GPU torch cannot use)."""

from __future__ import annotations

import copy
import dataclasses
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from batches import ray_batch
from cuda_rules import CudaRuleError, CudaRules
from PIL import Image
from torch.nn.parallel import DistributedDataParallel

from denseclip.config import LabelerConfig, resolve_vocabulary
from denseclip.dense import dense_features, dense_features_and_keys
from denseclip.gpu import (
    _pack,
    _unpack,
    cuda_problem,
    cuda_unusable,
    nvidia_smi,
    parse_nvidia_smi,
    to_device,
    to_host,
)
from denseclip.models import load_clip
from denseclip.names import HEADS, TINY_MODEL, TINY_VIT_MODEL
from denseclip.plus.pseudo_labels import DenseCLIPTeacher
from denseclip.plus.target import TargetConfig, build_target
from denseclip.plus.training import build_optimizer
from denseclip.predictor import DenseCLIP
from denseclip.ray import devices
from denseclip.ray.labeling import Labeler, decode_batch, is_out_of_memory, measure_throughput
from denseclip.ray.labeling import actor as labeling_actor
from denseclip.ray.training import (
    TrainJob,
    build_worker,
    load_target_checkpoint,
    read_samples,
    save_checkpoint,
    train_on,
)
from denseclip.synthetic import render_scene, write_shards
from denseclip.text import class_embeddings
from denseclip.vocabulary import load_templates

ROOT = Path(__file__).resolve().parents[1]
CLASSES = resolve_vocabulary("synthetic")
LOW_PRECISIONS = ("fp16", "bf16")
TINY = (TINY_MODEL, TINY_VIT_MODEL)
META = torch.device("meta")
# Sliding windows that overlap on the images of _images() (multiples of both towers' strides: 32 and 8).
SLIDE = {"mode": "slide", "crop_size": 64, "crop_stride": 32}


@pytest.fixture(autouse=True)
def one_thread():
    """fp16/bf16 on a CPU without native half arithmetic: one thread is the fastest on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def empty_text_cache(tmp_path, monkeypatch):
    """An empty text-embedding cache: building a labeller encodes its prompts (under the rules)."""
    monkeypatch.setenv("DENSECLIP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _images(n: int = 2, size: int = 96) -> list[np.ndarray]:
    return [render_scene(20, i, size=size).image for i in range(n)]


# ------------------------------------------------------------------------------------------------ the mode
def _layer_norm(weight_dtype):
    return F.layer_norm(torch.randn(2, 8, dtype=torch.float16), (8,), torch.ones(8, dtype=weight_dtype),
                        torch.zeros(8, dtype=weight_dtype))


def _group_norm(weight_dtype):
    return F.group_norm(torch.randn(2, 4, 3, 3, dtype=torch.bfloat16), 2, torch.ones(4, dtype=weight_dtype))


def _batch_norm(input_dtype, weight_dtype):
    stats = torch.zeros(4, dtype=weight_dtype), torch.ones(4, dtype=weight_dtype)
    return F.batch_norm(torch.randn(2, 4, 3, 3, dtype=input_dtype), *stats, torch.ones(4, dtype=weight_dtype))


def _linear(weight_dtype):
    return F.linear(torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(4, 8, dtype=weight_dtype))


def _conv(bias_dtype):
    # aten's op itself: F.conv2d checks the dtypes on a CPU too, before dispatching (the fused oneDNN kernels do not).
    return torch.ops.aten.convolution(torch.randn(1, 2, 5, 5, dtype=torch.bfloat16),
                                      torch.randn(3, 2, 3, 3, dtype=torch.bfloat16), torch.zeros(3, dtype=bias_dtype),
                                      [1, 1], [0, 0], [1, 1], False, [0, 0], 1)


def _attention(mask_dtype):
    q = torch.randn(1, 2, 4, 8, dtype=torch.float16)
    mask = torch.zeros(4, 4, dtype=mask_dtype) if mask_dtype != torch.bool else torch.ones(4, 4, dtype=torch.bool)
    return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)


def _two_devices(other):
    return torch.ones(3, device=META) + other


@pytest.mark.parametrize("refused, accepted, rule", [
    (lambda: _layer_norm(torch.float32), lambda: _layer_norm(torch.float16), "native_layer_norm"),
    (lambda: _group_norm(torch.float32), lambda: _group_norm(torch.bfloat16), "native_group_norm"),
    (lambda: _batch_norm(torch.float32, torch.float16), lambda: _batch_norm(torch.float16, torch.float32),
     "batch_norm"),
    (lambda: _linear(torch.float32), lambda: _linear(torch.bfloat16), "mm"),
    (lambda: _conv(torch.float32), lambda: _conv(torch.bfloat16), "convolution"),
    (lambda: _attention(torch.float32), lambda: _attention(torch.bool), "scaled_dot_product"),
    (lambda: _two_devices(torch.ones(3)), lambda: _two_devices(torch.tensor(1.0)), "add"),
])
def test_the_mode_refuses_what_cuda_refuses_and_accepts_its_twin(refused, accepted, rule):
    with CudaRules() as rules:
        accepted()
        with pytest.raises(CudaRuleError, match=rule):
            refused()
    assert rules.ops > 0


def test_the_mode_lets_copies_cross_devices():
    with CudaRules():
        moved = torch.ones(2, 3).to(META)
        assert (moved + torch.ones(2, 3, device=META)).device == META


# ------------------------------------------------------------------------------------------------ labeller
def _labeller(model: str, precision: str, clip=None, **options):
    config = LabelerConfig(model=model, precision=precision, **options)
    return DenseCLIP.from_config(config, CLASSES, clip)


@pytest.mark.parametrize("precision", LOW_PRECISIONS)
@pytest.mark.parametrize("model", TINY)
def test_labeller_keeps_cudas_dtype_rules(model, precision, empty_text_cache):
    images = _images()
    clip = load_clip(model, precision=precision)
    with CudaRules() as rules:
        whole = _labeller(model, precision, clip)  # the prompts are encoded here: the cache is empty
        maps = whole.label_maps(images)
        slide = _labeller(model, precision, clip, **SLIDE, key_smoothing=0.9, prompt_denoising=0.1,
                          background_threshold=0.2)
        labelled = slide.label_images(images)
    assert list(empty_text_cache.glob("text/*.safetensors"))  # the encoding ran under the rules
    assert whole.clip.dtype == slide.clip.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    assert rules.ops > 1000
    for (labels, confidence), image in zip(maps + labelled, images + images):
        assert labels.shape == confidence.shape == image.shape[:2]


def _on_meta(clip):
    """``clip`` with its model on the meta device (weights and fingerprint kept: the text cache still applies)."""
    return dataclasses.replace(clip, model=copy.deepcopy(clip.model).to(META))


@pytest.mark.parametrize("model", TINY)
def test_labeller_and_teacher_keep_to_one_device(model, empty_text_cache):
    clip = load_clip(model, precision="fp16")
    _labeller(model, "fp16", clip)  # encodes the prompts on the CPU: the meta labeller finds them cached
    images = _images()
    batch = torch.rand(2, 3, 64, 64, device=META)
    with CudaRules() as rules:
        for options in ({}, {**SLIDE, "key_smoothing": 1.0, "prompt_denoising": 0.1, "background_threshold": 0.2}):
            labeller = _labeller(model, "fp16", _on_meta(clip), **options)
            # label_maps without the copy to the host (a meta tensor holds no values to copy)
            for labels, confidence in labeller._predict(labeller._pixels(images), normalised=False):
                assert labels.device == confidence.device == META and labels.shape == (96, 96)
        labeller.upsample_topk = None  # choosing the top classes of a batch needs their values
        labels, confidence = DenseCLIPTeacher(labeller, refine_iterations=1).pseudo_labels(batch, [1, 2], 0.5)
    assert labels.device == META and labels.shape == (2, 64, 64) and rules.ops > 500


@pytest.mark.parametrize("precision", LOW_PRECISIONS)
def test_vit_heads_keep_cudas_rules(precision):
    clip = load_clip(TINY_VIT_MODEL, precision=precision)
    # On meta at the tower's own grid: resizing its positional embedding is slow there (and checked on the CPU).
    inputs = ((clip.model, torch.randn(2, 3, 32, 48)), (_on_meta(clip).model, torch.empty(1, 3, 128, 128, device=META)))
    with CudaRules():
        for model, batch in inputs:
            for head in HEADS:
                features = dense_features(model, batch, head)
                _, keys = dense_features_and_keys(model, batch, head)
                assert features.shape[-2:] == keys.shape[-2:] == (batch.shape[2] // 8, batch.shape[3] // 8)
                assert features.device == keys.device == batch.device


# ------------------------------------------------------------------------------------------------ DenseCLIP+
@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return write_shards(seed=8, n=4, out=str(tmp_path_factory.mktemp("rules")), shard_size=4, size=64)


def _job(shards: list[str], model: str, precision: str, training_precision: str | None = None,
         target: dict | None = None, **labeler) -> TrainJob:
    """A zero-shot job whose two steps are a guided one (the teacher's pseudo labels on the fly, refined) and a
    self-training one, teacher and training in ``precision``; a ViT model trains its own tower with the
    ClearCLIP head (which leaves the last block's MLP unused); ``target`` replaces the target's fields."""
    target = target or ({"head": "clip_dense", "head_channels": 16} if model == TINY_VIT_MODEL else
                        {"head": "deeplabv3plus", "output_stride": 16, "aspp_rates": [1, 2], "head_channels": 16})
    head = {"head": "clearclip"} if model == TINY_VIT_MODEL else {}
    return TrainJob.from_dict({
        "dataset": "synthetic", "data": {"train": shards, "val": shards},
        "labeler": {"model": model, "precision": precision, **head, **labeler},
        "training": {"setting": "zero_shot", "pseudo_label_refinement": 1, "self_training": True, "iterations": 2,
                     "guided_iterations": 1, "batch_size": 2, "crop_size": 32,
                     "precision": training_precision or precision,
                     "target": {"backbone": "clip", "backbone_weights": "clip", "learn_background": True, **target}},
        "run": {"name": "rules"}})


def _rows(shards: list[str], job: TrainJob) -> list[dict]:
    return [row for shard in shards for row in read_samples({"shard": shard}, job.info.num_classes, True, None)]


# The COCO-Stuff rehearsal's target: the tower undilated, its dense embeddings rescaled before the refinement.
REHEARSAL_TARGET = {"head": "clip_dense", "output_stride": 32, "dense_norm": 15.73, "head_channels": 16,
                    "freeze_backbone": True}


@pytest.mark.parametrize("model, precision, training_precision, target", [
    *((model, precision, precision, None) for model in TINY for precision in LOW_PRECISIONS),
    (TINY_VIT_MODEL, "fp32", "bf16", None),  # the trunk copied from an fp32 tower: its norms under autocast
    *((TINY_MODEL, precision, precision, REHEARSAL_TARGET) for precision in LOW_PRECISIONS),
])
def test_denseclip_plus_steps_and_checkpoint_forward_keep_cudas_dtype_rules(model, precision, training_precision,
                                                                             target, shards, tmp_path,
                                                                             empty_text_cache):
    job = _job(shards, model, precision, training_precision, target)
    rows = _rows(shards, job)
    with CudaRules() as rules:
        worker = build_worker(job, 0, 1, torch.device("cpu"))
        losses = [train_on(worker, ray_batch(rows[2 * step:2 * step + 2]), step)[0] for step in range(2)]
    assert worker.precision.name == training_precision and all(torch.isfinite(loss) for loss in losses)
    save_checkpoint(str(tmp_path), worker.model, worker.optimizer, 2, job, {"log": [], "validation": []})
    with CudaRules():  # evaluate --checkpoint's forward
        target = load_target_checkpoint(str(tmp_path))
        labelled = target.label_images([row["image"] for row in rows[:2]])
    assert [labels.shape for labels, _ in labelled] == [(64, 64)] * 2 and rules.ops > 1000


@pytest.mark.parametrize("model", [pytest.param(TINY_MODEL, marks=pytest.mark.slow), TINY_VIT_MODEL])
def test_denseclip_plus_steps_keep_to_one_device(model, shards, empty_text_cache):
    """The worker build_worker makes, moved to meta (building the classifier reads class ids on the host; autocast
    has no meta device, so the target trains in fp32 there; the teacher labels in fp16)."""
    job = _job(shards, model, "fp16", training_precision="fp32", upsample_topk=None)
    worker = build_worker(job, 0, 1, torch.device("cpu"))
    target = worker.model.to(META)
    teacher = DenseCLIP.from_config(job.labeler, job.info.classes, _on_meta(worker.teacher.predictor.clip))  # prompts cached
    worker = dataclasses.replace(worker, device=META, model=target, trained=target, optimizer=build_optimizer(
        target, job.training), teacher=DenseCLIPTeacher(teacher, job.training.pseudo_label_refinement),
        coverage=worker.coverage.to(META))  # build_worker makes each of these on the worker's device
    rows = _rows(shards, job)
    with CudaRules():
        losses = [train_on(worker, ray_batch(rows[2 * step:2 * step + 2]), step)[0] for step in range(2)]
        labels, _ = target.predict(torch.rand(2, 3, 32, 32, device=META))
    assert all(loss.device == META for loss in losses) and labels.shape == (2, 32, 32)


def test_a_vit_target_is_built_on_its_towers_device():
    """build_worker builds the target from the teacher's tower, on the worker's GPU: nothing of it on the host."""
    clip = load_clip(TINY_VIT_MODEL, "random")
    embeddings, class_of_name = class_embeddings(clip, CLASSES, load_templates("synthetic"), cache=False)
    with CudaRules():
        target = build_target(TargetConfig(backbone="clip", backbone_weights="clip", head="clip_dense"), embeddings,
                              class_of_name, clip=_on_meta(clip), clip_head="naclip")
    assert {p.device for p in target.backbone.parameters()} == {META}


@pytest.mark.parametrize("head", HEADS)
def test_every_trainable_parameter_of_a_vit_target_gets_a_gradient(head):
    """What DistributedDataParallel needs: a parameter without a gradient stalls the second step on 2+ GPUs."""
    clip = load_clip(TINY_VIT_MODEL, "random")
    embeddings, class_of_name = class_embeddings(clip, CLASSES, load_templates("synthetic"), cache=False)
    model = build_target(TargetConfig(backbone="clip", backbone_weights="clip", head="clip_dense", head_channels=8),
                         embeddings, class_of_name, clip=clip, clip_head=head)
    model(torch.rand(2, 3, 32, 32)).logsumexp(dim=1).mean().backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert all(p.grad is not None for p in trainable.values()), [n for n, p in trainable.items() if p.grad is None]
    last = len(clip.model.visual.transformer.resblocks) - 1
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    dropped = {f"backbone.visual.transformer.resblocks.{last}.{part}" for part in
               ("ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")}
    assert frozen == (dropped if head in ("clearclip", "naclip") else set())


def test_a_vit_target_with_clearclips_head_takes_ddp_steps(tmp_path):
    """DDP (gloo, one process: the reducer's checks are those of every world size) stops at the second step when a
    trainable parameter got no gradient in the first."""
    clip = load_clip(TINY_VIT_MODEL, "random")
    embeddings, class_of_name = class_embeddings(clip, CLASSES, load_templates("synthetic"), cache=False)
    model = build_target(TargetConfig(backbone="clip", backbone_weights="clip", head="clip_dense", head_channels=8),
                         embeddings, class_of_name, clip=clip, clip_head="clearclip")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        trained = DistributedDataParallel(model)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
        for _ in range(2):
            optimizer.zero_grad()
            trained(torch.rand(2, 3, 32, 32)).logsumexp(dim=1).mean().backward()
            optimizer.step()
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ slow: real towers
@pytest.mark.slow
@pytest.mark.parametrize("precision", LOW_PRECISIONS)
@pytest.mark.parametrize("model", ["RN50", "ViT-B-16"])
def test_open_clip_towers_with_random_weights_keep_cudas_dtype_rules(model, precision, empty_text_cache):
    classes = [["cat"], ["dog"], ["grass"]]
    config = LabelerConfig(model=model, pretrained="random", precision=precision, templates="synthetic",
                           resize_to=None, head="maskclip")
    with CudaRules():
        labeller = DenseCLIP.from_config(config, classes)
        labelled = labeller.label_images(_images(1))
    assert labelled[0][0].shape == (96, 96)


# ------------------------------------------------------------------------------------------------ CPU twins
def test_host_copies_pack_a_batch_into_one_buffer_and_come_back_whole():
    arrays = [np.arange(24, dtype=np.uint8).reshape(2, 4, 3), np.full((3, 5, 3), 7, np.uint8),
              np.arange(30, dtype=np.uint8).reshape(2, 5, 3)[:, ::-1]]  # a flipped view: negative strides
    arrays[1].flags.writeable = False  # as Ray hands arrays out
    flat = _pack(arrays, pin_memory=False)  # the GPU path packs into pinned memory: this is its buffer
    assert flat.shape == (24 + 45 + 30,)
    for got, want in zip(_unpack(flat, arrays), arrays):
        np.testing.assert_array_equal(got.numpy(), want)
    on_device = to_device(arrays, "cpu")
    assert [t.shape for t in on_device] == [(2, 4, 3), (3, 5, 3), (2, 5, 3)]
    assert np.shares_memory(on_device[0].numpy(), arrays[0])  # wrapped, not copied
    for (got,), want in zip(to_host([(t,) for t in on_device]), arrays):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="one dtype"):
        _pack([arrays[0], np.zeros(2, np.float32)], pin_memory=False)


@pytest.mark.parametrize("message, out_of_memory", [
    ("CUDA out of memory. Tried to allocate 2.00 GiB", True),
    ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", True),
    ("cuDNN error: CUDNN_STATUS_ALLOC_FAILED", True),
    ("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED", True),
    ("CUDA error: cudaErrorMemoryAllocation", True),
    ("NVJPEG_STATUS_ALLOCATOR_FAILURE", True),
    ("CUDA error: an illegal memory access was encountered", False),
    ("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx`", False),
    ("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)", False),
])
def test_out_of_memory_is_recognised_in_every_cuda_library_wording(message, out_of_memory):
    assert is_out_of_memory(RuntimeError(message)) == out_of_memory
    assert is_out_of_memory(torch.AcceleratorError(message)) == out_of_memory


def _jpeg(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="JPEG", quality=95)
    return out.getvalue()


def test_device_jpeg_decoding_runs_inside_the_halving_path(monkeypatch):
    images = _images(5)
    rows = [{"key": f"k{i}", "shard": "s", "shard_total": 0, "error": "", "data": _jpeg(im)}
            for i, im in enumerate(images)]
    batch = decode_batch(ray_batch(rows), defer_jpeg=True)
    assert all(batch["jpeg"])  # every image is left for the actor's device to decode
    labeler = Labeler(LabelerConfig(model="denseclip-tiny-shapes", pretrained="random", batch_size=5), CLASSES)
    expected = labeler.label_batch(batch)
    real = torchvision.io.decode_jpeg
    calls: list[int] = []

    def decode_jpeg(data, *args, **kwargs):  # the device's decoder runs out of memory on more than 2 images
        calls.append(len(data) if isinstance(data, list) else 1)
        if isinstance(data, list) and len(data) > 2:
            raise RuntimeError("nvjpegDecodeBatched: NVJPEG_STATUS_ALLOCATOR_FAILURE")
        return real(data, *args, **kwargs)

    monkeypatch.setattr("torchvision.io.decode_jpeg", decode_jpeg)
    out = labeler.label_batch(batch)
    assert calls == [5, 2, 2, 1]  # halved, as a model that runs out of memory is
    assert not any(out["error"])
    for got, want in zip(out["labels"], expected["labels"]):
        np.testing.assert_array_equal(got, want)


def test_actors_make_the_gpu_ray_assigned_their_current_device(monkeypatch):
    current: list[str] = []
    monkeypatch.setattr(devices.ray, "get_gpu_ids", lambda: [3])
    monkeypatch.setattr(torch.cuda, "set_device", current.append)  # no GPU here: record what would be set
    monkeypatch.delenv(devices._NOSET_CUDA, raising=False)
    assert devices.actor_device("cuda:1") == "cuda:0"  # Ray made GPU 3 the actor's only visible device
    monkeypatch.setenv(devices._NOSET_CUDA, "1")
    assert devices.actor_device("cuda") == "cuda:3"  # every GPU visible: the assigned one by its ordinal
    assert devices.actor_device("cpu") == "cpu"
    assert current == ["cuda:0", "cuda:3"]


def test_the_throughput_probe_builds_on_the_gpu_its_task_was_given(monkeypatch):
    asked: list[str] = []
    monkeypatch.setattr(labeling_actor, "actor_device", lambda requested: asked.append(requested) or "cpu")
    measured = measure_throughput(LabelerConfig(model="denseclip-tiny-shapes", pretrained="random", device="cuda:1"), CLASSES,
                                  [_jpeg(image) for image in _images(2)], rounds=1)
    assert asked == ["cuda:1"] and measured.labels_per_s > 0


NVIDIA_SMI_L = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-8e1f)\nGPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-77aa)\n"
NVIDIA_SMI = "| NVIDIA-SMI 535.104.05   Driver Version: 535.104.05   CUDA Version: 12.2     |\n"


def test_a_gpu_torch_cannot_use_is_explained_by_driver_and_wheel():
    smi = parse_nvidia_smi(NVIDIA_SMI_L, NVIDIA_SMI)
    assert smi.gpus == ("NVIDIA H100 80GB HBM3",) * 2 and (smi.driver, smi.cuda) == ("535.104.05", "12.2")
    why = cuda_unusable(smi, "13.0", "The NVIDIA driver on your system is too old (found version 12020)")
    assert "2 GPU(s)" in why and "driver 535.104.05" in why and "CUDA 13.0" in why
    assert "runs CUDA up to 12.2, older than the wheel's 13.0" in why and "too old (found version 12020)" in why
    assert "CPU-only" in cuda_unusable(smi, None, "")
    assert "new enough" in cuda_unusable(parse_nvidia_smi(NVIDIA_SMI_L, NVIDIA_SMI.replace("12.2", "13.1")),
                                         "13.0", "")



def _fake_nvidia_smi(folder: Path) -> dict[str, str]:
    """An ``nvidia-smi`` in ``folder`` that lists two GPUs (none can run here); the environment that finds it."""
    fake = folder / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\nif [ \"$1\" = -L ]; then printf '{NVIDIA_SMI_L}'; else printf '{NVIDIA_SMI}'; fi\n")
    fake.chmod(0o755)
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch cannot use CUDA")
def test_a_gpu_that_nvidia_smi_lists_and_torch_cannot_use_is_a_problem_not_an_absence(tmp_path, monkeypatch):
    smi = nvidia_smi()
    why, present = cuda_problem()
    assert present == bool(smi and smi.gpus)  # here: skipped by the GPU suite only without any GPU
    monkeypatch.setenv("PATH", _fake_nvidia_smi(tmp_path)["PATH"])
    why, present = cuda_problem()
    assert present and "nvidia-smi lists 2 GPU(s)" in why and f"built for CUDA {torch.version.cuda}" in why


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch cannot use CUDA")
def test_the_gpu_suite_fails_on_such_a_node_and_skips_without_a_gpu(tmp_path):
    suite = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
             f"{ROOT / 'tests' / 'gpu' / 'test_gpu_smoke.py'}::test_bench_gpu_quick_runs_end_to_end"]
    broken = subprocess.run(suite, cwd=ROOT, env={**os.environ, **_fake_nvidia_smi(tmp_path)}, capture_output=True,
                            text=True, timeout=600, check=False)
    assert broken.returncode == 1 and "1 error" in broken.stdout, broken.stdout[-2000:]
    assert "the GPU suite cannot run: nvidia-smi lists 2 GPU(s)" in broken.stdout
    smi = nvidia_smi()
    if smi is None or not smi.gpus:
        absent = subprocess.run(suite, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
        assert absent.returncode == 0 and "1 skipped" in absent.stdout and "no GPU on this machine" in absent.stdout
