"""Images for encode-latents: decoded and preprocessed in DataLoader workers, fed block by block in
store row order, with a bad image or a dead or stalled worker reported as a SurpipeError."""

from __future__ import annotations

from surpipe.errors import SurpipeError, first_line
from surpipe.sd.image import preprocess


class ImageRows:
    """torch Dataset over store rows: decodes and preprocesses one image per row, in workers.

    A failing image does not raise in the worker (torch would wrap it in a traceback): the error is
    returned and raised as a SurpipeError naming the key in the main process.
    """

    def __init__(self, samples, resolution: int):
        self.samples = samples
        self.resolution = resolution

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        try:
            img = s.image()
            # the decoded (EXIF-rotated) size travels along: SDXL's micro-conditioning records it
            return i, preprocess(img, self.resolution), None, img.size
        except Exception as e:  # SurpipeError for bad images; anything else is reported the same way
            return i, None, f"{type(e).__name__}: {e}" if not isinstance(e, SurpipeError) else str(e), None


def collate_images(items):
    import torch  # heavy: keeps --help torch-free

    idx = [i for i, *_ in items]
    errs = [(i, e) for i, _, e, _ in items if e is not None]
    x = None if errs else torch.stack([t for _, t, _, _ in items])
    return idx, x, errs, [size for *_, size in items]


def loader_error(e: BaseException, workers: int, timeout: float) -> SurpipeError | None:
    """The message for a DataLoader failure (a worker killed or exited, a timeout); None for other
    errors. torch reports a dead worker from its SIGCHLD handler, so this error can surface
    anywhere in the main process while the loader is alive, not only at ``next()``."""
    text = str(e)
    if not workers or not isinstance(e, RuntimeError) or "DataLoader" not in text:
        return None
    first = first_line(e)
    stalled = "timed out" in first
    why = (f"no batch arrived within --loader-timeout {timeout:g} s" if stalled
           else f"a loader worker failed: {first}")
    return SurpipeError(
        f"image loading stopped: {why}. Loader workers need shared memory (/dev/shm) and may hit "
        "file-size or process limits; rerun with --workers 0 (decode in the main process), or "
        "enlarge /dev/shm (docker: --shm-size)"
        + (", or raise --loader-timeout for very slow storage" if stalled else "")
        + "; finished blocks are kept")


class BlockFeeder:
    """Feeds preprocessed image batches for the blocks this rank will compute, in order, from one
    persistent DataLoader (workers stay up across blocks and prefetch the next block)."""

    def __init__(self, samples, store, blocks: list[int], resolution: int, batch_size: int, workers: int,
                 pin_memory: bool = False, timeout: float = 0):
        import torch  # heavy: keeps --help torch-free
        from torch.utils.data import DataLoader

        self.samples = samples
        batches = []
        for b in blocks:
            start, stop = store.block_range(b)
            for s in range(start, stop, batch_size):
                batches.append(list(range(s, min(s + batch_size, stop))))
        self.loader = DataLoader(ImageRows(samples, resolution), batch_sampler=batches, num_workers=workers,
                                 collate_fn=collate_images, pin_memory=pin_memory,
                                 persistent_workers=False, prefetch_factor=2 if workers else None,
                                 timeout=float(timeout) if workers else 0)
        self.workers, self.timeout = workers, timeout
        self.it = iter(self.loader)
        self.torch = torch

    def _next(self):
        """The next batch; a worker that died (no shared memory, a file-size limit, a signal) or
        stalled past the timeout ends the run with a message instead of an endless wait."""
        try:
            return next(self.it)
        except StopIteration:
            raise
        except RuntimeError as e:
            err = loader_error(e, self.workers, self.timeout)
            if err is None:
                raise
            raise err from None

    def rows(self, start: int, stop: int, sizes: bool = False):
        """Yield (row indices, images [B, 3, R, R]) covering exactly rows [start, stop); with ``sizes``
        also each source image's decoded (width, height)."""
        want = start
        while want < stop:
            try:
                idx, x, errs, wh = self._next()
            except StopIteration:
                raise RuntimeError(f"image loader ended before row {want}") from None
            if idx[0] != want:
                raise RuntimeError(f"image loader out of order: expected row {want}, got {idx[0]}")
            if errs:
                i, msg = errs[0]
                raise SurpipeError(
                    f"image of sample {self.samples[i].key!r} (row {i}) cannot be used: {msg}. "
                    "The dataset changed since the store was created? Fix or restore the file and rerun "
                    "(finished blocks are kept).")
            want = idx[-1] + 1
            yield (idx, x, wh) if sizes else (idx, x)

    def close(self):
        del self.it
        del self.loader
