"""A session's summary window in memory, and the two-stage episodic read over it.

The exact read cross-attends the query over every slot of every summary (512 slots each, up
to 1,220 summaries). On real latents that attention is broad, spread over dozens of summaries
(docs/read.md has the measurements), so candidates picked from one mean per summary miss
summaries that matter. The two-stage read instead:

1. **coarse**: when a summary arrives its slots are grouped by direction (k-means into
   ``groups`` groups); a query's projected cue is scored against the unit mean direction of
   every group, plus the summary's decay bias, and the slots of the ``probe`` best groups are
   scored as the decoder scores them, which gives each summary a partial share;
2. **exact**: the ``candidates`` summaries with the largest partial shares are read whole,
   together with the probed slots of the other summaries (as whole tokens; all but those whose
   weights sum to under ``union_tail`` of theirs), in one pass of the decoder (:meth:`Compressor.attend <memstream.operators.model.Compressor.attend>`, decay
   biases added to the logits as in the exact read). The fragments are the candidates that
   drew the most of that attention; the reconstruction is that pass's output.

A window of at most ``candidates`` summaries is read exactly. Groups depend only on their
summary's tokens, so the index changes by one summary as summaries arrive and leave, and
two processes holding the same summaries pick the same candidates whatever their history.

Tokens are held as fp16 (what the store holds), in chunks of summaries so that growing never
copies the window (a new chunk holds what is being added, at least an eighth more); the coarse scores are fp16 dot products, and the decoder
runs on fp32 copies of the tokens it reads. A summary's slots are kept in group order,
re-paired into tokens: every token of a summary carries the same bias, so the decoder's
output over them is unchanged.

Reads run concurrently with each other and with ``add``/``remove``: a read works on a
snapshot of the index, and the storage of a removed summary is reused only once every read
that could still see it has finished.
"""

from __future__ import annotations

import bisect
import collections
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from memstream.errors import ConfigError, IntegrityError
from memstream.settings import (READ_CANDIDATES, READ_GROUP_ITERS, READ_GROUPS, READ_PROBE_GROUPS, READ_UNION_TAIL,
                                SUMMARY_TOKENS)

MIN_CHUNK = 4  # summaries in the smallest storage chunk
SLACK = 8  # a new chunk holds at least 1/SLACK of the summaries held (bounded slack, few chunks)


@dataclass(frozen=True)
class WindowRead:
    """What one read of a window found: the top summaries (window indices, best first), the
    share of the decoder's attention each drew, each one's own reconstruction of the query,
    the reconstruction over everything read, and how much was read."""

    windows: list[int]
    shares: list[float]
    latents: torch.Tensor  # [k, d]
    reconstruction: torch.Tensor  # [d]
    candidates: int  # summaries read whole
    tokens_read: int  # tokens the decoder attended over, both stages


def group_slots(model, tokens: torch.Tensor, groups: int, iters: int = READ_GROUP_ITERS):
    """k-means of each summary's slots by direction: tokens [n, T, d] -> (order [n, S]: the
    slots sorted by group, sizes [n, g], unit mean direction of each group [n, g, rank]). It
    starts from evenly spaced slots and takes a fixed number of Lloyd steps, so the grouping
    is a function of the summary alone."""
    n = tokens.shape[0]
    with torch.no_grad():
        unit = F.normalize(model.slots_of(tokens), dim=-1)  # [n, S, r]
        s = unit.shape[1]
        g = min(groups, s)
        centre = unit[:, torch.linspace(0, s - 1, g).long()]
        for _ in range(iters):
            assign = torch.bmm(unit, centre.transpose(1, 2)).argmax(-1)
            total = unit.new_zeros(n, g, unit.shape[-1]).scatter_add_(1, assign[..., None].expand_as(unit), unit)
            centre = torch.where(total.norm(dim=-1, keepdim=True) > 0, F.normalize(total, dim=-1), centre)
        assign = torch.bmm(unit, centre.transpose(1, 2)).argmax(-1)
        total = unit.new_zeros(n, g, unit.shape[-1]).scatter_add_(1, assign[..., None].expand_as(unit), unit)
        return torch.argsort(assign, dim=1, stable=True), F.one_hot(assign, g).sum(1), F.normalize(total, dim=-1)


