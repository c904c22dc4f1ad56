"""`femtogpt serve` without a browser: the HTTP API, its streams and its
checks, and the model probes it shows (against the float64 reference)."""
import http.client
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import femtogpt
import reference as ref
from femtogpt.files import load
from femtogpt.app.probe import analyze, attention
from femtogpt.app.serve import make_server
from femtogpt.train import TrainConfig, train

TEXT = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind "
        "to suffer\nThe slings and arrows of outrageous fortune,\n") * 20
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(femtogpt.__file__)))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    data = root / "data.txt"
    data.write_text(TEXT, encoding="utf-8")
    cfg = TrainConfig(data=str(data), out=str(root / "run"), n_layer=2, n_head=2, n_embd=16,
                      block_size=32, batch_size=4, max_iters=20, eval_interval=10, eval_iters=2,
                      save_interval=10, warmup_iters=2, threads=1, sample_tokens=0, seed=3)
    with open(os.devnull, "w") as sink:
        train(cfg, progress=False, stream=sink)
    return str(root / "run")


@pytest.fixture()
def server(run_dir):
    srv = make_server([run_dir], port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def request(srv, method, path, body=None, raw=None):
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=30)
    data = raw if raw is not None else (None if body is None else json.dumps(body))
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, payload


def events(payload):
    out = []
    for block in payload.decode("utf-8").split("\n\n"):
        name = data = None
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
        if name:
            out.append((name, data))
    return out


