"""The command line: help, train then sample end to end, and how user errors are reported.

User errors must exit with status 2 and one line on stderr starting
"femtogpt: error:" (argparse's own usage errors also exit 2), never a
traceback, unless --debug asks for one. Most cases run in-process through
femtogpt.app.cli.main; exit statuses, signals and pipes are checked in real
subprocesses.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

import femtogpt
from femtogpt.files.checkpoint import load_checkpoint
from femtogpt.app.cli import main
from femtogpt.errors import DataError
from femtogpt.app.sample import main as sample_main
from femtogpt.app.sample import stream_sample
from femtogpt.train import TrainConfig

TEXT = "the quick brown fox jumps over the lazy dog.\n" * 40
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(femtogpt.__file__)))
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8",
        "--batch-size", "4", "--eval-interval", "10", "--eval-iters", "3",
        "--save-interval", "10", "--no-progress", "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    # One thread here and in the subprocesses: the same arithmetic, the same samples.
    saved = femtogpt.get_num_threads()
    femtogpt.set_num_threads(1)
    yield
    femtogpt.set_num_threads(saved)


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = PACKAGE_PARENT + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    e["COLUMNS"] = "250"
    return e


def run(*args, module="femtogpt.app.cli", **kwargs):
    # cwd: `python -m` puts the working directory first on sys.path; from the
    # repository root that would be the source tree, which has no compiled core
    # when the package is installed with pip. The imported package's parent
    # directory always holds the same femtogpt this test process uses.
    return subprocess.run([sys.executable, "-m", module, *args], env=env(), cwd=PACKAGE_PARENT,
                          capture_output=True, text=True, timeout=120, **kwargs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained through the CLI: (data file, run directory)."""
    root = tmp_path_factory.mktemp("cli")
    data = root / "data.txt"
    data.write_text(TEXT, encoding="utf-8")
    out = root / "run"
    saved = femtogpt.get_num_threads()
    try:
        code = main(["train", "--data", str(data), "--out", str(out), "--max-iters", "30",
                     "--learning-rate", "1e-2", "--sample-tokens", "0", *TINY])
    finally:
        femtogpt.set_num_threads(saved)
    assert code == 0
    return str(data), str(out)


def expected_sample(source, prompt, n, seed, temperature=0.8, top_k=200, top_p=None):
    model, tokenizer = femtogpt.load(source)
    sink = _Sink()
    return stream_sample(model, tokenizer, prompt, n, temperature, top_k, top_p, seed,
                         out=sink) + "\n"


class _Sink:
    def write(self, text):
        pass

    def flush(self):
        pass


# --------------------------------------------------------------------------- help


TRAIN_OPTIONS = ["--data", "--out", "--preset", "--tokenizer", "--vocab-size", "--n-layer", "--n-head",
                 "--n-embd", "--block-size", "--dropout", "--bias", "--no-bias", "--gelu",
                 "--batch-size", "--max-iters",
                 "--learning-rate", "--min-lr", "--warmup-iters", "--beta1", "--beta2",
                 "--weight-decay", "--grad-clip", "--eval-interval", "--eval-iters",
                 "--save-interval", "--seed", "--threads", "--sample-tokens", "--init-from", "--overwrite",
                 "--no-progress", "--debug"]
TRAIN_DEFAULTS = ["(default: baby 4, small 6, femto 4)",          # --n-layer
                  "(default: baby 128, small 384, femto 64)",      # --n-embd
                  "(default: baby 64, small 256, femto 64)",       # --block-size
                  "(default: baby 12, small 64, femto 32)",        # --batch-size
                  "(default: baby 2000, small 5000, femto 2000)",  # --max-iters
                  "(default: baby 0.0, small 0.2, femto 0.0)",     # --dropout
                  "(default: baby False, small False, femto True)",  # --bias
                  "(default: baby exact, small exact, femto tanh)",  # --gelu
                  "(default: 0.001)", "(default: 0.0001)", "(default: 100)", "(default: 0.9)",
                  "(default: 0.99)", "(default: 0.1)", "(default: 1.0)", "(default: 250)",
                  "(default: 1337)", "(default: 500)", "(default: out)", "(default: char)"]
