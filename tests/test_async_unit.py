"""Async rounds' pure rules (enclave_worker/staleness.py) and availability traces
(edge_agent/availability.py), without a broker."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent import availability
from enclave_worker import staleness
from enclave_worker.store import EnclaveStore
from schemas.messages import RoundSpec
from schemas.reasons import QflareError, Reason

versions = st.integers(min_value=0, max_value=10_000)


@given(st.integers(min_value=0, max_value=10_000))
def test_staleness_weight_is_one_when_fresh_and_decreases(s):
    assert staleness.staleness_weight(0) == 1.0
    assert 0.0 < staleness.staleness_weight(s + 1) < staleness.staleness_weight(s) <= 1.0
    assert staleness.staleness_weight(s) == pytest.approx(1 / math.sqrt(1 + s))


def test_negative_staleness_is_an_error():
    with pytest.raises(ValueError):
        staleness.staleness_weight(-1)


@given(versions, versions, st.integers(min_value=0, max_value=50))
def test_check_base_accepts_exactly_the_published_versions_within_the_bound(base, current, bound):
    if base > current:
        with pytest.raises(QflareError) as err:
            staleness.check_base(base, current, bound)
        assert err.value.reason == Reason.UNKNOWN_BASE
    elif current - base > bound:
        with pytest.raises(QflareError) as err:
            staleness.check_base(base, current, bound)
        assert err.value.reason == Reason.TOO_STALE
    else:
        assert staleness.check_base(base, current, bound) == current - base


@given(versions, versions)
def test_without_a_bound_only_a_version_never_published_is_refused(base, current):
    if base > current:
        with pytest.raises(QflareError):
            staleness.check_base(base, current, None)
    else:
        assert staleness.check_base(base, current, None) == current - base


@given(st.lists(st.tuples(st.integers(1, 1000), st.integers(0, 20)), min_size=1, max_size=30))
def test_buffer_weights_and_step_scale(updates):
    current = 20
    n = [u[0] for u in updates]
    bases = [u[1] for u in updates]
    w = staleness.buffer_weights(n, bases, current)
    assert w.shape == (len(updates),)
    assert np.all(w <= np.array(n, dtype=float)) and np.all(w > 0)
    scale = staleness.step_scale(n, bases, current)
    assert 0 < scale <= 1
    # every update fresh: the step is the plain average's
    assert staleness.step_scale(n, [current] * len(n), current) == pytest.approx(1.0)


def test_buffer_rules():
    assert not staleness.buffer_full(4, 5) and staleness.buffer_full(5, 5)
    assert staleness.buffer_size_for(1, 3) == 3  # never below the round's min_updates
    assert staleness.buffer_size_for(10, 3) == 10
    assert staleness.max_staleness_for(50, 8) == 8  # the enclave's own bound wins when tighter
    assert staleness.closes_with_leftover(3, 3) and not staleness.closes_with_leftover(2, 3)


def test_round_spec_is_sync_by_default_and_carries_the_async_rules():
    spec = RoundSpec(round_id=1, deadline=0.0, min_updates=1, epochs=1, lr=0.1, batch_size=8)
    assert spec.mode == "sync"
    a = spec.model_copy(update={"mode": "async", "buffer_size": 5, "max_staleness": 4})
    assert (a.mode, a.buffer_size, a.max_staleness) == ("async", 5, 4)


def test_store_buffers_and_folds_updates(tmp_path):
    store = EnclaveStore(tmp_path / "enclave")
    store.save_model(0, None, np.zeros(3, dtype=np.float32), None)
    for i, base in enumerate((0, 0, 0)):
        store.add_update(1, f"u{i}", f"d{i}", 10, np.ones(3, dtype=np.float32), base_version=base)
    assert store.sent_on_base(1, "d0", 0) and not store.sent_on_base(1, "d0", 1)
    assert [u.base_version for u in store.buffered_updates(1)] == [0, 0, 0]
    store.begin()
    store.save_model(1, 1, np.ones(3, dtype=np.float32), b"m")
    store.fold(["u0", "u1"], 1)
    store.fold(["u2"], -1)  # judged and dropped by the filters
    store.commit()
    assert store.buffered_updates(1) == [] and store.folded_count(1) == 2
    assert store.versions_of_round(1) == [1] and store.has_model(1) and not store.has_model(2)
    store.close()


def test_an_older_store_gains_the_async_columns(tmp_path):
    import sqlite3

    d = tmp_path / "enclave"
    d.mkdir(mode=0o700)
    db = sqlite3.connect(d / "enclave.sqlite3")
    db.execute("CREATE TABLE updates (update_id TEXT PRIMARY KEY, round_id INTEGER NOT NULL, device_id TEXT NOT NULL, "
               "num_samples INTEGER NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL, norm REAL NOT NULL, "
               "at REAL NOT NULL)")
    db.execute("INSERT INTO updates VALUES ('old', 1, 'd', 1, 0, 4, 1.0, 0.0)")
    db.commit()
    db.close()
    store = EnclaveStore(d)
    assert [u.base_version for u in store.round_updates(1)] == [0]
    assert [u.update_id for u in store.buffered_updates(1)] == ["old"]
    store.close()


# --- availability traces -----------------------------------------------------------------


@given(st.integers(1, 30), st.floats(0.0, 0.9), st.floats(0.5, 30.0), st.integers(0, 1000))
def test_exponential_traces_are_sorted_disjoint_intervals_within_the_horizon(n, f, mean_on, seed):
    trace = availability.exponential(n, 100.0, f, mean_on, seed)
    assert trace.devices == n
    for iv in trace.online:
        for (a, b), nxt in zip(iv, [*iv[1:], None], strict=False):
            assert 0.0 <= a < b <= 100.0
            if nxt is not None:
                assert b < nxt[0]
    for i in range(n):
        states = [up for _, up in trace.transitions(i)]
        assert all(x != y for x, y in itertools.pairwise(states))  # alternating


@pytest.mark.parametrize("f", [0.0, 0.25, 0.5, 0.75])
def test_the_share_offline_is_the_one_asked_for_on_average(f):
    trace = availability.exponential(400, 2000.0, f, 10.0, seed=1)
    assert trace.mean_offline_fraction() == pytest.approx(f, abs=0.03)
    at = [trace.offline_fraction(t) for t in np.linspace(50, 1950, 40)]
    assert float(np.mean(at)) == pytest.approx(f, abs=0.03)


def test_trace_files(tmp_path):
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"horizon": 10, "devices": [[[0, 4], [3, 6], [8, 20]], [], [[2, 2]]]}))
    trace = availability.load(path, 3)
    assert trace.online == (((0.0, 6.0), (8.0, 10.0)), (), ())
    assert trace.is_online(0, 5.9) and not trace.is_online(0, 7.0) and not trace.is_online(1, 0.0)
    assert trace.transitions(0) == [(0.0, True), (6.0, False), (8.0, True)]
    with pytest.raises(availability.TraceError, match="describes 3 devices, not 2"):
        availability.load(path, 2)
    path.write_text("{\"devices\": []}")
    with pytest.raises(availability.TraceError, match="expected"):
        availability.load(path)
    with pytest.raises(availability.TraceError, match="does not exist"):
        availability.load(tmp_path / "none.json")
