"""LatencyHistogram: percentiles agree with numpy within HDR precision (and exactly with hdrh's
own definition), merge and encode/decode are exact, out-of-range values are clamped."""

import numpy as np
import pytest

from hdrh.histogram import HdrHistogram

from benchmarks.harness.histogram import HIGHEST_US, LOWEST_US, SIGNIFICANT_DIGITS, LatencyHistogram

REL = 1.0 / 1024  # 3 significant digits: a bucket spans at most 1/1024 of its value


def _samples_us(seed: int = 0, n: int = 20_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # A latency-like mix: a lognormal body around 1 ms and a slow tail of 20-400 ms.
    body = rng.lognormal(np.log(1000.0), 0.5, size=n)
    tail = rng.uniform(20_000, 400_000, size=n // 100)
    return np.rint(np.concatenate([body, tail])).astype(np.int64)


def _hist(us: np.ndarray) -> LatencyHistogram:
    h = LatencyHistogram()
    for v in us.tolist():
        h.record(v / 1e6)
    return h


@pytest.mark.parametrize("q", [0, 1, 10, 50, 90, 95, 99, 99.5, 99.9, 99.99, 100])
def test_percentiles_match_numpy_within_hdr_precision(q):
    us = _samples_us()
    h = _hist(us)
    expected_ms = np.percentile(us, q, method="inverted_cdf") / 1e3
    got = h.percentile_ms(q)
    assert got == pytest.approx(expected_ms, rel=REL, abs=1e-3), (q, got, expected_ms)
    if q > 0:
        assert got >= expected_ms  # HDR reports the highest value equivalent to the sample


def test_percentiles_equal_hdrh_definition_and_summary_is_consistent():
    us = _samples_us(seed=3)
    h = _hist(us)
    raw = HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)  # the same samples in hdrh itself
    for v in us.tolist():
        raw.record_value(v)
    for q in (0, 50, 90, 99, 99.9, 100):
        assert h.percentile_ms(q) == raw.get_value_at_percentile(q) / 1e3
    s = h.summary()
    assert s["count"] == len(us)
    assert s["p50_ms"] <= s["p90_ms"] <= s["p95_ms"] <= s["p99_ms"] <= s["p999_ms"] <= s["max_ms"]
    assert s["max_ms"] == pytest.approx(us.max() / 1e3, rel=REL)
    assert s["min_ms"] == pytest.approx(us.min() / 1e3, rel=REL)
    assert s["mean_ms"] == pytest.approx(us.mean() / 1e3, rel=REL)
    assert h.count_above_ms(10.0) == pytest.approx(int((us > 10_000).sum()), abs=2)


def test_merge_is_exact_and_encode_decode_round_trips():
    us = _samples_us(seed=1, n=5000)
    whole = _hist(us)
    a, b = _hist(us[::2]), _hist(us[1::2])
    merged = LatencyHistogram().merge(a).merge(b)
    assert merged == whole
    assert merged.summary() == whole.summary()

    blob = whole.encode()
    assert isinstance(blob, str) and blob.startswith("HISTF")
    back = LatencyHistogram.decode(blob)
    assert back == whole
    assert back.summary() == whole.summary()
    assert back.cdf_points() == whole.cdf_points()


def test_cdf_points_ascend_to_the_max():
    h = _hist(_samples_us(seed=2, n=2000))
    pts = h.cdf_points()
    ps, vs = [p for p, _ in pts], [v for _, v in pts]
    assert ps == sorted(ps) and vs == sorted(vs)
    assert ps[-1] == pytest.approx(100.0)
    assert vs[-1] == h.max_ms()
    assert LatencyHistogram().cdf_points() == []


def test_out_of_range_values_are_clamped_and_empty_reads_zero():
    h = LatencyHistogram()
    assert h.summary()["count"] == 0 and h.percentile_ms(99) == 0.0 and h.mean_ms() == 0.0
    h.record(-1.0)  # clock skew: counted as 1 us, never dropped
    h.record(0.0)
    h.record(120.0)  # beyond 60 s
    assert h.count == 3
    assert h.clamped == 1
    assert h.max_ms() == pytest.approx(HIGHEST_US / 1e3, rel=REL)
    assert h.min_ms() == pytest.approx(0.001)
    with pytest.raises(ValueError):
        h.percentile_ms(101)


def test_decode_refuses_garbage():
    with pytest.raises(ValueError, match="HDR"):
        LatencyHistogram.decode("not a histogram")
