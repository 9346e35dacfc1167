"""Sharded enclaves, pure parts with real crypto: routing, partials, the root's combination
(docs/scaling.md, "Sharded enclaves")."""

from __future__ import annotations

import time

import numpy as np
import pytest

from common.settings import Settings
from common.shards import shard_of
from enclave_worker import aggregate as agg
from enclave_worker import shards as sh
from pqc.identity import Identity
from schemas.codec import decode
from schemas.messages import PartialEnvelope, ShardPartial
from schemas.reasons import QflareError, Reason

NS = "unit"
D = 50


@pytest.fixture(scope="module")
def enclave() -> Identity:
    return Identity.generate("ML-DSA-44", "ML-KEM-768")


def admitted(ident: Identity) -> dict[str, sh.SignerKey]:
    return {ident.sig_fp: sh.SignerKey(ident.sig_alg, ident.sig_pk)}


def partial(shard: int, deltas, weights, *, round_id=1, base=3, shards=2, rejected=None, issued_at=None):
    s, total = sh.weighted_sum(deltas, weights, np.ones(len(weights), dtype=bool))
    return ShardPartial(round_id=round_id, shard=shard, shards=shards, base_version=base, layout_id="L",
                        weighted_sum=s.astype("<f8").tobytes(), weight_total=total, received=len(weights),
                        accepted=len(weights), rejected=rejected or {},
                        issued_at=time.time() if issued_at is None else issued_at)


def test_shard_of_is_stable_and_spreads():
    ids = [f"dev-{i}" for i in range(2000)]
    assert [shard_of(d, 4) for d in ids] == [shard_of(d, 4) for d in ids]
    counts = np.bincount([shard_of(d, 4) for d in ids], minlength=4)
    assert counts.min() > 400  # near 500 each
    assert all(shard_of(d, 1) == 0 for d in ids)
    assert shard_of("dev-0", 2) == int.from_bytes(__import__("hashlib").sha256(b"dev-0").digest()[:8], "big") % 2


def test_settings_refuse_a_shard_index_past_the_count():
    with pytest.raises(ValueError):
        Settings(enclave={"shards": 2, "shard": 2})
    assert Settings(enclave={"shards": 2, "shard": 1}).enclave.shard == 1


def test_combined_partials_equal_fedavg_over_all_updates():
    rng = np.random.default_rng(1)
    deltas = rng.normal(size=(12, D)).astype(np.float32)
    weights = rng.integers(10, 100, size=12).astype(np.float64)
    owner = np.array([i % 3 for i in range(12)])
    parts = [partial(s, deltas[owner == s], weights[owner == s], shards=3) for s in range(3)]
    out = sh.combine(parts)
    assert out.used == [0, 1, 2] and not out.dropped
    np.testing.assert_allclose(out.delta, agg.fedavg(deltas, weights), rtol=1e-6, atol=1e-7)


def test_a_partial_far_from_the_others_is_left_out():
    rng = np.random.default_rng(2)
    honest = [partial(s, rng.normal(0.1, 0.01, size=(4, D)), np.ones(4), shards=4) for s in range(3)]
    bad = partial(3, np.full((4, D), -5.0), np.ones(4), shards=4)
    out = sh.combine([*honest, bad])
    assert out.dropped == {3: Reason.OUTLIER.value} and out.used == [0, 1, 2]
    assert out.delta.mean() > 0
    # over the norm bound: no honestly screened shard can send it
    assert sh.combine([honest[0], bad], max_norm=1.0).dropped == {3: Reason.NORM_BOUND.value}


def test_a_partial_seals_and_opens_with_the_admitted_key(enclave):
    p = partial(1, np.ones((2, D)), np.array([1.0, 3.0]))
    env = decode(sh.seal_partial(p, enclave, enclave.kem_alg, enclave.kem_pk, NS), PartialEnvelope)
    assert sh.open_partial(env, enclave.kem_sk, admitted(enclave), NS) == p


def test_a_partial_signed_by_an_unadmitted_key_is_refused(enclave):
    rogue = Identity.generate("ML-DSA-44", "ML-KEM-768")  # a valid key, never attested
    p = partial(1, np.ones((2, D)), np.ones(2))
    env = decode(sh.seal_partial(p, rogue, enclave.kem_alg, enclave.kem_pk, NS), PartialEnvelope)
    with pytest.raises(QflareError) as err:
        sh.open_partial(env, enclave.kem_sk, admitted(enclave), NS)
    assert err.value.reason == Reason.BAD_SIGNATURE


