"""Training of the compressor for recall fidelity, on MiniLM latents of real text.

The training stream is all training texts in name order, cut into whole windows. Each step
takes ``batch_windows`` consecutive windows, so the other windows of a batch are the hard
negatives that a session's own history presents. From each window, ``cues_per_window`` random
latents get noisy cues; the loss is

    (1 - cos(decode(cue, own summary), latent))                        recall fidelity
  + contrastive_weight * CE over the batch's windows of cos(decode(cue, summary_w), cue) / T

the second term being the score that ``evaluate`` uses to find a cue's window
(``model.score``). The state with the lowest validation loss is kept.

CPU budget: the encoder (k-means over each window's 4,096 latents) is most of a step's
cost. By default (``train_encoder`` off) the encoder stays at its data-fitted start (the
projection is the top principal directions of the training latents, the assignment sharpness
its initial value) and the summaries of all windows are computed once; the decoder and score
parameters train by gradient. ``--train-encoder`` trains the projection and the sharpness too,
end to end through the iterations (hard iterations pass gradient through the slot means, not
the assignments; the sharpness only acts in soft ones, ``--iters``). Seeded: the same command on the same machine (and thread
count) reproduces the same checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from memstream.operators.checkpoint import load_compressor, save_compressor
from memstream.operators.evaluate import encoder_key, evaluate, make_cues
from memstream.operators.model import Compressor, CompressorConfig

log = logging.getLogger(__name__)
_FROZEN: dict = {}  # the last frozen encoder's summaries of the training and validation windows


@dataclass
class TrainConfig:
    steps: int = 300
    batch_windows: int = 4
    cues_per_window: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 20
    noise_min: float = 0.5  # cue noise is drawn per cue from [noise_min, noise_max]; eval uses 1.0
    noise_max: float = 1.5
    temperature: float = 0.1
    contrastive_weight: float = 1.0
    negatives: int = 0  # other training windows' summaries (kept, refreshed) that every cue is also scored against
    refresh_every: int = 50  # steps between recomputing those summaries when the encoder trains
    train_encoder: bool = False
    eval_every: int = 50
    seed: int = 0
    device: str = "cpu"


def recall_loss(model: Compressor, windows: torch.Tensor, cfg: TrainConfig, g: torch.Generator,
                summaries: torch.Tensor | None = None, negatives: torch.Tensor | None = None):
    """The training loss on windows [B, N, d] (whose ``summaries`` may be given; ``negatives``
    [K, M, d]: summaries of other windows, scored as further wrong answers), with its two parts
    for logging."""
    B, N, d = windows.shape
    P = cfg.cues_per_window
    pos = torch.randint(0, N, (B, P), generator=g).to(windows.device)
    x = windows.gather(1, pos[..., None].expand(-1, -1, d)).reshape(B * P, d)
    noise = cfg.noise_min + (cfg.noise_max - cfg.noise_min) * torch.rand((B * P, 1), generator=g)
    cues = make_cues(x, noise.to(x.device), g)
    if summaries is None:
        summaries = model.encode(windows)
    owner = torch.arange(B, device=x.device).repeat_interleave(P)
    out = model.decode(cues.view(B, P, d), summaries)  # [B, P, d]: each cue from its own window
    recon = F.cosine_similarity(out.reshape(B * P, d), x, dim=-1).mean()
    logits = model.score(cues, summaries).T / cfg.temperature  # [B*P, B]: every cue against every window
    if negatives is not None and len(negatives):
        logits = torch.cat([logits, model.score(cues, negatives).T / cfg.temperature], 1)
    ce = F.cross_entropy(logits, owner)
    return (1 - recon) + cfg.contrastive_weight * ce, recon.detach(), ce.detach()


def _stream(latents: dict[str, np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([latents[k] for k in sorted(latents)]))


def _windows(stream: torch.Tensor, window: int) -> torch.Tensor:
    w = len(stream) // window
    return stream[: w * window].reshape(w, window, -1).float()


def training_windows(window: int, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the training stream [n, d], its whole windows [W, window, d], validation windows);
    ``limit``: only the first texts that fill that many windows (quick fits, e.g. in tests)."""
    from memstream.operators import data

    stream = _stream(data.split_latents("train", limit=None if limit is None else limit * window))
    return stream, _windows(stream, window), _windows(_stream(data.split_latents("validation")), window)


