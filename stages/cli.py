"""The ``surpipe`` command line: parses options, builds a stage config, calls the stage's ``run``.

Every command's options are generated from its stage's config dataclass (``surpipe.config.opt``
gives each field its one-line help, its help panel and its valid range), so ``--help``, the saved
config and the validation cannot drift apart. Every option can also come from ``--config FILE.json``
(the file each stage saves beside its output); options given on the command line override it.
Heavy libraries are imported inside commands, so ``surpipe --help`` stays fast.

Exit status: 0 done, 1 a clear error (bad data, model or options), 2 a usage error, 130 interrupted.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import signal
import sys
import types
import typing
from pathlib import Path
from typing import Optional

import typer

from surpipe import config as cfgmod
from surpipe.errors import SurpipeError, first_line
from surpipe.logs import setup_logging

app = typer.Typer(
    name="surpipe",
    help="SUR-adapter for Stable Diffusion: cache LLM + CLIP + VAE features in a Zarr store, "
    "train the adapter from it, generate with a stock diffusers pipeline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

PANELS = {"data": "Data", "model": "Model", "optimisation": "Optimisation", "losses": "Losses",
          "validation": "Validation", "inference": "Inference", "output": "Output", "running": "Running"}

# What a rerun does after an interrupt, by command.
RESUME_HINT = {
    "train": "rerun the same command to resume from the latest checkpoint",
    "run": "rerun the same command to continue; finished steps are skipped",
    "extract-llm": "rerun the same command to continue; finished blocks are kept",
    "encode-latents": "rerun the same command to continue; finished blocks are kept",
    "import-prompt2vec": "rerun the same command to continue",
}


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM) during a command; carries the command's name for the message."""

    def __init__(self, command: str, code: int = 130):
        super().__init__(command)
        self.command, self.code = command, code


def _version(value: bool) -> None:
    if value:
        from surpipe import __version__

        typer.echo(f"surpipe {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print surpipe's version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v",
                                 help="Show third-party warnings, log messages and loading bars (hidden by default)."),
):
    """SUR-adapter for Stable Diffusion."""
    setup_logging(verbose=verbose)


# --------------------------------------------------------------------------- options from configs

def flag(name: str) -> str:
    """The command-line spelling of config field ``name``."""
    return "--" + name.replace("_", "-")


