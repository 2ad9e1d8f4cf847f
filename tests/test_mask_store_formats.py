"""Mask-store cell formats: stores written in format 1 (PNG cells, tests/data/stores/format-1) stay readable and
resumable; format 2 reads with pyarrow, pandas and DuckDB from its documented layout; exports do not depend on
the format."""

import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from batches import ray_batch
from PIL import Image

from denseclip.config import LabelerConfig, resolve_vocabulary
from denseclip.export import export_coco, export_png
from denseclip.mask_store import MaskStore, MaskStoreWriter, mask_format, write_key_index
from denseclip.ray.labeling import (
    Labeler,
    LabelingPlan,
    ShardCommitter,
    decode_batch,
    encode_batch,
    label_shards,
    prepare_labeling,
    read_shard_rows,
    run_provenance,
)
from denseclip.ray.training import read_samples
from denseclip.synthetic import write_shards

OLD = Path(__file__).resolve().parent / "data" / "stores" / "format-1"
EXPECTED = np.load(OLD / "expected.npz", allow_pickle=False)
OLD_KEYS = [str(k) for k in EXPECTED["keys"]]
CONFIG = LabelerConfig(model="denseclip-tiny-shapes", pretrained="random", batch_size=4)
CLASSES = resolve_vocabulary("synthetic")
PROVENANCE = {"model": "RN50", "pretrained": "openai", "fingerprint": "abc123", "templates": "denseclip85",
              "vocabulary": [[f"c{i}"] for i in range(1203)]}


def old_maps() -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """key -> (label map, confidence as uint8 or None) of both format-1 stores, from expected.npz."""
    maps = {key: (EXPECTED[f"labels_{i}"], EXPECTED[f"confidence_{i}"]) for i, key in enumerate(OLD_KEYS)}
    maps["edge/wide"] = (EXPECTED["wide"], None)
    maps["edge/narrow"] = (EXPECTED["narrow"], EXPECTED["narrow_confidence"])
    return maps


def check_maps(store: MaskStore, maps: dict) -> None:
    for key, (labels, confidence) in maps.items():
        got = store.get(key)
        assert got.dtype == labels.dtype, key
        np.testing.assert_array_equal(got, labels)
        if confidence is None:
            assert store.get_confidence(key) is None
        else:
            np.testing.assert_array_equal(np.round(store.get_confidence(key) * 255), confidence)


def test_stores_written_in_format_1_read_as_they_were():
    maps = old_maps()
    labelled, edge = MaskStore(str(OLD / "labelled")), MaskStore(str(OLD / "edge"))
    assert labelled.keys() == set(OLD_KEYS) and edge.keys() == {"edge/wide", "edge/narrow"}
    assert "format_version" not in labelled.provenance and mask_format(labelled.provenance) == 1
    check_maps(labelled, {k: maps[k] for k in OLD_KEYS})
    check_maps(edge, {k: maps[k] for k in ("edge/wide", "edge/narrow")})
    assert [k for k, _ in labelled.iter_masks()] == OLD_KEYS
    assert all(np.array_equal(m, maps[k][0]) for k, m in edge.iter_masks())
    assert edge.errors() == [{"key": "edge/bad", "shard": "edge.tar", "reason": "truncated"}]
    records = labelled.part_records()
    assert sorted(r["shard"] for r in records.values()) == ["/tmp/i22/world/shard-000000.tar",
                                                            "/tmp/i22/world/shard-000001.tar"]


def test_a_rerun_into_a_format_1_store_keeps_writing_format_1_parts(tmp_path):
    root = tmp_path / "store"
    shutil.copytree(OLD / "labelled", root)
    provenance = {k: v for k, v in MaskStore(str(root)).provenance.items() if k != "code_version"}
    writer = MaskStoreWriter(str(root), provenance)  # a newer package resumes the run
    assert writer.format_version == 1
    labels = np.arange(12, dtype=np.uint8).reshape(3, 4)
    writer.write_part("more", [{"key": "new/0", "mask": labels, "confidence": np.full((3, 4), 0.5)}])
    part = pq.read_table(root / "masks" / "part-more.parquet")
    assert part.column("mask")[0].as_py()[:8] == b"\x89PNG\r\n\x1a\n"  # the store's own format
    assert "format_version" not in json.loads(part.schema.metadata[b"denseclip.provenance"])
    assert write_key_index(str(root)) is True
    store = MaskStore(str(root))
    np.testing.assert_array_equal(store.get("new/0"), labels)
    check_maps(store, {k: v for k, v in old_maps().items() if k in OLD_KEYS})
    with pytest.raises(ValueError, match="holds format-1 parts, not format 2: a store keeps its format"):
        MaskStoreWriter(str(root), {**provenance, "format_version": 2})


