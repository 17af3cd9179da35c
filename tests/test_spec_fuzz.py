"""Independent checks written from /work/shared/spec/distilpose-model.md (not from the code).

Each reference below re-derives a spec fact by hand (loops, math, explicit formulas) and compares
the package's modules / losses / schedule against it.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distilpose_kernels as dk
from distilpose.losses import keypoint_regression_loss, token_mse_loss
from distilpose.models import TokenDistillingEncoder, build_model, count_parameters
from distilpose.models.backbones import StemNet
from distilpose.models.distiller import Distiller, LossWeights
from distilpose.models.heads import HeatmapHead, RegressionHead
from distilpose.training.config import OptimConfig, get_preset
from distilpose.training.optim import build_optimizer, build_scheduler

SMALL = (64, 48)


# ----------------------------------------------------------------------------- references


@functools.lru_cache(maxsize=None)
def spec_sine_table(gh=16, gw=16, dim=192):
    """The spec's table, entry by entry with Python floats: (gh*gw, dim) float64."""
    half = dim // 2
    out = torch.empty(gh * gw, dim, dtype=torch.float64)
    for row in range(gh):
        for col in range(gw):
            y = (row + 1) / (gh + 1e-6) * 2 * math.pi
            x = (col + 1) / (gw + 1e-6) * 2 * math.pi
            tok = row * gw + col
            for i in range(half):
                t = 10000 ** (2 * (i // 2) / half)
                f = math.sin if i % 2 == 0 else math.cos
                out[tok, i] = f(y / t)
                out[tok, half + i] = f(x / t)
    return out


def spec_patches(feat, ph=4, pw=3):
    """(N, C, H, W) -> (N, P, ph*pw*C) by explicit loops: patches row-major, values (row, col, channel)."""
    n, c, h, w = feat.shape
    rows = []
    for pr in range(h // ph):
        for pc in range(w // pw):
            vals = []
            for r in range(ph):
                for q in range(pw):
                    vals.append(feat[:, :, pr * ph + r, pc * pw + q])  # (N, C): channel innermost
            rows.append(torch.cat(vals, dim=1))
    return torch.stack(rows, dim=1)


def ln(x, w, b):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * w + b


def gelu_erf(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def spec_tde_forward(tde, feat, table, heads=8, head_dim=24):
    """The spec's TDE from the module's parameters (pre-norm, qkv no bias, scale 24^-0.5, sine-full)."""
    p = dict(tde.named_parameters())
    k = p["keypoint_token"].shape[1]
    vis = spec_patches(feat) @ p["patch_embed.weight"].T + p["patch_embed.bias"]
    vis = vis + table
    x = torch.cat((p["keypoint_token"].expand(feat.shape[0], -1, -1), vis), 1)
    n, L, d = x.shape
    for i in range(len(tde.layers)):
        g = lambda s: p[f"layers.{i}.{s}"]  # noqa: E731
        if i > 0:
            x = torch.cat((x[:, :k], x[:, k:] + table), 1)
        h = ln(x, g("norm1.weight"), g("norm1.bias"))
        qkv = h @ g("attn.qkv.weight").T  # no bias
        q, kk, v = qkv[..., :d], qkv[..., d: 2 * d], qkv[..., 2 * d:]
        outs = []
        for hd in range(heads):
            sl = slice(hd * head_dim, (hd + 1) * head_dim)
            a = (q[..., sl] @ kk[..., sl].transpose(1, 2)) * head_dim ** -0.5
            outs.append(a.softmax(-1) @ v[..., sl])
        x = x + torch.cat(outs, -1) @ g("attn.proj.weight").T + g("attn.proj.bias")
        h = ln(x, g("norm2.weight"), g("norm2.bias"))
        h = gelu_erf(h @ g("mlp.fc1.weight").T + g("mlp.fc1.bias"))
        x = x + h @ g("mlp.fc2.weight").T + g("mlp.fc2.bias")
    return x[:, :k], x[:, k:]


def _randomise(module, seed=0):
    """Parameters far from their init, so that every term of the forward matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, q in module.named_parameters():
            if q.dim() >= 2 and "keypoint_token" not in name:
                q.copy_(torch.randn(q.shape, generator=g, dtype=q.dtype) / math.sqrt(q.shape[-1]))
            elif name.endswith("weight"):
                q.copy_(1 + 0.3 * torch.randn(q.shape, generator=g, dtype=q.dtype))
            else:
                q.copy_(0.3 * torch.randn(q.shape, generator=g, dtype=q.dtype))


@pytest.fixture(scope="module")
def paper_models():
    torch.manual_seed(0)
    return {p: build_model(p) for p in ("distilpose_s", "distilpose_l", "tokenpose_teacher")}


# ----------------------------------------------------------------------------- TDE


def test_sine_table_every_entry_and_storage(paper_models):
    ref = spec_sine_table()
    for m in paper_models.values():
        tde = m.tde
        assert tde.pos_mode == "sine-full"
        torch.testing.assert_close(tde.pos_embedding[0].double(), ref, rtol=0, atol=1e-6)
        assert "pos_embedding" not in dict(tde.named_parameters())  # not trained
        assert "tde.pos_embedding" in m.state_dict()  # stored with the weights


def test_patchify_and_embedding_order():
    tde = build_model("distilpose_tiny").tde
    feat = torch.randn(2, tde.in_channels, 64, 48, dtype=torch.float64)
    tde = tde.double()
    ref = spec_patches(feat)
    torch.testing.assert_close(tde.patchify(feat), ref, rtol=0, atol=0)
    emb = ref @ tde.patch_embed.weight.T + tde.patch_embed.bias
    torch.testing.assert_close(tde.embed_patches(feat), emb, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("path", ["plain", "fuse_pos_norm", "fuse_add_norm"])
def test_tde_forward_equals_spec_reference(path):
    """The training path and the inference fusions (their CPU references) against the spec."""
    # the paper's TDE at depth 3 (CPU time): the re-add "before every layer after the first" still runs twice
    tde = TokenDistillingEncoder(48, depth=3).double().eval()
    assert (tde.dim, tde.num_keypoints, tde.pos_mode) == (192, 17, "sine-full")
    _randomise(tde)
    if path == "fuse_pos_norm":
        tde.fuse_pos_norm = True
        for layer in tde.layers:
            layer.mlp.fuse_gelu = True
    elif path == "fuse_add_norm":
        tde.fuse_add_norm = True
        for layer in tde.layers:
            layer.mlp.mlp_kernel = True
    feat = torch.randn(1, 48, 64, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    kpt, vis = tde(feat)
    assert kpt.shape == (1, 17, 192) and vis.shape == (1, 256, 192)  # sequence 17 + 256 = 273
    rk, rv = spec_tde_forward(tde, feat, spec_sine_table())
    # atol: the stored table is float32 (5e-7 here); a tanh GELU, eps 1e-6 or a wrong scale give >= 2e-4
    torch.testing.assert_close(kpt, rk, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vis, rv, rtol=1e-5, atol=1e-5)


def test_tde_structure_facts(paper_models):
    for m in paper_models.values():
        tde = m.tde
        assert len(tde.layers) == 12 and tde.keypoint_token.shape == (1, 17, 192)
        assert tde.patch_embed.in_features == 12 * tde.in_channels and tde.patch_embed.out_features == 192
        assert tde.patch_embed.bias is not None
        for layer in tde.layers:
            assert layer.attn.num_heads == 8 and layer.attn.scale == 24 ** -0.5
            assert layer.attn.qkv.bias is None and layer.attn.qkv.weight.shape == (576, 192)
            assert layer.attn.proj.bias is not None
            assert layer.mlp.act.approximate == "none"
            assert layer.mlp.fc1.weight.shape == (576, 192) and layer.mlp.fc2.weight.shape == (192, 576)
        assert all(x.eps == 1e-5 for x in m.modules() if isinstance(x, nn.LayerNorm))
        assert not any(isinstance(x, nn.Dropout) for x in m.modules())
        assert all(x.momentum == 0.1 for x in m.modules() if isinstance(x, nn.BatchNorm2d))


def test_initialisation(paper_models):
    m = paper_models["distilpose_s"]
    lin = [x for x in list(m.tde.modules()) + list(m.head.modules()) if isinstance(x, nn.Linear)]
    w = torch.cat([x.weight.flatten() for x in lin])
    assert abs(w.std().item() - 0.02) < 0.0005 and abs(w.mean().item()) < 1e-4
    # torch/timm trunc_normal_ default bounds are absolute [-2, 2] (the released TokenPose init)
    assert w.abs().max().item() <= 2.0
    assert all(float(x.bias.detach().abs().max()) == 0 for x in lin if x.bias is not None)
    kt = m.tde.keypoint_token
    assert abs(kt.std().item() - 0.02) < 0.003
    for x in m.modules():
        if isinstance(x, nn.LayerNorm):
            assert bool((x.weight == 1).all()) and bool((x.bias == 0).all())


# ----------------------------------------------------------------------------- heads and sizes


def test_student_head_channels():
    head = RegressionHead(192).double()
    _randomise(head, 1)
    tok = torch.randn(3, 17, 192, dtype=torch.float64)
    raw = ln(tok, head.norm.weight, head.norm.bias) @ head.fc.weight.T + head.fc.bias
    out = head(tok)
    torch.testing.assert_close(out["coords"], 1 / (1 + torch.exp(-raw[..., 0:2])))
    torch.testing.assert_close(out["score"], raw[..., 2:3])
    torch.testing.assert_close(out["sigma"], torch.log1p(torch.exp(raw[..., 3:5])))


def test_teacher_head_layout():
    head = HeatmapHead(192, 384, (64, 48)).double()
    _randomise(head, 2)
    tok = torch.randn(2, 17, 192, dtype=torch.float64)
    h = ln(tok, head.norm1.weight, head.norm1.bias) @ head.fc1.weight.T + head.fc1.bias
    flat = ln(h, head.norm2.weight, head.norm2.bias) @ head.fc2.weight.T + head.fc2.bias  # (2, 17, 3072)
    hm = head(tok)["heatmaps"]
    assert hm.shape == (2, 17, 64, 48)
    for r, c in ((0, 0), (0, 47), (1, 0), (63, 47), (17, 5)):
        torch.testing.assert_close(hm[..., r, c], flat[..., r * 48 + c])


def _spec_tde_params(c_in, teacher=False):
    d, mlp = 192, 576
    layer = 2 * (2 * d) + d * 3 * d + (d * d + d) + (d * mlp + mlp) + (mlp * d + d)
    base = (12 * c_in * d + d) + 17 * d + 12 * layer
    head = (2 * d + d * 384 + 384 + 2 * 384 + 384 * 3072 + 3072) if teacher else (2 * d + d * 5 + 5)
    return base + head


def test_parameter_counts_to_the_unit(paper_models):
    assert _spec_tde_params(256) == 5_039_045 and _spec_tde_params(48) == 4_559_813
    assert _spec_tde_params(48, teacher=True) == 5_816_448
    assert count_parameters(StemNet()) == 325_056
    s, l, t = (paper_models[p] for p in ("distilpose_s", "distilpose_l", "tokenpose_teacher"))
    assert count_parameters(s) == 5_364_101 == 325_056 + 5_039_045
    assert count_parameters(s.backbone) == 325_056
    for m, cin, teacher in ((s, 256, False), (l, 48, False), (t, 48, True)):
        assert count_parameters(m.tde) + count_parameters(m.head) == _spec_tde_params(cin, teacher)
        assert count_parameters(m) == count_parameters(m, trainable_only=False)
    assert round(count_parameters(l) / 1e6, 2) == 21.27 and round(count_parameters(t) / 1e6, 1) == 69.4
    assert t.backbone.out_channels == 48 and hasattr(t.backbone, "stage4") and not hasattr(l.backbone, "stage4")


# ----------------------------------------------------------------------------- losses


def test_keypoint_regression_by_hand():
    g = torch.Generator().manual_seed(4)
    pred = torch.rand(3, 5, 2, generator=g, dtype=torch.float64, requires_grad=True)
    tgt = torch.rand(3, 5, 2, generator=g, dtype=torch.float64) * 3 - 1  # some |d| > 1
    vis = (torch.rand(3, 5, 1, generator=g) > 0.4).double()
    total = 0.0
    for i in range(3):
        for j in range(5):
            for c in range(2):
                d = abs(pred[i, j, c].item() * vis[i, j, 0].item() - tgt[i, j, c].item() * vis[i, j, 0].item())
                total += 0.5 * d * d if d < 1 else d - 0.5
    got = keypoint_regression_loss(pred, tgt, vis)
    assert got.item() == pytest.approx(total / 30, rel=1e-12)
    got.backward()
    assert bool((pred.grad[vis.expand(3, 5, 2) == 0] == 0).all())


def test_token_mse_detaches_teacher():
    s = torch.randn(2, 7, 4, requires_grad=True)
    t = torch.randn(2, 7, 4, requires_grad=True)
    loss = token_mse_loss(s, t)
    assert loss.item() == pytest.approx(((s - t) ** 2).sum().item() / 56, rel=1e-6)
    loss.backward()
    assert t.grad is None and s.grad is not None


def _hand_simhm(coords, sigma, score, t, kw, mode):
    n, k, h, w = t.shape
    g = torch.zeros(n, k, h, w, dtype=torch.float64)
    wt = torch.zeros(n, k, dtype=torch.float64)
    sc = 0.0
    for i in range(n):
        for j in range(k):
            mx, my = coords[i, j, 0].item() * w, coords[i, j, 1].item() * h
            sx, sy = sigma[i, j, 0].item(), sigma[i, j, 1].item()
            off = mx - 3 * sx >= w or my - 3 * sy >= h or mx + 3 * sx + 1 < 0 or my + 3 * sy + 1 < 0
            wt[i, j] = 0.0 if off else kw[i, j, 0].item()
            if not off:
                for y in range(h):
                    for x in range(w):
                        g[i, j, y, x] = math.exp(-((x - mx) ** 2 / (sx**2 + 1e-9) + (y - my) ** 2 / (sy**2 + 1e-9)) / 2)
            cx, cy = coords[i, j, 0].item(), coords[i, j, 1].item()
            inside = 0 <= cx <= 1 and 0 <= cy <= 1
            val = t[i, j, round(cy * (h - 1)), round(cx * (w - 1))].item() if inside else 0.0
            v = kw[i, j, 0].item()
            sc += abs(score[i, j, 0].item() * v - val * v)
    if mode == "released":
        reg = sum((wt[:, j] ** 2).mean().item() * ((g[:, j] - t[:, j]) ** 2).mean().item() for j in range(k)) / k
    else:
        reg = sum(((wt[:, j, None, None] * (g[:, j] - t[:, j])) ** 2).mean().item() for j in range(k)) / k
    return reg, sc / (n * k)


@pytest.mark.parametrize("mode", ["released", "per_sample"])
def test_simulated_heatmap_and_score_public_op(mode):
    g = torch.Generator().manual_seed(5)
    n, k, h, w = 3, 4, 8, 6
    coords = torch.rand(n, k, 2, generator=g, dtype=torch.float64)
    coords[0, 1] = torch.tensor([1.9, 0.5])  # wholly right of the grid, outside [0, 1] for the score
    coords[2, 3] = torch.tensor([0.5, -0.8])  # wholly above it
    coords[1, 2] = torch.tensor([-0.05, 0.5])  # partly on the grid: kept
    sigma = 0.3 + 2 * torch.rand(n, k, 2, generator=g, dtype=torch.float64)
    sigma[0, 1] = 0.5
    sigma[2, 3] = 0.5
    score = torch.randn(n, k, 1, generator=g, dtype=torch.float64)
    t = torch.rand(n, k, h, w, generator=g, dtype=torch.float64)
    kw = torch.tensor([1.0, 0.0, 1.0, 0.5]).repeat(n, 1)[..., None].double()
    kw[1, 0] = 0.0
    ref_reg, ref_sc = _hand_simhm(coords, sigma, score, t, kw, mode)
    cs, ss, sc, tt = (x.clone().requires_grad_() for x in (coords, sigma, score, t))
    reg, sl = dk.simulated_heatmap_loss(cs, ss, sc, tt, kw, mode=mode)
    assert reg.item() == pytest.approx(ref_reg, rel=1e-10)
    assert sl.item() == pytest.approx(ref_sc, rel=1e-10)
    (reg + sl).backward()
    assert tt.grad is None or float(tt.grad.abs().max()) == 0  # no gradient into the teacher
    assert float(cs.grad.abs().sum()) > 0 and float(ss.grad.abs().sum()) > 0 and float(sc.grad.abs().sum()) > 0


def test_released_form_ignores_per_sample_masking():
    """Spec: the released weight does not mask per sample: a sample with weight 0 still contributes."""
    n, k, h, w = 2, 1, 8, 6
    coords = torch.full((n, k, 2), 0.5, dtype=torch.float64)
    sigma = torch.full((n, k, 2), 1.0, dtype=torch.float64)
    score = torch.zeros(n, k, 1, dtype=torch.float64)
    t = torch.zeros(n, k, h, w, dtype=torch.float64)
    t[1] = 5.0  # a large error on the invisible sample only
    kw = torch.tensor([[[1.0]], [[0.0]]], dtype=torch.float64)
    rel, _ = dk.simulated_heatmap_loss(coords, sigma, score, t, kw, mode="released")
    per, _ = dk.simulated_heatmap_loss(coords, sigma, score, t, kw, mode="per_sample")
    assert rel.item() > 10 * per.item() > 0


# ----------------------------------------------------------------------------- distiller


def _small_pair(seed=0):
    torch.manual_seed(seed)
    return build_model("distilpose_tiny", input_size=SMALL), build_model("tokenpose_tiny", input_size=SMALL)


def _small_batch(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "img": torch.randn(n, 3, *SMALL, generator=g),
        "target_coords": torch.rand(n, 17, 2, generator=g),
        "target_weight": (torch.rand(n, 17, 1, generator=g) > 0.3).float(),
    }


def test_frozen_teacher_eval_mode_no_grad_bn_untouched():
    student, teacher = _small_pair()
    teacher.train()  # the caller's mode must not matter
    d = Distiller(student, teacher)
    d.train()
    assert student.training and not any(x.training for x in teacher.modules())
    stats = {k: v.clone() for k, v in teacher.state_dict().items()}
    seen = {}
    teacher.register_forward_hook(lambda m, i, o: seen.update(grad=torch.is_grad_enabled(), training=m.training))
    losses = d(_small_batch())
    losses["loss"].backward()
    assert seen == {"grad": False, "training": False}
    for k, v in teacher.state_dict().items():  # BN running stats (and everything else) unchanged
        assert torch.equal(v, stats[k]), k
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    d.eval()
    d.train(True)
    assert not teacher.training


def test_teacher_runs_on_the_same_batch_and_weights_as_released():
    student, teacher = _small_pair()
    d = Distiller(student, teacher)
    assert d.weights == LossWeights(kpt=1.0, vis_token=0.0005, kpt_token=0.0005, reg2hm=1.0, score=0.01)
    assert d.reg2hm_mode == "released"
    got = []
    teacher.register_forward_hook(lambda m, i, o: got.append(i[0]))
    batch = _small_batch()
    d(batch)
    assert len(got) == 1 and torch.equal(got[0], batch["img"])


def test_distiller_uses_public_fused_op(monkeypatch):
    student, teacher = _small_pair()
    calls = []
    real = dk.simulated_heatmap_loss

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(dk, "simulated_heatmap_loss", spy)
    Distiller(student, teacher, reg2hm_mode="per_sample", loss_backend="reference")(_small_batch())
    assert calls == [dict(mode="per_sample", backend="reference")]


@pytest.mark.parametrize("part", ["reg2hm", "score", "vis_token", "kpt_token"])
def test_single_distillation_term_with_zero_keypoint_weight(part):
    """A distillation term alone (keypoint loss weighted 0) must still be computed."""
    student, teacher = _small_pair()
    zero = dict(kpt=0.0, vis_token=0.0, kpt_token=0.0, reg2hm=0.0, score=0.0)
    zero[part] = 1.0
    losses = {k: v.detach() for k, v in Distiller(student, teacher, weights=LossWeights(**zero))(_small_batch()).items()}
    assert f"loss_{part}" in losses
    assert float(losses["loss"]) == pytest.approx(float(losses[f"loss_{part}"]))
    assert float(losses["loss"]) > 0


# ----------------------------------------------------------------------------- optimiser and schedule


def test_optimizer_and_per_iteration_schedule():
    cfg = OptimConfig()
    assert (cfg.name, cfg.lr, cfg.warmup_iters, cfg.warmup_ratio, list(cfg.milestones), cfg.gamma, cfg.epochs) == (
        "adam", 1e-3, 500, 0.001, [200, 260], 0.1, 300)
    p = nn.Parameter(torch.zeros(1))
    opt = build_optimizer([p], cfg)
    assert type(opt) is torch.optim.Adam
    assert opt.defaults["weight_decay"] == 0 and opt.defaults["betas"] == (0.9, 0.999)
    ipe = 7  # warm-up (500 iterations) spans several epochs: it is counted in iterations
    sched = build_scheduler(opt, cfg, iters_per_epoch=ipe)

    def spec_lr(it):
        epoch = it // ipe
        lr = 1e-3 * (0.1 if epoch >= 200 else 1) * (0.1 if epoch >= 260 else 1)
        if it < 500:  # linear from 0.001 x lr at iteration 0 to lr at iteration 500
            lr *= 0.001 + (1 - 0.001) * it / 500
        return lr

    for it in range(300 * ipe):
        assert opt.param_groups[0]["lr"] == pytest.approx(spec_lr(it), rel=1e-9, abs=1e-15), it
        opt.step()
        sched.step()
    assert spec_lr(0) == pytest.approx(1e-6) and spec_lr(200 * ipe) == pytest.approx(1e-4)


def test_paper_training_presets():
    for name, student in (("distilpose_s_coco", "distilpose_s"), ("distilpose_l_coco", "distilpose_l")):
        c = get_preset(name)
        assert (c.mode, c.model.preset, c.teacher.preset, c.data.batch_size) == ("distill", student, "tokenpose_teacher", 32)
        assert c.optim == OptimConfig() and c.loss.reg2hm_mode == "released" and c.loss.disable == []
        assert (c.loss.kpt, c.loss.vis_token, c.loss.kpt_token, c.loss.reg2hm, c.loss.score) == (1.0, 0.0005, 0.0005, 1.0, 0.01)
    t = get_preset("tokenpose_teacher_coco")
    assert (t.mode, t.model.preset, t.data.batch_size, t.optim) == ("teacher", "tokenpose_teacher", 64, OptimConfig())


def test_autocast_keeps_the_residual_stream_in_float32():
    """Under bf16 autocast the encoder's residual stream stays float32 (PyTorch's promotion of the
    fp32 tokens and table, as in any autocast model; a bf16 stream lost ~2% on the tokens), on the
    plain and the fused paths; a model stored in bf16 runs a bf16 stream."""
    from distilpose.models.tde import TokenDistillingEncoder

    torch.manual_seed(0)
    tde = TokenDistillingEncoder(in_channels=8, feature_size=(8, 6), patch_size=(4, 3), num_keypoints=3, dim=16,
                                 depth=2, num_heads=2, mlp_dim=32).eval()
    feat = torch.randn(2, 8, 8, 6)
    with torch.no_grad():
        want = tde(feat)
        for flags in ({}, {"fuse_pos_norm": True}, {"fuse_add_norm": True}):
            for k, v in flags.items():
                setattr(tde, k, v)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = tde(feat)
            for k in flags:
                setattr(tde, k, False)
            assert all(t.dtype == torch.float32 for t in got), (flags, [t.dtype for t in got])
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)
        cast = TokenDistillingEncoder(in_channels=8, feature_size=(8, 6), patch_size=(4, 3), num_keypoints=3, dim=16,
                                      depth=2, num_heads=2, mlp_dim=32).eval().to(torch.bfloat16)
        assert all(t.dtype == torch.bfloat16 for t in cast(feat.to(torch.bfloat16)))
