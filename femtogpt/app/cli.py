"""`femtogpt train` and `femtogpt sample`: argparse over the config dataclasses.

Every TrainConfig field is a flag (--n-layer for n_layer). Flags default to
"not given" so that a preset fills what the user left out, and a resumed run
keeps its own settings unless a flag overrides them. Errors the user can fix
print one line and exit with status 2; --debug shows the traceback.
"""
import argparse
import os
import sys
from dataclasses import fields, replace

from .guard import run_guarded, show_notes

# What each training flag means (the defaults are printed from the presets).
TRAIN_HELP = {
    "data": "training text (UTF-8): a file, a directory (its files, in sorted order) or a "
            "glob such as 'books/**/*.txt'; tokenized once into a token cache",
    "out": "run directory: checkpoints, metrics.jsonl, loss.png (and the token cache)",
    "cache_dir": "where the token cache lives, to share it between runs",
    "tokenizer": "how text becomes tokens: char (the text's distinct characters), byte "
                 "(UTF-8 bytes, any text), bpe (byte-level BPE learned from the training "
                 "text: shorter sequences, so more text per context window), sentencepiece "
                 "(a SentencePiece model trained on the text, with byte fallback) or "
                 "PATH.model (an existing SentencePiece model, as it is)",
    "vocab_size": "vocabulary size that --tokenizer bpe or sentencepiece learns up to "
                  "(at least 256)",
    "n_layer": "transformer blocks",
    "n_head": "attention heads per block",
    "n_embd": "embedding width (must be divisible by --n-head)",
    "block_size": "context length in tokens",
    "dropout": "dropout probability while training, in [0, 1)",
    "bias": "biases in every Linear and LayerNorm layer (GPT-2 has them; nanoGPT's "
            "train.py trains without)",
    "gelu": "GELU form: exact (erf, nanoGPT's nn.GELU) or tanh (GPT-2's approximation)",
    "dtype": "arithmetic of the matrix products: fp32, or bf16 (mixed precision as "
             "PyTorch's autocast: bf16 operands, fp32 sums; weights, optimizer and "
             "checkpoints stay fp32); a resume keeps the run's unless given",
    "batch_size": "sequences per micro-batch (per step, with --grad-accum 1)",
    "grad_accum": "micro-batches per optimizer step (nanoGPT's gradient_accumulation_steps): "
                  "the same step as one batch N times larger, in one batch's memory",
    "max_iters": "training steps",
    "learning_rate": "peak AdamW learning rate (after warmup)",
    "min_lr": "learning rate at the end of the cosine decay",
    "warmup_iters": "steps of linear warmup",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "weight_decay": "AdamW weight decay for matrices and embeddings (not biases, LayerNorm)",
    "grad_clip": "clip the gradient's global norm to this (0: off)",
    "eval_interval": "evaluate train/val loss every this many steps",
    "eval_iters": "batches per split in each evaluation",
    "save_interval": "save the training state every this many steps",
    "seed": "random seed for the weights, batches and dropout",
    "threads": "OpenMP threads (0: OMP_NUM_THREADS, else all cores)",
    "sample_tokens": "tokens of sample printed after training (0: none)",
}


def _flag(name):
    return "--" + name.replace("_", "-")


def _preset_defaults(name):
    from ..train import PRESETS, TrainConfig
    values = [getattr(PRESETS[p], name) for p in ("baby", "small", "femto")]
    if name in ("data", "out", "cache_dir", "tokenizer", "vocab_size", "threads", "seed",
                "sample_tokens") or \
            len(set(values)) == 1:
        value = getattr(TrainConfig(), name)
        if name == "data":
            return "Tiny Shakespeare, bundled"
        if name == "cache_dir":
            return "OUT/cache"
        return f"{value}"
    return f"baby {values[0]}, small {values[1]}, femto {values[2]}"


