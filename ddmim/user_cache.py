"""Where ddmim keeps what it can compute again: the user's cache folder ($XDG_CACHE_HOME, else ~/.cache)."""
from __future__ import annotations

import os
from pathlib import Path


def user_cache(name: str) -> Path:
    """The folder of one kind of cached file (not made here)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddmim" / name
