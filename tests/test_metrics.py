"""Metrics follow Prometheus conventions, each service exports only what it knows, and the
shipped scrape config and Grafana dashboard refer only to metrics that exist (issue 12, item 3)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import generate_latest

from common import metrics

ROOT = Path(__file__).resolve().parent.parent


def _families(registry) -> dict[str, str]:
    return {f.name: f.type for f in registry.collect()}


def test_names_follow_prometheus_conventions():
    for registry in (metrics.COORDINATOR, metrics.ENCLAVE):
        text = generate_latest(registry).decode()
        for name, kind in re.findall(r"^# TYPE (qflare_\w+) (\w+)$", text, re.M):
            assert re.fullmatch(r"qflare_[a-z0-9_]+", name)
            if kind == "counter":
                assert name.endswith("_total"), name
            if kind == "histogram":
                assert name.endswith(("_seconds", "_bytes")), name
            assert not name.endswith(("_ms", "_milliseconds", "_kb", "_mb", "_percent")), name


def test_latencies_are_histograms():
    text = generate_latest(metrics.COORDINATOR).decode() + generate_latest(metrics.ENCLAVE).decode()
    for name in ("qflare_handshake_duration_seconds", "qflare_update_intake_duration_seconds",
                 "qflare_round_close_duration_seconds"):
        assert f"# TYPE {name} histogram" in text


def test_each_service_exports_only_what_it_can_know():
    coordinator = generate_latest(metrics.COORDINATOR).decode()
    assert "qflare_model_accuracy" not in coordinator and "qflare_model_version" not in coordinator
    assert "qflare_updates_total" not in coordinator and "qflare_rounds_total" not in coordinator
    enclave = generate_latest(metrics.ENCLAVE).decode()
    assert "qflare_enrollments_total" not in enclave and "qflare_sessions_total" not in enclave
    model = metrics.LatestModel()
    assert list(model.collect()) == []  # nothing is known before a model: no made-up 0.0
    model.version, model.accuracy = 3, 0.9
    assert {f.name: f.samples[0].value for f in model.collect()} == {"qflare_model_version": 3,
                                                                     "qflare_model_accuracy_ratio": 0.9}


def _known_names() -> set[str]:
    names = set()
    saved = metrics.MODEL.version, metrics.MODEL.accuracy
    metrics.MODEL.version, metrics.MODEL.accuracy = 1, 0.5
    try:
        for registry in (metrics.COORDINATOR, metrics.ENCLAVE):
            for family in registry.collect():
                base = family.name + ("_total" if family.type == "counter" else "")
                names |= {base, f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count"}
    finally:
        metrics.MODEL.version, metrics.MODEL.accuracy = saved
    return names


def test_the_grafana_dashboard_uses_only_exported_metrics():
    dash = json.loads((ROOT / "ops" / "grafana" / "qflare.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(qflare_[a-z0-9_]+)", e)}
    assert used and used <= _known_names(), used - _known_names()
    assert {"qflare_handshake_duration_seconds_bucket", "qflare_update_intake_duration_seconds_bucket",
            "qflare_round_close_duration_seconds_bucket"} <= used


def test_the_scrape_config_targets_each_service_on_its_port():
    config = yaml.safe_load((ROOT / "ops" / "prometheus.yml").read_text())
    targets = {j["job_name"]: j["static_configs"][0]["targets"] for j in config["scrape_configs"]}
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    for job, service, variable in (("qflare-coordinator", "coordinator", "QFLARE_COORDINATOR__HTTP_PORT"),
                                   ("qflare-enclave", "enclave", "QFLARE_ENCLAVE__HTTP_PORT")):
        assert targets[job] == [f"{service}:{compose[service]['environment'][variable]}"]
