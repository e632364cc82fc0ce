"""LLVM intrinsics shared by the CPU kernel modules (``cpu.py``, ``cpu_rows.py``,
``cpu_vsqrt.py``): one definition each, below every backend."""

from __future__ import annotations

from numba import types
from numba.extending import intrinsic


@intrinsic
def fma(typingctx, a, b, c):  # type: ignore[no-untyped-def]
    """``a*b + c`` rounded once (``llvm.fma``), for formulas that are defined with one."""
    if not (isinstance(a, types.Float) and a == b == c):
        return None

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return builder.fma(*args)

    return a(a, b, c), codegen


@intrinsic
def _as_pointer(typingctx, address, proto):  # type: ignore[no-untyped-def]
    """Turn an integer address into a typed pointer to ``proto``'s dtype."""
    if not (isinstance(address, types.Integer) and isinstance(proto, types.Array)):
        return None
    ptr = types.CPointer(proto.dtype)

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return builder.inttoptr(args[0], context.get_value_type(ptr))

    return ptr(address, proto), codegen
