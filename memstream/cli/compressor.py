"""``memstream train-compressor`` and ``memstream eval-compressor``."""

from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import fields
from pathlib import Path

from memstream.errors import ConfigError, TextLatentsError
from memstream.settings import HORIZON


_NOT_OPTIONS = ("version",)  # the config's format version is not a training choice


def _add_dataclass_args(parser: argparse.ArgumentParser, cls, skip: tuple = ()) -> None:
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, help=f"(default {f.default})")


def _option(name: str, value) -> str:
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag}={value}"


def _train(args) -> int:
    import logging

    import torch

    from memstream.operators.model import CompressorConfig
    from memstream.operators.train import TrainConfig, train

    logging.getLogger("memstream.operators").setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    model_fields = [f for f in fields(CompressorConfig) if f.name not in _NOT_OPTIONS]
    model_cfg = CompressorConfig(**{f.name: getattr(args, f.name) for f in model_fields})
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    # Every option spelled out, so the recorded command reproduces the run whatever the defaults become.
    opts = [_option(f.name, getattr(args, f.name)) for f in model_fields + list(fields(TrainConfig))]
    command = shlex.join(["memstream", "train-compressor", *opts, f"--threads={args.threads}", f"--name={args.name}",
                          f"--out={args.out}"])
    metrics = train(model_cfg, cfg, Path(args.out), command, args.name)
    print(json.dumps({"out": args.out, "command": command, "train_wall_s": metrics["train_wall_s"],
                      "validation": metrics["validation"],
                      "next": f"memstream eval-compressor --domain man --checkpoint {args.out}/compressor.safetensors"},
                     indent=2))
    return 0


def checkpoint_name(checkpoint) -> str:
    """The method the checkpoint's sidecar names (``method``), else "learned": the eval's row for it."""
    from memstream.operators.checkpoint import DEFAULT_CHECKPOINT

    sidecar = Path(checkpoint or DEFAULT_CHECKPOINT).with_suffix(".json")
    return (json.loads(sidecar.read_text()).get("method") if sidecar.exists() else None) or "learned"


def _methods(model, checkpoint, seeds, args):
    """{seed: {name: model}}: the checkpoint's model, every baseline fitted with that seed (the
    checkpoint's own training options, encoder frozen but for mean_pool_trained), and the reference."""
    import logging
    from dataclasses import replace

    from memstream.operators.baselines import ProductQuantizer, fitted, specs
    from memstream.operators.checkpoint import DEFAULT_CHECKPOINT
    from memstream.operators.train import TrainConfig, training_windows

    logging.getLogger("memstream.operators").setLevel(logging.INFO)
    sidecar = Path(checkpoint or DEFAULT_CHECKPOINT).with_suffix(".json")
    recorded = json.loads(sidecar.read_text()).get("train", {}) if sidecar.exists() else {}
    train_cfg = TrainConfig(**{f.name: recorded[f.name] for f in fields(TrainConfig) if f.name in recorded})
    if args.baseline_steps:
        train_cfg = replace(train_cfg, steps=args.baseline_steps, eval_every=min(train_cfg.eval_every, args.baseline_steps))
    fit_data = training_windows(model.config.window, args.fit_windows or None)
    pq = ProductQuantizer().fit(fit_data[0], fit_data[1], seed=0)  # one reference (the seeds vary its cues)
    own = checkpoint_name(checkpoint)
    methods = {}
    for seed in seeds:
        ms = {own: model}
        for name, (mc, tc) in specs(model.config, train_cfg).items():
            ms[name if name != own else f"{name}_refit"] = fitted(name, mc, replace(tc, seed=seed), fit_data)
        methods[seed] = {**ms, "pq": pq}
    return methods


