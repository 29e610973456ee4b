"""``surpipe run configs/sample-sdxl.json``: the whole chain on the tiny SDXL (shortened here), from
tiny models to the eval table with its held-out section."""

from __future__ import annotations

import json

from helpers import REPO, run_cli


def test_sample_sdxl_config_runs_the_whole_chain(tmp_path, monkeypatch):
    cfg = json.loads((REPO / "configs" / "sample-sdxl.json").read_text())
    assert cfg["tiny_sd"] == "sdxl" and cfg["tiny_models"] is True
    cfg["workdir"] = str(tmp_path / "w")
    cfg["data"] = str(REPO / "data" / "sample")
    cfg["extract_llm"]["quant"] = "none"
    cfg["train"].update(max_steps=4, checkpoint_every=2, validation_every=2)
    cfg["generate"].update(steps=2, prompts_file=str(REPO / cfg["generate"]["prompts_file"]))
    cfg["eval"].update(steps=2, max_prompts_per_category=1)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli("run", path)
    assert rc == 0, err[-3000:]
    work = tmp_path / "w"
    assert (work / "generate" / "compare_grid.png").is_file()
    results = (work / "eval" / "results.md").read_text()
    assert "Held-out alignment" in results and "| all |" in results
    assert "held-out (" in out and "step 4" in out
    adapter = json.loads((work / "train" / "adapter" / "config.json").read_text())
    assert adapter["width"] == 64  # the tiny SDXL's 32 + 32 wide text encoders
    assert json.loads((work / "train" / "config.json").read_text())["model"].endswith("sdxl")
