"""When a round may close, given its deadline and the enclave's last recovery (pure).

A deadline that falls while the enclave cannot reach the broker (an outage, or the enclave
itself restarting) would close the round on whatever happened to be stored: the updates the
broker still holds, and the devices' resends, arrive only after the link is back. So the close
waits ``grace`` seconds past the recovery when that is later than the deadline.
"""

from __future__ import annotations


def close_time(deadline: float, recovered_at: float | None, grace: float) -> float:
    """The earliest wall-clock time a round with ``deadline`` may close on its deadline."""
    if recovered_at is None:
        return deadline
    return max(deadline, recovered_at + grace)
