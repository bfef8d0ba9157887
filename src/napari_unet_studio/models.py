"""U-Net (Ronneberger et al. 2015) and U-Net++ (Zhou et al. 2018) with valid convolutions.

Both networks use unpadded ("valid") 3x3 convolutions, as in the U-Net paper, so an output
pixel depends only on a fixed window of input pixels. That is what makes overlap-tile
prediction exactly equal to whole-image prediction: the tiler (:mod:`.predict`) needs only
the :class:`Geometry` each model exposes.

Default width: ``base_channels=16`` instead of the paper's 64. Parameters grow with the square
of the width, so 16 gives 1.9 M parameters (7.8 MB in float32) instead of 31 M and a forward
pass about 16x cheaper, which is what makes CPU inference take seconds and CPU fine-tuning
take minutes. Wider models remain one argument away.

This file is the networks and nothing else: it imports only torch (and the standard library),
so it travels as the architecture source of an exported model. What the classes mean, how
inputs are normalised and how the weights were made are the model's card (:mod:`.card`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn



@dataclass(frozen=True)
class Geometry:
    """Input/output sizes of a valid-convolution U-Net whose ``depth`` poolings are in use.

    Per spatial axis: ``output = input - 2 * halo`` and an input is valid when the feature maps
    stay even before each pooling, which for two 3x3 convolutions per level means
    ``input = -4 (mod 2**depth)`` (for depth 4: ``input = 188 (mod 16)``, output ``input - 184``).
    Tiles must start at multiples of :attr:`step` so that the pooling phases of every tile
    match those of the whole image.
    """

    depth: int

    @property
    def halo(self) -> int:
        """Pixels lost per side: 6 * 2**depth - 4 (92 for depth 4)."""
        return 6 * 2**self.depth - 4

    @property
    def step(self) -> int:
        """Tile offsets are multiples of this: 2**depth."""
        return 2**self.depth

    def output_size(self, input_size: int) -> int | None:
        """Output size for one axis, or ``None`` when ``input_size`` is not valid."""
        n = input_size
        for _ in range(self.depth):
            n -= 4
            if n <= 0 or n % 2:
                return None
            n //= 2
        n -= 4
        if n <= 0:
            return None
        for _ in range(self.depth):
            n = 2 * n - 4
            if n <= 0:
                return None
        return n

    @property
    def min_input(self) -> int:
        """The smallest valid input size (188 for depth 4)."""
        return self.valid_input(1)

    def valid_input(self, at_least: int) -> int:
        """The smallest valid input size that is ``>= at_least``."""
        n = max(int(at_least), 1)
        n += (-4 - n) % self.step
        while self.output_size(n) is None:
            n += self.step
        return n

    def valid_input_below(self, at_most: int) -> int:
        """The largest valid input size that is ``<= at_most`` (at least :attr:`min_input`)."""
        n = int(at_most) - ((int(at_most) + 4) % self.step)
        return max(n, self.min_input)

    def input_for_output(self, output_size: int) -> int:
        """The smallest valid input whose output covers ``output_size`` pixels."""
        return self.valid_input(output_size + 2 * self.halo)


def _he_normal_(weight: torch.Tensor, fan_in: int) -> None:
    """He initialisation: N(0, 2/N) with N the incoming connections of one unit (paper, sec. 3)."""
    with torch.no_grad():
        weight.normal_(0.0, math.sqrt(2.0 / fan_in))


class ConvBlock(nn.Sequential):
    """Two valid 3x3 convolutions, each followed by (optional BatchNorm and) ReLU."""

    def __init__(self, in_channels: int, out_channels: int, batch_norm: bool) -> None:
        layers: list[nn.Module] = []
        for cin in (in_channels, out_channels):
            conv = nn.Conv2d(cin, out_channels, 3, bias=not batch_norm)
            _he_normal_(conv.weight, cin * 9)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
            layers.append(conv)
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class UpConv(nn.ConvTranspose2d):
    """2x2 up-convolution (stride 2) that halves the channels."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 2, stride=2)
        # Each output pixel of a stride-2, 2x2 transposed convolution sees one input pixel per channel.
        _he_normal_(self.weight, in_channels)
        nn.init.zeros_(self.bias)


