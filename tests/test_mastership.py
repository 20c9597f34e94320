"""Mastership among the controllers of an agent group (controller/mastership.py): the
election as plain code with ``now``, the master's rules adopted by the others
(controller/desired.py, controller/core.py); real processes are in
tests/test_mastership_failover.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.cluster import ROLE, RULES, ClusterState, topic
from controller.config import Config
from controller.core import ControllerCore
from controller.desired import COOKIE_BLOCK, COOKIE_KIND_MASK, TEMPLATE, StoredRule
from controller.mastership import EQUAL, MASTER, SLAVE, Election
from openexample import rules
from openexample.v1 import cluster_pb2 as cpb
from openexample.v1 import openexample_pb2 as pb

A, B, C = "controller/a", "controller/b", "controller/c"
T0 = 1_800_000_000.0  # unix seconds
LEASE = 3.0


def _wire(sender: str, now: float, **body) -> tuple[str, bytes]:
    leaf = ROLE if "role" in body else RULES
    msg = ClusterState(sender, 1).message(now, **body)
    return topic(sender, leaf), msg.SerializeToString()


class Group:
    """Elections that hear each other's role messages (as the broker relays them)."""

    def __init__(self, **members: Election) -> None:
        self.members = members
        self.up = set(members)
        self.retained: dict[str, cpb.Mastership] = {}

    def join(self, e: Election, now: float) -> None:
        """``e`` (re)connects: the broker hands it every retained role message."""
        self.members[e.identity] = e
        self.up.add(e.identity)
        for ident, body in self.retained.items():
            if ident != e.identity:
                e.receive(*_wire(ident, now, role=body), now)

    def step(self, now: float) -> dict[str, object]:
        outs = {}
        for ident, e in self.members.items():
            if ident not in self.up:
                continue
            out = e.tick(now, connected=True, peers_up=self.up - {ident})
            outs[ident] = out
            for body in out.publish:
                self.retained[ident] = body
                for other, o in self.members.items():
                    if other != ident and other in self.up:
                        assert not o.receive(*_wire(ident, now, role=body), now).refused
        return outs

    def run(self, start: float, seconds: float, dt: float = 0.1) -> float:
        now = start
        while now < start + seconds:
            self.step(now)
            now += dt
        return now


def _pair() -> tuple[Election, Election, Group]:
    a = Election(A, "line", priority=200, lease_s=LEASE)
    b = Election(B, "line", priority=100, lease_s=LEASE)
    return a, b, Group(**{A: a, B: b})


def test_the_live_candidate_with_the_highest_priority_becomes_master_and_the_other_follows():
    a, b, g = _pair()
    outs = g.step(T0)
    assert not any(o.became_master for o in outs.values())  # retained claims may be on the way
    g.run(T0, LEASE / 3 + 0.2)
    assert (a.role, b.role) == (MASTER, SLAVE)
    assert a.generation == b.generation >= int(T0 * 1000)
    assert (a.master, b.master) == (A, A)
    assert a.refusal() == ""
    assert b.refusal() == (
        f"controller/b is SLAVE in agent group 'line': operator changes go to the master,"
        f" controller/a (generation {a.generation})"
    )


def test_the_master_dies_and_the_standby_takes_over_with_a_higher_generation():
    a, b, g = _pair()
    now = g.run(T0, 2.0)
    first = a.generation
    g.up.discard(A)  # its last will: b's load table says a is down
    out = g.step(now)[B]
    assert out.became_master and b.role == MASTER and b.generation > first
    # a comes back (a new run): it starts as a standby and follows b (no preemption)
    a2 = Election(A, "line", priority=200, lease_s=LEASE)
    g.join(a2, now)
    g.run(now, 2.0)
    assert (a2.role, a2.master, b.role) == (SLAVE, B, MASTER)
    assert a2.generation == b.generation


