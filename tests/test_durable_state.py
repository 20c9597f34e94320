"""Durable desired state: operator rules, blocks and config rules outlive a controller.

The core on a fake clock first (tests/twoplane.py, with a store that keeps exactly what
each Step says to persist, and a restart that builds a new core from it), then the
SQLite store, the config's ``rules``, and real processes: kill -9 and restart, SIGHUP.
"""

from __future__ import annotations

import signal
import time

import pytest
import yaml

from agents import attach
from agents.results import Result, Ticket
from controller import config as cfgmod
from controller.core import ControllerCore, Step
from controller.desired import (
    COOKIE_BLOCK,
    COOKIE_CONFIG,
    COOKIE_KIND_MASK,
    TEMPLATE,
    DesiredState,
    StoredRule,
)
from controller.journal import Journal
from controller.store import Store
from openexample import rules
from openexample.v1 import openexample_pb2 as pb
from tests.conftest import MODEL_ID as E2E_MODEL
from tests.twoplane import MODEL_ID, TwoPlanes, adversarial_input, benign_input

SECURE = rules.inspect(400_000, "secure")


def outcome(r):
    assert isinstance(r, Result), f"still pending: {r!r}"
    return r.decided_by, r.released


def secure_rule(cookie=0x5EC):
    return rules.vigilance_mod(rules.ADD, priority=1, actions=[SECURE], cookie=cookie)


def drop_rule(priority=100, cookie=0x42, hard=0, idle=0, **match):
    return rules.vigilance_mod(
        rules.ADD,
        match=pb.Match(**match),
        priority=priority,
        actions=[rules.drop()],
        cookie=cookie,
        hard_timeout_s=hard,
        idle_timeout_s=idle,
    )


def mods_received(agent):
    return [e.vigilance_mod for e in agent.received if e.HasField("vigilance_mod")]


def table(agent):
    """The agent's own rules as (priority, cookie) in lookup order."""
    return [(r.priority, r.cookie) for r in agent.core.rules]


def config_rules(*entries):
    return cfgmod.from_mapping({"rules": list(entries)}).rules


def kind(cookie):
    return cookie & COOKIE_KIND_MASK


class _Down:
    def next_deadline(self) -> None:
        return None


class DurablePlanes(TwoPlanes):
    """TwoPlanes whose controller stores what each Step says (``stored``, as
    controller/server.py writes controller/store.py) and can be killed and restarted
    on it. Starts as the server does: restore, then the config's rules."""

    def __init__(self, *args, **config):
        super().__init__(*args, **config)
        self._models = set(self.core.detected_models)
        self.stored = DesiredState()
        self.notes: list[str] = []
        self.restarts = 0
        self._start(DesiredState())

    def _start(self, state: DesiredState) -> None:
        step = self.core.restore(state, self.now)
        self._dispatch(step.merge(self.core.reload_rules(self.cfg.rules, self.now)[0]))

    def _dispatch(self, step: Step) -> None:
        for scope in step.persist:
            kept = self.core.durable.desired(scope)
            if kept is None:
                self.stored.tables.pop(scope, None)
            else:  # a copy through the wire format, as the store keeps it
                copy = pb.VigilanceMod.FromString
                self.stored.tables[scope] = [
                    StoredRule(copy(r.mod.SerializeToString()), r.installed_at) for r in kept
                ]
        if step.persist_blocks:
            self.stored.blocks = self.core.durable.blocks()
        self.notes += step.notes
        super()._dispatch(step)

    def kill_and_restart(self, down_s: float = 0.0, **config) -> None:
        """SIGKILL: every stream breaks; ``down_s`` later a new controller (``config``
        changed, e.g. its rules) starts from what was stored; agents reconnect."""
        connected = [a for a in self.agents.values() if a.connected]
        for a in connected:
            self.disconnect(a, "controller killed")
        self.core = _Down()  # a dead controller has no timers
        self.advance(down_s)
        self.cfg = self.cfg.replace(**config)
        self.core = ControllerCore(self.cfg, self._models, self.now)
        self._links.clear()
        self.restarts += 1
        self._start(self.stored)
        for a in connected:
            self.reconnect(a)


# --- hard timeouts: never extended -----------------------------------------------------


