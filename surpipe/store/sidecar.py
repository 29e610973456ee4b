"""What surpipe keeps beside a store rather than in it.

A Zarr reader treats every entry of the store's folder as a node of the hierarchy and warns about
anything else (``ZarrUserWarning: Object at .locks is not recognized``), so files that are not zarr
data live in sibling folders named after the store: ``<store>.locks/`` (lock files) and
``<store>.configs/`` (the run configs the stages save, reusable with ``--config``; each group's
``config`` attribute holds the same config inside the store), and ``<store>.adding-layers/`` (layers
being added by ``extract-llm --layers``, while they are computed). docs/store-format.md, "Beside the store".
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from surpipe.store.location import is_url, store_path as _sp

SIDECARS = ("locks", "configs", "adding-layers")  # adding-layers: extract-llm --layers scratch


def sidecar_dir(store_path: str | os.PathLike, what: str) -> Path:
    """``<store>.<what>``: the folder beside the store holding its ``what`` (locks, configs); for a
    store at a URL, the prefix ``<store>.<what>`` on the same filesystem (a RemotePath)."""
    if is_url(store_path):
        p = _sp(store_path)
        return p.with_name(f"{p.name}.{what}")
    p = Path(store_path)
    if not p.name:  # "." or "/": name the folder after the resolved path
        p = p.resolve()
    return p.with_name(f"{p.name}.{what}")


def config_file(store_path: str | os.PathLike, stage: str, name: str) -> Path:
    """Where ``stage`` (e.g. ``extract-llm``) saves its resolved config for group ``name``."""
    return sidecar_dir(store_path, "configs") / f"{stage}-{name}.json"


def remove_sidecars(store_path: str | os.PathLike) -> None:
    """Delete the folders beside a store (with the store itself, e.g. a just-created one)."""
    for what in SIDECARS:
        d = sidecar_dir(store_path, what)
        if hasattr(d, "rmtree"):  # a remote prefix
            try:
                d.rmtree()
            except Exception:  # noqa: BLE001 - best effort, as ignore_errors below
                pass
        else:
            shutil.rmtree(d, ignore_errors=True)
