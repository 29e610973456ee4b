"""Tiny, randomly initialised models in the standard Hugging Face folder layouts, built offline.

No model hub is needed: the architectures come from configs and the tokenizers are the REAL ones,
rebuilt from files that ship inside two small wheels (found on disk, never imported):

- LLaMA-style SentencePiece (32,000 pieces, adds BOS): ``mistral_common/data/tokenizer.model.v1``
  from ``mistral-common`` (the Mistral-7B v1 / LLaMA-style SentencePiece model).
- CLIP BPE (49,408 tokens, the one Stable Diffusion 1.x/2.x uses):
  ``open_clip/bpe_simple_vocab_16e6.txt.gz`` from ``open_clip_torch``.

Install both with ``pip install --no-deps mistral-common open_clip_torch`` (their own dependencies
are not needed; ``pip check`` will mention them). Without ``mistral-common`` the LLM can use a small
BPE trained here instead (``llm_tokenizer="bpe"``); it is recorded in ``llm/surpipe_tiny.json``.

The folders load with plain ``AutoModelForCausalLM.from_pretrained(out/"llm")``,
``AutoTokenizer.from_pretrained(out/"llm")`` and ``StableDiffusionPipeline.from_pretrained(out/"sd")``.
The same seed gives byte-identical safetensors.

Conventions worth knowing:
- LLM pad token: LLaMA has none; we use ``<unk>`` (id 0), which never appears in real text and is
  distinct from EOS, so masks built from ``input_ids != pad_token_id`` stay right. Always pass the
  attention mask anyway. transformers 5 sets ``padding_side="left"`` for LlamaTokenizer by default.
- Tiny VAE has 2 blocks, so it downsamples by 2 (not 8): a 64x64 image gives 32x32 latents, which is
  the UNet's ``sample_size``. ``scaling_factor`` stays SD's 0.18215.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from surpipe.errors import SurpipeError

PIP_HINT = "pip install --no-deps open_clip_torch mistral-common"

CLIP_VOCAB_SIZE = 49408
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"

# Seed offsets, so that changing one component never changes the others' weights.
_SEED_LLM, _SEED_TEXT, _SEED_VAE, _SEED_UNET = 0, 1, 2, 3


def _log(msg: str) -> None:
    print(f"surpipe: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- wheel files


def wheel_file(package: str, relpath: str, pip_name: str) -> Path:
    """Path of a data file inside an installed package, found without importing the package
    (open_clip's ``__init__`` needs torchvision, which we do not need)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        p = Path(loc) / relpath
        if p.is_file():
            return p
    if not locations:
        raise SurpipeError(
            f"the '{pip_name}' package is needed for its bundled tokenizer file {package}/{relpath}; "
            f"install it with: {PIP_HINT}"
        )
    raise SurpipeError(
        f"the installed '{pip_name}' package has no {package}/{relpath} (looked in {', '.join(locations)}); "
        f"reinstall it with: {PIP_HINT}"
    )


def llama_sentencepiece_file() -> Path:
    """The LLaMA-style SentencePiece model (32,000 pieces) shipped in the mistral-common wheel."""
    return wheel_file("mistral_common", "data/tokenizer.model.v1", "mistral-common")


def clip_bpe_file() -> Path:
    """The CLIP BPE merges file shipped in the open_clip_torch wheel."""
    return wheel_file("open_clip", "bpe_simple_vocab_16e6.txt.gz", "open_clip_torch")


def _clean_tokenizer_config(folder: Path) -> None:
    """Drop load-time flags that transformers 5 writes into tokenizer_config.json after loading from
    a local folder (``is_local``, ``local_files_only``); they describe our build, not the tokenizer."""
    p = Path(folder) / "tokenizer_config.json"
    if p.is_file():
        data = json.loads(p.read_text(encoding="utf-8"))
        if any(k in data for k in ("is_local", "local_files_only")):
            data.pop("is_local", None)
            data.pop("local_files_only", None)
            p.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- CLIP tokenizer


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the other bytes to
    code points from 256 up. Order matters (it fixes the first 512 ids): the printable bytes first,
    then the others, each group in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clip_vocab_and_merges(bpe_gz: str | os.PathLike | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Rebuild CLIP's 49,408-token vocab and its merges from open_clip's ``bpe_simple_vocab_16e6.txt.gz``.

    Order: the 256 byte characters, the same with ``</w>``, one token per merge (the first
    49152-256-2 merges after the header line), then ``<|startoftext|>`` and ``<|endoftext|>``.
    """
    path = Path(bpe_gz) if bpe_gz is not None else clip_bpe_file()
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    n_merges = 49152 - 256 - 2
    merges = [tuple(line.split()) for line in lines[1 : 1 + n_merges]]
    if len(merges) != n_merges or any(len(m) != 2 for m in merges):
        raise SurpipeError(f"{path} does not look like CLIP's BPE merges file")
    chars = list(_byte_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [CLIP_BOS, CLIP_EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise SurpipeError(f"rebuilt CLIP vocab has {len(vocab)} tokens, expected {CLIP_VOCAB_SIZE}")
    return vocab, merges


def write_clip_tokenizer(out_dir: str | os.PathLike, pad_token: str = CLIP_EOS, model_max_length: int = 77):
    """Write a CLIPTokenizer folder (vocab.json, merges.txt, tokenizer.json, config) and return the tokenizer.

    ``pad_token``: ``<|endoftext|>`` as in SD 1.x; SD 2.x uses ``"!"``.
    """
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    # The classic slow-tokenizer files first, so the folder loads the standard way.
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8"
    )
    tok = CLIPTokenizer.from_pretrained(out, pad_token=pad_token, model_max_length=model_max_length)
    tok.save_pretrained(out)
    _clean_tokenizer_config(out)
    return tok


# --------------------------------------------------------------------------- LLM tokenizer


def _bpe_corpus() -> list[str]:
    """A small prompt-like corpus (SURD-style simple prompts and rich descriptions) for the fallback BPE."""
    subjects = ["cat", "dog", "girl", "boy", "woman", "man", "castle", "forest", "city", "robot", "dragon",
                "flower", "car", "ship", "mountain", "river", "bird", "horse", "house", "tree"]
    adjectives = ["red", "blue", "green", "golden", "dark", "bright", "old", "young", "tiny", "giant",
                  "beautiful", "detailed", "colorful", "misty", "ancient", "futuristic"]
    styles = ["oil painting", "digital art", "photograph", "watercolor", "concept art", "illustration",
              "by greg rutkowski", "trending on artstation", "4k", "highly detailed", "octane render",
              "unreal engine", "sharp focus", "cinematic lighting", "studio ghibli", "8k resolution"]
    places = ["in the rain", "at sunset", "on a hill", "under the stars", "in a garden", "by the sea",
              "in the snow", "near a lake", "in the morning", "at night"]
    lines = []
    for i, s in enumerate(subjects):
        for j, a in enumerate(adjectives):
            p = places[(i + j) % len(places)]
            st = styles[(i * 3 + j) % len(styles)]
            st2 = styles[(i + 5 * j) % len(styles)]
            lines.append(f"a photo of a {a} {s} {p}")
            lines.append(f"A {a} {s} {p}, {st}, {st2}. The {s} looks {adjectives[(i + j + 3) % len(adjectives)]}!")
    lines += ["0123456789 ,.;:!?'\"()-", "The quick brown fox jumps over the lazy dog."]
    return lines


def train_llama_bpe(vocab_size: int = 1000):
    """A small LLaMA-shaped BPE (SentencePiece-style '▁' pieces, byte fallback, BOS added),
    trained on a built-in prompt corpus. Needs no extra wheel."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tk.train_from_iterator(_bpe_corpus(), trainer=trainer)
    model = json.loads(tk.to_str())["model"]
    trained = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    tokens = specials + byte_tokens + [t for t, _ in trained if t not in specials]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)


def load_llama_sentencepiece():
    """The real LLaMA-style SentencePiece tokenizer (32,000 pieces, adds BOS) from the mistral-common wheel."""
    from transformers import LlamaTokenizer

    sp = llama_sentencepiece_file()
    with tempfile.TemporaryDirectory(prefix="surpipe-sp-") as d:
        shutil.copyfile(sp, Path(d) / "tokenizer.model")
        # LlamaTokenizer(vocab_file=...) silently gives a 3-token tokenizer: load through a folder.
        tok = LlamaTokenizer.from_pretrained(d, add_bos_token=True)
    if len(tok) != 32000:
        raise SurpipeError(f"LLaMA SentencePiece from {sp} loaded with {len(tok)} tokens, expected 32000")
    return tok


# --------------------------------------------------------------------------- tiny LLM


def tiny_llm_config(vocab_size: int = 32000, **overrides: Any):
    """LlamaConfig of the tiny LM: 64 wide, 4 layers, 4 heads, 2 KV heads (GQA), MLP 128."""
    from transformers import LlamaConfig

    kw: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def _library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "diffusers", "tokenizers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def build_tiny_llm(out_dir: str | os.PathLike, seed: int = 0, tokenizer: str = "sentencepiece", **overrides: Any) -> Path:
    """Write a tiny random LLaMA-architecture causal LM plus its tokenizer to ``out_dir``.

    ``tokenizer``: ``"sentencepiece"`` (real LLaMA-style, from the mistral-common wheel) or
    ``"bpe"`` (small BPE trained here; no wheel needed). ``overrides`` go to ``LlamaConfig``.
    Returns ``Path(out_dir)``.
    """
    import torch
    from transformers import LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer == "sentencepiece":
        tok = load_llama_sentencepiece()
        source = "mistral_common/data/tokenizer.model.v1 (mistral-common wheel)"
    elif tokenizer == "bpe":
        tok = train_llama_bpe()
        source = "BPE trained by surpipe.tiny.train_llama_bpe on a built-in prompt corpus"
    else:
        raise SurpipeError(f"unknown tiny LLM tokenizer {tokenizer!r} (use 'sentencepiece' or 'bpe')")
    tok.pad_token = tok.unk_token  # LLaMA has no pad token; <unk> (id 0) never occurs in text
    overrides.setdefault("vocab_size", len(tok))
    overrides.setdefault("pad_token_id", tok.pad_token_id)
    overrides.setdefault("bos_token_id", tok.bos_token_id)
    overrides.setdefault("eos_token_id", tok.eos_token_id)
    cfg = tiny_llm_config(**overrides)
    tok.model_max_length = cfg.max_position_embeddings

    torch.manual_seed(seed * 1000 + _SEED_LLM)
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    _clean_tokenizer_config(out)
    if tokenizer == "sentencepiece":  # real LLaMA repos ship the SentencePiece model too
        shutil.copyfile(llama_sentencepiece_file(), out / "tokenizer.model")
    info = {
        "kind": "tiny-llm",
        "seed": seed,
        "tokenizer": tokenizer,
        "tokenizer_source": source,
        "vocab_size": len(tok),
        "pad_token": tok.pad_token,
        "add_bos_token": True,
        "config_overrides": {k: v for k, v in overrides.items() if isinstance(v, (int, float, str, bool))},
        "versions": _library_versions(),
    }
    (out / "surpipe_tiny.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out


# --------------------------------------------------------------------------- tiny Stable Diffusion


def tiny_sd_configs(
    text_width: int = 32,
    text_layers: int = 2,
    text_heads: int = 4,
    text_act: str = "quick_gelu",
    channels: tuple[int, ...] = (32, 64),
    layers_per_block: int = 1,
    attention_head_dim: int | tuple[int, ...] = 8,
    use_linear_projection: bool = False,
    norm_num_groups: int = 32,
    latent_channels: int = 4,
    image_size: int = 64,
    prediction_type: str = "epsilon",
    scaling_factor: float = 0.18215,
    clip_pad_token: str = CLIP_EOS,
) -> dict[str, dict[str, Any]]:
    """Configs (plain dicts) of the tiny SD components: ``text_encoder``, ``vae``, ``unet``, ``scheduler``,
    ``tokenizer``. Defaults are SD-1.5-like; an SD-2-like variant is e.g.
    ``tiny_sd_configs(text_width=64, text_act="gelu", prediction_type="v_prediction",
    use_linear_projection=True, clip_pad_token="!")``.

    The VAE has ``len(channels)`` blocks and downsamples by ``2 ** (len(channels) - 1)``; the UNet's
    ``sample_size`` is set to match ``image_size``.
    """
    n = len(channels)
    down_factor = 2 ** (n - 1)
    if image_size % down_factor:
        raise SurpipeError(f"image_size {image_size} is not a multiple of the VAE's downsampling {down_factor}")
    text = dict(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=text_width,
        intermediate_size=4 * text_width,
        projection_dim=text_width,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        max_position_embeddings=77,
        hidden_act=text_act,
        layer_norm_eps=1e-5,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407 if clip_pad_token == CLIP_EOS else 0,
    )
    vae = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=list(channels),
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=image_size,
        scaling_factor=scaling_factor,
    )
    down = ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"]
    up = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1)
    unet = dict(
        sample_size=image_size // down_factor,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=list(channels),
        layers_per_block=layers_per_block,
        cross_attention_dim=text_width,
        attention_head_dim=list(attention_head_dim) if isinstance(attention_head_dim, (tuple, list)) else attention_head_dim,
        use_linear_projection=use_linear_projection,
        norm_num_groups=norm_num_groups,
    )
    scheduler = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
        timestep_spacing="leading",
    )
    tokenizer = dict(pad_token=clip_pad_token, model_max_length=77)
    return dict(text_encoder=text, vae=vae, unet=unet, scheduler=scheduler, tokenizer=tokenizer)


