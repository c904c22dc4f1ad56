"""scripts/bench_llama.py without llama.cpp: the synthetic GPT-2 folder it
benchmarks is a valid model and vocabulary, femtogpt's timing worker counts the
tokens llama-bench counts, and llama-bench's JSON is read as this build prints it.

The folders here have GPT-2's vocabulary (50,257 ids) but a tiny shape, so that
they are written and loaded in a second; the benchmark's 124M shape differs only
in its sizes.
"""
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))

import femtogpt                                        # noqa: E402
import bench_gpt2_folder as folder_mod                 # noqa: E402
import bench_ceiling                                   # noqa: E402
import bench_llama                                     # noqa: E402
from femtogpt.text.gpt2 import bytes_to_unicode        # noqa: E402

SMALL = {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 64, "vocab_size": 50257}
TEXT = ("The quick brown fox jumps over the lazy dog, then it rests.\n"
        "Ünïcödé, emoji \U0001F600, tabs\tand  two spaces. <|endoftext|> after")

# Recorded from the llama.cpp build this benchmark was written against (commit
# c392e5094deaf2d1a7c18683214f007fad3fe42b, a CPU build on an AMD EPYC Zen 4):
#   llama-bench -m gpt2-...-seed0-r1.f32.gguf -p 256 -n 128 -t 1 -r 2 -o json
LLAMA_BENCH_JSON = r"""
[
  {
    "build_commit": "unknown",
    "build_number": 0,
    "cpu_info": "AMD EPYC",
    "gpu_info": "",
    "backends": "CPU",
    "model_filename": "gpt2-L12-H12-C768-T1024-V50257-seed0-r1.f32.gguf",
    "model_type": "gpt2 0.1B all F32",
    "model_size": 652148736,
    "model_n_params": 163037184,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 1,
    "cpu_mask": "0x0",
    "cpu_strict": false,
    "poll": 50,
    "type_k": "f16",
    "type_v": "f16",
    "n_gpu_layers": 99,
    "split_mode": "layer",
    "main_gpu": 0,
    "no_kv_offload": false,
    "flash_attn": false,
    "tensor_split": "0.00",
    "use_mmap": true,
    "embeddings": false,
    "n_prompt": 256,
    "n_gen": 0,
    "test_time": "2026-12-06T22:00:46Z",
    "avg_ns": 832519228,
    "stddev_ns": 9910049,
    "avg_ts": 307.522192,
    "stddev_ts": 3.660617,
    "samples_ns": [ 825511825, 839526632 ],
    "samples_ts": [ 310.111, 304.934 ]
  },
  {
    "build_commit": "unknown",
    "build_number": 0,
    "cpu_info": "AMD EPYC",
    "gpu_info": "",
    "backends": "CPU",
    "model_filename": "gpt2-L12-H12-C768-T1024-V50257-seed0-r1.f32.gguf",
    "model_type": "gpt2 0.1B all F32",
    "model_size": 652148736,
    "model_n_params": 163037184,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 1,
    "cpu_mask": "0x0",
    "cpu_strict": false,
    "poll": 50,
    "type_k": "f16",
    "type_v": "f16",
    "n_gpu_layers": 99,
    "split_mode": "layer",
    "main_gpu": 0,
    "no_kv_offload": false,
    "flash_attn": false,
    "tensor_split": "0.00",
    "use_mmap": true,
    "embeddings": false,
    "n_prompt": 0,
    "n_gen": 128,
    "test_time": "2026-12-06T22:00:48Z",
    "avg_ns": 3427368861,
    "stddev_ns": 109143840,
    "avg_ts": 37.365378,
    "stddev_ts": 1.189892,
    "samples_ns": [ 3504545189, 3350192534 ],
    "samples_ts": [ 36.524, 38.2068 ]
  }
]
"""


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    return folder_mod.make_hf_folder(tmp_path_factory.mktemp("bench-llama"), SMALL, seed=0,
                                     log=lambda message: None)


def test_synthetic_vocabulary_has_gpt2s_50257_ids_bytes_first_and_endoftext_last():
    vocab, merges = folder_mod.synthetic_vocab()
    assert sorted(vocab.values()) == list(range(50257))
    assert len(vocab) == 50257 and len(merges) == 50000
    # GPT-2's 256 byte symbols, as femtogpt's reader maps them, are ids 0..255.
    assert sorted(vocab[ch] for ch in bytes_to_unicode()) == list(range(256))
    assert set(folder_mod.bytes_to_unicode().values()) == set(bytes_to_unicode())
    assert vocab["<|endoftext|>"] == 50256
    # Each merge joins two earlier tokens into a new one, with the next id.
    for r, (a, b) in enumerate(merges):
        assert vocab[a] < 256 + r and vocab[b] < 256 + r
        assert vocab[a + b] == 256 + r
    assert folder_mod.synthetic_vocab() == (vocab, merges)          # deterministic


