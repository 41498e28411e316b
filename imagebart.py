"""ImageBART, the method in one file.

Esser, Rombach, Blattmann, Ommer. "ImageBART: Bidirectional Context with Multinomial
Diffusion for Autoregressive Image Synthesis". NeurIPS 2021.

Read it top to bottom next to the paper, in the order of Sec. 3:
    1. First stage       VQGAN (Sec. 3.2, Eq. 3-4): encoder, quantizer, decoder, LPIPS on forward hooks, PatchGAN
    2. Diffusion         the fixed multinomial diffusion over codes (Eq. 5-6), its posterior and KL (Eq. 7-8)
    3. Transformers      one encoder-decoder per scale (Eq. 1 within a scale; Sec. 3.3, 4.4), the key/value cache
    4. The chain         ImageBART: the loss, the bound (Eq. 2), the reverse chain (Sec. 3.3), masked editing (Sec. 4.3)
    5. Beyond the chain  this code's extensions, separate code: patch-wise (Sec. 4.2), particles
This file knows nothing of files, processes or command lines; a bad argument raises ValueError.

Notation is the paper's and never shifts: x_0 is the image, x_1 its codes, x_t for t = 2..T the
codes after t-1 noising steps, x_T pure noise. The model that denoises x_t into x_{t-1} is
p^{t-1}(x_{t-1} | x_t), and it is stored under its `t`.
"""
from __future__ import annotations

import contextlib
import math
import re
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


# =====================================================================================
# 1. First stage: VQGAN (Sec. 3.2)
# =====================================================================================
# x_0 (B, 3, H, W) --encoder E--> z (B, D, h, w) --nearest code--> x_1 (B, h, w)
#                  --decoder G--> x_0 reconstructed.   h = H / f, f = 2^(len(ch_mult) - 1).
# The paper trains it with Eq. 3-4: f_rec (LPIPS), the codebook loss L_cb and a PatchGAN term
# written with log D. For the GAN part this code follows Taming Transformers instead: a hinge
# loss with an adaptive weight lambda, and f_rec = L1 + LPIPS (train_vq.py).

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
    beta: float = 0.25                    # commitment weight (in L_cb, Eq. 4)
    l2_codes: bool = True                 # look codes up by cosine similarity (VectorQuantizer)
    # --- training
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3
    perceptual_weight: float = 1.0
    perceptual_batch: int = 4             # LPIPS on the first n images of each batch (0 = all), unbiased
    disc_start: int = 600                 # PatchGAN loss switched on at this step
    disc_weight: float = 0.1
    disc_layers: int = 2
    disc_ch: int = 64
    restart_every: int = 100              # dead-code restart period (steps); 0 = never
    log_every: int = 50
    ckpt_every: int = 500
    train_size: int = 20000               # built-in data sets: the number of drawn training images
    test_size: int = 2000
    seed: int = 0
    has_perceptual: bool = field(default=True, metadata={"cli": False})  # False when no LPIPS weights were found
    dtype: str = field(default="fp32", metadata={"cli": False})  # what training computed in (--dtype, resolved)

    factor = property(lambda self: 2 ** (len(self.ch_mult) - 1))   # f: the first stage's downsampling


VQ_PRESETS = {
    "tiny": VQConfig(),                   # a 2-core CPU in minutes: 32x32 -> 8x8 codes
    "cifar": VQConfig(ch=128, num_res_blocks=2, embed_dim=32, codebook_size=512, steps=60000,  # one GPU
                      batch_size=128, lr=2e-4, perceptual_batch=0, disc_start=30000, disc_weight=0.2,
                      log_every=200, ckpt_every=2000, train_size=50000, test_size=10000),
}


