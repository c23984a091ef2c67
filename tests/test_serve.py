"""charlm serve: the batching engine, the HTTP API and its limits, the OpenAI client, the command."""

import json
import os
import select
import shutil
import signal
import socket
import threading
import time
from contextlib import contextmanager

import pytest
import torch

from charlm import sampling
from charlm.model.checkpoint import PRETRAINED_PATH, load_model
from charlm.runinfo import checkpoint_info
from charlm.model.inference import inference_weights
from charlm.sampling import SampleSettings, generate, primed
from tests.conftest import charlm_process, one_line_error, wait_for

httpx = pytest.importorskip("httpx", reason="the serve tests need the test extra (httpx)")
pytest.importorskip("fastapi", reason="the serve tests need the serve extra")
uvicorn = pytest.importorskip("uvicorn", reason="the serve tests need the serve extra")

from charlm.serve.app import create_app  # noqa: E402
from charlm.serve.engine import CPU_BLOCK, Blocks, Engine  # noqa: E402
from charlm.serve.limits import MAX_SLOTS, MAX_WAITING, Limits  # noqa: E402

TIMEOUT = 60
ASKED = SampleSettings(length=300, temperature=0.8, seed=11)
FILTERED = SampleSettings(length=200, temperature=1.1, top_k=8, top_p=0.9, seed=5)


@pytest.fixture(scope="module")
def pretrained():
    return load_model("pretrained")


def library_text(pretrained, prime: str, settings: SampleSettings) -> str:
    """What ``charlm sample`` gives: ``charlm.generate``, one stream (on its numpy path)."""
    return generate(pretrained.model, pretrained.vocab, prime, settings)[0]


def others(count: int) -> list[tuple[str, SampleSettings]]:
    """Requests with every kind of setting and length, so rows join and leave all the time."""
    return [("JULIET:" if i % 2 else "", SampleSettings(length=30 + (37 * i) % 300, temperature=(0.0, 0.5, 1.3)[i % 3],
                                                         top_k=(None, 3)[i % 2], top_p=(None, 0.8, 0.95)[i % 3], seed=100 + i))
            for i in range(count)]


