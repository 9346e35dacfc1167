"""TLS settings build a verifying SSL context from the configured CA and client certificate."""

from __future__ import annotations

import datetime
import os
import ssl
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from broker.connection import redact, tls_context
from common.settings import load_settings


def self_signed(tmp_path, name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_amqps_url_gets_a_verifying_context_with_client_certificate(tmp_path):
    ca, _ = self_signed(tmp_path, "ca")
    cert, key = self_signed(tmp_path, "client")
    s = load_settings(amqp_url="amqps://u:p@broker.example:5671/", state_dir=tmp_path,
                      broker={"ca_file": str(ca), "cert_file": str(cert), "key_file": str(key)})
    ctx = tls_context(s)
    assert ctx is not None and ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert any(c["subject"] == ((("commonName", "ca"),),) for c in ctx.get_ca_certs())


def test_plain_amqp_has_no_tls_and_passwords_are_redacted(tmp_path):
    assert tls_context(load_settings(state_dir=tmp_path)) is None
    assert "p4ss" not in redact("amqp://user:p4ss@host:5672/")


def test_a_missing_ca_file_is_a_clear_error(tmp_path):
    s = load_settings(amqp_url="amqps://host/", state_dir=tmp_path, broker={"ca_file": str(tmp_path / "none.pem")})
    with pytest.raises(FileNotFoundError):
        tls_context(s)


# --- a real TLS listener on a private node (issue 8 item 12) ------------------------------------


@pytest.fixture
def tls_node(rabbit_node, tmp_path):
    """A private node that speaks only TLS and requires a client certificate from our CA."""
    from tests.rabbitnode import make_tls_files

    files = make_tls_files(tmp_path / "pki")
    return rabbit_node(tls=files, plain=False, require_client_cert=True), files


def tls_settings(node, tmp_path, *, ca, cert, key, **kw):
    return load_settings(amqp_url=node.tls_url, state_dir=tmp_path / "state",
                         broker={"namespace": "tls" + os.urandom(4).hex(), "ca_file": str(ca),
                                 "cert_file": str(cert), "key_file": str(key), "rpc_timeout": 15.0}, **kw)


@pytest.mark.broker
async def test_enrollment_session_and_round_over_verified_amqps(tls_node, tmp_path):
    from ops.demo import run_demo

    node, pki = tls_node
    s = tls_settings(node, tmp_path, ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
    report = await run_demo(s, devices=3, rounds=1)
    assert [r.status for r in report.rounds] == ["completed"]
    assert report.rounds[0].accepted == 3
    # the node has no plain listener, so all of the above went over TLS; the broker sees our
    # client certificate on the connection
    from broker.client import BrokerClient

    async with await BrokerClient.open(s, name="pytest-tls", declare=False):
        listed = node.ctl("list_connections", "ssl", "peer_cert_subject", "--silent")
    assert listed.returncode == 0, listed.stderr
    assert "true" in listed.stdout and "CN=client" in listed.stdout, listed.stdout


@pytest.mark.broker
async def test_a_broker_certificate_from_another_ca_is_refused_naming_the_ca(tls_node, tmp_path):
    from broker.client import BrokerClient
    from broker.connection import BrokerTlsError
    from tests.rabbitnode import make_ca

    node, pki = tls_node
    wrong_ca, _ = make_ca(tmp_path / "other", "someone-elses-ca")
    s = tls_settings(node, tmp_path, ca=wrong_ca, cert=pki.client_cert, key=pki.client_key)
    with pytest.raises(BrokerTlsError) as err:
        await BrokerClient.open(s, name="pytest-wrong-ca")
    text = str(err.value)
    assert "\n" not in text and str(wrong_ca) in text and "not trusted" in text, text
    assert "certificate verify failed" in text


@pytest.mark.broker
async def test_a_client_certificate_from_another_ca_is_refused_naming_the_certificate(tls_node, tmp_path):
    from broker.client import BrokerClient
    from broker.connection import BrokerTlsError
    from tests.rabbitnode import issue, make_ca

    node, pki = tls_node
    rogue = issue(tmp_path / "rogue", "rogue-client", make_ca(tmp_path / "rogue", "rogue-ca"), server=False)
    s = tls_settings(node, tmp_path, ca=pki.ca, cert=rogue[0], key=rogue[1])
    with pytest.raises(BrokerTlsError) as err:
        await BrokerClient.open(s, name="pytest-rogue-cert")
    assert "\n" not in str(err.value) and str(rogue[0]) in str(err.value) and "refused" in str(err.value)


@pytest.mark.broker
def test_the_cli_says_which_ca_failed_in_one_line_without_a_traceback(tls_node, tmp_path):
    from tests.rabbitnode import make_ca

    node, pki = tls_node
    wrong_ca, _ = make_ca(tmp_path / "other", "someone-elses-ca")
    env = {**os.environ, "QFLARE_AMQP_URL": node.tls_url, "QFLARE_STATE_DIR": str(tmp_path / "cli"),
           "QFLARE_BROKER__CA_FILE": str(wrong_ca), "QFLARE_BROKER__CERT_FILE": str(pki.client_cert),
           "QFLARE_BROKER__KEY_FILE": str(pki.client_key), "COLUMNS": "400"}
    res = subprocess.run([sys.executable, "-m", "ops.cli", "broker", "check"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 3  # the broker cannot be reached (docs/operations.md, exit codes)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert str(wrong_ca) in lines[0] and "not trusted" in lines[0], lines
