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
                     prev_hash: bytes = b"") -> list[SummaryRecord]:
    """The session's windows of ``latents`` compressed, chained and signed as the pipeline does."""
    d = model.config.dim
    starts = list(range(0, len(latents), WINDOW))
    x = torch.zeros((len(starts), WINDOW, d))
    lengths = torch.tensor([min(WINDOW, len(latents) - s) for s in starts])
    for i, s in enumerate(starts):
        x[i, :lengths[i]] = torch.from_numpy(latents[s:s + WINDOW])
    with torch.inference_mode():
        tokens = model.encode(x, lengths).to(torch.float16).numpy()
    out, version = [], operator_version(None)
    for i, s in enumerate(starts):
        w = first_window + i
        rec = seal(SummaryRecord(
            schema_version=2, session_id=session_id, window_index=w, seq_start=w * WINDOW,
            seq_end=w * WINDOW + int(lengths[i]), cut="full" if lengths[i] == WINDOW else "close",
            token_count=tokens.shape[1], dim=d, tokens_dtype="fp16", tokens=tokens[i].astype("<f2").tobytes(),
            operator_version=version, producer_id=b"\x01" * 16, latents_dtype="fp32", latent_dim=d,
            event_time_us=time.time_ns() // 1000 + w, prev_hash=prev_hash, hash=b"", signature=b"", key_id=""), key)
        out.append(rec)
        prev_hash = rec.hash
    return out


def write_session(uri: str, options, model, key, session_id: str, latents: np.ndarray) -> list[SummaryRecord]:
    records = sealed_summaries(model, key, session_id, latents)
    EpisodicStore(uri, options).append(records)
    return records


def cue(latent: np.ndarray, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (latent + noise * np.linalg.norm(latent) / np.sqrt(len(latent))
            * rng.standard_normal(latent.shape)).astype(np.float32)
