"""Where a benchmark script logs: INFO and up to a file beside its results and to stderr."""

from __future__ import annotations

import logging
from pathlib import Path


def log_to(path: Path, mode: str = "a") -> None:
    """Configure the root logger once for the script (mode "w": start the file afresh)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(message)s",
        handlers=[logging.FileHandler(path, mode), logging.StreamHandler()],
    )
