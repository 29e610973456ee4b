"""Per-row prompt categories (issue 17, point 4 support): read from the metadata field ``category``
(imagefolder and shards), kept by ``pack``, stored as ``prompts/category`` when any row has one,
returned by ``FeatureStore.categories()``; never part of matching, so older stores keep working."""

from __future__ import annotations

import collections
import json
import pickle
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import zarr

from surpipe.errors import SurpipeError
from helpers import png_bytes

REPO = Path(__file__).resolve().parents[2]

# (metadata value, the label expected); absent key: the field is missing on that line
_LABELS = [("red", "red"), (None, None), ("  ", None), (3, "3"), (True, "true"), (["a"], None),
           ({"x": 1}, None), ("  padded ", "padded"), ("absent", None), ("\u200b", None), (2.5, "2.5")]


def _surd(make_surd, labels=_LABELS, field="category", broken=(), name=None):
    files, lines = {}, []
    for i, (value, _) in enumerate(labels):
        files[f"im{i}.png"] = b"not an image" if i in broken else png_bytes((8 + i, 8), (10 * i, 50, 9))
        line = {"file_name": f"im{i}.png", "text": f"a cube {i}", "prompt": f"a cube {i}, studio light"}
        if value != "absent":
            line[field] = value
        lines.append(line)
    return make_surd(lines, files, name=name)


def _plain_categories(path) -> list[str] | None:
    """The stored labels read with plain zarr (no surpipe), or None without the array."""
    root = zarr.open_group(str(path), mode="r")
    if "category" not in root["prompts"]:
        return None
    return [str(c) for c in root["prompts"]["category"][:].tolist()]


def test_imagefolder_categories_reach_samples_and_the_store_in_row_order(make_surd, tmp_path):
    from surpipe.data import open_dataset
    from surpipe.store import FeatureStore, create_store

    data = _surd(make_surd, broken={1})  # a bad row in between: labels stay aligned with the rows kept
    ds = open_dataset(str(data), progress=False)
    want = [(f"im{i}", lab) for i, (_, lab) in enumerate(_LABELS) if i != 1]
    assert [(s.key, s.category) for s in ds] == want
    # odd labels never make a row bad: only the broken image was skipped
    assert [line for line, _, _ in ds.report.skipped] == [2]
    create_store(tmp_path / "s.zarr", ds)
    expected = ["" if lab is None else lab for _, lab in want]
    assert _plain_categories(tmp_path / "s.zarr") == expected
    got = FeatureStore(tmp_path / "s.zarr").categories()
    assert isinstance(got, np.ndarray) and got.tolist() == expected
    assert FeatureStore(tmp_path / "s.zarr").keys().tolist() == [k for k, _ in want]


def test_category_field_is_chosen_and_checked(make_surd):
    from surpipe.data import open_dataset

    data = _surd(make_surd, labels=[("x", "x"), ("y", "y")], field="group")
    assert [s.category for s in open_dataset(str(data), check_images="none", progress=False)] == [None, None]
    ds = open_dataset(str(data), check_images="none", progress=False, category_field="group")
    assert [s.category for s in ds] == ["x", "y"]
    with pytest.raises(SurpipeError, match="--category-field"):
        open_dataset(str(data), check_images="none", progress=False, category_field=" ")


def test_sample_positional_construction_and_pickle_keep_working(tmp_path):
    from surpipe.data import Sample

    s = Sample("k", "a", "b", "f.png", str(tmp_path / "f.png"), -1, -1, 10)
    assert s.category is None and s.max_pixels == 10
    c = Sample("k", "a", "b", "f.png", category="color")
    assert pickle.loads(pickle.dumps(c)) == c and pickle.loads(pickle.dumps(c)).category == "color"


def test_dataset_without_categories_stores_none(make_surd, tmp_path):
    from surpipe.data import open_dataset
    from surpipe.store import FeatureStore, create_store

    for name, labels in (("nofield", [("absent", None)] * 3), ("allnull", [(None, None), ("", None), ([], None)])):
        ds = open_dataset(str(_surd(make_surd, labels=labels, name=name)), check_images="none", progress=False)
        assert all(s.category is None for s in ds)
        create_store(tmp_path / f"{name}.zarr", ds)
        assert _plain_categories(tmp_path / f"{name}.zarr") is None  # no array written at all
        assert FeatureStore(tmp_path / f"{name}.zarr").categories() is None


