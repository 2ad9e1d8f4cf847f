"""The Parquet mask store on a local folder and on a real S3 API (moto): round trips, commits, provenance."""

import json
import os
import subprocess
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import denseclip
from denseclip.mask_store import (
    MASK_SCHEMA,
    MaskStore,
    MaskStoreWriter,
    decode_confidence,
    decode_mask,
    encode_confidence,
    encode_mask,
    ignore_label,
    mask_format,
    rows_to_table,
    write_key_index,
)

PROVENANCE = {"model": "RN50", "pretrained": "openai", "fingerprint": "abc123", "vocabulary": [["background"],
              ["cat", "kitty"], ["dog"]], "templates": "denseclip85", "code_version": "0.1.0"}


def make_rows(seed: int, n: int, prefix: str) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        h, w = rng.integers(5, 40, 2)
        mask = rng.integers(0, 3, (h, w), dtype=np.uint8)
        mask[0, 0] = 255
        rows.append({"key": f"{prefix}/{i:04d}", "shard": f"{prefix}.tar", "mask": mask,
                     "confidence": rng.random((h, w)) if i % 2 else None})
    return rows


def check_store(root: str):
    parts = {"shard-0": make_rows(0, 70, "a"), "shard-1": make_rows(1, 5, "b")}
    writer = MaskStoreWriter(root, PROVENANCE)
    for part, rows in parts.items():
        writer.write_part(part, rows[::-1], errors=[{"key": f"{part}-bad", "shard": part, "reason": "truncated"}])
    store = MaskStore(root)
    rows = {r["key"]: r for rs in parts.values() for r in rs}
    assert store.committed_parts() == set(parts)
    assert store.keys() == set(rows)
    assert store.provenance == {**PROVENANCE, "format_version": 2}
    for key in ("a/0000", "a/0041", "b/0004"):
        np.testing.assert_array_equal(store.get(key), rows[key]["mask"])
    assert store.get_confidence("a/0000") is None
    confidence = store.get_confidence("a/0041")
    assert confidence.dtype == np.float32 and np.abs(confidence - rows["a/0041"]["confidence"]).max() <= 0.5 / 255
    seen = dict(store.iter_masks())
    assert list(seen) == sorted(rows)  # parts in order, keys sorted within a part
    assert all(np.array_equal(seen[k], rows[k]["mask"]) for k in rows)
    assert sorted(e["key"] for e in store.errors()) == ["shard-0-bad", "shard-1-bad"]
    assert store.read_part("shard-1").num_rows == 5
    with pytest.raises(KeyError, match="no mask for key 'missing'"):
        store.get("missing")
    return store


def test_local_store_round_trip(tmp_path):
    check_store(str(tmp_path / "store"))
    part = pq.ParquetFile(tmp_path / "store" / "masks" / "part-shard-0.parquet")
    assert part.metadata.num_rows == 70 and part.metadata.num_row_groups == 2  # small groups: cheap lookups
    assert json.loads(part.schema_arrow.metadata[b"denseclip.provenance"]) == {**PROVENANCE, "format_version": 2}


def test_s3_store_round_trip(make_bucket):
    root = make_bucket() + "/runs/voc"
    check_store(root)
    assert sorted(fsspec.filesystem("s3").ls(root)) == [root[5:] + "/errors", root[5:] + "/manifests",
                                                        root[5:] + "/masks"]


def test_uncommitted_files_are_invisible(tmp_path):
    root = tmp_path / "store"
    MaskStoreWriter(str(root), PROVENANCE).write_part("0", make_rows(0, 3, "a"))
    # What a crash leaves behind: a temporary masks file and the errors file of a part never committed.
    (root / "masks" / ".part-1.parquet.tmp-0123").write_bytes(b"PAR1 half")
    pq.write_table(rows_to_table(make_rows(1, 2, "x")), root / "errors" / "part-1.parquet")
    store = MaskStore(str(root))
    assert store.committed_parts() == {"0"} and store.keys() == {"a/0000", "a/0001", "a/0002"}
    assert store.errors() == []


def test_rewriting_a_part_replaces_it(tmp_path):
    writer = MaskStoreWriter(str(tmp_path), PROVENANCE)
    writer.write_part("0", make_rows(0, 4, "a"), errors=[{"key": "z", "shard": "s", "reason": "r"}])
    rows = make_rows(5, 2, "a")
    writer.write_part("0", rows)
    store = MaskStore(str(tmp_path))
    assert store.keys() == {"a/0000", "a/0001"} and store.errors() == []
    np.testing.assert_array_equal(store.get("a/0001"), rows[1]["mask"])


def test_a_store_holds_one_run(tmp_path):
    MaskStoreWriter(str(tmp_path), PROVENANCE).write_part("0", make_rows(0, 1, "a"))
    MaskStoreWriter(str(tmp_path), dict(PROVENANCE)).write_part("1", make_rows(1, 1, "b"))  # same run resumes
    with pytest.raises(ValueError, match="provenance differs in fingerprint"):
        MaskStoreWriter(str(tmp_path), dict(PROVENANCE, fingerprint="other"))
    assert MaskStore(str(tmp_path / "empty")).provenance is None


