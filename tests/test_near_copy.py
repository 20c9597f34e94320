"""Near-copy refusal: ADVERSARIAL RT entries carry a perceptual key, and agents refuse
inputs of the same model and label within a small Hamming distance of it without a
round trip (the key, the index against brute force, the tables, the agent core, and a
real controller pushing keys to another agent)."""

from __future__ import annotations

import numpy as np
import pytest

from openexample.perceptual import SKETCH_BYTES, NearIndex, dhash64, perceptual
from openexample.tables import LabelTables, ResultTable, fingerprint, label_entry, rt_push
from openexample.v1 import openexample_pb2 as pb
from tests.test_agent_core import LOGITS, SHAPE, decide, make_core, send, to_main

ADV = pb.VERDICT_ADVERSARIAL


def _image(seed: int, shape=(1, 16, 16)) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(np.float32)


S0 = bytes(SKETCH_BYTES)  # one thumbnail for the index tests: only keys differ there


def _flip(key: int, bits: list[int]) -> int:
    for b in bits:
        key ^= 1 << int(b)  # a Python int: numpy's int64 would wrap at bit 63
    return key


# ---- the key ----------------------------------------------------------------------------


def test_the_key_compares_neighbours_so_scale_and_dtype_do_not_matter():
    x = _image(1)
    assert dhash64(x) == dhash64(x[0]) == dhash64(2.0 * x)  # channel axis, contrast
    ramp = np.tile(np.arange(28, dtype=np.float32), (28, 1))  # brighter to the right
    assert dhash64(ramp) == 2**64 - 1 and dhash64(ramp[:, ::-1]) == 0
    assert dhash64(np.zeros((28, 28))) == 0
    u8 = (x * 255).round().astype(np.uint8)
    assert bin(dhash64(u8) ^ dhash64(u8.astype(np.float32) / 255)).count("1") == 0
    with pytest.raises(ValueError, match="needs an image"):
        dhash64(np.zeros(5))


def test_re_perturbed_attacks_move_few_bits_and_different_ones_many(fgsm):
    """What the index is for: FGSM adversarials re-sent with light noise stay within a
    few bits (flat clean backgrounds would not: noise decides their neighbour pairs,
    but those are never indexed), while different adversarials are far apart."""
    _, adv = fgsm
    adv = adv[:200]
    rng = np.random.default_rng(0)
    noisy = np.clip(adv + rng.normal(0, 0.02, adv.shape), 0, 1).astype(np.float32)
    near = [(dhash64(a) ^ dhash64(b)).bit_count() for a, b in zip(adv, noisy, strict=True)]
    far = [(dhash64(a) ^ dhash64(b)).bit_count() for a, b in zip(adv, adv[::-1], strict=True)]
    assert np.median(near) <= 1 and np.mean(np.array(near) <= 4) > 0.95
    assert np.median(far) >= 15


# ---- the index --------------------------------------------------------------------------


@pytest.mark.parametrize("radius", [1, 4, 7])
def test_the_index_finds_what_brute_force_finds(radius):
    rng = np.random.default_rng(radius)
    keys = [int(k) for k in rng.integers(0, 2**63, 300, dtype=np.int64)]
    keys = [k for k in keys if NearIndex.informative(k)]
    idx = NearIndex(radius)
    for i, k in enumerate(keys):
        idx.add("m", i % 3, k, S0, i)
    for q in range(300):
        base = keys[rng.integers(len(keys))]
        query = _flip(base, list(rng.choice(64, rng.integers(0, radius + 3), replace=False)))
        label = q % 3
        if not NearIndex.informative(query):
            assert idx.find("m", label, query, S0) is None
            continue
        dists = [((k ^ query).bit_count(), i) for i, k in enumerate(keys) if i % 3 == label]
        best = min(dists)
        got = idx.find("m", label, query, S0)
        if best[0] <= radius:
            assert got is not None and got[1] == best[0]
            assert (keys[got[0]] ^ query).bit_count() == best[0]
        else:
            assert got is None