def test_an_operator_rule_survives_a_restart_and_the_agent_gets_it_on_resync():
    pair = DurablePlanes()
    a, b = pair.attach("secure"), pair.attach("lenient")
    assert pair.admin_mod(secure_rule(), agent_id="secure") == {"secure": None}
    assert pair.stored.tables["secure"][0].mod.cookie == 0x5EC

    pair.kill_and_restart(down_s=5)
    (kept,) = pair.core.durable.desired("secure")
    assert (kept.mod.priority, kept.mod.cookie, list(kept.mod.actions)) == (1, 0x5EC, [SECURE])
    assert a.up and (1, 0x5EC) in table(a)
    assert (1, 0x5EC) not in table(b)
    # What the issue saw: the secure rule withholds again while the controller is slow.
    pair.hold()
    r = a.call(benign_input())
    assert isinstance(r, Ticket)
    pair.advance(0.5)
    assert outcome(a.settle(r)) == ("timeout", False)


def test_a_block_keeps_its_deadline_across_a_restart():
    pair = DurablePlanes(trace_min_adversarial=1, trace_alpha=0.05, block_hard_timeout_s=30)
    a = pair.attach("a")
    a.call(adversarial_input(), source="mallory")
    assert pair.blocked == [("a", "mallory")]
    assert list(pair.stored.blocks) == [("a", "mallory")]
    (block,) = [r for r in pair.stored.tables["a"] if kind(r.mod.cookie) == COOKIE_BLOCK]

    pair.advance(10)
    pair.kill_and_restart(down_s=10)  # back at t = 20
    assert pair.core.snapshot().blocked_sources == 1  # _blocked restored
    assert outcome(a.call(benign_input(), source="mallory")) == ("rule", False)
    replayed = [m for m in mods_received(a) if m.cookie == block.mod.cookie][-1]
    assert replayed.hard_timeout_s == 10  # what remains, not 30 again

    pair.advance(11)  # t = 31: over on both planes
    assert pair.core.snapshot().blocked_sources == 0 and pair.stored.blocks == {}
    assert [r for r in pair.stored.tables["a"] if kind(r.mod.cookie) == COOKIE_BLOCK] == []
    assert outcome(a.call(benign_input(), source="mallory"))[0] == "controller"
    # A new block takes a cookie after the restored ones.
    a.call(adversarial_input(0.95), source="eve")  # another input: not an RT hit
    cookies = [
        r.cookie for r in pair.core.durable.agent_rules["a"] if kind(r.cookie) == COOKIE_BLOCK
    ]
    assert cookies and cookies[0] > block.mod.cookie


def test_what_expired_while_the_controller_was_down_is_dropped():
    pair = DurablePlanes(trace_min_adversarial=1, trace_alpha=0.05, block_hard_timeout_s=30)
    a = pair.attach("a")
    a.call(adversarial_input(), source="mallory")
    pair.admin_mod(drop_rule(source_id="x", hard=20), agent_id="a")
    pair.kill_and_restart(down_s=40)
    assert pair.core.snapshot().blocked_sources == 0 and pair.stored.blocks == {}
    assert [r.priority for r in pair.core.durable.agent_rules["a"]] == [0]
    assert [r.mod.cookie for r in pair.stored.tables["a"]] == []  # cleaned up in the store
    assert any("2 rules expired while the controller was down" in n for n in pair.notes)
    assert outcome(a.call(benign_input(), source="mallory"))[0] == "controller"


def test_a_template_rule_keeps_its_deadline_for_an_agent_seen_later():
    pair = DurablePlanes()
    assert pair.admin_mod(drop_rule(source_id="x", hard=60)) == {}  # nobody connected
    pair.advance(50)
    b = pair.attach("b")
    (mod,) = [m for m in mods_received(b) if m.cookie == 0x42]
    assert mod.hard_timeout_s == 10
    pair.advance(11)
    assert (100, 0x42) not in table(b)
    assert [r.priority for r in pair.core.durable.agent_rules["b"]] == [0]


def test_idle_timeouts_restart_at_a_restart():
    pair = DurablePlanes()
    a = pair.attach("a")
    pair.admin_mod(drop_rule(source_id="x", idle=30), agent_id="a")
    pair.advance(20)
    pair.kill_and_restart(down_s=5)  # t = 25; idle time is not stored: it restarts
    pair.advance(25)  # t = 50 > 30, < 25 + 30
    assert (100, 0x42) in table(a) and len(pair.core.durable.agent_rules["a"]) == 2
    pair.advance(6)
    assert (100, 0x42) not in table(a) and len(pair.core.durable.agent_rules["a"]) == 1