def test_encoded_tables_are_accepted_and_bad_rows_refused(tmp_path):
    writer = MaskStoreWriter(str(tmp_path), PROVENANCE)
    rows = make_rows(2, 3, "t")
    writer.write_part("0", rows_to_table(rows))
    np.testing.assert_array_equal(MaskStore(str(tmp_path)).get("t/0002"), rows[2]["mask"])
    with pytest.raises(ValueError, match="mask schema"):
        writer.write_part("1", rows_to_table(rows).drop_columns(["mask"]))
    with pytest.raises(ValueError, match=r"\(H, W\) label map"):
        writer.write_part("1", [{"key": "k", "mask": np.zeros((2, 2, 3))}])
    with pytest.raises(ValueError, match="values must lie in 0..65535"):
        writer.write_part("1", [{"key": "k", "mask": np.full((2, 2), 70000)}])
    with pytest.raises(ValueError, match="duplicate keys"):
        writer.write_part("1", rows + rows)
    with pytest.raises(ValueError, match="part id '../x'"):
        writer.write_part("../x", rows)
    with pytest.raises(ValueError, match="JSON"):
        MaskStoreWriter(str(tmp_path / "b"), {"model": object()})
    assert MASK_SCHEMA.names == ["key", "shard", "height", "width", "mask", "confidence"]


def unzstd(frame: bytes, size: int) -> bytes:
    return pa.Codec("zstd").decompress(frame, decompressed_size=size, asbytes=True)


def test_mask_and_confidence_codecs_of_both_formats():
    rng = np.random.default_rng(7)
    narrow = rng.integers(0, 256, (13, 17)).astype(np.uint8)
    wide = rng.integers(0, 65536, (13, 17)).astype(np.int32)
    confidence = np.linspace(-0.5, 1.5, 13 * 17).reshape(13, 17)
    quantised = np.round(np.clip(confidence, 0, 1) * 255).astype(np.int64)
    # Format 2 as documented: zstd frames of the values row-major (uint16 little-endian) and of the confidence's
    # 2-D difference mod 256.
    assert unzstd(encode_mask(narrow), narrow.size) == narrow.tobytes()
    assert unzstd(encode_mask(wide), 2 * wide.size) == b"".join(int(v).to_bytes(2, "little") for v in wide.ravel())
    padded = np.pad(quantised, ((1, 0), (1, 0)))
    difference = (padded[1:, 1:] - padded[:-1, 1:] - padded[1:, :-1] + padded[:-1, :-1]) % 256
    assert unzstd(encode_confidence(confidence), difference.size) == difference.astype(np.uint8).tobytes()
    for version in (1, 2):
        for mask in (narrow, wide):
            restored = decode_mask(encode_mask(mask, version), mask.shape, version)
            assert restored.dtype == (np.uint8 if mask is narrow else np.uint16) and restored.flags.writeable
            np.testing.assert_array_equal(restored, mask)
        restored = decode_confidence(encode_confidence(confidence, version), confidence.shape, version)
        assert restored.dtype == np.float32
        np.testing.assert_array_equal(restored * 255, quantised)  # exactly the quantised values
    assert encode_mask(narrow, 1)[:8] == encode_confidence(confidence, 1)[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="need the map's"):
        decode_mask(encode_mask(narrow))
    with pytest.raises(ValueError, match=r"a mask cell of 221 bytes \(decompressed\) holds no \(13, 16\) map"):
        decode_mask(encode_mask(narrow), (13, 16))
    with pytest.raises(ValueError, match="is no zstd frame"):
        decode_confidence(encode_confidence(confidence, 1), confidence.shape)
    with pytest.raises(ValueError, match="format 3 is not one this version of denseclip reads"):
        mask_format({"format_version": 3})


def test_a_table_in_another_format_than_the_stores_is_refused(tmp_path):
    rows = make_rows(0, 3, "a")
    MaskStoreWriter(str(tmp_path / "v2"), PROVENANCE).write_part("0", rows_to_table(rows, 2))
    with pytest.raises(ValueError, match="part 1: mask cells are not cells of format 2"):
        MaskStoreWriter(str(tmp_path / "v2"), PROVENANCE).write_part("1", rows_to_table(rows, 1))
    v1 = MaskStoreWriter(str(tmp_path / "v1"), {**PROVENANCE, "format_version": 1})
    v1.write_part("0", rows)  # rows given as maps are encoded in the store's format
    with pytest.raises(ValueError, match="part 1: mask cells are not cells of format 1"):
        v1.write_part("1", rows_to_table(rows))
    assert MaskStore(str(tmp_path / "v1")).provenance == PROVENANCE  # format-1 parts carry no format field
    with pytest.raises(ValueError, match="holds format-1 parts, not format 2"):
        MaskStoreWriter(str(tmp_path / "v1"), {**PROVENANCE, "format_version": 2})


