"""Corpora bigger than memory (issue #12): how long a first start, a start from
the token cache and a preparation take, and how much memory they need, at
100 MB, 1 GB (and 10 GB where the disk allows).

    python scripts/corpus_bench.py --sizes 100M,1G --tokenizers char,bpe
    python scripts/corpus_bench.py --sample-study      # how large BPE's sample must be

The corpus is made here, deterministically: shuffled lines of English (Tiny
Shakespeare), of the licence texts in /usr/share/common-licenses (code-like
prose) and of several scripts (accents, Greek, Cyrillic, CJK, Arabic, emoji),
as in the issue's measurements. Each command runs as a child process; its
wall time and peak RSS (from wait4) are reported, with the targets:
first start <= 30 s (char) and <= 120 s (bpe) at 1 GB, a start from the
cache <= 2 s, peak RSS independent of the corpus size.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SHAKESPEARE = os.path.join(HERE, "..", "femtogpt", "data", "tinyshakespeare.txt")
SCRIPTS = [
    "Ελληνικά: η γρήγορη καφέ αλεπού πηδά πάνω από τον τεμπέλη σκύλο.",
    "Русский: съешь же ещё этих мягких французских булок, да выпей чаю.",
    "日本語: いろはにほへと ちりぬるを わかよたれそ つねならむ。",
    "中文: 我能吞下玻璃而不伤身体。天地玄黄，宇宙洪荒。",
    "العربية: نص حكيم له سر قاطع وذو شأن عظيم مكتوب على ثوب أخضر.",
    "Français: voix ambiguë d'un cœur qui au zéphyr préfère les jattes de kiwis.",
    "emoji 😀🎉🚀 ✨ and symbols ½ ² № ∞ → ✓",
    "Deutsch: Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.",
]


def parse_size(text):
    units = {"K": 1e3, "M": 1e6, "G": 1e9}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units \
        else int(text)


def make_corpus(path, size, seed=0):
    """size bytes (rounded to whole lines) of shuffled lines, written once."""
    if os.path.exists(path) and os.path.getsize(path) >= size * 0.99:
        return
    lines = open(SHAKESPEARE, encoding="utf-8").read().splitlines()
    for lic in sorted(glob.glob("/usr/share/common-licenses/*")):
        if os.path.isfile(lic):
            lines += open(lic, encoding="utf-8", errors="ignore").read().splitlines()
    lines += SCRIPTS * 500
    # Vary the lines a little, so that the corpus is not a few thousand lines
    # repeated: numbers and words picked at random.
    rng = np.random.default_rng(seed)
    pool = np.array([line + "\n" for line in lines if line.strip()], dtype=object)
    tmp = path + ".tmp"
    written = 0
    with open(tmp, "w", encoding="utf-8") as f:
        while written < size:
            picks = pool[rng.integers(0, len(pool), 20000)]
            numbers = rng.integers(0, 100000, len(picks))
            chunk = "".join(f"{line[:-1]} {n}\n" if n % 7 == 0 else line
                            for line, n in zip(picks, numbers))
            f.write(chunk)
            written += len(chunk.encode("utf-8"))
    os.replace(tmp, path)


def run(cmd, env=None):
    """(wall seconds, peak RSS MB, stderr, seconds until training began) of a
    child process. Training begins when `femtogpt train` prints its "data:"
    line: the model is built and the data is open, the first step is next."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                            text=True)
    lines, ready = [], None
    for line in proc.stderr:
        lines.append(line)
        if ready is None and line.startswith("data: ") and " train / " in line:
            ready = time.perf_counter() - t0
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = "".join(lines)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err}")
    return wall, usage.ru_maxrss / 1024, err, ready


def train_cmd(data, out, tokenizer, iters):
    return [sys.executable, "-m", "femtogpt.app.cli", "train", "--data", data, "--out", out,
            "--tokenizer", tokenizer, "--max-iters", str(iters), "--no-progress",
            "--sample-tokens", "0"]


