"""A mask store that heals: real stores damaged on local disk and on moto's S3 API, found by ``verify_store``,
named or skipped by the readers, and relabelled by a labelling re-run (in process, through the library) into a
store equal to a fresh run's; the one definition of damage vs transient read errors; commits that fsync; image
formats; a refused run that writes nothing. The real pipelines/label.py and ``denseclip verify`` run last (slow)."""

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import ClassVar

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem
from labelled_stores import CLASSES, CONFIG, label_plan, store_contents, store_errors
from PIL import Image
from pipeline_scripts import load_pipeline

from denseclip import storage
from denseclip.damage import READ_ATTEMPTS, DamagedPartError
from denseclip.images import SOURCE_FORMATS, ImageDecodeError, decode_image, decode_label_map, read_image
from denseclip.mask_store import (
    ERRORS_DIR,
    INDEX_DIR,
    INDEX_FILE,
    MASKS_DIR,
    MaskStore,
    MaskStoreWriter,
    part_url,
    verify_store,
)
from denseclip.ray.evaluation import read_ground_truth_rows
from denseclip.ray.labeling import part_id, prepare_labeling, read_shard_rows
from denseclip.ray.training import read_samples
from denseclip.shards import read_shard, write_shard
from denseclip.synthetic import write_shards

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- the stores
@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """Three shards of two scenes, and ``zz-bad.tar`` with an undecodable image (an error row) and a good one."""
    folder = tmp_path_factory.mktemp("in")
    shards = write_shards(seed=41, n=6, out=str(folder), shard_size=2, size=32)
    good = next(read_shard(shards[0]))["jpg"]
    bad = str(folder / "zz-bad.tar")
    write_shard(bad, [{"__key__": "bad/broken", "jpg": b"not a jpeg"}, {"__key__": "bad/good", "jpg": good}])
    return {"folder": str(folder), "shards": shards, "bad": bad}


