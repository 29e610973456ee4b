"""Run every surpipe benchmark, write one JSON per benchmark into DIR, print one summary table last.

    python bench/run.py [--quick] --out DIR [--only train_step,store_io,...]

Each benchmark runs as its own process (``python bench/NAME.py [--quick] --out DIR/NAME.json``),
one after the other (never in parallel: they time CPU work). bench/extract_llm.py and
bench/encode_latents.py (owned by their stages) run when present and are skipped with a note
otherwise. ``--quick`` is the CPU smoke configuration (under 2 minutes on 2 cores); the full mode
is meant for a GPU machine or a long CPU run. The built models and real activations are shared
through one cache folder.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _common as C  # noqa: E402

# (name, extra args); order matters: store_io's ratios feed cost_model
BENCHES = ["train_step", "store_io", "optimisations", "cost_model", "extract_llm", "encode_latents"]
MINE = {"train_step", "store_io", "optimisations", "cost_model"}


def _extract_llm_rows(d: dict) -> list[tuple[str, str]]:
    rows = []
    tr = {bool(r["truncated"]): r for r in d.get("truncation", [])}
    if True in tr and False in tr:
        n = d.get("model", {}).get("num_hidden_layers") or tr[False]["layers_run"]
        layer = tr[True]["layer"]
        ratio = tr[False]["seconds"] / tr[True]["seconds"]
        rows.append((f"extract-llm: time truncated@L{layer} / full ({n} layers)",
                     f"{1 / ratio:.3f} (expected (L+1)/n = {(layer + 1) / n:.3f})"))
    bk = {bool(r["bucket"]): r for r in d.get("bucketing", [])}
    if True in bk and False in bk:
        bs = str(bk[True]["batch_size"])
        w_on = bk[True]["padding_waste_by_batch_size"].get(bs)
        w_off = bk[False]["padding_waste_by_batch_size"].get(bs)
        rows.append((f"extract-llm: padding waste bucketed vs unsorted (batch {bs})",
                     f"{w_on:.1%} vs {w_off:.1%}; prompts/s {bk[True]['prompts_per_s']} vs {bk[False]['prompts_per_s']}"))
    return rows


def _encode_latents_rows(d: dict) -> list[tuple[str, str]]:
    rows = []
    for m, info in d.get("models", {}).items():
        v = info.get("vae_images_per_s", {})
        c = info.get("clip_prompts_per_s", {})
        if v and c:
            rows.append((f"encode-latents {m}: VAE images/s, CLIP prompts/s (largest batch)",
                         f"{list(v.values())[-1]}, {list(c.values())[-1]}"))
    return rows


def summarise(results: dict) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    import cost_model
    import optimisations
    import store_io
    import train_step

    mods = {"train_step": train_step, "store_io": store_io, "optimisations": optimisations, "cost_model": cost_model}
    for name, d in results.items():
        if not isinstance(d, dict):
            rows.append((name, str(d)))
            continue
        try:
            if name in mods:
                rows += mods[name].summary(d)
            elif name == "extract_llm":
                rows += _extract_llm_rows(d)
            elif name == "encode_latents":
                rows += _encode_latents_rows(d)
        except Exception as e:  # a changed JSON layout must not hide the other rows
            rows.append((name, f"(summary failed: {type(e).__name__}: {e})"))
    # loader throughput against what the step consumes
    ts, io = results.get("train_step"), results.get("store_io")
    if isinstance(ts, dict) and isinstance(io, dict) and "loader" in io:
        m = io["loader"]["model"]
        if m in ts.get("models", {}):
            need = ts["models"][m]["store_samples_per_s"]
            have = io["loader"]["workers"]["0"]["samples_per_s"]
            rows.append((f"loader (0 workers) / step consumption, {m}", f"{have} / {need} = {have / need:.0f}x"))
    return rows


def main(argv=None) -> int:
    ap = C.bench_parser(__doc__, "folder for one JSON per benchmark")
    ap.add_argument("--only", default=None, help="comma list of benchmark names")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per benchmark")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.only.split(",") if args.only else BENCHES
    cache = Path(tempfile.mkdtemp(prefix="surpipe-bench-cache-"))
    t_all = time.perf_counter()
    results: dict = {}
    walls = {}
    try:
        for name in names:
            script = HERE / f"{name}.py"
            if not script.is_file():
                results[name] = f"skipped: bench/{name}.py is absent"
                print(f"== {name}: skipped (bench/{name}.py is absent)", flush=True)
                continue
            cmd = [sys.executable, str(script), "--out", str(out / f"{name}.json")]
            if args.quick:
                cmd.insert(2, "--quick")
            if name in ("train_step", "store_io", "optimisations"):
                cmd += ["--cache", str(cache)]
            if name == "cost_model" and (out / "store_io.json").is_file():
                cmd += ["--ratios", str(out / "store_io.json")]
            print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            walls[name] = round(time.perf_counter() - t0, 1)
            if p.returncode != 0:
                results[name] = f"FAILED (exit {p.returncode}): " + (p.stderr.strip().splitlines() or [""])[-1][:200]
                print(p.stderr[-3000:], file=sys.stderr)
                continue
            results[name] = json.loads((out / f"{name}.json").read_text())
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    total = round(time.perf_counter() - t_all, 1)
    rows = summarise(results)
    rows.append(("wall seconds per benchmark", ", ".join(f"{k} {v}" for k, v in walls.items())))
    rows.append(("wall seconds total" + (" (--quick)" if args.quick else ""), str(total)))
    (out / "summary.json").write_text(json.dumps({"rows": rows, "wall_s": walls, "total_s": total}, indent=2) + "\n")
    w = max(len(k) for k, _ in rows)
    print("\n" + "metric".ljust(w) + " | value")
    print("-" * w + "-+-" + "-" * 40)
    for k, v in rows:
        print(k.ljust(w) + " | " + v)
    return 0 if all(isinstance(v, dict) or str(v).startswith("skipped") for v in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
