"""Unit tests of the role-neutral session (openexample/session.py) on its own.

Two Sessions are wired together in memory; which one is the agent and which the
controller is only a matter of what each sends. No sockets, no sleeping: ``now`` is
driven by hand.
"""

from __future__ import annotations

import struct

import pytest

from openexample import messages
from openexample.errors import bad_request
from openexample.limits import Limits
from openexample.messages import XID_MAX, envelope, hello
from openexample.session import Closed, Established, Output, PeerHello, Received, Session, State
from openexample.v1 import openexample_pb2 as pb


def make(name: str, now: float = 0.0, **kw) -> Session:
    kw.setdefault("xid_start", 100 if name == "agent" else 500)
    return Session(name, now=now, **kw)


def deliver(dst: Session, envs: list[pb.Envelope], now: float = 0.0) -> Output:
    """Feed ``envs`` to ``dst`` as bytes, merging what comes back into one Output."""
    merged = Output()
    for env in envs:
        out = dst.receive(env.SerializeToString(), now)
        merged.send.extend(out.send)
        merged.events.extend(out.events)
        merged.errors.extend(out.errors)
    return merged


def kinds(out: Output) -> list[type]:
    return [type(e) for e in out.events]


def error_of(out: Output) -> pb.Error:
    assert len(out.send) == 1 and out.send[0].WhichOneof("body") == "error", out.send
    return out.send[0].error


def hellos(agent: Session, ctrl: Session, now: float = 0.0) -> None:
    a_out = deliver(ctrl, agent.start(), now)
    c_out = deliver(agent, ctrl.start(), now)
    assert kinds(a_out) == kinds(c_out) == [PeerHello]
    assert a_out.send == c_out.send == []
    assert agent.state is ctrl.state is State.FEATURES


def features(agent: Session, ctrl: Session, now: float = 0.0) -> pb.Envelope:
    """The controller asks, the agent answers: both in CONFIG. Returns the reply."""
    req = ctrl.request(pb.FeaturesRequest())
    out = deliver(agent, [req], now)
    (ev,) = out.events
    assert isinstance(ev, Received) and ev.env.WhichOneof("body") == "features_request"
    assert out.send == []  # answering FEATURES is the role's job
    rep = agent.reply(ev.env, pb.FeaturesReply(agent_id="agent"))
    assert agent.state is State.CONFIG  # sending FEATURES_REPLY ends FEATURES
    out = deliver(ctrl, [rep], now)
    (ev,) = out.events
    assert isinstance(ev, Received) and ev.env.features_reply.agent_id == "agent"
    assert ctrl.state is State.CONFIG
    return rep


def establish(agent: Session, ctrl: Session, now: float = 0.0) -> None:
    hellos(agent, ctrl, now)
    features(agent, ctrl, now)
    barrier = ctrl.request(pb.BarrierRequest())
    a_out = deliver(agent, [barrier], now)
    assert kinds(a_out) == [Established]
    (rep,) = a_out.send
    assert rep.xid == barrier.xid and rep.WhichOneof("body") == "barrier_reply"
    c_out = deliver(ctrl, a_out.send, now)
    assert kinds(c_out) == [Established, Received] and c_out.send == []
    assert agent.state is ctrl.state is State.MAIN


def pair(now: float = 0.0, **kw) -> tuple[Session, Session]:
    return make("agent", now, **kw), make("ctrl", now, **kw)


# --- handshake ---


def test_two_sessions_reach_main():
    agent, ctrl = pair()
    assert agent.state is State.HELLO and not agent.configured
    (h,) = agent.start()
    assert h.hello.sender_id == "agent" and h.xid != 0
    establish(agent, ctrl)
    assert agent.peer_id == "ctrl" and ctrl.peer_id == "agent"
    assert agent.configured and ctrl.configured
    # A later BARRIER is answered but establishes nothing more.
    out = deliver(agent, [ctrl.request(pb.BarrierRequest())])
    assert out.events == [] and out.send[0].WhichOneof("body") == "barrier_reply"


