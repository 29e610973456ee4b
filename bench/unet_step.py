"""What the adapter's gradient needs from the frozen UNet, at the SD 1.5 architecture (random weights
from the published configs, 512 px, batch 1, CPU fp32 unless --bf16):

    python bench/unet_step.py --out bench/results/unet_step.json          # ~5 min on 2 CPU cores
    python bench/unet_step.py --tiny --out /tmp/u.json                     # seconds (tiny UNet)

Measures, as medians of alternating repetitions in one run (ratios, on a shared machine):
- the authors' gradient path: a step WITH the UNet forward (its loss is only logged) against the
  step surpipe takes on the steps --log-denoise-every skips (adapter + KL terms only);
- the paper's gradient path: the UNet forward, and the backward that reaches the adapter through
  it; the frozen UNet needs input gradients only, so no weight gradient may exist afterwards;
- the same forward/backward under CPU bf16 autocast (with --bf16).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_result  # noqa: E402
from cost_model import ADAPTER, SD15_UNET  # noqa: E402  (the published configs' one home)

TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
                 norm_num_groups=32)
TINY_ADAPTER = dict(width=32, nhead=4, dim_feedforward=64, num_layers=2)


def _median_times(fns: dict, reps: int) -> dict:
    """{name: median seconds}, the functions run alternately so that load changes hit all alike."""
    out = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            out[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny UNet (seconds; for the test)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bf16", action="store_true", help="also time forward/backward under CPU bf16 autocast")
    ap.add_argument("--channels-last", action="store_true", help="also time forward/backward with the UNet and "
                                                                 "its input in channels-last memory format")
    ap.add_argument("--only-paper", action="store_true", help="skip the authors'-path cases")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "unet_step.json"))
    args = ap.parse_args(argv)

    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from surpipe.adapter import SURAdapter
    from surpipe.losses import LLMProjection, llm_loss, prompt_loss

    torch.manual_seed(0)
    ucfg, acfg = (TINY_UNET, TINY_ADAPTER) if args.tiny else (SD15_UNET, ADAPTER)
    unet = UNet2DConditionModel(**ucfg).requires_grad_(False).eval()
    adapter = SURAdapter(**acfg).train()
    proj = LLMProjection(64 if args.tiny else 5120, acfg["width"], seed=0)
    sched = DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-5)
    lat = ucfg["sample_size"]
    D = acfg["width"]
    x = torch.randn(1, 77, D)
    cc = torch.randn(1, 77, D)
    llm = torch.randn(1, proj.llm_size)
    latents = torch.randn(1, 4, lat, lat)

    def kl_terms():
        out, e, _ = adapter(x, return_aux=True)
        return out, 1e-5 * llm_loss(proj(llm), e) + 1e-5 * prompt_loss(cc, out)

    def noisy():
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (1,))
        return sched.add_noise(latents, noise, t), t, noise

    def authors_full():  # the UNet runs on the detached output: its loss is logged, never differentiated
        out, kl = kl_terms()
        n, t, noise = noisy()
        with torch.no_grad():
            denoise = torch.nn.functional.mse_loss(unet(n, t, out.detach()).sample, noise)
        (kl + 0 * denoise).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def authors_skip():
        _, kl = kl_terms()
        noisy()  # the same random draws
        kl.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    split = {}

    def paper(autocast: bool, key: str, channels_last: bool = False):
        fmt = torch.channels_last if channels_last else torch.contiguous_format

        def step():
            unet.to(memory_format=fmt)
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
            out, kl = kl_terms()
            n, t, noise = noisy()
            t0 = time.perf_counter()
            with ctx:
                pred = unet(n.contiguous(memory_format=fmt), t, out).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise) + kl
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            split.setdefault(key, []).append((t1 - t0, t2 - t1))
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    reps = max(1, args.reps)
    authors = ({"with_unet": float("nan"), "skip": float("nan")} if args.only_paper else
               _median_times({"with_unet": authors_full, "skip": authors_skip}, reps))
    fns = {"fp32": paper(False, "fp32")}
    if args.bf16:
        fns["bf16"] = paper(True, "bf16")
    if args.channels_last:
        fns["fp32_channels_last"] = paper(False, "fp32_channels_last", channels_last=True)
    paper_t = _median_times(fns, reps)
    weight_grads = [n for n, p in unet.named_parameters() if p.grad is not None]
    res = {
        "architecture": "tiny" if args.tiny else "sd15 (published configs, random weights)",
        "unet_params_M": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
        "adapter_params_M": round(sum(p.numel() for p in adapter.parameters()) / 1e6, 1),
        "latent": [4, lat, lat], "batch": 1, "reps": reps, "threads": torch.get_num_threads(),
        "authors_path_s": {k: round(v, 4) for k, v in authors.items()},
        "authors_skip_speedup": round(authors["with_unet"] / authors["skip"], 1),
        "paper_path_step_s": {k: round(v, 3) for k, v in paper_t.items()},
        "paper_forward_backward_s": {
            k: {"forward": round(statistics.median(f for f, _ in v), 3),
                "backward": round(statistics.median(b for _, b in v), 3),
                "backward_over_forward": round(statistics.median(b for _, b in v) / statistics.median(f for f, _ in v), 2)}
            for k, v in split.items()},
        "unet_weight_gradients": len(weight_grads),
    }
    def rows(d):
        yield "authors path: step with the UNet forward / without (s)", f"{d['authors_path_s']['with_unet']} / {d['authors_path_s']['skip']}"
        yield "authors path: speed-up of a skipped step", f"{d['authors_skip_speedup']}x"
        for k, v in d["paper_forward_backward_s"].items():
            yield f"paper path {k}: UNet forward / backward (s)", f"{v['forward']} / {v['backward']} ({v['backward_over_forward']}x)"
        yield "UNet weight gradients after backward", d["unet_weight_gradients"]

    return write_result(res, args.out, "python " + " ".join(["bench/unet_step.py", *(argv or sys.argv[1:])]), rows)


if __name__ == "__main__":
    raise SystemExit(main())
