"""Model structure: exact sizes, complexity, shapes, gradients, the TDE's layout rules, bad inputs."""
import math

import pytest
import torch

import distilpose_kernels as dk
from distilpose.models import build_model, count_parameters, sine_position_table
from distilpose.models.backbones import StemNet
from distilpose.models.complexity import measure_complexity


@pytest.mark.parametrize(
    "preset, total, head",
    [
        ("distilpose_s", 5_364_101, 5_039_045),
        ("distilpose_l", 21_265_637, 4_559_813),
        ("tokenpose_teacher", 69_411_360, 5_816_448),
    ],
)
def test_exact_parameter_counts(preset, total, head):
    m = build_model(preset)
    assert count_parameters(m) == total
    assert count_parameters(m.tde) + count_parameters(m.head) == head
    # the sine table is stored with the weights but is not trainable
    assert "tde.pos_embedding" in m.state_dict()
    assert all(p.requires_grad for p in m.parameters())


def test_paper_rounding_of_counts():
    assert round(count_parameters(build_model("distilpose_l")) / 1e6, 2) == 21.27
    assert round(count_parameters(build_model("tokenpose_teacher")) / 1e6, 1) == 69.4


def test_stemnet_size_and_output():
    net = StemNet()
    assert count_parameters(net) == 325_056
    assert net(torch.randn(1, 3, 256, 192)).shape == (1, 256, 64, 48)


@pytest.mark.parametrize("preset, paper", [("distilpose_s", 2.38), ("distilpose_l", 10.33), ("tokenpose_teacher", 17.03)])
def test_gmacs_within_two_percent_of_paper(preset, paper):
    c = measure_complexity(build_model(preset))
    assert abs(c.gmacs_paper / paper - 1) < 0.02
    # full count adds 12 layers x 2 attention products of 273 x 273 x 192
    assert c.gmacs_full - c.gmacs_paper == pytest.approx(12 * 2 * 273 * 273 * 192 / 1e9, rel=1e-9)


