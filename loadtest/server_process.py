"""`baton serve` in a child process: started from a config, stopped with everything it started.

The load generator and the router must not share one interpreter (the router's stream relay
and the client's request threads would take turns on one GIL, and the client's timestamps
would include the router's work), so a benchmark starts the cluster as its own process:

    start   `python -m baton.cli serve --config FILE` in a process group of its own (Ray's
            processes and workers join it, see ray._private.services), in this session (so
            whatever ends this session's processes ends it too), with CUDA_VISIBLE_DEVICES
            from the caller; stdout and stderr go to a log file; the ready line
            "baton: serving on HOST:PORT (...)" gives the router's address
    stop    SIGTERM (the router drains, workers stop, Ray shuts down), a deadline, then
            SIGKILL to the whole group; then wait until no process of the group is left and,
            where nvidia-smi answers, until the GPUs' memory is released, so the next
            cluster finds its GPUs free
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
READY_LINE = re.compile(r"^baton: serving on (\S+)")
POLL_S = 0.2
IDLE_GPU_MEMORY_MIB = 2048  # a GPU using less than this holds no engine (an 8B model is 16 GB)


class ServerError(Exception):
    """The server did not start (or did not stop); the message ends with its log's tail."""


@dataclass(frozen=True)
class ServerOptions:
    config_path: Path
    log_path: Path
    gpus: tuple[int, ...] | None = None  # CUDA_VISIBLE_DEVICES; None: inherit
    model_path: str | None = None  # `baton serve --model`
    start_timeout_s: float = 300.0  # until the ready line
    stop_timeout_s: float = 30.0  # SIGTERM to exit (drain, stop workers, Ray), then SIGKILL
    drain_s: float = 1.0  # `baton serve --drain-s`
    release_timeout_s: float = 60.0  # after exit, until the group and the GPUs are free


def client_address(address: str) -> str:
    """The router's printed address as a client dials it (0.0.0.0 binds all: dial loopback)."""
    host, sep, port = address.rpartition(":")
    if not sep:
        raise ValueError(f"not a HOST:PORT address: {address!r}")
    return f"127.0.0.1:{port}" if host in ("0.0.0.0", "[::]", "::") else address


def server_env(base: Mapping[str, str], gpus: Sequence[int] | None) -> dict[str, str]:
    """The child's environment: this checkout first on PYTHONPATH, a Ray of its own (no
    RAY_ADDRESS), and only `gpus` visible, numbered as nvidia-smi numbers them."""
    env = dict(base)
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), base.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # the same indices as nvidia-smi
    return env


class ServerProcess:
    """A running `baton serve`; use `start_server` for the context manager."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        config_path = options.config_path.resolve()
        cmd = [sys.executable, "-m", "baton.cli", "serve", "--config", str(config_path)]
        cmd += ["--drain-s", f"{options.drain_s:g}"]
        if options.model_path:
            cmd += ["--model", options.model_path]
        options.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: TextIO = options.log_path.open("w", encoding="utf-8")
        self._log.write(f"$ {' '.join(cmd)}\n")
        self._log.flush()
        self.proc = subprocess.Popen(
            cmd,
            env=server_env(os.environ, options.gpus),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            process_group=0,  # its own group, for killpg; Ray's processes join it
        )
        self._address: str | None = None
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._log.write(line)
            self._log.flush()
            match = READY_LINE.match(line)
            if match and self._address is None:
                self._address = match.group(1)
                self._ready.set()
        self._ready.set()  # stdout closed: the process is gone

    def wait_ready(self) -> str:
        """The router's address once the ready line is printed; ServerError if the process
        exits first or `start_timeout_s` passes."""
        if not self._ready.wait(self.options.start_timeout_s):
            raise ServerError(
                f"no ready line within {self.options.start_timeout_s:g} s" + self._log_tail()
            )
        if self._address is None:
            self.proc.wait(timeout=10.0)
            raise ServerError(
                f"`baton serve` exited with code {self.proc.returncode} before it was ready"
                + self._log_tail()
            )
        return client_address(self._address)

    def _log_tail(self, num_lines: int = 15) -> str:
        self._log.flush()
        lines = self.options.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        return f"; last lines of {self.options.log_path}:\n" + "\n".join(lines[-num_lines:])

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to the group past `stop_timeout_s`; returns when the group
        and the GPUs are released (or `release_timeout_s` passed: logged)."""
        pgid = self.proc.pid  # a group leader's group id is its pid
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.options.stop_timeout_s)
            except subprocess.TimeoutExpired:
                limit_s = self.options.stop_timeout_s
                log.warning("`baton serve` ignored SIGTERM for %g s: killing its group", limit_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)  # stragglers: Ray workers still exiting
        self.proc.wait(timeout=10.0)
        self._reader.join(timeout=5.0)
        deadline = time.monotonic() + self.options.release_timeout_s
        if not wait_group_gone(pgid, deadline):
            log.warning("processes of group %d still exist after SIGKILL", pgid)
        if self.options.gpus and not wait_gpus_idle(self.options.gpus, deadline):
            log.warning("GPUs %s still hold memory after the server stopped", self.options.gpus)
        self._log.close()


def wait_group_gone(pgid: int, deadline: float) -> bool:
    """True once no process is left in group `pgid` (zombies count until reaped)."""
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # the group id was reused by another user's processes
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)


def gpu_memory_used_mib(gpus: Sequence[int]) -> dict[int, int] | None:
    """Memory in use per GPU (nvidia-smi's numbering), or None where nvidia-smi is missing."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20.0,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    used = {}
    for line in out.strip().splitlines():
        index, mib = (part.strip() for part in line.split(","))
        if int(index) in gpus:
            used[int(index)] = int(float(mib))
    return used


def wait_gpus_idle(gpus: Sequence[int], deadline: float) -> bool:
    """True once every GPU of `gpus` uses less than IDLE_GPU_MEMORY_MIB (or nvidia-smi is
    missing: nothing to wait for)."""
    while True:
        used = gpu_memory_used_mib(gpus)
        if used is None or all(mib < IDLE_GPU_MEMORY_MIB for mib in used.values()):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(1.0)


@contextlib.contextmanager
def start_server(options: ServerOptions) -> Iterator[str]:
    """Start `baton serve`, yield the router's address once ready, stop it on exit."""
    server = ServerProcess(options)
    try:
        yield server.wait_ready()
    finally:
        server.stop()
