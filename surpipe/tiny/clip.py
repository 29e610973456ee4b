"""A tiny, randomly initialised CLIP image-text model in the standard Hugging Face folder layout.

Used by tests and by ``surpipe run`` on the bundled sample as the ``--clip-model`` of ``surpipe eval``
(numbers from it are meaningless; the machinery is the real one). The folder loads with plain
``CLIPModel.from_pretrained(out)`` / ``CLIPTokenizer.from_pretrained(out)`` and holds a
``preprocessor_config.json`` like the real ``openai/clip-vit-*`` repositories (image side 32, patch 8).
The tokenizer is the REAL CLIP BPE (see :func:`surpipe.tiny.tokenizers.write_clip_tokenizer`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from surpipe.tiny.common import write_marker
from surpipe.tiny.tokenizers import CLIP_VOCAB_SIZE, write_clip_tokenizer

# The standard CLIP (OpenAI) image normalisation.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def tiny_clip_config(width: int = 32, layers: int = 2, heads: int = 4, image_size: int = 32, patch_size: int = 8,
                     projection_dim: int = 16):
    """A ``CLIPConfig`` with tiny text and vision towers."""
    from transformers import CLIPConfig  # heavy: keeps --help torch-free

    text = dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                num_attention_heads=heads, max_position_embeddings=77, hidden_act="quick_gelu",
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=projection_dim)
    vision = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=heads,
                  image_size=image_size, patch_size=patch_size, num_channels=3, hidden_act="quick_gelu",
                  projection_dim=projection_dim)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def preprocessor_config(image_size: int) -> dict:
    """The ``preprocessor_config.json`` of a CLIP model with square inputs of ``image_size``."""
    return {
        "crop_size": {"height": image_size, "width": image_size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(CLIP_MEAN),
        "image_processor_type": "CLIPImageProcessor",
        "image_std": list(CLIP_STD),
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": image_size},
    }


def build_tiny_clip(out_dir: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """Write a tiny random CLIP image-text model (weights, tokenizer, preprocessor config) to ``out_dir``.

    ``overrides`` go to :func:`tiny_clip_config`. The same seed gives the same weights.
    """
    import torch  # heavy: keeps --help torch-free
    from transformers import CLIPModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_clip_config(**overrides)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    # A random CLIP's image and text embeddings are unrelated, so most cosines come out negative and
    # the CLIP score (clamped at 0) would read 0 everywhere. Give both towers' final norms the same
    # bias and both projections the same matrix: the embeddings then share a direction and the
    # scores land inside (0, 100) while still depending on the image and the text.
    with torch.no_grad():
        shared = torch.randn(config.text_config.hidden_size) * 1.0
        model.text_model.final_layer_norm.bias.copy_(shared)
        model.vision_model.post_layernorm.bias.copy_(shared)
        model.text_projection.weight.copy_(model.visual_projection.weight)
    model.save_pretrained(out, safe_serialization=True)
    write_clip_tokenizer(out)
    image_size = config.vision_config.image_size
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(image_size), indent=2) + "\n",
                                                  encoding="utf-8")
    info = {"kind": "tiny-clip", "seed": seed, "image_size": image_size,
            "patch_size": config.vision_config.patch_size}
    write_marker(out, info)
    return out
