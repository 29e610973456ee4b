"""Real-scale cost model, without weights: FLOPs, memory and storage of SUR-adapter training.

    python bench/cost_model.py --out FILE.json [--utilisation 0.4] [--peak-tflops 989] [--ratios STORE_IO.json]

SD 1.5's UNet, VAE and CLIP ViT-L/14 text encoder and LLaMA-7B/13B are built from their published
configs (written below) on the ``meta`` device (no weights, no memory), and
``torch.utils.flop_counter.FlopCounterMode`` counts the FLOPs of their forward (and backward) passes
on meta tensors. Counted ops are matmuls, convolutions and attention (FlopCounterMode's formulas);
norms, activations and elementwise ops are not counted (a few percent).

* training step online (the authors' way: VAE encode at 512 px + CLIP of the simple and the complex
  prompt + UNet forward/backward + adapter forward/backward) against the step from the store
  (UNet forward/backward + adapter forward/backward). The UNet is frozen: its backward computes
  input gradients only (no weight gradients), which FlopCounterMode counts as such.
* LLM extraction FLOPs per prompt (16 tokens) for the full model and truncated after a middle
  layer (surpipe loads ``AutoModel`` with a truncated config: no LM head, no deeper layers).
  LLaMA runs layer by layer on meta (the full model's mask code calls ``.item()``, which meta
  tensors cannot do): embeddings are a lookup (0 FLOPs), so the model's FLOPs are the sum over its
  decoder layers.
* predicted GPU time per step = FLOPs / (utilisation x peak): an assumption, stated in the JSON.
* parameter memory (fp16) per component, and the activation memory the UNet saves for backward
  (bytes of tensors saved by autograd, counted with saved_tensors_hooks on meta tensors).
* storage for SURD (57,000 rows) per array in fp16, raw and with the compression ratios measured
  by ``bench/store_io.py`` on real (random-weight model) activations when ``--ratios`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import write_result  # noqa: E402

# ---------------------------------------------------------------- published configs (SD 1.5, LLaMA)
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, scaling_factor=0.18215,
)
CLIP_L14_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
LLAMA = {
    "llama-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                     intermediate_size=11008, vocab_size=32000, max_position_embeddings=2048),
    "llama-13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                      intermediate_size=13824, vocab_size=32000, max_position_embeddings=2048),
}
ADAPTER = dict(width=768, nhead=8, dim_feedforward=2048, num_layers=2)
SURD_ROWS = 57_000
H100_BF16_DENSE_TFLOPS = 989.0


def _params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    fc = FlopCounterMode(display=False)
    with fc:
        fn()
    return int(fc.get_total_flops())


def build_meta(batch: int = 1):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from surpipe.adapter import SURAdapter

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        te = CLIPTextModel(CLIPTextConfig(**CLIP_L14_TEXT))
        adapter = SURAdapter(**ADAPTER)
    unet.requires_grad_(False).eval()
    vae.requires_grad_(False).eval()
    te.requires_grad_(False).eval()
    adapter.train()
    return unet, vae, te, adapter


def sd_costs(batch: int = 1) -> dict:
    import torch

    unet, vae, te, adapter = build_meta(batch)
    B = batch
    meta = torch.device("meta")

    def unet_fwd_bwd():
        x = torch.randn(B, 4, 64, 64, device=meta)
        c = torch.randn(B, 77, 768, device=meta, requires_grad=True)
        t = torch.zeros(B, dtype=torch.long, device=meta)
        unet(x, t, c).sample.float().pow(2).mean().backward()

    def unet_fwd():
        x = torch.randn(B, 4, 64, 64, device=meta)
        c = torch.randn(B, 77, 768, device=meta)
        t = torch.zeros(B, dtype=torch.long, device=meta)
        with torch.no_grad():
            unet(x, t, c)

    def adapter_fwd_bwd():
        x = torch.randn(B, 77, 768, device=meta)
        out, e, _ = adapter(x, return_aux=True)
        (out.sum() + e.sum()).backward()

    def vae_encode():
        with torch.no_grad():
            vae.encode(torch.randn(B, 3, 512, 512, device=meta)).latent_dist

    def clip_one_prompt():
        with torch.no_grad():
            te(torch.zeros(B, 77, dtype=torch.long, device=meta))

    f = {
        "unet_forward": _flops(unet_fwd),
        "unet_forward_backward": _flops(unet_fwd_bwd),
        "adapter_forward_backward": _flops(adapter_fwd_bwd),
        "vae_encode_512px": _flops(vae_encode),
        "clip_text_one_prompt": _flops(clip_one_prompt),
    }
    # activation memory the frozen UNet keeps for backward (grad flows to the adapter output)
    saved = {"bytes": 0}

    def pack(t):
        saved["bytes"] += t.numel() * 2  # as fp16 (mixed precision); counted on meta tensors
        return t

    x = torch.randn(B, 4, 64, 64, device=meta)
    c = torch.randn(B, 77, 768, device=meta, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(x, torch.zeros(B, dtype=torch.long, device=meta), c)
    vae_enc_params = _params(vae.encoder) + _params(vae.quant_conv)
    params = {"unet": _params(unet), "vae_encoder": vae_enc_params, "vae_total": _params(vae),
              "clip_text": _params(te), "adapter": sum(p.numel() for p in adapter.parameters() if p.requires_grad)}
    step_store = f["unet_forward_backward"] + f["adapter_forward_backward"]
    step_online = step_store + f["vae_encode_512px"] + 2 * f["clip_text_one_prompt"]
    return {
        "batch": B,
        "flops": f,
        "step_flops": {"online": step_online, "from_store": step_store,
                       "online_over_store": round(step_online / step_store, 3)},
        "params": params,
        "param_memory_fp16_GB": {k: round(v * 2 / 1e9, 3) for k, v in params.items()},
        "unet_saved_activations_fp16_GB": round(saved["bytes"] / 1e9, 3),
    }


def llm_costs(name: str, cfg: dict, tokens: int = 16, batch: int = 1) -> dict:
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(**cfg)
    meta = torch.device("meta")
    with meta:
        layer = LlamaDecoderLayer(config, layer_idx=0).eval()
        rope = LlamaRotaryEmbedding(config)
    hdim = cfg["hidden_size"] // cfg["num_attention_heads"]

    def one_layer():
        h = torch.randn(batch, tokens, cfg["hidden_size"], device=meta)
        cos = torch.randn(batch, tokens, hdim, device=meta)
        with torch.no_grad():
            layer(h, attention_mask=None, position_embeddings=(cos, cos), position_ids=None)

    per_layer = _flops(one_layer)
    n = cfg["num_hidden_layers"]
    mid = n // 2 - 1  # a middle layer (0-based): 15 for 7B, 19 for 13B
    per_layer_params = _params(layer)
    embed_params = cfg["vocab_size"] * cfg["hidden_size"]
    return {
        "tokens_per_prompt": tokens, "num_layers": n, "per_layer_flops": per_layer,
        "full_flops_per_prompt": per_layer * n,
        "truncated_layer": mid, "truncated_flops_per_prompt": per_layer * (mid + 1),
        "truncated_over_full": round((mid + 1) / n, 4),
        "last_layer": n - 1,
        "params_full_B": round((per_layer_params * n + embed_params) / 1e9, 3),
        "params_truncated_B": round((per_layer_params * (mid + 1) + embed_params) / 1e9, 3),
        "weights_fp16_GB_full": round((per_layer_params * n + embed_params) * 2 / 1e9, 2),
        "weights_fp16_GB_truncated": round((per_layer_params * (mid + 1) + embed_params) * 2 / 1e9, 2),
        "weights_nf4_GB_full_approx": round((per_layer_params * n) * 0.5 / 1e9 + embed_params * 2 / 1e9, 2),
        "note": "FlopCounterMode on one meta LlamaDecoderLayer x num_layers (embedding lookup 0 FLOPs, no LM head: "
                "surpipe loads AutoModel)",
    }


def storage(ratios: dict | None, flip: bool = True) -> dict:
    """fp16 bytes per row and for SURD (57k rows) per array, raw and with measured compression."""
    arrays = {
        "clip/simple [77,768]": (77 * 768, "clip"),
        "clip/complex [77,768]": (77 * 768, "clip"),
        "vae/mean [4,64,64]": (4 * 64 * 64, "vae_mean"),
        "vae/std [4,64,64]": (4 * 64 * 64, "vae_std"),
    }
    if flip:
        arrays["vae/flip_mean [4,64,64]"] = (4 * 64 * 64, "vae_mean")
        arrays["vae/flip_std [4,64,64]"] = (4 * 64 * 64, "vae_std")
    arrays["llm 7B pooled, per layer [4096]"] = (4096, "llm")
    arrays["llm 13B pooled, per layer [5120]"] = (5120, "llm")
    out = {}
    for name, (elems, kind) in arrays.items():
        raw = elems * 2
        row = {"bytes_per_row_fp16": raw, "surd_GB_raw": round(raw * SURD_ROWS / 1e9, 3)}
        if ratios and kind in ratios:
            r = ratios[kind]
            row["zstd_ratio_measured"] = r
            row["surd_GB_zstd"] = round(raw * SURD_ROWS / r / 1e9, 3)
        out[name] = row
    base = [k for k in out if not k.startswith("llm")]
    tot_raw = sum(out[k]["surd_GB_raw"] for k in base)
    out["total (clip x2 + vae" + (" + flip" if flip else "") + ", no llm)"] = {
        "surd_GB_raw": round(tot_raw, 2),
        **({"surd_GB_zstd": round(sum(out[k].get("surd_GB_zstd", out[k]["surd_GB_raw"]) for k in base), 2)}
           if ratios else {}),
    }
    return out


def _ratios_from(path: str | None) -> dict | None:
    """zstd ratios per kind from a bench/store_io.py JSON (mid model when present)."""
    if not path or not Path(path).is_file():
        return None
    d = json.loads(Path(path).read_text())
    codecs = d.get("codecs", {})
    model = "mid" if "mid" in codecs else next(iter(codecs), None)
    if model is None:
        return None
    arr = codecs[model]["arrays"]
    pick = {"clip": "clip_simple", "vae_mean": "lat_mean", "vae_std": "lat_std", "llm": "llm"}
    out = {k: arr[v]["codecs"]["zstd"]["ratio"] for k, v in pick.items() if v in arr}
    if "clip_complex" in arr and "clip" in out:
        out["clip"] = round((out["clip"] + arr["clip_complex"]["codecs"]["zstd"]["ratio"]) / 2, 3)
    out["_source"] = f"{path} (model {model!r})"
    return out


def run(utilisation: float = 0.4, peak_tflops: float = H100_BF16_DENSE_TFLOPS, ratios_json: str | None = None,
        batch: int = 1, llms=tuple(LLAMA)) -> dict:
    t0 = time.perf_counter()
    sdc = sd_costs(batch)
    eff = utilisation * peak_tflops * 1e12
    steps = sdc["step_flops"]
    sdc["predicted_ms_per_step"] = {k: round(steps[k] / eff * 1e3, 3) for k in ("online", "from_store")}
    llm = {name: llm_costs(name, LLAMA[name]) for name in llms}
    for v in llm.values():
        v["predicted_ms_per_prompt_full"] = round(v["full_flops_per_prompt"] / eff * 1e3, 4)
        v["predicted_ms_per_prompt_truncated"] = round(v["truncated_flops_per_prompt"] / eff * 1e3, 4)
        v["surd_GPU_hours_full"] = round(v["full_flops_per_prompt"] * SURD_ROWS / eff / 3600, 4)
    ratios = _ratios_from(ratios_json)
    return {
        "assumption": {"peak_tflops": peak_tflops, "utilisation": utilisation,
                       "effective_tflops": round(utilisation * peak_tflops, 1),
                       "note": f"{utilisation:.0%} of H100 SXM dense bf16 ({peak_tflops} TFLOP/s); "
                               "FLOPs counted: matmul, conv, attention only"},
        "configs": {"unet": SD15_UNET, "vae": SD15_VAE, "clip_text": CLIP_L14_TEXT, "llama": LLAMA,
                    "adapter": ADAPTER},
        "sd15": sdc,
        "llm": llm,
        "storage": {"rows": SURD_ROWS, "ratios": ratios, "arrays": storage(ratios)},
        "seconds": round(time.perf_counter() - t0, 1),
    }


def summary(d: dict) -> list[tuple[str, str]]:
    s = d["sd15"]
    rows = [("cost: SD1.5 step FLOPs online/store (batch 1)",
             f"{s['step_flops']['online'] / 1e12:.2f} / {s['step_flops']['from_store'] / 1e12:.2f} TFLOP "
             f"= {s['step_flops']['online_over_store']:.2f}x"),
            ("cost: predicted ms/step online/store @" + f"{d['assumption']['effective_tflops']} TFLOP/s",
             f"{s['predicted_ms_per_step']['online']:.2f} / {s['predicted_ms_per_step']['from_store']:.2f}")]
    for name, v in d["llm"].items():
        rows.append((f"cost: {name} GFLOP/prompt full/trunc@L{v['truncated_layer']}",
                     f"{v['full_flops_per_prompt'] / 1e9:.0f} / {v['truncated_flops_per_prompt'] / 1e9:.0f} "
                     f"({v['truncated_over_full']:.3f})"))
    tot = [v for k, v in d["storage"]["arrays"].items() if k.startswith("total")][0]
    rows.append(("cost: SURD store GB raw/zstd (clip+vae+flip)",
                 f"{tot['surd_GB_raw']} / {tot.get('surd_GB_zstd', 'n/a')}"))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help="accepted for bench/run.py; the model is the same")
    ap.add_argument("--utilisation", type=float, default=0.4)
    ap.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS)
    ap.add_argument("--ratios", default=None, help="bench/store_io.py JSON with measured compression ratios")
    args = ap.parse_args(argv)
    d = run(args.utilisation, args.peak_tflops, args.ratios)
    cmd = "python bench/cost_model.py --out " + args.out + (f" --ratios {args.ratios}" if args.ratios else "")
    return write_result(d, args.out, cmd, summary)


if __name__ == "__main__":
    sys.exit(main())
