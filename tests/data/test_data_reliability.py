"""Data-layer attacks (issue 12 points 5, 6, 8, 10, 11; issue 11 point 14): cut and damaged
shards, killed and failing packs, huge files named as images, lone surrogates, invisible prompts,
and field mapping. Each bad input is a counted skip with its reason (or a refusal under strict),
never a silent loss, a half-published folder or a traceback."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import subprocess
import sys
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from helpers import png_bytes, run_cli as cli
from surpipe.data import open_dataset
from surpipe.errors import SurpipeError

REPO = Path(__file__).resolve().parents[2]


def scan(path, **kw):
    kw.setdefault("progress", False)
    return open_dataset(str(path), **kw)


def rows(n, start=0):
    lines = [{"file_name": f"images/{i}.png", "text": f"a cat number {i}", "prompt": f"cat {i}, 8k"}
             for i in range(start, start + n)]
    files = {f"images/{i}.png": png_bytes(color=(i * 20 % 256, 40, 90)) for i in range(start, start + n)}
    return lines, files


def pack(src, out, **kw):
    from stages.pack import PackConfig, run

    kw.setdefault("progress", False)
    with contextlib.redirect_stdout(io.StringIO()):
        return run(PackConfig(src=str(src), out=str(out), **kw))


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- 5: truncated shards


@pytest.fixture
def packed(make_surd, tmp_path):
    """A real 6-sample shard written by ``surpipe pack``: (shard path, members, its bytes)."""
    src = make_surd(*rows(6))
    out = tmp_path / "packed"
    pack(src, out)
    shard = out / "shard-000000.tar"
    with tarfile.open(shard) as tf:
        members = tf.getmembers()
    assert [m.name for m in members][:4] == ["images_0.json", "images_0.png", "images_1.json", "images_1.png"]
    return shard, members, shard.read_bytes()


def _member_end(m: tarfile.TarInfo) -> int:
    return m.offset_data + (m.size + 511) // 512 * 512


def _cut(tmp_path, data: bytes, n: int) -> Path:
    folder = tmp_path / f"cut{n}"
    folder.mkdir()
    (folder / "shard-000000.tar").write_bytes(data[:n])
    return folder


def test_shard_cut_at_a_member_boundary_is_reported_not_silent(packed, tmp_path):
    shard, members, data = packed
    # python's tarfile itself ends quietly there: that is the silent loss being guarded against
    cut = _cut(tmp_path, data, _member_end(members[5]))  # just after sample 2's image
    with tarfile.open(cut / "shard-000000.tar") as tf:
        assert len(tf.getmembers()) == 6
    ds = scan(cut)
    assert [s.key for s in ds] == ["images_0", "images_1", "images_2"]
    assert ds.report.counts == {"truncated shard": 1}
    line, where, reason = ds.report.skipped[0]
    assert where == "shard-000000.tar" and "no end-of-archive marker" in reason and "cut at byte 6144" in reason
    assert "shard-000000.tar: truncated shard" in ds.report.summary()
    with pytest.raises(SurpipeError, match=r"shard-000000.tar: truncated shard"):
        scan(cut, strict=True)
    # the untouched shard reads whole, with no report
    assert len(scan(shard)) == 6 and scan(shard).report.skipped == []


def test_shard_cut_between_the_members_of_one_sample(packed, tmp_path):
    _, members, data = packed
    ds = scan(_cut(tmp_path, data, _member_end(members[6])))  # sample 3's json, not its image
    assert len(ds) == 3 and ds.report.counts == {"truncated shard": 2}
    assert ds.report.skipped[0][:2] == (3, "shard-000000.tar:images_3")
    assert "inside this sample" in ds.report.skipped[0][2]


@pytest.mark.parametrize("where", ["mid member", "mid header", "in the end marker"])
def test_shard_cut_elsewhere(packed, tmp_path, where):
    _, members, data = packed
    n = {"mid member": members[7].offset_data + 10, "mid header": members[7].offset + 100,
         "in the end marker": _member_end(members[-1]) + 512}[where]
    folder = _cut(tmp_path, data, n)
    ds = scan(folder)
    assert ds.report.counts.get("truncated shard", 0) >= 1, ds.report.summary()
    assert len(ds) == (6 if where == "in the end marker" else 3)
    with pytest.raises(SurpipeError, match="truncated shard"):
        scan(folder, strict=True)


def test_damaged_header_and_unreadable_shard_are_counted(packed, tmp_path):
    shard, members, data = packed
    bad = bytearray(data)
    bad[members[6].offset + 148] ^= 0x01  # checksum of sample 3's first header
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "shard-000000.tar").write_bytes(bytes(bad))
    (folder / "shard-000001.tar").write_bytes(b"")  # an empty file
    (folder / "shard-000002.tar").write_bytes(data)
    ds = scan(folder)
    # 3 before the damage; the third shard repeats the first's keys: 3 duplicates, 3 new
    assert len(ds) == 6 and ds.report.counts["duplicate key"] == 3
    assert ds.report.counts["damaged shard"] == 1 and ds.report.counts["unreadable shard"] == 1
    assert any("unreadable tar header at byte 6144" in r for _, _, r in ds.report.skipped)


def test_shards_written_by_other_tools_still_read(tmp_path):
    j = json.dumps({"text": "t", "prompt": "p"}).encode()
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        path = tmp_path / f"other{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tf:
            for k in ("a", "b"):
                for ext, data in (("json", j), ("png", png_bytes())):
                    ti = tarfile.TarInfo(f"{k}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
        ds = scan(path)
        assert len(ds) == 2 and ds.report.skipped == []


# --------------------------------------------------------------------------- 6: atomic pack


_KILLER = r"""
import os, signal, sys
sys.path[:0] = [{repo!r}]
calls = {{"n": 0}}
def killer(real):
    def f(*a, **k):
        calls["n"] += 1
        if calls["n"] == {k}:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    return f
