"""Shared test settings: nothing is downloaded, and Ray is stopped at the end of the session."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_sessionfinish(session: object, exitstatus: int) -> None:
    import sys

    ray = sys.modules.get("ray")  # only if a test imported it
    if ray is not None and ray.is_initialized():
        ray.shutdown()