def test_the_index_is_bounded_and_forgets():
    base = 0x0F0F0F0F0F0F0F0F
    keys = [base ^ (0xFF << (i * 8)) for i in range(5)]  # 16 bits apart
    idx = NearIndex(1, max_entries=3)
    for i, k in enumerate(keys):
        idx.add("m", 0, k, S0, i)
    assert len(idx) == 3 and idx.find("m", 0, keys[0], S0) is None  # the oldest went first
    assert idx.find("m", 0, keys[4] ^ 1, S0) == (4, 1)
    idx.remove(4)
    assert idx.find("m", 0, keys[4], S0) is None and idx.has("m", 0)
    idx.add("n", 0, base, S0, "other")
    idx.clear("m")
    assert not idx.has("m", 0) and idx.find("n", 0, base, S0) == ("other", 0)
    with pytest.raises(ValueError, match="radius"):
        NearIndex(16)


def test_a_key_match_needs_a_thumbnail_match_too(mnist):
    """Clean look-alikes: same-label pairs within 4 key bits are common, but their
    thumbnails differ, so they are not near-copies of each other."""
    x, y = mnist.test.x[:400], mnist.test.y[:400]
    idx = NearIndex(4)
    keys = [perceptual(a) for a in x]
    pairs = [
        (i, j)
        for i in range(len(x))
        for j in range(i + 1, len(x))
        if y[i] == y[j] and (keys[i][0] ^ keys[j][0]).bit_count() <= 4
    ]
    assert len(pairs) > 20  # look-alike keys are common
    matched = 0
    for i, j in pairs:
        idx.add("m", int(y[i]), *keys[i], i)
        matched += idx.find("m", int(y[j]), *keys[j]) is not None
        idx.remove(i)
    assert matched / len(pairs) < 0.02
    # a copy of a clean image with one pixel flipped still matches
    i = next(i for i, (k, _) in enumerate(keys) if NearIndex.informative(k))
    a = x[i].copy()
    idx.add("m", 0, *keys[i], "a")
    a[0, 14, 14] = 1.0 - a[0, 14, 14]
    assert idx.find("m", 0, *perceptual(a)) == ("a", (perceptual(a)[0] ^ keys[i][0]).bit_count())


def test_flat_images_are_never_near_copies():
    """A blank frame's key is 0 (no neighbour brighter): every other flat frame would be
    its near-copy, so keys with fewer than 8 set or unset bits are never indexed."""
    idx = NearIndex(4)
    for key in (0, 2**64 - 1, 0b1111111, (2**64 - 1) ^ 0b1111111):
        idx.add("m", 0, key, S0, key)
        assert idx.find("m", 0, key, S0) is None and len(idx) == 0
    assert dhash64(np.full((28, 28), 0.9, np.float32)) == 0


# ---- the tables -------------------------------------------------------------------------


def test_tables_index_adversarial_pushes_only_and_drop_stale_keys():
    tables = LabelTables(ResultTable(max_entries=2), near_radius=4)
    x = _image(2)
    key, sketch = perceptual(x)
    adv = label_entry(b"a" * 16, 1, ADV, near_key=key, near_sketch=sketch)
    benign = label_entry(b"b" * 16, 2, pb.VERDICT_BENIGN, near_key=key, near_sketch=sketch)
    tables.apply(rt_push("m", [adv, benign]), now=0.0)
    entry, distance = tables.near_copy("m", 1, x, now=0.0)
    assert entry.verdict == ADV and distance == 0
    assert tables.near_copy("m", 2, x, now=0.0) is None  # a benign key never releases
    assert tables.near_copy("m", 3, x, now=0.0) is None  # another label
    # the RT evicts the entry: the index lets go of it on the next lookup
    for i in range(2):
        tables.apply(rt_push("m", [label_entry(bytes([i]) * 16, 5, ADV)]), now=0.0)
    assert tables.near_copy("m", 1, x, now=0.0) is None and len(tables.near) == 0
    off = LabelTables(near_radius=0)
    off.apply(rt_push("m", [adv]), now=0.0)
    assert off.near is None and off.near_copy("m", 1, x, now=0.0) is None