# --- scopes and order ------------------------------------------------------------------


def test_scopes_and_order_survive_a_restart():
    pair = DurablePlanes()
    pair.attach("a")
    b = pair.attach("b")
    pair.admin_mod(drop_rule(cookie=1, source_id="x"))  # all: the template and both agents
    pair.admin_mod(drop_rule(cookie=2, model_id=MODEL_ID))  # same priority, installed later
    delete = rules.vigilance_mod(rules.DELETE, cookie=1, cookie_mask=0xFF)
    pair.admin_mod(delete, agent_id="a")  # only from a
    pair.admin_mod(drop_rule(cookie=3, source_id="y"), agent_id="z")  # an agent never seen
    before = {aid: table(x) for aid, x in pair.agents.items()}
    assert before["a"] == [(100, 2), (0, 0)] and before["b"] == [(100, 1), (100, 2), (0, 0)]

    pair.kill_and_restart(down_s=1)
    assert {aid: table(x) for aid, x in pair.agents.items()} == before
    c, z = pair.attach("c"), pair.attach("z")
    assert table(c) == [(100, 1), (100, 2), (0, 0)]  # from the template
    assert table(z) == [(100, 1), (100, 2), (100, 3), (0, 0)]  # kept for it
    # Among equal priorities the rule installed first still wins.
    r = b.call(benign_input(), source="x")
    assert outcome(r) == ("rule", False)
    assert next(iter(b.core.rules)).cookie == 1


def test_the_default_table_miss_comes_from_the_config_and_an_operator_change_is_kept():
    pair = DurablePlanes()
    a = pair.attach("a")
    assert pair.core.durable.desired(TEMPLATE) == [] and pair.core.durable.desired("a") == []
    pair.kill_and_restart(fail_mode="secure")
    (miss,) = list(a.core.rules)
    assert miss.actions.fail_mode == pb.FAIL_MODE_SECURE  # the new config's default

    standalone = rules.inspect(1000, "standalone")
    modify = rules.vigilance_mod(rules.MODIFY_STRICT, priority=0, actions=[standalone])
    pair.admin_mod(modify, agent_id="a")
    assert len(pair.stored.tables["a"]) == 1
    pair.kill_and_restart()
    (miss,) = list(a.core.rules)
    assert (miss.actions.fail_mode, miss.actions.budget_us) == (pb.FAIL_MODE_STANDALONE, 1000)


def test_each_step_says_what_to_store():
    core = ControllerCore(cfgmod.Config(metrics_port=-1), {MODEL_ID}, 0.0)
    step, _ = core.mod_rules(drop_rule(source_id="x"), 0.0, agent_id="a")
    assert step.persist == {"a"} and not step.persist_blocks
    step, _ = core.mod_rules(drop_rule(source_id="y", idle=5), 0.0)
    assert step.persist == {TEMPLATE, "a"}
    assert core.on_tick(1.0).persist == set()
    assert core.on_tick(5.0).persist == {TEMPLATE, "a"}  # the idle timeouts
    with pytest.raises(Exception, match="PRIORITY"):
        core.mod_rules(drop_rule(priority=70000), 6.0, agent_id="new")
    assert "new" not in core.durable.agent_rules  # a bad mod makes no table either


def test_desired_rules_are_listed_per_scope():
    pair = DurablePlanes()
    pair.attach("a", model_id="m")
    pair.attach("b", model_id="m2")
    pair.admin_mod(drop_rule(cookie=7, source_id="x"), agent_id="b")
    filt = pb.StatsRequest(type=pb.STATS_TYPE_RULES)
    listed = pair.core.durable.desired_rules(filt, pair.now)
    assert [scope for scope, _ in listed] == [TEMPLATE, "a", "b"]
    assert [r.cookie for r in listed[2][1]] == [7, 0]
    assert [s for s, _ in pair.core.durable.desired_rules(filt, pair.now, model_id="m2")] == ["b"]
    assert [s for s, _ in pair.core.durable.desired_rules(filt, pair.now, template=False)] == [
        "a",
        "b",
    ]
    only7 = pb.StatsRequest(cookie=7, cookie_mask=0xFF)
    assert [len(r) for _, r in pair.core.durable.desired_rules(only7, pair.now)] == [0, 0, 1]


# --- rules as code ---------------------------------------------------------------------

