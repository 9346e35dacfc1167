"""The attack library does what the papers say, so the defence is tested against real attacks."""

from __future__ import annotations

import numpy as np
import pytest

from common import attacks


def benign(m: int = 8, d: int = 500, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=d) + rng.normal(size=(m, d))).astype(np.float32)


def test_min_max_stays_within_the_largest_honest_distance():
    b = benign()
    mal = attacks.min_max(b)
    honest_max = max(np.linalg.norm(b[i] - b[j]) for i in range(len(b)) for j in range(len(b)))
    assert np.linalg.norm(b - mal, axis=1).max() <= honest_max * (1 + 1e-4)
    assert np.linalg.norm(mal - b.mean(0)) > 0.1 * honest_max  # and it does move


def test_min_sum_stays_within_the_largest_honest_sum_of_distances():
    b = benign()
    mal = attacks.min_sum(b)
    sums = [(np.linalg.norm(b - b[i], axis=1) ** 2).sum() for i in range(len(b))]
    assert (np.linalg.norm(b - mal, axis=1) ** 2).sum() <= max(sums) * (1 + 1e-4)


def test_alie_shifts_each_coordinate_by_z_standard_deviations():
    b = benign()
    mal = attacks.alie(b, n_total=30, n_malicious=9)
    z = (b.mean(0) - mal) / b.std(0)
    assert np.allclose(z, z[0], atol=1e-3) and 0 < z[0] < 2


def test_ipm_points_against_the_honest_mean():
    b = benign()
    mal = attacks.ipm(b)
    assert float(mal @ b.mean(0)) < 0


def test_adaptive_stays_inside_the_rule_it_is_given():
    b = benign()
    mean = b.mean(0)

    def accepts(c):  # a toy rule: cosine to the honest mean at least 0.8
        return float(c @ mean) / (np.linalg.norm(c) * np.linalg.norm(mean)) >= 0.8

    mal = attacks.adaptive(b, accepts)
    cos = float(mal @ mean) / (np.linalg.norm(mal) * np.linalg.norm(mean))
    assert accepts(mal) and cos < 0.85  # just inside, not at the mean


def test_spread_copies_hide_a_shared_vector_at_the_asked_similarity():
    v = benign(1, 5000)[0]
    copies = attacks.spread_copies(v, 6, 0.85, np.random.default_rng(42))
    n = np.linalg.norm(copies, axis=1)
    cos = (copies @ copies.T) / np.outer(n, n)
    off = cos[~np.eye(6, dtype=bool)]
    assert np.all(np.abs(off - 0.85) < 0.03)
    assert np.allclose(n, np.linalg.norm(v), rtol=1e-5)


def test_backdoor_data_carries_the_trigger_and_the_target_label():
    x = np.zeros((10, 64), dtype=np.float32)
    y = np.arange(10, dtype=np.int64)
    xp, yp = attacks.poison_data("backdoor", x, y, np.random.default_rng(0))
    stamped = (xp[:, list(attacks.TRIGGER_PIXELS)] == attacks.TRIGGER_VALUE).all(axis=1)
    assert stamped.sum() == 5 and (yp[stamped] == attacks.BACKDOOR_TARGET).all()
    assert (yp[~stamped] == y[~stamped]).all()


def test_label_flip_reverses_labels():
    _, yp = attacks.poison_data("label-flip", np.zeros((3, 64)), np.array([0, 4, 9]), np.random.default_rng(0))
    assert yp.tolist() == [9, 5, 0]


def test_boosted_backdoor_is_the_backdoor_scaled():
    own = benign(1)[0]
    out = attacks.craft("backdoor-boosted", own, attacks.Knowledge(own[None], 10, 2), np.random.default_rng(0))
    np.testing.assert_allclose(out, own * attacks.BACKDOOR_BOOST, rtol=1e-6)


def test_every_named_attack_crafts_a_finite_update():
    b = benign()
    know = attacks.Knowledge(b, 30, 8, accepts=lambda c: True)
    for name in attacks.NAMES:
        out = attacks.craft(name, b[0], know, np.random.default_rng(0))
        assert out.shape == b[0].shape and out.dtype == np.float32 and np.isfinite(out).all(), name


def test_an_unknown_attack_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown attack"):
        attacks.craft("nope", benign(1)[0], attacks.Knowledge(benign(1), 1, 1), np.random.default_rng(0))
