"""A model as a folder other tools read: the Hugging Face layout, with safetensors weights.

``export_folder`` writes ``model.safetensors`` (a tied read-out stored once, as safetensors
requires), ``config.json`` (the architecture, the corpus, the training figures and each file's
sha256), ``vocab.json`` (id -> character), ``generation_config.json`` (default sampling settings)
and a ``README.md`` model card. ``read_folder`` turns such a folder back into the payload a
checkpoint holds, so sampling, evaluation and ``charlm info`` take either. Needs the optional
``safetensors`` package.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import CharlmError
from ..files import atomic_write

WEIGHTS, CONFIG, VOCAB, GENERATION, CARD = "model.safetensors", "config.json", "vocab.json", "generation_config.json", "README.md"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TIED_HEAD = "head.weight"  # shares the embedding's matrix when the model is tied


def safetensors_module():
    try:
        import safetensors.torch
    except ImportError:
        raise CharlmError("this needs the safetensors package; install it with: pip install 'charlm[safetensors]'") from None
    return safetensors.torch


def is_export_folder(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def sha256_of_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_card(payload: dict[str, Any], name: str) -> str:
    corpus = (payload.get("corpus") or {}).get("path") or "Tiny Shakespeare"
    m = payload["config"]["model"]
    loss = payload.get("best_val_loss")
    return "\n".join([
        f"# {name}", "",
        f"A character-level {m['layers']}x{m['hidden_size']} {m['cell'].upper()} language model trained with charlm "
        f"{payload.get('charlm_version', __version__)} on {corpus}.", "",
        f"- validation loss: {loss:.4f} nats per character" if isinstance(loss, float) else "- validation loss: unknown",
        f"- training: {payload.get('step', 'unknown')} steps, {payload.get('elapsed', 0.0):.0f} s",
        f"- vocabulary: {len(payload['vocab'])} characters", "",
        "Sample from it with `charlm sample THIS_FOLDER --prime \"ROMEO:\"`, evaluate it with `charlm eval THIS_FOLDER`.", "",
    ])


def export_folder(payload: dict[str, Any], out: str | Path, dtype: str = "fp16") -> Path:
    """Write the folder of a checkpoint's ``payload`` (a file's contents as ``load_checkpoint`` returns them)."""
    st = safetensors_module()
    if dtype not in DTYPES:
        raise CharlmError(f"--dtype must be one of {'|'.join(DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CharlmError(f"{out} is a file; the safetensors export writes a folder, give a folder path with --out")
    tied = payload["config"]["model"]["tie_weights"]
    weights = {name: tensor.to(DTYPES[dtype]).contiguous() for name, tensor in payload["model"].items()
               if not (tied and name == TIED_HEAD) and tensor.is_floating_point()}
    blob = st.save(weights, metadata={"format": "charlm", "dtype": dtype})
    chars = payload["vocab"]
    files = {
        VOCAB: json.dumps({str(index): char for index, char in enumerate(chars)}, ensure_ascii=False, indent=1).encode(),
        GENERATION: json.dumps({"length": 500, "temperature": 1.0, "top_k": None, "top_p": None}, indent=1).encode(),
        CARD: model_card(payload, out.name).encode(),
    }
    config = {"model_type": "charlm", "charlm_version": __version__, "dtype": dtype, "vocab_size": len(chars),
              **{key: payload["config"][key] for key in ("model", "data", "train")},
              **{key: payload.get(key) for key in ("step", "epochs", "elapsed", "best_val_loss", "corpus", "init_from", "trained_on")},
              "sha256": {WEIGHTS: sha256_of_bytes(blob), **{name: sha256_of_bytes(data) for name, data in files.items()}}}
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, data in {WEIGHTS: blob, **files}.items():
            atomic_write(out / name, lambda fh, data=data: fh.write(data))
        atomic_write(out / CONFIG, lambda fh: fh.write(json.dumps(config, ensure_ascii=False, indent=1).encode()))
    except OSError as err:
        raise CharlmError(f"cannot write {out} ({err.strerror or err}); choose another --out") from None
    return out


def read_folder(folder: Path) -> dict[str, Any]:
    """The checkpoint payload an export folder holds, each file checked against its recorded sha256."""
    st = safetensors_module()
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
        contents = {name: (folder / name).read_bytes() for name in config["sha256"]}  # each file read once
        for name, digest in config["sha256"].items():
            if sha256_of_bytes(contents[name]) != digest:
                raise CharlmError(f"{folder / name} was changed after export (its sha256 differs); export the model again")
        vocab = json.loads(contents[VOCAB].decode("utf-8"))
        weights = st.load(contents[WEIGHTS])
    except CharlmError:
        raise
    except FileNotFoundError as err:
        raise CharlmError(f"{folder} is not a complete charlm export: {Path(err.filename).name} is missing") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CharlmError(f"{folder} is not a readable charlm export ({err})") from None
    if config.get("model_type") != "charlm":
        raise CharlmError(f"{folder / CONFIG} is not a charlm model's config")
    if config["model"]["tie_weights"]:
        weights[TIED_HEAD] = weights["embedding.weight"]
    payload = {key: config.get(key) for key in ("step", "epochs", "elapsed", "best_val_loss", "corpus", "init_from", "trained_on")}
    return {**payload, "format": "charlm-export", "version": 2, "charlm_version": config.get("charlm_version"),
            "config": {key: config[key] for key in ("model", "data", "train")},
            "vocab": "".join(vocab[str(index)] for index in range(len(vocab))), "model": weights}


class OneStep(torch.nn.Module):
    """One character for B streams: (ids (B,), state...) -> (logits (B, V), new state...), the state
    being an LSTM's h and c or another cell's h, each (layers, B, hidden)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, *state: torch.Tensor):
        logits, hidden = self.model(ids[:, None], state if len(state) == 2 else state[0])
        return (logits[:, -1], *(hidden if isinstance(hidden, tuple) else (hidden,)))