def fit(model_cfg: CompressorConfig, cfg: TrainConfig, windows=None) -> tuple[Compressor, dict]:
    """A compressor trained by ``cfg`` on the training windows (``windows``: the
    :func:`training_windows` triple, when the caller has it), the state of least validation
    loss, and the run's record."""
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    train_stream, train_windows, val_windows = windows or training_windows(model_cfg.window)
    log.info("train windows %d, validation windows %d (%.0fs)", len(train_windows), len(val_windows), time.time() - t0)

    device = torch.device(cfg.device)
    model = Compressor(model_cfg)
    model.fit_to_data(train_stream, g)
    model.to(device)
    B = cfg.batch_windows
    if cfg.train_encoder:
        train_sum = val_sum = None
    else:
        for p in (model.proj, model.log_beta):
            p.requires_grad_(False)
        key = (encoder_key(model), id(train_windows), id(val_windows), str(device))
        if key not in _FROZEN:  # fits of another seed on the same windows share them
            with torch.no_grad():
                _FROZEN.clear()
                _FROZEN[key] = (torch.cat([model.encode(train_windows[i:i + B].to(device))
                                           for i in range(0, len(train_windows), B)]), model.encode(val_windows.to(device)),
                                train_windows, val_windows)  # held, so their ids are not reused while keyed
        train_sum, val_sum = _FROZEN[key][:2]
        log.info("summaries of the fixed encoder computed (%.0fs)", time.time() - t0)
    bank, bank_at = None, -1  # negatives: summaries of other training windows

    def negatives_for(i, step):
        nonlocal bank, bank_at
        if not cfg.negatives:
            return None
        if bank is None or (cfg.train_encoder and step - bank_at >= cfg.refresh_every):
            if train_sum is not None:
                bank = train_sum
            else:
                with torch.no_grad():
                    bank = torch.cat([model.encode(train_windows[j:j + B].to(device)) for j in range(0, len(train_windows), B)])
            bank_at = step
        others = torch.cat([torch.arange(0, i), torch.arange(i + B, len(bank))])  # not the batch's own windows
        pick = others[torch.randperm(len(others), generator=g)[:cfg.negatives]]
        return bank[pick.to(bank.device)]

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))

    def lr_at(step):  # linear warmup, cosine decay to a tenth
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.45 * (1 + np.cos(np.pi * t)))

    def batch(windows, summaries, i):
        s = None if summaries is None else summaries[i:i + B]
        return windows[i:i + B].to(device), s

    @torch.no_grad()
    def val_loss():
        model.eval()
        vg = torch.Generator().manual_seed(cfg.seed + 1)  # the same cues at every evaluation
        parts = []
        for i in range(0, len(val_windows) - B + 1, B):
            windows, summaries = batch(val_windows, val_sum, i)
            parts.append(recall_loss(model, windows, cfg, vg, summaries)[0].item())
        model.train()
        return float(np.mean(parts))

    history, best = [], (float("inf"), None, -1)
    t_train = time.time()
    for step in range(cfg.steps + 1):
        if step % cfg.eval_every == 0 or step == cfg.steps:
            v = val_loss()
            if v < best[0]:
                best = (v, {k: t.detach().clone() for k, t in model.state_dict().items()}, step)
            history.append({"step": step, "val_loss": round(v, 5), "elapsed_s": round(time.time() - t_train, 1)})
            log.info("step %d val_loss %.4f (%.0fs)", step, v, time.time() - t_train)
            if step == cfg.steps:
                break
        i = int(torch.randint(0, len(train_windows) - B + 1, (1,), generator=g))
        windows, summaries = batch(train_windows, train_sum, i)
        loss, recon, ce = recall_loss(model, windows, cfg, g, summaries, negatives_for(i, step))
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 10 == 0:
            log.info("step %d loss %.4f recon_cos %.4f ce %.4f", step, loss.item(), recon.item(), ce.item())
    model.load_state_dict(best[1])
    model.eval()
    info = {"train_wall_s": round(time.time() - t_train, 1), "total_wall_s": round(time.time() - t0, 1),
            "best_step": best[2], "best_val_loss": round(best[0], 5), "history": history}
    return model, info


def train(model_cfg: CompressorConfig, cfg: TrainConfig, out: Path, command: str, name: str = "learned") -> dict:
    """Train, write ``out``/compressor.safetensors (with the command and the method's ``name``) and
    compressor.metrics.json."""
    from memstream.operators import data

    windows = training_windows(model_cfg.window)
    model, info = fit(model_cfg, cfg, windows)
    out.mkdir(parents=True, exist_ok=True)
    path = save_compressor(model, out / "compressor.safetensors", extra={"method": name, "command": command,
                                                                              "train": asdict(cfg)})
    model = load_compressor(path)  # the metrics describe the stored weights
    metrics = {**info, "validation": evaluate({"learned": model}, windows[2], cues_per_window=128),
               "validation_texts": list(data.VALIDATION_TEXTS), "torch": torch.__version__,
               "threads": torch.get_num_threads()}
    (out / "compressor.metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("wrote %s", path)
    return metrics
