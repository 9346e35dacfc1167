"""Pure rules for riding out outages: when a round may close, reconnect pauses, noticing sleep,
and naming a failed TLS handshake."""

from __future__ import annotations

import pytest

from broker.backoff import Backoff
from broker.connection import BrokerTlsError, tls_failure
from common.settings import load_settings
from edge_agent.wakeup import SleepWatch
from enclave_worker.deadline import close_time


def test_a_deadline_inside_an_outage_moves_to_grace_after_the_recovery():
    assert close_time(100.0, None, 15) == 100.0  # never lost the broker
    assert close_time(100.0, 50.0, 15) == 100.0  # recovered well before the deadline
    assert close_time(100.0, 95.0, 15) == 110.0  # back 5 s before it: resends get their grace
    assert close_time(100.0, 130.0, 15) == 145.0  # the deadline fell inside the outage


def test_backoff_doubles_to_its_cap_never_reaches_zero_and_resets():
    low = Backoff(1.0, 8.0, rand=lambda: 0.0)
    assert [low.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    high = Backoff(1.0, 8.0, rand=lambda: 1.0)
    assert [high.next() for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    high.reset()
    assert high.next() == 1.0
    with pytest.raises(ValueError):
        Backoff(0, 1)


def test_backoff_jitter_spreads_a_fleet():
    import random

    rng = random.Random(7)
    pauses = {round(Backoff(1.0, 60.0, rand=rng.random).next(), 3) for _ in range(50)}
    assert len(pauses) > 40 and all(0.5 <= p <= 1.0 for p in pauses)


def test_a_jump_of_the_wall_clock_past_the_monotonic_clock_is_noticed_as_sleep():
    now = {"wall": 1000.0, "mono": 50.0}
    watch = SleepWatch(threshold=10.0, clock=lambda: (now["wall"], now["mono"]))
    now["wall"] += 5
    now["mono"] += 5
    assert watch.slept() == 0.0  # awake: both clocks moved together
    now["wall"] += 300  # suspended: only the wall clock moved
    now["mono"] += 1
    assert watch.slept() == pytest.approx(299.0)
    assert watch.slept() == 0.0  # counted once


def test_tls_failures_are_one_line_naming_the_ca_or_the_certificate(tmp_path):
    s = load_settings(amqp_url="amqps://u:secret@broker:5671/", state_dir=tmp_path,
                      broker={"ca_file": "/etc/qflare/ca.pem", "cert_file": "/etc/qflare/dev.pem"})
    ca = tls_failure(s, OSError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local "
                                "issuer certificate (_ssl.c:1006)"))
    assert isinstance(ca, BrokerTlsError) and "/etc/qflare/ca.pem" in str(ca) and "secret" not in str(ca)
    cert = tls_failure(s, OSError("[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca (_ssl.c:2580)"))
    assert "/etc/qflare/dev.pem" in str(cert) and "refused" in str(cert)
    assert tls_failure(s, OSError("[Errno 111] Connect call failed")) is None  # not TLS: broker unavailable
    for err in (ca, cert):
        assert "\n" not in str(err)