def _texts(args, window: int):
    """{source: (text, windows [W, window, d])} of what ``args`` names."""
    from memstream.operators import data

    if args.heldout:
        named = {"heldout:" + ",".join(data.HELDOUT_TEXTS): data.heldout_text()}
    elif args.domain:
        named = {f"domain:{d}": data.domain_text(d) for d in (data.DOMAINS if args.domain == "all" else [args.domain])}
    else:
        try:
            named = {args.text: Path(args.text).read_text(encoding="utf-8", errors="replace")}
        except OSError as e:
            raise TextLatentsError(f"cannot read text file {args.text}: {e.strerror}") from e
    out = {}
    for source, text in named.items():
        latents = data.cached_text_latents(text)
        windows = data.windows_of(latents, window)
        if args.max_windows:
            windows = windows[: args.max_windows]
        if len(windows) == 0:
            raise ConfigError(f"{source} has {len(latents)} latents: fewer than one window of {window}")
        out[source] = (text, len(latents), windows)
    return out


def _eval(args) -> int:
    import numpy as np
    import torch

    from memstream.operators import data
    from memstream.operators.checkpoint import DEFAULT_CHECKPOINT, load_compressor
    from memstream.operators.evaluate import beats, evaluate_texts, margins

    torch.set_num_threads(args.threads)
    if sum(x is not None and x is not False for x in (args.text, args.heldout, args.domain)) != 1:
        raise ConfigError("give exactly one of --text FILE, --domain NAME and --heldout")
    model = load_compressor(args.checkpoint)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds takes integers separated by commas, not {args.seeds!r}") from None
    texts = _texts(args, model.config.window)
    methods = _methods(model, args.checkpoint, seeds, args)
    own = checkpoint_name(args.checkpoint)
    shortest = min(len(w) for _, _, w in texts.values())
    pool = None
    if args.horizon > shortest:
        exclude = {t for t, _, _ in texts.values()}

        def pool():
            return ((name, torch.from_numpy(w)) for name, w in
                    data.episodic_pool(args.horizon - shortest, exclude=exclude, from_cache=args.pool_from_cache))
    results = evaluate_texts(methods, {s: torch.from_numpy(np.ascontiguousarray(w)) for s, (_, _, w) in texts.items()},
                             pool, cues_per_window=args.cues_per_window, episodic_cues=args.episodic_cues,
                             noise=args.noise, horizon=args.horizon if pool else None,
                             skip_episodic=() if args.reference_episodic else ("pq",))
    report = {}
    for source, metrics in results.items():
        baselines = [n for n in metrics["methods"] if n not in (own, "pq")]
        latents = texts[source][1]
        report[source] = {"text": source, "checkpoint": str(args.checkpoint or DEFAULT_CHECKPOINT),
                          "checkpoint_method": own, "latents": latents,
                          "dropped_latents": latents - metrics["windows"] * model.config.window, **metrics,
                          "baselines": baselines, "reference": ["pq"],
                          "margins": margins(metrics, own, baselines),
                          "beats_baselines": beats(metrics, 0.0, own, baselines),
                          f"beats_baselines_by_{args.margin}": beats(metrics, args.margin, own, baselines)}
    out = next(iter(report.values())) if len(report) == 1 else {"texts": report}
    if args.save:
        Path(args.save).with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
        Path(args.save).with_suffix(".md").write_text(_markdown(report, seeds))
    if args.json:
        print(json.dumps(out))
        return 0
    for source, metrics in report.items():
        print(f"{source}: {metrics['windows']} windows of {metrics['window']} latents, cue cosine "
              f"{metrics['cue_cosine']:.3f}, seeds {','.join(map(str, seeds))} (mean ± std)"
              + (f", episodic window {metrics['episodic']['summaries']} summaries" if "episodic" in metrics else ""))
        cols = {"reconstruction": metrics["reconstruction_cosine"],
                **{f"recall@1 {s}": v for s, v in metrics["recall_at_1"].items()}}
        if "episodic_reconstruction_cosine" in metrics:
            cols["recon. episodic"] = metrics["episodic_reconstruction_cosine"]
        print(f"{'method':<20}" + "".join(f"{c:>20}" for c in cols))
        for name in metrics["methods"]:
            print(f"{name:<20}" + "".join(f"{c[name]['mean']:>12.4f} ± {c[name]['std']:.4f}" if name in c
                                          else f"{'-':>20}" for c in cols.values()))
    return 0


