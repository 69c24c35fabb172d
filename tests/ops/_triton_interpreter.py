"""TRITON_INTERPRET=1 for the test modules that run Triton kernels on CPU (one shared helper).

The @triton.jit decorator reads the variable when a module is imported, triton's own helpers
included (tl.sum, tl.zeros: "Cannot call @triton.jit'd outside of the scope of a kernel" when
triton.language was imported without it). So unless they already are the interpreter's, the Python
part of triton (not its compiled triton._C, which cannot be loaded twice) is imported afresh, and
the kernel modules (ours, our liger shim, liger's) always are."""
from __future__ import annotations

import os
import sys

import pytest


def interpreter_mode() -> None:
    from triton.runtime.interpreter import InterpretedFunction

    os.environ["TRITON_INTERPRET"] = "1"
    import triton.language as tl

    if not (isinstance(tl.sum, InterpretedFunction) and isinstance(tl.zeros, InterpretedFunction)):
        python_part = [m for m in sys.modules
                       if (m == "triton" or m.startswith("triton.")) and not m.startswith("triton._C")]
        for name in python_part:
            del sys.modules[name]
    for name in [m for m in sys.modules if m.startswith(("veomni.ops.triton.", "veomni.ops.liger", "liger_kernel"))]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def triton_interpreter():
    """Module-scoped: the interpreter for this test module, TRITON_INTERPRET restored after it."""
    old = os.environ.get("TRITON_INTERPRET")
    interpreter_mode()
    yield
    if old is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = old
