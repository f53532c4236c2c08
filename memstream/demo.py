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
6. print a table and stop every service by PID.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from memstream import text_latents, topics
from memstream.crypto.keys import KeyRing, SigningKey, write_key_file
from memstream.episodic.chain import verify_chain
from memstream.infra import runners
from memstream.infra.stack import Stack
from memstream.pipelines.episodic import EpisodicConfig
from memstream.pipelines.episodic import run as run_pipeline
from memstream.read.memory import Memory
from memstream.sdk import Publisher
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

        corpus = text_latents.corpus_texts()
        names = [n for n in DEMO_TEXTS if n in corpus][:sessions]
        published: dict[str, int] = {}
        kept: dict[str, list] = {}  # what was published, to read back
        t0 = time.monotonic()
        with Publisher(bootstrap) as pub:
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
                                until_idle=True)
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
        found = read_back(config.store_uri, ring, kept)
        return 0 if found == len(kept) else 1
    finally:
        if not keep:
            stack.down()
            print("services stopped")


def read_back(store_uri: str, ring, kept: dict[str, list]) -> int:
    """Read every session through the read API with a noisy cue of a latent from its middle;
    print where the cue was found. Returns how many sessions found the right window."""
    rng = np.random.default_rng(0)
    found = 0
    print(f"\n{'read back':22} {'latent':>8} {'window':>8} {'found':>8}  provenance")
    with Memory(store_uri, keyring=ring) as memory:
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
