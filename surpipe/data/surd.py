"""Reading SURD data: a Hugging Face imagefolder (metadata.jsonl + images) or webdataset .tar shards.

:func:`open_dataset` scans a source once, validates every row (and, by default, decodes every
image), skips bad rows with a line number and a reason (or raises at the first one with
``strict=True``), and returns a :class:`SurdDataset`: a list of good :class:`Sample` rows in
dataset order. Image bytes are read on demand (from the file, or from the tar shard by offset),
so samples are cheap to pickle into DataLoader workers.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import tarfile
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator, Literal

from surpipe.data.images import (DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageProblem, decode_rgb, open_file_window,
                                 probe)
from surpipe.errors import SurpipeError

METADATA = "metadata.jsonl"
DEFAULT_SIMPLE_FIELD = "text"
DEFAULT_COMPLEX_FIELD = "prompt"
CheckImages = Literal["full", "header", "none"]

_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]")
_SUMMARY_ROWS = 20


# --------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class Sample:
    """One good SURD row. ``simple`` is metadata ``text``; ``complex`` is metadata ``prompt``.

    The image is located by ``path`` (a file, or a .tar shard when ``offset >= 0``) and read on
    demand, so a Sample pickles cheaply into DataLoader workers.
    """

    key: str
    simple: str
    complex: str
    file_name: str
    path: str = field(default="", repr=False)
    offset: int = field(default=-1, repr=False)
    size: int = field(default=-1, repr=False)
    max_pixels: int = field(default=DEFAULT_MAX_PIXELS, repr=False)

    def image_bytes(self) -> bytes:
        """The raw encoded image bytes, exactly as stored."""
        if not self.path:
            raise SurpipeError(f"sample {self.key!r} has no image location")
        try:
            with open(self.path, "rb") as f:
                if self.offset < 0:
                    return f.read()
                f.seek(self.offset)
                data = f.read(self.size)
        except OSError as e:
            raise SurpipeError(f"sample {self.key!r}: cannot read image from {self.path}: {e}") from None
        if len(data) != self.size:
            raise SurpipeError(f"sample {self.key!r}: {self.path} ends early (shard truncated since it was scanned?)")
        return data

    def open_image(self) -> BinaryIO:
        """A seekable binary file holding just the encoded image (close it after use); reading
        it lazily lets header checks and decoders read only what they need."""
        if not self.path:
            raise SurpipeError(f"sample {self.key!r} has no image location")
        try:
            return open_file_window(self.path, self.offset, self.size)
        except EOFError:
            raise SurpipeError(f"sample {self.key!r}: {self.path} ends early (shard truncated since it was scanned?)") from None
        except OSError as e:
            raise SurpipeError(f"sample {self.key!r}: cannot read image from {self.path}: {e}") from None

    def image(self):
        """The decoded image as 8-bit RGB (``PIL.Image.Image``); SurpipeError if it is unusable."""
        with self.open_image() as fh:
            try:
                return decode_rgb(fh, max_pixels=self.max_pixels)
            except ImageProblem as e:
                raise SurpipeError(f"sample {self.key!r} ({self.file_name}): {e}") from None


# --------------------------------------------------------------------------- report


@dataclass
class ScanReport:
    """What a scan read, kept and skipped. ``skipped`` holds ``(line_or_index, where, reason)``;
    ``counts`` maps each reason category to how many rows it skipped."""

    source: str = ""
    kind: str = ""
    rows_read: int = 0
    kept: int = 0
    skipped: list[tuple[int, str, str]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def skip(self, line: int, where: str, reason: str, detail: str = "") -> None:
        self.skipped.append((line, where, f"{reason}: {detail}" if detail else reason))
        self.counts[reason] = self.counts.get(reason, 0) + 1

    def summary(self) -> str:
        unit = "line" if self.kind == "imagefolder" else "sample"
        lines = [f"{self.source} ({self.kind}): read {self.rows_read} rows, kept {self.kept}, "
                 f"skipped {len(self.skipped)}"]
        for reason, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {n:6d}  {reason}")
        if self.skipped:
            shown = self.skipped[:_SUMMARY_ROWS]
            lines.append(f"first {len(shown)} skipped rows:" if len(shown) < len(self.skipped) else "skipped rows:")
            for line, where, reason in shown:
                lines.append(f"  {unit} {line}: {where}: {reason}")
            if len(self.skipped) > len(shown):
                lines.append(f"  ... and {len(self.skipped) - len(shown)} more (see the JSON report)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "kind": self.kind,
            "rows_read": self.rows_read,
            "kept": self.kept,
            "skipped_total": len(self.skipped),
            "counts": dict(sorted(self.counts.items())),
            "skipped": [{"line": l, "where": w, "reason": r} for l, w, r in self.skipped],
        }


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
        """sha256 hex over (key, simple, complex) of every row, in order (not the images)."""
        h = hashlib.sha256()
        for s in self.samples:
            h.update(json.dumps([s.key, s.simple, s.complex], ensure_ascii=False).encode("utf-8"))
            h.update(b"\n")
        return h.hexdigest()


# --------------------------------------------------------------------------- keys


def _hash8(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]


def base_key(file_name: str) -> str:
    """The key a file_name maps to: the path without extension, other than [A-Za-z0-9_-] -> '_'."""
    stem, _ = posixpath.splitext(posixpath.normpath(file_name.replace("\\", "/")))
    key = _KEY_BAD.sub("_", stem)
    return key or "_"


class _KeyMaker:
    """Deterministic unique keys; a later name that collides gets a short hash suffix."""

    def __init__(self):
        self.used: set[str] = set()

    def __call__(self, name: str) -> str:
        key = base_key(name)
        n = 8
        while key in self.used:
            key = f"{base_key(name)}_{hashlib.sha1(name.encode('utf-8')).hexdigest()[:n]}"
            n += 4
            if n > 40:  # identical names; callers reject duplicates before asking
                key = f"{key}_{len(self.used)}"
        self.used.add(key)
        return key


# --------------------------------------------------------------------------- row validation


class _Bad(Exception):
    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Fields:
    """Which metadata fields hold the SIMPLE prompt and the COMPLEX prompt."""

    simple: str = DEFAULT_SIMPLE_FIELD
    complex: str = DEFAULT_COMPLEX_FIELD

    def roles(self) -> list[tuple[str, str]]:
        return [(self.simple, "the simple prompt; choose another with --simple-field"),
                (self.complex, "the complex prompt; choose another with --complex-field")]


# Characters that show nothing: controls (NUL ...), format characters (zero-width space and
# joiners, BOM, bidi marks, tags), surrogates, separators and combining marks; plus the few
# letters/symbols that render blank (Hangul fillers, braille blank). A prompt made only of these
# is empty: the text encoders would see no words.
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zs", "Zl", "Zp", "Mn", "Me", "Mc"})
_INVISIBLE_CHARS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def is_blank_prompt(text: str) -> bool:
    """True when ``text`` has no visible character (only whitespace, zero-width, control or
    combining characters), so it carries no prompt."""
    return not any(unicodedata.category(c) not in _INVISIBLE_CATEGORIES and c not in _INVISIBLE_CHARS
                   for c in text)


def _lone_surrogate(text: str) -> int | None:
    """Index of the first character UTF-8 cannot encode (a lone surrogate such as a JSON
    ``"\\ud800"``), or None. Such a string breaks every later encode (tokenizers, hashing, JSON)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def _printable(text: str) -> str:
    """``text`` with anything UTF-8 cannot encode backslash-escaped (for reports and messages)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _check_fields(obj, fields: Fields, file_name: bool) -> tuple[str, str]:
    if not isinstance(obj, dict):
        raise _Bad("not a JSON object", f"got {type(obj).__name__}")
    roles = ([("file_name", "")] if file_name else []) + fields.roles()
    for f, role in roles:
        if f not in obj:
            raise _Bad(f"missing field '{f}'", role)
    for f, _ in roles:
        if not isinstance(obj[f], str):
            raise _Bad(f"field '{f}' is not a string", f"got {type(obj[f]).__name__}")
    for f, _ in roles:
        at = _lone_surrogate(obj[f])
        if at is not None:
            raise _Bad("invalid Unicode", f"field '{f}' holds a lone surrogate {obj[f][at]!r} at character {at}")
    for f, role in fields.roles():
        if not obj[f].strip():
            raise _Bad(f"empty prompt '{f}'", role.split(";")[0])
        if is_blank_prompt(obj[f]):
            raise _Bad(f"empty prompt '{f}'", f"{role.split(';')[0]}: only invisible characters "
                       f"(zero-width, control or combining) {obj[f][:20]!r}")
    return obj[fields.simple], obj[fields.complex]


def _check_file_name(root_real: str, name: str) -> str:
    """Resolve a metadata file_name inside the folder; return the real path. Never opens it."""
    if not name.strip():
        raise _Bad("empty file_name")
    if "\x00" in name:
        raise _Bad("file_name outside the folder", "contains a NUL byte")
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm) or os.path.isabs(name):
        raise _Bad("file_name outside the folder", f"absolute path {name!r}")
    if ".." in norm.split("/"):
        raise _Bad("file_name outside the folder", f"'..' in {name!r}")
    full = os.path.join(root_real, *[p for p in norm.split("/") if p not in ("", ".")])
    real = os.path.realpath(full)
    if os.path.commonpath([real, root_real]) != root_real:
        raise _Bad("file_name outside the folder", f"{name!r} is a symlink to {real}")
    if not os.path.exists(real):
        raise _Bad("missing file", name)
    if not os.path.isfile(real):
        raise _Bad("not a file", name)
    return real


# --------------------------------------------------------------------------- scanning


@dataclass
class _Row:
    line: int
    where: str
    sample: Sample | None = None
    bad: _Bad | None = None


def _scan_imagefolder(root: str, report: ScanReport, max_pixels: int, fields: Fields) -> list[_Row]:
    root_real = os.path.realpath(root)
    meta = os.path.join(root, METADATA)
    try:
        with open(meta, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise SurpipeError(f"cannot read {meta}: {e}") from None
    rows: list[_Row] = []
    seen: dict[str, int] = {}
    keys = _KeyMaker()
    for lineno, bline in enumerate(raw.split(b"\n"), start=1):
        if lineno == 1 and bline.startswith(b"\xef\xbb\xbf"):
            bline = bline[3:]  # UTF-8 byte-order mark
        if not bline.strip():
            continue
        report.rows_read += 1
        row = _Row(lineno, METADATA)
        rows.append(row)
        try:
            try:
                text = bline.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _Bad("invalid UTF-8", str(e)) from None
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise _Bad("malformed JSON", str(e)) from None
            if isinstance(obj, dict) and isinstance(obj.get("file_name"), str):
                row.where = _printable(obj["file_name"])
            simple, complex_ = _check_fields(obj, fields, file_name=True)
            name = obj["file_name"]
            real = _check_file_name(root_real, name)
            dup = posixpath.normpath(name.replace("\\", "/"))
            if dup in seen:
                raise _Bad("duplicate file_name", f"first on line {seen[dup]}")
            seen[dup] = lineno
            row.sample = Sample(keys(name), simple, complex_, name, real, -1, -1, max_pixels)
        except _Bad as b:
            row.bad = b
    return rows


def _split_member(name: str) -> tuple[str, str] | None:
    """webdataset's rule: key is the path up to the first dot of the base name."""
    m = re.match(r"^((?:.*/|)[^./]+)\.([^/]*)$", name)
    return (m.group(1), m.group(2)) if m else None


