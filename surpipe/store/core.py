"""The core of the store format (docs/store-format.md): its names and numbers. Format versions, the
root arrays of a store's rows (the only module that spells their names), the feature kinds, the
``"<n>+growing"`` marker, and the hashes and versions recorded in a group's attributes. A leaf:
every store module may read it; the store object itself is :mod:`surpipe.store.feature_store`."""

from __future__ import annotations

import hashlib
import json
from importlib import metadata as _md
from typing import Any, Mapping

FORMAT_VERSION = 2
# formats this surpipe opens: 1 (no checksums, no generations: reported as unchecked) and 2
READABLE_FORMATS = (1, 2)
DEFAULT_BLOCK_ROWS = 256
# the feature kinds, one folder each; each kind's contract is surpipe.features (its KINDS, same order)
KINDS = ("llm", "clip", "vae")
# the root arrays of a store's rows (the only module that spells their names)
KEYS_ARRAY = "keys"
PROMPT_ARRAYS = {"simple": "prompts/simple", "complex": "prompts/complex"}
ROW_ARRAYS = (KEYS_ARRAY, *PROMPT_ARRAYS.values())
# optional (stores made since categories are kept): each row's category label, "" for none;
# never part of matching a store to a dataset
CATEGORY_ARRAY = "prompts/category"
GROWING = "+growing"  # suffix of surpipe_format while a growth is under way (surpipe.store.growth)


def parse_format(value):
    """``(format, growing)`` of a root ``surpipe_format`` attribute (``2`` or ``"2+growing"``)."""
    if isinstance(value, str) and value.endswith(GROWING):
        try:
            return int(value[: -len(GROWING)]), True
        except ValueError:
            pass
    return value, False


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape stored values (read from metadata: no imports)."""
    out = {}
    for name in ("surpipe", "torch", "transformers", "diffusers", "bitsandbytes", "accelerate",
                 "zarr", "numcodecs", "numpy", "pillow", "tokenizers"):
        try:
            out[name] = _md.version(name)
        except _md.PackageNotFoundError:
            pass
    return out


def settings_hash(settings: Mapping[str, Any]) -> str:
    """A short stable hash of a settings mapping (JSON, sorted keys)."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
