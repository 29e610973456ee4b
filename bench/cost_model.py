"""Real-scale cost model, without weights: FLOPs, memory and storage of SUR-adapter training.

    python bench/cost_model.py --out FILE.json [--utilisation 0.4] [--peak-tflops 989] [--ratios STORE_IO.json]

SD 1.5's UNet, VAE and CLIP ViT-L/14 text encoder, SDXL base 1.0's UNet (2.6 B), VAE and two text
encoders (CLIP ViT-L/14 and OpenCLIP bigG/14 with projection) and LLaMA-7B/13B are built from their
published configs (written below; parameter counts checked against the published ones) on the
``meta`` device (no weights, no memory), and
``torch.utils.flop_counter.FlopCounterMode`` counts the FLOPs of their forward (and backward) passes
on meta tensors. Counted ops are matmuls, convolutions and attention (FlopCounterMode's formulas);
norms, activations and elementwise ops are not counted (a few percent).

* training step online (the authors' way: VAE encode at 512 px (SDXL: 1024 px) + the text
  encoder(s) on the simple and the complex prompt + UNet forward/backward + adapter forward/backward)
  against the step from the store (UNet forward/backward + adapter forward/backward). The UNet is
  frozen: its backward computes input gradients only (no weight gradients), which FlopCounterMode
  counts as such. SDXL's UNet also takes its micro-conditioning (pooled embedding + 6 time ids);
  its adapter works on the 2048-wide concatenated sequence (the authors' heads/FFN/layers).
* LLM extraction FLOPs per prompt (16 tokens) for the full model and truncated after a middle
  layer (surpipe loads ``AutoModel`` with a truncated config: no LM head, no deeper layers).
  LLaMA runs layer by layer on meta (the full model's mask code calls ``.item()``, which meta
  tensors cannot do): embeddings are a lookup (0 FLOPs), so the model's FLOPs are the sum over its
  decoder layers.
* predicted GPU time per step = FLOPs / (utilisation x peak): an assumption, stated in the JSON.
* parameter memory (fp16) per component, the activation memory the UNet saves for backward
  (bytes of tensors saved by autograd, counted with saved_tensors_hooks on meta tensors; with and
  without the [N, N] attention probabilities, which flash / memory-efficient SDPA do not keep), and
  GPU memory of a step from the store and online (+ VAE + text encoders): ``gpu_memory``.
* storage for SURD (57,000 rows) per array in fp16 (SD 1.5 at 512 px, SDXL at 1024 px: embeddings
  [77, 2048] + pooled [1280] per prompt, latents [4, 128, 128]), raw and with the compression ratios
  measured by ``bench/store_io.py`` on real (random-weight model) activations when ``--ratios`` is
  given. The script prints a markdown table of SD 1.5 against SDXL after the summary rows.
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

from _results import write_result  # noqa: E402

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

# ---------------------------------------------------------------- published configs (SDXL base 1.0)
# stabilityai/stable-diffusion-xl-base-1.0: unet/config.json, vae/config.json, text_encoder/ and
# text_encoder_2/config.json (architecture keys; defaults left out where diffusers' equal them).
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
# Same architecture as SD 1.5's VAE; SDXL's config changes the scaling factor and the sample size
# (and sets force_upcast: the pipeline runs it in fp32; the FLOPs are the same).
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025)
OPENCLIP_BIGG_TEXT = dict(  # text_encoder_2: CLIPTextModelWithProjection
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
    num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
)
# The adapter on SDXL works on the concatenated 768 + 1280 = 2048-wide sequence (issue 14 point 2);
# heads / FFN / layers as the authors' SD 1.5 adapter (an assumption: no published SDXL adapter).
SDXL_ADAPTER = dict(ADAPTER, width=2048)

# Per architecture: configs, training resolution (px), text encoders (name, config, with projection),
# micro-conditioning inputs of the UNet (pooled width, time ids).
ARCHS = {
    "sd15": dict(unet=SD15_UNET, vae=SD15_VAE, px=512, adapter=ADAPTER, pooled=0, time_ids=0,
                 text=(("clip_text", CLIP_L14_TEXT, False),)),
    "sdxl": dict(unet=SDXL_UNET, vae=SDXL_VAE, px=1024, adapter=SDXL_ADAPTER, pooled=1280, time_ids=6,
                 text=(("clip_text_l14", CLIP_L14_TEXT, False), ("openclip_bigG_text", OPENCLIP_BIGG_TEXT, True))),
}
# Published parameter counts (model cards / from_pretrained of the real checkpoints): the meta
# models built from the configs above must match them exactly (checked in sd_costs).
PUBLISHED_PARAMS = {
    "sd15": {"unet": 859_520_964, "vae_total": 83_653_863, "clip_text": 123_060_480},
    "sdxl": {"unet": 2_567_463_684, "vae_total": 83_653_863, "clip_text_l14": 123_060_480,
             "openclip_bigG_text": 694_659_840},
}
GPU_GB = 80.0  # H100 SXM, for the largest batch that fits
LLM_FOR_MEMORY = "llama-13b"  # the released run's LLM (5120 wide): sizes the frozen projection
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


def build_meta(arch: str = "sd15"):
    """UNet, VAE, {name: text encoder}, adapter of ``ARCHS[arch]`` on the meta device (no weights)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from surpipe.adapter import SURAdapter

    a = ARCHS[arch]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**a["unet"])
        vae = AutoencoderKL(**a["vae"])
        tes = {name: (CLIPTextModelWithProjection if proj else CLIPTextModel)(CLIPTextConfig(**cfg))
               for name, cfg, proj in a["text"]}
        adapter = SURAdapter(**a["adapter"])
    for m in (unet, vae, *tes.values()):
        m.requires_grad_(False).eval()
    adapter.train()
    return unet, vae, tes, adapter


