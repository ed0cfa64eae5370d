"""Model files: ``cylstm.save(model, path)`` and ``cylstm.load(path)``.

A model file is one ``.npz`` archive (uncompressed) holding

    __config__          the JSON config as UTF-8 bytes (uint8): format name and version,
                        the cylstm version that wrote it, the model's kind and
                        constructor arguments, every array's shape, dtype and SHA-256,
                        the optimiser's class and hyper-parameters, user metadata
    param/<name>        each parameter, by its state-dict name
    optim/<buffer>      the optimiser's state buffers (momentum, Adam moments), if saved

Safety. Saving writes a temporary file in the target's folder, flushes and fsyncs it,
then renames it over the target (``os.replace``, atomic on POSIX and Windows): a crash
or a kill mid-save leaves the previous file as it was. Loading never executes code
(``allow_pickle=False``, JSON for the config) and checks everything before building
the model: the format name, the format version (a newer file is refused with a clear
message), every array's presence, dtype, shape and checksum against the config and the
model, and no unexpected entries. A truncated, bit-flipped or foreign file raises
``ValueError`` naming the file.
"""

import hashlib
import json
import os
import tempfile
import numpy as np

from . import __version__
from . import optim as _optim
from .base import registered

__all__ = ["save", "load", "FORMAT", "FORMAT_VERSION"]

FORMAT = "cylstm-model"
FORMAT_VERSION = 1


