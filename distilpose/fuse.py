"""Inference transforms: Conv + BatchNorm folding, and conv epilogue fusion.

An eval-mode BatchNorm after a convolution is an affine map per output channel, so it
can be folded into the convolution's weight and bias:

    w' = w * gamma / sqrt(var + eps)        b' = (b - mean) * gamma / sqrt(var + eps) + beta

Pairs are found with ``torch.fx`` (a conv whose only user is a BatchNorm), on the largest
submodules that trace; the model keeps its own classes and forward code (NVTX ranges
included): each folded BatchNorm is replaced by ``nn.Identity`` and its conv gets the
folded weights. The fold is computed in float64 and cast back to the conv's dtype.
Left unfolded, since the fold would change what the model computes: a BatchNorm in train
mode or without running statistics; a conv registered in the model more than once (it may
run outside the traced graph), whose weight or bias is shared with another module or read in
the forward; a conv or BatchNorm with forward hooks or a parametrization.

After folding, ``fuse_conv_epilogues`` turns each conv whose output only goes through a bias,
a residual add and a ReLU into a ``distilpose_kernels.ConvReLU2d`` (same parameters), so the
whole epilogue runs inside the convolution (cuDNN's fused kernel on CUDA where it is faster).
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["fold_conv_bn", "fold_conv_bn_weights", "find_conv_bn_pairs", "fuse_conv_bn_model", "fuse_conv_epilogues"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fold_conv_bn_weights(
    conv_w: torch.Tensor,
    conv_b: torch.Tensor | None,
    bn_mean: torch.Tensor,
    bn_var: torch.Tensor,
    bn_eps: float,
    bn_w: torch.Tensor | None,
    bn_b: torch.Tensor | None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Folded (weight (Cout, Cin/g, *k), bias (Cout,)) of conv followed by eval-mode BN."""
    dtype = conv_w.dtype
    w = conv_w.detach().double()
    cout = w.shape[0]
    b = conv_b.detach().double() if conv_b is not None else torch.zeros(cout, dtype=torch.float64, device=w.device)
    gamma = bn_w.detach().double() if bn_w is not None else torch.ones_like(b)
    beta = bn_b.detach().double() if bn_b is not None else torch.zeros_like(b)
    inv_std = torch.rsqrt(bn_var.detach().double() + bn_eps)
    factor = gamma * inv_std
    w_f = w * factor.reshape(-1, *([1] * (w.dim() - 1)))
    b_f = (b - bn_mean.detach().double()) * factor + beta
    return w_f.to(dtype), b_f.to(dtype)


def fold_conv_bn(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """A new conv (same class and hyper-parameters) equal to ``bn(conv(x))`` in eval mode."""
    if not isinstance(conv, _CONVS):
        raise TypeError(f"conv: expected nn.Conv1d/2d/3d, got {type(conv).__name__}")
    if not isinstance(bn, _BNS):
        raise TypeError(f"bn: expected nn.BatchNorm1d/2d/3d, got {type(bn).__name__}")
    if not bn.track_running_stats or bn.running_mean is None:
        raise ValueError("bn: has no running statistics (track_running_stats=False): it cannot be folded")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"bn: {bn.num_features} features, but the conv has {conv.out_channels} output channels")
    if parametrize.is_parametrized(conv):
        raise ValueError("conv: its parameters are parametrized (e.g. weight_norm): the fold would be lost; "
                         "remove the parametrization first (torch.nn.utils.parametrize.remove_parametrizations)")
    fused = copy.deepcopy(conv)
    _fold_into(fused, bn)
    return fused


def _fold_into(conv: nn.Module, bn: nn.Module) -> None:
    w, b = fold_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    requires_grad = conv.weight.requires_grad
    with torch.no_grad():
        conv.weight.copy_(w)
        if conv.bias is None:
            conv.bias = nn.Parameter(b, requires_grad=requires_grad)
        else:
            conv.bias.copy_(b)


def _plain(m: nn.Module) -> bool:
    """No hook or parametrization runs around ``m``'s forward (the fold would bypass it)."""
    return not (m._forward_hooks or m._forward_pre_hooks or parametrize.is_parametrized(m))


def _pairs_in_graph(gm: fx.GraphModule) -> List[Tuple[str, str]]:
    calls: Dict[str, int] = {}
    read: List[str] = []  # attributes the forward reads directly (e.g. a conv's weight)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
        elif node.op == "get_attr":
            read.append(node.target)
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), _BNS):
            continue
        if not node.args or not isinstance(node.args[0], fx.Node):
            continue
        src = node.args[0]
        if src.op != "call_module" or not isinstance(gm.get_submodule(src.target), _CONVS):
            continue
        # the conv output must feed only this BN, and neither module may be shared
        if len(src.users) != 1 or calls[src.target] != 1 or calls[node.target] != 1:
            continue
        bn, conv = gm.get_submodule(node.target), gm.get_submodule(src.target)
        if not bn.track_running_stats or bn.running_mean is None or bn.training:
            continue
        if bn.num_features != conv.out_channels or not (_plain(conv) and _plain(bn)):
            continue
        if any(t == src.target or t.startswith(src.target + ".") for t in read):
            continue
        pairs.append((src.target, node.target))
    return pairs


