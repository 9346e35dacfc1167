"""What the dashboard shows, folded from events (pure: events in, a JSON-able snapshot out).

The dashboard reads nothing from the services' disks (in a deployment it has none of their
volumes): it replays the durable events stream from its first offset and follows it live, so
the fleet, the rounds, the enclave's attestation and the dead letters are what the events
say. Queue figures come from the management API (:mod:`ops.dashboard.feed`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from schemas.messages import Event

#: Rounds and dead-letter reasons kept in the snapshot (the newest), so it stays small.
MAX_ROUNDS = 200


@dataclass
class DeviceRow:
    device_id: str
    state: str = "active"
    enrolled_at: float | None = None
    last_seen: float | None = None
    sig_fp: str = ""
    accepted: int = 0
    rejected: int = 0
    reputation: float | None = None


@dataclass
class RoundRow:
    round_id: int
    status: str = "running"
    opened_at: float | None = None
    deadline: float | None = None
    expected: int = 0
    min_updates: int = 0
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    accuracy: float | None = None
    version: int | None = None
    closed_at: float | None = None
    #: Why a round failed, stalled or was cancelled (a round's reason, not an update's).
    reason: str | None = None


def parse_rejected(text: object) -> dict[str, int]:
    """``"norm_bound=2,replay=1"`` (round.completed's detail) as a dict."""
    out: dict[str, int] = {}
    for part in str(text or "").split(","):
        name, _, count = part.partition("=")
        if name and count.isdigit():
            out[name] = int(count)
    return out


class FleetView:
    """Folds events into the dashboard's state; ``version`` grows with every change."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.devices: dict[str, DeviceRow] = {}
        self.rounds: dict[int, RoundRow] = {}
        self.enclave: dict[str, Any] = {}
        self.dead_letters: dict[str, int] = {}
        self.rejections: dict[str, int] = {}
        self.queues: list[dict[str, Any]] = []
        self.queues_error: str | None = None
        self.broker_error: str | None = None
        self.events_seen = 0
        self.last_event_at: float | None = None
        self.version = 0

    def _device(self, device_id: str) -> DeviceRow:
        if device_id not in self.devices:
            self.devices[device_id] = DeviceRow(device_id)
        return self.devices[device_id]

    def _round(self, round_id: int) -> RoundRow:
        if round_id not in self.rounds:
            self.rounds[round_id] = RoundRow(round_id)
            for old in sorted(self.rounds)[:-MAX_ROUNDS]:
                del self.rounds[old]
        return self.rounds[round_id]

    def apply(self, ev: Event) -> None:
        t, d = ev.type, ev.detail
        self.events_seen += 1
        self.last_event_at = ev.at
        if ev.device_id and not t.startswith(("enrollment.rejected.", "session.rejected.", "rotation.rejected.")):
            dev = self._device(ev.device_id)
            dev.last_seen = max(dev.last_seen or 0.0, ev.at)
            if isinstance(d.get("reputation"), int | float):
                dev.reputation = float(d["reputation"])
        if t == "device.enrolled":
            dev = self._device(ev.device_id or "?")
            dev.state, dev.enrolled_at, dev.sig_fp = "active", ev.at, str(d.get("sig_fp", ""))
        elif t == "device.rotated":
            self._device(ev.device_id or "?").sig_fp = str(d.get("sig_fp", ""))
        elif t == "device.revoked":
            self._device(ev.device_id or "?").state = "revoked"
        elif t == "device.quarantined":
            dev = self._device(ev.device_id or "?")
            dev.state = "quarantined" if dev.state != "revoked" else dev.state
        elif t == "enclave.attested":
            self.enclave = {k: d.get(k) for k in ("measurement", "kem_fp", "sig_fp", "platform_fp", "platform")}
            self.enclave["attested_at"] = ev.at
        elif t == "round.opened" and ev.round_id is not None:
            r = self._round(ev.round_id)
            r.status, r.opened_at = "running", ev.at
            r.deadline, r.expected, r.min_updates = d.get("deadline"), int(d.get("expected") or 0), \
                int(d.get("min_updates") or 0)
        elif t == "update.accepted":
            # a round's end travels on a confirming channel, so it may overtake its last updates'
            # events: once closed, the round's own figures are final
            if ev.round_id is not None and self._round(ev.round_id).status == "running":
                self._round(ev.round_id).accepted += 1
            if ev.device_id:
                dev = self._device(ev.device_id)
                dev.accepted += 1
                if isinstance(d.get("quarantined"), bool) and dev.state in ("active", "quarantined"):
                    dev.state = "quarantined" if d["quarantined"] else "active"
        elif t.startswith("update.rejected."):
            reason = ev.reason or t.rsplit(".", 1)[-1]
            self.rejections[reason] = self.rejections.get(reason, 0) + 1
            if ev.round_id is not None and self._round(ev.round_id).status == "running":
                r = self._round(ev.round_id)
                r.rejected[reason] = r.rejected.get(reason, 0) + 1
                if r.status == "running" and d.get("update_id"):
                    r.accepted = max(0, r.accepted - 1)  # a filter refused a stored update at the close
            if ev.device_id:
                dev = self._device(ev.device_id)
                dev.rejected += 1
                if d.get("update_id"):  # refused at the close: its update.accepted no longer holds
                    dev.accepted = max(0, dev.accepted - 1)
        elif t == "round.completed" and ev.round_id is not None:
            r = self._round(ev.round_id)
            r.status, r.closed_at = "completed", ev.at
            r.accepted = int(d.get("accepted") or 0)
            r.rejected = parse_rejected(d.get("rejected")) or r.rejected
            acc = d.get("accuracy")
            r.accuracy = float(acc) if isinstance(acc, int | float) else None
            r.version = int(d["version"]) if isinstance(d.get("version"), int) else None
        elif t in ("round.failed", "round.stalled", "round.cancelled") and ev.round_id is not None:
            r = self._round(ev.round_id)
            r.status, r.closed_at = t.split(".")[1], ev.at
            r.reason = ev.reason
        elif t.startswith("dead_letter."):
            reason = ev.reason or t.split(".", 1)[1]
            self.dead_letters[reason] = self.dead_letters.get(reason, 0) + 1
        self.version += 1

    def set_queues(self, queues: list[dict[str, Any]] | None, error: str | None = None) -> None:
        self.queues, self.queues_error = (queues or []) if error is None else self.queues, error
        self.version += 1

    def snapshot(self) -> dict[str, Any]:
        rounds = [r.__dict__ for _, r in sorted(self.rounds.items())]
        return {
            "namespace": self.namespace, "version": self.version, "events_seen": self.events_seen,
            "last_event_at": self.last_event_at, "broker_error": self.broker_error,
            "devices": [d.__dict__ for _, d in sorted(self.devices.items())],
            "rounds": rounds,
            "accuracy": [{"round_id": r["round_id"], "accuracy": r["accuracy"]} for r in rounds
                         if r["accuracy"] is not None],
            "rejections": dict(sorted(self.rejections.items())),
            "enclave": self.enclave, "dead_letters": dict(sorted(self.dead_letters.items())),
            "queues": self.queues, "queues_error": self.queues_error,
        }
