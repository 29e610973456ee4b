"""SURD data: read an imagefolder or webdataset shards (:func:`open_dataset`), write shards.

``Sample.simple`` is metadata ``text`` (the SIMPLE prompt); ``Sample.complex`` is metadata
``prompt`` (the COMPLEX prompt); ``open_dataset(..., simple_field=, complex_field=)`` reads them
from other fields. ``Sample.category`` is the optional metadata ``category`` (``category_field=``).
"""

from surpipe.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, decode_rgb, to_rgb
from surpipe.data.surd import (DEFAULT_CATEGORY_FIELD, DEFAULT_COMPLEX_FIELD, DEFAULT_SIMPLE_FIELD, Sample,
                               ScanReport, SurdDataset, base_key, is_blank_prompt, open_dataset)
from surpipe.data.shards import write_shards  # webdataset loads only when shards are written

__all__ = [
    "DEFAULT_CATEGORY_FIELD",
    "DEFAULT_COMPLEX_FIELD",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_SIMPLE_FIELD",
    "IMAGE_EXTENSIONS",
    "Sample",
    "ScanReport",
    "SurdDataset",
    "base_key",
    "decode_rgb",
    "is_blank_prompt",
    "open_dataset",
    "to_rgb",
    "write_shards",
]