def test_sine_table_matches_spec_formula():
    table = sine_position_table(16, 16, 192)[0]
    assert table.shape == (256, 192)
    two_pi = 2 * math.pi
    for token in (0, 17, 255):
        row, col = divmod(token, 16)
        y = (row + 1) / (16 + 1e-6) * two_pi
        x = (col + 1) / (16 + 1e-6) * two_pi
        for i in (0, 1, 2, 5, 94, 95):
            t = 10000 ** (2 * (i // 2) / 96)
            fy = math.sin(y / t) if i % 2 == 0 else math.cos(y / t)
            fx = math.sin(x / t) if i % 2 == 0 else math.cos(x / t)
            assert table[token, i].item() == pytest.approx(fy, abs=1e-6)
            assert table[token, 96 + i].item() == pytest.approx(fx, abs=1e-6)


def test_patch_flattening_order():
    m = build_model("distilpose_tiny")
    c = m.tde.in_channels
    feat = torch.randn(2, c, 64, 48)
    tokens = m.tde.patchify(feat)
    assert tokens.shape == (2, 256, 12 * c)
    for patch, (r, q, ch) in [(0, (0, 0, 0)), (37, (2, 1, 5)), (255, (3, 2, c - 1))]:
        pr, pc = divmod(patch, 16)
        index = (r * 3 + q) * c + ch  # (row in patch, column in patch, channel)
        assert tokens[1, patch, index] == feat[1, ch, pr * 4 + r, pc * 3 + q]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("backend", ["conv", "gemm"])
def test_patch_embedding_paths_match_float64(backend, channels_last):
    """Both patch-embedding paths equal the spec's Linear on patch vectors (float64), NCHW and
    channels-last maps, with gradients; on CPU "auto" is the conv and records no decision."""
    m = build_model("distilpose_tiny")
    tde = m.tde
    c = tde.in_channels
    feat = torch.randn(2, c, 64, 48)
    if channels_last:
        feat = feat.to(memory_format=torch.channels_last)
    feat.requires_grad_(True)
    want = torch.nn.functional.linear(tde.patchify(feat.detach().double()), tde.patch_embed.weight.double(),
                                      tde.patch_embed.bias.double())
    tde.patch_backend = backend
    got = tde.embed_patches(feat)
    assert got.shape == (2, 256, tde.dim) and got.is_contiguous()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    got.square().sum().backward()
    f64 = feat.detach().double().requires_grad_(True)
    loss64 = torch.nn.functional.linear(tde.patchify(f64), tde.patch_embed.weight.double(),
                                        tde.patch_embed.bias.double()).square().sum()
    (want_grad,) = torch.autograd.grad(loss64, f64)
    torch.testing.assert_close(feat.grad.double(), want_grad, rtol=1e-4, atol=1e-4)
    tde.patch_backend = "auto"
    n = len(dk.auto_choices())
    with torch.no_grad():
        torch.testing.assert_close(tde.embed_patches(feat.detach()), got.detach(), rtol=1e-5, atol=1e-5)
    assert not [d for d in dk.auto_choices()[n:] if d["op"].startswith("patch embedding")]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_patch_embedding_auto_decides_once_and_agrees(monkeypatch):
    from distilpose.models import tde

    monkeypatch.setattr(tde, "_PATCH_CHOICES", {})  # an earlier test in this worker may have decided it
    m = build_model("distilpose_s").cuda().eval()
    feat = torch.randn(2, m.tde.in_channels, 64, 48, device="cuda")
    n = len(dk.auto_choices())
    with torch.inference_mode():
        a = m.tde.embed_patches(feat)
        b = m.tde.embed_patches(feat)
        m.tde.patch_backend = "conv"
        ref = m.tde.embed_patches(feat)
    made = [d for d in dk.auto_choices()[n:] if d["op"].startswith("patch embedding")]
    assert len(made) == 1 and made[0]["why"] in ("faster", "slower")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert dk.agrees_at_dtype(a, ref, 2e-2, 1e-2)


@pytest.mark.parametrize("preset", ["distilpose_tiny", "tokenpose_tiny"])
def test_output_shapes_and_gradients(preset):
    m = build_model(preset)
    out = m(torch.randn(1, 3, 256, 192))
    d = m.tde.dim
    assert out["kpt_tokens"].shape == (1, 17, d)
    assert out["vis_tokens"].shape == (1, 256, d)
    if m.kind == "student":
        assert out["coords"].shape == (1, 17, 2) and out["score"].shape == (1, 17, 1)
        assert out["sigma"].shape == (1, 17, 2)
        assert ((out["coords"] > 0) & (out["coords"] < 1)).all() and (out["sigma"] > 0).all()
        loss = out["coords"].sum() + out["score"].sum() + out["sigma"].sum() + out["vis_tokens"].pow(2).sum()
    else:
        assert out["heatmaps"].shape == (1, 17, 64, 48)
        loss = out["heatmaps"].pow(2).sum() + out["vis_tokens"].pow(2).sum()
    loss.backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []


def test_full_size_student_forward_shapes():
    m = build_model("distilpose_s").eval()
    with torch.no_grad():
        out = m(torch.randn(1, 3, 256, 192))
    assert out["coords"].shape == (1, 17, 2) and out["vis_tokens"].shape == (1, 256, 192)


def test_sine_full_readds_position_before_every_later_layer():
    torch.manual_seed(1)
    m = build_model("distilpose_tiny").eval()
    feat = torch.randn(1, m.tde.in_channels, 64, 48)
    k = m.tde.num_keypoints
    pos = m.tde.pos_embedding
    x = torch.cat((m.tde.keypoint_token, m.tde.patch_embed(m.tde.patchify(feat)) + pos), 1)
    for i, layer in enumerate(m.tde.layers):
        if i > 0:
            x = x.clone()
            x[:, k:] += pos
        x = layer(x)
    kpt, vis = m.tde(feat)
    torch.testing.assert_close(kpt, x[:, :k])
    torch.testing.assert_close(vis, x[:, k:])


@pytest.mark.parametrize(
    "img, match",
    [
        (torch.randn(1, 3, 128, 96), r"img: expected \(N, 3, 256, 192\)"),
        (torch.randn(1, 1, 256, 192), r"img: expected \(N, 3, 256, 192\)"),
        (torch.randn(3, 256, 192), r"img: expected \(N, 3, 256, 192\)"),
        (torch.zeros(1, 3, 256, 192, dtype=torch.uint8), "floating-point"),
    ],
)
def test_bad_inputs_raise_clear_errors(img, match):
    m = build_model("distilpose_tiny")
    with pytest.raises((ValueError, TypeError), match=match):
        m(img)


def test_nan_input_rejected_unless_check_disabled():
    m = build_model("distilpose_tiny").eval()
    img = torch.randn(1, 3, 256, 192)
    img[0, 1, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        m(img)
    m.check_finite = False
    assert torch.isnan(m(img)["coords"]).any()


def test_unknown_preset_and_bad_options():
    with pytest.raises(ValueError, match="preset"):
        build_model("nope")
    with pytest.raises(ValueError, match="pos_mode"):
        build_model("distilpose_tiny", tde=dict(pos_mode="learned"))


def test_fused_pos_norm_option_gives_the_same_encoder_output():
    torch.manual_seed(2)
    a = build_model("distilpose_tiny").eval()
    b = build_model("distilpose_tiny", tde=dict(fuse_pos_norm=True)).eval()
    b.load_state_dict(a.state_dict())
    img = torch.randn(1, 3, 256, 192)
    with torch.no_grad():
        oa, ob = a(img), b(img)
    for k in ("coords", "vis_tokens", "kpt_tokens"):
        torch.testing.assert_close(oa[k], ob[k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_patch_embedding_as_strided_conv_equals_linear_on_patches(channels_last):
    """embed_patches (conv with the Linear's weight) == patch_embed(patchify(feat)), values and grads."""
    from distilpose.models.tde import TokenDistillingEncoder

    tde = TokenDistillingEncoder(in_channels=5, feature_size=(8, 9), patch_size=(4, 3), dim=16, depth=1, num_heads=2,
                                 mlp_dim=8).double()
    with torch.no_grad():
        tde.patch_embed.bias.normal_()
    feat = torch.randn(3, 5, 8, 9, dtype=torch.float64)
    if channels_last:
        feat = feat.contiguous(memory_format=torch.channels_last)
    a = tde.embed_patches(feat)
    assert a.shape == (3, 6, 16) and a.is_contiguous()
    ga = torch.autograd.grad(a.square().sum(), tde.patch_embed.weight)[0]
    b = tde.patch_embed(tde.patchify(feat))
    gb = torch.autograd.grad(b.square().sum(), tde.patch_embed.weight)[0]
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-10)
