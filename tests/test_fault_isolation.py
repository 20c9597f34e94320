"""Fault isolation in scoring: one agent's job never fails or changes another's verdicts.

``score_jobs`` (controller/pipeline.py) batches the jobs of one model; a job without
logits, a job of another shape, or a job a detector raises on must leave the other jobs
of the batch with the verdicts they get alone.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from controller import pipeline
from controller.config import Config, ModelConfig
from controller.core import InspectJob
from controller.metrics import ControllerMetrics
from controller.pipeline import FusedScorer, load_scorers, score_jobs
from controller.reference_model import model_fn
from openexample.v1 import openexample_pb2 as pb
from openexample.validate import DecodedPkgIn

MODEL = "mnist-cnn"
POISON = 666.0  # the fake scorer raises on any input holding this value
LOGGER = "openexample.controller"


def job(agent, xid, inputs, logits=None, labels=None):
    n = len(inputs)
    labels = np.zeros(n, np.int64) if labels is None else labels
    items = [
        pb.PkgInItem(label=int(lab), confidence=0.9, reason=pb.PKG_IN_REASON_TABLE_MISS)
        for lab in labels
    ]
    return InspectJob(1, xid, agent, DecodedPkgIn(MODEL, inputs, logits, items, {}), 0.0)


class FakeScorer:
    """Score = sum of each input's values; raises ValueError on POISON. Records calls and
    reports 1 s of "fake" detector time per call, also when it raises (like a detector
    that finished before the next one raised)."""

    def __init__(self, max_items=None):
        self.calls = []
        self.max_items = max_items

    def score(self, inputs, logits, labels, metrics=None, detector_s=None):
        self.calls.append(len(labels))
        if detector_s is not None:
            detector_s.append(("fake", 1.0))
        if (inputs == POISON).any():
            raise ValueError("poisoned input")
        if self.max_items is not None and len(labels) > self.max_items:
            raise MemoryError("batch too large")
        sums = inputs.reshape(len(inputs), -1).sum(axis=1)
        return [
            pb.PkgOutItem(verdict=pb.VERDICT_BENIGN, action=pb.VERDICT_ACTION_RELEASE, score=s)
            for s in sums.tolist()
        ]


def images(n, fill, shape=(1, 4, 4)):
    x = np.zeros((n, *shape), np.float32)
    x[:, 0, 0, 0] = fill + np.arange(n)
    return x


@pytest.fixture(autouse=True)
def fresh_tracebacks(monkeypatch):
    """Each test starts with no error's traceback logged yet."""
    monkeypatch.setattr(pipeline, "_traced", set())


def tracebacks(caplog):
    return [r for r in caplog.records if r.exc_info]


# --- a detector failure fails only the job that caused it ---


def test_a_poisoned_job_fails_alone(caplog):
    good_a = job("agent-a", 11, images(3, 1.0))
    bad = images(4, 10.0)
    bad[2, 0, 1, 1] = POISON
    poisoned = job("agent-b", 21, bad)
    good_b = job("agent-a", 12, images(2, 100.0))
    scorer = FakeScorer()
    detector_s = []
    caplog.set_level(logging.INFO, LOGGER)
    out = score_jobs(scorer, [good_a, poisoned, good_b], detector_s=detector_s)

    assert [len(items) for items in out] == [3, 4, 2]
    for j, items in zip((good_a, good_b), (out[0], out[2]), strict=True):
        alone = score_jobs(FakeScorer(), [j])[0]
        assert items == alone
        assert all(i.verdict == pb.VERDICT_BENIGN for i in items)
    assert [i.score for i in out[2]] == [100.0, 101.0]  # not shifted by the failed job
    assert all(
        i.verdict == pb.VERDICT_UNKNOWN
        and i.unknown_reason == pb.UNKNOWN_REASON_DETECTOR_FAILED
        and i.action == pb.VERDICT_ACTION_RELEASE
        for i in out[1]
    )
    # the batch once, then each job alone
    assert scorer.calls == [9, 3, 4, 2]
    # detector seconds: one entry per detector, summed over the four calls
    assert detector_s == [("fake", 4.0)]
    # one WARNING naming the failing job, with the one traceback
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "agent-b" in warnings[0].getMessage() and "xid 21" in warnings[0].getMessage()
    assert "agent-a" not in warnings[0].getMessage()
    assert tracebacks(caplog) == warnings


