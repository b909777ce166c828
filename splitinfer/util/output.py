"""Machine-readable output: the one way a command prints JSON."""

from __future__ import annotations

import json
import sys
from typing import Any

__all__ = ["emit_json", "emit_json_line"]


def emit_json(obj: Any) -> None:
    """One JSON document on stdout (indented for people), nothing else."""
    sys.stdout.write(json.dumps(obj, indent=1) + "\n")
    sys.stdout.flush()


def emit_json_line(obj: Any) -> None:
    """One compact JSON object per line on stdout: a stream another process reads."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()
