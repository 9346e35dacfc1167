"""TLS settings build a verifying SSL context from the configured CA and client certificate."""

from __future__ import annotations

import datetime
import ssl

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
