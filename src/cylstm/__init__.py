"""cylstm: a fast, exact LSTM engine for CPUs. NumPy in, NumPy out."""

__version__ = "0.1.0"

try:
    from . import _lstm  # noqa: F401  (the compiled kernels; everything below needs them)
except ImportError as _e:  # pragma: no cover - exercised by tests/test_install.py
    import os as _os
    _here = _os.path.dirname(_os.path.abspath(__file__))
    raise ImportError(
        f"cylstm was imported from {_here}, which has no compiled kernels: install it with "
        f"`pip install .` from the folder that holds setup.py (and run from any folder but "
        f"src/), or build them in place with `python setup.py build_ext --inplace`."
    ) from _e

from ._threads import get_num_threads, openmp_enabled, set_num_threads, threads
from . import callbacks, functional, init, losses, optim, reference
from .embedding import Embedding
from .layers import LSTM, Dropout, LastStep, Linear, LSTMState
from .model import History, Sequential, pad_sequences
from .io import load, save
from . import text

__all__ = [
    "LSTM", "LSTMState", "Embedding", "Linear", "Dropout", "LastStep", "Sequential",
    "History", "pad_sequences", "save", "load", "callbacks", "functional", "init",
    "losses", "optim", "reference", "text", "set_num_threads", "get_num_threads",
    "threads", "openmp_enabled",
]
