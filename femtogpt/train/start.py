"""Where a run starts from, and the settings it then has.

A run starts from scratch, from another run's or a Hugging Face GPT-2's
weights (--init-from), or resumes its own training state. Each way decides
the run's settings differently: nanoGPT's fine-tuning recipe for the settings
not given, the source's architecture, or the saved run's settings. These
functions set the fields of the run's own copy of the config (never the
caller's) and refuse, by name, a flag that cannot apply.
"""
from dataclasses import fields, replace

from ..errors import ConfigError, DataError, FemtoGPTError
from ..files.checkpoint import model_from_file
from ..files.hf import config_from_hf, is_hf_folder, load_hf
from ..files.rundir import BEST_NAME, checkpoint_path
from ..files.tensorfile import TensorFile
from ..model import GPT
from ..text import tokenizer_matches
from ..text.token_cache import open_tokens
from .config import ARCHITECTURE, FINETUNE_DEFAULTS, TrainConfig


def finetune_defaults(cfg, explicit, folder):
    """{setting: value}: FINETUNE_DEFAULTS for the settings not given. With
    --learning-rate given and --min-lr not, the rate stays constant at the one
    given; the context is at most the model's."""
    n_positions = config_from_hf(folder).block_size
    chosen = {name: value for name, value in FINETUNE_DEFAULTS.items() if name not in explicit}
    if "min_lr" in chosen and "learning_rate" in explicit:
        chosen["min_lr"] = cfg.learning_rate
    if "block_size" in chosen:
        chosen["block_size"] = min(chosen["block_size"], n_positions)
    return chosen


def cropped(model, block_size):
    """model with its context cut to block_size: the first rows of its position
    table (nanoGPT's crop_block_size)."""
    config = replace(model.config, block_size=block_size)
    cropped = GPT(config, init=False)
    state = model.state_views()
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:block_size]
    cropped.load_state_dict(state)
    return cropped


def init_from(cfg, source, explicit, recipe, log):
    """(model, tokenizer) of --init-from SOURCE (a run, a checkpoint or a Hugging Face
    GPT-2 folder), cropped to --block-size if given (or by the fine-tuning
    recipe, the settings finetune_defaults chose); cfg (the run's own copy)
    takes the source's architecture and tokenizer, and a given flag that
    contradicts them is refused by name."""
    if is_hf_folder(source):
        file = source
        model, tokenizer = load_hf(source)
        log(f"fine-tuning a pretrained GPT-2 (nanoGPT's recipe for the settings "
            f"not given): learning rate {cfg.learning_rate:g}"
            f"{', constant' if cfg.min_lr == cfg.learning_rate else ''}; "
            f"{cfg.batch_size} sequences x {cfg.grad_accum} micro-batches of "
            f"{cfg.block_size} tokens per step; {cfg.max_iters} steps")
    else:
        file = checkpoint_path(source, BEST_NAME)
        with TensorFile(file) as f:
            model, tokenizer = model_from_file(f)
    mc = model.config
    crop = "block_size" in explicit or "block_size" in recipe
    if crop and cfg.block_size != mc.block_size:
        if cfg.block_size > mc.block_size:
            raise ConfigError(f"--block-size {cfg.block_size} is more than the "
                              f"context of the model in {source} ({mc.block_size})")
        model = cropped(model, cfg.block_size)
        log(f"context cropped from {mc.block_size} to {cfg.block_size} "
            f"positions (the position table's first rows)")
        mc = model.config
    for name in ARCHITECTURE:
        if name in explicit and getattr(cfg, name) != getattr(mc, name):
            raise ConfigError(
                f"--init-from {source}: its model has {name}={getattr(mc, name)}, "
                f"but --{name.replace('_', '-')} {getattr(cfg, name)} was given; "
                f"the architecture comes from the source run")
        setattr(cfg, name, getattr(mc, name))
    kind = tokenizer.to_dict()["type"]
    if "tokenizer" in explicit and not tokenizer_matches(cfg.tokenizer, tokenizer):
        raise ConfigError(f"--init-from {source}: its model uses the {kind} tokenizer, "
                          f"not {cfg.tokenizer}")
    cfg.tokenizer = kind
    if kind == "bpe":
        cfg.vocab_size = tokenizer.vocab_size
    model.dropout_seed = cfg.seed
    if cfg.dropout != mc.dropout:
        model.config.dropout = cfg.dropout
    # dtype is not architecture (the weights are fp32 in every file): the new
    # run's own, given or the default.
    if cfg.dtype != mc.dtype:
        log(f"training in {cfg.dtype} (the model in {source} was trained in {mc.dtype})")
    model.set_dtype(cfg.dtype)
    log(f"initialised from {file} (fresh optimizer)")
    return model, tokenizer


