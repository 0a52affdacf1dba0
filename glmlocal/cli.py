"""Typer app: wiring only. One library call per command; every GlmlocalError becomes one line.

Each command imports its implementation lazily so `glmlocal --help` stays fast and a missing optional
piece (e.g. no GPU library) does not break unrelated commands.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from glmlocal.errors import GlmlocalError

app = typer.Typer(
    name="glmlocal",
    help="Run GLM-4.5 / 4.5-Air / 4.6 / 4.7 locally: pull, convert, plan, chat, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(err: GlmlocalError) -> None:
    typer.secho(f"error: {err.one_line()}", fg=typer.colors.RED, err=True)
    raise typer.Exit(err.exit_code)


# ---------------------------------------------------------------------------------------------
# convert (issue 2)
# ---------------------------------------------------------------------------------------------
@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="Directory with config.json, tokenizer and safetensors shards")],
    quant: Annotated[str, typer.Option("--quant", "-q", help="bf16, q8_0, q6_k or q4_k_m")] = "q4_k_m",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output .gguf path")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", "-t", help="Quantizer threads (default: all cores)")] = None,
    no_mtp: Annotated[bool, typer.Option("--no-mtp", help="Drop the NextN/MTP block")] = False,
) -> None:
    """Convert a GLM-4.x safetensors checkpoint (BF16 or FP8) to GGUF in one streamed pass."""
    from glmlocal.cli_render import run_convert

    try:
        run_convert(src, quant=quant, out=out, threads=threads, no_mtp=no_mtp)
    except GlmlocalError as e:
        _fail(e)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
