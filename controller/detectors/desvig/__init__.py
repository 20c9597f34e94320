"""DeSVig (seed 000) as one package: the detector and the conditional GAN it draws copies with.

- ``detector.py``: ``DesvigDetector`` (fit, calibrate, score; the registered detector);
- ``gan.py``: the CGAN's networks and their training in torch (offline, at ``fit``), cached;
- ``inversion.py``: the trained encoder and generator in numpy (``CGAN``), what scoring runs;
- ``kernel.py``: the same copy, hash and distances compiled (numba) for small batches.
"""

from controller.detectors.desvig.detector import DesvigDetector

__all__ = ["DesvigDetector"]
