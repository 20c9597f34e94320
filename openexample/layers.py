"""Intermediate activations of a torch model, by layer name, for both planes.

Agents attach them to PKG_IN (``AgentConfig.activations``); the controller computes
them from its reference copy for agents that send none (controller/activations.py).
Layer names are module paths as ``named_modules`` gives them (``features.2``).

- A torch ``nn.Module``: forward hooks on the named modules, one forward pass.
- TorchScript: a ScriptModule takes no forward hooks, so ``Taps`` reads the module
  graphs instead. A layer can be tapped when its module is called exactly once, as
  ``forward`` with one argument, in the top block of its parent's graph, and that
  argument is the parent's input or the output of a chain of such calls of sibling
  modules (a Sequential is such a chain; so is any forward that only calls submodules
  one after the other); the same holds for the parent, up to the root. The taps then
  run exactly those submodules on exactly those values: what the layer computes inside
  the model, not a guess. Anything else between the input and the layer (a
  ``flatten``, a residual add, a branch) is refused by name.

Imported only where activations are wanted (it imports torch); pure otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

__all__ = ["Taps", "layer_names"]

Step = tuple[str, Callable[[torch.Tensor], torch.Tensor], str]  # (out key, module, in key)


def layer_names(module: torch.nn.Module) -> list[str]:
    """Every named submodule of ``module`` (what ``Taps`` accepts), in module order."""
    return [n for n, _ in module.named_modules() if n]


class Taps:
    """The activations of ``names`` in ``module``: ``taps(x)`` -> {name: tensor}."""

    def __init__(self, module: torch.nn.Module, names: Sequence[str]) -> None:
        self.module = module
        self.names = list(names)
        if not self.names:
            raise ValueError("no layer names to tap")
        known = set(layer_names(module))
        missing = [n for n in self.names if n not in known]
        if missing:
            raise ValueError(
                f"no layer {', '.join(map(repr, missing))} in the model; its layers:"
                f" {', '.join(layer_names(module)) or '(none)'}"
            )
        self.scripted = isinstance(module, torch.jit.ScriptModule)
        self._steps: list[Step] = []
        self._outputs: dict[str, str] = {}
        if self.scripted:
            planned: set[str] = set()
            for name in self.names:
                self._outputs[name] = _plan(module, name.split("."), "", "x", self._steps, planned)

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.scripted:
            return self._hooked(x)
        env = {"x": x}
        for out, fn, inp in self._steps:
            env[out] = fn(env[inp])
        return {n: env[k] for n, k in self._outputs.items()}

    def _hooked(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One forward pass with hooks on the named modules (a module called more than
        once gives its last output). The hooks fire for any call of the module while
        they are on: callers that share the module across threads tap a copy of it."""
        got: dict[str, torch.Tensor] = {}
        modules = dict(self.module.named_modules())
        handles = []
        for name in self.names:

            def hook(_m: torch.nn.Module, _i: object, out: object, name: str = name) -> None:
                if not isinstance(out, torch.Tensor):
                    raise ValueError(f"layer {name!r} does not output one tensor")
                got[name] = out

            handles.append(modules[name].register_forward_hook(hook))
        try:
            self.module(x)
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in self.names if n not in got]
        if missing:
            raise ValueError(f"layers {missing} were not called by the model's forward")
        return {n: got[n] for n in self.names}  # in the order asked, as the graph taps

    def numpy(self, x: np.ndarray, batch_size: int = 512) -> dict[str, np.ndarray]:
        """The activations of a numpy batch (in the model's input dtype), as float32, under
        ``torch.inference_mode``."""
        parts: dict[str, list[np.ndarray]] = {n: [] for n in self.names}
        a = np.require(np.asarray(x), requirements=("C", "W"))
        with torch.inference_mode():
            for i in range(0, len(a), batch_size):
                for n, t in self(torch.from_numpy(a[i : i + batch_size])).items():
                    parts[n].append(t.float().numpy())
        return {n: np.concatenate(p) if p else np.zeros((0,), np.float32) for n, p in parts.items()}


def _plan(
    module: torch.nn.Module,
    path: list[str],
    prefix: str,
    input_key: str,
    steps: list[Step],
    planned: set[str],
) -> str:
    """Add the steps that compute ``path`` inside ``module`` (whose forward input is
    ``input_key``) to ``steps``; return the key of the layer's output."""
    child, rest = path[0], path[1:]
    graph = module.graph
    where = f"{prefix}{child}"
    calls = [
        n
        for n in graph.findAllNodes("prim::CallMethod")
        if n.inputsAt(0).node().kind() == "prim::GetAttr"
        and n.inputsAt(0).node().s("name") == child
    ]
    if len(calls) != 1:
        raise ValueError(f"layer {where!r}: called {len(calls)} times by its parent, not once")
    node = calls[0]
    arg_key = _value_key(
        module,
        node.inputsAt(1) if node.inputsSize() == 2 else None,
        prefix,
        input_key,
        steps,
        planned,
        where,
    )
    if not rest:
        return _value_key(module, node.output(), prefix, input_key, steps, planned, where)
    return _plan(getattr(module, child), rest, f"{where}.", arg_key, steps, planned)


def _value_key(
    module: torch.nn.Module,
    value: torch.Value | None,
    prefix: str,
    input_key: str,
    steps: list[Step],
    planned: set[str],
    where: str,
) -> str:
    """The key of ``value`` in ``module``'s graph: its input, or the output of a chain of
    single-argument submodule calls from it (planned into ``steps``)."""
    graph = module.graph
    inputs = list(graph.inputs())
    if value is not None and len(inputs) == 2 and value == inputs[1]:
        return input_key
    node = None if value is None else value.node()
    if (
        node is None
        or node.kind() != "prim::CallMethod"
        or node.s("name") != "forward"
        or node.inputsSize() != 2
        or node.owningBlock().owningNode() is not None
        or node.inputsAt(0).node().kind() != "prim::GetAttr"
        or node.inputsAt(0).node().inputsAt(0) != inputs[0]
    ):
        raise ValueError(
            f"layer {where!r}: its input is not reached from the model's input by submodule"
            " calls alone (TorchScript takes no forward hooks; tap a layer before any"
            " flatten, add or branch, or have the agent send the activations)"
        )
    key = f"{prefix}%{value.debugName()}"
    if key not in planned:
        sub = node.inputsAt(0).node().s("name")
        in_key = _value_key(module, node.inputsAt(1), prefix, input_key, steps, planned, where)
        steps.append((key, getattr(module, sub), in_key))
        planned.add(key)
    return key