@pytest.fixture(scope="module")
def fresh(inputs, labeler, tmp_path_factory) -> dict:
    """What a fresh run makes of the inputs: masks, errors and keys."""
    out = str(tmp_path_factory.mktemp("fresh"))
    label_plan(prepare_labeling(inputs["folder"], out, CONFIG, CLASSES), labeler)
    assert verify_store(out).ok
    return {"masks": store_contents(out), "errors": store_errors(out), "keys": MaskStore(out).keys()}


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow)])  # moto: a few seconds a case
def output(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    return request.getfixturevalue("make_bucket")("heal") + "/out"


def keys_of(shard: str) -> list[str]:
    return [sample["__key__"] for sample in read_shard(shard)]


def assert_as_fresh(out: str, fresh: dict) -> None:
    assert store_contents(out) == fresh["masks"]
    assert store_errors(out) == fresh["errors"] and fresh["errors"]
    assert MaskStore(out).keys() == fresh["keys"]
    assert verify_store(out, deep=True).lines() == [f"verify: {out}: 4 parts, 0 damaged, key index agrees"]


def _bytes(url: str) -> bytes:
    return storage.read_bytes(url)


def _put(url: str, data: bytes) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.pipe_file(path, data)  # in place, as a partial copy or a stray edit would (not an atomic commit)


def truncate(url: str) -> None:
    _put(url, _bytes(url)[:100])


def empty(url: str) -> None:
    _put(url, b"")


def random_bytes(url: str) -> None:
    _put(url, np.random.default_rng(0).bytes(len(_bytes(url))))


def delete(url: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.rm(path)


def flip_mask_byte(url: str) -> None:
    """Flip one byte in the middle of the first mask cell (the mask column's first chunk where its cells are not
    stored as they are)."""
    data = bytearray(_bytes(url))
    parquet = pq.ParquetFile(fsspec.open(url, "rb").open())
    cell = parquet.read_row_group(0, columns=["mask"]).column(0)[0].as_py()
    offset = data.find(cell) + len(cell) // 2 if data.find(cell) >= 0 else None
    if offset is None:
        chunk = parquet.metadata.row_group(0).column(parquet.schema_arrow.names.index("mask"))
        offset = (chunk.dictionary_page_offset or chunk.data_page_offset) + chunk.total_compressed_size // 2
    data[offset] ^= 0xFF
    _put(url, bytes(data))


# case -> (the file damaged, how, what verify says of it, found only by --deep)
PART_DAMAGE = {
    "truncated part": (MASKS_DIR, truncate, r"100 bytes, its manifest records \d+", False),
    "zero-length part": (MASKS_DIR, empty, r"0 bytes, its manifest records \d+", False),
    "random bytes for a part": (MASKS_DIR, random_bytes, "unreadable: ArrowInvalid: Parquet magic bytes", False),
    "flipped byte in a mask cell": (MASKS_DIR, flip_mask_byte, "its SHA-256 differs from its manifest's", True),
    "errors part missing": (ERRORS_DIR, delete, "missing beside its masks part", False),
}


@pytest.mark.parametrize("case", PART_DAMAGE)
def test_a_damaged_part_is_found_named_skipped_and_relabelled_into_a_fresh_runs_store(case, output, inputs, fresh,
                                                                                      labeler):
    folder, damage, reason, deep_only = PART_DAMAGE[case]
    label_plan(prepare_labeling(inputs["folder"], output, CONFIG, CLASSES), labeler)
    shard = inputs["bad"] if folder == ERRORS_DIR else inputs["shards"][1]
    url = part_url(output, folder, part_id(shard))
    damage(url)

    report = verify_store(output, deep=True)
    assert [(d.url, d.shard) for d in report.damaged] == [(url, shard)] and re.match(reason, report.damaged[0].reason)
    assert report.lines()[0] == f"damaged: {url} (shard {shard}): {report.damaged[0].reason}"
    assert verify_store(output).ok == deep_only
    if not deep_only:  # readers name the file, or skip it when asked
        with pytest.raises(DamagedPartError, match=re.escape(url)):
            MaskStore(output).keys()
        skipping = MaskStore(output, skip_damaged=True)
        assert skipping.keys() == fresh["keys"] - set(keys_of(shard))
        assert list(skipping.skipped) == [part_id(shard)]

    plan = prepare_labeling(inputs["folder"], output, CONFIG, CLASSES)
    assert plan.repaired == [shard] and plan.todo == [shard] and len(plan.unchanged) == 3
    assert str(plan.damaged[part_id(shard)]) == str(report.damaged[0])
    assert label_plan(plan, labeler).repaired == 1
    assert_as_fresh(output, fresh)


def test_bit_rot_that_keeps_the_file_identity_is_found_by_deep_checks_only(tmp_path, inputs, fresh, labeler):
    out = str(tmp_path / "out")
    label_plan(prepare_labeling(inputs["folder"], out, CONFIG, CLASSES), labeler)
    url = part_url(out, MASKS_DIR, part_id(inputs["shards"][2]))
    before = os.stat(url)
    flip_mask_byte(url)
    os.utime(url, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size, inode and time: the index vouches
    assert verify_store(out).ok and prepare_labeling(inputs["folder"], out, CONFIG, CLASSES).todo == []
    assert [d.url for d in verify_store(out, deep=True).damaged] == [url]
    plan = prepare_labeling(inputs["folder"], out, CONFIG, CLASSES, deep=True)
    assert plan.repaired == [inputs["shards"][2]]
    label_plan(plan, labeler)
    assert_as_fresh(out, fresh)


@pytest.mark.parametrize("case", ["deleted", "random bytes"])
def test_a_missing_or_unreadable_key_index_is_rebuilt(case, output, inputs, fresh, labeler):
    label_plan(prepare_labeling(inputs["folder"], output, CONFIG, CLASSES), labeler)
    index = storage.join(output, INDEX_DIR, INDEX_FILE)
    (delete if case == "deleted" else random_bytes)(index)
    assert verify_store(output).index == ["missing or unreadable: 4 committed parts are not indexed"]
    assert MaskStore(output).keys() == fresh["keys"]  # lookups read the parts instead
    plan = prepare_labeling(inputs["folder"], output, CONFIG, CLASSES)
    assert plan.todo == [] and plan.damaged == {}
    assert label_plan(plan, labeler).parts == 0
    assert_as_fresh(output, fresh)


def test_a_stale_key_index_is_rebuilt(output, inputs, fresh, labeler):
    first = inputs["shards"][:2]
    label_plan(prepare_labeling(first, output, CONFIG, CLASSES), labeler)
    index = storage.join(output, INDEX_DIR, INDEX_FILE)
    old = _bytes(index)
    label_plan(prepare_labeling(inputs["folder"], output, CONFIG, CLASSES), labeler)
    _put(index, old)  # the index of the earlier run, before two more parts were committed
    parts = sorted(part_id(s) for s in (inputs["shards"][2], inputs["bad"]))
    assert verify_store(output).index == [f"2 committed parts are not in it ({', '.join(parts)})"]
    assert MaskStore(output).keys() == fresh["keys"]
    assert prepare_labeling(inputs["folder"], output, CONFIG, CLASSES).todo == []
    label_plan(prepare_labeling(inputs["folder"], output, CONFIG, CLASSES), labeler)
    assert_as_fresh(output, fresh)


def test_denseclip_verify_and_label_py_verify_print_one_line_per_damaged_part(tmp_path, inputs, labeler, capsys):
    from denseclip import cli

    out = str(tmp_path / "out")
    label_plan(prepare_labeling(inputs["folder"], out, CONFIG, CLASSES), labeler)
    truncated = part_url(out, MASKS_DIR, part_id(inputs["shards"][1]))
    missing = part_url(out, ERRORS_DIR, part_id(inputs["bad"]))
    truncate(truncated)
    delete(missing)
    delete(storage.join(out, INDEX_DIR, INDEX_FILE))
    expected = [(rf"damaged: {re.escape(truncated)} \(shard {re.escape(inputs['shards'][1])}\): 100 bytes, its "
                 r"manifest records \d+"),
                rf"damaged: {re.escape(missing)} \(shard {re.escape(inputs['bad'])}\): missing beside its masks part",
                "key index: missing or unreadable: 2 committed parts are not indexed",
                rf"verify: {re.escape(out)}: 4 parts, 2 damaged, key index disagrees \(1\)"]
    for main, argv in ((cli.main, ["verify", "--store", out]),
                       (load_pipeline("label").main, ["--verify", "--deep", "--output", out])):
        assert main(argv) == 1
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == len(expected) and all(re.fullmatch(e, line) for e, line in zip(expected, lines)), lines

    label_plan(prepare_labeling(inputs["folder"], out, CONFIG, CLASSES), labeler)
    assert cli.main(["verify", "--store", out, "--deep"]) == 0
    assert capsys.readouterr().out == f"verify: {out}: 4 parts, 0 damaged, key index agrees\n"
    assert cli.main(["verify", "--store", str(tmp_path / "elsewhere")]) == 2
    assert "no committed mask parts under" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- readers
@pytest.fixture
def truncated(tmp_path, inputs, labeler) -> dict:
    """A store whose part of shard 1 is truncated."""
    out = str(tmp_path / "damaged")
    label_plan(prepare_labeling(inputs["folder"], out, CONFIG, CLASSES), labeler)
    url = part_url(out, MASKS_DIR, part_id(inputs["shards"][1]))
    truncate(url)
    return {"out": out, "url": url, "lost": keys_of(inputs["shards"][1])}


def test_export_names_a_damaged_part_or_skips_it_when_asked(tmp_path, truncated, fresh, capsys):
    export = load_pipeline("export")
    argv = ["--input", truncated["out"], "--format", "png", "--output", str(tmp_path / "png")]
    assert export.main(argv) == 2
    assert truncated["url"] in capsys.readouterr().err
    assert export.main([*argv, "--skip-damaged"]) == 0
    captured = capsys.readouterr()
    assert f"{len(fresh['keys']) - 2} label maps written" in captured.out
    assert f"export: skipped the damaged part {truncated['url']}" in captured.err
    exported = [json.loads(line)["key"] for line in (tmp_path / "png" / "files.jsonl").read_text().splitlines()]
    assert sorted(exported) == sorted(fresh["keys"] - set(truncated["lost"]))


def test_evaluate_names_a_damaged_part_or_skips_it_when_asked(tmp_path, inputs, truncated, capsys):
    evaluate = load_pipeline("evaluate")
    argv = ["--pred", truncated["out"], "--input", f"{inputs['folder']}/shard-*.tar", "--classes", "synthetic",
            "--output", str(tmp_path / "report")]
    assert evaluate.main(argv) == 2
    assert truncated["url"] in capsys.readouterr().err.strip().splitlines()[-1]
    assert evaluate.main([*argv, "--skip-damaged"]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["num_images"] == 4 and report["inputs"]["unscored_keys"] == 2
    assert [p.split(" ")[0] for p in report["inputs"]["skipped_damaged_parts"]] == [truncated["url"]]


def test_training_reads_name_a_damaged_part_or_skip_its_samples_when_asked(inputs, truncated):
    read = {"num_classes": len(CLASSES), "with_label": False, "mask_store": truncated["out"]}
    with pytest.raises(DamagedPartError, match=re.escape(truncated["url"])):
        list(read_samples({"shard": inputs["shards"][0]}, **read))
    assert [r["key"] for r in read_samples({"shard": inputs["shards"][1]}, **read, skip_damaged=True)] == []
    kept = [r["key"] for r in read_samples({"shard": inputs["shards"][0]}, **read, skip_damaged=True)]
    assert kept == keys_of(inputs["shards"][0])


# ------------------------------------------------------------------------------------- don't damage
class FlakyFileSystem(LocalFileSystem):
    """Local files (``flakyfile://`` URLs) whose reads fail with a dropped connection, ``failures`` times, once
    ``after`` bytes of a file were read."""

    protocol = "flakyfile"
    faults: ClassVar[dict] = {"failures": 0, "after": 0}

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("flakyfile://"))

    def _open(self, path, mode="rb", **kwargs):
        return _FlakyFile(super()._open(path, mode, **kwargs), self.faults)


class _FlakyFile:
    def __init__(self, file, faults: dict):
        self._file, self._faults, self._read = file, faults, 0

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()

    def read(self, size=-1):
        data = self._file.read(size)
        self._read += len(data)
        if self._faults["failures"] and self._read > self._faults["after"]:
            self._faults["failures"] -= 1
            raise ConnectionResetError("connection reset by peer")
        return data


@pytest.fixture
def flaky(monkeypatch):
    monkeypatch.setattr("denseclip.shards.RETRY_DELAY_S", 0.01)
    fsspec.register_implementation("flakyfile", FlakyFileSystem, clobber=True)

    def arm(failures: int, after: int) -> None:
        FlakyFileSystem.faults.update(failures=failures, after=after)

    yield arm
    arm(0, 0)


def test_transient_read_errors_are_retried_everywhere_and_only_damage_becomes_an_error_row(tmp_path, flaky, caplog):
    shard = write_shards(seed=43, n=3, out=str(tmp_path), shard_size=3, size=32)[0]
    keys = keys_of(shard)
    url, size = f"flakyfile://{shard}", os.path.getsize(shard)
    stages = {
        "labelling": lambda: [r["key"] for r in read_shard_rows(url) if not r["error"]],
        "evaluation": lambda: [r["key"] for r in read_ground_truth_rows({"shard": url}) if not r["error"]],
        "training": lambda: [r["key"] for r in read_samples({"shard": url}, len(CLASSES), True, None)],
    }
    for stage, read in stages.items():  # a connection dropped twice late in the shard: read on, nothing lost
        flaky(failures=2, after=size * 3 // 4)
        assert read() == keys, stage
    assert re.search(r"failed after [12] samples \(ConnectionResetError", caplog.text)  # it went on from there
    flaky(failures=READ_ATTEMPTS, after=size // 2)  # a storage that keeps failing fails the run, never a row
    with pytest.raises(ConnectionResetError):
        list(read_shard_rows(url))

    flaky(failures=0, after=0)
    with tarfile.open(shard) as tar:  # cut inside the second sample: the samples before it, then a row
        second = next(m for m in tar.getmembers() if m.name.startswith(keys[1]))
    Path(shard).write_bytes(Path(shard).read_bytes()[:second.offset_data + second.size // 2])
    rows = list(read_shard_rows(url))
    assert rows[-1]["key"] == "" and rows[-1]["error"].startswith("corrupt shard after 1 samples: ReadError")
    truth = list(read_ground_truth_rows({"shard": url}))
    assert truth[-1]["error"] == f"shard {url}: {rows[-1]['error']}"
    assert stages["training"]() == keys[:1]


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def test_only_the_accepted_image_formats_reach_a_decoder():
    image = Image.new("RGB", (8, 6), (10, 20, 30))
    for fmt in ("JPEG", "PNG", "WEBP", "BMP", "TIFF"):
        assert decode_image(_encoded(image, fmt), "k").shape == (6, 8, 3)
    for fmt in ("GIF", "ICO", "TGA"):  # formats Pillow reads, the labeller does not take
        with pytest.raises(ImageDecodeError, match="not an image in an accepted format"):
            decode_image(_encoded(image, fmt), "k")
    assert read_image(_encoded(image, "GIF"), "k", formats=SOURCE_FORMATS).format == "GIF"  # prepare converts it
    with pytest.raises(ImageDecodeError, match=r"accepted format \(PNG;"):
        decode_label_map(_encoded(Image.new("L", (8, 6)), "BMP"), "k")


def test_local_commits_reach_the_disk_before_and_after_the_rename(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync folder" if Path(f"/proc/self/fd/{fd}").is_dir()
                                                               else "fsync file") or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda *a: events.append("rename") or replace(*a))
    storage.write_bytes(str(tmp_path / "a" / "part.parquet"), b"data")
    assert events == ["fsync file", "rename", "fsync folder"]
    assert (tmp_path / "a" / "part.parquet").read_bytes() == b"data"


def test_a_run_refused_at_validation_writes_nothing_into_the_output(tmp_path, inputs, capsys):
    label = load_pipeline("label")
    out = tmp_path / "out"
    common = ["--classes", "synthetic", "--model", "denseclip-tiny-shapes", "--pretrained", "random", "--output", str(out)]
    assert label.main(["--input", str(tmp_path / "none-*.tar"), *common]) == 2
    assert "no shards match" in capsys.readouterr().err and not out.exists()

    other = tmp_path / "other"  # a store of another model: refused, and left exactly as it was
    rows = [{"key": "a", "mask": np.zeros((2, 2), np.uint8)}]
    MaskStoreWriter(str(other), {"model": "RN50", "vocabulary": [["cat"]]}).write_part("p", rows)
    before = sorted(p.relative_to(other) for p in other.rglob("*"))
    assert label.main(["--input", inputs["shards"][0], *common[:-1], str(other)]) == 2
    assert "holds masks of another run" in capsys.readouterr().err
    assert sorted(p.relative_to(other) for p in other.rglob("*")) == before


# ------------------------------------------------------------------------------------------ the real job, slow
def run(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=900, check=False)


@pytest.mark.slow
def test_label_py_heals_a_damaged_store_and_denseclip_verify_agrees(tmp_path):
    shards = write_shards(seed=44, n=6, out=str(tmp_path / "in"), shard_size=2, size=48)
    bad = str(tmp_path / "in" / "zz-bad.tar")
    write_shard(bad, [{"__key__": "bad/broken", "jpg": b"not a jpeg"}])
    out = tmp_path / "out"
    label = [ROOT / "pipelines" / "label.py", "--input", tmp_path / "in", "--output", out, "--classes",
             "synthetic", "--model", "denseclip-tiny-shapes", "--batch-size", "1", "--num-actors", "1"]
    done = run(*label)
    assert done.returncode == 0, done.stderr[-3000:]
    masks, errors = store_contents(str(out)), store_errors(str(out))  # what a fresh run makes
    truncated = part_url(str(out), MASKS_DIR, part_id(shards[0]))
    missing = part_url(str(out), ERRORS_DIR, part_id(bad))
    truncate(truncated)
    delete(missing)
    delete(storage.join(str(out), INDEX_DIR, INDEX_FILE))

    verify = run("-m", "denseclip.cli", "verify", "--store", out)
    assert verify.returncode == 1 and verify.stdout.splitlines()[-1] == \
        f"verify: {out}: 4 parts, 2 damaged, key index disagrees (1)", verify.stderr[-3000:]
    again = run(*label)
    assert again.returncode == 0, again.stderr[-3000:]
    for url, shard in ((truncated, shards[0]), (missing, bad)):
        assert re.search(rf"^label: damaged part {re.escape(url)} \(shard {re.escape(shard)}\): .*; relabelling "
                         "its shard$", again.stdout, re.MULTILINE), again.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["parts_repaired"], summary["shards_unchanged"], summary["key_index_written"]) == (2, 2, True)
    for argv in (("-m", "denseclip.cli", "verify", "--store", out, "--deep"),
                 (ROOT / "pipelines" / "label.py", "--verify", "--output", out)):
        verify = run(*argv)
        assert verify.returncode == 0 and verify.stdout == f"verify: {out}: 4 parts, 0 damaged, key index agrees\n"
    assert (store_contents(str(out)), store_errors(str(out))) == (masks, errors)
