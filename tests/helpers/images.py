"""A SURD folder of images of several sizes and long complex prompts, and plain zarr reads: shared
by the encode-latents tests (SD and SDXL)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

SIZES = [(96, 80), (64, 64), (70, 123), (128, 100), (200, 64)]


N = 10


def _write_surd(root: Path, n: int = N, tag: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        yy, xx = np.mgrid[0:h, 0:w]
        a = np.stack([(xx * 5 + i * 7) % 256, (yy * 3 + i * 11) % 256, ((xx * yy) // 7 + i) % 256], -1)
        Image.fromarray(a.astype(np.uint8)).save(root / f"img{i:03d}.png")
        # every third complex prompt is far beyond 77 tokens
        complex_ = ("masterpiece, (best quality:1.2), ultra detailed, " * (1 + 10 * (i % 3 == 2))
                    + f"portrait of subject {i}{tag}, art by someone")
        rows.append({"file_name": f"img{i:03d}.png", "text": f"a photo of thing number {i}{tag} ü", "prompt": complex_})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n",
                                         encoding="utf-8")
    return root


def _zarr(store):
    import zarr

    return zarr.open_group(str(store), mode="r")
