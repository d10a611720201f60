"""How the same-host GPU path moves a send's bytes: `CopyMode`, fixed per transport.

- KERNEL (the default): one Triton launch per send copies every (layer, K/V, block) chunk
  and sums the per-layer digests in the same pass (ipc_kernels.py).
- MEMCPY (constructor argument, or BATON_KV_COPY_MODE=memcpy): the copy-engine fallback,
  one cudaMemcpy2DAsync per run of blocks contiguous on both sides (ipc_plan.py), pushed by
  the prefill GPU on the same stream, then one digest-only launch.
"""

from __future__ import annotations

import enum
import os

COPY_MODE_ENV = "BATON_KV_COPY_MODE"


class CopyMode(enum.Enum):
    KERNEL = "kernel"  # one Triton launch per send: copy and digest in one pass (default)
    MEMCPY = "memcpy"  # copy engine: one cudaMemcpy2DAsync per run, then a digest launch


def copy_mode_from_env() -> CopyMode:
    value = os.environ.get(COPY_MODE_ENV, CopyMode.KERNEL.value)
    try:
        return CopyMode(value)
    except ValueError:
        raise ValueError(f"{COPY_MODE_ENV}={value!r}: use 'kernel' or 'memcpy'") from None