def test_a_partial_moved_to_another_round_or_shard_does_not_open(enclave):
    p = partial(1, np.ones((2, D)), np.ones(2))
    env = decode(sh.seal_partial(p, enclave, enclave.kem_alg, enclave.kem_pk, NS), PartialEnvelope)
    for moved in (env.model_copy(update={"round_id": 2}), env.model_copy(update={"shard": 2}),
                  env.model_copy(update={"base_version": 4})):
        with pytest.raises(QflareError) as err:
            sh.open_partial(moved, enclave.kem_sk, admitted(enclave), NS)
        assert err.value.reason == Reason.DECRYPTION_FAILED
    with pytest.raises(QflareError):
        sh.open_partial(env, enclave.kem_sk, admitted(enclave), "other-namespace")


def test_a_replayed_partial_is_refused():
    book = sh.PartialBook(round_id=1, shards=2, base_version=3, layout_id="L", n_params=D)
    p = partial(1, np.ones((2, D)), np.ones(2))
    book.take(p)
    with pytest.raises(QflareError) as err:
        book.take(p)  # the same partial again
    assert err.value.reason == Reason.REPLAY
    with pytest.raises(QflareError) as err:
        book.take(partial(1, np.zeros((2, D)), np.ones(2)))  # a second, different one from the same shard
    assert err.value.reason == Reason.REPLAY
    assert book.taken[1] == p


@pytest.mark.parametrize(("change", "reason"), [
    ({"round_id": 2}, Reason.WRONG_ROUND), ({"base_version": 2}, Reason.STALE_BASE),
    ({"shard": 0}, Reason.WRONG_SHARD), ({"shards": 3}, Reason.WRONG_SHARD),
    ({"issued_at": time.time() + 3600}, Reason.STALE), ({"layout_id": "M"}, Reason.LAYOUT_MISMATCH),
    ({"accepted": 5}, Reason.INVALID_FIELD), ({"weighted_sum": b"\0" * 8}, Reason.LAYOUT_MISMATCH),
    ({"weight_total": 0.0}, Reason.INVALID_FIELD),
    ({"weighted_sum": np.full(D, np.nan).tobytes()}, Reason.NON_FINITE),
])
def test_a_partial_that_is_not_the_rounds_is_refused(change, reason):
    book = sh.PartialBook(round_id=1, shards=2, base_version=3, layout_id="L", n_params=D)
    p = partial(1, np.ones((2, D)), np.ones(2)).model_copy(update=change)
    with pytest.raises(QflareError) as err:
        book.take(p)
    assert err.value.reason == reason and not book.taken


def test_an_update_sent_to_the_wrong_shard_is_refused():
    mine = next(d for d in (f"d{i}" for i in range(100)) if shard_of(d, 2) == 1)
    sh.check_shard(mine, 1, 2)
    with pytest.raises(QflareError) as err:
        sh.check_shard(mine, 0, 2)
    assert err.value.reason == Reason.WRONG_SHARD


def test_only_the_enclave_user_may_read_the_shard_queues_and_the_partials():
    import re

    from broker.users import device_permissions, service_permissions
    from schemas.names import Names

    n = Names("unit")
    shard_queues = [n.shard_queue(1, w) for w in ("updates", "control", "models", "peers")] + [n.partials_queue]
    enclave = service_permissions(n, "enclave")["read"]
    assert all(re.match(enclave, q) for q in shard_queues)
    for role in ("coordinator", "operator"):
        assert not any(re.match(service_permissions(n, role)["read"], q) for q in shard_queues), role
    device = device_permissions(n, "d1")["permissions"]
    assert not any(re.match(device["read"], q) or re.match(device["configure"], q) for q in shard_queues)


def test_a_sharded_device_may_name_any_shard_in_its_key_but_only_its_own_id():
    import re

    from broker.users import device_permissions
    from common.shards import update_key
    from schemas.names import Names

    n = Names("unit")
    assert device_permissions(n, "d1")["topic"]["write"] == r"^update\.d1$"  # one enclave: unchanged
    write = device_permissions(n, "d1", shards=4)["topic"]["write"]
    assert re.match(write, update_key("d1", 4))
    assert all(re.match(write, Names.update_key("d1", i)) for i in range(4))
    for key in ("update.d1", "shard.1.d2", "shard.1.d1.x", "shard.x.d1", "shard.1.x.d1", "shard..d1"):
        assert not re.match(write, key), key


def test_the_routed_device_id_of_a_sharded_key_is_the_id_after_the_shard():
    from schemas.names import Names

    assert Names.routed_device(Names.update_key("a.b", 3)) == "a.b"
    assert Names.routed_device(Names.update_key("a.b")) == "a.b"
    assert Names.routed_device("shard.3") == "" and Names.routed_device("update") is None