def test_claims_made_at_once_are_settled_by_generation_then_priority():
    a, b, g = _pair()
    c = Election(C, "line", priority=300, lease_s=LEASE)
    # a and c were each alone (cut off from one another) and claimed
    for e in (a, c):
        e.tick(T0, connected=True, peers_up=set())
        assert e.tick(T0 + 2, connected=True, peers_up=set()).became_master
    assert a.generation == c.generation  # the same millisecond
    g.join(c, T0 + 3)
    said = [g.step(T0 + 3 + t * 0.1)[A].stepped_down for t in range(3)]
    assert sorted(said) == ["", "", f"controller/c holds generation {c.generation}"]  # once
    # the higher priority keeps it; a steps down, and nobody took a new generation
    assert (c.role, a.role, b.role) == (MASTER, SLAVE, SLAVE)
    assert a.master == b.master == C
    newer = Election(B, "line", priority=1, lease_s=LEASE)
    newer.generation = c.generation + 5
    newer.role = MASTER  # a claim with a higher generation wins whatever the priority
    c.receive(*_wire(B, T0 + 4, role=newer.message()), T0 + 4)
    out = c.tick(T0 + 4, connected=True, peers_up={A, B})
    assert out.stepped_down == f"controller/b holds generation {newer.generation}"
    assert (c.role, c.master, c.generation) == (SLAVE, B, newer.generation)


def test_equal_never_stands_and_a_cut_off_master_steps_down_after_its_lease():
    a = Election(A, "line", lease_s=LEASE)
    e = Election(B, "line", stands=False, lease_s=LEASE)
    for t in (0, 2, 4):
        assert not e.tick(T0 + t, connected=True, peers_up=set()).became_master
        a.tick(T0 + t, connected=True, peers_up=set())
    assert e.role == EQUAL and "EQUAL" in e.refusal() and "no master is known" in e.refusal()
    assert a.role == MASTER
    assert not a.tick(T0 + 5, connected=False, peers_up=set()).stepped_down
    out = a.tick(T0 + 5 + LEASE, connected=False, peers_up=set())
    assert out.stepped_down == f"cut off from the bus for {LEASE:g} s" and a.role == SLAVE


def test_a_master_back_on_the_bus_says_so_at_once():
    """A broker that restarted lost the retained claims: the master's goes out on
    reconnect, before a standby there has settled (lease / 3) and would claim."""
    a = Election(A, "line", lease_s=LEASE)
    a.tick(T0, connected=True, peers_up=set())
    a.tick(T0 + 2, connected=True, peers_up=set())
    assert a.is_master and not a.tick(T0 + 2.1, connected=True, peers_up=set()).publish
    a.tick(T0 + 2.2, connected=False, peers_up=set())
    out = a.tick(T0 + 2.3, connected=True, peers_up=set())
    assert [(b.role, b.generation) for b in out.publish] == [(MASTER, a.generation)]


def test_a_stale_master_steps_down_and_waits_a_lease_before_claiming_again():
    a = Election(A, "line", lease_s=LEASE)
    a.tick(T0, connected=True, peers_up=set())
    a.tick(T0 + 2, connected=True, peers_up=set())
    gen = a.generation
    # on the bus with no newer claim there: an agent's word alone does not unseat it
    out = a.stale(T0 + 2, "generation 5 older than 9")
    assert a.role == MASTER and out.reason == "unconfirmed" and "staying MASTER" in out.refused
    a.tick(T0 + 2.1, connected=False, peers_up=set())  # off the bus: the agent is the witness
    out = a.stale(T0 + 2.2, "generation 5 older than 9")
    assert a.role == SLAVE and "newer generation (generation 5 older than 9)" in out.stepped_down
    assert not a.tick(T0 + 4, connected=True, peers_up=set()).became_master
    assert a.tick(T0 + 2.2 + LEASE, connected=True, peers_up=set()).became_master
    assert a.generation > gen
    # a newer claim heard on the bus, not yet acted on: the agent's word is believed
    newer = cpb.Mastership(group="line", role=SLAVE, generation=a.generation + 5)
    a.receive(*_wire(B, T0 + 6, role=newer), T0 + 6)
    assert a.stale(T0 + 6, "older").stepped_down and a.role == SLAVE


def test_forged_and_foreign_role_messages_change_nothing():
    b = Election(B, "line", lease_s=LEASE)
    claim = cpb.Mastership(group="line", role=MASTER, generation=9, priority=1, master=A)
    name, data = _wire(A, T0, role=claim)
    got = b.receive(topic(C, ROLE), data, T0)  # a's message on c's topic
    assert got.reason == "sender" and "'controller/a' on the topic of controller/c" in got.refused
    assert b.receive(topic(A, ROLE), b"\xff\xff", T0).reason == "decode"
    assert b.receive(topic(A, ROLE), _wire(A, T0, rules=cpb.DesiredRules())[1], T0).reason == (
        "body"
    )
    other = cpb.Mastership(group="other", role=MASTER, generation=99)
    assert not b.receive(*_wire(A, T0, role=other), T0).refused  # another group's
    assert not b.claims and b.newest == 0
    assert not b.receive(name, data, T0).refused and b.claims[A].generation == 9


