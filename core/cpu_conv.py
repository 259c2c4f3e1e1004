"""Small convolutions as one matrix multiply for the whole batch, on the CPU (OneFlow 0.9.0).

Written for OneFlow 0.9.0, whose CPU convolution multiplies the weights by one image's unfolded
input at a time. Where a layer's output has few positions (ResNet-18's last two stages at 32 px
put out 2x2 and 1x1 maps), that is a matrix-vector product per image: all the weights are read
again for every image of the batch, and the 512->512 3x3 convolution of a 1x1 map took 183 ms
for 64 images (1.7 GFLOP/s) against 15 ms as one matrix multiply. `batched_small_convs` makes
such layers unfold the whole batch and multiply it once, forward and backward (autograd through
`unfold` and `matmul`): the same products and sums, in one call.

Measured on 2 cores, ResNet-18, batch 64 (`benchmarks/train_speed.py` for whole runs):
forward 71 -> 235 images/s and a training step 33 -> 80 images/s at 32 px; 1.3x at 64 px; at
224 px no layer has MAX_POSITIONS positions or fewer, so nothing changes. Outputs were equal to
OneFlow's convolution to the last bit in every layer shape measured, gradients within 5e-7
relative. Layers with more positions, grouped (depthwise) convolutions and other paddings keep
OneFlow's own kernel; so does every device but the CPU. Check again on a newer OneFlow: if its CPU
convolution batches these layers, this module can go.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List

from core.backend import flow
from oneflow import nn

MAX_POSITIONS = 4
"""Layers whose output has at most this many positions (height x width) are multiplied as one
matrix: measured at 32 and 64 px, 4 was faster than 1 and than 16 (at 16 positions OneFlow's
per-image products are already as fast as one product plus the reshuffling)."""


class BatchedSmallConv2d(nn.Conv2d):
    """An nn.Conv2d whose forward multiplies the whole batch at once when its output is small.
    Only `batched_small_convs` makes one (it swaps the class of an existing layer): the
    parameters, their names and the state dict stay those of the nn.Conv2d."""

    def forward(self, x):
        if not self._batched(x):
            return super().forward(x)
        n, (ho, wo) = x.shape[0], self._output_size(x)
        cols = nn.functional.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding,
                                    stride=self.stride)
        cols = cols.permute(0, 2, 1).reshape(n * ho * wo, -1)  # a row per image and output position
        out = flow.matmul(cols, self.weight.reshape(self.out_channels, -1), transpose_b=True)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(n, ho, wo, self.out_channels).permute(0, 3, 1, 2).contiguous()

    def _batched(self, x) -> bool:
        if (x.ndim != 4 or self.groups != 1 or getattr(self, "channel_pos", "channels_first") != "channels_first"
                or getattr(self, "padding_mode", "zeros") != "zeros" or not isinstance(self.padding, tuple)
                or x.device.type != "cpu"):
            return False
        ho, wo = self._output_size(x)
        return ho * wo <= MAX_POSITIONS

    def _output_size(self, x):
        """Height and width of this layer's output for the input `x`."""
        return tuple((size + 2 * pad - dil * (k - 1) - 1) // stride + 1 for size, k, stride, pad, dil in
                     zip(x.shape[2:], self.kernel_size, self.stride, self.padding, self.dilation))


@contextlib.contextmanager
def batched_small_convs(model: nn.Module, device: str) -> Iterator[int]:
    """Within the block, the model's convolutions with small outputs run as one matrix multiply
    per batch when `device` is the CPU (nothing changes elsewhere); yields how many layers may.
    The layers are nn.Conv2d again afterwards, also on an exception (an export or a copy made
    later sees the model as built)."""
    swapped: List[nn.Module] = []
    if str(device) == "cpu":
        for module in model.modules():
            if type(module) is nn.Conv2d:  # noqa: E721 (exactly: a subclass may have its own forward)
                module.__class__ = BatchedSmallConv2d
                swapped.append(module)
    try:
        yield len(swapped)
    finally:
        for module in swapped:
            module.__class__ = nn.Conv2d