def add_train_arguments(parser):
    from ..model import GELU_FORMS
    from ..train import PRESETS, TrainConfig
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="starting point for every option below (default: baby, "
                             "nanoGPT's CPU recipe; small: nanoGPT's Shakespeare recipe; "
                             "femto: femtoGPT's model)")
    for f in fields(TrainConfig):
        kind = f.type if isinstance(f.type, type) else {"int": int, "float": float,
                                                         "str": str, "bool": bool}[f.type]
        if kind is bool:
            # --bias / --no-bias
            parser.add_argument(_flag(f.name), dest=f.name, default=None,
                                action=argparse.BooleanOptionalAction,
                                help=f"{TRAIN_HELP[f.name]} (default: "
                                     f"{_preset_defaults(f.name)})")
            continue
        extra = {}
        if f.name == "tokenizer":
            extra["metavar"] = "{char,byte,bpe,sentencepiece,PATH.model}"
            extra["type"] = tokenizer_argument
        elif f.name == "gelu":
            extra["choices"] = list(GELU_FORMS)
        elif f.name == "dtype":
            # not argparse's choices: TrainConfig.validate refuses a bad one in one line
            extra["metavar"] = "{fp32,bf16}"
        metavar = {int: "N", float: "X", str: "PATH"}[kind]
        if f.name in ("data",):
            metavar = "PATH"
        elif f.name in ("out", "cache_dir"):
            metavar = "DIR"
        elif f.name in ("tokenizer", "gelu"):
            metavar = None
        metavar = extra.pop("metavar", metavar)
        parser.add_argument(_flag(f.name), dest=f.name, type=extra.pop("type", kind),
                            default=None, metavar=metavar,
                            help=f"{TRAIN_HELP[f.name]} (default: {_preset_defaults(f.name)})",
                            **extra)
    add_sp_type_argument(parser)
    parser.add_argument("--init-from", metavar="DIR", default=None,
                        help="start a new run from another run's weights (its best model), "
                             "with a fresh optimizer")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run even if --out holds another one, replacing its "
                             "checkpoints and metrics (without it, such a run is refused; the "
                             "same command again always resumes)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no live progress bar (eval lines are still printed)")
    group = parser.add_argument_group(
        "data-parallel training over MPI",
        "`mpiexec -n N femtogpt train ...` runs N ranks that share each batch of "
        "--batch-size sequences and sum their gradients (needs pip install "
        "'femtogpt[mpi]'). --threads then defaults to this machine's cores divided by "
        "the ranks running on it.")
    group.add_argument("--distributed", action="store_true",
                       help="run as one rank of an MPI job under a launcher that "
                            "femtogpt does not recognise (mpiexec and mpirun of MPICH, "
                            "Open MPI and Intel MPI are detected without it)")
    group.add_argument("--comm-timeout", type=float, default=600.0, metavar="SECONDS",
                       help="how long a rank waits for the others at a collective before "
                            "stopping the job: a rank died or is stuck (default: 600)")


def tokenizer_argument(value):
    """--tokenizer: a kind, or an existing SentencePiece model's PATH.model."""
    from ..text import TOKENIZER_KINDS
    from ..text.sentencepiece_tokenizer import is_model_path
    if value in TOKENIZER_KINDS or is_model_path(value):
        return value
    raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from "
                                     f"{', '.join(TOKENIZER_KINDS)} or a PATH.model)")


def add_sp_type_argument(parser):
    parser.add_argument("--sp-type", choices=["unigram", "bpe"], default=None,
                        help="the SentencePiece algorithm that --tokenizer sentencepiece "
                             "trains (default: unigram); bpe is the tokenizer kind "
                             "sentencepiece-bpe")