def _rules(gen: int, rev: int, priority: int) -> cpb.DesiredRules:
    mod = rules.vigilance_mod(
        rules.ADD, priority=priority, match=pb.Match(source_id="plc-9"), actions=[rules.drop()]
    )
    scope = cpb.ScopeRules(agent_id="", rules=[cpb.DesiredRule(mod=mod, installed_at=T0)])
    return cpb.DesiredRules(group="line", generation=gen, revision=rev, scopes=[scope])


def test_the_newest_rules_of_the_generations_master_are_adopted_and_no_one_elses():
    b = Election(B, "line", lease_s=LEASE)
    claim = cpb.Mastership(group="line", role=MASTER, generation=7, priority=1, master=A)
    b.receive(*_wire(C, T0, rules=_rules(7, 3, 10)), T0)  # c never claimed generation 7
    assert b.rules_to_adopt() is None
    b.receive(*_wire(A, T0, rules=_rules(7, 1, 20)), T0)
    b.receive(*_wire(A, T0, role=claim), T0)
    b.tick(T0, connected=True, peers_up={A, C})  # b follows a
    sender, got = b.rules_to_adopt()
    assert (sender, got.revision) == (A, 1)
    b.adopted(got)
    assert b.rules_to_adopt() is None
    b.receive(*_wire(A, T0, rules=_rules(7, 2, 30)), T0)
    b.receive(*_wire(A, T0, rules=_rules(7, 1, 20)), T0)  # an older revision, late
    assert b.rules_to_adopt()[1].revision == 2


def _core() -> ControllerCore:
    return ControllerCore(Config(journal=":memory:"), detected_models={"m"}, now=0.0)


def test_a_standby_adopts_the_masters_rules_keeps_its_blocks_and_resyncs_its_agents():
    from tests.test_controller_core import connect

    master, standby = _core(), _core()
    sid, _ = connect(standby, "a1")
    standby.apply_remote(1.0, blocks=[(("a1", "evil"), None)])
    drop = rules.vigilance_mod(
        rules.ADD, priority=300, match=pb.Match(source_id="plc-9"), actions=[rules.drop()]
    )
    master.mod_rules(drop, 1.0)
    tables = master.durable.operator_tables()
    assert set(tables) == {TEMPLATE}
    step = standby.adopt_rules(tables, 2.0)
    assert step.persist == {TEMPLATE, "a1"} and step.notes
    sent = [env for s, env in step.send if s == sid]
    kinds = [env.WhichOneof("body") for env in sent]
    assert kinds[0] == "vigilance_mod" and sent[0].vigilance_mod.command == rules.DELETE
    assert kinds[-1] == "barrier_request"
    adds = [env.vigilance_mod for env in sent[1:-1]]
    assert {(m.priority, m.match.source_id) for m in adds} >= {(300, "plc-9"), (0xFF00, "evil")}
    cookies = {m.cookie & COOKIE_KIND_MASK for m in adds}
    assert COOKIE_BLOCK in cookies  # the block this standby holds stays
    # the same rules again: nothing changes, nothing is sent
    again = standby.adopt_rules(tables, 3.0)
    assert not again.send and not again.persist
    # a rule the master deleted goes here too
    master.mod_rules(rules.vigilance_mod(rules.DELETE), 4.0)
    step = standby.adopt_rules(master.durable.operator_tables(), 4.0)
    left = standby.durable.desired("a1")
    assert [r.mod.match.source_id for r in left] == ["evil"]
    assert isinstance(left[0], StoredRule)


def test_layout_knows_the_mastership_module_is_sans_io():
    from tests.test_layout import SANS_IO

    assert Path(__file__).resolve().parent.parent / "controller" / "mastership.py" in SANS_IO