def test_pack_keeps_categories_and_shards_give_the_same_store_rows(make_surd, tmp_path):
    from surpipe.data import open_dataset
    from surpipe.data.shards import write_shards
    from surpipe.store import FeatureStore, create_store

    ds = open_dataset(str(_surd(make_surd)), progress=False)
    shards = write_shards(ds, str(tmp_path / "packed"), samples_per_shard=4, progress=False)
    # the shards' .json members, read with tarfile: "category" only where the row has one
    metas = {}
    for sh in shards:
        with tarfile.open(sh) as tf:
            for m in tf:
                if m.name.endswith(".json"):
                    metas[m.name[:-5]] = json.loads(tf.extractfile(m).read())
    assert {k: m.get("category", "MISSING") for k, m in metas.items()} == \
        {f"im{i}": "MISSING" if lab is None else lab for i, (_, lab) in enumerate(_LABELS)}
    back = open_dataset(str(tmp_path / "packed"), progress=False)
    assert [(s.key, s.category) for s in back] == [(s.key, s.category) for s in ds]
    assert back.fingerprint() == ds.fingerprint()
    create_store(tmp_path / "s.zarr", back)
    assert FeatureStore(tmp_path / "s.zarr").categories().tolist() == \
        ["" if lab is None else lab for _, lab in _LABELS]


def test_store_made_before_categories_opens_matches_and_verifies(make_surd, tmp_path):
    from surpipe.store import FeatureStore
    from surpipe.store.opening import open_store
    from surpipe.store.verify import verify_store

    data = _surd(make_surd, labels=[("red", "red"), ("blue", "blue"), ("red", "red")])
    old = tmp_path / "old.zarr"
    # a store as surpipe made them before categories were kept: the same rows, no prompts/category
    open_store(str(data), str(old), progress=False)
    shutil.rmtree(old / "prompts" / "category")
    assert _plain_categories(old) is None
    ds, st = open_store(str(data), str(old), progress=False)  # the dataset has categories now: still matches
    assert not st.created_now and [s.key for s in ds] == ["im0", "im1", "im2"]
    assert st.categories() is None
    rep = verify_store(old)
    assert not rep.problems and not rep.warnings
    # and a store with categories matches a dataset whose labels changed (labels are not row identity)
    new = tmp_path / "new.zarr"
    open_store(str(data), str(new), progress=False)
    relabelled = _surd(make_surd, labels=[("x", "x"), ("absent", None), ("y", "y")], name="relabelled")
    _, st2 = open_store(str(relabelled), str(new), progress=False)
    assert not st2.created_now and st2.categories().tolist() == ["red", "blue", "red"]


def test_verify_checks_the_category_array(make_surd, tmp_path):
    from surpipe.store import FeatureStore, create_store
    from surpipe.data import open_dataset
    from surpipe.store.verify import verify_store

    ds = open_dataset(str(_surd(make_surd)), check_images="none", progress=False)
    create_store(tmp_path / "s.zarr", ds)
    rep = verify_store(tmp_path / "s.zarr")
    assert not rep.problems and not rep.warnings
    chunk = tmp_path / "s.zarr" / "prompts" / "category" / "c" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    rep = verify_store(tmp_path / "s.zarr")
    assert [p.where for p in rep.problems] == ["prompts/category"]
    assert "checksum" in rep.problems[0].message
    with pytest.raises(SurpipeError, match="prompts/category cannot be read"):
        FeatureStore(tmp_path / "s.zarr").categories()


def test_bundled_sample_store_has_its_categories(tmp_path, sample_dir):
    from surpipe.store import FeatureStore
    from helpers import sample_store

    rows = [json.loads(ln) for ln in (sample_dir / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
            if ln.strip()]
    want = [r["category"] for r in rows]
    cats = FeatureStore(sample_store(tmp_path / "s.zarr")).categories()
    assert cats.tolist() == want
    counts = collections.Counter(cats.tolist())
    assert counts == collections.Counter(want) and len(counts) >= 3 and min(counts.values()) >= 16


def test_category_array_name_is_spelled_in_one_module():
    rx = re.compile(r"[\"']prompts/category[\"']")
    where = sorted(str(p.relative_to(REPO)) for d in ("surpipe", "stages") for p in sorted((REPO / d).rglob("*.py"))
                   if rx.search(p.read_text(encoding="utf-8")))
    assert where == ["surpipe/store/core.py"]
