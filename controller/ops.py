"""Operator commands against a running daemon: ``rules add|modify|del|list``, ``agents``,
``unblock``."""

from __future__ import annotations

import argparse
import json
import os
import sys

import grpc
from google.protobuf.json_format import MessageToDict

from controller.config import Config
from openexample import grpc_tls, rules, tls
from openexample.addresses import parse_address
from openexample.errors import ConfigError
from openexample.v1 import admin_pb2, admin_pb2_grpc
from openexample.v1 import openexample_pb2 as pb


def parse_match(text: str) -> pb.Match:
    """``model=mnist,source=user7,label=3,confidence=0:0.5`` -> pb.Match
    (:func:`openexample.rules.parse_match`, shared with the config's ``rules``)."""
    return rules.parse_match(text)


def parse_action(text: str) -> pb.Action:
    """``inspect[:BUDGET_US[:standalone|secure]]``, ``allow``, ``drop``, ``mirror``,
    ``sample:P`` (an inspect without a budget gets the default ``budget_us``)."""
    return rules.parse_action(text, Config().budget_us)


def _int(text: str) -> int:
    return int(text, 0)


def add_rule_args(p: argparse.ArgumentParser, *, with_actions: bool) -> None:
    p.add_argument("--match", default="", help="model=ID,source=ID,label=N,confidence=LO:HI")
    p.add_argument("--priority", type=int, default=rules.DEFAULT_PRIORITY)
    p.add_argument("--cookie", type=_int, default=0)
    p.add_argument("--cookie-mask", type=_int, default=0)
    p.add_argument("--agent", default="", help="only this agent (default: all)")
    p.add_argument("--for-model", default="", help="only agents serving this model")
    if with_actions:
        p.add_argument("--action", action="append", default=[], help="repeatable")
        p.add_argument("--idle-timeout", type=int, default=0, help="seconds (0 = never)")
        p.add_argument("--hard-timeout", type=int, default=0, help="seconds (0 = never)")
        p.add_argument("--send-removed", action="store_true")
        p.add_argument("--check-overlap", action="store_true")
        p.add_argument("--reset-counts", action="store_true")


def build_mod(args: argparse.Namespace, command: int) -> pb.VigilanceMod:
    flags = 0
    if getattr(args, "send_removed", False):
        flags |= rules.SEND_REMOVED
    if getattr(args, "check_overlap", False):
        flags |= rules.CHECK_OVERLAP
    if getattr(args, "reset_counts", False):
        flags |= rules.RESET_COUNTS
    return rules.vigilance_mod(
        command,
        match=parse_match(args.match),
        priority=args.priority,
        actions=[parse_action(a) for a in getattr(args, "action", [])],
        cookie=args.cookie,
        cookie_mask=args.cookie_mask,
        idle_timeout_s=getattr(args, "idle_timeout", 0),
        hard_timeout_s=getattr(args, "hard_timeout", 0),
        flags=flags,
    )


def add_tls_args(p: argparse.ArgumentParser) -> None:
    """How an operator authenticates: a certificate of kind operator (changes) or reader
    (lists). Defaults come from OPENEXAMPLE_TLS_CA / _CERT / _KEY."""
    env = os.environ.get
    p.add_argument("--tls-ca", default=env("OPENEXAMPLE_TLS_CA", ""), help="CA (PEM)")
    p.add_argument("--tls-cert", default=env("OPENEXAMPLE_TLS_CERT", ""), help="your certificate")
    p.add_argument("--tls-key", default=env("OPENEXAMPLE_TLS_KEY", ""), help="your key")
    p.add_argument("--tls-server-name", default="", help="name in the controller's certificate")
    p.add_argument(
        "--plaintext", action="store_true", help="a plaintext daemon on loopback (development)"
    )


