"""Corpora beyond one file: directories and globs, named datasets, byte mode, the encoded cache."""

import errno
import hashlib
import io
import json
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from charlm.config import load_config
from charlm.data import corpus as corpus_module
from charlm.data import datasets
from charlm.data.corpus import load_corpus
from charlm.data.sources import SEPARATOR
from charlm.data.vocab import ByteVocab
from charlm.errors import CharlmError
from charlm.model.checkpoint import load_checkpoint
from tests.conftest import TINY, one_line_error, snapshot
from tests.test_data import Served


@pytest.fixture
def tree(tmp_path) -> Path:
    """A folder of text files at two depths, with a binary file and a hidden one that are left out."""
    root = tmp_path / "tree"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "b.txt").write_text("second file\n" * 50, encoding="utf-8")
    (root / "a.txt").write_text("first file, café ☕\n" * 50, encoding="utf-8")
    (root / "sub" / "c.py").write_text("print('third')\n" * 50, encoding="utf-8")
    (root / "sub" / "c.pyc").write_bytes(b"\x00\x01compiled")
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return root


def text_of(corpus) -> str:
    return corpus.vocab.decode(np.asarray(corpus.ids).tolist())


def test_a_directory_is_its_text_files_sorted_and_joined(tree, tmp_path):
    corpus = load_corpus(tree, tmp_path / "cache")
    files = ["a.txt", "b.txt", "sub/c.py"]
    assert [f["name"] for f in corpus.files] == files
    assert text_of(corpus) == SEPARATOR.join((tree / name).read_text(encoding="utf-8") for name in files)
    assert all(f["sha256"] == hashlib.sha256((tree / f["name"]).read_bytes()).hexdigest() for f in corpus.files)


def test_a_glob_with_exclusions_and_the_checksum_follows_the_content(tree, tmp_path):
    from charlm.data.corpus import open_corpus
    config = load_config(None, {"data.path": f"{tree}/**/*.*", "data.exclude": "sub", "data.dir": str(tmp_path / "cache")})
    first = open_corpus(config.data)
    assert [f["name"] for f in first.files] == ["a.txt", "b.txt"]
    (tree / "b.txt").write_text("changed\n" * 50, encoding="utf-8")
    second = open_corpus(config.data)
    assert second.sha256 != first.sha256 and "changed" in text_of(second)


def test_a_file_whose_name_looks_like_a_glob_is_read_as_that_file(tmp_path):
    odd = tmp_path / "notes [draft].txt"
    odd.write_text("a file with brackets in its name\n" * 20, encoding="utf-8")
    (tmp_path / "notes d.txt").write_text("what the glob would match\n" * 20, encoding="utf-8")
    corpus = load_corpus(odd, tmp_path / "cache")
    assert text_of(corpus) == odd.read_text(encoding="utf-8")  # not "notes d.txt", which the glob matches


def test_the_cache_is_keyed_by_content_not_by_path(ascii_corpus, tmp_path):
    copy = tmp_path / "elsewhere" / "copy.txt"
    copy.parent.mkdir()
    copy.write_bytes(ascii_corpus.read_bytes())
    first = load_corpus(ascii_corpus, tmp_path / "cache")
    second = load_corpus(copy, tmp_path / "cache")
    assert first.sha256 == second.sha256
    assert {path.name.split("-")[1] for path in (tmp_path / "cache" / "encoded").glob("*.npy")} == {first.sha256[:16]}
    assert first.ids.dtype == np.uint8 and isinstance(second.ids, np.memmap)


