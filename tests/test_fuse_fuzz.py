"""Adversarial checks of conv+BN folding (``distilpose.fuse``): every foldable configuration
matches the unfused model in float64, and everything the fold cannot see (tied weights, a conv
shared or read elsewhere, hooks, parametrizations, a BatchNorm in train mode) is left unfolded
instead of silently changing the outputs."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from distilpose.fuse import find_conv_bn_pairs, fuse_conv_bn_model, fuse_conv_epilogues


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            if m.track_running_stats:
                m.running_mean.copy_(torch.rand(c, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(c, generator=g) * 2.5 + 0.2)
            if m.affine:
                m.weight.data.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.bias.data.copy_(torch.rand(c, generator=g) * 2 - 1)
    return model


def _same(model: nn.Module, x: torch.Tensor, atol: float = 1e-10) -> nn.Module:
    """Fold ``model`` (float64, eval) and check the outputs; returns the folded copy."""
    model = _randomise(model).double().eval()
    x = x.double()
    folded = fuse_conv_bn_model(model)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=atol)
    return folded


# ----------------------------------------------------------------------------- configurations

X2 = torch.randn(2, 4, 9, 7, generator=torch.Generator().manual_seed(1))
CONFIGS = {
    "affine=False": (nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6, affine=False)),
    "eps=0.3, no bias": (nn.Conv2d(4, 6, 3, bias=False), nn.BatchNorm2d(6, eps=0.3)),
    "groups, dilation, stride, reflect": (nn.Conv2d(4, 8, 3, stride=2, padding=3, dilation=2, groups=2,
                                                    padding_mode="reflect"), nn.BatchNorm2d(8)),
    "depthwise, same, circular": (nn.Conv2d(4, 4, 3, groups=4, padding="same", padding_mode="circular"),
                                  nn.BatchNorm2d(4)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fold_configurations_match_float64(name):
    conv, bn = copy.deepcopy(CONFIGS[name])
    folded = _same(nn.Sequential(conv, bn), X2)
    assert folded._distilpose_folded_bn == 1 and isinstance(folded[1], nn.Identity)


def test_fold_conv1d_conv3d_and_track_running_stats_false():
    _same(nn.Sequential(nn.Conv1d(4, 6, 3), nn.BatchNorm1d(6)), torch.randn(2, 4, 9))
    _same(nn.Sequential(nn.Conv3d(2, 3, 3), nn.BatchNorm3d(3)), torch.randn(2, 2, 5, 5, 5))
    f = _same(nn.Sequential(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6, track_running_stats=False)), X2)
    assert f._distilpose_folded_bn == 0 and isinstance(f[1], nn.BatchNorm2d)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fold_low_precision_channels_last(dtype):
    """16-bit, channels-last weights: the fold (in float64) keeps dtype and layout and is no worse
    than the unfused model's own rounding, both measured against float64."""
    m = _randomise(nn.Sequential(nn.Conv2d(4, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                                 nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6))).eval()
    ref = copy.deepcopy(m).double()
    m = m.to(dtype).to(memory_format=torch.channels_last)
    f = fuse_conv_bn_model(m)
    assert all(p.dtype == dtype for p in f.parameters())
    assert f[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = X2.to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = ref(x.double())
        err_unfused = (m(x).double() - want).abs().max()
        err_folded = (f(x).double() - want).abs().max()
    assert err_folded <= 3 * err_unfused + 1e-3


def test_fold_twice_is_idempotent_and_keeps_the_count():
    f = _same(nn.Sequential(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.Conv2d(6, 2, 1), nn.BatchNorm2d(2)), X2)
    assert f._distilpose_folded_bn == 2
    g = fuse_conv_bn_model(f, inplace=True)
    assert g is f and g._distilpose_folded_bn == 2  # still 2 folded pairs in this model
    with torch.no_grad():
        torch.testing.assert_close(g(X2.double()), fuse_conv_bn_model(f)(X2.double()), rtol=0, atol=0)


def test_folded_model_state_dict_deepcopy_export():
    f = _same(nn.Sequential(nn.Conv2d(4, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU()), X2)
    assert list(f.state_dict()) == ["0.weight", "0.bias"]
    x = X2.double()
    with torch.no_grad():
        want = f(x)
        torch.testing.assert_close(copy.deepcopy(f)(x), want, rtol=0, atol=0)
        g = nn.Sequential(nn.Conv2d(4, 6, 3), nn.Identity(), nn.ReLU()).double()
        g.load_state_dict(f.state_dict())
        torch.testing.assert_close(g(x), want, rtol=0, atol=0)
    ep = torch.export.export(f, (x,))
    torch.testing.assert_close(ep.module()(x), want, rtol=0, atol=0)


# ----------------------------------------------------------------------------- what must not be folded


class _Tied(nn.Module):
    """Two convs sharing one weight Parameter, each with its own BN."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.c2.weight = self.c1.weight
        self.b1, self.b2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.b2(self.c2(self.b1(self.c1(x))))


class _Untraceable(nn.Module):
    """A data-dependent branch (fx cannot trace it): the children are traced one by one."""

    def __init__(self, a, b, extra=None):
        super().__init__()
        self.a, self.b, self.extra = a, b, extra

    def forward(self, x):
        if float(x.sum()) > -1e30:
            y = self.b(self.a(x))
            return y if self.extra is None else y + self.extra(x)
        return x


class _ReadsWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv.weight.sum()


def _shared_conv():
    c = nn.Conv2d(4, 4, 3, padding=1)
    return _Untraceable(nn.Sequential(c, nn.BatchNorm2d(4)), nn.Sequential(c, nn.BatchNorm2d(4)))


def _conv_also_used_alone():
    c = nn.Conv2d(4, 4, 3, padding=1)
    return _Untraceable(nn.Sequential(c, nn.BatchNorm2d(4)), nn.Identity(), extra=c)


def _hooked_conv():
    m = nn.Sequential(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6))
    m[0].register_forward_hook(lambda mod, inp, out: out * 2)
    return m


def _hooked_bn():
    m = nn.Sequential(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6))
    m[1].register_forward_pre_hook(lambda mod, inp: (inp[0] + 1,))
    return m


def _weight_norm_conv():
    m = nn.Sequential(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6))
    parametrizations.weight_norm(m[0])
    return m


def _bn_in_train_mode():
    m = nn.Sequential(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6)).eval()
    m[1].train()
    return m


UNFOLDABLE = {"tied weight": _Tied, "conv shared by two traced children": _shared_conv,
              "conv also called alone": _conv_also_used_alone, "conv weight read in forward": _ReadsWeight,
              "forward hook on the conv": _hooked_conv, "pre-hook on the BN": _hooked_bn,
              "parametrized conv weight": _weight_norm_conv, "BN in train mode": _bn_in_train_mode}


@pytest.mark.parametrize("name", list(UNFOLDABLE))
def test_fold_leaves_what_it_cannot_see_unchanged(name):
    model = _randomise(UNFOLDABLE[name]()).double()
    if name != "BN in train mode":
        model.eval()
    model.training = False  # the top level is in eval mode in every case
    x = X2.double()
    with torch.no_grad():
        want = model(x)
        folded = fuse_conv_bn_model(model)
        torch.testing.assert_close(folded(x), want, rtol=1e-10, atol=1e-10)
    assert folded._distilpose_folded_bn == 0 and find_conv_bn_pairs(model) == []


def test_fold_conv_bn_refuses_a_parametrized_conv():
    """Writing the folded weight into a parametrized conv's computed weight is a silent no-op."""
    from distilpose.fuse import fold_conv_bn

    conv, bn = _weight_norm_conv()
    with pytest.raises(ValueError, match="conv: its parameters are parametrized"):
        fold_conv_bn(conv, _randomise(bn).eval())


def test_fold_still_folds_a_bn_shared_by_two_convs():
    """A BN (read only) after two distinct convs: both pairs fold, the outputs are kept."""
    bn = nn.BatchNorm2d(4)
    m = _Untraceable(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), bn), nn.Sequential(nn.Conv2d(4, 4, 1), bn))
    assert _same(m, X2)._distilpose_folded_bn == 2


