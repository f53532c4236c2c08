"""How far the episodic pipeline has got in one partition of the latents topic: the offset it may
commit, so that a restart reads from there and nothing before it.

A record is *done* once it was handled (an ack) and every window that needs it to rebuild a
session's state is stored. The windows that need records are the *pins*: the window cutter
reports, for each record that changes a session's state, the window that will capture it
(:attr:`memstream.episodic.window.Fed.pin`); once that window is stored (``sealed``), its
pins no longer hold anything back. The committable offset is the lowest offset that is
either not yet acked or pinned by a window not yet stored.

Acks and seals arrive by different paths of a pipeline, in any order, and each may arrive again
after a retry: every update here is idempotent and commutes. A pin travels with the ack of its
record and is applied just before it. A session is
forgotten once every record its stored windows captured is behind the frontier, since no
update about those windows can come after that. Pure: no Kafka, no runner.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass
class PartitionProgress:
    """``PartitionProgress(start)``: progress over one partition from offset ``start`` on."""

    frontier: int  # every offset below it is acked
    spans: dict[int, int] = field(default_factory=dict)  # acked ranges beyond the frontier: first -> last
    pins: dict[str, dict[int, int]] = field(default_factory=dict)  # session -> window -> first offset it needs
    sealed: dict[str, list[int]] = field(default_factory=dict)  # session -> [stored head window, its last offset]

    def ack(self, first: int, last: int) -> None:
        """Offsets ``first..last`` (inclusive) were handled."""
        if last < self.frontier:
            return
        first = max(first, self.frontier)
        if first == self.frontier:
            self.frontier = last + 1
            while self.frontier in self.spans:  # join the ranges that now touch the frontier
                self.frontier = self.spans.pop(self.frontier) + 1
            self.spans = {f: la for f, la in self.spans.items() if la >= self.frontier}
        else:
            self.spans[first] = max(last, self.spans.get(first, last))
        self._prune()

    def pin(self, session: str, window: int, offset: int) -> None:
        """Window ``window`` of ``session`` needs the record at ``offset`` (and all after it).
        A pin comes with its record's ack and is applied before it: one behind the frontier is a
        repeat of one already applied (and perhaps released), so it is ignored."""
        head = self.sealed.get(session, [-1, -1])[0]
        if window > head and offset >= self.frontier:
            windows = self.pins.setdefault(session, {})
            windows[window] = min(offset, windows.get(window, offset))

    def seal(self, session: str, window: int, last_offset: int) -> None:
        """Window ``window`` of ``session`` is stored; ``last_offset`` is the last record it captured."""
        head = self.sealed.get(session)
        if head is None or window > head[0]:
            self.sealed[session] = [window, max(last_offset, head[1] if head else -1)]
        windows = self.pins.get(session, {})
        for w in [w for w in windows if w <= window]:
            del windows[w]
        if not windows:
            self.pins.pop(session, None)
        self._prune()

    def committable(self) -> int:
        """The offset a restart may read from: below it, everything is acked and stored."""
        needed = [min(windows.values()) for windows in self.pins.values() if windows]
        return min([self.frontier, *needed])

    def _prune(self) -> None:
        for session in [s for s, (_, last) in self.sealed.items() if last < self.frontier and s not in self.pins]:
            del self.sealed[session]

    def to_bytes(self) -> bytes:
        return json.dumps({"frontier": self.frontier, "spans": self.spans, "pins": self.pins,
                           "sealed": self.sealed}, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> "PartitionProgress":
        d = json.loads(raw)
        return cls(d["frontier"], {int(k): v for k, v in d["spans"].items()},
                   {s: {int(w): o for w, o in ws.items()} for s, ws in d["pins"].items()}, d["sealed"])