def _stub(args: argparse.Namespace) -> admin_pb2_grpc.ControllerAdminStub:
    address = args.controller
    addr = parse_address(address, "--controller")
    if addr.native:
        raise ConfigError(f"--controller: the admin API is on the gRPC address, got {address!r}")
    if args.plaintext:
        tls.check_plaintext(addr, "--controller")
        return admin_pb2_grpc.ControllerAdminStub(grpc.insecure_channel(addr.host_port))
    files = tls.TlsFiles.from_settings(args.tls_ca, args.tls_cert, args.tls_key, prefix="--tls-")
    options = []
    if args.tls_server_name:
        options.append(("grpc.ssl_target_name_override", args.tls_server_name))
    channel = grpc.secure_channel(
        addr.host_port, grpc_tls.grpc_channel_credentials(files), options=options
    )
    return admin_pb2_grpc.ControllerAdminStub(channel)


def mod_rules(args: argparse.Namespace, command: int) -> int:
    mod = build_mod(args, command)
    req = admin_pb2.ModRulesRequest(mod=mod, agent_id=args.agent, model_id=args.for_model)
    resp = _stub(args).ModRules(req, timeout=10)
    failed = 0
    for r in resp.results:
        if r.HasField("error"):
            failed += 1
            print(f"{r.agent_id}: refused: {r.error.text}", file=sys.stderr)
        else:
            print(f"{r.agent_id}: ok")
    if not resp.results:
        print("no agent connected; stored as desired state: agents get it when they connect")
    return 1 if failed else 0


def list_rules(args: argparse.Namespace) -> int:
    filt = pb.StatsRequest(
        type=pb.STATS_TYPE_RULES,
        match=parse_match(args.match),
        cookie=args.cookie,
        cookie_mask=args.cookie_mask,
    )
    req = admin_pb2.ListRulesRequest(
        agent_id=args.agent,
        model_id=args.for_model,
        filter=filt,
        desired=getattr(args, "desired", False),
    )
    resp = _stub(args).ListRules(req, timeout=10)
    if args.json:
        print(json.dumps(MessageToDict(resp, preserving_proto_field_name=True), indent=2))
        return 0
    if not resp.agents:
        print("no agent connected, and no desired rules for one")
    for a in resp.agents:
        if a.desired and not a.agent_id:
            head = "template (desired: what agents not seen yet get)"
        elif a.desired:
            state = "connected" if a.connected else "not connected"
            head = f"agent {a.agent_id} (desired; {state})"
        else:
            head = f"agent {a.agent_id}"
        print(head + (f"  (error: {a.error.text})" if a.HasField("error") else ""))
        for r in a.rules:
            acts = rules.RuleActions.from_pb(r.actions)
            line = (
                f"  prio={r.priority:<5} cookie={r.cookie:#x} match={rules.match_text(r.match)}"
                f" actions={rules.actions_text(acts)}"
            )
            if not a.desired:  # the controller does not count matches: agents do
                line += f" matched={r.match_count}"
            line += f" age={r.duration_s:.1f}s idle={r.idle_timeout_s} hard={r.hard_timeout_s}"
            if a.desired and r.hard_timeout_s:
                line += f" ({max(0.0, r.hard_timeout_s - r.duration_s):.0f}s left)"
            print(line)
    return 0


def list_agents(args: argparse.Namespace) -> int:
    resp = _stub(args).ListAgents(admin_pb2.ListAgentsRequest(), timeout=10)
    for a in resp.agents:
        print(
            f"{a.agent_id}  peer={a.peer or '?'}  models={','.join(a.model_ids)}"
            f"  up={a.connected_s:.1f}s  pkg_in={a.pkg_in}"
        )
    if not resp.agents:
        print("no agent connected")
    return 0


def unblock(args: argparse.Namespace) -> int:
    req = admin_pb2.UnblockRequest(agent_id=args.agent, source_id=args.source)
    resp = _stub(args).Unblock(req, timeout=10)
    where = f"source {args.source!r} on agent {args.agent!r}"
    if resp.was_blocked:
        print(f"{where}: unblocked (and on every controller of the cluster)")
    else:
        print(f"{where}: not blocked here (told to the cluster's controllers anyway)")
    return 0
