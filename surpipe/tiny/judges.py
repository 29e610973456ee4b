"""Tiny, randomly initialised judge models for ``surpipe eval``'s semantic accuracy, in the standard
Hugging Face folder layouts, built offline: a BLIP-VQA (``BlipForQuestionAnswering`` with a small
WordPiece vocabulary of the suite's words) and an OWLv2 detector (``Owlv2ForObjectDetection`` with the
real CLIP BPE tokenizer). Their answers are random; the loading, batching and scoring are the real
ones. Each folder loads with ``AutoTokenizer`` / ``AutoImageProcessor`` and its model class.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from surpipe.tiny.common import write_marker
from surpipe.tiny.tokenizers import write_clip_tokenizer

_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
_WORDS = ("yes no how many what color is are the there a an of in on it this one two three four five six seven "
          "eight nine ten 0 1 2 3 4 5 6 7 8 9 10 red orange yellow green blue purple pink brown black white gray "
          "golden silver dog dogs cat cats bird birds horse horses apple apples cup cups boat boats car house "
          "balloon children candles man woman girl boy chef kite fence jumping riding flying chasing kicking "
          "holding catching dancing cutting ?")


def _vocab(extra_text: str = "") -> list[str]:
    words = list(dict.fromkeys(_WORDS.split() + re.findall(r"[a-z]+", extra_text.lower())))
    return _SPECIAL + words


def build_tiny_blip_vqa(out_dir: str | os.PathLike, seed: int = 0, width: int = 32, image_size: int = 32) -> Path:
    """A tiny random BLIP-VQA in ``out_dir`` (model, WordPiece tokenizer, image processor)."""
    import torch  # heavy: keeps --help torch-free
    from transformers import BertTokenizer, BlipConfig, BlipForQuestionAnswering, BlipImageProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = _vocab()
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = BertTokenizer(str(out / "vocab.txt"), do_lower_case=True, bos_token="[DEC]")
    layers = dict(hidden_size=width, num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * width)
    cfg = BlipConfig(text_config=dict(vocab_size=len(vocab), bos_token_id=vocab.index("[DEC]"), pad_token_id=0,
                                      sep_token_id=vocab.index("[SEP]"), max_position_embeddings=64,
                                      encoder_hidden_size=width, **layers),
                     vision_config=dict(image_size=image_size, patch_size=8, **layers), projection_dim=width)
    torch.manual_seed(seed)
    BlipForQuestionAnswering(cfg).eval().save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    BlipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(out)
    write_marker(out, {"model": "blip-vqa", "seed": seed})
    return out


def build_tiny_owlv2(out_dir: str | os.PathLike, seed: int = 0, width: int = 32, image_size: int = 32) -> Path:
    """A tiny random OWLv2 open-vocabulary detector in ``out_dir`` (model, CLIP tokenizer, image processor)."""
    import torch  # heavy: keeps --help torch-free
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = write_clip_tokenizer(out, model_max_length=16)
    layers = dict(hidden_size=width, num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * width)
    cfg = Owlv2Config(text_config=dict(vocab_size=len(tok), max_position_embeddings=16, **layers),
                      vision_config=dict(image_size=image_size, patch_size=8, **layers), projection_dim=width)
    torch.manual_seed(seed)
    Owlv2ForObjectDetection(cfg).eval().save_pretrained(out, safe_serialization=True)
    Owlv2ImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(out)
    write_marker(out, {"model": "owlv2", "seed": seed})
    return out