def write_both_formats(tmp_path) -> dict[int, str]:
    """The maps of the format-1 stores written again by this package in both formats, one part each."""
    rows = [{"key": key, "shard": "s.tar", "mask": labels, "confidence": confidence}
            for key, (labels, confidence) in old_maps().items()]
    roots = {}
    for version in (1, 2):
        roots[version] = str(tmp_path / f"v{version}")
        MaskStoreWriter(roots[version], {**PROVENANCE, "format_version": version}).write_part("0", rows)
    return roots


def test_exports_do_not_depend_on_the_format(tmp_path):
    roots = write_both_formats(tmp_path)
    names = [f"c{i}" for i in range(1203)]
    for version, root in roots.items():
        check_maps(MaskStore(root), old_maps())
        assert export_png(MaskStore(root), str(tmp_path / f"png{version}")) == len(old_maps())
        export_coco(MaskStore(root), str(tmp_path / f"coco{version}"), names)
    files = sorted(p.relative_to(tmp_path / "png1") for p in (tmp_path / "png1").rglob("*") if p.is_file())
    assert len(files) == len(old_maps()) + 1  # the maps and files.jsonl
    for name in files:
        assert (tmp_path / "png1" / name).read_bytes() == (tmp_path / "png2" / name).read_bytes(), name
    for coco1 in (tmp_path / "coco1" / "annotations").iterdir():
        assert coco1.read_bytes() == (tmp_path / "coco2" / "annotations" / coco1.name).read_bytes()
    wide = np.asarray(Image.open(tmp_path / "png2" / "edge" / "wide.png"))  # 16-bit grey, as before
    np.testing.assert_array_equal(wide, EXPECTED["wide"])


def decode_row(mask: bytes, confidence: bytes | None, height: int, width: int, pixel_bytes: int):
    """A format-2 row decoded with pyarrow's zstd and numpy, as docs/capacity.md describes it."""
    zstd = pa.Codec("zstd")
    values = zstd.decompress(mask, decompressed_size=pixel_bytes * height * width)
    labels = np.frombuffer(values, "<u2" if pixel_bytes == 2 else np.uint8).reshape(height, width)
    if confidence is None:
        return labels, None
    difference = np.frombuffer(zstd.decompress(confidence, decompressed_size=height * width), np.uint8)
    difference = difference.reshape(height, width)
    return labels, np.cumsum(np.cumsum(difference, axis=0, dtype=np.uint8), axis=1, dtype=np.uint8)


def test_format_2_reads_with_pyarrow_pandas_and_duckdb(tmp_path):
    root = write_both_formats(tmp_path)[2]
    maps = old_maps()
    parts = f"{root}/masks/*.parquet"
    first = next(Path(root, "masks").glob("*.parquet"))
    assert json.loads(pq.read_schema(first).metadata[b"denseclip.provenance"])["format_version"] == 2
    frames = {
        "pyarrow": ds.dataset(f"{root}/masks", format="parquet").to_table().to_pandas(),
        "pandas": pd.read_parquet(f"{root}/masks"),
        "duckdb": duckdb.sql(f"SELECT key, height, width, mask, confidence FROM read_parquet('{parts}')").df(),
    }
    for reader, frame in frames.items():
        assert sorted(frame["key"]) == sorted(maps), reader
        for row in frame.itertuples():
            confidence = None if row.confidence is None or pd.isna(row.confidence) else bytes(row.confidence)
            labels, quantised = decode_row(bytes(row.mask), confidence, row.height, row.width,
                                           maps[row.key][0].itemsize)
            np.testing.assert_array_equal(labels, maps[row.key][0])
            if maps[row.key][1] is None:
                assert quantised is None, (reader, row.key)
            else:
                np.testing.assert_array_equal(quantised, maps[row.key][1])