def test_an_agents_stale_refusal_steps_the_master_down(caplog):
    """The shell (controller/roles.py): ROLE_REQUEST MASTER goes to the agents, and an
    agent that has seen a newer generation answers ROLE_REQUEST_FAILED/STALE."""
    import asyncio

    from prometheus_client import CollectorRegistry

    from controller.metrics import ClusterMetrics
    from controller.roles import Roles
    from openexample.errors import ProtocolError
    from tests.test_controller_core import connect

    core = _core()
    sid, _ = connect(core, "a1")
    sent: list = []

    class Bus:
        connected = True
        state = ClusterState(A, 1)
        metrics = ClusterMetrics(CollectorRegistry(), lambda: [])

        def publish_retained(self, leaf, msg):
            sent.append((leaf, msg))
            return True

    async def run() -> tuple[Roles, list]:
        futures: dict = {}

        def expect_reply(sid, xid):
            futures[(sid, xid)] = asyncio.get_running_loop().create_future()
            return futures[(sid, xid)]

        steps: list = []
        e = Election(A, "line", lease_s=LEASE)
        roles = Roles(e, Bus(), core, dispatch=steps.append, expect_reply=expect_reply)
        e.tick(T0, connected=True, peers_up=set())
        e._on_bus_since = 0.0  # on the bus long enough: it claims at the next tick
        roles.tick()
        assert e.is_master
        (claim,) = [env for s, env in steps[0].send if s == sid]
        assert claim.role_request.role == MASTER
        assert claim.role_request.generation_id == e.generation
        assert [leaf for leaf, _ in sent] == [ROLE, RULES]  # its role, then its rules
        err = ProtocolError(
            pb.ERROR_TYPE_ROLE_REQUEST_FAILED,
            pb.ROLE_REQUEST_FAILED_CODE_STALE,
            f"generation {e.generation} older than {e.generation + 7}",
        )
        futures[(sid, claim.xid)].set_result(pb.Envelope(error=err.to_error(b"")))
        await asyncio.sleep(0)
        assert e.is_master  # on the bus, no newer claim there: the agent alone is not believed
        e.tick(T0 + 1, connected=False, peers_up=set())  # the bus drops
        roles._role_reply(futures[(sid, claim.xid)], "a1", e.generation)
        return roles, steps

    roles, _ = asyncio.run(run())
    assert not roles.election.is_master and roles.refusal()
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("says STALE" in m and "staying MASTER" in m for m in said), said
    assert any("no longer MASTER" in m and "agent 'a1'" in m for m in said), said


def test_a_generation_far_ahead_of_the_clock_is_refused_and_the_election_goes_on():
    # A controller of the group claims 2^64-1: it would hold the mastership for good,
    # and claiming after it (newest + 1) is past uint64.
    b = Election(B, "line", lease_s=LEASE)
    huge = cpb.Mastership(group="line", role=MASTER, generation=(1 << 64) - 1, priority=1)
    got = b.receive(*_wire(A, T0, role=huge), T0)
    assert got.reason == "generation" and "ahead of this clock" in got.refused
    snap = _rules((1 << 64) - 1, 1, 10)
    assert b.receive(*_wire(A, T0, rules=snap), T0).reason == "generation"
    assert not b.claims and b.newest == 0 and b.rules_to_adopt() is None
    now = T0
    while now < T0 + LEASE:
        out = b.tick(now, connected=True, peers_up={A})
        for body in out.publish:
            body.SerializeToString()  # every role message still fits its uint64
        now += 0.1
    assert b.is_master and int(T0 * 1000) <= b.generation < int(now * 1000) + 1
    # a claim within the clocks' skew is taken (a master whose clock runs ahead)
    ahead = cpb.Mastership(group="line", role=MASTER, generation=b.generation + 600_000)
    assert not b.receive(*_wire(A, now, role=ahead), now).refused
    b.tick(now, connected=True, peers_up={A})
    assert (b.role, b.master) == (SLAVE, A)


def test_only_the_groups_members_take_part_and_others_naming_it_are_refused():
    # controller/x holds a valid controller certificate of another group: with
    # cluster.members it cannot claim this group's mastership nor have its rules adopted
    members = frozenset({A, B})
    b = Election(B, "line", lease_s=LEASE, members=members)
    x = "controller/x"
    claim = cpb.Mastership(group="line", role=MASTER, generation=int(T0 * 1000) + 5, priority=9)
    got = b.receive(*_wire(x, T0, role=claim), T0)
    assert got.reason == "member" and "controller/x is not a member" in got.refused
    assert b.receive(*_wire(x, T0, rules=_rules(claim.generation, 1, 10)), T0).reason == "member"
    other = cpb.Mastership(group="other", role=MASTER, generation=9)
    assert not b.receive(*_wire(x, T0, role=other), T0).refused  # its own group's: ignored
    assert not b.claims and b.newest == 0 and b.rules_to_adopt() is None
    a_claim = cpb.Mastership(group="line", role=MASTER, generation=int(T0 * 1000), priority=1)
    assert not b.receive(*_wire(A, T0, role=a_claim), T0).refused
    b.tick(T0, connected=True, peers_up={A, x})
    assert b.master == A