def resume_settings(cfg, explicit, meta, model, tokenizer, path, log):
    """cfg (the run's own copy) as the saved run in `path` had it: its
    architecture, tokenizer and seed are kept (a flag that contradicts them is
    refused by name); every other setting continues as saved unless given, and
    each given change is said."""
    saved = meta.get("train_config", {})
    mc = model.config
    for name in ARCHITECTURE:
        ours = getattr(cfg, name)
        if name in explicit and ours != getattr(mc, name):
            raise ConfigError(
                f"{path} holds a model with {name}={getattr(mc, name)}, "
                f"but --{name.replace('_', '-')} {ours} was given; use another --out "
                f"to start a new run, or --init-from to start from its weights")
        setattr(cfg, name, getattr(mc, name))
    if "tokenizer" in explicit and not tokenizer_matches(cfg.tokenizer, tokenizer):
        raise ConfigError(f"{path} was trained with the "
                          f"{tokenizer.to_dict()['type']} tokenizer, not {cfg.tokenizer}")
    if ("vocab_size" in explicit and tokenizer.to_dict()["type"] == "bpe"
            and cfg.vocab_size != saved.get("vocab_size")):
        raise ConfigError(f"{path} has a BPE vocabulary trained up to "
                          f"{saved.get('vocab_size')} tokens, not {cfg.vocab_size}")
    if "seed" in explicit and "seed" in saved and cfg.seed != saved["seed"]:
        raise ConfigError(f"{path} was started with --seed {saved['seed']}, "
                          f"not {cfg.seed}: a resumed run continues its own random "
                          f"streams; use another --out to train with another seed")
    # Hyperparameters not given on this command line continue as they were;
    # the ones given apply from here on, and each change is said.
    for f in fields(TrainConfig):
        if f.name not in saved or f.name in ("out", "threads", "data"):
            continue
        if f.name not in explicit:
            setattr(cfg, f.name, saved[f.name])
        elif getattr(cfg, f.name) != saved[f.name]:
            log(f"resuming with {f.name} {getattr(cfg, f.name)} (was {saved[f.name]})")
    if "data" not in explicit and "data" in saved:
        cfg.data = saved["data"]
    # dtype continued as saved (a run from before it trained in fp32), or changed
    # as said above; the checkpoint's weights are fp32 either way.
    model.set_dtype(cfg.dtype)


def open_corpus(cfg, comm, cache_root, tokenizer, prefer_fit, progress, log):
    """--data as a token cache (text/token_cache.py), reused or built, encoded
    with `tokenizer` (None: fitted to it, or the cache's own fit when
    prefer_fit, as a resume does). Distributed, rank 0 builds it while the
    others wait, then they open it."""
    fit = (cfg.tokenizer, cfg.vocab_size)

    def open_here(log):
        return open_tokens(cfg.data, cfg.tokenizer, cfg.vocab_size, tokenizer=tokenizer,
                           cache_dir=cache_root, log=log, progress=progress,
                           prefer_fit=fit if prefer_fit else None, exclude=[cfg.out])
    if not comm.distributed:
        return open_here(log)
    tokens = status = None
    if comm.rank == 0:
        try:
            tokens = open_here(log)
            status = ("ok",)
        except FemtoGPTError as err:
            status = ("error", str(err))
    statuses = comm.allgather(status or ("ok",))
    failed = [(rank, st[1]) for rank, st in enumerate(statuses) if st[0] == "error"]
    if failed:
        rank, message = failed[0]
        err = DataError(message if rank == comm.rank else f"rank {rank}: {message}")
        err.agreed = True
        raise err
    return tokens if tokens is not None else open_here(lambda message: None)