def _tar_end_problem(fh: BinaryIO, end: int, size: int) -> tuple[str, str] | None:
    """(reason, detail) when a tar whose members end at byte ``end`` is incomplete; None when whole.

    A whole tar ends with its end-of-archive marker, two 512-byte zero blocks, after the last
    member. Python's tarfile stops quietly at a missing marker, a cut header and a damaged header
    alike, so without this check a cut shard silently loses every sample after the cut.
    """
    if size < end:
        return "truncated shard", (f"the file was cut at byte {size}, inside a member; any samples after "
                                   "that point are lost")
    fh.seek(end)
    tail = fh.read(1024)
    if len(tail) < 1024 and not any(tail):
        return "truncated shard", (f"no end-of-archive marker after the last member: the file was cut at byte "
                                   f"{size}, and any samples after that point are lost")
    if any(tail):
        at = end if any(tail[:512]) else end + 512
        if len(tail) < 1024 and at + 512 > size:
            return "truncated shard", (f"the file was cut at byte {size}, inside a member header; any samples "
                                       "after that point are lost")
        return "damaged shard", f"unreadable tar header at byte {at}: the samples from there on cannot be read"
    return None


def _scan_shards(shards: list[str], report: ScanReport, max_pixels: int, fields: Fields) -> list[_Row]:
    rows: list[_Row] = []
    keys = _KeyMaker()
    seen: set[str] = set()
    index = 0
    for shard in shards:
        sname = _printable(os.path.basename(shard))
        # (webdataset key, {extension: member}, why the sample is cut off by the end of the file)
        groups: list[tuple[str, dict[str, tarfile.TarInfo], str]] = []
        problem = None
        try:
            fh = open(shard, "rb")
        except OSError as e:
            report.skip(index, sname, "unreadable shard", str(e))
            continue
        with fh:
            size = os.fstat(fh.fileno()).st_size
            end = 0
            try:
                with tarfile.open(fileobj=fh, mode="r:") as tf:
                    for m in tf:  # streams headers only
                        end = tf.offset  # where the next header starts: the end of this member
                        if not m.isfile():
                            continue
                        split = _split_member(m.name)
                        if split is None:
                            continue
                        k, ext = split
                        if not groups or groups[-1][0] != k:
                            groups.append((k, {}, ""))
                        groups[-1][1].setdefault(ext.lower(), m)
                        if m.offset_data + m.size > size:
                            groups[-1] = (k, groups[-1][1], f"member {_printable(m.name)!r} is cut off by the end "
                                                            f"of the file at byte {size}")
                    end = tf.offset
                problem = _tar_end_problem(fh, end, size)
                if problem is not None and groups and not groups[-1][2]:
                    k, members, _ = groups[-1]
                    if "json" not in members or not any(e in IMAGE_EXTENSIONS for e in members):
                        where = "ends" if problem[0] == "truncated shard" else "is damaged"
                        groups[-1] = (k, members, f"the shard {where} inside this sample (members of it are missing)")
            except (tarfile.TarError, OSError, EOFError) as e:
                if not groups:
                    report.skip(index, sname, "unreadable shard", f"not a readable uncompressed .tar shard: {e}")
                    continue
                if any(g[2] for g in groups):
                    problem = _tar_end_problem(fh, size + 1, size)
                else:
                    problem = ("damaged shard", f"unreadable after {len(groups)} samples: {e}")
            for wkey, members, cut in groups:
                report.rows_read += 1
                row = _Row(index, f"{sname}:{_printable(wkey)}")
                rows.append(row)
                index += 1
                try:
                    if _lone_surrogate(wkey) is not None:
                        raise _Bad("invalid UTF-8 member name", _printable(wkey))
                    if cut:
                        raise _Bad("truncated shard", cut)
                    jm = members.get("json")
                    if jm is None:
                        raise _Bad("missing .json member")
                    img_ext = next((e for e in members if e in IMAGE_EXTENSIONS), None)
                    if img_ext is None:
                        raise _Bad("missing image member")
                    im = members[img_ext]
                    fh.seek(jm.offset_data)
                    try:
                        obj = json.loads(fh.read(jm.size).decode("utf-8"))
                    except (UnicodeDecodeError, json.JSONDecodeError) as e:
                        raise _Bad("malformed JSON", str(e)) from None
                    simple, complex_ = _check_fields(obj, fields, file_name=False)
                    if wkey in seen:
                        raise _Bad("duplicate key", _printable(wkey))
                    seen.add(wkey)
                    row.sample = Sample(keys(wkey), simple, complex_, im.name, os.path.abspath(shard),
                                        im.offset_data, im.size, max_pixels)
                except _Bad as b:
                    row.bad = b
            if problem is not None:
                report.skip(index, sname, *problem)
    return rows


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
        from braceexpand import braceexpand

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


