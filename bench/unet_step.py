"""What the adapter's gradient needs from the frozen UNet, at the SD 1.5 architecture (random weights
from the published configs, 512 px):

    python bench/unet_step.py --out bench/results/unet_step.json          # ~5 min on 2 CPU cores, fp32
    python bench/unet_step.py --tiny --out /tmp/u.json                     # seconds (tiny UNet)
    python bench/unet_step.py --device cuda --batch 8 --bf16 --bf16-weights --channels-last --compile \
        --checkpointing --only-paper --out bench/results/unet_step_gpu.json  # one GPU, ~2 min

Measures, as medians of alternating repetitions in one run (ratios, on a shared machine):
- the authors' gradient path: a step WITH the UNet forward (its loss is only logged) against the
  step surpipe takes on the steps --log-denoise-every skips (adapter + KL terms only);
- the paper's gradient path: the UNet forward, and the backward that reaches the adapter through
  it; the frozen UNet needs input gradients only, so no weight gradient may exist afterwards;
- variants of that forward/backward, each on its own copy of the frozen UNet: bf16 autocast over
  fp32 weights (--bf16), bf16 weights under autocast (--bf16-weights), bf16 weights in channels-last
  memory format (--channels-last; fp32 weights on CPU), ``torch.compile`` of the bf16 UNet
  (--compile; its compile time is reported apart, outside the medians) and diffusers' gradient
  checkpointing (--checkpointing). On CUDA each variant also reports its peak GPU memory.
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

from _results import write_result  # noqa: E402
from cost_model import ADAPTER, SD15_UNET  # noqa: E402  (the published configs' one home)

TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
                 norm_num_groups=32)
TINY_ADAPTER = dict(width=32, nhead=4, dim_feedforward=64, num_layers=2)


def _median_times(fns: dict, reps: int, sync=lambda: None) -> dict:
    """{name: median seconds}, the functions run alternately so that load changes hit all alike."""
    out = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            out[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny UNet (seconds; for the test)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:I")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bf16", action="store_true", help="also time forward/backward under bf16 autocast (fp32 weights)")
    ap.add_argument("--bf16-weights", action="store_true", help="also time a bf16 copy of the UNet under autocast")
    ap.add_argument("--channels-last", action="store_true", help="also time forward/backward with the UNet and "
                                                                 "its input in channels-last memory format")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the UNet (bf16 weights "
                                                           "on CUDA); compile time reported apart")
    ap.add_argument("--checkpointing", action="store_true", help="also time the UNet with gradient checkpointing")
    ap.add_argument("--only-paper", action="store_true", help="skip the authors'-path cases")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "unet_step.json"))
    args = ap.parse_args(argv)

    import copy

    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from surpipe.adapter import SURAdapter
    from surpipe.train.losses import LLMProjection, llm_loss, prompt_loss

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    torch.manual_seed(0)
    ucfg, acfg = (TINY_UNET, TINY_ADAPTER) if args.tiny else (SD15_UNET, ADAPTER)
    unet = UNet2DConditionModel(**ucfg).requires_grad_(False).eval().to(dev)
    adapter = SURAdapter(**acfg).train().to(dev)
    proj = LLMProjection(64 if args.tiny else 5120, acfg["width"], seed=0).to(dev)
    sched = DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-5)
    lat, D, B = ucfg["sample_size"], acfg["width"], max(1, args.batch)
    x = torch.randn(B, 77, D, device=dev)
    cc = torch.randn(B, 77, D, device=dev)
    llm = torch.randn(B, proj.llm_size, device=dev)
    latents = torch.randn(B, 4, lat, lat, device=dev)
    sched.alphas_cumprod = sched.alphas_cumprod.to(dev)

    def kl_terms():
        out, e, _ = adapter(x, return_aux=True)
        return out, 1e-5 * llm_loss(proj(llm), e) + 1e-5 * prompt_loss(cc, out)

    def noisy():
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (B,), device=dev)
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

    split, peaks, copies, compile_s = {}, {}, [], {}

    def variant(key: str, model, autocast: bool, channels_last: bool = False):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        ctx = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if autocast else \
            (lambda: torch.autocast(dev.type, enabled=False))

        def step():
            out, kl = kl_terms()
            n, t, noise = noisy()
            sync()
            t0 = time.perf_counter()
            with ctx():
                pred = model(n.contiguous(memory_format=fmt), t, out).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise) + kl
            sync()
            t1 = time.perf_counter()
            loss.backward()
            sync()
            t2 = time.perf_counter()
            split.setdefault(key, []).append((t1 - t0, t2 - t1))
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def frozen_copy(dtype=None, channels_last=False, checkpointing=False):
        m = copy.deepcopy(unet)
        if dtype is not None:
            m = m.to(dtype)
        if channels_last:
            m = m.to(memory_format=torch.channels_last)
        if checkpointing:
            m.enable_gradient_checkpointing()
            m.train()  # diffusers checkpoints only in training mode; the UNet has no dropout/BN to change
        copies.append(m)
        return m

    reps = max(1, args.reps)
    authors = ({"with_unet": float("nan"), "skip": float("nan")} if args.only_paper else
               _median_times({"with_unet": authors_full, "skip": authors_skip}, reps, sync))
    half = torch.bfloat16
    fns = {"fp32": variant("fp32", unet, False)}
    if args.bf16:
        fns["bf16_autocast"] = variant("bf16_autocast", unet, True)
    if args.bf16_weights:
        fns["bf16_weights"] = variant("bf16_weights", frozen_copy(half), True)
    if args.channels_last:
        key = "bf16_channels_last" if cuda else "fp32_channels_last"
        fns[key] = variant(key, frozen_copy(half if cuda else None, channels_last=True), cuda, channels_last=True)
    if args.checkpointing:
        key = "bf16_checkpointing" if cuda else "fp32_checkpointing"
        fns[key] = variant(key, frozen_copy(half if cuda else None, checkpointing=True), cuda)
    if args.compile:
        key = "bf16_compiled" if cuda else "fp32_compiled"
        compiled = torch.compile(frozen_copy(half if cuda else None))
        fns[key] = variant(key, compiled, cuda)
        t0 = time.perf_counter()
        fns[key]()  # compiles forward and backward
        compile_s[key] = round(time.perf_counter() - t0, 1)
    for k, f in fns.items():  # one warm-up each (allocator, kernels, autotuning) outside the medians
        f()
    split.clear()
    paper_t = _median_times(fns, reps, sync)
    if cuda:  # peak memory of one step of each variant alone
        for k, f in fns.items():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
            f()
            sync()
            peaks[k] = {"peak_GB": round(torch.cuda.max_memory_allocated(dev) / 1e9, 2),
                        "step_extra_GB": round((torch.cuda.max_memory_allocated(dev) - base) / 1e9, 2)}
    weight_grads = [n for m in (unet, *copies) for n, p in m.named_parameters() if p.grad is not None]
    fb = {k: {"forward": round(statistics.median(f for f, _ in v), 4),
              "backward": round(statistics.median(b for _, b in v), 4),
              "backward_over_forward": round(statistics.median(b for _, b in v) / statistics.median(f for f, _ in v), 2)}
          for k, v in split.items()}
    res = {
        "architecture": "tiny" if args.tiny else "sd15 (published configs, random weights)",
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "torch": torch.__version__,
        "unet_params_M": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
        "adapter_params_M": round(sum(p.numel() for p in adapter.parameters()) / 1e6, 1),
        "latent": [4, lat, lat], "batch": B, "reps": reps, "threads": torch.get_num_threads(),
        "authors_path_s": {k: round(v, 4) for k, v in authors.items()},
        "authors_skip_speedup": round(authors["with_unet"] / authors["skip"], 1),
        "paper_path_step_s": {k: round(v, 4) for k, v in paper_t.items()},
        "paper_forward_backward_s": fb,
        "paper_step_speedup_vs_fp32": {k: round(paper_t["fp32"] / v, 2) for k, v in paper_t.items()},
        "unet_weight_gradients": len(weight_grads),
    }
    if peaks:
        res["peak_memory"] = peaks
    if compile_s:
        res["compile_s"] = compile_s

    def rows(d):
        if not args.only_paper:
            yield "authors path: step with the UNet forward / without (s)", f"{d['authors_path_s']['with_unet']} / {d['authors_path_s']['skip']}"
            yield "authors path: speed-up of a skipped step", f"{d['authors_skip_speedup']}x"
        for k, v in d["paper_forward_backward_s"].items():
            mem = f", peak {d['peak_memory'][k]['peak_GB']} GB" if k in d.get("peak_memory", {}) else ""
            yield (f"paper path {k}: UNet forward / backward (s)",
                   f"{v['forward']} / {v['backward']} ({v['backward_over_forward']}x), step "
                   f"{d['paper_step_speedup_vs_fp32'][k]}x fp32's{mem}")
        for k, v in d.get("compile_s", {}).items():
            yield f"{k}: first step (compile) s", v
        yield "UNet weight gradients after backward", d["unet_weight_gradients"]

    return write_result(res, args.out, "python " + " ".join(["bench/unet_step.py", *(argv or sys.argv[1:])]), rows)


if __name__ == "__main__":
    raise SystemExit(main())
