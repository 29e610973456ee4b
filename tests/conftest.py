"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """Tiny LLaMA (``/llm``) and tiny Stable Diffusion (``/sd``), built once per test session."""
    from surpipe.tiny import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("tiny_models") / "models", seed=0)