def build_tiny_sd(out_dir: str | os.PathLike, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny random Stable Diffusion in the diffusers layout to ``out_dir``; ``overrides``
    go to :func:`tiny_sd_configs`. Loads with ``StableDiffusionPipeline.from_pretrained(out_dir)``."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = Path(out_dir)
    cfgs = tiny_sd_configs(**overrides)
    with tempfile.TemporaryDirectory(prefix="surpipe-clip-") as d:
        tok = write_clip_tokenizer(d, **cfgs["tokenizer"])
    torch.manual_seed(seed * 1000 + _SEED_TEXT)
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfgs["text_encoder"])).eval()
    torch.manual_seed(seed * 1000 + _SEED_VAE)
    vae = AutoencoderKL(**cfgs["vae"]).eval()
    torch.manual_seed(seed * 1000 + _SEED_UNET)
    unet = UNet2DConditionModel(**cfgs["unet"]).eval()
    scheduler = DDPMScheduler(**cfgs["scheduler"])
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    # Keep the classic vocab.json/merges.txt beside tokenizer.json, as SD repos ship them.
    vocab, merges = clip_vocab_and_merges()
    tdir = out / "tokenizer"
    _clean_tokenizer_config(tdir)
    if not (tdir / "vocab.json").exists():
        (tdir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    if not (tdir / "merges.txt").exists():
        (tdir / "merges.txt").write_text(
            "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8"
        )
    info = {
        "kind": "tiny-sd",
        "seed": seed,
        "clip_tokenizer_source": "open_clip/bpe_simple_vocab_16e6.txt.gz (open_clip_torch wheel)",
        "vae_downsample": 2 ** (len(cfgs["vae"]["block_out_channels"]) - 1),
        "configs": cfgs,
        "versions": _library_versions(),
    }
    (out / "surpipe_tiny.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out


# --------------------------------------------------------------------------- both


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SurpipeError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise SurpipeError(f"output folder {out} is not empty; pass --overwrite to replace llm/, sd/ and clip/ in it")


def make_tiny_models(
    out: str | os.PathLike,
    seed: int = 0,
    overwrite: bool = False,
    llm_tokenizer: str = "sentencepiece",
    llm_overrides: dict | None = None,
    sd_overrides: dict | None = None,
    clip: bool = True,
) -> Path:
    """Build ``out/llm`` (tiny LLaMA + tokenizer), ``out/sd`` (tiny Stable Diffusion) and, unless
    ``clip`` is False, ``out/clip`` (the tiny CLIP image-text model ``eval`` scores with); return ``Path(out)``.

    Refuses a non-empty ``out`` unless ``overwrite`` (which replaces ``llm/``, ``sd/`` and ``clip/`` only).
    Each part is built in a temporary folder inside ``out`` and renamed into place when complete.
    """
    from surpipe.tiny_clip import build_tiny_clip

    import time

    out = Path(out)
    _check_out(out, overwrite)
    # Fail early, before the slow imports, if a tokenizer wheel is missing.
    clip_bpe_file()
    if llm_tokenizer == "sentencepiece":
        llama_sentencepiece_file()
    out.mkdir(parents=True, exist_ok=True)
    for name, builder, kw in (
        ("llm", build_tiny_llm, dict(tokenizer=llm_tokenizer, **(llm_overrides or {}))),
        ("sd", build_tiny_sd, dict(sd_overrides or {})),
        *([("clip", build_tiny_clip, {})] if clip else []),
    ):
        t0 = time.perf_counter()
        _log(f"building tiny {name} in {out / name} ...")
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=out))
        try:
            builder(tmp, seed=seed, **kw)
            final = out / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        _log(f"wrote {final} ({time.perf_counter() - t0:.1f} s)")
    return out
