from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from kv_transfer.allocator import MallocSettings, keep_freed_memory

# Builds 4 MiB messages one after the other, 3 alive at a time (as a chunk stream's receiver
# holds them), and prints the page faults the last 60 took. glibc's defaults took 2048 here
# (two messages' worth of fresh pages) on the CPU box; kept memory takes none.
_FAULTS_OF_64_MESSAGES = textwrap.dedent(
    """
    import resource, sys
    from kv_transfer.allocator import keep_freed_memory
    if sys.argv[1] == "kept":
        assert keep_freed_memory()
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    live = []
    for i in range(66):
        if i == 6:
            before = faults()
        live.append(bytes([i % 251]) * (4 * 2**20))
        if len(live) > 3:
            live.pop(0)
    print(faults() - before)
    """
)


def _faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS_OF_64_MESSAGES, mode],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_memory_serves_each_new_message_without_page_faults():
    # 60 messages of 1024 pages each: fresh memory every time would be ~61k faults.
    assert _faults("kept") < 64


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_applies_on_glibc():
    assert keep_freed_memory(MallocSettings()) is True


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mmap_threshold_bytes": 0},
        {"mmap_threshold_bytes": 64 * 2**20},  # above glibc's 32 MiB cap
        {"trim_threshold_bytes": 0},
    ],
)
def test_settings_out_of_range_are_refused(kwargs: dict[str, int]):
    with pytest.raises(ValueError):
        MallocSettings(**kwargs)
