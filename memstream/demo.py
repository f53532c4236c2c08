"""``memstream demo``: the README's main job, end to end on embedded defaults.

1. start Kafka and S3 (SeaweedFS) in a fresh stack folder and create the topics;
2. publish real latents (MiniLM token states of Python's own documentation) for several
   sessions through the SDK;
3. run the episodic pipeline on Prism until the latents topic is drained: windows of 4,096
   latents, compressed by the default checkpoint, hash-chained, signed, written to the
   episodic store (a local LanceDB folder) and to the summaries topic;
4. verify every session's chain from the topic and from the store;
5. read each session back through the read API: a noisy cue of one of its latents must find
   the window that latent was in, with verified provenance;
6. recall across sessions: reads of the first session are offered to the write policy
   (query-time retention), the session is consolidated and collected by session GC, and a
   query in another session must then be answered from the long-term entries the first
   session's reads and consolidation wrote, signature, Merkle inclusion and triggering query
   checked;
7. print a table and stop every service by PID.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from memstream import text_latents, topics
from memstream.crypto.datakeys import MasterKey
from memstream.crypto.keys import KeyRing, SigningKey, write_key_file
from memstream.episodic.chain import verify_chain
from memstream.episodic.store import EpisodicStore
from memstream.infra import runners
from memstream.infra.stack import Stack
from memstream.longterm.entry import query_hash
from memstream.longterm.retention import Retention, read_query
from memstream.longterm.store import LongTermStore
from memstream.maintenance.consolidate import consolidate_sessions, consolidation_query
from memstream.maintenance.episodic import collect_sessions
from memstream.pipelines.episodic import EpisodicConfig
from memstream.pipelines.episodic import run as run_pipeline
from memstream.read.memory import Memory
from memstream.sdk import Publisher
from memstream.storage.keytable import KeyTable
from memstream.topics import read_summaries

DEMO_TEXTS = ("pydoc:json", "pydoc:pathlib", "pydoc:dataclasses", "pydoc:functools")


def run(sessions: int = 3, keep: bool = False) -> int:
    root = Path(tempfile.mkdtemp(prefix="memstream-demo-"))
    stack = Stack(root)
    try:
        t0 = time.monotonic()
        stack.up()
        bootstrap = stack.kafka_bootstrap()
        topics.create_topics(bootstrap)
        print(f"services up in {time.monotonic() - t0:.1f}s: Kafka {bootstrap}, S3 {stack.s3_config().endpoint}")

        key_file = root / "validator.pem"
        key = SigningKey.generate()
        write_key_file(key_file, key, "validator")
        master_key_file = MasterKey.generate().write(root / "master.key")
        keys = KeyTable.open(str(root / "episodic"), None, str(master_key_file))

        corpus = text_latents.corpus_texts()
        names = [n for n in DEMO_TEXTS if n in corpus][:sessions]
        published: dict[str, int] = {}
        kept: dict[str, list] = {}  # what was published, to read back
        t0 = time.monotonic()
        with Publisher(bootstrap, keys=keys) as pub:  # each session's latents sealed under its own data key
            for name in names:
                session_id = name.replace(":", "-")
                with pub.session(session_id) as session:
                    for part in text_latents.iter_latents(corpus[name]):
                        session.publish(part)
                        kept.setdefault(session_id, []).append(part)
                published[session_id] = pub.stats.latents - sum(published.values())
        print(f"published {sum(published.values())} MiniLM latents in {len(published)} sessions "
              f"({time.monotonic() - t0:.1f}s, mostly the MiniLM encoder)")

        config = EpisodicConfig(bootstrap=bootstrap, store_uri=str(root / "episodic"), key_file=str(key_file),
                                until_idle=True, master_key_file=str(master_key_file))
        t0 = time.monotonic()
        run_pipeline(config, runners.prism_options(streaming=False))
        elapsed = time.monotonic() - t0

        ring = KeyRing([key])
        on_topic = read_summaries(bootstrap)
        store = config.store()
        print(f"\n{'session':22} {'latents':>8} {'windows':>8} {'partial':>8}  {'chain (topic / store)':22} head")
        for session_id, n in published.items():
            topic_records = [r for r in on_topic if r.session_id == session_id]
            stored = store.records(session_id)
            a, b = verify_chain(session_id, topic_records, ring), verify_chain(session_id, stored, ring)
            covered = sum(r.seq_end - r.seq_start for r in stored)
            status = "ok / ok" if a.ok and b.ok and covered == n else f"{a.fault or b.fault or 'latents missing'}"
            print(f"{session_id:22} {n:8} {len(stored):8} {sum(r.partial for r in stored):8}  {status:22} "
                  f"{b.head_hash.hex()[:16]}")
        total = sum(published.values())
        print(f"\npipeline: {total} latents in {elapsed:.1f}s on Prism, {total / elapsed:,.0f} latents/s "
              f"end to end (start-up included); store {config.store_uri}")
        found = read_back(config.store_uri, ring, kept, keys)
        recalled = cross_session_recall(config.store_uri, str(root / "longterm"), key, kept, keys)
        return 0 if found == len(kept) and recalled else 1
    finally:
        if not keep:
            stack.down()
            print("services stopped")


def read_back(store_uri: str, ring, kept: dict[str, list], keys: KeyTable | None = None) -> int:
    """Read every session through the read API with a noisy cue of a latent from its middle;
    print where the cue was found. Returns how many sessions found the right window."""
    rng = np.random.default_rng(0)
    found = 0
    print(f"\n{'read back':22} {'latent':>8} {'window':>8} {'found':>8}  provenance")
    with Memory(store_uri, keyring=ring, keys=keys) as memory:
        for session_id, parts in kept.items():
            latents = np.concatenate([np.asarray(p, np.float32) for p in parts])
            pos = len(latents) // 2
            x = latents[pos]
            cue = x + 0.5 * np.linalg.norm(x) / np.sqrt(len(x)) * rng.standard_normal(len(x)).astype(np.float32)
            top = memory.read(cue, session_id, k=1, route="episodic").fragments[0].provenance
            ok = top.seq_start <= pos < top.seq_end and top.verified
            found += ok
            print(f"{session_id:22} {pos:8} {pos // 4096:8} {top.window_index:8}  "
                  f"{'signature ok' if top.verified else 'NOT VERIFIED'}, hash {top.hash[:16]}")
    return found


def cross_session_recall(store_uri: str, longterm_uri: str, key: SigningKey, kept: dict[str, list],
                         keys: KeyTable | None = None, reads: int = 12) -> bool:
    """Session A reads with query-time retention on, then is consolidated and collected; a
    query in session B about what A read must be answered from long-term entries A wrote,
    with verified provenance. Prints what happened; returns whether the recall held."""
    sessions = list(kept)
    if len(sessions) < 2:
        print("cross-session recall needs two sessions")
        return False
    a, b = sessions[0], sessions[1]
    ring = KeyRing([key])
    latents = np.concatenate([np.asarray(p, np.float32) for p in kept[a]])
    rng = np.random.default_rng(1)
    positions = sorted(rng.choice(len(latents), reads, replace=False).tolist())
    writer = LongTermStore(longterm_uri, keyring=ring, signer=key, keys=keys)  # seals payloads under subject keys
    retention = Retention(writer)
    asked: dict[str, int] = {}  # query hash -> position of the latent the query was about
    with Memory(store_uri, longterm_uri, keyring=ring, retention=retention, keys=keys) as memory:
        for i, pos in enumerate(positions):
            q = _noisy(latents[pos], rng)
            memory.read(q, a, k=2, route="episodic")
            asked[query_hash(read_query(a, q))] = pos
    st = retention.stats
    print(f"\nsession {a}: {st.offered} reads offered to the write policy, {st.kept} retained, {st.written} written "
          f"in {st.batches} batch(es) off the read path")
    episodic = EpisodicStore(store_uri)
    windows = {r.window_index: r for r in episodic.records(a)}
    # The sleep and GC sign their records with a maintenance key of their own: the validator key
    # signs summaries and long-term entries, and one key never serves two roles.
    maintenance = SigningKey.generate()
    slept = consolidate_sessions(store_uri, None, writer, key=maintenance, retention_s=1e9, closed=[a], keys=keys)
    record = episodic.consolidation(a)
    distilled = {query_hash(consolidation_query(windows[int(s.split(":")[0])])): windows[int(s.split(":")[0])]
                 for s in (record.summaries if record else [])}
    print(f"session {a}: consolidation moved windows {[int(s.split(':')[0]) for s in record.summaries]} "
          f"(reads {record.reads}) to long-term memory" if record else f"session {a}: NOT consolidated")
    gc = collect_sessions(store_uri, retention_s=1e9, key=maintenance, closed=[a])
    print(f"session {a}: collected by session GC after consolidation: {a in gc['collected']}; "
          f"episodic summaries left: {len(episodic.hashes(a))}")
    retained = {h: asked[h] for h in writer.rows(["query_hash"])["query_hash"].to_pylist() if h in asked}
    writer.close()
    ok = bool(retained and slept["entries"] and a in gc["collected"] and not episodic.hashes(a))

    print(f"\n{'recall in ' + b:30} {'about':>6} {'entry':>10} {'written by':>22} {'cos':>6}  provenance")
    recalled = 0
    probes = sorted(retained.values())[:6]  # what long-term memory holds of A's reads
    with Memory(store_uri, longterm_uri, keyring=ring, keys=keys) as memory:
        for pos in probes:
            q = _noisy(latents[pos], rng)  # a new query about what session A read
            res = memory.read(q, b, k=3, route="both")
            lt = [f for f in res.fragments if f.source == "longterm"]
            if not lt:
                print(f"{'':30} {pos:6} no long-term fragment")
                continue
            top = lt[0]
            p = top.provenance
            tier, entry = memory.longterm.get([p.entry_id])[p.entry_id]
            try:
                entry.verify(memory.longterm.store_id, ring)  # id, key binding, Ed25519
                memory.longterm.inclusion_proof(p.entry_id).verify(ring)  # Merkle path to a signed head
                verified = True
            except Exception as e:  # noqa: BLE001 - reported, and the recall fails
                verified, why = False, f"{type(e).__name__}: {e}"
            if p.query_hash in asked:
                source = f"read of {a}"
                right = asked[p.query_hash] == pos
            elif p.query_hash in distilled:
                w = distilled[p.query_hash]
                source = f"consolidation w{w.window_index}"
                right = w.seq_start <= pos < w.seq_end
            else:
                source, right = "another session", False
            good = verified and right
            recalled += good
            print(f"{'':30} {pos:6} {p.entry_id[:10]} {source:>22} {top.score:6.3f}  "
                  f"{'signature + inclusion ok' if verified else 'NOT VERIFIED ' + why}, query {p.query_hash[:12]}"
                  f"{'' if right else ' (wrong memory)'}")
    print(f"cross-session recall: {recalled}/{len(probes)} queries in {b} answered from {a}'s long-term entries, "
          "provenance verified")
    return ok and bool(probes) and recalled == len(probes)


def _noisy(x: np.ndarray, rng) -> np.ndarray:
    return (x + 0.5 * np.linalg.norm(x) / np.sqrt(len(x)) * rng.standard_normal(len(x))).astype(np.float32)
