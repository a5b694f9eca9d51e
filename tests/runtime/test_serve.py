"""The OpenAI-compatible server on stories260K, called with the real ``openai`` client (and raw HTTP
for what the client will not send): completions and chat, streamed and not, greedy parity with
Engine.generate alone and beside 7 other requests, disconnects, 429, bad requests."""

import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

import runtime  # noqa: E402
from runtime.serve import capacity_line, create_app, main  # noqa: E402

STORIES = "../shared/models/stories260K"
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


class Server:
    """``create_app`` under uvicorn on a free port, in a thread."""

    def __init__(self, engine, model_id="stories", **kw):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app = create_app(engine, model_id, **kw)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=60)
        self.scheduler = self.app.state.scheduler

    def post(self, path, body, raw=None):
        """(status, JSON) of a POST with ``body`` (or ``raw`` bytes)."""
        data = raw if raw is not None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.read().decode()

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)


def wait_until(condition, timeout=20):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def engine():
    e = runtime.load(STORIES, compile=False, show_progress=False)
    e.tokenizer.chat_template = TEMPLATE
    return e


@pytest.fixture(scope="module")
def server(engine):
    s = Server(engine, kv_memory=8 * engine.kv_bytes(256, 1), max_batch=8, max_seq_len=256)
    yield s
    s.close()


@pytest.fixture(scope="module")
def slow_server():
    """One row, one waiting place, no EOS, 20 ms per decode step: requests stay running long enough to
    queue behind them or walk away from them."""
    e = runtime.load(STORIES, compile=False, show_progress=False)
    step = e.decode_step

    def slow_step(*args, **kwargs):
        time.sleep(0.02)
        return step(*args, **kwargs)

    e.decode_step = slow_step
    s = Server(e, kv_memory=2**20, max_batch=1, max_seq_len=512, max_queue=1)
    s.scheduler.eos_ids = set()
    yield s
    s.close()


def test_models_health_metrics(server, engine):
    models = server.client.models.list().data
    assert [m.id for m in models] == ["stories"]
    kv = models[0].model_extra["kv"]
    assert kv["slots"] == 8 and kv["positions_per_slot"] == 256 and kv["capacity_vs_full"] == 1.0
    assert models[0].model_extra["plan"]["dropped"] == {"attention": [], "mlp": []}
    assert json.loads(server.get("/health")) == {"status": "ok"}
    metrics = server.get("/metrics")
    assert "sublayer_kv_slots_total 8.0" in metrics and "sublayer_time_to_first_token_seconds_bucket" in metrics


def test_plan_capacity_in_models(engine):
    """A plan keeping 3 of 5 attention sublayers holds 5/3 the rows of full in the same bytes."""
    dropped = engine.with_plan({"version": 1, "name": "a2", "drop": {"attention": [0, 3]}})
    s = Server(dropped, kv_memory=6 * engine.kv_bytes(64, 1), max_batch=100, max_seq_len=64)
    try:
        m = s.client.models.list().data[0].model_extra
        assert m["kv"]["slots"] == 10 and m["kv"]["full_slots"] == 6
        assert m["kv"]["capacity_vs_full"] == pytest.approx(5 / 3)
        assert m["plan"]["dropped"]["attention"] == [0, 3]
        line = capacity_line(dropped, s.app.state.info)
        assert "10 slots x 64 positions" in line and "3/5 attention sublayers kept; 1.67x the rows of full" in line
        r = s.client.completions.create(model="stories", prompt="Once upon a time", max_tokens=6, temperature=0)
        assert r.choices[0].text == dropped.generate("Once upon a time", 6).texts[0]
    finally:
        s.close()


