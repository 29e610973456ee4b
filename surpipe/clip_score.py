"""CLIP score of generated images against their prompts, with any CLIP image-text model.

Definition (the one torchmetrics' ``CLIPScore`` uses, Hessel et al. 2021 without their 2.5 weight)::

    score(image, text) = 100 * max(cos(E_image(image), E_text(text)), 0)

with ``E_image`` / ``E_text`` the model's projected image and text embeddings
(``visual_projection(vision_model(...).pooler_output)`` and ``text_projection(text_model(...).pooler_output)``,
which is what ``CLIPModel.get_image_features`` / ``get_text_features`` return). So scores lie in
[0, 100]; with ``openai/clip-vit-large-patch14`` typical text-image pairs score about 20-35. Texts
longer than the text tower's window (77 tokens) are truncated, as torchmetrics does.

Image preprocessing is the standard CLIP one, done here with PIL + numpy so that it does not depend
on torchvision (transformers 5's ``CLIPImageProcessor`` wants torchvision and otherwise falls back to
a PIL backend with a warning; results would then depend on what is installed):

1. convert to RGB;
2. resize so the SHORTEST side equals ``size.shortest_edge`` (the other side ``int(side * scale)``),
   resampling per ``resample`` (3 = bicubic, CLIP's), on the 8-bit image;
3. center crop to ``crop_size`` (offsets ``(H - h) // 2``, ``(W - w) // 2``);
4. scale to [0, 1] and normalise with ``image_mean`` / ``image_std``.

All settings come from the model's ``preprocessor_config.json``; when there is none, the CLIP
defaults are used (side = the vision tower's ``image_size``, OpenAI mean/std, bicubic).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from surpipe.errors import SurpipeError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFINITION = "CLIP score = 100 * max(cos(image_embedding, text_embedding), 0) (torchmetrics' CLIPScore)"


@dataclass
class Preprocess:
    """The standard CLIP image preprocessing (see the module doc)."""

    shortest_edge: int = 224
    crop_height: int = 224
    crop_width: int = 224
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD
    resample: int = 3  # PIL.Image.BICUBIC
    do_resize: bool = True
    do_center_crop: bool = True
    do_normalize: bool = True
    rescale_factor: float = 1 / 255
    source: str = "defaults"
    notes: list = field(default_factory=list)

    @classmethod
    def from_config(cls, cfg: dict | None, image_size: int, source: str = "preprocessor_config.json") -> "Preprocess":
        """From a ``preprocessor_config.json`` dict (``None``: CLIP defaults at ``image_size``)."""
        if not cfg:
            return cls(shortest_edge=image_size, crop_height=image_size, crop_width=image_size, source="CLIP defaults")
        size = cfg.get("size", image_size)
        if isinstance(size, dict):
            edge = size.get("shortest_edge") or size.get("height") or size.get("width") or image_size
        else:
            edge = int(size)
        crop = cfg.get("crop_size", edge)
        if isinstance(crop, dict):
            ch, cw = int(crop.get("height") or edge), int(crop.get("width") or edge)
        else:
            ch = cw = int(crop)
        return cls(shortest_edge=int(edge), crop_height=ch, crop_width=cw,
                   mean=tuple(cfg.get("image_mean", CLIP_MEAN)), std=tuple(cfg.get("image_std", CLIP_STD)),
                   resample=int(cfg.get("resample", 3)), do_resize=bool(cfg.get("do_resize", True)),
                   do_center_crop=bool(cfg.get("do_center_crop", True)),
                   do_normalize=bool(cfg.get("do_normalize", True)),
                   rescale_factor=float(cfg.get("rescale_factor", 1 / 255)), source=source)

    def to_dict(self) -> dict:
        return {"shortest_edge": self.shortest_edge, "crop_size": [self.crop_height, self.crop_width],
                "image_mean": list(self.mean), "image_std": list(self.std), "resample": self.resample,
                "do_resize": self.do_resize, "do_center_crop": self.do_center_crop,
                "do_normalize": self.do_normalize, "source": self.source}

    def __call__(self, images: Sequence) -> "torch.Tensor":  # noqa: F821
        """PIL images -> float32 tensor [N, 3, crop_height, crop_width]."""
        import numpy as np
        import torch
        from PIL import Image

        out = []
        for im in images:
            if not isinstance(im, Image.Image):
                im = Image.fromarray(np.asarray(im))
            im = im.convert("RGB")
            if self.do_resize:
                w, h = im.size
                short, long_ = (w, h) if w <= h else (h, w)
                new_short = self.shortest_edge
                new_long = int(new_short * long_ / short)
                size = (new_short, new_long) if w <= h else (new_long, new_short)
                if size != im.size:
                    im = im.resize(size, resample=Image.Resampling(self.resample))
            a = np.asarray(im, dtype=np.float32)
            if self.do_center_crop:
                h, w = a.shape[:2]
                ch, cw = self.crop_height, self.crop_width
                if h < ch or w < cw:  # pad with zeros like transformers' center_crop
                    pad = np.zeros((max(h, ch), max(w, cw), 3), dtype=np.float32)
                    top, left = (pad.shape[0] - h) // 2, (pad.shape[1] - w) // 2
                    pad[top:top + h, left:left + w] = a
                    a, h, w = pad, pad.shape[0], pad.shape[1]
                top, left = (h - ch) // 2, (w - cw) // 2
                a = a[top:top + ch, left:left + cw]
            a = a * self.rescale_factor
            if self.do_normalize:
                a = (a - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
            out.append(torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))))
        return torch.stack(out)


def _read_preprocessor_config(model: str, revision: str | None) -> tuple[dict | None, str]:
    local = Path(model).expanduser()
    if local.is_dir():
        p = local / "preprocessor_config.json"
        if not p.is_file():
            return None, "CLIP defaults (no preprocessor_config.json)"
    else:
        try:
            from huggingface_hub import hf_hub_download

            p = Path(hf_hub_download(model, "preprocessor_config.json", revision=revision))
        except Exception:
            return None, "CLIP defaults (no preprocessor_config.json)"
    try:
        return json.loads(p.read_text(encoding="utf-8")), str(p)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SurpipeError(f"{p} is not valid JSON: {e}") from None


class CLIPScorer:
    """``CLIPScorer(model).score(images, texts)`` -> one CLIP score per (image, text) pair."""

    def __init__(self, model: str, *, revision: str | None = None, device="cpu", batch_size: int = 32):
        import torch
        from transformers import AutoTokenizer, CLIPModel

        local = Path(model).expanduser()
        if (local.exists() or model.startswith((".", "/", "~"))) and not local.is_dir():
            raise SurpipeError(f"CLIP model folder not found: {model}")
        if local.is_dir() and not (local / "config.json").is_file():
            raise SurpipeError(f"{model} is not a CLIP model folder (no config.json)")
        try:
            self.model = CLIPModel.from_pretrained(model, revision=revision, dtype=torch.float32).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(model, revision=revision)
        except (OSError, ValueError, KeyError, TypeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
            raise SurpipeError(f"cannot load a CLIP image-text model from {model}{offline}: {first}") from None
        self.model.to(device)
        self.device = torch.device(device)
        self.name = model
        self.batch_size = batch_size
        cfg, source = _read_preprocessor_config(model, revision)
        self.preprocess = Preprocess.from_config(cfg, self.model.config.vision_config.image_size, source)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    def image_embeddings(self, images: Sequence) -> "torch.Tensor":  # noqa: F821
        """Projected image embeddings [N, P] (not normalised)."""
        import torch

        feats = []
        with torch.no_grad():
            for i in range(0, len(images), self.batch_size):
                px = self.preprocess(images[i:i + self.batch_size]).to(self.device)
                pooled = self.model.vision_model(pixel_values=px).pooler_output
                feats.append(self.model.visual_projection(pooled).float().cpu())
        return torch.cat(feats)

    def text_embeddings(self, texts: Sequence[str]) -> "torch.Tensor":  # noqa: F821
        """Projected text embeddings [N, P] (not normalised); texts truncated to the model's window."""
        import torch

        feats = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                tok = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.device)
                pooled = self.model.text_model(input_ids=tok["input_ids"],
                                               attention_mask=tok["attention_mask"]).pooler_output
                feats.append(self.model.text_projection(pooled).float().cpu())
        return torch.cat(feats)

    def score(self, images: Sequence, texts: Sequence[str]) -> list[float]:
        """``100 * max(cos(image_i, text_i), 0)`` for each pair."""
        import torch

        if len(images) != len(texts):
            raise ValueError("one text per image")
        if not images:
            return []
        img = torch.nn.functional.normalize(self.image_embeddings(images), dim=-1)
        txt = torch.nn.functional.normalize(self.text_embeddings(texts), dim=-1)
        return (100.0 * (img * txt).sum(-1)).clamp(min=0).tolist()

    def describe(self) -> dict:
        return {"model": self.name, "definition": DEFINITION, "preprocessing": self.preprocess.to_dict(),
                "max_text_tokens": self.max_length}
