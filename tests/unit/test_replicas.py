"""The fan-out's pure decisions (``services.frontend.lookup.grpc.replicas``), driven with explicit times:
power of two choices over latency EWMA x outstanding, ejection backoff and probing, the p95
window that delays hedges, and the hedge budget."""

import random

import numpy as np
import pytest

from services.frontend.lookup.grpc.replicas import (
    HedgeBudget,
    LatencyWindow,
    PeakEwma,
    ReplicaBoard,
    ReplicaPolicy,
    ReplicaState,
    choose_replica,
)


def board(**policy) -> ReplicaBoard:
    return ReplicaBoard(ReplicaPolicy(**policy), random.Random(7))


def feed(b: ReplicaBoard, node: str, latency_s: float, n: int, now: float = 0.0) -> None:
    for i in range(n):
        b.succeeded(node, latency_s, now + i * 1e-4)


def picks(b: ReplicaBoard, pool: list[str], n: int = 2000, now: float = 0.1) -> dict[str, int]:
    out = {p: 0 for p in pool}
    for _ in range(n):
        out[b.pick(pool, now)] += 1
    return out


# -- choice ---------------------------------------------------------------------------------
def test_p2c_prefers_the_faster_replica():
    b = board()
    feed(b, "fast", 0.001, 20)
    feed(b, "slow", 0.010, 20)
    feed(b, "mid", 0.004, 20)
    counts = picks(b, ["fast", "slow", "mid"])
    # fast wins every pair it is drawn into (2 of 3 pairs); slow never wins one
    assert counts["slow"] == 0
    assert counts["fast"] > 0.6 * sum(counts.values())


def test_p2c_prefers_the_less_loaded_of_equally_fast_replicas():
    b = board()
    for n in ("a", "b"):
        feed(b, n, 0.002, 20)
    for _ in range(3):
        b.begin("a", 0.0)
    assert picks(b, ["a", "b"]) == {"a": 0, "b": 2000}
    # load outweighs a small latency edge: 1 ms x 4 calls > 2 ms x 1 call
    feed(b, "a", 0.001, 50, now=0.01)
    assert b.score("a", 0.1) > b.score("b", 0.1)


@pytest.mark.parametrize(
    "latencies, outstanding, want",
    [
        ({"a": 0.001, "b": 0.002}, {}, "a"),
        ({"a": 0.001, "b": 0.002}, {"a": 2}, "b"),  # 1 ms x 3 > 2 ms x 1
        ({"a": 0.003, "b": 0.002}, {"b": 1}, "a"),  # 2 ms x 2 > 3 ms x 1
        ({"a": 0.003, "b": 0.002}, {"a": 1, "b": 2}, "a"),  # 3 ms x 2 = 6 ms = 2 ms x 3: the first drawn
    ],
)
def test_p2c_table(latencies, outstanding, want):
    b = board()
    for n, lat in latencies.items():
        feed(b, n, lat, 10)
    for n, k in outstanding.items():
        for _ in range(k):
            b.begin(n, 0.0)
    if want == "a" and len(outstanding) == 2:  # a tie: either, whichever was drawn first
        assert b.score("a", 0.001) == pytest.approx(b.score("b", 0.001), rel=0.01)
        return
    assert b.pick(list(latencies), 0.001) == want


def test_reuse_a_node_already_chosen_for_the_batch_beats_a_faster_one():
    b = board()
    feed(b, "fast", 0.001, 20)
    feed(b, "slow", 0.010, 20)
    assert choose_replica(b, ["fast", "slow"], {"slow"}, 0.1) == "slow"
    assert choose_replica(b, ["fast", "slow"], set(), 0.1) == "fast"


def test_a_node_without_answers_is_scored_at_the_others_mean():
    b = board()
    feed(b, "a", 0.002, 10)
    feed(b, "b", 0.004, 10)
    assert b.score("new", 0.001) == pytest.approx((b.score("a", 0.001) + b.score("b", 0.001)) / 2)
    assert board().score("x", 0.0) == pytest.approx(1e-3)


def test_peak_ewma_jumps_up_then_decays_so_a_slow_node_is_tried_again():
    e = PeakEwma(decay_s=1.0)
    for i in range(20):
        e.observe(0.002, i * 0.001)
    assert e.value(0.02) == pytest.approx(0.002, rel=0.05)
    e.observe(0.050, 0.021)  # one slow answer: the cost jumps at once
    assert e.value(0.021) == pytest.approx(0.050)
    assert e.value(1.021) == pytest.approx(0.050 * np.exp(-1), rel=1e-6)
    assert e.value(5.0) < 0.002  # left alone long enough it looks cheap again
    e.observe(0.002, 0.5)  # a fast answer pulls it down in proportion to the time passed
    assert 0.002 < e.value(0.5) < 0.050


