"""The offline room: what is built before the daemon runs, never imported by ``serve``.

- ``datasets``: the image data sets (mnist5k, digits, IDX files, image folders);
- ``example_model``: the example CNN standing for the user's model, trained and cached;
- ``train``: ``openexample-controller train``, fitting and jointly calibrating detector
  artifacts (``DEFAULT_DETECTORS``, ``build_artifacts``, ``ensure_artifacts``).

The daemon (controller/cli.py ``serve``, server.py, pipeline.py, the detectors' scoring)
imports nothing from here; tests/test_layout.py checks it. The GAN that DeSVig trains at
``fit`` lives with its detector (controller/detectors/desvig/gan.py).

The main names are re-exported lazily, so ``controller.training.datasets`` stays as light
as numpy until the training stack is asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from controller.training.example_model import ensure_example_model
    from controller.training.train import (
        DEFAULT_DETECTORS,
        build_artifacts,
        ensure_artifacts,
        train_command,
    )

_EXPORTS = {
    "DEFAULT_DETECTORS": "controller.training.train",
    "build_artifacts": "controller.training.train",
    "ensure_artifacts": "controller.training.train",
    "train_command": "controller.training.train",
    "ensure_example_model": "controller.training.example_model",
}

__all__ = [
    "DEFAULT_DETECTORS",
    "build_artifacts",
    "ensure_artifacts",
    "ensure_example_model",
    "train_command",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