def format_1_run(tmp_path, fingerprint: str) -> tuple[list[str], LabelingPlan]:
    """Shards of three scenes and a format-1 store that a run of the synthetic tiny CLIP (weights
    ``fingerprint``) started; the plan of the run that resumes it."""
    shards = write_shards(seed=3, n=3, out=str(tmp_path / "in"), shard_size=2, size=64)
    provenance = {**run_provenance(CONFIG, CLASSES), "fingerprint": fingerprint, "format_version": 1}
    labels = np.zeros((4, 4), np.uint8)
    MaskStoreWriter(str(tmp_path / "out"), provenance).write_part("earlier", [{"key": "earlier/0", "mask": labels}])
    return shards, prepare_labeling(shards, str(tmp_path / "out"), CONFIG, CLASSES)


def check_format_1_parts(root: str, keys: list[str]) -> None:
    store = MaskStore(root)
    assert store.keys() == {"earlier/0", *keys}
    for part in store.committed_parts():
        table = store.read_part(part)
        assert "format_version" not in json.loads(table.schema.metadata[b"denseclip.provenance"])
        assert all(cell[:8] == b"\x89PNG\r\n\x1a\n" for cell in table.column("mask").to_pylist())
    assert all(store.get(key).shape == (64, 64) and store.get_confidence(key).shape == (64, 64) for key in keys)


def test_a_labelling_run_into_a_format_1_store_encodes_and_commits_format_1(tmp_path):
    shards, plan = format_1_run(tmp_path, "weights")
    assert plan.mask_format == 1 and len(plan.new) == 2
    rows = [r for s in shards for r in read_shard_rows(s)]
    labelled = decode_batch(ray_batch(rows))  # what the labeller makes of it: maps of each image's size
    labelled["labels"] = ray_batch([{"m": np.ones((64, 64), np.uint8)} for _ in rows])["m"]
    labelled["confidence"] = ray_batch([{"c": np.full((64, 64), 200, np.uint8)} for _ in rows])["c"]
    labelled["fingerprint"] = np.full(len(rows), "weights", dtype=object)
    encoded = encode_batch(labelled, plan.mask_format)
    committer = ShardCommitter(plan)
    committer.add(pa.Table.from_pydict({k: list(v) for k, v in encoded.items()}))
    check_format_1_parts(plan.output, [r["key"] for r in rows])


@pytest.mark.slow
def test_the_pipeline_resumes_a_format_1_store_in_format_1(tmp_path):
    _, plan = format_1_run(tmp_path, Labeler(CONFIG, CLASSES).fingerprint)
    summary = label_shards(plan, CONFIG, CLASSES)  # CPU actors: the encode tasks encode in the store's format
    assert summary["images_labelled"] == 3
    check_format_1_parts(plan.output, [f"synthetic/s3/{i:06d}" for i in range(3)])


@pytest.mark.parametrize("version", [1, 2])
def test_training_reads_pseudo_labels_of_either_format_and_the_confidence_only_when_asked(tmp_path, version):
    shard = write_shards(seed=9, n=2, out=str(tmp_path / "in"), shard_size=2, size=64)[0]
    rng = np.random.default_rng(version)
    maps = {f"synthetic/s9/{i:06d}": (rng.integers(0, len(CLASSES), (64, 64)).astype(np.uint8),
                                      rng.integers(0, 256, (64, 64)).astype(np.uint8)) for i in range(2)}
    MaskStoreWriter(str(tmp_path / "masks"), {**PROVENANCE, "format_version": version}).write_part(
        "0", [{"key": k, "mask": m, "confidence": c} for k, (m, c) in maps.items()])
    for with_confidence in (True, False):
        rows = list(read_samples({"shard": shard}, len(CLASSES), False, str(tmp_path / "masks"),
                                 with_confidence=with_confidence))
        assert [r["key"] for r in rows] == list(maps)
        for row in rows:
            np.testing.assert_array_equal(row["pseudo_label"], maps[row["key"]][0])
            if with_confidence:
                np.testing.assert_array_equal(np.round(row["pseudo_confidence"] * 255), maps[row["key"]][1])
            else:
                assert "pseudo_confidence" not in row
