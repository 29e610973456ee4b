"""One rule for model arguments (local folder or hub id) and one for group names, shared by the LLM
and Stable Diffusion sides (surpipe.hub); they used to differ between surpipe/llm.py and surpipe/sd/components.py."""

from __future__ import annotations

import os

import pytest

from surpipe import hub, llm
from surpipe import sd


def test_one_home_for_each_rule():
    assert llm.sanitize_name is sd.sanitize_name is hub.sanitize_name
    assert llm.model_basename is sd.model_basename is hub.model_basename
    assert llm.is_local is sd.is_local is hub.is_local_model


@pytest.mark.parametrize("model, local", [
    ("owner/name", False),
    ("name", False),
    ("./name", True),
    ("~/models/x", True),
    ("/abs/path", True),
    ("not a hub id!", True),  # not hub-shaped: a (missing) folder, never sent to the hub
    ("a/b/c", True),
    ("C:\\models\\sd", True),
])
def test_local_or_hub(model, local):
    assert llm.is_local(model) is local and sd.is_local(model) is local
    assert hub.looks_like_hub_id(model) is (not local)


def test_existing_folder_shaped_like_a_hub_id_is_local(tmp_path, monkeypatch):
    (tmp_path / "owner" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert llm.is_local("owner/name") and sd.is_local("owner/name")
    assert llm.model_basename("owner/name") == "name"


def test_dot_names_the_current_folder(tmp_path, monkeypatch):
    """``--model .`` gives the folder's own name on both sides (sd gave the fallback ``model``)."""
    d = tmp_path / "my model+v2"
    d.mkdir()
    monkeypatch.chdir(d)
    assert llm.model_basename(".") == sd.model_basename(".") == "my-model-v2"
    assert sd.model_basename("./") == "my-model-v2"
    assert sd.model_basename("../my model+v2/") == "my-model-v2"


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_link_keeps_its_own_name(tmp_path):
    """A link into a cache snapshot is named after the link, not the snapshot hash it points to
    (llm resolved links)."""
    target = tmp_path / "snapshots" / "0123abcd"
    target.mkdir(parents=True)
    link = tmp_path / "sd15"
    link.symlink_to(target, target_is_directory=True)
    assert llm.model_basename(str(link)) == sd.model_basename(str(link)) == "sd15"


@pytest.mark.parametrize("model, name", [
    ("runwayml/stable-diffusion-v1-5", "stable-diffusion-v1-5"),
    ("meta-llama/Llama-2-7b-hf/", "Llama-2-7b-hf"),
    ("/", "model"),
])
def test_basenames(model, name):
    assert hub.model_basename(model) == name


def test_sanitize_name():
    assert hub.sanitize_name("..a b/c") == "a-b-c"
    assert hub.sanitize_name("///") == "model"