def center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Crop the centre ``height x width`` of an ``(N, C, H, W)`` tensor."""
    top = (x.shape[-2] - height) // 2
    left = (x.shape[-1] - width) // 2
    return x[..., top : top + height, left : left + width]


class _ValidUNetBase(nn.Module):
    """What U-Net and U-Net++ share: configuration, geometry, config dict (the architecture only;
    the model's card is :mod:`.card`)."""

    arch: str = ""

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 2,
        depth: int = 4,
        base_channels: int = 16,
        *,
        dropout: float = 0.5,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        if in_channels < 1 or n_classes < 2 or depth < 1 or base_channels < 1:
            raise ValueError(
                "in_channels >= 1, n_classes >= 2, depth >= 1 and base_channels >= 1 are required, got "
                f"{in_channels}, {n_classes}, {depth}, {base_channels}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_channels = int(in_channels)
        self.n_classes = int(n_classes)
        self.depth = int(depth)
        self.base_channels = int(base_channels)
        self.dropout_p = float(dropout)
        self.batch_norm = bool(batch_norm)

    def channels(self, level: int) -> int:
        """Feature channels at a resolution level (doubling with each pooling)."""
        return self.base_channels * 2**level

    @property
    def active_depth(self) -> int:
        """Number of poolings used by :meth:`forward` (U-Net++ can be pruned below ``depth``)."""
        return self.depth

    @property
    def geometry(self) -> Geometry:
        """Geometry of :meth:`forward` as currently configured."""
        return Geometry(self.active_depth)

    def config(self) -> dict:
        """JSON-serialisable description of the architecture (:func:`build_network` rebuilds it)."""
        return {
            "arch": self.arch,
            "in_channels": self.in_channels,
            "n_classes": self.n_classes,
            "depth": self.depth,
            "base_channels": self.base_channels,
            "dropout": self.dropout_p,
            "batch_norm": self.batch_norm,
        }

    def extra_repr(self) -> str:
        n_params = sum(p.numel() for p in self.parameters())
        return f"arch={self.arch}, in={self.in_channels}, classes={self.n_classes}, depth={self.depth}, base={self.base_channels}, params={n_params}"


class UNet(_ValidUNetBase):
    """The U-Net of Ronneberger et al. (2015), configurable.

    Valid 3x3 convolutions with ReLU (optional BatchNorm, exact under tiling in eval mode),
    2x2 max pooling, 2x2 up-convolutions that halve the channels, crop-and-concatenate skips,
    dropout at the end of the contracting path and a final 1x1 convolution to ``n_classes``
    logits. Weights are He-normal initialised.

    Parameters
    ----------
    in_channels
        1 for grayscale, 3 for RGB.
    n_classes
        Output classes: 2 (default) is the paper's background / foreground, with touching
        cells kept apart by a weight-map-trained gap; 3 is background / interior / boundary
        (the meaning is the model card's encoding, :mod:`.encodings`). At equal training budget
        on DSB 2018 nuclei the two scored AP@0.5 0.719 and 0.703 (``benchmarks/encoding.py``),
        so the paper's encoding is the default.
    depth
        Number of poolings (paper: 4).
    base_channels
        Channels of the first level (paper: 64; default 16, see the module docstring).
    dropout
        Dropout probability at the end of the contracting path.
    batch_norm
        BatchNorm after each convolution.
    """

    arch = "unet"

    def __init__(self, in_channels: int = 1, n_classes: int = 2, depth: int = 4, base_channels: int = 16, **kwargs) -> None:
        super().__init__(in_channels, n_classes, depth, base_channels, **kwargs)
        bn = self.batch_norm
        self.encoder = nn.ModuleList(
            [ConvBlock(in_channels if i == 0 else self.channels(i - 1), self.channels(i), bn) for i in range(depth + 1)]
        )
        self.pool = nn.MaxPool2d(2)
        self.dropout = nn.Dropout2d(self.dropout_p)
        self.up = nn.ModuleList([UpConv(self.channels(i + 1), self.channels(i)) for i in range(depth)])
        self.decoder = nn.ModuleList([ConvBlock(2 * self.channels(i), self.channels(i), bn) for i in range(depth)])
        self.head = nn.Conv2d(self.channels(0), n_classes, 1)
        _he_normal_(self.head.weight, self.channels(0))
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(N, n_classes, H - 2*halo, W - 2*halo)`` for a valid input size."""
        skips = []
        for i, block in enumerate(self.encoder):
            if i:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        x = self.dropout(skips.pop())
        for i in reversed(range(self.depth)):
            x = self.up[i](x)
            skip = center_crop(skips.pop(), x.shape[-2], x.shape[-1])
            x = self.decoder[i](torch.cat([skip, x], dim=1))
        return self.head(x)


class UNetPlusPlus(_ValidUNetBase):
    """U-Net++ (Zhou et al. 2018): nested dense skip pathways and deep supervision.

    Node ``X[i][j]`` (resolution level ``i``, column ``j``) convolves the concatenation of
    ``X[i][0..j-1]`` (centre-cropped) and the up-convolved ``X[i+1][j-1]``. A 1x1 head on each
    ``X[0][j]``, ``j = 1..depth``, gives the deep-supervision outputs. Setting
    :attr:`prune_level` to ``L < depth`` makes :meth:`forward` compute only the nodes that
    ``X[0][L]`` needs (a depth-``L`` network: faster, smaller halo) and use that head.

    Takes the same arguments as :class:`UNet`, and ``prune_level`` (saved with the model).
    """

    arch = "unetpp"

    def __init__(
        self, in_channels: int = 1, n_classes: int = 2, depth: int = 4, base_channels: int = 16,
        prune_level: int | None = None, **kwargs,
    ) -> None:
        super().__init__(in_channels, n_classes, depth, base_channels, **kwargs)
        bn = self.batch_norm
        self._prune_level: int | None = None
        # nodes[i][j] for j >= 1; column 0 is the encoder.
        self.encoder = nn.ModuleList(
            [ConvBlock(in_channels if i == 0 else self.channels(i - 1), self.channels(i), bn) for i in range(depth + 1)]
        )
        self.pool = nn.MaxPool2d(2)
        self.dropout = nn.Dropout2d(self.dropout_p)
        self.up = nn.ModuleDict()
        self.nodes = nn.ModuleDict()
        for i in range(depth):
            for j in range(1, depth - i + 1):
                self.up[f"{i}_{j}"] = UpConv(self.channels(i + 1), self.channels(i))
                self.nodes[f"{i}_{j}"] = ConvBlock((j + 1) * self.channels(i), self.channels(i), bn)
        self.heads = nn.ModuleList([nn.Conv2d(self.channels(0), n_classes, 1) for _ in range(depth)])
        for head in self.heads:
            _he_normal_(head.weight, self.channels(0))
            nn.init.zeros_(head.bias)
        self.prune_level = prune_level

    def config(self) -> dict:
        return {**super().config(), "prune_level": self.prune_level}

    @property
    def prune_level(self) -> int | None:
        """The head used by :meth:`forward` (1..depth); ``None`` means the full network."""
        return self._prune_level

    @prune_level.setter
    def prune_level(self, level: int | None) -> None:
        if level is not None and not 1 <= int(level) <= self.depth:
            raise ValueError(f"prune level must be between 1 and {self.depth}, got {level}")
        self._prune_level = None if level is None or int(level) == self.depth else int(level)

    @property
    def active_depth(self) -> int:
        return self.depth if self._prune_level is None else self._prune_level

    def _columns(self, x: torch.Tensor, level: int) -> list[torch.Tensor]:
        """The nodes X[0][1..level] computed on ``x`` (only those they depend on)."""
        grid: list[list[torch.Tensor]] = [[] for _ in range(level + 1)]
        for i in range(level + 1):
            if i:
                x = self.pool(x)
            x = self.encoder[i](x)
            grid[i].append(x)
        grid[level][0] = self.dropout(grid[level][0])
        # Walk anti-diagonals so each node's inputs exist: X[i][j] with i + j = s.
        for s in range(1, level + 1):
            for i in reversed(range(s)):
                j = s - i
                up = self.up[f"{i}_{j}"](grid[i + 1][j - 1])
                h, w = up.shape[-2:]
                inputs = [center_crop(t, h, w) for t in grid[i]] + [up]
                grid[i].append(self.nodes[f"{i}_{j}"](torch.cat(inputs, dim=1)))
        return grid[0][1:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the head at :attr:`active_depth`, of shape ``(N, n_classes, H - 2*halo, W - 2*halo)``."""
        level = self.active_depth
        return self.heads[level - 1](self._columns(x, level)[-1])

    def forward_deep(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every head ``X[0][1..depth]``, centre-cropped to the deepest head's size.

        Uses the full network whatever :attr:`prune_level` is; this is what deep supervision
        trains on.
        """
        columns = self._columns(x, self.depth)
        h, w = columns[-1].shape[-2:]
        return [head(center_crop(c, h, w)) for head, c in zip(self.heads, columns)]


ARCHITECTURES = {cls.arch: cls for cls in (UNet, UNetPlusPlus)}


def _fused_conv_relu_op():
    """oneDNN's convolution with a fused ReLU (what torch.compile uses on the CPU), or None
    where this torch build lacks it."""
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        return torch.ops.mkldnn._convolution_pointwise.default
    except (AttributeError, RuntimeError):
        return None


class _ConvReLU(nn.Conv2d):
    """A convolution and the ReLU after it, for inference only. On the CPU one oneDNN call does
    both (the same numbers, one pass over the activations fewer); elsewhere, the two ops."""

    @classmethod
    def of(cls, conv: nn.Conv2d) -> _ConvReLU:
        fused = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None)
        fused.weight, fused.bias = conv.weight, conv.bias
        fused.op = _fused_conv_relu_op()
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.op is not None and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled():
            return self.op(x, self.weight, self.bias, list(self.padding), list(self.stride), list(self.dilation),
                           self.groups, "relu", [], "")
        return torch.relu(super().forward(x))


def inference_copy(model: _ValidUNetBase) -> _ValidUNetBase:
    """A copy of ``model`` for inference: eval mode, every BatchNorm folded into the convolution
    before it (the same function up to float rounding), each convolution and its ReLU one
    call on the CPU, channels_last memory. On the CPU the copy runs about twice as fast
    (benchmarks/inference.py): oneDNN's fast channels_last convolutions need the BatchNorm
    gone. The original is untouched."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    copy_ = copy.deepcopy(model).eval()
    for block in copy_.modules():
        if isinstance(block, ConvBlock):
            layers = list(block)
            for i in range(len(layers) - 1):
                if isinstance(layers[i], nn.Conv2d) and isinstance(layers[i + 1], nn.BatchNorm2d):
                    block[i] = fuse_conv_bn_eval(layers[i], layers[i + 1])
                    block[i + 1] = nn.Identity()
            layers = [layer for layer in block if not isinstance(layer, nn.Identity)]
            pairs = list(zip(layers[::2], layers[1::2]))
            if 2 * len(pairs) == len(layers) and all(isinstance(c, nn.Conv2d) and isinstance(r, nn.ReLU) for c, r in pairs):
                for i in range(len(block)):
                    if isinstance(block[i], nn.Conv2d):
                        block[i] = _ConvReLU.of(block[i])
                    elif isinstance(block[i], nn.ReLU):
                        block[i] = nn.Identity()
    for p in copy_.parameters():
        p.requires_grad_(False)
    return copy_.to(memory_format=torch.channels_last)


def build_network(config: dict) -> _ValidUNetBase:
    """Build an untrained network from a :meth:`~UNet.config` dict."""
    config = dict(config)
    arch = config.pop("arch", "unet")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r} (known: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[arch](**config)


class Probabilities(nn.Module):
    """A network whose output is per-class probabilities (softmax over the classes) instead of
    logits: what an exported model computes. ``config`` is a network's :meth:`~UNet.config`.
    The weights live under ``network.``."""

    def __init__(self, **config) -> None:
        super().__init__()
        self.network = build_network(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.network(x), dim=1)