def test_completion_greedy_matches_generate(server, engine):
    want = engine.generate("Once upon a time", 12)
    r = server.client.completions.create(model="stories", prompt="Once upon a time", max_tokens=12, temperature=0)
    assert r.choices[0].text == want.texts[0]
    assert r.choices[0].finish_reason == ("stop" if want.tokens[0][-1] in engine.tokenizer.eos_ids else "length")
    assert r.usage.prompt_tokens == len(engine.tokenizer.encode("Once upon a time"))
    assert r.usage.completion_tokens == len(want.tokens[0])
    stream = server.client.completions.create(model="stories", prompt="Once upon a time", max_tokens=12,
                                              temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.texts[0]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    ids = engine.tokenizer.encode("The cat")  # token ids as the prompt
    r = server.client.completions.create(model="stories", prompt=ids, max_tokens=5, temperature=0)
    assert r.choices[0].text == engine.generate([ids], 5).texts[0]
    r = server.client.completions.create(model="stories", prompt="The end.", max_tokens=60, temperature=0,
                                         extra_body={"ignore_eos": True})  # vLLM's extension: no stop at EOS
    assert r.usage.completion_tokens == 60 and r.choices[0].finish_reason == "length"


def test_chat_streamed_and_not(server, engine):
    msgs = [{"role": "user", "content": "Tell me a story about a dog"}]
    want = engine.generate("Tell me a story about a dog", 10, chat=True).texts[0]
    r = server.client.chat.completions.create(model="stories", messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    chunks = list(server.client.chat.completions.create(model="stories", messages=msgs, max_tokens=10,
                                                        temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_greedy_beside_seven_others(server, engine):
    """Eight requests of different lengths at once (greedy, sampled, streamed): each greedy one equals
    Engine.generate alone; a seeded sampled one equals itself run alone."""
    prompts = ["Once upon a time", "The dog", "Lily wanted to", "One day, a big red ball rolled into the garden and",
               "Tom", "The sun was", "She said", "A little bird sat on a tree and sang a song"]
    lengths = [14, 3, 9, 6, 11, 4, 8, 5]
    want = [engine.generate(p, n).texts[0] for p, n in zip(prompts, lengths)]
    c = server.client

    def ask(i):
        if i == 5:  # a sampled neighbour with top_k through extra_body
            return c.completions.create(model="stories", prompt=prompts[i], max_tokens=lengths[i], temperature=0.8,
                                        seed=3, extra_body={"top_k": 10}).choices[0].text
        if i % 3 == 1:
            return "".join(ch.choices[0].text for ch in c.completions.create(
                model="stories", prompt=prompts[i], max_tokens=lengths[i], temperature=0, stream=True) if ch.choices)
        return c.completions.create(model="stories", prompt=prompts[i], max_tokens=lengths[i],
                                    temperature=0).choices[0].text

    server.scheduler.peak_rows = 0
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, range(8)))
    assert server.scheduler.peak_rows >= 2  # they really ran together
    for i in range(8):
        if i != 5:
            assert got[i] == want[i], i
    assert got[5] == ask(5)


def test_disconnect_frees_its_slot_and_queue_full_is_429(slow_server):
    s = slow_server
    body = json.dumps({"model": "stories", "prompt": "Once upon a time", "max_tokens": 400, "stream": True})
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    assert s.scheduler.counts() == (1, 0)
    with ThreadPoolExecutor(1) as pool:  # a second request waits for the only row
        queued = pool.submit(s.client.completions.create, model="stories", prompt="The dog", max_tokens=3, temperature=0)
        wait_until(lambda: s.scheduler.counts() == (1, 1))
        with pytest.raises(openai.RateLimitError) as e:  # the queue (1 place) is full
            s.client.completions.create(model="stories", prompt="Hi", max_tokens=2)
        assert e.value.status_code == 429 and e.value.body["type"] == "rate_limit_error"
        tokens_before = s.app.state.metrics.tokens._value.get()
        conn.close()  # walk away from the stream: its row goes to the queued request
        assert queued.result(timeout=30).choices[0].finish_reason == "length"
    wait_until(lambda: s.scheduler.counts() == (0, 0))
    assert s.app.state.metrics.tokens._value.get() - tokens_before < 100  # freed long before 400 tokens
    assert s.client.completions.create(model="stories", prompt="Hi", max_tokens=2).usage.completion_tokens == 2


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/completions", {"model": "stories"}, 400, "prompt"),
    ("/v1/completions", {"model": "stories", "prompt": 7}, 400, "prompt"),
    ("/v1/completions", {"model": "stories", "prompt": [[1, 2], "x"]}, 400, "prompt"),
    ("/v1/completions", {"model": "stories", "prompt": [1, 99999]}, 400, "prompt"),
    ("/v1/completions", {"model": "stories", "prompt": "Hi", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"model": "stories", "prompt": "Hi", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"model": "stories", "prompt": "Hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": "stories", "prompt": "Hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": "stories", "prompt": "Hi", "n": 2}, 400, "n"),
    ("/v1/completions", {"model": "stories", "prompt": "Hi", "stop": 5}, 400, "stop"),
    ("/v1/completions", {"model": "stories", "prompt": [5] * 250, "max_tokens": 16}, 400, "prompt"),
    ("/v1/completions", {"prompt": "Hi"}, 400, "model"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "Hi"}, 404, "model"),
    ("/v1/completions", [1, 2], 400, None),
    ("/v1/chat/completions", {"model": "stories"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "stories", "messages": [{"role": "user", "content": 3}]}, 400,
     "messages[0].content"),
])
def test_bad_request_then_good(server, path, body, status, param):
    code, answer = server.post(path, body)
    assert code == status and answer["error"]["param"] == param and answer["error"]["message"]
    r = server.client.completions.create(model="stories", prompt="Hi", max_tokens=2, temperature=0,
                                         extra_body={"an_unknown_key": 1})
    assert r.usage.completion_tokens >= 1


