"""A character language model on Python's own documentation (no download).

The text is ``pydoc_data.topics`` from the standard library (about 465 KB). It is cut
into parallel streams and trained with truncated BPTT (the LSTM state carried from
batch to batch); validation bits/character are printed after every epoch, then a
sample. This is what ``python -m cylstm train`` does, written out with the library.

    python examples/char_lm.py --epochs 2
"""

import argparse

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
    history = text.fit_text(model, ids[:-n_val], ids[-n_val:], batch_size=32, seq_len=64,
                            epochs=args.epochs, verbose=0)
    for epoch, (bpc, val_bpc) in enumerate(zip(history.history["bpc"],
                                               history.history["val_bpc"])):
        print(f"epoch {epoch + 1}: train {bpc:.3f} bits/char, validation {val_bpc:.3f}")
    print("The " + text.sample(model, vocab, prime="The ", length=200, temperature=0.8,
                               seed=args.seed))
    return history


if __name__ == "__main__":
    main()
