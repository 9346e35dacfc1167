"""Poisoning attacks from the literature, for tests, the demo and ``qflare bench robust``.

Model-poisoning attacks are pure functions over deltas and the statistics the colluding
attackers know: their own honest updates of the round ("partial knowledge", the setting of
Fang et al. 2020 and Shejwalkar & Houmansadr 2021). Data-poisoning attacks (label flip,
backdoor) change what a malicious device trains on. ``adaptive`` knows the defence's rule:
it is handed the rule as a callable and stays just inside it.

Attack names are part of the CLI (``qflare demo --attack NAME``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

#: Attacks on the delta alone, on honest statistics, and on the training data.
SIMPLE = ("sign-flip", "scale", "noise")
CRAFTED = ("alie", "ipm", "min-max", "min-sum", "adaptive")
DATA = ("label-flip", "backdoor", "backdoor-boosted")
NAMES: tuple[str, ...] = SIMPLE + CRAFTED + DATA

SIGN_FLIP_FACTOR = -4.0
SCALE_FACTOR = 20.0
NOISE_STD_MULTIPLE = 3.0
#: Inner-product manipulation (Xie et al. 2020): send -eps x the honest mean.
IPM_EPS = 0.5
#: Backdoor (Bagdasaryan et al. 2020): a 2x2 white square in the bottom-right corner of the
#: 8x8 digit makes the model answer BACKDOOR_TARGET. Those pixels are lit in 6-50 % of
#: honest images, so honest training does touch the weights the trigger uses.
TRIGGER_PIXELS = (54, 55, 62, 63)
TRIGGER_VALUE = 1.0
BACKDOOR_TARGET = 0
#: Share of a backdoor device's training set that carries the trigger.
BACKDOOR_FRACTION = 0.5
#: "Model replacement" boost of the backdoored delta (Bagdasaryan et al. 2020).
BACKDOOR_BOOST = 10.0


@dataclass(frozen=True)
class Knowledge:
    """What the colluding attackers know in a round.

    ``benign`` (m, d): honest updates the attackers computed on their own data this round;
    ``n_total`` and ``n_malicious``: updates in the round and how many are theirs;
    ``accepts``: the defence's rule for one candidate update (adaptive attack only).
    """

    benign: np.ndarray
    n_total: int
    n_malicious: int
    accepts: Callable[[np.ndarray], bool] | None = None


def _stats(benign: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    b = np.asarray(benign, dtype=np.float64)
    if b.ndim != 2 or b.shape[0] == 0:
        raise ValueError(f"benign updates must have shape (m>=1, d), got {b.shape}")
    return b.mean(axis=0), b.std(axis=0)


def sign_flip(delta: np.ndarray, factor: float = SIGN_FLIP_FACTOR) -> np.ndarray:
    """The delta reversed and amplified: undoes several honest updates."""
    return (np.asarray(delta, dtype=np.float32) * np.float32(factor)).astype(np.float32)


def scale(delta: np.ndarray, factor: float = SCALE_FACTOR) -> np.ndarray:
    """The delta boosted (model replacement without a backdoor)."""
    return (np.asarray(delta, dtype=np.float32) * np.float32(factor)).astype(np.float32)


def noise(delta: np.ndarray, rng: np.random.Generator, std_multiple: float = NOISE_STD_MULTIPLE) -> np.ndarray:
    """Gaussian noise with ``std_multiple`` x the delta's std: no signal at all."""
    d = np.asarray(delta, dtype=np.float32)
    return rng.normal(0.0, std_multiple * float(d.std()), d.shape).astype(np.float32)


def alie(benign: np.ndarray, n_total: int, n_malicious: int) -> np.ndarray:
    """"A little is enough" (Baruch et al. 2019): mean - z x std per coordinate, z the largest
    shift that still leaves the attackers closer to the mean than enough honest updates."""
    mean, std = _stats(benign)
    s = n_total // 2 + 1 - n_malicious
    z = NormalDist().inv_cdf(min(max((n_total - s) / n_total, 0.5), 0.999))
    return (mean - z * std).astype(np.float32)


