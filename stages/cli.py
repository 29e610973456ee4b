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
    samples_per_shard: Optional[int] = typer.Option(None, help="Samples per .tar shard (default: 1000)."),
    strict: Optional[bool] = typer.Option(None, "--strict/--no-strict", help="Stop at the first bad row."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite/--no-overwrite", help="Replace existing shards in OUT."),
    check_images: Optional[str] = typer.Option(None, help="full | header | none (default: full: decode every image)."),
    max_pixels: Optional[int] = typer.Option(None, help="Refuse images with more pixels, before decoding (default: 8192*8192)."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Show progress bars."),
    config: Optional[Path] = ConfigOpt,
):
    """Convert a SURD imagefolder into webdataset .tar shards, with a report of skipped rows."""
    _run_stage("pack", "PackConfig", config, src=src, out=out, samples_per_shard=samples_per_shard,
               strict=strict, overwrite=overwrite, check_images=check_images, max_pixels=max_pixels,
               progress=progress)


@app.command("make-tiny-models")
def make_tiny_models(
    out: Path = typer.Argument(..., help="Output folder: writes OUT/llm and OUT/sd."),
    seed: Optional[int] = typer.Option(None, help="Seed for the random weights (default: 0)."),
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
    layers: Optional[str] = typer.Option(None, help="Decoder layer indices, comma separated, 0-based; "
                                         "negative from the end (--layers=-1 is the last)."),
    quant: Optional[str] = typer.Option(None, help="none | 8bit | 4bit (bitsandbytes; 4bit = NF4) (default: none)."),
    pooling: Optional[str] = typer.Option(None, help="mean | last | tokens (default: mean)."),
    batch_size: Optional[int] = typer.Option(None, help="Prompts per forward, length-bucketed (default: 16)."),
    dtype: Optional[str] = typer.Option(None, help="auto | float32 | float16 | bfloat16 (default: auto: "
                                        "float32 on CPU, bfloat16 on CUDA)."),
    max_tokens: Optional[int] = typer.Option(None, help="Truncate prompts to this many tokens (default: the model's limit)."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:I (default: auto)."),
    name: Optional[str] = typer.Option(None, help="Group llm/NAME (default: the model's name, + -8bit/-4bit, -last/-tokens)."),
    store_dtype: Optional[str] = typer.Option(None, help="Stored dtype: float16 | float32 (default: float16)."),
    codec: Optional[str] = typer.Option(None, help="zstd | blosc-lz4 | gzip | none (default: zstd)."),
    double_quant: Optional[bool] = typer.Option(None, "--double-quant/--no-double-quant",
                                                help="4bit: quantize the quantization constants too (default: yes)."),
    revision: Optional[str] = typer.Option(None, help="Hub revision (branch, tag or commit)."),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code/--no-trust-remote-code",
                                                     help="Allow the model repository's own code (default: no)."),
    block_rows: Optional[int] = typer.Option(None, help="Rows per block when creating the store (default: 256)."),
    padding_side: Optional[str] = typer.Option(None, help="right | left (values do not depend on it) (default: right)."),
    bucket: Optional[bool] = typer.Option(None, "--bucket/--no-bucket", help="Length-bucketed batches (default: yes)."),
    check_images: Optional[str] = typer.Option(None, help="auto | full | header | none (default: auto)."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite/--no-overwrite", help="Replace a group written with other settings."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Show progress bars."),
    config: Optional[Path] = ConfigOpt,
):
    """Stage one, LLM side: store chosen decoder layers' hidden states of the simple prompts."""
    layer_list = None
    if layers is not None:
        try:
            layer_list = [int(x) for x in layers.replace(" ", "").split(",") if x != ""]
        except ValueError:
            from surpipe.errors import SurpipeError

            raise SurpipeError(f"--layers {layers!r}: give comma-separated integers, e.g. --layers 20,39") from None
    _run_stage("extract_llm", "ExtractLLMConfig", config, data=data, store=store, model=model, layers=layer_list,
               quant=quant, pooling=pooling, batch_size=batch_size, dtype=dtype, max_tokens=max_tokens,
               device=device, name=name, store_dtype=store_dtype, codec=codec, double_quant=double_quant,
               revision=revision, trust_remote_code=trust_remote_code, block_rows=block_rows,
               padding_side=padding_side, bucket=bucket, check_images=check_images, overwrite=overwrite,
               progress=progress)


@app.command("encode-latents")
def encode_latents(
    data: Optional[str] = typer.Option(None, help="SURD imagefolder, folder of .tar shards, or brace pattern."),
    store: Optional[Path] = typer.Option(None, help="Feature store (Zarr) to create or extend."),
    model: Optional[str] = typer.Option(None, help="Stable Diffusion: hub id or local folder."),
    resolution: Optional[int] = typer.Option(None, help="Image side in pixels (default: the model's, 512 for SD 1.5)."),
    revision: Optional[str] = typer.Option(None, help="Hub revision (branch, tag or commit)."),
    variant: Optional[str] = typer.Option(None, help="Weight file variant, e.g. fp16."),
    parts: Optional[str] = typer.Option(None, help="What to encode: clip, vae or clip,vae (default: clip,vae)."),
    name: Optional[str] = typer.Option(None, help="Group name: clip/NAME, vae/NAME-R (default: the model's name)."),
    vae_name: Optional[str] = typer.Option(None, help="Full VAE group name (default: NAME-RESOLUTION)."),
    flip: Optional[bool] = typer.Option(None, "--flip/--no-flip", help="Also store the flipped crop's latents (default: no)."),
    batch_size: Optional[int] = typer.Option(None, help="Images per VAE batch (default: 8)."),
    text_batch_size: Optional[int] = typer.Option(None, help="Prompts per text-encoder batch (default: 64)."),
    dtype: Optional[str] = typer.Option(None, help="Compute dtype: float32 | float16 | bfloat16 (default: float32)."),
    store_dtype: Optional[str] = typer.Option(None, help="Stored dtype: float16 | float32 (default: float16)."),
    codec: Optional[str] = typer.Option(None, help="zstd | blosc-lz4 | gzip | none (default: zstd)."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:I (default: auto)."),
    workers: Optional[int] = typer.Option(None, help="Image-decoding DataLoader workers (default: 2)."),
    block_rows: Optional[int] = typer.Option(None, help="Rows per block when creating the store (default: 256)."),
    check_images: Optional[str] = typer.Option(None, help="auto | full | header | none (default: auto)."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite/--no-overwrite", help="Replace groups written with other settings."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Show progress bars."),
    config: Optional[Path] = ConfigOpt,
):
    """Stage one, SD side: CLIP embeddings of both prompts and VAE latent distributions."""
    _run_stage("encode_latents", "EncodeLatentsConfig", config, data=data, store=store, model=model,
               resolution=resolution, revision=revision, variant=variant,
               parts=[p.strip() for p in parts.split(",") if p.strip()] if parts is not None else None,
               name=name, vae_name=vae_name, flip=flip, batch_size=batch_size, text_batch_size=text_batch_size,
               dtype=dtype, store_dtype=store_dtype, codec=codec, device=device, workers=workers,
               block_rows=block_rows, check_images=check_images, overwrite=overwrite, progress=progress)


def _config_command(name: str, module: str, cls_name: str, doc: str, list_sep: dict | None = None):
    """Register a command whose options are generated from the stage's config dataclass.

    Each field becomes ``--field-name`` (booleans ``--x/--no-x``; list fields repeat the option),
    typed and documented from the dataclass, so the CLI and the saved config never drift apart.
    Required fields are still checked by the config validation, which lists every problem at once.
    """
    import dataclasses
    import inspect
    import typing

    mod = importlib.import_module(f"stages.{module}")
    cls = getattr(mod, cls_name)
    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        base = args[0] if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args else tp
        choices = None
        if typing.get_origin(base) is typing.Literal:
            choices = typing.get_args(base)
            base = type(choices[0])
        flag = "--" + f.name.replace("_", "-")
        if f.default is not dataclasses.MISSING:
            default_txt = f" (default: {f.default})"
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default_txt = ""
        else:
            default_txt = " (required)"
        help_txt = (f"one of: {' | '.join(map(str, choices))}" if choices else "") + default_txt
        if base is bool:
            opt = typer.Option(None, f"{flag}/--no-{f.name.replace('_', '-')}", help=help_txt.strip())
            ann = Optional[bool]
        elif typing.get_origin(base) is list:
            opt = typer.Option(None, flag, help=("repeat for several" + default_txt).strip())
            ann = Optional[list[str]]
        else:
            opt = typer.Option(None, flag, help=help_txt.strip())
            ann = Optional[base if base in (int, float, str) else str]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=ann))
    params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=ConfigOpt,
                                    annotation=Optional[Path]))

    def command(**kwargs):
        config = kwargs.pop("config")
        _run_stage(module, cls_name, config, **kwargs)

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = doc
    command.__name__ = name.replace("-", "_")
    app.command(name)(command)


