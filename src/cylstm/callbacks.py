"""Callbacks for ``Sequential.fit``: hooks called at fixed points of training.

Write your own by subclassing ``Callback`` and overriding any of

    on_train_begin(logs)            before the first epoch
    on_epoch_begin(epoch, logs)     epoch counts from 0
    on_batch_begin(batch, logs)     logs: {"size": rows}
    on_gradients(batch, logs)       after backward, before the optimiser step: the
                                    gradients are in self.model.flat_grads (one array)
                                    to all-reduce, clip or log; logs: {"loss", "count"
                                    (positions counted), "size"}; a callback may change
                                    logs["loss"] (e.g. to the mean over processes)
    on_batch_end(batch, logs)       logs: {"loss": this batch's mean loss, "size": rows}
    on_epoch_end(epoch, logs)       logs: the epoch's "loss", metrics, "val_..." entries
                                    and "lr"; a callback may add entries
    on_train_end(logs)              after the last epoch, also after early stopping

``self.model`` is the model being trained. Set ``self.model.stop_training = True`` to
stop after the current epoch. ``LambdaCallback(on_epoch_end=fn, ...)`` wraps plain
functions instead.
"""

import math
import numbers
import os

__all__ = ["Callback", "LambdaCallback", "EarlyStopping", "ModelCheckpoint",
           "LearningRateScheduler", "StepLR", "CosineAnnealing"]


class Callback:
    model = None

    def set_model(self, model):
        self.model = model

    def on_train_begin(self, logs):
        pass

    def on_epoch_begin(self, epoch, logs):
        pass

    def on_batch_begin(self, batch, logs):
        pass

    def on_gradients(self, batch, logs):
        pass

    def on_batch_end(self, batch, logs):
        pass

    def on_epoch_end(self, epoch, logs):
        pass

    def on_train_end(self, logs):
        pass


class LambdaCallback(Callback):
    """A callback from plain functions: ``LambdaCallback(on_epoch_end=lambda e, logs: ...)``;
    the keywords are the hook names of ``Callback``."""

    _HOOKS = ("on_train_begin", "on_epoch_begin", "on_batch_begin", "on_gradients",
              "on_batch_end", "on_epoch_end", "on_train_end")

    def __init__(self, **hooks):
        for name, fn in hooks.items():
            if name not in self._HOOKS:
                raise TypeError(f"LambdaCallback: unknown hook {name!r}; "
                                f"the hooks are {', '.join(self._HOOKS)}")
            if not callable(fn):
                raise TypeError(f"LambdaCallback: {name} must be callable, got {fn!r}")
            setattr(self, name, fn)


def _mode(mode, monitor):
    if mode == "auto":
        return "max" if any(k in monitor for k in ("acc", "accuracy")) else "min"
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min', 'max' or 'auto', got {mode!r}")
    return mode