def test_folder_loads_and_its_tokenizer_round_trips_text_with_merges(small_folder):
    model, tok = femtogpt.load(small_folder)
    c = model.config
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size, c.gelu) == \
        (2, 2, 64, 64, 50257, "tanh")
    assert tok.kind == "gpt2" and tok.vocab_size == 50257
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert tok.encode("<|endoftext|>") == [50256]
    assert len(ids) < 0.7 * len(TEXT.encode("utf-8"))               # merges applied
    views = model.state_views()
    wte = views["transformer.wte.weight"]
    assert abs(float(wte.std()) - 0.02) < 0.001 and abs(float(wte.mean())) < 0.001
    assert np.all(views["transformer.h.0.ln_1.weight"] == 1.0)
    assert np.all(views["transformer.h.1.mlp.c_fc.bias"] == 0.0)


def test_the_folder_is_rewritten_only_when_missing(small_folder):
    stamp = os.stat(os.path.join(small_folder, "model.safetensors")).st_mtime_ns
    again = folder_mod.make_hf_folder(os.path.dirname(small_folder), SMALL, seed=0,
                                      log=lambda message: pytest.fail(message))
    assert again == small_folder
    assert os.stat(os.path.join(small_folder, "model.safetensors")).st_mtime_ns == stamp


def test_the_synthetic_vocabulary_exports_to_gguf(small_folder, tmp_path):
    gguf = pytest.importorskip("gguf")
    from femtogpt.files.gguf_file import export_gguf
    model, tok = femtogpt.load(small_folder)
    path = str(tmp_path / "m.gguf")
    assert export_gguf(model, tok, path, "q8_0") == []
    reader = gguf.GGUFReader(path)
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == 50257
    assert len(reader.fields["tokenizer.ggml.merges"].data) == 50000


def test_femtogpt_worker_counts_llama_benchs_tokens(small_folder):
    spec = {"folder": small_folder, "dtype": "fp32", "threads": femtogpt.get_num_threads(),
            "prompt": 16, "decode": 5, "reps": 2}
    out = bench_llama.worker_llama_femtogpt(spec)
    assert out["timing"] in ("callback", "last_generate_stats")
    assert [s["prompt_tokens"] for s in out["pp_stats"]] == [16, 16]
    # tg: `decode` single-token decodes after the 1-token prompt's pass; the
    # stats count the sampled tokens, the callback timing the decodes.
    sampled = 6 if out["timing"] == "last_generate_stats" else 5
    assert [s["decode_tokens"] for s in out["tg_stats"]] == [sampled, sampled]
    assert out["tg_ts"] == [5 / s["decode_seconds"] for s in out["tg_stats"]]
    assert all(x > 0 for x in out["pp_ts"] + out["tg_ts"])
    assert out["peak_rss_mb"] > 0 and out["weights_bytes"] > 4 * 50257 * 64


class StatsModel:
    """What femtogpt.load(folder, dtype=...) is to return once it has dtypes:
    a model whose generate() leaves last_generate_stats behind."""

    class config:
        vocab_size = 50257

    def generate(self, idx, max_new_tokens, temperature=1.0, seed=None, callback=None):
        assert callback is None          # with stats, nothing is timed around generate
        # As femtogpt's: decode_tokens counts the sampled tokens, one more than
        # the single-token decodes that decode_seconds timed (with their sampling).
        self.last_generate_stats = {"prompt_tokens": idx.shape[1], "prompt_seconds": 0.5,
                                    "decode_tokens": max_new_tokens,
                                    "decode_seconds": 0.1 * (max_new_tokens - 1) or 1.0}

    def eval(self):
        pass

    weights_bytes = 123


def test_femtogpt_worker_uses_the_dtype_and_stats_when_femtogpt_has_them(monkeypatch):
    loaded = []
    monkeypatch.setattr(femtogpt, "load",
                        lambda folder, dtype: loaded.append(dtype) or (StatsModel(), None))
    spec = {"folder": "x", "dtype": "int8", "threads": femtogpt.get_num_threads(),
            "prompt": 256, "decode": 4, "reps": 1}
    out = bench_llama.worker_llama_femtogpt(spec)
    assert loaded == ["int8"] and out["timing"] == "last_generate_stats"
    assert out["pp_ts"] == [512.0] and out["tg_ts"] == pytest.approx([10.0])
    assert (out["weights_bytes"], out["weights_bytes_from"]) == (123, "model.weights_bytes")