PLC = {"match": "source=plc-9", "priority": 300, "actions": ["drop"]}
LINE1 = {"agent": "line-1", "priority": 1, "actions": "inspect:400000:secure"}
M2 = {"model": "m2", "match": "label=2", "priority": 50, "actions": "drop"}


def test_config_rules_are_desired_state_by_scope():
    pair = DurablePlanes(models=(MODEL_ID, "m2"), rules=config_rules(PLC, LINE1, M2))
    # Before any agent: the template has the rule for all; line-1 has a table already.
    assert [(r.priority, kind(r.cookie)) for r in pair.core.durable.template] == [
        (300, COOKIE_CONFIG),
        (0, 0),
    ]
    assert [r.priority for r in pair.core.durable.agent_rules["line-1"]] == [300, 1, 0]
    one, two = pair.attach("line-1"), pair.attach("line-2", model_id="m2")
    assert [p for p, _ in table(one)] == [300, 1, 0]
    assert [p for p, _ in table(two)] == [300, 50, 0]
    assert all(kind(c) == COOKIE_CONFIG for p, c in table(one) + table(two) if p)
    assert outcome(one.call(benign_input(), source="plc-9")) == ("rule", False)
    assert outcome(two.call(benign_input(), label=2)) == ("rule", False)
    assert outcome(two.call(benign_input(), label=1))[0] == "controller"


def test_a_reload_applies_the_diff_and_leaves_operator_rules_alone():
    pair = DurablePlanes(rules=config_rules(PLC, LINE1))
    one = pair.attach("line-1")
    pair.admin_mod(drop_rule(cookie=0x42, source_id="op"))
    eve = {"match": "source=eve", "priority": 300, "actions": "drop"}
    line1 = {**LINE1, "actions": "inspect:400000:standalone"}
    step, diff = pair.core.reload_rules(config_rules(eve, line1), pair.now)
    pair._dispatch(step)
    pair.pump()
    assert [r.index for r in diff.added] == [0] and [r.index for r in diff.removed] == [0]
    assert [(o.actions, n.actions) for o, n in diff.changed] == [
        (("inspect:400000:secure",), ("inspect:400000:standalone",))
    ]
    assert diff.summary().startswith("1 added, 1 removed, 1 changed: added rules[0]")
    assert step.persist == {TEMPLATE, "line-1"}
    assert outcome(one.call(benign_input(), source="plc-9"))[0] == "controller"
    assert outcome(one.call(benign_input(), source="eve")) == ("rule", False)
    assert outcome(one.call(benign_input(), source="op")) == ("rule", False)  # untouched
    (line_rule,) = [r for r in one.core.rules if r.priority == 1]
    assert line_rule.actions.fail_mode == pb.FAIL_MODE_STANDALONE
    # The same rules again: nothing to do.
    step, diff = pair.core.reload_rules(config_rules(eve, line1), pair.now)
    assert not diff and not step.send and not step.persist


def test_an_operator_may_delete_a_config_rule_until_the_next_reload_or_restart():
    pair = DurablePlanes(rules=config_rules(PLC))
    a = pair.attach("a")
    delete = rules.vigilance_mod(rules.DELETE, cookie=COOKIE_CONFIG, cookie_mask=COOKIE_KIND_MASK)
    pair.admin_mod(delete, agent_id="a")
    assert table(a) == [(0, 0)]
    pair.disconnect(a)
    pair.reconnect(a)  # a resync does not put it back
    assert table(a) == [(0, 0)]
    step, diff = pair.core.reload_rules(pair.cfg.rules, pair.now)  # SIGHUP, same file
    pair._dispatch(step)
    pair.pump()
    assert not diff and [p for p, _ in table(a)] == [300, 0]
    assert step.notes == [
        "config rule rules[0] prio=300 match=source=plc-9 actions=drop for all put back for"
        " agent 'a' (an operator had deleted or changed it)"
    ]
    pair.admin_mod(delete)  # from every agent and the template
    b = pair.attach("b")
    assert table(b) == [(0, 0)]  # a new agent does not get it back either
    pair.kill_and_restart()  # a restart applies the config again
    assert [p for p, _ in table(a)] == [300, 0] and [p for p, _ in table(b)] == [300, 0]