def test_the_same_error_twice_logs_one_traceback(caplog):
    jobs = []
    for k, agent in enumerate(("agent-a", "agent-b", "agent-b")):
        x = images(2, 10.0 * k)
        if k:
            x[0, 0, 2, 2] = POISON
        jobs.append(job(agent, 30 + k, x))
    caplog.set_level(logging.INFO, LOGGER)
    out = score_jobs(FakeScorer(), jobs)
    assert [i.verdict for i in out[0]] == [pb.VERDICT_BENIGN] * 2
    assert all(i.unknown_reason == pb.UNKNOWN_REASON_DETECTOR_FAILED for i in out[1] + out[2])
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2
    assert "xid 31" in warnings[0] and "xid 32" in warnings[1]
    assert len(tracebacks(caplog)) == 1
    assert caplog.text.count("Traceback") == 1


def test_a_batch_that_fails_only_together_gets_every_verdict(caplog):
    jobs = [job("agent-a", 1, images(3, 0.0)), job("agent-b", 2, images(3, 50.0))]
    caplog.set_level(logging.INFO, LOGGER)
    out = score_jobs(FakeScorer(max_items=4), jobs)
    assert [i.score for i in out[0]] == [0.0, 1.0, 2.0]
    assert [i.score for i in out[1]] == [50.0, 51.0, 52.0]
    assert not tracebacks(caplog)
    assert "MemoryError" in caplog.text  # the batch's failure is one INFO line


def test_jobs_of_different_shapes_are_not_concatenated():
    # Each agent declares its own input shape for a model id: concatenating these
    # raised before scoring and failed every job of the batch.
    small = job("agent-a", 1, images(2, 0.0))
    large = job("agent-b", 2, images(2, 10.0, shape=(1, 5, 5)))
    scorer = FakeScorer()
    out = score_jobs(scorer, [small, large, job("agent-a", 3, images(1, 7.0))])
    assert [[i.score for i in items] for items in out] == [[0.0, 1.0], [10.0, 11.0], [7.0]]
    assert sorted(scorer.calls) == [2, 3]


def test_a_wrong_item_count_fails_only_that_call():
    class Short(FakeScorer):
        def score(self, inputs, logits, labels, metrics=None, detector_s=None):
            items = super().score(inputs, logits, labels, metrics, detector_s)
            return items[:-1] if (inputs == 13.0).any() else items

    out = score_jobs(Short(), [job("agent-a", 1, images(2, 0.0)), job("b", 2, images(1, 13.0))])
    assert [i.verdict for i in out[0]] == [pb.VERDICT_BENIGN] * 2
    assert out[1][0].unknown_reason == pb.UNKNOWN_REASON_DETECTOR_FAILED


# --- a job without logits, with the real detectors ---


@pytest.fixture(scope="module")
def data(example_model, mnist):
    x = mnist.test.x[:20]
    logits = np.asarray(model_fn(example_model)(x), np.float32)
    return x, logits, logits.argmax(1).astype(np.int64)


def scorer_for(artifacts, **model_cfg):
    cfg = Config(models={MODEL: ModelConfig(detectors=tuple(map(str, artifacts)), **model_cfg)})
    scorer = load_scorers(cfg)[MODEL]
    assert isinstance(scorer, FusedScorer)
    return scorer


def three_jobs(data):
    x, logits, labels = data
    with_a = job("agent-a", 1, x[:8], logits[:8], labels[:8])
    without = job("agent-b", 2, x[8:12], None, labels[8:12])
    with_c = job("agent-a", 3, x[12:], logits[12:], labels[12:])
    return with_a, without, with_c


