"""Check a whole feature store against its contract (docs/store-format.md), and optionally mark
damaged blocks incomplete so the stage that wrote them redoes exactly those blocks.

What is checked:
- root attributes: ``surpipe_format`` (known; ``"<n>+growing"``: a growth that did not finish is a
  problem), ``num_samples``, ``block_rows``, ``dataset_fingerprint``;
- ``keys`` and ``prompts/simple``, ``prompts/complex`` (and the optional ``prompts/category`` where
  present): N rows, every chunk decodes, keys unique and non-empty;
- each feature group ``<kind>/<name>``: provenance attributes (``kind``, ``settings``,
  ``settings_hash`` equal to ``settings_hash(settings)``, ``arrays`` equal to the arrays present),
  the ``done`` record (one chunk per block), every array's row count, chunking, dtype and row shape
  (against the settings that imply them: ``hidden_size``, ``layers``, ``max_length``,
  ``latent_channels``, ``resolution``, ``downsample_factor``, ``store_dtype``, ``flip``);
- each array's metadata against the layout recorded at creation (attribute ``array_specs``: an
  edited ``data_type``, shape or chunk shape in a zarr.json), and the VAE ``scaling_factor``;
- for every block marked done: it was completed by the group's current ``generation`` (not by a
  job writing a group since replaced with ``--overwrite``), each array's chunk file exists (a
  deleted chunk would read back as zeros), passes its crc32c checksum, decodes, and holds no NaN
  or Inf.

Arrays without checksums (stores of format 1) are reported as unchecked (a warning): a flipped
byte that still decodes cannot be found in them. Garbage or unreadable metadata is a problem,
never a traceback.

Blocks not marked done are not valid data: they are reported as warnings (the stage has not
finished), never read. A problem tied to a done block is *repairable*: ``repair=True`` sets
``done[b] = False`` for it (nothing is recomputed), so rerunning the stage redoes only that block.

The root and its rows are checked in :mod:`surpipe.store.verify_checker`, each feature group in
:mod:`surpipe.store.verify_groups`.
"""

from __future__ import annotations

import time

from surpipe.store.feature_store import FeatureStore, local_store_path
from surpipe.store.group import FeatureGroup
from surpipe.store.integrity import chunk_files
from surpipe.store.locks import group_lock
from surpipe.store.spec import KindRules
from surpipe.store.verify_checker import Checker
from surpipe.store.verify_groups import check_groups
from surpipe.store.verify_report import Finding, VerifyReport  # noqa: F401  (re-exported)


def check_store(path, rules: KindRules | None = None) -> VerifyReport:
    """Check the store at ``path`` (read-only); see the module docstring for what is checked.
    ``rules`` (``surpipe.features.RULES``) adds each group's kind checks."""
    t0 = time.perf_counter()
    c = Checker(local_store_path(path), rules)
    root = c.root()
    if root is not None:
        c.rows_arrays(root)
        check_groups(c, root)
        u = c.rep.unchecked
        if u:
            c.warning("checksums", f"{len(u)} arrays carry no crc32c checksums (UNCHECKED: a flipped byte that "
                      f"still decodes cannot be found in them): {', '.join(u[:8])}" + (" ..." if len(u) > 8 else ""))
    c.rep.seconds = time.perf_counter() - t0
    return c.rep


def _drop_damaged_shards(store, g, blocks: list[int]) -> list[int]:
    """For a sharded group: delete the shard objects holding damaged ``blocks`` (zarr re-reads a shard
    before writing into it, so a damaged one could never be rewritten) and return every block they
    held, all to be recomputed; unsharded: ``blocks``."""
    k = g.shard_blocks
    if k <= 1:
        return list(blocks)
    out = sorted({x for b in blocks for x in range((b // k) * k, min((b // k + 1) * k, store.num_blocks))})
    for name in [*g.array_names, "done"]:  # the done shard too: its marks for these blocks are void
        arr = g.group[name]
        for s in sorted({b // k for b in blocks}):
            for f in chunk_files(store.path, arr, s * k):
                f.unlink(missing_ok=True)
    return out


def verify_store(path, repair: bool = False, rules: KindRules | None = None) -> VerifyReport:
    """Check the store; with ``repair``, mark every damaged done block incomplete (``done[b] = False``,
    nothing recomputed) and check again. The returned report's ``repaired`` lists what was marked;
    problems that no rerun can fix (root attributes, keys, layout) stay problems."""
    rep = check_store(path, rules)
    damaged = rep.damaged_blocks()
    if not repair or not damaged:
        return rep
    store = FeatureStore(path, mode="a")  # refuses a read-only store with a clear message
    for gpath, blocks in damaged.items():
        # exclusively: a writer marking blocks of the same done object meanwhile could undo a mark
        with group_lock(store.path, gpath, exclusive=True):
            g = FeatureGroup(store, gpath)
            for b in _drop_damaged_shards(store, g, blocks):
                g.mark_incomplete(b)
    fixed = [p for p in rep.problems if p.group is not None and p.block is not None]
    t = rep.seconds
    rep = check_store(path, rules)
    rep.repaired = fixed
    rep.seconds += t
    return rep
