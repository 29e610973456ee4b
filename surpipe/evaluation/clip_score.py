"""CLIP score of generated images against their prompts, with any CLIP image-text model.

Definition (the one torchmetrics' ``CLIPScore`` uses, Hessel et al. 2021 without their 2.5 weight)::

    score(image, text) = 100 * max(cos(E_image(image), E_text(text)), 0)

with ``E_image`` / ``E_text`` the model's projected image and text embeddings
(``visual_projection(vision_model(...).pooler_output)`` and ``text_projection(text_model(...).pooler_output)``,
which is what ``CLIPModel.get_image_features`` / ``get_text_features`` return). So scores lie in
[0, 100]; with ``openai/clip-vit-large-patch14`` typical text-image pairs score about 20-35. Texts
longer than the text tower's window (77 tokens) are truncated, as torchmetrics does.

Image preprocessing is transformers' own CLIP image processor, its PIL backend
(``CLIPImageProcessorPil``: resize the shortest side, center crop, rescale, normalise), so no
torchvision is needed and the pixels are the same whatever else is installed. Its settings come
from the model's ``preprocessor_config.json``; when there is none, the CLIP defaults are used
(side = the vision tower's ``image_size``, OpenAI mean/std, bicubic).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from PIL import Image

from surpipe.config import read_json_object
from surpipe.errors import SurpipeError, first_line

if TYPE_CHECKING:
    import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFINITION = "CLIP score = 100 * max(cos(image_embedding, text_embedding), 0) (torchmetrics' CLIPScore)"
# CLIP-IQA (Wang, Chan, Loy 2023): antonym prompts scored against each image with CLIP's trained
# logit scale of 100; the share of the positive prompt is the quality score
IQA_PAIRS = (("Good photo.", "Bad photo."),)
IQA_SCALE = 100.0
IQA_DEFINITION = ("CLIP-IQA = softmax(100 * [cos(image, 'Good photo.'), cos(image, 'Bad photo.')])[0], in [0, 1], "
                  "higher is better (torchmetrics' CLIPImageQualityAssessment, prompts 'quality')")


class Preprocess:
    """The model's CLIP image preprocessing: PIL images -> pixel values (see the module doc)."""

    def __init__(self, processor, source: str):
        self.processor, self.source = processor, source
        size, crop = processor.size, processor.crop_size
        self.shortest_edge = int(size.shortest_edge or size.height)
        self.crop_height, self.crop_width = int(crop.height), int(crop.width)
        self.mean, self.std = tuple(processor.image_mean), tuple(processor.image_std)
        self.resample = int(processor.resample)

    @classmethod
    def from_config(cls, cfg: dict | None, image_size: int, source: str = "preprocessor_config.json") -> "Preprocess":
        """From a ``preprocessor_config.json`` dict (``None``: CLIP defaults at ``image_size``)."""
        from transformers import CLIPImageProcessorPil  # heavy: keeps --help torch-free

        if not cfg:
            return cls(CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                             crop_size={"height": image_size, "width": image_size}), "CLIP defaults")
        try:
            pre = cls(CLIPImageProcessorPil.from_dict(dict(cfg)), source)
            pre([Image.new("RGB", (8, 8))])  # settings that fail only when used fail now, before any rendering
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise SurpipeError(f"{source} is not a usable CLIP image preprocessing config: {first_line(e)}") from None
        return pre

    def to_dict(self) -> dict:
        p = self.processor
        return {"shortest_edge": self.shortest_edge, "crop_size": [self.crop_height, self.crop_width],
                "image_mean": list(self.mean), "image_std": list(self.std), "resample": self.resample,
                "do_resize": bool(p.do_resize), "do_center_crop": bool(p.do_center_crop),
                "do_normalize": bool(p.do_normalize), "source": self.source}

    def __call__(self, images: Sequence) -> "torch.Tensor":
        """PIL images (or HWC uint8 arrays) -> float32 tensor [N, 3, crop_height, crop_width]."""
        # PIL's own RGB conversion first: transformers would composite RGBA onto white, which
        # changes the scores of transparent images from what surpipe has always computed.
        images = [im.convert("RGB") if isinstance(im, Image.Image) else im for im in images]
        return self.processor(images=images, return_tensors="pt")["pixel_values"].float()


