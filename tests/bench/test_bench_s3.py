"""bench/store_io.py --s3: the loader over a store on a local S3 server (moto, 127.0.0.1), through the
read-through chunk cache. Behaviour only, never timings: the JSON keys exist, the remote requests are
counted in the DataLoader workers too, and epoch 2 fetches no chunk bytes."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")


def test_store_io_s3_tiny_counts_worker_gets_and_epoch_two_fetches_no_chunk_bytes(tmp_path):
    import store_io

    d = store_io.run_s3(True, cache=tmp_path / "cache", rows=8, loader_rows=64, block_rows=8, batch=4,
                        workers=(0, 2), shard_blocks=(1, 4))
    s = d["s3"]
    assert d["tiny"] is True and "moto" in s["server"]
    step = s["predicted_step_ms_per_batch"]
    assert step == pytest.approx(s["predicted_gpu_step"]["ms_per_sample"] * 4)
    assert set(s["runs"]) == {"local", "s3_shard1", "s3_shard4"}
    st = s["stores"]
    # 8 blocks of 9 feature arrays: one object per block unsharded, one per 4 blocks sharded
    assert st["s3_shard1"]["chunk_objects"] == 72 and st["s3_shard4"]["chunk_objects"] == 18
    for name, by_w in s["runs"].items():
        assert set(by_w) == {"0", "2"}, name
        for w, ep in by_w.items():
            for e in ("epoch1", "epoch2"):
                r = ep[e]
                for k in ("samples_per_s", "loader_ms_per_batch", "data_wait_share", "stall_share_if_overlapped",
                          "after_first_batch_samples_per_s", "first_batch_s"):
                    assert k in r, (name, w, e, k)
                ms = r["loader_ms_per_batch"]
                assert r["data_wait_share"] == pytest.approx(ms / (ms + step), abs=1e-3)
            if name == "local":
                assert "remote" not in ep["epoch1"]
                continue
            e1, e2 = ep["epoch1"]["remote"], ep["epoch2"]["remote"]
            # epoch 1 (cold cache) fetched every chunk object of the 7 arrays training reads (not the
            # prompt lengths), counted in whichever process read it: with 2 workers the main process
            # reads no block, so the counts come from the workers
            objects = 7 * (8 if name == "s3_shard1" else 2)
            if name == "s3_shard1" or w == "0":
                assert e1["chunk_gets"] == objects, (name, w, e1)
            else:  # two workers reading blocks of one shard at once may both fetch it
                assert objects <= e1["chunk_gets"] <= 2 * objects, (name, w, e1)
            assert e1["chunk_bytes"] > 0
            if w == "2":
                assert e1["processes"] == 2, e1
            # epoch 2: every chunk from the local cache, nothing fetched remotely
            assert e2["chunk_gets"] == 0 and e2["chunk_bytes"] == 0, (name, w, e2)
            assert ep["cache_MB"] > 0
    assert store_io.summary_s3(d)
