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
from surpipe.version import __version__

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


# Storage options saved with a config (inside and beside stores, in run folders: others read those).
# An ALLOW-list of options known to hold no secret, because a secret can sit under any name (an SSE-C
# key in s3_additional_kwargs.SSECustomerKey, an Azure connection_string, a gcsfs token dict, ...):
# everything not listed is dropped, and a rerun from the saved config takes credentials from the
# environment again. A dict lists the keys kept inside that nested mapping; None keeps a plain JSON
# value (text, number, true/false, null; no URL with a password), never a mapping or list.
_TIMEOUTS = {"timeout": None, "connect_timeout": None, "read_timeout": None, "connection_timeout": None}
SAFE_STORAGE_OPTIONS: dict = {
    # fsspec, any backend
    "anon": None, "use_listings_cache": None, "listings_expiry_time": None, "max_paths": None,
    "skip_instance_cache": None, "default_block_size": None, "default_fill_cache": None,
    "default_cache_type": None, "block_size": None, "blocksize": None, "version_aware": None,
    "max_concurrency": None, "retries": None, **_TIMEOUTS,
    # s3fs (s3://)
    "endpoint_url": None, "region_name": None, "use_ssl": None, "requester_pays": None,
    "cache_regions": None, "fixed_upload_size": None,
    "client_kwargs": {"endpoint_url": None, "region_name": None, "use_ssl": None, "verify": None,
                      "api_version": None},
    "config_kwargs": {"connect_timeout": None, "read_timeout": None, "signature_version": None,
                      "region_name": None, "max_pool_connections": None, "tcp_keepalive": None,
                      "parameter_validation": None, "request_checksum_calculation": None,
                      "response_checksum_validation": None,
                      "retries": {"max_attempts": None, "total_max_attempts": None, "mode": None},
                      "s3": {"addressing_style": None, "use_accelerate_endpoint": None,
                             "use_dualstack_endpoint": None, "payload_signing_enabled": None,
                             "us_east_1_regional_endpoint": None}},
    "s3_additional_kwargs": {"ServerSideEncryption": None, "SSECustomerAlgorithm": None,
                             "StorageClass": None, "ACL": None, "RequestPayer": None},
    # gcsfs (gs://)
    "project": None, "access": None, "consistency": None, "default_location": None,
    "cache_timeout": None, "check_connection": None,
    # adlfs (az://, abfs://)
    "account_name": None, "account_host": None, "location_mode": None,
}


def _has_userinfo(value: str) -> bool:
    """Whether ``value`` is a URL carrying a user name or password (``http://user:pass@host``)."""
    from urllib.parse import urlsplit

    try:
        u = urlsplit(value)
        return "://" in value and (u.username is not None or u.password is not None)
    except ValueError:
        return True  # not parseable: not known to be safe


def _split_options(value: Any, spec: dict | None) -> tuple[Any, list[str]]:
    """(the allowed part of ``value`` per ``spec``, every text value dropped); the dropped texts let
    messages blank out secrets that a library echoed."""
    dropped: list[str] = []

    def texts(v):
        if isinstance(v, str):
            dropped.append(v)
        elif isinstance(v, dict):
            for x in v.values():
                texts(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                texts(x)

    if not isinstance(value, dict):
        texts(value)
        return {}, dropped
    kept = {}
    for k, v in value.items():
        sub = (spec or {}).get(k, False)
        if isinstance(sub, dict) and isinstance(v, dict):
            kept[k], more = _split_options(v, sub)
            dropped += more
        elif sub is None and (v is None or isinstance(v, (bool, int, float)) or
                              isinstance(v, str) and not _has_userinfo(v)):
            kept[k] = v
        else:
            texts(v)
    return kept, dropped


def safe_storage_options(options: Any) -> dict:
    """The part of storage options (a mapping) known to hold no secret: :data:`SAFE_STORAGE_OPTIONS`."""
    return _split_options(options, SAFE_STORAGE_OPTIONS)[0]


def secret_texts(options: Any) -> list[str]:
    """Every text value of storage options (a mapping) not known to be safe, longest first: what a
    message must never show. Texts under 4 characters are no credentials, and blanking them would
    garble the message's own words."""
    texts = {t for t in _split_options(options, SAFE_STORAGE_OPTIONS)[1] if len(t) >= 4}
    return sorted(texts, key=len, reverse=True)


def redact_storage_options(text: Any) -> Any:
    """``--storage-options`` (JSON text or a mapping) as saved in configs: only the options known
    to hold no secret (:data:`SAFE_STORAGE_OPTIONS`), at any depth; everything else is dropped."""
    if isinstance(text, dict):
        return safe_storage_options(text)
    if not isinstance(text, str) or not text.strip():
        return text
    try:
        data = json.loads(text)
    except ValueError:
        return None  # invalid JSON was refused before any work; never save it verbatim
    return json.dumps(safe_storage_options(data), sort_keys=True) if isinstance(data, dict) else None


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


def _storage_options_field(value: Any, key: str, problems: list[str]) -> Any:
    """``storage_options`` as a command takes it: JSON text, or (in a config file) a JSON object,
    kept as its JSON text. A problem names the type only: the value may hold credentials."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        return json.dumps(value)
    problems.append(f"{key}: expected a JSON object (or its JSON text), got {type(value).__name__}")
    return None


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
        if f.name == "storage_options" and f.name in data:
            kwargs[f.name] = _storage_options_field(data[f.name], key, problems)
        elif f.name in data:
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


class Config:
    """Base of every command's config: :meth:`problems` lists every problem at once, before any work."""

    def problems(self) -> list[str]:
        """Types, finiteness and declared ranges of every field; subclasses add the checks that
        involve several options (``super().problems() + [...]``)."""
        return declared_problems(self)

    def raise_problems(self, what: str) -> None:
        """One SurpipeError listing every problem (``what``: "invalid train options:"), if any."""
        problems = self.problems()
        if problems:
            raise SurpipeError(what, problems)


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
    storage (surpipe.store.remote.RemotePath, e.g. a store's saved configs) in one PUT."""
    if hasattr(path, "write_text") and hasattr(path, "protocol"):
        path.write_text(text)
        return
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save(cfg: Any, path: str | os.PathLike, extra: dict | None = None) -> None:
    """Write ``cfg`` as JSON (atomically), so the same run can be repeated from the file."""
    data = to_dict(cfg)
    data["_surpipe"] = {"version": __version__, "config": type(cfg).__name__, **(extra or {})}
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
