"""``memstream train-compressor`` and ``memstream eval-compressor``."""

from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import fields
from pathlib import Path

from memstream.errors import ConfigError, TextLatentsError


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

    from memstream.operators.evaluate import learned_beats_baselines
    from memstream.operators.model import CompressorConfig
    from memstream.operators.train import TrainConfig, train

    logging.getLogger("memstream.operators").setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    model_fields = [f for f in fields(CompressorConfig) if f.name not in _NOT_OPTIONS]
    model_cfg = CompressorConfig(**{f.name: getattr(args, f.name) for f in model_fields})
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    # Every option spelled out, so the recorded command reproduces the run whatever the defaults become.
    opts = [_option(f.name, getattr(args, f.name)) for f in model_fields + list(fields(TrainConfig))]
    command = shlex.join(["memstream", "train-compressor", *opts, f"--threads={args.threads}", f"--out={args.out}"])
    metrics = train(model_cfg, cfg, Path(args.out), command)
    print(json.dumps({"out": args.out, "command": command, "train_wall_s": metrics["train_wall_s"],
                      "heldout": metrics["heldout"],
                      "learned_beats_baselines": learned_beats_baselines(metrics["heldout"])}, indent=2))
    return 0


def _eval(args) -> int:
    import numpy as np
    import torch

    from memstream.operators import data
    from memstream.operators.checkpoint import DEFAULT_CHECKPOINT, load_compressor
    from memstream.operators.evaluate import evaluate, learned_beats_baselines

    torch.set_num_threads(args.threads)
    if (args.text is None) == (not args.heldout):
        raise ConfigError("give exactly one of --text FILE and --heldout")
    model = load_compressor(args.checkpoint)
    if args.heldout:
        latents, source = data.cached_text_latents(data.heldout_text()), "heldout:" + ",".join(data.HELDOUT_TEXTS)
    else:
        try:
            text = Path(args.text).read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise TextLatentsError(f"cannot read text file {args.text}: {e.strerror}") from e
        latents, source = data.cached_text_latents(text), args.text
    windows = data.windows_of(latents, model.config.window)
    if args.max_windows:
        windows = windows[: args.max_windows]
    if len(windows) == 0:
        raise ConfigError(f"{source} has {len(latents)} latents: fewer than one window of {model.config.window}")
    metrics = evaluate(model, torch.from_numpy(np.ascontiguousarray(windows)), cues_per_window=args.cues_per_window,
                       noise=args.noise, seed=args.seed)
    metrics = {"text": source, "checkpoint": str(args.checkpoint or DEFAULT_CHECKPOINT), "latents": len(latents),
               "dropped_latents": len(latents) - len(windows) * model.config.window, **metrics,
               "learned_beats_baselines": learned_beats_baselines(metrics)}
    if args.json:
        print(json.dumps(metrics))
    else:
        print(f"{source}: {metrics['windows']} windows of {metrics['window']} latents, dim {metrics['dim']}, "
              f"cue cosine {metrics['cue_cosine']:.3f}")
        print(f"{'method':<15}{'recon cos':>11}{'recall@1':>10}")
        for name in metrics["reconstruction_cosine"]:
            print(f"{name:<15}{metrics['reconstruction_cosine'][name]:>11.4f}{metrics['cue_recall_at_1'][name]:>10.4f}")
    return 0


def register(sub) -> None:
    from memstream.operators.model import CompressorConfig
    from memstream.operators.train import TrainConfig

    p = sub.add_parser("train-compressor", help="train the 4096->256 compressor on MiniLM latents of the corpus")
    _add_dataclass_args(p, CompressorConfig, skip=_NOT_OPTIONS)
    _add_dataclass_args(p, TrainConfig)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (results depend on it)")
    p.add_argument("--out", default="runs/compressor", help="folder for the checkpoint, config and metrics")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval-compressor", help="recall fidelity of a compressor against baselines on a text")
    p.add_argument("--text", help="a UTF-8 text file; its MiniLM latents are cut into whole windows")
    p.add_argument("--heldout", action="store_true", help="evaluate on the corpus texts held out of training")
    p.add_argument("--checkpoint", help="a compressor .safetensors (default: the committed one)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--cues-per-window", type=int, default=256)
    p.add_argument("--noise", type=float, default=1.0, help="cue noise, relative to a latent's rms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-windows", type=int, default=0, help="evaluate only the first N windows (0: all)")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=_eval)