# ---- the agent core ---------------------------------------------------------------------


def _pushed(core, x, label=1):
    key, sketch = perceptual(x)
    entry = label_entry(fingerprint(x), label, ADV, score=0.9, near_key=key, near_sketch=sketch)
    send(core, rt_push("m", [entry]))


def test_a_near_copy_is_refused_at_once_with_the_reason():
    core = to_main(make_core())
    x = np.random.default_rng(3).random(SHAPE).astype(np.float32)
    _pushed(core, x)
    copy = x.copy()
    copy[0, 0, 0] += 0.02  # one pixel nudged: another fingerprint (the image is 4x4)
    key_bits = (dhash64(copy) ^ dhash64(x)).bit_count()
    assert fingerprint(copy) != fingerprint(x) and key_bits <= 4
    res = decide(core, copy)
    assert (res.decided_by, res.verdict, res.released) == ("rt", "adversarial", False)
    assert (
        res.reason == f"near-copy of a known adversarial input ({key_bits} of 64 key bits differ)"
    )
    assert core.counters.near_copies == 1 and core.flush(0.0) == []
    # a clean input of the same label still goes to the controller
    assert type(decide(core, np.full(SHAPE, 0.5, np.float32))).__name__ == "Ticket"


def test_radius_zero_keeps_exact_fingerprints_only():
    core = to_main(make_core(near_copy_radius=0))
    x = np.random.default_rng(4).random(SHAPE).astype(np.float32)
    _pushed(core, x)
    copy = x.copy()
    copy[0, 0, 0] += 0.01
    assert type(decide(core, copy)).__name__ == "Ticket"
    assert decide(core, x).decided_by == "rt"


def test_the_agents_own_adversarial_verdicts_are_indexed_too():
    from tests.test_agent_core import deliver, pkg_out

    core = to_main(make_core())
    x = np.random.default_rng(5).random(SHAPE).astype(np.float32)
    ticket = decide(core, x)
    (env,) = core.flush(0.0)
    item = pb.PkgOutItem(verdict=ADV, action=pb.VERDICT_ACTION_DROP, score=0.9)
    deliver(core, *pkg_out(env.xid, item), now=0.0002)
    assert ticket.result is not None and ticket.result.verdict == "adversarial"
    copy = np.clip(x + 0.003, 0, 1)
    res = decide(core, copy, logits=LOGITS)
    assert res.decided_by == "rt" and res.reason.startswith("near-copy")


# ---- real processes -----------------------------------------------------------------------


@pytest.mark.integration
def test_a_near_copy_seen_through_one_agent_is_refused_by_another(controller, example_model, fgsm):
    from agents import attach

    proc = controller()
    guards = [
        attach(
            str(example_model),
            controller=proc.address,
            model_id="mnist-cnn",
            input_shape=(1, 28, 28),
            connect_timeout_s=20,
            **proc.agent_tls(name),
        )
        for name in ("line-1", "line-2")
    ]
    try:
        assert all(g.connected for g in guards)
        _, adv = fgsm
        for a in adv[:40]:
            first = guards[0](a)
            if first.verdict == "adversarial" and first.decided_by == "controller":
                break
        else:
            pytest.fail("no FGSM input was flagged")
        copy = a.copy()
        copy[0, 14, 14] = 1.0 - copy[0, 14, 14]  # re-sent with one pixel changed
        import time

        # the RT push reaches line-2 asynchronously: wait for it (asking before it came
        # would send the copy to the controller, and line-2 would then hold the copy's
        # own exact entry)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not guards[1].core.tables.near.has(
            "mnist-cnn", first.model_label
        ):
            time.sleep(0.05)
        res = guards[1](copy)
        assert (res.decided_by, res.verdict, res.released) == ("rt", "adversarial", False)
        assert res.reason.startswith("near-copy of a known adversarial input")
    finally:
        for g in guards:
            g.close()
