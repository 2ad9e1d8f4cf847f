"""pipelines/prepare.py on real files in the benchmark layouts: round trips, bad data, resume, S3."""

import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pipeline_scripts import load_pipeline

from denseclip.images import ImageDecodeError, decode_image, decode_label_map, decode_sample_image
from denseclip.shards import expand_shards, read_shard

REPO = Path(__file__).resolve().parents[1]
VOC_SAMPLE = REPO / "tests" / "data" / "samples" / "voc"
VOC_ID = "2007_000129"
PREPARE = REPO / "pipelines" / "prepare.py"


prepare = load_pipeline("prepare").main


def run_cli(*args: str, wait: bool = True):
    cmd = [sys.executable, str(PREPARE), *args, "--no-progress"]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=120)


def samples_of(out) -> dict[str, dict]:
    return {s["__key__"]: s for url in expand_shards(str(out)) for s in read_shard(url)}


def jpeg_bytes(rng, height=24, width=32, mode="RGB") -> bytes:
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png_bytes(array: np.ndarray, palette: bool = False) -> bytes:
    image = Image.fromarray(array)
    if palette:
        image.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width=100_000, height=100_000) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def voc_layout(root: Path, ids: list[str], split: str = "val") -> Path:
    """The genuine VOC pair plus small generated pairs ``ids`` in VOCdevkit/VOC2012 layout."""
    rng = np.random.default_rng(0)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    shutil.copytree(VOC_SAMPLE / "JPEGImages", root / "JPEGImages")
    shutil.copytree(VOC_SAMPLE / "SegmentationClass", root / "SegmentationClass")
    for sample_id in ids:
        (root / "JPEGImages" / f"{sample_id}.jpg").write_bytes(jpeg_bytes(rng))
        labels = rng.integers(0, 21, (24, 32), dtype=np.uint8)
        labels[0] = 255
        (root / "SegmentationClass" / f"{sample_id}.png").write_bytes(png_bytes(labels, palette=True))
    (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join([VOC_ID, *ids]) + "\n")
    return root


def test_voc_round_trip_keeps_jpeg_bytes_and_label_pixels(tmp_path):
    root = voc_layout(tmp_path / "VOC2012", [])
    assert prepare(["--dataset", "voc", "--root", str(root), "--split", "val", "--out", str(tmp_path / "out"),
                    "--no-progress"]) == 0
    assert [Path(u).name for u in expand_shards(str(tmp_path / "out"))] == ["voc-val-000000.tar"]
    sample = samples_of(tmp_path / "out")[VOC_ID]
    assert sample["jpg"] == (VOC_SAMPLE / "JPEGImages" / f"{VOC_ID}.jpg").read_bytes()
    original = np.array(Image.open(VOC_SAMPLE / "SegmentationClass" / f"{VOC_ID}.png"))
    labels = decode_label_map(sample["seg.png"])
    assert Image.open(io.BytesIO(sample["seg.png"])).mode == "L"
    np.testing.assert_array_equal(labels, original)
    assert set(np.unique(labels)) == {0, 2, 15, 255}  # background, bicycle, person, void border
    meta = json.loads(sample["json"])
    assert meta == {"file": f"JPEGImages/{VOC_ID}.jpg", "label_file": f"SegmentationClass/{VOC_ID}.png",
                    "dataset": "voc", "split": "val", "width": 334, "height": 500, "format": "JPEG", "mode": "RGB"}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["num_samples"] == 1 and manifest["num_errors"] == 0
    assert manifest["shards"] == [{"name": "voc-val-000000.tar", "samples": 1,
                                   "nbytes": (tmp_path / "out" / "voc-val-000000.tar").stat().st_size}]