SAMPLE_OPTIONS = ["--out", "--checkpoint", "--prompt", "--prompt-file", "--max-new-tokens",
                  "--num-samples", "--temperature", "--top-k", "--top-p", "--seed",
                  "--threads", "--debug"]
SAMPLE_DEFAULTS = ["(default: out)", "(default: 500)", "(default: 1)", "(default: 0.8)",
                   "(default: 200)", "(default: off)", "(default: random)"]


@pytest.mark.parametrize("args, module, options, defaults", [
    (["--help"], "femtogpt.app.cli", ["train", "sample", "--debug"], []),
    (["train", "--help"], "femtogpt.app.cli", TRAIN_OPTIONS, TRAIN_DEFAULTS),
    (["sample", "--help"], "femtogpt.app.cli", SAMPLE_OPTIONS, SAMPLE_DEFAULTS),
    (["--help"], "femtogpt.sample", SAMPLE_OPTIONS, SAMPLE_DEFAULTS),
])
def test_help_lists_every_option_and_default(args, module, options, defaults):
    proc = run(*args, module=module)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    text = " ".join(proc.stdout.split())        # undo argparse's line wrapping
    assert text.startswith("usage: ")
    for option in options:
        assert f" {option}" in text, option
    for default in defaults:
        assert default in text, default


def test_train_help_documents_every_config_field(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in TrainConfig.__dataclass_fields__:
        flag = "--" + name.replace("_", "-")
        assert f"{flag} " in text, flag
    # every config option shows its default
    assert text.count("(default:") >= len(TrainConfig.__dataclass_fields__)


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert capsys.readouterr().out.startswith("usage: femtogpt")


# --------------------------------------------------------------------------- end to end


def test_train_writes_a_run_directory_and_metrics(trained):
    data, out = trained
    assert {"ckpt.safetensors", "best.safetensors", "metrics.jsonl"} <= set(os.listdir(out))
    tensors, meta = load_checkpoint(os.path.join(out, "ckpt.safetensors"))
    assert meta["iter"] == 30
    assert meta["model_config"]["n_embd"] == 16 and meta["model_config"]["block_size"] == 8
    assert meta["train_config"]["learning_rate"] == 1e-2
    assert meta["train_config"]["batch_size"] == 4
    # not given: the baby preset's values
    assert meta["train_config"]["warmup_iters"] == 100
    assert meta["train_config"]["seed"] == 1337


def test_sample_with_a_seed_is_reproducible_and_starts_with_the_prompt(trained):
    data, out = trained
    args = ["sample", "--out", out, "--prompt", "the ", "--seed", "3",
            "--max-new-tokens", "40", "--threads", "1"]
    first, second = run(*args), run(*args)
    assert first.returncode == second.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert first.stdout.startswith("the ")
    assert len(first.stdout) == 4 + 40 + 1 and first.stdout.endswith("\n")
    # exactly the library's stream_sample from the best model with that seed
    assert first.stdout == expected_sample(out, "the ", 40, seed=3)
    other = run(*[("4" if a == "3" else a) for a in args])
    assert other.returncode == 0 and other.stdout != first.stdout


def test_sample_options_reach_the_sampler(trained, capsys, tmp_path):
    data, out = trained
    ckpt = os.path.join(out, "ckpt.safetensors")
    assert main(["sample", "--checkpoint", ckpt, "--prompt", "dog", "--seed", "8",
                 "--max-new-tokens", "25", "--temperature", "1.3", "--top-k", "4",
                 "--top-p", "0.9", "--threads", "1"]) == 0
    assert capsys.readouterr().out == expected_sample(ckpt, "dog", 25, 8, 1.3, 4, 0.9)
    # --num-samples: seeds seed, seed + 1, ... separated by a line of dashes
    assert main(["sample", "--out", out, "--seed", "5", "--num-samples", "2",
                 "--max-new-tokens", "12", "--threads", "1"]) == 0
    assert capsys.readouterr().out == (expected_sample(out, "\n", 12, 5) + "---------------\n"
                                       + expected_sample(out, "\n", 12, 6))
    # --temperature 0 is greedy: no seed needed for the same text twice
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("the lazy", encoding="utf-8")
    for _ in range(2):
        assert main(["sample", "--out", out, "--prompt-file", str(prompt_file),
                     "--temperature", "0", "--max-new-tokens", "20", "--threads", "1"]) == 0
    model, tokenizer = femtogpt.load(out)
    ids = model.generate(np.array([tokenizer.encode("the lazy")]), 20, temperature=0.0)
    greedy = tokenizer.decode(ids[0].tolist()) + "\n"
    assert capsys.readouterr().out == greedy + greedy


def test_python_m_femtogpt_sample_matches_femtogpt_sample(trained, capsys):
    data, out = trained
    args = ["--out", out, "--prompt", "fox", "--seed", "2", "--max-new-tokens", "15",
            "--threads", "1"]
    assert sample_main(args) == 0
    via_module = capsys.readouterr().out
    assert main(["sample", *args]) == 0
    assert capsys.readouterr().out == via_module == expected_sample(out, "fox", 15, 2)


def test_train_prints_a_sample_of_the_final_model(tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--max-iters", "10",
                 "--sample-tokens", "30", "--seed", "21", *TINY]) == 0
    captured = capsys.readouterr()
    assert "--- sample ---" in captured.err
    assert "done: best val loss" in captured.err
    expected = expected_sample(str(out / "ckpt.safetensors"), "\n", 30, seed=21)
    assert captured.out == expected
    assert len(captured.out) == 1 + 30 + 1