class Norm(nn.GroupNorm):
    """GroupNorm of c channels, in fp32 under bf16 autocast: its statistics are sums, where bf16 loses the most."""

    def __init__(self, c: int):
        super().__init__(num_groups=min(32, c // 4), num_channels=c, eps=1e-6)

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


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
        """With l2 codes, encoder outputs and codes lie on the unit sphere (ViT-VQGAN): the nearest
        code is the most similar direction, and far fewer codes die."""
        return F.normalize(v, dim=-1) if self.l2 else v

    def codes(self) -> torch.Tensor:
        return self.project(self.codebook.weight)                         # (K, D)

    def nearest(self, z_flat: torch.Tensor) -> torch.Tensor:
        """z_flat (M, D) -> index (M,) of argmin_k ||z - e_k||^2, expanded as
        ||z||^2 - 2 z.e_k + ||e_k||^2: one matrix product instead of M*K differences."""
        z_flat, e = self.project(z_flat), self.codes()
        d = z_flat.pow(2).sum(1, keepdim=True) - 2 * z_flat @ e.t() + e.pow(2).sum(1)[None, :]
        return d.argmin(1)

    def forward(self, z: torch.Tensor):
        """z (B, D, h, w) -> (z_q with straight-through gradient, codebook loss, indices (B, h, w))."""
        B, D, h, w = z.shape
        z_flat = self.project(rearrange(z, "b d h w -> (b h w) d").float())
        idx = self.nearest(z_flat)
        e = self.codes()[idx]                                             # (B*h*w, D)
        # L_cb (Eq. 4): ||sg[E(x)] - z_q||^2 moves the codes towards the encoder outputs, and
        # beta * ||sg[z_q] - E(x)||^2 (commitment, as in the VQ-VAE paper) keeps E near its codes
        loss = F.mse_loss(e, z_flat.detach()) + self.beta * F.mse_loss(z_flat, e.detach())
        e_st = z_flat + (e - z_flat).detach()     # straight through: forward uses e, the gradient reaches z
        if self.training:
            self.hits += torch.bincount(idx, minlength=self.hits.numel()).float()
        return rearrange(e_st, "(b h w) d -> b d h w", b=B, h=h, w=w), loss, idx.view(B, h, w)

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor) -> int:
        """Codes not chosen since the last call move onto random encoder outputs z (B, D, h, w) of a
        recent batch (else most of a codebook goes unused: codebook collapse). -> how many moved."""
        dead = (self.hits == 0).nonzero().flatten()
        self.hits.zero_()
        z_flat = self.project(rearrange(z, "b d h w -> (b h w) d").float())
        pick = torch.randint(0, z_flat.shape[0], (len(dead),), device=z_flat.device)
        self.codebook.weight.data[dead] = z_flat[pick] + 1e-3 * torch.randn_like(z_flat[pick])
        return len(dead)


class VQGAN(nn.Module):
    """The first stage: E, the codebook, G. After training the codebook is shrunk to the K codes in
    use (Sec. 4.1): `encode` returns indices in [0, K) of the shrunk book, `decode` takes them.
    The training pass, with its losses, is written out in train_vq.py."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.embed_dim, cfg.beta, cfg.l2_codes)
        # full index -> shrunk index, and shrunk -> full; the identity until `shrink` is called
        self.register_buffer("code_map", torch.arange(cfg.codebook_size))
        self.register_buffer("used_codes", torch.arange(cfg.codebook_size))

    num_codes = property(lambda self: self.used_codes.numel())     # K after shrinking

    @torch.no_grad()
    def encode(self, x0: torch.Tensor) -> torch.Tensor:
        """x_0 (B, 3, H, W) in [-1, 1] -> x_1 (B, h, w), shrunk code indices."""
        z = self.encoder(x0)
        B, _, h, w = z.shape
        full = self.quantizer.nearest(rearrange(z, "b d h w -> (b h w) d").float())
        return self.code_map[full].view(B, h, w)

    @torch.no_grad()
    def decode(self, x1: torch.Tensor) -> torch.Tensor:
        """x_1 (B, h, w) shrunk indices -> x_0 = G(z_q) (B, 3, H, W) in [-1, 1] (a larger grid: decode_canvas)."""
        e = self.quantizer.codes()[self.used_codes[x1]]                  # (B, h, w, D)
        return self.decoder(rearrange(e, "b h w d -> b d h w")).clamp(-1, 1)

    @torch.no_grad()
    def shrink(self, used_full: torch.Tensor, seed: int = 0) -> None:
        """Sec. 4.1: keep only the codes in `used_full`; any other index maps to a random kept code
        ("assign a random entry for eventual outliers"). The paper keeps the entries "actually used
        (evaluated on the validation split of ImageNet)"; train_vq.py passes the training codes."""
        used_full = used_full.unique().sort().values.to(self.code_map.device)
        g = torch.Generator().manual_seed(seed)
        code_map = torch.randint(0, len(used_full), (self.cfg.codebook_size,), generator=g).to(used_full.device)
        code_map[used_full] = torch.arange(len(used_full), device=used_full.device)
        self.code_map, self.used_codes = code_map, used_full


# ----- The perceptual loss: LPIPS on VGG16, written out ---------------------------------
# f_rec of Eq. 3 is LPIPS (Zhang et al. 2018). The VGG16 feature extractor below is
# torchvision's `vgg16().features` layer for layer (same indices, so its state dict loads as is);
# forward hooks on five ReLUs collect the features.

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
    return nn.Sequential(*layers)       # up to relu5_3 (VGG16_LAYERS leaves out the last max-pool)


class LPIPS(nn.Module):
    """d(x, y) = sum_l mean_hw sum_c w_lc (u_l(x) - u_l(y))_c^2, u_l = f_l / |f_l| over channels: the
    squared differences of the unit-normalised features, weighted per channel (as the lpips package)."""

    def __init__(self):
        super().__init__()
        self.features = vgg16_features()
        # LPIPS's own shift and scale of [-1, 1] images for VGG
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None], persistent=False)
        # one 1x1 conv per tap, no bias: the learned channel weights w_l (non-negative once loaded)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in LPIPS_CHANNELS)
        self._taps: list[torch.Tensor] = []
        for i in LPIPS_TAPS:
            self.features[i].register_forward_hook(lambda mod, inp, out: self._taps.append(out))
        self.requires_grad_(False)
        self.eval()

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Run VGG16 once; the hooks collect the five ReLU outputs."""
        self._taps = []
        self.features((x - self.shift) / self.scale)
        out, self._taps = self._taps, []
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y (B, 3, H, W) in [-1, 1] -> distance (B,)."""
        total = 0.0
        for f, lin in zip(self.taps(torch.cat([x, y])), self.lins):
            f = f.float()            # under bf16 autocast VGG ran in bf16; the differences need fp32
            f = f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)      # unit norm over channels
            fx, fy = f.chunk(2)
            total = total + lin((fx - fy) ** 2).mean(dim=(1, 2, 3))      # spatial mean -> (B,)
        return total

    def train(self, mode: bool = True):
        return super().train(False)  # always frozen, always in eval mode


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
            layers += [nn.Conv2d(c, c_out, 4, 2 if i < n_layers else 1, 1, bias=False), nn.BatchNorm2d(c_out),
                       nn.LeakyReLU(0.2)]
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
    """Discriminator's hinge loss: real logits above +1, fake ones below -1 (Taming Transformers'
    choice; Eq. 4 writes the GAN term with log D)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """Taming Transformers' adaptive weight (Eq. 4 has none): lambda = ||grad L_rec|| /
    (||grad L_GAN|| + 1e-4), both gradients at the decoder's last layer: it balances the two
    terms whatever their scales."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, 1e4).detach()


# =====================================================================================
# 2. The multinomial diffusion (Sec. 3.3)
# =====================================================================================
# A fixed forward chain over codes: at step t each token is kept with probability 1 - beta_t, else
# replaced by a code drawn uniformly from all K (Eq. 5); beta_T = 1 makes x_T pure noise. What
# follows is closed-form algebra on categorical distributions, probabilities in the last dim (K).

def linear_alpha_bar_betas(T: int) -> list[float]:
    """betas [beta_2, ..., beta_T] with alpha_bar_t = (T - t) / (T - 1) falling linearly (T = 5: 1, .75,
    .5, .25, 0, the official 4-scale configs' schedule); beta_t = 1 - ab_t / ab_{t-1}."""
    if T < 2:
        raise ValueError(f"a chain needs T >= 2, got T = {T}")
    ab = [(T - t) / (T - 1) for t in range(1, T + 1)]  # alpha_bar_1 .. alpha_bar_T
    return [1 - ab[i] / ab[i - 1] for i in range(1, T)]


def check_betas(betas: Sequence[float]) -> list[float]:
    betas = [float(b) for b in betas]
    if not betas or not all(0 < b <= 1 for b in betas):          # nan fails too
        raise ValueError(f"every beta must lie in (0, 1], at least one (T >= 2), got {betas}")
    if abs(betas[-1] - 1) > 1e-6:
        raise ValueError(f"the last beta must be 1, so that x_T is pure noise and p(x_T) is uniform; got {betas}")
    for t, b in enumerate(betas[:-1], start=2):   # x_t pure noise already: the scales above t would learn nothing
        if b >= 1:
            raise ValueError(f"beta_{t} = 1 makes x_{t} pure noise, so the scales above it would see no trace "
                             f"of x_1; only the last beta (t = T) may be 1, got {betas}")
    return betas


