"""Render ``docs/asyncapi.yaml`` (AsyncAPI 3.0) from the event catalogue and its pydantic models.

``python -m ops.asyncapi`` rewrites it; ``tests/test_events.py`` fails when it is stale, so a
system in any language can be written against the document alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from common.events import ALT_PREFIX, CONTENT_TYPES, PREFIX, SPEC_VERSION
from schemas.events import EVENTS, EventSpec
from schemas.messages import Event
from schemas.names import Names
from schemas.reasons import DESCRIPTIONS, Reason

DOC = Path(__file__).resolve().parent.parent / "docs" / "asyncapi.yaml"
VERSION = "0.1.0"
AMQP_BINDING = "0.3.0"


def _camel(key: str) -> str:
    words = key.replace("{reason}", "by_reason").replace(".", "_").split("_")
    return words[0] + "".join(w.title() for w in words[1:])


def _clean(schema: dict) -> dict:
    """pydantic's JSON schema without titles (noise for readers)."""
    if isinstance(schema, dict):
        return {k: _clean(v) for k, v in schema.items() if k != "title"}
    if isinstance(schema, list):
        return [_clean(v) for v in schema]
    return schema


def _payload(spec: EventSpec) -> dict:
    base = _clean(Event.model_json_schema())
    props = dict(base["properties"])
    props["type"] = {"type": "string", "description": f"the event type, equal to the routing key: `{spec.key}`"
                     if "{" in spec.key else "the event type, equal to the routing key",
                     **({"const": spec.key} if "{" not in spec.key else {"pattern": spec.pattern.pattern})}
    props["at"] = {"type": "number", "description": "Unix time (seconds) when the event was emitted"}
    props["detail"] = {"$ref": f"#/components/schemas/{spec.detail.__name__}"}
    for name in ("device_id", "round_id", "reason"):
        used = name in spec.fields
        props[name] = {**props[name], "description": ("set" if used else "not set (null)") + " for this event"}
    return {"type": "object", "additionalProperties": False, "required": ["type", "at", "detail"],
            "properties": props}


def _headers() -> dict:
    def attr(desc: str, **kw) -> dict:
        return {"type": "string", "description": desc, **kw}

    return {"type": "object", "required": [f"{PREFIX}{a}" for a in ("id", "source", "type", "specversion",
                                                                      "time")],
            "properties": {
                f"{PREFIX}id": attr("unique id of this event"),
                f"{PREFIX}source": attr("the emitting process, `/qflare/<namespace>/<its broker connection name>`, e.g. "
                                                   "`/qflare/qflare/qflare-enclave`, `/qflare/qflare/qflare-coordinator`"),
                f"{PREFIX}type": attr("the event type (= routing key)"),
                f"{PREFIX}specversion": attr("CloudEvents version", const=SPEC_VERSION),
                f"{PREFIX}time": attr("RFC 3339 time of the event", format="date-time"),
                f"{PREFIX}subject": attr("the device concerned, when there is one"),
            }}


def render() -> str:
    names = Names("qflare")
    exchange = {"name": names.events_exchange, "type": "topic", "durable": True, "autoDelete": False, "vhost": "/"}
    reasons = {"reason": {"description": "a reason code: " + "; ".join(f"`{r.value}` {DESCRIPTIONS[r]}" for r in Reason),
                          "enum": [r.value for r in Reason]}}
    channels: dict = {}
    operations: dict = {}
    messages: dict = {}
    schemas: dict = {"CloudEventsHeaders": _headers()}
    for spec in EVENTS:
        cid = _camel(spec.key)
        channels[cid] = {
            "address": spec.key, "title": spec.key, "description": spec.summary + f" Emitted by: {spec.source}.",
            "messages": {cid: {"$ref": f"#/components/messages/{cid}"}},
            "bindings": {"amqp": {"is": "routingKey", "exchange": exchange, "bindingVersion": AMQP_BINDING}},
            **({"parameters": reasons} if "{reason}" in spec.key else {}),
        }
        operations[f"receive{cid[0].upper()}{cid[1:]}"] = {
            "action": "receive", "channel": {"$ref": f"#/channels/{cid}"},
            "summary": f"bind a queue to `{names.events_exchange}` with `{spec.binding}`",
            "messages": [{"$ref": f"#/channels/{cid}/messages/{cid}"}]}
        messages[cid] = {
            "name": spec.key, "title": spec.key, "summary": spec.summary, "contentType": CONTENT_TYPES["json"],
            "headers": {"$ref": "#/components/schemas/CloudEventsHeaders"},
            "payload": {"$ref": f"#/components/schemas/{cid}Event"},
            "bindings": {"amqp": {"messageType": spec.key, "bindingVersion": AMQP_BINDING}}}
        schemas[f"{cid}Event"] = _payload(spec)
        schemas.setdefault(spec.detail.__name__, _clean(spec.detail.model_json_schema()))
    channels["eventsLog"] = {
        "address": names.events_stream, "title": "events stream",
        "description": "A durable stream bound to the events exchange with `#`: every event, kept up to "
                       "`events.stream_max_bytes`. Consume with a prefetch and acks and the "
                       "`x-stream-offset` argument (`first`, `last`, `next`, a number or a timestamp) to replay.",
        "messages": {m: {"$ref": f"#/components/messages/{m}"} for m in messages},
        "bindings": {"amqp": {"is": "queue", "queue": {"name": names.events_stream, "durable": True,
                                                       "exclusive": False, "autoDelete": False, "vhost": "/"},
                              "bindingVersion": AMQP_BINDING}}}
    operations["replayEvents"] = {"action": "receive", "channel": {"$ref": "#/channels/eventsLog"},
                                  "summary": "read the events stream from an offset"}
    doc = {
        "asyncapi": "3.0.0",
        "info": {
            "title": "QFLARE events", "version": VERSION,
            "description": (
                "Events of a QFLARE deployment for other systems. Names carry the deployment's namespace "
                f"(`qflare` here: `<namespace>.events`). Every event is a CloudEvents {SPEC_VERSION} event in the "
                "AMQP binding's binary content mode: the body is the event as JSON (`events.format`, default "
                "json), the AMQP `content-type` property is its `datacontenttype`, and the other attributes are "
                f"headers prefixed `{PREFIX}` (readers should also accept `{ALT_PREFIX}`). Messages are "
                "persistent. A `{reason}` in an address is a reason code (`docs/protocol.md` says what each "
                "means)."),
        },
        "defaultContentType": CONTENT_TYPES["json"],
        "servers": {"broker": {"host": "127.0.0.1:5672", "protocol": "amqp", "protocolVersion": "0.9.1",
                               "description": "the deployment's RabbitMQ (QFLARE_AMQP_URL)"}},
        "channels": channels, "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }
    header = "# Generated by `python -m ops.asyncapi` from schemas/events.py; do not edit.\n"
    return header + yaml.dump(doc, Dumper=_NoAliases, sort_keys=False, width=110, allow_unicode=True)


class _NoAliases(yaml.SafeDumper):
    """Repeat shared parts in full: readers should not need YAML anchors."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def update(doc: Path = DOC) -> bool:
    new = render()
    changed = not doc.exists() or doc.read_text() != new
    doc.write_text(new)
    return changed


if __name__ == "__main__":
    sys.exit(1 if update() and "--check" in sys.argv else 0)
