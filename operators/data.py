"""Latents for training and evaluation: real text through the offline MiniLM model.

MiniLM on two CPU cores makes a few thousand latents a second, so latents are cached as
float16 .npy files keyed by a hash of the text; a second training run starts at once.
The split is by whole corpus text, so held-out windows share no sentence with training.
"""

from __future__ import annotations

import hashlib
import os
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from memstream import settings
from memstream.errors import ConfigError
from memstream.text_latents import corpus_texts, text_to_latents

# Held out of training and validation: the eval command and the tests read these.
HELDOUT_TEXTS = ("license:Apache-2.0", "pydoc:logging", "pydoc:pathlib", "pydoc:sqlite3", "pydoc:threading")
# Validation (model selection and the logged validation loss); everything else trains.
VALIDATION_TEXTS = ("pydoc:json", "pydoc:tarfile")
_WEAKREFS = re.compile(r"\[<weakref; to '[^']*'>(?:, <weakref; to '[^']*'>)*\]")


def cache_dir() -> Path:
    return settings.cache_dir() / "latents"


def cached_text_latents(text: str, cache: Path | None = None) -> np.ndarray:
    """Latents [n, 384] float32 of ``text``, computed once and then read from the cache."""
    cache = cache or cache_dir()
    path = cache / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.npy"
    if path.exists():
        return np.load(path).astype(np.float32)
    latents = text_to_latents(text)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, latents.astype(np.float16))  # half the disk; MiniLM states fit fp16 easily
    tmp.replace(path)
    return latents.astype(np.float16).astype(np.float32)  # the same values a cache hit returns


@lru_cache(maxsize=1)  # rendering the pydoc pages takes seconds
def split_corpus() -> dict[str, dict[str, str]]:
    """The corpus texts by split: {"train": {...}, "validation": {...}, "heldout": {...}} (do not mutate)."""
    # pydoc prints default values such as "<object object at 0x7f...>" and, for logging,
    # ``handlerList=[<weakref; to 'StreamHandler'>, ...]`` (as many as the process has made
    # handlers): drop the addresses and the weakref lists, which change from process to process,
    # so the texts (and their cache keys) are stable.
    texts = {name: _WEAKREFS.sub("[...]", re.sub(r" at 0x[0-9a-f]+", "", text)) for name, text in corpus_texts().items()}
    missing = [n for n in HELDOUT_TEXTS + VALIDATION_TEXTS if n not in texts]
    if missing:
        raise ConfigError(f"corpus texts missing on this machine: {missing}")
    out: dict[str, dict[str, str]] = {"train": {}, "validation": {}, "heldout": {}}
    for name, text in texts.items():
        split = "heldout" if name in HELDOUT_TEXTS else "validation" if name in VALIDATION_TEXTS else "train"
        out[split][name] = text
    return out


def split_latents(split: str, cache: Path | None = None) -> dict[str, np.ndarray]:
    return {name: cached_text_latents(text, cache) for name, text in split_corpus()[split].items()}


def windows_of(latents: np.ndarray, window: int) -> np.ndarray:
    """Whole windows [W, window, d] of one text; the partial window at the end is dropped."""
    w = len(latents) // window
    return latents[: w * window].reshape(w, window, latents.shape[1])


def heldout_text() -> str:
    """The held-out texts as one document (one session's worth of unseen prose)."""
    heldout = split_corpus()["heldout"]
    return "\n\n".join(heldout[name] for name in HELDOUT_TEXTS)
