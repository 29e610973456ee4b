"""Questions written by a local instruction-following LM (TIFA/DSG style), for prompts the templates
cannot read (narrative prompts, a user's own). The LM is loaded by the same code as ``extract-llm``
(hub id or folder, bitsandbytes quantization), with its LM head, and decodes greedily.

The LM is asked for lines ``Q: <question> A: <short answer>``; lines in any other shape are dropped
and counted (a small or random LM writes many), and each kept answer's kind is inferred from it.
"""

from __future__ import annotations

import re
from typing import Sequence

from surpipe.evaluation.questions import Question, infer_kind
from surpipe.llm.load import load_causal_lm
from surpipe.logs import get_logger

log = get_logger()

INSTRUCTION = ("Write up to {n} short questions that check whether a picture shows this description, each with "
               "its one- or two-word answer, one per line as 'Q: ... A: ...'. Ask about objects, their number, "
               "colors and what they do.\nDescription: {prompt}\n")
_LINE = re.compile(r"^\s*Q:\s*(?P<q>[^\n]+?\?)\s*A:\s*(?P<a>[^\n]{1,40}?)\s*$", re.IGNORECASE)


def parse(prompt: str, text: str, limit: int) -> tuple[list[Question], int]:
    """(the well-formed ``Q: ...? A: ...`` lines of ``text`` as questions, how many lines were dropped)."""
    out, dropped = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        m = _LINE.match(line)
        if m is None or len(out) >= limit:
            dropped += 1
            continue
        a = m.group("a").strip().rstrip(".")
        out.append(Question(prompt, m.group("q").strip(), a, infer_kind(a), None, "lm"))
    return out, dropped


def _prompt_text(tok, prompt: str, n: int) -> str:
    text = INSTRUCTION.format(n=n, prompt=prompt)
    if getattr(tok, "chat_template", None):
        try:
            return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - a template that does not take this message: plain text
            pass
    return text + "Q:"


def generate_questions(model: str, pairs: Sequence[tuple[str, str]], *, quant: str = "4bit", device: str = "cpu",
                       revision=None, per_prompt: int = 4, max_new_tokens: int = 160) -> dict[str, list[Question]]:
    """{prompt: questions} for (category, prompt) ``pairs`` from LM ``model``."""
    import torch  # heavy: keeps --help torch-free

    lm, tok = load_causal_lm(model, quant=quant, device=device, revision=revision)
    out, dropped = {}, 0
    with torch.no_grad():
        for _, prompt in pairs:
            ids = tok(_prompt_text(tok, prompt, per_prompt), return_tensors="pt").to(device)
            gen = lm.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
            text = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
            if not getattr(tok, "chat_template", None):
                text = "Q:" + text  # the plain prompt ended with "Q:"
            qs, d = parse(prompt, text, per_prompt)
            out[prompt], dropped = qs, dropped + d
    n = sum(len(v) for v in out.values())
    log.info(f"questions: {n} from {model} for {len(pairs)} prompts ({dropped} malformed lines dropped; "
             f"{sum(1 for v in out.values() if not v)} prompts without a question)")
    return out