def test_femtogpt_worker_without_dtypes_runs_fp32_only(monkeypatch):
    def old_load(folder):
        raise AssertionError("not reached")
    monkeypatch.setattr(femtogpt, "load", old_load)
    spec = {"folder": "x", "dtype": "bf16", "threads": femtogpt.get_num_threads(),
            "prompt": 4, "decode": 2, "reps": 1}
    assert "dtype" in bench_llama.worker_llama_femtogpt(spec)["unsupported"]


def test_llama_bench_json_is_read_as_this_build_prints_it():
    got = bench_llama.parse_llama_bench(LLAMA_BENCH_JSON)
    assert got["pp"] == {"n": 256, "threads": 1, "avg_ts": 307.522192,
                         "stddev_ts": 3.660617, "samples_ts": [310.111, 304.934]}
    assert got["tg"]["n"] == 128 and got["tg"]["samples_ts"] == [36.524, 38.2068]
    assert got["model"]["model_type"] == "gpt2 0.1B all F32"
    assert got["model"]["model_size"] == 652148736


def test_llama_bench_json_without_samples_or_with_other_tests():
    rows = json.loads(LLAMA_BENCH_JSON)
    rows[1].pop("samples_ts")
    pg = dict(rows[0], n_prompt=256, n_gen=128)            # -pg 256,128: not pp nor tg
    deep = dict(rows[0], n_depth=512)                      # -d 512: not from an empty cache
    got = bench_llama.parse_llama_bench(json.dumps([deep, rows[0], pg, rows[1]]))
    assert got["pp"]["samples_ts"] == [310.111, 304.934]
    assert got["tg"]["samples_ts"] == [rows[1]["avg_ts"]]
    with pytest.raises(ValueError):
        bench_llama.parse_llama_bench("[]")


def test_llama_commit_and_a_missing_llama_bench(tmp_path):
    bin_dir = tmp_path / "llama" / "build" / "bin"
    bin_dir.mkdir(parents=True)
    (tmp_path / "llama" / "COMMIT").write_text("c392e5094deaf2d1a7c18683214f007fad3fe42b\n")
    with pytest.raises(SystemExit, match="cmake --build build --target llama-bench"):
        bench_llama.find_llama_bench(str(bin_dir))
    exe = bin_dir / "llama-bench"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    bench = bench_llama.find_llama_bench(str(tmp_path / "llama"))      # a checkout: build/bin
    assert bench == str(exe)
    commit, where = bench_llama.llama_commit(bench)
    assert commit == "c392e5094deaf2d1a7c18683214f007fad3fe42b" and where.endswith("COMMIT")
    assert bench_llama.llama_commit(bench, "abc")[0] == "abc"


def test_report_marks_callback_timing_and_missing_dtypes():
    args = bench_llama.parse_args(["--vs-llama-cpp", "x", "--types", "f32,q8_0",
                                   "--threads", "1,2", "--quick"])
    llama = dict(bench_llama.parse_llama_bench(LLAMA_BENCH_JSON), peak_rss_mb=700.0)
    fem = {"pp_ts": [600.0, 620.0], "tg_ts": [50.0, 52.0], "timing": "callback",
           "peak_rss_mb": 580.0, "weights_bytes": 498_000_000}
    runs = {"f32/t1": {"femtogpt": [fem], "llama.cpp": [llama]},
            "f32/t2": {"femtogpt": [{"error": "exit 1"}], "llama.cpp": [{"error": "exit 1"}]},
            "q8_0/t1": {"femtogpt": [{"unsupported": "no dtype="}], "llama.cpp": [llama]},
            # asked once: the later runs of a dtype femtogpt lacks are skipped
            "q8_0/t2": {"femtogpt": [], "llama.cpp": [llama]}}
    rows = bench_llama.summarise(runs, args)
    assert [(r["type"], r["threads"], r["test"]) for r in rows] == [
        (t, th, test) for t in ("f32", "q8_0") for th in (1, 2) for test in ("pp256", "tg32")]
    assert rows[0]["ratio"] == pytest.approx(610.0 / 307.5225) and rows[0]["meets_goal"]
    assert rows[2]["femtogpt"] is None and rows[2]["ratio"] is None      # failed runs
    assert rows[2]["femtogpt_unsupported"] is None
    assert [r["femtogpt_unsupported"] for r in rows[4:]] == ["no dtype="] * 4
    assert all(r["ratio"] is None and r["meets_goal"] is None for r in rows[4:])
    res = {"machine": {"cpu_model": "AMD EPYC", "nproc": 2, "platform": "Linux",
                       "python": "3", "numpy": "2", "loadavg_start": (1.0,),
                       "loadavg_end": (1.0,)},
           "llama_cpp": {"commit": "c392e50", "commit_from": "COMMIT"}, "rows": rows,
           "femtogpt": {"version": "0.1.0", "commit": "fa7bd96", "path": "femtogpt"},
           "rounds": 1, "reps": 2, "decode": 32, "date": "2026-12-06", "command": "bench.py"}
    table = bench_llama.build_table(res)
    assert rows[0]["round_ratios"] == pytest.approx([610.0 / 307.5225])
    assert ("| fp32 ↔ f32 | 1 | pp256 | 610.0 (600.0–620.0) † | 307.5 (304.9–310.1) | 1.98× | "
            "1.98× (1.98) |") in table
    assert "| int8 ↔ q8_0 | 2 | tg32 | not in this femtogpt |" in table
    assert "| fp32 ↔ f32 | 2 | pp256 | — | — | — | — |" in table
    assert "commit c392e50" in table and "AMD EPYC" in table


