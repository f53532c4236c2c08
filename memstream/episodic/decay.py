"""Decay arithmetic of episodic summaries: how stale each summary is, from a session's read
history, and the attention bias that staleness earns. Pure: the read ledger
(:mod:`~memstream.episodic.ledger`) supplies the history, the ``episodic_decay`` DAG applies it.

A session's queries are ordered by (time, read id). A summary's *staleness* is the number of
the session's queries since it was last read, or since it was stored when it never was, so
"not read in the last K queries" is exactly ``staleness > K``.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from memstream.errors import ConfigError
from memstream.settings import DECAY_K, DECAY_SLOPE


def decay_bias(staleness: int, k: int = DECAY_K, slope: float = DECAY_SLOPE) -> float:
    """The attention bias of a summary read ``staleness`` queries ago: 0 while it was read in
    the last ``k`` queries, then falling by ``slope`` per query."""
    if k < 0 or slope < 0:
        raise ConfigError(f"decay needs k >= 0 and slope >= 0, got k={k}, slope={slope}")
    return -slope * max(0, staleness - k)


@dataclass(frozen=True)
class Staleness:
    """Of one session at one moment: its query count and each summary's staleness."""

    queries: int
    by_window: dict[int, int]


def staleness(reads: Sequence[tuple[int, Iterable[int]]], stored_at_ns: Mapping[int, int]) -> Staleness:
    """Staleness of each summary in ``stored_at_ns`` (window index -> when it was stored), given
    the session's reads in query order as (time in ns, windows returned)."""
    last_read: dict[int, int] = {}
    for pos, (_, windows) in enumerate(reads):
        for w in windows:
            last_read[w] = pos
    times = [ts for ts, _ in reads]
    out = {}
    for w, stored in stored_at_ns.items():
        if w in last_read:
            out[w] = len(reads) - 1 - last_read[w]
        else:
            out[w] = len(reads) - bisect.bisect_right(times, stored)
    return Staleness(len(reads), out)
