"""Training data from the feature store: block-shuffled reads, resumable position.

A read call costs about the same whatever its size, so the loader reads whole blocks of
contiguous rows (one call per array) and shuffles at two levels: the block order per epoch and
the row order inside each block, both from (seed, epoch) only. The sample sequence is therefore a
pure function of (seed, epoch, position), which makes resume exact: a checkpoint stores the
position and the reader restarts there, whatever the number of DataLoader workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from surpipe.errors import SurpipeError


@dataclass(frozen=True)
class StoreGroups:
    """Which groups and arrays of a store feed training."""

    llm_group: str | None  # e.g. "llm/tiny"
    llm_layer: int
    clip_group: str | None  # e.g. "clip/sd"
    vae_group: str | None  # e.g. "vae/sd-512"
    use_flip: bool = True


def _pick(store, kind: str, requested: str | None, match=None) -> tuple[str | None, str | None]:
    """Resolve a group name: the requested one, the only group of that kind, or, among several,
    the one ``match(store, paths)`` singles out (it returns (matching paths, why-text))."""
    have = store.group_paths(kind)
    if requested:
        path = requested if requested.startswith(kind + "/") else f"{kind}/{requested}"
        if path not in have:
            return None, (f"store has no {kind} group {path!r}; "
                          f"available: {', '.join(have) or f'none (run the stage that writes {kind} features)'}")
        return path, None
    if len(have) == 1:
        return have[0], None
    if not have:
        stage = "extract-llm" if kind == "llm" else "encode-latents"
        return None, f"store has no {kind} group; run `surpipe {stage}` first"
    if match is not None:
        found, why = match(store, have)
        if len(found) == 1:
            return found[0], None
        cands = found or have
        listing = "; ".join(f"{p} ({_describe_group(store, p)})" for p in cands)
        return None, (f"store has several {kind} groups and {why}: {listing}; "
                      f"choose one with --{kind}-group NAME")
    return None, f"store has several {kind} groups ({', '.join(have)}); choose one with --{kind}-group"


def _describe_group(store, path: str) -> str:
    s = store.group(path).settings
    bits = [f"model {s.get('model')}"]
    for k in ("revision", "resolution", "store_dtype"):
        if s.get(k) is not None:
            bits.append(f"{k} {s[k]}")
    return ", ".join(bits)


def model_id(model: str) -> str:
    """How stage one records a model: a local folder as its resolved absolute path, a hub id as is."""
    from pathlib import Path

    from surpipe import sd

    return str(Path(model).expanduser().resolve()) if sd.is_local(model) else model


def _text_encoder_fingerprint(model: str, revision: str | None, with_weights: bool) -> dict | None:
    """The hashes encode-latents records for a text encoder (config hash, and with ``with_weights``
    the weights hash), computed from the files of a local folder without building the model;
    None when ``model`` is no local folder with text_encoder/ (a UNet-only folder, a hub id)."""
    from pathlib import Path

    from surpipe import sd

    if not sd.is_local(model):
        return None
    sub = Path(model).expanduser() / "text_encoder"
    if not (sub / "config.json").is_file():
        return None
    try:
        import transformers

        cfg = transformers.AutoConfig.from_pretrained(str(sub))
        out = {"text_encoder_config_hash": sd.config_hash(cfg.to_dict())}
    except Exception:
        return None
    if with_weights:
        files = [sub / "model.safetensors"] if (sub / "model.safetensors").is_file() else []
        index = sub / "model.safetensors.index.json"
        if not files and index.is_file():
            try:
                import json

                files = sorted({sub / f for f in json.loads(index.read_text())["weight_map"].values()})
            except Exception:
                files = []
        if not files and (sub / "model.fp16.safetensors").is_file():
            files = [sub / "model.fp16.safetensors"]
        if files:  # .bin files are pickles: never read here
            try:
                from safetensors.torch import load_file

                tensors = {}
                for f in files:
                    tensors.update({k: v.float() for k, v in load_file(str(f)).items()})

                class _Dict:  # weights_hash reads state_dict(): hash the file's tensors the same way
                    def state_dict(self):
                        return tensors

                out["text_encoder_weights_sha256"] = sd.weights_hash(_Dict())
            except Exception:
                pass
    return out


def _fitting(store, paths, size_of, want) -> tuple[list[str], bool]:
    """The groups whose ``size_of(group)`` is what the UNet expects (``want``; None: unknown):
    (candidates, whether that decided it). None fitting leaves them all to the next rule."""
    fit = [p for p in paths if want is not None and size_of(store.group(p)) == want]
    return (fit, True) if len(fit) == 1 else (fit or list(paths), False)


def clip_matcher(model: str | None, revision: str | None = None, width: int | None = None):
    """The rule that picks a CLIP group among several: the embedding width the UNet expects, then
    the text encoder of ``model`` (its config and weights hashes when ``model`` is a local folder
    with text_encoder/, else the model id recorded by encode-latents)."""
    from surpipe.features import ClipFeatures

    def match(store, paths):
        cands, decided = _fitting(store, paths, lambda g: (ClipFeatures.embedding_shape(g) or (0, None))[1], width)
        if decided:
            return cands, ""
        if model is None:
            return [], "no --model to match them against"
        fp = _text_encoder_fingerprint(model, revision, with_weights=False)
        if fp is not None:
            cands = [p for p in cands if store.group(p).settings.get("text_encoder_config_hash")
                     == fp["text_encoder_config_hash"]]
            if len(cands) > 1:
                fp = _text_encoder_fingerprint(model, revision, with_weights=True) or fp
                if "text_encoder_weights_sha256" in fp:
                    cands = [p for p in cands if store.group(p).settings.get("text_encoder_weights_sha256")
                             == fp["text_encoder_weights_sha256"]]
            how = f"the text encoder of {model} (config hash {fp['text_encoder_config_hash']}"
            how += f", weights hash {fp['text_encoder_weights_sha256']})" if "text_encoder_weights_sha256" in fp else ")"
        else:
            mid = model_id(model)
            cands = [p for p in cands if store.group(p).settings.get("model") == mid]
            how = f"model {mid} (it has no text_encoder/ to compare by hash)"
        if len(cands) == 1:
            return cands, ""
        return cands, (f"{len(cands)} of them match {how}" if cands else f"none of them matches {how}")

    return match


def vae_matcher(model: str | None, in_channels: int | None = None):
    """The rule that picks a VAE group among several: the latent channels the UNet expects, then
    the model id recorded by encode-latents."""
    from surpipe.features import VaeFeatures

    def match(store, paths):
        cands, decided = _fitting(store, paths, lambda g: (VaeFeatures.latent_shape(g) or (None,))[0], in_channels)
        if decided:
            return cands, ""
        if model is None:
            return [], "no --model to match them against"
        mid = model_id(model)
        cands = [p for p in cands if store.group(p).settings.get("model") == mid]
        if len(cands) == 1:
            return cands, ""
        return cands, (f"{len(cands)} of them were encoded from model {mid}" if cands
                       else f"none of them was encoded from model {mid}")

    return match


def resolve_groups(store, *, llm_layer: int, llm_group: str | None, clip_group: str | None,
                   vae_group: str | None, use_flip: bool, model: str | None = None,
                   revision: str | None = None, unet_config: dict | None = None
                   ) -> tuple[StoreGroups | None, list[str]]:
    """Find and check the groups training needs; returns (groups, problems) with every problem.

    A kind with several groups and no explicit choice is resolved against ``model`` and its
    ``unet_config`` (clip_matcher, vae_matcher). A negative ``llm_layer`` counts from the end of
    the stored layers (-1: the last); the returned StoreGroups holds the resolved layer.
    A group that could not be resolved is None in the returned StoreGroups."""
    from surpipe.features import ClipFeatures, LLMFeatures, VaeFeatures

    problems: list[str] = []
    paths = {}
    unet_config = unet_config or {}
    cad = unet_config.get("cross_attention_dim")
    if isinstance(cad, (list, tuple)):
        cad = cad[0] if cad else None
    cad = cad if isinstance(cad, int) else None
    inch = unet_config.get("in_channels") if isinstance(unet_config.get("in_channels"), int) else None
    matchers = {"llm": None, "clip": clip_matcher(model, revision, cad), "vae": vae_matcher(model, inch)}
    for kind, req in (("llm", llm_group), ("clip", clip_group), ("vae", vae_group)):
        path, err = _pick(store, kind, req, matchers[kind])
        if err:
            problems.append(err)
        paths[kind] = path
    if paths["llm"]:
        g = store.group(paths["llm"])
        layers = LLMFeatures.layers(g)
        if llm_layer < 0 and -len(layers) <= llm_layer:
            llm_layer = layers[llm_layer]
        elif llm_layer < 0 or LLMFeatures.width(g, llm_layer) is None:
            problems.append(f"{paths['llm']} has no layer {llm_layer} (stored layers: {layers or 'none'}); "
                            "re-run extract-llm with that layer or choose --llm-layer from the list "
                            "(negative values count from the last stored layer: -1 is the last)")
    for kind in ("llm", "clip", "vae"):
        if paths[kind]:
            g = store.group(paths[kind])
            done, n = g.completed_blocks(), store.num_blocks
            if done < n:
                problems.append(f"{paths[kind]} is incomplete: {done}/{n} blocks done; rerun its stage to finish it")
    if paths["clip"]:
        problems += ClipFeatures.train_problems(store.group(paths["clip"]), paths["clip"])
    flip = False
    if paths["vae"]:
        vae = store.group(paths["vae"])
        problems += VaeFeatures.train_problems(vae, paths["vae"])
        flip = use_flip and VaeFeatures.has_flip(vae)
    # groups that were found are returned even with problems, so callers can check more at once
    return StoreGroups(paths["llm"], llm_layer, paths["clip"], paths["vae"], flip), problems


class BlockReader:
    """Reads whole row blocks of the training arrays (picklable: safe in DataLoader workers).

    Nothing it returns can be silently wrong: the groups' metadata is checked when it opens (dtype,
    shape and chunks against the settings and the layout recorded at creation), and every block
    read checks that the block is done in the group's current generation, that every chunk file
    exists (a deleted one would read as zeros), that the chunks pass their crc32c checksums, and
    that the float values are finite. Any failure is a SurpipeError naming store, array and rows.
    """

    def __init__(self, store_path: str, groups: StoreGroups, block_rows: int):
        self.store_path = str(store_path)
        self.groups = groups
        self.block_rows = block_rows
        self._arrays = None
        self._done = None
        self._keys = None
        self.num_rows = None
        self._open()

    def _open(self):
        from surpipe.features import ClipFeatures, LLMFeatures, VaeFeatures
        from surpipe.store import FeatureStore

        store = FeatureStore(self.store_path)  # format, root attributes: clear errors
        g = self.groups
        llm = store.group(g.llm_group)
        wanted = {}  # batch key -> (group, array), as each kind says training reads it
        for gpath, names in ((g.llm_group, LLMFeatures.train_arrays(llm, g.llm_layer)),
                             (g.clip_group, ClipFeatures.train_arrays()),
                             (g.vae_group, VaeFeatures.train_arrays(g.use_flip))):
            wanted |= {key: (gpath, name) for key, name in names.items()}
        groups = {}
        arrays = {}
        for key, (gpath, name) in wanted.items():
            if gpath not in groups:
                groups[gpath] = llm if gpath == g.llm_group else store.group(gpath)  # refuses damaged metadata
            arrays[key] = (gpath, name, groups[gpath].array(name))
        # (done array, generation id) per group: a block counts only when done in this generation
        self._done = {p: (fg.group["done"], fg.gen_id) for p, fg in groups.items()}
        self._arrays = arrays
        self._keys = store.root["keys"]
        self.num_rows = store.num_samples

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_arrays"] = state["_done"] = state["_keys"] = None  # zarr handles are reopened in each worker
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    @property
    def num_blocks(self) -> int:
        return max(1, -(-self.num_rows // self.block_rows))

    def __len__(self) -> int:
        return self.num_blocks

    def _fail(self, msg: str) -> SurpipeError:
        return SurpipeError(f"store {self.store_path}: {msg}; run `surpipe verify --repair {self.store_path}` "
                            "to mark the damaged block for recomputation, then rerun the stage that wrote it")

    def __getitem__(self, block: int) -> dict[str, np.ndarray]:
        from surpipe.store import chunk_files, missing_chunk, read_failure

        start = block * self.block_rows
        stop = min(start + self.block_rows, self.num_rows)
        rows = f"rows {start}-{stop - 1}"
        for gpath, (done, gen) in self._done.items():
            try:
                v = _done_value(self.store_path, done, block, gen)
            except Exception as e:
                raise read_failure(self.store_path, f"{gpath}/done", block, (start, stop), e) from None
            if gen is None:
                ok = bool(v)
            else:
                ok = int(v) == gen
            if not ok:
                why = ("was completed by another generation of the group (it was replaced with --overwrite)"
                       if v else "is not marked done")
                raise self._fail(f"{gpath} block {block} ({rows}) {why}")
        out = {}
        for key, (gpath, name, arr) in self._arrays.items():
            where = f"{gpath}/{name}"
            for f in chunk_files(self.store_path, arr, block):
                if not f.is_file():
                    raise missing_chunk(self.store_path, where, block, (start, stop), f)
            try:
                x = np.asarray(arr[start:stop])
            except Exception as e:
                raise read_failure(self.store_path, where, block, (start, stop), e) from None
            if x.dtype.kind in "fc":
                finite = np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1) if x.size else np.ones(len(x), bool)
                if not finite.all():
                    bad = (np.flatnonzero(~finite) + start).tolist()
                    try:
                        keys = [str(k) for k in self._keys[start:stop][np.asarray(bad) - start][:5]]
                    except Exception:
                        keys = []
                    raise self._fail(
                        f"{where} holds NaN or Inf in {len(bad)} rows of block {block}: rows {bad[:10]}"
                        + (" ..." if len(bad) > 10 else "") + (f" (keys {keys})" if keys else ""))
            out[key] = x
        return out


def _done_value(store_path: str, done, block: int, gen: int | None):
    """``done[block]``, read from its chunk file directly when the layout is format 2's (8 bytes of
    little-endian int64, then the crc32c): a zarr read costs ~2 ms, this ~50 us, for every block."""
    if gen is not None and len(done.compressors) == 1 and getattr(done.serializer, "endian", None) is not None \
            and str(done.serializer.endian.value) == "little":
        import google_crc32c

        from surpipe.store import chunk_files

        f = chunk_files(store_path, done, block)[0]
        try:
            raw = f.read_bytes()
        except FileNotFoundError:
            return 0  # fill value: not done
        if len(raw) != 12 or google_crc32c.value(raw[:8]) != int.from_bytes(raw[8:], "little"):
            raise ValueError("Stored and computed checksum do not match")
        return int.from_bytes(raw[:8], "little", signed=True)
    return done[block]


def epoch_plan(num_rows: int, block_rows: int, seed: int, epoch: int,
               keep: np.ndarray | None = None) -> list[tuple[int, np.ndarray]]:
    """The visiting plan of one epoch: [(block, row order inside the block)], from (seed, epoch).

    ``keep`` (bool per store row; None: every row) removes the rows it marks False, the held-out
    validation rows, from each block's order AFTER all the random draws, so the rows kept are
    visited in the same relative order as without a split; a block left empty is dropped.
    """
    nb = max(1, -(-num_rows // block_rows))
    rng = np.random.default_rng([seed, epoch, 7])
    plan = []
    for b in rng.permutation(nb):
        n = min(block_rows, num_rows - int(b) * block_rows)
        plan.append((int(b), rng.permutation(n)))
    if keep is not None:
        keep = np.asarray(keep, dtype=bool)
        if len(keep) != num_rows:
            raise SurpipeError(f"training row mask has {len(keep)} rows, the store {num_rows}")
        plan = [(b, order[keep[b * block_rows + order]]) for b, order in plan]
        plan = [(b, order) for b, order in plan if len(order)]
    return plan


@dataclass
class Position:
    """Where the sample stream stands: epoch, block index in the epoch plan, row inside it."""

    epoch: int = 0
    block_idx: int = 0
    row_idx: int = 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "block_idx": self.block_idx, "row_idx": self.row_idx}


class SampleStream:
    """Yields training batches (dicts of numpy arrays) in a deterministic, resumable order.

    Blocks come from a DataLoader (``workers`` processes prefetch whole blocks); the main process
    slices them into batches following the epoch plan, so ``position`` is exact at any step.
    ``keep`` (bool per store row) leaves out held-out rows: see :func:`epoch_plan`; ``position``
    then counts in the filtered plan.
    """

    def __init__(self, reader: BlockReader, batch_size: int, seed: int, workers: int = 0,
                 position: Position | None = None, prefetch: int = 2, keep: np.ndarray | None = None):
        if batch_size < 1:
            raise SurpipeError(f"batch size must be >= 1, got {batch_size}")
        if keep is not None and not np.asarray(keep, dtype=bool).any():
            raise SurpipeError("no training rows: every row of the store is held out")
        self.keep = keep  # bool per store row: False rows (held out for validation) are never read
        self.reader = reader
        self.batch_size = batch_size
        self.seed = seed
        self.workers = workers
        self.prefetch = prefetch
        self.position = position or Position()

    def _blocks(self, epoch: int, first: int) -> Iterator[tuple[int, dict]]:
        import torch
        import torch.utils.data as tud

        plan = epoch_plan(self.reader.num_rows, self.reader.block_rows, self.seed, epoch, self.keep)
        order = [b for b, _ in plan[first:]]
        loader = tud.DataLoader(
            _Subset(self.reader, order), batch_size=None, shuffle=False, num_workers=self.workers,
            prefetch_factor=self.prefetch if self.workers else None,
            persistent_workers=False, collate_fn=_identity,
            # its own generator: creating an iterator must not draw from the global RNG, which
            # dropout uses, or a resumed run would diverge from a straight one
            generator=torch.Generator().manual_seed(self.seed + epoch),
        )
        for i, block in enumerate(loader):
            if isinstance(block, _ReadError):
                raise SurpipeError(block.message)
            yield first + i, block, plan[first + i][1]

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Endless batches; a batch may span an epoch boundary (no sample is dropped)."""
        pending: list[dict] = []
        while True:
            pos = self.position
            for bidx, block, rows in self._blocks(pos.epoch, pos.block_idx):
                start = pos.row_idx if bidx == pos.block_idx else 0
                for r in range(start, len(rows)):
                    pending.append({k: v[rows[r]] for k, v in block.items()})
                    if len(pending) == self.batch_size:
                        last = r + 1 == len(rows)
                        self.position = Position(pos.epoch, bidx + 1 if last else bidx, 0 if last else r + 1)
                        yield {k: np.stack([p[k] for p in pending]) for k in pending[0]}
                        pending = []
            self.position = Position(pos.epoch + 1, 0, 0)


class _Subset:
    def __init__(self, reader, order):
        self.reader, self.order = reader, order

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        # a SurpipeError in a DataLoader worker would reach the main process wrapped with the
        # worker's traceback in its message: hand it over as data, raised again in _blocks
        try:
            return self.reader[self.order[i]]
        except SurpipeError as e:
            return _ReadError(str(e))


class _ReadError:
    def __init__(self, message: str):
        self.message = message


def _identity(x):
    return x