def cli_sample(run_dir, *args):
    proc = subprocess.run([sys.executable, "-m", "femtogpt.app.cli", "sample", "--out", run_dir,
                           *args], capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE_PARENT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_runs_are_listed_with_what_the_page_shows(server, run_dir):
    status, payload = request(server, "GET", "/api/runs")
    assert status == 200
    [info] = json.loads(payload)
    assert info["name"] == "run" and "path" not in info and info["tokenizer"] == "char"
    assert os.path.dirname(os.path.abspath(run_dir)) not in payload.decode()
    assert info["model"]["n_layer"] == 2 and info["config"]["max_iters"] == 20
    assert info["config"]["dtype"] == "fp32"            # the page shows it beside the size
    assert info["iter"] == 20 and info["evaluations"] == 3
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert info["best_val_loss"] == min(r["val_loss"] for r in rows)
    status, payload = request(server, "GET", "/api/runs/0/metrics")
    assert json.loads(payload) == rows
    status, page = request(server, "GET", "/")
    assert status == 200 and b"<canvas" in page and b"http" not in page.split(b"<body>")[1]


def test_a_sample_streams_the_text_femtogpt_sample_prints(server, run_dir):
    settings = {"prompt": "To be", "temperature": 0.9, "top_k": 20, "max_new_tokens": 60,
                "seed": 11}
    status, payload = request(server, "POST", "/api/runs/0/sample", settings)
    assert status == 200
    got = events(payload)
    assert got[0] == ("prompt", {"text": "To be"})
    tokens = [d["text"] for name, d in got if name == "token"]
    assert len(tokens) >= 50 and got[-1][0] == "done" and got[-1][1]["seed"] == 11
    assert got[-1][1]["text"] == "".join(tokens)
    printed = cli_sample(run_dir, "--prompt", "To be", "--temperature", "0.9", "--top-k", "20",
                         "--max-new-tokens", "60", "--seed", "11")
    assert printed == "To be" + got[-1][1]["text"] + "\n"
    # Another seed, another text; the same seed again, the same text.
    again = events(request(server, "POST", "/api/runs/0/sample", settings)[1])[-1][1]["text"]
    other = events(request(server, "POST", "/api/runs/0/sample",
                           dict(settings, seed=12))[1])[-1][1]["text"]
    assert again == got[-1][1]["text"] != other


@pytest.mark.parametrize("body, status, message", [
    ({"prompt": "x", "temperature": -1}, 400, "temperature must be in [0.0, 100.0]"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature must be a number"),
    ({"prompt": "x", "top_k": 0}, 400, "top_k must be in [1,"),
    ({"prompt": "x", "top_k": 2.5}, 400, "top_k must be an integer"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p must be in (0.0, 1.0]"),
    ({"prompt": "x", "max_new_tokens": 100000}, 400, "max_new_tokens must be in [1, 2000]"),
    ({"prompt": "x", "seed": -3}, 400, "seed must be in [0,"),
    ({"prompt": 7}, 400, "prompt must be text"),
    ({"prompt": "x" * 20001}, 400, "the prompt is 20,001 characters"),
    ({"prompt": "Zebra 😀"}, 422, "prompt has characters the tokenizer does not know: 'Z'"),
    ({"prompt": "x", "top_p": 1e-300}, 400, "top_p must be at least"),
])
def test_bad_sampling_input_is_a_4xx_with_its_message(server, body, status, message):
    got, payload = request(server, "POST", "/api/runs/0/sample", body)
    assert got == status
    assert message in json.loads(payload)["error"]
    assert request(server, "GET", "/api/runs")[0] == 200        # still serving


@pytest.mark.parametrize("method, path, raw, status, message", [
    ("POST", "/api/runs/0/sample", b"{not json", 400, "not JSON"),
    ("POST", "/api/runs/0/sample", b"[1, 2]", 400, "must be a JSON object"),
    ("POST", "/api/runs/9/sample", b"{}", 400, "no run '9'"),
    ("POST", "/api/runs/x/analyze", b"{}", 400, "no run 'x'"),
    ("POST", "/api/runs/-1/analyze", b"{}", 400, "no run '-1'"),
    ("GET", "/api/nothing", None, 404, "no such address"),
    ("GET", "/etc/passwd", None, 404, "no such page"),
    ("POST", "/api/runs/0/analyze", b'{"text": ""}', 422, "the text is empty"),
    ("POST", "/api/runs/0/analyze", json.dumps({"text": "to " * 40}).encode(), 422,
     "this model reads at most 32"),
    ("POST", "/api/runs/0/attention", b'{"text": "to be", "layer": 2}', 400,
     "layer must be in [0, 1]"),
])
def test_bad_requests_are_refused_by_name(server, method, path, raw, status, message):
    got, payload = request(server, method, path, raw=raw)
    assert got == status
    assert message in json.loads(payload)["error"]


def test_an_oversized_body_is_refused_without_reading_it(server):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    conn.putrequest("POST", "/api/runs/0/analyze")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(50 << 20))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and b"the limit is 1,048,576 bytes" in response.read()
    conn.close()


def test_probabilities_losses_and_attention_match_the_reference(server, run_dir):
    model, tokenizer = load(run_dir)
    text = "To be, or not to be"
    status, payload = request(server, "POST", "/api/runs/0/analyze", {"text": text})
    assert status == 200
    got = json.loads(payload)
    assert got == json.loads(json.dumps(analyze(model, tokenizer, text)))
    ids = tokenizer.encode(text)
    params = model.state_dict()
    logits, _, cache = ref.gpt_forward(params, np.array([ids]), n_head=model.config.n_head,
                                       gelu=model.config.gelu)
    z = logits[0] - logits[0].max(axis=1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    for t, token in enumerate(got["tokens"]):
        assert token["id"] == ids[t] and token["text"] == text[t]
        order = np.argsort(-probs[t], kind="stable")[:10]
        assert [n["id"] for n in token["next"]] == order.tolist() or np.allclose(
            sorted(n["p"] for n in token["next"]), sorted(probs[t][order]), atol=1e-5)
        np.testing.assert_allclose([n["p"] for n in token["next"]], probs[t][[
            n["id"] for n in token["next"]]], rtol=1e-4, atol=1e-6)
        if t:
            assert token["loss"] == pytest.approx(-math.log(probs[t - 1, ids[t]]), rel=1e-4)
    # The mean of the per-token losses is the model's own loss on the same pairs.
    mean = model.loss(np.array([ids[:-1]]), np.array([ids[1:]]))
    assert got["mean_loss"] == pytest.approx(mean, rel=1e-5)
    assert got["bits_per_char"] == pytest.approx(mean * (len(ids) - 1) / math.log(2)
                                                 / (len(text) - 1), rel=1e-5)
    for layer in range(2):
        for head in range(2):
            status, payload = request(server, "POST", "/api/runs/0/attention",
                                      {"text": text, "layer": layer, "head": head})
            matrix = json.loads(payload)["matrix"]
            want = cache["layers"][layer]["att"][0, head]
            for i, row in enumerate(matrix):
                assert len(row) == i + 1 and sum(row) == pytest.approx(1.0, abs=1e-4)
                np.testing.assert_allclose(row, want[i, :i + 1], atol=2e-5)
    assert attention(model, tokenizer, text, 1, 1)["tokens"] == list(text)


def test_the_live_stream_sends_new_metrics_rows_and_a_sample(server, run_dir, tmp_path):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    conn.request("GET", "/api/live")
    response = conn.getresponse()
    assert response.status == 200
    # First, a sample from each run's model as it is now.
    buffer = b""
    while b"event: sample" not in buffer:
        buffer += response.read1(65536)
    [(name, first)] = events(buffer)
    assert name == "sample" and first["run"] == 0 and first["iter"] == 20
    time.sleep(0.3)
    row = {"iter": 30, "train_loss": 1.5, "val_loss": 1.6, "val_bpc": 2.3, "lr": 1e-3,
           "tokens_per_s": 1000.0, "elapsed_s": 3.0}
    metrics = os.path.join(run_dir, "metrics.jsonl")
    saved = open(metrics).read()
    try:
        with open(metrics, "a") as f:
            f.write(json.dumps(row) + "\n" + '{"iter": 40, "train_lo')   # a line half-written
        buffer = b""
        deadline = time.time() + 20
        while b"event: sample" not in buffer and time.time() < deadline:
            buffer += response.read1(65536)
        got = events(buffer.rsplit(b"\n\n", 1)[0] + b"\n\n")
    finally:
        conn.close()
        with open(metrics, "w") as f:
            f.write(saved)
    names = [n for n, _ in got]
    assert names == ["metrics", "info", "sample"], names
    assert got[0][1] == {"run": 0, "rows": [row]}           # the half line waits
    assert got[1][1]["iter"] == 30
    model, tokenizer = load(run_dir)
    assert got[2][1]["text"].startswith("\n") and len(got[2][1]["text"]) > 100


def test_several_streams_at_once_and_a_client_that_leaves(server):
    results = {}

    def one(seed):
        results[seed] = request(server, "POST", "/api/runs/0/sample",
                                {"prompt": "To", "max_new_tokens": 300, "seed": seed})

    threads = [threading.Thread(target=one, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    # A client that asks for a long sample and goes away after the first bytes.
    body = json.dumps({"prompt": "To", "max_new_tokens": 2000, "seed": 5}).encode()
    sock = socket.create_connection(server.server_address[:2], timeout=30)
    sock.sendall(b"POST /api/runs/0/sample HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert b"event: prompt" in sock.recv(4096) + sock.recv(4096)
    sock.close()
    for t in threads:
        t.join(60)
    assert all(events(results[s][1])[-1][0] == "done" for s in range(3))
    # The server's threads for those requests end: none is left generating.
    def serving():
        return [t for t in threading.enumerate() if "femtogpt serve handler" in t.name]
    deadline = time.time() + 20
    while time.time() < deadline and serving():
        time.sleep(0.1)
    assert not serving()


def test_a_rewritten_checkpoint_is_read_again(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    srv = make_server([str(copy)], port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        body = {"prompt": "To", "max_new_tokens": 40, "seed": 1}
        before = events(request(srv, "POST", "/api/runs/0/sample", body)[1])[-1][1]["text"]
        # A trainer saving a new best model: a whole new file, renamed into place.
        model, tokenizer = load(str(copy))
        params = model.state_dict()
        params["transformer.wte.weight"] = params["transformer.wte.weight"][::-1].copy()
        model.load_state_dict(params)
        from femtogpt.files.checkpoint import model_meta, save_checkpoint
        from femtogpt.files import BEST_NAME
        meta = model_meta(model, tokenizer)
        meta.update({"kind": "model", "iter": 99, "val_loss": 0.5})
        save_checkpoint(str(copy / BEST_NAME), model.state_views(), meta)
        after = events(request(srv, "POST", "/api/runs/0/sample", body)[1])[-1][1]["text"]
        assert after != before
        assert "To" + after + "\n" == cli_sample(str(copy), "--prompt", "To",
                                                 "--max-new-tokens", "40", "--seed", "1")
    finally:
        srv.shutdown()
        srv.server_close()


def test_serve_refuses_what_it_cannot_serve_and_warns_when_exposed(tmp_path, run_dir):
    from femtogpt.app.cli import main
    assert main(["serve", "--out", str(tmp_path / "nothing")]) == 2
    proc = subprocess.Popen([sys.executable, "-m", "femtogpt.app.cli", "serve", "--out", run_dir,
                             "--host", "0.0.0.0", "--port", "0"], stderr=subprocess.PIPE,
                            text=True, cwd=PACKAGE_PARENT)
    try:
        first = proc.stderr.readline()
        second = proc.stderr.readline()
        third = proc.stderr.readline()
    finally:
        proc.terminate()
        proc.wait(10)
    assert "warning: serving on 0.0.0.0" in first and "serving 1 run(s) on http://" in second
    assert third.split() == ["0:", "run", os.path.abspath(run_dir)]     # where it is: here


def test_help_states_the_bound_on_connections():
    from femtogpt.app.serve_http import MAX_HANDLERS
    proc = subprocess.run([sys.executable, "-m", "femtogpt.app.cli", "serve", "--help"],
                          capture_output=True, text=True, timeout=60, cwd=PACKAGE_PARENT)
    assert f"At most {MAX_HANDLERS} connections at once" in " ".join(proc.stdout.split())
    assert "--verbose" in proc.stdout


def test_only_this_servers_pages_may_use_it(server):
    # DNS rebinding: another name pointed at 127.0.0.1 is refused.
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    conn.request("GET", "/api/runs", headers={"Host": "evil.example:8000"})
    response = conn.getresponse()
    assert response.status == 403 and b"127.0.0.1 and localhost only" in response.read()
    conn.close()
    # A cross-site form or text/plain POST (no CORS preflight) is refused.
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    conn.request("POST", "/api/runs/0/sample", body='{"prompt": "To"}',
                 headers={"Content-Type": "text/plain"})
    response = conn.getresponse()
    assert response.status == 400 and b"application/json" in response.read()
    conn.close()
    # A body left unread by a refusal is not taken for a second request.
    smuggled = b"GET /api/runs/0/metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    sock = socket.create_connection(server.server_address[:2], timeout=10)
    sock.sendall(b"POST /api/nothing HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                 b"application/json\r\nContent-Length: " + str(len(smuggled)).encode()
                 + b"\r\n\r\n" + smuggled)
    reply = b""
    while True:
        data = sock.recv(65536)
        if not data:
            break
        reply += data
    sock.close()
    assert reply.count(b"HTTP/1.1 ") == 1 and b" 404 " in reply


def test_an_error_after_the_stream_began_is_an_error_event(server, monkeypatch):
    from femtogpt.app import serve
    real = serve._EventStream.write

    def break_after_prompt(self, text):
        if self.wrote_prompt:
            raise RuntimeError("a bug in the middle of a sample")
        real(self, text)

    monkeypatch.setattr(serve._EventStream, "write", break_after_prompt)
    status, payload = request(server, "POST", "/api/runs/0/sample", {"prompt": "To"})
    assert status == 200
    got = events(payload)
    assert [n for n, _ in got] == ["prompt", "error"]
    assert "internal error: RuntimeError: a bug in the middle" in got[1][1]["error"]
    assert b"HTTP/1.1 500" not in payload
    monkeypatch.undo()
    assert request(server, "GET", "/api/runs")[0] == 200


def test_a_hugging_face_folder_is_served(tmp_path):
    from test_hf import make_folder
    folder = tmp_path / "gpt2"
    folder.mkdir()
    make_folder(folder)
    srv = make_server([str(folder)], port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        [info] = json.loads(request(srv, "GET", "/api/runs")[1])
        assert info["tokenizer"] == "gpt2" and "evaluations" not in info
        got = events(request(srv, "POST", "/api/runs/0/sample",
                             {"prompt": "Before we", "max_new_tokens": 12, "seed": 4})[1])
        assert got[-1][0] == "done"
        model, tokenizer = load(str(folder))
        from femtogpt.app.sample import stream_sample
        import io
        sink = io.StringIO()
        stream_sample(model, tokenizer, "Before we", 12, 0.8, 200, None, 4, out=sink)
        assert sink.getvalue() == "Before we" + got[-1][1]["text"] + "\n"
        analysis = json.loads(request(srv, "POST", "/api/runs/0/analyze",
                                      {"text": "Before we proceed"})[1])
        assert "".join(t["text"] for t in analysis["tokens"]) == "Before we proceed"
    finally:
        srv.shutdown()
        srv.server_close()


# --------------------------------------------------------------------------- threads


def test_models_are_loaded_in_a_thread_that_ends(run_dir, monkeypatch):
    # An OpenMP pool lives as long as the thread that made it: a model loaded
    # (converted in parallel) by the main thread would leave an idle pool that
    # slows every handler's team. make_server loads in a thread of its own.
    from femtogpt.app import serve_runs
    seen = []
    real = serve_runs.Source.peek
    monkeypatch.setattr(serve_runs.Source, "peek",
                        lambda self: seen.append(threading.current_thread()) or real(self))
    srv = make_server([run_dir], port=0)
    srv.server_close()
    assert len(seen) == 1
    assert seen[0] is not threading.main_thread() and not seen[0].is_alive()


def test_in_a_thread_of_its_own_returns_and_raises_there():
    from femtogpt.app.serve import in_a_thread_of_its_own
    assert in_a_thread_of_its_own(lambda: threading.get_ident()) != threading.get_ident()
    with pytest.raises(KeyError, match="missing"):
        in_a_thread_of_its_own(lambda: {}["missing"])


def test_serve_threads_reach_the_handlers_threads(run_dir):
    # OpenMP's thread count is per thread: serve --threads must be set where the
    # model runs (a handler's thread), not only in the main thread.
    srv = make_server([run_dir], port=0, threads=1)
    seen = []
    try:
        def handler():
            with srv.sources[0].use():
                seen.append(femtogpt.get_num_threads())
        thread = threading.Thread(target=handler)
        thread.start()
        thread.join()
    finally:
        srv.server_close()
    assert seen == [1]


def test_the_live_sample_runs_in_a_thread_that_ends(run_dir, monkeypatch):
    # the live stream's handler lives as long as the page is open: a model run
    # there would keep its OpenMP pool as long (see the test above)
    from femtogpt.app import serve_runs
    srv = make_server([run_dir], port=0)
    seen = []
    real = serve_runs.Source.use
    monkeypatch.setattr(serve_runs.Source, "use",
                        lambda self: seen.append(threading.current_thread()) or real(self))
    try:
        text = srv.eval_sample(srv.sources[0])
    finally:
        srv.server_close()
    assert isinstance(text, str) and text and not text.startswith("(no sample")
    assert len(seen) == 1 and seen[0] is not threading.current_thread()
    assert not seen[0].is_alive()
