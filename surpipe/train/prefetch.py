"""The training batches one step ahead on the device.

The train loop queues a step's kernels and goes on without waiting for them (it reads the device
only at its sync points: docs/reliability.md). While the GPU runs that step, :class:`DevicePrefetcher`
reads the next batch from the store and starts its copy to the device from pinned memory, on a side
CUDA stream, so the copy overlaps the step instead of waiting behind it. Only what a batch holds is
read ahead; the random draws (flips, latent noise, timesteps) are made when the batch is used, in
the same order as without read-ahead, so losses, checkpoints and resume are unchanged.
"""

from __future__ import annotations

from typing import Callable, Iterator, NamedTuple


class Fetched(NamedTuple):
    """One batch as ``stage`` returned it, and the stream's position just after it (what a
    checkpoint written after this batch's step records)."""

    staged: dict
    position: dict


class DevicePrefetcher:
    """Batches of a :class:`surpipe.train.data.SampleStream`, each passed through ``stage`` (which
    starts its copy to ``device``), at most one ahead of the one in use.

    ``next()`` hands over the batch read ahead (or reads one); ``prefetch()`` reads the next one
    now, to overlap the step just queued. A read that fails ahead of its turn is raised when its
    batch is asked for, so the step before it completes as it would without read-ahead.
    """

    def __init__(self, stream, stage: Callable[[dict], dict], device):
        import torch  # heavy

        self.stream, self._stage, self.device = stream, stage, torch.device(device)
        self._it: Iterator[dict] = iter(stream)
        self._side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._next = None  # a Fetched, or the exception its read raised

    def prefetch(self) -> None:
        """Read the next batch and start its copy (a no-op when one is already waiting)."""
        if self._next is not None:
            return
        try:
            batch = next(self._it)
            position = self.stream.position.to_dict()  # after the batch: the stream replaces, never mutates it
            if self._side is None:
                staged = self._stage(batch)
            else:
                import torch

                with torch.cuda.stream(self._side):
                    staged = self._stage(batch)
            self._next = Fetched(staged, position)
        except Exception as e:  # raised in its turn (__next__)
            self._next = e

    def __iter__(self) -> "DevicePrefetcher":
        return self

    def __next__(self) -> Fetched:
        self.prefetch()
        got, self._next = self._next, None
        if isinstance(got, BaseException):
            raise got
        if self._side is not None:
            import torch

            # the step's stream waits for the copies, and the copied tensors' memory is not reused
            # before the step's kernels that read it have run
            main = torch.cuda.current_stream(self.device)
            main.wait_stream(self._side)
            for t in got.staged.values():
                if isinstance(t, torch.Tensor) and t.is_cuda:
                    t.record_stream(main)
        return got
