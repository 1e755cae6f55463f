"""Reading the CIFAR-10 python pickles without letting a data file run code.

A pickle names the callables that rebuild its objects, and `pickle.load` calls
whatever it names: a crafted `data_batch_1` could run anything at start-up.
The official files hold one dict of bytes keys, a list of int labels, a list
of bytes file names and one uint8 numpy array; rebuilding them needs only
numpy's array, scalar and dtype reconstruction. `load` allows exactly those callables
and refuses every other with `UnsafePickleError`, before calling it.
"""

from __future__ import annotations

import pickle

# (module, name) pairs a CIFAR-10 batch may ask for: numpy's ndarray pickling
# (numpy 1 and 2 module paths; protocol 5 rebuilds arrays through _frombuffer).
ALLOWED_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),  # numpy ints
    # Python 3 writes bytes at protocol 2 as _codecs.encode(str, "latin1"): a pure function.
    ("_codecs", "encode"),
})


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asks for a callable outside ALLOWED_GLOBALS."""


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in ALLOWED_GLOBALS:
            raise UnsafePickleError(f"it asks for {module}.{name}, which a CIFAR-10 batch "
                                    "never holds")
        return super().find_class(module, name)


def load(file) -> object:
    """Unpickles `file` (a binary file object) allowing only ALLOWED_GLOBALS; bytes stay bytes."""
    return _AllowListUnpickler(file, encoding="bytes").load()
