"""One SURD row and its checks: the :class:`Sample` a good row becomes, the :class:`ScanReport`
that counts bad ones, keys, the metadata field mapping (which field holds which prompt) and the
prompt and ``file_name`` checks every reader applies."""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import unicodedata
from dataclasses import dataclass, field
from typing import BinaryIO

from surpipe.data.images import DEFAULT_MAX_PIXELS, ImageProblem, decode_rgb, open_file_window
from surpipe.errors import SurpipeError

METADATA = "metadata.jsonl"
DEFAULT_SIMPLE_FIELD = "text"
DEFAULT_COMPLEX_FIELD = "prompt"
DEFAULT_CATEGORY_FIELD = "category"

_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]")
_SUMMARY_ROWS = 20


# --------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class Sample:
    """One good SURD row. ``simple`` is metadata ``text``; ``complex`` is metadata ``prompt``;
    ``category`` is metadata ``category`` (an optional label such as ``"counting"``, or None).

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
    # last, so that positional construction of the fields above keeps working
    category: str | None = None

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


# --------------------------------------------------------------------------- keys


def base_key(file_name: str) -> str:
    """The key a file_name maps to: the path without extension, other than [A-Za-z0-9_-] -> '_'."""
    stem, _ = posixpath.splitext(posixpath.normpath(file_name.replace("\\", "/")))
    key = _KEY_BAD.sub("_", stem)
    return key or "_"


class KeyMaker:
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


class BadRow(Exception):
    """Why a row is skipped: a reason category (counted in the report) and a detail."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Fields:
    """Which metadata fields hold the SIMPLE prompt, the COMPLEX prompt and the optional category."""

    simple: str = DEFAULT_SIMPLE_FIELD
    complex: str = DEFAULT_COMPLEX_FIELD
    category: str = DEFAULT_CATEGORY_FIELD

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


def lone_surrogate(text: str) -> int | None:
    """Index of the first character UTF-8 cannot encode (a lone surrogate such as a JSON
    ``"\\ud800"``), or None. Such a string breaks every later encode (tokenizers, hashing, JSON)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def printable(text: str) -> str:
    """``text`` with anything UTF-8 cannot encode backslash-escaped (for reports and messages)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def check_fields(obj, fields: Fields, file_name: bool) -> tuple[str, str]:
    if not isinstance(obj, dict):
        raise BadRow("not a JSON object", f"got {type(obj).__name__}")
    roles = ([("file_name", "")] if file_name else []) + fields.roles()
    for f, role in roles:
        if f not in obj:
            raise BadRow(f"missing field '{f}'", role)
    for f, _ in roles:
        if not isinstance(obj[f], str):
            raise BadRow(f"field '{f}' is not a string", f"got {type(obj[f]).__name__}")
    for f, _ in roles:
        at = lone_surrogate(obj[f])
        if at is not None:
            raise BadRow("invalid Unicode", f"field '{f}' holds a lone surrogate {obj[f][at]!r} at character {at}")
    for f, role in fields.roles():
        if not obj[f].strip():
            raise BadRow(f"empty prompt '{f}'", role.split(";")[0])
        if is_blank_prompt(obj[f]):
            raise BadRow(f"empty prompt '{f}'", f"{role.split(';')[0]}: only invisible characters "
                       f"(zero-width, control or combining) {obj[f][:20]!r}")
    return obj[fields.simple], obj[fields.complex]


def read_category(obj: dict, fields: Fields) -> str | None:
    """The row's optional category label: a string (stripped), a number or bool as text; None
    when the field is missing, null, blank, not valid Unicode or anything else (a list, an
    object). Never makes a row bad: categories only group evaluation numbers."""
    v = obj.get(fields.category)
    if isinstance(v, bool):
        v = "true" if v else "false"  # as JSON spells it
    elif isinstance(v, (int, float)):
        v = str(v)
    if not isinstance(v, str) or lone_surrogate(v) is not None or is_blank_prompt(v):
        return None
    return v.strip()


def check_file_name(root_real: str, name: str) -> str:
    """Resolve a metadata file_name inside the folder; return the real path. Never opens it."""
    if not name.strip():
        raise BadRow("empty file_name")
    if "\x00" in name:
        raise BadRow("file_name outside the folder", "contains a NUL byte")
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm) or os.path.isabs(name):
        raise BadRow("file_name outside the folder", f"absolute path {name!r}")
    if ".." in norm.split("/"):
        raise BadRow("file_name outside the folder", f"'..' in {name!r}")
    full = os.path.join(root_real, *[p for p in norm.split("/") if p not in ("", ".")])
    real = os.path.realpath(full)
    if os.path.commonpath([real, root_real]) != root_real:
        raise BadRow("file_name outside the folder", f"{name!r} is a symlink to {real}")
    if not os.path.exists(real):
        raise BadRow("missing file", name)
    if not os.path.isfile(real):
        raise BadRow("not a file", name)
    return real


@dataclass
class Row:
    """A scanned row: where it is (line or sample index, file or shard member) and either the good
    ``sample`` or why it is ``bad``."""

    line: int
    where: str
    sample: Sample | None = None
    bad: BadRow | None = None
