"""Argument checks shared by every module: one definition of each, one wording.

A leaf module (it imports only NumPy), so any module can use it without an import
cycle. Every message names the argument and the value or shape as the caller passed it.
"""

import numbers

import numpy as np

FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def shape_str(a):
    """'(3, 5)', '(3,)' for an array or a shape: shapes in messages look the same
    everywhere, as Python prints a shape tuple."""
    shape = a.shape if hasattr(a, "shape") else a
    return str(tuple(int(d) for d in shape))


def positive_int(value, name, minimum=1):
    """value as an int >= minimum; bools and floats are refused (2.0 is not a size)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def float_dtype(dtype, name="dtype"):
    """np.float32 or np.float64 from anything np.dtype understands; else a TypeError."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name} must be 'float32' or 'float64', got {dtype!r}") from None
    if dt not in FLOATS:
        raise TypeError(f"{name} must be 'float32' or 'float64', got {dt}")
    return dt


def probability(p, name):
    """p as a float in [0, 1)."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {p!r}")
    return float(p)


def checkpoint_every(value, name="checkpoint_every"):
    """None, "auto" or an int >= 1: how often checkpointed BPTT keeps the state."""
    if value is None or (isinstance(value, str) and value == "auto"):
        return value
    if isinstance(value, str):
        raise ValueError(f'{name} must be None, a positive int or "auto", got {value!r}')
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f'{name} must be None, a positive int or "auto", got '
                        f'{type(value).__name__} {value!r}')
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def out_array(out, shape, dtype, source, why):
    """`out` when it is a writeable C-contiguous `dtype` array of `shape` that does not
    overlap `source` (the array the kernel reads while writing out); else ValueError."""
    if (not isinstance(out, np.ndarray) or out.shape != tuple(shape) or out.dtype != dtype
            or not out.flags.c_contiguous or not out.flags.writeable):
        raise ValueError(f"out must be a writeable C-contiguous {dtype} array of shape "
                         f"{shape_str(shape)}, got {getattr(out, 'dtype', type(out).__name__)} "
                         f"{shape_str(np.shape(out))}")
    if np.may_share_memory(out, source):
        raise ValueError(f"out must not overlap {why}")
    return out


def as_array(x, name, what="an array"):
    """x as an ndarray (no copy when it is one); a TypeError naming x when it cannot be."""
    if isinstance(x, np.ndarray):
        return x
    try:
        return np.asarray(x)
    except Exception as e:
        raise TypeError(f"{name} must be {what}, got {type(x).__name__}: {e}") from None


def real_array(x, name):
    """x as an ndarray of real numbers (floats, or ints/bools the caller converts);
    complex, object and string arrays are a TypeError naming x."""
    x = as_array(x, name)
    if x.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers (float32/float64, or ints/bools to "
                        f"convert), got dtype {x.dtype}")
    return x


def to_numpy(value, key):
    """A state-dict value as a NumPy array: arrays, torch tensors (.numpy()), __array__."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "cpu"):     # a torch tensor, duck-typed
        value = value.detach().cpu()
    if hasattr(value, "numpy"):
        try:
            return np.asarray(value.numpy())
        except Exception:
            pass
    try:
        return np.asarray(value)
    except Exception as e:
        raise TypeError(f"state dict entry {key!r} cannot be read as an array: {e}") from None
