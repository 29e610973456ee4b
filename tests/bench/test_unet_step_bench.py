"""bench/unet_step.py on a tiny UNet: it runs, writes every figure, and the frozen UNet gets no
weight gradient from the paper path's backward (input gradients only)."""

import json
import subprocess
import sys

from helpers import REPO


def test_unet_step_bench_tiny(tmp_path):
    out = tmp_path / "u.json"
    p = subprocess.run([sys.executable, str(REPO / "bench" / "unet_step.py"), "--tiny", "--reps", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    d = json.loads(out.read_text())
    assert d["unet_weight_gradients"] == 0
    assert d["authors_path_s"]["with_unet"] > 0 and d["authors_path_s"]["skip"] > 0
    fb = d["paper_forward_backward_s"]["fp32"]
    assert fb["forward"] > 0 and fb["backward"] > 0 and d["command"].startswith("python bench/unet_step.py")
