"""Regularising the recurrent connection: the same LSTM with and without dropout on it.

A deliberately large LSTM (128 units) reads scikit-learn's digits row by row (8 steps of
8 pixels, as in ``digits.py``) but learns from only 150 images (15 per class, stratified,
random_state=0); the other 1647 images are the validation set. Without regularisation
it drives its training loss to ~0 and its validation loss turns back up after a few
dozen epochs: it memorises. The same architecture, seed and data with
``recurrent_dropout=0.5`` (one mask on h_{t-1} per sequence, held for all 8 steps)
reaches a clearly lower validation loss. Both runs track the validation loss per epoch;
EarlyStopping (patience 10) restores each one's best weights, which the "val acc
(restored)" column scores. ``--weight-dropout`` adds DropConnect on W_hh to the
regularised run. Ctrl-C stops cleanly and prints the runs that finished. Needs
``pip install "cylstm[examples]"``.

    python examples/regularisation.py              # one seed: about 5 s on 2 cores
    python examples/regularisation.py --seeds 3    # seeds 0, 1, 2: about 11 s

Measured on 2 cores (80 epochs at most; "train loss" is the last epoch's running loss,
with dropout on for the regularised run):

    seed  model         epochs  train loss  best val loss  final val loss  val acc (restored)
       0  none              39      0.0042         0.7640          0.8820              0.8051
       0  rd=0.5 wd=0       74      0.1332         0.4855          0.5291              0.8713
       1  none              29      0.0780         0.6964          0.7780              0.7954
       1  rd=0.5 wd=0       72      0.1639         0.4240          0.4744              0.8798
       2  none              41      0.0031         0.6030          0.7110              0.8476
       2  rd=0.5 wd=0       53      0.1870         0.5001          0.5306              0.8464

The best validation loss is lower with recurrent_dropout for every seed (by 0.28, 0.27
and 0.10; 0.22 on average), and the accuracy is higher by 0.05 on average (+0.066,
+0.084, -0.001: on seed 2 the two are level). Weight dropout alone helps less in this
setting: ``--recurrent-dropout 0 --weight-dropout 0.5`` gives best
validation losses 0.6894, 0.6642 and 0.6961 (lower on seeds 0 and 1, higher on seed 2),
so recurrent dropout is the default here.
"""

import argparse
import time

import numpy as np

import cylstm

HIDDEN = 128          # far more capacity than 150 images need: room to memorise
N_TRAIN = 150


def load():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)          # (1797, 8, 8): 8 steps of 8
    # A small stratified training set; everything else validates, so the validation
    # figures are not themselves noisy (1647 images).
    x_train, x_val, y_train, y_val = train_test_split(
        x, digits.target, train_size=N_TRAIN, stratify=digits.target, random_state=0)
    return (x_train, y_train), (x_val, y_val)


def train(train_set, val_set, seed, recurrent_dropout, weight_dropout, epochs, verbose):
    """Fit one model; returns its figures. Only the dropout rates differ between runs,
    so the seed gives both the same initial weights and the same batch order."""
    model = cylstm.Sequential([
        cylstm.LSTM(8, HIDDEN, batch_first=True, recurrent_dropout=recurrent_dropout,
                    weight_dropout=weight_dropout),
        cylstm.LastStep(),
        cylstm.Linear(HIDDEN, 10),
    ], seed=seed)
    model.compile(loss="cross_entropy", optimizer="adam", lr=5e-3, metrics=["accuracy"])
    # patience 10: the unregularised model's validation loss turns up and stays up, so
    # waiting longer only spends time; restore_best_weights keeps the best epoch.
    stop = cylstm.callbacks.EarlyStopping("val_loss", patience=10)
    start = time.perf_counter()
    history = model.fit(*train_set, batch_size=16, epochs=epochs, validation_data=val_set,
                        verbose=verbose, callbacks=[stop])
    h = history.history
    best = model.evaluate(*val_set)                        # the restored best weights
    return {"train_loss": h["loss"][-1], "best_val_loss": min(h["val_loss"]),
            "final_val_loss": h["val_loss"][-1], "best_val_acc": best["accuracy"],
            "final_val_acc": h["val_accuracy"][-1], "epochs": len(h["loss"]),
            "seconds": time.perf_counter() - start}


def table(rows):
    head = (f"{'seed':>4}  {'model':<24} {'epochs':>6} {'train loss':>10} "
            f"{'best val loss':>13} {'final val loss':>14} {'val acc (restored)':>18} "
            f"{'val acc (final)':>15}")
    lines = [head, "-" * len(head)]
    for seed, name, r in rows:
        lines.append(f"{seed:>4}  {name:<24} {r['epochs']:>6} {r['train_loss']:>10.4f} "
                     f"{r['best_val_loss']:>13.4f} {r['final_val_loss']:>14.4f} "
                     f"{r['best_val_acc']:>18.4f} {r['final_val_acc']:>15.4f}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=1, help="run seeds 0 .. N-1")
    p.add_argument("--epochs", type=int, default=80)
    p.add_argument("--recurrent-dropout", type=float, default=0.5)
    p.add_argument("--weight-dropout", type=float, default=0.0)
    p.add_argument("--verbose", type=int, default=2, help="2: a line per epoch; 0: quiet")
    args = p.parse_args(argv)

    train_set, val_set = load()
    reg_name = (f"rd={args.recurrent_dropout:g} wd={args.weight_dropout:g}")
    runs = [("none", 0.0, 0.0), (reg_name, args.recurrent_dropout, args.weight_dropout)]
    rows, start = [], time.perf_counter()
    try:
        for seed in range(args.seeds):
            for name, rd, wd in runs:
                print(f"seed {seed}, regularisation {name}:", flush=True)
                r = train(train_set, val_set, seed, rd, wd, args.epochs, args.verbose)
                rows.append((seed, name, r))
                print(f"  {r['epochs']} epochs in {r['seconds']:.1f} s: best val loss "
                      f"{r['best_val_loss']:.4f}, val accuracy {r['best_val_acc']:.4f}",
                      flush=True)
    except KeyboardInterrupt:
        # fit leaves the model usable, but a half-trained run would make an unfair
        # comparison: report only the runs that finished.
        print("\ninterrupted: the runs that finished")
    print()
    print(f"digits, {N_TRAIN} training images, {len(val_set[0])} validation images, "
          f"LSTM({HIDDEN}), lr 5e-3, batch 16")
    print(table(rows))
    done = {}
    for seed, name, r in rows:
        done.setdefault(seed, {})[name] = r
    pairs = [(d["none"], d[reg_name]) for d in done.values() if len(d) == 2]
    if pairs:
        loss_gain = np.mean([a["best_val_loss"] - b["best_val_loss"] for a, b in pairs])
        acc_gain = np.mean([b["best_val_acc"] - a["best_val_acc"] for a, b in pairs])
        wins = sum(b["best_val_loss"] < a["best_val_loss"] for a, b in pairs)
        print(f"\nregularised vs none over {len(pairs)} seed(s): best val loss lower by "
              f"{loss_gain:.4f} on average (lower in {wins}/{len(pairs)}), val accuracy "
              f"higher by {acc_gain:.4f}")
    print(f"total time {time.perf_counter() - start:.1f} s")
    return rows


if __name__ == "__main__":
    main()