def test_version_negotiation_picks_the_highest_common_version_and_merges_limits():
    s = make("agent", limits=Limits(max_batch_items=64))
    s.start()
    peer = hello("ctrl", versions={1, 5}, limits=Limits(max_batch_items=8))
    assert peer.version == 5  # the peer's envelope carries its own highest version
    out = deliver(s, [peer])
    (ev,) = out.events
    assert ev == PeerHello("ctrl", 1) and s.version == 1 and s.state is State.FEATURES
    assert s.limits.max_batch_items == 8 and s.our_limits.max_batch_items == 64


def test_hello_without_common_version_fails_and_closes():
    s = make("agent")
    s.start()
    bad = pb.Envelope(version=5, xid=9, hello=pb.Hello(versions_bitmap=1 << 5, sender_id="c"))
    out = deliver(s, [bad])
    err = error_of(out)
    assert (err.type, err.code) == (pb.ERROR_TYPE_HELLO_FAILED, pb.HELLO_FAILED_CODE_INCOMPATIBLE)
    assert err.offending_xid == 9 and out.errors == ["HELLO_FAILED/INCOMPATIBLE"]
    assert out.closed and kinds(out) == [Closed] and s.state is State.CLOSED
    assert s.closed_reason.startswith("HELLO_FAILED/INCOMPATIBLE")


def test_non_hello_first_message_is_refused_and_the_session_waits_for_hello():
    s = make("agent")
    s.start()
    out = deliver(s, [envelope(pb.FeaturesRequest(), xid=3)])
    err = error_of(out)
    assert (err.type, err.code) == (pb.ERROR_TYPE_BAD_REQUEST, pb.BAD_REQUEST_CODE_UNEXPECTED)
    assert err.offending_xid == 3 and not out.closed and s.state is State.HELLO
    assert kinds(deliver(s, [hello("ctrl")])) == [PeerHello]


def test_bad_version_after_the_handshake_is_refused_and_the_session_goes_on():
    agent, ctrl = pair()
    establish(agent, ctrl)
    out = deliver(agent, [envelope(pb.EchoRequest(data=b"x"), xid=4, version=2)])
    err = error_of(out)
    assert (err.type, err.code) == (pb.ERROR_TYPE_BAD_REQUEST, pb.BAD_REQUEST_CODE_BAD_VERSION)
    assert err.offending_xid == 4 and out.events == [] and agent.state is State.MAIN
    (echo,) = deliver(agent, [envelope(pb.EchoRequest(data=b"y"), xid=5)]).send
    assert echo.echo_reply.data == b"y"


def test_hello_after_the_handshake_is_unexpected():
    agent, ctrl = pair()
    establish(agent, ctrl)
    err = error_of(deliver(agent, [hello("again")]))
    assert err.code == pb.BAD_REQUEST_CODE_UNEXPECTED and agent.state is State.MAIN


def test_features_reply_not_asked_for_is_refused():
    agent, ctrl = pair()
    hellos(agent, ctrl)
    stray = envelope(pb.FeaturesReply(agent_id="agent"), xid=77)
    err = error_of(deliver(ctrl, [stray]))
    assert (err.type, err.code) == (pb.ERROR_TYPE_BAD_REQUEST, pb.BAD_REQUEST_CODE_UNEXPECTED)
    assert ctrl.state is State.FEATURES
    # Asked for, with a different xid: still refused.
    req = ctrl.request(pb.FeaturesRequest())
    wrong = envelope(pb.FeaturesReply(), xid=req.xid + 1)
    assert error_of(deliver(ctrl, [wrong])).code == pb.BAD_REQUEST_CODE_UNEXPECTED
    # The right one is accepted once; a repeat is refused again.
    rep = agent.reply(req, pb.FeaturesReply(agent_id="agent"))
    assert kinds(deliver(ctrl, [rep])) == [Received] and ctrl.state is State.CONFIG
    assert error_of(deliver(ctrl, [rep])).code == pb.BAD_REQUEST_CODE_UNEXPECTED