def test_coco_stuff_raw_ids_map_to_171_contiguous_train_ids(tmp_path):
    root = tmp_path / "coco_stuff164k"
    rng = np.random.default_rng(1)
    raw = np.arange(256, dtype=np.uint8).reshape(16, 16)  # every raw id 0-181, 182-254 and 255
    for split, stem in (("val", "000000000139"), ("val", "000000000285"), ("train", "000000000009")):
        (root / "images" / f"{split}2017").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"{split}2017").mkdir(parents=True, exist_ok=True)
        (root / "images" / f"{split}2017" / f"{stem}.jpg").write_bytes(jpeg_bytes(rng, 16, 16))
        (root / "annotations" / f"{split}2017" / f"{stem}.png").write_bytes(png_bytes(rng.permutation(raw)))
    assert prepare(["--dataset", "coco_stuff", "--root", str(root), "--split", "val", "--out",
                    str(tmp_path / "out"), "--no-progress"]) == 0
    samples = samples_of(tmp_path / "out")
    assert sorted(samples) == ["000000000139", "000000000285"]
    unused = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91}  # 1-based COCO ids without pixels
    expected = np.full(256, 255)
    expected[[r for r in range(182) if r + 1 not in unused]] = np.arange(171)
    for key, sample in samples.items():
        source = np.array(Image.open(root / "annotations" / "val2017" / f"{key}.png"))
        np.testing.assert_array_equal(decode_label_map(sample["seg.png"]), expected[source])
        assert sample["jpg"] == (root / "images" / "val2017" / f"{key}.jpg").read_bytes()


