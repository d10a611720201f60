"""Resident memory of the soak run's processes: each worker actor's and the driver's VmRSS.

Read from /proc on this host, so only for a cluster the soak started itself (--config):
sampled at the start, every minute, and at the end, for the drift figures.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def rss_mb(pid: int) -> float | None:
    """VmRSS of a process on this host, in MiB (None if it is gone or not readable)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def actor_pids(cluster: Any) -> dict[str, int]:
    """name -> pid of every worker actor of a cluster started here."""
    import ray

    def getpid(_self: object) -> int:
        return os.getpid()

    names = [f"prefill-{i}" for i in range(len(cluster.prefill_actors))] + [
        f"decode-{i}" for i in range(len(cluster.decode_actors))
    ]
    actors = list(cluster.prefill_actors) + list(cluster.decode_actors)
    pids = ray.get([a.__ray_call__.remote(getpid) for a in actors], timeout=30)
    return dict(zip(names, pids, strict=True))


def sample_rss(pids: dict[str, int]) -> dict[str, float | None]:
    found = {name: rss_mb(pid) for name, pid in pids.items()}
    found["driver (router + load generator)"] = rss_mb(os.getpid())
    return found