@pytest.mark.parametrize(
    "body",
    [pb.BarrierRequest(), pb.VigilanceMod(), pb.PkgIn(model_id="m"), pb.StatsRequest()],
)
def test_messages_before_features_are_refused_unexpected(body):
    agent, ctrl = pair()
    hellos(agent, ctrl)
    out = deliver(agent, [ctrl.request(body)])
    err = error_of(out)
    assert (err.type, err.code) == (pb.ERROR_TYPE_BAD_REQUEST, pb.BAD_REQUEST_CODE_UNEXPECTED)
    assert out.events == [] and agent.state is State.FEATURES
    # ECHO is fine before FEATURES.
    (echo,) = deliver(agent, [ctrl.request(pb.EchoRequest(data=b"e"))]).send
    assert echo.echo_reply.data == b"e"


# --- time ---


def test_handshake_timeout_closes_even_while_the_peer_keeps_echoing():
    agent, ctrl = pair(handshake_timeout_s=10.0, echo_interval_s=1.0, echo_unreplied_limit=3)
    hellos(agent, ctrl)  # stuck in FEATURES: nobody asks for FEATURES
    assert agent.next_deadline() == pytest.approx(10.0)
    for now in range(1, 10):
        out = deliver(agent, [ctrl.request(pb.EchoRequest(data=b"hb"))], float(now))
        assert out.send[0].WhichOneof("body") == "echo_reply"
        tick = agent.tick(float(now) + 0.5)
        assert tick.send == [] and not tick.closed  # no liveness echoes before MAIN
    out = agent.tick(10.0)
    assert out.closed and agent.state is State.CLOSED
    assert "handshake" in agent.closed_reason and "features" in agent.closed_reason


def test_liveness_in_main_closes_after_the_unreplied_limit():
    agent, ctrl = pair(echo_interval_s=1.0, echo_unreplied_limit=3, handshake_timeout_s=2.0)
    establish(agent, ctrl)
    assert agent.next_deadline() == pytest.approx(1.0)  # the echo, not the handshake deadline
    assert agent.tick(0.5).send == []
    for now in (1.0, 2.0, 3.0):
        out = agent.tick(now)
        (echo,) = out.send
        assert echo.WhichOneof("body") == "echo_request" and not out.closed
    out = agent.tick(4.0)
    assert out.send == [] and out.closed and agent.state is State.CLOSED
    assert "3 echo requests unanswered" in agent.closed_reason


def test_any_message_resets_liveness():
    agent, ctrl = pair(echo_interval_s=1.0, echo_unreplied_limit=3)
    establish(agent, ctrl)
    agent.tick(1.0)
    agent.tick(2.0)
    # Not an echo reply: any message from the peer proves it alive.
    deliver(agent, [ctrl.request(pb.StatsRequest())], 2.5)
    for now in (3.0, 4.0, 5.0):
        out = agent.tick(now)
        assert len(out.send) == 1 and not out.closed
    assert agent.tick(6.0).closed


def test_echo_rtt_is_measured_from_our_echo_reply():
    agent, ctrl = pair(echo_interval_s=1.0)
    establish(agent, ctrl)
    assert agent.echo_rtt_s is None
    (echo,) = agent.tick(1.0).send
    assert struct.unpack("<d", echo.echo_request.data) == (1.0,)
    (rep,) = deliver(ctrl, [echo], 1.1).send
    assert rep.xid == echo.xid and rep.echo_reply.data == echo.echo_request.data
    out = deliver(agent, [rep], 1.25)
    assert out.send == [] and out.events == []
    assert agent.echo_rtt_s == pytest.approx(0.25)
    # A reply whose data is not one of our timestamps leaves the measurement alone.
    deliver(agent, [envelope(pb.EchoReply(data=b"abc"), xid=1)], 9.0)
    assert agent.echo_rtt_s == pytest.approx(0.25)