class SessionWindow:
    """The summaries of one session held for reading: ``add(window, tokens)`` as they arrive,
    ``remove(window)`` as they leave, ``read(query, biases, k)``.

    ``groups``, ``probe`` and ``candidates`` set the two-stage read (see the module);
    ``exact=True`` in :meth:`read` attends over every token instead."""

    def __init__(self, model, *, groups: int = READ_GROUPS, probe: int = READ_PROBE_GROUPS,
                 candidates: int = READ_CANDIDATES, iters: int = READ_GROUP_ITERS,
                 union_tail: float = READ_UNION_TAIL, tokens_per_summary: int = SUMMARY_TOKENS):
        if groups < 1 or probe < 1 or candidates < 1:
            raise ConfigError(f"the two-stage read needs groups, probe and candidates >= 1, got {groups}, {probe}, "
                              f"{candidates}")
        self.model = model
        self.dim, self.rank = model.config.dim, model.config.rank
        self.spt = model.config.slots_per_token
        self.kappa = float(model.log_kappa.detach().exp())
        self.T = tokens_per_summary
        self.S = tokens_per_summary * self.spt  # slots per summary
        self.groups, self.probe, self.candidates, self.iters = min(groups, self.S), probe, candidates, iters
        self.union_tail = union_tail
        self._chunks: list[torch.Tensor] = []  # [n, T, d] fp16 each
        self._first: list[int] = []  # first slab of each chunk
        self._direction = torch.zeros(0, self.rank)  # [slabs * g, r]: unit mean direction of each group
        self._sizes = torch.zeros(0, self.groups, dtype=torch.long)  # [slabs, g] slots per group (0: free slab)
        self._count = torch.zeros(0, dtype=torch.long)  # tokens per slab (0: free)
        self._norms = torch.zeros(0, self.S)  # slot norms per slab, for the coarse scores
        self._centroid = torch.zeros(0, self.rank)  # mean slot per slab (the routing policy's features)
        self._slab_of: dict[int, int] = {}  # window index -> slab
        self._free: list[int] = []
        self._freed: list[tuple[int, int]] = []  # (generation, slab) removed, maybe still seen by a read
        self._generation = 0
        self._reading: collections.Counter = collections.Counter()  # generation at start -> active reads
        self._lock = threading.Lock()

    # -- the index ------------------------------------------------------------------------
    @property
    def windows(self) -> list[int]:
        return sorted(self._slab_of)

    def __len__(self) -> int:
        return len(self._slab_of)

    def __contains__(self, window: int) -> bool:
        return window in self._slab_of

    @property
    def nbytes(self) -> int:
        """Bytes this window holds: fp16 tokens (whole chunks) and the index."""
        return sum(c.numel() * c.element_size() for c in self._chunks) + sum(
            t.numel() * t.element_size()
            for t in (self._direction, self._sizes, self._count, self._norms, self._centroid))

    def add(self, window: int, tokens) -> None:
        """Hold a summary's tokens [T, d] (fp16 as stored; other dtypes are converted)."""
        self.add_many([(window, tokens)])

    def add_many(self, items) -> None:
        """Hold several summaries at once (the grouping runs batched): [(window, tokens [T, d])]."""
        items = [(int(w), t if isinstance(t, torch.Tensor) else torch.from_numpy(np.asarray(t))) for w, t in items]
        for w, t in items:
            if t.dim() != 2 or t.shape[1] != self.dim:
                raise IntegrityError(f"summary {w}: tokens of shape {tuple(t.shape)}, the decoder reads [n, {self.dim}]")
            if not 0 < t.shape[0] <= self.T:
                raise IntegrityError(f"summary {w} has {t.shape[0]} tokens; a window holds 1..{self.T} per summary")
        for w, _ in items:
            self.remove(w)
        with self._lock:
            self._reserve(len(items))  # one chunk for a whole load
        for start in range(0, len(items), 256):  # bounded fp32 scratch for the grouping
            batch = items[start:start + 256]
            by_len: dict[int, list[int]] = {}
            for i, (_, t) in enumerate(batch):
                by_len.setdefault(t.shape[0], []).append(i)
            for n_tok, idx in by_len.items():
                toks = torch.stack([batch[i][1] for i in idx]).to(torch.float16)
                order, sizes, direction = group_slots(self.model, toks, self.groups, self.iters)
                # Slots re-paired into tokens in group order: a summary's tokens share one bias,
                # so the decoder's output over them does not change.
                flat = toks.view(len(idx), -1, self.rank)
                toks = flat.gather(1, order[..., None].expand_as(flat)).view_as(toks)
                slots = self.model.slots_of(toks)  # fp32 [n, slots, r]
                centroid, norms = slots.mean(-2), slots.norm(dim=-1).clamp_min(1e-12)
                g = sizes.shape[1]
                with self._lock:
                    self._reserve(len(idx))
                    mapping = dict(self._slab_of)  # readers keep the old mapping
                    for j, i in enumerate(idx):
                        slab = self._free.pop()
                        chunk, row = self._where(slab)
                        self._chunks[chunk][row, :n_tok] = toks[j]
                        self._direction[slab * self.groups: slab * self.groups + g] = direction[j]
                        self._norms[slab, :n_tok * self.spt] = norms[j]
                        self._centroid[slab] = centroid[j]
                        self._count[slab] = n_tok
                        self._sizes[slab, :g] = sizes[j]
                        mapping[batch[i][0]] = slab
                    self._slab_of = mapping

    def remove(self, window: int) -> None:
        with self._lock:
            slab = self._slab_of.get(int(window))
            if slab is None:
                return
            self._slab_of = {w: s for w, s in self._slab_of.items() if w != int(window)}
            self._count[slab] = 0
            self._sizes[slab] = 0
            self._generation += 1
            self._freed.append((self._generation, slab))

    def _reserve(self, n: int) -> None:
        """At least ``n`` free slabs (under the lock): those no read can still see, else a new chunk."""
        oldest = min(self._reading, default=self._generation + 1)
        self._free += [slab for gen, slab in self._freed if gen <= oldest]
        self._freed = [(gen, slab) for gen, slab in self._freed if gen > oldest]
        need = n - len(self._free)
        if need <= 0:
            return
        size = max(need, MIN_CHUNK, len(self._count) // SLACK)
        base = len(self._count)
        grow = lambda t, *shape: torch.cat([t, t.new_zeros(*shape)])  # noqa: E731
        # New tensors, so that a read keeps a consistent view of the old ones.
        self._direction = grow(self._direction, size * self.groups, self.rank)
        self._sizes = grow(self._sizes, size, self.groups)
        self._count = grow(self._count, size)
        self._norms = grow(self._norms, size, self.S)
        self._centroid = grow(self._centroid, size, self.rank)
        self._chunks = [*self._chunks, torch.zeros(size, self.T, self.dim, dtype=torch.float16)]
        self._first = [*self._first, base]
        self._free = list(range(base + size - 1, base - 1, -1)) + self._free

    def _where(self, slab: int) -> tuple[int, int]:
        chunk = bisect.bisect_right(self._first, slab) - 1
        return chunk, slab - self._first[chunk]

    def tokens(self, window: int) -> torch.Tensor:
        """A summary's tokens [T, d] fp16 (its slots in group order)."""
        slab = self._slab_of[int(window)]
        chunk, row = self._where(slab)
        return self._chunks[chunk][row, :int(self._count[slab])]

    def centroids(self) -> np.ndarray:
        """The mean slot of each summary, in window order [n, rank] (routing features)."""
        mapping = self._slab_of
        return self._centroid[[mapping[w] for w in sorted(mapping)]].numpy()

    # -- reading --------------------------------------------------------------------------
    def read(self, query: torch.Tensor, biases: dict[int, float] | None, k: int, *, exact: bool = False) -> WindowRead:
        """Read the ``k`` summaries that draw the most attention from ``query`` [d] (fp32),
        with ``biases`` (window index -> decay bias, 0 when absent) added to their logits."""
        with self._lock:
            v = _View(self._chunks, self._first, self._direction, self._sizes.clone(), self._count.clone(),
                      self._norms, self._slab_of)
            started = self._generation
            self._reading[started] += 1
        try:
            return self._read(v, query, biases, k, exact)
        finally:
            with self._lock:
                self._reading[started] -= 1
                if not self._reading[started]:
                    del self._reading[started]

    def _read(self, v: "_View", query, biases, k: int, exact: bool) -> WindowRead:
        if not v.slab_of:
            raise ConfigError("the window holds no summary")
        q = query.float().reshape(1, self.dim)
        bias = torch.zeros(len(v.count))
        for w, b in (biases or {}).items():
            slab = v.slab_of.get(int(w))
            if slab is not None:
                bias[slab] = float(b)
        live = torch.tensor(sorted(v.slab_of.values()), dtype=torch.long)
        probed = torch.zeros(0, dtype=torch.long)
        with torch.no_grad():
            if exact or len(live) <= self.candidates:
                cand = live
            else:
                cand, probed = self._coarse(v, q, bias)
            ids = torch.sort(torch.cat([_ranges(cand * self.T, v.count[cand]), probed])).values
            token_slab = ids // self.T
            memory = self._rows(v, ids).float()
            norms = v.norms.view(-1)[(ids[:, None] * self.spt + torch.arange(self.spt)).view(-1)]
            out, p = self.model.attend(q, memory, bias[token_slab], norms)
            share = torch.zeros(len(v.count)).index_add_(0, token_slab, p[0].view(-1, self.spt).sum(1))
            top = cand[torch.topk(share[cand], min(k, len(cand))).indices]
            latents = self._own(v, q, top, ids, memory, norms)
        window_of = {s: w for w, s in v.slab_of.items()}
        return WindowRead([window_of[int(s)] for s in top], [float(share[s]) for s in top], latents, out[0],
                          len(cand), len(ids))

    def _coarse(self, v: "_View", q: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate slabs, and the probed tokens of the others (global token ids). Probed
        slots are scored as the decoder scores them (cosine to the projected cue times its
        temperature, plus the bias), from the fp16 slots and the norms kept at add."""
        zq = F.normalize(self.model.project(q)[0], dim=0)
        g, S = self.groups, self.S
        sizes = v.sizes.view(-1)
        valid = sizes > 0
        direction = v.direction[:len(sizes)]
        score = torch.where(valid, (direction @ zq) * self.kappa + bias.repeat_interleave(g), -torch.inf)
        top = torch.sort(torch.topk(score, min(self.probe, int(valid.sum()))).indices).values
        starts = (top // g) * S + (torch.cumsum(v.sizes, 1) - v.sizes).view(-1)[top]
        slot_ids = _ranges(starts, sizes[top])  # ascending: groups in order, each a run of slots
        slot_slab = slot_ids // S
        logits = ((self._rows(v, slot_ids, slots=True) @ zq.half()).float() / v.norms.view(-1)[slot_ids] * self.kappa
                  + bias[slot_slab])
        weight = torch.exp(logits - logits.max())
        partial = torch.zeros(len(v.count)).index_add_(0, slot_slab, weight)
        hit = torch.unique_consecutive(slot_slab)
        cand = hit[torch.topk(partial[hit], min(self.candidates, len(hit))).indices]
        # The probed slots of the other summaries stay in the exact stage (as whole tokens): they
        # hold most of the attention those summaries would draw. Those whose weights together
        # are under ``union_tail`` of it are left out.
        others = ~torch.isin(slot_slab, cand)
        w = weight[others]
        if self.union_tail > 0 and len(w):
            ranked = torch.sort(w, descending=True).values
            cut = int((torch.cumsum(ranked, 0) < (1 - self.union_tail) * ranked.sum()).sum())
            others &= weight >= ranked[min(cut, len(ranked) - 1)]
        return torch.sort(cand).values, torch.unique_consecutive(slot_ids[others] // self.spt)

    def _own(self, v: "_View", q: torch.Tensor, slabs: torch.Tensor, ids: torch.Tensor, memory: torch.Tensor,
             norms: torch.Tensor) -> torch.Tensor:
        """Each summary's own reconstruction of the query (the decoder over it alone), from
        the tokens the exact stage read (``memory``, rows ``ids``, slot ``norms``)."""
        first = torch.searchsorted(ids, slabs * self.T)
        counts = v.count[slabs]
        if len(slabs) and bool((counts == counts[0]).all()):
            rows = (first[:, None] + torch.arange(int(counts[0]))).view(-1)
            slot_rows = (rows[:, None] * self.spt + torch.arange(self.spt)).view(-1)
            return self.model.attend(q.expand(len(slabs), 1, -1), memory[rows].view(len(slabs), int(counts[0]), -1),
                                     None, norms[slot_rows].view(len(slabs), -1))[0][:, 0]
        return torch.stack([self.model.attend(q, memory[f:f + c], None, norms[f * self.spt:(f + c) * self.spt])[0][0]
                            for f, c in zip(first.tolist(), counts.tolist())])

    def _rows(self, v: "_View", ids: torch.Tensor, slots: bool = False) -> torch.Tensor:
        """Tokens (or, with ``slots``, slots) by sorted global id, fp16 [len, width]."""
        width = self.rank if slots else self.dim
        per = self.T * (self.spt if slots else 1)  # rows per slab
        firsts = [f * per for f in v.first]
        bounds = torch.searchsorted(ids, torch.tensor(firsts[1:] + [len(v.count) * per])).tolist()
        out = torch.empty(len(ids), width, dtype=torch.float16)
        lo = 0
        for c, hi in enumerate(bounds):
            if hi > lo:
                torch.index_select(v.chunks[c].view(-1, width), 0, ids[lo:hi] - firsts[c], out=out[lo:hi])
            lo = hi
        return out


@dataclass(frozen=True)
class _View:
    """What one read sees: the storage and index as they were when it started."""

    chunks: list
    first: list
    direction: torch.Tensor
    sizes: torch.Tensor
    count: torch.Tensor
    norms: torch.Tensor
    slab_of: dict


def _ranges(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Concatenated aranges: [starts[i], starts[i] + lengths[i]) for every i."""
    total = int(lengths.sum())
    if not total:
        return torch.zeros(0, dtype=torch.long)
    before = torch.cumsum(lengths, 0) - lengths
    return torch.repeat_interleave(starts - before, lengths) + torch.arange(total)
