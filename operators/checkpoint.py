"""Checkpoints: a safetensors file of the weights plus a JSON config beside it.

The safetensors format (8-byte little-endian header length, a JSON header, raw little-endian
tensors) is read and written here with numpy, so loading needs nothing beyond torch and numpy;
the files are ordinary safetensors that the ``safetensors`` package reads too.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

from memstream.errors import CheckpointError
from memstream.operators.model import Compressor, CompressorConfig

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "compressor.safetensors"

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    header: dict = {"__metadata__": dict(metadata or {})}
    offset, blobs = 0, []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in _CODES:
            raise CheckpointError(f"tensor {name}: dtype {a.dtype} is not supported")
        blob = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _CODES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for blob in blobs:
            f.write(blob)
    tmp.replace(path)


def read_safetensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror}") from e
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
    except (struct.error, ValueError) as e:
        raise CheckpointError(f"{path} is not a safetensors file: {e}") from e
    meta = header.pop("__metadata__", {}) or {}
    base, out = 8 + n, {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        dtype = np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<")
        out[name] = np.frombuffer(data[base + start:base + end], dtype=dtype).reshape(info["shape"]).copy()
    return out, meta


def save_compressor(model: Compressor, path: str | Path, dtype: torch.dtype = torch.float32,
                    extra: dict | None = None) -> Path:
    """Write ``path`` (weights in ``dtype``; the ``shift`` buffer stays fp32) and
    ``path`` with suffix .json (the config plus ``extra``, e.g. the command that made it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in model.state_dict().items():
        keep32 = name == "shift"
        tensors[name] = t.detach().cpu().to(torch.float32 if keep32 else dtype).numpy()
    config = model.config.to_dict()
    write_safetensors(path, tensors, {"config": json.dumps(config)})
    sidecar = {"config": config, "weights_dtype": str(dtype).removeprefix("torch."), **(extra or {})}
    path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return path


def load_compressor(path: str | Path | None = None, device: str | torch.device = "cpu") -> Compressor:
    """The compressor stored at ``path``; the committed default checkpoint when None."""
    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    tensors, meta = read_safetensors(path)
    if "config" not in meta:
        raise CheckpointError(f"{path} has no config in its metadata: not a memstream compressor checkpoint")
    try:
        config = CompressorConfig.from_dict(json.loads(meta["config"]))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from e
    model = Compressor(config)
    state = {k: torch.from_numpy(v).float() for k, v in tensors.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit the compressor: {e}") from e
    return model.to(device).eval()


def load_default(device: str | torch.device = "cpu") -> Compressor:
    return load_compressor(None, device)
