"""Mastership among the controllers of an agent group, sans-I/O: OpenFlow 1.3 roles
among controllers, elected on the east-west bus.

An **agent group** is the agents of the controllers whose config names the same
``cluster.group`` (default ``"default"``): the agents fail over among those controllers
(AgentConfig.controller lists them). In a group, **one MASTER** takes operator changes
(rules through the admin API); the others are **SLAVE** (standbys: they stand for
election) or **EQUAL** (``cluster.role: equal``: they never stand). All of them serve
verdicts, push RT entries and apply the blocks the cluster replicates; a non-master
refuses an operator's rule change with a reason naming the master.

**The election** (one :class:`Election` per controller; the MQTT shell,
controller/roles.py, feeds it what arrives on the ``role`` and ``rules`` topics with
``now`` and publishes what it returns):

- Each controller publishes its :class:`~openexample.v1.cluster_pb2.Mastership`
  retained on ``openexample/v1/cluster/<identity>/role`` when it changes and every
  ``lease_s / 3``. A peer is **live** while its load (controller/cluster.py) says up (the
  broker publishes its last will when it vanishes; a clean stop says so too) and its
  role was heard within ``lease_s``.
- The master is the live MASTER claim with the highest generation (a tie, two claims
  made at once: the higher priority, then the identity that sorts first). Nobody
  preempts a live master.
- With no live master, once this controller has been on the bus for ``lease_s / 3``
  (the retained claims have arrived), the live candidate with the highest priority
  (then the identity that sorts first) claims it with **generation = max(newest
  generation seen + 1, unix milliseconds)**: higher than any before it, also after the
  broker lost its retained messages. The others follow it when its claim arrives. A
  role or rules message whose generation is more than ``MAX_GENERATION_AHEAD_S`` ahead
  of the receiver's clock is refused (a claim of 2^64-1 would hold it for good).
- The master sends ROLE_REQUEST MASTER with its generation to each of its agents (at
  the election and when one connects). An agent that has seen a newer generation
  refuses it (ROLE_REQUEST_FAILED/STALE): :meth:`Election.stale` steps this controller
  down, and it does not claim again for ``lease_s`` -- unless it is on the bus and no
  newer claim is there (then the agent's word alone is refused: an agent certificate
  could otherwise keep the group masterless).
- A master cut off from the bus steps down ``lease_s`` after it lost the broker: by
  then its last will is out and a standby may hold a newer generation. Until then two
  masters may accept changes (a split brain the generation settles: the older master's
  rules snapshot loses when they meet, and agents refuse it once they saw the newer).

**What the master accepts reaches the others**: the master publishes its desired rules
(:class:`~openexample.v1.cluster_pb2.DesiredRules`, retained, the source-tracing blocks
left out: those replicate as a VigilanceSet) after every change, with its generation
and a revision. The others adopt the newest revision of the master they follow, from
the claim of that generation (:meth:`Election.rules_to_adopt`); no other controller's.

No sockets, clocks or threads: times come in as ``now`` (unix seconds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from controller.cluster import ROLE, RULES, VERSION, topic_identity
from openexample.errors import ProtocolError
from openexample.v1 import cluster_pb2 as cpb
from openexample.v1 import openexample_pb2 as pb
from openexample.validate import check_id

# A generation is unix milliseconds at its claim (or one more than the newest before it):
# one further ahead of this clock than this is refused. Else a peer's claim of 2^64-1
# would hold the mastership for good, and no one could claim after it (newest + 1 is
# past uint64: every role message after it failed to serialise).
MAX_GENERATION_AHEAD_S = 3600.0
MASTER, SLAVE, EQUAL = pb.CONTROLLER_ROLE_MASTER, pb.CONTROLLER_ROLE_SLAVE, pb.CONTROLLER_ROLE_EQUAL
_NAMES = {MASTER: "MASTER", SLAVE: "SLAVE", EQUAL: "EQUAL"}
_BODY = {ROLE: "role", RULES: "rules"}


def role_name(role: int) -> str:
    return _NAMES.get(role, str(role))


@dataclass(frozen=True, slots=True)
class Claim:
    """A peer's last role message, and when it was heard (unix seconds, this clock)."""

    identity: str
    role: int
    generation: int
    priority: int
    master: str
    heard_at: float


