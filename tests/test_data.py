import hashlib
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from charlm.data.batches import StreamBatcher, eval_windows
from charlm.data.corpus import load_corpus
from charlm.data.datasets import download
from charlm.errors import CharlmError


def test_vocabulary_is_code_points(unicode_corpus, tmp_path):
    corpus = load_corpus(unicode_corpus, tmp_path / "cache")
    text = unicode_corpus.read_text(encoding="utf-8")
    assert set(corpus.vocab.chars) == set(text)
    assert "🌙" in corpus.vocab and "明" in corpus.vocab
    assert corpus.vocab.decode(np.asarray(corpus.ids).tolist()) == text


def test_encoding_is_cached_and_refreshed_when_the_file_changes(ascii_corpus, tmp_path):
    first = load_corpus(ascii_corpus, tmp_path / "cache")
    cached = list((tmp_path / "cache" / "encoded").glob("*.npy"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    load_corpus(ascii_corpus, tmp_path / "cache")
    assert cached[0].stat().st_mtime_ns == stamp
    ascii_corpus.write_text("@@@" + ascii_corpus.read_text(), encoding="utf-8")
    second = load_corpus(ascii_corpus, tmp_path / "cache")
    assert "@" in second.vocab and "@" not in first.vocab


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"\x00\x01\x02binary", "binary"),
    ("caf\u00e9".encode("latin-1"), "not valid UTF-8.*encoding-errors replace"),
])
def test_bad_corpora(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(CharlmError, match=message):
        load_corpus(path, tmp_path / "cache")


def test_missing_file(tmp_path):
    with pytest.raises(CharlmError, match="not found"):
        load_corpus(tmp_path / "nope.txt", tmp_path / "cache")


def test_replace_reads_latin1(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\u00e9 ".encode("latin-1") * 10)
    corpus = load_corpus(path, tmp_path / "cache", errors="replace")
    assert "\ufffd" in corpus.vocab


def test_streams_are_contiguous_across_batches():
    data = torch.arange(1000)
    batcher = StreamBatcher(data, batch_size=4, seq_len=10)
    x1, y1, new1 = batcher.next()
    x2, y2, new2 = batcher.next()
    assert new1 and not new2
    assert torch.equal(x2[:, 0], x1[:, -1] + 1)  # each row continues where it stopped
    assert torch.equal(y1, x1 + 1)
    for _ in range(batcher.batches_per_epoch - 2):
        batcher.next()
    _, _, wrapped = batcher.next()
    assert wrapped and batcher.epoch == 1


def test_random_lengths_are_reproducible():
    def lengths(seed):
        batcher = StreamBatcher(torch.arange(5000), 2, 32, random_seq_len=True, generator=torch.Generator().manual_seed(seed))
        return [batcher.next()[0].shape[1] for _ in range(30)]
    assert lengths(1) == lengths(1)
    assert len(set(lengths(1))) > 3


def test_eval_windows_cover_the_text():
    data = torch.arange(1001)
    seen = sum(t.numel() for _, t in eval_windows(data, batch_size=4, seq_len=64))
    assert seen == 1000


class Served:
    """A one-file HTTP server on 127.0.0.1."""

    def __init__(self, body: bytes):
        body_bytes = body

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(len(body_bytes)))
                self.end_headers()
                self.wfile.write(body_bytes)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/corpus.txt"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def served():
    servers = []
    def start(body: bytes) -> Served:
        servers.append(Served(body))
        return servers[-1]
    yield start
    for server in servers:
        server.close()


def test_download_checks_the_checksum(tmp_path, served):
    body = "To be, or not to be\n".encode() * 100
    server = served(body)
    dest = download(server.url, tmp_path / "d" / "corpus.txt", hashlib.sha256(body).hexdigest())
    assert dest.read_bytes() == body
    assert [p.name for p in dest.parent.iterdir()] == ["corpus.txt"]


def test_download_refuses_a_wrong_checksum(tmp_path, served):
    server = served(b"tampered")
    with pytest.raises(CharlmError, match="sha256"):
        download(server.url, tmp_path / "corpus.txt", "0" * 64)
    assert list(tmp_path.iterdir()) == []  # nothing, not even a partial file, is left


def test_download_without_connection_says_what_to_do(tmp_path):
    with pytest.raises(CharlmError, match="put the file at .*corpus.txt or pass --data FILE"):
        download("http://127.0.0.1:9/corpus.txt", tmp_path / "corpus.txt", "0" * 64, timeout=5)
    assert list(tmp_path.iterdir()) == []


def test_default_corpus_download_through_the_cli(tmp_path, served, cli, monkeypatch):
    from charlm.data import datasets as data
    body = b"small stand-in corpus " * 400
    monkeypatch.setattr(data, "SHAKESPEARE_SHA256", hashlib.sha256(body).hexdigest())
    monkeypatch.setenv("CHARLM_SHAKESPEARE_URL", served(body).url)
    from tests.conftest import TINY
    code, _, err = cli("train", *TINY, "--max-steps", "3", "--out", "run")
    assert code == 0, err
    assert (Path(tmp_path) / "cache" / "tinyshakespeare.txt").read_bytes() == body


def test_offline_default_corpus_is_one_line(cli):
    code, out, err = cli("train", "--max-steps", "1")
    assert code == 1
    assert "pass --data FILE" in err and "tinyshakespeare.txt" in err and len(err.strip().splitlines()) == 1