def ipm(benign: np.ndarray, eps: float = IPM_EPS) -> np.ndarray:
    """Inner-product manipulation (Xie et al. 2020): -eps x the honest mean, so the inner
    product of the aggregate with the true gradient turns negative."""
    mean, _ = _stats(benign)
    return (-eps * mean).astype(np.float32)


def _largest_gamma(ok: Callable[[float], bool], hi: float, steps: int = 20) -> float:
    """Largest gamma in [0, hi] with ok(gamma), by bisection (ok assumed monotone)."""
    while ok(hi) and hi < 1e6:
        hi *= 2.0
    lo = 0.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def _pairwise_sq(b: np.ndarray) -> np.ndarray:
    sq = np.sum(b * b, axis=1)
    return np.maximum(sq[:, None] + sq[None, :] - 2.0 * (b @ b.T), 0.0)


def min_max(benign: np.ndarray) -> np.ndarray:
    """Min-max (Shejwalkar & Houmansadr, NDSS 2021): mean - gamma x std with the largest gamma
    whose distance to every honest update stays within the honest updates' largest distance."""
    b = np.asarray(benign, dtype=np.float64)
    mean, std = _stats(b)
    bound = float(np.sqrt(_pairwise_sq(b).max()))

    def ok(g: float) -> bool:
        return float(np.linalg.norm(b - (mean - g * std), axis=1).max()) <= bound

    return (mean - _largest_gamma(ok, 1.0) * std).astype(np.float32)


def min_sum(benign: np.ndarray) -> np.ndarray:
    """Min-sum (same paper): the summed squared distance to the honest updates stays within
    the largest such sum of an honest update."""
    b = np.asarray(benign, dtype=np.float64)
    mean, std = _stats(b)
    bound = float(_pairwise_sq(b).sum(axis=1).max())

    def ok(g: float) -> bool:
        return float(np.sum((b - (mean - g * std)) ** 2)) <= bound

    return (mean - _largest_gamma(ok, 1.0) * std).astype(np.float32)


def adaptive(benign: np.ndarray, accepts: Callable[[np.ndarray], bool]) -> np.ndarray:
    """Knows the defence's rule: from the honest mean, moves as far as ``accepts`` still
    passes the update along the literature's harmful directions (against the per-coordinate
    std as in ALIE and min-max, against the signs of the mean) at the honest norm, and
    sends the accepted update that points furthest from the honest mean."""
    mean, std = _stats(benign)
    norm = float(np.linalg.norm(mean))
    if norm == 0.0 or not accepts(mean.astype(np.float32)):
        return mean.astype(np.float32)  # nothing to push against, or even the mean fails
    best, best_cos = mean, 1.0
    for p in (-std, -np.sign(mean)):
        pn = float(np.linalg.norm(p))
        if pn == 0.0:
            continue
        unit = p / pn

        def cand(g: float, unit: np.ndarray = unit) -> np.ndarray:
            c = mean + g * norm * unit
            return (c * (norm / max(float(np.linalg.norm(c)), 1e-30))).astype(np.float32)

        c = cand(_largest_gamma(lambda g, cand=cand: bool(accepts(cand(g))), 0.5))
        cos = float(c @ mean) / (float(np.linalg.norm(c)) * norm)
        if cos < best_cos:
            best, best_cos = c, cos
    return np.asarray(best, dtype=np.float32)


#: The adaptive colluders' copies agree only this much, to stay under a near-copy test.
ADAPTIVE_COPY_COSINE = 0.85


