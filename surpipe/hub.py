"""Reading model configs by hub id or local folder, without loading weights, and checking once,
up front, that a model argument can be read at all (:func:`check_model_source`)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from surpipe.config import read_json_object
from surpipe.errors import SurpipeError, first_line
from surpipe.logs import get_logger

log = get_logger()  # "surpipe: ..." on stderr, from rank 0 only

_CONFIG_NAMES = {"scheduler": "scheduler_config.json"}


def read_model_config(model: str, subfolder: str, revision: str | None = None) -> dict:
    """The JSON config of component ``subfolder`` (``unet``, ``scheduler`` ...) of a diffusers
    checkpoint given as a local folder or a hub id; a clear SurpipeError when it is not there."""
    fname = _CONFIG_NAMES.get(subfolder, "config.json")
    local = Path(model).expanduser()
    if is_local_model(model):
        if not local.is_dir():
            raise SurpipeError(f"model folder not found: {model}")
        path = local / subfolder / fname
        if not path.is_file():
            kind = "" if (local / "model_index.json").is_file() else \
                " (no model_index.json: is this a diffusers Stable Diffusion folder?)"
            raise SurpipeError(f"{model} has no {subfolder}/{fname}{kind}")
    else:
        check_model_source(model)
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(model, fname, subfolder=subfolder, revision=revision))
        except Exception as e:
            offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
            raise SurpipeError(f"cannot read {subfolder}/{fname} of {model}{offline}: {first_line(e)}") from None
    return read_json_object(path)


# --------------------------------------------------------------------------- reachability

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_checked: dict[str, str] = {}


def _truthy(v: str | None) -> bool:
    return (v or "").strip().lower() in ("1", "on", "yes", "true")


def hub_offline() -> bool:
    """Whether the user asked for offline mode (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


def looks_like_hub_id(model: str) -> bool:
    """``name`` or ``owner/name`` and not an existing path nor written as one."""
    if os.path.exists(os.path.expanduser(model)) or model.startswith((".", "/", "~")):
        return False
    return bool(_HUB_ID.fullmatch(model))


# --------------------------------------------------------------------------- names
# The one rule for every model argument (LLM, Stable Diffusion, CLIP): loaders, group names and
# identity checks must agree on whether a string is a folder or a hub id.


def is_local_model(model: str) -> bool:
    """A model argument names a local folder when it exists, is written as a path (``.``, ``/``,
    ``~``) or is not shaped like a hub id (``name`` or ``owner/name``); otherwise it is a hub id."""
    return not looks_like_hub_id(model)


def sanitize_name(name: str) -> str:
    """Letters, digits, ``.``, ``_`` and ``-`` only (others become ``-``), no leading dot."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-").lstrip(".")
    return s or "model"


def model_basename(model: str) -> str:
    """A group-name-safe name for a model: its folder's name or its hub repo name, sanitised.

    A folder's name is taken from its absolute path without following links, so ``.`` names the
    current folder and a link keeps its own name (not a cache snapshot hash it points to)."""
    if is_local_model(model):
        base = os.path.basename(os.path.abspath(os.path.expanduser(model.rstrip("/\\") or model)))
    else:
        base = model.rstrip("/").split("/")[-1]
    return sanitize_name(base or "model")


def _cache_dir() -> Path:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def cached_snapshot(model: str) -> Path | None:
    """The newest cached snapshot folder of hub model ``model`` (None when not cached)."""
    snaps = _cache_dir() / f"models--{model.replace('/', '--')}" / "snapshots"
    try:
        found = [p for p in snaps.iterdir() if p.is_dir() and any(p.iterdir())]
    except OSError:
        return None
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _go_offline() -> None:
    """Switch this process to offline mode, so the libraries read the cache without retrying a
    hub they cannot reach (huggingface_hub reads the constant at call time)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True
    except Exception:  # pragma: no cover
        pass


def _probe(model: str, timeout: float) -> tuple[bool, str]:
    """One request to the hub's model API: (reachable, detail). An HTTP error status still means
    the hub answered; only connection failures and timeouts count as unreachable."""
    import urllib.error
    import urllib.request

    url = f"{_endpoint()}/api/models/{model}"
    req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "surpipe"})
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return True, str(r.status)
    except urllib.error.HTTPError as e:
        return True, str(e.code)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return False, f"{url}: {reason}"


def _fixes(model: str, option: str) -> str:
    return (f"fixes: give a local folder holding the model ({option} path/to/folder); or download it once "
            f"where there is network (`hf download {model}`) so it is in the cache ({_cache_dir()}), then run "
            f"with HF_HUB_OFFLINE=1 (HF_HOME / HF_HUB_CACHE select another cache)")


def check_model_source(model: str, option: str = "--model", what: str = "model",
                       timeout: float | None = None) -> str:
    """Check once, up front, that model argument ``model`` can be read; returns ``local``, ``hub``
    or ``cache``. Every stage calls this before any other work on a model argument.

    A local path (existing, or written as a path) passes here: its content is checked by the
    loaders. A hub id with ``HF_HUB_OFFLINE`` set must be in the local cache. Otherwise the hub
    is asked once with a short timeout (``SURPIPE_HUB_TIMEOUT``, default 5 s): when it cannot be
    reached, a cached copy is used (offline mode is switched on for this process, so the
    libraries do not retry file after file for minutes) and without one a SurpipeError names
    the fixes. The answer is remembered for the process. ``option`` is the flag named in
    messages (``--clip-model``), ``what`` the noun (``CLIP model``).
    """
    if not isinstance(model, str) or not model.strip():
        raise SurpipeError(f"{option}: empty model name; give a local folder or a hub id")
    if not looks_like_hub_id(model):
        p = Path(model).expanduser()
        if not p.exists():
            raise SurpipeError(f"{what} folder not found: {model} ({option}: give an existing folder or a "
                               "hub id of the form owner/name)")
        return "local"
    if model in _checked:
        return _checked[model]
    if hub_offline():
        if cached_snapshot(model) is None:
            raise SurpipeError(f"{option} {model} is a hub id, but HF_HUB_OFFLINE is set and it is not in the "
                               f"local Hugging Face cache ({_cache_dir()}); fixes: give a local folder holding "
                               f"the model ({option} path/to/folder); or unset HF_HUB_OFFLINE so it is downloaded "
                               f"(or download it once with `hf download {model}`); HF_HOME / HF_HUB_CACHE select "
                               "another cache")
        _checked[model] = "cache"
        return "cache"
    if timeout is None:
        try:
            timeout = float(os.environ.get("SURPIPE_HUB_TIMEOUT", "5"))
        except ValueError:
            timeout = 5.0
    ok, detail = _probe(model, timeout)
    if ok:
        if detail in ("401", "404") and cached_snapshot(model) is None:
            raise SurpipeError(f"{option} {model}: the Hugging Face hub has no such model, or it is private "
                               f"or gated and no access token is set (HTTP {detail}); check the id, log in with "
                               "`hf auth login` (or set HF_TOKEN), or give a local folder")
        _checked[model] = "hub"
        return "hub"
    if cached_snapshot(model) is not None:
        log.warning(f"the Hugging Face hub cannot be reached ({detail}); using the cached copy of {model} "
                    "(offline mode for this run; set HF_HUB_OFFLINE=1 to skip this check)")
        _go_offline()
        _checked[model] = "cache"
        return "cache"
    raise SurpipeError(f"{option} {model}: cannot reach the Hugging Face hub ({detail}) and the model is not in "
                       "the local cache; " + _fixes(model, option))
