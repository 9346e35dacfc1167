"""Token buckets, per device and global, with time passed in (pure and testable).

Excess requests are answered ``rate_limited`` before any expensive crypto runs.
"""

from __future__ import annotations

from collections import OrderedDict


class TokenBucket:
    """``burst`` tokens at most, refilled at ``rate_per_s``; each request spends ``cost``."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate_per_s: float, burst: float, now: float | None = None) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate, self.burst, self.tokens, self.last = rate_per_s, burst, burst, now

    def allow(self, now: float, cost: float = 1.0) -> bool:
        if self.last is not None and now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now if self.last is None else max(self.last, now)
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False


class RateLimiter:
    """A global bucket plus one bucket per key; memory bounded by evicting idle keys (LRU)."""

    def __init__(self, per_key_rate: float, per_key_burst: float, global_rate: float, global_burst: float,
                 max_tracked: int = 100_000) -> None:
        self.per_key_rate, self.per_key_burst, self.max_tracked = per_key_rate, per_key_burst, max_tracked
        self.global_bucket = TokenBucket(global_rate, global_burst)
        self.buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def allow(self, key: str, now: float) -> bool:
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = TokenBucket(self.per_key_rate, self.per_key_burst, now)
            if len(self.buckets) > self.max_tracked:
                self.buckets.popitem(last=False)
        else:
            self.buckets.move_to_end(key)
        # check the key first so one noisy device cannot drain the global budget
        if not bucket.allow(now):
            return False
        if not self.global_bucket.allow(now):
            bucket.tokens = min(bucket.burst, bucket.tokens + 1)
            return False
        return True
