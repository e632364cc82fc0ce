"""LLVM intrinsics shared by the CPU kernel modules (``cpu.py``, ``cpu_rows.py``,
``cpu_vsqrt.py``, ``cpu_half.py``), and the chunk-table helper built on them: one
definition each, below every backend."""

from __future__ import annotations

from numba import types
from numba.extending import intrinsic

from ._jit import jit


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


@intrinsic
def _view(typingctx, address, n, proto):  # type: ignore[no-untyped-def]
    """The ``n`` elements of ``proto``'s dtype at ``address`` as a 1-D C-contiguous
    array: ``numba.carray(_as_pointer(address, proto), n)``, built in place.

    ``carray`` is an ``@overload`` compiled as a function of ``numba.np.arrayobj``, so a
    kernel calling it is cached with a reference to that module's environment, and
    loading the kernel from Numba's cache imports ``numba.np.arrayobj`` (~40 ms of a
    warm process's first update on a 2-core AMD EPYC). The same array struct built
    here (no meminfo: the memory is not owned) is lowered into the kernel itself.
    """
    if not (isinstance(address, types.Integer) and isinstance(n, types.Integer)
            and isinstance(proto, types.Array)):
        return None
    retty = types.Array(proto.dtype, 1, "C")

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        from numba.np.arrayobj import make_array, populate_array

        aryty = sig.return_type
        dtype = context.get_data_type(aryty.dtype)
        itemsize = context.get_constant(types.intp, context.get_abi_sizeof(dtype))
        ary = make_array(aryty)(context, builder)
        populate_array(ary, data=builder.inttoptr(args[0], dtype.as_pointer()),
                       shape=[context.cast(builder, args[1], sig.args[1], types.intp)],
                       strides=[itemsize], itemsize=itemsize, meminfo=None)
        return ary._getvalue()

    return retty(address, n, proto), codegen


@intrinsic
def layer_threads(typingctx):  # type: ignore[no-untyped-def]
    """The thread count of the running threading layer: a call of its C function
    ``int get_num_threads(void)``, under the symbol name that Numba registers when it
    starts the layer and that its own parallel loops call (``numba.np.ufunc.parallel``:
    ``ll.add_symbol('get_num_threads', ...)``). Numba's ``get_num_threads`` compiles
    to a ctypes pointer, which cannot be cached; a call of the symbol can. Only valid
    once the layer runs: :func:`fastadagrad.cpu.numba_threads` starts it, then checks
    this call against ``numba.get_num_threads()`` before using it."""
    from llvmlite import ir
    from numba.core import cgutils

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.IntType(32), []), "get_num_threads")
        return builder.sext(builder.call(fn, []), ir.IntType(64))

    return types.int64(), codegen


@jit(inline="always")
def chunk_views(proto, paddr, gaddr, haddr, ctensor, cstart, clen, c):  # type: ignore[no-untyped-def]
    """The ``(p, g, h)`` views of span ``c`` of a chunk table (tensor ``ctensor[c]``,
    first element ``cstart[c]``, ``clen[c]`` elements; ``proto`` carries the dtype):
    the body of every many-tensor kernel's loop over spans. Each view starts at its
    span, so the kernels' inner loops are a plain ``range(n)``, which vectorises
    (``range(b, e)`` over the whole tensor stayed scalar)."""
    t = ctensor[c]
    off = cstart[c] * proto.itemsize
    n = clen[c]
    return (_view(paddr[t] + off, n, proto), _view(gaddr[t] + off, n, proto),
            _view(haddr[t] + off, n, proto))