_config_command(
    "train", "train", "TrainConfig",
    "Stage two: train the SUR-adapter from the store (frozen UNet; no LLM, CLIP or VAE encoder).\n\n"
    "Required: --store, --model, --llm-layer, --out. Rerunning resumes from the latest checkpoint.",
)


_config_command(
    "generate", "generate", "GenerateConfig",
    "Render prompts with a stock diffusers pipeline and the adapter (no LLM).\n\n"
    "Required: --model, --adapter (a run folder or an adapter folder), --out, and --prompt or --prompts-file. "
    "--compare also renders without the adapter at the same seeds and writes a side-by-side grid.",
)


_config_command(
    "eval", "eval", "EvalConfig",
    "Score images with and without the adapter on prompt suites by category (CLIP score).\n\n"
    "Required: --model, --adapter, --out; --clip-model defaults to openai/clip-vit-large-patch14. "
    "Writes results.md, results.json and a bar chart clip_scores.png.",
)


@app.command("import-prompt2vec")
def import_prompt2vec(
    file: Optional[Path] = typer.Argument(None, help="The authors' prompt2vec .pt: {simple prompt: tensor [H]}."),
    store: Optional[Path] = typer.Option(None, help="Existing feature store whose rows the vectors are aligned to."),
    layer: Optional[int] = typer.Option(None, help="Decoder layer the file holds (not stored in it; the authors' "
                                        "LLaMA-13B release is layer 39). Required unless given by --config."),
    name: Optional[str] = typer.Option(None, help="Group llm/NAME (default: prompt2vec)."),
    model: Optional[str] = typer.Option(None, help="The LLM the file came from, recorded as provenance."),
    store_dtype: Optional[str] = typer.Option(None, help="Stored dtype: float16 | float32 (default: float16)."),
    strict: Optional[bool] = typer.Option(None, "--strict/--no-strict",
                                          help="Refuse if any store row has no vector (default: no: zeros, matched=false)."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite/--no-overwrite", help="Replace a group written with other settings."),
    config: Optional[Path] = ConfigOpt,
):
    """Import the authors' {prompt: tensor} .pt file as an LLM layer group of a store."""
    _run_stage("import_prompt2vec", "ImportPrompt2VecConfig", config, file=file, store=store, layer=layer,
               name=name, model=model, store_dtype=store_dtype, strict=strict, overwrite=overwrite)


@app.command("import-official")
def import_official(
    file: Path = typer.Argument(..., help="The authors' released adapter state dict (.pt)."),
    out: Path = typer.Argument(..., help="Output SURAdapter folder (config.json + model.safetensors)."),
    adapter_weight: Optional[float] = typer.Option(
        None, help="Mixing weight the checkpoint was trained with (not stored in it; the authors' "
        "release names it in its folder name, usually 0.1). Required unless given by --config."),
    width: Optional[int] = typer.Option(None, help="Expected width D (768 for SD1.x, 1024 for SD2.x); checked."),
    nhead: Optional[int] = typer.Option(None, help="Attention heads of the encoder (default 8, the authors')."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite/--no-overwrite", help="Replace an existing OUT."),
    config: Optional[Path] = ConfigOpt,
):
    """Convert the authors' released adapter .pt into a SURAdapter folder."""
    if adapter_weight is None and config is None:
        from surpipe.errors import SurpipeError

        raise SurpipeError("--adapter-weight is required: the authors' .pt does not store it "
                           "(their release names it in the folder name; 0.1 is their default)")
    _run_stage("import_official", "ImportOfficialConfig", config, file=file, out=out,
               adapter_weight=adapter_weight, width=width, nhead=nhead, overwrite=overwrite)


@app.command()
def inspect(store: Path = typer.Argument(..., help="Feature store (Zarr) to describe.")):
    """Print a store's groups, arrays, shapes, dtypes, compression, completion and provenance."""
    from stages import inspect as st

    st.run(st.InspectConfig(store=str(store)))


@app.command()
def verify(
    store: Path = typer.Argument(..., help="Feature store (Zarr) to check."),
    repair: bool = typer.Option(False, "--repair", help="Mark damaged blocks incomplete (done=false) so "
                                "rerunning the stage redoes only them; recomputes nothing."),
    json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Check a whole store against its contract (completion, alignment, decodability, NaN/Inf).

    Exit status 0 when sound (incomplete blocks are warnings), 1 with the list of problems.
    """
    _run_stage("verify", "VerifyConfig", None, store=store, repair=repair, json=json)


@app.command("run")
def run_all(config: Path = typer.Argument(..., help="Pipeline config (JSON).")):
    """Run the whole chain (pack, extract-llm, encode-latents, train, generate, eval) from one file.

    Rerunning continues where it stopped; finished steps are skipped.
    """
    _run_stage("run_pipeline", "PipelineConfig", config)


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
