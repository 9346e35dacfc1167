"""Update compression against float32 (``qflare bench compression``).

Runs the demo (coordinator, enclave, devices, real broker and crypto) once per task and
encoding with the same seed, devices and rounds, and reports the bytes of an update (the
encoded delta, and the messages that carry it) and the enclave's test accuracy against
float32. Goal: >= 4x fewer bytes with <= 0.5 point accuracy loss.
"""

from __future__ import annotations

import sys

from common.report import md_table, write_section
from common.settings import Settings
from ops.demo import run_demo

SETTINGS = ("none", "int8", "topk")
SHIPPED_TASKS = ("tasks.digits:task", "tasks.digits_cnn:task", "tasks.breast_cancer:task")


async def _task(base: Settings, task: str, devices: int, rounds: int) -> list[dict]:
    rows = []
    for setting in SETTINGS:
        s = base.model_copy(update={"fl": base.fl.model_copy(update={"task": task, "compression": setting,
                                                                     "evaluate": True})})
        report = await run_demo(s, devices=devices, rounds=rounds)
        acc = [r.accuracy for r in report.rounds]
        rows.append({"task": task, "compression": setting,
                     "topk_fraction": s.fl.topk_fraction if setting == "topk" else None,
                     "parameters": round(report.payload_bytes / 4) if setting == "none" else None,
                     "payload_bytes": round(report.payload_bytes), "message_bytes": round(report.message_bytes),
                     "accuracy_by_round": [round(a, 4) if a is not None else None for a in acc],
                     "final_accuracy": acc[-1] if acc else None})
        print(rows[-1], file=sys.stderr, flush=True)
    ref = rows[0]
    for r in rows:
        r["payload_ratio"] = round(ref["payload_bytes"] / r["payload_bytes"], 3)  # int8 is 3.997x, not 4
        r["message_ratio"] = round(ref["message_bytes"] / r["message_bytes"], 2)
        r["accuracy_change_points"] = (round(100 * (r["final_accuracy"] - ref["final_accuracy"]), 2)
                                       if r["final_accuracy"] is not None and ref["final_accuracy"] is not None
                                       else None)
    return rows


async def run_bench(base: Settings, *, devices: int = 5, rounds: int = 5, tasks: tuple[str, ...] = SHIPPED_TASKS,
                    write_docs: bool = False) -> dict:
    rows = []
    for task in tasks:
        rows += await _task(base, task, devices, rounds)
    result = {"devices": devices, "rounds": rounds, "cases": rows}
    if write_docs:
        md = (f"The demo (real broker, enclave and crypto) per shipped task, {devices} IID devices, {rounds} rounds, "
              "the same seed for every encoding; accuracy is the enclave's on the task's held-out data after the "
              "last round. Payload: the encoded delta; message: everything an update sends (header with the "
              "session grant, KEM ciphertext, ML-DSA-44 signature, envelope), about 8 KB of it fixed, which "
              "dominates models of a few thousand parameters. Goal: >= 4x fewer bytes, <= 0.5 point accuracy "
              "loss.\n\n")

        def change(r: dict) -> str:
            return "-" if r["accuracy_change_points"] is None else f"{r['accuracy_change_points']:+.2f}"

        md += md_table(["task", "compression", "payload bytes", "payload ratio", "message bytes", "message ratio",
                        "accuracy by round", "change (points)"],
                       [[r["task"], r["compression"] + (f" ({r['topk_fraction']:g})" if r["topk_fraction"] else ""),
                         f"{r['payload_bytes']:,}", f"{r['payload_ratio']}x", f"{r['message_bytes']:,}",
                         f"{r['message_ratio']}x",
                         ", ".join(f"{a:.3f}" for a in r["accuracy_by_round"] if a is not None), change(r)]
                        for r in rows])
        write_section("compression", "## Update compression (`qflare bench compression`)\n\n" + md)
    return result