# -- ejection and probing ---------------------------------------------------------------------
def test_ejection_backoff_doubles_and_is_capped():
    b = board(eject_s=1.0, eject_max_s=5.0)
    now, lengths = 0.0, []
    for _ in range(5):
        assert b.failed("n", now)
        until = b.stats("n").ejected_until
        lengths.append(until - now)
        now = until  # the probe fails as soon as the ejection ends
    assert lengths == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_a_node_renewed_by_a_restart_is_usable_at_once():
    b = board(eject_s=1.0, eject_max_s=10.0)
    for now in (0.0, 1.0, 3.0):  # the old process: ejected three times in a row (backoff 4 s)
        assert b.failed("n", now)
    assert not b.usable("n", 4.0) and b.stats("n").failures == 3
    b.renewed("n")  # it registered again as another process
    assert b.usable("n", 4.0) and b.stats("n").failures == 0 and b.stats("n").state(4.0) is ReplicaState.HEALTHY
    b.renewed("never-seen")  # nothing to forget
    assert "never-seen" not in b.nodes


def test_probe_state_machine():
    b = board(eject_s=1.0)
    s = b.stats("n")
    assert s.state(0.0) is ReplicaState.HEALTHY and b.usable("n", 0.0)
    assert b.failed("n", 10.0)
    assert s.state(10.5) is ReplicaState.EJECTED and not b.usable("n", 10.5)
    # failures of calls already in flight while ejected do not extend it
    assert not b.failed("n", 10.6)
    assert s.ejected_until == 11.0
    # expired: probing, one call at a time
    assert s.state(11.0) is ReplicaState.PROBING and b.usable("n", 11.0)
    assert b.begin("n", 11.0) is True
    assert not b.usable("n", 11.1)
    assert b.begin("n", 11.1) is False  # a fallback call to it is not a second probe
    b.end("n", False)
    b.end("n", True)  # the probe was cancelled (a hedge won): probe again later
    assert b.usable("n", 11.2) and s.state(11.2) is ReplicaState.PROBING
    # the probe fails: ejected again, twice as long
    assert b.begin("n", 11.2)
    assert b.failed("n", 11.3)
    b.end("n", True)
    assert s.ejected_until == pytest.approx(13.3)
    # the next probe succeeds: healthy, backoff forgotten
    assert b.begin("n", 13.3)
    b.succeeded("n", 0.002, 13.31)
    b.end("n", True)
    assert s.state(13.31) is ReplicaState.HEALTHY and s.failures == 0 and s.outstanding == 0
    assert b.failed("n", 20.0) and s.ejected_until == 21.0


def test_hedges_lost_in_a_row_eject_a_stalled_node():
    b = board(stall_after_hedges_lost=3, eject_s=1.0)
    assert not b.lost_hedge("n", 0.01, 0.0)
    assert not b.lost_hedge("n", 0.01, 0.1)
    b.succeeded("n", 0.002, 0.2)  # an answer in between resets the count
    assert not b.lost_hedge("n", 0.01, 0.3)
    assert not b.lost_hedge("n", 0.01, 0.4)
    assert b.lost_hedge("n", 0.01, 0.5)
    assert b.stats("n").state(0.6) is ReplicaState.EJECTED
    # while probing after an ejection, one lost hedge is enough
    assert b.lost_hedge("n", 0.01, 1.6)
    assert b.stats("n").ejected_until == pytest.approx(3.6)


def test_a_late_node_is_to_blame_only_when_a_peer_answered_a_later_call_in_time():
    """``outpaced(node, sent, deadline)``: the evidence that a late call is the node's fault."""
    b = board()
    # a call to "slow" sent at t=1.0 with its deadline at 1.5; "peer" answered a call sent at
    # 1.1 at 1.102: well before the deadline -> "slow" is slower than its peer
    b.succeeded("peer", 0.002, 1.102)
    assert b.outpaced("slow", 1.0, 1.5)
    # a peer answer to a call sent BEFORE the late one proves nothing
    b2 = board()
    b2.succeeded("peer", 0.002, 0.952)  # sent 0.95
    assert not b2.outpaced("slow", 1.0, 1.5)
    # a frontend short of CPU: the peer's answer to a later call is noticed only after the late
    # call's deadline (both at 1.9 when the process runs again): not the node's fault
    b3 = board()
    b3.succeeded("peer", 0.8, 1.9)  # sent 1.1, noticed at 1.9
    assert not b3.outpaced("slow", 1.0, 1.5)
    # ... unless the peer had answered a later call in time before that
    b4 = board()
    b4.succeeded("peer", 0.01, 1.2)  # sent 1.19, noticed 1.2 <= 1.5
    b4.succeeded("peer", 0.8, 1.9)  # noticed after the deadline: skipped, the one before decides
    assert b4.outpaced("slow", 1.0, 1.5)
    # its own answers never count, and answers older than the memory are forgotten
    b5 = board()
    b5.succeeded("slow", 0.002, 1.2)
    assert not b5.outpaced("slow", 1.0, 1.5)
    b5.succeeded("peer", 0.002, 1.2)
    b5.succeeded("peer", 0.002, 4.0)  # 2.8 s later: the 1.2 answer is dropped
    assert len(b5.stats("peer").answered) == 1 and not b5.outpaced("slow", 1.0, 1.5)