def amid(engine: Engine, crowd: list, prime: str, settings: SampleSettings) -> tuple[str, int]:
    """The text of one request served while ``crowd`` is, and the most slots that were active at once."""
    busiest, texts = [0], {}

    def run(index, crowd_prime, crowd_settings):
        texts[index] = "".join(engine.stream(crowd_prime, crowd_settings))

    threads = [threading.Thread(target=run, args=(i, *request)) for i, request in enumerate(crowd)]
    for thread in threads:
        thread.start()
    assert wait_for(lambda: engine.load()["active"] >= len(crowd) // 2, TIMEOUT)
    pieces = []
    for piece in engine.stream(prime, settings):
        pieces.append(piece)
        busiest[0] = max(busiest[0], engine.load()["active"])
    for thread in threads:
        thread.join(TIMEOUT)
    assert len(texts) == len(crowd) and all(len(texts[i]) == s.length for i, (_, s) in enumerate(crowd))
    return "".join(pieces), busiest[0]


def test_a_request_gives_the_same_text_alone_amid_others_and_from_the_library(pretrained):
    """The text depends on the request alone, whatever the batch (blocks of CPU_BLOCK rows: one to
    three here) and its row in it, and equals the library's (``charlm sample``'s) with that seed."""
    engine = Engine(pretrained.model, pretrained.vocab)
    try:
        for prime, settings in (("ROMEO:", ASKED), ("", FILTERED)):
            alone = "".join(engine.stream(prime, settings))
            assert len(alone) == settings.length
            assert alone == library_text(pretrained, prime, settings)
            for crowd in (15, 40):
                text, busiest = amid(engine, others(crowd), prime, settings)
                assert text == alone, f"differs amid {crowd} others"
                assert busiest > CPU_BLOCK or crowd < CPU_BLOCK
    finally:
        engine.stop()


def test_a_byte_model_serves_whole_characters_as_the_library_gives_them(tiny_config, unicode_corpus):
    """A byte model's character can straddle two pieces (or be the first piece's single byte): served
    text must join it as the library does, never put U+FFFD in its place."""
    import charlm
    charlm.train(tiny_config("bytes", **{"data.path": str(unicode_corpus), "data.unit": "byte", "train.max_steps": 150,
                                         "train.lr": 0.01, "train.checkpoint_interval": 50}))  # enough to write whole characters
    loaded = load_model("bytes")
    settings = SampleSettings(length=200, temperature=0.5, seed=3)
    engine = Engine(loaded.model, loaded.vocab)
    try:
        served = "".join(engine.stream("床", settings))
    finally:
        engine.stop()
    assert served == library_text(loaded, "床", settings)
    assert any(ord(char) > 0x7F for char in served), "no multi-byte character was made: nothing was tested"


@pytest.mark.parametrize("library", ["numpy", "torch"])  # the engine takes the faster of the two here
def test_each_row_computes_the_same_bits_whatever_the_batch_and_its_place_in_it(pretrained, library):
    """What the engine's blocks are for: a product's rows round differently with their number and
    place (the BLAS picks its kernel and thread split by size), so the batch is stepped in blocks of
    a fixed size; then a slot's logits are bit for bit the same with any other slots, in any row."""
    model, weights = pretrained.model, inference_weights(pretrained.model)
    block_weights = weights.to_numpy() if library == "numpy" else weights
    starts = [primed(model, pretrained.vocab.encode(f"ROMEO{'o' * i}:").tolist(), 1, weights) for i in range(40)]

    def logits(order: list[int]) -> dict[int, list[torch.Tensor]]:
        """Six greedy steps of the states ``order`` names, in that order of rows: each one's logits."""
        blocks = Blocks(block_weights, model, CPU_BLOCK)
        blocks.fit(len(order))
        for row, start in enumerate(order):
            blocks.put(row, *starts[start])
        out = {start: [] for start in order}
        for _ in range(6):
            step = blocks.step()
            for row, start in enumerate(order):
                out[start].append(step[row].clone())
            blocks.advance(step.argmax(-1))
        return out

    widest = logits(list(range(40)))
    for count in (1, 2, 3, 5, 7, 9, 11, 13, 17, 33):
        for order in (list(range(count)), list(range(39, 39 - count, -1))):  # other places for most states
            assert all(torch.equal(got, want) for start, steps in logits(order).items()
                       for got, want in zip(steps, widest[start])), f"{count} slots round differently"


@contextmanager
def serving(pretrained, limits: Limits = Limits(), max_slots: int = MAX_SLOTS, max_waiting: int = MAX_WAITING):
    """The app under uvicorn in a thread on a free loopback port; yields its address."""
    engine = Engine(pretrained.model, pretrained.vocab, max_slots, max_waiting)
    app = create_app(engine, checkpoint_info("pretrained"), limits, "pretrained")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: server.started, TIMEOUT)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        engine.stop()
        sock.close()


def events(response) -> list[tuple[str | None, dict]]:
    """The (event name, data) of every server-sent event of a streamed response."""
    found, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            found.append((name, json.loads(line[6:])))
            name = None
    return found


