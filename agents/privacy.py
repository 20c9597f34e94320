"""Local differential-privacy noise on what the agent sends (DeSVig Table II, R_Noise).

The mechanism lives in :mod:`openexample.privacy`, shared with the controller (which
checks what an agent declares against what its detectors were calibrated for) and with
training (which calibrates on inputs noised the same way). The agent noises the inputs
(and, by the ``logits`` mode, the logits) of each PKG_IN in
:func:`agents.outbox.build_pkg_in`; the fingerprint for RT/FT is taken on the raw input
before noise and stays on the agent.
"""

from __future__ import annotations

from openexample.privacy import NO_NOISE, SPEC_HELP, PrivacyNoise

__all__ = ["NO_NOISE", "SPEC_HELP", "PrivacyNoise"]
