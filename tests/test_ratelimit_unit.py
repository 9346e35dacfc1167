"""Token buckets (pure): bursts, refill, the global cap, bounded memory."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from coordinator.ratelimit import RateLimiter, TokenBucket


def test_burst_then_refusal_then_refill():
    b = TokenBucket(rate_per_s=1.0, burst=3, now=0.0)
    assert [b.allow(0.0) for _ in range(4)] == [True, True, True, False]
    assert b.allow(1.0) and not b.allow(1.0)


def test_global_cap_applies_across_keys_and_one_key_cannot_drain_it():
    rl = RateLimiter(per_key_rate=0.001, per_key_burst=2, global_rate=0.001, global_burst=5)
    assert [rl.allow("noisy", 0.0) for _ in range(5)] == [True, True, False, False, False]
    assert [rl.allow(k, 0.0) for k in ("a", "b", "c", "d")] == [True, True, True, False]


def test_memory_is_bounded():
    rl = RateLimiter(1, 1, 1e9, 1e9, max_tracked=100)
    for i in range(1000):
        rl.allow(f"k{i}", 0.0)
    assert len(rl.buckets) == 100


@given(rate=st.floats(0.1, 100), burst=st.integers(1, 50),
       times=st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=200))
def test_never_more_than_burst_plus_refill(rate, burst, times):
    b = TokenBucket(rate, burst, now=0.0)
    times = sorted(times)
    allowed = sum(b.allow(t) for t in times)
    assert allowed <= burst + rate * times[-1] + 1e-9