def test_vocabularies_over_255_classes_are_stored_as_16_bit_maps(tmp_path):
    rng = np.random.default_rng(3)
    wide = rng.integers(0, 1203, (24, 31)).astype(np.int32)  # an LVIS-size vocabulary, as the labeler returns it
    wide[0, 0] = 65535  # the 16-bit "no label"
    narrow = rng.integers(0, 3, (5, 6), dtype=np.uint8)
    MaskStoreWriter(str(tmp_path), PROVENANCE).write_part("0", [{"key": "w", "mask": wide}, {"key": "n", "mask": narrow}])
    store = MaskStore(str(tmp_path))
    assert store.get("w").dtype == np.uint16 and store.get("n").dtype == np.uint8
    np.testing.assert_array_equal(store.get("w"), wide)
    np.testing.assert_array_equal(store.get("n"), narrow)
    assert ignore_label(store.get("w")) == 65535 and ignore_label(store.get("n")) == 255


def _opened(store: MaskStore) -> list[str]:
    """Record the files ``store`` opens for reading (its one way of opening Parquet files)."""
    opened = []
    original = store._open

    def spy(url):
        opened.append(url.rsplit("/", 1)[-1])
        return original(url)

    store._open = spy
    return opened


def test_lookups_go_through_the_key_index_and_stay_exact_after_later_commits(tmp_path):
    root = str(tmp_path)
    writer = MaskStoreWriter(root, PROVENANCE)
    parts = {f"p{i}": make_rows(i, 30, f"k{i}") for i in range(6)}
    for i, (part, rows) in enumerate(parts.items()):
        writer.write_part(part, rows, record={"shard": f"{part}.tar", "fingerprint": {"size": i}})
    assert write_key_index(root) is True and write_key_index(root) is False  # the second time it is current
    store = MaskStore(root)
    opened = _opened(store)
    np.testing.assert_array_equal(store.get("k4/0017"), parts["p4"][17]["mask"])
    np.testing.assert_array_equal(store.get("k1/0003"), parts["p1"][3]["mask"])
    assert opened == ["keys.parquet", "part-p4.parquet", "part-p1.parquet"]  # not one part read per key
    assert store.part_records()["p2"] == {"shard": "p2.tar", "fingerprint": {"size": 2}, "rows": 30, "errors": 0,
                                          "manifest": True}

    # After the index was written: a part replaced, a part added, a part deleted. Lookups see exactly that.
    replaced, added = make_rows(40, 3, "k1"), make_rows(41, 2, "new")
    writer.write_part("p1", replaced)
    writer.write_part("p9", added)
    os.remove(tmp_path / "masks" / "part-p5.parquet")
    store = MaskStore(root)
    expected = {r["key"] for p in ("p0", "p2", "p3", "p4") for r in parts[p]} | {r["key"] for r in replaced + added}
    assert store.keys() == expected
    np.testing.assert_array_equal(store.get("k1/0002"), replaced[2]["mask"])
    np.testing.assert_array_equal(store.get("new/0001"), added[1]["mask"])
    for gone in ("k1/0003", "k5/0000"):
        with pytest.raises(KeyError, match=gone):
            store.get(gone)
    assert write_key_index(root) is True
    store = MaskStore(root)
    opened = _opened(store)
    assert store.keys() == expected and opened == ["keys.parquet"]  # the rebuilt index covers every part
    np.testing.assert_array_equal(store.get("new/0000"), added[0]["mask"])


def test_a_key_in_two_parts_is_taken_from_the_last_part(tmp_path):
    writer = MaskStoreWriter(str(tmp_path), PROVENANCE)
    first, second = make_rows(0, 2, "same"), make_rows(1, 2, "same")
    writer.write_part("a", first)
    writer.write_part("b", second)
    for indexed in (False, True):
        if indexed:
            write_key_index(str(tmp_path))
        np.testing.assert_array_equal(MaskStore(str(tmp_path)).get("same/0001"), second[1]["mask"])


def test_parts_record_the_code_version_and_a_newer_version_may_resume_a_store(tmp_path):
    here = Path(__file__).resolve().parent
    commit = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    provenance = {k: v for k, v in PROVENANCE.items() if k != "code_version"}
    MaskStoreWriter(str(tmp_path), provenance).write_part("0", make_rows(0, 1, "a"))
    written = MaskStore(str(tmp_path)).provenance["code_version"]
    assert written.startswith(f"{denseclip.__version__}+g{commit}")
    old = tmp_path / "old"
    MaskStoreWriter(str(old), {**provenance, "code_version": "0.0.1"}).write_part("0", make_rows(0, 1, "a"))
    MaskStoreWriter(str(old), provenance).write_part("1", make_rows(1, 1, "b"))  # not refused: same labels
    part = pq.ParquetFile(old / "masks" / "part-1.parquet")
    assert json.loads(part.schema_arrow.metadata[b"denseclip.provenance"])["code_version"] == written
