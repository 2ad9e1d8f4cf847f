"""Incremental, content-aware re-runs of the labeling job (issue 12.1), --retry-errors, and overlapping runs:
the planning and commits without Ray (fast), then the real pipelines/label.py on a local Ray (slow)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from batches import ray_batch
from labelled_stores import CLASSES, CONFIG, label_plan, store_contents

from denseclip import storage
from denseclip.mask_store import MaskStore
from denseclip.ray.labeling import (
    ShardCommitter,
    decode_batch,
    part_id,
    prepare_labeling,
    read_shard_rows,
    shard_fingerprints,
)
from denseclip.synthetic import write_shards

ROOT = Path(__file__).resolve().parents[1]


def rewrite_shard(url: str, seed: int, n: int) -> None:
    """Replace the shard at ``url`` by one of other scenes (other keys too), under the same name."""
    staging = Path(url).parent / f".staging-{seed}"
    written = write_shards(seed=seed, n=n, out=str(staging), shard_size=n, size=48)
    shutil.move(written[0], url)
    shutil.rmtree(staging)


def test_rewritten_and_added_shards_are_relabelled_and_the_store_equals_a_fresh_run(tmp_path, labeler):
    shards = write_shards(seed=21, n=9, out=str(tmp_path / "in"), shard_size=3, size=48)
    out = str(tmp_path / "out")
    first = prepare_labeling(str(tmp_path / "in"), out, CONFIG, CLASSES)
    assert (len(first.new), first.changed, first.unchanged) == (3, [], [])
    label_plan(first, labeler)
    before = store_contents(out)

    rewrite_shard(shards[1], seed=22, n=4)
    fourth = write_shards(seed=23, n=2, out=str(tmp_path / "more"), shard_size=2, size=48)[0]
    shutil.move(fourth, tmp_path / "in" / "shard-000003.tar")
    again = prepare_labeling(str(tmp_path / "in"), out, CONFIG, CLASSES)
    assert again.new == [str(tmp_path / "in" / "shard-000003.tar")] and again.changed == [shards[1]]
    assert again.unchanged == [shards[0], shards[2]] and again.todo == again.changed + again.new
    label_plan(again, labeler)

    fresh = str(tmp_path / "fresh")
    label_plan(prepare_labeling(str(tmp_path / "in"), fresh, CONFIG, CLASSES), labeler)
    after = store_contents(out)
    assert after == store_contents(fresh)
    assert not any(k.startswith("synthetic/s21/00000" + c) for k in after for c in "345")  # the old shard 1
    for key in (k for k in before if not k.startswith(("synthetic/s21/000003", "synthetic/s21/000004",
                                                        "synthetic/s21/000005"))):
        assert after[key] == before[key]  # unchanged shards were not touched
    assert MaskStore(out).keys() == set(after)  # the key index agrees

    shutil.move(shards[0], tmp_path / "elsewhere.tar")  # a shard leaves the input: reported, its rows kept
    last = prepare_labeling(str(tmp_path / "in"), out, CONFIG, CLASSES)
    assert (last.missing, last.todo, len(last.unchanged)) == ([shards[0]], [], 3)
    assert store_contents(out) == after


def test_copied_shards_are_unchanged_and_object_store_etags_are_the_fingerprint(tmp_path, make_bucket):
    shards = write_shards(seed=24, n=4, out=str(tmp_path / "a"), shard_size=2, size=32)
    prints = shard_fingerprints(shards)
    assert set(prints[shards[0]]) == {"size", "sha256"}
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # new files, new modification times, same bytes
    os.utime(tmp_path / "b" / "shard-000000.tar", (0, 0))
    copied = shard_fingerprints([s.replace("/a/", "/b/") for s in shards])
    assert list(copied.values()) == list(prints.values())

    bucket = make_bucket("fingerprints")
    remote = write_shards(seed=24, n=4, out=f"{bucket}/shards", shard_size=2, size=32)
    etags = shard_fingerprints(remote)
    assert set(etags[remote[0]]) == {"size", "etag"}
    write_shards(seed=25, n=2, out=f"{bucket}/shards", shard_size=2, size=32)  # rewrites shard-000000.tar
    now = shard_fingerprints(remote)
    assert now[remote[0]] != etags[remote[0]] and now[remote[1]] == etags[remote[1]]


def test_retry_errors_relabels_error_rows_and_merges_them_into_the_part(tmp_path, labeler):
    shards = write_shards(seed=26, n=6, out=str(tmp_path / "in"), shard_size=3, size=48)
    out = str(tmp_path / "out")
    plan = prepare_labeling(str(tmp_path / "in"), out, CONFIG, CLASSES)
    committer = ShardCommitter(plan)
    for shard in plan.todo:
        encoded = labeler(decode_batch(ray_batch(list(read_shard_rows(shard)))))
        if shard == shards[1]:  # as an older version stored a passing fault: an error row for a good image
            encoded["error"][1] = "labeling failed: RuntimeError: CUDA error: an illegal memory access"
        committer.add(pa.Table.from_pydict({k: list(v) for k, v in encoded.items()}))
    broken = store_contents(out)
    assert [e["key"] for e in MaskStore(out).errors()] == ["synthetic/s26/000004"]
    untouched = storage.read_bytes(storage.join(out, "masks", f"part-{part_id(shards[0])}.parquet"))

    assert prepare_labeling(str(tmp_path / "in"), out, CONFIG, CLASSES).retry == {}  # only when asked
    plan = prepare_labeling(str(tmp_path / "in"), out, CONFIG, CLASSES, retry_errors=True)
    assert plan.retry == {shards[1]: ["synthetic/s26/000004"]} and plan.todo == []
    label_plan(plan, labeler)
    store = MaskStore(out)
    assert store.errors() == [] and store.get("synthetic/s26/000004").shape == (48, 48)
    fixed = store_contents(out)
    assert {k: v for k, v in fixed.items() if k != "synthetic/s26/000004"} == broken
    assert storage.read_bytes(storage.join(out, "masks", f"part-{part_id(shards[0])}.parquet")) == untouched
    assert store.part_records()[part_id(shards[1])]["errors"] == 0


# ------------------------------------------------------------------------------------ the real job, slow
def run_label(*args, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "pipelines" / "label.py"), *map(str, args)], cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.mark.slow
def test_label_py_rerun_after_a_rewrite_and_a_new_shard_equals_a_fresh_run(tmp_path):
    shards = write_shards(seed=31, n=9, out=str(tmp_path / "in"), shard_size=3, size=48)
    # The shipped tiny CLIP, one image per batch: labels that do not depend on which images share a batch, so
    # the stores can be compared byte for byte.
    common = ["--classes", "synthetic", "--model", "denseclip-tiny-shapes", "--batch-size", "1", "--num-actors", "1"]
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    done = run_label("--input", tmp_path / "in", "--output", out, *common)
    assert done.returncode == 0, done.stderr[-3000:]

    rewrite_shard(shards[1], seed=32, n=4)
    shutil.move(write_shards(seed=33, n=2, out=str(tmp_path / "more"), shard_size=2, size=48)[0],
                tmp_path / "in" / "shard-000003.tar")
    again = run_label("--input", tmp_path / "in", "--output", out, *common)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["shards_new"], summary["shards_changed"], summary["shards_unchanged"],
            summary["shards_missing"]) == (1, 1, 2, 0)
    assert summary["images_labelled"] == 4 + 2 and summary["shards_committed"] == 2

    done = run_label("--input", tmp_path / "in", "--output", fresh, *common)
    assert done.returncode == 0, done.stderr[-3000:]
    assert store_contents(str(out)) == store_contents(str(fresh))
    assert len(store_contents(str(out))) == 3 + 4 + 3 + 2


@pytest.mark.slow
def test_two_overlapping_runs_one_labels_the_other_exits_then_a_waiting_run_follows(tmp_path):
    write_shards(seed=34, n=60, out=str(tmp_path / "in"), shard_size=10, size=48)
    out = tmp_path / "out"
    argv = [sys.executable, str(ROOT / "pipelines" / "label.py"), "--input", str(tmp_path / "in"), "--output",
            str(out), "--classes", "synthetic", "--model", "denseclip-tiny-shapes", "--pretrained", "random", "--batch-size", "2",
            "--lease-ttl", "10"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = [subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    # The second scheduled firing while the first still runs: it waits for the lease instead of exiting.
    deadline = time.monotonic() + 300
    while not (out / "lease.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    waiter = subprocess.Popen([*argv, "--wait-for-lease", "900"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    results = [p.communicate(timeout=900) + (p.returncode,) for p in runs]
    codes = sorted(code for _, _, code in results)
    assert codes == [0, 3], [r[1][-2000:] for r in results]
    refused = next(err for _, err, code in results if code == 3)
    assert "is held by another run" in refused and "--wait-for-lease" in refused
    winner = next(out_ for out_, _, code in results if code == 0)
    assert "60 images labelled" in winner

    _, waited_err = waiter.communicate(timeout=900)
    assert waiter.returncode == 0, waited_err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["shards_unchanged"], summary["images_labelled"]) == (6, 0)  # it came after, found all done
    assert len(store_contents(str(out))) == 60
    assert json.loads((out / "lease.json").read_text())["released"] is True
