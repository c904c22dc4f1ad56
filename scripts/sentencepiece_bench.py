"""`femtogpt prepare` with a SentencePiece tokenizer (issue #24): wall time and
peak memory at several corpus sizes, on 2 threads by default.

    python scripts/sentencepiece_bench.py --sizes 100M,1G
    python scripts/sentencepiece_bench.py --sizes 100M --sp-type bpe

The corpus is scripts/corpus_bench.py's (shuffled lines of English, licence
texts and eight other scripts, made deterministically). Each preparation is a
child process (--rebuild, a fresh cache per size) timed whole; its peak RSS
comes from wait4. Target: <= 120 s at 1 GB on 2 threads, memory flat in the
corpus size (the trainer reads a bounded sample; encoding goes block by block).
"""
import argparse
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_common import cpu_name  # noqa: E402
from corpus_bench import make_corpus, parse_size, run  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100M")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=1000)
    parser.add_argument("--sp-type", choices=["unigram", "bpe"], default="unigram")
    parser.add_argument("--work", default="/tmp/femtogpt-corpus-bench")
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.path.join(HERE, "..") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    print(f"CPU: {cpu_name()}, {args.threads} threads; SentencePiece {args.sp_type}, "
          f"vocabulary {args.vocab_size}")
    print("| corpus | prepare | MB/s | peak RSS | tokens per byte |")
    print("|---|---|---|---|---|")
    for size in args.sizes.split(","):
        corpus = os.path.join(args.work, f"corpus-{size}.txt")
        make_corpus(corpus, parse_size(size))
        cache = os.path.join(args.work, f"sp-cache-{size}")
        shutil.rmtree(cache, ignore_errors=True)
        cmd = [sys.executable, "-m", "femtogpt.app.cli", "prepare", "--data", corpus,
               "--tokenizer", "sentencepiece", "--sp-type", args.sp_type, "--vocab-size",
               str(args.vocab_size), "--cache-dir", cache, "--no-progress"]
        wall, rss, err, _ = run(cmd, env=env)
        mb = os.path.getsize(corpus) / 1e6
        tokens = sum(os.path.getsize(os.path.join(dirpath, name))
                     for dirpath, _, names in os.walk(cache) for name in names
                     if name.endswith(".bin")) / 2
        print(f"| {mb:,.0f} MB | {wall:.1f} s | {mb / wall:.1f} | {rss:,.0f} MB | "
              f"{tokens / (mb * 1e6):.3f} |", flush=True)
        for line in err.splitlines():
            if "SentencePiece" in line:
                print(f"  ({line.strip()})")
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
