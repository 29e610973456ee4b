"""Writing a SURD dataset as webdataset .tar shards (read back by :func:`surpipe.data.open_dataset`).

Per sample: ``<key>.<ext>`` holds the original image bytes with the original extension, and
``<key>.json`` holds ``{"file_name", "text", "prompt"}``. Samples go in dataset order, so row
order and the dataset fingerprint survive packing. Members carry mtime 0 and fixed owners, so the
same input gives byte-identical shards.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import tempfile

from surpipe.data.images import FORMAT_EXTENSIONS, IMAGE_EXTENSIONS, ImageProblem, probe
from surpipe.data.surd import Sample, SurdDataset
from surpipe.errors import SurpipeError

SHARD_PATTERN = "shard-{:06d}.tar"


def existing_shards(out: str) -> list[str]:
    if not os.path.isdir(out):
        return []
    return sorted(n for n in os.listdir(out) if n.startswith("shard-") and n.endswith(".tar"))


def _image_ext(sample: Sample, data: bytes) -> str:
    ext = posixpath.splitext(sample.file_name)[1].lstrip(".").lower()
    if ext in IMAGE_EXTENSIONS:
        return ext
    try:
        fmt = probe(data, max_pixels=sample.max_pixels, full=False).format
    except ImageProblem:
        fmt = None
    return FORMAT_EXTENSIONS.get(fmt or "", "png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "jpg")


def write_shards(dataset: SurdDataset, out: str, *, samples_per_shard: int = 1000,
                 overwrite: bool = False, progress: bool = True) -> list[str]:
    """Write ``dataset`` into ``out/shard-000000.tar``, ... and return the shard paths.

    Shards are written into a temporary folder inside ``out`` and moved into place only when all
    are complete, so an interrupted pack never leaves shards that look finished.
    """
    import webdataset as wds
    from surpipe.progress import progress_bar

    if samples_per_shard < 1:
        raise SurpipeError(f"samples_per_shard must be at least 1, not {samples_per_shard}")
    os.makedirs(out, exist_ok=True)
    old = existing_shards(out)
    if old and not overwrite:
        raise SurpipeError(f"{out} already holds {len(old)} shards ({old[0]} ...); "
                           "pass --overwrite to replace them, or choose another folder")
    tmp = tempfile.mkdtemp(prefix=".pack-tmp-", dir=out)
    names: list[str] = []
    try:
        writer = None
        bar = progress_bar(total=len(dataset), desc="packing", unit="sample", disable=not progress,
                           leave=False)
        for i, s in enumerate(dataset.samples):
            if i % samples_per_shard == 0:
                if writer is not None:
                    writer.close()
                names.append(SHARD_PATTERN.format(len(names)))
                writer = wds.TarWriter(os.path.join(tmp, names[-1]), mtime=0, user="surpipe",
                                       group="surpipe", format="PAX_FORMAT")
            data = s.image_bytes()
            meta = {"file_name": s.file_name, "text": s.simple, "prompt": s.complex}
            writer.write({"__key__": s.key, _image_ext(s, data): data,
                          "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})
            bar.update(1)
        if writer is not None:
            writer.close()
        bar.close()
        for n in old:
            os.remove(os.path.join(out, n))
        for n in names:
            os.replace(os.path.join(tmp, n), os.path.join(out, n))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [os.path.join(out, n) for n in names]
