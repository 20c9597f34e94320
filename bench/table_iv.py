"""The paper's Table IV, run the way the paper runs it (seed 000, section IV.A).

Four deployments of the model under test: DL_A and DL_B without the defence (the model
called directly), DL_C and DL_D each behind its own agent (its own certificate and
session) on one real controller process. DL_A and DL_C are fed the same clean test
images, DL_B and DL_D the adversarial versions of those images, one attack at a time
(FGSM, R+FGSM, DeepFool). Each defence of ``--table-iv`` gets a controller of its own.

Accuracy, as the paper counts it: an input is handled when the label handed out is the
true one, or when the defence withheld an attacked input (fooled or not: it is an
attack), or a clean image the model got wrong (the paper's "+1" on clean). A clean
image the model got right and the defence withheld is an error. It is computed over
every attacked input (the paper) and over the inputs the attack really fooled.
Cost: CPU seconds per 1,000 inferences, the controller's and the calling process's
(the agent with its model; without the defence, the model alone). Delay: the median
wall time of one inference, from the caller's side.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.procs import ControllerProcess

SETS = ("baseline", "FGSM", "R+FGSM", "DeepFool")
FEED = 100  # images per deployment and input set, as the paper

# The paper's Table IV (MNIST; accuracy %, its "Cost" column, delay in seconds), for the
# comparison table. Its cost column has no unit; its attacks no eps.
PAPER = {
    "Without defence": (98.9, 90.29, 40.70, 49.02, "+0", "0.06 s"),
    "Feature squeezing": (98.9, 96.31, 91.09, 96.68, "+2", "0.12 s"),
    "Adversarial training": (98.9, 91.86, 49.77, 85.91, "+5", "0.07 s"),
    "Differential privacy": (98.9, 99.2, 90.52, 94.24, "+1.5", "0.08 s"),
    "GDA + ReLU": (98.9, 98.47, 80.25, 97.84, "+1", "0.08 s"),
    "DeSVig": (99.9, 98.29, 97.9, 96.02, "+0.1", "0.062 s"),
}


@dataclass(frozen=True)
class Feed:
    """One input set: the images, their true labels and, for an attack, which of them
    fooled the model (None for clean images)."""

    name: str
    budget: str  # the attack's settings, stated in the table
    x: np.ndarray
    y: np.ndarray
    fooled: np.ndarray | None = None


def feeds(data: dict, budgets: dict[str, str], n: int = FEED) -> list[Feed]:
    """The first ``n`` test images and, per attack of ``SETS`` the run made, their
    adversarial versions (``data["adversarial"][name] = (adv, y, fooled)``)."""
    x, y = data["clean"]
    out = [Feed("baseline", "clean test images", x[:n], y[:n])]
    for name in SETS[1:]:
        if name in data["adversarial"]:
            adv, ya, fooled = data["adversarial"][name]
            out.append(Feed(name, budgets.get(name, ""), adv[:n], ya[:n], fooled[:n]))
    return out


def _timed(call: Callable[[np.ndarray], Any], xs: np.ndarray) -> tuple[list, np.ndarray, float]:
    """``call`` on each input alone: its results, wall time per call (us) and the
    calling process's CPU seconds in all."""
    out, wall = [], np.empty(len(xs))
    cpu0 = time.process_time()
    for i, v in enumerate(xs):
        t0 = time.perf_counter()
        out.append(call(v))
        wall[i] = (time.perf_counter() - t0) * 1e6
    return out, wall, time.process_time() - cpu0


def _accuracy(handled: np.ndarray, fooled: np.ndarray | None) -> tuple[float, float | None]:
    """Over every input, and over those the attack fooled (None for clean or none)."""
    every = round(float(handled.mean()), 4) if len(handled) else 0.0
    if fooled is None or not fooled.any():
        return every, None
    return every, round(float(handled[fooled].mean()), 4)


def run_defence(
    defence: str,
    model: Path,
    model_id: str,
    artifacts: list[Path],
    sets: list[Feed],
    predict: Callable[[np.ndarray], np.ndarray],
    workdir: Path,
) -> list[dict]:
    """One defence (its name, and the artifacts of its detector set): a controller with
    them, DL_C and DL_D attached to it, DL_A and DL_B the bare model; a row per set."""
    from agents import attach
    from bench.latency import _cpu_seconds

    proc = ControllerProcess(
        workdir.resolve(),  # TLS paths: absolute
        {
            "budget_us": 2_000_000,  # detection figures, not latency: every verdict counts
            "trace_min_adversarial": 10**9,  # no source blocking: each input judged alone
            "models": {model_id: {"detectors": [str(p.resolve()) for p in artifacts]}},
        },
    ).start()
    rows = []
    try:
        shape = tuple(sets[0].x.shape[1:])
        guards = {
            name: attach(
                str(model),
                controller=proc.address,
                model_id=model_id,
                input_shape=shape,
                budget_us=2_000_000,
                connect_timeout_s=60,
                **proc.agent_tls(name),
            )
            for name in ("dl-c", "dl-d")
        }
        try:
            for feed in sets:
                rows.append(_row(defence, feed, guards, predict, proc.proc.pid, _cpu_seconds))
        finally:
            for g in guards.values():
                g.close()
    finally:
        proc.stop()
    return rows