def state_names(cell: str) -> list[str]:
    return ["h", "c"] if cell == "lstm" else ["h"]


def export_onnx(model: torch.nn.Module, vocab: str, out: str | Path, unit: str = "char") -> Path:
    """The one-step model as ONNX (opset 17) for onnxruntime, onnxruntime-web or any other runtime:
    inputs ``ids`` (int64, B) and the state (float32), outputs ``logits`` and the new state; the
    vocabulary (a JSON string of the characters in id order) rides in the metadata as ``vocab``,
    and ``unit`` says what they are: 'char', or 'byte' where each character chr(b) stands for the byte b."""
    try:
        import onnx
    except ImportError:
        raise CharlmError("ONNX export needs the onnx package; install it with: pip install 'charlm[onnx]'") from None
    out = Path(out)
    if out.is_dir():
        raise CharlmError(f"{out} is a folder; the ONNX export writes one file, give a file path with --out")
    config = model.config
    names = state_names(config.cell)
    state = tuple(torch.zeros(config.layers, 1, config.hidden_size) for _ in names)
    outputs = ["logits", *(f"{name}_out" for name in names)]
    batch = {name: {1: "batch"} for name in [*names, *outputs[1:]]} | {"ids": {0: "batch"}, "logits": {0: "batch"}}
    step, graph = OneStep(copy.deepcopy(model).float().cpu().eval()), io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's advice on batch sizes: the state is an input here
        torch.onnx.export(step, (torch.zeros(1, dtype=torch.long), *state), graph, input_names=["ids", *names],
                          output_names=outputs, dynamic_axes=batch, opset_version=17, dynamo=False)
    exported = onnx.load_from_string(graph.getvalue())
    for key, value in {"vocab": json.dumps(vocab), "unit": unit, "cell": config.cell, "charlm_version": __version__}.items():
        exported.metadata_props.add(key=key, value=value)
    try:
        atomic_write(out, lambda fh: fh.write(exported.SerializeToString()))
    except OSError as err:
        raise CharlmError(f"cannot write {out} ({err.strerror or err}); choose another --out") from None
    return out