def test_a_job_without_logits_leaves_the_others_intact(artifacts, data, caplog):
    scorer = scorer_for(artifacts)
    assert [d.name for d in scorer.pipeline.detectors] == ["desvig", "margin"]
    with_a, without, with_c = three_jobs(data)
    caplog.set_level(logging.DEBUG, LOGGER)
    detector_s = []
    registry = CollectorRegistry()
    metrics = ControllerMetrics(registry, 0.01, 4096, models=[MODEL])
    out = score_jobs(scorer, [with_a, without, with_c], metrics, detector_s)

    # the jobs with logits: what each gets alone, every detector in the evidence
    assert out[0] == score_jobs(scorer, [with_a])[0]
    assert out[2] == score_jobs(scorer, [with_c])[0]
    for items in (out[0], out[2]):
        assert all(i.verdict != pb.VERDICT_UNKNOWN for i in items)
        assert all([e.detector for e in i.evidence] == ["desvig", "margin"] for i in items)
    # the job without: decided by the detectors that can score it (no reference model:
    # margin is left out), with desvig's own scores and threshold
    assert len(out[1]) == 4
    x, logits, labels = data
    (with_logits,) = score_jobs(scorer, [job("x", 9, x[8:12], logits[8:12], labels[8:12])])
    for item, ref in zip(out[1], with_logits, strict=True):
        assert item.verdict in (pb.VERDICT_BENIGN, pb.VERDICT_ADVERSARIAL)
        assert [e.detector for e in item.evidence] == ["desvig"]
        # desvig's own score, threshold and flag (its corrected label may differ: it
        # labels what margin flagged in the reference, ``Detector.relabel``)
        got, want = item.evidence[0], ref.evidence[0]
        assert (got.score, got.threshold, got.flagged) == (want.score, want.threshold, want.flagged)
        assert (item.verdict == pb.VERDICT_ADVERSARIAL) == item.evidence[0].flagged
    # no traceback, no batch that failed and was retried; one warning saying what was
    # left out
    assert not tracebacks(caplog) and "Traceback" not in caplog.text
    assert "failed" not in caplog.text
    assert "margin left out" in caplog.text
    # timings: one entry per detector, summed over both batches; metrics: one latency
    # observation per detector and batch it ran on (margin: the batch with logits only)
    assert [name for name, _ in detector_s] == ["desvig", "margin"]

    def batches(detector):
        return registry.get_sample_value(
            "openexample_controller_detector_latency_seconds_count",
            {"model": MODEL, "detector": detector},
        )

    assert [batches(d) for d in ("desvig", "margin", "pipeline")] == [2, 1, 2]


def test_without_logits_the_reference_model_stands_in(artifacts, data, example_model):
    scorer = scorer_for(artifacts, reference_model=str(example_model))
    _, without, _ = three_jobs(data)
    (items,) = score_jobs(scorer, [without])
    x, logits, labels = data
    (with_logits,) = score_jobs(scorer, [job("x", 9, x[8:12], logits[8:12], labels[8:12])])
    for a, b in zip(items, with_logits, strict=True):
        assert [e.detector for e in a.evidence] == ["desvig", "margin"]
        assert a.verdict == b.verdict
        assert a.evidence[1].score == pytest.approx(b.evidence[1].score, abs=1e-5)


def test_without_logits_and_no_detector_that_can_score_them(artifacts, data, caplog):
    margin_only = [p for p in artifacts if p.name == "margin"]
    scorer = scorer_for(margin_only)
    with_a, without, with_c = three_jobs(data)
    caplog.set_level(logging.DEBUG, LOGGER)
    out = score_jobs(scorer, [with_a, without, with_c])
    assert all(i.verdict != pb.VERDICT_UNKNOWN for i in out[0] + out[2])
    assert all(
        i.verdict == pb.VERDICT_UNKNOWN and i.unknown_reason == pb.UNKNOWN_REASON_NO_DETECTOR
        for i in out[1]
    )
    assert not tracebacks(caplog)
