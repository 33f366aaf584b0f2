"""A token bucket, sans-IO: the caller passes the time in and sleeps for the delay it gets back.

Reservations may drive the bucket into debt: ``reserve(n, now)`` always succeeds and says how long
to wait before the ``n`` bytes may go. Several connections sharing one bucket then queue behind
each other's debt, so together they never beat the rate, and nobody needs a lock or a wake-up list.
"""

from __future__ import annotations

import math


class TokenBucket:
    """``rate`` tokens (bytes) per second, holding at most ``burst`` when idle."""

    def __init__(self, rate: float, burst: float, *, now: float) -> None:
        if not rate > 0 or math.isinf(rate):
            raise ValueError(f"rate must be positive and finite, got {rate}")
        if not burst > 0:
            raise ValueError(f"burst must be positive, got {burst}")
        self.rate = float(rate)
        self.burst = float(burst)
        self._tokens = float(burst)
        self._last = now

    def tokens(self, now: float) -> float:
        """Tokens available at ``now``; negative while the bucket is in debt."""
        self._refill(now)
        return self._tokens

    def reserve(self, amount: float, now: float) -> float:
        """Take ``amount`` tokens; return how many seconds after ``now`` they may be spent."""
        if amount < 0:
            raise ValueError(f"amount must be >= 0, got {amount}")
        self._refill(now)
        self._tokens -= amount
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def _refill(self, now: float) -> None:
        # A clock that goes backwards (it should not) must not mint tokens either way.
        elapsed = max(now - self._last, 0.0)
        self._last = max(now, self._last)
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