# --- xids, bad input, closing ---


@pytest.mark.parametrize("start", [0, 1, XID_MAX - 2])
def test_request_xids_are_never_zero_and_distinct(start):
    agent = make("agent", xid_start=start, echo_interval_s=1.0, echo_unreplied_limit=100)
    ctrl = make("ctrl")
    (h,) = agent.start()
    xids = [h.xid]
    assert kinds(deliver(ctrl, [h])) == kinds(deliver(agent, ctrl.start())) == [PeerHello]
    xids += [agent.request(pb.EchoRequest()).xid for _ in range(3)]
    xids += [agent.request_xid() for _ in range(3)]
    features(agent, ctrl)
    deliver(agent, [ctrl.request(pb.BarrierRequest())])
    xids += [e.xid for now in range(1, 4) for e in agent.tick(float(now)).send]
    assert len(xids) == 10 and 0 not in xids and len(set(xids)) == len(xids)
    assert all(0 < x <= XID_MAX for x in xids)
    # Replies keep the request's xid; notices carry 0.
    req = envelope(pb.StatsRequest(), xid=42)
    assert agent.reply(req, pb.StatsReply()).xid == 42
    assert agent.reply_to(43, pb.PkgOut()).xid == 43
    assert agent.notice(pb.VigilanceRemoved()).xid == 0


@pytest.mark.parametrize("established", [False, True])
def test_malformed_bytes_get_bad_request_and_the_session_goes_on(established):
    agent, ctrl = pair()
    if established:
        establish(agent, ctrl)
    else:
        agent.start()
    before, received = agent.state, agent.received
    out = agent.receive(b"\xff\xff\xff\xff garbage", 0.0)
    err = error_of(out)
    assert (err.type, err.code) == (pb.ERROR_TYPE_BAD_REQUEST, pb.BAD_REQUEST_CODE_MALFORMED)
    assert out.errors == ["BAD_REQUEST/MALFORMED"] and out.events == []
    assert agent.state is before
    no_body = agent.receive(pb.Envelope(version=1, xid=5).SerializeToString(), 0.0)
    assert error_of(no_body).code == pb.BAD_REQUEST_CODE_BAD_TYPE
    assert error_of(no_body).offending_xid == 5
    if established:
        (rep,) = deliver(agent, [ctrl.request(pb.BarrierRequest())]).send
        assert rep.WhichOneof("body") == "barrier_reply"
    else:
        assert kinds(deliver(agent, ctrl.start())) == [PeerHello]
    assert agent.received == received + 3  # undecodable messages count as received too


def test_a_closed_session_ignores_input():
    agent, ctrl = pair()
    establish(agent, ctrl)
    received = agent.received
    out = agent.close("shutting down")
    assert kinds(out) == [Closed] and out.events[0].reason == "shutting down"
    assert agent.state is State.CLOSED and not agent.configured
    for data in (b"\xff garbage", ctrl.request(pb.EchoRequest()).SerializeToString()):
        out = agent.receive(data, 1.0)
        assert out.send == [] and out.events == [] and out.errors == []
    assert agent.received == received
    assert agent.tick(100.0) == Output() and agent.next_deadline() is None
    assert agent.close("again").events == [] and agent.closed_reason == "shutting down"


def test_error_and_other_messages_go_to_the_role():
    agent, ctrl = pair()
    establish(agent, ctrl)
    err = messages.error_envelope(bad_request(pb.BAD_REQUEST_CODE_BAD_TYPE, "no").with_xid(7))
    out = deliver(agent, [err, ctrl.request(pb.StatsRequest())])
    assert [e.env.WhichOneof("body") for e in out.events] == ["error", "stats_request"]
    assert out.send == []
