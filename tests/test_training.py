"""Data, model layout, local training and simulated federated rounds, all in-process."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from common.data import device_shard, load_digits_split, partition
from common.model import LAYOUT_VERSION, get_flat, layout, layout_id, set_flat
from common.training import DEFAULTS, evaluate, train_centralised, train_local
from enclave_worker.aggregate import RunningFedAvg, fedavg
from enclave_worker.filters import screen
from tasks.digits import task as digits_task

build_model = digits_task.build_model  # the default task's model; its initial weights are fixed

HP = {
    "epochs": int(DEFAULTS["epochs"]),
    "lr": float(DEFAULTS["lr"]),
    "batch_size": int(DEFAULTS["batch_size"]),
}
ROUNDS = 3


@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


# --- data --------------------------------------------------------------------------------


def test_split_types_ranges_and_determinism(digits) -> None:
    x_tr, y_tr, x_te, y_te = digits
    assert x_tr.dtype == x_te.dtype == np.float32 and y_tr.dtype == y_te.dtype == np.int64
    assert x_tr.shape[1] == 64 and 0.0 <= x_tr.min() and x_tr.max() <= 1.0
    assert len(x_te) == pytest.approx(0.2 * (len(x_tr) + len(x_te)), abs=1)
    again = load_digits_split()
    for a, b in zip(digits, again, strict=True):
        np.testing.assert_array_equal(a, b)
    again[0][0, 0] = 5.0  # callers own their copy
    assert load_digits_split()[0][0, 0] != 5.0


@pytest.mark.parametrize("scheme,alpha", [("iid", 0.5), ("dirichlet", 0.5), ("dirichlet", 0.05)])
@pytest.mark.parametrize("n", [1, 5, 20])
def test_partition_disjoint_covering_deterministic(digits, scheme, alpha, n) -> None:
    y = digits[1]
    parts = partition(y, n, scheme, alpha=alpha, seed=3)
    assert len(parts) == n
    allidx = np.concatenate(parts)
    assert len(allidx) == len(y) and np.array_equal(np.sort(allidx), np.arange(len(y)))
    assert min(len(p) for p in parts) >= 8
    again = partition(y, n, scheme, alpha=alpha, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    if n > 1:
        other = partition(y, n, scheme, alpha=alpha, seed=4)
        assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_dirichlet_is_skewed_iid_is_not(digits) -> None:
    y = digits[1]

    def max_class_share(parts):
        return np.mean([np.bincount(y[p], minlength=10).max() / len(p) for p in parts])

    assert max_class_share(partition(y, 10, "iid")) < 0.2
    assert max_class_share(partition(y, 10, "dirichlet", alpha=0.1)) > 0.5


def test_partition_rejects_bad_arguments(digits) -> None:
    y = digits[1]
    with pytest.raises(ValueError):
        partition(y, 3, "round-robin")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        partition(y, 0, "iid")
    with pytest.raises(ValueError):
        partition(y, len(y), "iid")  # cannot give each device 8 samples
    with pytest.raises(ValueError):
        partition(y, 3, "dirichlet", alpha=0.0)


def test_device_shard_matches_partition(digits) -> None:
    from common.rootdata import device_pool

    x_tr, y_tr = device_pool()  # the training split without the enclave's root data
    idx = partition(y_tr, 4, "dirichlet", alpha=0.5, seed=1)[2]
    x, y = device_shard(2, 4, "dirichlet", 0.5, 1)
    np.testing.assert_array_equal(x, x_tr[idx])
    np.testing.assert_array_equal(y, y_tr[idx])
    with pytest.raises(ValueError):
        device_shard(4, 4, "iid", 0.5, 0)


def test_root_data_is_held_out_of_every_device_shard() -> None:
    from common.rootdata import ROOT_PER_CLASS, digits_root

    xr, yr = digits_root()
    assert np.bincount(yr).tolist() == [ROOT_PER_CLASS] * 10
    root = {r.tobytes() for r in xr}
    for i in range(4):
        x, _ = device_shard(i, 4)
        assert not root & {r.tobytes() for r in x}


# --- model and flat vectors --------------------------------------------------------------


def test_layout_and_layout_id_stable() -> None:
    a, b = build_model(), nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    assert LAYOUT_VERSION == 1
    assert layout(a) == [
        ("0.weight", (64, 64)),
        ("0.bias", (64,)),
        ("2.weight", (10, 64)),
        ("2.bias", (10,)),
    ]
    assert layout_id(a) == layout_id(b)
    assert len(layout_id(a)) == 16 and int(layout_id(a), 16) >= 0
    assert layout_id(nn.Sequential(nn.Linear(64, 10))) != layout_id(a)


def test_build_model_is_deterministic_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    np.testing.assert_array_equal(get_flat(build_model()), get_flat(build_model()))
    assert torch.rand(1) == expected
    assert not np.array_equal(get_flat(build_model()), get_flat(nn.Sequential(nn.Linear(64, 64), nn.ReLU(),
                                                                             nn.Linear(64, 10))))


def test_flat_roundtrip_and_rejections() -> None:
    m = build_model()
    flat = get_flat(m)
    assert flat.dtype == np.float32 and flat.ndim == 1 and flat.flags.c_contiguous
    assert flat.shape == (64 * 64 + 64 + 10 * 64 + 10,)
    other = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    set_flat(other, flat)
    np.testing.assert_array_equal(get_flat(other), flat)
    with pytest.raises(ValueError, match="length"):
        set_flat(other, flat[:-1])
    with pytest.raises(ValueError, match="dtype"):
        set_flat(other, flat.astype(np.float64))
    with pytest.raises(ValueError, match="1-D"):
        set_flat(other, flat.reshape(1, -1))
    np.testing.assert_array_equal(get_flat(other), flat)  # untouched by failed loads


# --- local training ----------------------------------------------------------------------


def test_train_local_deterministic_and_attacks(digits) -> None:
    x, y = digits[0][:120], digits[1][:120]
    g = get_flat(build_model())
    threads = torch.get_num_threads()
    d1, n = train_local(g, x, y, seed=5, **HP)
    assert torch.get_num_threads() == threads
    d2, _ = train_local(g, x, y, seed=5, **HP)
    assert n == 120 and d1.dtype == np.float32 and d1.shape == g.shape
    np.testing.assert_array_equal(d1, d2)
    np.testing.assert_array_equal(
        train_local(g, x, y, seed=5, attack="sign-flip", **HP)[0], d1 * np.float32(-4)
    )
    np.testing.assert_array_equal(
        train_local(g, x, y, seed=5, attack="scale", **HP)[0], d1 * np.float32(20)
    )
    noise = train_local(g, x, y, seed=5, attack="noise", **HP)[0]
    assert abs(noise.std() / d1.std() - 3.0) < 0.2
    flipped = train_local(g, x, y, seed=5, attack="label-flip", **HP)[0]
    assert not np.array_equal(flipped, d1)
    with pytest.raises(ValueError, match="unknown attack"):
        train_local(g, x, y, seed=5, attack="backdoor", **HP)


def test_train_local_rejects_wrong_layout(digits) -> None:
    with pytest.raises(ValueError):
        train_local(np.zeros(10, np.float32), digits[0][:20], digits[1][:20], seed=0, **HP)


# --- simulated federation ----------------------------------------------------------------


def simulate(
    digits, n_devices: int, attackers: dict[int, str], screened: bool, seed: int = 0
) -> float:
    """Rounds of local training + (optionally screened) FedAvg, entirely in-process."""
    x_tr, y_tr, x_te, y_te = digits
    parts = partition(y_tr, n_devices, "iid", seed=seed)
    g = get_flat(build_model())
    for r in range(ROUNDS):
        results = [
            train_local(g, x_tr[p], y_tr[p], seed=1000 * r + i, attack=attackers.get(i), **HP)
            for i, p in enumerate(parts)
        ]
        u = np.stack([d for d, _ in results])
        w = np.array([c for _, c in results], dtype=np.float64)
        if screened:
            res = screen(u, w, max_norm=None, norm_median_multiple=3.0, min_cosine=0.0)
            assert not res.accepted[list(attackers)].any()
            u, w = u[res.accepted], w[res.accepted]
        g = g + fedavg(u, w)
    return evaluate(g, x_te, y_te)


def test_fedavg_five_devices_reaches_target_and_running_matches(digits) -> None:
    acc = simulate(digits, 5, {}, screened=False)
    print(f"\nfederated clean 5 devices x {ROUNDS} rounds: {acc:.4f}")
    assert acc >= 0.85


def test_running_fedavg_matches_batch_on_real_deltas(digits) -> None:
    x_tr, y_tr, _, _ = digits
    g = get_flat(build_model())
    results = [
        train_local(g, x_tr[p], y_tr[p], seed=i, **HP)
        for i, p in enumerate(partition(y_tr, 4, "dirichlet", seed=0))
    ]
    run = RunningFedAvg()
    for d, c in results:
        run.add(d, c)
    batch = fedavg(np.stack([d for d, _ in results]), np.array([c for _, c in results]))
    np.testing.assert_allclose(run.result(), batch, rtol=1e-5, atol=1e-7)


def test_centralised_baseline(digits) -> None:
    x_tr, y_tr, x_te, y_te = digits
    acc = train_centralised(
        x_tr,
        y_tr,
        x_te,
        y_te,
        epochs=ROUNDS * HP["epochs"],
        lr=HP["lr"],
        batch_size=HP["batch_size"],
        seed=0,
    )
    print(f"\ncentralised baseline ({ROUNDS * HP['epochs']} epochs): {acc:.4f}")
    assert acc >= 0.9


def test_screened_fedavg_withstands_two_of_ten_attackers(digits) -> None:
    attackers = {3: "sign-flip", 7: "scale"}
    clean = simulate(digits, 10, {}, screened=False)
    defended = simulate(digits, 10, attackers, screened=True)
    undefended = simulate(digits, 10, attackers, screened=False)
    print(
        f"\n10 devices: clean {clean:.4f}, 2 attackers screened {defended:.4f}, "
        f"unscreened {undefended:.4f}"
    )
    assert defended >= clean - 0.05
    assert undefended < clean - 0.10  # the attack is real: screening is what saves the run
