"""OpenExample agents: put an existing model behind an OpenExample controller (data plane).

from agents import attach
guard = attach(model, controller="127.0.0.1:6653", model_id="mnist-cnn",
               input_shape=(1, 28, 28))
res = guard(x)          # res.output, .label, .verdict, .decided_by, .released, .latency_s
res = await guard.acall(x)
guard.close()
"""

from agents.core import AgentCore
from agents.guard import Guard, attach
from agents.models import ModelAdapter, wrap_model
from agents.privacy import PrivacyNoise
from agents.results import (
    ADVERSARIAL,
    BENIGN,
    CONTROLLER,
    DISCONNECTED,
    RT,
    RULE,
    TIMEOUT,
    UNKNOWN,
    ModelInfo,
    Result,
)

__all__ = [
    "ADVERSARIAL",
    "BENIGN",
    "CONTROLLER",
    "DISCONNECTED",
    "RT",
    "RULE",
    "TIMEOUT",
    "UNKNOWN",
    "AgentCore",
    "Guard",
    "ModelAdapter",
    "ModelInfo",
    "PrivacyNoise",
    "Result",
    "attach",
    "wrap_model",
]
