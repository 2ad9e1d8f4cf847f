"""Labeling on Ray Data (denseclip/ray/labeling/, pipelines/label.py): stages without Ray, then the real
script on a local Ray with S3 (moto) input and output, a SIGKILL and a resume, and the fast config errors."""

import collections
import contextlib
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pytest
import ray
from batches import ray_batch
from PIL import Image
from pipeline_scripts import error_lines, load_pipeline

from denseclip import storage
from denseclip.config import ConfigError, LabelerConfig, resolve_vocabulary
from denseclip.mask_store import MaskStore, MaskStoreWriter
from denseclip.ray.labeling import (
    Labeler,
    LabelingError,
    LabelingPlan,
    ShardCommitter,
    Throughput,
    decode_batch,
    encode_batch,
    label_shards,
    measure_throughput,
    part_id,
    plan_actors,
    prepare_labeling,
    read_shard_rows,
    run_provenance,
)
from denseclip.ray.labeling import plan as labeling_plan
from denseclip.ray.labeling import run as labeling_run
from denseclip.shards import write_shard
from denseclip.synthetic import CLASS_NAMES, render_scene, write_shards

ROOT = Path(__file__).resolve().parents[1]
label_cli = load_pipeline("label")
# The fault-injecting labeler below runs in Ray's actor processes, which cannot import this test module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

CONFIG = LabelerConfig(model="denseclip-tiny-shapes", pretrained="random", batch_size=4)
CLASSES = resolve_vocabulary("synthetic")


