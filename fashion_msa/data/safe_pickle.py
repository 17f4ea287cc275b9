"""Restricted unpickling for untrusted pickle files such as the FashionSenti release.

A pickle can name any importable callable and have the loader call it, so an
ordinary `pickle.load` of a downloaded file can run arbitrary code. The loader
here resolves only a fixed set of plain container and scalar types. Every other
global (`os.system`, `builtins.eval`, numpy arrays, custom classes, ...) raises
`UnsafePickleError` naming the rejected `module.name` before anything is called.
"""

import io
import os
import pickle
from typing import Any

# Types that pickle protocols 0-5 reach through a global lookup while writing
# ordinary containers: sets and frozensets (protocols 0-3), bytearray, complex,
# OrderedDict, and `_codecs.encode`, which protocol 2 uses to rebuild `bytes`.
# dict, list, tuple, str, bytes, int, float, bool and None need no lookup.
# Python 2 pickles name the builtins module `__builtin__`.
_BUILTIN_TYPES = ("set", "frozenset", "bytearray", "complex")
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        (module, name)
        for module in ("builtins", "__builtin__")
        for name in _BUILTIN_TYPES
    }
    | {("collections", "OrderedDict"), ("_codecs", "encode")}
)


class UnsafePickleError(pickle.UnpicklingError):
    """Raised when an untrusted pickle names a global outside `ALLOWED_GLOBALS`."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only plain container and scalar types."""

    def __init__(self, file: io.BufferedIOBase, *, source: str = "<pickle>"):
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"{self._source}: rejected class {module}.{name}: untrusted pickles "
                "may contain only dicts, lists, tuples, sets, strings, bytes, "
                "numbers, booleans and None"
            )
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(
            f"{self._source}: rejected persistent id {pid!r}: untrusted pickles may "
            "not reference external objects"
        )


def load_untrusted(path: str | os.PathLike) -> Any:
    """Load a pickle file that may come from an untrusted source.

    Raises:
      UnsafePickleError: the file names a type other than a plain container or
        scalar; nothing from the file has been called at that point.
      pickle.UnpicklingError, EOFError: the file is not a valid pickle.
    """
    with open(path, "rb") as f:
        return RestrictedUnpickler(f, source=os.fspath(path)).load()


def loads_untrusted(data: bytes, *, source: str = "<bytes>") -> Any:
    """Load pickled bytes from an untrusted source; see `load_untrusted`."""
    return RestrictedUnpickler(io.BytesIO(data), source=source).load()
