"""The enclave's poisoning defence: one pure function from a round's updates to its aggregate.

Five steps, each named by the reason it gives a rejected update (docs/robustness.md):

1. ``non_finite``: NaN or infinity.
2. ``norm_bound``: norm over ``fl.max_norm`` or ``fl.norm_median_multiple`` x the round's
   median norm (boosted updates).
3. ``low_cosine``: cosine to a reference no device can move below ``fl.min_cosine``. The
   reference is the enclave's own update on sealed root data (FLTrust, Cao et al. 2021);
   without root data, the geometric median of the updates (robust while honest updates are a
   majority).
4. ``outlier``: the update's median cosine distance to the round's other updates is more than
   ``fl.outlier_mads`` robust deviations above the round's typical value (the distance test of
   FLAME, Nguyen et al. 2022, without its clustering library).
5. ``quarantined``: the device's decayed reputation (``enclave_worker.reputation``) fell below
   ``fl.quarantine_below`` after repeated rejections.

The survivors are rescaled to their median norm (adaptive clipping) and averaged with their
(already capped) sample weights times their trust (positive cosine to the reference, relative
to the survivors' median, capped at 1, to the power ``fl.trust_power``) in rounds where
weighting by trust raises the aggregate's cosine to the reference by ``fl.trust_min_gain``;
near-copies (cosine above ``fl.copy_cosine``) share one vote, so colluders sending one crafted
vector count as one device (FoolsGold's observation).

Everything is computed from one Gram matrix of the updates (k x k, one pass over the data)
and, with root data, one product with the reference: 100 updates of 1M parameters take a
few tenths of a second on one core.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from enclave_worker import aggregate as agg
from enclave_worker import reputation
from schemas.reasons import Reason

#: Below this many candidates a geometric median or a distance test says nothing robust.
MIN_FOR_REFERENCE = 3
MIN_FOR_OUTLIERS = 4
#: MAD -> standard deviation for normally distributed scores.
MAD_SCALE = 1.4826
WEISZFELD_ITERATIONS = 64


@dataclass(frozen=True)
class DefenceState:
    """What the next round needs: each device's reputation (absent = new device), and whether
    an earlier round showed that trust weighting helps (then it stays on)."""

    reputations: dict[str, float] = field(default_factory=dict)
    trust_on: bool = False

    def as_json(self) -> dict:
        return {"reputations": {k: round(v, 6) for k, v in sorted(self.reputations.items())},
                "trust_on": self.trust_on}

    @classmethod
    def from_json(cls, data: dict | None) -> DefenceState:
        reps = (data or {}).get("reputations", {})
        return cls({str(k): float(v) for k, v in reps.items()}, bool((data or {}).get("trust_on", False)))


@dataclass(frozen=True)
class Defence:
    """Verdict of one round: ``reasons[i]`` None when update i is aggregated."""

    aggregate: np.ndarray | None
    reasons: list[Reason | None]
    state: DefenceState
    #: Cosine of each update to the reference (nan where not computed).
    trust: np.ndarray
    #: Devices that entered quarantine this round (one event each).
    newly_quarantined: list[str]

    @property
    def accepted(self) -> np.ndarray:
        return np.array([r is None for r in self.reasons], dtype=bool)


def _copy_votes(gram: np.ndarray, norms: np.ndarray, copy_cosine: float | None) -> np.ndarray:
    """One vote per group of near-copies: 1 / (how many updates lie within ``copy_cosine``)."""
    if copy_cosine is None or gram.shape[0] < 2:
        return np.ones(gram.shape[0])
    n = np.maximum(norms, 1e-30)
    return 1.0 / ((gram / np.outer(n, n)) > copy_cosine).sum(axis=1)


def _trust_helps(gram: np.ndarray, ref_dots: np.ndarray, ref_norm: float, coef: np.ndarray,
                 trust: np.ndarray, most: float, min_gain: float) -> bool:
    """Whether weighting by trust (at ``most``/3, 2 ``most``/3 or ``most``) raises the cosine of
    the aggregate sum_i coef_i trust_i^p u_i to the reference by ``min_gain`` over the plain
    aggregate's.

    Trust weighting exists to pull the aggregate towards what clean data says (a backdoor's
    updates point away from it; fading them raises the aggregate's cosine by 0.05-0.2). On
    fleets of one-class shards every update is poorly aligned alone and the classes differ in
    how much: weighting by trust then starves classes and does not raise the aggregate's cosine
    (at most +0.007 measured). Judging the aggregate, not the individuals, tells the two apart
    (k x k work, no pass over the data).
    """
    def cosine(p: float) -> float:
        c = coef * trust ** p
        sq = float(c @ gram @ c)
        return float(c @ ref_dots) / (np.sqrt(sq) * ref_norm) if sq > 0 else -np.inf

    base = cosine(0.0)
    return bool(max(cosine(p) for p in (most / 3.0, 2.0 * most / 3.0, most)) - base >= min_gain)


def _geometric_median(gram: np.ndarray, votes: np.ndarray) -> np.ndarray:
    """Weights alpha with sum(alpha) = 1 such that sum_i alpha_i g_i is the ``votes``-weighted
    geometric median of the g_i (Weiszfeld's iteration, written on the Gram matrix so it costs
    O(k^2) a step)."""
    alpha = votes / votes.sum()
    diag = np.diag(gram)
    for _ in range(WEISZFELD_ITERATIONS):
        ga = gram @ alpha
        dist = np.sqrt(np.maximum(alpha @ ga - 2.0 * ga + diag, 0.0))
        inv = 1.0 / np.maximum(dist, 1e-12 * max(float(np.sqrt(diag.max())), 1e-30))
        new = votes * inv / (votes * inv).sum()
        if np.abs(new - alpha).max() < 1e-9:
            return new
        alpha = new
    return alpha


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, cum[-1] / 2.0)])


def _robust_high(scores: np.ndarray, mads: float) -> np.ndarray:
    """Mask of scores more than ``mads`` robust deviations above their median."""
    med = float(np.median(scores))
    mad = MAD_SCALE * float(np.median(np.abs(scores - med)))
    return scores > med + mads * max(mad, 1e-12)


def defend(deltas: np.ndarray, weights: np.ndarray, devices: Sequence[str], fl, *,
           reference: np.ndarray | None = None, state: DefenceState | None = None) -> Defence:
    """Screen the round's updates and aggregate the survivors (pure; no I/O).

    ``deltas`` (k, d) float32, ``weights`` (k,) capped sample counts, ``devices`` the k device
    ids, ``fl`` the settings' ``fl`` section, ``reference`` the enclave's root-data update when
    the operator sealed root data, ``state`` the previous round's :class:`DefenceState`.
    """
    u = np.asarray(deltas)
    if u.ndim != 2:
        raise ValueError(f"deltas must have shape (k, d), got {u.shape}")
    if u.dtype != np.float32:
        u = u.astype(np.float32)
    k = u.shape[0]
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != k or len(devices) != k:
        raise ValueError(f"{k} updates need {k} weights and device ids (got {w.shape[0]}, {len(devices)})")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("weights must be finite and non-negative")
    state = state or DefenceState()
    reasons: list[Reason | None] = [None] * k
    trust = np.full(k, np.nan)
    if k == 0:
        return Defence(None, reasons, state, trust, [])

    with np.errstate(over="ignore", invalid="ignore"):
        gram = (u @ u.T).astype(np.float64)  # the one pass over the data
    sq = np.diag(gram).copy()
    alive = np.isfinite(sq)
    for i in np.flatnonzero(~alive):
        # An overflow of float32 squares is a huge but finite update: a norm problem.
        reasons[i] = Reason.NORM_BOUND if np.isfinite(u[i]).all() else Reason.NON_FINITE
    norms = np.sqrt(np.where(alive, sq, 0.0))

    # 2. norm bound
    if alive.any():
        too_big = np.zeros(k, dtype=bool)
        if fl.max_norm is not None:
            too_big |= norms > fl.max_norm
        if fl.norm_median_multiple is not None:
            too_big |= norms > fl.norm_median_multiple * float(np.median(norms[alive]))
        for i in np.flatnonzero(alive & too_big):
            reasons[i] = Reason.NORM_BOUND
        alive &= ~too_big

    # 3. direction against a reference no device can move
    idx = np.flatnonzero(alive & (norms > 0))
    ref_dots = ref_norm = None
    if reference is not None:
        r = np.asarray(reference, dtype=np.float32).reshape(-1)
        if r.shape[0] != u.shape[1]:
            raise ValueError(f"reference length {r.shape[0]} != update length {u.shape[1]}")
        ref_norm = float(np.linalg.norm(r.astype(np.float64)))
        if idx.size and ref_norm > 0:
            with np.errstate(over="ignore", invalid="ignore"):
                dots = (u @ r).astype(np.float64)  # all rows: indexing first would copy the round
            ref_dots = np.zeros(k)
            ref_dots[idx] = dots[idx]
    elif idx.size >= MIN_FOR_REFERENCE:
        sub = gram[np.ix_(idx, idx)]
        alpha = _geometric_median(sub, _copy_votes(sub, norms[idx], fl.copy_cosine))
        ref_dots = np.zeros(k)
        ref_dots[idx] = sub @ alpha
        ref_norm = float(np.sqrt(max(alpha @ sub @ alpha, 0.0)))
    if ref_dots is not None and ref_norm:
        trust[idx] = ref_dots[idx] / (norms[idx] * ref_norm)
        if fl.min_cosine is not None:
            for i in idx[trust[idx] < fl.min_cosine]:
                reasons[i] = Reason.LOW_COSINE
                alive[i] = False

    # 4. distance test among the round's updates
    idx = np.flatnonzero(alive & (norms > 0))
    if fl.outlier_mads is not None and idx.size >= MIN_FOR_OUTLIERS:
        cos = gram[np.ix_(idx, idx)] / np.outer(norms[idx], norms[idx])
        dist = 1.0 - cos
        np.fill_diagonal(dist, np.nan)
        scores = np.nanmedian(dist, axis=1)
        for i in idx[_robust_high(scores, fl.outlier_mads)]:
            reasons[i] = Reason.OUTLIER
            alive[i] = False

    # 5. reputation across rounds
    passed = [r is None for r in reasons]
    reps = reputation.updated(state.reputations, list(devices), passed, fl.reputation_decay)
    newly: list[str] = []
    for i, dev in enumerate(devices):
        was = reputation.quarantined(state.reputations, dev, fl.quarantine_below)
        now = reputation.quarantined(reps, dev, fl.quarantine_below)
        if now and not was:
            newly.append(dev)
        if now and reasons[i] is None:
            reasons[i] = Reason.QUARANTINED
            alive[i] = False
    trust_on = state.trust_on

    keep = np.flatnonzero(alive)
    if keep.size == 0:
        return Defence(None, reasons, DefenceState(reps, trust_on), trust, newly)
    # Near-copies share one vote: honest devices never send copies of each other's update
    # unless they hold the same data (then the copy adds nothing); colluders crafting one
    # vector from shared statistics (ALIE, min-max, IPM) count as one device, not many.
    votes = _copy_votes(gram[np.ix_(keep, keep)], norms[keep], fl.copy_cosine)
    scale = np.ones(keep.size)
    if fl.rescale != "none":
        # To the survivors' median norm (one vote per group of copies): down ("clip", adaptive
        # clipping) so a boosted update cannot outweigh others, and up too ("median") so a
        # shrunken one cannot slow the round down.
        scale = _weighted_median(norms[keep], votes) / np.maximum(norms[keep], 1e-30)
        if fl.rescale == "clip":
            scale = np.minimum(scale, 1.0)
    coef = w[keep] * votes
    if fl.trust_weighting and not np.isnan(trust[keep]).any():
        t = np.maximum(trust[keep], 0.0)
        if fl.trust_relative:
            # relative to the survivors' (vote-weighted) median trust, never above 1: an update
            # as aligned as a typical honest one counts fully; less aligned ones fade quickly
            t = np.minimum(1.0, t / max(_weighted_median(t, votes), 1e-12))
        if fl.trust_min_gain is None:
            trust_on = True
        elif not trust_on:  # once a round showed it helps (an attack), it stays on
            trust_on = bool(_trust_helps(gram[np.ix_(keep, keep)], ref_dots[keep], ref_norm, coef * scale, t,
                                         fl.trust_power, fl.trust_min_gain))
        if trust_on:
            coef *= t ** fl.trust_power
    new_state = DefenceState(reps, trust_on)
    if coef.sum() <= 0:  # every survivor has zero weight or trust: average them plainly
        coef = np.ones(keep.size)
    if fl.aggregator == "fedavg":
        c = (coef * scale / coef.sum()).astype(np.float32)
        if np.isfinite(sq).all():  # zero weights over all rows: no copy of the round
            full = np.zeros(k, dtype=np.float32)
            full[keep] = c
            combined = (full @ u).astype(np.float32)
        else:  # a NaN row times a zero weight is still NaN: leave those rows out
            combined = (c @ u[keep]).astype(np.float32)
    else:
        params = {"trimmed_mean": {"beta": fl.trim_beta},
                  "multi_krum": {"f": min(fl.krum_f, max(0, keep.size - 3))}}.get(fl.aggregator, {})
        combined = agg.aggregate(fl.aggregator, u[keep] * scale[:, None].astype(np.float32), coef, **params)
    return Defence(combined, reasons, new_state, trust, newly)