def test_preset_fills_what_the_flags_leave_out(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "run"
    assert main(["train", "--preset", "femto", "--data", str(data), "--out", str(out),
                 "--n-layer", "1", "--block-size", "8", "--max-iters", "2",
                 "--eval-iters", "1", "--sample-tokens", "0", "--no-progress",
                 "--threads", "1"]) == 0
    meta = load_checkpoint(os.path.join(out, "ckpt.safetensors"))[1]
    assert meta["model_config"]["n_layer"] == 1           # given
    assert meta["model_config"]["n_embd"] == 64           # femto
    assert meta["model_config"]["n_head"] == 4            # femto
    assert meta["model_config"]["bias"] is True           # femto: femtoGPT's model
    assert meta["model_config"]["gelu"] == "tanh"
    assert meta["train_config"]["batch_size"] == 32       # femto
    assert meta["train_config"]["eval_iters"] == 1        # given


def test_bias_and_gelu_flags_reach_the_model_and_the_checkpoint(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text(TEXT, encoding="utf-8")
    common = ["--data", str(data), "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
              "--block-size", "8", "--max-iters", "2", "--eval-iters", "1",
              "--sample-tokens", "0", "--no-progress", "--threads", "1"]
    shapes = {}
    for flags in ([], ["--bias", "--gelu", "tanh"], ["--no-bias", "--gelu", "exact"]):
        out = tmp_path / ("run" + "".join(flags))
        assert main(["train", *common, "--out", str(out), *flags]) == 0
        tensors, meta = load_checkpoint(os.path.join(out, "best.safetensors"))
        mc = meta["model_config"]
        shapes[tuple(flags)] = (mc["bias"], mc["gelu"],
                                any(k.endswith(".bias") for k in tensors))
        model, _ = femtogpt.load(str(out))
        assert (model.config.bias, model.config.gelu) == (mc["bias"], mc["gelu"])
    # the default (baby) is nanoGPT's train.py: no biases, exact GELU
    assert shapes[()] == (False, "exact", False)
    assert shapes[("--bias", "--gelu", "tanh")] == (True, "tanh", True)
    assert shapes[("--no-bias", "--gelu", "exact")] == (False, "exact", False)


def test_broken_pipe_is_not_an_error(trained):
    data, out = trained
    proc = subprocess.Popen([sys.executable, "-m", "femtogpt.app.cli", "sample", "--out", out,
                             "--max-new-tokens", "100000", "--seed", "1", "--threads", "1"],
                            env=env(), cwd=PACKAGE_PARENT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    head = proc.stdout.read(10)                # `femtogpt sample | head -c 10`
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert len(head) == 10
    assert proc.returncode == 0, stderr
    assert stderr == ""


# --------------------------------------------------------------------------- user errors


def one_error_line(captured):
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("femtogpt: error: "), lines[0]
    assert "Traceback" not in captured.err
    return lines[0]


@pytest.fixture
def files(tmp_path, trained):
    data, out = trained
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    short = tmp_path / "short.txt"
    short.write_text("abcdefghij", encoding="utf-8")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the", encoding="utf-8")
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    binary = tmp_path / "program.bin"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1") * 20)
    # More distinct characters than the char tokenizer allows (65,536).
    many = tmp_path / "many.txt"
    many.write_text("".join(chr(c) for c in range(0x20, 0x20 + 70000)
                            if not 0xD800 <= c < 0xE000), encoding="utf-8")
    # A run whose training state was cut short on disk (a truncated file).
    broken = tmp_path / "broken"
    broken.mkdir()
    whole = open(os.path.join(out, "ckpt.safetensors"), "rb").read()
    (broken / "ckpt.safetensors").write_bytes(whole[:len(whole) // 2])
    # A checkpoint written by a future femtogpt (format version 7).
    tensors, meta = load_checkpoint(os.path.join(out, "best.safetensors"))
    future = tmp_path / "future.safetensors"
    future.write_bytes(safetensors.numpy.save(
        tensors, metadata={"femtogpt": json.dumps(meta), "format_version": "7"}))
    # A model with one flipped bit in a weight (its digest tells).
    damaged = tmp_path / "damaged.safetensors"
    raw = bytearray(open(os.path.join(out, "best.safetensors"), "rb").read())
    raw[-5] ^= 0x10
    damaged.write_bytes(bytes(raw))
    return dict(data=data, out=out, empty=str(empty), short=str(short), prompt=str(prompt),
                damaged=str(damaged),
                nothing=str(nothing), new=str(tmp_path / "new"),
                missing=str(tmp_path / "missing.txt"), binary=str(binary),
                latin1=str(latin1), many=str(many), broken=str(broken),
                future=str(future), root=str(tmp_path))


ERROR_CASES = [
    (["train", "--data", "{data}", "--out", "{new}", "--grad-accum", "0"],
     "--grad-accum must be a positive integer, got 0"),
    (["export", "{out}", "--to", "{root}"],
     "--to {root} is not empty: choose another folder, or --overwrite to replace it"),
    (["sample", "--out", "{nothing}"], "no checkpoint in directory {nothing}"),
    (["sample", "--checkpoint", "{missing}"], "checkpoint not found: {missing}"),
    (["train", "--data", "{missing}", "--out", "{new}"], "data file not found: {missing}"),
    (["train", "--data", "{empty}", "--out", "{new}"], "data file is empty: {empty}"),
    (["train", "--data", "{short}", "--out", "{new}", "--block-size", "8"],
     "val split has 1 tokens, needs at least block_size + 1 = 9"),
    (["train", "--data", "{data}", "--out", "{new}", "--n-embd", "30", "--n-head", "4"],
     "--n-embd (30) must be divisible by --n-head (4)"),
    (["train", "--data", "{data}", "--out", "{new}", "--dropout", "1.5"],
     "--dropout must be in [0, 1), got 1.5"),
    (["train", "--data", "{data}", "--out", "{new}", "--max-iters", "0"],
     "--max-iters must be a positive integer, got 0"),
    (["train", "--data", "{data}", "--out", "{new}", "--learning-rate", "0"],
     "--learning-rate must be positive"),
    (["train", "--data", "{data}", "--out", "{out}", "--n-embd", "32", "--n-head", "2"],
     "holds a model with n_embd=16, but --n-embd 32 was given"),
    (["train", "--data", "{data}", "--out", "{new}", "--init-from", "{nothing}"],
     "no checkpoint in directory {nothing}"),
    (["sample", "--out", "{out}", "--temperature", "-1"], "--temperature must be >= 0, got -1.0"),
    (["sample", "--out", "{out}", "--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["sample", "--out", "{out}", "--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["sample", "--out", "{out}", "--top-k", "0"], "--top-k must be >= 1, got 0"),
    (["sample", "--out", "{out}", "--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
    (["sample", "--out", "{out}", "--num-samples", "0"], "--num-samples must be >= 1"),
    (["sample", "--out", "{out}", "--prompt", "x", "--prompt-file", "{prompt}"],
     "give --prompt or --prompt-file, not both"),
    (["sample", "--out", "{out}", "--prompt", "THE"],
     "prompt has characters the tokenizer does not know: 'T', 'H', 'E'"),
    (["sample", "--out", "{out}", "--prompt", ""], "the prompt is empty"),
    (["sample", "--out", "{out}", "--prompt-file", "{missing}"], "prompt file not found"),
    (["train", "--data", "{binary}", "--out", "{new}"], "data file looks binary"),
    (["train", "--data", "{latin1}", "--out", "{new}"],
     "data file is not UTF-8 text: invalid byte 0xe9 at byte offset 3: {latin1}"),
    (["train", "--data", "{nothing}", "--out", "{new}"],
     "--data directory {nothing} holds no files"),
    (["train", "--data", "{many}", "--out", "{new}"], "distinct characters, more than"),
    (["train", "--data", "{data}", "--out", "{broken}"], "{broken}/ckpt.safetensors"),
    (["sample", "--out", "{broken}"], "{broken}/ckpt.safetensors"),
    (["sample", "--checkpoint", "{future}"], "format version 7 is not supported"),
    (["train", "--data", "{data}", "--out", "{new}", "--block-size", "100000"],
     "needs at least block_size + 1 = 100001"),
    (["train", "--data", "{data}", "--out", "{new}", "--n-layer", "0"],
     "--n-layer must be a positive integer, got 0"),
    (["train", "--data", "{data}", "--out", "{new}", "--learning-rate", "5"],
     "--learning-rate must be in [0, 1], got 5.0"),
    (["train", "--data", "{data}", "--out", "{new}", "--dropout", "-0.1"],
     "--dropout must be in [0, 1), got -0.1"),
    (["train", "--data", "{data}", "--out", "{new}", "--tokenizer", "bpe", "--vocab-size",
      "100"], "--vocab-size must be an integer in [256, 65536]"),
    (["sample", "--checkpoint", "{damaged}"], "does not match its digest: its data is damaged"),
    (["train", "--data", "{data}", "--out", "{new}", "--init-from", "{damaged}"],
     "does not match its digest"),
    (["train", "--data", "{data}", "--out", "{out}", "--init-from", "{out}"],
     "--out {out} already holds another run (trained from scratch, 30 iterations); starting "
     "from {out} would replace it: use another --out, or --overwrite to replace it"),
    (["train", "--data", "{data}", "--out", "{out}", "--seed", "5"],
     "was started with --seed 1337, not 5"),
]


def _snapshot(*roots):
    """{path: bytes} of every file under the given directories."""
    files = {}
    for root in roots:
        for directory, _, names in os.walk(root):
            for name in names:
                path = os.path.join(directory, name)
                with open(path, "rb") as f:
                    files[path] = f.read()
    return files


@pytest.mark.parametrize("argv, message", ERROR_CASES, ids=[" ".join(c[0][:3]) + " " + c[1][:30]
                                                           for c in ERROR_CASES])
def test_user_errors_exit_2_with_one_line(argv, message, files, capsys):
    argv = [a.format(**files) for a in argv]
    before = _snapshot(files["root"], files["out"])
    assert main(argv) == 2
    captured = capsys.readouterr()
    line = one_error_line(captured)
    assert message.format(**files) in line
    assert captured.out == ""
    # Nothing new, nothing changed, nothing removed: not even an empty --out.
    assert _snapshot(files["root"], files["out"]) == before
    assert not os.path.exists(files["new"])


@pytest.mark.parametrize("argv, message", [
    (["train", "--preset", "nope"], "argument --preset: invalid choice: 'nope'"),
    (["train", "--n-layer", "two"], "argument --n-layer: invalid int value: 'two'"),
    (["train", "--tokenizer", "wordpiece"],
     "argument --tokenizer: invalid choice: 'wordpiece'"),
    (["sample", "--top-p", "x"], "argument --top-p: invalid float value: 'x'"),
    (["fly"], "argument COMMAND: invalid choice: 'fly'"),
])
def test_usage_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: femtogpt")
    assert message in err
    assert "Traceback" not in err


def test_out_path_that_is_a_file_is_a_user_error(tmp_path, files, capsys):
    """Regression: --out naming an existing file (or a path under a file) raised
    FileExistsError / NotADirectoryError, which run_guarded does not catch: a
    traceback and exit status 1 instead of "femtogpt: error: ..." and status 2."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    for out in (str(not_a_dir), str(not_a_dir / "sub")):
        assert main(["train", "--data", files["data"], "--out", out, "--max-iters", "1",
                     *TINY]) == 2
        line = one_error_line(capsys.readouterr())
        assert out in line


# --------------------------------------------------------------------------- processes


@pytest.mark.parametrize("args, module, status, fragment", [
    (["train", "--data", "{missing}", "--out", "{new}"], "femtogpt.app.cli", 2,
     "femtogpt: error: data file not found: {missing}"),
    (["sample", "--out", "{out}", "--top-p", "0"], "femtogpt.app.cli", 2,
     "femtogpt: error: --top-p must be in (0, 1], got 0.0"),
    (["--out", "{nothing}"], "femtogpt.sample", 2,
     "femtogpt: error: no checkpoint in directory {nothing}"),
])
def test_error_exit_status_in_a_real_process(args, module, status, fragment, files):
    proc = run(*[a.format(**files) for a in args], module=module)
    assert proc.returncode == status
    assert proc.stderr.startswith(fragment.format(**files))
    assert proc.stderr.count("\n") == 1 and proc.stderr.endswith("\n")
    assert proc.stdout == ""


def test_unknown_preset_in_a_real_process():
    proc = run("train", "--preset", "nope")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("femtogpt train: error: argument --preset")


def test_debug_after_the_command_shows_the_traceback(files):
    proc = run("train", "--debug", "--data", files["missing"], "--out", files["new"])
    assert proc.returncode == 1
    assert proc.stderr.startswith("Traceback (most recent call last):")
    assert proc.stderr.splitlines()[-1] == (
        f"femtogpt.errors.DataError: data file not found: {files['missing']}")


def test_debug_in_process_raises(files):
    with pytest.raises(DataError, match="data file not found"):
        main(["train", "--debug", "--data", files["missing"], "--out", files["new"]])


def test_debug_before_the_command_shows_the_traceback(files):
    """Regression: `femtogpt --debug train ...` had no effect: each subparser also
    defined --debug with default False, and argparse copies a subparser's defaults
    over the namespace, so the one-line error was printed instead of the traceback."""
    with pytest.raises(DataError, match="data file not found"):
        main(["--debug", "train", "--data", files["missing"], "--out", files["new"]])


def test_non_finite_loss_exits_3_with_one_line(tmp_path, files, capsys, monkeypatch):
    from femtogpt import train as train_module
    original = train_module.Run.train_step

    def poisoned(self, **kwargs):
        if self.iter == 3:
            self.model.named_views(self.model.params_flat)["transformer.ln_f.weight"][:] = np.nan
        return original(self, **kwargs)

    monkeypatch.setattr(train_module.Run, "train_step", poisoned)
    out = str(tmp_path / "nan")
    assert main(["train", "--data", files["data"], "--out", out, "--max-iters", "10",
                 "--sample-tokens", "0", *TINY]) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.splitlines()[-1]          # after the run's own progress lines
    assert line.startswith("femtogpt: error: loss became nan") and "at iteration 3" in line
    assert "--learning-rate" in line


# --------------------------------------------------------------------------- verify and digests


def _flip_in_tensor(path, name):
    data = bytearray(open(path, "rb").read())
    header_len = int.from_bytes(data[:8], "little")
    entry = json.loads(data[8:8 + header_len])[name]
    data[8 + header_len + entry["data_offsets"][0]] ^= 1
    open(path, "wb").write(bytes(data))


def test_verify_reports_an_intact_run(trained, capsys):
    _, out = trained
    assert main(["verify", out]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("intact") and "best.safetensors" in lines[0]
    assert lines[1].startswith("intact") and "ckpt.safetensors" in lines[1]
    assert "a training state at iteration 30" in lines[1] and "every digest matches" in lines[1]
    # and the run's token cache
    assert lines[2].startswith("intact") and "manifest.json: token cache: 1 source file" in lines[2]


def test_a_damaged_checkpoint_is_refused_by_sample_and_named_by_verify(trained, tmp_path, capsys):
    import shutil
    _, out = trained
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    best = copy / "best.safetensors"
    _flip_in_tensor(best, "transformer.h.0.mlp.c_fc.weight")
    before = best.read_bytes()
    proc = run("sample", "--out", str(copy), "--max-new-tokens", "5", "--seed", "1")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"femtogpt: error: checkpoint tensor 'transformer.h.0.mlp.c_fc.weight' does not match "
        f"its digest: its data is damaged (file corrupt): {best}"]
    capsys.readouterr()
    assert main(["verify", str(copy)]) == 1
    report = capsys.readouterr()
    lines = report.out.splitlines()
    assert lines[0].startswith("DAMAGED") and "mlp.c_fc.weight" in lines[0]
    assert lines[1].startswith("intact")            # ckpt.safetensors is untouched
    assert "1 of 3 file(s) damaged" in report.err    # (the third: the token cache)
    assert best.read_bytes() == before               # verify writes nothing
    # training from the damaged model is refused too, writing nothing
    new = tmp_path / "new"
    assert main(["train", "--init-from", str(copy), "--out", str(new), *TINY]) == 2
    assert not new.exists()


def test_verify_of_a_checkpoint_from_before_digests_and_of_a_hugging_face_folder(tmp_path,
                                                                                 capsys):
    old = tmp_path / "old.safetensors"
    meta = {"model_config": {"vocab_size": 3, "block_size": 2, "n_layer": 1, "n_head": 1,
                             "n_embd": 4, "dropout": 0.0},
            "tokenizer": {"type": "char", "chars": "abc"}}
    model = femtogpt.GPT(femtogpt.GPTConfig(**meta["model_config"]))
    old.write_bytes(safetensors.numpy.save(
        model.state_dict(), metadata={"femtogpt": json.dumps(meta), "format_version": "1"}))
    assert main(["verify", str(old)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("unverified") and "before checkpoints carried digests" in line
    hf = tmp_path / "gpt2"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "gpt2"}')
    (hf / "model.safetensors").write_bytes(safetensors.numpy.save(
        {"wte.weight": np.ones((3, 4), np.float32)}, metadata={"format": "pt"}))
    assert main(["verify", str(hf)]) == 0
    out = capsys.readouterr().out
    assert "Hugging Face files carry no digest" in out and "1 tensors" in out
    (hf / "model.safetensors").write_bytes((hf / "model.safetensors").read_bytes()[:-3])
    assert main(["verify", str(hf)]) == 1
    assert main(["verify", str(tmp_path / "nothing")]) == 2


def test_an_old_checkpoint_samples_with_a_note(tmp_path):
    meta = {"model_config": {"vocab_size": 3, "block_size": 4, "n_layer": 1, "n_head": 1,
                             "n_embd": 4, "dropout": 0.0},
            "tokenizer": {"type": "char", "chars": "abc"}, "kind": "model"}
    model = femtogpt.GPT(femtogpt.GPTConfig(**meta["model_config"]))
    path = tmp_path / "best.safetensors"
    data = safetensors.numpy.save(model.state_dict(), metadata={
        "femtogpt": json.dumps(meta), "format_version": "1"})
    path.write_bytes(data)
    proc = run("sample", "--out", str(tmp_path), "--prompt", "ab", "--max-new-tokens", "3",
               "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ab")
    assert proc.stderr.strip().splitlines() == [
        f"femtogpt: note: {path} was written before femtogpt checkpoints carried digests: "
        f"it loads, but damage to it cannot be detected"]
    assert path.read_bytes() == data
