"""Networks: a time-conditioned MLP for vectors and a small U-Net for images.

Both take (x, t) with t a float tensor of shape (batch,): continuous time in [0, T], multiplied by
``time_scale`` before the sinusoidal embedding (1000 for t in [0, 1]; 1 for DDPM integer labels).
They know nothing of processes or samplers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._checks import check_choice

Tensor = torch.Tensor


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t (Vaswani et al. 2017; Ho et al. 2020) followed by a small MLP, computed in the
    parameters' dtype (``.double()`` works). Where it differs from DDPM's ``get_timestep_embedding``: the
    frequencies are 10000^(-i / half), not 10000^(-i / (half - 1)), and the MLP is dim -> 2 dim -> dim, not
    ch -> 4 ch -> 4 ch."""

    def __init__(self, dim: int, time_scale: float = 1000.0):
        super().__init__()
        self.dim, self.time_scale = dim, time_scale
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 2), nn.SiLU(), nn.Linear(dim * 2, dim))

    def forward(self, t: Tensor) -> Tensor:
        half = self.dim // 2
        dtype = self.mlp[0].weight.dtype
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=dtype) / half)
        args = (t.to(dtype) * self.time_scale)[:, None] * freqs
        return self.mlp(torch.cat([torch.sin(args), torch.cos(args)], 1))


class MLP(nn.Module):
    """Residual MLP for vectors: x (B, d) -> (B, d). Default (d=2, width 128, depth 3): 165,634 parameters.
    With ``num_classes`` > 0 a class embedding joins the time embedding; label ``num_classes`` (or y None)
    is the null label of classifier-free guidance."""

    def __init__(self, dim: int, width: int = 128, depth: int = 3, time_scale: float = 1000.0, num_classes: int = 0,
                 out_dim: int | None = None):
        super().__init__()
        self.config = {"kind": "mlp", "dim": dim, "width": width, "depth": depth, "time_scale": time_scale}
        if num_classes:
            self.config["num_classes"] = num_classes
        if out_dim is not None:
            self.config["out_dim"] = out_dim
        self.embed = TimeEmbedding(width, time_scale)
        self.label = nn.Embedding(num_classes + 1, width) if num_classes else None
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width)) for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(width, out_dim or dim))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        h = self.inp(x)
        emb = self.embed(t) + _label_embedding(self.label, y, x)
        for block in self.blocks:
            h = h + block(h + emb)
        return self.out(h)


