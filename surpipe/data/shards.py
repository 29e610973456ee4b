"""Writing a SURD dataset as webdataset .tar shards (read back by :func:`surpipe.data.open_dataset`).

Per sample: ``<key>.<ext>`` holds the original image bytes with the original extension, and
``<key>.json`` holds ``{"file_name", "text", "prompt"}``, plus ``"category"`` when the sample
has one. Samples go in dataset order, so row order and the dataset fingerprint survive packing.
Members carry mtime 0 and fixed owners, so the same input gives byte-identical shards.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import posixpath
import shutil
import secrets
from typing import Callable

from surpipe.data.images import FORMAT_EXTENSIONS, IMAGE_EXTENSIONS, ImageProblem, probe
from surpipe.data.rows import DEFAULT_CATEGORY_FIELD
from surpipe.data.surd import Sample, SurdDataset
from surpipe.errors import SurpipeError
from surpipe.progress import progress_bar

SHARD_PATTERN = "shard-{:06d}.tar"


PACK_FILES = ("pack_report.json", "pack_config.json")
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def existing_shards(out: str) -> list[str]:
    if not os.path.isdir(out):
        return []
    return sorted(n for n in os.listdir(out) if n.startswith("shard-") and n.endswith(".tar"))


def check_out_folder(out: str, overwrite: bool) -> None:
    """Refuse an OUT that a pack cannot be published into (one clear SurpipeError).

    OUT may be absent, an empty folder, or (with ``overwrite``) a folder holding only a previous
    pack's files. A pack replaces the whole folder, so a folder with other files is refused.
    """
    if os.path.lexists(out) and not os.path.isdir(out):
        raise SurpipeError(f"OUT {out} is a file, not a folder; give a folder path (new or empty)")
    if not os.path.isdir(out):
        return
    try:
        names = sorted(os.listdir(out))
    except OSError as e:
        raise SurpipeError(f"cannot read the folder {out}: {e.strerror or e}") from None
    foreign = [n for n in names if not ((n.startswith("shard-") and n.endswith(".tar")) or n in PACK_FILES
                                        or n.startswith(".pack-tmp-") or n.endswith(".json.tmp"))]
    if foreign:
        raise SurpipeError(f"{out} holds files that pack did not write ({', '.join(foreign[:5])}"
                           f"{' ...' if len(foreign) > 5 else ''}); a pack replaces the whole folder, "
                           "so choose a new or empty folder")
    if names and not overwrite:
        old = existing_shards(out)
        what = f"{len(old)} shards ({old[0]} ...)" if old else f"an unfinished pack ({names[0]} ...)"
        raise SurpipeError(f"{out} already holds {what}; pass --overwrite to replace them, or choose another folder")


def _tmp_prefix(out: str) -> str:
    return f".{os.path.basename(out)}.pack-tmp-"


def _clean_stale_tmp(out: str) -> None:
    """Remove temporary folders of packs into ``out`` whose process is gone (killed packs)."""
    parent, prefix = os.path.dirname(out), _tmp_prefix(out)
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for n in names:
        if not n.startswith(prefix):
            continue
        pid = n[len(prefix):].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # that pack is still running
        except ProcessLookupError:
            pass
        except OSError:
            continue
        shutil.rmtree(os.path.join(parent, n), ignore_errors=True)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def _fsync_tree(folder: str) -> None:
    for n in os.listdir(folder):
        fd = os.open(os.path.join(folder, n), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish_folder(tmp: str, out: str, overwrite: bool) -> None:
    """Move the finished folder ``tmp`` to ``out`` in one step: a rename when ``out`` is absent or
    empty, an atomic exchange with a previous pack (``overwrite``), which is then deleted. (Folders,
    so not surpipe.config.atomic_path, which publishes one file.)"""
    try:
        os.rename(tmp, out)
        return
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not overwrite:
            raise
    check_out_folder(out, overwrite)  # still only a previous pack there: safe to replace
    if _exchange(tmp, out):  # tmp now holds the previous pack
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = tmp + "-old"  # no atomic exchange here: a short moment with no OUT, never a mixed one
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


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
                 overwrite: bool = False, progress: bool = True,
                 extra: Callable[[str, list[str]], None] | None = None) -> list[str]:
    """Write ``dataset`` into ``out/shard-000000.tar``, ... and return the shard paths.

    Everything is written into a temporary sibling folder of ``out`` (``extra(folder, shard_names)``
    may add files, such as the report) and published with one rename only when complete, so a
    killed or failed pack never leaves a folder that looks finished, and a previous pack stays
    whole until it is replaced. A failure to write (a full disk) raises SurpipeError.
    """
    import webdataset as wds  # heavy: only pack writes shards

    if samples_per_shard < 1:
        raise SurpipeError(f"samples_per_shard must be at least 1, not {samples_per_shard}")
    given, out = out, os.path.realpath(out)  # publish at the real place (OUT may be a symlink to a folder)
    check_out_folder(out, overwrite)
    parent = os.path.dirname(out)
    names: list[str] = []
    tmp = None
    try:
        os.makedirs(parent, exist_ok=True)
        _clean_stale_tmp(out)
        tmp = os.path.join(parent, f"{_tmp_prefix(out)}{os.getpid()}-{secrets.token_hex(4)}")
        os.mkdir(tmp)  # not mkdtemp: the published folder gets the usual permissions, not 0700
        writer = None
        bar = progress_bar(total=len(dataset), desc="packing", unit="sample", disable=not progress,
                           leave=False)
        try:
            for i, s in enumerate(dataset.samples):
                if i % samples_per_shard == 0:
                    if writer is not None:
                        writer.close()
                    names.append(SHARD_PATTERN.format(len(names)))
                    writer = wds.TarWriter(os.path.join(tmp, names[-1]), mtime=0, user="surpipe",
                                           group="surpipe", format="PAX_FORMAT")
                data = s.image_bytes()
                meta = {"file_name": s.file_name, "text": s.simple, "prompt": s.complex}
                if getattr(s, "category", None) is not None:
                    meta[DEFAULT_CATEGORY_FIELD] = s.category
                writer.write({"__key__": s.key, _image_ext(s, data): data,
                              "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})
                bar.update(1)
            if writer is not None:
                writer.close()
                writer = None
        finally:
            bar.close()
            if writer is not None:
                try:
                    writer.close()
                except OSError:
                    pass
        if extra is not None:
            extra(tmp, list(names))
        _fsync_tree(tmp)  # the data is on disk before the rename makes it visible
        publish_folder(tmp, out, overwrite)
        tmp = None
        _fsync_dir(parent)
    except OSError as e:
        why = e.strerror or str(e)
        raise SurpipeError(f"cannot write the pack to {given}: {why}"
                           f"{f' ({e.filename})' if e.filename else ''}; nothing was published"
                           f"{' (the previous pack is unchanged)' if overwrite else ''}") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return [os.path.join(given, n) for n in names]
