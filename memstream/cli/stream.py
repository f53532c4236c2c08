"""``memstream topics create`` and ``memstream publish``."""

from __future__ import annotations

import time
from pathlib import Path

from memstream import topics
from memstream.cli import common
from memstream.errors import ConfigError, TextLatentsError
from memstream.settings import CHUNK_BYTES, LATENTS_TOPIC, MAX_MESSAGE_BYTES, PARTITIONS, RETENTION_MS
from memstream.text_latents import iter_latents

_PIECE = 4096  # latents handed to the publisher at a time from a file, so the bar moves


def register(sub) -> None:
    t = sub.add_parser("topics", help="manage memstream's Kafka topics")
    verbs = t.add_subparsers(dest="verb", required=True)
    create = verbs.add_parser("create", help="create topics (the broker does not create them on use)")
    create.add_argument("names", nargs="*", default=list(topics.DEFAULT_TOPICS),
                        help=f"topic names (default: {' '.join(topics.DEFAULT_TOPICS)})")
    common.add_bootstrap(create)
    create.add_argument("--partitions", type=int, default=PARTITIONS)
    create.add_argument("--retention-hours", type=float, default=RETENTION_MS / 3_600_000,
                        help="how long the broker keeps messages (-1: forever)")
    create.add_argument("--max-message-bytes", type=int, default=MAX_MESSAGE_BYTES,
                        help=f"largest message the topic accepts (at most {MAX_MESSAGE_BYTES})")
    create.set_defaults(func=_topics_create)

    p = sub.add_parser("publish", help="publish latents of one session from .npy/.safetensors files or a text")
    p.add_argument("files", nargs="*", type=Path, help=".npy or .safetensors files of [n, d] latents, in order")
    p.add_argument("--text", type=Path, help="a UTF-8 text file: publish its MiniLM token latents (384-d)")
    p.add_argument("--session", required=True, help="session id (the Kafka key)")
    common.add_bootstrap(p)
    p.add_argument("--topic", default=LATENTS_TOPIC)
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="wire dtype (default: the files' dtype)")
    p.add_argument("--max-chunk-bytes", type=int, default=None, help="largest chunk message (default 1 MiB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--master-key-file", default=None,
                   help="seal the latents under the session's data key, from the key table of the --episodic store "
                        "that this master key unlocks (what `memstream run --master-key-file` opens)")
    common.add_episodic(p)
    p.set_defaults(func=_publish)


def _topics_create(args) -> int:
    bootstrap = common.bootstrap(args)
    retention_ms = -1 if args.retention_hours < 0 else int(args.retention_hours * 3_600_000)
    for r in topics.create_topics(bootstrap, args.names, partitions=args.partitions, retention_ms=retention_ms,
                                  max_message_bytes=args.max_message_bytes, security=common.kafka_security(args)):
        print(f"{r.name}: {'created' if r.created else 'exists'}")
    return 0


def _publish(args) -> int:
    from tqdm import tqdm

    from memstream.sdk import Publisher

    if bool(args.files) == bool(args.text):
        raise ConfigError("give either latent files or --text FILE, not both or neither")
    pieces, total = _text_pieces(args.text) if args.text else _file_pieces(args.files)
    bootstrap = common.bootstrap(args)
    started = time.monotonic()
    keys = None
    if args.master_key_file:
        from memstream.storage.keytable import KeyTable

        keys = KeyTable.open(*common.episodic(args), args.master_key_file)
    with Publisher(bootstrap, topic=args.topic, max_chunk_bytes=args.max_chunk_bytes or CHUNK_BYTES,
                   keys=keys, security=common.kafka_security(args)) as pub:
        with pub.session(args.session, dtype=args.dtype) as session, \
                tqdm(total=total, unit=" latents", disable=args.no_progress, dynamic_ncols=True) as bar:
            for piece in pieces:
                session.publish(piece)
                bar.update(len(piece))
    seconds = max(time.monotonic() - started, 1e-9)
    s = pub.stats
    print(f"session {args.session!r} on {args.topic}: {s.latents} latents in {s.chunks} chunks, "
          f"{s.bytes / 1e6:.2f} MB in {seconds:.1f} s ({s.latents / seconds:,.0f} latents/s, "
          f"{s.bytes / 1e6 / seconds:.1f} MB/s)")
    return 0


def _text_pieces(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TextLatentsError(f"cannot read {path} as UTF-8 text: {e}") from e
    return iter_latents(text), None  # one piece per passage; the total is known only at the end


def _file_pieces(paths: list[Path]):
    import numpy as np

    arrays = []
    for path in paths:
        if not path.is_file():
            raise ConfigError(f"{path}: no such file")
        if path.suffix == ".npy":
            arrays.append(np.load(path, mmap_mode="r", allow_pickle=False))
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:  # torch: it holds bfloat16, numpy cannot
                arrays.extend(f.get_tensor(name) for name in sorted(f.keys()))
        else:
            raise ConfigError(f"{path}: expected a .npy or .safetensors file")
    total = sum(a.shape[0] for a in arrays if len(a.shape) == 2)

    def pieces():
        for a in arrays:
            if len(a.shape) != 2:  # the publisher says what is wrong with it
                yield a
                continue
            for start in range(0, a.shape[0], _PIECE):
                yield a[start:start + _PIECE]
    return pieces(), total