@dataclass(slots=True)
class Outcome:
    """What a call changed: ``publish``: role bodies to publish (retained);
    ``became_master``: this controller just claimed the mastership (the shell tells its
    agents, and publishes its rules); ``stepped_down``: why it is no longer master ("":
    it is, or never was); ``refused``: why a bus message was refused ("" accepted) and
    ``reason`` its short name for the metric."""

    publish: list[cpb.Mastership] = field(default_factory=list)
    became_master: bool = False
    stepped_down: str = ""
    refused: str = ""
    reason: str = ""


def _rules_problem(body: cpb.DesiredRules, now: float) -> str:
    """Why a rules snapshot cannot be adopted as it is ("" it can): each scope an agent id
    (empty: the template) once, each install time a finite unix time not ahead of this
    clock by more than ``MAX_GENERATION_AHEAD_S`` (NaN made the adoption raise, and a
    time far ahead would keep a rule past its hard timeout). The rules themselves are
    validated one by one as they are adopted (controller/desired.py)."""
    seen: set[str] = set()
    for scope in body.scopes:
        try:
            check_id(scope.agent_id, "scope agent_id", allow_empty=True)
        except ProtocolError as exc:
            return str(exc)
        if scope.agent_id in seen:
            return f"scope {scope.agent_id!r} twice"
        seen.add(scope.agent_id)
        for r in scope.rules:
            at = r.installed_at
            if not (math.isfinite(at) and at <= now + MAX_GENERATION_AHEAD_S):
                where = f"rule prio={r.mod.priority} of scope {scope.agent_id!r}"
                return f"{where}: installed_at {at!r}"
    return ""


def _rank(c: Claim) -> tuple[int, int, str]:
    """Smaller is better: the highest generation, then priority, then the identity."""
    return (-c.generation, -c.priority, c.identity)


