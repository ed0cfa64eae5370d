"""cylstm: a fast, exact LSTM engine for CPUs. NumPy in, NumPy out."""

from ._threads import get_num_threads, openmp_enabled, set_num_threads, threads
from . import functional, losses, optim, reference
from .embedding import Embedding
from .layers import LSTM, LSTMState

__version__ = "0.1.0"
__all__ = [
    "LSTM", "LSTMState", "Embedding", "functional", "losses", "optim", "reference",
    "set_num_threads", "get_num_threads", "threads", "openmp_enabled",
]
