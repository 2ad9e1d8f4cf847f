"""Reading a store: :class:`MaskStore` and the key index its lookups go through, which checks every committed part
as it is built."""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from denseclip import storage
from denseclip.damage import DamagedPartError
from denseclip.mask_store.files import _LRU, PartDamage, _file_id, _PartState, _reading, _StorageFile
from denseclip.mask_store.format import (
    ERRORS_DIR,
    INDEX_DIR,
    INDEX_FILE,
    INDEX_PARTS_KEY,
    INDEX_ROW_GROUP_SIZE,
    INDEX_SCHEMA,
    MANIFESTS_DIR,
    MASKS_DIR,
    PROVENANCE_KEY,
    ROW_GROUP_SIZE,
    decode_confidence,
    decode_mask,
    part_format,
    part_record,
    part_url,
)

log = logging.getLogger(__name__)

_PART_FILE = re.compile(r"^part-(.+)\.parquet$")
_OPEN_PARTS = 16  # parts a store keeps open for lookups (each holds its parsed footer)
_CACHED_GROUPS = 8  # row groups (of parts and of the index) a store keeps decoded for lookups


class _KeyIndex:
    """Where each committed key lives: ``index/keys.parquet`` for the parts it covers that are still committed
    and unchanged, plus an in-memory map of the parts committed or replaced since it was written.

    Building it checks every committed part (:meth:`MaskStore._check_part`): the parts the index covers by the
    sizes of their files against their manifests (which the index holds), the others by their footers too, and
    by their SHA-256 digests where ``digests`` is "changed" ("all": every part's). ``full`` reads every part's
    footers, its errors part's too. Damaged parts (``damaged``) are raised or skipped by the store, and left out.
    """

    def __init__(self, store: MaskStore, digests: str = "none", full: bool = False):
        self.store = store
        self.listing = store._listing()
        errors = store._listing(ERRORS_DIR)
        self.file, self.indexed = store._read_index() if self.listing else (None, {})
        covered = {p for p, entry in self.indexed.items()
                   if "manifest" in entry and self.listing.get(p, {}).get("file") == entry["file"]}
        self.records: dict[str, dict | None] = {}
        self.manifests: dict[str, dict | None] = {}
        self.rows: dict[str, int | None] = {}
        self.damaged: dict[str, PartDamage] = {}
        recent = []  # index rows of the parts committed or replaced after the index was written
        for part in sorted(self.listing):
            known = self.indexed[part] if part in covered else None
            digest = digests == "all" or (digests == "changed" and known is None)
            state, damage = store._check_part(part, self.listing[part], errors.get(part), known, full, digest)
            if damage is not None:
                self.damaged[part] = damage
                store._met(damage)
                continue
            self.records[part], self.manifests[part], self.rows[part] = state.record, state.manifest, state.rows
            if known is None:
                recent.append(pa.table([state.keys, pa.array([part] * len(state.keys), pa.string()),
                                        pa.array(range(len(state.keys)), pa.int32())], schema=INDEX_SCHEMA))
        self.covered = covered - set(self.damaged)
        self.recent = pa.concat_tables(recent) if recent else INDEX_SCHEMA.empty_table()
        self._recent_map: dict[str, list[tuple[str, int]]] | None = None
        self.stale = self.recent.num_rows > 0 or set(self.indexed) != set(self.listing) - set(self.damaged)
        # (min key, max key, row group) of the index's row groups, in key order.
        self._ranges: list[tuple[str, str, int]] = []
        if self.file is not None and self.covered:
            for g in range(self.file.num_row_groups):
                stats = self.file.metadata.row_group(g).column(0).statistics
                if stats is not None and stats.has_min_max:
                    self._ranges.append((stats.min, stats.max, g))
        self._maxs = [r[1] for r in self._ranges]
        self._groups = _LRU(_CACHED_GROUPS)

    @property
    def url(self) -> str:
        return storage.join(self.store.root, INDEX_DIR, INDEX_FILE)

    def _group(self, g: int) -> pa.Table:
        table = self._groups.hit(g)
        if table is None:
            with _reading(self.url):
                table = self._groups.put(g, self.file.read_row_group(g))
        return table

    def locate(self, key: str) -> tuple[str, int] | None:
        """(part, row) of ``key``; a key in several parts (two shards holding it) is taken from the last part
        in sorted order."""
        if self._recent_map is None:
            self._recent_map = {}
            for k, part, row in zip(*(self.recent.column(n).to_pylist() for n in INDEX_SCHEMA.names)):
                self._recent_map.setdefault(k, []).append((part, row))
        found = list(self._recent_map.get(key, ()))
        i = bisect.bisect_left(self._maxs, key)  # the first group that may hold the key; duplicates may go on
        while i < len(self._ranges) and self._ranges[i][0] <= key:
            table = self._group(self._ranges[i][2])
            rows = pc.indices_nonzero(pc.equal(table.column("key"), key))
            found += [(p, r) for p, r in zip(table.column("part").take(rows).to_pylist(),
                                             table.column("row").take(rows).to_pylist()) if p in self.covered]
            i += 1
        return max(found) if found else None

    def indexed_rows(self) -> Iterator[pa.RecordBatch]:
        """The index's rows of the parts it still covers."""
        if self.file is None or not self.covered:
            return
        covered = pa.array(sorted(self.covered))
        with _reading(self.url):
            for batch in self.file.iter_batches(batch_size=INDEX_ROW_GROUP_SIZE):
                yield batch.filter(pc.is_in(batch.column("part"), value_set=covered))

    def keys(self) -> set[str]:
        keys = set(self.recent.column("key").to_pylist())
        for batch in self.indexed_rows():
            keys.update(batch.column("key").to_pylist())
        return keys

    def problems(self) -> list[str]:
        """How the index disagrees with the undamaged committed parts, one line each: parts it lacks or lists in
        vain, manifests and key counts that differ from the parts' (counts where their footers were read:
        ``full``). A part whose file was only copied (a new file identity, the same bytes) agrees."""
        good = set(self.listing) - set(self.damaged)
        if self.file is None:
            return [f"missing or unreadable: {len(good)} committed parts are not indexed"] if good else []
        problems = []
        for parts, what in ((good - set(self.indexed), "committed parts are not in it"),
                            (set(self.indexed) - set(self.listing), "parts in it are no longer committed")):
            if parts:
                names = sorted(parts)
                problems.append(f"{len(names)} {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
        try:
            with _reading(self.url):
                counts = Counter(self.file.read(columns=["part"], use_threads=False).column("part").to_pylist())
        except DamagedPartError as exc:
            return [*problems, exc.reason]
        for part in sorted(good & set(self.indexed)):
            if self.indexed[part].get("manifest", self.manifests[part]) != self.manifests[part]:
                problems.append(f"its manifest of part {part} differs from the part's")
            elif self.rows.get(part) is not None and counts[part] != self.rows[part]:
                problems.append(f"holds {counts[part]} keys of part {part}, which has {self.rows[part]} rows")
        return problems


class MaskStore:
    """Reads the committed parts of the store at ``root`` (a path or fsspec URL).

    Lookups (:meth:`get`, :meth:`get_confidence`) go through the key index, loaded on first use and kept, with a
    few open parts and decoded row groups, for the life of the object; create a new one to see later commits.

    A damaged part (one that does not parse, or whose sizes or row counts disagree with its manifest and record,
    or whose errors part is missing: see :mod:`denseclip.damage`) raises DamagedPartError naming the file when a
    read meets it; with ``skip_damaged`` it is left out instead and listed in ``skipped`` (part id ->
    :class:`PartDamage`).
    """

    def __init__(self, root: str, skip_damaged: bool = False, **storage_options):
        self.root = root
        self.skip_damaged = skip_damaged
        self.skipped: dict[str, PartDamage] = {}
        self.storage_options = storage_options
        self._index: _KeyIndex | None = None
        self._parts = _LRU(_OPEN_PARTS)
        self._cells = _LRU(_CACHED_GROUPS)

    def _url(self, folder: str, part_id: str) -> str:
        return part_url(self.root, folder, part_id)

    def _open(self, url: str) -> pq.ParquetFile:
        """The Parquet file at ``url``, its footer read; what reads it later goes in a ``_reading(url)`` block."""
        fs, path = fsspec.core.url_to_fs(url, **self.storage_options)
        # Lookups read a few hundred kB at a time: no read-ahead of whole object-store blocks.
        file = fs.open(path, "rb", **({} if storage.is_local(url) else {"cache_type": "none"}))
        with _reading(url):
            return pq.ParquetFile(_StorageFile(file))

    def _read(self, folder: str, part_id: str, **kwargs) -> pa.Table:
        url = self._url(folder, part_id)
        parquet = self._open(url)
        with _reading(url):
            return parquet.read(**kwargs)

    def _listing(self, folder: str = MASKS_DIR) -> dict[str, dict]:
        """Part id -> ``{"file": the identity of its current file (see :func:`_file_id`), "size": bytes}`` of the
        parts in ``folder`` (``masks/``: the committed parts)."""
        fs, path = fsspec.core.url_to_fs(storage.join(self.root, folder), **self.storage_options)
        fs.invalidate_cache(path)
        try:
            entries = fs.ls(path, detail=True)
        except FileNotFoundError:
            return {}
        parts = {}
        for entry in entries:
            match = _PART_FILE.match(os.path.basename(entry["name"].rstrip("/")))
            if match and entry["type"] == "file":
                parts[match.group(1)] = {"file": _file_id(entry), "size": entry["size"]}
        return parts

    def _read_index(self) -> tuple[pq.ParquetFile | None, dict[str, dict]]:
        """The key index file and its parts (part id -> ``{"file", "record", "manifest"}``); none when it is
        missing or damaged (it is rebuilt from the parts)."""
        url = storage.join(self.root, INDEX_DIR, INDEX_FILE)
        try:
            file = self._open(url)
            with _reading(url):
                parts = json.loads((file.schema_arrow.metadata or {}).get(INDEX_PARTS_KEY, b"{}"))
            if not (isinstance(parts, dict) and all(isinstance(e, dict) and "file" in e for e in parts.values())):
                raise DamagedPartError(url, "its parts are not a mapping of part records")
        except FileNotFoundError:
            return None, {}
        except DamagedPartError as exc:
            log.warning("the key index %s is damaged, so it is ignored (a labelling run rebuilds it): %s", url,
                        exc.reason)
            return None, {}
        return file, parts

    def _read_manifest(self, part_id: str) -> dict | None:
        """The manifest of a part, None when it has none; DamagedPartError when it is not one."""
        url = self._url(MANIFESTS_DIR, part_id)
        try:
            manifest = json.loads(storage.read_bytes(url, **self.storage_options))
            if all(isinstance(manifest[f][n], int) for f in (MASKS_DIR, ERRORS_DIR) for n in ("size", "rows")):
                return manifest
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            pass
        raise DamagedPartError(url, "not a part manifest")

    def _check_part(self, part: str, masks: dict, errors: dict | None, known: dict | None, full: bool = False,
                    digest: bool = False) -> tuple[_PartState, PartDamage | None]:
        """What part ``part`` holds and whether it is damaged (``masks``, ``errors``: the listing entries of its
        files). ``known``: its entry in the key index, which vouches for its footer when its file is unchanged;
        else its footer is read (``full``: always, the errors part's too) and its keys. ``digest``: compare the
        SHA-256 of its files with its manifest. A storage failure raises (transient, see denseclip.damage)."""
        state = _PartState(known["record"], known["manifest"]) if known else _PartState()
        try:
            state.manifest = state.manifest if known else self._read_manifest(part)
            problem = self._size_problem(state.manifest, masks, errors)
            footers = (MASKS_DIR, ERRORS_DIR) if full else () if known else (MASKS_DIR,)
            for folder in footers:
                problem = problem or self._footer_problem(part, folder, state)
            for folder in (MASKS_DIR, ERRORS_DIR) if digest and state.manifest and not problem else ():
                if storage.sha256(self._url(folder, part), **self.storage_options) != state.manifest[folder]["sha256"]:
                    problem = folder, "its SHA-256 differs from its manifest's"
                    break
        except DamagedPartError as exc:  # an unreadable manifest
            problem = MANIFESTS_DIR, exc.reason
        if problem is None:
            return state, None
        shard = (state.manifest or {}).get("shard") or (state.record or {}).get("shard")
        return state, PartDamage(part, self._url(problem[0], part), shard, problem[1])

    @staticmethod
    def _size_problem(manifest: dict | None, masks: dict, errors: dict | None) -> tuple[str, str] | None:
        """(folder, reason) where a part's files are missing or disagree with the sizes in its ``manifest``."""
        if errors is None:
            return ERRORS_DIR, "missing beside its masks part"
        for folder, entry in ((MASKS_DIR, masks), (ERRORS_DIR, errors)):
            if manifest and entry["size"] != manifest[folder]["size"]:
                return folder, f"{entry['size']} bytes, its manifest records {manifest[folder]['size']}"
        return None

    def _footer_problem(self, part: str, folder: str, state: _PartState) -> tuple[str, str] | None:
        """Read the footer of ``part``'s file in ``folder`` (the masks part's: also its record and keys into
        ``state``); (folder, reason) where it is unreadable or its row count disagrees with the part's record or
        manifest."""
        url = self._url(folder, part)
        try:
            parquet = self._open(url)
            with _reading(url):
                rows = parquet.metadata.num_rows
                if folder == MASKS_DIR:
                    state.record, state.rows = part_record(parquet.schema_arrow.metadata), rows
                    # One small column, without a thread pool: its threads can abort a short command's exit
                    # (apache/arrow#34314).
                    state.keys = parquet.read(["key"], use_threads=False).column("key")
        except DamagedPartError as exc:
            return folder, exc.reason
        if folder == MASKS_DIR and (state.record or {}).get("manifest") and state.manifest is None:
            return MANIFESTS_DIR, "missing (its part record says it has one)"
        counts = ((state.record or {}).get("rows" if folder == MASKS_DIR else "errors"),
                  (state.manifest or {}).get(folder, {}).get("rows"))
        for what, count in zip(("its part record", "its manifest"), counts):
            if count is not None and count != rows:
                return folder, f"{rows} rows, {what} says {count}"
        return None

    def _met(self, damage: PartDamage) -> None:
        """A read met a damaged part: raise DamagedPartError naming it, or with ``skip_damaged`` list it."""
        if not self.skip_damaged:
            raise DamagedPartError(damage.url, f"damaged part of shard {damage.shard or 'unknown'}: {damage.reason}")
        if damage.part not in self.skipped:
            log.warning("skipping a damaged part: %s", damage)
        self.skipped[damage.part] = damage

    @contextlib.contextmanager
    def _damage_of(self, part: str) -> Iterator[None]:
        """Within the block, damage met in ``part`` raises naming the part's shard, or is skipped with the rest of
        the block (``skip_damaged``)."""
        try:
            yield
        except DamagedPartError as exc:
            shard = ((self._index.records.get(part) if self._index else None) or {}).get("shard")
            self._met(PartDamage(part, exc.url, shard, exc.reason))

    def committed_parts(self) -> set[str]:
        return set(self._listing())

    def _key_index(self) -> _KeyIndex:
        if self._index is None:
            self._index = _KeyIndex(self)
        return self._index

    def readable_parts(self) -> list[str]:
        """The committed parts found undamaged, sorted (re-reads the store)."""
        self._index = None
        index = self._key_index()
        return sorted(set(index.listing) - set(index.damaged))

    def part_records(self, digests: str = "none") -> dict[str, dict | None]:
        """Committed part id -> its part record (see :meth:`MaskStoreWriter.write_part`; None for parts written
        without one), from the key index and the footers of the parts committed after it (re-reads the store).
        ``digests``: also compare the SHA-256 of the parts committed or replaced since the index was written
        ("changed"), or of every part ("all"), with their manifests."""
        self._index = _KeyIndex(self, digests)
        return dict(self._index.records)

    def keys(self) -> set[str]:
        """Keys of all committed masks (re-reads the store)."""
        self._index = None
        return self._key_index().keys()

    def locate(self, key: str) -> tuple[str, int]:
        """(part id, row) of ``key`` in the committed parts; KeyError naming it when absent."""
        found = self._key_index().locate(key)
        if found is None:
            skipped = f" (damaged parts skipped: {', '.join(sorted(self.skipped))})" if self.skipped else ""
            raise KeyError(f"no mask for key {key!r} in {self.root}{skipped}")
        return found

    def _cell(self, key: str, column: str) -> tuple[bytes | None, tuple[int, int], int]:
        """The ``column`` cell of ``key``, its map's (height, width) and its part's format."""
        part, row = self.locate(key)
        url = self._url(MASKS_DIR, part)
        with self._damage_of(part):
            opened = self._parts.hit(part)
            if opened is None:
                parquet = self._open(url)
                sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
                opened = self._parts.put(part, (parquet, np.cumsum([0] + sizes).tolist(),
                                                part_format(parquet.schema_arrow.metadata)))
            parquet, starts, version = opened
            group = bisect.bisect_right(starts, row) - 1
            cells = self._cells.hit((part, group, column))
            if cells is None:
                with _reading(url):
                    cells = self._cells.put((part, group, column),
                                            parquet.read_row_group(group, columns=[column, "height", "width"]))
            data, height, width = (cells.column(c)[row - starts[group]].as_py() for c in range(3))
            return data, (height, width), version
        raise KeyError(f"no mask for key {key!r}: its part {url} is damaged (skipped)")

    def get(self, key: str) -> np.ndarray:
        """The label map of ``key``: uint8 (H, W), or uint16 (H, W) for vocabularies of more than 255 classes;
        KeyError naming the key when absent."""
        return decode_mask(*self._cell(key, "mask"))

    def get_confidence(self, key: str) -> np.ndarray | None:
        """The float32 (H, W) confidence in [0, 1] of ``key`` (quantised to 1/255), or None if not stored."""
        data, shape, version = self._cell(key, "confidence")
        return None if data is None else decode_confidence(data, shape, version)

    def read_part(self, part_id: str) -> pa.Table:
        """One committed part as an encoded table in :data:`MASK_SCHEMA`, rows sorted by key."""
        return self._read(MASKS_DIR, part_id)

    def read_errors(self, part_id: str) -> list[dict]:
        """``[{"key", "shard", "reason"}]`` of one committed part."""
        return self._read(ERRORS_DIR, part_id).to_pylist()

    def _iter_batches(self, columns: list[str], parts: Iterable[str] | None = None
                      ) -> Iterator[tuple[int, pa.RecordBatch]]:
        """``(part format, batch of columns)`` of the committed parts (or of ``parts``), part by part, a row group
        at a time."""
        for part in self.readable_parts() if parts is None else parts:
            url = self._url(MASKS_DIR, part)
            with self._damage_of(part):
                parquet = self._open(url)
                version = part_format(parquet.schema_arrow.metadata)
                with _reading(url):
                    for batch in parquet.iter_batches(batch_size=ROW_GROUP_SIZE, columns=columns):
                        yield version, batch

    def iter_rows(self, columns: list[str]) -> Iterator[dict]:
        """The committed rows, part by part (by key within a part), one row group in memory at a time:
        ``{column: value}`` with the encoded cells of :data:`MASK_SCHEMA`."""
        for _, batch in self._iter_batches(columns):
            yield from batch.to_pylist()

    def iter_masks(self, parts: Iterable[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
        """``(key, label map (H, W))`` for every committed row (or those of ``parts``), part by part, by key
        within a part."""
        for version, batch in self._iter_batches(["key", "mask", "height", "width"], parts):
            for row in batch.to_pylist():
                yield row["key"], decode_mask(row["mask"], (row["height"], row["width"]), version)

    def errors(self) -> list[dict]:
        """``[{"key", "shard", "reason"}]`` of the committed parts."""
        rows: list[dict] = []
        for part in self.readable_parts():
            with self._damage_of(part):
                rows += self.read_errors(part)
        return rows

    @property
    def provenance(self) -> dict | None:
        """The run provenance stored with the parts (read from the first part that is readable), or None for an
        empty store."""
        for part in sorted(self.committed_parts() - set(self.skipped)):
            url = self._url(MASKS_DIR, part)
            with self._damage_of(part):
                metadata = self._open(url).schema_arrow.metadata or {}
                with _reading(url):
                    return json.loads(metadata[PROVENANCE_KEY]) if PROVENANCE_KEY in metadata else None
        return None
