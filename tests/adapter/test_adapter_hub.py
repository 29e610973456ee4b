"""SURAdapter through huggingface_hub's ModelHubMixin: hub ids read offline from a pre-populated
cache, push_to_hub's uploaded folder, and the folder format kept both ways. No network."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from surpipe.adapter import SURAdapter
from surpipe.errors import SurpipeError

D, H, FF = 32, 4, 64
REPO_ID = "someone/sur-adapter"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty HF_HUB_CACHE in offline mode; returns the cache folder."""
    import huggingface_hub.constants as C

    from surpipe import hub

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "_checked", {})
    return cache


def _snapshot(cache, repo_id=REPO_ID):
    """The snapshot folder of ``repo_id`` at COMMIT, with refs/main pointing at it (hub cache layout)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return repo / "snapshots" / COMMIT


def _randomized():
    torch.manual_seed(0)
    m = SURAdapter(width=D, nhead=H, dim_feedforward=FF, adapter_weight=0.2)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].dtype)) for k in sa)


def test_hub_id_loads_offline_from_the_cache(offline_cache):
    m = _randomized()
    snap = _snapshot(offline_cache)
    m.save_pretrained(snap)
    (snap / "llm_projection.safetensors").write_bytes(b"")  # what train writes beside the adapter

    loaded = SURAdapter.from_pretrained(REPO_ID, dtype="float64")
    assert loaded.config == m.config and not loaded.training and loaded.dtype == torch.float64
    assert _same_weights(m, loaded)
    from surpipe.adapter import resolve_adapter_dir

    assert resolve_adapter_dir(REPO_ID) == snap


def test_hub_id_not_cached_offline_is_a_clear_error(offline_cache):
    with pytest.raises(SurpipeError, match="HF_HUB_OFFLINE") as ei:
        SURAdapter.from_pretrained("someone/absent-adapter")
    assert "adapter folder not found: someone/absent-adapter" in str(ei.value)
    with pytest.raises(SurpipeError, match="cannot be loaded"):
        SURAdapter.from_pretrained("someone/absent-adapter", local_files_only=True)


def test_a_bare_missing_name_stays_a_missing_folder(offline_cache):
    with pytest.raises(SurpipeError, match="adapter folder not found: no-such-run"):
        SURAdapter.from_pretrained("no-such-run")


class _FakeApi:
    """Stands in for HfApi in push_to_hub: records the folder that would be uploaded."""

    uploads: list = []

    def __init__(self, token=None):
        pass

    def create_repo(self, repo_id, private=None, exist_ok=False):
        return type("Repo", (), {"repo_id": repo_id})()

    def upload_folder(self, *, repo_id, folder_path, **kw):
        copy = self.dest / repo_id.replace("/", "--")
        shutil.copytree(folder_path, copy)
        self.uploads.append((repo_id, copy))
        return f"https://hub.invalid/{repo_id}/commit/1"


def test_push_to_hub_uploads_config_weights_and_card(tmp_path, monkeypatch):
    import huggingface_hub.hub_mixin as hm

    monkeypatch.setattr(_FakeApi, "dest", tmp_path, raising=False)
    monkeypatch.setattr(_FakeApi, "uploads", [])
    monkeypatch.setattr(hm, "HfApi", _FakeApi)
    m = _randomized()
    url = m.push_to_hub("someone/pushed")
    assert url.endswith("/commit/1")
    repo_id, folder = _FakeApi.uploads[-1]
    assert repo_id == "someone/pushed"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = (folder / "README.md").read_text()
    assert "library_name: surpipe" in card and "sur-adapter" in card
    assert 'SURAdapter.from_pretrained("someone/pushed")' in card and "adapter_weight=0.2" in card
    assert json.loads((folder / "config.json").read_text())["_class_name"] == "SURAdapter"
    assert _same_weights(m, SURAdapter.from_pretrained(folder))

    # save_pretrained(push_to_hub=True) keeps the local folder in the plain format and pushes it
    url = m.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="someone/other")
    assert url.endswith("/commit/1") and _FakeApi.uploads[-1][0] == "someone/other"
    assert sorted(p.name for p in (tmp_path / "local").iterdir()) == ["config.json", "model.safetensors"]


def test_folder_written_by_the_plain_mixin_layout_loads(tmp_path):
    """A folder in PyTorchModelHubMixin's layout (flat config.json without _class_name, sorted
    keys, model.safetensors via safetensors.torch.save_model) is read by from_pretrained."""
    from safetensors.torch import save_model

    m = _randomized()
    folder = tmp_path / "mixin"
    folder.mkdir()
    save_model(m, str(folder / "model.safetensors"))
    cfg = {k: getattr(m.config, k) for k in ("width", "nhead", "dim_feedforward", "num_layers", "dropout",
                                             "adapter_weight", "token_mixing")}
    (folder / "config.json").write_text(json.dumps(cfg, sort_keys=True, indent=2))
    loaded = SURAdapter.from_pretrained(str(folder))
    assert loaded.config == m.config and _same_weights(m, loaded)


def test_dtype_and_torch_dtype_must_agree(tmp_path):
    _randomized().save_pretrained(tmp_path / "ad")
    assert SURAdapter.from_pretrained(tmp_path / "ad", dtype=torch.float16, torch_dtype="fp16").dtype == torch.float16
    with pytest.raises(SurpipeError, match="not both"):
        SURAdapter.from_pretrained(tmp_path / "ad", dtype="bf16", torch_dtype="fp16")
