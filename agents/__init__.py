"""OpenExample agents: put an existing model behind an OpenExample controller (data plane).

from agents import attach
guard = attach(model, controller="ctl.example:6653", model_id="mnist-cnn",
               input_shape=(1, 28, 28),   # AgentConfig fields as keywords;
               tls_ca="pki/ca.crt",       # mTLS: the agent id is the certificate's
               tls_cert="pki/agent-plc-1.crt", tls_key="pki/agent-plc-1.key")
               # (or plaintext=True, to a loopback or unix:// controller only), or
guard = attach(model, AgentConfig(...), budget_us=500)   # a config plus overrides
res = guard(x)          # res.output, .label, .verdict, .decided_by, .released, .latency_s,
                        # .stages (where the latency went, when the controller decided)
res = await guard.acall(x)
guard.close()
"""

from agents.config import AgentConfig
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
    Stages,
)
from openexample.errors import ConfigError

__all__ = [
    "ADVERSARIAL",
    "BENIGN",
    "CONTROLLER",
    "DISCONNECTED",
    "RT",
    "RULE",
    "TIMEOUT",
    "UNKNOWN",
    "AgentConfig",
    "AgentCore",
    "ConfigError",
    "Guard",
    "ModelAdapter",
    "ModelInfo",
    "PrivacyNoise",
    "Result",
    "Stages",
    "attach",
    "wrap_model",
]
