"""Command line: ``python -m cylstm <command> [options]``.

Commands:
  train     train a character language model on a text (default: Python's own docs)
  generate  sample text from a model saved by train

The benchmarks are not part of the installed package: they live in the repository's
bench/ folder (``python bench/run.py``, see docs/benchmarking.md).

Each command is a subparser with its own ``--help``. To add one, write
``_add_<name>(subparsers)`` that registers the subparser with ``set_defaults(run=...)``
(a function of the parsed args returning the exit status) and call it in ``_parser``.
"""

import argparse
import sys


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default unless it is None (those say in words what they mean)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def _int_at_least(minimum):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def _checkpoint_arg(text):
    if text == "auto":
        return text
    return _int_at_least(1)(text)


_checkpoint_arg.__name__ = 'integer >= 1 or "auto"'


def _float_in(low, high, low_open=False, high_open=True):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        ok = (low < value if low_open else low <= value) and \
            (high is None or (value < high if high_open else value <= high))
        if not ok:
            lo, hi = "(" if low_open else "[", ")" if high_open else "]"
            span = f"{lo}{low}, {'inf' if high is None else high}{hi}"
            raise argparse.ArgumentTypeError(f"must be in {span}, got {value}")
        return value
    parse.__name__ = "number"
    return parse


def _add_train(subparsers):
    p = subparsers.add_parser(
        "train", help="train a character language model on a text",
        description="Train a character-level LSTM language model with truncated BPTT and "
                    "save it. With no --text, the text is the documentation topics in "
                    "Python's standard library (pydoc_data.topics, about 465 KB of English), "
                    "so nothing needs downloading. Shows progress and validation "
                    "bits/character per epoch, saves the model after every epoch "
                    "(atomically: a run killed mid-way leaves the last finished epoch's "
                    "model), and prints a sample. An existing model file is never replaced "
                    "unless you say so: --resume continues training it, --overwrite starts "
                    "a new one in its place.",
        formatter_class=_Defaults)
    p.add_argument("--text", metavar="FILE", help="a UTF-8 text file to learn from "
                   "(default: Python's pydoc_data.topics)")
    p.add_argument("--max-chars", type=_int_at_least(0), default=0, metavar="N",
                   help="use only the first N characters of the text (0: all)")
    p.add_argument("--model", default="char_model.npz", metavar="PATH",
                   help="where to save the trained model")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue training the model in --model (its architecture, "
                           "vocabulary and optimiser state come from the file)")
    mode.add_argument("--overwrite", action="store_true",
                      help="replace the model in --model by a newly trained one")
    p.add_argument("--epochs", type=_int_at_least(0), default=3, help="passes over the text")
    p.add_argument("--batch-size", type=_int_at_least(1), default=32,
                   help="parallel streams of text per batch")
    p.add_argument("--seq-len", type=_int_at_least(1), default=64,
                   help="characters per batch per stream (the BPTT truncation length)")
    p.add_argument("--hidden-size", type=_int_at_least(1), default=256,
                   help="LSTM hidden units")
    p.add_argument("--embedding-dim", type=_int_at_least(1), default=64,
                   help="character embedding size")
    p.add_argument("--num-layers", type=_int_at_least(1), default=1,
                   help="stacked LSTM layers")
    p.add_argument("--dropout", type=_float_in(0, 1), default=0.0,
                   help="dropout between LSTM layers (needs --num-layers > 1)")
    p.add_argument("--recurrent-dropout", type=_float_in(0, 1), default=0.0,
                   help="variational dropout on the LSTM's h_{t-1}, one mask per sequence")
    p.add_argument("--checkpoint-every", type=_checkpoint_arg, default=None, metavar="K",
                   help='checkpointed BPTT: keep the state every K steps, or "auto" '
                        '(about sqrt(--seq-len)); for long --seq-len, same gradients')
    p.add_argument("--lr", type=_float_in(0, None, low_open=True), default=3e-3,
                   help="Adam learning rate")
    p.add_argument("--clip-norm", type=_float_in(0, None), default=5.0,
                   help="global gradient-norm clip (0: off)")
    p.add_argument("--val-fraction", type=_float_in(0, 1, low_open=True), default=0.05,
                   help="fraction of the text, from its end, held out for validation")
    p.add_argument("--seed", type=int, default=0, help="random seed (weights, sampling)")
    p.add_argument("--threads", type=_int_at_least(0), default=0,
                   help="threads for cylstm's kernels (0: all usable cores)")
    p.add_argument("--distributed", choices=["mpi"],
                   help="train data-parallel across the ranks of 'mpiexec -n N python -m "
                        "cylstm train --distributed mpi' (--batch-size streams in all, "
                        "split among the ranks; rank 0 prints and saves; needs the mpi "
                        "extra)")
    _add_sampling(p, default_prime="The ")
    p.add_argument("--quiet", action="store_true", help="print only the final sample")
    p.set_defaults(run=_run_train)


