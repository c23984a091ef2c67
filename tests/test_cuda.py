"""The CUDA path, where a GPU is present (skipped with the reason elsewhere)."""

import json
import sys

import pytest
import torch

from charlm.config import ModelConfig
from charlm.device import autocast, resolve_precision
from charlm.errors import CharlmError
from charlm.model.charrnn import CharRNN
from tests.conftest import TINY, one_line_error, snapshot

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("fp16", torch.float16)])
def test_the_recurrent_layer_runs_in_the_precision_asked_for(precision, dtype):
    device = torch.device("cuda")
    model = CharRNN(20, ModelConfig(layers=2, hidden_size=64, embedding_size=32)).to(device)
    with autocast(device, resolve_precision(precision, device)):
        output, _ = model.rnn(model.embedding(torch.randint(0, 20, (4, 8), device=device)))
    assert output.dtype == dtype


def test_bf16_is_refused_on_cuda_because_autocast_would_make_it_fp16():
    with pytest.raises(CharlmError, match="fp16"):
        resolve_precision("bf16", torch.device("cuda"))
    assert resolve_precision("auto", torch.device("cuda")) == "fp32"


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_gpu_run_learns_then_samples_and_evaluates_on_the_cpu(cli, ascii_corpus, tmp_path, precision):
    run = tmp_path / precision
    code, _, err = cli("train", "--data", ascii_corpus, *TINY, "--max-steps", 60, "--device", "cuda",
                       "--train.precision", precision, "--out", run)
    assert code == 0, err
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses[-1] < losses[0] - 0.3
    code, first, _ = cli("sample", run, "--device", "cpu", "--length", 80, "--seed", 3)
    assert code == 0 and len(first) > 80
    assert cli("sample", run, "--device", "cpu", "--length", 80, "--seed", 3)[1] == first
    assert cli("sample", run, "--device", "cuda", "--length", 80, "--seed", 3)[1] == cli("sample", run, "--device", "cuda", "--length", 80, "--seed", 3)[1]
    code, out, err = cli("eval", run, "--device", "cpu", "--json")
    assert code == 0 and json.loads(out)["loss"] < 3.0, err


def test_dynamic_evaluation_on_cuda_gets_the_cpu_figure_and_leaves_the_checkpoint(cli, ascii_corpus, tmp_path):
    """cuDNN's recurrent backward needs train mode: the adapting copy trains with its dropout off, so
    the GPU's figure is the CPU's (up to TF32 rounding), well below the static one."""
    run = tmp_path / "run"
    code, _, err = cli("train", "--data", ascii_corpus, *TINY, "--max-steps", 60, "--out", run)
    assert code == 0, err
    before = snapshot(run)
    dynamic = {}
    for device in ("cpu", "cuda"):
        code, out, err = cli("eval", run, "--json", "--dynamic", "--dynamic-lr", "1e-2", "--device", device)
        assert code == 0, err
        dynamic[device] = json.loads(out)["loss"]
    static = json.loads(cli("eval", run, "--json", "--device", "cuda")[1])["loss"]
    assert dynamic["cuda"] == pytest.approx(dynamic["cpu"], abs=0.02) and dynamic["cuda"] < static - 0.1
    assert snapshot(run) == before


def test_bf16_on_cuda_is_one_line(cli, ascii_corpus, tmp_path):
    code, _, err = cli("train", "--data", ascii_corpus, *TINY, "--device", "cuda", "--train.precision", "bf16", "--out", tmp_path / "r")
    one_line_error(code, err, "fp16")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="a 2-rank NCCL run needs two CUDA GPUs")
def test_two_ranks_on_two_gpus_with_nccl(ascii_corpus, tmp_path):
    import subprocess
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "charlm",
               "train", "--data", str(ascii_corpus), *map(str, TINY), "--max-steps", "20", "--out", str(tmp_path / "run")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert saved["job"]["world_size"] == 2 and saved["job"]["backend"] == "nccl" and saved["step"] == 20
