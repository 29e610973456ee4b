"""What ``surpipe verify`` reports: findings (problems and warnings, located by group, block,
rows and chunk) and the report that ``--repair`` and ``--json`` read."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Finding:
    """One problem (the store breaks its contract) or warning (e.g. a stage has not finished)."""

    level: str  # "problem" | "warning"
    where: str  # "root", "keys", "llm/tiny", "llm/tiny/<array>" ...
    message: str
    group: str | None = None
    block: int | None = None
    rows: tuple[int, int] | None = None  # [start, stop)
    chunk: str | None = None

    def __str__(self) -> str:
        loc = []
        if self.block is not None:
            loc.append(f"block {self.block}")
        if self.rows is not None:
            loc.append(f"rows {self.rows[0]}-{self.rows[1] - 1}")
        if self.chunk is not None:
            loc.append(f"chunk {self.chunk}")
        return f"{self.where}" + (f" [{', '.join(loc)}]" if loc else "") + f": {self.message}"


@dataclass
class VerifyReport:
    path: str
    num_samples: int | None = None
    block_rows: int | None = None
    num_blocks: int | None = None
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    repaired: list[Finding] = field(default_factory=list)
    chunks_read: int = 0
    seconds: float = 0.0
    format: Any = None
    unchecked: list[str] = field(default_factory=list)  # arrays whose chunks carry no checksums

    @property
    def sound(self) -> bool:
        return not self.problems

    def damaged_blocks(self) -> dict[str, list[int]]:
        """Done blocks with a problem, by group: what ``repair`` marks incomplete."""
        out: dict[str, set[int]] = {}
        for p in self.problems:
            if p.group is not None and p.block is not None:
                out.setdefault(p.group, set()).add(p.block)
        return {g: sorted(b) for g, b in out.items()}

    def to_dict(self) -> dict[str, Any]:
        def f(x: Finding) -> dict:
            d = asdict(x)
            d["rows"] = list(x.rows) if x.rows else None
            d["text"] = str(x)
            return d

        return {"path": self.path, "sound": self.sound, "num_samples": self.num_samples,
                "block_rows": self.block_rows, "num_blocks": self.num_blocks, "groups": self.groups,
                "problems": [f(p) for p in self.problems], "warnings": [f(w) for w in self.warnings],
                "repaired": [f(r) for r in self.repaired], "chunks_read": self.chunks_read,
                "format": self.format, "checksums": "unchecked" if self.unchecked else "crc32c",
                "unchecked_arrays": list(self.unchecked),
                "seconds": round(self.seconds, 3)}
