"""Latents for training and evaluation: real text through the offline MiniLM model.

MiniLM on two CPU cores makes about a thousand latents a second, so latents are cached as
float16 .npy files keyed by a hash of the text; a second training run starts at once.

Training is one domain: Python's documentation (pydoc pages), split by whole page into train,
validation and held-out. Evaluation is mostly on domains absent from training
(:func:`domain_texts`): the licences under /usr/share/common-licenses, manual pages rendered by
``man`` (command references), and GNU info manuals (technical prose). The episodic pool
(:func:`episodic_pool`) is the read path's setting: a session horizon of 1,220 windows built
from all of these texts.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import os
import re
import subprocess
from functools import lru_cache
from pathlib import Path

import numpy as np

from memstream import settings
from memstream.errors import ConfigError
from memstream.text_latents import corpus_texts, text_to_latents

# Held out of training and validation: the eval command and the tests read these.
HELDOUT_TEXTS = ("license:Apache-2.0", "pydoc:logging", "pydoc:pathlib", "pydoc:sqlite3", "pydoc:threading")
# Validation (model selection and the logged validation loss); the other pydoc pages train.
VALIDATION_TEXTS = ("pydoc:json", "pydoc:tarfile")
# Domains of the corpus that never train: every licence is evaluation text only.
UNTRAINED_PREFIXES = ("license:",)
DOMAINS = ("licenses", "man", "info")  # evaluation domains absent from training
DOMAIN_CHARS = 600_000  # characters of a domain's evaluation text (about 35-45 windows); the rest joins the pool
POOL_GROUP_CHARS = 400_000  # manual pages are cached in groups of about this many characters
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
    out: dict[str, dict[str, str]] = {"train": {}, "validation": {}, "heldout": {}, "untrained": {}}
    for name, text in texts.items():
        split = ("heldout" if name in HELDOUT_TEXTS else "validation" if name in VALIDATION_TEXTS
                 else "untrained" if name.startswith(UNTRAINED_PREFIXES) else "train")
        out[split][name] = text
    return out


def split_latents(split: str, cache: Path | None = None, limit: int | None = None) -> dict[str, np.ndarray]:
    """Latents of a split's texts by name; ``limit``: only the first texts (by name) that hold that many latents."""
    out, total = {}, 0
    for name, text in sorted(split_corpus()[split].items()):
        if limit is not None and total >= limit:
            break
        out[name] = cached_text_latents(text, cache)
        total += len(out[name])
    return out


def windows_of(latents: np.ndarray, window: int) -> np.ndarray:
    """Whole windows [W, window, d] of one text; the partial window at the end is dropped."""
    w = len(latents) // window
    return latents[: w * window].reshape(w, window, latents.shape[1])


def heldout_text() -> str:
    """The held-out texts as one document (one session's worth of unseen prose)."""
    heldout = split_corpus()["heldout"]
    return "\n\n".join(heldout[name] for name in HELDOUT_TEXTS)


# -- domains absent from training ---------------------------------------------------------

MAN_SECTIONS = ("1", "2", "3", "5", "7", "8")
MAN_PER_PREFIX = 8  # at most this many pages per name prefix (``gcloud_...`` alone has thousands)


def man_pages(root: Path = Path("/usr/share/man")) -> list[Path]:
    """Manual pages of the machine in a fixed order that mixes sections and names (by a hash
    of the name), at most MAN_PER_PREFIX pages per name prefix, so a family of generated pages
    does not make up the domain."""
    pages = [p for s in MAN_SECTIONS if (root / f"man{s}").is_dir() for p in (root / f"man{s}").iterdir()
             if p.is_file()]
    pages.sort(key=lambda p: hashlib.sha256(f"{p.parent.name}/{p.name}".encode()).hexdigest())
    kept, per_prefix = [], {}
    for p in pages:
        prefix = re.split(r"[_.\-]", p.name, maxsplit=1)[0]
        if per_prefix.get(prefix, 0) < MAN_PER_PREFIX:
            per_prefix[prefix] = per_prefix.get(prefix, 0) + 1
            kept.append(p)
    return kept


