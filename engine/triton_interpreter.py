"""Triton's CPU interpreter, patched so the engine's kernels run under it (TRITON_INTERPRET=1).

Imported by the kernel modules (triton_decode_attention.py, triton_prefill_attention.py)
before they define their kernels; tests that run other kernels under the interpreter import
it for the patch. Without TRITON_INTERPRET=1 importing it changes nothing.
"""

from __future__ import annotations

import os

import triton.language as tl


def _patch_interpreter() -> None:
    """Two gaps in Triton 3.6's CPU interpreter, patched when TRITON_INTERPRET=1
    (CPU correctness runs only; never on the GPU path).

    - A loaded scalar is a 1-element array, and `int(array)` (used for loop bounds read
      from memory) is refused by NumPy >= 2.4: index through the single element instead.
    - `tl.dot` on bf16 operands multiplies their raw uint16 storage: upcast to fp32 first.
    """
    import numpy as np
    import triton.runtime.interpreter as interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patched_tensor(tensor: type, scope: interpreter._LangPatchScope) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    builder = interpreter.InterpreterBuilder
    create_dot = builder.create_dot

    def as_fp32(x: interpreter.TensorHandle) -> interpreter.TensorHandle:
        if x.dtype.scalar != tl.bfloat16:
            return x
        data = interpreter._convert_float(x.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return interpreter.TensorHandle(data, tl.float32)

    def patched_dot(self: object, a: object, b: object, d: object, *args: object) -> object:
        return create_dot(self, as_fp32(a), as_fp32(b), d, *args)

    interpreter._patch_lang_tensor = patched_tensor
    builder.create_dot = patched_dot


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_interpreter()