def _encoded(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    """A tar written by hand: write_shard refuses unsafe names, which is exactly what these tests need."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_inputs(root: str) -> tuple[dict[str, tuple[int, int]], set[str]]:
    """Four shards under ``root`` (folder or URL): two of synthetic scenes, one of unusual and broken
    images, one hand-written tar whose first member escapes with ``../``. Returns (good key -> (H, W), bad keys)."""
    write_shards(seed=5, n=6, out=root, shard_size=3, size=64)
    good = {f"synthetic/s5/{i:06d}": (64, 64) for i in range(6)}
    rgb = Image.fromarray(render_scene(5, 99, size=64).image)
    jpeg = _encoded(rgb, "JPEG")
    grey16 = Image.fromarray(np.arange(36 * 52, dtype=np.uint16).reshape(36, 52) * 37)
    write_shard(storage.join(root, "shard-odd.tar"), [
        {"__key__": "odd/cmyk", "jpg": _encoded(rgb.crop((0, 0, 40, 48)).convert("CMYK"), "JPEG")},
        {"__key__": "odd/grey16", "png": _encoded(grey16, "PNG")},
        {"__key__": "bad/truncated", "jpg": jpeg[: len(jpeg) // 2]},
        {"__key__": "bad/empty", "jpg": b""},
        {"__key__": "bad/caption-only", "txt": "a red circle."},
    ])
    good |= {"odd/cmyk": (48, 40), "odd/grey16": (36, 52)}
    storage.write_bytes(storage.join(root, "shard-escape.tar"),
                        _tar([("../escape/evil.jpg", jpeg), ("ok/after-evil.jpg", jpeg)]))
    good["ok/after-evil"] = (64, 64)
    return good, {"bad/truncated", "bad/empty", "bad/caption-only", "../escape/evil"}


def all_keys(output: str) -> list[str]:
    """Every key of every committed part, duplicates kept."""
    store = MaskStore(output)
    return [k for part in sorted(store.committed_parts()) for k in store.read_part(part).column("key").to_pylist()]


def run_label(*args, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "pipelines" / "label.py"), *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, check=False, timeout=600, **kwargs)


# ------------------------------------------------------------------------------------- without Ray
def test_part_ids_are_safe_stable_and_distinct_per_shard():
    a, b = "s3://bucket/a/shard-000000.tar", "s3://bucket/b/shard-000000.tar"
    assert part_id(a) == part_id(a) and part_id(a) != part_id(b)
    assert part_id(a).startswith("shard-000000-")
    assert "/" not in part_id("/data/../x y/..odd.tar") and not part_id("/data/..odd.tar").startswith(".")


def test_shard_rows_flag_unsafe_duplicate_imageless_samples_and_a_corrupt_tail(tmp_path):
    jpeg = _encoded(Image.new("RGB", (8, 8)), "JPEG")
    data = _tar([("../up.jpg", jpeg), ("a.jpg", jpeg), ("a.json", b"{}"), ("b.txt", b"x"), ("c.jpg", jpeg),
                 ("a.jpg", jpeg)])
    path = tmp_path / "s.tar"
    path.write_bytes(data)
    rows = list(read_shard_rows(str(path)))
    assert [r["key"] for r in rows] == ["../up", "a", "b", "c", "a"]
    assert [bool(r["error"]) for r in rows] == [True, False, True, False, True]
    assert "unsafe" in rows[0]["error"] and "no image" in rows[2]["error"] and "duplicate" in rows[4]["error"]
    assert rows[1]["data"] == jpeg
    assert [r["shard_total"] for r in rows] == [0, 0, 0, 0, 5]  # only the last row says how many there are

    path.write_bytes(data[:2148])  # cut inside the data of the second member
    rows = list(read_shard_rows(str(path)))
    assert rows[-1]["key"] == "" and "corrupt shard" in rows[-1]["error"]
    assert rows[-1]["shard_total"] == len(rows) and all(r["shard_total"] == 0 for r in rows[:-1])


def test_actor_plan_leaves_cpus_for_the_tasks_feeding_the_pool():
    plan = plan_actors({"CPU": 2.0}, "cpu")
    assert (plan.num_actors, plan.min_actors, plan.cpus_per_actor, plan.torch_threads) == (2, 2, 0.5, 1)
    assert plan.num_actors * plan.cpus_per_actor + plan.task_cpus <= 2.0 and plan.gpus_per_actor == 0
    with pytest.raises(LabelingError, match="wait forever"):
        plan_actors({"CPU": 2.0}, "cpu", num_actors=2, cpus_per_actor=1.0)
    gpu = plan_actors({"CPU": 32.0, "GPU": 4.0}, "cuda")
    assert (gpu.num_actors, gpu.gpus_per_actor, gpu.cpus_per_actor) == (4, 1.0, 1.0)
    with pytest.raises(LabelingError, match="no GPU"):
        plan_actors({"CPU": 8.0}, "cuda")
    growing = plan_actors({"CPU": 8.0}, "cuda", num_actors=16)  # an autoscaling cluster adds GPU nodes later
    assert (growing.min_actors, growing.num_actors) == (1, 16)


def test_read_tasks_fit_beside_the_actors_on_every_node():
    # Two one-CPU nodes and one lost a moment ago that still counts: tasks sized from the 3 CPUs in total (0.45)
    # would fit on no node beside its 0.6-CPU actor, and Ray would wait forever.
    total = plan_actors({"CPU": 3.0}, "cpu", num_actors=2, cpus_per_actor=0.6)
    assert total.task_cpus + 0.6 > 1
    nodes = plan_actors({"CPU": 3.0}, "cpu", num_actors=2, cpus_per_actor=0.6, node_cpus=[1.0, 1.0, 1.0])
    assert nodes.task_cpus + 0.6 <= 1 and nodes.task_cpus > 0
    # Three actors of 0.45 on two nodes of one CPU: two share a node, which leaves 0.1 there.
    assert plan_actors({"CPU": 2.0}, "cpu", num_actors=3, cpus_per_actor=0.45).task_cpus + 2 * 0.45 > 1
    shared = plan_actors({"CPU": 2.0}, "cpu", num_actors=3, cpus_per_actor=0.45, node_cpus=[1.0, 1.0])
    assert 2 * 0.45 + shared.task_cpus <= 1 and shared.task_cpus > 0
    # On one big node the actors leave plenty of room: the plan is the one from the total alone.
    assert plan_actors({"CPU": 16.0}, "cpu", node_cpus=[16.0]) == plan_actors({"CPU": 16.0}, "cpu")


def test_gpu_plan_decodes_as_fast_as_the_gpus_label_or_on_the_gpus():
    node = {"CPU": 16.0, "GPU": 1.0}
    # One GPU labelling 1000 images/s, one CPU decoding 250: 4 CPUs, 5 with headroom, of the 15 left free.
    fed = plan_actors(node, "cuda", throughput=Throughput(labels_per_s=1000, decodes_per_cpu_s=250))
    assert (fed.read_tasks, fed.task_cpus, fed.decode_on_device) == (5, 1.0, False)
    assert fed.read_tasks * fed.task_cpus * 250 >= 1000 and fed.cpus_per_actor + fed.read_tasks <= 16
    # 10000 images/s would need 50 CPUs: the decoding moves to the GPU and every free CPU reads.
    fast = plan_actors(node, "cuda", throughput=Throughput(labels_per_s=10000, decodes_per_cpu_s=250))
    assert fast.decode_on_device and fast.read_tasks == 15
    # CPU actors decode their own share: the throughput of a CPU actor changes nothing.
    cpu = plan_actors({"CPU": 2.0}, "cpu", throughput=Throughput(labels_per_s=1, decodes_per_cpu_s=1))
    assert cpu == plan_actors({"CPU": 2.0}, "cpu") and not cpu.decode_on_device


def test_throughput_is_measured_on_the_jobs_images():
    scene = render_scene(4, 0, size=64).image
    samples = [_encoded(Image.fromarray(scene), "JPEG")] * 4 + [b"not an image"]
    measured = measure_throughput(CONFIG, CLASSES, samples, rounds=1)
    assert measured.labels_per_s > 0 and measured.decodes_per_cpu_s > 0
    assert measure_throughput(CONFIG, CLASSES, [b"not an image"]) is None


def test_jpegs_decoded_by_the_actor_are_labelled_as_decoded_by_the_tasks():
    scenes = [render_scene(8, i, size=64).image for i in range(3)]
    jpeg = _encoded(Image.fromarray(scenes[0]), "JPEG")
    rows = [{"key": f"k{i}", "shard": "s", "shard_total": 0, "error": "", "data": _encoded(Image.fromarray(im), fmt)}
            for i, (im, fmt) in enumerate(zip(scenes, ("JPEG", "PNG", "JPEG")))]
    rows.append({"key": "bad", "shard": "s", "shard_total": 0, "error": "", "data": jpeg[:200]})
    deferred = decode_batch(ray_batch(rows), defer_jpeg=True)
    assert [bool(j) for j in deferred["jpeg"]] == [True, False, True, False]  # the cut JPEG has no readable header
    assert deferred["image"][0].size == 0 and deferred["image"][1].shape == (64, 64, 3)
    assert "bad" in deferred["key"] and deferred["error"][3]
    labeler = Labeler(CONFIG, CLASSES)
    on_actor = labeler.label_batch(deferred)
    on_tasks = labeler.label_batch(decode_batch(ray_batch(rows)))
    assert list(on_actor["error"]) == list(on_tasks["error"])
    for a, b in zip(on_actor["labels"][:3], on_tasks["labels"][:3]):
        assert a.shape == (64, 64) and np.mean(a == b) > 0.99
    # A JPEG whose data breaks after a good header: decoded by Pillow after the device decoder refuses it,
    # or recorded with Pillow's reason.
    broken = dict(rows[0], key="cut", data=jpeg[: len(jpeg) // 2])
    out = labeler.label_batch(decode_batch(ray_batch([rows[0], broken]), defer_jpeg=True))
    assert not out["error"][0] and out["labels"][0].shape == (64, 64)
    assert out["error"][1] or out["labels"][1].shape == (64, 64)


def test_stages_and_committer_commit_a_shard_only_when_all_its_rows_arrived(tmp_path):
    shards = write_shards(seed=3, n=5, out=str(tmp_path / "in"), shard_size=3, size=64)
    empty = str(tmp_path / "in" / "empty.tar")
    Path(empty).write_bytes(_tar([]))
    plan = LabelingPlan(shards + [empty], shards + [empty], str(tmp_path / "out"), run_provenance(CONFIG, CLASSES))
    rows = [r for s in shards for r in read_shard_rows(s)]
    rows[1]["data"] = b"not an image"
    labeler = Labeler(CONFIG, CLASSES)
    encoded = encode_batch(labeler(decode_batch(ray_batch(rows))))
    table = pa.Table.from_pydict({k: list(v) for k, v in encoded.items()})
    assert table.column("height").to_pylist() == [64, 0, 64, 64, 64]
    # An actor that encodes its own masks (CPU clusters) gives the rows the separate encode stage gives.
    labeler.encode = True  # the same (randomly initialised) weights
    fused = labeler(decode_batch(ray_batch(rows)))
    assert pa.Table.from_pydict({k: list(v) for k, v in fused.items()}).equals(table)

    committer = ShardCommitter(plan)
    store = MaskStore(plan.output)
    committer.add(table.take([4, 0]))  # the second shard's last row, the first shard's first row
    assert store.committed_parts() == set()
    committer.add(table.take([3]))
    assert store.committed_parts() == {part_id(shards[1])}
    committer.add(table.take([2, 1]))
    assert store.committed_parts() == {part_id(shards[0]), part_id(shards[1])}
    committer.finish()  # the empty shard becomes an empty part: a re-run will not read it again
    assert store.committed_parts() == {part_id(s) for s in shards + [empty]}
    assert sorted(store.keys()) == [f"synthetic/s3/{i:06d}" for i in (0, 2, 3, 4)]
    assert [(e["key"], e["shard"]) for e in store.errors()] == [("synthetic/s3/000001", shards[0])]
    assert store.provenance["fingerprint"] == labeler.fingerprint
    assert labeler.fingerprint.startswith("denseclip-tiny-shapes/random-init/")
    assert store.provenance["activation"] == "gelu"
    assert store.get("synthetic/s3/000003").max() < len(CLASS_NAMES)

    unfinished = ShardCommitter(plan)
    unfinished.add(table.take([0]))
    with pytest.raises(RuntimeError, match="incomplete"):
        unfinished.finish()


def test_labeler_loses_only_the_image_that_fails():
    good = render_scene(1, 0, size=64).image
    batch = ray_batch([{"key": k, "shard": "s", "shard_total": 0, "error": "", "image": im}
                    for k, im in (("a", good), ("b", good.astype(np.float32)), ("c", good))])
    out = Labeler(CONFIG, CLASSES)(batch)
    assert [bool(e) for e in out["error"]] == [False, True, False] and "unusable image" in out["error"][1]
    assert out["labels"][0].shape == (64, 64) and out["labels"][1].size == 0


def _cpu_allocation_failure() -> RuntimeError:
    """What torch raises when the CPU allocator cannot serve a request (a real one: 4 EiB)."""
    import torch

    try:
        torch.empty(1 << 62, dtype=torch.uint8)
    except RuntimeError as exc:
        return exc
    raise AssertionError("a 4 EiB allocation succeeded")


def _cuda_out_of_memory() -> Exception:
    import torch

    # Injected: no GPU here. The message is the one torch's CUDA caching allocator gives.
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.77 GiB total capacity)")


def _failing_model(labeler: Labeler, fault, fails) -> list[int]:
    """Make ``labeler``'s model raise ``fault()`` on the calls for which ``fails(images)`` holds; returns the
    list the number of images of every call is appended to."""
    calls: list[int] = []
    real = labeler.dense_clip.label_maps

    def label_maps(images):
        calls.append(len(images))
        if fails(images):
            raise fault()
        return real(images)

    labeler.dense_clip.label_maps = label_maps
    return calls


@pytest.mark.parametrize("fault", [_cpu_allocation_failure, _cuda_out_of_memory])
def test_labeler_retries_out_of_memory_in_smaller_calls_then_reraises(fault):
    images = [render_scene(1, i, size=64).image for i in range(5)]
    batch = ray_batch([{"key": f"k{i}", "shard": "s", "shard_total": 0, "error": "", "image": im}
                    for i, im in enumerate(images)])
    labeler = Labeler(CONFIG, CLASSES)
    expected = labeler.label_batch(batch)
    real_model = labeler.dense_clip.label_maps
    calls = _failing_model(labeler, fault, lambda images: len(images) > 2)
    out = labeler.label_batch(batch)
    assert calls == [5, 2, 2, 1]  # the batch of 5 ran out of memory: halved until it fits, at the same settings
    assert not any(out["error"])
    for name in ("labels", "confidence"):
        for got, want in zip(out[name], expected[name]):
            np.testing.assert_array_equal(got, want)

    labeler.dense_clip.label_maps = real_model
    calls = _failing_model(labeler, fault, lambda images: True)
    with pytest.raises(RuntimeError, match="memory"):  # not even one image fits: the actor must go
        labeler.label_batch(batch)
    assert calls == [5, 2, 1]


def test_labeler_reraises_model_errors_instead_of_recording_them():
    good = render_scene(1, 0, size=64).image
    batch = ray_batch([{"key": k, "shard": "s", "shard_total": 0, "error": "", "image": good} for k in "abc"])
    labeler = Labeler(CONFIG, CLASSES)
    calls = _failing_model(labeler, lambda: RuntimeError("CUDA error: an illegal memory access was encountered"),
                           lambda images: True)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        labeler.label_batch(batch)
    assert calls == [3]  # no retry in smaller pieces: only running out of memory is helped by that


def test_prepare_refuses_another_run_unless_overwrite_and_finds_what_is_left(tmp_path):
    shards = write_shards(seed=2, n=4, out=str(tmp_path / "in"), shard_size=2, size=32)
    out = str(tmp_path / "out")
    other = {**run_provenance(CONFIG, [["cat"], ["dog"]]), "fingerprint": "x"}
    MaskStoreWriter(out, other).write_part(part_id(shards[0]), [{"key": "k", "mask": np.zeros((2, 2), np.uint8)}])
    with pytest.raises(LabelingError, match="differs in vocabulary.*--overwrite"):
        prepare_labeling(str(tmp_path / "in"), out, CONFIG, CLASSES)
    plan = prepare_labeling(str(tmp_path / "in"), out, CONFIG, CLASSES, overwrite=True)
    assert plan.todo == shards and MaskStore(out).committed_parts() == set()

    same = {**run_provenance(CONFIG, CLASSES), "fingerprint": "y"}
    MaskStoreWriter(out, same).write_part(part_id(shards[0]), [{"key": "k", "mask": np.zeros((2, 2), np.uint8)}])
    assert prepare_labeling(str(tmp_path / "in"), out, CONFIG, CLASSES).todo == shards[1:]
    with pytest.raises(LabelingError, match="no shards match"):
        prepare_labeling(str(tmp_path / "nothing" / "*.tar"), out, CONFIG, CLASSES)


def test_unreadable_bucket_fails_at_start(s3_endpoint, make_bucket, tmp_path):
    with pytest.raises(LabelingError, match="input 's3://no-such-bucket-denseclip"):
        prepare_labeling("s3://no-such-bucket-denseclip/shards/*.tar", str(tmp_path), CONFIG, CLASSES)
    bucket = make_bucket("label-in")
    write_shards(seed=2, n=1, out=f"{bucket}/shards", size=32)
    with pytest.raises(LabelingError, match="output s3://no-such-bucket-denseclip"):
        prepare_labeling(f"{bucket}/shards", "s3://no-such-bucket-denseclip/masks", CONFIG, CLASSES)


def test_job_file_and_flags_merge_and_bad_values_name_their_field(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("input: a/*.tar\noutput: out\nvocabulary: synthetic\nnum_actors: 3\n"
                   "labeler: {mode: slide, batch_size: 4}\n")
    parse = label_cli.build_parser().parse_args
    loaded = label_cli.load_job(parse(["--config", str(job), "--batch-size", "2", "--upsample-topk", "0"]))
    assert (loaded.labeler.mode, loaded.labeler.batch_size, loaded.labeler.upsample_topk) == ("slide", 2, None)
    assert (loaded.input, loaded.num_actors, loaded.classes) == ("a/*.tar", 3, CLASSES)
    flags = ["--input", "x", "--output", "y"]
    overridden = label_cli.load_job(parse(["--config", str(job), "--set", "labeler.mode=whole", "--set",
                                           "num_actors=5", "--set", "labeler.key_smoothing=0.5"]))
    assert (overridden.labeler.mode, overridden.num_actors, overridden.labeler.key_smoothing) == ("whole", 5, 0.5)
    preset = label_cli.load_job(parse([*flags, "--classes", "context", "--model", "RN50", "--set",
                                       "labeler.protocol=paper"]))
    assert preset.labeler.resize_to == (520, 520)  # the paper preset's value for the dataset named as vocabulary
    with pytest.raises(ConfigError, match="labeler.sideways: unknown field"):
        label_cli.load_job(parse([*flags, "--classes", "synthetic", "--set", "labeler.sideways=1"]))
    many = tmp_path / "many.txt"
    many.write_text("".join(f"class {i}\n" for i in range(300)))
    assert len(label_cli.load_job(parse([*flags, "--classes", str(many)])).classes) == 300  # 16-bit maps
    for argv, field in [(["--config", str(job), "--cpus-per-actor", "-1"], "cpus_per_actor"),
                        ([*flags, "--classes", "synthetic", "--wait-for-lease", "-1"], "--wait-for-lease"),
                        ([*flags, "--classes", "synthetic", "--precision", "fp8"], "labeler.precision"),
                        ([*flags], "classes: required")]:
        with pytest.raises(ConfigError, match=field):
            label_cli.load_job(parse(argv))
    job.write_text("input: a\noutput: b\nvocabulary: synthetic\nlabeler: {mode: sideways}\n")
    with pytest.raises(ConfigError, match=f"{job}: labeler.mode"):
        label_cli.load_job(parse(["--config", str(job)]))
    job.write_text("inputs: a\n")
    with pytest.raises(ConfigError, match="inputs: unknown field"):
        label_cli.load_job(parse(["--config", str(job)]))


def test_head_flag_reaches_the_labels_and_the_stored_provenance(tmp_path):
    shards = write_shards(seed=3, n=2, out=str(tmp_path / "in"), shard_size=2, size=64)
    assert len(shards) == 1
    args = label_cli.build_parser().parse_args(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                                                "--classes", "synthetic", "--model", "denseclip-tiny-shapes-vit",
                                                "--pretrained", "random", "--head", "naclip"])
    job = label_cli.load_job(args)
    plan = prepare_labeling(job.input, job.output, job.labeler, job.classes)
    labeler = Labeler(job.labeler, job.classes, encode=True)
    assert labeler.dense_clip.head == "naclip"
    committer = ShardCommitter(plan)
    encoded = labeler(decode_batch(ray_batch(list(read_shard_rows(shards[0])))))
    committer.add(pa.Table.from_pydict({k: list(v) for k, v in encoded.items()}))
    committer.finish()
    provenance = MaskStore(job.output).provenance
    assert provenance["options"]["head"] == "naclip" and provenance["model"] == "denseclip-tiny-shapes-vit"
    assert provenance["fingerprint"].startswith("denseclip-tiny-shapes-vit/random-init/")  # + the weights' digest
    # Resuming with another head is another run.
    other = dataclasses.replace(job.labeler, head="sclip")
    with pytest.raises(LabelingError, match="differs in options"):
        prepare_labeling(job.input, job.output, other, job.classes)


def test_a_bad_value_fails_fast_before_torch_or_ray_are_imported(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("input: a\noutput: b\nvocabulary: synthetic\nlabeler: {batch_size: 0}\n")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "pipelines" / "label.py"),
                           "--config", str(job)], capture_output=True, text=True, timeout=60, check=False)
    elapsed = time.perf_counter() - start
    assert done.returncode == 2
    assert f"{job}: labeler.batch_size: must be a positive integer" in done.stderr
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert imported and not imported & {"torch", "ray", "open_clip"}
    assert elapsed < 10, elapsed  # < 1 s on an idle machine; this only guards against a model or Ray start


def test_offline_without_weights_fails_in_one_line_before_ray_starts(tmp_path, offline_hub):
    write_shards(seed=2, n=2, out=str(tmp_path / "in"), size=32)
    done = subprocess.run([sys.executable, str(ROOT / "pipelines" / "label.py"), "--input", str(tmp_path / "in"),
                           "--output", str(tmp_path / "out"), "--classes", "red car, road", "--model", "RN50"],
                          cwd=ROOT, env={**os.environ, **offline_hub, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, check=False, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "RN50/openai" in done.stderr and "--pretrained PATH_OR_URL" in done.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- on a local Ray
def test_label_end_to_end_s3_in_s3_out(make_bucket):
    bucket = make_bucket("label")
    good, bad = make_inputs(f"{bucket}/shards")
    out = f"{bucket}/masks/"
    args = ["--input", f"{bucket}/shards/*.tar", "--output", out, "--model", "denseclip-tiny-shapes", "--pretrained", "random", "--batch-size", "4"]
    done = run_label(*args, "--classes", "synthetic")
    assert done.returncode == 0, done.stderr[-4000:]

    assert collections.Counter(all_keys(out)) == collections.Counter(list(good))  # every good key exactly once
    store = MaskStore(out)
    for key, size in good.items():
        assert store.get(key).shape == size and store.get_confidence(key).shape == size, key
        assert store.get(key).max() < len(CLASS_NAMES)
    errors = store.errors()
    assert sorted(e["key"] for e in errors) == sorted(bad) and all(e["reason"] for e in errors)
    assert {e["shard"] for e in errors if e["key"].startswith("bad/")} == {f"{bucket}/shards/shard-odd.tar"}
    assert len(store.committed_parts()) == 4
    provenance = store.provenance
    assert provenance["vocabulary"] == CLASSES and provenance["activation"] == "gelu"
    assert provenance["fingerprint"].startswith("denseclip-tiny-shapes/random-init/")
    summary = json.loads(storage.read_bytes(f"{bucket}/masks/summary.json"))
    assert summary["status"] == "succeeded"
    assert (summary["images_labelled"], summary["errors"], summary["shards_committed"]) == (len(good), len(bad), 4)
    assert f"{len(good)} images labelled, {len(bad)} errors" in done.stdout
    # A successful run prints no error-level line (bad images are rows of the errors table, not errors of the
    # run); what Ray prints is in the run's log, which the last line names.
    assert not error_lines(done.stdout + done.stderr), done.stdout + done.stderr
    assert "4/4 shards committed" in done.stdout and done.stdout.splitlines()[-1].startswith("label: log: ")
    with fsspec.open(done.stdout.splitlines()[-1].removeprefix("label: log: "), "r") as log:
        assert "Dataset" in log.read()  # Ray Data's own lines

    fs, path = fsspec.core.url_to_fs(f"{bucket}/masks/masks")
    before = {p: fs.info(p)["ETag"] for p in fs.ls(path, refresh=True)}
    again = run_label(*args, "--classes", "synthetic")  # nothing left: no Ray, nothing rewritten
    assert again.returncode == 0 and "4 already committed" in again.stdout, again.stderr[-2000:]
    assert {p: fs.info(p)["ETag"] for p in fs.ls(path, refresh=True)} == before

    other = run_label(*args, "--classes", "red circle, blue star")
    assert other.returncode == 2 and "differs in vocabulary" in other.stderr and "--overwrite" in other.stderr


def _descendants(pid: int) -> list[int]:
    """PIDs of every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            children.setdefault(int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]), []).append(
                int(entry))
    found, todo = [], list(children.get(pid, []))
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def _wait_for_parts(out: str, job: subprocess.Popen, more_than: int) -> int:
    deadline = time.monotonic() + 300
    while len(MaskStore(out).committed_parts()) <= more_than and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(MaskStore(out).committed_parts())