# -- hedge delay ------------------------------------------------------------------------------
def test_latency_window_quantiles_nearest_rank():
    w = LatencyWindow(size=100)
    assert w.quantile(0.95) is None
    for v in range(1, 101):
        w.add(v / 1000)
    assert w.quantile(0.95) == pytest.approx(0.095)
    assert w.quantile(0.5) == pytest.approx(0.050)
    assert w.quantile(1.0) == pytest.approx(0.100)
    for _ in range(100):  # the window forgets: only the last 100 count
        w.add(0.001)
    assert w.quantile(0.95) == pytest.approx(0.001)


def test_latency_window_p95_of_a_skewed_sample():
    rng = np.random.default_rng(3)
    xs = rng.lognormal(-6, 0.5, size=128)
    w = LatencyWindow(size=128)
    for x in xs:
        w.add(float(x))
    assert w.quantile(0.95) == pytest.approx(float(np.sort(xs)[int(np.ceil(0.95 * 128)) - 1]))


def test_hedge_delay_is_the_nodes_p95_with_a_floor_and_overrides():
    b = board(min_latency_samples=8, hedge_min_delay_s=0.002)
    assert b.hedge_delay("a") is None  # nothing known anywhere: no hedge
    for i in range(100):
        b.succeeded("a", 0.001 * (1 + i % 20), i * 1e-3)  # 1..20 ms
    assert b.hedge_delay("a") == pytest.approx(0.019)
    assert b.hedge_delay("new") == pytest.approx(0.019)  # borrowed until it has its own
    feed(b, "quick", 0.0005, 20)
    assert b.hedge_delay("quick") == 0.002  # the floor
    assert board(hedge_delay_s=0.007).hedge_delay("x") == 0.007
    assert board(hedge_delay_s=0.0).hedge_delay("x") is None


def test_stall_delay_is_a_multiple_of_the_p95_with_a_floor_even_without_hedging():
    b = board(min_latency_samples=8, stall_factor=10.0, stall_min_s=0.1, hedge_delay_s=0.0)
    assert b.stall_delay("a") == 0.1  # nothing known: the floor
    for i in range(100):
        b.succeeded("a", 0.001 * (1 + i % 20), i * 1e-3)  # p95 19 ms
    assert b.stall_delay("a") == pytest.approx(0.19)
    assert b.stall_delay("new") == pytest.approx(0.19)  # borrowed until it has its own
    feed(b, "quick", 0.0005, 20)
    assert b.stall_delay("quick") == 0.1


# -- budget -----------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.5])
def test_hedge_budget_never_exceeds_its_share(ratio):
    budget = HedgeBudget(ratio, burst=10)
    rng = random.Random(1)
    rpcs = hedges = 0
    for _ in range(20_000):
        if rng.random() < 0.6:
            budget.earn()
            rpcs += 1
        else:  # a hedge of one node's units may be 1 or 2 RPCs; try as often as possible
            n = rng.choice([1, 1, 2])
            if budget.take(n):
                hedges += n
        assert hedges <= ratio * rpcs + 1e-9
    # and takers that keep asking get about the whole share (less what the burst cap dropped)
    assert hedges >= 0.99 * ratio * rpcs


def test_hedge_budget_burst_is_capped_and_empty_means_no_hedge():
    budget = HedgeBudget(0.05, burst=10)
    assert not budget.take()  # starts empty
    budget.earn(100_000)  # a long quiet period
    assert budget.tokens == 10
    assert sum(budget.take() for _ in range(50)) == 10
    assert not budget.take(2)
    budget.earn(20)  # 20 x 0.05 = one token
    assert not budget.take(2) and budget.take(1)
