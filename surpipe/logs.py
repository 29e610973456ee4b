"""Messages and third-party noise: one home for both.

surpipe's own messages go through the ``surpipe`` logger (plain ``surpipe: ...`` lines on stderr,
from rank 0 only under torchrun/accelerate). Known third-party noise (bitsandbytes' optional-kernel
notices, transformers/diffusers info and deprecation chatter, loading bars in logs) is hidden
unless ``--verbose``; real errors still surface.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

_NOISY_LOGGERS = ("bitsandbytes", "transformers", "diffusers", "accelerate", "huggingface_hub", "torch.distributed")

# (message regex, category) of warnings users cannot act on.
_NOISY_WARNINGS = (
    (r".*torch_dtype.*deprecated.*", None),
    (r".*`torch_dtype` is deprecated.*", None),
    (r".*torchvision.*", None),
    (r".*TypedStorage is deprecated.*", None),
    (r".*upcast_vae.*", None),
    (r".*weights_only.*", FutureWarning),
)

_configured = False


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class _RankZero(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _rank() == 0 or record.levelno >= logging.WARNING


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at each message, not the stream of the moment the handler
    was made: a redirected or replaced stderr (pytest's capture, ``redirect_stderr``) is followed,
    and a closed one is never written to."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def get_logger() -> logging.Logger:
    """The ``surpipe`` logger (configured by :func:`setup_logging`, or a plain stderr handler)."""
    log = logging.getLogger("surpipe")
    if not log.handlers:
        h = _Stderr()
        h.setFormatter(logging.Formatter("surpipe: %(message)s"))
        h.addFilter(_RankZero())
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


def setup_logging(verbose: bool = False) -> None:
    """Configure surpipe's logger and hide known third-party noise unless ``verbose``."""
    global _configured
    get_logger()
    os.environ["SURPIPE_VERBOSE"] = "1" if verbose else "0"
    if verbose:
        return
    # Set before the libraries are imported: they read these at import time.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        # hub download / weight-loading bars redraw with carriage returns: noise in a log file
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for msg, cat in _NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=msg, category=cat or Warning)
    _configured = True


def verbose() -> bool:
    """Whether ``--verbose`` was given."""
    return os.environ.get("SURPIPE_VERBOSE") == "1"
