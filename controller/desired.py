"""The controller's desired state, sans-I/O: what every agent's rule table should hold.

:class:`DesiredRules` is the durable part of :class:`controller.core.ControllerCore`,
which owns one and delegates to it. It keeps:

- **The template** (scope :data:`TEMPLATE`, ``""``): the rules an agent not seen yet
  gets. An operator's mod without a filter changes it and every agent's table.
- **One table per agent id**, kept across reconnects: a new one is a copy of the
  template (install times included), and an agent's resync installs its table as it
  stands. A mod for an ``agent_id`` never seen makes its table at once, so the mod waits
  for the agent.
- **The blocked sources**: (agent_id, source_id) -> expiry (0: none), the DROP rules
  source tracing installed (cookie ``COOKIE_BLOCK | n``, priority ``BLOCK_PRIORITY``).
- **Rules as code**: the config's ``rules`` (:meth:`DesiredRules.reload`, at start and on
  SIGHUP), with cookie ``COOKIE_CONFIG | hash(entry)`` so they are told apart from the
  operator's, which they never touch. A model-scoped one reaches an agent once it has
  declared the model. An operator may delete or change a config rule; it stays so
  (across reconnects too) until the next reload, which puts it back with a note.

The persistence model. Every change records what must be stored in a :class:`Changes`
(the core's ``Step`` is one): the scopes whose tables changed (``persist``) and whether
the blocks did (``persist_blocks``). The shell (controller/server.py) writes those
scopes as they stand, read with :meth:`DesiredRules.desired` and
:meth:`DesiredRules.blocks`, with controller/store.py before it sends anything. A table
is stored in install order, each rule as the ADD first given (its full hard timeout)
with its install time (:class:`StoredRule`), so a hard timeout keeps its absolute
deadline across restarts and reconnects. The default table-miss is not stored: it comes
from the config (``budget_us``, ``fail_mode``) at each start; an operator's change to it
is. At start, before anything listens, :meth:`DesiredRules.restore` takes back a
:class:`DesiredState`, dropping the rules and blocks whose deadline passed while the
controller was down; idle timers restart (the agents' idle time is not stored). Then
:meth:`DesiredRules.reload` applies the config's rules. Which config rules an agent
serves (by model) and which config rules each table was given are kept in memory only.

No clocks, sockets or threads: times come in as ``now`` (the core's clock; the shell
converts to and from unix time), and nothing here sends a message: the core sends what
changed to the live agents.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field

from controller.config import RuleConfig
from openexample import rules
from openexample.errors import ProtocolError
from openexample.v1 import openexample_pb2 as pb

# Rules the controller installs by itself carry a cookie in these ranges, so an
# operator can list or delete them with a cookie mask.
COOKIE_KIND_MASK = 0xFFFF_0000_0000_0000
COOKIE_DEFAULT = 0x0E00_0000_0000_0000
COOKIE_BLOCK = 0x0EB0_0000_0000_0000
COOKIE_CONFIG = 0x0EC0_0000_0000_0000  # rules as code: the low 48 bits hash the entry
BLOCK_PRIORITY = 0xFF00
_ALL_COOKIE_BITS = 0xFFFF_FFFF_FFFF_FFFF
# The template's scope in desired state (agent ids are never empty).
TEMPLATE = ""


@dataclass(frozen=True, slots=True)
class StoredRule:
    """A desired rule as the store keeps it: the ADD as first given (its full hard
    timeout) and when it was installed, in the core's time (the shell converts to and
    from unix time). Its hard timeout runs from ``installed_at``, across restarts."""

    mod: pb.VigilanceMod
    installed_at: float


@dataclass(slots=True)
class DesiredState:
    """The durable part of the core: the desired rules per scope (TEMPLATE or an agent
    id, in install order) and the blocked sources (expiry in core time, 0: none)."""

    tables: dict[str, list[StoredRule]] = field(default_factory=dict)
    blocks: dict[tuple[str, str], float] = field(default_factory=dict)


@dataclass(slots=True)
class RulesDiff:
    """What a reload of the config's rules changed, entry by entry (an entry is its
    scope, priority and match)."""

    added: list[RuleConfig] = field(default_factory=list)
    removed: list[RuleConfig] = field(default_factory=list)
    changed: list[tuple[RuleConfig, RuleConfig]] = field(default_factory=list)  # (old, new)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def summary(self) -> str:
        parts = [f"added {r.describe()}" for r in self.added]
        parts += [f"removed {r.describe()}" for r in self.removed]
        parts += [f"changed {o.describe()} -> {n.describe()}" for o, n in self.changed]
        n = (len(self.added), len(self.removed), len(self.changed))
        counts = "{} added, {} removed, {} changed".format(*n)
        return counts + (": " + "; ".join(parts) if parts else "")


@dataclass(slots=True)
class Changes:
    """What a change to desired state asks of the shell (the core's ``Step`` extends it).

    Desired state that changed and must be stored (controller/store.py) before the next
    step: rule scopes (TEMPLATE or an agent id; read them with
    :meth:`DesiredRules.desired`) and, when ``persist_blocks``, the blocked sources
    (:meth:`DesiredRules.blocks`). ``notes``: changes to desired state an operator
    should find in the log (config rules put back or removed, stored rules dropped at a
    restore).
    """

    persist: set[str] = field(default_factory=set)
    persist_blocks: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _ConfigRule:
    """A config rule as applied: its ADD (with its COOKIE_CONFIG cookie), its entry key
    (scope, priority, match) and its compiled actions."""

    spec: RuleConfig
    mod: pb.VigilanceMod
    key: tuple[tuple[str, str], int, rules.RuleMatch]
    actions: rules.RuleActions


def _is_block(mod: pb.VigilanceMod) -> bool:
    return mod.cookie & COOKIE_KIND_MASK == COOKIE_BLOCK


def _mods(stored: list[StoredRule]) -> list[bytes]:
    return [r.mod.SerializeToString(deterministic=True) for r in stored]


def _scope_name(scope: str) -> str:
    return "the template" if scope == TEMPLATE else f"agent {scope!r}"


class DesiredRules:
    """The desired rules per scope, the blocked sources and the config's rules in force.

    ``budget_us`` and ``fail_mode`` make the default table-miss (INSPECT) of every table.
    """

    def __init__(self, budget_us: int, fail_mode: str, now: float) -> None:
        self._budget_us = budget_us
        self._miss = rules.RuleActions.from_pb([rules.inspect(budget_us, fail_mode)])
        # Desired rules: the template for agents not seen yet, and one table per agent
        # id (kept across reconnects, so a reconnecting agent gets what it had).
        self.template = rules.RuleTable(self._miss, now=now)
        self.agent_rules: dict[str, rules.RuleTable] = {}
        # What each known agent last declared (for model-scoped config rules and the
        # desired-state listing; in memory only: unknown after a restart until it
        # connects again).
        self._agent_models: dict[str, frozenset[str]] = {}
        # Rules as code (Config.rules) as last applied, by cookie; and per scope the
        # cookies of those put in that table since the last start or SIGHUP. A rule the
        # operator then deleted or changed is left so until the next SIGHUP or restart.
        self.config_rules: tuple[RuleConfig, ...] = ()
        self._config_mods: dict[int, _ConfigRule] = {}
        self._config_applied: dict[str, set[int]] = {}
        # (agent_id, source_id) -> block expiry (0: none). Sources are namespaced by the
        # authenticated agent: one agent's claims never block another agent's users.
        # The core reads it (membership, size); only this class changes it.
        self.blocked: dict[tuple[str, str], float] = {}
        self._block_cookie = itertools.count(1)

    # --- reading: what the store keeps, what the admin API lists ---

    def _tables(self) -> Iterator[tuple[str, rules.RuleTable]]:
        yield TEMPLATE, self.template
        yield from list(self.agent_rules.items())

    def desired(self, scope: str) -> list[StoredRule] | None:
        """What the store keeps of a scope (TEMPLATE or an agent id), in install order;
        None if there is no such table. The default table-miss is left out: it comes
        from the config (budget_us, fail_mode) at each start; an operator's change to it
        is kept."""
        table = self.template if scope == TEMPLATE else self.agent_rules.get(scope)
        if table is None:
            return None
        *rest, miss = table
        out = []
        default = miss.actions == table.miss_actions and not (miss.cookie or miss.flags)
        if not default:
            out.append(StoredRule(miss.to_mod(), miss.installed_at))
        out += [StoredRule(r.to_mod(), r.installed_at) for r in rest]
        return out

    def blocks(self) -> dict[tuple[str, str], float]:
        """The blocked sources: (agent_id, source_id) -> expiry (0: none)."""
        return dict(self.blocked)

    def desired_state(self) -> DesiredState:
        """Everything the store keeps (:meth:`restore` takes it back)."""
        tables = {scope: self.desired(scope) or [] for scope, _ in self._tables()}
        return DesiredState(tables, self.blocks())

    def desired_rules(
        self,
        filt: pb.StatsRequest,
        now: float,
        *,
        agent_id: str = "",
        model_id: str = "",
        template: bool = True,
    ) -> list[tuple[str, list[pb.RuleStats]]]:
        """The desired rules as STATS RULES (match counts 0: agents count, not the
        controller), per scope: the template (when ``template`` and neither filter is
        set), then each known agent passing the filters (``model_id``: the agents known
        to serve it since the start). Raises ProtocolError for a bad filter match."""
        match = filt.match if filt.HasField("match") else None
        out = []
        if template and not agent_id and not model_id:
            out.append((TEMPLATE, self.template.stats(match, filt.cookie, filt.cookie_mask, now)))
        for aid in sorted(self.agent_rules):
            if agent_id and aid != agent_id:
                continue
            if model_id and model_id not in self._agent_models.get(aid, ()):
                continue
            table = self.agent_rules[aid]
            out.append((aid, table.stats(match, filt.cookie, filt.cookie_mask, now)))
        return out

    # --- changes: agents, the operator's mods, blocks, expiry ---

    def _copy_template(self, table: rules.RuleTable, now: float) -> None:
        """The template's rules into ``table`` with their install times: a hard timeout
        runs from when the rule was given, not from the copy."""
        entries = list(self.template)
        for rule in [entries[-1], *entries[:-1]]:
            table.restore(rule.to_mod(), rule.installed_at, now)

    def _agent_table(self, agent_id: str, now: float, changes: Changes) -> rules.RuleTable:
        """The agent's desired table; a new one is a copy of the template."""
        table = self.agent_rules.get(agent_id)
        if table is None:
            table = rules.RuleTable(self._miss, now=now)
            self._copy_template(table, now)
            self.agent_rules[agent_id] = table
            # Config rules the template had count as given to this table too: one the
            # operator deleted from all agents stays deleted for a new one.
            self._config_applied[agent_id] = set(self._config_applied.get(TEMPLATE, ()))
            changes.persist.add(agent_id)
        return table

    def for_agent(
        self, agent_id: str, models: Iterable[str], now: float, changes: Changes
    ) -> rules.RuleTable:
        """An agent's table for its resync, given the models it just declared: made from
        the template if new, with the config rules it lacks for those models (one the
        operator deleted or changed is not put back)."""
        self._agent_models[agent_id] = frozenset(models)
        table = self._agent_table(agent_id, now, changes)
        self._reconcile(agent_id, table, now, changes, readd=False)
        return table

    def apply(
        self,
        mod: pb.VigilanceMod,
        now: float,
        changes: Changes,
        *,
        agent_id: str = "",
        serving: Collection[str] | None = None,
    ) -> None:
        """An operator's VIGILANCE_MOD on the desired tables. No filter: the template and
        every agent's table; ``agent_id``: that agent's table (made now from the
        template if the agent was never seen, so the mod waits for it); ``serving`` (a
        model filter): the tables of the agents in it (the connected agents serving the
        model). Raises ProtocolError when the mod is invalid."""
        if agent_id and agent_id not in self.agent_rules and serving is None:
            scratch = rules.RuleTable(self._miss, now=now)  # validate before making a table
            self._copy_template(scratch, now)
            scratch.apply(mod, now)
            self._agent_table(agent_id, now, changes)
        targets = [
            (aid, t)
            for aid, t in self.agent_rules.items()
            if (not agent_id or aid == agent_id) and (serving is None or aid in serving)
        ]
        if not agent_id and serving is None:
            self.template.apply(mod, now)
            changes.persist.add(TEMPLATE)
        for aid, table in targets:
            table.apply(mod, now)
            changes.persist.add(aid)

    def block(self, key: tuple[str, str], now: float, hard_s: int) -> pb.VigilanceMod:
        """Block a source (agent_id, source_id) for ``hard_s`` seconds (0: for good);
        returns the DROP rule's ADD, for :meth:`apply` on its agent (the caller records
        ``persist_blocks``). The expiry is absolute: neither a reconnect nor a restart
        extends it."""
        self.blocked[key] = now + hard_s if hard_s else 0.0
        return self._block_mod(key, hard_s)

    def block_until(self, key: tuple[str, str], until: float | None, now: float) -> pb.VigilanceMod:
        """Block a source until ``until`` (None: for good), e.g. a block another
        controller made (controller/cluster.py); as :meth:`block`. The DROP rule's hard
        timeout is what remains, rounded up to a second."""
        hard_s = 0 if until is None else max(1, math.ceil(until - now))
        self.blocked[key] = 0.0 if until is None else until
        return self._block_mod(key, hard_s)

    def _block_mod(self, key: tuple[str, str], hard_s: int) -> pb.VigilanceMod:
        return rules.vigilance_mod(
            rules.ADD,
            match=pb.Match(source_id=key[1]),
            priority=BLOCK_PRIORITY,
            actions=[rules.drop()],
            cookie=COOKIE_BLOCK | next(self._block_cookie),
            hard_timeout_s=hard_s,
            flags=rules.SEND_REMOVED,
        )

    def unblock(self, key: tuple[str, str]) -> pb.VigilanceMod | None:
        """Lift a block (an operator's unblock, here or on another controller); returns
        the DELETE_STRICT of its DROP rule, for :meth:`apply` on its agent (the caller
        records ``persist_blocks``), or None if the source is not blocked."""
        if self.blocked.pop(key, None) is None:
            return None
        return rules.vigilance_mod(
            rules.DELETE_STRICT,
            match=pb.Match(source_id=key[1]),
            priority=BLOCK_PRIORITY,
            cookie=COOKIE_BLOCK,
            cookie_mask=COOKIE_KIND_MASK,
        )

    def expire(self, now: float, changes: Changes) -> None:
        """Drop the rules and blocks whose time is up: desired state follows the agents'
        own timeouts."""
        for scope, table in self._tables():
            n = len(table)
            table.expire(now)
            if len(table) != n:
                changes.persist.add(scope)
        for src, until in list(self.blocked.items()):
            if until and now >= until:
                del self.blocked[src]
                changes.persist_blocks = True

    # --- several controllers: the group master's rules (controller/mastership.py) ---

    def operator_tables(self) -> dict[str, list[StoredRule]]:
        """What a group's master replicates: each scope's desired rules (as
        :meth:`desired`) without the source-tracing blocks (they replicate on their own)."""
        return {
            scope: [r for r in self.desired(scope) or [] if not _is_block(r.mod)]
            for scope, _ in self._tables()
        }

    def adopt(self, tables: dict[str, list[StoredRule]], now: float, changes: Changes) -> list[str]:
        """The master's :meth:`operator_tables` become this controller's: each scope's
        rules are the master's, its blocks kept; a scope the master lacks (an agent it
        never saw) gets the master's template. Returns the scopes that changed (the
        caller resyncs their live agents). Rules past their hard deadline are left out."""
        template = tables.get(TEMPLATE, [])
        changed = []
        for scope in sorted(set(tables) | {s for s, _ in self._tables()}):
            want = tables.get(scope, template)
            mine = self.desired(scope) or []
            blocks = [r for r in mine if _is_block(r.mod)]
            if _mods(want) == _mods([r for r in mine if not _is_block(r.mod)]):
                continue
            table = rules.RuleTable(self._miss, now=now)
            for r in [*want, *blocks]:
                hard = r.mod.hard_timeout_s
                if hard and now >= r.installed_at + hard:
                    continue
                try:
                    table.restore(r.mod, r.installed_at, now)
                except ProtocolError as exc:
                    changes.notes.append(
                        f"the master's rule prio={r.mod.priority} for {_scope_name(scope)}"
                        f" not adopted: {exc}"
                    )
            if scope == TEMPLATE:
                self.template = table
            else:
                self.agent_rules[scope] = table
            changes.persist.add(scope)
            changed.append(scope)
        return changed

    # --- durable: restore at start; rules as code ---

    def restore(self, state: DesiredState, now: float, changes: Changes) -> None:
        """The desired state a previous run stored; call once, before any session and
        before :meth:`reload`.

        Hard timeouts keep their deadlines: a rule (or block) whose deadline passed while
        the controller was down is dropped, the others expire when they would have. Idle
        timers restart now: the agents' idle time is not stored.
        """
        dropped = 0
        for scope, stored in state.tables.items():
            table = rules.RuleTable(self._miss, now=now)
            for r in stored:
                hard = r.mod.hard_timeout_s
                if hard and now >= r.installed_at + hard:
                    dropped += 1
                    changes.persist.add(scope)
                    continue
                try:
                    table.restore(r.mod, r.installed_at, now)
                except ProtocolError as exc:
                    changes.persist.add(scope)
                    changes.notes.append(
                        f"stored rule prio={r.mod.priority} match={rules.match_text(r.mod.match)}"
                        f" for {_scope_name(scope)} dropped: {exc}"
                    )
            if scope == TEMPLATE:
                self.template = table
            else:
                self.agent_rules[scope] = table
        for key, until in state.blocks.items():
            if until and now >= until:
                changes.persist_blocks = True
                continue
            self.blocked[key] = until
        # New blocks take cookies after the highest one in use.
        in_use = [
            r.cookie & ~COOKIE_KIND_MASK
            for _, t in self._tables()
            for r in t
            if r.cookie & COOKIE_KIND_MASK == COOKIE_BLOCK
        ]
        self._block_cookie = itertools.count(max(in_use, default=0) + 1)
        n_rules = sum(len(t) - 1 for _, t in self._tables())
        changes.notes.append(
            f"restored {n_rules} rules for {len(self.agent_rules)} agents"
            f" and the template, {len(self.blocked)} blocked sources"
            + (f"; {dropped} rules expired while the controller was down" if dropped else "")
        )

    def reload(
        self, specs: Iterable[RuleConfig], now: float, changes: Changes
    ) -> tuple[RulesDiff, list[tuple[str, list[pb.VigilanceMod]]]]:
        """Rules as code: make the config's ``rules`` the config rules in force (at
        start, after :meth:`restore`, and on SIGHUP).

        Each table gets the config rules of its scope (all agents, one agent, or the
        agents serving a model, once the agent has said which models it serves); rules
        no longer in the config leave; a config rule an operator deleted or changed
        through the admin API is put back (a note says so). Operator rules are never
        touched: config rules are told apart by their cookie (COOKIE_CONFIG, the low bits
        a hash of the entry). Returns the diff against the config rules in force before,
        and per agent whose table changed the mods applied to it, for the caller to send
        to that agent if it is live.
        """
        specs = tuple(specs)
        entries: dict[int, _ConfigRule] = {}
        for spec in specs:
            mod = spec.to_mod(self._budget_us)
            kind, who = spec.scope
            digest = hashlib.blake2b(f"{kind}\0{who}\0".encode(), digest_size=6)
            digest.update(mod.SerializeToString(deterministic=True))
            mod.cookie = COOKIE_CONFIG | int.from_bytes(digest.digest(), "big")
            key = (spec.scope, spec.priority, rules.RuleMatch.from_pb(mod.match))
            actions = rules.RuleActions.from_pb(mod.actions)
            entries[mod.cookie] = _ConfigRule(spec, mod, key, actions)
        old = {e.key: e for e in self._config_mods.values()}
        new = {e.key: e for e in entries.values()}
        diff = RulesDiff(
            added=[e.spec for k, e in new.items() if k not in old],
            removed=[e.spec for k, e in old.items() if k not in new],
            changed=[
                (old[k].spec, e.spec)
                for k, e in new.items()
                if k in old and old[k].mod.cookie != e.mod.cookie
            ],
        )
        self.config_rules = specs
        self._config_mods = entries
        for spec in specs:
            if spec.agent:  # listed as desired state before the agent ever connects
                self._agent_table(spec.agent, now, changes)
        sends = []
        for scope, table in self._tables():
            mods = self._reconcile(scope, table, now, changes, readd=True)
            if scope != TEMPLATE and mods:
                sends.append((scope, mods))
        return diff, sends

    def _config_for(self, entry: _ConfigRule, scope: str) -> bool | None:
        """Whether a config rule belongs in ``scope``'s table; None: not known yet (a
        model-scoped rule and an agent whose models are not known since the start)."""
        kind, who = entry.spec.scope
        if scope == TEMPLATE:
            return kind == "all"
        if kind == "all":
            return True
        if kind == "agent":
            return who == scope
        models = self._agent_models.get(scope)
        return None if models is None else who in models

    def _reconcile(
        self, scope: str, table: rules.RuleTable, now: float, changes: Changes, *, readd: bool
    ) -> list[pb.VigilanceMod]:
        """Bring ``table``'s config rules in line with the config: remove those no
        longer in it (or not for this scope), add those missing. With ``readd`` (start,
        SIGHUP) one an operator deleted or changed is put back; without (an agent's
        resync) only rules this table never had are added. Returns the mods, applied to
        ``table`` already (the caller sends them to a live agent)."""
        applied = self._config_applied.setdefault(scope, set())
        mods: list[pb.VigilanceMod] = []
        for rule in list(table):
            if rule.cookie & COOKIE_KIND_MASK != COOKIE_CONFIG:
                continue
            entry = self._config_mods.get(rule.cookie)
            if entry is None or self._config_for(entry, scope) is False:
                mods.append(
                    rules.vigilance_mod(
                        rules.DELETE_STRICT,
                        match=rule.match,
                        priority=rule.priority,
                        cookie=rule.cookie,
                        cookie_mask=_ALL_COOKIE_BITS,
                    )
                )
                applied.discard(rule.cookie)
        for cookie, entry in self._config_mods.items():
            if not self._config_for(entry, scope):
                continue
            _, priority, match = entry.key
            rule = table.get(priority, match)
            if (
                rule is not None
                and rule.cookie == cookie
                and rule.actions == entry.actions
                and rule.flags == entry.mod.flags
                and not (rule.idle_timeout_s or rule.hard_timeout_s)
            ):
                applied.add(cookie)
                continue
            if cookie in applied:
                if not readd:
                    continue  # the operator deleted or changed it: so until SIGHUP/restart
                changes.notes.append(
                    f"config rule {entry.spec.describe()} put back for {_scope_name(scope)}"
                    " (an operator had deleted or changed it)"
                )
            mods.append(entry.mod)
            applied.add(cookie)
        done = []
        for mod in mods:
            try:
                table.apply(mod, now)
            except ProtocolError as exc:  # e.g. the table is full
                changes.notes.append(
                    f"config rule prio={mod.priority} match={rules.match_text(mod.match)}"
                    f" not installed for {_scope_name(scope)}: {exc}"
                )
                continue
            done.append(mod)
        if done:
            changes.persist.add(scope)
        return done
