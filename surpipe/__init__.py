"""surpipe: SUR-adapter for Stable Diffusion, trained from a Zarr feature store.

Heavy modules (torch, diffusers, transformers) load lazily so ``import surpipe`` and
``surpipe --help`` stay fast.
"""

from surpipe.errors import SurpipeError
from surpipe.version import __version__

__all__ = ["SURAdapter", "SurpipeError", "__version__"]


def __getattr__(name: str):
    if name == "SURAdapter":
        from surpipe.adapter import SURAdapter

        return SURAdapter
    raise AttributeError(f"module 'surpipe' has no attribute {name!r}")
