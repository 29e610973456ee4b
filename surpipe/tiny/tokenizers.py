"""The REAL tokenizers of the tiny models, rebuilt offline from files shipped in two wheels:
CLIP's BPE (from ``open_clip_torch``) and a LLaMA-style SentencePiece (from ``mistral-common``), or
a small BPE trained here when that wheel is missing."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path

from surpipe.errors import SurpipeError
from surpipe.tiny.common import clean_tokenizer_config, clip_bpe_file, llama_sentencepiece_file

CLIP_VOCAB_SIZE = 49408
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


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


def write_clip_files(out: Path, vocab: dict[str, int], merges: list[tuple[str, str]],
                     keep_existing: bool = False) -> None:
    """Write CLIP's classic ``vocab.json`` and ``merges.txt`` into ``out`` (with ``keep_existing``,
    files already there are left as they are)."""
    files = {"vocab.json": json.dumps(vocab, ensure_ascii=False),
             "merges.txt": "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n"}
    for name, text in files.items():
        if not (keep_existing and (out / name).exists()):
            (out / name).write_text(text, encoding="utf-8")


def write_clip_tokenizer(out_dir: str | os.PathLike, pad_token: str = CLIP_EOS, model_max_length: int = 77):
    """Write a CLIPTokenizer folder (vocab.json, merges.txt, tokenizer.json, config) and return the tokenizer.

    ``pad_token``: ``<|endoftext|>`` as in SD 1.x; SD 2.x uses ``"!"``.
    """
    from transformers import CLIPTokenizer  # heavy: keeps --help torch-free

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The classic slow-tokenizer files first, so the folder loads the standard way.
    write_clip_files(out, *clip_vocab_and_merges())
    tok = CLIPTokenizer.from_pretrained(out, pad_token=pad_token, model_max_length=model_max_length)
    tok.save_pretrained(out)
    clean_tokenizer_config(out)
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
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # heavy: keeps --help torch-free
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
    from transformers import LlamaTokenizer  # heavy: keeps --help torch-free

    sp = llama_sentencepiece_file()
    with tempfile.TemporaryDirectory(prefix="surpipe-sp-") as d:
        shutil.copyfile(sp, Path(d) / "tokenizer.model")
        # LlamaTokenizer(vocab_file=...) silently gives a 3-token tokenizer: load through a folder.
        tok = LlamaTokenizer.from_pretrained(d, add_bos_token=True)
    if len(tok) != 32000:
        raise SurpipeError(f"LLaMA SentencePiece from {sp} loaded with {len(tok)} tokens, expected 32000")
    return tok
