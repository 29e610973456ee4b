"""surpipe.train.prefetch: batches read one step ahead are the batches of today, in the same order,
with the position of the batch in use; a read that fails ahead of its turn fails in its turn."""

import json

import numpy as np
import pytest
import torch

from helpers.stores import block_reader
from surpipe.errors import SurpipeError
from surpipe.train.data import Position, SampleStream
from surpipe.train.prefetch import DevicePrefetcher


@pytest.mark.parametrize("workers", [0, 1])
def test_read_ahead_yields_the_same_batches_in_the_same_order(store, workers):
    """Over two epochs (24 rows, batches of 5 across blocks and the epoch boundary), with held-out
    rows left out, read-ahead at every step or at none gives the plain stream's batches and, with
    each, the position the plain stream has after it."""
    reader = block_reader(store)
    keep = np.ones(reader.num_rows, bool)
    keep[[2, 11, 17]] = False
    ref = SampleStream(reader, 5, seed=4, keep=keep)
    it = iter(ref)
    want = [(next(it), ref.position.to_dict()) for _ in range(9)]
    for ahead in (True, False):
        stream = SampleStream(reader, 5, seed=4, keep=keep, workers=workers)
        seen = []
        data = DevicePrefetcher(stream, lambda b: (seen.append(1), {k: torch.from_numpy(v) for k, v in b.items()})[1],
                                "cpu")
        for i, (batch, pos) in enumerate(want):
            got = next(data)
            assert got.position == pos
            assert set(got.staged) == set(batch)
            for k, v in batch.items():
                np.testing.assert_array_equal(got.staged[k].numpy(), v, err_msg=f"{k} of batch {i}")
            if ahead:
                data.prefetch()
                data.prefetch()  # a second call reads nothing more
                assert len(seen) == i + 2
            else:
                assert len(seen) == i + 1


class _Failing:
    """A stream whose third batch cannot be read."""

    def __init__(self):
        self.position = Position()

    def __iter__(self):
        for i in range(5):
            if i == 2:
                raise SurpipeError("store s: block 1 is not marked done")
            self.position = Position(0, i + 1, 0)
            yield {"x": np.full(2, i)}


def test_a_read_failing_ahead_of_its_turn_is_raised_in_its_turn():
    data = DevicePrefetcher(_Failing(), lambda b: b, "cpu")
    assert next(data).staged["x"][0] == 0
    data.prefetch()
    first = next(data)  # batch 1 arrives although the read after it failed
    assert first.staged["x"][0] == 1 and first.position == {"epoch": 0, "block_idx": 2, "row_idx": 0}
    data.prefetch()  # reads batch 2: fails, kept for its turn
    with pytest.raises(SurpipeError, match="not marked done"):
        next(data)


def test_the_run_reads_no_batch_past_its_last_step_and_checkpoints_the_used_position(tmp_path, store,
                                                                                     tiny_models, monkeypatch):
    """5 steps of 2 micro-batches read exactly 10 batches, and each checkpoint records the position
    after its step's last batch (a stream without read-ahead has it), not after the one read ahead."""
    from helpers.stores import _args
    from stages.cli import main
    from surpipe.train.recipe import TrainRecipe
    from surpipe.train.run_folder import RunFolder

    staged = []
    orig = TrainRecipe._stage
    monkeypatch.setattr(TrainRecipe, "_stage", lambda self, b: (staged.append(1), orig(self, b))[1])
    out = tmp_path / "run"
    assert main(_args(store, tiny_models / "sd", out, "--max-steps", "5", "--batch-size", "3", "--seed", "7",
                      "--checkpoint-every", "2", "--keep-checkpoints", "5")) == 0
    assert len(staged) == 10
    ref = SampleStream(block_reader(store), 3, seed=7)
    it = iter(ref)
    want = {}
    for i in range(1, 11):
        next(it)
        want[i] = ref.position.to_dict()
    states = [json.loads((c / "state.json").read_text()) for c in RunFolder(out).checkpoint_list()]
    # steps 2 and 4 were saved while the next batch was already read ahead
    assert [(s["step"], s["position"]) for s in states] == [(2, want[4]), (4, want[8]), (5, want[10])]


def test_the_training_unet_attends_with_torch_sdpa(store, tiny_models, tmp_path):
    """Every attention layer of the frozen UNet the recipe trains through runs torch's
    scaled_dot_product_attention (flash / memory-efficient kernels on a GPU), not the einsum path."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from surpipe.train.config import TrainConfig
    from surpipe.train.recipe import TrainRecipe

    r = TrainRecipe(TrainConfig(store=str(store), model=str(tiny_models / "sd"), out=str(tmp_path / "r"),
                                llm_layer=3, device="cpu", nhead=4, dim_feedforward=64, workers=0))
    r.setup()
    procs = r.unet.attn_processors
    assert procs and {type(p) for p in procs.values()} == {AttnProcessor2_0}