def find_conv_bn_pairs(module: nn.Module) -> List[Tuple[str, str]]:
    """Qualified names (conv, bn) of every foldable pair in ``module``.

    Traces ``module`` with torch.fx; where tracing fails (data-dependent checks, for
    instance), its children are traced instead, recursively. A conv registered under more
    than one name, or with a weight or bias that another module shares, is never paired
    (separately traced children cannot show all of its uses).
    """

    def visit(mod: nn.Module, prefix: str) -> List[Tuple[str, str]]:
        if not any(isinstance(m, _BNS) for m in mod.modules()):
            return []
        try:
            gm = fx.symbolic_trace(mod)
        except Exception:  # noqa: BLE001 - any trace failure: look one level down
            out = []
            for name, child in mod.named_children():
                out += visit(child, f"{prefix}{name}.")
            return out
        return [(prefix + c, prefix + b) for c, b in _pairs_in_graph(gm)]

    names: Dict[int, int] = {}
    for _, m in module.named_modules(remove_duplicate=False):
        names[id(m)] = names.get(id(m), 0) + 1
    for _, p in module.named_parameters(remove_duplicate=False):
        names[id(p)] = names.get(id(p), 0) + 1

    def unshared(conv_name: str) -> bool:
        conv = module.get_submodule(conv_name)
        return all(names.get(id(t), 0) <= 1 for t in (conv, conv.weight, conv.bias) if t is not None)

    return [(c, b) for c, b in visit(module, "") if unshared(c)]


def _set_submodule(root: nn.Module, qualname: str, new: nn.Module) -> None:
    parent_name, _, attr = qualname.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def fuse_conv_bn_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every conv -> BatchNorm pair of an eval-mode ``model``; the BNs become ``nn.Identity``.

    Returns the fused model (a deep copy unless ``inplace``). The number of folded pairs
    (over every call on this model) is stored as ``model._distilpose_folded_bn``. The result
    is for inference only: training it would train without BatchNorm.
    """
    if model.training:
        raise RuntimeError("model: conv+BN folding needs eval mode (call model.eval() first)")
    if not inplace:
        model = copy.deepcopy(model)
    pairs = find_conv_bn_pairs(model)
    for conv_name, bn_name in pairs:
        _fold_into(model.get_submodule(conv_name), model.get_submodule(bn_name))
        _set_submodule(model, bn_name, nn.Identity())
    model._distilpose_folded_bn = getattr(model, "_distilpose_folded_bn", 0) + len(pairs)  # type: ignore[attr-defined]
    return model


def _fusable_conv(m: nn.Module) -> bool:
    from distilpose_kernels import ConvReLU2d

    return (type(m) is nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str)
            and not isinstance(m, ConvReLU2d))


def _hr_fusion_foldable(mod: nn.Module) -> bool:
    """Every upsampling term of the HRModule's fusion is Conv2d -> Identity (folded BN) ->
    nearest Upsample by 2**(j - i): what ``HRModule.forward``'s fused branch assumes."""
    for i, row in enumerate(mod.fuse_layers):
        for j in range(mod.num_branches):
            if j <= i:
                continue
            seq = row[j]
            if not (isinstance(seq, nn.Sequential) and len(seq) == 3 and type(seq[0]) is nn.Conv2d
                    and type(seq[1]) is nn.Identity and type(seq[2]) is nn.Upsample):
                return False
            up = seq[2]
            if up.mode != "nearest" or up.size is not None or float(up.scale_factor) != float(2 ** (j - i)):
                return False
    return True


def _move_downsample_bias(block: nn.Module, last: nn.Module) -> None:
    """A fused residual block computes relu(last(h) + b_last + identity) with identity =
    downsample(x) = conv_d(x) + b_d (a folded BN: Conv2d -> Identity). Adding b_d to b_last
    instead gives the same sum, and leaves the downsample conv without a bias: cuDNN convs add
    a bias as a separate broadcast kernel over the whole output, which in DistilPose-S's first
    Bottleneck (256 channels at 64 x 48) was 5% of the batch-256 H200 profile (626 us of 11.8 ms).
    New parameters: a bias shared with another module is not changed."""
    ds = getattr(block, "downsample", None)
    if not (isinstance(ds, nn.Sequential) and len(ds) == 2 and _fusable_conv(ds[0]) and type(ds[1]) is nn.Identity
            and ds[0].bias is not None):
        return
    with torch.no_grad():
        b = ds[0].bias.detach().float() + (last.bias.detach().float() if last.bias is not None else 0.0)
        like = last.bias if last.bias is not None else ds[0].bias
        last.bias = nn.Parameter(b.to(like.dtype), requires_grad=like.requires_grad)
    ds[0].bias = None