def fold_sp_type(args):
    """--tokenizer sentencepiece --sp-type bpe is the kind sentencepiece-bpe:
    the kind names the algorithm (as a checkpoint's tokenizer type does), so a
    resumed run compares one name."""
    from ..errors import ConfigError
    sp_type = getattr(args, "sp_type", None)
    if sp_type is None:
        return
    if args.tokenizer not in ("sentencepiece", "sentencepiece-bpe"):
        raise ConfigError(f"--sp-type {sp_type} needs --tokenizer sentencepiece")
    args.tokenizer = "sentencepiece-bpe" if sp_type == "bpe" else "sentencepiece"


def train_command(args):
    from ..train.distributed import connect
    from ..train import PRESETS, train
    from ..train import ARCHITECTURE
    comm = args.comm = connect(args.distributed, args.comm_timeout)
    base = PRESETS[args.preset or "baby"]
    fold_sp_type(args)
    given = {f.name for f in fields(base) if getattr(args, f.name) is not None}
    cfg = replace(base, **{name: getattr(args, name) for name in given})
    explicit = set(given)
    if args.preset:
        # A named preset asks for its architecture: resuming a run of another
        # shape must be refused, not silently continued.
        explicit |= set(ARCHITECTURE)
    run = train(cfg, init_from=args.init_from, explicit=explicit,
                progress=None if not args.no_progress else False, comm=comm,
                overwrite=args.overwrite)
    if run.interrupted:
        return 128 + run.stop_signal        # 130 for Ctrl-C, 143 for SIGTERM
    if cfg.sample_tokens > 0 and comm.rank == 0:
        model = run.model
        model.eval()
        from .sample import stream_sample
        print("--- sample ---", file=sys.stderr)
        stream_sample(model, run.tokenizer, "\n", cfg.sample_tokens, temperature=0.8,
                      top_k=200, top_p=None, seed=cfg.seed)
    return 0


