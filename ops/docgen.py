"""Render the message and reason-code reference of docs/protocol.md from the code.

``python -m ops.docgen`` rewrites the generated part; a test checks it is current, so the
documentation cannot drift from the wire format.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from schemas.messages import ALL_MESSAGES
from schemas.reasons import DESCRIPTIONS, Reason

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
BEGIN, END = "<!-- generated:messages -->", "<!-- /generated:messages -->"


def _type_name(annotation: object) -> str:
    text = getattr(annotation, "__name__", None) or str(annotation)
    text = re.sub(r"typing\.|Annotated\[|, FieldInfo\(.*?\)\]|schemas\.messages\.", "", text)
    return text.replace("NoneType", "None")


def _constraint(meta: object) -> str:
    """A field's bound as the table shows it; validators and serializers (functions, e.g. the
    payload view of schemas.messages.Payload) say nothing about the wire and are left out."""
    return "" if callable(getattr(meta, "func", None)) else str(meta)


def render() -> str:
    out = [BEGIN, "", "### Messages", ""]
    for cls in ALL_MESSAGES:
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        out += [f"#### `{cls.TYPE}` ({cls.__name__})", "", doc, "", "| field | type | required |", "|---|---|---|"]
        for name, field in cls.model_fields.items():
            meta = " ".join(filter(None, map(_constraint, field.metadata)))
            out.append(f"| `{name}` | `{_type_name(field.annotation)}` {meta} | "
                       f"{'yes' if field.is_required() else 'no (default ' + repr(field.default) + ')'} |")
        out.append("")
    out += ["### Reason codes", "", "| code | meaning |", "|---|---|"]
    out += [f"| `{r.value}` | {DESCRIPTIONS[r]} |" for r in Reason] + ["", END]
    return "\n".join(out)


def update(doc: Path = DOC) -> bool:
    text = doc.read_text()
    new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: render(), text, flags=re.DOTALL)
    changed = new != text
    doc.write_text(new)
    return changed


if __name__ == "__main__":
    sys.exit(1 if update() and "--check" in sys.argv else 0)