def test_context_maps_keep_59_classes_and_background(tmp_path):
    root = tmp_path / "VOC2010"
    rng = np.random.default_rng(2)
    for folder in ("JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext"):
        (root / folder).mkdir(parents=True)
    labels = np.concatenate([np.arange(60), [60, 100, 255, 0]]).astype(np.uint8).reshape(8, 8)
    (root / "JPEGImages" / "2008_000002.jpg").write_bytes(jpeg_bytes(rng, 8, 8))
    (root / "SegmentationClassContext" / "2008_000002.png").write_bytes(png_bytes(labels))
    (root / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000002\n")
    assert prepare(["--dataset", "context", "--root", str(root), "--split", "val", "--out", str(tmp_path / "out"),
                    "--no-progress"]) == 0
    out = decode_label_map(samples_of(tmp_path / "out")["2008_000002"]["seg.png"]).reshape(-1)
    assert out[:60].tolist() == list(range(60)) and out[60:].tolist() == [255, 255, 255, 0]


def test_bad_samples_are_listed_and_never_stop_the_run(tmp_path):
    bad = ["zero", "truncated", "notimage", "bomb", "size", "nolabel", "noimage", "rgblabel"]
    root = voc_layout(tmp_path / "VOC2012", ["good", *bad])
    images, labels = root / "JPEGImages", root / "SegmentationClass"
    genuine = (VOC_SAMPLE / "JPEGImages" / f"{VOC_ID}.jpg").read_bytes()
    (images / "zero.jpg").write_bytes(b"")
    (images / "truncated.jpg").write_bytes(genuine[: len(genuine) // 2])
    (images / "notimage.jpg").write_bytes(b"<html>not found</html>")
    (images / "bomb.jpg").write_bytes(bomb_png())
    (labels / "size.png").write_bytes(png_bytes(np.zeros((10, 10), np.uint8)))
    (labels / "nolabel.png").unlink()
    (images / "noimage.jpg").unlink()
    (labels / "rgblabel.png").write_bytes(png_bytes(np.zeros((24, 32, 3), np.uint8)))
    result = run_cli("--dataset", "voc", "--root", str(root), "--split", "val", "--out", str(tmp_path / "out"),
                     "--shard-size", "4")
    assert result.returncode == 0, result.stderr
    assert sorted(samples_of(tmp_path / "out")) == sorted([VOC_ID, "good"])
    errors = {e["key"]: e for e in map(json.loads, (tmp_path / "out" / "errors.jsonl").read_text().splitlines())}
    assert sorted(errors) == sorted(bad)
    reasons = {key: e["reason"] for key, e in errors.items()}
    assert "0 bytes" in reasons["zero"]
    assert "truncated" in reasons["truncated"]
    assert reasons["notimage"] == "not an image in an accepted format (JPEG, PNG, WEBP, BMP, TIFF, GIF, PPM; 22 bytes)"
    assert "decompression bomb" in reasons["bomb"]
    assert "label map is 10x10 but the image is 32x24" in reasons["size"]
    assert "missing label map" in reasons["nolabel"] and errors["nolabel"]["source"].endswith("nolabel.png")
    assert "missing image" in reasons["noimage"]
    assert "mode RGB" in reasons["rgblabel"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["num_records"] == 10 and manifest["num_samples"] == 2 and manifest["num_errors"] == 8
    assert "8 bad records" in result.stdout


def test_pixel_limit_is_configurable(tmp_path):
    root = voc_layout(tmp_path / "VOC2012", ["small"])
    assert prepare(["--dataset", "voc", "--root", str(root), "--split", "val", "--out", str(tmp_path / "out"),
                    "--max-pixels", "1000", "--no-progress"]) == 0
    assert sorted(samples_of(tmp_path / "out")) == ["small"]  # 32x24 passes, 334x500 does not
    error = json.loads((tmp_path / "out" / "errors.jsonl").read_text())
    assert error["key"] == VOC_ID and "334x500 = 167000 pixels > limit 1000" in error["reason"]


def test_folder_converts_odd_formats_once_and_sanitises_keys(tmp_path):
    root = tmp_path / "photos"
    (root / "trip 2024" / "day.1").mkdir(parents=True)
    rng = np.random.default_rng(3)
    cmyk, grey = jpeg_bytes(rng, mode="CMYK"), jpeg_bytes(rng, mode="L")
    (root / "cmyk.jpg").write_bytes(cmyk)
    (root / "trip 2024" / "day.1" / "grey photo (1).v2.JPG").write_bytes(grey)
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[0, :, 3], rgba[1, :, 3] = 255, 255, 128  # red: opaque row, half row, transparent rest
    Image.fromarray(rgba).save(root / "alpha.png")
    Image.fromarray(np.array([[0, 4095], [32768, 65535]], np.uint16)).save(root / "deep.png")
    (root / "palette.png").write_bytes(png_bytes(np.array([[0, 1], [2, 255]], np.uint8), palette=True))
    (root / "dup.jpg").write_bytes(jpeg_bytes(rng))
    Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)).save(root / "dup.bmp")
    long_name = "x" * 150 + ".jpg"
    (root / long_name).write_bytes(jpeg_bytes(rng))
    for odd in ("_hidden.jpg", "-dash.jpg", "éclair.jpg"):
        (root / odd).write_bytes(jpeg_bytes(rng))
    (root / "notes.txt").write_text("not an image")
    assert prepare(["--dataset", "folder", "--root", str(root), "--split", "val", "--out", str(tmp_path / "out"),
                    "--no-progress"]) == 0
    samples = samples_of(tmp_path / "out")
    assert len(samples) == 11 and all("seg.png" not in s for s in samples.values())
    assert {"_hidden", "-dash", "_clair"} <= set(samples)
    for key in samples:
        assert "." not in key and " " not in key and len(key) <= 90
    assert samples["cmyk"]["jpg"] == cmyk  # JPEG passed through, CMYK converted when decoded
    assert decode_sample_image(samples["cmyk"]).shape == (24, 32, 3)
    assert samples["trip_2024/day_1/grey_photo__1__v2"]["jpg"] == grey
    alpha = decode_sample_image(samples["alpha"])
    assert "jpg" not in samples["alpha"] and alpha[0, 0].tolist() == [255, 0, 0]
    assert alpha[3, 0].tolist() == [255, 255, 255] and abs(int(alpha[1, 0, 1]) - 127) <= 1
    assert decode_sample_image(samples["deep"])[..., 0].tolist() == [[0, 15], [128, 255]]
    assert decode_sample_image(samples["palette"])[0, 1].tolist() == [1, 254, 0]
    assert len([k for k in samples if k.startswith("dup")]) == 2
    assert json.loads(samples["deep"]["json"])["mode"] in ("I;16", "I")


def test_decode_image_errors_name_the_sample():
    with pytest.raises(ImageDecodeError, match="^shard-3/img7: empty file") as info:
        decode_image(b"", "shard-3/img7")
    assert info.value.key == "shard-3/img7"
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(bomb_png(), "b")


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".tar", ".json", ".jsonl")}