def _label_embedding(table: nn.Embedding | None, y: Tensor | None, x: Tensor):
    """The class embedding of y, the null label's (the last row) for y None; 0 for an unconditional net."""
    if table is None:
        return 0.0
    if y is None:
        y = torch.full((x.shape[0],), table.num_embeddings - 1, device=x.device, dtype=torch.long)
    return table(y)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv; the embedding added; GroupNorm, SiLU, dropout, 3x3 conv; a residual (Ho et al.
    2020, Appendix B). Where it differs from their released code: the embedding enters through a linear map
    without the SiLU before it, and no layer is zero-initialised (DDPM starts the second convolution and the
    attention's projection at 0). unstir keeps its own so that saved runs and the published figures stand."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int = 8, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(groups, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(nn.functional.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Self-attention over pixels (``heads`` heads splitting the channels), with a residual connection."""

    def __init__(self, c: int, groups: int = 8, heads: int = 1):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = nn.functional.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """An image U-Net of the DDPM class (Ho et al. 2020, Appendix B): residual blocks with GroupNorm, dropout,
    self-attention at chosen resolutions and in the middle, a sinusoidal time embedding and an optional class
    embedding (class ``num_classes`` is the null label for classifier-free guidance).

    - ``widths``: channels per level, i.e. a base width times the channel multipliers (DDPM's CIFAR-10 net:
      128 x (1, 2, 2, 2) = (128, 256, 256, 256)); each level but the last halves the resolution.
    - ``res_blocks``: residual blocks per level on the way down, and as many on the way up.
    - ``attention``: the resolutions (in pixels, e.g. (16,)) whose blocks are followed by self-attention; the
      middle, at the lowest resolution, always has it.
    - ``dropout``, ``groups`` (GroupNorm), ``heads`` (attention heads splitting the channels).

    Where it differs from DDPM's layout: a skip leaves after every down block and each up block takes one
    (DDPM also keeps skips from the input convolution and the downsamplers, with res_blocks + 1 blocks per
    level on the way up), and upsampling is nearest-neighbour without a convolution. The default (1x8x8,
    widths (32, 64), one block per level, attention only in the middle) has 518,113 parameters (519,521 with
    10 classes) and is the layout unstir's earlier runs were saved with."""

    def __init__(self, channels: int = 1, size: int = 8, widths=(32, 64), num_classes: int = 0,
                 time_scale: float = 1000.0, res_blocks: int = 1, attention=(), dropout: float = 0.0,
                 groups: int = 8, heads: int = 1):
        super().__init__()
        widths, attention = tuple(int(w) for w in widths), tuple(int(r) for r in attention)
        check_unet(channels, size, widths, res_blocks, attention, dropout, groups, heads)
        self.config = {"kind": "unet", "channels": channels, "size": size, "widths": list(widths),
                       "num_classes": num_classes, "time_scale": time_scale}
        extra = {"res_blocks": res_blocks, "attention": list(attention), "dropout": dropout, "groups": groups,
                 "heads": heads}
        self.config.update({k: v for k, v in extra.items() if v != UNET_DEFAULTS[k]})  # earlier runs' configs stay
        emb = widths[0] * 4
        self.embed = TimeEmbedding(emb, time_scale)
        self.label = nn.Embedding(num_classes + 1, emb) if num_classes else None
        self.inp = nn.Conv2d(channels, widths[0], 3, padding=1)

        def attend(c, level):
            return Attention(c, groups, heads) if size >> level in attention else nn.Identity()

        self.res_blocks = res_blocks
        self.down, self.down_attn, self.pool = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        c = widths[0]
        for i, w in enumerate(widths):
            for _ in range(res_blocks):
                self.down.append(ResBlock(c, w, emb, groups, dropout))
                self.down_attn.append(attend(w, i))
                c = w
            self.pool.append(nn.Conv2d(c, c, 3, stride=2, padding=1) if i < len(widths) - 1 else nn.Identity())
        self.mid1 = ResBlock(c, c, emb, groups, dropout)
        self.attn = Attention(c, groups, heads)
        self.mid2 = ResBlock(c, c, emb, groups, dropout)
        self.up, self.up_attn, self.unpool = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            for _ in range(res_blocks):
                self.up.append(ResBlock(c + w, w, emb, groups, dropout))
                self.up_attn.append(attend(w, i))
                c = w
            self.unpool.append(nn.Upsample(scale_factor=2, mode="nearest") if i > 0 else nn.Identity())
        self.out = nn.Sequential(nn.GroupNorm(groups, c), nn.SiLU(), nn.Conv2d(c, channels, 3, padding=1))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        emb = self.embed(t) + _label_embedding(self.label, y, x)
        h = self.inp(x)
        skips, k = [], 0
        for pool in self.pool:
            for _ in range(self.res_blocks):
                h = self.down_attn[k](self.down[k](h, emb))
                skips.append(h)
                k += 1
            h = pool(h)
        h = self.mid2(self.attn(self.mid1(h, emb)), emb)
        k = 0
        for unpool in self.unpool:
            for _ in range(self.res_blocks):
                h = self.up_attn[k](self.up[k](torch.cat([h, skips.pop()], 1), emb))
                k += 1
            h = unpool(h)
        return self.out(h)


UNET_DEFAULTS = {"res_blocks": 1, "attention": [], "dropout": 0.0, "groups": 8, "heads": 1}


def check_unet(channels, size, widths, res_blocks=1, attention=(), dropout=0.0, groups=8, heads=1) -> None:
    """The U-Net's settings, each checked against the image size and the others (before any work)."""
    if not widths or min(widths) < 1:
        raise ValueError(f"widths must be positive channel counts, one per level, got {list(widths)}")
    levels = len(widths)
    if size % (2 ** (levels - 1)):
        raise ValueError(f"image size {size} is not divisible by 2^{levels - 1} = {2 ** (levels - 1)}, which "
                         f"{levels} levels (widths {list(widths)}) need; use fewer levels or another --size")
    resolutions = [size >> i for i in range(levels)]
    absent = [r for r in attention if r not in resolutions]
    if absent:
        raise ValueError(f"attention resolution(s) {absent} do not occur: at size {size} with {levels} levels the "
                         f"resolutions are {resolutions}")
    if isinstance(res_blocks, bool) or not isinstance(res_blocks, int) or res_blocks < 1:
        raise ValueError(f"res_blocks must be an integer >= 1, got {res_blocks!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    bad = [w for w in widths if w % groups or w % heads]
    if bad:
        raise ValueError(f"every width must be divisible by groups ({groups}) and heads ({heads}); {bad} are not")


def build(config: dict) -> nn.Module:
    """A network from its ``config`` dict (as stored in checkpoints)."""
    config = dict(config)
    kind = config.pop("kind", None)
    check_choice("network kind", kind, NETS)
    return NETS[kind](**config)


class EncoderClassifier(nn.Module):
    """The U-Net's encoder half (residual blocks, attention at the lowest resolution) with global average
    pooling and a linear head: class logits of a noised image, for classifier guidance (Dhariwal & Nichol
    2021 use the same split)."""

    def __init__(self, channels: int = 1, size: int = 8, widths=(32, 64), num_classes: int = 10,
                 time_scale: float = 1000.0):
        super().__init__()
        self.config = {"kind": "encoder", "channels": channels, "size": size, "widths": list(widths),
                       "num_classes": num_classes, "time_scale": time_scale}
        emb = widths[0] * 4
        self.embed = TimeEmbedding(emb, time_scale)
        self.inp = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.down, self.pool = nn.ModuleList(), nn.ModuleList()
        c = widths[0]
        for i, w in enumerate(widths):
            self.down.append(ResBlock(c, w, emb))
            c = w
            self.pool.append(nn.Conv2d(c, c, 3, stride=2, padding=1) if i < len(widths) - 1 else nn.Identity())
        self.mid, self.attn = ResBlock(c, c, emb), Attention(c)
        self.head = nn.Sequential(nn.GroupNorm(8, c), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(c, num_classes))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        emb = self.embed(t)
        h = self.inp(x)
        for block, pool in zip(self.down, self.pool):
            h = pool(block(h, emb))
        return self.head(self.attn(self.mid(h, emb)))


class DiffusersUNet(nn.Module):
    """diffusers' ``UNet2DModel`` trained directly (``unstir train --net diffusers``; needs the ``diffusers``
    package), with the U-Net options mapped onto it: ``widths`` -> ``block_out_channels``, ``res_blocks`` ->
    ``layers_per_block``, an attention resolution -> that level's ``AttnDownBlock2D`` / ``AttnUpBlock2D``
    (the middle block always attends), ``groups`` -> ``norm_num_groups``, ``dropout``; a class-conditional
    net gets ``num_class_embeds = num_classes + 1`` (the last is the null label, as ``UNet``'s). The time
    goes in as the timestep ``t * time_scale`` (diffusers' sinusoidal embedding of DDPM's 0..999 labels)."""

    def __init__(self, channels: int = 3, size: int = 32, widths=(32, 64), num_classes: int = 0,
                 time_scale: float = 1000.0, res_blocks: int = 1, attention=(), dropout: float = 0.0,
                 groups: int = 8):
        super().__init__()
        try:
            from diffusers import UNet2DModel
        except ImportError:
            raise ValueError("--net diffusers trains diffusers' UNet2DModel and needs the diffusers package: "
                             "pip install 'unstir[diffusers]'") from None
        widths, attention = tuple(int(w) for w in widths), tuple(int(r) for r in attention)
        check_unet(channels, size, widths, res_blocks, attention, dropout, groups)
        self.config = {"kind": "diffusers_unet", "channels": channels, "size": size, "widths": list(widths),
                       "num_classes": num_classes, "time_scale": time_scale, "res_blocks": res_blocks,
                       "attention": list(attention), "dropout": dropout, "groups": groups}
        attends = [size >> i in attention for i in range(len(widths))]
        self.time_scale, self.num_classes = time_scale, num_classes
        self.unet = UNet2DModel(
            sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=widths,
            layers_per_block=res_blocks, norm_num_groups=groups, dropout=dropout,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attends),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)),
            num_class_embeds=num_classes + 1 if num_classes else None)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        labels = None
        if self.num_classes:
            labels = y if y is not None else torch.full((x.shape[0],), self.num_classes, device=x.device,
                                                        dtype=torch.long)
        return self.unet(x, t * self.time_scale, class_labels=labels).sample


NETS = {"mlp": MLP, "unet": UNet, "encoder": EncoderClassifier, "diffusers_unet": DiffusersUNet}


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