def _digest(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _kind_and_config(model):
    """(the model's registered class name, its config): a file names the class that
    rebuilds it (``from_config``), so any layer class works without a change here."""
    name = type(model).__name__
    if registered().get(name) is type(model) and getattr(model, "_layout", None):
        return name, model.get_config()
    raise TypeError(f"save takes a cylstm.Sequential or a layer with parameters "
                    f"(LSTM, Linear, Embedding), got {type(model).__name__}")


def save(model, path, include_optimizer=True, metadata=None):
    """Write ``model`` (a Sequential, or an LSTM / Linear / Embedding layer) to ``path``
    atomically. ``metadata``: a JSON-able dict kept in the file (``model.metadata`` after
    loading; a Sequential's own ``metadata`` attribute is saved when this is None).
    With ``include_optimizer`` the optimiser's step count and buffers are saved too, so
    training can resume exactly."""
    kind, config = _kind_and_config(model)
    path = os.fspath(path)
    if metadata is None:
        metadata = getattr(model, "metadata", None) or {}
    arrays = {f"param/{k}": v for k, v in model.params.items()}
    opt = getattr(model, "optimizer", None)
    opt_config = None
    if opt is not None:
        state = opt.state_dict()
        opt_config = {"class": state.pop("optimizer"), "step": state.pop("step"),
                      "hyper": {k: state.pop(k) for k in type(opt)._HYPER}}
        if include_optimizer:
            arrays.update({f"optim/{k}": v for k, v in state.items()})
        else:
            opt_config["step"] = 0
    header = {
        "format": FORMAT, "version": FORMAT_VERSION, "cylstm": __version__,
        "kind": kind, "config": config, "optimizer": opt_config, "metadata": metadata,
        "arrays": {k: {"shape": list(v.shape), "dtype": v.dtype.str, "sha256": _digest(v)}
                   for k, v in arrays.items()},
    }
    try:
        blob = json.dumps(header, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise TypeError(f"save: the config or metadata is not plain JSON: {e}") from None
    arrays["__config__"] = np.frombuffer(blob, np.uint8)

    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp")
    try:
        # mkstemp creates the file 0600; the model gets the mode any new file gets under
        # the user's umask, so a model trained by one user can be served by another.
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:                              # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass                          # not every platform can fsync a folder


def _umask():
    """The process's umask, read without changing it where the OS allows (setting and
    restoring it would race with files other threads create meanwhile)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class _Bad(ValueError):
    pass


def _read(path):
    """(header, {name: array}) from a model file; ValueError on anything wrong."""
    with open(path, "rb") as f:                 # FileNotFoundError etc. as they are
        magic = f.read(4)
    if magic != b"PK\x03\x04":
        raise _Bad("not a cylstm model file (not an .npz archive)")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "__config__" not in z.files:
                raise _Bad("not a cylstm model file (no __config__ entry)")
            raw = z["__config__"]
            if raw.dtype != np.uint8 or raw.ndim != 1:
                raise _Bad("__config__ is not UTF-8 bytes")
            try:
                header = json.loads(raw.tobytes().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise _Bad(f"its config is not valid JSON ({e})") from None
            _check_header(header)
            names = set(z.files) - {"__config__"}
            listed = set(header["arrays"])
            if names != listed:
                raise _Bad(f"its arrays {sorted(names)} do not match its config "
                           f"{sorted(listed)}")
            arrays = {}
            for name in sorted(names):
                a = z[name]
                spec = header["arrays"][name]
                if a.dtype.str != spec["dtype"] or list(a.shape) != spec["shape"]:
                    raise _Bad(f"array {name!r} is {a.dtype.str} {a.shape}, its config says "
                               f"{spec['dtype']} {tuple(spec['shape'])}")
                if _digest(a) != spec["sha256"]:
                    raise _Bad(f"array {name!r} is damaged (checksum mismatch)")
                arrays[name] = a
    except _Bad:
        raise
    except Exception as e:
        # zipfile and numpy report damage in many ways (BadZipFile, zlib.error, EOFError,
        # ValueError, NotImplementedError for a "compression method", RuntimeError for
        # an "encrypted" flag, MemoryError for an absurd shape): all mean a bad file.
        raise _Bad(f"damaged or truncated ({type(e).__name__}: {e})") from None
    return header, arrays


def _check_header(h):
    if not isinstance(h, dict) or h.get("format") != FORMAT:
        raise _Bad(f"not a cylstm model file (format {h.get('format') if isinstance(h, dict) else None!r})")
    v = h.get("version")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise _Bad(f"bad format version {v!r}")
    if v > FORMAT_VERSION:
        raise _Bad(f"written by a newer cylstm ({h.get('cylstm')}, format version {v}); "
                   f"this cylstm reads format versions up to {FORMAT_VERSION}: upgrade cylstm")
    for key, typ in (("kind", str), ("config", dict), ("arrays", dict)):
        if not isinstance(h.get(key), typ):
            raise _Bad(f"its config has no valid {key!r}")


def _build(header):
    kind, config = header["kind"], header["config"]
    cls = registered().get(kind)
    if cls is None:
        raise _Bad(f"unknown model kind {kind!r}")
    try:
        return cls.from_config(config)
    except (KeyError, TypeError, ValueError) as e:
        raise _Bad(f"its model config is invalid ({type(e).__name__}: {e})") from None


def _restore_optimizer(model, header, arrays):
    oc = header.get("optimizer")
    if oc is None:
        return
    cls = getattr(_optim, str(oc.get("class")), None)
    if not (isinstance(cls, type) and issubclass(cls, _optim.Optimizer)):
        raise _Bad(f"unknown optimizer {oc.get('class')!r}")
    config = header["config"]
    try:
        hyper = {k: tuple(v) if isinstance(v, list) else v for k, v in oc["hyper"].items()}
        opt = cls(model, **hyper)
        buffers = {k[len("optim/"):]: v for k, v in arrays.items() if k.startswith("optim/")}
        if buffers:
            opt.load_state_dict({"optimizer": oc["class"], "step": oc["step"], **hyper,
                                 **buffers})
        model.compile(loss=config.get("loss") or "cross_entropy", optimizer=opt,
                      metrics=config.get("metrics") or ())
    except (KeyError, TypeError, ValueError) as e:
        raise _Bad(f"its optimizer state is invalid ({type(e).__name__}: {e})") from None


def load(path):
    """Read a model written by ``save``; returns it in eval mode, compiled with its saved
    loss, metrics and optimiser state when it had them. ``model.metadata`` holds the
    saved metadata dict. Raises ValueError naming ``path`` for a damaged, truncated,
    foreign or newer-version file."""
    path = os.fspath(path)
    try:
        header, arrays = _read(path)
        model = _build(header)
        params = model.params
        for name, p in params.items():
            a = arrays.get(f"param/{name}")
            if a is None:
                raise _Bad(f"parameter {name!r} is missing")
            if a.shape != p.shape or a.dtype != p.dtype:
                raise _Bad(f"parameter {name!r} is {a.dtype} {a.shape}, the model needs "
                           f"{p.dtype} {p.shape}")
        extra = [k for k in arrays if k.startswith("param/") and k[6:] not in params]
        if extra:
            raise _Bad(f"unexpected parameters {extra}")
        for name, p in params.items():
            p[...] = arrays[f"param/{name}"]
        if hasattr(model, "compile"):            # a model, not a bare layer
            _restore_optimizer(model, header, arrays)
    except _Bad as e:
        raise ValueError(f"cannot load {path!r}: {e}") from None
    model.metadata = header.get("metadata") or {}
    model.eval()
    return model
