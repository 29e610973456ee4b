"""What every feature kind provides (``FeatureKind``) and the checks they share."""

from __future__ import annotations

from typing import Any, ClassVar, Iterable, Mapping

import numpy as np

from surpipe.store.spec import ArraySpec, Problems


def finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v))


def all_ints(*vals) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in vals)


class FeatureKind:
    """The contract of one kind of feature group (subclasses: one per kind)."""

    kind: ClassVar[str]
    stage: ClassVar[str]  # the command that writes it (for messages)

    @classmethod
    def arrays(cls, settings: Mapping[str, Any], codec: str = "zstd") -> dict[str, ArraySpec]:
        raise NotImplementedError

    @classmethod
    def for_settings(cls, settings: Mapping[str, Any] | None) -> type["FeatureKind"]:
        """The class describing a group of this kind with ``settings`` (a variant of the kind
        overrides this: ``ClipFeatures`` answers ``ClipXLFeatures`` for an SDXL group)."""
        return cls

    @classmethod
    def required(cls, settings: Mapping[str, Any]) -> list[str]:
        """Arrays the settings say must be stored (only what the settings determine for sure)."""
        return []

    @classmethod
    def _kind_problems(cls, s: Mapping[str, Any], want, listed: list[str], out: Problems) -> None:
        pass

    @classmethod
    def layout_problems(cls, settings: Mapping[str, Any], present: Mapping[str, Any],
                        listed: Iterable[str]) -> Problems:
        """Problems of a group's arrays (``present``: name -> zarr array; ``listed``: its attribute
        ``arrays``) against what its ``settings`` imply (row shapes, dtypes, required arrays) and
        the settings a reader relies on: [(array name or None, message)]."""
        s, listed, out = settings, list(listed), []

        def want(name, shape=None, dtype=None):
            if name not in present:
                return
            a = present[name]
            if shape is not None and tuple(a.shape[1:]) != tuple(shape):
                out.append((name, f"row shape {tuple(a.shape[1:])}, but the settings say {tuple(shape)}"))
            if dtype is not None and a.dtype != np.dtype(dtype):
                out.append((name, f"dtype {a.dtype}, but the settings say {dtype}"))

        sd = s.get("store_dtype")
        if isinstance(sd, str):
            try:
                np.dtype(sd)
            except TypeError:
                out.append((None, f"settings store_dtype {sd!r} is not a dtype"))
            else:
                for name, a in present.items():
                    if a.dtype.kind in "fc":
                        want(name, dtype=sd)
        cls._kind_problems(s, want, listed, out)
        for name in cls.required(s):
            if name not in listed:
                out.append((None, f"settings imply array {name} but it is not stored"))
        return out

    @classmethod
    def check(cls, group) -> list[str]:
        """Problems of a stored group (a ``FeatureGroup`` or a zarr group) against its settings,
        as ``"<array>: message"`` lines; an array listed in its attributes but absent is one too."""
        zg = getattr(group, "group", group)
        attrs = dict(zg.attrs)
        settings = attrs.get("settings") if isinstance(attrs.get("settings"), dict) else {}
        listed = [a for a in attrs.get("arrays", []) if isinstance(a, str)]
        present, problems = {}, []
        for name in listed:
            try:
                present[name] = zg[name]
            except KeyError:
                problems.append(f"{name}: missing")
            except Exception as e:  # garbage zarr.json
                problems.append(f"{name}: metadata (zarr.json) cannot be read ({type(e).__name__})")
        k = cls.for_settings(settings)  # the group's own class (an SDXL clip group's)
        return problems + [f"{n}: {m}" if n else m for n, m in k.layout_problems(settings, present, listed)]

    @staticmethod
    def _missing(group, path: str, names: Iterable[str]) -> list[str]:
        have = group.array_names
        return [f"{path} has no {a!r} array" for a in names if a not in have]