def _read_preprocessor_config(model: str, revision: str | None) -> tuple[dict | None, str]:
    """(the model's preprocessor_config.json, where it was read); (None, why) when it has none."""
    local = Path(model).expanduser()
    if local.is_dir():
        p = local / "preprocessor_config.json"
        if not p.is_file():
            return None, "CLIP defaults (no preprocessor_config.json)"
    else:
        try:
            from huggingface_hub import hf_hub_download  # heavy (its HTTP stack): only hub ids need it

            p = Path(hf_hub_download(model, "preprocessor_config.json", revision=revision))
        except Exception:
            return None, "CLIP defaults (no preprocessor_config.json)"
    return read_json_object(p), str(p)


class CLIPScorer:
    """``CLIPScorer(model).score(images, texts)`` -> one CLIP score per (image, text) pair."""

    def __init__(self, model: str, *, revision: str | None = None, device="cpu", batch_size: int = 32):
        import torch  # heavy: keeps --help torch-free
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
            offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
            raise SurpipeError(f"cannot load a CLIP image-text model from {model}{offline}: {first_line(e)}") from None
        self.model.to(device)
        self.device = torch.device(device)
        self.name = model
        self.batch_size = batch_size
        cfg, source = _read_preprocessor_config(model, revision)
        self.preprocess = Preprocess.from_config(cfg, self.model.config.vision_config.image_size, source)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    def image_embeddings(self, images: Sequence) -> "torch.Tensor":
        """Projected image embeddings [N, P] (not normalised)."""
        import torch  # heavy: keeps --help torch-free

        feats = []
        with torch.no_grad():
            for i in range(0, len(images), self.batch_size):
                px = self.preprocess(images[i:i + self.batch_size]).to(self.device)
                pooled = self.model.vision_model(pixel_values=px).pooler_output
                feats.append(self.model.visual_projection(pooled).float().cpu())
        return torch.cat(feats)

    def text_embeddings(self, texts: Sequence[str]) -> "torch.Tensor":
        """Projected text embeddings [N, P] (not normalised); texts truncated to the model's window."""
        import torch  # heavy: keeps --help torch-free

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
        import torch  # heavy: keeps --help torch-free

        if len(images) != len(texts):
            raise ValueError("one text per image")
        if not images:
            return []
        img = torch.nn.functional.normalize(self.image_embeddings(images), dim=-1)
        txt = torch.nn.functional.normalize(self.text_embeddings(texts), dim=-1)
        return (100.0 * (img * txt).sum(-1)).clamp(min=0).tolist()

    def iqa(self, images: Sequence, pairs: Sequence[tuple[str, str]] = IQA_PAIRS, scale: float = IQA_SCALE) -> list[float]:
        """CLIP-IQA: per image, ``softmax(100 * [cos(image, good), cos(image, bad)])[0]`` for each
        antonym pair (``("Good photo.", "Bad photo.")`` by default), averaged over the pairs; in [0, 1],
        higher is better (Wang et al. 2023, as torchmetrics' CLIPImageQualityAssessment). ``scale``: the
        logit scale (CLIP's trained 100)."""
        import torch  # heavy: keeps --help torch-free

        if not images:
            return []
        img = torch.nn.functional.normalize(self.image_embeddings(images), dim=-1).double()
        txt = torch.nn.functional.normalize(self.text_embeddings([t for p in pairs for t in p]), dim=-1).double()
        logits = scale * img @ txt.T  # [N, 2 * pairs]
        probs = logits.reshape(len(images), len(pairs), 2).softmax(-1)[..., 0]
        return probs.mean(-1).tolist()

    def describe(self) -> dict:
        return {"model": self.name, "definition": DEFINITION, "preprocessing": self.preprocess.to_dict(),
                "max_text_tokens": self.max_length}
