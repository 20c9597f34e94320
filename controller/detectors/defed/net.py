"""Defed's denoiser (seed 001), and the K denoisers of an ensemble fused for inference.

The building block (``EFEBlock``, "edge feature enhanced") runs three parallel branches
on the same input: a fixed 3x3 Gaussian blur (sigma 1, as the authors' kornia
``GaussianBlur2d``), a fixed 3x3 Laplacian edge filter (the 8-neighbour kernel, kornia's
unnormalised ``Laplacian(3)``) and the identity; each branch is a 3x3 conv + batch norm
+ PReLU, the three are summed, then a 1x1 conv. The fixed filters are per channel
(depthwise) and not learned (buffers, not in the artifact); they pad with zeros (the
authors reflect; on MNIST's black border the two agree).

``DefedNet`` is a small U-shaped encoder-decoder of these blocks with skip additions,
after the authors' ``Defed``: a 3x3 head conv and an EFE block at full size (28 on
MNIST, ``widths[0]`` channels), a 2x2 stride-2 conv down to 14 and an EFE block
(``widths[1]``), another down to 7 and an EFE block (``widths[2]``), then transposed 2x2
convs back up (7 -> 14 -> 28), each followed by an EFE block on the sum with the
encoder's features at that size, and a 1x1 tail conv added to the input (a residual
denoiser), clipped to [0, 1]. With the default ``widths=(8, 16, 32)`` (channels doubling
as the size halves, so that each level costs about the same) it has 52,853 parameters
and ~7M multiply-adds an MNIST image.

``FusedEnsemble`` is K trained ``DefedNet`` as one network for scoring: batch norms
folded into the convs, the K nets side by side as conv groups (the three branches too),
so that a batch through all K denoisers is ~50 torch calls whatever K, instead of ~90
per denoiser: at batch 1 the calls' overhead, not the arithmetic, is most of the time.
``DefedNet.forward`` in eval mode is the reference it is tested against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

BLUR_SIGMA = 1.0


def fixed_kernels() -> torch.Tensor:
    """[3, 3, 3]: the identity, the Gaussian blur (sigma 1) and the Laplacian, 3x3."""
    g = torch.exp(-torch.tensor([1.0, 0.0, 1.0]) / (2 * BLUR_SIGMA**2))
    g = g / g.sum()
    identity = torch.zeros(3, 3)
    identity[1, 1] = 1.0
    laplacian = torch.ones(3, 3)
    laplacian[1, 1] = -8.0
    return torch.stack([identity, torch.outer(g, g), laplacian])


class ConvBNPReLU(nn.Sequential):
    """conv (or transposed conv) -> batch norm -> PReLU (one slope)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, transposed: bool = False):
        conv = (nn.ConvTranspose2d if transposed else nn.Conv2d)(
            cin, cout, k, stride=stride, padding=(k - 1) // 2 if stride == 1 else 0
        )
        super().__init__(conv, nn.BatchNorm2d(cout), nn.PReLU())


class EFEBlock(nn.Module):
    """Blur, edge and identity branches (each 3x3 conv + BN + PReLU), summed, 1x1 conv."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.cin = cin
        # [2 * cin, 1, 3, 3]: blur then edge for every channel (depthwise, not learned)
        kernels = fixed_kernels()[1:].repeat(cin, 1, 1).unsqueeze(1)
        self.register_buffer("filters", kernels, persistent=False)
        self.blur_branch = ConvBNPReLU(cin, cout, 3)
        self.edge_branch = ConvBNPReLU(cin, cout, 3)
        self.identity_branch = ConvBNPReLU(cin, cout, 3)
        self.mix = nn.Conv2d(cout, cout, 1)

    def blur_and_edge(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = F.conv2d(x, self.filters, padding=1, groups=self.cin)  # (channel, filter)
        f = f.unflatten(1, (self.cin, 2))
        return f[:, :, 0], f[:, :, 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blur, edge = self.blur_and_edge(x)
        return self.mix(self.blur_branch(blur) + self.edge_branch(edge) + self.identity_branch(x))


class DefedNet(nn.Module):
    """The encoder-decoder denoiser: [N, C, H, W] in [0, 1] -> the same, H and W % 4 == 0."""

    def __init__(self, channels: int = 1, widths: Sequence[int] = (8, 16, 32)) -> None:
        super().__init__()
        w1, w2, w3 = (int(w) for w in widths)
        self.head = ConvBNPReLU(channels, w1, 3)
        self.enc1 = EFEBlock(w1, w1)  # H
        self.down1 = ConvBNPReLU(w1, w2, 2, stride=2)
        self.enc2 = EFEBlock(w2, w2)  # H / 2
        self.down2 = ConvBNPReLU(w2, w3, 2, stride=2)
        self.mid = EFEBlock(w3, w3)  # H / 4
        self.up2 = ConvBNPReLU(w3, w2, 2, stride=2, transposed=True)
        self.dec2 = EFEBlock(w2, w2)  # H / 2
        self.up1 = ConvBNPReLU(w2, w1, 2, stride=2, transposed=True)
        self.dec1 = EFEBlock(w1, w1)  # H
        self.tail = nn.Conv2d(w1, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(self.head(x))
        e2 = self.enc2(self.down1(e1))
        h = self.mid(self.down2(e2))
        h = self.dec2(self.up2(h) + e2)
        h = self.dec1(self.up1(h) + e1)
        return (x + self.tail(h)).clamp(0.0, 1.0)


def num_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# -- inference: K denoisers as one network ----------------------------------------------------


def _fold(seq: ConvBNPReLU) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight, bias, slope) of conv -> BN (eval) -> PReLU with the BN folded in."""
    conv, bn, act = seq
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    bias = (bias - bn.running_mean) * scale + bn.bias
    if isinstance(conv, nn.ConvTranspose2d):  # weight [in, out, k, k]
        weight = conv.weight * scale[None, :, None, None]
    else:  # [out, in, k, k]
        weight = conv.weight * scale[:, None, None, None]
    slope = act.weight.expand(len(scale))
    return weight, bias, slope


