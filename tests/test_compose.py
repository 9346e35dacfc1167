"""compose.yaml holds together without a Docker engine: every service, command and variable is
checked against the CLI and the settings (issue 12, item 7)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from common.settings import load_settings, unknown_env

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
QFLARE_SERVICES = ("operator", "coordinator", "tokens", "enclave", "dashboard", "device")


def test_every_part_is_a_service_with_a_restart_policy():
    assert set(SERVICES) >= {"rabbitmq", *QFLARE_SERVICES}
    for name in ("rabbitmq", *QFLARE_SERVICES):
        assert SERVICES[name].get("restart") in ("unless-stopped", "always", "on-failure"), name
    for one_shot in ("operator", "tokens"):  # done once, retried until they succeed
        assert SERVICES[one_shot]["restart"] == "on-failure"
    plugins = COMPOSE["configs"]["rabbitmq-plugins"]["content"]
    assert "rabbitmq_management" in plugins and "rabbitmq_prometheus" in plugins
    assert "deploy" not in SERVICES["device"] and "container_name" not in SERVICES["device"]  # --scale device=N
    assert "ports" not in SERVICES["device"]  # replicas would collide on host ports


def test_services_check_their_health_on_healthz_or_readyz():
    for name, path in (("coordinator", "/readyz"), ("enclave", "/readyz"), ("dashboard", "/healthz")):
        test = " ".join(SERVICES[name]["healthcheck"]["test"])
        env = SERVICES[name]["environment"]
        port = env.get(f"QFLARE_{name.upper()}__HTTP_PORT") or re.search(r"--port\D+(\d+)",
                                                                          _command(SERVICES[name])).group(1)
        assert f"http://127.0.0.1:{port}{path}" in test, (name, test)
        assert SERVICES[name]["ports"] == [f"{port}:{port}"]
    assert SERVICES["enclave"]["depends_on"]["coordinator"]["condition"] == "service_healthy"
    assert SERVICES["device"]["depends_on"]["enclave"]["condition"] == "service_healthy"


def _volumes(service: dict) -> dict[str, str]:
    out = {}
    for v in service.get("volumes", []):
        source, target, *mode = v.split(":")
        out[source] = mode[0] if mode else "rw"
    return out


def test_each_service_has_its_own_volumes_and_only_public_parts_cross():
    owners: dict[str, dict[str, str]] = {}
    for name, service in SERVICES.items():
        for volume, mode in _volumes(service).items():
            if not volume.startswith("."):
                owners.setdefault(volume, {})[name] = mode
    for volume, users in owners.items():
        assert volume in COMPOSE["volumes"], volume
        if volume == "platform-trust":  # the platform's public key: the enclave writes, the coordinator reads
            assert users == {"enclave": "rw", "coordinator": "ro"}
        elif volume == "device-tokens":  # one-time tokens the operator mints and devices claim
            assert set(users) == {"tokens", "device"}
        elif volume == "pins":  # public keys only: the operator's fingerprint, the coordinator's public.json (the
            # enclave reads it to pin its coordinator)
            assert users == {"operator": "rw", "coordinator": "rw", "tokens": "ro", "enclave": "ro"}
        elif volume == "operator-state":  # one principal, the operator: its key makes and then uses
            assert set(users) == {"operator", "tokens"}
        else:
            assert len(users) == 1, (volume, users)
    assert "coordinator-state" in _volumes(SERVICES["coordinator"])
    assert {"enclave-state", "enclave-platform"} <= set(_volumes(SERVICES["enclave"]))


def _command(service: dict) -> str:
    cmd = service["command"]
    if isinstance(cmd, str):
        return cmd
    return cmd[2] if cmd[:2] == ["sh", "-c"] else shlex.join(cmd)


def _qflare_invocations(text: str) -> list[list[str]]:
    text = re.sub(r"\$\$\{?(\w+)[^}\s;]*\}?", "1", text.replace("$$(hostname)", "host")).replace("$$(", "$(")
    out = []
    for part in re.split(r";|&&|\|\||&|\bdo\b|\bdone\b", text):
        words = shlex.split(part.split(">")[0]) if "qflare" in part else []
        if "qflare" in words:
            out.append(words[words.index("qflare") + 1:])
    return out


@pytest.mark.parametrize("name", QFLARE_SERVICES)
def test_commands_are_real_cli_commands(name):
    calls = _qflare_invocations(_command(SERVICES[name]))
    assert calls, name
    for args in calls:
        res = subprocess.run([sys.executable, "-m", "ops.cli", *args, "--help"], capture_output=True, text=True,
                             timeout=60, check=False, env={k: v for k, v in os.environ.items()
                                                           if not k.startswith("QFLARE_")})
        assert res.returncode == 0, (name, args, res.stderr[-500:])


@pytest.mark.parametrize("name", QFLARE_SERVICES)
def test_variables_are_settings_with_valid_values(name, monkeypatch):
    env = {k: re.sub(r"\$\{[^}]*\}", "x", str(v)) for k, v in SERVICES[name]["environment"].items()}
    qflare = {k: v for k, v in env.items() if k.startswith("QFLARE_")}
    assert unknown_env(qflare) == [], name
    for k in [k for k in os.environ if k.startswith("QFLARE_")]:
        monkeypatch.delenv(k)
    for k, v in qflare.items():
        monkeypatch.setenv(k, v)
    s = load_settings()
    assert s.broker.namespace == "qflare" and s.amqp_url.startswith("amqp://")
