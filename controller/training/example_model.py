"""The example classifier that stands for "the user's existing model", and its cache.

The controller never trains the user's model; this one exists so the demo, the detectors'
tests and the benchmarks have a real MNIST classifier to attack. It is saved as TorchScript,
the format the controller config names for reference copies of a model (docs/architecture.md).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from controller.reference_model import load_model, quiet_torchscript
from controller.training import datasets

if TYPE_CHECKING:
    from controller.training.datasets import Dataset

__all__ = [
    "SmallCNN",
    "accuracy",
    "ensure_example_model",
    "load_model",
    "save_torchscript",
    "train_classifier",
]

BATCH_SIZE = 64
LEARNING_RATE = 3e-3  # 8 epochs of 47 steps: 1e-3 ends at ~96%, 3e-3 at ~97%


class SmallCNN(nn.Module):
    """Two 3x3 conv layers (16 and 32 channels), each followed by ReLU and 2x2 max-pool,
    then a linear head: ~0.1M parameters, >= 95% on the MNIST 5k subset."""

    def __init__(self, num_classes: int, in_ch: int = 1, size: int = 28) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_ch, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(32 * (size // 4) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def train_classifier(
    ds: Dataset, *, epochs: int = 8, seed: int = 0, progress: bool = True
) -> nn.Module:
    """Train a SmallCNN on ``ds`` (Adam, batch 64); same seed, same weights."""
    torch.manual_seed(seed)
    _, h, w = ds.input_shape
    if h != w:
        raise ValueError(f"SmallCNN takes square images, got {h}x{w}")
    model = SmallCNN(ds.num_classes, in_ch=ds.input_shape[0], size=h)
    opt = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    x = torch.from_numpy(np.ascontiguousarray(ds.x, dtype=np.float32))
    y = torch.from_numpy(np.ascontiguousarray(ds.y, dtype=np.int64))
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        total, correct = 0.0, 0
        for i in range(0, len(x), BATCH_SIZE):
            idx = order[i : i + BATCH_SIZE]
            logits = model(x[idx])
            loss = nn.functional.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y[idx]).sum())
        if progress:
            print(
                f"epoch {epoch}/{epochs}: loss {total / len(x):.4f}, "
                f"train accuracy {correct / len(x):.4f}, {time.perf_counter() - start:.1f} s",
                flush=True,
            )
    return model.eval()


def accuracy(model: nn.Module, ds: Dataset, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``ds``."""
    correct = 0
    with torch.no_grad():
        for i in range(0, len(ds), batch_size):
            logits = model(torch.from_numpy(np.ascontiguousarray(ds.x[i : i + batch_size])))
            correct += int((logits.argmax(1).numpy() == ds.y[i : i + batch_size]).sum())
    return correct / max(len(ds), 1)


def save_torchscript(model: nn.Module, path: str | Path, example_input: torch.Tensor) -> None:
    """Trace ``model`` (in eval mode) and save it atomically as TorchScript."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet_torchscript(), torch.no_grad():
        traced = torch.jit.trace(model.eval(), example_input)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        traced.save(str(tmp))
    os.replace(tmp, path)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "dataset"


def ensure_example_model(cache_dir: Path, dataset: str = "mnist5k") -> Path:
    """Path of the example model for ``dataset``, training it on the train split if absent.

    Files: ``<cache_dir>/<dataset>/model.pt`` (TorchScript) and ``model.json`` beside it
    (dataset, test-split accuracy, class names, input shape, torch version, timing).
    """
    folder = Path(cache_dir) / _slug(dataset)
    pt, meta = folder / "model.pt", folder / "model.json"
    if pt.is_file() and meta.is_file():
        return pt
    ds = datasets.load(dataset)
    splits = ds.split()
    start = time.perf_counter()
    model = train_classifier(splits.train)
    seconds = time.perf_counter() - start
    info = {
        "dataset": dataset,
        "architecture": "SmallCNN",
        "accuracy": accuracy(model, splits.test),
        "split": {"seed": 0, "calibration": 0.2, "test": 0.2},
        "num_train": len(splits.train),
        "num_test": len(splits.test),
        "class_names": ds.class_names,
        "input_shape": list(ds.input_shape),
        "input_dtype": "float32",
        "input_range": [0.0, 1.0],
        "torch_version": torch.__version__,
        "train_seconds": round(seconds, 2),
    }
    folder.mkdir(parents=True, exist_ok=True)
    tmp = meta.with_name(f".model.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, meta)
    # the .pt goes last: its presence with the .json beside it marks a complete cache entry
    save_torchscript(model, pt, torch.zeros(1, *ds.input_shape))
    return pt
