"""Real processes for the integration tests (shared with the bench)."""

from bench.procs import ROOT, ControllerProcess

__all__ = ["ROOT", "ControllerProcess"]