def spread_copies(v: np.ndarray, n: int, cosine: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` copies of ``v`` with independent noise so that any two have about ``cosine``
    between them, each at ``v``'s norm: colluders hiding that they send one vector."""
    v = np.asarray(v, dtype=np.float64)
    norm = float(np.linalg.norm(v))
    sigma = norm * np.sqrt(max(1.0 / cosine - 1.0, 0.0) / v.shape[0])
    out = v + sigma * rng.normal(size=(n, v.shape[0]))
    out *= norm / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-30)
    return out.astype(np.float32)


def craft(name: str, own: np.ndarray, know: Knowledge, rng: np.random.Generator) -> np.ndarray:
    """The malicious delta for attack ``name`` from the device's honest delta ``own``.

    Data attacks return ``own`` (boosted for ``backdoor-boosted``): their poison is in the
    training data, see :func:`poison_data`.
    """
    if name == "sign-flip":
        return sign_flip(own)
    if name == "scale":
        return scale(own)
    if name == "noise":
        return noise(own, rng)
    if name == "alie":
        return alie(know.benign, know.n_total, know.n_malicious)
    if name == "ipm":
        return ipm(know.benign)
    if name == "min-max":
        return min_max(know.benign)
    if name == "min-sum":
        return min_sum(know.benign)
    if name == "adaptive":
        if know.accepts is None:
            raise ValueError("the adaptive attack needs the defence's rule (Knowledge.accepts)")
        return adaptive(know.benign, know.accepts)
    if name == "backdoor-boosted":
        return scale(own, BACKDOOR_BOOST)
    if name in DATA:
        return np.asarray(own, dtype=np.float32)
    raise ValueError(f"unknown attack {name!r}; expected one of {', '.join(NAMES)}")


def add_trigger(x: np.ndarray) -> np.ndarray:
    """A copy of ``x`` (n, 64) with the backdoor trigger stamped on."""
    out = np.array(x, dtype=np.float32, copy=True)
    out[:, list(TRIGGER_PIXELS)] = TRIGGER_VALUE
    return out


def poison_data(name: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The training set a malicious device uses: labels 9 - y for ``label-flip``; for the
    backdoors, ``BACKDOOR_FRACTION`` of it replaced by triggered copies labelled the target."""
    if name == "label-flip":
        return x, (9 - np.asarray(y)).astype(np.int64)
    if name in ("backdoor", "backdoor-boosted"):
        n = x.shape[0]
        k = max(1, int(round(BACKDOOR_FRACTION * n)))
        pick = rng.choice(n, size=k, replace=False)
        xp, yp = np.array(x, dtype=np.float32, copy=True), np.array(y, dtype=np.int64, copy=True)
        xp[pick] = add_trigger(x[pick])
        yp[pick] = BACKDOOR_TARGET
        return xp, yp
    return x, y


def backdoor_success(predict: Callable[[np.ndarray], np.ndarray], x_test: np.ndarray, y_test: np.ndarray) -> float:
    """Share of test images not of the target class that the trigger turns into the target."""
    keep = np.asarray(y_test) != BACKDOOR_TARGET
    pred = predict(add_trigger(x_test[keep]))
    return float(np.mean(pred == BACKDOOR_TARGET))


#: Honest updates a lone malicious device trains on bootstrap resamples of its own shard to
#: estimate the statistics the crafted attacks need.
BOOTSTRAP_UPDATES = 4


def device_update(name: str, train: Callable[[np.ndarray, np.ndarray, int], np.ndarray], x: np.ndarray,
                  y: np.ndarray, seed: int, *, n_total: int, n_malicious: int,
                  accepts_for: Callable[[np.ndarray], Callable[[np.ndarray], bool]] | None = None) -> np.ndarray:
    """The update one malicious device sends (the demo's devices; the benchmark crafts for all
    colluders at once). ``train(x, y, seed)`` is the device's honest training, returning a delta;
    ``accepts_for(benign)`` gives the defence's rule for the adaptive attack."""
    rng = np.random.default_rng(seed)
    xp, yp = poison_data(name, x, y, rng)
    own = train(xp, yp, seed)
    if name not in CRAFTED:
        return craft(name, own, Knowledge(own[None, :], n_total, n_malicious), rng)
    boot = [own]
    for b in range(BOOTSTRAP_UPDATES - 1):
        pick = rng.choice(len(y), size=len(y), replace=True)
        boot.append(train(x[pick], y[pick], seed + 1 + b))
    benign = np.stack(boot)
    know = Knowledge(benign, n_total, n_malicious, accepts_for(benign) if accepts_for else None)
    return craft(name, own, know, rng)
