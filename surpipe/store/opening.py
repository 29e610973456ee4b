"""Opening the store of a stage-one command (extract-llm, encode-latents): the dataset is scanned,
the store created from its rows or matched to them (:func:`surpipe.store.feature_store.open_or_create`), in one step.

Images: a NEW store's rows are the dataset rows whose images pass ``check_images`` (auto: a full
decode), so that encode-latents can encode every row whichever command runs first. Matching an
existing store reads keys and prompts only; the few dataset rows missing from the store are
decoded to confirm that their images are why the creation left them out. Commands that read the
images (encode-latents' VAE part) then check the store's rows' images (auto: headers) and refuse
the rows that fail, by key, before any model work.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

from surpipe.errors import SurpipeError, first_line
from surpipe.logs import get_logger
from surpipe.progress import progress_bar
from surpipe.store.feature_store import local_store_path, open_or_create
from surpipe.store.core import DEFAULT_BLOCK_ROWS
from surpipe.store.sidecar import remove_sidecars


log = get_logger()  # "surpipe: ..." on stderr, from rank 0 only


def image_problems(samples: Sequence, mode: str, progress: bool = False, desc: str = "") -> dict[int, str]:
    """``{index: reason}`` of the samples whose image fails the check (``header``: format, size and
    pixel limit from the header; ``full``: a full decode), checked on a few threads."""
    if mode == "none" or not samples:
        return {}
    from surpipe.data.images import ImageProblem, probe  # heavy (PIL): kept out of `surpipe --help`

    def one(s) -> str | None:
        try:
            with s.open_image() as fh:
                probe(fh, max_pixels=s.max_pixels, full=(mode == "full"))
        except ImageProblem as e:
            return str(e)
        except (SurpipeError, OSError) as e:
            return f"unreadable file: {first_line(e)[:160]}"
        return None

    out: dict[int, str] = {}
    bar = progress_bar(total=len(samples), desc=desc or f"checking images ({mode})", unit="img",
                       disable=not progress, leave=False)
    with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
        for i, problem in enumerate(pool.map(one, samples)):
            bar.update(1)
            if problem is not None:
                out[i] = problem
    bar.close()
    return out


def open_store(data: str, store_path: str, *, block_rows: int | None = None, check_images: str = "auto",
               images: bool = False, progress: bool = True, is_main: bool = True,
               simple_field: str = "text", complex_field: str = "prompt"):
    """The dataset and the store made from it, created when absent: returns ``(dataset, store)``,
    with ``dataset.samples`` aligned with the store's rows and ``store.created_now`` True when this
    call made it (for :func:`discard_new_store_on_error`).

    ``check_images`` (auto, full, header, none) is the image check a new store's rows pass (auto:
    full) and, with ``images`` (the command reads them), the check of an existing store's rows
    (auto: header). A dataset that is the store's rows plus rows after its last row grows the store
    (:mod:`surpipe.store.growth`: those rows are appended). A store made from another dataset raises
    :class:`~surpipe.store.errors.DatasetMismatch` naming the first differing row. ``simple_field`` /
    ``complex_field`` name the metadata fields of the two prompts.
    """
    from surpipe.data import SurdDataset, open_dataset  # heavy (PIL, webdataset): kept out of `surpipe --help`

    where = local_store_path(store_path)
    exists = where.joinpath("zarr.json").is_file()
    if not exists and getattr(where, "bucket_exists", None) and not where.bucket_exists():
        # before the dataset scan: a mistyped bucket fails in seconds, not after decoding every image
        raise SurpipeError(f"feature store {where}: bucket {where.path.split('/', 1)[0]!r} does not exist (or these "
                           "credentials cannot see it); create it or fix the URL / endpoint")
    creating = check_images if check_images != "auto" else "full"
    ds = open_dataset(data, strict=False, check_images="none" if exists else creating,
                      progress=progress and is_main, simple_field=simple_field, complex_field=complex_field)
    if len(ds) == 0:
        raise SurpipeError(f"dataset {data} has no usable rows")

    def left_out(idx: Sequence[int]) -> dict[int, str]:
        # dataset rows missing from the store: the creation's image check (whichever it was) dropped
        # them only if their image fails a full decode; only these few rows are decoded
        bad = image_problems([ds.samples[j] for j in idx], "full")
        return {idx[i]: why for i, why in bad.items()}

    def new_rows(idx: Sequence[int]) -> dict[int, str]:
        # dataset rows after the store's last row: appended (the store grows) when their images pass
        # the check a new store's rows pass, so encode-latents can encode every row
        bad = image_problems([ds.samples[j] for j in idx], creating, progress and is_main, "checking new rows' images")
        return {idx[i]: why for i, why in bad.items()}

    store, match = open_or_create(store_path, ds, block_rows or DEFAULT_BLOCK_ROWS, left_out, grow=True,
                                  new_rows=new_rows)
    if is_main and match.grown:
        log.info(f"store {store_path} grew from {match.grown[0]} to {match.grown[1]} rows (dataset rows after its last "
                 "row were appended; existing rows and their finished blocks are kept, new blocks are pending)")
    rep = getattr(ds, "report", None)
    if is_main and rep is not None and getattr(rep, "skipped", None):
        log.info(f"dataset scan skipped {len(rep.skipped)} rows (not in the store):\n{rep.summary()}")
    if is_main and match.left_out:
        eg = "; ".join(f"{k}: {why}" for k, why in list(match.left_out.items())[:5])
        log.info(f"{len(match.left_out)} dataset rows are not in the store {store_path} (left out when it was "
                 f"created: their images fail the check), e.g. {eg}")
    if is_main and block_rows is not None and store.block_rows != block_rows:
        log.info(f"note: store {store_path} exists with block_rows={store.block_rows}; "
                 f"--block-rows {block_rows} only applies when a store is created")
    if images and not store.created_now:
        mode = "header" if check_images == "auto" else check_images
        bad = image_problems(match.samples, mode, progress and is_main)
        if bad:
            raise SurpipeError(
                f"{len(bad)} rows of store {store_path} have images in {data} that fail the {mode} check now "
                "(the store's rows are fixed when it is created): restore these images, or make a new store "
                "with another --store", [f"row {i} ({match.samples[i].key}): {why}" for i, why in list(bad.items())[:20]])
    if len(match.samples) != len(ds.samples):  # the store's rows only, with the scan's source and report
        ds = SurdDataset(ds.source, list(match.samples), ds.report)
    return ds, store


def _any_block_done(store) -> bool:
    """Whether any group of ``store`` has a block marked done (in any generation). Read raw: the
    failure may have interrupted a group's creation, leaving it without its attributes."""
    for p in store.group_paths():
        g = store.root[p]
        if "done" in g and np.asarray(g["done"][:]).any():
            return True
    return False


@contextlib.contextmanager
def discard_new_store_on_error(store, is_main: bool = True):
    """Remove the store this command created (``store.created_now``), and the folders beside it,
    when the command fails before any block of any group is done, so a failed first command
    leaves no empty store behind."""
    try:
        yield
    except Exception:
        if is_main and getattr(store, "created_now", False):
            try:
                used = _any_block_done(store)
            except Exception:
                used = True  # cannot tell: keep it
            if not used:
                if getattr(store, "remote", False):
                    try:
                        store.path.rmtree()
                    except Exception:  # noqa: BLE001 - best effort, as ignore_errors below
                        pass
                else:
                    shutil.rmtree(store.path, ignore_errors=True)
                remove_sidecars(store.path)
                log.info(f"removed the store {store.path} this command had just created (nothing was written to it)")
        raise
