"""``openexample-controller check``: will this config serve? (Faucet's check_faucet_config).

Loads the config the way ``serve`` does (file, then range checks), reads the TLS files,
loads every detector artifact and reference model, checks that the detectors of each model
agree with each other and with the reference model (``pipeline.check_compatible``), and
parses the rules as code. Prints a summary; exit code 0 when ``serve`` would start with it,
2 with one line naming the problem when it would not. Nothing is listened on.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TextIO

from controller import config as cfgmod
from controller.config import Config, ConfigError
from openexample import identity

if TYPE_CHECKING:
    from controller.pipeline import FusedScorer


def summary(cfg: Config, scorers: dict[str, FusedScorer]) -> list[str]:
    """What the config sets up, one fact per line."""
    from controller.pipeline import from_config, trained_for

    lines = [f"listen: {', '.join(str(a) for a in cfg.listeners)}"]
    files = cfg.tls_files()
    if files is None:
        lines.append("tls: off (plaintext: loopback and Unix sockets only)")
    else:
        ident = identity.from_pem(files.cert.read_bytes())
        lines.append(f"tls: mTLS as {ident or 'a certificate without an openexample identity'}")
    lines.append(f"metrics: port {cfg.metrics_port}{' (TLS)' if cfg.metrics_tls else ''}")
    lines.append(
        f"budget: {cfg.budget_us} us, fail mode {cfg.fail_mode}, W0 {cfg.max_workload} items"
    )
    for model_id, mcfg in cfg.models.items():
        scorer = scorers.get(model_id)
        if scorer is None:
            lines.append(f"model {model_id}: no detectors (its PKG_INs get UNKNOWN/NO_DETECTOR)")
            continue
        dets = scorer.pipeline.detectors
        want = trained_for(dets)
        shape, classes = (want.input_shape, want.classes) if want else ("not recorded", "?")
        lines.append(
            f"model {model_id}: {len(dets)} detectors, fused fpr {mcfg.fpr}, inputs {shape},"
            f" {classes} classes"
        )
        for key in ("model_digest", "model_format", "data_digest"):
            digests = {str(d.meta.get(key, "")) for d in dets} - {""}
            if len(digests) > 1:
                lines.append(f"  WARNING: the detectors were trained with different {key}s")
            elif digests:
                lines.append(f"  trained with {key.replace('_', ' ')} {digests.pop()}")
        if want is not None:  # an agent with other noise is refused at FEATURES
            lines.append(f"  calibrated for agents with privacy noise {want.privacy}")
        ons = {str(d.meta.get("calibrated_on", {}).get("inputs", "all")) for d in dets}
        if len(ons) > 1:
            lines.append("  WARNING: the detectors were calibrated on different clean inputs")
        elif ons == {"right"}:  # the FPR promise is about correct outputs only
            lines.append(
                f"  calibrated on the clean inputs the model gets right: fpr {mcfg.fpr} bounds"
                " false alarms on correct outputs; the model's own mistakes may be flagged too"
            )
        if want is not None and want.activations:
            read = ", ".join(f"{n} {s}" for n, s in want.activations)
            source = {
                "reference": "computed by the reference copy, never asked of agents",
                "agent": "asked of agents; an agent that does not send them is refused",
                "auto": "asked of agents, else computed by the reference copy"
                if want.computes_activations
                else "asked of agents; the reference copy cannot compute them, so an agent"
                " that does not send them is refused",
            }[mcfg.activations]
            lines.append(f"  reads activations {read}: {source}")
        for name, det, path in zip(scorer.metric_names, dets, mcfg.detectors, strict=True):
            path = from_config(cfg, path)
            ref = " + reference model" if det.model is not None else ""
            lines.append(
                f"  {name}: threshold {det.threshold:.6g} at fpr {det.fpr}, trained on"
                f" {det.meta.get('dataset', '?')}{ref} ({path})"
            )
    lines.append(f"rules as code: {len(cfg.rules)}")
    return lines


def run(path: str, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Check the config file at ``path``; 0 = it would serve, 2 = it would not.
    ``out`` / ``err``: where the summary and the refusal go (stdout / stderr)."""
    out, err = out or sys.stdout, err or sys.stderr
    from controller.pipeline import load_scorers  # loads torch: only when asked

    try:
        cfg = cfgmod.validate(cfgmod.load(path))
        cfg.tls_files()
        scorers = load_scorers(cfg)
        lines = summary(cfg, scorers)  # type: ignore[arg-type]
    except ConfigError as exc:
        msg = str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}"
        print(f"openexample-controller check: {msg}", file=err)
        return 2
    for line in lines:
        print(line, file=out)
    print(f"{path}: OK", file=out)
    return 0
