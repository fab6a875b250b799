"""The revision a benchmark measured, for its printed and JSON results."""

from __future__ import annotations

import subprocess


def git_revision(path: str, scope: str = ".") -> str | None:
    """Short commit hash of the checkout holding ``path``, with ``+dirty`` when files under
    ``scope`` (relative to ``path``) have uncommitted changes; ``None`` outside a git checkout."""
    try:

        def git(*cmd: str) -> str:
            return subprocess.run(["git", "-C", path, *cmd], capture_output=True, text=True, check=True).stdout.strip()

        rev = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", scope)
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("+dirty" if dirty else "")