def test_the_ceiling_is_read_bandwidth_over_the_bytes_a_step_reads():
    # GPT-2 124M: 12 C^2 per block x 12 blocks + the 50,257 x 768 lm_head =
    # 123,532,032 weights; 4 bytes at f32, 2 at bf16, 34/32 at q8_0
    shape = folder_mod.GPT2_124M
    assert bench_ceiling.streamed_bytes(shape, "f32") == 4 * 123_532_032
    assert bench_ceiling.streamed_bytes(shape, "bf16") == 2 * 123_532_032
    assert bench_ceiling.streamed_bytes(shape, "q8_0") == pytest.approx(123_532_032 * 34 / 32)
    tg = lambda t, th, f, ll: {"type": t, "femtogpt_dtype": bench_llama.TYPES[t],  # noqa: E731
                               "threads": th, "test": "tg128", "femtogpt": {"median": f},
                               "llama_cpp": {"median": ll}}
    res = {"shape": shape, "rows": [
        {"test": "pp256", "type": "q8_0", "threads": 1}, tg("q8_0", 1, 150.0, 120.0),
        tg("bf16", 2, 110.0, None)],
        "bandwidth": {"1": [{"gb_s": 26.0}, {"gb_s": 30.0}, {"gb_s": 28.0}],
                      "2": [{"error": "memory bandwidth not measured: no C compiler"}]}}
    rows = bench_ceiling.ceiling_rows(res)
    assert [(r["type"], r["threads"]) for r in rows] == [("q8_0", 1), ("bf16", 2)]
    q8 = rows[0]
    nbytes = 123_532_032 * 34 / 32
    assert q8["read_gb_s"] == 28.0                       # the rounds' median
    assert q8["ceiling_ts"] == pytest.approx(28e9 / nbytes)
    assert q8["femtogpt_gb_s"] == pytest.approx(150 * nbytes / 1e9)
    assert q8["femtogpt_of_ceiling"] == pytest.approx(150 / (28e9 / nbytes))
    assert q8["most_ratio"] == pytest.approx(28e9 / nbytes / 120)
    assert rows[1]["ceiling_ts"] is None and rows[1]["most_ratio"] is None
    res["ceiling"] = rows
    table = bench_ceiling.ceiling_table(res)
    assert (f"| int8 ↔ q8_0 | 1 | 131 | 28.0 | {28e9 / nbytes:,.1f} | "
            f"{150 * nbytes / 1e9:,.1f}, {100 * 150 / (28e9 / nbytes):.0f}% |") in "\n".join(table)
    assert "| bf16 ↔ bf16 | 2 | 247 | — | — |" in "\n".join(table)
    assert table[-1] == "memory bandwidth not measured: no C compiler"
    assert bench_ceiling.ceiling_table({"rows": []}) == []


def test_the_memory_reader_sums_what_it_reads(tmp_path):
    # the C reader must read every element (else its GB/s would be a fiction):
    # its sum of a buffer of ones is the element count it claims to have read
    import ctypes
    memory_bandwidth = pytest.importorskip("memory_bandwidth")
    try:
        reader = memory_bandwidth.Reader()
    except (RuntimeError, OSError) as err:
        pytest.skip(f"no C compiler: {err}")
    for threads in (1, 2, 3):
        n = 64 * threads * 1000
        buf = np.zeros(n, np.float32)
        ptr = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        reader.so.touch_all(ptr, n, threads)
        assert (buf == 1).all()
        assert reader.so.read_all(ptr, n, threads) == n
    r = memory_bandwidth.read_bandwidth(2, mib=8, reps=3, reader=reader)
    assert r["threads"] == 2 and r["min"] <= r["gb_s"] <= r["max"] and r["gb_s"] > 0