def _base_type(tp):
    """(base type, Literal choices or None, list element type or None) of a field annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else str
        origin = typing.get_origin(tp)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        return type(choices[0]), choices, None
    if origin in (list, tuple):
        inner = (typing.get_args(tp) or (str,))[0]
        return list, None, inner
    return tp, None, None


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        if f.default is None:
            return ""
        if isinstance(f.default, bool):
            return f" (default: {'yes' if f.default else 'no'})"
        return f" (default: {f.default})" if f.default != "" else ""
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        v = f.default_factory()  # type: ignore[misc]
        return f" (default: {','.join(map(str, v))})" if isinstance(v, list) and v else ""
    return " (required)"


def cli_fields(cls) -> list[dataclasses.Field]:
    """The config fields a command exposes, in help order: arguments, then by panel."""
    fields = [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]
    order = list(PANELS)

    def key(f):
        if f.metadata.get("argument"):
            return (-1, 0)
        g = f.metadata.get("group", "running")
        return (order.index(g) if g in order else len(order), 0)

    return sorted(fields, key=key)


def _parameters(cls) -> list[inspect.Parameter]:
    hints = typing.get_type_hints(cls)
    params = []
    for f in cli_fields(cls):
        base, choices, inner = _base_type(hints[f.name])
        help_txt = f.metadata.get("help", "")
        metavar = "|".join(map(str, choices)) if choices else None
        if metavar and len(metavar) > 24:
            metavar = None
            help_txt += f" One of: {' | '.join(map(str, choices))}."
        if base is list:
            help_txt += " Comma separated, or repeat the option."
        help_txt = (help_txt + _default_text(f)).strip().replace("[", "\\[")  # rich markup eats [...]
        panel = PANELS.get(f.metadata.get("group", "running"), "Running")
        if f.metadata.get("argument"):
            opt = typer.Argument(None, help=help_txt, show_default=False, metavar=f.name.upper())
            ann = Optional[str]
        elif base is bool:
            opt = typer.Option(None, f"{flag(f.name)}/--no-{f.name.replace('_', '-')}", help=help_txt,
                               rich_help_panel=panel, show_default=False)
            ann = Optional[bool]
        elif base is list:
            opt = typer.Option(None, flag(f.name), help=help_txt, rich_help_panel=panel, show_default=False)
            ann = Optional[list[str]]
        else:
            opt = typer.Option(None, flag(f.name), help=help_txt, rich_help_panel=panel, show_default=False,
                               metavar=metavar)
            ann = Optional[base if base in (int, float, str) else str]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=ann))
    params.append(inspect.Parameter(
        "config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
        default=typer.Option(None, "--config", help="JSON config file; options given here override it. "
                             "Every command saves its final config beside its output.",
                             rich_help_panel="Running", show_default=False)))
    return params


def _split_lists(cls, opts: dict) -> dict:
    """``--layers 1,3`` and ``--layers 1 --layers 3`` both give [1, 3]."""
    hints = typing.get_type_hints(cls)
    out = dict(opts)
    for name, v in opts.items():
        base, _, inner = _base_type(hints[name])
        if base is list and isinstance(v, (list, tuple)):
            items = [x.strip() for s in v for x in str(s).split(",") if x.strip()]
            try:
                out[name] = [inner(x) if inner in (int, float) else x for x in items]
            except ValueError:
                from surpipe.errors import SurpipeError

                kind = "integers" if inner is int else "numbers"
                raise SurpipeError(f"{flag(name)} {','.join(map(str, v))!r}: give comma-separated {kind}, "
                                   f"e.g. {flag(name)} 1,3") from None
    return out


def _relabel(err, labels: dict[str, str]):
    """The same SurpipeError with config keys replaced by how the user wrote them (flags)."""
    if not err.problems:
        return err
    new = []
    for p in err.problems:
        for key, lab in labels.items():
            for sep in (":", " ", "["):
                if p.startswith(key + sep):
                    p = lab + p[len(key):]
                    break
            else:
                continue
            break
        new.append(p)
    return SurpipeError(str(err).split("\n", 1)[0], new)


def run_stage(command: str, module: str, cls_name: str, config: Optional[Path], options: dict, func: str = "run"):
    """Build the stage config from a file plus command-line options and run it.

    Problems are reported with the flag names the user typed (``--llm-layer``), or the key and
    file for values that came from ``--config``.
    """
    mod = importlib.import_module(f"stages.{module}")
    cls = getattr(mod, cls_name)
    opts = {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items() if v is not None}
    opts = _split_lists(cls, opts)
    labels = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("argument"):
            labels[f.name] = f.name.upper()
        elif f.name in opts or config is None:
            labels[f.name] = flag(f.name)
        else:
            labels[f.name] = f"{f.name} (in {config})"
    what = f"options for 'surpipe {command}'"
    try:
        if config is not None:
            cfg = cfgmod.load(cls, config, opts, what=what, label=labels.get)
        else:
            cfg = cfgmod.from_dict(cls, opts, what=what, label=labels.get)
    except KeyboardInterrupt:
        raise Interrupted(command) from None
    try:
        return getattr(mod, func)(cfg)
    except SurpipeError as e:  # checks inside the stage name config keys: show the user's spelling
        raise _relabel(e, labels) from None
    except KeyboardInterrupt:
        raise Interrupted(command) from None


def config_command(name: str, module: str, cls_name: str, doc: str, on: typer.Typer = app, func: str = "run",
                   full_name: Optional[str] = None) -> None:
    """Register command ``name`` (on ``on``: the app or a command group) with options generated from
    ``stages.<module>.<cls_name>``, running ``stages.<module>.<func>``."""
    mod = importlib.import_module(f"stages.{module}")
    cls = getattr(mod, cls_name)

    required_args = [f.name for f in dataclasses.fields(cls) if f.metadata.get("argument")
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]

    def command(ctx: typer.Context, **kwargs):
        config = kwargs.pop("config")
        missing = [a.upper() for a in required_args if kwargs.get(a) is None]
        if missing and config is None:  # a usage error (exit 2), as click reports one
            raise _click_exceptions().UsageError(f"Missing argument '{missing[0]}'.", ctx=ctx)
        run_stage(full_name or name, module, cls_name, config, kwargs, func)

    ctx_param = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    command.__signature__ = inspect.Signature([ctx_param] + _parameters(cls))
    command.__doc__ = doc
    command.__name__ = name.replace("-", "_")
    on.command(name)(command)


COMMANDS = [
    ("pack", "pack", "PackConfig",
     "Convert a SURD imagefolder into webdataset .tar shards, with a report of skipped rows."),
    ("make-tiny-models", "make_tiny_models", "TinyModelsConfig",
     "Build a tiny LLaMA-architecture LM, a tiny Stable Diffusion and a tiny CLIP, offline, in HF folder layouts."),
    ("extract-llm", "extract_llm", "ExtractLLMConfig",
     "Stage one, LLM side: store chosen decoder layers' hidden states of the simple prompts.\n\n"
     "Rerunning continues where it stopped; --layers adds layers to an existing group."),
    ("encode-latents", "encode_latents", "EncodeLatentsConfig",
     "Stage one, SD side: CLIP embeddings of both prompts and VAE latent distributions."),
    ("train", "train", "TrainConfig",
     "Stage two: train the SUR-adapter from the store (frozen UNet; no LLM, CLIP or VAE encoder).\n\n"
     "Required: --store, --model, --llm-layer, --out. Rerunning resumes from the latest checkpoint."),
    ("generate", "generate", "GenerateConfig",
     "Render prompts with a stock diffusers pipeline and the adapter (no LLM).\n\n"
     "Required: --model, --adapter (a run folder or an adapter folder), --out, and --prompt or --prompts-file. "
     "--compare also renders without the adapter at the same seeds and writes a side-by-side grid."),
    ("eval", "eval", "EvalConfig",
     "Score images with and without the adapter on prompt suites by category (CLIP score).\n\n"
     "Writes results.md, results.json and a chart clip_scores.png (both arms with error bars)."),
    ("inspect", "inspect", "InspectConfig",
     "Describe a feature store: a short summary (--full for every array, --json for all of it)."),
    ("verify", "verify", "VerifyConfig",
     "Check a whole store against its contract (completion, alignment, checksums, decodability, NaN/Inf).\n\n"
     "Exit status 0 when sound (incomplete blocks are warnings), 1 with the list of problems."),
    ("import-official", "import_official", "ImportOfficialConfig",
     "Convert the authors' released adapter .pt into a SURAdapter folder."),
    ("import-prompt2vec", "import_prompt2vec", "ImportPrompt2VecConfig",
     "Import the authors' {prompt: tensor} .pt file as an LLM layer group of a store."),
]

for _cmd in COMMANDS:
    config_command(*_cmd)

study_app = typer.Typer(help="A blind A/B user-preference study of an eval's images: make the page, tally "
                             "the answers.", no_args_is_help=True)
app.add_typer(study_app, name="study")
config_command("make", "study", "StudyMakeConfig",
               "Write a self-contained HTML page of blind A/B pairs (with and without the adapter, same prompt and "
               "seed) from an eval folder, and its answer key beside it.", on=study_app, func="run_make",
               full_name="study make")
config_command("tally", "study", "StudyTallyConfig",
               "Preference for the adapter per category from the raters' exported answers: Wilson intervals and "
               "agreement between raters.", on=study_app, func="run_tally", full_name="study tally")


@app.command("run")
def run_all(config: Path = typer.Argument(..., help="Pipeline config (JSON), e.g. configs/sample.json.")):
    """Run the whole chain (pack, extract-llm, encode-latents, train, generate, eval) from one file.

    Rerunning continues where it stopped; finished steps are skipped.
    """
    from stages import run_pipeline  # the chain runner loads every stage: only when `surpipe run` runs

    try:
        cfg = cfgmod.load(run_pipeline.PipelineConfig, config, what=f"config {config}")
        run_pipeline.run(cfg)
    except KeyboardInterrupt:
        raise Interrupted("run") from None


# --------------------------------------------------------------------------- entry point

def _sigterm(signum, frame):  # batch schedulers stop jobs with SIGTERM: same path as Ctrl-C
    raise KeyboardInterrupt


def _interrupted_message(command: str, code: int) -> str:
    hint = RESUME_HINT.get(command)
    return f"surpipe: {command}: interrupted" + (f"; {hint}" if hint else "")


# Out-of-memory advice for train that a rerun on the same --out accepts: a run's global batch
# (batch-size x processes x grad-accum) is its identity, its split into micro-batches is not.
_TRAIN_OOM = ("lower --batch-size and raise --grad-accum by the same factor (the global batch stays, so the "
              "run resumes), or add --gradient-checkpointing")


def describe_unexpected(e: BaseException, command: str = "surpipe") -> str:
    """One line for an exception no check anticipated: what the environment did, or a bug report
    hint. Advice to rerun with other options names only options the rerun of ``command`` accepts."""
    import errno

    train = command == "train"
    if isinstance(e, MemoryError):
        return (f"out of memory: {_TRAIN_OOM}, and rerun" if train else
                "out of memory: lower --batch-size (or the data's image size) and rerun")
    if type(e).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch
        return (f"GPU out of memory: {_TRAIN_OOM} or --mixed-precision bf16, and rerun (finished work is kept)"
                if train else "GPU out of memory: lower --batch-size, or use --gradient-checkpointing / "
                "--mixed-precision fp16|bf16, and rerun (finished work is kept)")
    if isinstance(e, OSError) and e.errno is not None:
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        if e.errno == errno.ENOSPC:
            return f"no space left on device{where}: free space and rerun (finished work is kept)"
        return f"{e.strerror or e}{where}"
    first = first_line(e, "")[:300]
    if type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):  # without importing torch
        return (f"torch.compile failed ({type(e).__name__}: {first}); rerun without --compile-unet "
                "(a CPU needs a C++ compiler for it; finished work is kept)")
    return (f"unexpected {type(e).__name__}: {first}\n"
            "  this is a bug in surpipe or an environment it does not handle: rerun with --verbose for the "
            "full traceback and report it")


def _command_of(argv: list[str]) -> str:
    names = {c[0] for c in COMMANDS} | {"run"}
    return next((a for a in argv if a in names), "surpipe")


def _click_exceptions() -> types.ModuleType:
    """click's exceptions module as this typer uses it: typer >= 0.26 vendors click in a private
    ``_click`` package; older releases (a GPU image's) import the ``click`` package."""
    return sys.modules[typer.BadParameter.__module__]


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point.

    SurpipeError -> its message, exit 1; usage errors -> click's message, exit 2; Ctrl-C or
    SIGTERM -> what was interrupted and what a rerun does, exit 130. No traceback for any of them.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    click_exc = _click_exceptions()

    argv = list(sys.argv[1:] if argv is None else argv)
    if ("--help" in argv or not argv) and not os.environ.get("TERMINAL_WIDTH") and not sys.stdout.isatty():
        import typer.rich_utils as rich_utils  # piped help: rich would cut option names at 80 columns

        rich_utils.MAX_WIDTH = int(os.environ.get("COLUMNS", "0") or 0) or 120
    try:
        signal.signal(signal.SIGTERM, _sigterm)
    except ValueError:  # not the main thread (tests calling main() from a thread)
        pass
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="surpipe")
    except SurpipeError as e:
        print(f"surpipe: error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(_interrupted_message(e.command, e.code), file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(_interrupted_message(_command_of(argv), 130), file=sys.stderr)
        return 130
    except click_exc.ClickException as e:
        e.show()
        return e.exit_code
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        return 1
    except Exception as e:  # the last net: one message, never a traceback (unless --verbose)
        from surpipe.logs import verbose

        if verbose():
            raise
        print(f"surpipe: error: {describe_unexpected(e, _command_of(argv))}", file=sys.stderr)
        return 1
    if isinstance(rv, int) and rv == 130:  # typer turns a Ctrl-C outside our commands into Exit(130)
        print(_interrupted_message(_command_of(argv), 130), file=sys.stderr)
        return 130
    if isinstance(rv, int):
        return rv
    return 0


if __name__ == "__main__":
    sys.exit(main())
