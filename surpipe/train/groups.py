"""Which store groups feed training: the requested one, the only one of its kind, or among several
the one that fits the UNet (embedding width, latent channels) and the model that filled it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from surpipe import sd
from surpipe.features import ClipFeatures, LLMFeatures, VaeFeatures, clip_features, open_group


@dataclass(frozen=True)
class StoreGroups:
    """Which groups and arrays of a store feed training."""

    llm_group: str | None  # e.g. "llm/tiny"
    llm_layer: int
    clip_group: str | None  # e.g. "clip/sd"
    vae_group: str | None  # e.g. "vae/sd-512"
    use_flip: bool = True


def _pick(store, kind: str, requested: str | None, match=None) -> tuple[str | None, str | None]:
    """Resolve a group name: the requested one, the only group of that kind, or, among several,
    the one ``match(store, paths)`` singles out (it returns (matching paths, why-text))."""
    have = store.group_paths(kind)
    if requested:
        path = requested if requested.startswith(kind + "/") else f"{kind}/{requested}"
        if path not in have:
            return None, (f"store has no {kind} group {path!r}; "
                          f"available: {', '.join(have) or f'none (run the stage that writes {kind} features)'}")
        return path, None
    if len(have) == 1:
        return have[0], None
    if not have:
        stage = "extract-llm" if kind == "llm" else "encode-latents"
        return None, f"store has no {kind} group; run `surpipe {stage}` first"
    if match is not None:
        found, why = match(store, have)
        if len(found) == 1:
            return found[0], None
        cands = found or have
        listing = "; ".join(f"{p} ({_describe_group(store, p)})" for p in cands)
        return None, (f"store has several {kind} groups and {why}: {listing}; "
                      f"choose one with --{kind}-group NAME")
    return None, f"store has several {kind} groups ({', '.join(have)}); choose one with --{kind}-group"


def _describe_group(store, path: str) -> str:
    s = open_group(store, path).settings
    bits = [f"model {s.get('model')}"]
    for k in ("revision", "resolution", "store_dtype"):
        if s.get(k) is not None:
            bits.append(f"{k} {s[k]}")
    return ", ".join(bits)


def model_id(model: str) -> str:
    """How stage one records a model: a local folder as its resolved absolute path, a hub id as is."""
    return str(Path(model).expanduser().resolve()) if sd.is_local(model) else model


def _text_encoder_fingerprint(model: str, revision: str | None, with_weights: bool) -> dict | None:
    """The hashes encode-latents records for a text encoder (config hash, and with ``with_weights``
    the weights hash), computed from the files of a local folder without building the model;
    None when ``model`` is no local folder with text_encoder/ (a UNet-only folder, a hub id)."""
    if not sd.is_local(model):
        return None
    sub = Path(model).expanduser() / "text_encoder"
    if not (sub / "config.json").is_file():
        return None
    try:
        import transformers  # heavy: only for a local folder's text encoder

        cfg = transformers.AutoConfig.from_pretrained(str(sub))
        out = {"text_encoder_config_hash": sd.config_hash(cfg.to_dict())}
    except Exception:
        return None
    if with_weights:
        files = [sub / "model.safetensors"] if (sub / "model.safetensors").is_file() else []
        index = sub / "model.safetensors.index.json"
        if not files and index.is_file():
            try:
                files = sorted({sub / f for f in json.loads(index.read_text())["weight_map"].values()})
            except Exception:
                files = []
        if not files and (sub / "model.fp16.safetensors").is_file():
            files = [sub / "model.fp16.safetensors"]
        if files:  # .bin files are pickles: never read here
            try:
                from safetensors.torch import load_file  # heavy: torch

                tensors = {}
                for f in files:
                    tensors.update({k: v.float() for k, v in load_file(str(f)).items()})

                class _Dict:  # weights_hash reads state_dict(): hash the file's tensors the same way
                    def state_dict(self):
                        return tensors

                out["text_encoder_weights_sha256"] = sd.weights_hash(_Dict())
            except Exception:
                pass
    return out


def _fitting(store, paths, size_of, want) -> tuple[list[str], bool]:
    """The groups whose ``size_of(group)`` is what the UNet expects (``want``; None: unknown):
    (candidates, whether that decided it). None fitting leaves them all to the next rule."""
    fit = [p for p in paths if want is not None and size_of(open_group(store, p)) == want]
    return (fit, True) if len(fit) == 1 else (fit or list(paths), False)


def clip_matcher(model: str | None, revision: str | None = None, width: int | None = None):
    """The rule that picks a CLIP group among several: the embedding width the UNet expects, then
    the text encoder of ``model`` (its config and weights hashes when ``model`` is a local folder
    with text_encoder/, else the model id recorded by encode-latents)."""
    def match(store, paths):
        cands, decided = _fitting(store, paths, lambda g: (ClipFeatures.embedding_shape(g) or (0, None))[1], width)
        if decided:
            return cands, ""
        if model is None:
            return [], "no --model to match them against"
        fp = _text_encoder_fingerprint(model, revision, with_weights=False)
        if fp is not None:
            cands = [p for p in cands if open_group(store, p).settings.get("text_encoder_config_hash")
                     == fp["text_encoder_config_hash"]]
            if len(cands) > 1:
                fp = _text_encoder_fingerprint(model, revision, with_weights=True) or fp
                if "text_encoder_weights_sha256" in fp:
                    cands = [p for p in cands if open_group(store, p).settings.get("text_encoder_weights_sha256")
                             == fp["text_encoder_weights_sha256"]]
            how = f"the text encoder of {model} (config hash {fp['text_encoder_config_hash']}"
            how += f", weights hash {fp['text_encoder_weights_sha256']})" if "text_encoder_weights_sha256" in fp else ")"
        else:
            mid = model_id(model)
            cands = [p for p in cands if open_group(store, p).settings.get("model") == mid]
            how = f"model {mid} (it has no text_encoder/ to compare by hash)"
        if len(cands) == 1:
            return cands, ""
        return cands, (f"{len(cands)} of them match {how}" if cands else f"none of them matches {how}")

    return match


def vae_matcher(model: str | None, in_channels: int | None = None):
    """The rule that picks a VAE group among several: the latent channels the UNet expects, then
    the model id recorded by encode-latents."""
    def match(store, paths):
        cands, decided = _fitting(store, paths, lambda g: (VaeFeatures.latent_shape(g) or (None,))[0], in_channels)
        if decided:
            return cands, ""
        if model is None:
            return [], "no --model to match them against"
        mid = model_id(model)
        cands = [p for p in cands if open_group(store, p).settings.get("model") == mid]
        if len(cands) == 1:
            return cands, ""
        return cands, (f"{len(cands)} of them were encoded from model {mid}" if cands
                       else f"none of them was encoded from model {mid}")

    return match


def resolve_groups(store, *, llm_layer: int, llm_group: str | None, clip_group: str | None,
                   vae_group: str | None, use_flip: bool, model: str | None = None,
                   revision: str | None = None, unet_config: dict | None = None
                   ) -> tuple[StoreGroups | None, list[str]]:
    """Find and check the groups training needs; returns (groups, problems) with every problem.

    A kind with several groups and no explicit choice is resolved against ``model`` and its
    ``unet_config`` (clip_matcher, vae_matcher). A negative ``llm_layer`` counts from the end of
    the stored layers (-1: the last); the returned StoreGroups holds the resolved layer.
    A group that could not be resolved is None in the returned StoreGroups."""
    problems: list[str] = []
    paths = {}
    unet_config = unet_config or {}
    cad = unet_config.get("cross_attention_dim")
    if isinstance(cad, (list, tuple)):
        cad = cad[0] if cad else None
    cad = cad if isinstance(cad, int) else None
    inch = unet_config.get("in_channels") if isinstance(unet_config.get("in_channels"), int) else None
    matchers = {"llm": None, "clip": clip_matcher(model, revision, cad), "vae": vae_matcher(model, inch)}
    for kind, req in (("llm", llm_group), ("clip", clip_group), ("vae", vae_group)):
        path, err = _pick(store, kind, req, matchers[kind])
        if err:
            problems.append(err)
        paths[kind] = path
    if paths["llm"]:
        g = open_group(store, paths["llm"])
        layers = LLMFeatures.layers(g)
        if llm_layer < 0 and -len(layers) <= llm_layer:
            llm_layer = layers[llm_layer]
        elif llm_layer < 0 or LLMFeatures.width(g, llm_layer) is None:
            problems.append(f"{paths['llm']} has no layer {llm_layer} (stored layers: {layers or 'none'}); "
                            "re-run extract-llm with that layer or choose --llm-layer from the list "
                            "(negative values count from the last stored layer: -1 is the last)")
    for kind in ("llm", "clip", "vae"):
        if paths[kind]:
            g = open_group(store, paths[kind])
            done, n = g.completed_blocks(), store.num_blocks
            if done < n:
                problems.append(f"{paths[kind]} is incomplete: {done}/{n} blocks done; rerun its stage to finish it")
    if paths["clip"]:
        clip = open_group(store, paths["clip"])
        problems += clip_features(clip.settings).train_problems(clip, paths["clip"])
    flip = False
    if paths["vae"]:
        vae = open_group(store, paths["vae"])
        problems += VaeFeatures.train_problems(vae, paths["vae"])
        flip = use_flip and VaeFeatures.has_flip(vae)
    # groups that were found are returned even with problems, so callers can check more at once
    return StoreGroups(paths["llm"], llm_layer, paths["clip"], paths["vae"], flip), problems