def test_config_rules_removed_from_the_file_leave_at_start_and_keep_their_place():
    pair = DurablePlanes(rules=config_rules(PLC, {**PLC, "match": "source=plc-8"}))
    a = pair.attach("a")
    pair.admin_mod(drop_rule(priority=300, cookie=0x42, model_id=MODEL_ID))  # installed last
    first = [c for _, c in table(a)]
    pair.kill_and_restart()
    assert [c for _, c in table(a)] == first  # the same config: the same table, same order
    pair.kill_and_restart(rules=config_rules({**PLC, "match": "source=plc-8"}))
    assert [c for _, c in table(a)] == first[1:]
    assert [kind(r.mod.cookie) for r in pair.stored.tables["a"]] == [COOKIE_CONFIG, 0]


def test_model_scoped_config_rules_follow_what_the_agent_serves():
    pair = DurablePlanes(models=(MODEL_ID, "m2"), rules=config_rules(M2))
    a, b = pair.attach("a"), pair.attach("b", model_id="m2")
    assert table(a) == [(0, 0)] and [p for p, _ in table(b)] == [50, 0]
    pair.disconnect(b)
    pair.kill_and_restart()
    # Which models b serves is not known until it connects again: its rule stays.
    assert [r.priority for r in pair.core.durable.agent_rules["b"]] == [50, 0]
    b2 = pair.attach("b", model_id=MODEL_ID)  # b restarted, serving another model
    assert table(b2) == [(0, 0)]
    assert [r.mod.priority for r in pair.stored.tables["b"]] == []


# --- the SQLite store ------------------------------------------------------------------


def test_the_store_keeps_scopes_order_deadlines_and_blocks(tmp_path):
    path = tmp_path / "journal.sqlite3"
    store = Store(path)
    rule = StoredRule(drop_rule(source_id="x", hard=60), installed_at=10.0)
    miss = StoredRule(rules.vigilance_mod(rules.ADD, priority=0, actions=[SECURE]), 5.0)
    tables = {TEMPLATE: [rule], "a": [miss, rule], "b": []}
    store.write(tables, {("a", "mallory"): 70.0, ("a", "forever"): 0.0}, wall_offset=1000.0)
    store.close()

    store = Store(path)  # another process, whose monotonic clock is 500 s behind
    state = store.load(wall_offset=1500.0)
    assert state.tables == {
        TEMPLATE: [StoredRule(rule.mod, -490.0)],
        "a": [StoredRule(miss.mod, -495.0), StoredRule(rule.mod, -490.0)],
        "b": [],
    }
    assert state.blocks == {("a", "mallory"): -430.0, ("a", "forever"): 0.0}
    store.write({"b": None, "a": [rule]}, None, wall_offset=1500.0)
    state = store.load(wall_offset=1500.0)
    assert set(state.tables) == {TEMPLATE, "a"} and len(state.tables["a"]) == 1
    assert len(state.blocks) == 2  # blocks=None leaves them as they were
    store.close()


def test_the_store_shares_the_journal_file(tmp_path):
    path = tmp_path / "journal.sqlite3"
    journal, store = Journal(path), Store(path)
    journal.record_admin(1.0, "operator/x", "ModRules", "{}", "ok")
    store.write({"a": [StoredRule(secure_rule(), 1.0)]}, {}, wall_offset=0.0)
    assert journal.admin_changes()[0]["who"] == "operator/x"
    assert store.load(0.0).tables["a"][0].mod == secure_rule()
    journal.close()
    store.close()


# --- the config's rules section --------------------------------------------------------


