"""Progress bars that follow the terminal.

On a terminal: a tqdm bar (redrawn in place, with rate and ETA). When stderr is not a terminal
(a log file, CI, a batch job): one plain line every ``SURPIPE_PROGRESS_INTERVAL`` seconds (default
10) and one at the end, so a log holds a few readable lines instead of hundreds of
carriage-return redraws.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Optional


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("SURPIPE_PROGRESS_INTERVAL", "10")))
    except ValueError:
        return 10.0


class _PlainProgress:
    """The subset of tqdm's interface surpipe uses, printing whole lines instead of redraws."""

    def __init__(self, total: Optional[int] = None, initial: int = 0, desc: Optional[str] = None,
                 unit: str = "it", disable: bool = False, file=None, **_ignored: Any):
        self.total, self.n, self.desc, self.unit, self.disable = total, initial, desc or "", unit, disable
        self._initial = initial
        self._file = file or sys.stderr
        self._start = self._last = time.monotonic()
        self._postfix = ""
        self._closed = False

    def _line(self) -> str:
        from tqdm import tqdm

        elapsed = time.monotonic() - self._start
        done = self.n - self._initial
        rate = done / elapsed if elapsed > 0 and done > 0 else None
        line = tqdm.format_meter(self.n, self.total, elapsed, ncols=0, prefix=self.desc, unit=self.unit,
                                 rate=rate, initial=self._initial)
        return line + (f" {self._postfix}" if self._postfix else "")

    def _emit(self) -> None:
        print(self._line(), file=self._file, flush=True)
        self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.disable and time.monotonic() - self._last >= _interval():
            self._emit()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self._postfix = s

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = dict(ordered_dict or {}, **kwargs)
        self._postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: Optional[str] = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        pass

    def write(self, s: str) -> None:
        print(s, file=self._file, flush=True)

    def close(self) -> None:
        if not self._closed and not self.disable and self.n > self._initial:
            self._emit()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress_bar(*, total: Optional[int] = None, desc: Optional[str] = None, unit: str = "it",
                 disable: bool = False, initial: int = 0, leave: bool = True):
    """A progress bar on a terminal, plain periodic lines otherwise (same interface either way)."""
    stream = sys.stderr
    if hasattr(stream, "isatty") and stream.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, disable=disable, initial=initial, leave=leave,
                    dynamic_ncols=True)
    return _PlainProgress(total=total, desc=desc, unit=unit, disable=disable, initial=initial)
