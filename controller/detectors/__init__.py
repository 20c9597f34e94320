"""Detectors hosted by the controller, looked up by name.

Built-ins register themselves on import; third-party packages add theirs through the
entry-point group ``openexample.detectors`` (``name = package.module:Class``), loaded the
first time a name is not found, so a new detector is one file plus one line of metadata.
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path

from controller.detectors import desvig, feature_squeezing, margin, phash_prototype
from controller.detectors.base import (
    _REGISTRY,
    Batch,
    Detector,
    ModelFn,
    Scores,
    make_batch,
    read_manifest,
    register,
)

ENTRY_POINT_GROUP = "openexample.detectors"
BUILTIN = (
    margin.MarginDetector,
    phash_prototype.PhashPrototypeDetector,
    feature_squeezing.FeatureSqueezingDetector,
    desvig.DesvigDetector,
)

log = logging.getLogger("openexample.controller")
_plugins_loaded = False

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
    "register",
]


def _load_plugins() -> None:
    """Import every entry point of the group once; a broken plugin is logged, not fatal."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Detector)):
                raise TypeError(f"{ep.value} is not a Detector subclass")
            if _REGISTRY.get(cls.name) is not cls:
                register(cls)
        except Exception:
            log.exception("detector plugin %r (%s) failed to load", ep.name, ep.value)


def available() -> list[str]:
    """Names of all detectors: built-in and installed plugins."""
    _load_plugins()
    return sorted(_REGISTRY)


def get(name: str) -> type[Detector]:
    """The detector class registered as ``name``; ValueError naming the valid ones if none."""
    if name not in _REGISTRY:
        _load_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown detector {name!r}; available: {', '.join(available())}"
        ) from None


def load_artifact(path: str | Path) -> Detector:
    """Load a saved detector folder, whatever its kind (dispatch on manifest.json's name)."""
    return get(read_manifest(path)["name"]).load(path)
