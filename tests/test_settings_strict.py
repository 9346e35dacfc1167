"""Typo'd settings are errors with one line, never silently ignored (pure: no broker)."""

from __future__ import annotations

import pytest

from common.settings import ConfigError, load_settings, unknown_env


def test_a_typo_in_a_nested_setting_is_an_error_that_suggests_the_field(tmp_path):
    cfg = tmp_path / "q.yaml"
    cfg.write_text("fl:\n  roundz: 5\n")
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert str(err.value) == "fl.roundz: unknown setting; did you mean 'rounds'?"


def test_a_typo_in_a_nested_variable_is_an_error(monkeypatch):
    monkeypatch.setenv("QFLARE_FL__ROUNDZ", "5")
    with pytest.raises(ConfigError, match="unknown variable QFLARE_FL__ROUNDZ"):
        load_settings()


def test_unknown_qflare_variables_are_reported_and_known_ones_are_not():
    env = {"QFLARE_AMQP_URL": "amqp://x", "QFLARE_FL__ROUNDS": "3", "QFLARE_CONFIG": "a.yaml",
           "QFLARE_NAMESPACE": "ns", "QFLARE_ROUNDS": "3", "QFLARE_BROKER__NAMESPACEE": "x",
           "QFLARE_STATE_DIR__X": "1", "OTHER": "1", "qflare_dashboard__token": "t"}
    assert unknown_env(env) == ["QFLARE_BROKER__NAMESPACEE", "QFLARE_ROUNDS", "QFLARE_STATE_DIR__X"]


def test_the_old_metrics_port_says_what_replaced_it(monkeypatch, tmp_path):
    monkeypatch.setenv("QFLARE_METRICS_PORT", "9101")
    with pytest.raises(ConfigError, match="replaced by coordinator.http_port and enclave.http_port"):
        load_settings()
    monkeypatch.delenv("QFLARE_METRICS_PORT")
    cfg = tmp_path / "q.yaml"
    cfg.write_text("metrics_port: 9101\n")
    with pytest.raises(ConfigError, match="metrics_port: was replaced by coordinator.http_port"):
        load_settings(cfg)


def test_qflare_namespace_is_the_namespace_variable(monkeypatch):
    monkeypatch.setenv("QFLARE_NAMESPACE", "plant-7")
    assert load_settings().broker.namespace == "plant-7"
    monkeypatch.setenv("QFLARE_BROKER__NAMESPACE", "plant-8")
    with pytest.raises(ConfigError, match="disagree"):
        load_settings()
    monkeypatch.setenv("QFLARE_BROKER__NAMESPACE", "plant-7")
    assert load_settings().broker.namespace == "plant-7"


def test_each_service_has_its_own_http_port_setting():
    s = load_settings(coordinator={"http_port": 9101}, enclave={"http_port": 9102})
    assert (s.coordinator.http_port, s.enclave.http_port) == (9101, 9102)
    assert load_settings().coordinator.http_port is None  # off unless asked: no collisions by default
