"""Detectors hosted by the controller, looked up by name.

Every detector, built-in or third-party, is declared the same way: one line in the
entry-point group ``openexample.detectors`` (``name = package.module:Class``; the built-ins
are in setup.cfg ``[options.entry_points]``). The group is read once, the first time a
name is asked for; a plugin that fails to load, is not a ``Detector`` subclass, or whose
entry-point name differs from its class's ``name`` is logged once and left out. What a
detector needs from the controller is declared on the class (``Detector.needs_model``,
``needs_activations``, ``can_purify``): see controller/detectors/base.py.
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path

from controller.detectors.base import (
    Batch,
    Detector,
    ModelFn,
    Scores,
    make_batch,
    read_manifest,
)

ENTRY_POINT_GROUP = "openexample.detectors"

log = logging.getLogger("openexample.controller")

_registry: dict[str, type[Detector]] | None = None
"""name -> class, read from the entry points on first use (tests swap it for a copy)."""

__all__ = [
    "ENTRY_POINT_GROUP",
    "Batch",
    "Detector",
    "ModelFn",
    "Scores",
    "available",
    "get",
    "load_artifact",
    "make_batch",
]


def _load_entry_points() -> dict[str, type[Detector]]:
    found: dict[str, type[Detector]] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Detector)):
                raise TypeError(f"{ep.value} is not a Detector subclass")
            name = getattr(cls, "name", None)
            if name != ep.name:
                raise TypeError(f"{ep.value} has name {name!r}, its entry point {ep.name!r}")
            other = found.get(name)
            if other is not None and other is not cls:
                raise ValueError(f"detector name {name!r} is taken by {other.__qualname__}")
        except Exception:
            log.exception("detector plugin %r (%s) failed to load", ep.name, ep.value)
            continue
        found[name] = cls
    return found


def _detectors() -> dict[str, type[Detector]]:
    global _registry
    if _registry is None:
        _registry = _load_entry_points()
    return _registry


def available() -> list[str]:
    """Names of all detectors declared in the entry-point group."""
    return sorted(_detectors())


def get(name: str) -> type[Detector]:
    """The detector class declared as ``name``; ValueError naming the valid ones if none."""
    try:
        return _detectors()[name]
    except KeyError:
        raise ValueError(
            f"unknown detector {name!r}; available: {', '.join(available())}"
        ) from None


def load_artifact(path: str | Path) -> Detector:
    """Load a saved detector folder, whatever its kind (dispatch on manifest.json's name)."""
    return get(read_manifest(path)["name"]).load(path)
