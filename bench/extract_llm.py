"""Benchmark of the extract-llm forward path (surpipe.llm): prompts/s and tokens/s by batch size and
quantization, truncated vs full model, and padding waste with and without length bucketing.

The model is a random LLaMA built from a LlamaConfig in a temporary folder (default hidden 512,
8 layers, MLP 1376, 8 heads; the real LLaMA SentencePiece tokenizer when the mistral-common wheel is
installed, else a small BPE), so no hub is needed; the prompts are the bundled sample's simple
prompts, cycled. Timings exclude loading; each configuration gets one warm-up batch.

    python bench/extract_llm.py --quick --out bench/extract_llm_cpu.json     # < 60 s on 2 CPU cores
    python bench/extract_llm.py --device cuda --hidden 4096 --num-layers 8 --out gpu.json

Tokens/s counts real (unpadded) prompt tokens; "padding waste" is the share of computed positions
that were padding: 1 - real / (batches x longest-in-batch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_model(out: Path, hidden: int, layers: int, seed: int = 0) -> tuple[Path, str]:
    from surpipe.errors import SurpipeError
    from surpipe.tiny import build_tiny_llm

    heads = max(1, hidden // 64)
    # LLaMA's MLP ratio (11008 / 4096), rounded to a multiple of 64: bitsandbytes' CPU NF4 kernel
    # needs in_features divisible by its block size (64).
    inter = max(64, round(hidden * 2.6875 / 64) * 64)
    kw = dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048)
    try:
        return build_tiny_llm(out, seed=seed, tokenizer="sentencepiece", **kw), "sentencepiece"
    except SurpipeError:
        return build_tiny_llm(out, seed=seed, tokenizer="bpe", **kw), "bpe"


def sample_prompts(n: int) -> list[str]:
    rows = [json.loads(ln) for ln in (REPO / "data" / "sample" / "metadata.jsonl").read_text().splitlines() if ln.strip()]
    simple = [r["text"] for r in rows]
    return [simple[i % len(simple)] for i in range(n)]


def time_extract(llm, ids, layers, batch_size, bucket=True, repeats=1):
    from surpipe import llm as L

    L.extract(llm, ids[:batch_size], layers, batch_size=batch_size)  # warm-up
    if llm.device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    best = None
    for _ in range(repeats):
        t = time.perf_counter()
        ex = L.extract(llm, ids, layers, batch_size=batch_size, bucket=bucket)
        if llm.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    return best, ex


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small grid (< 60 s on 2 CPU cores)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:I")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--num-layers", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=None, help="prompts per measurement [quick 96, full 512]")
    ap.add_argument("--batch-sizes", default=None, help="comma list [quick 1,16; full 1,8,32,64]")
    ap.add_argument("--quants", default="none,8bit,4bit")
    ap.add_argument("--repeats", type=int, default=None, help="timed passes per row, best kept [quick 2, full 3]")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads [default: torch's]")
    ap.add_argument("--model", default=None, help="benchmark this model folder / hub id instead of a random one")
    args = ap.parse_args(argv)

    import torch

    from surpipe import llm as L
    from surpipe.devices import resolve_device

    L.quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.repeats or (2 if args.quick else 3)
    device = resolve_device(args.device)
    n_prompts = args.prompts or (96 if args.quick else 512)
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1,16" if args.quick else "1,8,32,64")).split(",")]
    quants = [q for q in args.quants.split(",") if q]
    t_all = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="surpipe-bench-")
    if args.model:
        model_dir, tok_kind = args.model, "model's own"
    else:
        model_dir, tok_kind = build_model(Path(tmp.name) / "llm", args.hidden, args.num_layers)
        model_dir = str(model_dir)
    cfg = L.read_config(model_dir)
    n_layers = cfg.num_hidden_layers
    last = n_layers - 1
    mid = max(0, n_layers // 2 - 1)
    prompts = sample_prompts(n_prompts)
    results = {"device": device, "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
               "cpu": platform.processor() or platform.machine(),
               "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
               "model": {"hidden_size": cfg.hidden_size, "num_hidden_layers": n_layers,
                         "intermediate_size": getattr(cfg, "intermediate_size", None),
                         "num_attention_heads": cfg.num_attention_heads, "tokenizer": tok_kind,
                         "source": args.model or "random LlamaConfig"},
               "prompts": n_prompts, "quick": args.quick, "repeats": reps, "runs": [], "truncation": [], "bucketing": []}

    def row(kind, **kw):
        results[kind].append(kw)
        return kw

    # 1. quantization x batch size, the last layer (whole decoder runs)
    for q in quants:
        t = time.perf_counter()
        llm = L.load_llm(model_dir, [last], quant=q, device=device)
        load_s = time.perf_counter() - t
        ids = L.tokenize(llm.tokenizer, prompts, 512)
        for b in batch_sizes:
            dt, ex = time_extract(llm, ids, [last], b, repeats=reps)
            r = row("runs", quant=q, batch_size=b, layer=last, seconds=round(dt, 4), load_seconds=round(load_s, 2),
                    prompts_per_s=round(n_prompts / dt, 1), tokens_per_s=round(ex.real_tokens / dt, 1),
                    padding_waste=round(1 - ex.real_tokens / ex.padded_tokens, 4))
            print(f"  quant {q:<5} batch {b:>3}: {r['prompts_per_s']:>8} prompts/s {r['tokens_per_s']:>9} tok/s",
                  file=sys.stderr, flush=True)
        del llm

    # 2. truncated vs full model, layer in the middle, fp32
    b = max(batch_sizes)
    for trunc in (True, False):
        llm = L.load_llm(model_dir, [mid], quant="none", device=device, truncate=trunc)
        ids = L.tokenize(llm.tokenizer, prompts, 512)
        dt, ex = time_extract(llm, ids, [mid], b, repeats=reps)
        row("truncation", layer=mid, truncated=trunc, layers_run=len(llm.layers), batch_size=b,
            seconds=round(dt, 4), prompts_per_s=round(n_prompts / dt, 1), tokens_per_s=round(ex.real_tokens / dt, 1))
        del llm

    # 3. bucketing on/off: measured time at the largest batch, and padding waste for each batch size
    llm = L.load_llm(model_dir, [last], quant="none", device=device)
    ids = L.tokenize(llm.tokenizer, prompts, 512)
    lengths = [len(x) for x in ids]
    for bucket in (True, False):
        dt, ex = time_extract(llm, ids, [last], b, bucket=bucket, repeats=reps)
        wastes = {}
        for bb in sorted(set(batch_sizes + [8, 32])):
            real, padded = L.padding_stats(lengths, L.length_buckets(lengths, bb, bucket))
            wastes[str(bb)] = round(1 - real / padded, 4)
        row("bucketing", bucket=bucket, batch_size=b, seconds=round(dt, 4), prompts_per_s=round(n_prompts / dt, 1),
            tokens_per_s=round(ex.real_tokens / dt, 1), padding_waste_by_batch_size=wastes)
    results["tokens"] = {"total": sum(lengths), "mean": round(sum(lengths) / len(lengths), 2),
                         "min": min(lengths), "max": max(lengths)}
    results["seconds_total"] = round(time.perf_counter() - t_all, 1)
    tmp.cleanup()

    # table
    m = results["model"]
    print(f"\nextract-llm benchmark: {device} ({results['gpu'] or results['cpu']}, {results['torch_threads']} threads), "
          f"random LLaMA hidden {m['hidden_size']} x {m['num_hidden_layers']} layers, {n_prompts} prompts "
          f"(mean {results['tokens']['mean']} tokens)")
    print(f"{'quant':<6} {'batch':>5} {'prompts/s':>10} {'tokens/s':>10} {'pad waste':>9} {'load s':>7}")
    for r in results["runs"]:
        print(f"{r['quant']:<6} {r['batch_size']:>5} {r['prompts_per_s']:>10} {r['tokens_per_s']:>10} "
              f"{100 * r['padding_waste']:>8.1f}% {r['load_seconds']:>7}")
    print(f"\n{'model':<28} {'prompts/s':>10} {'tokens/s':>10}")
    for r in results["truncation"]:
        label = f"{'truncated' if r['truncated'] else 'full'} ({r['layers_run']} layers run)"
        print(f"{label:<28} {r['prompts_per_s']:>10} {r['tokens_per_s']:>10}")
    print(f"\n{'bucketing':<10} {'prompts/s':>10} {'tokens/s':>10}  padding waste by batch size")
    for r in results["bucketing"]:
        w = ", ".join(f"b{k}: {100 * v:.1f}%" for k, v in r["padding_waste_by_batch_size"].items())
        print(f"{'on' if r['bucket'] else 'off':<10} {r['prompts_per_s']:>10} {r['tokens_per_s']:>10}  {w}")
    print(f"\n(batch {b} for truncation and bucketing rows; total {results['seconds_total']} s)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