class MultinomialDiffusion:
    """q(x_t | x_{t-1}) for t = 2..T over K classes, with betas = [beta_2, ..., beta_T]."""

    def __init__(self, num_classes: int, betas: Sequence[float]):
        self.K = num_classes
        self.betas = check_betas(betas)
        self.T = len(self.betas) + 1
        # alpha_bar_t = prod_{i=2..t} (1 - beta_i); alpha_bar_1 = 1
        self._alpha_bar = [math.prod((1 - b for b in self.betas[:i]), start=1.0) for i in range(self.T)]

    def beta(self, t: int) -> float:                            # t = 2..T
        return self.betas[t - 2]

    def alpha_bar(self, t: int) -> float:                       # t = 1..T
        return self._alpha_bar[t - 1]

    def q_step(self, x_prev: torch.Tensor, t: int, beta: float | None = None) -> torch.Tensor:
        """Eq. 5: q(x_t | x_{t-1}) = Cat((1 - beta_t) e(x_{t-1}) + beta_t / K).  (...,) -> (..., K)
        `beta` replaces beta_t (masked editing re-noises with a smaller, annealed one)."""
        b = self.beta(t) if beta is None else beta
        return (1 - b) * F.one_hot(x_prev.long(), self.K).float() + b / self.K

    def q_marginal(self, x1: torch.Tensor, t: int) -> torch.Tensor:
        """Eq. 6: q(x_t | x_1) = Cat(alpha_bar_t e(x_1) + (1 - alpha_bar_t) / K).  (...,) -> (..., K)
        (t - 1 replacement steps compose into one: a token survives all of them with probability
        alpha_bar_t, and once replaced it is uniform forever after.)"""
        ab = self.alpha_bar(t)
        return ab * F.one_hot(x1.long(), self.K).float() + (1 - ab) / self.K

    def q_posterior(self, x_t: torch.Tensor, x1: torch.Tensor, t: int) -> torch.Tensor:
        """q(x_{t-1} | x_t, x_1) = q(x_t | x_{t-1}) q(x_{t-1} | x_1) / q(x_t | x_1) (Sec. 3.3), t >= 2: Eq. 5
        as a function of x_{t-1} = k, times Eq. 6 at t - 1.  (...,), (...,) -> (..., K). At t = 2 the
        second factor is one-hot on x_1, so the posterior is too (Eq. 8's target)."""
        unnorm = self.q_step(x_t, t) * self.q_marginal(x1, t - 1)   # Eq. 5 is symmetric in (x_t, x_{t-1})
        return unnorm / unnorm.sum(-1, keepdim=True)

    @staticmethod
    def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One class per position from probs (..., K) -> (...,) long, by inverting the CDF: the first
        class whose cumulative probability reaches u ~ U(0, total]; a class of probability 0 is never
        drawn. Every draw of training and sampling comes here."""
        flat = probs.reshape(-1, probs.shape[-1]).double()        # float64: no rounding at the top
        cdf = flat.cumsum(-1)                                     # (M, K), non-decreasing
        u = 1 - torch.rand(flat.shape[0], 1, generator=generator, device=flat.device, dtype=torch.float64)
        return torch.searchsorted(cdf, u * cdf[:, -1:]).view(probs.shape[:-1])     # u in (0, 1]

    def q_sample(self, x1: torch.Tensor, t: int, generator=None) -> torch.Tensor:
        """x_t ~ q(x_t | x_1) without building (..., K) probabilities: keep each token with
        probability alpha_bar_t, else a uniform code (the distribution of Eq. 6)."""
        keep = torch.rand(x1.shape, generator=generator, device=x1.device) < self.alpha_bar(t)
        noise = torch.randint(0, self.K, x1.shape, generator=generator, device=x1.device)
        return torch.where(keep, x1.long(), noise)

    def kl(self, q_probs: torch.Tensor, p_logits: torch.Tensor) -> torch.Tensor:
        """KL(q || softmax(p_logits)) = sum_k q_k (log q_k - log p_k), nats per position.
        (..., K), (..., K) -> (...). xlogy gives 0 log 0 = 0 for the zeros of a one-hot q, so at
        t = 2 this is exactly the cross-entropy -log p(x_1 | x_2) of Eq. 8."""
        log_p = F.log_softmax(p_logits.float(), dim=-1)
        return (torch.xlogy(q_probs, q_probs) - q_probs * log_p).sum(-1)


# =====================================================================================
# 3. The transformers: one encoder-decoder per scale (Sec. 3.3, 4.4)
# =====================================================================================
# p^{t-1}(x_{t-1} | x_t, c) = prod_i p(x^i_{t-1} | x^{<i}_{t-1}, x_t, c): Eq. 1's factorisation within
# a scale. The encoder reads all of x_t at once (bidirectional: global context); the decoder
# writes x_{t-1} token by token in raster order and cross-attends to the encoder. x_T is pure
# noise, so the scale t = T is decoder-only (the usual autoregressive model of Taming Transformers).

# ----- The text condition (Sec. 4.2) -------------------------------------------------
# The paper's text chains read CLIP-tokenized captions; here a word-level tokenizer built from the
# training captions: a caption becomes `max_len` ids, PAD-filled. The empty caption (all PAD) is
# the null condition of classifier-free guidance.

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
        """Every word of the captions; the longest caption sets max_len, so none is ever cut."""
        words = sorted({w for c in captions for w in cls.words(c)})
        return cls(["<pad>", "<unk>"] + words, max(1, max((len(cls.words(c)) for c in captions), default=1)))

    def unknown(self, texts: Sequence[str]) -> list[str]:
        return sorted({w for t in texts for w in self.words(t) if w not in self.ids})

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """[B strings] -> ids (B, max_len), PAD-filled; an unknown word becomes UNK; a text longer
        than max_len is an error, never cut short."""
        out = torch.full((len(texts), self.max_len), self.PAD, dtype=torch.long)
        for b, text in enumerate(texts):
            words = self.words(text)
            if len(words) > self.max_len:
                raise ValueError(f"the prompt {text!r} has {len(words)} words; this chain reads at most "
                                 f"{self.max_len} (its longest training caption)")
            out[b, :len(words)] = torch.tensor([self.ids.get(w, self.UNK) for w in words], dtype=torch.long)
        return out


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
    residual_logits: bool = True          # logits = s * network + log q(x^i_t | x^i_{t-1} = k) (ScaleTransformer)
    aligned_input: bool = False           # decoder position i also sees x^i_t (this code's own; ScaleTransformer)
    # --- training (each scale independently)
    steps: int = 1500                     # per scale
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    label_dropout: float = 0.1            # to the null class or the empty caption: classifier-free guidance
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
    # --- a text chain (--condition text): the tokenizer's words and caption length (0 = no
    # text), and the training combinations left out (--holdout)
    vocab: list = field(default_factory=list, metadata={"cli": False})
    text_len: int = field(default=0, metadata={"cli": False})
    holdout: list = field(default_factory=list, metadata={"cli": False})  # ["green star", ...]

    N = property(lambda self: self.grid[0] * self.grid[1])        # tokens per grid

    def schedule(self) -> list[float]:
        return list(self.betas) if self.betas else linear_alpha_bar_betas(self.T)


CHAIN_PRESETS = {
    "tiny": ChainConfig(),                # shapes on a 2-core CPU: T = 3, two small scales
    "cifar": ChainConfig(T=5, n_embd=512, n_head=8, n_layer_enc=8, n_layer_dec=4, dropout=0.1,  # one GPU
                         steps=60000, batch_size=128, lr=3e-4, warmup=2000, ema_decay=0.9999,
                         log_every=200, ckpt_every=2000, eval_batches=40),
}


class KVCache:
    """One attention layer's keys and values in buffers of `size` positions, written in place: a new
    token costs one step over the positions before it, not a pass over the whole prefix.
    Self-attention appends at every step; cross-attention stores the encoder output's once."""

    def __init__(self, size: int):
        self.size, self.len, self.k, self.v = size, 0, None, None

    def append(self, k: torch.Tensor, v: torch.Tensor):
        """k, v (B, nh, L, hs) of L new positions -> those of every position so far (B, nh, len, hs)."""
        if self.k is None:
            self.k = k.new_zeros(k.shape[0], k.shape[1], self.size, k.shape[3])
            self.v = torch.zeros_like(self.k)
        self.k[:, :, self.len:self.len + k.shape[2]], self.v[:, :, self.len:self.len + k.shape[2]] = k, v
        self.len += k.shape[2]
        return self.k[:, :, :self.len], self.v[:, :, :self.len]