def test_cluster_members_are_checked_at_load(tmp_path):
    from controller.config import ConfigError, from_mapping

    base = {"controller_id": "a", "plaintext": True, "listen": "127.0.0.1:0"}
    bus = {"broker": "mqtt://127.0.0.1:1883"}
    cfg = from_mapping({**base, "cluster": {**bus, "members": ["controller/a", "controller/b"]}})
    assert cfg.cluster.members == ("controller/a", "controller/b")
    for members, said in (
        (["agent/a"], "controller/<name>"),
        ("controller/a", "expected"),
        (["controller/b"], "not this one"),
    ):
        with pytest.raises(ConfigError, match=said):
            from_mapping({**base, "cluster": {**bus, "members": members}})


@pytest.mark.parametrize(
    "scopes, said",
    [
        ([("", float("nan"))], "installed_at nan"),  # adopt_rules raised ValueError on it
        ([("", float("inf"))], "installed_at inf"),
        ([("a1", T0 + 86_400)], "installed_at"),  # a hard timeout that never runs out
        ([("a1", T0), ("a1", T0)], "scope 'a1' twice"),
        ([("x" * 300, T0)], "longer than"),
    ],
)
def test_a_malformed_rules_snapshot_is_refused_before_adoption(scopes, said):
    b = Election(B, "line", lease_s=LEASE)
    claim = cpb.Mastership(group="line", role=MASTER, generation=7, priority=1, master=A)
    b.receive(*_wire(A, T0, role=claim), T0)
    snap = cpb.DesiredRules(group="line", generation=7, revision=1)
    mod = rules.vigilance_mod(
        rules.ADD, priority=5, match=pb.Match(source_id="s"), actions=[rules.drop()],
        hard_timeout_s=60,
    )  # fmt: skip
    for agent_id, at in scopes:
        snap.scopes.add(agent_id=agent_id).rules.add(mod=mod, installed_at=at)
    got = b.receive(*_wire(A, T0, rules=snap), T0)
    assert got.reason == "entry" and said in got.refused
    assert b.rules_to_adopt() is None


def test_rules_come_only_from_the_master_this_controller_follows():
    # c claimed a newer generation (within the clocks' skew) but is not live: b follows
    # the live master a, and c's snapshot would otherwise outrank every one of a's
    b = Election(B, "line", lease_s=LEASE)
    gen_a, gen_c = int(T0 * 1000), int(T0 * 1000) + 60_000
    b.receive(*_wire(A, T0, role=cpb.Mastership(group="line", role=MASTER, generation=gen_a)), T0)
    b.receive(*_wire(C, T0, role=cpb.Mastership(group="line", role=MASTER, generation=gen_c)), T0)
    b.receive(*_wire(C, T0, rules=_rules(gen_c, 1, 10)), T0)
    b.receive(*_wire(A, T0, rules=_rules(gen_a, 1, 20)), T0)
    b.tick(T0, connected=True, peers_up={A})  # c's load says down
    assert b.master == A
    sender, got = b.rules_to_adopt()
    assert (sender, got.generation) == (A, gen_a)
    b.adopted(got)
    b.receive(*_wire(A, T0, rules=_rules(gen_a, 2, 30)), T0)
    assert b.rules_to_adopt()[1].revision == 2


def test_a_reply_never_given_leaves_no_waiter():
    """An agent that never answers ROLE_REQUEST (or STATS, BARRIER): its reply future,
    cancelled at the timeout, is forgotten; else each of its reconnections left one."""
    import asyncio
    import types

    from controller.server import ControllerServer

    async def go() -> dict:
        srv = types.SimpleNamespace(_waiters={})
        futs = [ControllerServer.expect_reply(srv, sid, 7) for sid in range(100)]
        for f in futs:
            f.cancel()
        await asyncio.sleep(0)  # done callbacks run
        return srv._waiters

    assert asyncio.run(go()) == {}
