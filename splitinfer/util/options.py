"""What every command line shares: the --model option and the check of a positive number."""

from __future__ import annotations

import typer

from splitinfer.errors import UserError

__all__ = ["ModelOpt", "require_positive"]

ModelOpt = typer.Option(..., "--model", "-m", help="built-in name, path/to/file.py:function or package.module:function")


def require_positive(name: str, value: float | None) -> None:
    """One clear line when an option that must be positive is not (None: not given)."""
    if value is not None and not value > 0:
        raise UserError(f"{name} must be positive, got {value}")
