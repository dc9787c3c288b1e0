"""Pickers: weighted round robin, least request, ring hash, zone-aware (seeded randomness)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.balancer.least_request import LeastRequest
from sidecar.balancer.ring_hash import RingHash, hash_key
from sidecar.balancer.weighted import SCHEDULE_LIMIT, WeightedRoundRobin
from sidecar.balancer.xxh64 import xxh64
from sidecar.balancer.zone_aware import ZoneAware
from sidecar.model import Endpoint

# --- XXH64 ------------------------------------------------------------------------------------

# Published XXH64 digests (xxHash's reference implementation), covering every code path: the
# empty input, 1-3 byte tails, the 4- and 8-byte lanes, and the 32-byte stripes with a seed.
XXH64_VECTORS = [
    (b"", 0, 0xEF46DB3751D8E999),
    (b"", 1, 0xD5AFBA1336A3BE4B),
    (b"a", 0, 0xD24EC4F1A98C6E5B),
    (b"abc", 0, 0x44BC2CF5AD770999),
    (b"hello", 0, 0x26C7827D889F6DA3),
    (b"message digest", 0, 0x066ED728FCEEB3BE),
    (b"123456789012345", 0, 0xC377D78ADE001A3C),
    (b"1234567890123456789012345678901", 0, 0x8F367CB873A5376E),
    (b"12345678901234567890123456789012", 0, 0x40FD1AA52D98274C),
    (b"The quick brown fox jumps over the lazy dog", 0, 0x0B242D361FDA71BC),
    (b"Nobody inspects the spammish repetition", 123, 0xA8BA45551F24B7AE),
    (b"abc", 5381, 0x19D1C1B5C673451F),
]


@pytest.mark.parametrize(("data", "seed", "digest"), XXH64_VECTORS)
def test_xxh64_matches_the_reference_digests(data, seed, digest):
    assert xxh64(data, seed) == digest


# --- weighted round robin ---------------------------------------------------------------------


def test_equal_weights_are_plain_round_robin():
    wrr = WeightedRoundRobin(["a", "b", "c"], start=1)
    assert [wrr.pick() for _ in range(6)] == ["b", "c", "a", "b", "c", "a"]


def test_weights_are_exact_per_period_and_interleaved():
    wrr = WeightedRoundRobin(["a", "b"], [3, 1])
    seq = [wrr.pick() for _ in range(8)]
    assert seq == ["a", "a", "b", "a"] * 2  # the light endpoint is not sent to last in a burst
    wrr = WeightedRoundRobin(["x", "y", "z"], [70, 20, 10])
    assert Counter(wrr.pick() for _ in range(1000)) == {"x": 700, "y": 200, "z": 100}


@settings(max_examples=60, deadline=None)
@given(weights=st.lists(st.integers(0, 20), min_size=1, max_size=8),
       start=st.integers(0, 1000))
def test_any_window_of_one_period_gives_each_endpoint_exactly_its_weight(weights, start):
    items = [f"e{i}" for i in range(len(weights))]
    wrr = WeightedRoundRobin(items, weights, start=start)
    total = sum(weights)
    if total == 0:
        assert wrr.pick() is None
        return
    from math import gcd
    g = 0
    for w in weights:
        g = gcd(g, w)
    period = total // g
    picks = [wrr.pick() for _ in range(period * 2)]
    for offset in (0, period // 2, period):
        window = Counter(picks[offset:offset + period])
        assert window == {items[i]: w // g for i, w in enumerate(weights) if w}


def test_zero_weight_endpoints_get_nothing_and_all_zero_gives_none():
    wrr = WeightedRoundRobin(["drained", "a", "b"], [0, 2, 1])
    assert "drained" not in {wrr.pick() for _ in range(300)}
    assert WeightedRoundRobin(["a", "b"], [0, 0]).pick() is None
    assert WeightedRoundRobin([]).pick() is None
    with pytest.raises(ValueError, match="weights"):
        WeightedRoundRobin(["a"], [-1])
    with pytest.raises(ValueError, match="2 weights for 1"):
        WeightedRoundRobin(["a"], [1, 1])


def test_excluded_endpoints_are_skipped_and_all_excluded_means_all_are_used():
    wrr = WeightedRoundRobin(["a", "b", "c"])
    wrr.set_excluded({"b"})
    assert Counter(wrr.pick() for _ in range(100)) == {"a": 50, "c": 50}
    wrr.set_excluded({"a", "b", "c"})  # panic routing: every instance ejected
    assert Counter(wrr.pick() for _ in range(99)) == {"a": 33, "b": 33, "c": 33}
    wrr.set_excluded(())
    assert set(wrr.candidates) == {"a", "b", "c"}


def test_avoid_gives_another_endpoint_when_one_exists():
    wrr = WeightedRoundRobin(["a", "b", "c"], [5, 1, 1], rng=random.Random(1))
    assert all(wrr.pick(avoid="a") != "a" for _ in range(200))
    assert WeightedRoundRobin(["only"]).pick(avoid="only") == "only"
    wrr.set_excluded({"b", "c"})
    assert wrr.pick(avoid="a") == "a"  # the others are ejected: nothing else to try


def test_huge_weight_sums_fall_back_to_weighted_random():
    wrr = WeightedRoundRobin(["a", "b"], [SCHEDULE_LIMIT * 3, SCHEDULE_LIMIT + 1],
                             rng=random.Random(7))
    counts = Counter(wrr.pick() for _ in range(20000))
    assert counts["a"] / 20000 == pytest.approx(0.75, abs=0.02)
    assert set(wrr.candidates) == {"a", "b"}


# --- least request ----------------------------------------------------------------------------


def test_least_request_never_picks_the_busiest_endpoint():
    lr = LeastRequest(["busy", "a", "b", "c"], random.Random(3))
    while lr.in_flight("busy") == 0:  # leave one call in flight on 'busy' only
        picked = lr.pick()
        if picked != "busy":
            lr.finished(picked)
    for _ in range(500):
        picked = lr.pick()
        assert picked != "busy"
        lr.finished(picked)


def test_least_request_steers_away_from_a_slow_endpoint():
    lr = LeastRequest(["slow", "a", "b"], random.Random(11))
    finishing: list[tuple[int, str]] = []  # (step it finishes at, endpoint)
    served: Counter[str] = Counter()
    for step in range(3000):
        for done in [f for f in finishing if f[0] <= step]:
            finishing.remove(done)
            lr.finished(done[1])
        picked = lr.pick()
        served[picked] += 1
        # fast endpoints answer before the next call; the slow one takes 10 calls' time
        finishing.append((step + (10 if picked == "slow" else 1), picked))
    assert served["slow"] < 0.1 * 3000
    assert abs(served["a"] - served["b"]) < 0.1 * 3000


def test_least_request_spreads_idle_endpoints_and_counts_calls():
    lr = LeastRequest(["a", "b", "c"], random.Random(5))
    counts = Counter()
    for _ in range(3000):
        p = lr.pick()
        counts[p] += 1
        lr.finished(p)
    assert all(900 < counts[x] < 1100 for x in "abc")
    p = lr.pick()
    assert lr.in_flight(p) == 1
    lr.finished(p)
    lr.finished(p)  # a duplicate finish never goes below zero
    assert lr.in_flight(p) == 0
    lr.finished("unknown")  # an endpoint of an older list is ignored


def test_least_request_excluded_avoid_and_edge_cases():
    lr = LeastRequest(["a", "b", "c"], random.Random(2))
    lr.set_excluded({"a"})
    picks = {lr.pick() for _ in range(200)}
    assert picks == {"b", "c"}
    assert all(lr.pick(avoid="b") == "c" for _ in range(50))
    lr.set_excluded({"a", "b", "c"})  # all ejected: panic, all used
    assert {lr.pick() for _ in range(200)} == {"a", "b", "c"}
    assert LeastRequest([], random.Random(1)).pick() is None
    assert LeastRequest(["x"], random.Random(1)).pick(avoid="x") == "x"
    with pytest.raises(ValueError):
        LeastRequest(["a"], random.Random(1), choice_count=1)
    many = LeastRequest(list("abcdef"), random.Random(4), choice_count=50)  # capped at 10
    assert {many.pick(avoid="a") for _ in range(300)} <= set("bcdef")


# --- ring hash --------------------------------------------------------------------------------

ADDRS = [f"10.0.0.{i}:8080" for i in range(12)]
KEYS = [hash_key(f"user-{i}") for i in range(6000)]


def test_the_same_key_always_lands_on_the_same_endpoint_whatever_the_list_order():
    ring = RingHash(ADDRS[:5])
    shuffled = ADDRS[:5]
    random.Random(9).shuffle(shuffled)
    other = RingHash(shuffled)
    for k in KEYS[:2000]:
        assert ring.pick(k) == ring.pick(k) == other.pick(k)
    assert ring.pick(ring.hash_of("user-1")) == ring.pick(hash_key(b"user-1"))


@pytest.mark.parametrize("n", [2, 3, 5, 8, 11])
def test_adding_one_endpoint_moves_about_one_in_n_plus_one_keys_all_to_it(n):
    before = RingHash(ADDRS[:n])
    after = RingHash(ADDRS[:n + 1])
    moved = [k for k in KEYS if before.pick(k) != after.pick(k)]
    assert all(after.pick(k) == ADDRS[n] for k in moved)
    assert len(moved) / len(KEYS) <= 1.25 / (n + 1)
    assert len(moved) / len(KEYS) >= 0.75 / (n + 1)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 8), removed=st.integers(0, 8),
       keys=st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=60))
def test_a_change_of_one_endpoint_moves_only_the_keys_it_takes_or_had(n, removed, keys):
    base = ADDRS[:n]
    grown = RingHash([*base, "10.9.9.9:1"])
    ring = RingHash(base)
    for key in keys:
        h = hash_key(key)
        if grown.pick(h) != ring.pick(h):
            assert grown.pick(h) == "10.9.9.9:1"
    gone = base[removed % n]
    if n > 1:
        shrunk = RingHash([a for a in base if a != gone])
        for key in keys:
            h = hash_key(key)
            if ring.pick(h) != gone:
                assert shrunk.pick(h) == ring.pick(h)


def test_ring_size_follows_weights_and_is_capped():
    ring = RingHash(ADDRS[:3], replicas=100)
    assert ring.ring_size == 300
    weighted = RingHash(ADDRS[:3], weights=[1, 2, 3], replicas=100)
    assert weighted.ring_size == 600
    assert weighted.share(ADDRS[2]) == pytest.approx(0.5)
    hits = Counter(weighted.pick(k) for k in KEYS)
    assert hits[ADDRS[2]] / len(KEYS) == pytest.approx(0.5, abs=0.08)
    capped = RingHash(ADDRS[:2], weights=[1000, 1000], replicas=100, max_ring_size=5000)
    assert capped.ring_size <= 5000
    with pytest.raises(ValueError):
        RingHash(ADDRS[:1], replicas=0)
    with pytest.raises(ValueError):
        RingHash(ADDRS[:1], max_ring_size=0)


def test_ring_zero_weights_and_empty():
    ring = RingHash(ADDRS[:3], weights=[0, 1, 1])
    assert ADDRS[0] not in {ring.pick(k) for k in KEYS[:2000]}
    assert ring.share(ADDRS[0]) == 0.0
    assert RingHash(ADDRS[:2], weights=[0, 0]).pick(KEYS[0]) is None
    assert RingHash([]).pick(None) is None
    with pytest.raises(ValueError):
        RingHash(ADDRS[:1], weights=[-1])


def test_ejected_endpoint_keys_move_and_come_back_others_stay():
    ring = RingHash(ADDRS[:4])
    home = {k: ring.pick(k) for k in KEYS[:3000]}
    ring.set_excluded({ADDRS[1]})
    for k, endpoint in home.items():
        now = ring.pick(k)
        assert now != ADDRS[1]
        if endpoint != ADDRS[1]:
            assert now == endpoint
    ring.set_excluded(set(ADDRS[:4]))  # all ejected: panic, the ring as if none were
    assert all(ring.pick(k) == endpoint for k, endpoint in home.items())
    ring.set_excluded(())
    assert all(ring.pick(k) == endpoint for k, endpoint in home.items())


def test_ring_avoid_goes_to_the_next_endpoint_and_missing_key_is_random():
    ring = RingHash(ADDRS[:3], rng=random.Random(8))
    for k in KEYS[:500]:
        first = ring.pick(k)
        again = ring.pick(k, avoid=first)
        assert again != first and again == ring.pick(k, avoid=first)
    assert RingHash(ADDRS[:1]).pick(KEYS[0], avoid=ADDRS[0]) == ADDRS[0]
    randoms = Counter(ring.pick(None) for _ in range(3000))
    assert set(randoms) == set(ADDRS[:3])
    assert min(randoms.values()) > 700


def test_ring_key_cache_is_bounded():
    ring = RingHash(ADDRS[:2])
    for i in range(10000):
        ring.hash_of(f"k{i}")
    assert len(ring._key_cache) <= 4096


def test_ring_over_model_endpoints():
    eps = [Endpoint("10.0.0.1:1", 1), Endpoint("10.0.0.2:1", 3)]
    ring = RingHash(eps, key=lambda e: e.address, weights=[e.weight for e in eps])
    assert ring.share(eps[1]) == pytest.approx(0.75)


# --- zone aware -------------------------------------------------------------------------------

ZONES = {"l1": "z1", "l2": "z1", "l3": "z1", "r1": "z2", "r2": "z3"}


def _zone_aware(local="z1", seed=1, make=None):
    return ZoneAware(list(ZONES), ZONES.__getitem__, local,
                     make or (lambda items: WeightedRoundRobin(items)), random.Random(seed))


def _share_local(za, n=4000):
    return sum(ZONES[za.pick()] == "z1" for _ in range(n)) / n


def test_zone_aware_keeps_calls_local_while_enough_are_healthy():
    za = _zone_aware()
    assert _share_local(za) == 1.0
    za.set_excluded({"l1"})  # 2/3 healthy * 1.4 = 93% stays local
    assert za.local_share == pytest.approx(2 / 3 * 1.4)
    assert _share_local(za) == pytest.approx(0.933, abs=0.03)
    za.set_excluded({"l1", "l2"})  # 1/3 * 1.4 = 47%
    assert _share_local(za) == pytest.approx(0.467, abs=0.03)
    za.set_excluded({"l1", "l2", "l3"})  # none healthy locally: all remote
    assert _share_local(za) == 0.0
    za.set_excluded({"l1", "r1", "r2"})  # no healthy remote: stay local whatever the share
    assert _share_local(za) == 1.0
    za.set_excluded(set(ZONES))  # all ejected: panic, local as if healthy
    assert _share_local(za) == 1.0


def test_zone_aware_without_preference():
    for za in (_zone_aware(local=""), _zone_aware(local="elsewhere")):
        assert {za.pick() for _ in range(100)} == set(ZONES)
    only_local = ZoneAware(["a", "b"], lambda _: "z1", "z1", WeightedRoundRobin)
    assert only_local.local_share == 1.0 and {only_local.pick() for _ in range(10)} == {"a", "b"}
    with pytest.raises(ValueError):
        ZoneAware(["a"], lambda _: "z", "z", WeightedRoundRobin, overprovisioning=0)


def test_zone_aware_retry_crosses_zones_when_its_zone_has_nothing_else():
    za = _zone_aware()
    za.set_excluded({"l2", "l3"})
    picks = [za.pick(avoid="l1") for _ in range(300)]
    assert "l1" not in picks and set(picks) <= {"r1", "r2"}


def test_zone_aware_forwards_finished_to_least_request():
    pickers = {}

    def make(items):
        pickers[tuple(items)] = LeastRequest(items, random.Random(1))
        return pickers[tuple(items)]

    za = _zone_aware(make=make)
    local = pickers[("l1", "l2", "l3")]
    picked = za.pick()
    assert local.in_flight(picked) == 1
    za.finished(picked)
    assert local.in_flight(picked) == 0
    za.set_excluded({"l2", "l3"})
    swapped = za.pick(avoid="l1")  # l1 was counted, then replaced by a remote endpoint
    assert swapped in ("r1", "r2") and local.in_flight("l1") == 0
