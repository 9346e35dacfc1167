"""Closing a round (pure): the streaming FedAvg path used for large rounds agrees with the
in-memory one, and poisoned updates are screened out on both."""

from __future__ import annotations

import numpy as np
import pytest

from common.settings import FLSettings
from enclave_worker.defend import defend
from enclave_worker.service import close_round, close_round_streaming, defend_floats


def round_of(k: int, d: int, bad: dict[int, float], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=d)
    u = (direction + 0.5 * rng.normal(size=(k, d))).astype(np.float32)
    for i, factor in bad.items():
        u[i] *= factor
    return u


@pytest.mark.parametrize("bad", [{}, {0: -4.0}, {1: 20.0, 5: -4.0}])
def test_streaming_close_equals_in_memory_close(bad):
    u = round_of(10, 300, bad)
    w = np.arange(1, 11, dtype=np.float64)
    fl = FLSettings()
    a, va = close_round(u, w, fl)
    b, vb = close_round_streaming(lambda i: u[i], len(u), w, fl)
    assert va.reasons == vb.reasons
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for i in bad:
        assert va.reasons[i] in ("norm_bound", "low_cosine")


def test_streaming_close_holds_only_a_sample_for_the_reference():
    u = round_of(200, 50, {3: -4.0, 7: 20.0})
    loads = []
    b, v = close_round_streaming(lambda i: loads.append(i) or u[i], len(u), np.ones(200), FLSettings(), sample=16)
    assert not v.accepted[3] and not v.accepted[7]
    assert v.accepted.sum() == 198
    # two streaming passes plus a 16-update sample: never the whole round at once
    assert len(loads) == 200 + 16 + 198


def test_a_round_of_only_rejected_updates_leaves_no_aggregate():
    u = round_of(2, 20, {})
    fl = FLSettings(max_norm=1e-6)
    agg, verdict = close_round_streaming(lambda i: u[i], 2, np.ones(2), fl)
    assert agg is None and verdict.reasons == ["norm_bound", "norm_bound"]


def test_norms_from_intake_give_the_same_verdict():
    u = round_of(12, 80, {2: 20.0, 9: -4.0})
    w = np.ones(12)
    norms = np.linalg.norm(u.astype(np.float64), axis=1)
    a, va = close_round_streaming(lambda i: u[i], 12, w, FLSettings())
    b, vb = close_round_streaming(lambda i: u[i], 12, w, FLSettings(), norms=norms)
    assert va.reasons == vb.reasons
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_the_defence_bound_counts_its_k_by_k_matrices_not_only_the_updates():
    """10,000 small updates fit fl.defend_max_floats as k x d, but defend() holds k x k float64
    matrices too (4 GB, 18 s at 10,000 here): such a round must close with the streaming filters."""
    import tracemalloc

    fl = FLSettings()
    assert 10_000 * 1058 <= fl.defend_max_floats < defend_floats(10_000, 1058)
    assert defend_floats(1000, 4810) <= fl.defend_max_floats  # the robust defence still runs at 1,000
    k, d = 800, 40
    u = round_of(k, d, {})
    tracemalloc.start()
    try:
        defend(u, np.ones(k), [f"d{i}" for i in range(k)], fl)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert 8 * k * k <= peak <= 4 * defend_floats(k, d)  # at least its float64 Gram, at most the bound