class Election:
    """One controller's side of its group's election.

    ``identity``: ``controller/<name>``; ``stands``: whether it may become master
    (False: EQUAL); ``priority``: its rank among candidates; ``lease_s``: how long a
    peer's role message stays good, and how long a master cut off from the bus keeps
    the mastership; ``members``: the identities that may take part in this group's
    election (cluster.members; empty: any controller on the bus that names the group).
    A role or rules message from any other identity naming the group is refused."""

    def __init__(
        self,
        identity: str,
        group: str,
        *,
        priority: int = 100,
        stands: bool = True,
        lease_s: float = 6.0,
        members: frozenset[str] = frozenset(),
    ) -> None:
        self.identity = identity
        self.group = group
        self.members = members  # the group's controllers (empty: whoever names the group)
        self.priority = priority
        self.stands = stands
        self.lease_s = lease_s
        self.role = SLAVE if stands else EQUAL
        self.generation = 0  # the mastership's generation as known here (MASTER: its claim)
        self.newest = 0  # the newest generation seen in the group
        self.master = ""  # who holds the mastership ("" none known)
        self.claims: dict[str, Claim] = {}
        self._rules: dict[str, cpb.DesiredRules] = {}  # sender -> its last rules snapshot
        self._adopted: tuple[int, int] = (0, 0)  # (generation, revision) adopted
        self._on_bus_since: float | None = None
        self._off_bus_since: float | None = 0.0  # not connected yet
        self._hold_until = 0.0  # no claim before (after a STALE refusal)
        self._sent: cpb.Mastership | None = None
        self._sent_at = -math.inf

    # --- what the operator may do here ---

    @property
    def is_master(self) -> bool:
        return self.role == MASTER

    def refusal(self) -> str:
        """Why an operator change is refused here ("" on the master)."""
        if self.role == MASTER:
            return ""
        me = f"{self.identity} is {role_name(self.role)} in agent group {self.group!r}"
        if self.master:
            return (
                f"{me}: operator changes go to the master, {self.master}"
                f" (generation {self.generation})"
            )
        return f"{me} and no master is known now (election pending, or the bus is down)"

    # --- what arrives ---

    def receive(self, name: str, payload: bytes, now: float) -> Outcome:
        """A message on a ``role`` or ``rules`` topic."""
        where = topic_identity(name)
        if where is None or where[1] not in _BODY:
            return Outcome(refused=f"not a role topic: {name!r}", reason="topic")
        ident, leaf = where
        try:
            msg = cpb.BusMessage.FromString(payload)
        except DecodeError as exc:
            return Outcome(refused=f"undecodable on {name}: {exc}", reason="decode")
        if msg.version != VERSION:
            return Outcome(refused=f"version {msg.version} on {name}", reason="version")
        if msg.sender != ident:
            text = f"sender {msg.sender!r} on the topic of {ident} ({name})"
            return Outcome(refused=text, reason="sender")
        if msg.WhichOneof("body") != _BODY[leaf]:
            return Outcome(refused=f"{msg.WhichOneof('body')} on {name}", reason="body")
        if ident == self.identity:
            return Outcome()  # ours, back from the broker (or our last run's)
        body = msg.rules if leaf == RULES else msg.role
        if body.group != self.group:
            return Outcome()  # another agent group's
        if self.members and ident not in self.members:
            text = (
                f"{ident} is not a member of agent group {self.group!r}"
                f" (cluster.members: {', '.join(sorted(self.members))})"
            )
            return Outcome(refused=text, reason="member")
        if body.generation > (now + MAX_GENERATION_AHEAD_S) * 1000:
            text = (
                f"generation {body.generation} from {ident} is more than"
                f" {MAX_GENERATION_AHEAD_S:g} s ahead of this clock (unix ms)"
            )
            return Outcome(refused=text, reason="generation")
        if leaf == RULES:
            problem = _rules_problem(msg.rules, now)
            if problem:
                return Outcome(refused=f"rules of {ident}: {problem}", reason="entry")
            old = self._rules.get(ident)
            key = (msg.rules.generation, msg.rules.revision)
            if old is None or key > (old.generation, old.revision):
                self._rules[ident] = msg.rules
            return Outcome()
        r = msg.role
        if r.role not in _NAMES:
            return Outcome(refused=f"role {r.role} from {ident}", reason="body")
        self.claims[ident] = Claim(ident, r.role, r.generation, r.priority, r.master, now)
        self.newest = max(self.newest, r.generation)
        return Outcome()

    def stale(self, now: float, detail: str = "") -> Outcome:
        """An agent refused this controller's MASTER claim as stale: a newer generation
        exists that this controller has not heard of. It steps down, and claims again
        no sooner than ``lease_s`` from now.

        An agent's word alone does not unseat a master that is on the bus and has heard
        no newer claim there: every claim is published on the bus, so a newer master
        would be in view, and otherwise any agent certificate could keep the group
        without a master by answering STALE each time (refused, reason
        ``unconfirmed``). Off the bus (or just back on it), the agent is the only
        witness there is, and it is believed."""
        out = Outcome()
        if self.role == MASTER and self._settled(now) and self.newest <= self.generation:
            out.refused = (
                f"an agent says STALE ({detail or 'no detail'}) but no generation newer than"
                f" {self.generation} is on the bus; staying MASTER"
            )
            out.reason = "unconfirmed"
            return out
        if self.role == MASTER:
            self._step_down(out, f"an agent has seen a newer generation ({detail or 'STALE'})")
            self.master = ""
            self._hold_until = now + self.lease_s
        return out

    # --- time ---

    def tick(self, now: float, *, connected: bool, peers_up: set[str]) -> Outcome:
        """The election's step: ``connected``: whether the bus is up; ``peers_up``: the
        peers whose load says up."""
        out = Outcome()
        if not connected:
            self._on_bus_since = None
            if self._off_bus_since is None:
                self._off_bus_since = now
            if self.role == MASTER and now - self._off_bus_since >= self.lease_s:
                self._step_down(out, f"cut off from the bus for {self.lease_s:g} s")
                self.master = ""
            return out
        self._off_bus_since = None
        just_connected = self._on_bus_since is None
        if just_connected:  # (a broker that restarted lost the retained claims)
            self._on_bus_since = now
        live = [
            c
            for c in self.claims.values()
            if c.identity in peers_up and now - c.heard_at <= self.lease_s
        ]
        masters = [c for c in live if c.role == MASTER]
        if self.role == MASTER:
            masters.append(self._me(now))
        if masters:
            best = min(masters, key=_rank)
            if best.identity != self.identity:
                if self.role == MASTER:
                    self._step_down(out, f"{best.identity} holds generation {best.generation}")
                self.master = best.identity
                self.generation = best.generation
        elif self.stands and self._settled(now) and now >= self._hold_until:
            candidates = [c for c in live if c.role != EQUAL] + [self._me(now)]
            best = min(candidates, key=lambda c: (-c.priority, c.identity))
            if best.identity == self.identity:
                self.generation = self.newest = max(self.newest + 1, int(now * 1000))
                self.role = MASTER
                self.master = self.identity
                out.became_master = True
            else:
                self.master = ""  # the better candidate claims it
        else:
            self.master = ""
        body = self.message()
        if just_connected or body != self._sent or now - self._sent_at >= self.lease_s / 3:
            self._sent, self._sent_at = body, now
            out.publish.append(body)
        return out

    def _settled(self, now: float) -> bool:
        return self._on_bus_since is not None and now - self._on_bus_since >= self.lease_s / 3

    def _me(self, now: float) -> Claim:
        return Claim(self.identity, self.role, self.generation, self.priority, self.master, now)

    def _step_down(self, out: Outcome, why: str) -> None:
        self.role = SLAVE if self.stands else EQUAL
        out.stepped_down = why

    def message(self) -> cpb.Mastership:
        """This controller's role message."""
        return cpb.Mastership(
            group=self.group,
            role=self.role,
            generation=self.generation if self.role == MASTER else self.newest,
            priority=self.priority,
            master=self.master,
        )

    # --- the master's rules ---

    def rules_to_adopt(self) -> tuple[str, cpb.DesiredRules] | None:
        """The rules snapshot of the master this controller follows, when it claimed that
        generation and the snapshot is not adopted yet (sender, snapshot); None if there
        is none or this is the master. Only the followed master's: a claimant that is not
        live (or not the master here) never sets the rules, whatever its generation. The
        caller adopts it, then calls :meth:`adopted`."""
        if self.role == MASTER or not self.master:
            return None
        rules = self._rules.get(self.master)
        claim = self.claims.get(self.master)
        if rules is None or claim is None:
            return None
        if claim.role != MASTER or claim.generation != rules.generation:
            return None  # not (or no longer) known as that generation's master
        gen, rev = self._adopted
        if rules.generation == gen and rules.revision <= rev:
            return None  # adopted already (or an older revision, late)
        return self.master, rules

    def adopted(self, rules: cpb.DesiredRules) -> None:
        self._adopted = (rules.generation, rules.revision)

    def next_rules(self, scopes: list[cpb.ScopeRules]) -> cpb.DesiredRules:
        """The master's rules snapshot after a change (a new revision)."""
        assert self.role == MASTER
        gen, rev = self._adopted
        rev = rev + 1 if gen == self.generation else 1
        self._adopted = (self.generation, rev)
        return cpb.DesiredRules(
            group=self.group, generation=self.generation, revision=rev, scopes=scopes
        )