def test_a_directory_without_text_files_is_one_line(cli, tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.pyc").write_bytes(b"\x00\x00")
    one_line_error(*cli("train", "--data", tmp_path / "bin", *TINY)[::2], "has no text files", "1 binary")


def test_a_file_that_is_not_utf8_is_named_with_its_offset(cli, tree, monkeypatch):
    monkeypatch.setattr(corpus_module, "CHUNK_BYTES", 16)  # the bad byte lies chunks in, after a split character
    (tree / "sub" / "latin.txt").write_bytes("a ☕ café, ".encode("utf-8") * 3 + "naïve".encode("latin-1"))
    offset = len("a ☕ café, ".encode("utf-8")) * 3 + 2
    one_line_error(*cli("train", "--data", tree, *TINY)[::2], "sub/latin.txt is not valid UTF-8", f"offset {offset}")


def test_a_full_disk_leaves_no_partial_cache(cli, ascii_corpus, tmp_path, monkeypatch):
    real = corpus_module.write_ids

    def disk_full(out, *args):
        out.write(b"\x93NUMPY" + b"\x00" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(corpus_module, "write_ids", disk_full)
    one_line_error(*cli("train", "--data", ascii_corpus, *TINY)[::2], "No space left on device", "free some space")
    assert list((tmp_path / "cache" / "encoded").iterdir()) == []
    monkeypatch.setattr(corpus_module, "write_ids", real)
    assert len(load_corpus(ascii_corpus, tmp_path / "cache")) == len(ascii_corpus.read_text())


def test_training_on_a_directory_records_its_files_and_resume_names_a_changed_one(cli, tree):
    code, _, err = cli("train", "--data", tree, *TINY, "--max-steps", "4", "--out", "run")
    assert code == 0, err
    recorded = load_checkpoint(Path("run") / "last.pt")["corpus"]
    assert [f["name"] for f in recorded["files"]] == ["a.txt", "b.txt", "sub/c.py"]
    code, out, _ = cli("info", "run")
    assert "corpus files" in out and "a.txt" in out
    (tree / "sub" / "c.py").write_text("print('edited')\n" * 50, encoding="utf-8")
    one_line_error(*cli("train", "--resume", "run", "--max-steps", "8")[::2], "is not the corpus", "changed sub/c.py")


def test_byte_mode_trains_samples_and_evaluates_in_bytes(cli, unicode_corpus):
    corpus = load_corpus(unicode_corpus, Path("cache"), unit="byte")
    assert isinstance(corpus.vocab, ByteVocab) and len(corpus.vocab) <= 256
    assert bytes(ord(corpus.vocab.chars[i]) for i in np.asarray(corpus.ids)) == unicode_corpus.read_bytes()
    code, _, err = cli("train", "--data", unicode_corpus, "--data.unit", "byte", *TINY, "--max-steps", "6", "--out", "run")
    assert code == 0, err
    code, out, err = cli("sample", "run", "--length", "300", "--seed", "1", "--prime", "明")
    assert code == 0 and out.startswith("明") and len(out.encode("utf-8")) > 150, err
    code, out, _ = cli("eval", "run", "--json")
    val_bytes = len(corpus.split(0.1)[1])  # about 2.4 bytes per character in this text
    assert 0.9 * val_bytes < json.loads(out)["chars"] < val_bytes
    one_line_error(*cli("train", "--init-from", "run", "--data", unicode_corpus, "--data.unit", "char", "--out", "tune",
                        *TINY)[::2], "cannot change --data.unit")
    assert cli("export", "run", "--out", "small.pt")[0] == 0  # the unit travels with the export
    code, out, err = cli("sample", "small.pt", "--length", "200", "--seed", "1", "--prime", "明")
    assert code == 0 and out.startswith("明") and len(out.encode("utf-8")) > 150, err
    (Path("other.txt")).write_text("明月光 café " * 20, encoding="utf-8")
    report = json.loads(cli("eval", "small.pt", "--data", "other.txt", "--json")[1])
    assert report["chars"] == len(("明月光 café " * 20).encode("utf-8")) - 1 and report["skipped_chars"] == 0


def test_byte_decoding_joins_a_character_split_between_pieces():
    vocab = ByteVocab("".join(map(chr, range(256))))
    data = list("明月 ok".encode("utf-8"))
    decode = vocab.stream_decoder()
    assert decode(data[:2]) + decode(data[2:4]) + decode(data[4:], True) == "明月 ok"
    assert vocab.decode(data[:2]) == "\ufffd"  # a cut character at the very end is replaced, not dropped


def zipped(member: str, body: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member, body)
    return buffer.getvalue()


@pytest.fixture
def small_dataset(monkeypatch):
    """small_dataset(name) -> (text, zip, start(body)): the dataset as a 3,000-character stand-in with a
    2,400/300/300 split, its sha256 that of the zip, served on 127.0.0.1."""
    servers = []

    def make(name: str):
        text = ("the quick brown fox jumps over the lazy dog " * 70)[:3000].encode()
        archive, dataset = zipped(name, text), datasets.DATASETS[name]
        monkeypatch.setitem(datasets.DATASETS, name, replace(
            dataset, sha256=hashlib.sha256(archive).hexdigest(), train=2400, valid=300))

        def start(body: bytes) -> Served:
            servers.append(Served(body))
            monkeypatch.setenv(dataset.url_variable, servers[-1].url)
            return servers[-1]
        return text, archive, start
    yield make
    for server in servers:
        server.close()


@pytest.mark.parametrize("name, unit", [("text8", "char"), ("enwik8", "byte")])
def test_a_named_dataset_downloads_extracts_and_evaluates_its_test_split(cli, small_dataset, tmp_path, name, unit):
    text, archive, start = small_dataset(name)
    start(archive)
    code, _, err = cli("train", "--data", name, "--data.unit", unit, *TINY, "--max-steps", "4", "--out", "run")
    assert code == 0, err
    assert (tmp_path / "cache" / name).read_bytes() == text
    assert (tmp_path / "cache" / f"{name}.zip").read_bytes() == archive
    code, out, err = cli("eval", "run", "--split", "test", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["data"].endswith("(test split)") and report["chars"] == 3000 - 2700 - 1
    assert json.loads(cli("eval", "run", "--json")[1])["chars"] == 300 - 1


def test_a_dataset_with_a_wrong_checksum_is_refused_and_nothing_is_kept(cli, small_dataset, tmp_path):
    _, _, start = small_dataset("text8")
    start(zipped("text8", b"tampered " * 100))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "keep.txt").write_text("untouched")
    before = snapshot(tmp_path / "cache")
    one_line_error(*cli("train", "--data", "text8", *TINY)[::2], "sha256", "nothing was saved")
    assert snapshot(tmp_path / "cache") == before


def test_unknown_dataset_and_test_split_without_one(cli, ascii_corpus):
    one_line_error(*cli("train", "--data", "enwik9", *TINY)[::2], "'enwik9'", "enwik8, text8")
    assert cli("train", "--data", ascii_corpus, *TINY, "--max-steps", "2", "--out", "run")[0] == 0
    one_line_error(*cli("eval", "run", "--split", "test")[::2], "has no test split")


def test_the_benchmark_recipes_load_by_name():
    enwik8, text8 = load_config("enwik8"), load_config("text8")
    assert (enwik8.data.path, enwik8.data.unit) == ("enwik8", "byte")
    assert (text8.data.path, text8.data.unit) == ("text8", "char")
    assert enwik8.model.layers == text8.model.layers == 3


def test_an_encoding_error_mid_cache_does_not_leave_a_cache(tree, tmp_path):
    (tree / "z.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(CharlmError, match="z.txt is not valid UTF-8"):
        load_corpus(tree, tmp_path / "cache")
    assert list((tmp_path / "cache" / "encoded").iterdir()) == []


def test_processes_encoding_at_once_share_one_cache(tree, tmp_path):
    """As the ranks of a job do: each waits on the cache's lock, the first encodes, all map the same file.

    Each process says when it encodes, and encoding takes a second, so that without the lock the
    others would find no cache yet and encode it too."""
    import subprocess
    import sys
    script = ("import sys, time; from charlm.data import corpus; write = corpus.write_cache\n"
              "def slow(*args): print('encoded', flush=True); time.sleep(1); write(*args)\n"
              "corpus.write_cache = slow\n"
              "c = corpus.load_corpus(sys.argv[1], sys.argv[2]); print(c.sha256, len(c), c.ids.filename)")
    processes = [subprocess.Popen([sys.executable, "-c", script, str(tree), str(tmp_path / "cache")],
                                  stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [process.communicate(timeout=120)[0].splitlines() for process in processes]
    assert all(process.returncode == 0 for process in processes)
    assert sum(lines[0] == "encoded" for lines in outputs) == 1, outputs
    assert len({lines[-1] for lines in outputs}) == 1 and len(list((tmp_path / "cache" / "encoded").glob("*.npy"))) == 1


def test_unchanged_files_are_not_hashed_again_and_an_edit_is_seen(tree, tmp_path, monkeypatch):
    from charlm.data import sources
    first = load_corpus(tree, tmp_path / "cache")
    hashed = []
    monkeypatch.setattr(sources, "sha256_of", lambda path: hashed.append(path.name) or datasets.sha256_of(path))
    assert load_corpus(tree, tmp_path / "cache").sha256 == first.sha256 and hashed == []
    (tree / "b.txt").write_text("SECOND FILE\n" * 50, encoding="utf-8")  # the same size, a new mtime
    edited = load_corpus(tree, tmp_path / "cache")
    assert hashed == ["b.txt"] and edited.sha256 != first.sha256 and "SECOND" in text_of(edited)


def test_training_reads_the_mapped_ids_without_copying_them(tiny_config):
    from charlm.data.corpus import open_corpus
    from charlm.training.setup import build_training
    config = tiny_config()
    corpus = open_corpus(config.data)
    setup = build_training(config, corpus)
    assert isinstance(corpus.ids, np.memmap)
    assert setup.batcher.inputs.untyped_storage().data_ptr() == corpus.ids.ctypes.data


def test_an_onnx_export_of_a_byte_model_says_its_unit(cli, unicode_corpus):
    ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    assert cli("train", "--data", unicode_corpus, "--data.unit", "byte", *TINY, "--max-steps", "2", "--out", "run")[0] == 0
    code, _, err = cli("export", "run", "--format", "onnx", "--out", "model.onnx")
    assert code == 0, err
    meta = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    chars = json.loads(meta["vocab"])
    assert meta["unit"] == "byte" and all(ord(char) < 256 for char in chars)
    assert set(map(ord, chars)) == set(unicode_corpus.read_bytes())


def test_a_read_only_cache_encoded_beforehand_still_serves(ascii_corpus, tmp_path, monkeypatch):
    first = load_corpus(ascii_corpus, tmp_path / "cache")
    (tmp_path / "cache" / "encoded" / "checksums.json").unlink()  # as if another user had encoded it
    real = corpus_module.atomic_write

    def read_only(path, write):  # the tests run as root, whom chmod does not stop
        if path.parent == tmp_path / "cache" / "encoded":
            raise OSError(errno.EROFS, "Read-only file system")
        return real(path, write)

    monkeypatch.setattr(corpus_module, "atomic_write", read_only)
    again = load_corpus(ascii_corpus, tmp_path / "cache")
    assert again.sha256 == first.sha256 and np.array_equal(again.ids, first.ids)


def test_bench_fetches_a_named_dataset_once_into_the_data_dir_outside_its_timing(cli, small_dataset, tmp_path):
    text, archive, start = small_dataset("text8")
    start(archive)
    code, out, err = cli("bench", "--encode-only", "--json", "--path", "text8")
    assert code == 0, err
    assert (tmp_path / "cache" / "text8").read_bytes() == text  # kept in the data directory, for the next run
    assert json.loads(out)["encode"]["chars"] == len(text)
