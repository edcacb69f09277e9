"""The circuit breaker's state machine (``services.core.breaker``), driven with explicit times."""

import pytest

from services.core.breaker import BreakerPolicy, BreakerState, CircuitBreaker


def breaker(**policy) -> CircuitBreaker:
    return CircuitBreaker(BreakerPolicy(**policy))


def test_opens_after_failures_in_a_row_and_a_success_resets_the_count():
    b = breaker(failures_to_open=3, open_s=1.0)
    assert not b.failed(0.0) and not b.failed(0.1)
    b.succeeded()
    assert not b.failed(0.2) and not b.failed(0.3)
    assert b.state(0.3) is BreakerState.CLOSED
    assert b.failed(0.4)
    assert b.state(0.5) is BreakerState.OPEN and not b.usable(0.5)
    assert b.retry_after_s(0.5) == pytest.approx(0.9)


def test_half_open_lets_one_probe_through_and_its_outcome_decides():
    b = breaker(failures_to_open=1, open_s=1.0, open_max_s=3.0)
    b.failed(0.0)
    assert b.state(1.0) is BreakerState.HALF_OPEN and b.usable(1.0)
    probe = b.begin(1.0)
    assert probe and not b.usable(1.0)  # one probe at a time
    assert not b.begin(1.0)  # a second call is not a probe
    b.end(probe)
    assert b.failed(1.1)  # the probe failed: open again, twice as long
    assert b.state(3.0) is BreakerState.OPEN and b.state(3.1) is BreakerState.HALF_OPEN
    b.failed(3.1)
    assert b.retry_after_s(3.1) == pytest.approx(3.0)  # 4 s capped at open_max_s
    b.succeeded()
    assert b.state(3.2) is BreakerState.CLOSED and b.usable(3.2) and b.opens == 0


def test_failures_while_open_do_not_extend_it_and_trip_forces_it_open():
    b = breaker(failures_to_open=1, open_s=1.0)
    assert b.failed(0.0)
    assert not b.failed(0.5)  # a call that was in flight when it opened
    assert b.retry_after_s(0.5) == pytest.approx(0.5)
    c = breaker(failures_to_open=5, open_s=0.2)
    assert c.trip(0.0) and not c.trip(0.1)
    assert c.times_opened == 1 and c.state(0.1) is BreakerState.OPEN


@pytest.mark.parametrize("kw", [{"failures_to_open": 0}, {"open_s": 0.0}, {"open_s": 2.0, "open_max_s": 1.0}])
def test_bad_policies_are_refused(kw):
    with pytest.raises(ValueError):
        BreakerPolicy(**kw)
