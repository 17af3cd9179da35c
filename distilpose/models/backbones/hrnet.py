"""HRNet (Sun et al. 2019) with mmpose's module and key names, configurable stages and width."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

import distilpose_kernels as dk
from distilpose_kernels import annotate

from .resnet_blocks import BN_MOMENTUM, BasicBlock, Bottleneck, conv3x3, make_layer

BLOCKS = {"BASIC": BasicBlock, "BOTTLENECK": Bottleneck}


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, momentum=BN_MOMENTUM)


class HRModule(nn.Module):
    """Parallel branches followed by a multi-resolution fusion (mmpose HRModule).

    ``fused_sum`` (set by ``distilpose.fuse.fuse_conv_epilogues`` once the fusion BNs are
    folded): each output branch is one ``distilpose_kernels.upsample_sum`` call, the
    lower-resolution terms read at their own size instead of upsampled, added and ReLU'd in
    separate passes. Same math.
    """

    fused_sum = False

    def __init__(
        self,
        num_branches: int,
        block: type,
        num_blocks: Sequence[int],
        in_channels: List[int],
        num_channels: Sequence[int],
        multiscale_output: bool = True,
    ):
        super().__init__()
        self.num_branches = num_branches
        self.in_channels = list(in_channels)
        self.multiscale_output = multiscale_output
        self.branches = nn.ModuleList(
            make_layer(block, self.in_channels[i], num_channels[i], num_blocks[i]) for i in range(num_branches)
        )
        self.in_channels = [c * block.expansion for c in num_channels]
        self.fuse_layers = self._make_fuse_layers()
        self.relu = nn.ReLU(inplace=True)

    def _make_fuse_layers(self) -> Optional[nn.ModuleList]:
        if self.num_branches == 1:
            return None
        c = self.in_channels
        num_out = self.num_branches if self.multiscale_output else 1
        fuse = []
        for i in range(num_out):
            row: List[Optional[nn.Module]] = []
            for j in range(self.num_branches):
                if j > i:
                    row.append(
                        nn.Sequential(
                            nn.Conv2d(c[j], c[i], 1, bias=False),
                            _bn(c[i]),
                            nn.Upsample(scale_factor=2 ** (j - i), mode="nearest"),
                        )
                    )
                elif j == i:
                    row.append(None)
                else:
                    downs = []
                    for k in range(i - j):
                        if k == i - j - 1:
                            downs.append(nn.Sequential(conv3x3(c[j], c[i], 2), _bn(c[i])))
                        else:
                            downs.append(nn.Sequential(conv3x3(c[j], c[j], 2), _bn(c[j]), nn.ReLU(inplace=True)))
                    row.append(nn.Sequential(*downs))
            fuse.append(nn.ModuleList(row))
        return nn.ModuleList(fuse)

    def forward(self, x: List[torch.Tensor]) -> List[torch.Tensor]:
        if self.num_branches == 1:
            return [self.branches[0](x[0])]
        x = [branch(xi) for branch, xi in zip(self.branches, x)]
        out = []
        if self.fused_sum:
            for i, row in enumerate(self.fuse_layers):
                terms, scales = [], []
                for j in range(self.num_branches):
                    if j > i:  # Sequential(conv, Identity (folded BN), Upsample): the conv only
                        terms.append(row[j][0](x[j]))
                        scales.append(2 ** (j - i))
                    elif j < i:
                        terms.append(row[j](x[j]))
                        scales.append(1)
                out.append(dk.upsample_sum(x[i], terms, scales, relu=True))
            return out
        for i, row in enumerate(self.fuse_layers):
            y = x[i]
            for j in range(self.num_branches):
                if j != i:
                    y = y + row[j](x[j])
            out.append(self.relu(y))
        return out


class HRNet(nn.Module):
    """HRNet backbone returning the highest-resolution branch: (N, 3, H, W) -> (N, C0, H/4, W/4).

    ``stages`` lists the config of stages 2.. (stage 1 is the 4-Bottleneck layer1):
    each a dict(num_modules, num_blocks, num_channels, block="BASIC"). The last module
    of the last stage fuses to the first branch only (mmpose ``multiscale_output=False``).
    ``fused_epilogue``: see :mod:`.resnet_blocks` (set by ``fuse_conv_epilogues``).
    """

    fused_epilogue = False

    def __init__(
        self,
        stages: Sequence[dict],
        in_channels: int = 3,
        stem_channels: int = 64,
        stage1_blocks: int = 4,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.conv1 = conv3x3(in_channels, stem_channels, 2)
        self.bn1 = _bn(stem_channels)
        self.conv2 = conv3x3(stem_channels, stem_channels, 2)
        self.bn2 = _bn(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = make_layer(Bottleneck, stem_channels, stem_channels, stage1_blocks)
        pre = [stem_channels * Bottleneck.expansion]
        self.num_stages = len(stages)
        for s, cfg in enumerate(stages):
            block = BLOCKS[cfg.get("block", "BASIC")]
            cur = [c * block.expansion for c in cfg["num_channels"]]
            setattr(self, f"transition{s + 1}", self._make_transition(pre, cur))
            last = s == len(stages) - 1
            modules, pre = self._make_stage(cfg, block, cur, multiscale_output=not last)
            setattr(self, f"stage{s + 2}", modules)
        self.out_channels = pre[0]

    @staticmethod
    def _make_transition(pre: List[int], cur: List[int]) -> nn.ModuleList:
        layers: List[Optional[nn.Module]] = []
        for i in range(len(cur)):
            if i < len(pre):
                if cur[i] != pre[i]:
                    layers.append(nn.Sequential(conv3x3(pre[i], cur[i]), _bn(cur[i]), nn.ReLU(inplace=True)))
                else:
                    layers.append(None)
            else:
                downs = []
                for j in range(i + 1 - len(pre)):
                    cin = pre[-1]
                    cout = cur[i] if j == i - len(pre) else cin
                    downs.append(nn.Sequential(conv3x3(cin, cout, 2), _bn(cout), nn.ReLU(inplace=True)))
                layers.append(nn.Sequential(*downs))
        return nn.ModuleList(layers)

    @staticmethod
    def _make_stage(cfg: dict, block: type, in_channels: List[int], multiscale_output: bool):
        mods = []
        n = cfg["num_modules"]
        for m in range(n):
            ms = multiscale_output or m < n - 1
            mod = HRModule(len(cfg["num_channels"]), block, cfg["num_blocks"], in_channels, cfg["num_channels"], ms)
            in_channels = mod.in_channels
            mods.append(mod)
        return nn.Sequential(*mods), in_channels

    @annotate("distilpose.backbone")
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_epilogue:
            x = self.conv2(self.conv1(x))
        else:
            x = self.relu(self.bn1(self.conv1(x)))
            x = self.relu(self.bn2(self.conv2(x)))
        ys = [self.layer1(x)]
        for s in range(self.num_stages):
            transition = getattr(self, f"transition{s + 1}")
            xs = []
            for i, t in enumerate(transition):
                if t is None:
                    xs.append(ys[i])
                else:
                    xs.append(t(ys[-1]))
            ys = getattr(self, f"stage{s + 2}")(xs)
        return ys[0]


def hrnet_stages(width: int, num_stages: int) -> List[dict]:
    """Standard HRNet-W{width} configs of stages 2..(num_stages+1): 1, 4, 3 modules, 4 blocks each."""
    mods = [1, 4, 3]
    return [
        dict(num_modules=mods[s], num_blocks=[4] * (s + 2), num_channels=[width * 2**b for b in range(s + 2)])
        for s in range(num_stages)
    ]
