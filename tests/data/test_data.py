"""SURD data layer: scanning imagefolders and shards, bad-row handling, image modes, pack, the sample."""

from __future__ import annotations

import io
import json
import os
import re
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from helpers import png_bytes
from surpipe.data import DEFAULT_MAX_PIXELS, Sample, base_key, decode_rgb, open_dataset
from surpipe.errors import SurpipeError

GOOD = [{"file_name": f"images/g{i}.png", "text": f"a cat number {i}", "prompt": f"cat {i}, 8k, (masterpiece:1.2)"}
        for i in range(2)]


def good_files():
    return {f"images/g{i}.png": png_bytes(color=(i * 50, 20, 30)) for i in range(2)}


def scan(path, **kw):
    kw.setdefault("progress", False)
    return open_dataset(str(path), **kw)


# --------------------------------------------------------------------------- bad rows, one kind each


def _bad_case(kind, tmp_path):
    """-> (lines to put between the good rows, extra files, expected reason prefix)."""
    row = {"file_name": "images/b.png", "text": "a dog", "prompt": "dog, 8k"}
    files = {"images/b.png": png_bytes()}
    truncated = png_bytes(size=(64, 64))
    if kind == "malformed json":
        return ['{"file_name": "images/b.png", "text": '], {}, "malformed JSON"
    if kind == "not an object":
        return ['["images/b.png", "a dog", "dog"]'], {}, "not a JSON object"
    if kind.startswith("missing field"):
        f = kind.split()[-1]
        return [{k: v for k, v in row.items() if k != f}], files, f"missing field '{f}'"
    if kind == "non-string prompt":
        return [dict(row, prompt=["dog", "8k"])], files, "field 'prompt' is not a string"
    if kind == "non-string file_name":
        return [dict(row, file_name=3)], files, "field 'file_name' is not a string"
    if kind == "empty prompt":
        return [dict(row, text=" \t\n ")], files, "empty prompt 'text'"
    if kind == "absolute path":
        outside = tmp_path / "outside.png"
        outside.write_bytes(png_bytes())
        return [dict(row, file_name=str(outside))], {}, "file_name outside the folder"
    if kind == "dotdot":
        (tmp_path / "outside.png").write_bytes(png_bytes())
        return [dict(row, file_name="images/../../outside.png")], {}, "file_name outside the folder"
    if kind == "symlink outside":
        return [dict(row, file_name="images/link.png")], {}, "file_name outside the folder"
    if kind == "missing file":
        return [row], {}, "missing file"
    if kind == "not an image":
        return [row], {"images/b.png": b"hello, I am text\n"}, "not an image"
    if kind == "truncated image":
        return [row], {"images/b.png": truncated[: len(truncated) // 2]}, "truncated or corrupt image"
    if kind == "invalid utf-8":
        return [b'{"file_name": "images/b.png", "text": "caf\xe9", "prompt": "x"}'], files, "invalid UTF-8"
    if kind == "duplicate file_name":
        return [dict(GOOD[0], text="again")], {}, "duplicate file_name"
    raise AssertionError(kind)


BAD_KINDS = ["malformed json", "not an object", "missing field file_name", "missing field text",
             "missing field prompt", "non-string prompt", "non-string file_name", "empty prompt", "absolute path",
             "dotdot", "symlink outside", "missing file", "not an image", "truncated image", "invalid utf-8",
             "duplicate file_name"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_row_is_skipped_with_line_and_reason(kind, tmp_path, make_surd):
    lines, files, reason = _bad_case(kind, tmp_path)
    root = make_surd([GOOD[0], "", *lines, "   ", GOOD[1]], {**good_files(), **files})
    if kind == "symlink outside":
        target = tmp_path / "secret.png"
        target.write_bytes(png_bytes())
        os.symlink(target, root / "images" / "link.png")
    ds = scan(root)
    r = ds.report
    assert [s.key for s in ds] == ["images_g0", "images_g1"]
    assert r.rows_read == 3 and r.kept == 2, "blank lines are not rows"
    assert len(r.skipped) == 1
    line, where, got = r.skipped[0]
    assert line == 3 and got.startswith(reason), r.skipped
    assert sum(r.counts.values()) == 1 and reason in r.counts
    text = r.summary()
    assert "kept 2" in text and "line 3" in text and reason in text
    assert r.to_dict()["skipped"][0]["line"] == 3


def test_symlink_inside_folder_is_fine(make_surd):
    root = make_surd([GOOD[0]], good_files())
    os.symlink(root / "images" / "g0.png", root / "images" / "alias.png")
    (root / "metadata.jsonl").write_text(json.dumps(dict(GOOD[1], file_name="images/alias.png")) + "\n")
    assert scan(root)[0].image_bytes() == good_files()["images/g0.png"]


def test_check_modes(make_surd):
    data = png_bytes(size=(64, 64))
    root = make_surd([GOOD[0], {"file_name": "t.png", "text": "a", "prompt": "b"}],
                     {**good_files(), "t.png": data[: len(data) // 2]})
    assert scan(root, check_images="full").report.counts == {"truncated or corrupt image": 1}
    assert len(scan(root, check_images="header")) == 2  # header is intact; truncation needs a decode
    ds = scan(root, check_images="none")
    assert len(ds) == 2
    with pytest.raises(SurpipeError, match="truncated"):
        ds[1].image()
    with pytest.raises(SurpipeError, match="check_images"):
        scan(root, check_images="some")


def test_strict_raises_at_first_bad_row(make_surd):
    root = make_surd([GOOD[0], {"file_name": "images/none.png", "text": "a", "prompt": "b"}, "{oops", GOOD[1]],
                     good_files())
    with pytest.raises(SurpipeError, match=r"line 2 \(images/none.png\): missing file"):
        scan(root, strict=True)
    assert scan(root).report.counts == {"missing file": 1, "malformed JSON": 1}


def test_source_errors(tmp_path, make_surd):
    with pytest.raises(SurpipeError, match="no such file or folder"):
        scan(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SurpipeError, match="neither a SURD imagefolder"):
        scan(tmp_path / "empty")
    root = make_surd(["{bad", {"file_name": "x.png", "text": "a", "prompt": "b"}])
    with pytest.raises(SurpipeError, match="no usable rows") as e:
        scan(root)
    assert "missing file" in str(e.value) and "malformed JSON" in str(e.value)
    with pytest.raises(SurpipeError, match="do not exist"):
        scan(str(tmp_path / "shard-{000000..000001}.tar"))


# --------------------------------------------------------------------------- keys


def test_key_rules(make_surd):
    assert base_key("images/cat 01.v2.png") == "images_cat_01_v2"
    assert base_key("ä/ü.jpg") == "___"
    names = ["a/b.png", "a_b.png", "a b.jpg", "a/b.jpg", "c.d.png"]
    files = {n: png_bytes() for n in names}
    root = make_surd([{"file_name": n, "text": "t", "prompt": "p"} for n in names], files)
    keys = [s.key for s in scan(root, check_images="none")]
    assert keys[0] == "a_b" and keys[4] == "c_d"
    assert len(set(keys)) == len(keys)
    assert all(k.startswith("a_b_") and len(k) == len("a_b_") + 8 for k in keys[1:4])
    for k in keys:
        assert k and all(c.isascii() and (c.isalnum() or c in "_-") for c in k)
    assert keys == [s.key for s in scan(root, check_images="none")], "stable across runs"


# --------------------------------------------------------------------------- image modes


def _enc(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def _white(rgb, a):
    rgb, a = np.asarray(rgb, np.float64), np.asarray(a, np.float64)[..., None] / 255
    return np.rint(rgb * a + 255 * (1 - a))


def _mode_case(mode):
    """-> (encoded bytes, expected RGB array) computed without surpipe."""
    rng = np.random.default_rng(0)
    h, w = 5, 7
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (h, w), dtype=np.uint8)
    alpha[0, :3] = [0, 255, 128]
    grey = rng.integers(0, 256, (h, w), dtype=np.uint8)
    if mode == "RGB":
        return _enc(Image.fromarray(rgb), "PNG"), rgb
    if mode == "RGBA":
        return _enc(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "PNG"), _white(rgb, alpha)
    if mode == "LA":
        im = Image.fromarray(np.dstack([grey, alpha]), "LA")
        return _enc(im, "PNG"), _white(np.repeat(grey[..., None], 3, 2), alpha)
    if mode == "L":
        return _enc(Image.fromarray(grey, "L"), "PNG"), np.repeat(grey[..., None], 3, 2)
    if mode == "1":
        bits = grey > 127
        return _enc(Image.fromarray(bits), "PNG"), np.repeat(np.where(bits, 255, 0)[..., None], 3, 2)
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]], np.uint8)
    idx = rng.integers(0, 4, (h, w), dtype=np.uint8)
    idx[0, 0] = 2
    if mode in ("P", "P+transparency"):
        im = Image.fromarray(idx, "P")
        im.putpalette(palette.flatten().tolist())
        want = palette[idx].astype(np.float64)
        if mode == "P":
            return _enc(im, "PNG"), want
        want[idx == 2] = 255  # palette index 2 is fully transparent -> white
        return _enc(im, "PNG", transparency=2), want
    if mode == "CMYK":
        cmyk = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
        c = cmyk.astype(np.float64)
        want = np.rint((255 - c[..., :3]) * (255 - c[..., 3:4]) / 255)
        return _enc(Image.fromarray(cmyk, "CMYK"), "TIFF"), want
    if mode == "I;16":
        v = rng.integers(0, 65536, (h, w)).astype(np.uint16)
        v[0, :4] = [0, 65535, 32768, 257 * 100]
        im = Image.fromarray(v)
        assert im.mode == "I;16"
        want = np.rint(v.astype(np.float64) / 65535 * 255)
        assert want[0, 1] == 255 and want[0, 3] == 100  # scaled, not clipped
        return _enc(im, "PNG"), np.repeat(want[..., None], 3, 2)
    if mode == "I":
        v = rng.integers(0, 65536, (h, w)).astype(np.int32)
        v[0, :3] = [-5, 70000, 65535]
        want = np.rint(np.clip(v, 0, 65535) / 65535 * 255)
        return _enc(Image.fromarray(v, "I"), "TIFF"), np.repeat(want[..., None], 3, 2)
    if mode == "F":
        v = rng.random((h, w)).astype(np.float32)
        v[0, :2] = [0.0, 1.0]
        want = np.rint(v.astype(np.float64) * 255)
        return _enc(Image.fromarray(v, "F"), "TIFF"), np.repeat(want[..., None], 3, 2)
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "P", "P+transparency", "L", "1", "CMYK", "I;16", "I", "F"])
def test_every_mode_becomes_8bit_rgb(mode, make_surd):
    data, want = _mode_case(mode)
    assert Image.open(io.BytesIO(data)).mode == mode.split("+")[0]
    root = make_surd([{"file_name": "x.img", "text": "t", "prompt": "p"}], {"x.img": data})
    im = scan(root)[0].image()
    assert im.mode == "RGB" and im.size == (7, 5)
    got = np.asarray(im).astype(np.int64)
    assert np.abs(got - want).max() <= 1, (got[0, :4], want[0, :4])


@pytest.mark.parametrize("size", [(1, 1), (3000, 2)])
def test_any_size(size):
    im = decode_rgb(png_bytes(size=size, mode="L", color=7))
    assert im.size == size and im.mode == "RGB" and im.getpixel((0, 0)) == (7, 7, 7)


def _png_with_header_size(w, h):
    data = bytearray(png_bytes(size=(1, 1)))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_decompression_bomb_refused_without_decoding(make_surd, monkeypatch):
    from PIL import ImageFile

    decoded = []
    orig = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or orig(self))
    bomb = _png_with_header_size(100_000, 100_000)
    mid = _png_with_header_size(9000, 9000)  # over our 8192^2 default, under PIL's own error threshold
    root = make_surd([GOOD[0], {"file_name": "bomb.png", "text": "a", "prompt": "b"},
                      {"file_name": "mid.png", "text": "a", "prompt": "b"}],
                     {**good_files(), "bomb.png": bomb, "mid.png": mid})
    ds = scan(root)
    assert ds.report.counts == {"too many pixels": 2}
    assert decoded == [(8, 8)], "only the good image was decoded"
    small = make_surd([GOOD[0]], good_files())
    assert scan(small, max_pixels=64).report.counts == {}  # 8x8 = 64 pixels: at the limit is fine
    with pytest.raises(SurpipeError, match="no usable rows"):
        scan(small, max_pixels=63)
    s = scan(small, check_images="none")[0]
    with pytest.raises(SurpipeError, match="too many pixels"):
        Sample(s.key, s.simple, s.complex, s.file_name, s.path, max_pixels=10).image()
    assert DEFAULT_MAX_PIXELS == 8192 * 8192