def test_config_rules_load_from_yaml_and_toml(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "rules:\n"
        "  - {match: 'model=mnist-cnn,source=plc-9', priority: 200, actions: [drop]}\n"
        "  - {agent: line-3, actions: 'inspect:400000:secure', send_removed: true}\n"
    )
    (tmp_path / "c.toml").write_text(
        "[[rules]]\nmatch = 'model=mnist-cnn,source=plc-9'\npriority = 200\nactions = ['drop']\n"
        "[[rules]]\nagent = 'line-3'\nactions = 'inspect:400000:secure'\nsend_removed = true\n"
    )
    y = cfgmod.load(tmp_path / "c.yaml").rules
    assert y == cfgmod.load(tmp_path / "c.toml").rules
    assert y[0].scope == ("all", "") and y[1].scope == ("agent", "line-3")
    mod = y[1].to_mod(10_000)
    assert mod.flags == rules.SEND_REMOVED and mod.actions[0] == SECURE


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"actions": ["dorp"]}, "rules[1].actions[0]: action 'dorp'"),
        ({"match": "colour=red", "actions": "drop"}, "rules[1].match: match field 'colour=red'"),
        ({"match": "label=x", "actions": "drop"}, "rules[1].match: label='x'"),
        ({"actions": ["drop", "allow"]}, "rules[1].actions: conflicting actions"),
        ({"actions": "inspect:1:weird"}, "rules[1].actions[0]: action 'inspect:1:weird'"),
        ({"actions": "drop", "hard_timeout": 5}, "rules[1].hard_timeout: config rules do not"),
        ({"actions": "drop", "cookie": 5}, "rules[1].cookie: unknown key"),
        ({"priority": 70000, "actions": "drop"}, "rules[1].priority: want 0..65535"),
        ({"priority": 0, "actions": "drop"}, "rules[1]: priority 0 with an empty match"),
        ({"match": "source=x"}, "rules[1].actions: required"),
        ({"actions": "drop", "agent": "a", "model": "m"}, "rules[1]: agent or model"),
        ({**PLC, "model": "m"}, "rules[1]: same priority and match as rules[0]"),
    ],
)
def test_config_rule_errors_name_the_entry(tmp_path, entry, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"rules": [PLC, entry]}))
    with pytest.raises(cfgmod.ConfigError) as err:
        cfgmod.load(path)
    assert f"{path}: {message}" in str(err.value)


def test_two_agents_may_have_the_same_entry():
    cfg = cfgmod.from_mapping({"rules": [{**LINE1}, {**LINE1, "agent": "line-2"}]})
    assert [r.scope for r in cfg.rules] == [("agent", "line-1"), ("agent", "line-2")]


# --- real processes: kill -9 and restart, SIGHUP --------------------------------------

SHAPE = (1, 28, 28)
BLOCKS = ("--cookie", hex(COOKIE_BLOCK), "--cookie-mask", hex(COOKIE_KIND_MASK))


@pytest.fixture
def guard(example_model):
    """An agent of a controller process, with its certificate (agent/<agent_id>)."""
    made = []

    def make(proc, agent_id, **kw):
        kw.setdefault("connect_timeout_s", 20)
        kw.setdefault("backoff_cap_s", 0.2)
        kw.update(proc.agent_tls(agent_id))
        g = attach(
            str(example_model),
            controller=proc.address,
            model_id=E2E_MODEL,
            input_shape=SHAPE,
            agent_id=agent_id,
            **kw,
        )
        assert g.connected, "agent did not reach MAIN"
        made.append(g)
        return g

    yield make
    for g in made:
        g.close()


def rules_cli(proc, *args):
    out = proc.cli("rules", "--controller", proc.address, *args)
    assert out.returncode == 0, out.stderr
    return out.stdout


