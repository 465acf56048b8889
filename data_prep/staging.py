"""Folders that appear complete or not at all."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_folder(dst: Path):
    """Yields an empty temporary folder beside `dst` that is renamed to `dst` when the block finishes, and
    removed if it fails, so an interrupted build never leaves a half-written `dst`."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dst.name + ".tmp-", dir=dst.parent))
    try:
        yield tmp
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
