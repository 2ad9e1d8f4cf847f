"""Benchmark datasets on disk (VOC, Context, COCO-Stuff, any folder) -> WebDataset shards."""

from denseclip.sources.convert import SampleError, convert_record
from denseclip.sources.layouts import LAYOUTS, SourceRecord, list_records, make_key
from denseclip.sources.sharding import ERRORS, MANIFEST, prepare_shards

__all__ = ["ERRORS", "LAYOUTS", "MANIFEST", "SampleError", "SourceRecord", "convert_record", "list_records",
           "make_key", "prepare_shards"]
