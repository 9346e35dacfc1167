"""The one loader for the known-answer files in ``tests/vectors`` (see its README)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

VECTORS = Path(__file__).resolve().parent / "vectors"


def acvp_cases(filename: str, **group_filter: Any) -> list[dict[str, Any]]:
    """Every test case of an ACVP JSON file, each merged with its group's fields.

    Hex strings become bytes; ``group_filter`` keeps groups whose fields match
    (e.g. ``function="decapsulation"``).
    """
    doc = json.loads((VECTORS / filename).read_text())
    out = []
    for group in doc["testGroups"]:
        if any(group.get(k) != v for k, v in group_filter.items()):
            continue
        shared = {k: v for k, v in group.items() if k != "tests"}
        for test in group["tests"]:
            case = {**shared, **test}
            out.append({k: _unhex(k, v) for k, v in case.items()})
    return out


_NOT_HEX = {"tgId", "tcId", "testType", "parameterSet", "function", "reason", "deferred",
            "deterministic", "testPassed"}


def _unhex(key: str, value: Any) -> Any:
    return bytes.fromhex(value) if isinstance(value, str) and key not in _NOT_HEX else value


def case_id(case: dict[str, Any]) -> str:
    return f"tc{case['tcId']}"
