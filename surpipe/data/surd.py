"""Reading SURD data: a Hugging Face imagefolder (metadata.jsonl + images) or webdataset .tar shards.

:func:`open_dataset` scans a source once, validates every row (and, by default, decodes every
image), skips bad rows with a line number and a reason (or raises at the first one with
``strict=True``), and returns a :class:`SurdDataset`: a list of good :class:`Sample` rows in
dataset order. Image bytes are read on demand (from the file, or from the tar shard by offset),
so samples are cheap to pickle into DataLoader workers.

Rows and their checks live in :mod:`surpipe.data.rows`, the scanners in :mod:`surpipe.data.scan`.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Literal

from surpipe.data.images import DEFAULT_MAX_PIXELS, ImageProblem, probe
from surpipe.data.rows import (DEFAULT_CATEGORY_FIELD, DEFAULT_COMPLEX_FIELD, DEFAULT_SIMPLE_FIELD, METADATA, BadRow,
                               Fields, Row, Sample, ScanReport, base_key, is_blank_prompt)
from surpipe.data.scan import scan_imagefolder, scan_shards
from surpipe.errors import SurpipeError
from surpipe.progress import progress_bar

__all__ = ["DEFAULT_CATEGORY_FIELD", "DEFAULT_COMPLEX_FIELD", "DEFAULT_SIMPLE_FIELD", "CheckImages", "Sample",
           "ScanReport", "SurdDataset", "base_key", "is_blank_prompt", "open_dataset"]

CheckImages = Literal["full", "header", "none"]


# --------------------------------------------------------------------------- dataset


class SurdDataset:
    """A scanned SURD dataset: a list of good Samples in dataset order, plus the scan report."""

    def __init__(self, source: str, samples: list[Sample], report: ScanReport):
        self.source = source
        self.samples = samples
        self.report = report

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __repr__(self) -> str:
        return f"SurdDataset({self.source!r}, {len(self)} samples)"

    def fingerprint(self) -> str:
        """sha256 hex over (key, simple, complex) of every row, in order (not the images, not the
        categories: stores made before categories were kept must keep matching)."""
        h = hashlib.sha256()
        for s in self.samples:
            h.update(json.dumps([s.key, s.simple, s.complex], ensure_ascii=False).encode("utf-8"))
            h.update(b"\n")
        return h.hexdigest()


def _check_one(sample: Sample, mode: str) -> ImageProblem | None:
    try:
        fh = sample.open_image()  # lazy: a header check reads only the header's bytes
    except SurpipeError as e:
        return ImageProblem("unreadable file", str(e))
    with fh:
        try:
            probe(fh, max_pixels=sample.max_pixels, full=(mode == "full"))
        except ImageProblem as e:
            return e
    return None


def _resolve(path: str) -> tuple[str, str, list[str]]:
    """-> (kind, root_or_source, shard list)."""
    p = os.fspath(path)
    if "{" in p and "}" in p and not os.path.exists(p):
        from braceexpand import braceexpand  # webdataset's dependency, not ours: only patterns need it

        shards = list(braceexpand(p))
        missing = [s for s in shards if not os.path.isfile(s)]
        if missing:
            raise SurpipeError(f"{len(missing)} of {len(shards)} shards of {p} do not exist:",
                               problems=missing[:10] + ([f"... and {len(missing) - 10} more"] if len(missing) > 10 else []))
        return "webdataset", p, shards
    if not os.path.exists(p):
        raise SurpipeError(f"no such file or folder: {p}")
    if os.path.isdir(p):
        if os.path.isfile(os.path.join(p, METADATA)):
            return "imagefolder", p, []
        shards = sorted(os.path.join(p, n) for n in os.listdir(p) if n.endswith(".tar"))
        if shards:
            return "webdataset", p, shards
        raise SurpipeError(f"{p} is neither a SURD imagefolder (no {METADATA}) nor a folder of .tar shards")
    if p.endswith(".tar"):
        return "webdataset", p, [p]
    if os.path.basename(p) == METADATA:
        return "imagefolder", os.path.dirname(p) or ".", []
    raise SurpipeError(f"{p} is not a SURD imagefolder, a .tar shard, a folder of shards or a brace pattern")


def _check_arguments(check_images: str, max_pixels: int, simple_field: str, complex_field: str,
                     category_field: str) -> Fields:
    """Refuse bad open_dataset arguments; returns the metadata fields to read."""
    if check_images not in ("full", "header", "none"):
        raise SurpipeError(f"check_images must be 'full', 'header' or 'none', not {check_images!r}")
    if max_pixels < 1:
        raise SurpipeError(f"max_pixels must be positive, not {max_pixels}")
    for flag, name in (("--simple-field", simple_field), ("--complex-field", complex_field),
                       ("--category-field", category_field)):
        if not isinstance(name, str) or not name.strip():
            raise SurpipeError(f"{flag} must name a metadata field, not {name!r}")
    return Fields(simple_field, complex_field, category_field)


def _usable_samples(rows: list[Row], report: ScanReport, check_images: str, progress: bool, strict: bool,
                    where: str) -> list[Sample]:
    """The samples of the good rows, their images checked in threads (``check_images``); bad rows are
    counted skips (with ``strict`` the first raises, ``where`` starting its message)."""
    candidates = [r for r in rows if r.sample is not None]
    results: Iterator[ImageProblem | None]
    pool = None
    bar = None
    if check_images != "none" and candidates:
        pool = ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1)))
        results = pool.map(lambda r: _check_one(r.sample, check_images), candidates)
        bar = progress_bar(total=len(candidates), desc=f"checking images ({check_images})", unit="img",
                           disable=not progress, leave=False)
    else:
        results = iter([None] * len(candidates))
    samples: list[Sample] = []
    try:
        for row in rows:
            if row.sample is not None:
                problem = next(results)
                if bar is not None:
                    bar.update(1)
                if problem is not None:
                    row.bad = BadRow(problem.reason, problem.detail)
            if row.bad is not None:
                if strict:
                    reason = f"{row.bad.reason}: {row.bad.detail}" if row.bad.detail else row.bad.reason
                    raise SurpipeError(f"{where} {row.line} ({row.where}): {reason}")
                report.skip(row.line, row.where, row.bad.reason, row.bad.detail)
            else:
                samples.append(row.sample)
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return samples


def open_dataset(
    path: str,
    *,
    strict: bool = False,
    check_images: CheckImages = "full",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    simple_field: str = DEFAULT_SIMPLE_FIELD,
    complex_field: str = DEFAULT_COMPLEX_FIELD,
    category_field: str = DEFAULT_CATEGORY_FIELD,
) -> SurdDataset:
    """Scan a SURD imagefolder, a folder of .tar shards, one .tar, or a brace pattern.

    Bad rows are skipped and counted in ``dataset.report`` (with ``strict=True`` the first bad row,
    in dataset order, raises SurpipeError). ``check_images``: "full" decodes every image,
    "header" reads headers only (format, size, pixel limit), "none" skips image checks.
    ``simple_field`` / ``complex_field``: the metadata (or shard .json) fields holding the SIMPLE
    and the COMPLEX prompt. ``category_field``: the optional field holding each row's category
    label (``Sample.category``; missing, null or blank gives None, never a bad row). A shard that
    is cut short or damaged is reported like a bad row.
    """
    fields = _check_arguments(check_images, max_pixels, simple_field, complex_field, category_field)
    kind, source, shards = _resolve(os.fspath(path))
    report = ScanReport(source=str(source), kind=kind)
    if kind == "imagefolder":
        rows = scan_imagefolder(source, report, max_pixels, fields)
    else:
        rows = scan_shards(shards, report, max_pixels, fields)
    unit = "line" if kind == "imagefolder" else "sample"
    if strict:
        if report.skipped:  # a truncated or unreadable shard
            line, where, reason = report.skipped[0]
            raise SurpipeError(f"{source}: {where}: {reason}")
        first_bad = next((r for r in rows if r.bad is not None), None)
        if first_bad is not None:  # only images before it need checking
            rows = rows[: rows.index(first_bad) + 1]
    samples = _usable_samples(rows, report, check_images, progress, strict, f"{source}: {unit}")
    report.kept = len(samples)
    report.skipped.sort(key=lambda t: t[0])  # shard-level problems among the rows, in dataset order
    if not samples:
        raise SurpipeError(f"{source}: no usable rows (read {report.rows_read}, skipped {len(report.skipped)})",
                           problems=[f"{unit} {l}: {w}: {r}" for l, w, r in report.skipped[:10]])
    return SurdDataset(str(source), samples, report)