os.rename, os.replace = killer(os.rename), killer(os.replace)
import webdataset
webdataset.TarWriter.close = killer(webdataset.TarWriter.close)
from stages.pack import PackConfig, run
run(PackConfig(src={src!r}, out={out!r}, samples_per_shard=2, overwrite=True, progress=False))
"""


def _kill_at_moves(make_surd, tmp_path, kill_points):
    src = make_surd(*rows(6))
    out = tmp_path / "out"
    old = make_surd(*rows(3, start=10))
    pack(old, out, samples_per_shard=1)
    before = tree(out)
    killed = 0
    for k in kill_points:
        r = subprocess.run([sys.executable, "-c", _KILLER.format(repo=str(REPO), k=k, src=str(src), out=str(out))],
                           capture_output=True, text=True, timeout=120)
        if r.returncode == 0:
            break
        assert r.returncode == -9, r.stderr
        killed += 1
        # OUT is the whole previous pack, untouched: never a mix, never missing a shard
        assert tree(out) == before, f"kill at move {k}"
        assert len(scan(out)) == 3
    if len(kill_points) > 1:
        assert killed >= 4  # three shard closes, the config file, the publishing rename
    else:
        pack(src, out, samples_per_shard=2, overwrite=True)
    after = tree(out)
    assert after != before and len(scan(out)) == 6
    assert json.loads(after["pack_report.json"])["shards"] == ["shard-000000.tar", "shard-000001.tar",
                                                               "shard-000002.tar"]
    # the temporary folders of the killed packs were cleaned up by the finished one
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))


def test_a_pack_killed_at_publishing_leaves_the_previous_pack_whole(make_surd, tmp_path):
    _kill_at_moves(make_surd, tmp_path, [5])  # at the publishing rename (the old code: between shard moves)


@pytest.mark.slow
def test_a_pack_killed_at_any_move_never_leaves_a_finished_looking_folder(make_surd, tmp_path):
    _kill_at_moves(make_surd, tmp_path, range(1, 9))


def test_a_killed_first_pack_leaves_no_out_and_the_next_one_publishes(make_surd, tmp_path):
    src = make_surd(*rows(4))
    out = tmp_path / "fresh"
    r = subprocess.run([sys.executable, "-c", _KILLER.format(repo=str(REPO), k=2, src=str(src), out=str(out))],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr
    assert not out.exists()  # a reader finds nothing rather than a part
    assert any(n.startswith(".fresh.pack-tmp-") for n in os.listdir(tmp_path))
    pack(src, out)
    assert len(scan(out)) == 4
    assert not any(n.startswith(".fresh.pack-tmp-") for n in os.listdir(tmp_path))


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["shard", "report"])
def test_full_disk_during_pack_is_one_message_and_nothing_published(make_surd, tmp_path, monkeypatch, where):
    import webdataset

    src = make_surd(*rows(5))
    out = tmp_path / "o"
    pack(make_surd(*rows(2, start=20)), out)
    before = tree(out)
    calls = {"n": 0}
    real_write = webdataset.TarWriter.write

    def write(self, obj):
        calls["n"] += 1
        if calls["n"] == 3:
            _enospc()
        return real_write(self, obj)

    if where == "shard":
        monkeypatch.setattr(webdataset.TarWriter, "write", write)
    else:
        monkeypatch.setattr("surpipe.config.save", _enospc)
    rc, stdout, err = cli("pack", src, out, "--overwrite", "--samples-per-shard", "2", "--no-progress")
    assert rc == 1 and "No space left on device" in err and "nothing was published" in err, err
    assert "Traceback" not in err + stdout
    assert tree(out) == before  # the previous pack is whole
    assert sorted(os.listdir(tmp_path)) == [n for n in sorted(os.listdir(tmp_path)) if not n.startswith(".o.")]
    calls["n"] = 0
    with pytest.raises(SurpipeError, match="nothing was published"):
        pack(src, tmp_path / "new", samples_per_shard=2)
    assert not (tmp_path / "new").exists()


def test_pack_out_that_is_a_file_or_a_foreign_folder(make_surd, tmp_path):
    src = make_surd(*rows(2))
    f = tmp_path / "file.txt"
    f.write_text("mine")
    rc, out, err = cli("pack", src, f)
    assert rc == 1 and "is a file, not a folder" in err and "Traceback" not in err
    assert f.read_text() == "mine"
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        rc, out, err = cli("pack", src, tmp_path / "mixed", *extra)
        assert rc == 1 and "pack did not write (notes.txt)" in err
    assert tree(tmp_path / "mixed") == {"notes.txt": b"keep me"}
    (tmp_path / "empty").mkdir()
    pack(src, tmp_path / "empty")  # an existing empty folder is fine
    assert len(scan(tmp_path / "empty")) == 2
    assert oct(os.stat(tmp_path / "empty").st_mode & 0o777) != oct(0o700)  # not a private temp folder


# --------------------------------------------------------------------------- 8: huge "images"


def _sparse(path: Path, head: bytes, size: int) -> None:
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)  # sparse: costs no disk


@pytest.mark.parametrize("mode", ["header", "full"])
def test_image_check_reads_only_what_it_needs_of_a_2gib_file(make_surd, tmp_path, mode):
    root = make_surd(*rows(1))
    lines = [{"file_name": "images/0.png", "text": "a", "prompt": "b"},
             {"file_name": "zeros.png", "text": "a", "prompt": "b"},
             {"file_name": "tail.png", "text": "a", "prompt": "b"}]
    (root / "metadata.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    _sparse(root / "zeros.png", b"", 2 << 30)
    _sparse(root / "tail.png", png_bytes(), 2 << 30)  # a real PNG followed by 2 GiB of zeros
    tracemalloc.start()
    try:
        ds = scan(root, check_images=mode)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"peak {peak / 2**20:.0f} MiB"
    assert ds.report.counts == {"not an image": 1}
    assert [s.file_name for s in ds] == ["images/0.png", "tail.png"]
    tracemalloc.start()
    try:
        assert ds[1].image().size == (8, 8)  # decoding reads the image, not the file
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20


def test_image_check_of_a_huge_shard_member(tmp_path):
    shard = tmp_path / "big.tar"
    j = json.dumps({"text": "t", "prompt": "p"}).encode()
    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("ok.json")
        ti.size = len(j)
        tf.addfile(ti, io.BytesIO(j))
        ti = tarfile.TarInfo("ok.png")
        img = png_bytes()
        ti.size = len(img)
        tf.addfile(ti, io.BytesIO(img))
        ti = tarfile.TarInfo("big.json")
        ti.size = len(j)
        tf.addfile(ti, io.BytesIO(j))
        big = tarfile.TarInfo("big.png")
        big.size = 2 << 30
        tf.fileobj.write(big.tobuf(tarfile.PAX_FORMAT, tf.encoding, tf.errors))
        start = tf.fileobj.tell()
        tf.offset = start + big.size  # then the end marker, sparse zeros all the way
        tf.members.append(big)
    os.truncate(shard, start + big.size + 10240)
    tracemalloc.start()
    try:
        ds = scan(shard, check_images="full")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"peak {peak / 2**20:.0f} MiB"
    assert [s.key for s in ds] == ["ok"] and ds.report.counts == {"not an image": 1}
    assert ds[0].image().size == (8, 8) and ds[0].image_bytes() == img


# --------------------------------------------------------------------------- 10: lone surrogates


SURROGATE_LINE = '{"file_name": "images/1.png", "text": "a \\ud800 cat", "prompt": "cat, 8k"}'


def test_lone_surrogate_row_is_skipped_with_its_line(make_surd, tmp_path, capsys):
    lines, files = rows(3)
    bad_name = '{"file_name": "images/\\udcff.png", "text": "a", "prompt": "b"}'
    root = make_surd([lines[0], SURROGATE_LINE, bad_name, lines[2]], files)
    ds = scan(root)
    assert [s.file_name for s in ds] == ["images/0.png", "images/2.png"]
    assert ds.report.counts == {"invalid Unicode": 2}
    assert [l for l, _, _ in ds.report.skipped] == [2, 3]
    assert "lone surrogate '\\ud800'" in ds.report.skipped[0][2] and "field 'text'" in ds.report.skipped[0][2]
    print(ds.report.summary())  # printable, though the row was not
    json.dumps(ds.report.to_dict(), ensure_ascii=False).encode("utf-8")
    with pytest.raises(SurpipeError, match=r"line 2 .*invalid Unicode"):
        scan(root, strict=True)
    # pack: skipped and counted, the report written, the shards read back
    out = tmp_path / "p"
    rc, stdout, err = cli("pack", root, out, "--no-progress")
    assert rc == 0, err
    assert "invalid Unicode" in stdout and "line 2" in stdout
    rep = json.loads((out / "pack_report.json").read_text(encoding="utf-8"))
    assert rep["num_samples"] == 2 and rep["scan"]["counts"] == {"invalid Unicode": 2}


def test_lone_surrogate_in_a_shard(tmp_path):
    good = json.dumps({"text": "t", "prompt": "p"}).encode()
    bad = b'{"text": "t", "prompt": "p \\udfff"}'
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in (("a.json", good), ("a.png", png_bytes()), ("b.json", bad), ("b.png", png_bytes()),
                           ("c\udcff.json", good), ("c\udcff.png", png_bytes()), ("d.json", good),
                           ("d.png", png_bytes())):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    ds = scan(shard)
    assert [s.key for s in ds] == ["a", "d"]
    assert ds.report.counts == {"invalid Unicode": 1, "invalid UTF-8 member name": 1}
    json.dumps(ds.report.to_dict(), ensure_ascii=False).encode("utf-8")
    ds.report.summary().encode("utf-8")
    pack(shard, tmp_path / "re")  # repacking works too
    assert len(scan(tmp_path / "re")) == 2


# --------------------------------------------------------------------------- 11: invisible prompts


@pytest.mark.parametrize("text", ["\u200b\u200b", "\x00", "\ufeff", "\u0301\u0302", "\u200d \u2060\u200c",
                                  "\u3164", "\u00a0\u2028", "\U000e0041"])
def test_invisible_prompts_are_empty(make_surd, text):
    lines, files = rows(3)
    root = make_surd([lines[0], dict(lines[1], prompt=text), lines[2]], files)
    ds = scan(root)
    assert len(ds) == 2 and ds.report.counts == {"empty prompt 'prompt'": 1}
    line, _, reason = ds.report.skipped[0]
    assert line == 2 and "the complex prompt" in reason


@pytest.mark.parametrize("text", ["e\u0301", "猫", "🙂", "\u00a0x\u200b", "\u0915\u093f"])
def test_visible_prompts_are_kept(make_surd, text):
    lines, files = rows(2)
    root = make_surd([dict(lines[0], text=text), lines[1]], files)
    ds = scan(root)
    assert len(ds) == 2 and ds[0].simple == text


# --------------------------------------------------------------------------- 14: field mapping


def test_field_mapping(make_surd, tmp_path):
    lines, files = rows(3)
    mapped = [{"file_name": r["file_name"], "caption": r["text"], "long": r["prompt"]} for r in lines]
    root = make_surd(mapped, files)
    plain = scan(make_surd(lines, files))
    ds = scan(root, simple_field="caption", complex_field="long")
    assert [(s.simple, s.complex) for s in ds] == [(r["text"], r["prompt"]) for r in lines]
    assert ds.fingerprint() == plain.fingerprint()
    with pytest.raises(SurpipeError) as e:
        scan(root)
    msg = str(e.value)
    assert "line 1: images/0.png: missing field 'text': the simple prompt; choose another with --simple-field" in msg
    with pytest.raises(SurpipeError, match="the complex prompt; choose another with --complex-field"):
        scan(root, simple_field="caption", strict=True)
    with pytest.raises(SurpipeError, match="--simple-field must name a metadata field"):
        scan(root, simple_field=" ")
    # pack maps them onto the shards' standard 'text' / 'prompt'
    out = tmp_path / "sh"
    rc, stdout, err = cli("pack", root, out, "--simple-field", "caption", "--complex-field", "long", "--no-progress")
    assert rc == 0, err
    packed = scan(out)
    assert packed.fingerprint() == plain.fingerprint()
    cfg = json.loads((out / "pack_config.json").read_text())
    assert cfg["simple_field"] == "caption" and cfg["complex_field"] == "long"
    rc, stdout, err = cli("pack", root, tmp_path / "sh2", "--no-progress")
    assert rc == 1 and "choose another with --simple-field" in err and "Traceback" not in err


def test_pack_config_fields_have_help_groups_and_ranges(tmp_path):
    import dataclasses

    from surpipe import config as cfgmod
    from stages.pack import PackConfig

    for f in dataclasses.fields(PackConfig):
        assert f.metadata.get("help") and f.metadata.get("group"), f.name
    assert [f.name for f in dataclasses.fields(PackConfig) if f.metadata.get("argument")] == ["src", "out"]
    with pytest.raises(SurpipeError) as e:
        cfgmod.from_dict(PackConfig, {"src": "a", "out": "b", "samples_per_shard": 0, "max_pixels": -1})
    assert "samples_per_shard" in str(e.value) and "max_pixels" in str(e.value)