def test_sigkill_of_the_job_and_of_an_actor_then_every_image_exactly_once(tmp_path):
    shards = write_shards(seed=4, n=240, out=str(tmp_path / "in"), shard_size=20, size=64)
    out = str(tmp_path / "out")
    args = [sys.executable, str(ROOT / "pipelines" / "label.py"), "--input", str(tmp_path / "in"), "--output", out,
            "--classes", "synthetic", "--model", "denseclip-tiny-shapes", "--pretrained", "random", "--batch-size", "2"]

    def start(log: str) -> subprocess.Popen:
        with open(tmp_path / log, "w") as out:
            return subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=dict(os.environ, OMP_NUM_THREADS="1"))

    job = start("first.log")
    try:
        _wait_for_parts(out, job, 0)
        os.kill(job.pid, signal.SIGKILL)
        job.wait()
    finally:
        with contextlib.suppress(ProcessLookupError):  # the local Ray the killed job had started
            os.killpg(job.pid, signal.SIGKILL)
    first = {p: storage.read_bytes(storage.join(out, "masks", f"part-{p}.parquet"))
             for p in MaskStore(out).committed_parts()}
    assert 0 < len(first) < len(shards), (tmp_path / "first.log").read_text()[-3000:]

    job = start("second.log")
    try:
        # Once the re-run commits, its actors are mid-stream: kill one; Ray restarts it and retries its batch.
        assert _wait_for_parts(out, job, len(first)) < len(shards), "the re-run ended before an actor could die"
        actors = [pid for pid in _descendants(job.pid)
                  if b"MapBatches(Labeler)" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert actors
        os.kill(actors[0], signal.SIGKILL)
        assert job.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()[-4000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
    assert f"{len(first)} already committed" in (tmp_path / "second.log").read_text()
    keys = all_keys(out)
    assert len(keys) == len(set(keys)) == 240
    assert set(keys) == {f"synthetic/s4/{i:06d}" for i in range(240)}
    for part, data in first.items():  # what was committed before the kill is kept as it was
        assert storage.read_bytes(storage.join(out, "masks", f"part-{part}.parquet")) == data


def _faulty_stage(fault: str, calls_dir: Path) -> type[Labeler]:
    """The pipeline's Labeler with a model that fails: ``"oom"``, a real CPU allocation failure on every call
    of more than one image; ``"error"``, a CUDA-like RuntimeError on any call holding a 48-pixel image. Each
    call appends ``"<images> ok|fail"`` to ``calls_dir/<pid>.log``."""

    class FaultyLabeler(Labeler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            real = self.dense_clip.label_maps

            def label_images(images):
                fails = len(images) > 1 if fault == "oom" else any(im.shape[0] == 48 for im in images)
                with open(calls_dir / f"{os.getpid()}.log", "a") as log:
                    log.write(f"{len(images)} {'fail' if fails else 'ok'}\n")
                if fails and fault == "oom":
                    raise _cpu_allocation_failure()
                if fails:
                    raise RuntimeError("CUDA error: an illegal memory access was encountered")
                return real(images)

            self.dense_clip.label_maps = label_images

    return FaultyLabeler


# Half a CPU: after the failed run below, Ray may still be restarting that run's actor while the next run starts.
ONE_ACTOR = {"num_actors": 1, "cpus_per_actor": 0.5}


def _calls(calls_dir: Path) -> dict[int, list[str]]:
    return {int(log.stem): log.read_text().splitlines() for log in calls_dir.glob("*.log")}


@pytest.mark.slow
def test_model_faults_on_a_real_ray_retry_on_a_fresh_actor_and_never_become_error_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(labeling_run, "MAX_TASK_RETRIES", 1)  # one retry: enough to see it, half the actor starts
    # An actor that ends itself looks unreachable to its caller, like a lost node's; on one node nothing dies, and
    # the run must fail rather than resume (a short wait for a node to die keeps the test short).
    monkeypatch.setattr(labeling_plan, "NODE_DEATH_WAIT_S", 5.0)
    shards = write_shards(seed=6, n=4, out=str(tmp_path / "in"), shard_size=2, size=64)
    poisoned = write_shards(seed=7, n=2, out=str(tmp_path / "poisoned"), shard_size=2, size=48)
    out = str(tmp_path / "out")
    oom_calls, error_calls = tmp_path / "oom", tmp_path / "error"
    oom_calls.mkdir()
    error_calls.mkdir()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        # Out of memory on every call of two or more images: labelled one by one, nothing lost, no error row.
        plan = prepare_labeling(shards, out, CONFIG, CLASSES)
        summary = label_shards(plan, CONFIG, CLASSES, **ONE_ACTOR, labeler=_faulty_stage("oom", oom_calls))
        assert (summary["images_labelled"], summary["errors"], summary["shards_committed"]) == (4, 0, 2)
        calls = [call for log in _calls(oom_calls).values() for call in log]
        assert "2 fail" in calls and calls.count("1 ok") == 4

        # Another model error: the actor ends, a fresh one retries the batch, then the job fails; the
        # poisoned shard is not committed and nothing became an error row.
        plan = prepare_labeling(shards + poisoned, out, CONFIG, CLASSES)
        assert plan.todo == poisoned
        with pytest.raises(ray.exceptions.RayError):
            label_shards(plan, CONFIG, CLASSES, **ONE_ACTOR, labeler=_faulty_stage("error", error_calls))
        attempts = _calls(error_calls)
        assert len(attempts) == 2 and all(log == ["2 fail"] for log in attempts.values())  # two actors, one try each
        store = MaskStore(out)
        assert store.committed_parts() == {part_id(s) for s in shards} and store.errors() == []

        # Once the model works again, a re-run labels what is left: every image exactly once.
        plan = prepare_labeling(shards + poisoned, out, CONFIG, CLASSES)
        assert label_shards(plan, CONFIG, CLASSES, **ONE_ACTOR)["images_labelled"] == 2
    finally:
        ray.shutdown()
    keys = all_keys(out)
    assert len(keys) == len(set(keys)) == 6 and MaskStore(out).errors() == []
