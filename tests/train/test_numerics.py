"""PendingSteps (surpipe.train.numerics): the per-step numbers kept on the device, read at a sync
point, against hand-made steps."""

import math

import pytest
import torch

from surpipe.train.numerics import PendingSteps, finite_flags


def _step(p, loss, grads_ok=(True, True), weights_ok=(True, True), gn=1.5):
    terms = {"loss": torch.tensor(loss, dtype=torch.float64), "denoise": None,
             "llm": torch.tensor(0.25, dtype=torch.float64), "prompt": torch.tensor(0.5, dtype=torch.float64)}
    return terms, ([0, 1], torch.tensor(grads_ok)), torch.tensor(gn), torch.tensor(weights_ok), {"lr": 1e-4}


def test_settle_reads_every_pending_step_and_finds_the_first_problem():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    pend = PendingSteps([a, b], {id(a): "adapter.a", id(b): "adapter.b"})
    pend.add(1, *_step(None, 1.0))
    pend.add(2, *_step(None, 2.0, grads_ok=(True, False)))
    pend.add(3, *_step(None, float("nan"), weights_ok=(False, True)))
    rows, problem = pend.settle()
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[0]["loss"] == 1.0 and rows[1]["grad_norm"] == 1.5
    assert rows[0]["denoise"] is None and rows[0]["llm"] == 0.25 and rows[0]["lr"] == 1e-4
    assert math.isnan(rows[2]["loss"])
    assert problem == (2, "the gradient is not finite in adapter.b")  # the first bad step, its first check
    assert pend.settle() == ([], None)  # read once
    pend.add(4, *_step(None, float("inf")))
    assert pend.settle()[1] == (4, "the total loss is not finite (inf)")
    pend.add(5, *_step(None, 1.0, weights_ok=(False, True)))
    assert pend.settle()[1] == (5, "a weight became non-finite after the optimizer step in adapter.a")


def test_finite_flags():
    flags = finite_flags([torch.ones(3), torch.tensor([1.0, float("nan")]), torch.tensor([float("inf")])])
    assert flags.tolist() == [True, False, False] and finite_flags([]) is None


def test_a_logged_row_carries_the_interval_means_of_the_host_times():
    from surpipe.train.numerics import host_means

    rows = [{"step": s, "data_wait_s": w, "forward_s": 1.0, "backward_s": 2.0, "prefetch_s": 0.0,
             "optimizer_s": 0.5, "lr": 1e-3} for s, w in ((4, 0.1), (5, 0.3), (6, 0.8))]
    got = host_means(rows)
    assert got == pytest.approx({"data_wait_s": 0.4, "forward_s": 1.0, "backward_s": 2.0, "prefetch_s": 0.0,
                                 "optimizer_s": 0.5})
    assert "lr" not in got and host_means([]) == {}
