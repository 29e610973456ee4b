"""The ``surpipe`` command line: parses options, builds a stage config, calls the stage's ``run``.

Heavy libraries are imported inside commands, so ``surpipe --help`` stays fast.
Every option can also come from ``--config FILE.json`` (the file each stage saves beside its output);
options given on the command line override the file.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    name="surpipe",
    help="SUR-adapter for Stable Diffusion: cache LLM + CLIP + VAE features in a Zarr store, "
    "train the adapter from it, generate with a stock diffusers pipeline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOpt = typer.Option(None, "--config", help="JSON config file (options given here override it).")


def _run_stage(module: str, cls_name: str, config: Optional[Path], **options):
    """Build the stage config from a file plus command-line options and run it."""
    from surpipe import config as cfgmod

    mod = importlib.import_module(f"stages.{module}")
    cls = getattr(mod, cls_name)
    opts = {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items() if v is not None}
    if config is not None:
        cfg = cfgmod.load(cls, config, opts)
    else:
        cfg = cfgmod.from_dict(cls, opts)
    return mod.run(cfg)


def _not_yet(issue: int):
    from surpipe.errors import SurpipeError

    raise SurpipeError(f"this command is not implemented yet (tracked in issue {issue})")


@app.command()
def pack(
    src: Path = typer.Argument(..., help="SURD imagefolder (a folder with metadata.jsonl)."),
    out: Path = typer.Argument(..., help="Output folder for webdataset .tar shards."),
    samples_per_shard: Optional[int] = typer.Option(None, help="Samples per .tar shard [default: 1000]."),
    strict: Optional[bool] = typer.Option(None, "--strict/--no-strict", help="Stop at the first bad row."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite/--no-overwrite", help="Replace existing shards in OUT."),
    config: Optional[Path] = ConfigOpt,
):
    """Convert a SURD imagefolder into webdataset .tar shards, with a report of skipped rows."""
    _run_stage("pack", "PackConfig", config, src=src, out=out, samples_per_shard=samples_per_shard,
               strict=strict, overwrite=overwrite)


@app.command("make-tiny-models")
def make_tiny_models(
    out: Path = typer.Argument(..., help="Output folder: writes OUT/llm and OUT/sd."),
    seed: Optional[int] = typer.Option(None, help="Seed for the random weights [default: 0]."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite/--no-overwrite"),
    config: Optional[Path] = ConfigOpt,
):
    """Build a tiny LLaMA-architecture LM and a tiny Stable Diffusion, offline, in HF folder layouts."""
    _run_stage("make_tiny_models", "TinyModelsConfig", config, out=out, seed=seed, overwrite=overwrite)


@app.command("extract-llm")
def extract_llm(
    data: Optional[str] = typer.Option(None, help="SURD imagefolder, folder of .tar shards, or brace pattern."),
    store: Optional[Path] = typer.Option(None, help="Feature store (Zarr) to create or extend."),
    model: Optional[str] = typer.Option(None, help="Causal LM: hub id or local folder."),
    layers: Optional[str] = typer.Option(None, help="Decoder layer indices, comma separated (0-based)."),
    quant: Optional[str] = typer.Option(None, help="none | 8bit | 4bit"),
    pooling: Optional[str] = typer.Option(None, help="mean | last | tokens"),
    batch_size: Optional[int] = typer.Option(None),
    config: Optional[Path] = ConfigOpt,
):
    """Stage one, LLM side: store chosen decoder layers' hidden states of the simple prompts."""
    _not_yet(3)


@app.command("encode-latents")
def encode_latents(
    data: Optional[str] = typer.Option(None, help="SURD imagefolder, folder of .tar shards, or brace pattern."),
    store: Optional[Path] = typer.Option(None, help="Feature store (Zarr) to create or extend."),
    model: Optional[str] = typer.Option(None, help="Stable Diffusion: hub id or local folder."),
    resolution: Optional[int] = typer.Option(None),
    config: Optional[Path] = ConfigOpt,
):
    """Stage one, SD side: CLIP embeddings of both prompts and VAE latent distributions."""
    _not_yet(4)


@app.command()
def train(
    store: Optional[Path] = typer.Option(None),
    model: Optional[str] = typer.Option(None, help="Stable Diffusion: hub id or local folder."),
    llm_layer: Optional[int] = typer.Option(None),
    out: Optional[Path] = typer.Option(None),
    max_steps: Optional[int] = typer.Option(None),
    config: Optional[Path] = ConfigOpt,
):
    """Stage two: train the SUR-adapter from the store (frozen UNet; no LLM, CLIP or VAE encoder)."""
    _not_yet(5)


@app.command()
def generate(
    model: Optional[str] = typer.Option(None),
    adapter: Optional[str] = typer.Option(None),
    prompt: Optional[str] = typer.Option(None),
    out: Optional[Path] = typer.Option(None),
    config: Optional[Path] = ConfigOpt,
):
    """Render prompts with a stock diffusers pipeline and the adapter (no LLM)."""
    _not_yet(6)


@app.command("eval")
def eval_(config: Optional[Path] = ConfigOpt):
    """Score images with and without the adapter on prompt suites by category (CLIP score)."""
    _not_yet(6)


@app.command("import-prompt2vec")
def import_prompt2vec(config: Optional[Path] = ConfigOpt):
    """Import the authors' {prompt: tensor} .pt file as an LLM layer group of a store."""
    _not_yet(3)


@app.command("import-official")
def import_official(config: Optional[Path] = ConfigOpt):
    """Convert the authors' released adapter .pt into a SURAdapter folder."""
    _not_yet(6)


@app.command()
def inspect(store: Path = typer.Argument(..., help="Feature store (Zarr) to describe.")):
    """Print a store's groups, arrays, shapes, dtypes, compression, completion and provenance."""
    from stages import inspect as st

    st.run(st.InspectConfig(store=str(store)))


@app.command()
def verify(
    store: Path = typer.Argument(..., help="Feature store (Zarr) to check."),
    repair: bool = typer.Option(False, "--repair", help="Mark damaged chunks incomplete for a rerun."),
):
    """Check a whole store against its contract (completion, alignment, decodability, NaN/Inf)."""
    _not_yet(8)


@app.command("run")
def run_all(config: Path = typer.Argument(..., help="Pipeline config (JSON).")):
    """Run the whole chain (pack, extract-llm, encode-latents, train, generate, eval) from one file."""
    _not_yet(6)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; turns SurpipeError into a message and exit status 1."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from surpipe.errors import SurpipeError

    try:
        app(args=argv, standalone_mode=False)
    except SurpipeError as e:
        print(f"surpipe: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("surpipe: interrupted", file=sys.stderr)
        return 130
    except typer.Exit as e:
        return e.exit_code
    except Exception as e:  # click usage errors arrive here with standalone_mode=False
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return e.exit_code
        if isinstance(e, click.exceptions.Abort):
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
