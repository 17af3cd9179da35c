"""StemNet: the DistilPose-S student backbone (two stride-2 3x3 convs + 4 Bottlenecks)."""
from __future__ import annotations

import torch
from torch import nn

from distilpose_kernels import annotate

from .resnet_blocks import BN_MOMENTUM, Bottleneck, conv3x3, make_layer


class StemNet(nn.Module):
    """(N, 3, H, W) -> (N, 256, H/4, W/4). 325,056 parameters at the default width.

    ``fused_epilogue``: see :mod:`.resnet_blocks` (set by ``fuse_conv_epilogues``)."""

    fused_epilogue = False

    def __init__(self, in_channels: int = 3, stem_channels: int = 64, num_blocks: int = 4):
        super().__init__()
        self.conv1 = conv3x3(in_channels, stem_channels, stride=2)
        self.bn1 = nn.BatchNorm2d(stem_channels, momentum=BN_MOMENTUM)
        self.conv2 = conv3x3(stem_channels, stem_channels, stride=2)
        self.bn2 = nn.BatchNorm2d(stem_channels, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = make_layer(Bottleneck, stem_channels, stem_channels, num_blocks)
        self.in_channels = in_channels
        self.out_channels = stem_channels * Bottleneck.expansion

    @annotate("distilpose.backbone")
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_epilogue:
            return self.layer1(self.conv2(self.conv1(x)))
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.layer1(x)
