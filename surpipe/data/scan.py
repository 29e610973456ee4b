"""Scanning a SURD source into rows without decoding images: an imagefolder's ``metadata.jsonl``
(line by line) or webdataset ``.tar`` shards (member headers streamed; a cut or damaged shard is
reported, never silently shortened)."""

from __future__ import annotations

import json
import os
import posixpath
import re
import tarfile
from typing import BinaryIO

from surpipe.data.images import IMAGE_EXTENSIONS
from surpipe.data.rows import (METADATA, BadRow, Fields, KeyMaker, Row, Sample, ScanReport, check_fields,
                               check_file_name, lone_surrogate, printable, read_category)
from surpipe.errors import SurpipeError


def scan_imagefolder(root: str, report: ScanReport, max_pixels: int, fields: Fields) -> list[Row]:
    root_real = os.path.realpath(root)
    meta = os.path.join(root, METADATA)
    try:
        with open(meta, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise SurpipeError(f"cannot read {meta}: {e}") from None
    rows: list[Row] = []
    seen: dict[str, int] = {}
    keys = KeyMaker()
    for lineno, bline in enumerate(raw.split(b"\n"), start=1):
        if lineno == 1 and bline.startswith(b"\xef\xbb\xbf"):
            bline = bline[3:]  # UTF-8 byte-order mark
        if not bline.strip():
            continue
        report.rows_read += 1
        row = Row(lineno, METADATA)
        rows.append(row)
        try:
            try:
                text = bline.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadRow("invalid UTF-8", str(e)) from None
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise BadRow("malformed JSON", str(e)) from None
            if isinstance(obj, dict) and isinstance(obj.get("file_name"), str):
                row.where = printable(obj["file_name"])
            simple, complex_ = check_fields(obj, fields, file_name=True)
            name = obj["file_name"]
            real = check_file_name(root_real, name)
            dup = posixpath.normpath(name.replace("\\", "/"))
            if dup in seen:
                raise BadRow("duplicate file_name", f"first on line {seen[dup]}")
            seen[dup] = lineno
            row.sample = Sample(keys(name), simple, complex_, name, real, -1, -1, max_pixels,
                                category=read_category(obj, fields))
        except BadRow as b:
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


def _shard_groups(fh: BinaryIO, size: int) -> tuple[list[tuple[str, dict[str, tarfile.TarInfo], str]],
                                                     tuple[str, str] | None, str | None]:
    """(samples, shard problem, why unreadable) of an open tar shard of ``size`` bytes. A sample is
    (webdataset key, {extension: member}, why it is cut off by the end of the file or "")."""
    groups: list[tuple[str, dict[str, tarfile.TarInfo], str]] = []
    problem = None
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
                    groups[-1] = (k, groups[-1][1], f"member {printable(m.name)!r} is cut off by the end "
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
            return groups, None, f"not a readable uncompressed .tar shard: {e}"
        if any(g[2] for g in groups):
            problem = _tar_end_problem(fh, size + 1, size)
        else:
            problem = ("damaged shard", f"unreadable after {len(groups)} samples: {e}")
    return groups, problem, None


def _shard_sample(fh: BinaryIO, shard: str, wkey: str, members: dict[str, tarfile.TarInfo], cut: str,
                  fields: Fields, seen: set[str], keys: KeyMaker, max_pixels: int) -> Sample:
    """The sample of one webdataset key of a shard; BadRow when it cannot be used."""
    if lone_surrogate(wkey) is not None:
        raise BadRow("invalid UTF-8 member name", printable(wkey))
    if cut:
        raise BadRow("truncated shard", cut)
    jm = members.get("json")
    if jm is None:
        raise BadRow("missing .json member")
    img_ext = next((e for e in members if e in IMAGE_EXTENSIONS), None)
    if img_ext is None:
        raise BadRow("missing image member")
    im = members[img_ext]
    fh.seek(jm.offset_data)
    try:
        obj = json.loads(fh.read(jm.size).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRow("malformed JSON", str(e)) from None
    simple, complex_ = check_fields(obj, fields, file_name=False)
    if wkey in seen:
        raise BadRow("duplicate key", printable(wkey))
    seen.add(wkey)
    return Sample(keys(wkey), simple, complex_, im.name, os.path.abspath(shard), im.offset_data, im.size,
                  max_pixels, category=read_category(obj, fields))


def scan_shards(shards: list[str], report: ScanReport, max_pixels: int, fields: Fields) -> list[Row]:
    """One row per webdataset sample of the tar ``shards`` (headers streamed, JSON read); bad samples
    are rows with ``bad`` set, unreadable, cut or damaged shards are reported skips."""
    rows: list[Row] = []
    keys = KeyMaker()
    seen: set[str] = set()
    index = 0
    for shard in shards:
        sname = printable(os.path.basename(shard))
        try:
            fh = open(shard, "rb")
        except OSError as e:
            report.skip(index, sname, "unreadable shard", str(e))
            continue
        with fh:
            groups, problem, unreadable = _shard_groups(fh, os.fstat(fh.fileno()).st_size)
            if unreadable is not None:
                report.skip(index, sname, "unreadable shard", unreadable)
                continue
            for wkey, members, cut in groups:
                report.rows_read += 1
                row = Row(index, f"{sname}:{printable(wkey)}")
                rows.append(row)
                index += 1
                try:
                    row.sample = _shard_sample(fh, shard, wkey, members, cut, fields, seen, keys, max_pixels)
                except BadRow as b:
                    row.bad = b
            if problem is not None:
                report.skip(index, sname, *problem)
    return rows