def _markdown(report: dict, seeds) -> str:
    """The figures as one markdown table per text: mean ± std over the seeds (min-max in the JSON)."""
    lines = []
    for source, m in report.items():
        ep = m.get("episodic")
        lines += [f"## {source}", "",
                  f"{m['windows']} windows, cue cosine {m['cue_cosine']:.3f}, seeds {','.join(map(str, seeds))}, "
                  f"{m['cues_per_window']} cues a window among the text's windows"
                  + (f"; episodic window {ep['summaries']} summaries ({ep['offset_windows']} of them later cuts of "
                     f"pool texts), {ep['cues_per_window']} cues a window" if ep else ""), ""]
        cols = {"reconstruction": m["reconstruction_cosine"], "recall@1 text": m["recall_at_1"]["text"]}
        if ep:
            cols["recall@1 episodic"] = m["recall_at_1"]["episodic"]
            cols["reconstruction episodic"] = m["episodic_reconstruction_cosine"]
        lines += ["| method | " + " | ".join(cols) + " |", "| --- |" + " ---: |" * len(cols)]
        for name in m["methods"]:
            cells = [f"{c[name]['mean']:.3f} ± {c[name]['std']:.3f}" if name in c else "-" for c in cols.values()]
            label = f"{name} (reference)" if name in m["reference"] else name
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        mg = ", ".join(f"{k} {v['margin']:+.3f} (vs {v['best_baseline']})" for k, v in m["margins"].items())
        lines += ["", f"{m['checkpoint_method']} minus the best baseline: {mg}.", ""]
    return "\n".join(lines)


def register(sub) -> None:
    from memstream.operators.model import CompressorConfig
    from memstream.operators.train import TrainConfig

    p = sub.add_parser("train-compressor", help="train the 4096->256 compressor on MiniLM latents of the corpus")
    _add_dataclass_args(p, CompressorConfig, skip=_NOT_OPTIONS)
    _add_dataclass_args(p, TrainConfig)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (results depend on it)")
    p.add_argument("--name", default="learned", help="what the method is called (eval-compressor's row for it): "
                   "a baseline's name when its configuration is that baseline's")
    p.add_argument("--out", default="runs/compressor", help="folder for the checkpoint, config and metrics")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval-compressor", help="recall fidelity of a compressor against fair baselines on a text")
    p.add_argument("--text", help="a UTF-8 text file; its MiniLM latents are cut into whole windows")
    p.add_argument("--domain", choices=("licenses", "man", "info", "all"),
                   help="a domain absent from training: the licences, manual pages, GNU info manuals; all: each "
                        "of them, sharing one episodic pool")
    p.add_argument("--heldout", action="store_true", help="the pydoc pages (and a licence) held out of training")
    p.add_argument("--checkpoint", help="a compressor .safetensors (default: the committed one)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--save", help="also write the figures to SAVE.json and a table to SAVE.md")
    p.add_argument("--cues-per-window", type=int, default=256, help="cues per window for recall among the text's windows")
    p.add_argument("--episodic-cues", type=int, default=32, help="cues per window for recall in the episodic window")
    p.add_argument("--horizon", type=int, default=HORIZON,
                   help=f"summaries in the episodic window: the text's and other texts' (default {HORIZON}; "
                        "no more than the text's windows: no episodic setting)")
    p.add_argument("--pool-from-cache", action="store_true",
                   help="fill the episodic window from texts whose latents are cached, cut again at later offsets "
                        "when they fall short (instead of computing latents of new text: hours on a CPU)")
    p.add_argument("--reference-episodic", action=argparse.BooleanOptionalAction, default=True,
                   help="read the reference (product quantization) in the episodic window too (its codes take "
                        "about 0.5 s a window on two CPU cores)")
    p.add_argument("--noise", type=float, default=1.0, help="cue noise, relative to a latent's rms")
    p.add_argument("--seeds", default="0,1,2", help="seeds (cues, and the baselines' fits), comma-separated")
    p.add_argument("--margin", type=float, default=0.02, help="the margin the checkpoint must beat every baseline by")
    p.add_argument("--baseline-steps", type=int, default=0, help="fit baselines with this many steps (0: the "
                   "learned model's own)")
    p.add_argument("--fit-windows", type=int, default=0, help="fit baselines on the first N training windows (0: all)")
    p.add_argument("--max-windows", type=int, default=0, help="evaluate only the first N windows (0: all)")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=_eval)