def bench(args):
    rows = []
    threads = os.cpu_count()
    for size_text in args.sizes.split(","):
        size = parse_size(size_text)
        corpus = os.path.join(args.work, f"corpus-{size_text}.txt")
        make_corpus(corpus, size)
        for tokenizer in args.tokenizers.split(","):
            out = os.path.join(args.work, f"run-{size_text}-{tokenizer}")
            subprocess.run(["rm", "-rf", out], check=True)
            first, first_rss, err, first_ready = run(train_cmd(corpus, out, tokenizer, 1))
            cached, cached_rss, err2, cached_ready = run(train_cmd(corpus, out, tokenizer, 2))
            assert "tokenizing" in err and "tokenizing" not in err2, err2
            # The token cache alone: prepare it again from scratch.
            prep = prep_rss = float("nan")
            if not args.no_prepare:
                subprocess.run(["rm", "-rf", os.path.join(out, "cache")], check=True)
                prep, prep_rss, _, _ = run([sys.executable, "-m", "femtogpt.app.cli", "prepare",
                                            "--data", corpus, "--out", out, "--tokenizer",
                                            tokenizer, "--no-progress"])
            cache_mb = sum(os.path.getsize(p) for p in glob.glob(
                os.path.join(out, "cache", "*", "*.bin"))) / 1e6
            row = dict(size=size_text, tokenizer=tokenizer, first_s=first, first_rss=first_rss,
                       first_ready_s=first_ready, cached_ready_s=cached_ready,
                       cached_s=cached, cached_rss=cached_rss, prepare_s=prep,
                       prepare_rss=prep_rss, cache_mb=cache_mb,
                       mb_per_s=os.path.getsize(corpus) / 1e6 / prep)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if not args.keep:
                subprocess.run(["rm", "-rf", out], check=True)
    print(f"\n{threads} threads. Each figure is one run (a first start cannot be repeated "
          f"without redoing it).\n")
    print("Start: from the command to training's first step (the 'data:' line); whole: "
          "the command `femtogpt train --max-iters 1` (then 2, resuming), evaluations, "
          "checkpoint and loss.png included.\n")
    print("| text | tokenizer | first start (whole) | start from the cache (whole) | "
          "prepare alone | peak RSS: first start / cache start / prepare | token cache |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['tokenizer']} | {r['first_ready_s']:.1f} s "
              f"({r['first_s']:.1f} s) | {r['cached_ready_s']:.1f} s ({r['cached_s']:.1f} s) "
              f"| {r['prepare_s']:.1f} s ({r['mb_per_s']:.0f} MB/s) | {r['first_rss']:,.0f} / "
              f"{r['cached_rss']:,.0f} / {r['prepare_rss']:,.0f} MB | {r['cache_mb']:,.0f} MB |")


def sample_study(args):
    """Merges learned from samples of several sizes, compared on held-out text
    (bytes per token: higher is better compression) and by the time to learn."""
    sys.path.insert(0, os.path.join(HERE, ".."))
    from femtogpt.text import corpus as corpus_module
    from femtogpt.text import token_cache
    from femtogpt.text import BPETokenizer
    corpus = os.path.join(args.work, "corpus-1G.txt")
    make_corpus(corpus, parse_size("1G"))
    held_out = open(corpus, "rb")
    held_out.seek(-8_000_000, os.SEEK_END)
    held = held_out.read().decode("utf-8", errors="ignore")
    sources = corpus_module.list_sources(corpus)
    blocks, chars = [], 0
    for block in corpus_module.read_blocks(sources):
        blocks.append((chars, len(block.text), block.source, block.offset, len(block.data)))
        chars += len(block.text)
    train_chars = int(chars * 0.9)
    print("| sample | learn time | held-out bytes per token |")
    print("|---|---|---|")
    for mb in (4, 8, 16, 32, 64):
        token_cache.BPE_SAMPLE_BYTES = mb << 20
        sample = token_cache._bpe_sample(sources, blocks, train_chars)
        t = time.perf_counter()
        tok = BPETokenizer.train(sample, args.vocab_size)
        learn = time.perf_counter() - t
        ratio = len(held.encode("utf-8")) / len(tok.encode_utf8(held.encode("utf-8")))
        print(f"| {mb} MB | {learn:.1f} s | {ratio:.4f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100M,1G")
    parser.add_argument("--tokenizers", default="char,bpe")
    parser.add_argument("--work", default="/tmp/femtogpt-corpus-bench")
    parser.add_argument("--keep", action="store_true", help="keep the run folders")
    parser.add_argument("--no-prepare", action="store_true",
                        help="skip `femtogpt prepare` alone (at 10 GB, to save the time)")
    parser.add_argument("--sample-study", action="store_true")
    parser.add_argument("--vocab-size", type=int, default=512)
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    if args.sample_study:
        sample_study(args)
    else:
        bench(args)


if __name__ == "__main__":
    main()