def test_bad_json_and_client_errors(server):
    code, answer = server.post("/v1/completions", None, raw=b"{not json")
    assert code == 400 and "JSON" in answer["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="other", prompt="Hi")
    with pytest.raises(openai.BadRequestError):
        server.client.chat.completions.create(model="stories", messages=[{"role": "user", "content": "x"}],
                                              max_tokens=-3)
    assert server.client.completions.create(model="stories", prompt="Hi", max_tokens=1).usage.completion_tokens == 1


def test_api_key(engine):
    s = Server(engine, kv_memory=2**20, max_batch=1, max_seq_len=64, api_key="sekrit")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client.models.list()
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="sekrit", max_retries=0)
        assert good.completions.create(model="stories", prompt="Hi", max_tokens=1).usage.completion_tokens == 1
    finally:
        s.close()


def test_cli_flag_errors(capsys):
    assert main(["--kv-memory", "lots"]) == 2
    assert "--kv-memory: expected a size such as 256M" in capsys.readouterr().err
    assert main(["--model", STORIES, "--kv-memory", "1K", "--max-seq-len", "64", "--no-compile"]) == 2
    assert "hold no sequence of 64 positions" in capsys.readouterr().err


def test_load_generator(server):
    """bench.serve's load run against the server: every request answered in full, counted."""
    import asyncio

    from bench.serve import run_load

    row = asyncio.run(run_load(server.url, "stories", 512, requests=5, concurrency=3, prompt_lens=[4, 9],
                               output_lens=[3, 6], seed=1))
    assert row["errors"] == 0 and row["requests"] == 5 and 15 <= row["output_tokens"] <= 30
    assert row["ttft_ms_p50"] > 0 and row["itl_ms_p50"] > 0 and row["peak_running"] <= 3  # polled: a short run may finish first


def test_non_streamed_disconnect_frees_its_slot(slow_server):
    s = slow_server
    tokens_before = s.app.state.metrics.tokens._value.get()
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"model": "stories", "prompt": "Once", "max_tokens": 400}),
                 {"Content-Type": "application/json"})
    wait_until(lambda: s.scheduler.counts() == (1, 0))
    conn.close()  # gone before the answer
    wait_until(lambda: s.scheduler.counts() == (0, 0))
    assert s.app.state.metrics.tokens._value.get() - tokens_before < 100


def test_sigterm_drains_running_requests(tmp_path):
    """python -m runtime.serve: SIGTERM mid-stream lets the stream finish, then the process exits."""
    import signal
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "runtime.serve", "--model", STORIES, "--port", str(port),
                             "--kv-memory", "1M", "--max-seq-len", "512", "--no-compile"], stdout=log, stderr=log)
    try:
        def up():
            assert proc.poll() is None, open(tmp_path / "serve.log").read()
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).status == 200
            except OSError:
                return False
        wait_until(up, timeout=60)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({"model": STORIES, "prompt": "Once", "max_tokens": 300,
                                                            "ignore_eos": True, "stream": True,
                                                            "stream_options": {"include_usage": True}}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.readline().startswith(b"data: ")
        proc.send_signal(signal.SIGTERM)
        lines = [ln for ln in resp.read().decode().splitlines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["usage"]["completion_tokens"] == 300
        assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after draining
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "KV pool: " in open(tmp_path / "serve.log").read()