def build_parser():
    from .sample import add_sample_arguments
    parser = argparse.ArgumentParser(
        prog="femtogpt",
        description="Train a small GPT from scratch on your own text, on a CPU, and "
                    "sample from it.",
        epilog="Start with `femtogpt train` (Tiny Shakespeare, a couple of minutes), then "
               "`femtogpt sample`. `femtogpt COMMAND --help` lists each command's options.")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p_train = sub.add_parser(
        "train", help="train a model (or continue one) on a text file",
        description="Train a GPT on a text file. If --out already holds a training state "
                    "(ckpt.safetensors), training continues where it stopped. Ctrl-C saves "
                    "and stops; run the same command again to continue.")
    add_train_arguments(p_train)
    # SUPPRESS: a subcommand's own --debug must not reset `femtogpt --debug train`.
    p_train.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show the full traceback on errors")
    p_sample = sub.add_parser(
        "sample", help="generate text from a trained model",
        description="Generate text from a trained model, streaming it to stdout.")
    add_sample_arguments(p_sample)
    p_sample.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show the full traceback on errors")
    p_verify = sub.add_parser(
        "verify", help="check that a run's checkpoints and token cache are intact",
        description="Read every checkpoint of a run (or one checkpoint file, or a Hugging "
                    "Face model folder) and check every tensor against its digest; check "
                    "the run's token cache (or a --cache-dir) against its digests and its "
                    "sources. Writes nothing. Exit status: 0 if everything is intact (a "
                    "stale cache is rebuilt by the next run, and is not damage), 1 if "
                    "anything is damaged.")
    p_verify.add_argument("path", metavar="RUN_OR_FILE",
                          help="a run directory, a checkpoint file or a Hugging Face folder")
    p_verify.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show the full traceback on errors")
    p_export = sub.add_parser(
        "export", help="write a model as a Hugging Face GPT-2 folder or a GGUF file",
        description="Write a run's model (or a checkpoint, or a Hugging Face folder) as a "
                    "Hugging Face GPT-2 folder: config.json, model.safetensors in Hugging "
                    "Face's names and Conv1D layout, and GPT-2's tokenizer files, so that "
                    "transformers' GPT2LMHeadModel.from_pretrained(DIR) loads it; or, when "
                    "--to ends in .gguf, as a GGUF file in llama.cpp's GPT-2 layout with its "
                    "tokenizer inside (llama.cpp, ollama and LM Studio run it). The folder "
                    "or file appears whole or not at all.")
    p_export.add_argument("source", metavar="RUN",
                          help="a run directory, a checkpoint file or a Hugging Face folder")
    p_export.add_argument("--to", required=True, metavar="DIR_OR_FILE.gguf",
                          help="the folder to write, or a FILE.gguf")
    p_export.add_argument("--dtype", default=None, metavar="{f32,bf16,q8_0}",
                          help="GGUF only: the matrices' type (embeddings too; LayerNorms, "
                               "biases and positions stay f32, as llama.cpp's converter "
                               "keeps them) (default: f32)")
    p_export.add_argument("--overwrite", action="store_true",
                          help="replace DIR if it is not empty, or FILE.gguf if it exists")
    p_export.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show the full traceback on errors")
    p_eval = sub.add_parser(
        "eval", help="a model's loss and bits per character on a text",
        description="Score every token of a text, once, in non-overlapping windows of the "
                    "model's context (batched, on every thread), and print the mean loss, "
                    "bits per character and per token: on the run's held-out split (the "
                    "one training evaluated) or on all of --data.")
    from .evaluate import add_eval_arguments
    add_eval_arguments(p_eval)
    p_eval.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback on errors")
    p_serve = sub.add_parser(
        "serve", help="a playground in the browser: live runs, sampling, inside the model",
        description="Serve a page (http://127.0.0.1:8000 by default) that lists the runs "
                    "given, draws their loss curves live while they train, streams samples, "
                    "and shows each token's next-token probabilities, the model's surprise "
                    "at each token and the attention patterns. It only reads the run "
                    "folders. Ctrl-C stops it. At most 16 connections at once; more get a 503.")
    p_serve.add_argument("--out", nargs="+", default=["out"], metavar="DIR",
                         help="run folders, checkpoint files or Hugging Face GPT-2 folders "
                              "(default: out)")
    p_serve.add_argument("--host", default="127.0.0.1",
                         help="address to listen on (default: 127.0.0.1, this machine only; "
                              "0.0.0.0 exposes the models to the network, with a warning)")
    p_serve.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: any "
                                                                 "free port)")
    p_serve.add_argument("--threads", type=int, default=0, metavar="N",
                         help="OpenMP threads for the models (0: OMP_NUM_THREADS, else all cores)")
    p_serve.add_argument("--dtype", default="fp32", metavar="{fp32,bf16,int8}",
                         help="the type the models' weights are read in while sampling, as "
                              "`femtogpt sample --dtype` (default: fp32; the attention view "
                              "needs fp32)")
    p_serve.add_argument("--verbose", action="store_true", help="log every request")
    p_serve.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show the full traceback on errors")
    p_prepare = sub.add_parser(
        "prepare", help="tokenize a corpus into a token cache, ahead of training",
        description="Tokenize --data once into a memory-mapped token cache (what `femtogpt "
                    "train` does at its first start), with a progress bar. `femtogpt train` "
                    "with the same --data, --tokenizer, --vocab-size and --out (or "
                    "--cache-dir) then starts from it at once.")
    p_prepare.add_argument("--data", required=True, metavar="PATH", help=TRAIN_HELP["data"])
    p_prepare.add_argument("--tokenizer", default="char", type=tokenizer_argument,
                           metavar="{char,byte,bpe,sentencepiece,PATH.model}",
                           help=TRAIN_HELP["tokenizer"] + " (default: char)")
    p_prepare.add_argument("--vocab-size", type=int, default=512, metavar="N",
                           help=TRAIN_HELP["vocab_size"] + " (default: 512)")
    add_sp_type_argument(p_prepare)
    p_prepare.add_argument("--init-from", metavar="DIR", default=None,
                           help="use the tokenizer of this model instead (a Hugging Face "
                                "GPT-2 folder or a run), as `femtogpt train --init-from` does")
    p_prepare.add_argument("--out", default="out", metavar="DIR",
                           help="the run directory whose cache/ receives it (default: out)")
    p_prepare.add_argument("--cache-dir", default=None, metavar="DIR",
                           help=TRAIN_HELP["cache_dir"] + " (default: OUT/cache)")
    p_prepare.add_argument("--rebuild", action="store_true",
                           help="tokenize again even if the cache is up to date")
    p_prepare.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_prepare.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                           help="show the full traceback on errors")
    return parser


