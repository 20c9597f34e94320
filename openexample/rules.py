"""The vigilance rule table: OpenFlow 1.3 FLOW_MOD semantics for VIGILANCE_MOD.

Pure code: no clocks, no I/O, no threads. Every time-dependent call takes
``now`` (seconds, any monotonic origin) so the agent drives it and tests need no sleep.

- Entries are unique by (priority, match). Lookup returns the highest-priority
  matching entry; among equal priorities the one installed first. The priority-0
  all-wildcard table-miss entry always exists and sorts after everything else.
- ADD inserts or replaces; MODIFY / DELETE select entries whose match the mod's match
  covers (priority ignored); the *_STRICT forms select exactly (priority, match). A
  cookie filter ``(entry.cookie & mask) == (mod.cookie & mask)`` narrows MODIFY/DELETE.
- A mod is validated completely before anything changes, so a refused mod leaves the
  table as it was. Checks run in this order: command, priority, flags, match, actions
  (ADD/MODIFY only), EPERM, OVERLAP, TABLE_FULL.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from openexample.errors import ProtocolError, bad_request, vigilance_mod_failed
from openexample.limits import MAX_ID_BYTES, MAX_PRIORITY
from openexample.v1 import openexample_pb2 as pb

# Where a matching inference's verdict comes from.
INSPECT = "inspect"  # ask the controller, wait up to budget_us
ALLOW = "allow"  # release at once
DROP = "drop"  # withhold at once

DEFAULT_PRIORITY = 0x8000  # OpenFlow's OFP_DEFAULT_PRIORITY
MAX_BUDGET_US = 60_000_000

SEND_REMOVED = pb.VIGILANCE_MOD_FLAG_SEND_REMOVED
CHECK_OVERLAP = pb.VIGILANCE_MOD_FLAG_CHECK_OVERLAP
RESET_COUNTS = pb.VIGILANCE_MOD_FLAG_RESET_COUNTS
_KNOWN_FLAGS = SEND_REMOVED | CHECK_OVERLAP | RESET_COUNTS

ADD = pb.VIGILANCE_MOD_COMMAND_ADD
MODIFY = pb.VIGILANCE_MOD_COMMAND_MODIFY
MODIFY_STRICT = pb.VIGILANCE_MOD_COMMAND_MODIFY_STRICT
DELETE = pb.VIGILANCE_MOD_COMMAND_DELETE
DELETE_STRICT = pb.VIGILANCE_MOD_COMMAND_DELETE_STRICT

_FIELDS = ("model_id", "source_id", "label", "confidence_min", "confidence_max")
_FAIL_MODES = {"standalone": pb.FAIL_MODE_STANDALONE, "secure": pb.FAIL_MODE_SECURE}


def _fail(code: str, text: str) -> ProtocolError:
    """VIGILANCE_MOD_FAILED with the code named ``code`` ("BAD_MATCH", ...)."""
    return vigilance_mod_failed(
        pb.VigilanceModFailedCode.Value(f"VIGILANCE_MOD_FAILED_CODE_{code}"), text
    )


@dataclass(frozen=True, slots=True)
class RuleMatch:
    """Match fields; None is a wildcard. Confidence bounds are inclusive.

    Bounds travel as float32: build from the wire with from_pb (validated), and expect
    to_pb to round a bound set by hand that is not a float32 value.
    """

    model_id: str | None = None
    source_id: str | None = None
    label: int | None = None
    confidence_min: float | None = None
    confidence_max: float | None = None
    # Effective range, precomputed for the hot path (unset bound = -inf / +inf).
    _ranged: bool = field(init=False, repr=False, compare=False)
    _lo: float = field(init=False, repr=False, compare=False)
    _hi: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        lo, hi = self.confidence_min, self.confidence_max
        object.__setattr__(self, "_ranged", lo is not None or hi is not None)
        object.__setattr__(self, "_lo", -math.inf if lo is None else lo)
        object.__setattr__(self, "_hi", math.inf if hi is None else hi)

    @classmethod
    def from_pb(cls, m: pb.Match) -> RuleMatch:
        """Validated match (BAD_MATCH on over-long ids, non-finite or inverted bounds)."""
        mid, sid, label, lo, hi = (getattr(m, f) if m.HasField(f) else None for f in _FIELDS)
        for name, value in (("model_id", mid), ("source_id", sid)):
            if value is not None and len(value.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
                raise _fail("BAD_MATCH", f"{name} longer than {MAX_ID_BYTES} bytes")
        for bound in (lo, hi):
            if bound is not None and not math.isfinite(bound):
                raise _fail("BAD_MATCH", f"confidence bound {bound} is not finite")
        if lo is not None and hi is not None and lo > hi:
            raise _fail("BAD_MATCH", f"confidence_min {lo} > confidence_max {hi}")
        return cls(mid, sid, label, lo, hi)

    def to_pb(self) -> pb.Match:
        values = {f: getattr(self, f) for f in _FIELDS}
        return pb.Match(**{f: v for f, v in values.items() if v is not None})

    @property
    def is_wildcard(self) -> bool:
        return self == WILDCARD

    def matches(self, model_id: str, source_id: str, label: int, confidence: float) -> bool:
        """Whether one inference matches. Early outs, no allocation: this is the hot path."""
        if self.model_id is not None and self.model_id != model_id:
            return False
        if self.source_id is not None and self.source_id != source_id:
            return False
        if self.label is not None and self.label != label:
            return False
        # Written as `not (lo <= c <= hi)` on purpose: NaN fails every comparison, so a
        # NaN confidence never matches a ranged rule (it does match an unranged one).
        return not (self._ranged and not (self._lo <= confidence <= self._hi))

    def _exact(self) -> tuple[str | None, str | None, int | None]:
        return (self.model_id, self.source_id, self.label)

    def covers(self, other: RuleMatch) -> bool:
        """Whether self is at least as general: everything other matches, self matches."""
        pairs = zip(self._exact(), other._exact(), strict=True)
        exact = all(a is None or a == b for a, b in pairs)
        return exact and self._lo <= other._lo and other._hi <= self._hi

    def overlaps(self, other: RuleMatch) -> bool:
        """Whether some inference could match both."""
        pairs = zip(self._exact(), other._exact(), strict=True)
        exact = all(a is None or b is None or a == b for a, b in pairs)
        return exact and max(self._lo, other._lo) <= min(self._hi, other._hi)


WILDCARD = RuleMatch()


@dataclass(frozen=True, slots=True)
class RuleActions:
    """A rule's action list compiled for the hot path.

    ``verdict_source`` says who decides; ``mirror`` / ``sample_p`` add a copy to the
    controller that nobody waits for. ``budget_us`` / ``fail_mode`` only mean something
    for INSPECT (0 otherwise).
    """

    verdict_source: str = ALLOW
    budget_us: int = 0
    fail_mode: int = pb.FAIL_MODE_UNSPECIFIED
    mirror: bool = False
    sample_p: float = 0.0

    @classmethod
    def from_pb(cls, actions: Iterable[pb.Action]) -> RuleActions:
        """Validated actions (BAD_ACTION on anything missing, duplicate or conflicting)."""
        actions = list(actions)
        kinds = [a.WhichOneof("kind") for a in actions]
        if not kinds:
            raise _fail("BAD_ACTION", "no actions")
        if None in kinds:
            raise _fail("BAD_ACTION", "an action with no kind set")
        if len(set(kinds)) != len(kinds):
            raise _fail("BAD_ACTION", f"duplicate action kinds: {kinds}")
        verdicts = [k for k in kinds if k in (INSPECT, ALLOW, DROP)]
        copies = [k for k in kinds if k in ("mirror", "sample")]
        if len(verdicts) > 1:
            raise _fail("BAD_ACTION", f"conflicting actions: {verdicts}")
        # MIRROR sends every inference, so SAMPLE beside it is redundant; INSPECT already
        # sends every inference, so a copy beside it is too.
        if len(copies) > 1:
            raise _fail("BAD_ACTION", "MIRROR and SAMPLE together")
        if verdicts == [INSPECT] and copies:
            raise _fail("BAD_ACTION", f"{copies[0]} is redundant beside INSPECT")
        by_kind = dict(zip(kinds, actions, strict=True))
        budget_us, fail_mode, sample_p = 0, pb.FAIL_MODE_UNSPECIFIED, 0.0
        if INSPECT in by_kind:
            spec = by_kind[INSPECT].inspect
            if not 0 < spec.budget_us <= MAX_BUDGET_US:
                raise _fail("BAD_ACTION", f"inspect budget_us {spec.budget_us} out of range")
            if spec.fail_mode not in _FAIL_MODES.values():
                raise _fail("BAD_ACTION", f"inspect fail_mode {spec.fail_mode} unknown")
            budget_us, fail_mode = spec.budget_us, spec.fail_mode
        if "sample" in by_kind:
            sample_p = by_kind["sample"].sample.probability
            if not (math.isfinite(sample_p) and 0.0 < sample_p <= 1.0):
                raise _fail("BAD_ACTION", f"sample probability {sample_p} not in (0, 1]")
        # No verdict action: MIRROR/SAMPLE alone release at once (decision ALLOW).
        verdict = verdicts[0] if verdicts else ALLOW
        return cls(verdict, budget_us, fail_mode, "mirror" in by_kind, sample_p)

    def to_pb(self) -> list[pb.Action]:
        """Canonical action list; ``RuleActions.from_pb(a.to_pb()) == a``."""
        out = []
        if self.verdict_source == INSPECT:
            out.append(inspect(self.budget_us, self.fail_mode))
        elif self.verdict_source == DROP:
            out.append(drop())
        elif not (self.mirror or self.sample_p):
            out.append(allow())  # with a copy action ALLOW is implicit
        if self.mirror:
            out.append(mirror())
        if self.sample_p:
            out.append(sample(self.sample_p))
        return out


@dataclass(slots=True)
class Rule:
    """One table entry. ``seq`` orders equal priorities (lower = installed first)."""

    priority: int
    match: RuleMatch
    actions: RuleActions
    cookie: int = 0
    idle_timeout_s: int = 0
    hard_timeout_s: int = 0
    flags: int = 0
    installed_at: float = 0.0
    last_matched_at: float | None = None
    match_count: int = 0
    seq: int = 0

    @property
    def is_table_miss(self) -> bool:
        return self.priority == 0 and self.match.is_wildcard

    def deadlines(self) -> tuple[float, float]:
        """(hard, idle) removal times; inf where that timeout is 0 (never)."""
        hard = self.installed_at + self.hard_timeout_s if self.hard_timeout_s else math.inf
        last = self.installed_at
        if self.last_matched_at is not None and self.last_matched_at > last:
            last = self.last_matched_at
        idle = last + self.idle_timeout_s if self.idle_timeout_s else math.inf
        return hard, idle

    def _report(self, now: float) -> dict:
        # The fields VIGILANCE_REMOVED and RuleStats share.
        return dict(
            priority=self.priority,
            cookie=self.cookie,
            match=self.match.to_pb(),
            idle_timeout_s=self.idle_timeout_s,
            hard_timeout_s=self.hard_timeout_s,
            duration_s=now - self.installed_at,
            match_count=self.match_count,
        )

    def removed(self, reason: int, now: float) -> pb.VigilanceRemoved:
        return pb.VigilanceRemoved(reason=reason, **self._report(now))

    def stats(self, now: float) -> pb.RuleStats:
        return pb.RuleStats(actions=self.actions.to_pb(), flags=self.flags, **self._report(now))

    def remaining_hard_s(self, now: float) -> int:
        """What is left of the hard timeout at ``now``, in whole seconds rounded up
        (at least 1 while it has not passed; 0: no hard timeout, or it has passed)."""
        if not self.hard_timeout_s:
            return 0
        left = self.installed_at + self.hard_timeout_s - now
        if left <= 0:
            return 0
        # The epsilon keeps float noise (30 - 20 = 10.000000000001) from adding a second.
        return max(1, math.ceil(left - 1e-6))

    def to_mod(self, now: float | None = None) -> pb.VigilanceMod:
        """The ADD that installs this entry (fresh counters and timers).

        With ``now`` it is a replay of the entry as it stands: the hard timeout is what
        remains of it (:meth:`remaining_hard_s`), so a replay never extends it. The idle
        timeout is sent whole: the receiver's idle timer starts at the replay.
        """
        hard = self.hard_timeout_s
        if now is not None and hard:
            hard = self.remaining_hard_s(now)
            if not hard:
                raise ValueError(f"rule {self.match} at priority {self.priority} has expired")
        return vigilance_mod(
            ADD,
            match=self.match,
            priority=self.priority,
            actions=self.actions.to_pb(),
            cookie=self.cookie,
            idle_timeout_s=self.idle_timeout_s,
            hard_timeout_s=hard,
            flags=self.flags,
        )


def _sort_key(rule: Rule) -> tuple[int, bool, int]:
    # The table-miss sorts after priority-0 rules too, or it would shadow them.
    return (-rule.priority, rule.is_table_miss, rule.seq)


class RuleTable:
    """An agent's vigilance rule table (one OpenFlow flow table)."""

    def __init__(self, miss_actions: RuleActions, max_rules: int = 4096, now: float = 0.0):
        # Round-tripped to validate and canonicalize (e.g. sample_p as a float32).
        self.miss_actions = RuleActions.from_pb(miss_actions.to_pb())
        self.max_rules = max_rules
        self.lookup_count = 0
        self.hit_count = 0
        self._seq = 0
        self._by_key: dict[tuple[int, RuleMatch], Rule] = {}
        self._entries: list[Rule] = []  # lookup order; the table-miss is always last
        self._install(self._fresh_miss(now))

    # -- hot path -------------------------------------------------------------------

    @property
    def table_miss(self) -> Rule:
        """The entry that decides what no other rule matches (always present)."""
        return self._entries[-1]

    def lookup(
        self, model_id: str, source_id: str, label: int, confidence: float, now: float
    ) -> Rule:
        """The entry that decides this inference; updates its counters."""
        self.lookup_count += 1
        entries = self._entries
        for rule in entries:  # never runs off the end: the table-miss (last) matches all
            if rule.match.matches(model_id, source_id, label, confidence):
                break
        if rule is not entries[-1]:
            self.hit_count += 1
        rule.match_count += 1
        rule.last_matched_at = now
        return rule

    # -- mods -----------------------------------------------------------------------

    def apply(self, mod: pb.VigilanceMod, now: float) -> list[pb.VigilanceRemoved]:
        """Apply one VIGILANCE_MOD; returns the removal notices it caused (DELETE only)."""
        command = mod.command
        if command not in (ADD, MODIFY, MODIFY_STRICT, DELETE, DELETE_STRICT):
            raise _fail("BAD_COMMAND", f"unknown command {command}")
        if mod.priority > MAX_PRIORITY:
            raise _fail("BAD_PRIORITY", f"priority {mod.priority} > {MAX_PRIORITY}")
        if mod.flags & ~_KNOWN_FLAGS:
            raise _fail("BAD_FLAGS", f"unknown flag bits in {mod.flags:#x}")
        match = RuleMatch.from_pb(mod.match)
        if command == ADD:
            self._add(mod, match, RuleActions.from_pb(mod.actions), now)
            return []
        strict = command in (MODIFY_STRICT, DELETE_STRICT)
        selected = self._select(match, mod.priority, mod.cookie, mod.cookie_mask, strict)
        if command in (MODIFY, MODIFY_STRICT):
            actions = RuleActions.from_pb(mod.actions)
            for rule in selected:
                rule.actions = actions
                if mod.flags & RESET_COUNTS:
                    rule.match_count = 0
            return []
        notices = []
        for rule in selected:
            if rule.is_table_miss:
                # Never removed: back to the table's default, silently.
                self._install(self._fresh_miss(now))
            else:
                self._remove(rule)
                if rule.flags & SEND_REMOVED:
                    notices.append(rule.removed(pb.REMOVED_REASON_DELETE, now))
        return notices

    def _add(
        self, mod: pb.VigilanceMod, match: RuleMatch, actions: RuleActions, now: float
    ) -> None:
        key = (mod.priority, match)
        old = self._by_key.get(key)
        if key == (0, WILDCARD) and (mod.idle_timeout_s or mod.hard_timeout_s):
            raise _fail("EPERM", "the table-miss rule cannot time out")
        if mod.flags & CHECK_OVERLAP:
            for rule in self._entries:
                same_priority = rule.priority == mod.priority and rule.match != match
                if same_priority and rule.match.overlaps(match):
                    raise _fail("OVERLAP", f"overlaps {rule.match} at priority {rule.priority}")
        if old is None and len(self._entries) - 1 >= self.max_rules:
            raise _fail("TABLE_FULL", f"{self.max_rules} rules")
        keep_counts = old is not None and not mod.flags & RESET_COUNTS
        self._install(
            Rule(
                priority=mod.priority,
                match=match,
                actions=actions,
                cookie=mod.cookie,
                idle_timeout_s=mod.idle_timeout_s,
                hard_timeout_s=mod.hard_timeout_s,
                flags=mod.flags,
                installed_at=now,
                match_count=old.match_count if keep_counts else 0,
            )
        )

    def _select(
        self, match: RuleMatch, priority: int, cookie: int, mask: int, strict: bool
    ) -> list[Rule]:
        if strict:
            hit = self._by_key.get((priority, match))
            candidates = [hit] if hit is not None else []
        else:
            candidates = [r for r in self._entries if match.covers(r.match)]
        return [r for r in candidates if (r.cookie & mask) == (cookie & mask)]

    def _fresh_miss(self, now: float) -> Rule:
        return Rule(priority=0, match=WILDCARD, actions=self.miss_actions, installed_at=now)

    def _install(self, rule: Rule) -> None:
        """Insert or replace by (priority, match); a (re)install takes a new seq."""
        self._seq += 1
        rule.seq = self._seq
        self._by_key[(rule.priority, rule.match)] = rule
        self._resort()

    def _remove(self, rule: Rule) -> None:
        del self._by_key[(rule.priority, rule.match)]
        self._resort()

    def _resort(self) -> None:
        # Sorting on every mod keeps lookup a plain scan; mods are rare, lookups are not.
        self._entries = sorted(self._by_key.values(), key=_sort_key)

    # -- timeouts -------------------------------------------------------------------

    def expire(self, now: float) -> list[pb.VigilanceRemoved]:
        """Remove entries whose timeout has passed; notices for SEND_REMOVED ones."""
        notices = []
        for rule in self._entries:
            hard, idle = rule.deadlines()
            if now >= hard:  # checked first: hard wins when both have passed
                reason = pb.REMOVED_REASON_HARD_TIMEOUT
            elif now >= idle:
                reason = pb.REMOVED_REASON_IDLE_TIMEOUT
            else:
                continue
            self._remove(rule)  # safe: _resort rebinds self._entries, not the list we scan
            if rule.flags & SEND_REMOVED:
                notices.append(rule.removed(reason, now))
        return notices

    def next_expiry(self) -> float | None:
        """Earliest time at which expire() would remove something (None: never)."""
        soonest = min((min(rule.deadlines()) for rule in self._entries), default=math.inf)
        return None if soonest == math.inf else soonest

    # -- introspection ----------------------------------------------------------------

    def get(self, priority: int, match: RuleMatch) -> Rule | None:
        """The entry at exactly (priority, match), if any (no counters change)."""
        return self._by_key.get((priority, match))

    def stats(
        self,
        match: pb.Match | None = None,
        cookie: int = 0,
        cookie_mask: int = 0,
        now: float = 0.0,
    ) -> list[pb.RuleStats]:
        """RULES stats for entries covered by ``match`` (None = all) passing the cookie filter."""
        try:
            wanted = WILDCARD if match is None else RuleMatch.from_pb(match)
        except ProtocolError as e:
            raise bad_request(pb.BAD_REQUEST_CODE_BAD_FIELD, e.text) from None
        selected = self._select(wanted, 0, cookie, cookie_mask, strict=False)
        return [rule.stats(now) for rule in selected]

    def table_stats(self) -> pb.TableStats:
        return pb.TableStats(
            table="rules",
            active_count=len(self._entries),
            max_entries=self.max_rules + 1,  # + the table-miss, like active_count
            lookup_count=self.lookup_count,
            hit_count=self.hit_count,  # eviction_count stays 0: a full table refuses ADDs
        )

    def snapshot(self, now: float | None = None) -> list[pb.VigilanceMod]:
        """ADDs that rebuild this table in a fresh one (counters and timers restart).

        With ``now`` the hard timeouts keep their deadlines: rules whose hard timeout
        has passed are left out, the others carry what remains of it (rounded up to a
        whole second, :meth:`Rule.to_mod`). Idle timers restart at the replay.

        The table-miss goes first: replayed last, a CHECK_OVERLAP on it would hit the
        priority-0 rules already replayed.
        """
        ordered = [self._entries[-1], *self._entries[:-1]]
        if now is None:
            return [rule.to_mod() for rule in ordered]
        live = [r for r in ordered if not r.hard_timeout_s or r.remaining_hard_s(now)]
        return [rule.to_mod(now) for rule in live]

    def restore(self, mod: pb.VigilanceMod, installed_at: float, now: float) -> Rule:
        """Install the ADD ``mod`` as an entry first installed at ``installed_at`` (a
        copy from another table, or a rule read back from storage): its hard timeout
        counts from then, so it never extends. Its idle timer starts at ``now``: idle
        time before a copy or a restart is not known here. Validated as :meth:`apply`.
        """
        if mod.command != ADD:
            raise _fail("BAD_COMMAND", f"restore takes an ADD, got command {mod.command}")
        self.apply(mod, now)
        rule = self._by_key[(mod.priority, RuleMatch.from_pb(mod.match))]
        rule.installed_at = installed_at
        rule.last_matched_at = max(now, installed_at)
        return rule

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self._entries)


