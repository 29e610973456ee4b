"""Writing a benchmark's JSON result: a leaf module (``_common`` and ``cost_model`` both use it,
and ``_common`` imports ``cost_model``)."""

from __future__ import annotations

import json
from pathlib import Path


def write_result(d: dict, out: str, command: str, summary_rows) -> int:
    """Record the reproducing command in ``d``, write it as JSON to ``out`` and print the summary."""
    d["command"] = command
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(d, indent=2) + "\n")
    for k, v in summary_rows(d):
        print(f"{k:60s} {v}")
    return 0