def prepare_command(args):
    from ..train.config import TrainConfig
    from ..text.token_cache import open_tokens
    fold_sp_type(args)
    kind, tokenizer = args.tokenizer, None
    TrainConfig(tokenizer=kind, vocab_size=args.vocab_size).validate()
    if args.init_from is not None:
        from ..files import load
        _, tokenizer = load(args.init_from)
        kind = tokenizer.to_dict()["type"]
    cache_dir = args.cache_dir or os.path.join(args.out, "cache")
    tokens = open_tokens(os.path.abspath(args.data), kind, args.vocab_size,
                         tokenizer=tokenizer, cache_dir=cache_dir, rebuild=args.rebuild,
                         exclude=[args.out],
                         progress=False if args.no_progress else None,
                         log=lambda message: print(message, file=sys.stderr))
    state = "built" if tokens.built else "up to date, reused"
    print(f"token cache {tokens.folder} ({state}): {len(tokens.train):,} train / "
          f"{len(tokens.val):,} val tokens, {tokens.tokenizer.kind} vocabulary of "
          f"{tokens.tokenizer.vocab_size:,}")
    return 0


def export_command(args):
    from ..files import load
    gguf = args.to.lower().endswith(".gguf")
    if gguf:
        from ..files.gguf_file import check_dtype, check_target, export_gguf
        dtype = check_dtype(args.dtype or "f32")
        check_target(args.to, args.overwrite)       # before the model is read
    elif args.dtype is not None:
        from ..errors import ConfigError
        raise ConfigError(f"--dtype {args.dtype} is for a GGUF file (--to FILE.gguf); a "
                          f"Hugging Face folder is written in float32")
    model, tokenizer = load(args.source)
    if gguf:
        name = os.path.basename(os.path.normpath(os.path.abspath(args.source)))
        notes = export_gguf(model, tokenizer, args.to, dtype, overwrite=args.overwrite,
                            name=name)
    else:
        from ..files.hf import export_hf
        notes = export_hf(model, tokenizer, args.to, overwrite=args.overwrite,
                          source=args.source)
    for note in notes:
        print(f"femtogpt: note: {note}", file=sys.stderr)
    print(f"wrote {os.path.abspath(args.to)} ({model.num_parameters() / 1e6:.2f}M parameters"
          f"{f', {dtype}' if gguf else ''})")
    return 0


def verify_command(args):
    from ..files.verify import DAMAGED, verify
    report = verify(args.path)
    for file, status, detail in report:
        print(f"{status:10s} {file}: {detail}")
    damaged = sum(status == DAMAGED for _, status, _ in report)
    # (a stale token cache is not damage: the next run rebuilds it)
    if damaged:
        print(f"{damaged} of {len(report)} file(s) damaged", file=sys.stderr)
        return 1
    return 0


def main(argv=None):
    show_notes()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from .sample import sample_command
    from .serve import serve_command
    from .evaluate import eval_command
    command = {"train": train_command, "sample": sample_command, "verify": verify_command,
               "export": export_command, "prepare": prepare_command,
               "serve": serve_command, "eval": eval_command}[args.command]
    return run_guarded(command, args)


if __name__ == "__main__":
    sys.exit(main())
