"""Mastership in the daemon: the thin shell around :class:`controller.mastership.Election`
(the decisions are there, sans-I/O).

It feeds the election what arrives on the ``role`` and ``rules`` topics and the bus's
state, publishes what it returns (retained), and carries out its outcomes:

- on becoming MASTER of the agent group: ROLE_REQUEST MASTER with the generation to
  every agent of this controller (and to each agent that connects while it is), and its
  desired rules on the ``rules`` topic;
- an agent that answers ROLE_REQUEST_FAILED/STALE steps it down;
- as master, after every change of its desired rules, the rules again (a new revision);
  as a standby, the master's newest rules adopted (controller/core.py ``adopt_rules``);
- the admin API asks :meth:`Roles.refusal` before an operator's rule change.

One INFO line per change of master, one WARNING when this controller steps down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from controller.cluster import ROLE, RULES
from controller.desired import StoredRule
from controller.mastership import MASTER, Election, Outcome, role_name
from controller.steps import Step
from openexample.v1 import cluster_pb2 as cpb
from openexample.v1 import openexample_pb2 as pb

if TYPE_CHECKING:
    from controller.bus import ClusterBus
    from controller.core import ControllerCore

log = logging.getLogger("openexample.controller")
ROLE_REPLY_TIMEOUT_S = 5.0


class Roles:
    """``dispatch`` carries out a core Step; ``expect_reply(sid, xid)`` gives a future
    for an agent's reply (the server's)."""

    def __init__(
        self,
        election: Election,
        bus: ClusterBus,
        core: ControllerCore,
        *,
        dispatch: Callable[[Step], None],
        expect_reply: Callable[[int, int], asyncio.Future[pb.Envelope]],
    ) -> None:
        self.election = election
        self.bus = bus
        self.core = core
        self._dispatch = dispatch
        self._expect_reply = expect_reply
        self._master_seen = ""  # the master last logged
        self._was_connected = False
        self._rules_due = False  # the master's rules changed: publish soon
        self._failed_logged = -60.0
        self._gauge = bus.metrics.role

    # --- what the daemon calls ---

    def refusal(self) -> str:
        """Why an operator's rule change is refused here ("" on the master)."""
        return self.election.refusal()

    def on_bus(self, name: str, data: bytes) -> None:
        """A message on a role or rules topic (the bus's callback)."""
        out = self.election.receive(name, data, time.time())
        if out.refused:
            self.bus.refused(out.reason, "/".join(name.split("/")[3:5]), out.refused)

    def tick(self) -> None:
        """The election's step (the daemon's tick loop calls it every ~0.2 s). Whatever
        goes wrong here is logged (once a minute) and never stops the tick loop."""
        try:
            self._tick()
        except Exception:
            now = time.monotonic()
            if now - self._failed_logged >= 60.0:
                self._failed_logged = now
                log.exception("cluster: mastership step failed (the controller serves on)")

    def _tick(self) -> None:
        connected = self.bus.connected
        now = time.time()
        peers_up = {p.identity for p in self.bus.state.peers_up(now)}
        out = self.election.tick(now, connected=connected, peers_up=peers_up)
        self._carry_out(out)
        if connected and not self._was_connected and self.election.is_master:
            self._rules_due = True  # a broker that restarted lost the retained rules
        self._was_connected = connected
        self._adopt()
        if self._rules_due and self.election.is_master and connected:
            self._publish_rules()

    def rules_changed(self) -> None:
        """This controller's desired rules changed: the master publishes them."""
        if self.election.is_master:
            self._rules_due = True

    def on_ready(self, sids: list[int]) -> None:
        """Agents whose sessions just became ready: the master claims them."""
        if self.election.is_master:
            self._claim(sids)

    # --- the election's outcomes ---

    def _carry_out(self, out: Outcome) -> None:
        e = self.election
        for body in out.publish:
            self.bus.publish_retained(ROLE, self.bus.state.message(time.time(), role=body))
        if out.refused:
            log.warning("cluster: %s", out.refused)
        if out.stepped_down:
            log.warning(
                "cluster: no longer MASTER of agent group %r: %s; operator changes are"
                " refused here now",
                e.group,
                out.stepped_down,
            )
        if out.became_master:
            log.warning(
                "cluster: this controller is now MASTER of agent group %r (generation %d)",
                e.group,
                e.generation,
            )
            self._claim(self.core.sessions_of())
            self._rules_due = True
        if e.master != self._master_seen:
            if e.master and e.master != e.identity:
                log.info(
                    "cluster: %s of agent group %r; its master is %s (generation %d)",
                    role_name(e.role),
                    e.group,
                    e.master,
                    e.generation,
                )
            self._master_seen = e.master
        self._gauge.labels("role").set(e.role)
        self._gauge.labels("generation").set(e.generation)

    def _claim(self, sids: list[int]) -> None:
        """ROLE_REQUEST MASTER with the generation to these agents."""
        gen = self.election.generation
        step = Step()
        for sid in sids:
            s = self.core.sessions.get(sid)
            if s is None or not s.configured:
                continue
            env = s.request(pb.RoleRequest(role=MASTER, generation_id=gen))
            fut = self._expect_reply(sid, env.xid)
            fut.add_done_callback(lambda f, aid=s.agent_id: self._role_reply(f, aid, gen))
            asyncio.get_running_loop().call_later(ROLE_REPLY_TIMEOUT_S, fut.cancel)
            step.send.append((sid, env))
        if step.send:
            self._dispatch(step)

    def _role_reply(self, fut: asyncio.Future, agent_id: str, gen: int) -> None:
        if fut.cancelled():
            return
        env = fut.result()
        if not env.HasField("error"):
            return
        err = env.error
        stale = (
            err.type == pb.ERROR_TYPE_ROLE_REQUEST_FAILED
            and err.code == pb.ROLE_REQUEST_FAILED_CODE_STALE
        )
        if not stale:
            log.warning("cluster: agent %r refused ROLE_REQUEST MASTER: %s", agent_id, err.text)
            return
        if self.election.is_master and self.election.generation == gen:
            self._carry_out(self.election.stale(time.time(), f"agent {agent_id!r}: {err.text}"))

    # --- the master's rules ---

    def _publish_rules(self) -> None:
        offset = time.time() - time.monotonic()
        scopes = [
            cpb.ScopeRules(
                agent_id=scope,
                rules=[
                    cpb.DesiredRule(mod=r.mod, installed_at=r.installed_at + offset) for r in rs
                ],
            )
            for scope, rs in sorted(self.core.durable.operator_tables().items())
        ]
        body = self.election.next_rules(scopes)
        msg = self.bus.state.message(time.time(), rules=body)
        if self.bus.publish_retained(RULES, msg):
            self._rules_due = False

    def _adopt(self) -> None:
        got = self.election.rules_to_adopt()
        if got is None:
            return
        sender, body = got
        offset = time.time() - time.monotonic()
        tables = {
            s.agent_id: [StoredRule(r.mod, r.installed_at - offset) for r in s.rules]
            for s in body.scopes
        }
        step = self.core.adopt_rules(tables, time.monotonic())
        self.election.adopted(body)
        log.log(
            logging.INFO if step.persist else logging.DEBUG,
            "cluster: adopted the rules of master %s (generation %d, revision %d)",
            sender,
            body.generation,
            body.revision,
        )
        self._dispatch(step)
