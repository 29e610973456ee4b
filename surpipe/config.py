"""Typed configs: dataclasses that load from and save to JSON, with validation that reports
every problem at once."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from surpipe.errors import SurpipeError

T = TypeVar("T")

# Option groups, in the order ``--help`` shows them.
GROUPS = ("data", "model", "optimisation", "losses", "validation", "inference", "output", "running")


def opt(default: Any = dataclasses.MISSING, *, help: str, group: str = "running",
        default_factory: Any = dataclasses.MISSING, ge: float | None = None, gt: float | None = None,
        le: float | None = None, lt: float | None = None, cli: bool = True, argument: bool = False) -> Any:
    """A config field with its one-line ``--help`` text, its help group and its valid range.

    Ranges (``ge``/``gt``/``le``/``lt``) are checked by :func:`from_dict` with every other problem;
    every float option must also be finite. ``cli=False`` keeps a field out of the command line;
    ``argument=True`` makes it a positional argument there (``surpipe pack SRC OUT``).
    """
    if group not in GROUPS:
        raise ValueError(f"unknown option group {group!r} (valid: {', '.join(GROUPS)})")
    md = {"help": help, "group": group, "ge": ge, "gt": gt, "le": le, "lt": lt, "cli": cli,
          "argument": argument}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=md)
    return dataclasses.field(default=default, metadata=md)


def _range_problems(f: dataclasses.Field, value: Any, where: str) -> list[str]:
    """Finiteness (every float) and the field's declared range."""
    vals = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            out.append(f"{where}: must be a finite number (got {v})")
            continue
        md = f.metadata
        for key, ok, word in (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
                              ("le", lambda a, b: a <= b, "<="), ("lt", lambda a, b: a < b, "<")):
            bound = md.get(key)
            if bound is not None and not ok(v, bound):
                out.append(f"{where}: must be {word} {bound} (got {v})")
    return out


_SECRET = ("secret", "token", "password", "credential", "passphrase")


def _is_secret(key: str) -> bool:
    k = str(key).lower()
    return k in ("key", "access_key", "account_key", "sas_token") or k.endswith("_key") or any(w in k for w in _SECRET)


def redact_storage_options(text: Any) -> Any:
    """``--storage-options`` JSON without its secrets (keys, secrets, tokens, passwords, at any depth):
    configs are saved inside and beside stores and run folders, which others may read; a rerun from a
    saved config takes the secrets from the environment."""
    if not isinstance(text, str) or not text.strip():
        return text
    try:
        data = json.loads(text)
    except ValueError:
        return None  # invalid JSON was refused before any work; never save it verbatim

    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if not _is_secret(k)}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(data), sort_keys=True)


def to_dict(cfg: Any) -> dict:
    """A JSON-ready dict of a (nested) config dataclass (``storage_options`` without secrets)."""

    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: (redact_storage_options(getattr(v, f.name)) if f.name == "storage_options"
                             else conv(getattr(v, f.name))) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return conv(cfg)


def _coerce(tp, value, where: str, problems: list[str]):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            sub: list[str] = []
            out = _coerce(a, value, where, sub)
            if not sub:
                return out
        problems.append(f"{where}: {value!r} is not a valid {tp}")
        return value
    if origin is typing.Literal:
        if value not in args:
            problems.append(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            problems.append(f"{where}: expected a list, got {value!r}")
            return value
        inner = args[0] if args else Any
        return [_coerce(inner, v, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {value!r}")
            return value
        return _from_dict(tp, value, where, problems)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is Path or tp is str and isinstance(value, Path):
        return str(value) if tp is str else Path(value)
    if isinstance(tp, type) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        problems.append(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def _url_problems(name: str, value: Any, key: str) -> list[str]:
    """An output folder given as a URL: only stores live on object storage (``--store``); a run,
    image or shard folder named ``s3://...`` would silently become a local folder called ``s3:``."""
    if name == "out" and isinstance(value, str):
        if _URL.match(value):
            return [f"{key}: {value} is a URL; output folders are local paths (only --store takes URLs)"]
    return []


def _from_dict(cls, data: dict, where: str, problems: list[str], label=None):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}

    def name_of(k: str) -> str:
        if where:
            return f"{where}.{k}"
        return (label(k) if label else None) or k

    for k in sorted(set(data) - names):
        valid = ", ".join(sorted(f"{where}.{n}" if where else n for n in names))
        problems.append(f"{f'{where}.{k}' if where else k}: unknown option (valid: {valid})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = name_of(f.name)
        if f.name in data:
            sub: list[str] = []
            kwargs[f.name] = _coerce(hints[f.name], data[f.name], key, sub)
            problems += sub or _range_problems(f, kwargs[f.name], key) or _url_problems(f.name, kwargs[f.name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{key}: required option missing")
    if problems:
        return None
    return cls(**kwargs)


def from_dict(cls: type[T], data: dict, what: str = "settings", label=None) -> T:
    """Build config ``cls`` from a dict; raises SurpipeError listing every problem.

    ``what`` names the source in the message ("options for 'surpipe train'", "config F"), and
    ``label(key)`` how a key is shown (the CLI shows ``--llm-layer``), never the class name.
    """
    problems: list[str] = []
    cfg = _from_dict(cls, data, "", problems, label)
    if problems:
        raise SurpipeError(f"invalid {what}:", problems)
    return cfg


def declared_problems(cfg: Any) -> list[str]:
    """Every type, finiteness and range problem of a config built in Python (the checks
    :func:`from_dict` makes for the command line and config files)."""
    try:
        from_dict(type(cfg), to_dict(cfg))
    except SurpipeError as e:
        return e.problems or [str(e)]
    return []


def load(cls: type[T], path: str | os.PathLike, overrides: dict | None = None, what: str | None = None,
         label=None) -> T:
    """Load config ``cls`` from a JSON file, then apply ``overrides`` (non-None values)."""
    p = Path(path)
    data = read_json_object(p, "config file")
    data.pop("_surpipe", None)
    for k, v in (overrides or {}).items():
        if v is not None:
            data[k] = v
    return from_dict(cls, data, what or f"config {p}", label)


def read_json_object(path: str | os.PathLike, what: str = "") -> dict:
    """The JSON object in file ``path``; a SurpipeError naming the file (after ``what``, such as
    ``"config file"``) when it is missing, unreadable, not JSON or not an object."""
    p = Path(path)
    name = f"{what} {p}".strip()
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SurpipeError(f"{what or 'file'} not found: {p}") from None
    except OSError as e:
        raise SurpipeError(f"{name} cannot be read: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SurpipeError(f"{name} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise SurpipeError(f"{name} must hold a JSON object")
    return data


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yields a temporary path beside ``path`` to write a file to; on success it replaces ``path``
    in one rename (readers see the old file or the new one, never half of it), on failure it is
    deleted and ``path`` is untouched."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_path`); a path on object
    storage (surpipe.store.location.RemotePath, e.g. a store's saved configs) in one PUT."""
    if hasattr(path, "write_text") and hasattr(path, "protocol"):
        path.write_text(text)
        return
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save(cfg: Any, path: str | os.PathLike, extra: dict | None = None) -> None:
    """Write ``cfg`` as JSON (atomically), so the same run can be repeated from the file."""
    from surpipe import __version__

    data = to_dict(cfg)
    data["_surpipe"] = {"version": __version__, "config": type(cfg).__name__, **(extra or {})}
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
