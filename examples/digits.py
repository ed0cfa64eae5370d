"""Sequence classification: scikit-learn's handwritten digits, read row by row.

Each 8x8 image of ``load_digits()`` is a sequence of 8 steps of 8 pixels; an LSTM reads
it top to bottom and its last step goes through a linear layer to the 10 classes.
Stratified 25% test split (random_state=0). Needs ``pip install "cylstm[examples]"``.

    python examples/digits.py            # about 10 s on 2 cores; test accuracy ~0.98
"""

import argparse

import numpy as np

import cylstm


def load(seed=0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)          # (1797, 8, 8): 8 steps of 8
    return train_test_split(x, digits.target, test_size=0.25, stratify=digits.target,
                            random_state=seed)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", type=int, default=2)
    args = p.parse_args(argv)

    x_train, x_test, y_train, y_test = load()
    model = cylstm.Sequential([
        cylstm.LSTM(8, args.hidden_size, batch_first=True),
        cylstm.LastStep(),                          # the state after the last row
        cylstm.Linear(args.hidden_size, 10),
    ], seed=args.seed)
    model.compile(loss="cross_entropy", optimizer="adam", lr=5e-3, metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=32, epochs=args.epochs, validation_split=0.1,
              verbose=args.verbose,
              callbacks=[cylstm.callbacks.EarlyStopping("val_loss", patience=5)])
    result = model.evaluate(x_test, y_test)
    print(f"test accuracy {result['accuracy']:.4f}  (loss {result['loss']:.4f}, "
          f"{len(x_test)} images)")
    return result


if __name__ == "__main__":
    main()