def _stack_layer(layers: list[ConvBNPReLU]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w, b, a = zip(*(_fold(s) for s in layers), strict=True)
    return torch.cat(w), torch.cat(b), torch.cat(a)


class FusedEnsemble(nn.Module):
    """K ``DefedNet`` (same widths, eval mode) as one network: [N, C, H, W] -> [K, N, C, H, W].

    Every layer of the K nets runs as one conv with groups: net k's channels are the k-th
    block. In an EFE block the blur and edge filters are two depthwise convs over all K
    nets' channels, and the three branches of the K nets one conv of 3K groups on the
    input and the two filtered copies side by side.
    """

    def __init__(self, nets: Sequence[DefedNet]) -> None:
        super().__init__()
        nets = list(nets)
        if not nets:
            raise ValueError("FusedEnsemble needs at least one net")
        self.k = len(nets)
        self.channels = nets[0].head[0].in_channels
        with torch.no_grad():
            self._head = _stack_layer([n.head for n in nets])
            self._down1 = _stack_layer([n.down1 for n in nets])
            self._down2 = _stack_layer([n.down2 for n in nets])
            self._up2 = _stack_layer([n.up2 for n in nets])
            self._up1 = _stack_layer([n.up1 for n in nets])
            self._blocks = {
                name: self._stack_block([getattr(n, name) for n in nets])
                for name in ("enc1", "enc2", "mid", "dec2", "dec1")
            }
            self._tail = (
                torch.cat([n.tail.weight for n in nets]),
                torch.cat([n.tail.bias for n in nets]),
            )

    def _stack_block(self, blocks: list[EFEBlock]) -> tuple[torch.Tensor, ...]:
        k, c = self.k, blocks[0].cin
        # depthwise, one filter a channel (a multiplier of 1: the fast kernels)
        _, blur, edge = fixed_kernels()
        blur, edge = (f.expand(k * c, 1, 3, 3).contiguous() for f in (blur, edge))
        # groups in (branch, net) order: the order of cat([x, blur(x), edge(x)])
        branches = [
            getattr(blk, f"{b}_branch") for b in ("identity", "blur", "edge") for blk in blocks
        ]
        weight, bias, slope = _stack_layer(branches)
        mix = torch.cat([blk.mix.weight for blk in blocks])
        mix_bias = torch.cat([blk.mix.bias for blk in blocks])
        return blur, edge, weight, bias, slope, mix, mix_bias

    def _block(self, x: torch.Tensor, name: str) -> torch.Tensor:
        blur, edge, weight, bias, slope, mix, mix_bias = self._blocks[name]
        n, kc, h, w = x.shape
        f = torch.cat(
            [
                x,
                F.conv2d(x, blur, padding=1, groups=kc),
                F.conv2d(x, edge, padding=1, groups=kc),
            ],
            dim=1,
        )  # (branch, net, channel)
        f = F.prelu(F.conv2d(f, weight, bias, padding=1, groups=3 * self.k), slope)
        f = f.view(n, 3, -1, h, w).sum(dim=1)  # the branches summed: (net, channel)
        return F.conv2d(f, mix, mix_bias, groups=self.k)

    def _layer(self, x: torch.Tensor, layer: tuple, groups: int, transposed: bool = False):
        weight, bias, slope = layer
        if transposed:
            return F.prelu(F.conv_transpose2d(x, weight, bias, stride=2, groups=groups), slope)
        stride, pad = (2, 0) if weight.shape[-1] == 2 else (1, 1)
        return F.prelu(F.conv2d(x, weight, bias, stride, pad, groups=groups), slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.k
        e1 = self._block(self._layer(x, self._head, 1), "enc1")
        e2 = self._block(self._layer(e1, self._down1, k), "enc2")
        h = self._block(self._layer(e2, self._down2, k), "mid")
        h = self._block(self._layer(h, self._up2, k, transposed=True) + e2, "dec2")
        h = self._block(self._layer(h, self._up1, k, transposed=True) + e1, "dec1")
        r = F.conv2d(h, *self._tail, groups=k)  # [N, K * C, H, W]
        n, _, height, width = r.shape
        out = (x.unsqueeze(1) + r.view(n, k, self.channels, height, width)).clamp_(0.0, 1.0)
        return out.transpose(0, 1)