def wait_for_log(proc, text, start=0, timeout_s=15.0):
    """The first log line from index ``start`` on that contains ``text``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in proc.log[start:]:
            if text in line:
                return line
        time.sleep(0.05)
    pytest.fail(f"no log line with {text!r}:\n" + "\n".join(proc.log[start:]))


def sighup(proc, new_rules=None, text=None):
    """Write the config (``new_rules``, or ``text`` as it is) and send SIGHUP; returns
    the log index to wait from."""
    if text is None:
        proc.config["rules"] = new_rules
        text = yaml.safe_dump(proc.config)
    proc.config_path.write_text(text)
    start = len(proc.log)
    proc.proc.send_signal(signal.SIGHUP)
    return start


@pytest.mark.integration
def test_an_operator_rule_survives_kill_9_and_restart(controller, guard, mnist):
    proc = controller(budget_us=400_000, echo_interval_s=0.2)
    g = guard(proc, "secure")
    add = ("add", "--agent", "secure", "--priority", "1", "--cookie", "0x5ec")
    assert "secure: ok" in rules_cli(proc, *add, "--action", "inspect:400000:secure")
    g.close()
    proc.kill()
    proc.start()  # the same ports and journal file

    listed = rules_cli(proc, "list")  # no agent connected
    assert "agent secure (desired; not connected)" in listed
    assert "cookie=0x5ec match=* actions=inspect:400000:secure" in listed

    g = guard(proc, "secure")  # it reconnects and its resync carries the rule
    listed = rules_cli(proc, "list", "--cookie", "0x5ec", "--cookie-mask", "0xffff")
    assert "agent secure\n" in listed and "(desired" not in listed
    assert "actions=inspect:400000:secure matched=0" in listed
    assert g(mnist.test.x[0]).decided_by == "controller"
    proc.kill()  # what the issue saw: the secure rule withholds again
    r = g(mnist.test.x[1])
    assert r.decided_by in ("timeout", "disconnected") and not r.released


@pytest.mark.integration
def test_a_block_is_not_extended_by_a_restart(controller, guard, fgsm, mnist):
    hard = 15
    proc = controller(trace_min_adversarial=2, trace_alpha=1e-3, block_hard_timeout_s=hard)
    g = guard(proc, "a")
    _, adv = fgsm
    hits = 0
    for x in adv[:60]:
        hits += g(x, source_id="mallory").verdict == "adversarial"
        if hits == 2:
            break
    blocked_at = time.monotonic()
    assert hits == 2
    proc.kill()
    proc.start()
    assert g.wait_connected(20)
    listed = rules_cli(proc, "list", *BLOCKS)  # what the agent has after its resync
    assert "match=source=mallory actions=drop" in listed
    left = int(listed.split(" hard=")[1].split()[0])
    assert left < hard  # what remained, not a fresh timeout
    assert "blocked sources" in "\n".join(proc.log)  # restored (startup log)
    r = g(mnist.test.x[0], source_id="mallory")
    assert (r.decided_by, r.released) == ("rule", False)

    time.sleep(max(0.0, blocked_at + hard + 1.5 - time.monotonic()))
    assert g(mnist.test.x[0], source_id="mallory").decided_by == "controller"
    assert "mallory" not in rules_cli(proc, "list", "--desired", *BLOCKS)


@pytest.mark.integration
def test_config_rules_are_installed_and_sighup_applies_the_diff(controller, guard, mnist):
    plc = {"match": "source=plc-9", "priority": 300, "actions": ["drop"]}
    line = {"agent": "line-1", "priority": 1, "actions": "inspect:3000000:secure"}
    proc = controller(rules=[plc, line])
    assert "config rules in force: rules[0] prio=300" in "\n".join(proc.log)
    g = guard(proc, "line-1")
    inputs = iter(mnist.test.x)  # a new one each time: a known one is decided by RT

    def decided(source):
        rules_cli(proc, "list")  # a round trip: what was sent before is in force
        r = g(next(inputs), source_id=source)
        return r.decided_by, r.released

    assert decided("plc-9") == ("rule", False)
    assert decided("eve")[0] == "controller"
    assert "ok" in rules_cli(proc, "add", "--match", "source=op", "--action", "drop")

    eve = {**plc, "match": "source=eve"}
    start = sighup(proc, [eve, {**line, "actions": "inspect:3000000:standalone"}])
    wait_for_log(proc, "SIGHUP: config rules reloaded: 1 added, 1 removed, 1 changed", start)
    assert decided("plc-9")[0] == "controller"
    assert decided("eve") == ("rule", False)
    assert decided("op") == ("rule", False)  # an operator rule: not the config's
    assert "inspect:3000000:standalone" in rules_cli(proc, "list", "--agent", "line-1")

    # An operator may delete a config rule; the next SIGHUP puts it back, and says so.
    config_kind = ("--cookie", hex(COOKIE_CONFIG), "--cookie-mask", hex(COOKIE_KIND_MASK))
    rules_cli(proc, "del", "--match", "source=eve", *config_kind)
    assert decided("eve")[0] == "controller"
    start = sighup(proc, proc.config["rules"])
    wait_for_log(proc, "put back for agent 'line-1'", start)
    assert decided("eve") == ("rule", False)

    # A broken file: one log line, nothing changes.
    start = sighup(proc, text="rules:\n  - {actions: [dorp]}\n")
    line = wait_for_log(proc, "SIGHUP: config not reloaded, rules unchanged", start)
    assert "rules[0].actions[0]: action 'dorp'" in line
    assert decided("eve") == ("rule", False)
    assert decided("plc-9")[0] == "controller"
    assert proc.alive()


def test_a_store_that_does_not_parse_is_refused(tmp_path):
    path = tmp_path / "journal.sqlite3"
    store = Store(path)
    store.write({"a": [StoredRule(secure_rule(), 1.0)]}, None, wall_offset=0.0)
    store._db.execute("UPDATE desired_rules SET mod = '{not json'")
    store._db.commit()
    with pytest.raises(ValueError, match="desired_rules 'a' #0"):
        store.load(0.0)
    store.close()