class Attention(nn.Module):
    """Multi-head attention: self-attention when `context` is None, else cross-attention."""

    def __init__(self, d: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.to_q, self.to_kv, self.proj = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)

    def forward(self, x, context=None, causal=False, cache: KVCache | None = None):
        """x (B, L, C) -> (B, L, C): self-attention (causal: position i sees positions <= i), or
        cross-attention to context (B, S, C). With `cache`, x holds the L positions after those in
        the cache; cross-attention's keys and values are computed at the first step only."""
        L = x.shape[1]
        heads = lambda z: rearrange(z, "b l (h d) -> b h l d", h=self.n_head)       # (B, nh, L, hs)
        q, mask = heads(self.to_q(x)), None
        if cache is not None and context is not None and cache.len:
            k, v = cache.k, cache.v                              # the encoder's, from the first step
        else:
            k, v = map(heads, self.to_kv(x if context is None else context).chunk(2, dim=-1))
            if cache is not None:
                done = cache.len
                k, v = cache.append(k, v)                        # (B, nh, done + L, hs)
                if context is None and L > 1:                    # new query j sees keys up to done + j
                    mask = torch.arange(done + L, device=x.device)[None] <= torch.arange(done, done + L,
                                                                                         device=x.device)[:, None]
        # Under a CPU's bf16 autocast attention itself runs in fp32, where the CPU's kernel is faster: on
        # the AMX machine 2.7x for its forward and backward, 1.6x for a tiny chain's step (.ci/attention-bench.py)
        fp32 = q.device.type == "cpu" and q.dtype == torch.bfloat16
        with torch.autocast("cpu", enabled=False) if fp32 else contextlib.nullcontext():
            y = F.scaled_dot_product_attention(*(z.float() if fp32 else z for z in (q, k, v)), attn_mask=mask,
                                               is_causal=causal and cache is None,
                                               dropout_p=self.dropout if self.training else 0.0)
        return self.proj(rearrange(y, "b h l d -> b l (h d)"))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: self-attention, [cross-attention], MLP."""

    def __init__(self, d: int, n_head: int, dropout: float, cross: bool):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), Attention(d, n_head, dropout)
        self.ln2, self.cross = (nn.LayerNorm(d), Attention(d, n_head, dropout)) if cross else (None, None)
        self.ln3 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(dropout))

    def forward(self, x, context=None, causal=False, cache=None):
        """cache: (self-attention's KVCache, cross-attention's) while decoding, else None."""
        self_cache, cross_cache = cache or (None, None)
        x = x + self.attn(self.ln1(x), causal=causal, cache=self_cache)
        if self.cross is not None:
            x = x + self.cross(self.ln2(x), context=context, cache=cross_cache)
        return x + self.mlp(self.ln3(x))


class ScaleTransformer(nn.Module):
    """The model p^{t-1}(x_{t-1} | x_t, c) of one scale t.

    x^i_{t-1} is often the very token x^i_t (the step t-1 -> t keeps a fraction 1 - beta_t), and a
    network learns that copying slowly from scratch. Two ways to help:
    `residual_logits` (the official geometric configs' ResidualScaledXTransformer): by Bayes,
    p(x_{t-1} | x_t) ∝ q(x_t | x_{t-1}) p(x_{t-1} | ...), so the known factor log q(x^i_t | x^i_{t-1} = k)
    (Eq. 5 as a function of k; up to a constant a bonus log(1 + K (1 - beta_t) / beta_t) on k = x^i_t)
    is added to the network's logits, which are multiplied by a learned scale s first (`logit_scale`,
    a raw parameter; the official code's is exp(log_scalor) > 0): s * network + log q.
    `aligned_input` (this code's own): x^i_t's embedding added to the decoder input at position i."""

    def __init__(self, cfg: ChainConfig, t: int, beta_t: float):
        super().__init__()
        d, K, N = cfg.n_embd, cfg.num_codes, cfg.N
        self.t, self.K, self.N = t, K, N
        self.has_encoder = t < cfg.T
        self.conditional = cfg.num_labels > 0          # class labels
        self.text_len = cfg.text_len                   # a caption of text_len tokens (0 = none)
        self.START = K                                 # the start token's embedding row, after the K codes
        self.dec_tok = nn.Embedding(K + 1, d)
        self.dec_pos = nn.Parameter(0.02 * torch.randn(1, N, d))
        if self.conditional:
            self.class_emb = nn.Embedding(cfg.num_labels + 1, d)   # last row: the null class (guidance)
        if self.text_len:
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
        self.logit_scale = None                        # the decoder-only scale has no x_t to add
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

    # The condition c: a class (B,), caption ids (B, text_len), or None. It enters the encoder as
    # tokens before x_t (as in the official conditional chains); a class also enters the decoder at
    # START (the official chains: the encoder only); the decoder-only scale reads a caption as a prefix.

    def encode(self, x_t: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor | None:
        """x_t (B, N) -> memory (B, [1 class or text_len caption tokens +] N, C); None at t = T."""
        if not self.has_encoder:
            return None
        h = self.enc_tok(x_t) + self.enc_pos                              # (B, N, C)
        if self.conditional:
            h = torch.cat([self.class_emb(c)[:, None], h], dim=1)         # (B, 1 + N, C)
        if self.text_len:
            h = torch.cat([self.text_tok(c) + self.text_pos, h], dim=1)   # (B, text_len + N, C)
        for block in self.encoder:
            h = block(h)                                                  # no mask: bidirectional
        return self.enc_ln(h)

    def decode(self, memory, x_t, x_tm1, c, start: int = 0, end: int | None = None, caches=None):
        """The logits (B, end - start, K) of p(x^i_{t-1} | x^{<i}_{t-1}, x_t, c) at positions
        i = start..end-1 (end: x_tm1's length), given the tokens x_tm1 written before them.
        Training reads every position at once (start = 0, teacher forcing: position i only sees
        x^{<i}_{t-1}); decoding (`caches`, one pair per block) reads the positions after those
        the caches hold."""
        end = x_tm1.shape[1] if end is None else end
        inputs = F.pad(x_tm1[:, :end - 1], (1, 0), value=self.START)[:, start:end]   # x^{i-1}_{t-1}, START at i = 0
        h = self.dec_tok(inputs) + self.dec_pos[:, start:end]             # (B, L, C)
        if self.align_tok is not None:
            h = h + self.align_tok(x_t[:, start:end])                      # x^i_t at position i
        prefix = 0
        if start == 0 and self.conditional:                                # the class enters at START
            h = torch.cat([h[:, :1] + self.class_emb(c)[:, None], h[:, 1:]], dim=1)
        if start == 0 and self.text_len and not self.has_encoder:          # the caption before START
            prefix = self.text_len
            h = torch.cat([self.text_tok(c) + self.text_pos, h], dim=1)    # (B, text_len + L, C)
        for block, cache in zip(self.decoder, caches or [None] * len(self.decoder)):
            h = block(h, memory, causal=True, cache=cache)
        out = self.head(self.ln_f(h[:, prefix:]))                         # (B, L, K)
        if self.logit_scale is not None:   # s * network + log q(x^i_t | x^i_{t-1} = k), less log(beta_t / K)
            out = self.logit_scale * out + self.res_bonus * F.one_hot(x_t[:, start:end], self.K).to(out.dtype)
        return out

    def forward(self, x_t, x_tm1, c=None):
        """x_t (B, N), x_tm1 (B, L <= N) long -> logits (B, L, K) of p(x^i_{t-1} | x^{<i}_{t-1}, x_t, c)."""
        return self.decode(self.encode(x_t, c), x_t, x_tm1, c)

    def new_caches(self, memory) -> list[tuple]:
        """Empty caches, a pair per decoder block: self-attention's ([caption +] N), cross-attention's."""
        prefix = self.text_len if not self.has_encoder else 0
        return [(KVCache(prefix + self.N), KVCache(memory.shape[1]) if memory is not None else None)
                for _ in self.decoder]


class CachedDecoder:
    """Scale t's decoder, read through its key/value caches: how the reverse chain draws
    (ImageBART.decode_scale). The encoder reads all of x_t once, here. A call (x_tm1, start, end)
    -> the logits (B, end - start, K) of positions start..end-1, x_tm1 (B, N) holding the tokens
    before them; `start` is where the previous call ended (what the caches hold)."""

    def __init__(self, model: ScaleTransformer, x_t: torch.Tensor, c):
        self.model, self.x_t, self.c = model, x_t, c
        self.memory = model.encode(x_t, c)                     # (B, [cond +] N, C)
        self.caches = model.new_caches(self.memory)
        self.done = 0

    def __call__(self, x_tm1, start: int, end: int) -> torch.Tensor:
        if start != self.done:
            raise ValueError(f"the caches hold positions 0..{self.done - 1}; read from {self.done}, not {start}")
        self.done = end
        return self.model.decode(self.memory, self.x_t, x_tm1, self.c, start, end, self.caches)


class UncachedDecoder(CachedDecoder):
    """The reference: each call runs the decoder over the whole prefix, as in training (slow)."""

    def __call__(self, x_tm1, start: int, end: int) -> torch.Tensor:
        return self.model.decode(self.memory, self.x_t, x_tm1[:, :end], self.c)[:, start:end]


# =====================================================================================
# 4. The chain: ImageBART
# =====================================================================================

def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Temperature, then the top_k largest logits, then the smallest set of tokens whose
    probability reaches top_p (nucleus); the others get -inf.  (..., K) -> (..., K)"""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p      # the mass *before* a token already reaches top_p
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def scale_options(options: dict, t: int, T: int) -> dict:
    """Scale t's sampling options (temperature, top_k, top_p, guidance, use_cache): each is one value,
    or a list of one per scale for t = T, T-1, ..., 2."""
    ok = {"temperature": lambda v: v > 0, "top_k": lambda v: v is None or v >= 1,
          "top_p": lambda v: v is None or 0 < v <= 1, "guidance": lambda v: v >= 0, "use_cache": lambda v: True}
    out = {}
    for name, value in options.items():
        if name not in ok:
            raise ValueError(f"unknown sampling option {name!r}; the options are {', '.join(ok)}")
        if isinstance(value, (list, tuple)):
            if len(value) != T - 1:
                raise ValueError(f"{name} has {len(value)} values; give 1, or {T - 1} for this chain's "
                                 f"{T - 1} scales (t = {T}..2)")
            value = value[T - t]
        if not ok[name](value):                               # nan fails too
            raise ValueError(f"{name} {value} is out of range")
        out[name] = value
    return out


# Forward-backward rounds per scale (but t = T) of masked editing: the paper leaves them to its
# appendix (Sec. A.3); the official scripts/inpaint_imagebart.py makes 5 passes per scale (4 rounds).
INPAINT_REFINE = 4


class ImageBART(nn.Module):
    """The reverse chain p(x_1 | c) = sum over x_2..x_T of p(x_T) prod_{t=2..T} p^{t-1}(x_{t-1} | x_t, c),
    with p(x_T) uniform and one ScaleTransformer per t, each trained on its own (Sec. 3.3)."""

    def __init__(self, cfg: ChainConfig):
        super().__init__()
        self.cfg = cfg
        self.diffusion = MultinomialDiffusion(cfg.num_codes, cfg.schedule())
        self.num_labels = cfg.num_labels or None
        self.tokenizer = Tokenizer(cfg.vocab, cfg.text_len) if cfg.text_len else None
        self.scales = nn.ModuleDict({str(t): ScaleTransformer(cfg, t, self.diffusion.beta(t))
                                     for t in range(2, self.diffusion.T + 1)})

    T = property(lambda self: self.diffusion.T)
    device = property(lambda self: next(self.parameters()).device)

    def scale(self, t: int) -> ScaleTransformer:
        return self.scales[str(t)]

    # ----- the condition c: a class, a caption, or nothing -----------------------------

    def condition(self, labels, text, B: int, device=None) -> torch.Tensor | None:
        """The condition c of B rows from `labels` (a class index, or one per row) or `text` (B
        strings, or one for all, or token ids (B, text_len)); the null condition (the null class,
        the empty caption) where neither is given; None on an unconditional chain."""
        device = device or self.device
        if self.tokenizer is not None:
            if labels is not None:
                raise ValueError("this chain is conditioned on text; it takes text, not labels")
            if text is None:
                return torch.full((B, self.cfg.text_len), Tokenizer.PAD, dtype=torch.long, device=device)
            if isinstance(text, torch.Tensor):
                return text.to(device).long()
            text = [text] if isinstance(text, str) else list(text)
            if len(text) not in (1, B):
                raise ValueError(f"text has {len(text)} prompts for {B} samples; give 1 or {B}")
            if unknown := self.tokenizer.unknown(text):
                warnings.warn(f"words not in this chain's vocabulary become <unk>: {', '.join(unknown)}")
            return self.tokenizer.encode(text).to(device).expand(B, -1)
        if text is not None:
            raise ValueError("this chain is not conditioned on text; it takes no text")
        if self.num_labels is None and labels is not None:
            raise ValueError("this chain is unconditional; it takes no labels")
        if self.num_labels is None:
            return None
        if labels is None:
            return torch.full((B,), self.num_labels, dtype=torch.long, device=device)
        labels = torch.as_tensor(labels, device=device).long().expand(B)
        if labels.min() < 0 or labels.max() > self.num_labels:   # index num_labels = the null class
            raise ValueError(f"labels must lie in [0, {self.num_labels}] ({self.num_labels} = none)")
        return labels

    def null_condition(self, c: torch.Tensor) -> torch.Tensor:
        """The null class, or the empty caption (all PAD), for every row of c."""
        return torch.full_like(c, Tokenizer.PAD if self.tokenizer is not None else self.num_labels)

    def drop_condition(self, c, p: float):
        """A fraction p of the rows of c replaced by the null condition (classifier-free guidance:
        the same network then also learns the unconditional model)."""
        if c is None or p <= 0:
            return c
        drop = torch.rand(c.shape[0], device=c.device) < p
        return torch.where(drop.view(-1, *[1] * (c.dim() - 1)), self.null_condition(c), c)

    # ----- training (Eq. 7-8) ----------------------------------------------------------

    def scale_terms(self, x1, t: int, labels=None, generator=None, text=None, net=None):
        """One Monte-Carlo draw of scale t's term: x_t ~ q(x_t | x_1) (Eq. 6), x_{t-1} ~
        q(x_{t-1} | x_t, x_1), the decoder teacher-forced on that x_{t-1}.
        -> (posterior q (B, N, K), sampled x_{t-1} (B, N), logits (B, N, K)).
        `net` runs scale t instead of self.scale(t) (its DistributedDataParallel wrapper)."""
        x1 = rearrange(x1.long(), "b h w -> b (h w)") if x1.dim() == 3 else x1.long()   # raster order
        x_t = self.diffusion.q_sample(x1, t, generator)
        q = self.diffusion.q_posterior(x_t, x1, t)
        x_tm1 = self.diffusion.draw(q, generator)
        logits = (net or self.scale(t))(x_t, x_tm1, self.condition(labels, text, x1.shape[0], x1.device))
        return q, x_tm1, logits

    def loss(self, x1, t: int, labels=None, kind: str = "kl", text=None, net=None) -> torch.Tensor:
        """Scale t's loss in nats per token, the mean over positions i of "kl" (Eq. 7):
        KL(q(x^i_{t-1} | x^i_t, x^i_1) || p(x^i_{t-1} | x^{<i}_{t-1}, x_t)), with x^{<i}_{t-1} drawn from
        q an unbiased one-sample estimate of the sequences' KL (the posterior factorizes). At t = 2
        the posterior is one-hot on x_1: the same line is Eq. 8's cross-entropy. "ce": the
        cross-entropy of the sampled x_{t-1}, the same expectation up to a constant, more variance."""
        q, x_tm1, logits = self.scale_terms(x1, t, labels, text=text, net=net)
        if kind == "kl":
            per_position = self.diffusion.kl(q, logits)
        elif kind == "ce":
            per_position = F.cross_entropy(rearrange(logits.float(), "b n k -> b k n"), x_tm1, reduction="none")
        else:
            raise ValueError(f"unknown loss {kind!r}")
        return per_position.mean()

    @torch.no_grad()
    def nll(self, x1, labels=None, text=None, *, terms: bool = False, generator=None):
        """Eq. 2's terms L_t for t = 2..T, without L_1 (the first stage's), as a bound on
        -log2 p(x_1 | c) in bits per token, per sample (B,), one Monte-Carlo draw per scale:
            -log p(x_1 | c) <= sum_{t=2..T} E_q[ KL(q(x_{t-1} | x_t, x_1) || p^{t-1}(x_{t-1} | x_t, c)) ]
        (the t = 2 term is Eq. 8's -log p(x_1 | x_2)); c = labels or text, None = the null condition.
        The prior term KL(q(x_T | x_1) || p(x_T)) is 0: beta_T = 1 makes both uniform. With T = 2 it
        is the exact autoregressive likelihood. terms=True also returns {t: bits per token (B,)}."""
        by_scale = {t: self.scale_bits(x1, t, labels, generator, text) for t in range(self.T, 1, -1)}
        total = sum(by_scale.values())
        return (total, by_scale) if terms else total

    @torch.no_grad()
    def scale_bits(self, x1, t: int, labels=None, generator=None, text=None) -> torch.Tensor:
        """Scale t's term of the bound (one draw of Eq. 7), bits per token, per sample (B,)."""
        q, _, logits = self.scale_terms(x1, t, labels, generator, text)
        return self.diffusion.kl(q, logits).sum(-1) / (x1[0].numel() * math.log(2))

    # ----- sampling: the reverse chain (Sec. 3.3) --------------------------------------

    @torch.inference_mode()   # no_grad, minus autograd's bookkeeping: faster small steps
    def decode_scale(self, t: int, x_t, c=None, *, temperature=1.0, top_k=None, top_p=None, guidance=0.0,
                     forced=None, keep=None, log_w=None, use_cache=True, reader=None, generator=None):
        """x_{t-1} ~ p^{t-1}(x_{t-1} | x_t, c) = prod_i p(x^i_{t-1} | x^{<i}_{t-1}, x_t, c), one token at
        a time in raster order: autoregressive, so that it can represent the true reverse process
        q(x_{t-1} | x_t) of Eq. 9 with few scales (Sec. 3.3).  x_t (B, N) -> x_{t-1} (B, N).
        Masked editing (Sec. 4.3): where keep (B, N) is True the token is forced (B, N) (a position
        given in every row is not drawn). reader(model, x_t, c): what the logits are read from
        (CachedDecoder, UncachedDecoder, section 5's windows). log_w (B,) gains the forced tokens'
        log-probability (section 5's particles)."""
        B, N = x_t.shape
        rows_x, rows_c = x_t, c
        if guidance:          # the conditional rows and, below them, the null condition's: one batch
            if c is None or bool((c == self.null_condition(c)).all()):
                raise ValueError("guidance needs a condition: class labels or text")
            rows_x, rows_c = torch.cat([x_t, x_t]), torch.cat([c, self.null_condition(c)])
        read = (reader or (CachedDecoder if use_cache else UncachedDecoder))(self.scale(t), rows_x, rows_c)
        x_tm1 = torch.zeros_like(x_t)
        start = 0                                              # positions 0..start-1 are read

        def logits_until(end: int) -> torch.Tensor:
            """The logits of positions start..end-1, (B, end - start, K), as they are sampled from."""
            logits = read(x_tm1.repeat(2, 1) if guidance else x_tm1, start, end).float()
            if guidance:      # classifier-free guidance: (1 + w) log p(. | c) - w log p(. | null)
                cond, null = logits.chunk(2)
                logits = (1 + guidance) * cond - guidance * null
            if (temperature, top_k, top_p) != (1.0, None, None):
                logits = filter_logits(logits, temperature, top_k, top_p)
            if log_w is not None:                              # the forced tokens among them
                log_p = logits.log_softmax(-1).gather(-1, forced[:, start:end, None])[..., 0]
                log_w.add_(torch.where(keep[:, start:end], log_p, 0.0).sum(1))
            return logits

        for i in range(N):
            if keep is not None and keep[:, i].all():          # given in every row: nothing to draw
                x_tm1[:, i] = forced[:, i]
                continue
            probs = logits_until(i + 1)[:, -1].softmax(-1)     # (B, K), given tokens skipped before i read too
            x_tm1[:, i] = self.diffusion.draw(probs, generator)
            if keep is not None:                               # given in some rows: those keep it
                x_tm1[:, i] = torch.where(keep[:, i], forced[:, i], x_tm1[:, i])
            start = i + 1
        if log_w is not None and start < N:                    # the given tokens after the last drawn one
            logits_until(N)
        return x_tm1

    @torch.inference_mode()
    def sample(self, n: int, labels=None, text=None, *, trajectory: bool = False, grid=None, reader=None,
               generator=None, **options) -> torch.Tensor | list[torch.Tensor]:
        """n samples x_1 (n, h, w) of the chain (Sec. 3.3): x_T ~ uniform, then for t = T, ..., 2
        x_{t-1} ~ p^{t-1}(x_{t-1} | x_t, c), c the classes `labels`, the prompts `text`, or the null
        condition. trajectory=True: [x_T, ..., x_1]. options: temperature, top_k, top_p (one value or
        one per scale), guidance, use_cache. grid, reader: a larger grid and its windows (section 5)."""
        c, (h, w) = self.condition(labels, text, n), grid or self.cfg.grid
        x_t = torch.randint(0, self.diffusion.K, (n, h * w), generator=generator, device=self.device)  # x_T
        xs = [x_t]
        for t in range(self.T, 1, -1):
            x_t = self.decode_scale(t, x_t, c, reader=reader, generator=generator, **scale_options(options, t, self.T))
            xs.append(x_t)
        xs = [rearrange(x, "b (h w) -> b h w", h=h, w=w) for x in xs]
        return xs if trajectory else xs[-1]

    # ----- masked editing (Sec. 4.3) ---------------------------------------------------

    def renoise(self, x_tm1, t: int, r: int, rounds: int, generator=None) -> torch.Tensor:
        """The forward half of refinement round r of `rounds`: x_t' ~ q(x_t | x_{t-1}) (Eq. 5) with
        beta_t (1 - r / (rounds + 1)) at every position, as the official scripts/inpaint_imagebart.py
        does (later rounds change less; the decoder forces the given tokens back).  (B, N) -> (B, N)"""
        beta = self.diffusion.beta(t) * (1 - r / (rounds + 1))
        return self.diffusion.draw(self.diffusion.q_step(x_tm1, t, beta), generator)

    @torch.inference_mode()
    def inpaint(self, x1, keep, labels=None, text=None, *, refine: int = INPAINT_REFINE, trajectory: bool = False,
                reader=None, generator=None, **options) -> torch.Tensor | list[torch.Tensor]:
        """Complete x_1 (B, h, w) where keep (B, h, w) is False. Sec. 4.3's masked process "leaves the
        unmasked context intact": every decoder forces the given tokens as it writes, so every x_t
        holds them clean (x_T too). What a decoder writes before a given token does not know it:
        `refine` forward-backward rounds per scale (renoise, then decode_scale; number and annealing
        from the official scripts/inpaint_imagebart.py) let it adapt, as Fig. 5 (bottom) shows.
        t = T is not refined: its decoder never reads x_T. trajectory, options, reader: as sample's."""
        B, h, w = x1.shape
        c = self.condition(labels, text, B)
        x1, keep = rearrange(x1.long(), "b h w -> b (h w)"), rearrange(keep.bool(), "b h w -> b (h w)")
        noise = torch.randint(0, self.diffusion.K, x1.shape, generator=generator, device=x1.device)
        x_t = torch.where(keep, x1, noise)                     # x_T: the given tokens clean, the rest noise
        xs = [x_t]
        for t in range(self.T, 1, -1):
            decode = partial(self.decode_scale, t, c=c, forced=x1, keep=keep, reader=reader, generator=generator,
                             **scale_options(options, t, self.T))
            x_tm1 = decode(x_t)
            rounds = refine if t < self.T else 0
            for r in range(1, rounds + 1):                     # forward: x_t' ~ q(x_t | x_{t-1}); backward
                x_tm1 = decode(self.renoise(x_tm1, t, r, rounds, generator))
            x_t = x_tm1
            xs.append(x_t)
        xs = [rearrange(x, "b (h w) -> b h w", h=h, w=w) for x in xs]
        return xs if trajectory else xs[-1]


# =====================================================================================
# 5. Beyond the plain chain: this code's extensions
# =====================================================================================
# Sections 1-4 are the paper's method. What follows adds to it, each part equal to it token for
# token where it reduces to it (tested): patch-wise windows (at the training size the window never
# moves), two conditions across, particles (one particle is the plain process).

# ----- Beyond the training canvas: patch-wise sampling (Sec. 4.2, Fig. 4) -----------------
# The paper draws 300 x 1800 images with 256 x 256 models "in a patch-wise manner, where we use
# the sliding attention window of [21] for each scale t > 0", [21] being Taming Transformers.
# Each scale only saw h x w grids, so each token of a larger H x W grid is written through an h x w
# window: the encoder reads the window of x_t, the decoder the window's tokens of x_{t-1} written
# so far (in the window's raster order), and only the target is drawn.

def window_origin(i: int, j: int, grid: tuple[int, int], window: tuple[int, int], stride: int = 1) -> tuple[int, int]:
    """The corner (top, left) of the h x w window through which token (i, j) of an H x W grid is
    written. Taming Transformers' rule (stride 1): centred on the target, clamped inside the grid.
    Stride s > 1 (this code's): a block of s columns shares the window centred on its middle."""
    (H, W), (h, w) = grid, window
    top = min(max(i - h // 2, 0), H - h)
    left = min(max((j // stride) * stride + stride // 2 - w // 2, 0), W - w)
    return top, left


class WindowDecoder:
    """A reader for decode_scale (CachedDecoder's calls) on a grid (H, W) at least the training grid
    (h, w): each target through its window. The encoder runs once per window; a window that has
    not moved since the last target goes on with one cached step, a moved one is rebuilt in one
    pass over its written tokens; without the cache every target re-runs the decoder."""

    def __init__(self, model: ScaleTransformer, x_t, c, *, grid, window, stride: int = 1, use_cache: bool = True):
        self.model, self.c, self.grid, self.window, self.stride, self.use_cache = model, c, grid, window, stride, use_cache
        self.x_t = x_t.view(-1, *grid)                         # (B, H, W)
        self.encoded = {}             # window origin -> (x_t's window (B, h w), its encoder output), one band
        self.origin = self.next_place = self.caches = None     # the cached window: where, what it reads next

    def __call__(self, x_tm1, start: int, end: int) -> torch.Tensor:
        return torch.cat([self.target(x_tm1, p) for p in range(start, end)], 1)   # (B, end - start, K)

    def target(self, x_tm1, p: int) -> torch.Tensor:
        """The logits (B, 1, K) of token p = i W + j of the large grid (x_tm1 (B, H W))."""
        model, (h, w) = self.model, self.window
        i, j = divmod(p, self.grid[1])
        origin = top, left = window_origin(i, j, self.grid, self.window, self.stride)
        window = (slice(None), slice(top, top + h), slice(left, left + w))
        if origin not in self.encoded:                         # the encoder, once per window
            if self.encoded and next(iter(self.encoded))[0] != top:     # a new band of rows: forget the old
                self.encoded = {}
            x_t_win = self.x_t[window].flatten(1)              # (B, h w), the window's raster order
            self.encoded[origin] = x_t_win, model.encode(x_t_win, self.c)
        x_t_win, memory = self.encoded[origin]
        place = (i - top) * w + (j - left)                     # the target's place in its window
        written = x_tm1.view(-1, *self.grid)[window].flatten(1)           # (B, h w): valid before `place`
        if not self.use_cache:                                 # the reference: the decoder over the prefix
            return model.decode(memory, x_t_win, written[:, :place + 1], self.c)[:, place:place + 1]
        if (self.origin, self.next_place) != (origin, place):  # moved: its written tokens in one pass
            self.caches, start = model.new_caches(memory), 0
        else:                                                  # not moved: one cached step
            start = place
        self.origin, self.next_place = origin, place + 1
        return model.decode(memory, x_t_win, written, self.c, start, place + 1, self.caches)[:, -1:]


def windows(chain: ImageBART, grid, stride: int = 1, use_cache: bool = True):
    """The reader of sample and inpaint on a grid (H, W) of codes, through windows of the training grid."""
    return partial(WindowDecoder, grid=tuple(grid), window=tuple(chain.cfg.grid), stride=stride, use_cache=use_cache)


class Across:
    """Two conditions across the image (this code's way to interpolate two prompts as Fig. 4 does): a
    reader around `inner` whose logits mix the left condition c's and the right one's by the
    target's column j, (1 - a) log p(. | c) + a log p(. | right), a = j / (W - 1): a product of
    experts. With guidance the null condition's rows join, guided as decode_scale guides."""

    def __init__(self, inner, chain: ImageBART, right: torch.Tensor, width: int, guidance: float = 0.0):
        self.inner, self.chain, self.right, self.width, self.guidance = inner, chain, right, width, guidance

    def __call__(self, model, x_t, c):
        conds = [c, self.right] + ([self.chain.null_condition(c)] if self.guidance else [])
        G, read = len(conds), self.inner(model, x_t.repeat(len(conds), 1), torch.cat(conds))

        def mixed(x_tm1, start: int, end: int) -> torch.Tensor:
            g = read(x_tm1.repeat(G, 1), start, end).float().view(G, x_tm1.shape[0], end - start, -1)  # (G, B, L, K)
            a = (torch.arange(start, end, device=g.device) % self.width / max(self.width - 1, 1))[:, None]
            cond = (1 - a) * g[0] + a * g[1]
            return (1 + self.guidance) * cond - self.guidance * g[2] if self.guidance else cond
        return mixed


def sample_canvas(chain: ImageBART, n: int, labels=None, text=None, *, size=None, stride: int = 1, across=False,
                  guidance: float = 0.0, use_cache: bool = True, **options):
    """ImageBART.sample on a grid `size` (H, W) of codes at least the training grid, patch-wise
    (windows). across=True: labels or text hold two conditions, left and right (Across)."""
    grid = tuple(size or chain.cfg.grid)
    reader = windows(chain, grid, stride, use_cache)
    if across:
        pair = labels if labels is not None else text
        if pair is None or len(pair) != 2:
            raise ValueError("across needs exactly two conditions (labels or text), left and right")
        if guidance and chain.num_labels is None and chain.tokenizer is None:
            raise ValueError("guidance needs a condition: class labels or text")
        side = lambda k: (pair[k], None) if labels is not None else (None, [pair[k]])     # (labels, text)
        reader = Across(reader, chain, chain.condition(*side(1), n), grid[1], guidance)
        (labels, text), guidance = side(0), 0.0                                           # Across guides
    return chain.sample(n, labels, text, grid=grid, reader=reader, guidance=guidance, **options)


@torch.no_grad()
def decode_canvas(vq: VQGAN, x1: torch.Tensor) -> torch.Tensor:
    """VQGAN.decode for a grid at least the training grid, a larger one window by window (this code's
    own): G's self-attention reads every code it decodes, so it decodes windows of the training
    grid, half a window apart, and each pixel is the mean of those covering it, weighted by a tent
    highest at a window's centre (no seams).  (B, H, W) -> (B, 3, H f, W f)"""
    B, H, W = x1.shape
    n, f = vq.cfg.resolution // vq.cfg.factor, vq.cfg.factor          # the training grid, n x n codes
    if H <= n and W <= n:
        return vq.decode(x1)
    starts = lambda size: sorted(set(range(0, size - n + 1, n // 2)) | {size - n})   # window origins, codes
    ramp = torch.minimum(torch.arange(n * f) + 0.5, n * f - torch.arange(n * f) - 0.5).to(x1.device)
    tent = ramp[:, None] * ramp[None, :]                              # (n f, n f): > 0 everywhere
    out = torch.zeros(B, 3, H * f, W * f, device=x1.device)
    weight = torch.zeros(H * f, W * f, device=x1.device)
    for top in starts(H):
        for left in starts(W):
            rows, cols = slice(top * f, (top + n) * f), slice(left * f, (left + n) * f)
            out[:, :, rows, cols] += vq.decode(x1[:, top:top + n, left:left + n]) * tent
            weight[rows, cols] += tent
    return out / weight


# ----- Particles: masked editing with importance resampling (this code's own) ---------------
# Forcing conditions the tokens after a given one, never those before it. Particles fix that in
# distribution: each image is decoded M times, each draw weighted by how well it explains the given
# tokens, w = prod_given p(x^i = given^i | x^{<i}, x_t, c) (decode_scale's log_w), and M draws in
# proportion to w carry on. p(drawn) p(given | drawn) = p(drawn, given), so the kept draws follow
# p(drawn | given, x_t) as M grows.

def resample(log_w: torch.Tensor, M: int, generator=None) -> torch.Tensor:
    """Self-normalised importance resampling. log_w (n M,), M particles per image in consecutive
    rows -> (n M,) the rows to keep: for each image M draws with replacement from its own
    particles, each with probability w / sum(w); all equally likely where every weight is 0."""
    log_w = log_w.view(-1, M)                                              # (n, M)
    w = (log_w - log_w.max(1, keepdim=True).values).exp().nan_to_num(1.0)  # max first: no underflow
    picks = MultinomialDiffusion.draw(w[:, None].expand(-1, M, -1), generator)   # (n, M) particle indices
    return (torch.arange(len(w), device=w.device)[:, None] * M + picks).flatten()


@torch.inference_mode()
def inpaint_particles(chain: ImageBART, x1, keep, labels=None, text=None, *, particles: int = 10,
                      refine: int = INPAINT_REFINE, context: str = "clean", trajectory: bool = False, reader=None,
                      generator=None, **options) -> torch.Tensor | list[torch.Tensor]:
    """ImageBART.inpaint with M = `particles` rows per image, resampled after every pass by their
    weights: inpaint's loop with the additions (1)-(3). The resampling has a generator of its own,
    so one particle gives inpaint's tokens exactly. With M > 1 and no class named on a class chain
    the class is latent: an image's particles take the classes in turn, and the weights keep those
    that explain the given tokens. context="noised": the given tokens follow the forward process,
    x^i_{t-1} ~ q(x^i_{t-1} | x^i_t, x^i_1), as noisy as in training."""
    if particles < 1 or context not in ("clean", "noised"):
        raise ValueError(f"particles must be >= 1 and context 'clean' or 'noised', got {particles}, {context!r}")
    M, (B, h, w), D = particles, x1.shape, chain.diffusion
    seed = generator.initial_seed() if generator is not None else torch.initial_seed()
    g = torch.Generator(x1.device).manual_seed(seed + 1)          # (1) the resampling's own draws
    x1, keep = (rearrange(z, "b h w -> b (h w)").repeat_interleave(M, 0) for z in (x1.long(), keep.bool()))
    if M > 1 and chain.num_labels and labels is None:        # (2) M rows per image, a latent class each
        first = torch.randint(0, chain.num_labels, (B, 1), generator=g, device=x1.device)
        c = ((first + torch.arange(M, device=x1.device)) % chain.num_labels).flatten()   # (B M,)
    else:
        c = chain.condition(labels, text, B)
        c = c.repeat_interleave(M, 0) if c is not None else None                        # (B M, ...)
    x_t = torch.randint(0, D.K, x1.shape, generator=generator, device=x1.device)        # x_T
    x_t = torch.where(keep, x1, x_t) if context == "clean" else x_t
    xs = [x_t]
    for t in range(chain.T, 1, -1):
        forced = x1 if context == "clean" else D.draw(D.q_posterior(x_t, x1, t), generator)
        x_in = x_tm1 = x_t
        rounds = refine if t < chain.T else 0
        for r in range(rounds + 1):                            # a pass, then the forward-backward rounds
            if r:
                x_in = chain.renoise(x_tm1, t, r, rounds, generator)
            log_w = torch.zeros(len(x1), device=x1.device)
            x_tm1 = chain.decode_scale(t, x_in, c, forced=forced, keep=keep, log_w=log_w, reader=reader,
                                       generator=generator, **scale_options(options, t, chain.T))
            rows = resample(log_w, M, g)                       # (3) the particles that carry on, and their past
            x_tm1, forced, xs = x_tm1[rows], forced[rows], [x[rows] for x in xs]
            c = c[rows] if c is not None else None
        x_t = x_tm1
        xs.append(x_t)
    xs = [rearrange(x[::M], "b (h w) -> b h w", h=h, w=w) for x in xs]  # each image's first particle
    return xs if trajectory else xs[-1]
