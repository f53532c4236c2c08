"""Real stores for the read tests: sessions of sealed summaries made by the committed
compressor, written to an EpisodicStore, and long-term stores of signed entries."""

from __future__ import annotations

import time

import numpy as np
import torch

from memstream.episodic.chain import seal
from memstream.episodic.store import EpisodicStore
from memstream.pipelines.episodic import operator_version
from memstream.settings import WINDOW
from memstream.schemas.records import SummaryRecord


def sealed_summaries(model, key, session_id: str, latents: np.ndarray, first_window: int = 0,
                     prev_hash: bytes = b"", window: int = WINDOW) -> list[SummaryRecord]:
    """The session's windows of ``latents`` compressed, chained and signed as the pipeline does
    (``window`` latents each: smaller windows give more summaries of real text)."""
    d = model.config.dim
    starts = list(range(0, len(latents), window))
    x = torch.zeros((len(starts), window, d))
    lengths = torch.tensor([min(window, len(latents) - s) for s in starts])
    for i, s in enumerate(starts):
        x[i, :lengths[i]] = torch.from_numpy(latents[s:s + window])
    tokens = []
    with torch.inference_mode():
        for b in range(0, len(starts), 16):
            tokens.append(model.encode(x[b:b + 16], lengths[b:b + 16]).to(torch.float16).numpy())
    tokens = np.concatenate(tokens)
    out, version = [], operator_version(None)
    for i, s in enumerate(starts):
        w = first_window + i
        rec = seal(SummaryRecord(
            schema_version=2, session_id=session_id, window_index=w, seq_start=w * window,
            seq_end=w * window + int(lengths[i]), cut="full" if lengths[i] == window else "close",
            token_count=tokens.shape[1], dim=d, tokens_dtype="fp16", tokens=tokens[i].astype("<f2").tobytes(),
            operator_version=version, producer_id=b"\x01" * 16, latents_dtype="fp32", latent_dim=d,
            event_time_us=time.time_ns() // 1000 + w, prev_hash=prev_hash, hash=b"", signature=b"", key_id=""), key)
        out.append(rec)
        prev_hash = rec.hash
    return out


def write_session(uri: str, options, model, key, session_id: str, latents: np.ndarray,
                  window: int = WINDOW) -> list[SummaryRecord]:
    records = sealed_summaries(model, key, session_id, latents, window=window)
    EpisodicStore(uri, options).append(records)
    return records


def cue(latent: np.ndarray, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (latent + noise * np.linalg.norm(latent) / np.sqrt(len(latent))
            * rng.standard_normal(latent.shape)).astype(np.float32)


def wait_healthy(port: int, server, log) -> None:
    """Wait for a `memstream serve` subprocess to answer /v1/health (its log on failure)."""
    import time

    import httpx

    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.5)