# ----------------------------------------------------------------------------- the real presets


def _engine_pair(preset):
    from distilpose.models import build_model
    from distilpose.runtime import InferenceEngine

    model = build_model(preset).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(c, generator=g) * 0.4 + 0.8)
                m.bias.copy_(torch.rand(c, generator=g) * 0.2 - 0.1)
    x = torch.randn(1, 3, *model.input_size, generator=g)
    plain = InferenceEngine(model, fold_bn=False, flip_test=False)(x)
    engine = InferenceEngine(model, fold_bn=True, flip_test=False)
    return plain, engine(x), engine


@pytest.mark.parametrize("preset", ["distilpose_s", "distilpose_l",
                                    pytest.param("tokenpose_teacher", marks=pytest.mark.slow)])  # 69M params
def test_engine_fold_bn_keeps_the_keypoints(preset):
    plain, folded, engine = _engine_pair(preset)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in engine.model.modules())
    torch.testing.assert_close(folded["keypoints"], plain["keypoints"], rtol=0, atol=1e-3)  # crop pixels
    torch.testing.assert_close(folded["scores"], plain["scores"], rtol=1e-4, atol=1e-5)


def test_fuse_conv_epilogues_after_fold_with_unfoldable_parts():
    """An unfolded BN (train-mode here) keeps its block unfused; the rest still matches."""
    from distilpose.models.backbones.resnet_blocks import Bottleneck

    m = _randomise(nn.Sequential(Bottleneck(8, 2), Bottleneck(8, 2))).eval()
    m[1].bn2.train()
    x = torch.randn(2, 8, 6, 5)
    with torch.no_grad():
        want = m(x)
        fused = fuse_conv_epilogues(fuse_conv_bn_model(m))
        torch.testing.assert_close(fused(x), want, rtol=1e-5, atol=1e-5)
    assert fused[0].fused_epilogue and not fused[1].fused_epilogue


def test_set_tde_fusions_takes_booleans_only():
    from distilpose.fuse import set_tde_fusions
    from distilpose.models.tde import TokenDistillingEncoder

    tde = TokenDistillingEncoder(in_channels=4, feature_size=(8, 6), patch_size=(4, 3), num_keypoints=3, dim=16,
                                 depth=1, num_heads=2, mlp_dim=8)
    with pytest.raises(TypeError, match="mlp_kernel must be True or False"):
        set_tde_fusions(tde, mlp_kernel="false")
    with pytest.raises(ValueError, match="unknown switches"):
        set_tde_fusions(tde, fuse_everything=True)
    set_tde_fusions(tde, fuse_add_norm=True)
    assert tde.fuse_add_norm is True
