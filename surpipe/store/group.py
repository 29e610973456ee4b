"""Feature groups: row-aligned arrays of one kind (``llm``, ``clip``, ``vae``) with per-block completion
records, written in whole blocks and read back with checks (docs/store-format.md)."""

from __future__ import annotations

import errno
from typing import Mapping

import numpy as np

from surpipe.errors import SurpipeError, first_line
from surpipe.logs import get_logger
from surpipe.store.errors import ChecksumError
from surpipe.store.core import parse_format
from surpipe.store.group_layout import layout_problems
from surpipe.store.integrity import (checksum_typed, fresh_attrs, generation_id, missing_block_file, missing_chunk,
                                     read_failure, to_storage)
from surpipe.store.remote import remote_failure
from surpipe.store.sharding import owner


class FeatureGroup:
    """A group of row-aligned arrays (e.g. ``clip/sd15``) with per-block completion records, of
    ``store`` (a :class:`~surpipe.store.feature_store.FeatureStore`, which opens and creates groups)."""

    def __init__(self, store, path: str):
        self.store = store
        self.path = path
        try:
            self.group = store.root[path]
            attrs = dict(self.group.attrs)
        except Exception as e:  # garbage zarr.json: zarr raises JSONDecodeError, TypeError, ...
            raise store.damaged(path, e) from None
        # the generation this object was opened in: its blocks are done only with this id
        self.generation = attrs.get("generation")
        self.gen_id = generation_id(self.generation)

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def settings(self) -> dict:
        return dict(self.group.attrs.get("settings", {}))

    @property
    def array_names(self) -> list[str]:
        return list(self.group.attrs.get("arrays", []))

    def array(self, name: str):
        try:
            return self.group[name]
        except KeyError:
            raise SurpipeError(
                f"store {self.store.path}: group {self.path} has no array {name!r} "
                f"(it has: {', '.join(self.array_names) or 'none'})"
            ) from None

    def done_record(self) -> np.ndarray:
        """The raw ``done`` array: bool (format 1) or, per block, the generation id that completed it."""
        try:
            return np.asarray(self.group["done"][:])
        except Exception as e:
            raise self.store.damaged(f"{self.path}/done", e) from None

    def done_mask(self) -> np.ndarray:
        """Blocks complete in this group's generation (a block recorded by another generation of
        the group, i.e. before an ``--overwrite``, is not done)."""
        d = self.done_record()
        if self.gen_id is None:
            return d.astype(bool)
        return d == self.gen_id

    def foreign_blocks(self) -> list[int]:
        """Blocks marked done by another generation of this group (never valid data)."""
        if self.gen_id is None:
            return []
        d = self.done_record()
        return np.flatnonzero((d != 0) & (d != self.gen_id)).tolist()

    def check_generation(self, block: int | None = None) -> None:
        """Refuse to go on when the group on disk is no longer the one this object opened (another
        job replaced it with ``--overwrite``): its blocks must not land in the new group."""
        now = fresh_attrs(self.store.path, self.path)
        at = f" before block {block} was marked done" if block is not None else ""
        if now is None or now.get("generation") != self.generation:
            raise SurpipeError(
                f"store {self.store.path}: group {self.path} was replaced or deleted by another job "
                f"(--overwrite) while this job was writing it{at}; this job's blocks are not valid in the "
                "new group. Rerun the command to write the group as it is now")
        root = fresh_attrs(self.store.path, "")
        if root is not None and (root.get("num_samples") != self.store.num_samples
                                 or parse_format(root.get("surpipe_format"))[1]):
            # a job that opened the store before another job appended rows has stale block ranges
            raise SurpipeError(
                f"store {self.store.path} grew (another job appended dataset rows: {self.store.num_samples} "
                f"rows when this job opened it, {root.get('num_samples')} now) while this job was about to "
                f"write group {self.path}{at}; rerun the command: it completes the grown store")

    def completed_blocks(self) -> int:
        return int(self.done_mask().sum())

    def is_complete(self) -> bool:
        return bool(self.done_mask().all())

    @property
    def shard_blocks(self) -> int:
        """Blocks per stored object (1: unsharded; :mod:`surpipe.store.sharding`)."""
        try:
            return max(1, int(self.group.attrs.get("shard_blocks", 1) or 1))
        except (TypeError, ValueError):
            return 1

    def pending_blocks(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """Blocks not yet done that belong to ``rank``: block b belongs to rank (b // K) % world_size,
        K the group's blocks per shard (1 unsharded), so a shard object is only ever written by
        one rank.

        Ownership depends on the block index alone, never on timing, so ranks that list their
        blocks at different moments still get disjoint sets; a resumed job may use another
        world size.
        """
        k = self.shard_blocks
        pending = np.flatnonzero(~self.done_mask()).tolist()
        return [b for b in pending if owner(b, k, world_size) == rank]

    def write_block(self, block: int, values: Mapping[str, np.ndarray], fence=None) -> None:
        """Write every array's rows of ``block`` (one chunk each), then mark the block done.

        A failed write (full disk, I/O error, an object store failing) raises SurpipeError naming
        the group and block; the block stays not done, so a rerun redoes it. ``fence()`` (the
        writer lock's ``check``) is called right before the block is marked done: a writer whose
        lease was taken over stops there.
        """
        self.write_blocks([block], [values], fence)

    def write_blocks(self, blocks: list[int], values: list[Mapping[str, np.ndarray]], fence=None) -> None:
        """Write consecutive ``blocks`` (of one shard, :func:`surpipe.store.sharding.shard_runs`) in one
        piece per array, then mark them done: a sharded group's shard object is uploaded once
        rather than rewritten block by block."""
        try:
            self._write_blocks(list(blocks), list(values), fence)
        except ValueError as e:
            if self.shard_blocks > 1 and isinstance(checksum_typed(e), ChecksumError):  # zarr re-reads the shard
                span = f"block {blocks[0]}" if len(blocks) == 1 else f"blocks {blocks[0]}-{blocks[-1]}"
                raise SurpipeError(
                    f"store {self.store.path}: the shard of {self.path} holding {span} is damaged (checksum "
                    f"mismatch), so it cannot be written into; run `surpipe verify --repair {self.store.path}` "
                    "(it removes damaged shards and marks their blocks for recomputation), then rerun the same "
                    "command") from None
            raise
        except (SurpipeError, TypeError, KeyError):
            raise
        except Exception as e:
            span = f"block {blocks[0]}" if len(blocks) == 1 else f"blocks {blocks[0]}-{blocks[-1]}"
            if not getattr(self.store, "remote", False) or isinstance(e, OSError) and e.errno == errno.ENOSPC:
                if isinstance(e, OSError):
                    return self._failed(span, e)
                raise
            raise SurpipeError(f"writing {self.path} {span} of store {self.store.path} failed: "
                               f"{remote_failure(e, self.store.path)}; {span} not marked done: "
                               "rerun the same command (finished blocks are kept)") from None

    def _failed(self, span: str, e: OSError) -> None:
        where = e.filename or self.store.path
        what = "no space left on device" if e.errno == errno.ENOSPC else "write failed"
        raise SurpipeError(
            f"{what} while writing {self.path} {span} of store {self.store.path} "
            f"({where}: {e.strerror or e}); {span} not marked done: free space or fix "
            "the disk, then rerun the same command (finished blocks are kept)") from None

    def _stored_rows(self, name: str, arr, block: int, x: np.ndarray) -> np.ndarray:
        """``x`` checked against ``block``'s place in ``arr`` and converted to the stored dtype."""
        start, stop = self.store.block_range(block)
        cap = arr.attrs.get("block_capacity")
        if cap:  # block-ragged array: this block owns flat rows [block * cap, (block + 1) * cap)
            cap = int(cap)
            if x.ndim != arr.ndim or x.shape[0] > cap or x.shape[1:] != arr.shape[1:]:
                raise ValueError(f"{self.path}/{name}: block {block} expects at most {cap} rows of "
                                 f"shape {arr.shape[1:]}, got {x.shape}")
            full = np.zeros((cap, *arr.shape[1:]), dtype=x.dtype)
            full[: x.shape[0]] = x
            return to_storage(full, str(arr.dtype), f"{self.path}/{name} block {block} (rows {start}-{stop - 1})")
        if x.shape != (stop - start, *arr.shape[1:]):
            raise ValueError(f"{self.path}/{name}: block {block} expects shape "
                             f"{(stop - start, *arr.shape[1:])}, got {x.shape}")
        return to_storage(x, str(arr.dtype), f"{self.path}/{name} rows {start}-{stop - 1}")

    def _write_blocks(self, blocks: list[int], values: list[Mapping[str, np.ndarray]], fence=None) -> None:
        if any(b + 1 != c for b, c in zip(blocks, blocks[1:])):
            raise ValueError(f"write_blocks({self.path}): blocks {blocks} are not consecutive")
        for v in values:
            missing = sorted(set(self.array_names) - set(v))
            extra = sorted(set(v) - set(self.array_names))
            if missing or extra:
                raise ValueError(f"write_block({self.path}): missing arrays {missing}, unexpected {extra}")
        for b in blocks:
            self.check_generation(b)
        first, last = blocks[0], blocks[-1]
        for name in values[0]:
            # write_empty_chunks: an all-zero block still gets its chunk file, so a done block with a
            # missing chunk file is always damage (surpipe verify checks it)
            arr = self.group[name].with_config({"write_empty_chunks": True})
            parts = [self._stored_rows(name, arr, b, v[name]) for b, v in zip(blocks, values)]
            cap = arr.attrs.get("block_capacity")
            lo, hi = ((first * int(cap), (last + 1) * int(cap)) if cap else
                      (self.store.block_range(first)[0], self.store.block_range(last)[1]))
            arr[lo:hi] = parts[0] if len(parts) == 1 else np.concatenate(parts)
        for b in blocks:
            self.check_generation(b)  # a job that lost its group never marks a block of the new one
        if fence is not None:
            fence()  # a writer whose lease was taken over never marks a block
        mark = self.gen_id if self.gen_id is not None else True
        self.group["done"][first:last + 1] = np.full(len(blocks), mark, dtype=self.group["done"].dtype)

    def mark_incomplete(self, block: int) -> None:
        kept = self.group.attrs.get("kept_rows")
        update = {}
        if isinstance(kept, dict) and str(block) in kept:  # recomputed whole: the stored rows may be what is damaged
            update["kept_rows"] = {k: v for k, v in kept.items() if k != str(block)}
        # the block's chunks will be rewritten in this same generation: a count of such rewrites
        # keys local read caches (surpipe.store.cache), so they never serve the old bytes
        update["rewrites"] = int(self.group.attrs.get("rewrites") or 0) + 1
        self.group.update_attributes(update)
        self.group["done"][block] = 0 if self.gen_id is not None else False

    def kept_rows(self) -> dict[int, int]:
        """``{block: row}`` for blocks not done whose rows ``[block start, row)`` hold valid values
        (a block completed before the store grew: surpipe.store.growth); the job completing the
        block keeps them (:meth:`keep_stored_rows`)."""
        out = {}
        raw = self.group.attrs.get("kept_rows") or {}
        if not isinstance(raw, dict):
            return out
        done = None
        for k, v in raw.items():
            try:
                b, r = int(k), int(v)
            except (TypeError, ValueError):
                continue
            if 0 <= b < self.store.num_blocks and self.store.block_range(b)[0] < r:
                done = self.done_mask() if done is None else done
                if not done[b]:
                    out[b] = min(r, self.store.block_range(b)[1])
        return out

    def keep_stored_rows(self, block: int, row: int, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``values`` of ``block`` with its rows before ``row`` replaced by the stored ones, bit for
        bit (rows a growth kept, :meth:`kept_rows`). When they cannot be read (damaged since),
        ``values`` as computed."""
        start, _ = self.store.block_range(block)
        out = {}
        try:
            for name, x in values.items():
                arr = self.group[name]
                if arr.attrs.get("block_capacity"):
                    return dict(values)  # block-ragged: never kept (growth does not record it)
                x = np.array(x, copy=True)
                x[: row - start] = np.asarray(arr[start:row])
                out[name] = x
        except Exception as e:  # a damaged chunk: the computed values are as valid
            get_logger().info(f"store {self.store.path}: {self.path} block {block}: its stored rows {start}-{row - 1} "
                              f"cannot be read ({type(e).__name__}: {first_line(e)[:120]}); writing them as recomputed")
            return dict(values)
        return out

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of array ``name``. Every done block it touches must have its chunk
        files (a missing one would read as zeros) and pass its checksum; otherwise SurpipeError."""
        arr = self.array(name)
        n = arr.shape[0]
        start, stop, _ = slice(start, stop).indices(n)
        if stop > start:
            c = int(arr.chunks[0])
            done = self.done_mask()
            for b in range(start // c, -(-stop // c)):
                if b < len(done) and done[b]:
                    try:
                        f = missing_block_file(self.store.path, arr, b)
                    except ValueError as e:  # a damaged shard index
                        raise read_failure(self.store.path, f"{self.path}/{name}", b, (b * c, min((b + 1) * c, n)),
                                           e) from None
                    if f is not None:
                        raise missing_chunk(self.store.path, f"{self.path}/{name}", b,
                                            (b * c, min((b + 1) * c, n)), f)
        try:
            return arr[start:stop]
        except Exception as e:
            c = max(int(arr.chunks[0]), 1)
            for b in range(start // c, -(-stop // c)):  # find the block that fails, to name it
                try:
                    arr[b * c:min((b + 1) * c, n)]
                except Exception as eb:
                    raise read_failure(self.store.path, f"{self.path}/{name}", b, (b * c, min((b + 1) * c, n)),
                                       eb) from None
            raise read_failure(self.store.path, f"{self.path}/{name}", start // c, None, e) from None

    def layout_problems(self, rules=None) -> list[str]:
        """Problems of the group's metadata that make its data unreadable or misread, with the
        kinds' checks when given ``rules`` (:func:`surpipe.store.group_layout.layout_problems`)."""
        return layout_problems(self, rules)

    def require_complete(self) -> None:
        """Refuse unless every block is done in this generation (extract-llm checks both groups
        before it moves added layers from one into the other)."""
        foreign = self.foreign_blocks()
        if foreign:
            raise SurpipeError(
                f"store {self.store.path}: group {self.path} blocks {foreign[:10]} were completed by another "
                "generation of the group (it was replaced with --overwrite since); run "
                f"`surpipe verify --repair {self.store.path}` and rerun the stage that writes it")
        n = self.store.num_blocks
        done = self.completed_blocks()
        if done < n:
            raise SurpipeError(f"store {self.store.path}: group {self.path} is incomplete "
                               f"({done}/{n} blocks done); rerun the stage that writes it")