def render_man(path: Path, cache: Path | None = None) -> str:
    """One page as plain text, 80 columns; cached by path, size and time (rendering takes 0.1 s a page)."""
    st = path.stat()
    key = hashlib.sha256(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:24]
    cached = (cache or settings.cache_dir() / "man") / f"{key}.txt"
    if cached.exists():
        return cached.read_text(encoding="utf-8")
    env = {**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8", "MAN_KEEP_FORMATTING": ""}
    try:
        run = subprocess.run(["man", "-P", "cat", "-l", str(path)], capture_output=True, env=env, timeout=60)
        text = re.sub(r".\x08", "", run.stdout.decode("utf-8", errors="replace"))  # no overstrike
    except (OSError, subprocess.TimeoutExpired):
        text = ""
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(cached)
    return text


def info_manuals(root: Path = Path("/usr/share/info")) -> dict[str, str]:
    """GNU info manuals by name (a manual split over ``name.info-1.gz``, ``-2`` ... is joined)."""
    parts: dict[str, list[tuple[int, Path]]] = {}
    for p in sorted(root.glob("*.info*")) if root.is_dir() else []:
        m = re.fullmatch(r"(.+)\.info(?:-(\d+))?(?:\.gz)?", p.name)
        if m:
            parts.setdefault(m.group(1), []).append((int(m.group(2) or 0), p))
    out = {}
    for name, files in sorted(parts.items()):
        text = []
        for _, p in sorted(files):
            raw = p.read_bytes()
            text.append((gzip.decompress(raw) if p.suffix == ".gz" else raw).decode("utf-8", errors="replace"))
        out[f"info:{name}"] = "\n".join(text)
    return out


def _info_nodes() -> list[tuple[str, str]]:
    """The info manuals' nodes (split at the format's \\x1f separators), manual after manual in
    an order mixed by a hash of the name, each manual's nodes in reading order: a domain text can
    stop within a long manual such as coreutils."""
    manuals = sorted(info_manuals().items(), key=lambda kv: hashlib.sha256(kv[0].encode()).hexdigest())
    return [(f"{name}#{i}", node) for name, text in manuals
            for i, node in enumerate(n for n in text.split("\x1f") if n.strip())]


def _man_iter():
    """Rendered pages, (name, text), in :func:`man_pages` order (empty and stub pages skipped)."""
    for p in man_pages():
        if len(text := render_man(p)) >= 200:  # ``.so`` links and empty pages render as a line or nothing
            yield f"man:{p.parent.name}/{p.name}", text


def _take_chars(it, budget: int) -> list[tuple[str, str]]:
    """Items of ``it`` until ``budget`` characters (the item that reaches it included)."""
    out, total = [], 0
    for name, text in it:
        out.append((name, text))
        total += len(text)
        if total >= budget:
            break
    return out


def domain_texts(domain: str) -> dict[str, str]:
    """The evaluation texts of a domain absent from training, by name, in reading order."""
    if domain == "licenses":
        return dict(sorted(split_corpus()["untrained"].items()) + [(k, v) for k, v in split_corpus()["heldout"].items()
                                                                   if k.startswith(UNTRAINED_PREFIXES)])
    if domain == "info":
        return dict(_take_chars(iter(_info_nodes()), DOMAIN_CHARS))
    if domain == "man":
        return dict(_take_chars(_man_iter(), DOMAIN_CHARS))
    raise ConfigError(f"unknown domain {domain!r}: one of {', '.join(DOMAINS)}")


def domain_text(domain: str) -> str:
    """A domain's evaluation texts as one document."""
    return "\n\n".join(domain_texts(domain).values())


def pool_texts():
    """Yields the texts of the episodic pool, (name, text), in order: each evaluation domain's
    text, the held-out pydoc pages, then the other info manuals and further manual pages in
    groups of about POOL_GROUP_CHARS (made lazily: a consumer stops when it has enough)."""
    for d in DOMAINS:
        yield f"domain:{d}", domain_text(d)
    yield "heldout", heldout_text()
    nodes, man = iter(_info_nodes()), _man_iter()
    _take_chars(nodes, DOMAIN_CHARS), _take_chars(man, DOMAIN_CHARS)  # the domains' texts, yielded above
    group, size = [], 0
    for name, text in itertools.chain(nodes, man):
        group.append((name, text))
        size += len(text)
        if size >= POOL_GROUP_CHARS:
            yield f"{group[0][0]}+{len(group) - 1}", "\n\n".join(t for _, t in group)
            group, size = [], 0
    if group:
        yield f"{group[0][0]}+{len(group) - 1}", "\n\n".join(t for _, t in group)


POOL_OFFSETS = (0, 2048, 1024, 3072)  # where later cuts of the pool's texts start (from_cache only)


def is_cached(text: str, cache: Path | None = None) -> bool:
    return ((cache or cache_dir()) / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.npy").exists()


def episodic_pool(windows: int, exclude=(), cache: Path | None = None, from_cache: bool = False):
    """Yields (name, windows [w, WINDOW, d] float32) of the pool's texts, ``windows`` windows in
    all (the last text's cut short), skipping the texts in ``exclude`` (those being evaluated).

    ``from_cache``: only the pool's texts up to the first whose latents are not cached (MiniLM
    makes a few hundred latents a second on two shared cores: a full pool of new text takes
    hours), and when their whole windows fall short, the same texts cut again from later
    offsets (names ``text@offset``): real windows of real text, but each overlaps windows of
    the first cut by half or more, so such a pool is less varied than one of new text."""
    exclude = {exclude} if isinstance(exclude, str) else set(exclude)
    left, seen = windows, []
    for offset in POOL_OFFSETS if from_cache else (0,):
        for name, text in pool_texts() if offset == 0 else seen:
            if left <= 0:
                return
            if text in exclude:
                continue
            if offset == 0 and from_cache:
                if not is_cached(text, cache):
                    break
                seen.append((name, text))
            w = windows_of(cached_text_latents(text, cache)[offset:], settings.WINDOW)[:left]
            left -= len(w)
            yield (f"{name}@{offset}" if offset else name), w
        if not seen:
            break
    if left > 0:
        raise ConfigError(f"this machine's {'cached ' if from_cache else ''}texts fill {windows - left} windows of the "
                          f"{windows} asked for: "
                          + ("the pool takes cached texts in order and stops at the first one not cached; run once "
                             "without --pool-from-cache to embed them (hours on a CPU, minutes on a GPU), or lower "
                             "--horizon" if from_cache else "lower --horizon"))