def _row(
    defence: str,
    feed: Feed,
    guards: dict[str, Any],
    predict: Callable[[np.ndarray], np.ndarray],
    controller_pid: int,
    cpu_seconds: Callable[[int], float],
) -> dict:
    clean = feed.fooled is None
    # DL_A (clean) or DL_B (attacked): the model alone
    labels, bare_wall, bare_cpu = _timed(lambda v: int(predict(v[None])[0].argmax()), feed.x)
    model_right = np.array(labels) == feed.y
    # fooled: by the batch the attack was judged on AND by the model alone on that one
    # input. DeepFool stops just past the boundary, where batch 1 and a batch of 100
    # (different kernels, last-bit differences) can give different labels.
    fooled = None if clean else feed.fooled & ~model_right
    # DL_C (clean) or DL_D (attacked): the same images through an agent
    ctl0 = cpu_seconds(controller_pid)
    results, wall, agent_cpu = _timed(guards["dl-c" if clean else "dl-d"], feed.x)
    ctl_cpu = cpu_seconds(controller_pid) - ctl0
    withheld = np.array([(not r.released) or r.label != r.model_label for r in results])
    right = np.array([r.released and r.label == t for r, t in zip(results, feed.y, strict=True)])
    handled = right | (withheld & ~model_right if clean else withheld)
    n = len(feed.x)
    without, without_fooled = _accuracy(model_right, fooled)
    with_, with_fooled = _accuracy(handled, fooled)
    return {
        "defence": defence,
        "set": feed.name,
        "budget": feed.budget,
        "n": n,
        "n_fooled": None if fooled is None else int(fooled.sum()),
        "accuracy_without_defence": without,
        "accuracy_with_openexample": with_,
        "accuracy_without_defence_fooled": without_fooled,
        "accuracy_with_openexample_fooled": with_fooled,
        "withheld": round(float(withheld.mean()), 4),
        "delay_us_p50_without": round(float(np.median(bare_wall)), 1),
        "delay_us_p50_with": round(float(np.median(wall)), 1),
        "added_delay_us_p50": round(float(np.median(wall) - np.median(bare_wall)), 1),
        "model_cpu_s_per_1000": round(1000 * bare_cpu / n, 3),
        "agent_cpu_s_per_1000": round(1000 * agent_cpu / n, 3),
        "controller_cpu_s_per_1000": round(1000 * ctl_cpu / n, 3),
        "decided_by": _count([r.decided_by for r in results]),
    }


def _count(values: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def markdown(rows: list[dict]) -> list[str]:
    """Table IV twice (over every attacked input, as the paper; over the inputs the
    attack fooled), the input sets' budgets, and the paper's own figures."""
    sets = [s for s in SETS if any(r["set"] == s for r in rows)]
    by = {(r["defence"], r["set"]): r for r in rows}
    defences = list(dict.fromkeys(r["defence"] for r in rows))
    first = defences[0] if defences else ""
    n = by[(first, sets[0])]["n"] if sets else 0
    head = ["defence", *("clean" if s == "baseline" else s for s in sets)]
    cost = ["CPU s / 1000 (agent + controller)", "delay p50 (us)", "added p50 (us)"]
    lines = [
        f"Table IV as the paper runs it: four deployments fed {n} images per input set"
        " (DL_A/DL_B the model alone, DL_C/DL_D behind agents on a real controller);"
        " accuracy = right label, or withheld (an attacked input; a clean one the model"
        " got wrong).",
        "",
        "Input sets: "
        + "; ".join(f"{s}: {by[(first, s)]['budget']}" for s in sets if by[(first, s)]["budget"])
        + ".",
    ]
    tables = [("over every attacked input (the paper's way)", "")]
    if len(sets) > 1:  # attacked sets: also over the inputs each one fooled
        tables.append(("over the inputs each attack fooled", "_fooled"))
    for title, suffix in tables:
        lines += ["", f"Accuracy {title}:", ""]
        lines += ["| " + " | ".join([*head, *cost]) + " |", "|" + "---|" * (len(head) + 3)]
        base = [by[(first, s)] for s in sets]
        none = [_cell(r["accuracy_without_defence" + suffix], r, suffix) for r in base]
        model_cpu = np.mean([r["model_cpu_s_per_1000"] for r in base])
        bare = np.median([r["delay_us_p50_without"] for r in base])
        lines.append(f"| none | {' | '.join(none)} | {model_cpu:.2f} | {bare:.0f} | 0 |")
        for d in defences:
            rs = [by[(d, s)] for s in sets]
            cells = [_cell(r["accuracy_with_openexample" + suffix], r, suffix) for r in rs]
            agent = np.mean([r["agent_cpu_s_per_1000"] for r in rs])
            ctl = np.mean([r["controller_cpu_s_per_1000"] for r in rs])
            delay = np.median([r["delay_us_p50_with"] for r in rs])
            added = np.median([r["added_delay_us_p50"] for r in rs])
            costs = f"{agent:.2f} + {ctl:.2f} | {delay:.0f} | {added:.0f}"
            lines.append(f"| {d} | {' | '.join(cells)} | {costs} |")
    lines += [
        "",
        "The paper's Table IV (MNIST, %, its own cost units and delay):",
        "",
        "| defence | clean | FGSM | R+FGSM | DeepFool | cost | delay |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (c, f, r, d, cost_, delay_) in PAPER.items():
        lines.append(f"| {name} | {c} | {f} | {r} | {d} | {cost_} | {delay_} |")
    return lines


def _cell(value: float | None, row: dict, suffix: str) -> str:
    """An accuracy; over the fooled inputs, with how many there were."""
    if value is None:
        return "-"
    fooled = row.get("n_fooled")
    return f"{value:.3f} ({fooled})" if suffix and fooled is not None else f"{value:.3f}"
