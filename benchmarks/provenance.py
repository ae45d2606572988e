"""Where a benchmark number came from: the commit of the code that produced it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def commit() -> str:
    """$COMMIT when set, else the checkout's short commit ('' outside a git checkout).

    $COMMIT comes first because a tree copied onto a GPU machine may carry a stale .git (seen:
    results stamped with the session's first commit) or none."""
    if os.environ.get("COMMIT"):
        return os.environ["COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=REPO).stdout.strip()
    except OSError:
        return ""
