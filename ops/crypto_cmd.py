"""``qflare crypto ...`` and ``qflare bench crypto``: thin shells over :mod:`pqc.info` and :mod:`ops.bench_crypto`."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

crypto_app = typer.Typer(help="Post-quantum algorithms and backends on this machine.", no_args_is_help=True)


@crypto_app.callback()
def _group() -> None:
    """Post-quantum algorithms and backends on this machine."""


@crypto_app.command("info")
def info(json_out: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """List every algorithm with its default and available backends and its sizes."""
    from pqc.info import backend_report, liboqs_status

    rows = backend_report()
    if json_out:
        typer.echo(json.dumps({"liboqs": liboqs_status(), "algorithms": rows}, indent=1))
        return
    table = Table(title="QFLARE post-quantum algorithms")
    for col in ("algorithm", "kind", "default", "available", "pk", "sk", "ct / sig", "ss"):
        table.add_column(col, no_wrap=col in ("algorithm", "default"))
    for r in rows:
        table.add_row(r["algorithm"], r["kind"], r.get("default_backend") or "-", ", ".join(r["backends"]) or "-",
                      str(r.get("public_key", "-")), str(r.get("secret_key", "-")),
                      str(r.get("ciphertext", r.get("signature", "-"))), str(r.get("shared_secret", "-")))
    console = Console()
    console.print(table)
    console.print(liboqs_status())


def bench_crypto(json_out: bool = typer.Option(False, "--json", help="print the figures as JSON"),
                 quick: bool = typer.Option(False, "--quick", help="fewer sizes, shorter timings"),
                 write_docs: bool = typer.Option(False, "--write-docs", help="record the figures in docs/benchmarks.md"),
                 ) -> None:
    """Measure keygen/encaps/decaps/sign/verify per second and seal/open MB/s."""
    from common.report import write_section
    from ops.bench_crypto import render_markdown, run_crypto_bench

    result = run_crypto_bench(quick=quick)
    md = render_markdown(result)
    doc = write_section("crypto", md) if write_docs else None
    if json_out:
        typer.echo(json.dumps(result, indent=1))
    else:
        Console().print(md)
        if doc:
            typer.echo(f"recorded in {doc}")


#: Mounted by ops.cli as ``qflare bench crypto``.
bench_crypto_cmd = bench_crypto
