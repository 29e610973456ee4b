"""Stage one on small SURD folders that grow: the builders the growth and sharding tests share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from helpers import png_bytes

BLOCK = 4


def _surd(make_surd, n: int, name: str, prompts: dict | None = None, order=None):
    """SURD folder with rows im0..im<n-1> (images differ by size and colour); ``prompts`` overrides
    simple prompts by row, ``order`` permutes the rows."""
    files, lines = {}, []
    for i in range(n):
        files[f"im{i}.png"] = png_bytes((60 + 3 * i, 64 + (i % 3) * 9), ((37 * i) % 256, 90 + i, 200 - 5 * i))
        simple = (prompts or {}).get(i, f"a small cube number {i}")
        lines.append({"file_name": f"im{i}.png", "text": simple, "prompt": f"{simple}, studio light, {i}"})
    if order is not None:
        lines = [lines[i] for i in order]
    return make_surd(lines, files, name=name)


def _extract(data, store, tiny_models):
    from stages.extract_llm import ExtractLLMConfig, run

    return run(ExtractLLMConfig(data=str(data), store=str(store), model=str(tiny_models / "llm"), layers=[1, 3],
                                block_rows=BLOCK, batch_size=3, progress=False))


def _encode(data, store, tiny_models):
    from stages.encode_latents import EncodeLatentsConfig, run

    return run(EncodeLatentsConfig(data=str(data), store=str(store), model=str(tiny_models / "sd"),
                                   block_rows=BLOCK, batch_size=3, workers=0, flip=True, progress=False))


def _values(store: Path) -> dict[str, np.ndarray]:
    """Every array of every group, and the row arrays, read with plain zarr."""
    root = zarr.open_group(str(store), mode="r")
    out = {name: np.asarray(root[name][:]) for name in ("keys", "prompts/simple", "prompts/complex")}
    for kind in ("llm", "clip", "vae"):
        for name in sorted(root[kind].group_keys()):
            g = root[f"{kind}/{name}"]
            for a in g.attrs["arrays"]:
                out[f"{kind}/{name}/{a}"] = np.asarray(g[a][:])
    return out
