"""Docs that are generated from code must be current."""

from ops import docgen


def test_protocol_reference_is_current(tmp_path):
    copy = tmp_path / "protocol.md"
    copy.write_text(docgen.DOC.read_text())
    assert not docgen.update(copy), "docs/protocol.md is stale: run `python -m ops.docgen`"