def test_the_api_describes_the_model_and_generates_as_json_and_as_events(pretrained):
    with serving(pretrained) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        assert client.get("/health").json() == {"status": "ok"}
        model = client.get("/v1/model").json()
        shipped = torch.load(PRETRAINED_PATH, weights_only=True)
        assert (model["cell"], model["layers"], model["hidden_size"], model["vocabulary_size"], model["step"]) == ("lstm", 2, 512, 65, shipped["step"])
        assert model["parameters"] == 4235841 and model["best_val_loss"] == pytest.approx(shipped["best_val_loss"], abs=1e-4)
        assert "/v1/completions" in client.get("/openapi.json").json()["paths"] and client.get("/docs").status_code == 200
        body = {"prime": "ROMEO:", "length": ASKED.length, "temperature": ASKED.temperature, "seed": ASKED.seed}
        reply = client.post("/v1/generate", json=body).json()
        expected = library_text(pretrained, "ROMEO:", ASKED)
        assert reply["text"] == expected and not reply["text"].startswith("ROMEO:")
        assert (reply["prime"], reply["length"], reply["seed"]) == ("ROMEO:", ASKED.length, ASKED.seed) and reply["chars_per_second"] > 0
        with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as streamed:
            assert streamed.headers["content-type"].startswith("text/event-stream")
            sent = events(streamed)
        texts = [data["text"] for name, data in sent[:-1]]  # the first character at once, then chunks
        assert [len(text) for text in texts[:3]] == [1, sampling.CHUNK - 1, sampling.CHUNK] and "".join(texts) == expected
        assert len(texts) == 1 + -(-ASKED.length // sampling.CHUNK)
        assert sent[-1][0] == "done" and sent[-1][1]["done"] and sent[-1][1]["length"] == ASKED.length
        unseeded = client.post("/v1/generate", json={"length": 50}).json()  # a random seed, reported so it can be replayed
        assert client.post("/v1/generate", json={"length": 50, "seed": unseeded["seed"]}).json()["text"] == unseeded["text"]


BAD_REQUESTS = [  # (path, body or raw bytes, status, param)
    ("/v1/generate", b"{not json", 400, "body"),
    ("/v1/generate", b"\xff\xfe", 400, "body"),
    ("/v1/generate", [1, 2], 422, "body"),
    ("/v1/generate", {"length": "long"}, 422, "length"),
    ("/v1/generate", {"length": 10.5}, 422, "length"),
    ("/v1/generate", {"temperature": "hot"}, 422, "temperature"),
    ("/v1/generate", {"stream": "yes"}, 422, "stream"),
    ("/v1/generate", {"prime": 5}, 422, "prime"),
    ("/v1/generate", {"lenght": 10}, 422, "lenght"),
    ("/v1/generate", {"length": -1}, 422, "length"),
    ("/v1/generate", {"temperature": -0.5}, 422, "temperature"),
    ("/v1/generate", b'{"temperature": NaN}', 422, "temperature"),
    ("/v1/generate", {"top_k": 0}, 422, "top_k"),
    ("/v1/generate", {"top_p": 1.5}, 422, "top_p"),
    ("/v1/generate", {"seed": -3}, 422, "seed"),
    ("/v1/generate", {"length": 2001}, 422, "length"),
    ("/v1/generate", {"prime": "naïve ☃"}, 422, "prime"),
    ("/v1/generate", {"prime": "x" * 3000}, 413, "body"),
    ("/v1/generate", b'{"prime": "ROMEO\\ud800"}', 422, "prime"),
    ("/v1/generate", b"[" * 1020 + b"]" * 1020, 400, "body"),  # nested deeper than json can parse
    ("/v1/completions", {"prompt": "caf\u00e9"}, 422, "prompt"),
    ("/v1/completions", {"prompt": "ROMEO:", "max_tokens": 2001}, 422, "max_tokens"),
    ("/v1/completions", {"prompt": "ROMEO:", "n": 2}, 422, "n"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 422, "prompt"),
    ("/v1/completions", {"prompt": "ROMEO:", "logit_bias": {}}, 422, "logit_bias"),
]


def test_bad_requests_get_a_4xx_json_error_naming_the_field(pretrained):
    limits = Limits(max_length=2000, max_body_bytes=2048)
    with serving(pretrained, limits) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        for path, body, status, param in BAD_REQUESTS:
            sent = {"content": body} if isinstance(body, bytes) else {"json": body}
            reply = client.post(path, headers={"content-type": "application/json"}, **sent)
            assert reply.status_code == status, (body, reply.text)
            error = reply.json()["error"]
            assert error["param"] == param and (param in error["message"] or param == "body"), (body, error)
        huge = client.post("/v1/generate", content=iter([b'{"prime": "', b"x" * 4000, b'"}']))  # chunked: no length given
        assert huge.status_code == 413 and "2,048 bytes" in huge.json()["error"]["message"]
        assert "never saw: 'ï', '☃'" in client.post("/v1/generate", json={"prime": "naïve ☃"}).json()["error"]["message"]
        assert client.get("/health").status_code == 200
        assert client.post("/v1/generate", json={"length": 5, "seed": 1}).status_code == 200


def test_a_full_server_answers_503_with_retry_after_and_long_requests_end_in_time(pretrained):
    limits = Limits(queue_timeout=0.5, time_limit=1.0)
    with serving(pretrained, limits, max_slots=1, max_waiting=1) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        results = {}

        def queued():
            results["queued"] = client.post("/v1/generate", json={"length": 10})

        with client.stream("POST", "/v1/generate", json={"length": 2000, "stream": True}) as first:
            lines = first.iter_lines()
            next(lines)  # it holds the one slot
            waiter = threading.Thread(target=queued)
            waiter.start()
            assert wait_for(lambda: client.get("/v1/load").json()["waiting"] == 1, TIMEOUT)
            full = client.post("/v1/generate", json={"length": 10})  # the queue is full: at once
            assert full.status_code == 503 and full.headers["retry-after"] == "1" and full.json()["error"]["type"] == "server_busy"
            waiter.join(TIMEOUT)
            assert results["queued"].status_code == 503 and results["queued"].headers["retry-after"] == "1"  # waited 0.5 s
            rest = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
        assert rest[-1]["finish_reason"] == "time" and 0 < rest[-1]["length"] < 2000  # ended by its 1 s limit
        timed = client.post("/v1/generate", json={"length": 2000}).json()
        assert timed["finish_reason"] == "time" and len(timed["text"]) == timed["length"] < 2000


def gave_up(client: httpx.Client) -> list[str]:
    """A 5,000-character JSON request that stops waiting for its reply after one second."""
    try:
        client.post("/v1/generate", json={"length": 5000}, timeout=1.0)
    except httpx.ReadTimeout:
        return ["timed out"]
    return ["answered"]


def test_a_client_that_goes_away_frees_its_slot_at_once(pretrained):
    with serving(pretrained) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        load = lambda: client.get("/v1/load").json()["active"]  # noqa: E731
        for streamed in (True, False):
            with httpx.Client(base_url=url, timeout=TIMEOUT) as leaving:
                if streamed:
                    with leaving.stream("POST", "/v1/generate", json={"length": 5000, "stream": True}) as reply:
                        lines = reply.iter_lines()  # held: a dropped iterator closes the connection (httpcore)
                        next(lines)
                        assert load() == 1
                else:  # the client gives up waiting for the JSON reply after a second
                    timeouts = []
                    thread = threading.Thread(target=lambda: timeouts.extend(gave_up(leaving)))
                    thread.start()
                    assert wait_for(lambda: load() == 1, 1)
                    thread.join(TIMEOUT)
                    assert timeouts == ["timed out"]
            started = time.monotonic()
            assert wait_for(lambda: load() == 0, 5), "the slot stayed taken"
            assert time.monotonic() - started < 2


def test_the_openai_client_works_unchanged_plain_and_streaming(pretrained):
    openai = pytest.importorskip("openai", reason="needs the test extra (openai)")
    with serving(pretrained) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        expected = client.post("/v1/generate", json={"prime": "ROMEO:", "length": 60, "temperature": 0.7, "seed": 3}).json()["text"]
        remote = openai.OpenAI(base_url=f"{url}/v1", api_key="anything", timeout=TIMEOUT, max_retries=0)
        done = remote.completions.create(model="pretrained", prompt="ROMEO:", max_tokens=60, temperature=0.7, seed=3)
        assert done.object == "text_completion" and done.model == "pretrained" and done.id.startswith("cmpl-")
        assert done.choices[0].text == expected and done.choices[0].finish_reason == "length"
        assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (6, 60, 66)
        chunks = list(remote.completions.create(model="pretrained", prompt="ROMEO:", max_tokens=60, temperature=0.7, seed=3, stream=True))
        assert len(chunks) > 2 and "".join(chunk.choices[0].text for chunk in chunks) == expected
        assert chunks[-1].choices[0].finish_reason == "length"
        with pytest.raises(openai.UnprocessableEntityError, match="never saw"):
            remote.completions.create(model="pretrained", prompt="naïve", max_tokens=5)


def test_charlm_serve_prints_its_address_and_stops_cleanly_on_sigterm():
    server = charlm_process("serve", "--port", 0, "--max-slots", 8)
    try:
        assert select.select([server.stdout], [], [], TIMEOUT)[0], "charlm serve printed no address in time"
        first = server.stdout.readline()
        assert first.startswith("charlm serve: http://127.0.0.1:"), first
        url = first.split()[2]
        reply = httpx.post(f"{url}/v1/generate", json={"prime": "ROMEO:", "length": 30, "seed": 1}, timeout=TIMEOUT)
        assert reply.status_code == 200 and len(reply.json()["text"]) == 30
        assert httpx.get(f"{url}/v1/load", timeout=TIMEOUT).json()["max_slots"] == 8
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=TIMEOUT)
    finally:
        server.kill()
        server.wait(TIMEOUT)
    assert server.returncode == 0, err
    assert "Traceback" not in err and "charlm serve: stopped (SIGTERM)" in out