def _add_sampling(p, default_prime):
    p.add_argument("--prime", default=default_prime,
                   help="text the sample starts from (it is fed through the model first)")
    p.add_argument("--length", type=_int_at_least(0), default=400,
                   help="characters to generate")
    p.add_argument("--temperature", type=_float_in(0, None), default=0.8,
                   help="sampling temperature: lower is safer, higher more varied, "
                        "0 always takes the most likely character")
    p.add_argument("--top-k", type=_int_at_least(0), default=0,
                   help="sample only among the k most likely characters (0: all)")


def _add_generate(subparsers):
    p = subparsers.add_parser(
        "generate", help="sample text from a model saved by train",
        description="Load a character model saved by 'python -m cylstm train', feed it "
                    "the prime, and print the prime followed by generated text.",
        formatter_class=_Defaults)
    p.add_argument("--model", default="char_model.npz", metavar="PATH",
                   help="a model file written by train")
    _add_sampling(p, default_prime="The ")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.set_defaults(run=_run_generate)


def _fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _run_train(args):
    import os
    import time
    from contextlib import nullcontext

    import cylstm
    from cylstm import text as T
    from cylstm.callbacks import LambdaCallback

    # Every check that needs no training comes first: a mistake costs nothing.
    rank = 0
    if args.distributed:
        try:
            from mpi4py import MPI
        except ImportError:
            return _fail("--distributed mpi needs mpi4py and an MPI library: "
                         "pip install \"cylstm[mpi]\"")
        rank, n_ranks = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
        if args.batch_size < n_ranks:
            return _fail(f"--batch-size {args.batch_size} streams cannot be split among "
                         f"{n_ranks} ranks (each rank needs at least one)")
        if n_ranks > 1 and args.recurrent_dropout > 0:
            return _fail("--recurrent-dropout is not supported with --distributed mpi on "
                         "more than one rank yet")
    exists = os.path.exists(args.model)
    if exists and not (args.resume or args.overwrite):
        return _fail(f"--model {args.model!r} already exists; pass --resume to continue "
                     f"training it or --overwrite to replace it with a new model")
    if args.resume and not exists:
        return _fail(f"--resume: there is no model at --model {args.model!r} to continue")
    folder = os.path.dirname(os.path.abspath(args.model))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        return _fail(f"--model {args.model!r}: cannot write to the folder {folder!r}")
    if args.dropout > 0 and args.num_layers < 2 and not args.resume:
        return _fail("--dropout acts between LSTM layers: it needs --num-layers > 1")
    resumed = None
    if args.resume:
        try:
            resumed = cylstm.load(args.model)
        except (OSError, ValueError) as e:
            return _fail(str(e))
        chars = getattr(resumed, "metadata", {}).get("vocab")
        if not isinstance(chars, str) or resumed.optimizer is None:
            return _fail(f"--resume: {args.model!r} is not a character model saved by "
                         f"'python -m cylstm train' with its optimiser state")
    if args.text:
        try:
            with open(args.text, encoding="utf-8") as f:
                corpus = f.read()
        except (OSError, UnicodeDecodeError) as e:
            return _fail(f"cannot read --text {args.text!r}: {e}")
        source = args.text
    else:
        corpus, source = T.default_text(), "pydoc_data.topics (Python's documentation)"
    if args.max_chars > 0:
        corpus = corpus[:args.max_chars]
    if not corpus:
        return _fail("the text is empty")
    if resumed is not None:
        vocab = T.CharVocab(resumed.metadata["vocab"])
        unknown = sorted(set(corpus) - set(vocab.chars))
        if unknown:
            return _fail(f"--resume: the text has {len(unknown)} characters the model's "
                         f"vocabulary lacks (first: {unknown[:5]!r}); resume on the text "
                         f"it was trained on")
    else:
        vocab = T.CharVocab.from_text(corpus)
    ids = vocab.encode(corpus)
    n_val = int(len(ids) * args.val_fraction)
    train_ids, val_ids = ids[:len(ids) - n_val], ids[len(ids) - n_val:]
    if len(val_ids) <= args.batch_size or len(train_ids) <= args.batch_size:
        return _fail(f"the text ({len(ids)} characters) is too short for --batch-size "
                     f"{args.batch_size} with --val-fraction {args.val_fraction}")
    missing = sorted(set(args.prime) - set(vocab.chars))
    if missing:
        return _fail(f"--prime {args.prime!r} has characters the text lacks: {missing!r}")
    quiet = args.quiet or rank != 0          # one voice: rank 0's
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    if resumed is not None:
        model = resumed
        done = int(model.metadata.get("epochs", 0))
        say(f"resuming {args.model} after {done} epochs (architecture, vocabulary and "
            f"optimiser state from the file)")
    else:
        try:
            model = T.char_model(vocab.size, args.embedding_dim, args.hidden_size,
                                 args.num_layers, args.dropout, seed=args.seed,
                                 recurrent_dropout=args.recurrent_dropout,
                                 checkpoint_every=args.checkpoint_every)
            model.compile(loss="cross_entropy", optimizer="adam", lr=args.lr,
                          metrics=["bpc"], clip_norm=args.clip_norm or None)
        except (TypeError, ValueError) as e:
            return _fail(str(e))
        done = 0
        if exists:
            say(f"--overwrite: {args.model} will be replaced after the first epoch")
        model.metadata = {"vocab": vocab.chars, "task": "char-lm", "text": source}
    model.metadata["epochs"] = done
    say(f"text: {source}, {len(ids):,} characters, {vocab.size} distinct; "
        f"{len(train_ids):,} to train on, {len(val_ids):,} to validate")
    say(f"model: {model.num_parameters:,} parameters, {_describe(model)}; "
        f"{cylstm.get_num_threads() if args.threads <= 0 else args.threads} threads")

    def save_epoch(epoch, logs):
        # After every epoch, atomically: a run killed later keeps this epoch's model.
        # Epochs count from the first run, so a resumed run draws the streams an
        # uninterrupted one would (fit_text's initial_epoch).
        model.metadata["epochs"] = epoch + 1
        if rank == 0:
            model.save(args.model)

    verbose = 0 if quiet else (1 if sys.stdout.isatty() else 2)
    t0 = time.perf_counter()
    history = None
    with (cylstm.threads(args.threads) if args.threads > 0 else nullcontext()):
        try:
            history = T.fit_text(model, train_ids, val_ids, batch_size=args.batch_size,
                                 seq_len=args.seq_len, epochs=done + args.epochs,
                                 verbose=verbose, initial_epoch=done,
                                 distributed=args.distributed,
                                 callbacks=[LambdaCallback(on_epoch_end=save_epoch)])
        except KeyboardInterrupt:
            # One process only: across ranks, an interrupt aborts them all and the
            # last epoch's file is the checkpoint.
            model.save(args.model)
            say(f"interrupted: saved {args.model} as it is after the last completed step "
                f"({model.metadata['epochs']} full epochs)")
            return 130
        except (TypeError, ValueError, FloatingPointError) as e:
            return _fail(str(e))
    say(f"trained in {time.perf_counter() - t0:.1f} s")
    if history is not None and "val_bpc" in history.history:
        bpcs = ", ".join(f"{v:.3f}" for v in history.history["val_bpc"])
        say(f"validation bits/character per epoch: {bpcs}")
    if rank != 0:
        return 0
    if args.epochs == 0:
        model.save(args.model)             # asked for explicitly: nothing trained
    say(f"saved {args.model} ({model.metadata['epochs']} epochs); sample with: "
        f"python -m cylstm generate --model {args.model} --prime \"...\"")
    try:
        out = T.sample(model, vocab, prime=args.prime, length=args.length,
                       temperature=args.temperature, top_k=args.top_k or None,
                       seed=args.seed)
    except (TypeError, ValueError) as e:
        return _fail(str(e))
    say(f"--- sample (temperature {args.temperature}) ---")
    print(args.prime + out)
    return 0


def _describe(model):
    return " -> ".join(repr(layer) for layer in model.layers)


def _run_generate(args):
    import cylstm
    from cylstm import text as T

    try:
        model = cylstm.load(args.model)
    except (OSError, ValueError) as e:
        return _fail(str(e))
    chars = getattr(model, "metadata", {}).get("vocab")
    if not isinstance(chars, str):
        return _fail(f"{args.model!r} is not a character model saved by "
                     f"'python -m cylstm train' (no vocabulary in it)")
    try:
        vocab = T.CharVocab(chars)
        out = T.sample(model, vocab, prime=args.prime, length=args.length,
                       temperature=args.temperature, top_k=args.top_k or None,
                       seed=args.seed)
    except (TypeError, ValueError) as e:
        return _fail(str(e))
    print(args.prime + out)
    return 0


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m cylstm",
        description="cylstm: a fast, exact LSTM engine for CPUs.",
        epilog="Run 'python -m cylstm <command> --help' for a command's options.",
    )
    sub = p.add_subparsers(title="commands", dest="command", metavar="<command>")
    _add_train(sub)
    _add_generate(sub)
    return p


def main(argv=None):
    p = _parser()
    args = p.parse_args(argv)
    if getattr(args, "run", None) is None:
        p.print_help()
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