def gpu_memory(unet: int, encoders: dict, trainable: int, frozen_fp32: int, activations_bytes: int) -> dict:
    """GPU memory of a training step (GB), from the store and online, under fp16 mixed precision.

    Frozen models in fp16 (2 B/param). The adapter trains in fp32 under autocast: weights, grads and
    AdamW's two moments are 16 B/param. The frozen LLM projection stays fp32 (4 B/param).
    ``activations_bytes``: what the UNet saves for the backward into the adapter. Online adds
    ``encoders`` (name -> parameters: the whole VAE, as the authors' script loads it, and every text
    encoder); their no-grad activations are transient and left out, as is the allocator's and the
    CUDA context's overhead (~0.5-1 GB).
    """
    w = {"unet_fp16": unet * 2, "adapter_training_state_fp32_adamw": trainable * 16,
         "llm_projection_fp32_frozen": frozen_fp32 * 4, "unet_saved_activations_fp16": activations_bytes}
    store = sum(w.values())
    enc = sum(v * 2 for v in encoders.values())
    gb = lambda b: round(b / 1e9, 2)  # noqa: E731
    # activations grow linearly with the batch; weights and state do not (1 GB kept for the context)
    fit = lambda fixed: int((GPU_GB * 1e9 - 1e9 - fixed) // activations_bytes)  # noqa: E731
    return {"parts_GB": {k: gb(v) for k, v in w.items()},
            f"largest_batch_{GPU_GB:.0f}GB": {"from_store": fit(store - activations_bytes),
                                             "online": fit(store - activations_bytes + enc)},
            "encoders_fp16_GB": {k: gb(v * 2) for k, v in encoders.items()},
            "from_store_GB": gb(store), "online_GB": gb(store + enc),
            "weights_only_from_store_GB": gb(store - activations_bytes),
            "weights_only_online_GB": gb(store - activations_bytes + enc)}


def sd_costs(batch: int = 1, arch: str = "sd15", px: int | None = None) -> dict:
    """FLOPs, parameters and memory of one training step of ``ARCHS[arch]`` at its training
    resolution, or at ``px`` pixels (a multiple of 64) when given."""
    import torch

    a = ARCHS[arch]
    unet, vae, tes, adapter = build_meta(arch)
    B, px = batch, (px or a["px"])
    lat = px // 8  # the VAE downsamples 8x (3 down blocks)
    D = a["unet"]["cross_attention_dim"]
    meta = torch.device("meta")

    def unet_inputs(grad: bool):
        x = torch.randn(B, 4, lat, lat, device=meta)
        c = torch.randn(B, 77, D, device=meta, requires_grad=grad)
        t = torch.zeros(B, dtype=torch.long, device=meta)
        # SDXL's micro-conditioning: pooled text embedding + 6 time ids (sizes, crop, target size)
        kw = {"added_cond_kwargs": {"text_embeds": torch.randn(B, a["pooled"], device=meta),
                                    "time_ids": torch.randn(B, a["time_ids"], device=meta)}} if a["pooled"] else {}
        return x, t, c, kw

    def unet_fwd_bwd():
        x, t, c, kw = unet_inputs(True)
        unet(x, t, c, **kw).sample.float().pow(2).mean().backward()

    def unet_fwd():
        x, t, c, kw = unet_inputs(False)
        with torch.no_grad():
            unet(x, t, c, **kw)

    def adapter_fwd_bwd():
        x = torch.randn(B, 77, D, device=meta)
        out, e, _ = adapter(x, return_aux=True)
        (out.sum() + e.sum()).backward()

    def vae_encode():
        with torch.no_grad():
            vae.encode(torch.randn(B, 3, px, px, device=meta)).latent_dist

    def text_one_prompt(te):
        def f():
            with torch.no_grad():  # SDXL takes the penultimate hidden state, but the pipeline runs every layer
                te(torch.zeros(B, 77, dtype=torch.long, device=meta), output_hidden_states=True)
        return f

    f = {
        "unet_forward": _flops(unet_fwd),
        "unet_forward_backward": _flops(unet_fwd_bwd),
        "adapter_forward_backward": _flops(adapter_fwd_bwd),
        f"vae_encode_{px}px": _flops(vae_encode),
        **{f"{name}_one_prompt": _flops(text_one_prompt(te)) for name, te in tes.items()},
    }
    # activation memory the frozen UNet keeps for backward (grad flows to the adapter output)
    saved = {"bytes": 0, "attn_probs": 0}
    seq = {(lat // s) ** 2 for s in (1, 2, 4, 8)}

    def pack(t):
        n = t.numel() * 2  # as fp16 (mixed precision); counted on meta tensors
        saved["bytes"] += n
        # [B*heads, N, N] attention probabilities: kept by the math attention the meta device runs,
        # not by the flash / memory-efficient SDPA kernels a GPU uses
        if t.dim() >= 3 and t.shape[-1] == t.shape[-2] and t.shape[-1] in seq:
            saved["attn_probs"] += n
        return t

    x, t, c, kw = unet_inputs(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(x, t, c, **kw)
    vae_enc_params = _params(vae.encoder) + _params(vae.quant_conv)
    trainable = sum(p.numel() for p in adapter.parameters() if p.requires_grad)
    params = {"unet": _params(unet), "vae_encoder": vae_enc_params, "vae_total": _params(vae),
              **{name: _params(te) for name, te in tes.items()}, "adapter": trainable}
    wrong = {k: (params[k], v) for k, v in PUBLISHED_PARAMS[arch].items() if params[k] != v}
    if wrong:  # a config typo changes the architecture: refuse to report costs of another model
        raise SystemExit(f"{arch}: parameter counts differ from the published ones (built, published): {wrong}")
    step_store = f["unet_forward_backward"] + f["adapter_forward_backward"]
    step_online = step_store + f[f"vae_encode_{px}px"] + 2 * sum(f[f"{name}_one_prompt"] for name in tes)
    projection = LLAMA[LLM_FOR_MEMORY]["hidden_size"] * D + D
    act = saved["bytes"]
    enc = {"vae_total": params["vae_total"], **{name: params[name] for name in tes}}
    return {
        "arch": arch, "batch": B, "resolution_px": px, "latent_shape": [4, lat, lat], "text_width": D,
        "flops": f,
        "step_flops": {"online": step_online, "from_store": step_store,
                       "online_over_store": round(step_online / step_store, 3)},
        "params": params,
        "param_memory_fp16_GB": {k: round(v * 2 / 1e9, 3) for k, v in params.items()},
        "unet_saved_activations_fp16_GB": round(act / 1e9, 3),
        "unet_saved_attention_probs_fp16_GB": round(saved["attn_probs"] / 1e9, 3),
        "gpu_memory_GB": {
            "math_attention": gpu_memory(params["unet"], enc, trainable, projection, act),
            "flash_attention": gpu_memory(params["unet"], enc, trainable, projection, act - saved["attn_probs"]),
            "llm_projection": f"{LLM_FOR_MEMORY} ({LLAMA[LLM_FOR_MEMORY]['hidden_size']}) -> {D}, frozen",
        },
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

    def one_layer():
        # The rotary (cos, sin) as LlamaModel computes them once for all layers (no counted FLOPs:
        # applying them is elementwise); random tensors of the same shape count the same.
        h = torch.randn(batch, tokens, cfg["hidden_size"], device=meta)
        with torch.no_grad():
            pe = rope(h, torch.arange(tokens, device=meta)[None])
            layer(h, attention_mask=None, position_embeddings=pe, position_ids=None)

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


def storage(ratios: dict | None, flip: bool = True, arch: str = "sd15") -> dict:
    """fp16 bytes per row and for SURD (57k rows) per array of ``ARCHS[arch]`` at its training
    resolution, raw and with measured compression."""
    a = ARCHS[arch]
    D, lat, pooled = a["unet"]["cross_attention_dim"], a["px"] // 8, a["pooled"]
    text, shape = ("clip" if arch == "sd15" else "embeds"), f"[4,{lat},{lat}]"
    arrays = {}
    for prompt in ("simple", "complex"):
        arrays[f"{text}/{prompt} [77,{D}]"] = (77 * D, "clip")
        if pooled:  # SDXL: the second encoder's projected output, per prompt
            arrays[f"{text}/{prompt}_pooled [{pooled}]"] = (pooled, "clip")
    arrays[f"vae/mean {shape}"] = (4 * lat * lat, "vae_mean")
    arrays[f"vae/std {shape}"] = (4 * lat * lat, "vae_std")
    if flip:
        arrays[f"vae/flip_mean {shape}"] = (4 * lat * lat, "vae_mean")
        arrays[f"vae/flip_std {shape}"] = (4 * lat * lat, "vae_std")
    if a["time_ids"]:  # SDXL micro-conditioning: original size + crop offsets, 4 x int32 (= 8 fp16 slots)
        arrays["micro-cond size+crop [4] int32"] = (8, "none")
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
    what = "clip x2" if not pooled else "embeds x2 + pooled x2 + micro-cond"
    out[f"total ({what} + vae" + (" + flip" if flip else "") + ", no llm)"] = {
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
        batch: int = 1, llms=tuple(LLAMA), archs=tuple(ARCHS)) -> dict:
    t0 = time.perf_counter()
    eff = utilisation * peak_tflops * 1e12
    sdcs = {arch: sd_costs(batch, arch) for arch in archs}
    for sdc in sdcs.values():
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
                    "adapter": ADAPTER, "sdxl": {"unet": SDXL_UNET, "vae": SDXL_VAE, "clip_text_l14": CLIP_L14_TEXT,
                                                 "openclip_bigG_text": OPENCLIP_BIGG_TEXT, "adapter": SDXL_ADAPTER}},
        **sdcs,
        "llm": llm,
        "storage": {"rows": SURD_ROWS, "ratios": ratios,
                    **{("arrays" if arch == "sd15" else f"arrays_{arch}"): storage(ratios, arch=arch)
                       for arch in archs}},
        "seconds": round(time.perf_counter() - t0, 1),
    }


def summary(d: dict) -> list[tuple[str, str]]:
    rows = []
    for arch, label in (("sd15", "SD1.5"), ("sdxl", "SDXL")):
        if arch not in d:
            continue
        s = d[arch]
        px = "" if arch == "sd15" else f" @{s['resolution_px']}px"
        rows += [(f"cost: {label} step FLOPs online/store (batch 1{px})",
                  f"{s['step_flops']['online'] / 1e12:.2f} / {s['step_flops']['from_store'] / 1e12:.2f} TFLOP "
                  f"= {s['step_flops']['online_over_store']:.2f}x"),
                 (f"cost: {'' if arch == 'sd15' else label + ' '}predicted ms/step online/store @"
                  f"{d['assumption']['effective_tflops']} TFLOP/s",
                  f"{s['predicted_ms_per_step']['online']:.2f} / {s['predicted_ms_per_step']['from_store']:.2f}")]
        if arch != "sd15":
            m = s["gpu_memory_GB"]["flash_attention"]
            rows.append((f"cost: {label} GPU GB online/store (weights+adapter state+acts)",
                         f"{m['online_GB']} / {m['from_store_GB']}"))
    for name, v in d["llm"].items():
        rows.append((f"cost: {name} GFLOP/prompt full/trunc@L{v['truncated_layer']}",
                     f"{v['full_flops_per_prompt'] / 1e9:.0f} / {v['truncated_flops_per_prompt'] / 1e9:.0f} "
                     f"({v['truncated_over_full']:.3f})"))
    for key, label in (("arrays", "SURD store GB raw/zstd (clip+vae+flip)"),
                       ("arrays_sdxl", "SDXL SURD store GB raw/zstd @1024px")):
        if key in d["storage"]:
            tot = [v for k, v in d["storage"][key].items() if k.startswith("total")][0]
            rows.append((f"cost: {label}", f"{tot['surd_GB_raw']} / {tot.get('surd_GB_zstd', 'n/a')}"))
    return rows


def table(d: dict) -> str:
    """SD 1.5 against SDXL, one markdown table: step FLOPs, parameters, GPU memory, SURD store."""
    archs = [a for a in ARCHS if a in d]
    cols = {a: d[a] for a in archs}
    T = lambda x: f"{x / 1e12:.3f}"  # noqa: E731
    lines = ["| batch 1 | " + " | ".join(f"{a} ({cols[a]['resolution_px']} px)" for a in archs) + " |",
             "|---" * (len(archs) + 1) + "|"]

    def row(name, fn):
        lines.append(f"| {name} | " + " | ".join(fn(a, cols[a]) for a in archs) + " |")

    row("UNet forward, TFLOP", lambda a, s: T(s["flops"]["unet_forward"]))
    row("UNet forward + backward (input grads only), TFLOP", lambda a, s: T(s["flops"]["unet_forward_backward"]))
    row("adapter forward + backward, TFLOP", lambda a, s: T(s["flops"]["adapter_forward_backward"]))
    row("VAE encode, TFLOP", lambda a, s: T(s["flops"][f"vae_encode_{s['resolution_px']}px"]))
    row("text encoders, one prompt, TFLOP", lambda a, s: " + ".join(
        T(v) for k, v in s["flops"].items() if k.endswith("_one_prompt")))
    row("**step online** (VAE + text encoders x 2 prompts + UNet f+b + adapter), TFLOP",
        lambda a, s: f"**{T(s['step_flops']['online'])}**")
    row("**step from the store** (UNet f+b + adapter), TFLOP", lambda a, s: f"**{T(s['step_flops']['from_store'])}**")
    row("online / store", lambda a, s: f"**{s['step_flops']['online_over_store']:.2f}x**")
    row(f"predicted ms online / store @{d['assumption']['effective_tflops']} TFLOP/s",
        lambda a, s: f"{s['predicted_ms_per_step']['online']:.1f} / {s['predicted_ms_per_step']['from_store']:.1f}")
    M = lambda s, k: f"{s['params'][k] / 1e6:.1f}"  # noqa: E731
    row("params, M: UNet / VAE (encoder) / text encoders / adapter", lambda a, s: " / ".join([
        M(s, "unet"), f"{M(s, 'vae_total')} ({M(s, 'vae_encoder')})",
        " + ".join(M(s, n) for n, _, _ in ARCHS[a]["text"]), M(s, "adapter")]))
    for att, label in (("flash_attention", "flash/mem-efficient SDPA"), ("math_attention", "math attention")):
        row(f"UNet activations saved for backward, GB ({label})",
            lambda a, s, att=att: f"{s['gpu_memory_GB'][att]['parts_GB']['unet_saved_activations_fp16']}")
    m = lambda s: s["gpu_memory_GB"]["flash_attention"]  # noqa: E731
    row("GPU GB: UNet fp16 + adapter fp32 AdamW state + LLM projection",
        lambda a, s: " + ".join(str(v) for k, v in m(s)["parts_GB"].items() if "activations" not in k))
    row("GPU GB: VAE + text encoders fp16 (online only)", lambda a, s: " + ".join(
        str(v) for v in m(s)["encoders_fp16_GB"].values()))
    row("**GPU GB from the store / online** (weights + state + activations, flash SDPA)",
        lambda a, s: f"**{m(s)['from_store_GB']} / {m(s)['online_GB']}**")
    row("GPU GB from the store / online, weights + state only",
        lambda a, s: f"{m(s)['weights_only_from_store_GB']} / {m(s)['weights_only_online_GB']}")
    row(f"largest batch on {GPU_GB:.0f} GB from the store / online (flash SDPA, 1 GB for the context)",
        lambda a, s: " / ".join(str(v) for v in m(s)[f"largest_batch_{GPU_GB:.0f}GB"].values()))
    for a in archs:
        key = "arrays" if a == "sd15" else f"arrays_{a}"
        if key in d["storage"]:
            cols[a]["_store"] = [v for k, v in d["storage"][key].items() if k.startswith("total")][0]
    row(f"SURD store ({SURD_ROWS:,} rows, fp16, flip, no LLM), GB raw / zstd",
        lambda a, s: f"{s['_store']['surd_GB_raw']} / {s['_store'].get('surd_GB_zstd', 'n/a')}")
    for s in cols.values():
        s.pop("_store", None)
    return "\n".join(lines)


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
    rc = write_result(d, args.out, cmd, summary)
    print("\n" + table(d))
    return rc


if __name__ == "__main__":
    sys.exit(main())
