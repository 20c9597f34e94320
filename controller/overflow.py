"""Work over W0, handed to a neighbour (DeSVig Table III steps 1-2 and 9), sans-I/O.

A controller whose workload W would pass its threshold W0 forwards the PKG_IN to the
other controllers instead of answering UNKNOWN/OVERLOADED, when a neighbour can take it
and the agent's budget covers the round trip measured so far:

- the request (``WorkRequest``: the agent's id and model declaration, the PKG_IN, the
  unix-time deadline) goes to the sender's own ``work`` topic; controllers take work
  through one MQTT 5 shared subscription (``$share/openexample-work/...``), so the broker
  hands each request to one of them. A controller over its own W0 leaves the shared
  subscription (and comes back under half of W0), so work is not handed back to it;
- the MQTT 5 response topic is the sender's ``answers`` topic, and the correlation data
  names the request; a neighbour answers on ``<response topic>/<its identity>``, the
  only leaf of it the broker's ACL lets it write, so the sender knows who answered;
- hop limit 1: a neighbour scores the items or refuses them (OVERLOADED, NO_DETECTOR,
  a model it was not trained for, past the deadline), it never forwards them again.

The sender answers its agent with the neighbour's PKG_OUT (``decided_by`` naming the
neighbour), or UNKNOWN/OVERLOADED on a refusal or when the deadline passes first.
This module holds the topics, the checks of what arrives and the round-trip estimate;
controller/core.py decides, controller/bus.py moves the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from controller.cluster import PREFIX, VERSION, topic, topic_identity
from openexample.identity import valid_name
from openexample.v1 import cluster_pb2 as cpb

WORK, VOTE, ANSWERS = "work", "vote", "answers"
SHARE_GROUP = "openexample-work"
# Before the first answer: what a forward is assumed to cost (the broker twice, the
# neighbour's queue and scoring); measured answers replace it.
INITIAL_RTT_S = 0.005
_EWMA = 0.2


def work_topic(identity: str) -> str:
    return topic(identity, WORK)


def answers_topic(identity: str) -> str:
    """The response topic a request names; a neighbour appends its own identity."""
    return topic(identity, ANSWERS)


def work_subscription() -> str:
    """Every controller's requests, through the shared subscription (one taker each)."""
    return f"$share/{SHARE_GROUP}/{PREFIX}/+/+/{WORK}"


@dataclass(frozen=True, slots=True)
class Parsed:
    """A checked work message: who sent it and what, or why it was refused."""

    sender: str = ""
    request: cpb.WorkRequest | None = None
    answer: cpb.WorkAnswer | None = None
    refused: str = ""


def _decode(name: str, payload: bytes, ident: str, body: str) -> Parsed:
    try:
        msg = cpb.BusMessage.FromString(payload)
    except DecodeError as exc:
        return Parsed(ident, refused=f"undecodable on {name}: {exc}")
    if msg.version != VERSION:
        return Parsed(ident, refused=f"version {msg.version} on {name}")
    if msg.sender != ident:
        return Parsed(msg.sender, refused=f"sender {msg.sender!r} on the topic of {ident}")
    if msg.WhichOneof("body") != body:
        return Parsed(ident, refused=f"{msg.WhichOneof('body') or 'no body'} on {name}")
    return Parsed(
        ident,
        request=msg.work if body == "work" else None,
        answer=msg.answer if body == "answer" else None,
    )


def parse_request(name: str, payload: bytes) -> Parsed:
    """A WorkRequest (work over W0 from the shared subscription, or a consensus vote):
    its topic is its sender's, and says which of the two it is."""
    parts = name.split("/")
    if len(parts) != 6 or parts[5] not in (WORK, VOTE):
        return Parsed(refused=f"not a work topic: {name!r}")
    where = topic_identity("/".join([*parts[:5], "load"]))  # the sender's prefix
    if where is None:
        return Parsed(refused=f"not a work topic: {name!r}")
    got = _decode(name, payload, where[0], "work")
    if got.request is not None and not got.request.pkg.items:
        return Parsed(got.sender, refused=f"a work request with no items from {got.sender}")
    if got.request is not None and got.request.vote != (parts[5] == VOTE):
        return Parsed(got.sender, refused=f"vote = {got.request.vote} on {name}")
    return got


def parse_answer(name: str, payload: bytes, identity: str) -> Parsed:
    """A WorkAnswer on this controller's answers topic: ``.../answers/controller/<peer>``,
    where only <peer> may write (the broker's ACL), and the message must say the same."""
    prefix = answers_topic(identity) + "/"
    rest = name[len(prefix) :].split("/") if name.startswith(prefix) else []
    if len(rest) != 2 or rest[0] != "controller" or not valid_name(rest[1]):
        return Parsed(refused=f"not an answers topic of {identity}: {name!r}")
    return _decode(name, payload, f"controller/{rest[1]}", "answer")


class RoundTrip:
    """What a forward has cost, as a moving average of the answers' round trips: a
    request is forwarded only while the agent's budget covers it."""

    def __init__(self, initial_s: float = INITIAL_RTT_S) -> None:
        self.estimate_s = initial_s
        self.samples = 0

    def observe(self, seconds: float) -> None:
        self.samples += 1
        if self.samples == 1:
            self.estimate_s = seconds
        else:
            self.estimate_s += _EWMA * (seconds - self.estimate_s)