def open_dataset(
    path: str,
    *,
    strict: bool = False,
    check_images: CheckImages = "full",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    simple_field: str = DEFAULT_SIMPLE_FIELD,
    complex_field: str = DEFAULT_COMPLEX_FIELD,
) -> SurdDataset:
    """Scan a SURD imagefolder, a folder of .tar shards, one .tar, or a brace pattern.

    Bad rows are skipped and counted in ``dataset.report`` (with ``strict=True`` the first bad row,
    in dataset order, raises SurpipeError). ``check_images``: "full" decodes every image,
    "header" reads headers only (format, size, pixel limit), "none" skips image checks.
    ``simple_field`` / ``complex_field``: the metadata (or shard .json) fields holding the SIMPLE
    and the COMPLEX prompt. A shard that is cut short or damaged is reported like a bad row.
    """
    if check_images not in ("full", "header", "none"):
        raise SurpipeError(f"check_images must be 'full', 'header' or 'none', not {check_images!r}")
    if max_pixels < 1:
        raise SurpipeError(f"max_pixels must be positive, not {max_pixels}")
    for flag, name in (("--simple-field", simple_field), ("--complex-field", complex_field)):
        if not isinstance(name, str) or not name.strip():
            raise SurpipeError(f"{flag} must name a metadata field, not {name!r}")
    fields = Fields(simple_field, complex_field)
    kind, source, shards = _resolve(os.fspath(path))
    report = ScanReport(source=str(source), kind=kind)
    if kind == "imagefolder":
        rows = _scan_imagefolder(source, report, max_pixels, fields)
    else:
        rows = _scan_shards(shards, report, max_pixels, fields)
    unit = "line" if kind == "imagefolder" else "sample"

    def fail(row: _Row, reason: str):
        raise SurpipeError(f"{source}: {unit} {row.line} ({row.where}): {reason}")

    if strict:
        if report.skipped:  # a truncated or unreadable shard
            line, where, reason = report.skipped[0]
            raise SurpipeError(f"{source}: {where}: {reason}")
        first_bad = next((r for r in rows if r.bad is not None), None)
        if first_bad is not None:  # only images before it need checking
            rows = rows[: rows.index(first_bad) + 1]

    candidates = [r for r in rows if r.sample is not None]
    results: Iterator[ImageProblem | None]
    pool = None
    bar = None
    if check_images != "none" and candidates:
        from surpipe.progress import progress_bar

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
                    row.bad = _Bad(problem.reason, problem.detail)
            if row.bad is not None:
                if strict:
                    fail(row, f"{row.bad.reason}: {row.bad.detail}" if row.bad.detail else row.bad.reason)
                report.skip(row.line, row.where, row.bad.reason, row.bad.detail)
            else:
                samples.append(row.sample)
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    report.kept = len(samples)
    report.skipped.sort(key=lambda t: t[0])  # shard-level problems among the rows, in dataset order
    if not samples:
        raise SurpipeError(f"{source}: no usable rows (read {report.rows_read}, skipped {len(report.skipped)})",
                           problems=[f"{unit} {l}: {w}: {r}" for l, w, r in report.skipped[:10]])
    return SurdDataset(str(source), samples, report)
