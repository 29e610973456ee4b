"""``surpipe study make`` / ``surpipe study tally``: a blind A/B user-preference study of an eval's
images (surpipe.evaluation.study).

    surpipe study make runs/eval --out study/page.html      # one HTML page, its key beside it
    surpipe study tally study/page.key.json --answers a.json --answers b.json --out study/
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from surpipe.config import atomic_write_text, opt, save
from surpipe.errors import SurpipeError
from surpipe.evaluation import paper, study


@dataclass
class StudyMakeConfig:
    eval_dir: str = opt(help="The --out folder of a `surpipe eval` run (with its saved images).", group="data",
                        argument=True)
    out: str = opt(help="The study page to write (HTML); its answer key goes beside it (.key.json).", group="output")
    seed: int = opt(0, help="Seed of the pair order and of each pair's left/right sides.", group="running", ge=0)
    title: str = opt("Which image fits the prompt better?", help="The page's title and question.", group="output")


@dataclass
class StudyTallyConfig:
    key: str = opt(help="The study's answer key (PAGE.key.json, written by `surpipe study make`).", group="data",
                   argument=True)
    answers: list[str] = opt(default_factory=list, help="An answer file exported from the page (repeat for "
                                                        "each rater).", group="data")
    out: Optional[str] = opt(None, help="Folder for preference.md and preference.json (default: print only).",
                             group="output")
    eval_dir: Optional[str] = opt(None, help="The eval folder the study was made from: its results (and the "
                                             "paper-layout table of results.md) get the preference.", group="output")


def run_make(cfg: StudyMakeConfig) -> dict:
    key = study.make_study(Path(cfg.eval_dir), Path(cfg.out), seed=cfg.seed, title=cfg.title)
    save(cfg, study.key_path(Path(cfg.out)).with_name(Path(cfg.out).stem + ".config.json"))
    print(f"study {key['study']}: {len(key['pairs'])} pairs in {cfg.out} (self-contained: open it in any browser); "
          f"keep the key {study.key_path(Path(cfg.out))} away from the raters; tally with `surpipe study tally "
          f"{study.key_path(Path(cfg.out))} --answers FILE ...`")
    return key


def run_tally(cfg: StudyTallyConfig) -> dict:
    if not cfg.answers:
        raise SurpipeError("give the raters' answer files: --answers FILE (repeat for each rater)")
    result = study.tally(Path(cfg.key), [Path(a) for a in cfg.answers])
    text = study.markdown(result)
    print(text)
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "preference.md", text)
        atomic_write_text(out / "preference.json", json.dumps(result, indent=2) + "\n")
        save(cfg, out / "study_tally.config.json")
    if cfg.eval_dir:
        if not (Path(cfg.eval_dir) / "results.json").is_file():
            raise SurpipeError(f"--eval-dir {cfg.eval_dir} holds no results.json: give a `surpipe eval` --out folder")
        paper.fill_preference(Path(cfg.eval_dir), result)
        print(f"wrote the preference into {Path(cfg.eval_dir) / 'results.md'} and results.json")
    return result
