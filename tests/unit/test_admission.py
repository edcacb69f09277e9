"""Admission control's pure parts (``services.frontend.admission``), driven with explicit times."""

import pytest

from services.frontend.admission import (
    Admission,
    AdmissionPolicy,
    CallerLimits,
    CallerLimitsConfig,
    CallerRate,
    LatencyLimit,
    ServiceEstimate,
    TokenBucket,
)


def run_window(limit: LatencyLimit, latency_s: float, in_flight: int, t0: float, n: int = 20) -> float:
    limit.note_in_flight(in_flight)
    step = limit.policy.window_s * 1.001 / (n - 1)  # the last sample closes the window
    for i in range(n):
        limit.observe(latency_s, t0 + i * step)
    return t0 + limit.policy.window_s * 1.001


def test_limit_shrinks_by_the_latency_ratio_at_most_halving():
    limit = LatencyLimit(AdmissionPolicy(latency_target_s=0.05, initial_limit=100))
    run_window(limit, 0.0625, in_flight=100, t0=0.0)
    assert limit.value == 80  # 100 x 50/62.5
    run_window(limit, 1.0, in_flight=80, t0=1.0)
    assert limit.value == 40  # at most halved


def test_limit_grows_only_when_it_was_used_and_latency_is_under_target():
    limit = LatencyLimit(AdmissionPolicy(latency_target_s=0.05, initial_limit=16))
    run_window(limit, 0.01, in_flight=4, t0=0.0)  # app-limited: stays
    assert limit.value == 16
    run_window(limit, 0.01, in_flight=15, t0=1.0)
    assert limit.value == 20  # 16 + sqrt(16)


def test_limit_stays_within_its_bounds():
    p = AdmissionPolicy(latency_target_s=0.05, initial_limit=8, min_limit=6, max_limit=9)
    limit = LatencyLimit(p)
    t = 0.0
    for _ in range(5):
        t = run_window(limit, 1.0, in_flight=8, t0=t) + 0.01
    assert limit.value == 6
    for _ in range(5):
        t = run_window(limit, 0.001, in_flight=limit.value, t0=t) + 0.01
    assert limit.value == 9


def test_limit_never_shrinks_below_what_carried_recent_throughput_within_the_target():
    """Latency over the target that queueing does not cause (a loop busy refusing calls) must
    not shrink the limit to a few requests: it holds at peak answers/s x target."""
    limit = LatencyLimit(AdmissionPolicy(latency_target_s=0.05, initial_limit=64, capacity_horizon_s=10.0))
    t = run_window(limit, 0.01, in_flight=10, t0=0.0, n=200)  # 200 answers in 0.5 s: 400/s
    for _ in range(6):
        t = run_window(limit, 0.5, in_flight=limit.value, t0=t) + 0.01  # slow, 40/s
    assert limit.value == int(200 / (0.5 * 1.001) * 0.05) == 19  # ~400/s x 50 ms, not min_limit
    assert limit.floor(t) == pytest.approx(20.0, rel=0.01)
    t = 20.0  # the peak is older than the horizon: the floor follows recent windows only
    for _ in range(4):
        t = run_window(limit, 0.5, in_flight=limit.value, t0=t) + 0.01
    assert limit.value == 4


def test_service_estimate_floor_plus_share_of_the_queue():
    est = ServiceEstimate(in_flight_batches=2, alpha=1.0, horizon_s=5.0)
    assert est.expected_s(10, 0.0) == 0.0  # nothing measured yet: admit
    est.observe_batch(0.010, 1, 0.0)
    est.observe_batch(0.040, 20, 1.0)
    assert est.fastest_s(1.0) == pytest.approx(0.010)
    assert est.per_request_s(1.0) == pytest.approx(0.001)  # 40 ms / 20 / 2 slots
    assert est.expected_s(30, 1.0) == pytest.approx(0.040)


def test_service_estimate_forgets_a_slow_spell():
    """Batches slowed by a fault (a paused shard) must not refuse short deadlines for ever."""
    est = ServiceEstimate(in_flight_batches=2, horizon_s=5.0)
    est.observe_batch(1.2, 1, 10.0)
    assert est.expected_s(0, 12.0) == pytest.approx(1.2)
    assert est.expected_s(5, 15.5) == 0.0  # forgotten: nothing recent, nothing refused
    est.observe_batch(0.008, 1, 16.0)
    assert est.expected_s(0, 16.0) == pytest.approx(0.008)


def test_token_bucket_refills_at_its_rate_up_to_its_burst():
    b = TokenBucket(10.0, 2.0, now=0.0)
    assert b.take(0.0) and b.take(0.0) and not b.take(0.0)
    assert b.wait_s(0.0) == pytest.approx(0.1)
    assert b.take(0.1) and not b.take(0.1)
    assert b.take(10.0) and b.take(10.0) and not b.take(10.0)


def test_caller_limits_per_identity_with_a_default():
    cfg = CallerLimitsConfig(default=CallerRate(1.0, 1.0), callers=(("batch-job", CallerRate(0.0)),))
    limits = CallerLimits(cfg)
    assert limits.take("web", 0.0) == 0.0
    assert limits.take("web", 0.0) == pytest.approx(1.0)
    assert limits.take("app", 0.0) == 0.0  # its own bucket
    assert all(limits.take("batch-job", 0.0) == 0.0 for _ in range(100))  # unlimited


def admission(**policy) -> Admission:
    p = AdmissionPolicy(**policy)
    return Admission(p, CallerLimits(CallerLimitsConfig()), ServiceEstimate(in_flight_batches=2, alpha=1.0))


def test_admission_sheds_past_the_limit_and_counts_why():
    a = admission(initial_limit=4, min_limit=1)
    assert all(a.check("c", 1.0, 0, 0.0) is None for _ in range(4))
    shed = a.check("c", 1.0, 0, 0.0)
    assert shed is not None and shed.reason == "concurrency" and shed.retry_after_s == pytest.approx(0.05)
    a.finished(0.01, 0.01)
    assert a.check("c", 1.0, 0, 0.02) is None
    assert a.shed == {"caller_rate": 0, "concurrency": 1, "deadline": 0} and a.admitted == 5


def test_admission_refuses_at_once_what_cannot_meet_its_deadline():
    a = admission()
    a.estimate.observe_batch(0.008, 1, 0.0)
    shed = a.check("c", 0.002, 0, 0.0)
    assert shed is not None and shed.reason == "deadline" and "2.0 ms left" in shed.message
    assert a.check("c", 0.5, 0, 0.0) is None and a.in_flight == 1


def test_admission_disabled_keeps_only_caller_rates():
    p = AdmissionPolicy(enabled=False, initial_limit=1, min_limit=1)
    a = Admission(p, CallerLimits(CallerLimitsConfig(default=CallerRate(1.0, 1.0))), ServiceEstimate(in_flight_batches=1))
    a.estimate.observe_batch(1.0, 1, 0.0)
    assert a.check("c", 0.001, 100, 0.0) is None  # over the limit and the deadline: still admitted
    shed = a.check("c", 0.001, 100, 0.0)
    assert shed is not None and shed.reason == "caller_rate"
