"""The run folder (--out): which files a run owns, checks before writing,
tidying after a kill, metrics.jsonl and loss.png.

Everything a run writes is written atomically (a temporary file, then a
rename), so a reader (`femtogpt sample`, `femtogpt serve`) always sees whole
files; a save killed half-way leaves only its temporary file, removed at the
next start.
"""
import json
import os

from ..errors import CheckpointError, ConfigError

LATEST_NAME = "ckpt.safetensors"   # the latest training state in a run directory
BEST_NAME = "best.safetensors"     # the model with the best validation loss


def checkpoint_path(path, prefer=BEST_NAME) -> str:
    """A checkpoint file from a file path or a run directory (prefer, else the other)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return path
    for name in (prefer, LATEST_NAME if prefer == BEST_NAME else BEST_NAME):
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return candidate
    raise CheckpointError(f"no checkpoint in directory {path} "
                          f"(expected {BEST_NAME} or {LATEST_NAME})")


METRICS_NAME = "metrics.jsonl"     # one JSON object a line: train steps and evaluations
PLOT_NAME = "loss.png"             # the loss curves (the [plot] extra)
# The files a run writes into --out.
RUN_FILES = (LATEST_NAME, BEST_NAME, METRICS_NAME, PLOT_NAME)


def remove_if_present(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise ConfigError(f"--overwrite: cannot remove {path}: {err.strerror or err}") from None


def check_out_dir(out):
    """--out must be a writable directory, or creatable: checked without creating it."""
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise ConfigError(f"cannot use --out {out}: it exists and is not a directory")
        if not os.access(out, os.W_OK | os.X_OK):
            raise ConfigError(f"--out directory {out} is not writable")
        return
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"cannot use --out {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot create --out {out}: {parent} is not writable")


def remove_stale_temp_files(out):
    # A save killed half-way (SIGKILL, power loss) leaves its temporary file;
    # the checkpoint itself is intact. One run owns a directory, so any such
    # file is stale when a run starts.
    for name in os.listdir(out):
        if name.startswith((f".{LATEST_NAME}.tmp-", f".{BEST_NAME}.tmp-")):
            try:
                os.remove(os.path.join(out, name))
            except OSError:
                pass



def read_metrics(path):
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        continue    # a line cut short by a kill mid-write: skip it
    return rows


def plot_losses(metrics_path, png_path):
    """Draw train/val loss against iteration; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = read_metrics(metrics_path)
    if not rows:
        return True
    fig, ax = plt.subplots(figsize=(7, 4.5))
    its = [r["iter"] for r in rows]
    ax.plot(its, [r["train_loss"] for r in rows], marker="o", label="train")
    ax.plot(its, [r["val_loss"] for r in rows], marker="o", label="val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title("femtogpt training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return True
