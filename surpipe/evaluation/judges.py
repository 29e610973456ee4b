"""The models that answer the questions about an image (surpipe.evaluation.questions).

- :class:`VQAJudge`: a visual-question-answering model that writes its answer (BLIP-VQA:
  ``BlipForQuestionAnswering``; hub id or folder, default ``Salesforce/blip-vqa-base``).
- :class:`DetectorJudge`: an open-vocabulary detector that counts the asked-for object (OWLv2 or
  OWL-ViT through ``AutoModelForZeroShotObjectDetection``; default ``google/owlv2-base-patch16-ensemble``):
  boxes above ``threshold`` for "a photo of a <object>", overlapping boxes merged (IoU > 0.5).

Both load the tokenizer and the image processor on their own (no ``*Processor`` class) and run in
batches, under ``torch.no_grad``. A judge is anything with ``answer(images, questions) -> [str]`` (or
``count(images, objects) -> [int]``), so tests give a stub with known answers.
"""

from __future__ import annotations

from typing import Sequence

from surpipe.errors import SurpipeError, first_line
from surpipe.hub import check_model_source

DEFAULT_VQA = "Salesforce/blip-vqa-base"
DEFAULT_DETECTOR = "google/owlv2-base-patch16-ensemble"


class _Judge:
    """A judge model with its own tokenizer and image processor, on ``device``."""

    MODEL_TYPES: tuple = ()  # config model_type values the judge accepts (empty: any its class loads)

    def __init__(self, model: str, revision, device, option: str, what: str, model_class: str):
        check_model_source(model, option=option, what=what)
        import transformers  # heavy: keeps --help torch-free

        try:
            kind = transformers.AutoConfig.from_pretrained(model, revision=revision).model_type
        except (OSError, ValueError, KeyError) as e:
            raise SurpipeError(f"{option} {model}: no readable config.json ({type(e).__name__}: "
                               f"{first_line(e)[:200]})") from None
        if self.MODEL_TYPES and kind not in self.MODEL_TYPES:
            raise SurpipeError(f"{option} {model} is a {kind!r} model, not a {what}; valid model types: "
                               f"{', '.join(self.MODEL_TYPES)}")
        try:
            self.model = getattr(transformers, model_class).from_pretrained(model, revision=revision).eval()
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(model, revision=revision)
            self.processor = transformers.AutoImageProcessor.from_pretrained(model, revision=revision)
        except (OSError, ValueError, KeyError, RuntimeError) as e:  # RuntimeError: mismatched weight shapes
            raise SurpipeError(f"{option} {model}: cannot load it as a {what} ({type(e).__name__}: "
                               f"{first_line(e)[:200]})") from None
        self.model.to(device)
        self.device, self.name = device, model


class VQAJudge(_Judge):
    """Answers a question about each image with a BLIP-style VQA model."""

    MODEL_TYPES = ("blip",)

    def __init__(self, model: str = DEFAULT_VQA, *, revision=None, device="cpu", batch_size: int = 16,
                 max_new_tokens: int = 8):
        super().__init__(model, revision, device, "--vqa-model", "VQA model (BLIP-VQA)",
                         "BlipForQuestionAnswering")
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens

    def answer(self, images: Sequence, questions: Sequence[str]) -> list[str]:
        import torch  # heavy: keeps --help torch-free

        if len(images) != len(questions):
            raise ValueError("one question per image")
        out: list[str] = []
        with torch.no_grad():
            for i in range(0, len(images), self.batch_size):
                px = self.processor(images=list(images[i:i + self.batch_size]), return_tensors="pt")["pixel_values"]
                tok = self.tokenizer(list(questions[i:i + self.batch_size]), return_tensors="pt", padding=True)
                ids = self.model.generate(pixel_values=px.to(self.device), input_ids=tok["input_ids"].to(self.device),
                                          attention_mask=tok["attention_mask"].to(self.device),
                                          max_new_tokens=self.max_new_tokens)
                out += self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [a.strip() for a in out]


def nms_count(boxes, scores, iou: float = 0.5) -> int:
    """How many boxes remain after greedy non-maximum suppression at ``iou``."""
    import torch  # heavy: keeps --help torch-free

    order = torch.argsort(scores, descending=True)
    boxes = boxes[order]
    keep: list[int] = []
    for i in range(len(boxes)):
        b = boxes[i]
        ok = True
        for j in keep:
            k = boxes[j]
            w = (torch.minimum(b[2], k[2]) - torch.maximum(b[0], k[0])).clamp(min=0)
            h = (torch.minimum(b[3], k[3]) - torch.maximum(b[1], k[1])).clamp(min=0)
            inter = w * h
            union = (b[2] - b[0]) * (b[3] - b[1]) + (k[2] - k[0]) * (k[3] - k[1]) - inter
            if union > 0 and inter / union > iou:
                ok = False
                break
        if ok:
            keep.append(i)
    return len(keep)


class DetectorJudge(_Judge):
    """Counts an object in each image with an open-vocabulary detector (OWLv2 / OWL-ViT)."""

    MODEL_TYPES = ("owlv2", "owlvit")

    def __init__(self, model: str = DEFAULT_DETECTOR, *, revision=None, device="cpu", threshold: float = 0.3,
                 batch_size: int = 8):
        super().__init__(model, revision, device, "--detector-model", "detector (OWLv2, OWL-ViT)",
                         "AutoModelForZeroShotObjectDetection")
        self.threshold, self.batch_size = threshold, batch_size
        self.max_length = int(getattr(self.model.config.text_config, "max_position_embeddings", 16))

    def count(self, images: Sequence, objects: Sequence[str]) -> list[int]:
        import torch  # heavy: keeps --help torch-free

        if len(images) != len(objects):
            raise ValueError("one object per image")
        out: list[int] = []
        with torch.no_grad():
            for i in range(0, len(images), self.batch_size):
                ims = list(images[i:i + self.batch_size])
                px = self.processor(images=ims, return_tensors="pt")["pixel_values"].to(self.device)
                tok = self.tokenizer([f"a photo of a {o}" for o in objects[i:i + self.batch_size]], return_tensors="pt",
                                     padding="max_length", max_length=self.max_length, truncation=True)
                res = self.model(input_ids=tok["input_ids"].to(self.device),
                                 attention_mask=tok["attention_mask"].to(self.device), pixel_values=px)
                sizes = torch.tensor([[im.height, im.width] for im in ims])
                for r in self.processor.post_process_object_detection(res, threshold=self.threshold,
                                                                      target_sizes=sizes):
                    out.append(nms_count(r["boxes"].float().cpu(), r["scores"].float().cpu()) if len(r["scores"]) else 0)
        return out