# --------------------------------------------------------------------------- pack and shards

ODD = [
    {"file_name": "images/p0.png", "text": "a woman 👩‍🚀 holding a \"golden\" sign\nsecond line",
     "prompt": "(masterpiece:1.2), 8k, 東京, <lora:detail:0.6>, tab\there", "extra": [1, 2]},
    {"file_name": "images/j1.jpg", "text": "  leading and trailing spaces  ", "prompt": "\\ back\\slash \u2028 ls"},
    {"file_name": "sub dir/p2.png", "text": "ü", "prompt": "x" * 3000},
    {"file_name": "images/p3.png", "text": "three", "prompt": "three yellow stars"},
    {"file_name": "images/p4.PNG", "text": "four", "prompt": "four"},
]


def _odd_folder(make_surd):
    files = {"images/p0.png": png_bytes(mode="RGBA", color=(1, 2, 3, 4)),
             "images/j1.jpg": png_bytes(fmt="JPEG"),
             "sub dir/p2.png": png_bytes(size=(3, 9)),
             "images/p3.png": png_bytes(mode="I;16", color=1234),
             "images/p4.PNG": png_bytes(mode="P", color=3)}
    return make_surd([*ODD, "{broken"], files)


def test_pack_round_trip_byte_exact(make_surd, tmp_path, capsys):
    from stages.pack import PackConfig, run

    src = _odd_folder(make_surd)
    a = scan(src)
    out = tmp_path / "shards"
    report = run(PackConfig(src=str(src), out=str(out), samples_per_shard=2, progress=False))
    assert "kept 5" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["pack_config.json", "pack_report.json",
                                       "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    saved = json.loads((out / "pack_report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["fingerprint"] == a.fingerprint() and saved["scan"]["counts"] == {"malformed JSON": 1}
    assert json.loads((out / "pack_config.json").read_text())["samples_per_shard"] == 2
    with tarfile.open(out / "shard-000000.tar") as tf:
        assert tf.getnames() == ["images_p0.json", "images_p0.png", "images_j1.jpg", "images_j1.json"]
    for source in (out, out / "shard-{000000..000002}.tar"):
        b = scan(source)
        assert b.report.kept == 5 and b.report.skipped == []
        assert [s.key for s in b] == [s.key for s in a]
        assert [(s.simple, s.complex) for s in b] == [(r["text"], r["prompt"]) for r in ODD]
        assert [s.image_bytes() for s in b] == [s.image_bytes() for s in a]
        assert b.fingerprint() == a.fingerprint()
        assert [np.asarray(s.image()).tolist() for s in b] == [np.asarray(s.image()).tolist() for s in a]
    assert b[4].file_name == "images_p4.png" and b[2].file_name == "sub_dir_p2.png"
    assert len(scan(out / "shard-000001.tar")) == 2
    # same input, byte-identical shards
    run(PackConfig(src=str(src), out=str(tmp_path / "again"), samples_per_shard=2, progress=False))
    for n in ("shard-000000.tar", "shard-000002.tar"):
        assert (out / n).read_bytes() == (tmp_path / "again" / n).read_bytes()
    # webdataset itself reads them, keys intact
    import webdataset as wds

    got = [x["__key__"] for x in wds.WebDataset(str(out / "shard-{000000..000002}.tar"), shardshuffle=False)]
    assert got == [s.key for s in a]


def test_pack_refuses_existing_shards_then_overwrites(make_surd, tmp_path, capsys):
    from stages.pack import PackConfig, run

    src = _odd_folder(make_surd)
    out = tmp_path / "o"
    run(PackConfig(src=str(src), out=str(out), samples_per_shard=1, progress=False))
    assert len([n for n in os.listdir(out) if n.endswith(".tar")]) == 5
    with pytest.raises(SurpipeError, match="--overwrite"):
        run(PackConfig(src=str(src), out=str(out), progress=False))
    run(PackConfig(src=str(src), out=str(out), overwrite=True, progress=False))
    assert sorted(n for n in os.listdir(out) if not n.endswith(".json")) == ["shard-000000.tar"]
    assert len(scan(out)) == 5


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def test_bad_webdataset_samples_are_counted(tmp_path):
    j = json.dumps({"text": "t", "prompt": "p"}).encode()
    img = png_bytes()
    _tar(tmp_path / "shard-000000.tar", [
        ("ok.json", j), ("ok.png", img),
        ("nojson.png", img),
        ("noimg.json", j),
        ("badjson.json", b"{nope"), ("badjson.png", img),
        ("badimg.json", j), ("badimg.jpg", b"not a jpeg"),
        ("noprompt.json", json.dumps({"text": "t"}).encode()), ("noprompt.png", img),
        ("ok.json", j), ("ok.png", img),  # duplicate key further on
    ])
    ds = scan(tmp_path)
    assert [s.key for s in ds] == ["ok"] and ds[0].image_bytes() == img and ds[0].file_name == "ok.png"
    assert ds.report.counts == {"missing .json member": 1, "missing image member": 1, "malformed JSON": 1,
                                "not an image": 1, "missing field 'prompt'": 1, "duplicate key": 1}
    assert [s[0] for s in ds.report.skipped] == [1, 2, 3, 4, 5, 6]
    assert "sample 3: shard-000000.tar:badjson" in ds.report.summary()


# --------------------------------------------------------------------------- CLI and bundled sample


def test_cli_pack(make_surd, tmp_path, capsys):
    from stages.cli import main

    src = _odd_folder(make_surd)
    assert main(["pack", str(src), str(tmp_path / "o"), "--samples-per-shard", "3"]) == 0
    out = capsys.readouterr().out
    assert "read 6 rows, kept 5, skipped 1" in out and "malformed JSON" in out and "line 6" in out
    assert main(["pack", str(tmp_path / "missing"), str(tmp_path / "o2")]) == 1
    err = capsys.readouterr().err
    assert "surpipe: error: no such file or folder" in err and "Traceback" not in err
    assert main(["pack", str(src), str(tmp_path / "o")]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["pack", str(src), str(tmp_path / "o3"), "--strict"]) == 1
    assert "line 6" in capsys.readouterr().err


def test_bundled_sample(sample_dir):
    ds = scan(sample_dir)
    assert ds.report.skipped == [] and 48 <= len(ds) <= 100
    cats = {s.key.split("_")[1] for s in ds}
    assert cats == {"action", "color", "counting"}
    rows = [json.loads(l) for l in (sample_dir / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {r["category"] for r in rows} == cats
    assert any("<lora:" in r["prompt"] for r in rows) and any(":1." in r["prompt"] for r in rows)
    # a lower bound on CLIP's token count: CLIP's pre-tokenizer splits words, single digits and punctuation
    n_tokens = [len(re.findall(r"[A-Za-z]+|\d|[^\sA-Za-z\d]", r["prompt"])) + 2 for r in rows]
    assert sum(n > 77 for n in n_tokens) >= 5, "some complex prompts exceed CLIP's 77-token window"
    assert all(len(r["text"].split()) <= 20 for r in rows), "simple prompts are short sentences"
    total = sum(f.stat().st_size for f in sample_dir.rglob("*") if f.is_file())
    assert total < 2 * 1024 * 1024
    im = ds[0].image()
    assert im.mode == "RGB" and im.size == (128, 128)