def fuse_conv_epilogues(model: nn.Module, inplace: bool = False, backend: Optional[str] = None) -> nn.Module:
    """Fuse bias + residual add + ReLU into the convs of an eval-mode model with folded BNs.

    Handled: ``Bottleneck`` / ``BasicBlock`` (conv1/conv2 with ReLU, the last conv with the
    residual add and ReLU), the ``StemNet`` / ``HRNet`` stem convs, every ``nn.Sequential``
    run of Conv2d -> (Identity)* -> ReLU (HRNet transitions and fusion downsamplers), and each
    ``HRModule``'s multi-resolution sum + ReLU (``distilpose_kernels.upsample_sum``; not counted
    as a conv). A fused block's downsample conv gives its bias to the block's last conv (the
    same sum; no separate bias kernel). A block whose BatchNorms are not folded
    (``fuse_conv_bn_model`` first) is left as it is.
    Returns the model (a deep copy unless ``inplace``); the number of fused convs is stored as
    ``model._distilpose_fused_epilogues``. ``backend``: for every ``ConvReLU2d`` (None = auto).
    For inference: the fused convs have no BatchNorm to train.
    """
    from distilpose_kernels import ConvReLU2d

    from .models.backbones.hrnet import HRModule, HRNet
    from .models.backbones.resnet_blocks import BasicBlock, Bottleneck
    from .models.backbones.stemnet import StemNet

    if model.training:
        raise RuntimeError("model: epilogue fusion needs eval mode (call model.eval() first)")
    if not inplace:
        model = copy.deepcopy(model)
    plans = {Bottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
             BasicBlock: (("conv1", "bn1"), ("conv2", "bn2")),
             StemNet: (("conv1", "bn1"), ("conv2", "bn2")),
             HRNet: (("conv1", "bn1"), ("conv2", "bn2"))}
    count = 0
    for mod in list(model.modules()):
        plan = plans.get(type(mod))
        if plan is not None:
            if getattr(mod, "fused_epilogue", False):
                continue
            if all(isinstance(getattr(mod, bn), nn.Identity) and _fusable_conv(getattr(mod, conv)) for conv, bn in plan):
                for conv, _ in plan:
                    setattr(mod, conv, ConvReLU2d.from_conv(getattr(mod, conv), backend=backend))
                mod.fused_epilogue = True
                count += len(plan)
                _move_downsample_bias(mod, getattr(mod, plan[-1][0]))
        elif type(mod) is HRModule:
            if not mod.fused_sum and mod.fuse_layers is not None and _hr_fusion_foldable(mod):
                mod.fused_sum = True
        elif type(mod) is nn.Sequential:
            kids = list(mod)
            for i, m in enumerate(kids):
                if not _fusable_conv(m):
                    continue
                j = i + 1
                while j < len(kids) and type(kids[j]) is nn.Identity:
                    j += 1
                if j < len(kids) and type(kids[j]) is nn.ReLU:
                    mod[i] = ConvReLU2d.from_conv(m, backend=backend)
                    mod[j] = nn.Identity()
                    count += 1
    model._distilpose_fused_epilogues = getattr(model, "_distilpose_fused_epilogues", 0) + count  # type: ignore[attr-defined]
    return model


#: the TDE modules' inference switches (TokenDistillingEncoder, Mlp, TokenAttentionBlock)
TDE_FUSION_FLAGS = ("fuse_pos_norm", "fuse_add_norm", "fuse_gelu", "triton_linears", "mlp_kernel", "fuse_qkv")


def set_tde_fusions(model: nn.Module, **flags: bool) -> nn.Module:
    """Set the TDE inference switches (``TDE_FUSION_FLAGS``) on every module that has them, e.g.
    ``set_tde_fusions(model, fuse_add_norm=True, mlp_kernel=False)``. Same math either way."""
    unknown = set(flags) - set(TDE_FUSION_FLAGS)
    if unknown:
        raise ValueError(f"set_tde_fusions: unknown switches {sorted(unknown)}; expected {TDE_FUSION_FLAGS}")
    for name, value in flags.items():
        if not isinstance(value, bool):  # bool("false") would turn a switch on
            raise TypeError(f"set_tde_fusions: {name} must be True or False, got {value!r}")
    for m in model.modules():
        for name, value in flags.items():
            if hasattr(m, name):
                setattr(m, name, value)
    return model