def test_serve_refuses_bad_options_and_a_missing_extra_in_one_line(cli, monkeypatch):
    one_line_error(*cli("serve", "--max-length", "0")[::2], "--max-length must be a finite number more than 0")
    one_line_error(*cli("serve", "--time-limit", "nan")[::2], "--time-limit must be a finite number")
    one_line_error(*cli("serve", "--max-slots", "0")[::2], "--max-slots must be at least 1")
    one_line_error(*cli("serve", "missing-run")[::2], "missing-run not found")
    monkeypatch.setitem(__import__("sys").modules, "uvicorn", None)
    one_line_error(*cli("serve")[::2], 'pip install "charlm[serve]"')


@pytest.fixture
def chromium(monkeypatch):
    """Headless Chromium driven by Selenium through Debian's chromium-driver; skipped where either is missing."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("the playground test needs Chromium and its driver (Debian: apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="the playground test needs selenium (the test extra)")
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers on the network
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1000,1070"):
        options.add_argument(argument)
    session = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    session.set_page_load_timeout(TIMEOUT)
    try:
        yield session
    finally:
        session.quit()


def test_the_playground_streams_text_into_the_page(pretrained, chromium):
    """Type a prime, press Generate: the text appears and grows as it is made, and equals the API's for
    the same settings. CHARLM_PLAYGROUND_SCREENSHOT=FILE saves what the page shows at the end."""
    from selenium.webdriver.common.by import By

    with serving(pretrained) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        chromium.get(url)
        page = chromium.page_source
        assert "<script src" not in page and "<link" not in page and "@import" not in page  # nothing from elsewhere
        for field, value in (("prime", "JULIET:"), ("length", "600"), ("seed", "7")):
            chromium.find_element(By.ID, field).clear()
            chromium.find_element(By.ID, field).send_keys(value)
        chromium.find_element(By.ID, "generate").click()
        generated = lambda: chromium.find_element(By.ID, "generated").text if chromium.find_elements(By.ID, "generated") else ""  # noqa: E731
        assert wait_for(lambda: len(generated()) > 0, TIMEOUT), "no text appeared"
        first = len(generated())
        assert wait_for(lambda: "chars/s" in chromium.find_element(By.ID, "status").text, TIMEOUT)
        assert first < 600 and len(generated()) > first  # it streamed in, piece by piece
        expected = client.post("/v1/generate", json={"prime": "JULIET:", "length": 600, "seed": 7, "temperature": 0.8}).json()["text"]
        shown = chromium.execute_script("return document.getElementById('generated').textContent")
        assert shown == expected and chromium.find_element(By.ID, "model").text.startswith("pretrained: 2×512 LSTM")
        if os.environ.get("CHARLM_PLAYGROUND_SCREENSHOT"):
            chromium.save_screenshot(os.environ["CHARLM_PLAYGROUND_SCREENSHOT"])


def test_bench_serve_drives_clients_and_reports_the_figures(cli):
    code, out, err = cli("bench", "serve", "--clients", 3, "--seconds", 1.5, "--length", 40, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["clients"] == 3 and report["errors"] == 0 and report["requests"] >= 3, report
    assert report["chars_per_s"] > 0 and 0 < report["first_char_p50_ms"] <= report["first_char_p99_ms"]
    assert report["server_memory"]["rss_mb"] > 50 and report["one_stream_library_chars_per_s"] > 0
    one_line_error(*cli("bench", "serve", "--clients", 0)[::2], "--clients must be 1 to 256")
