"""The host's record of which kernel each batch-1 product shape runs (engine/gemv.py).

`gemv.tune` times cuBLAS against a few GEMV launch shapes at start-up and keeps the fastest.
The kernels sum in different orders, so they differ in the last bit, and where two are
close in time a second engine may time them the other way round. Two engines with the same
weights then disagree in the last bit, and greedy decoding of a near tie can go either way:
measured on 4 x H200 (2026-11-27, `loadtest/cluster_ttft_bench.py --logprobs 2`, 512-token
prompts, random bf16 weights), 1P1D and a colocated replica gave different tokens in 6 of 20
runs of the same code, over the GPU path and over gRPC alike, three of them with the same
largest logprob difference (1.7855 nats: a near tie that went the other way, and the answer
after it); in the other 14 every logprob was equal. Which kernels an engine picks is the one
thing we know to vary between such runs.

So the first engine on a host to tune a (GPU model, software, candidates) combination
writes its choices to a file, and every later engine on that host, in this cluster or the
next, reads them instead of timing again: engines that share a host run the same kernels
for the same products (prefill and decode tiers alike; a prefill engine's first-token
logits are a batch-1 product too). Engines on different hosts still tune on their own. The file is taken under an
exclusive lock (fcntl.flock) while it is read, completed and written, so engines starting
together wait for the first (at most LOCK_TIMEOUT_S). Anything wrong with the file, its
folder or its lock falls back to timing locally, with a warning: a start-up never fails or
hangs for it.

Where: $BATON_CACHE_DIR, else ~/.cache/baton (the temp folder's baton-cache without a home
directory); one file per combination, `gemv-<hash>.json`, holding {"key": ..., "choices":
{"NxKxbias": [block_n, block_k, num_warps] or null for cuBLAS}}. The choices stay until the
file is deleted: delete it to time again (say, if the first engine timed on a GPU that
something else kept busy).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "BATON_CACHE_DIR"
# Timing every shape takes about a second; an engine waiting longer times on its own.
LOCK_TIMEOUT_S = 60.0

ShapeKey = tuple[int, int, bool]  # (N, K, has bias)
Choice = tuple[int, int, int] | None  # a GEMV launch shape, or None for cuBLAS


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    try:
        return Path.home() / ".cache" / "baton"
    except RuntimeError:  # no home directory (a bare container user): still one per host
        return Path(tempfile.gettempdir()) / "baton-cache"


def _name(key: ShapeKey) -> str:
    n, k, bias = key
    return f"{n}x{k}x{int(bias)}"


class HostChoices:
    """The choices file of one combination (`key`: GPU model, versions, candidates)."""

    def __init__(
        self, key: str, cache_dir: Path | None = None, lock_timeout_s: float = LOCK_TIMEOUT_S
    ) -> None:
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        self.key = key
        self.path = (cache_dir or default_cache_dir()) / f"gemv-{digest}.json"
        self.lock_timeout_s = lock_timeout_s

    def choose(
        self, shapes: Iterable[ShapeKey], time_shape: Callable[[ShapeKey], Choice]
    ) -> dict[ShapeKey, Choice]:
        """Every shape's choice: from the file where it has one, else `time_shape(shape)`,
        added to the file. Without a usable file, every shape is timed here."""
        shapes = list(dict.fromkeys(shapes))
        try:
            with self._locked():
                recorded = self._read()
                missing = [s for s in shapes if _name(s) not in recorded]
                for s in missing:
                    recorded[_name(s)] = time_shape(s)
                if missing:
                    self._write(recorded)
                return {s: recorded[_name(s)] for s in shapes}
        except OSError as e:
            log.warning("gemv choices file %s unusable (%s): timing on this engine", self.path, e)
            return {s: time_shape(s) for s in shapes}

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The file's lock, released when the lock file closes; TimeoutError (an OSError:
        timing locally) if another engine holds it past lock_timeout_s."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.lock_timeout_s
        with open(self.path.with_suffix(".lock"), "a") as lock:
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"another engine held the lock for {self.lock_timeout_s:g} s"
                        ) from None
                    time.sleep(0.05)
            yield

    def _read(self) -> dict[str, Choice]:
        """The recorded choices, or none where the file is missing, unreadable or not ours."""
        try:
            data = json.loads(self.path.read_text())
            if data.get("key") != self.key:
                raise ValueError("another combination's file")
            choices = data["choices"]
            return {
                name: None if c is None else (int(c[0]), int(c[1]), int(c[2]))
                for name, c in choices.items()
            }
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            log.warning("gemv choices file %s ignored (%s): timing again", self.path, e)
            return {}

    def _write(self, choices: dict[str, Choice]) -> None:
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": self.key, "choices": choices}, indent=1))
        tmp.replace(self.path)  # readers see the old file or the new one, never half