# -- builders ---------------------------------------------------------------------


def parse_fail_mode(name: str) -> int:
    """``"standalone"`` / ``"secure"`` (any case, FAIL_MODE_ prefix optional) -> enum."""
    key = name.strip().lower().removeprefix("fail_mode_")
    if key not in _FAIL_MODES:
        raise _fail("BAD_ACTION", f"unknown fail mode {name!r} (standalone or secure)")
    return _FAIL_MODES[key]


def inspect(budget_us: int, fail_mode: str | int = "standalone") -> pb.Action:
    mode = parse_fail_mode(fail_mode) if isinstance(fail_mode, str) else fail_mode
    return pb.Action(inspect=pb.Inspect(budget_us=budget_us, fail_mode=mode))


def allow() -> pb.Action:
    return pb.Action(allow=pb.Allow())


def drop() -> pb.Action:
    return pb.Action(drop=pb.Drop())


def mirror() -> pb.Action:
    return pb.Action(mirror=pb.Mirror())


def sample(p: float) -> pb.Action:
    return pb.Action(sample=pb.Sample(probability=p))


def vigilance_mod(
    command: int | str,
    *,
    match: pb.Match | RuleMatch | None = None,
    priority: int = DEFAULT_PRIORITY,
    actions: Iterable[pb.Action] = (),
    cookie: int = 0,
    cookie_mask: int = 0,
    idle_timeout_s: int = 0,
    hard_timeout_s: int = 0,
    flags: int = 0,
) -> pb.VigilanceMod:
    """A VigilanceMod; ``command`` is an enum value or a name like ``"modify_strict"``."""
    if isinstance(command, str):
        name = "VIGILANCE_MOD_COMMAND_" + command.strip().upper()
        if name not in pb.VigilanceModCommand.keys():  # noqa: SIM118 (not a dict)
            raise _fail("BAD_COMMAND", f"unknown command {command!r}")
        command = pb.VigilanceModCommand.Value(name)
    if isinstance(match, RuleMatch):
        match = match.to_pb()
    return pb.VigilanceMod(
        command=command,
        cookie=cookie,
        cookie_mask=cookie_mask,
        priority=priority,
        idle_timeout_s=idle_timeout_s,
        hard_timeout_s=hard_timeout_s,
        flags=flags,
        match=match,
        actions=list(actions),
    )


