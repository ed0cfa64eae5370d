"""A character language model on Python's own documentation (no download).

The text is ``pydoc_data.topics`` from the standard library (about 465 KB). It is cut
into parallel streams and trained with truncated BPTT (the LSTM state carried from
batch to batch), with a progress bar on a terminal and a line per epoch with the
validation bits/character, then a sample. This is what ``python -m cylstm train`` does,
written out with the library; Ctrl-C stops it cleanly and samples from the model as it
is after the last completed step.

    python examples/char_lm.py --epochs 2
"""

import argparse
import sys

import cylstm
from cylstm import text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-chars", type=int, default=0, help="use the first N characters")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    corpus = text.default_text()
    if args.max_chars:
        corpus = corpus[:args.max_chars]
    vocab = text.CharVocab.from_text(corpus)
    ids = vocab.encode(corpus)
    n_val = len(ids) // 20                                     # last 5% to validate
    model = text.char_model(vocab.size, embedding_dim=64, hidden_size=args.hidden_size,
                            seed=args.seed)
    model.compile(loss="cross_entropy", optimizer="adam", lr=3e-3, metrics=["bpc"],
                  clip_norm=5.0)
    # verbose=1: a live bar on a terminal; 2: one line per epoch (logs, pipes).
    verbose = 1 if sys.stdout.isatty() else 2
    history = None
    try:
        history = text.fit_text(model, ids[:-n_val], ids[-n_val:], batch_size=32,
                                seq_len=64, epochs=args.epochs, verbose=verbose)
    except KeyboardInterrupt:
        # fit leaves the weights of the last completed step; the model is usable.
        print("\ninterrupted: sampling from the model as it is")
    print("The " + text.sample(model, vocab, prime="The ", length=200, temperature=0.8,
                               seed=args.seed))
    return history


if __name__ == "__main__":
    main()
