"""Docs that are generated from code must be current."""

from ops import docgen


def test_protocol_reference_is_current(tmp_path):
    copy = tmp_path / "protocol.md"
    copy.write_text(docgen.DOC.read_text())
    assert not docgen.update(copy), "docs/protocol.md is stale: run `python -m ops.docgen`"


def test_protocol_events_table_lists_every_event():
    """docs/protocol.md's events table names every event of the catalogue (schemas/events.py)."""
    from schemas.events import EVENTS

    text = docgen.DOC.read_text()
    table = text[text.index("## Events"):text.index("## Reference")]
    missing = [e.key for e in EVENTS if f"| `{e.key.replace('{reason}', '<reason>')}` |" not in table]
    assert not missing, f"docs/protocol.md's events table lacks {missing}"