def test_killed_midway_then_rerun_equals_an_uninterrupted_run(tmp_path):
    ids = [f"img{i}" for i in range(5)]
    root = voc_layout(tmp_path / "VOC2012", ids)
    blocked = root / "JPEGImages" / "img2.jpg"  # record 3 of 6: the run blocks reading it, then is killed
    content = blocked.read_bytes()
    blocked.unlink()
    os.mkfifo(blocked)
    args = ("--dataset", "voc", "--root", str(root), "--split", "val", "--shard-size", "1")
    proc = run_cli(*args, "--out", str(tmp_path / "killed"), wait=False)
    status = tmp_path / "killed" / "_parts"
    deadline = time.time() + 60
    while len(list(status.glob("*.json"))) < 3 and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert sorted(p.name for p in status.glob("*.json")) == [f"voc-val-00000{i}.tar.json" for i in range(3)]
    assert not (tmp_path / "killed" / "manifest.json").exists()
    blocked.unlink()
    blocked.write_bytes(content)
    # A shard written but not yet recorded as finished (killed between the two writes) is redone.
    (tmp_path / "killed" / "voc-val-000003.tar").write_bytes(b"half a shard")
    assert run_cli(*args, "--out", str(tmp_path / "killed")).returncode == 0
    assert run_cli(*args, "--out", str(tmp_path / "whole"), "--workers", "2").returncode == 0
    killed, whole = _files(tmp_path / "killed"), _files(tmp_path / "whole")
    assert len(whole) == 8 and killed == whole
    assert len(samples_of(tmp_path / "killed")) == 6


def test_rerun_with_another_shard_size_is_refused(tmp_path):
    root = voc_layout(tmp_path / "VOC2012", ["a", "b"])
    args = ["--dataset", "voc", "--root", str(root), "--split", "val", "--out", str(tmp_path / "out"), "--no-progress"]
    assert prepare([*args, "--shard-size", "2"]) == 0
    with pytest.raises(ValueError, match="other inputs"):
        prepare([*args, "--shard-size", "3"])


def test_missing_layout_is_a_clear_error(tmp_path):
    result = run_cli("--dataset", "voc", "--root", str(tmp_path), "--split", "val", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "ImageSets/Segmentation/val.txt not found" in result.stderr


def test_shards_on_s3_match_local_shards(tmp_path, make_bucket):
    root = voc_layout(tmp_path / "VOC2012", ["a", "b"])
    url = make_bucket() + "/voc/val"
    args = ("--dataset", "voc", "--root", str(root), "--split", "val", "--shard-size", "2")
    assert run_cli(*args, "--out", url).returncode == 0
    assert prepare([*args, "--out", str(tmp_path / "local"), "--no-progress"]) == 0
    remote = expand_shards(url)
    assert [u.rsplit("/", 1)[1] for u in remote] == ["voc-val-000000.tar", "voc-val-000001.tar"]
    import fsspec
    fs = fsspec.filesystem("s3")
    for u in remote:
        assert fs.cat_file(u) == (tmp_path / "local" / u.rsplit("/", 1)[1]).read_bytes()
    assert fs.cat_file(url + "/manifest.json") == (tmp_path / "local" / "manifest.json").read_bytes()
    assert samples_of(url)[VOC_ID]["jpg"] == (VOC_SAMPLE / "JPEGImages" / f"{VOC_ID}.jpg").read_bytes()
