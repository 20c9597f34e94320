"""From admitted PKG_INs to PKG_OUT items: batch across jobs, score, split back.

A ``Scorer`` is what the core needs per model id: a batch of decoded inferences in,
one ``pb.PkgOutItem`` per item out. ``FusedScorer`` adapts the detector pipeline
(controller/detectors) to it. ``score_jobs`` batches the jobs of one model so that no
job changes or fails another's verdicts (fault isolation: see its docstring).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from controller.config import Config, ConfigError
from controller.core import InspectJob
from controller.correction import CorrectionPolicy
from controller.detectors.base import Batch, Detector
from controller.detectors.fusion import Pipeline, check_shares
from controller.metrics import ControllerMetrics
from controller.reference_model import is_onnx, model_fn
from controller.session import Expected
from openexample.errors import one_line
from openexample.privacy import PrivacyNoise
from openexample.v1 import openexample_pb2 as pb

log = logging.getLogger("openexample.controller")


class Scorer(Protocol):
    def score(
        self,
        inputs: np.ndarray,
        logits: np.ndarray | None,
        labels: np.ndarray,
        metrics: ControllerMetrics | None = None,
        detector_s: list[tuple[str, float]] | None = None,
        *,
        activations: Mapping[str, np.ndarray] | None = None,
    ) -> list[pb.PkgOutItem]: ...


_FAILED = pb.PkgOutItem(
    verdict=pb.VERDICT_UNKNOWN,
    action=pb.VERDICT_ACTION_RELEASE,
    unknown_reason=pb.UNKNOWN_REASON_DETECTOR_FAILED,
)


def score_jobs(
    scorer: Scorer,
    jobs: list[InspectJob],
    metrics: ControllerMetrics | None = None,
    detector_s: list[tuple[str, float]] | None = None,
) -> list[list[pb.PkgOutItem]]:
    """Score jobs of one model, batched where they can be; one list of items per job.

    Fault isolation: one agent's job never decides another's verdict.

    - Each job is checked before it joins a batch (``_check``), and only jobs of the same
      shape are concatenated (``_batch_key``: input dtype and shape, whether logits
      come, with how many classes, and which activations). A job without logits is
      scored in its own batch, so jobs with logits keep every detector (see
      ``FusedScorer.score`` for what a batch without logits gets).
    - When a batch of several jobs raises, each job is scored again alone: those that
      succeed get their verdicts, and only the items of a job that fails alone get
      UNKNOWN/DETECTOR_FAILED. One WARNING per failing job (agent, xid), with the
      traceback the first time an error (type and place) is seen, at DEBUG after that.

    ``detector_s``, when given, gets (detector name, seconds) once per detector that ran
    (PKG_OUT's ``Timings.detectors``): its seconds summed over every scoring call made
    here, i.e. each batch and, after a failure, the failed try (the detectors that
    finished before the raise) and every retry. So the sum stays the time scoring took.
    ``metrics`` sees each successful call once (``FusedScorer.score``): every item that got
    a verdict is observed once, and the detector latency histogram gets one observation
    per call, retries included.
    """
    out: list[list[pb.PkgOutItem]] = [[] for _ in jobs]  # each filled below
    batches: dict[tuple[object, ...], list[int]] = {}
    for i, job in enumerate(jobs):
        problem = _check(job)
        if problem:
            log.warning(
                "model %s: PKG_IN xid %d from agent %s not scored (%s): answered"
                " UNKNOWN/DETECTOR_FAILED",
                job.pkg.model_id,
                job.xid,
                job.agent_id,
                problem,
            )
            out[i] = [_FAILED] * job.size
        else:
            batches.setdefault(_batch_key(job), []).append(i)
    spent: dict[str, float] = {}
    for idx in batches.values():
        batch = [jobs[i] for i in idx]
        if len(batch) > 1:
            try:
                results = _score_together(scorer, batch, metrics, spent)
            except Exception as exc:
                log.info(
                    "model %s: scoring %d jobs together failed (%s: %s); scoring each alone",
                    batch[0].pkg.model_id,
                    len(batch),
                    type(exc).__name__,
                    exc,
                )
            else:
                for i, items in zip(idx, results, strict=True):
                    out[i] = items
                continue
        # alone: outside the handler above, so a failure's traceback is its own
        for i, job in zip(idx, batch, strict=True):
            try:
                (out[i],) = _score_together(scorer, [job], metrics, spent)
            except Exception as exc:
                _log_failure(job, exc)
                out[i] = [_FAILED] * job.size
    if detector_s is not None:
        detector_s.extend(spent.items())
    return out


def _check(job: InspectJob) -> str | None:
    """Why this job cannot join a batch (its tensors disagree with its items), or None.

    ``validate_pkg_in`` already refuses such PKG_INs; this keeps a job built any other
    way from shifting the items of the jobs batched after it."""
    pkg, n = job.pkg, job.size
    if n == 0:
        return "no items"
    if pkg.inputs.ndim == 0 or pkg.inputs.shape[0] != n:
        return f"inputs shape {pkg.inputs.shape} for {n} items"
    if pkg.logits is not None and (pkg.logits.ndim != 2 or pkg.logits.shape[0] != n):
        return f"logits shape {pkg.logits.shape} for {n} items"
    return None


def _batch_key(job: InspectJob) -> tuple[object, ...]:
    """Jobs with equal keys can be concatenated without changing what any of them gets:
    each agent declares its own input dtype and shape, logits may be absent, and
    activations (PKG_IN's, by name, with their dtypes and shapes) may differ."""
    pkg = job.pkg
    classes = None if pkg.logits is None else pkg.logits.shape[1]
    acts = tuple((n, a.dtype.str, a.shape[1:]) for n, a in sorted(pkg.activations.items()))
    return (pkg.inputs.dtype.str, pkg.inputs.shape[1:], pkg.logits is not None, classes, acts)


def _score_together(
    scorer: Scorer,
    jobs: list[InspectJob],
    metrics: ControllerMetrics | None,
    spent: dict[str, float],
) -> list[list[pb.PkgOutItem]]:
    """One scorer call for ``jobs`` (same ``_batch_key``), split back per job; raises
    what the scorer raises, or ValueError on a wrong item count. Adds the detectors'
    seconds to ``spent``, also when it raises."""
    pkgs = [j.pkg for j in jobs]
    if len(pkgs) == 1:
        inputs, logits = pkgs[0].inputs, pkgs[0].logits
    else:
        inputs = np.concatenate([p.inputs for p in pkgs])
        logits = None
        if pkgs[0].logits is not None:  # the same for all: part of the batch key
            logits = np.concatenate([p.logits for p in pkgs if p.logits is not None])
    labels = np.concatenate([p.labels for p in pkgs])
    # the same names, dtypes and shapes for all: part of the batch key
    acts = {n: np.concatenate([p.activations[n] for p in pkgs]) for n in pkgs[0].activations}
    timings: list[tuple[str, float]] = []
    try:
        if acts:  # PKG_IN's activations (Batch.activations) for the detectors that read them
            items = scorer.score(inputs, logits, labels, metrics, timings, activations=acts)
        else:
            items = scorer.score(inputs, logits, labels, metrics, timings)
    finally:
        for name, seconds in timings:
            spent[name] = spent.get(name, 0.0) + seconds
    if len(items) != len(labels):
        raise ValueError(f"the scorer gave {len(items)} items for {len(labels)}")
    out, at = [], 0
    for p in pkgs:
        out.append(items[at : at + len(p.items)])
        at += len(p.items)
    return out


_traced: set[tuple[str, str, int]] = set()  # errors whose traceback was logged


def _log_failure(job: InspectJob, exc: BaseException) -> None:
    """One line per failing job; the traceback once per distinct error (its type and
    the line that raised), at DEBUG after that."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = ("", 0) if tb is None else (tb.tb_frame.f_code.co_filename, tb.tb_lineno)
    key = (type(exc).__qualname__, *where)
    first = key not in _traced
    if first:
        if len(_traced) >= 1024:  # bounded: forget, and show tracebacks again
            _traced.clear()
        _traced.add(key)
    log.warning(
        "model %s: detector pipeline failed on PKG_IN xid %d from agent %s (%d items):"
        " %s: %s; answered UNKNOWN/DETECTOR_FAILED%s",
        job.pkg.model_id,
        job.xid,
        job.agent_id,
        job.size,
        type(exc).__name__,
        exc,
        "" if first else " (traceback logged before; at DEBUG)",
        exc_info=exc if first else None,
    )
    if not first:
        log.debug("traceback of the failure above", exc_info=exc)


class FusedScorer:
    """The detector pipeline of one model as a Scorer (OR of per-detector thresholds)."""

    def __init__(
        self,
        model_id: str,
        pipeline: Pipeline,
        policy: CorrectionPolicy | None = None,
        activations_from: str = "auto",
    ) -> None:
        self.model_id = model_id
        self.pipeline = pipeline
        self.activations_from = activations_from  # ModelConfig.activations
        self.policy = policy or CorrectionPolicy()
        self.names = [d.name for d in pipeline.detectors]
        self.thresholds = [float(d.threshold) for d in pipeline.detectors]  # type: ignore[arg-type]
        self.metric_names = pipeline.names  # distinct (``#2`` on repeats): metrics, timings
        # without logits: (pipeline, evidence names, metric names, thresholds), or None
        # when no detector can score; built on first use (see ``_without_logits``)
        self._no_logits: tuple[Pipeline, list[str], list[str], list[float]] | None = None
        self._no_logits_built = False

    def _without_logits(self) -> tuple[Pipeline, list[str], list[str], list[float]] | None:
        """The detectors that can score a batch without logits.

        The choice for a PKG_IN without logits (the proto allows it): a detector that
        needs logits (``Detector.needs_logits``) computes them from the reference model
        when the controller attached one (``models.<id>.reference_model``, see
        ``load_scorers``); without one it is left out for these items and the others
        decide. That stays honest: every detector keeps its calibrated threshold and
        scale, each was calibrated at fpr x its share (fpr / n when even; the shares sum
        to 1), so by the same union bound an OR of some of them flags clean inputs at most
        at fpr x the sum of their shares <= fpr, and ``fused >= 0``
        still means exactly "a detector that ran flagged it". What is lost is the left-out
        detector's catch (for margin: the minimal attacks at the decision boundary); the
        item's evidence lists only the detectors that ran, and a WARNING names the
        left-out ones once. When no detector can score without logits, the items are
        UNKNOWN/NO_DETECTOR: no configured detector can score this input.
        """
        if not self._no_logits_built:
            self._no_logits_built = True
            dets = self.pipeline.detectors
            keep = [i for i, d in enumerate(dets) if not d.needs_logits or d.model is not None]
            left_out = [self.metric_names[i] for i in range(len(dets)) if i not in keep]
            if len(keep) == len(dets):
                self._no_logits = (self.pipeline, self.names, self.metric_names, self.thresholds)
            elif keep:
                self._no_logits = (
                    Pipeline([dets[i] for i in keep], self.pipeline.fpr),
                    [self.names[i] for i in keep],
                    [self.metric_names[i] for i in keep],
                    [self.thresholds[i] for i in keep],
                )
            if left_out:
                log.warning(
                    "model %s: PKG_IN without logits: %s left out for its items (they need"
                    " logits; set models.%s.reference_model to compute them)%s",
                    self.model_id,
                    ", ".join(left_out),
                    self.model_id,
                    "; answered UNKNOWN/NO_DETECTOR" if not keep else "",
                )
        return self._no_logits

    def score(
        self,
        inputs: np.ndarray,
        logits: np.ndarray | None,
        labels: np.ndarray,
        metrics: ControllerMetrics | None = None,
        detector_s: list[tuple[str, float]] | None = None,
        *,
        activations: Mapping[str, np.ndarray] | None = None,
    ) -> list[pb.PkgOutItem]:
        pipeline, names, metric_names = self.pipeline, self.names, self.metric_names
        batch = Batch(inputs, logits, labels, activations or {})
        thresholds = self.thresholds
        if logits is None:
            view = self._without_logits()
            if view is None:
                return [
                    pb.PkgOutItem(
                        verdict=pb.VERDICT_UNKNOWN,
                        action=pb.VERDICT_ACTION_RELEASE,
                        unknown_reason=pb.UNKNOWN_REASON_NO_DETECTOR,
                    )
                    for _ in range(len(labels))
                ]
            pipeline, names, metric_names, thresholds = view
        if metrics is None and detector_s is None:
            fused = pipeline.evaluate(batch)
        else:
            timings: list[float] = []
            t0 = time.perf_counter()
            try:
                fused = pipeline.evaluate(batch, timings)
            finally:  # also on a raise: the detectors that finished (score_jobs sums)
                if detector_s is not None:
                    detector_s.extend(zip(metric_names, timings, strict=False))
            timings.append(time.perf_counter() - t0)  # the whole pipeline, last
            if metrics is not None:
                metrics.observe_detectors(
                    self.model_id, metric_names, timings, fused.margins, fused.flags
                )
        # Plain lists: indexing numpy scalars per item costs more than the conversion.
        flagged = fused.flagged.tolist()
        score = fused.score.tolist()
        corrected = fused.corrected.tolist()
        per = fused.scores.tolist()
        flags = fused.flags.tolist()
        per_fix = [
            None if s.corrected is None else s.corrected.tolist() for s in fused.per_detector
        ]
        verdicts = (pb.VERDICT_BENIGN, pb.VERDICT_ADVERSARIAL)
        actions = (pb.VERDICT_ACTION_RELEASE, pb.VERDICT_ACTION_DROP)
        policy = self.policy if self.policy.on_adversarial == "correct" else None
        claimed = None if policy is None else np.asarray(labels).tolist()  # only CORRECT asks
        evidence = [
            (name, threshold, per[j], flags[j], per_fix[j])
            for j, (name, threshold) in enumerate(zip(names, thresholds, strict=True))
        ]
        items = []
        for i, f in enumerate(flagged):
            action = actions[f]
            if f and policy is not None:
                fixes = [p if p is None else p[i] for p in per_fix]
                action = policy.action(corrected[i], fixes, claimed[i])
            item = pb.PkgOutItem(
                verdict=verdicts[f],
                action=action,
                score=score[i],
                threshold=0.0,  # the fused score is a margin: >= 0 means flagged
            )
            if corrected[i] >= 0:
                item.corrected_label = corrected[i]
            add = item.evidence.add
            for name, threshold, det_score, det_flag, det_fix in evidence:
                if det_fix is None:
                    add(detector=name, score=det_score[i], threshold=threshold, flagged=det_flag[i])
                else:
                    add(
                        detector=name,
                        score=det_score[i],
                        threshold=threshold,
                        flagged=det_flag[i],
                        corrected_label=det_fix[i],
                    )
            items.append(item)
        return items


def _recorded(det: Detector) -> tuple[tuple[int, ...], list[str]] | None:
    """(input shape, class names) the artifact's manifest records, or None (an artifact
    from before they were recorded)."""
    shape, classes = det.meta.get("input_shape"), det.meta.get("classes")
    if shape is None or classes is None:
        return None
    return tuple(int(d) for d in shape), list(classes)


def trained_for(dets: list[Detector]) -> Expected | None:
    """What a detector set was trained for (``check_compatible`` made its members agree):
    input shape, class count and model digest, from the first artifact that records them;
    the layer activations they read, and whether their reference copies compute them."""
    for det in dets:
        rec = _recorded(det)
        if rec is not None:
            digest = str(det.meta.get("model_digest", ""))
            acts, computes = activations_read(dets)
            return Expected(rec[0], len(rec[1]), digest, _privacy(det), acts, "auto", computes)
    return None


def activations_read(
    dets: list[Detector],
) -> tuple[tuple[tuple[str, tuple[int, ...]], ...], bool]:
    """((layer, one item's shape) the detectors read, in order; whether every detector
    that reads them can compute them from its reference copy). A detector that reads
    activations says which with ``activations_read()`` ({name: shape})."""
    read: dict[str, tuple[int, ...]] = {}
    computes = True
    for det in dets:
        names = getattr(det, "activations_read", None) if det.needs_activations else None
        if names is None:
            continue
        mine = names()
        for name, shape in mine.items():
            read.setdefault(name, tuple(shape))
        computes = computes and _taps(det, list(mine)) == ""
    return tuple(read.items()), computes and bool(read)


def _taps(det: Detector, names: list[str]) -> str:
    """Why ``det``'s reference copy cannot compute ``names`` ("": it can)."""
    if det.model is None:
        return "it has no reference model"
    from controller.activations import taps_for

    try:
        taps_for(det.model, names)
    except ValueError as exc:
        return one_line(exc)
    return ""


def _privacy(det: Detector) -> PrivacyNoise:
    """The privacy noise the artifact was calibrated on (none when not recorded);
    ValueError for a record that does not read."""
    return PrivacyNoise.from_dict(det.meta.get("privacy"))


def _label_only(det: Detector) -> bool:
    """Calibrated for agents that send no logits (privacy ``logits=label``) while it
    reads logits: it computes them with the reference model, as it did in calibration."""
    return det.needs_logits and (det.meta.get("privacy") or {}).get("logits") == "label"


def check_compatible(model_id: str, dets: list[Detector], paths: tuple[str, ...]) -> None:
    """The detectors of one model were trained for the same inputs and classes (their
    manifests' ``input_shape`` and ``classes``), and a reference model attached to them
    gives one logit per class for such an input. Raises ConfigError naming both sides:
    a detector scoring inputs of another shape would give verdicts, not errors."""
    first: tuple[str, object, object] | None = None
    noises = []
    for det, path in zip(dets, paths, strict=True):
        try:
            noises.append((path, _privacy(det)))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"models.{model_id}: {path!r}: bad privacy record: {exc}") from None
        if not noises[-1][1].matches(noises[0][1]):
            raise ConfigError(
                f"models.{model_id}: detector artifacts disagree: {noises[0][0]!r} was"
                f" calibrated for privacy {noises[0][1]}, {path!r} for {noises[-1][1]} (train"
                " them together for this model)"
            )
        rec = _recorded(det)
        if rec is None:
            continue  # an artifact that does not record them: nothing to compare
        shape, classes = rec
        if first is None:
            first = (path, shape, classes)
        elif (shape, classes) != first[1:]:
            raise ConfigError(
                f"models.{model_id}: detector artifacts disagree: {first[0]!r} was trained for"
                f" inputs {first[1]} and {len(first[2])} classes, {path!r} for {shape} and"
                f" {len(classes)} classes (train them together for this model)"
            )
        if det.model is not None:
            try:
                logits = np.asarray(det.model(np.zeros((1, *shape), np.float32)))
            except Exception as exc:  # the model's own error, in one line
                raise ConfigError(
                    f"models.{model_id}: the reference model of {path!r} refuses an input"
                    f" of shape {shape}: {type(exc).__name__}: {one_line(exc)}"
                ) from None
            if logits.shape != (1, len(classes)):
                raise ConfigError(
                    f"models.{model_id}: the reference model of {path!r} gives logits of"
                    f" shape {logits.shape[1:]} for {len(classes)} classes"
                )


def expectations(scorers: Mapping[str, Scorer]) -> dict[str, Expected]:
    """Per model id, the input shape and class count its detectors were trained for (as
    their manifests say; ``check_compatible`` made them agree): what agents must declare."""
    out = {}
    for model_id, scorer in scorers.items():
        pipeline = getattr(scorer, "pipeline", None)
        want = None if pipeline is None else trained_for(pipeline.detectors)
        if want is not None:
            source = getattr(scorer, "activations_from", "auto")
            out[model_id] = dataclasses.replace(want, activations_from=source)
    return out


def from_config(cfg: Config, path: str) -> str:
    """A path from the config file, relative to the file's folder (as the TLS paths)."""
    if cfg.base_dir and not Path(path).expanduser().is_absolute():
        return str(Path(cfg.base_dir) / path)
    return str(Path(path).expanduser())


def _recorded_shares(dets: Sequence[Detector]) -> tuple[float, ...] | None:
    """The FPR shares the artifacts record (``fpr_share``, written by ``Pipeline.calibrate``)
    when every one records one and they sum to 1 (a set trained together); else None: even.
    Serving never recalibrates: the thresholds are the artifacts' own."""
    recorded = [d.meta.get("fpr_share") for d in dets]
    if any(not isinstance(r, (int, float)) or r <= 0 for r in recorded):
        return None
    try:
        return check_shares([d.name for d in dets], recorded)
    except ValueError:
        return None


def load_scorers(cfg: Config) -> dict[str, Scorer]:
    """One FusedScorer per configured model id, from artifact folders (relative paths:
    from the config file's folder).

    Raises ConfigError naming the model and path when an artifact cannot be used.
    """
    scorers: dict[str, Scorer] = {}
    for model_id, mcfg in cfg.models.items():
        if not mcfg.detectors:
            continue
        dets = []
        for i, path in enumerate(mcfg.detectors):
            where = f"models.{model_id}.detectors[{i}]"
            path = from_config(cfg, path)
            try:
                det = Detector.load(Path(path))
            except (OSError, ValueError, KeyError) as exc:
                raise ConfigError(
                    f"{where}: cannot load detector artifact {path!r}: {exc}"
                ) from None
            if det.threshold is None:
                raise ConfigError(f"{where}: artifact {path!r} is not calibrated")
            # the config's reference model, else (for detectors that cannot score without
            # one) the model file the artifact was trained with, recorded in its manifest
            ref = from_config(cfg, mcfg.reference_model) if mcfg.reference_model else ""
            if not ref and (det.needs_model or _label_only(det)):
                ref = det.meta.get("model")
                if not ref:
                    raise ConfigError(
                        f"{where}: {det.name} needs models.{model_id}.reference_model"
                    )
            if ref and is_onnx(ref) and det.scores_through_model:
                raise ConfigError(
                    f"{where}: {det.name} scores through the model's torch module, which the"
                    f" ONNX reference model {ref!r} has not: set models.{model_id}.reference_model"
                    " to a TorchScript copy (agents may still run the ONNX file)"
                )
            if det.model is None and ref:
                try:
                    det.model = model_fn(ref)
                except (OSError, RuntimeError, ValueError) as exc:
                    raise ConfigError(f"{where}: cannot load model {ref!r}: {exc}") from None
            dets.append(det)
        check_compatible(model_id, dets, mcfg.detectors)
        shares = _recorded_shares(dets)  # the split the set was trained with (or even)
        for d, share in zip(dets, shares or [1.0 / len(dets)] * len(dets), strict=True):
            want = mcfg.fpr * share
            if d.fpr is not None and abs(d.fpr - want) > 1e-9:
                log.warning(
                    "model %s: detector %s was calibrated at fpr %.4g, the fused target wants"
                    " %.4g for it: retrain them together (openexample-controller train"
                    " %s)",
                    model_id,
                    d.name,
                    d.fpr,
                    want,
                    ",".join(x.name for x in dets),
                )
        policy = CorrectionPolicy(mcfg.on_adversarial, mcfg.correct_min_agree)
        policy.check(f"models.{model_id}", [d.name for d in dets if d.can_purify])
        for d in dets:
            names = getattr(d, "activations_read", None) if d.needs_activations else None
            why = _taps(d, list(names())) if names is not None else ""
            if why and mcfg.activations == "reference":
                raise ConfigError(
                    f"models.{model_id}.activations: reference, but {d.name}'s activations"
                    f" cannot be computed here: {why}"
                )
            if why:
                log.warning(
                    "models.%s: %s's layer activations cannot be computed here (%s): agents"
                    " that do not send them are refused (HELLO_FAILED)",
                    model_id,
                    d.name,
                    why,
                )
        pipeline = Pipeline(dets, mcfg.fpr, shares)
        scorers[model_id] = FusedScorer(model_id, pipeline, policy, mcfg.activations)
    return scorers
