"""Filters and aggregators: hand-checked arrays, properties, and real poisoned deltas."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from common.data import load_digits_split, partition
from common.model import get_flat
from common.training import DEFAULTS, train_local
from enclave_worker.aggregate import (
    AGGREGATORS,
    RunningFedAvg,
    aggregate,
    fedavg,
    median,
    multi_krum,
    trimmed_mean,
)
from enclave_worker.filters import (
    REASON_COSINE,
    REASON_NORM,
    ScreenResult,
    cosine_to_reference,
    l2_norms,
    norm_filter,
    robust_reference,
    screen,
)
from tasks.digits import task as digits

F32 = np.float32
finite = st.floats(-100, 100, allow_nan=False, width=32)


def mat(rows: list[list[float]]) -> np.ndarray:
    return np.array(rows, dtype=F32)


# --- filters, by hand --------------------------------------------------------------------


def test_reason_strings_are_the_wire_codes() -> None:
    assert (REASON_NORM, REASON_COSINE) == ("norm_bound", "low_cosine")


def test_l2_norms_by_hand() -> None:
    np.testing.assert_allclose(l2_norms(mat([[3, 4], [0, 0], [-1, 0]])), [5, 0, 1])


def test_l2_norms_rejects_1d() -> None:
    with pytest.raises(ValueError):
        l2_norms(np.zeros(3, F32))


def test_norm_filter_absolute_and_relative() -> None:
    u = mat([[1, 0], [0, 2], [3, 0], [30, 40]])  # norms 1, 2, 3, 50; median 2.5
    assert norm_filter(u, None, None).tolist() == [True, True, True, True]
    assert norm_filter(u, 2.0, None).tolist() == [True, True, False, False]
    assert norm_filter(u, None, 2.0).tolist() == [True, True, True, False]
    assert norm_filter(u, 2.5, 2.0).tolist() == [True, True, False, False]


def test_norm_filter_rejects_non_finite_even_without_bounds() -> None:
    u = mat([[1, 0], [np.nan, 0], [np.inf, 0]])
    assert norm_filter(u, None, None).tolist() == [True, False, False]


def test_cosine_by_hand() -> None:
    u = mat([[1, 0], [0, 1], [-2, 0], [0, 0], [1, 1]])
    cos = cosine_to_reference(u, np.array([3, 0], F32))
    np.testing.assert_allclose(cos, [1, 0, -1, 0, np.sqrt(0.5)], atol=1e-12)


def test_robust_reference_is_coordinate_median() -> None:
    u = mat([[1, 10], [2, -5], [100, 0]])
    np.testing.assert_array_equal(robust_reference(u), [2, 0])


def test_screen_reasons_by_hand() -> None:
    honest = [[1, 1], [1, 1.2], [1.1, 0.9], [0.9, 1]]
    u = mat(honest + [[-1, -1], [50, 50]])
    res = screen(u, np.ones(6), max_norm=None, norm_median_multiple=3.0, min_cosine=0.0)
    assert isinstance(res, ScreenResult)
    assert res.accepted.tolist() == [True] * 4 + [False, False]
    assert res.reasons == [None] * 4 + [REASON_COSINE, REASON_NORM]


def test_screen_skips_cosine_below_three_updates_without_reference() -> None:
    u = mat([[1, 0], [-1, 0]])
    res = screen(u, [1, 1], max_norm=None, norm_median_multiple=None, min_cosine=0.5)
    assert res.accepted.tolist() == [True, True]
    res = screen(
        u,
        [1, 1],
        max_norm=None,
        norm_median_multiple=None,
        min_cosine=0.5,
        reference=np.array([1, 0], F32),
    )
    assert res.reasons == [None, REASON_COSINE]


def test_screen_uses_given_reference() -> None:
    u = mat([[1, 0], [1, 0.1], [1, -0.1], [0, 1]])
    ref = np.array([0, 1], F32)
    res = screen(
        u, np.ones(4), max_norm=None, norm_median_multiple=None, min_cosine=0.5, reference=ref
    )
    assert res.accepted.tolist() == [False, False, False, True]


def test_screen_validates_weights() -> None:
    with pytest.raises(ValueError):
        screen(mat([[1, 0]]), [1, 2], max_norm=None, norm_median_multiple=None, min_cosine=None)
    with pytest.raises(ValueError):
        screen(mat([[1, 0]]), [-1], max_norm=None, norm_median_multiple=None, min_cosine=None)


# --- aggregators, by hand ----------------------------------------------------------------


def test_fedavg_by_hand() -> None:
    out = fedavg(mat([[0, 0], [4, 8]]), np.array([1, 3]))
    assert out.dtype == F32
    np.testing.assert_allclose(out, [3, 6])


def test_fedavg_rejects_bad_weights() -> None:
    for w in ([0, 0], [1, -1], [1, np.nan], [1]):
        with pytest.raises(ValueError):
            fedavg(mat([[0, 0], [4, 8]]), np.array(w, dtype=float))


def test_median_and_trimmed_mean_by_hand() -> None:
    u = mat([[1, 5], [2, 6], [3, 7], [100, -100]])
    np.testing.assert_allclose(median(u), [2.5, 5.5])
    np.testing.assert_allclose(trimmed_mean(u, 0.25), [2.5, 5.5])  # drops 1 each side
    np.testing.assert_allclose(trimmed_mean(u, 0.0), u.astype(float).mean(0), rtol=1e-6)
    with pytest.raises(ValueError):
        trimmed_mean(u, 0.5)


def test_multi_krum_by_hand() -> None:
    u = mat([[0, 0], [1, 0], [0, 1], [1, 1], [50, 50]])
    np.testing.assert_allclose(multi_krum(u, f=1, m=4), [0.5, 0.5])
    with pytest.raises(ValueError):
        multi_krum(u, f=3, m=1)  # needs k > f + 2


def test_aggregate_dispatch_and_unknown() -> None:
    u, w = mat([[0, 0], [1, 1], [2, 2], [9, 9]]), np.ones(4)
    assert set(AGGREGATORS) == {"fedavg", "median", "trimmed_mean", "multi_krum"}
    np.testing.assert_array_equal(aggregate("fedavg", u, w), fedavg(u, w))
    np.testing.assert_array_equal(aggregate("median", u, w), median(u))
    np.testing.assert_array_equal(aggregate("trimmed_mean", u, w, beta=0.25), trimmed_mean(u, 0.25))
    np.testing.assert_array_equal(aggregate("multi_krum", u, w, f=1, m=2), multi_krum(u, 1, 2))
    with pytest.raises(ValueError, match="unknown aggregator"):
        aggregate("krum++", u, w)
    with pytest.raises(TypeError):
        aggregate("median", u, w, bogus=1)


def test_running_fedavg_empty_raises() -> None:
    with pytest.raises(ValueError):
        RunningFedAvg().result()


# --- properties --------------------------------------------------------------------------

dims = st.integers(1, 6)


@settings(max_examples=50, deadline=None)
@given(
    row=arrays(F32, st.integers(1, 8), elements=finite),
    k=st.integers(1, 6),
    w=st.lists(st.integers(1, 1000), min_size=6, max_size=6),
)
def test_identical_updates_aggregate_to_themselves(row, k, w) -> None:
    u = np.tile(row, (k, 1))
    np.testing.assert_allclose(fedavg(u, np.array(w[:k])), row, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(median(u), row)
    np.testing.assert_allclose(trimmed_mean(u, 0.2), row, rtol=1e-6, atol=1e-6)
    if k >= 3:
        np.testing.assert_allclose(multi_krum(u, f=k - 3), row, rtol=1e-6, atol=1e-6)


@settings(max_examples=50, deadline=None)
@given(data=st.data(), k=st.integers(3, 8), d=dims)
def test_median_bounded_by_honest_despite_huge_outlier(data, k, d) -> None:
    honest = data.draw(arrays(F32, (k, d), elements=st.floats(-1, 1, width=32)))
    outlier = np.full((1, d), 1e30, F32)
    out = median(np.vstack([honest, outlier]))
    assert np.all(out >= honest.min(0)) and np.all(out <= honest.max(0))


@settings(max_examples=50, deadline=None)
@given(data=st.data(), k=st.integers(4, 8), d=dims)
def test_multi_krum_drops_the_outlier(data, k, d) -> None:
    honest = data.draw(arrays(F32, (k, d), elements=st.floats(-1, 1, width=32)))
    outlier = np.full((1, d), 1e3, F32)
    out = multi_krum(np.vstack([honest, outlier]), f=1, m=k)
    np.testing.assert_allclose(out, honest.astype(np.float64).mean(0), atol=1e-5)


@settings(max_examples=50, deadline=None)
@given(data=st.data(), k=st.integers(1, 8), d=dims)
def test_running_fedavg_equals_fedavg(data, k, d) -> None:
    u = data.draw(arrays(F32, (k, d), elements=finite))
    w = np.array(data.draw(st.lists(st.integers(1, 500), min_size=k, max_size=k)), float)
    run = RunningFedAvg()
    for row, wi in zip(u, w, strict=True):
        run.add(row, wi)
    assert run.count == k
    np.testing.assert_allclose(run.result(), fedavg(u, w), rtol=1e-6, atol=1e-5)


@settings(max_examples=50, deadline=None)
@given(data=st.data(), k=st.integers(1, 8), d=dims)
def test_screen_accepts_everything_with_no_bounds(data, k, d) -> None:
    u = data.draw(arrays(F32, (k, d), elements=finite))
    res = screen(u, np.ones(k), max_norm=None, norm_median_multiple=None, min_cosine=None)
    assert res.accepted.all() and res.reasons == [None] * k


# --- real training deltas ----------------------------------------------------------------

N_HONEST = 8


@pytest.fixture(scope="module")
def round0_deltas() -> dict[str, np.ndarray]:
    """8 honest deltas plus one of each attack, all from the same initial model."""
    x, y, _, _ = load_digits_split()
    parts = partition(y, N_HONEST + 4, "iid", seed=0)
    g = get_flat(digits.build_model())
    hp = {"epochs": DEFAULTS["epochs"], "lr": DEFAULTS["lr"], "batch_size": DEFAULTS["batch_size"]}
    out: dict[str, np.ndarray] = {}
    out["honest"] = np.stack(
        [train_local(g, x[p], y[p], seed=i, **hp)[0] for i, p in enumerate(parts[:N_HONEST])]
    )
    for j, attack in enumerate(("sign-flip", "scale", "noise", "label-flip")):
        p = parts[N_HONEST + j]
        out[attack] = train_local(g, x[p], y[p], seed=100 + j, attack=attack, **hp)[0]
    return out


def test_screen_rejects_sign_flip_and_scale_among_honest(round0_deltas) -> None:
    u = np.vstack([round0_deltas["honest"], round0_deltas["sign-flip"], round0_deltas["scale"]])
    res = screen(u, np.ones(len(u)), max_norm=None, norm_median_multiple=3.0, min_cosine=0.0)
    assert res.accepted.tolist() == [True] * N_HONEST + [False, False]
    assert res.reasons[-1] == REASON_NORM  # 20x is far beyond 3x the median norm
    # The flip is caught on either test alone: its direction opposes the honest majority.
    only_cos = screen(u, np.ones(len(u)), max_norm=None, norm_median_multiple=None, min_cosine=0.0)
    assert only_cos.reasons[N_HONEST] == REASON_COSINE


def test_screen_rejects_noise_and_label_flip_by_cosine(round0_deltas) -> None:
    u = np.vstack([round0_deltas["honest"], round0_deltas["noise"], round0_deltas["label-flip"]])
    res = screen(u, np.ones(len(u)), max_norm=None, norm_median_multiple=None, min_cosine=0.3)
    assert res.accepted.tolist() == [True] * N_HONEST + [False, False]
    assert res.reasons[N_HONEST:] == [REASON_COSINE, REASON_COSINE]


def test_robust_aggregators_resist_real_attacks_without_screening(round0_deltas) -> None:
    honest = round0_deltas["honest"]
    u = np.vstack([honest, round0_deltas["sign-flip"], round0_deltas["scale"]])
    target = honest.astype(np.float64).mean(0)
    plain_err = np.linalg.norm(fedavg(u, np.ones(len(u))) - target)
    for name, params in [("median", {}), ("trimmed_mean", {"beta": 0.2}), ("multi_krum", {"f": 2})]:
        err = np.linalg.norm(aggregate(name, u, np.ones(len(u)), **params) - target)
        assert err < plain_err / 3, name
