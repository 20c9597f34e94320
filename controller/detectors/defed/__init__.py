"""Defed (seed 001): edge-feature-enhanced denoisers, one per Gaussian noise level, whose
disagreement with the model flags adversarial inputs (detector.py)."""

from controller.detectors.defed.detector import DefedDetector

__all__ = ["DefedDetector"]
