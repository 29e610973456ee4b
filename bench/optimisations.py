"""Candidate optimisations of the training step, each measured A/B in one run (alternating reps).

    python bench/optimisations.py [--quick] --out FILE.json [--cache DIR]

* ``sdpa_adapter``: the adapter's attention block (scores = Q K^T / sqrt(D), softmax, times V = x)
  computed with ``torch.nn.functional.scaled_dot_product_attention`` instead of matmul + softmax +
  matmul. Applied here by a subclass in this script (no library edit); checks the outputs match,
  then times adapter forward + backward at the authors' width (D = 768, 8 heads, FFN 2048, L = 77).
* ``channels_last_unet``: the frozen UNet (model and latents) in ``torch.channels_last`` memory
  format vs contiguous, forward + backward to the text conditioning (what training does).

Loader-side candidates (workers, block size, codec, storage dtype) are measured by
bench/store_io.py and bench/train_step.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

QUICK = dict(adapter_batch=4, adapter_width=768, reps=6, unet_model="tiny", unet_batch=4)
FULL = dict(adapter_batch=4, adapter_width=768, reps=12, unet_model="mid", unet_batch=2)


def _ab(fa, fb, reps: int) -> tuple[list[float], list[float]]:
    fa(); fb()
    ta, tb = [], []
    for _ in range(reps):
        ta += C.timeit(fa, 1, warmup=0)
        tb += C.timeit(fb, 1, warmup=0)
    return ta, tb


def sdpa_adapter(batch: int, width: int, reps: int) -> dict:
    import torch
    import torch.nn.functional as F

    from surpipe.adapter import SURAdapter, SURAttention

    class SDPAAttention(SURAttention):
        def forward(self, x, e):
            q = self.query_layer(e)
            k = self.key_layer(x)
            w = x + F.scaled_dot_product_attention(q, k, x)  # default scale 1/sqrt(D): the same
            return self.output_layer(w) + w

    torch.manual_seed(0)
    a = SURAdapter(width=width, nhead=8, dim_feedforward=2048, dropout=0.0).train()
    b = SURAdapter(width=width, nhead=8, dim_feedforward=2048, dropout=0.0).train()
    sd = a.attention.state_dict()
    b.attention = SDPAAttention(width)
    b.load_state_dict(a.state_dict())
    b.attention.load_state_dict(sd)
    x = torch.randn(batch, 77, width)
    with torch.no_grad():  # compare the attention block itself (fc is zero at init, hiding it in `out`)
        e = a.encode(x)
        diff = float((a.attention(x, e) - b.attention(x, e)).abs().max())

    def step(m):
        def f():
            out, e, _ = m(x, return_aux=True)
            (out.square().mean() + e.square().mean()).backward()  # autograd runs through attention too
            m.zero_grad(set_to_none=True)
        return f

    ta, tb = _ab(step(a), step(b), reps)
    return {"batch": batch, "width": width, "max_abs_diff": diff,
            "baseline_s_median": round(C.median(ta), 5), "candidate_s_median": round(C.median(tb), 5),
            "speedup": round(C.median(ta) / C.median(tb), 3)}


def channels_last_unet(kind: str, batch: int, reps: int, cache: Path) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    mdir = C.build_sd(kind, Path(cache) / f"sd-{kind}")
    u0 = UNet2DConditionModel.from_pretrained(str(mdir), subfolder="unet").eval().requires_grad_(False)
    u1 = UNet2DConditionModel.from_pretrained(str(mdir), subfolder="unet").eval().requires_grad_(False)
    u1.to(memory_format=torch.channels_last)
    s = u0.config.sample_size
    torch.manual_seed(0)
    x = torch.randn(batch, u0.config.in_channels, s, s)
    xl = x.contiguous(memory_format=torch.channels_last)
    c = torch.randn(batch, 77, u0.config.cross_attention_dim)
    t = torch.randint(0, 1000, (batch,))
    with torch.no_grad():
        diff = float((u0(x, t, c).sample - u1(xl, t, c).sample).abs().max())

    def step(u, xx):
        def f():
            cc = c.clone().requires_grad_(True)
            u(xx, t, cc).sample.square().mean().backward()
        return f

    ta, tb = _ab(step(u0, x), step(u1, xl), reps)
    return {"model": kind, "batch": batch, "latent": [u0.config.in_channels, s, s], "max_abs_diff": diff,
            "baseline_s_median": round(C.median(ta), 4), "candidate_s_median": round(C.median(tb), 4),
            "speedup": round(C.median(ta) / C.median(tb), 3)}


def run(quick: bool = True, cache: Path | None = None, **over) -> dict:
    with C.bench_run(quick, QUICK, FULL, over, "surpipe-bench-opt-", cache=cache) as (p, _, _tmp, cache, res):
        res["sdpa_adapter"] = sdpa_adapter(p["adapter_batch"], p["adapter_width"], p["reps"])
        res["channels_last_unet"] = channels_last_unet(p["unet_model"], p["unet_batch"], p["reps"], cache)
    return res


def summary(d: dict) -> list[tuple[str, str]]:
    a, u = d["sdpa_adapter"], d["channels_last_unet"]
    return [(f"opt: SDPA in adapter attention (D={a['width']}, B={a['batch']}) speedup",
             f"{a['speedup']}x (max diff {a['max_abs_diff']:.1e})"),
            (f"opt: channels-last UNet {u['model']} fwd+bwd speedup", f"{u['speedup']}x")]


def main(argv=None) -> int:
    return C.model_bench_main(argv, __doc__, "optimisations.py", run, summary, models=False)


if __name__ == "__main__":
    sys.exit(main())