def _monitored(logs, monitor, who):
    if monitor not in logs:
        raise KeyError(f"{who}: monitor {monitor!r} is not in the epoch's logs "
                       f"{sorted(logs)}; pass validation data for 'val_...' entries")
    return float(logs[monitor])


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience``
    epochs. With ``restore_best_weights`` (the default), the weights of the best epoch
    are put back when training ends, so the model is the best one seen, not the last.
    ``stopped_epoch`` and ``best_epoch`` tell what happened (None if never stopped)."""

    def __init__(self, monitor="val_loss", patience=5, min_delta=0.0, mode="auto",
                 restore_best_weights=True):
        if isinstance(patience, bool) or not isinstance(patience, numbers.Integral) \
                or patience < 0:
            raise ValueError(f"patience must be an int >= 0, got {patience!r}")
        self.monitor, self.patience = monitor, int(patience)
        self.min_delta = abs(float(min_delta))
        self.mode = _mode(mode, monitor)
        self.restore_best_weights = bool(restore_best_weights)

    def on_train_begin(self, logs):
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_epoch, self.stopped_epoch, self.wait = None, None, 0
        self._best_params = None

    def _improved(self, value):
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def on_epoch_end(self, epoch, logs):
        value = _monitored(logs, self.monitor, "EarlyStopping")
        if self._improved(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best_weights:
                self._best_params = self.model.flat_params.copy()
            return
        self.wait += 1
        if self.wait >= self.patience:           # as Keras: patience epochs without gain
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def on_train_end(self, logs):
        if self.restore_best_weights and self._best_params is not None:
            self.model.flat_params[...] = self._best_params


class ModelCheckpoint(Callback):
    """Save the model (``model.save``, atomic) after each epoch to ``path``, which may
    hold ``{epoch}`` (1-based) and any logs entry, e.g. ``"ckpt-{epoch:03d}-{val_loss:.3f}.npz"``.
    With ``save_best_only`` only when ``monitor`` improved."""

    def __init__(self, path, monitor="val_loss", save_best_only=False, mode="auto"):
        self.path = os.fspath(path)
        self.monitor, self.save_best_only = monitor, bool(save_best_only)
        self.mode = _mode(mode, monitor)
        self.saved = []                           # paths written, in order

    def on_train_begin(self, logs):
        self.best = math.inf if self.mode == "min" else -math.inf

    def on_epoch_end(self, epoch, logs):
        if self.save_best_only:
            value = _monitored(logs, self.monitor, "ModelCheckpoint")
            better = value < self.best if self.mode == "min" else value > self.best
            if not better:
                return
            self.best = value
        path = self.path.format(epoch=epoch + 1, **logs)
        self.model.save(path)
        self.saved.append(path)


class LearningRateScheduler(Callback):
    """Set the optimiser's learning rate at the start of each epoch to
    ``schedule(epoch, lr)`` (epoch from 0, lr the current rate). ``base_lr``: the rate
    the schedule starts from (None: the optimiser's rate when training begins); pass it
    when resuming a checkpoint (``fit(..., initial_epoch=k)``), whose optimiser holds
    the rate of its last epoch, not the first."""

    def __init__(self, schedule, base_lr=None):
        if not callable(schedule):
            raise TypeError(f"schedule must be callable (epoch, lr) -> lr, got {schedule!r}")
        if base_lr is not None and (isinstance(base_lr, bool) or
                                    not isinstance(base_lr, numbers.Real) or
                                    not math.isfinite(base_lr) or base_lr < 0):
            raise ValueError(f"base_lr must be a finite number >= 0, got {base_lr!r}")
        self.schedule = schedule
        self._base_lr = base_lr

    def on_train_begin(self, logs):
        self.base_lr = self.model.optimizer.lr if self._base_lr is None else self._base_lr

    def on_epoch_begin(self, epoch, logs):
        lr = self.schedule(epoch, self.model.optimizer.lr)
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) \
                or lr < 0:
            raise ValueError(f"schedule returned {lr!r} for epoch {epoch}; "
                             f"a learning rate must be a finite number >= 0")
        self.model.optimizer.lr = float(lr)


class StepLR(LearningRateScheduler):
    """lr = base_lr * gamma ** (epoch // step_size), as ``torch.optim.lr_scheduler.StepLR``."""

    def __init__(self, step_size, gamma=0.1, base_lr=None):
        if isinstance(step_size, bool) or not isinstance(step_size, numbers.Integral) \
                or step_size < 1:
            raise ValueError(f"step_size must be an int >= 1, got {step_size!r}")
        self.step_size, self.gamma = int(step_size), float(gamma)
        super().__init__(lambda epoch, lr: self.base_lr * self.gamma ** (epoch // self.step_size),
                         base_lr)


class CosineAnnealing(LearningRateScheduler):
    """lr = eta_min + (base_lr - eta_min) (1 + cos(pi * epoch / T_max)) / 2 for epoch in
    0..T_max, then eta_min: ``torch.optim.lr_scheduler.CosineAnnealingLR`` per epoch."""

    def __init__(self, T_max, eta_min=0.0, base_lr=None):
        if isinstance(T_max, bool) or not isinstance(T_max, numbers.Integral) or T_max < 1:
            raise ValueError(f"T_max must be an int >= 1, got {T_max!r}")
        self.T_max, self.eta_min = int(T_max), float(eta_min)

        def cosine(epoch, lr):
            e = min(epoch, self.T_max)
            return self.eta_min + (self.base_lr - self.eta_min) * (
                1 + math.cos(math.pi * e / self.T_max)) / 2
        super().__init__(cosine, base_lr)
