"""Feature kinds: what each feature group of the store holds, as code (docs/store-format.md).

One class per kind (``llm``, ``clip``, ``vae``) owns the kind's whole contract:

* ``settings(...)``: the settings that determine its values (the writer adds its source's
  identity: model, revision, hashes ...);
* ``arrays(settings)``: the arrays those settings imply, ``{name: ArraySpec}``;
* ``block(...)``: the values of one block as the store takes them (``FeatureGroup.write_block``);
* ``check(group)`` / ``layout_problems``: a stored group against what its settings imply (row
  shapes, dtypes, arrays the settings require, the numbers a reader relies on). The store runs
  these checks without importing this package: ``open_group`` and ``surpipe verify`` hand it
  ``RULES``;
* typed reads: what a trainer needs (``LLMFeatures.layers``, ``ClipFeatures.embedding_shape``,
  ``VaeFeatures.latent_params``) and ``train_arrays``, the arrays the training reader loads.

Writers (extract-llm, import-prompt2vec, encode-latents), ``surpipe.store.verify``, the store's layout
check and the training reader all go through these classes: every stored array name is spelled in
its kind's module (``surpipe/features/<kind>.py``) and nowhere else, so adding an array touches that
module and the code computing it; adding a kind, one new module registered in ``KINDS``.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from surpipe.features.base import FeatureKind, Problems
from surpipe.features.clip import ClipFeatures, ClipXLFeatures
from surpipe.features.llm import LLMFeatures
from surpipe.store.spec import ArraySpec, KindRules
from surpipe.features.vae import LatentParams, VaeFeatures

__all__ = ["KINDS", "ArraySpec", "ClipFeatures", "ClipXLFeatures", "FeatureKind", "LLMFeatures", "LatentParams", "Problems",
           "VaeFeatures", "clip_features", "feature_kind", "group_features", "layout_problems", "open_group", "RULES"]

KINDS: dict[str, type[FeatureKind]] = {k.kind: k for k in (LLMFeatures, ClipFeatures, VaeFeatures)}


def feature_kind(kind: str) -> type[FeatureKind]:
    """The class of feature kind ``kind`` (``llm``, ``clip``, ``vae``)."""
    return KINDS[kind]


def clip_features(settings: Mapping[str, Any] | None) -> type[ClipFeatures]:
    """The class of a ``clip`` group with ``settings``: ``ClipXLFeatures`` for an SDXL group
    (settings ``pipeline: "sdxl"``), else ``ClipFeatures`` (SD 1.x/2.x)."""
    return ClipFeatures.for_settings(settings)


def group_features(kind: str, settings: Mapping[str, Any] | None) -> type[FeatureKind]:
    """The class of a group of kind ``kind`` with ``settings`` (a ``clip`` group: ``clip_features``)."""
    return KINDS[kind].for_settings(settings)


def layout_problems(kind: str, settings: Mapping[str, Any], present: Mapping[str, Any],
                    listed: Iterable[str]) -> Problems:
    """``group_features(kind, settings).layout_problems``; nothing for a kind this surpipe does not know."""
    if kind not in KINDS:
        return []
    return group_features(kind, settings).layout_problems(settings, present, listed)


RULES = KindRules(layout_problems=layout_problems, stage=lambda kind: KINDS[kind].stage)


def open_group(store, path: str):
    """Feature group ``path`` of ``store`` opened for reading after the store's layout checks and
    its kind's (``RULES``): a group whose zarr.json disagrees with its settings is refused."""
    return store.group(path, rules=RULES)
