"""cylstm: a fast, exact LSTM engine for CPUs. NumPy in, NumPy out."""

__version__ = "0.1.0"

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