# -- text syntax (the operator CLI and the config's rules) ---------------------------

MATCH_KEYS = ("model", "source", "label", "confidence")


def parse_match(text: str) -> pb.Match:
    """``model=mnist,source=user7,label=3,confidence=0:0.5`` -> pb.Match ("" matches all).

    Raises ValueError naming the bad part.
    """
    m = pb.Match()
    if not text:
        return m
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in MATCH_KEYS:
            raise ValueError(f"match field {part!r}: want one of {', '.join(MATCH_KEYS)}=VALUE")
        if key == "model":
            m.model_id = value
        elif key == "source":
            m.source_id = value
        elif key == "label":
            try:
                m.label = int(value)
            except ValueError:
                raise ValueError(f"label={value!r}: want an integer") from None
        else:
            lo, sep, hi = value.partition(":")
            if not sep:
                raise ValueError(f"confidence={value!r}: want LO:HI (either may be empty)")
            try:
                if lo:
                    m.confidence_min = float(lo)
                if hi:
                    m.confidence_max = float(hi)
            except ValueError:
                raise ValueError(f"confidence={value!r}: want numbers LO:HI") from None
    return m


def parse_action(text: str, default_budget_us: int) -> pb.Action:
    """``inspect[:BUDGET_US[:standalone|secure]]``, ``allow``, ``drop``, ``mirror``,
    ``sample:P`` -> pb.Action. An inspect without a budget gets ``default_budget_us``.

    Raises ValueError naming the action (the action list itself is checked by
    :meth:`RuleActions.from_pb`).
    """
    kind, *args = text.strip().split(":")
    try:
        if kind == "inspect" and len(args) <= 2:
            budget = int(args[0]) if args and args[0] else default_budget_us
            mode = args[1] if len(args) > 1 else "standalone"
            return inspect(budget, mode)
        if kind in ("allow", "drop", "mirror") and not args:
            return {"allow": allow, "drop": drop, "mirror": mirror}[kind]()
        if kind == "sample" and len(args) == 1:
            return sample(float(args[0]))
    except (ValueError, ProtocolError) as exc:
        raise ValueError(f"action {text!r}: {getattr(exc, 'text', exc)}") from None
    raise ValueError(
        f"action {text!r}: want inspect[:BUDGET_US[:MODE]], allow, drop, mirror or sample:P"
    )


def match_text(m: pb.Match) -> str:
    """The :func:`parse_match` syntax of ``m`` ("*" for the all-wildcard)."""
    parts = []
    for f, name in (("model_id", "model"), ("source_id", "source"), ("label", "label")):
        if m.HasField(f):
            parts.append(f"{name}={getattr(m, f)}")
    if m.HasField("confidence_min") or m.HasField("confidence_max"):
        lo = f"{m.confidence_min:g}" if m.HasField("confidence_min") else ""
        hi = f"{m.confidence_max:g}" if m.HasField("confidence_max") else ""
        parts.append(f"confidence={lo}:{hi}")
    return ",".join(parts) or "*"


def actions_text(a: RuleActions) -> str:
    """``inspect:400000:secure``, ``drop+mirror``, ... (close to :func:`parse_action`)."""
    text = a.verdict_source
    if a.verdict_source == INSPECT:
        mode = "secure" if a.fail_mode == pb.FAIL_MODE_SECURE else "standalone"
        text += f":{a.budget_us}:{mode}"
    if a.mirror:
        text += "+mirror"
    if a.sample_p:
        text += f"+sample:{a.sample_p:g}"
    return text
