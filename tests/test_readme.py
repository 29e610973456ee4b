"""The README's commands and CI stay in step; the CLI lists every command of the contract."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _quick_start_lines():
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", text, re.S).group(1)
    return [l for l in block.splitlines() if l and not l.startswith("#")]


def test_ci_runs_the_readme_test_command():
    setup_and_run, tests = _quick_start_lines()
    ci = (REPO / ".ci" / "run").read_text()
    assert tests in ci.splitlines()
    # both commands install the same way
    assert setup_and_run.rsplit("&&", 1)[0] == tests.rsplit("&&", 1)[0]


def test_quick_start_config_exists():
    setup_and_run, _ = _quick_start_lines()
    cfg = setup_and_run.rsplit("surpipe run", 1)[1].strip()
    assert (REPO / cfg).is_file()


def test_help_is_fast_and_lists_every_contract_command():
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "stages", "--help"], capture_output=True,
                         text=True, cwd=REPO, env={"PATH": "", "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    for cmd in ("pack", "make-tiny-models", "extract-llm", "encode-latents", "train", "generate", "eval",
                "inspect", "verify", "import-official", "import-prompt2vec", "run"):
        assert re.search(rf"│ {re.escape(cmd)}\s", out.stdout), cmd
    imported = {l.split("|")[-1].strip().split(".")[0] for l in out.stderr.splitlines() if "|" in l}
    heavy = {"torch", "diffusers", "transformers", "bitsandbytes", "zarr", "webdataset"} & imported
    assert not heavy, f"--help imports {heavy}"
