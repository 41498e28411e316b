"""The judge of samples (not the paper; evaluation only), the classifier of codes that
rejection and reranking choose with (Table 2, Fig. 3), and every row of a run's evaluation.

    python evaluate.py --run runs/shapes        # the judge's figures -> runs/shapes/eval.json
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

import data as ds
import imagebart as ib
import runs

# =====================================================================================
# The judge of samples
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
            raise runs.UserError(f"--mask {kind}: neither a mask kind ({', '.join(MASK_KINDS)}) nor a file")
        try:
            with Image.open(kind) as im:
                if im.size != (W, H):
                    runs.say(f"note: --mask {kind} is {im.width}x{im.height}; resized to the image's {W}x{H}")
                im = im.convert("L").resize((W, H), Image.NEAREST)
        except Exception:
            raise runs.UserError(f"--mask {kind} is not a readable image") from None
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
        x = ds.to_float(x) if x.dtype == torch.uint8 else x.float()
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
    progress = runs.Progress(cfg.steps, every=max(1, cfg.steps // 5), prefix=prefix)
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = runs.cosine_lr(step, cfg.steps, cfg.lr, warmup=min(50, cfg.steps // 10), final_frac=0.01)
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
        return blank_region(random_shift(ds.random_flip(ds.to_float(x_train[idx]), g), cfg.max_shift, g), cfg.blank)
    fit_classifier(judge, cfg, len(x_train), augmented, y_train, device, "judge ")
    judge.eval()                                       # BatchNorm from here on uses its running statistics
    _, predicted = judge_images(judge, blank_region(ds.to_float(x_test), cfg.blank))
    return judge, (predicted == y_test).float().mean().item()


def blank_region(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x (B, 3, H, W) in [-1, 1] with the pixels of mask `kind` set to 0 (grey); "" = unchanged."""
    if not kind:
        return x
    return x.masked_fill(pixel_mask(kind, *x.shape[-2:], seed=0).to(x.device), 0.0)

# ----- That data set's judge --------------------------------------------------------------

# The judges of the built-in data sets (shapes, scenes), trained by this code as the quickstart
# trains them (two threads) and shipped in assets/judges/: every clone then judges with the very same network,
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
              log=runs.say, shipped: bool = True) -> tuple[Judge | None, dict]:
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
                    return runs.load_checkpoint(found, "judge"), own if found == own else os.path.join("assets", "judges", file)
                except runs.UserError as e:   # another version's (or a damaged) file: a cache, so train it again
                    log(f"judge: not using the cached file: {e}")
        return None, own
    ckpt, path = read_cached()
    claim = None
    if ckpt is None:
        # one process trains a cache entry: another run on the same data waits for it, and
        # then reads it (waiting is the point: it would have trained the same judge)
        runs.ensure_writable_dir(judge_dir)
        claim = runs.Claim(own + ".lock", f"the judge {file}", [file])
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
            runs.save_atomic(ckpt, path)
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
    return torch.cat([classifier(x1[sl].to(device)).float().log_softmax(-1) for sl in runs.batches(len(x1), batch)])


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
                   log=runs.say) -> tuple[CodeClassifier, dict]:
    """The code classifier of a run: read from judge_dir when one was trained on exactly these
    training codes, labels and first stage with this config, else trained now and saved there
    (beside the judges; never shipped). -> (the classifier, a summary for the eval output)."""
    cfg = cfg or CodeClassifierConfig()
    if not os.path.exists(runs.tokens_path(run)):
        raise runs.UserError(f"{run} carries no codes of its training images (a shipped run), so no classifier of "
                             f"codes can be trained; choose by --scorer bayes, or train a run of your own")
    tokens = runs.load_tokens(run)
    if tokens.get("train_labels") is None or tokens.get("test_labels") is None:
        raise runs.UserError(f"{run}'s codes carry no labels, so no classifier can be trained to choose samples "
                             f"by their class; rerank with --scorer bayes instead")
    train = (tokens["train"], tokens["train_labels"].long())
    test = (tokens["test"], tokens["test_labels"].long())
    num_codes, num_classes = int(tokens["num_codes"]), int(tokens["num_labels"])
    # The cache key: this config, the first stage's weights (the codes are its encoding of the
    # images), the training codes and labels. Another first stage on the same data: another classifier.
    h = hashlib.sha1(repr(sorted(dataclasses.asdict(cfg).items())).encode())
    _digest_tensors(h, runs.load_checkpoint(runs.vq_path(run), "vq")["model"])
    h.update(repr((num_codes, num_classes, tuple(train[0].shape))).encode())
    h.update(np.ascontiguousarray(train[0].to(torch.int64).numpy()).tobytes())
    h.update(np.ascontiguousarray(train[1].numpy().astype(np.int64)).tobytes())
    digest = h.hexdigest()[:12]
    grid = "x".join(map(str, train[0].shape[1:]))
    path = os.path.join(judge_dir, f"{_cache_name(runs.recorded_dataset(run))}-codes{grid}-classifier-{digest}.pt")
    ckpt = None
    if os.path.exists(path):
        try:
            ckpt = runs.load_checkpoint(path, "code_classifier")
        except runs.UserError as e:       # another version's (or a damaged) file: a cache, so train it again
            log(f"classifier: not using the cached file: {e}")
    if ckpt is not None:
        classifier = CodeClassifier(CodeClassifierConfig(**ckpt["config"]), ckpt["num_codes"], ckpt["num_classes"])
        classifier.load_state_dict(ckpt["model"])
        classifier = classifier.to(device).eval()
        log(f"classifier: loaded the cached {path} (test accuracy {ckpt['test_accuracy']:.2%})")
        cached = True
    else:
        runs.ensure_writable_dir(judge_dir)
        log(f"classifier: training a classifier of codes on the {len(train[0])} training grids of {run} "
            f"(once per first stage and data set; cached as {path})")
        t0 = time.time()
        classifier, accuracy = train_code_classifier(cfg, train, test, num_codes, num_classes, device)
        ckpt = {"kind": "code_classifier", "config": dataclasses.asdict(cfg), "num_codes": num_codes,
                "num_classes": num_classes, "model": {k: v.cpu() for k, v in classifier.state_dict().items()},
                "digest": digest, "train_codes": len(train[0]), "test_codes": len(test[0]),
                "test_accuracy": accuracy, "train_seconds": round(time.time() - t0, 1)}
        runs.save_atomic(ckpt, path)
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


def bayes_scorer(chain: ib.ImageBART, cond: dict, generator=None):
    """The Bayes score of reranking (imagebart.bayes_score): how much more likely the chain finds
    a candidate under its condition than under the null one, in bits per token. cond: the asked
    rows' {"labels": (n,)} or {"text": (n, text_len)}. -> score(x1, rows) as classifier_score's."""
    def score(x1: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return ib.bayes_score(chain, x1, **{k: v[rows] for k, v in cond.items()}, generator=generator)
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
def sample_best_of(chain: ib.ImageBART, n: int, score, labels=None, text=None, *, accept: float | None = None,
                   rerank: int | None = None, groups: torch.Tensor | None = None, generator=None, batch: int = 256,
                   what: str | None = None, log=runs.say, **sampling) -> BestOf:
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
    for sl in runs.batches(len(source), batch, what, log):
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
        runs.check_number(eval_n, "--eval-n" + (" (0 skips the evaluation)" if zero_skips else ""), 2, whole=True)
    if judge_steps is not None:
        runs.check_number(judge_steps, "--judge-steps", 1, whole=True)


INPAINT_PARTICLES = 10                    # particles per image of the completion rows by particles
DEFAULT_EVAL_GUIDANCE = 0.5               # w of the guided samples row, unless one is given: on the tiny
                                          # shapes run w = 0.5 judged best (98 %; w = 1: 94 %, w = 2: 80 %, README)


def _as_saved(x: torch.Tensor) -> torch.Tensor:
    """Generated images (B, 3, H, W) in [-1, 1], rounded to 8 bits as a PNG would keep them."""
    return ds.to_float(ds.to_uint8(x))


@torch.no_grad()
def evaluate_run(vq: ib.VQGAN, chain: ib.ImageBART, data: dict, judge: Judge | None = None, n: int = 1000,
                 guidance: float = DEFAULT_EVAL_GUIDANCE, batch: int = 250, seed: int = 0, log=runs.say,
                 lower_half_judge: Judge | None = None, refine: int = ib.INPAINT_REFINE,
                 particles: int = INPAINT_PARTICLES, context: str = "clean", workers: int | None = None) -> dict:
    """The judge's figures for a trained run, every row on n images (n at most half the test split).

    The real test split is cut into two disjoint parts: A = test[:n] and B = test[n:2n]. B is
    the FD reference of every row, so all FDs are n against n on the same reference:
      real_test                 A itself: the judge's accuracy (the ceiling of every row) and
                                FD(A, B) (the floor: how far two draws of real data lie apart at n)
      real_lower_halves         A with the upper half grey, judged by `lower_half_judge` (a judge
                                trained on such images): how much of the class the lower half alone
                                tells, the real ceiling of upper-half completions
      reconstructions           G(E(A)): PSNR against A (dB, 8-bit rounded), accuracy, FD
      completions_upper         A's codes with the upper half regenerated by ImageBART.inpaint, the
                                paper's masked process with `refine` rounds per scale, no label
                                (unconditional): accuracy against A's labels, FD
      completions_random_boxes  the same, three random boxes per image (mask seed = image index)
      completions_*_particles   the same two with this code's particles instead, `particles` per
                                image and no refinement (inpaint_particles); particles = 0: none
      samples_guidance_0        class-conditional samples, labels cycled over the classes:
                                accuracy against the label drawn for, FD
      samples_guided            the same at classifier-free guidance w = `guidance`
    (an unconditional chain gets samples_unconditional, FD only, instead of the two sample rows;
    a text chain gets the rows of _prompt_rows instead).
    Generated images are rounded to 8 bits first. Sampling is seeded by `seed`, per row; `workers`
    (_side_process) says whether the random boxes are drawn in a process of their own meanwhile.
    `context`: both procedures' (clean, or this code's noised).
    Without a judge (unlabelled data) only the reconstructions' PSNR is computed."""
    device = next(vq.parameters()).device
    x_test, y_test, *_ = data["test"]
    if len(x_test) < ds.MIN_TEST_IMAGES:
        raise runs.UserError(f"the test split has {len(x_test)} image(s); {ds.TOO_FEW_TEST_IMAGES}")
    if n > len(x_test) // 2:              # the rows and the FD reference are disjoint halves of the split
        log(f"judging N = {len(x_test) // 2} images per row, not {n}: the test split holds {len(x_test)}, "
            f"and each row's images and the reference are disjoint halves of it")
        n = len(x_test) // 2
    real_a, real_b = x_test[:n], x_test[n:2 * n]
    y_a = y_test[:n] if y_test is not None else None
    result = {"n": n}

    # --- first stage: x_1 = E(A) (the codes completions start from) and G(x_1), rounded to 8 bits
    x1_a, recon = [], []
    for sl in runs.batches(n, batch):
        x1_a.append(vq.encode(ds.to_float(real_a[sl].to(device))))
        recon.append(_as_saved(vq.decode(x1_a[-1])).cpu())
    x1_a, recon = torch.cat(x1_a), torch.cat(recon)
    mse = (ds.to_float(real_a) - recon).pow(2).mean(dim=(1, 2, 3))
    psnr = 10 * torch.log10(4.0 / mse.clamp_min(1e-10))              # peak-to-peak range is 2, as train_vq
    psnr = round(psnr.mean().item(), 2)
    if judge is None:
        return {**result, "reconstructions": {"psnr": psnr},
                "note": "unlabelled data set: no judge, so only the reconstructions' PSNR"}
    classes = judge.head.out_features
    if chain.num_labels and chain.num_labels != classes:
        raise runs.UserError(f"the chain knows {chain.num_labels} classes, the data set judged on has {classes}: "
                             f"is it the data set the run was trained on?")

    result["reference"] = (f"judge features of real test images {n}..{2 * n - 1}, disjoint from the {n} test "
                           f"images that are reconstructed and completed")
    judged = _judging(judge, real_b)
    result["real_test"] = judged(real_a, y_a)
    if lower_half_judge is not None:
        _, predicted = judge_images(lower_half_judge, blank_region(ds.to_float(real_a), "upper"))
        result["real_lower_halves"] = {"accuracy": round((predicted == y_a).float().mean().item(), 4)}
    result["reconstructions"] = {"psnr": psnr, **judged(recon, y_a)}

    # --- completions (Sec. 4.3), unconditional: the label is what the judge must recover; by the
    # paper's masked process, and by this code's particles. The random boxes are the longest rows:
    # on a CPU with two or more threads they are drawn in a process of their own, one thread,
    # while this one draws the other rows on one thread (_side_process). Every row has its own
    # generator, so the figures are what one process draws row after row.
    procedures = {"": dict(refine=refine, context=context)}
    if particles:
        procedures["_particles"] = dict(particles=particles, refine=0, context=context)
    result["inpaint"] = {"masked_process" if not name else name[1:]: kw for name, kw in procedures.items()}
    rows = dict(procedures=procedures, n=n, batch=batch, seed=seed)
    with _side_process(device, n, workers) as side:
        boxes = side.submit(_completions_alone, vq, chain, x1_a, "random-boxes", **rows) if side else None
        upper = _completions(vq, chain, x1_a, "upper", log=log, **rows)
        if chain.tokenizer is not None:   # a text chain: samples for prompts (Sec. 4.2), how well they follow them
            later = _prompt_rows(vq, chain, data, judged, n, guidance, batch, seed, log)
        else:                             # samples from x_T (Sec. 3.3), one class after another
            later = _sample_rows(vq, chain, judged, n, guidance, batch, seed, log)
        boxes = boxes.result() if side else _completions(vq, chain, x1_a, "random-boxes", log=log, **rows)
    if boxes is None:                     # the side process was interrupted (Ctrl-C): so is this one
        raise KeyboardInterrupt
    for kind, images in (("upper", upper), ("random_boxes", boxes)):
        result |= {f"completions_{kind}{name}": judged(row, y_a) for name, row in images.items()}
    return result | later


def _completions(vq: ib.VQGAN, chain: ib.ImageBART, x1_a: torch.Tensor, kind: str, procedures: dict, n: int,
                 batch: int, seed: int, log=runs.say) -> dict:
    """The completion rows of evaluate_run for one kind of mask: the codes x1_a (n, h, w) with
    `kind`'s region (pixel_mask, seed = image index) regenerated by chain.inpaint with each of
    `procedures`' options, one generator seeded by `seed` per row, `batch` images at a time (a
    tenth of that with particles: as many rows) -> {name: the decoded images (n, 3, H, W),
    rounded to 8 bits, on the CPU}."""
    device = next(vq.parameters()).device
    H, W = (size * vq.cfg.factor for size in x1_a.shape[-2:])           # the images' size in pixels
    regen = torch.stack([token_mask(pixel_mask(kind, H, W, seed=i), vq.cfg.factor) for i in range(n)])
    keep = ~regen.to(device)                                               # (n, h, w), True = given
    rows = {}
    for name, options in procedures.items():
        g = torch.Generator(device).manual_seed(seed)
        what = f"eval completions ({kind}{name.replace('_', ', ')})"
        rows[name] = torch.cat([_as_saved(vq.decode(chain.inpaint(x1_a[sl], keep[sl], generator=g, **options))).cpu()
                                for sl in runs.batches(n, max(1, batch // options.get("particles", 1)), what, log)])
    return rows


def _completions_alone(*args, **kwargs) -> dict | None:
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


def _plain_draw(chain: ib.ImageBART, batch: int, log):
    """How the sample rows are drawn: chain.sample in batches of `batch`, a progress line after each.
    -> draw(m, cond, targets, guidance, generator, what) -> (codes (m, h, w), {}). cond: the m rows'
    {"labels": (m,)}, {"text": (m, text_len)} or {}; targets, the class each row should show, are
    for the drawers that choose by them (evaluate_selection's)."""
    def draw(m: int, cond: dict, targets, guidance: float, generator, what: str):
        return torch.cat([chain.sample(sl.stop - sl.start, **{k: v[sl] for k, v in cond.items()}, guidance=guidance,
                                       generator=generator) for sl in runs.batches(m, batch, what, log)]), {}
    return draw


def _decoded(vq: ib.VQGAN, codes: torch.Tensor, batch: int) -> torch.Tensor:
    """codes (m, h, w) -> images (m, 3, H, W) on the CPU, rounded to 8 bits, decoded `batch` at a time."""
    return torch.cat([_as_saved(vq.decode(codes[sl])).cpu() for sl in runs.batches(len(codes), batch)])


def _sample_rows(vq: ib.VQGAN, chain: ib.ImageBART, judged, n: int, guidance: float, batch: int, seed: int, log,
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
def real_wide_images(record: dict | None, height: int, width: int, n: int):
    """Real images of a wide canvas, where the data set can draw them: on scenes, n whole scenes
    `width` pixels wide (seed 2: neither the training nor the test split). Their crops at every
    offset are what patch-wise sampling should reach. -> (uint8 images, labels), or None."""
    if record is None or record.get("spec") != "scenes":
        return None
    images, labels, _ = ds.make_wide_scenes(n, seed=2, resolution=height, width=width)
    return images, labels


def evaluate_canvas(vq: ib.VQGAN, chain: ib.ImageBART, data: dict, judge: Judge, canvas: tuple[int, int], n: int = 500,
                    stride: int = 1, batch: int = 16, seed: int = 0, log=runs.say, real_wide=None) -> dict:
    """What patch-wise sampling buys (Sec. 4.2): n class-conditional panoramas of `canvas` codes
    (one training image tall, wider), drawn through sliding windows (`stride`, window_origin),
    against a baseline of as many independent training-size samples of the same class tiled
    side by side, which has seams. Both are cut into training-size crops at every column
    offset o (in codes), and each offset's n crops are judged:
      fd        FD of the crops against n real test images (untiled: tiled real images would put
                seams in the reference too)
      accuracy  how often the judge sees the panorama's class in the crop
    Summaries: at the offsets where the baseline's crops are whole tiles (o a multiple of the
    width) and half-way between, where they straddle a seam. `real_wide`, (uint8 images of the
    canvas's size, labels), adds the same rows for real wide images ("real": on scenes, whole
    scenes drawn by the generator), the floor every offset could reach, and on scenes how often
    a canvas's two ends have the same sky. And outpainting to either side (extend_right,
    extend_left, below).
    -> {"window": ..., "tiled": ..., ["real": ...], "extend_*": ...}."""
    device = next(vq.parameters()).device
    (h, w), (H, W) = chain.cfg.grid, canvas
    if H != h or W <= w:
        raise runs.UserError(f"the seams are measured on canvases one training image tall and wider ({h} codes high)")
    x_test = data["test"][0]
    n = min(n, len(x_test))
    reference = feature_stats(judge_images(judge, x_test[:n])[0])
    labels = torch.arange(n) % chain.num_labels                              # (n,) one class per panorama
    tiles = math.ceil(W / w)
    codes = {"window": [], "tiled": []}
    g = torch.Generator(device).manual_seed(seed)
    for sl in runs.batches(n, batch, f"panoramas {H}x{W} codes, stride {stride}", log):
        codes["window"].append(chain.sample(sl.stop - sl.start, labels[sl].to(device), size=canvas, stride=stride,
                                            generator=g).cpu())
    g = torch.Generator(device).manual_seed(seed)
    for sl in runs.batches(n, 256, "tiled baseline", log):
        m = sl.stop - sl.start
        x = chain.sample(m * tiles, labels[sl].repeat_interleave(tiles).to(device), generator=g)    # (m tiles, h, w)
        codes["tiled"].append(rearrange(x, "(m k) h w -> m h (k w)", k=tiles)[..., :W].cpu())
    result = {"n": n, "canvas_codes": [H, W], "stride": stride, "offsets": list(range(W - w + 1))}
    # outpainting: a test image on a canvas two images wide, the other half drawn with 10
    # particles (the chains compared here are this code's, so this code's procedure), to its
    # right ("extend_right") or to its left ("extend_left", which a left-to-right decoder writes
    # before it reads the image). Judged on the drawn square: FD against real
    # images, how often the judge names the given image's class in it (a scene continued), and
    # how often its dominant colour is the given image's (the shape's colour)
    x1_test = torch.cat([vq.encode(ds.to_float(x_test[sl].to(device))) for sl in runs.batches(n, 256)])
    given_colour = ds.dominant_colours(x_test[:n])
    for name, given_at in (("extend_right", 0), ("extend_left", w)):
        x1 = torch.zeros(n, h, 2 * w, dtype=torch.long, device=device)
        keep = torch.zeros(n, h, 2 * w, dtype=torch.bool, device=device)
        x1[:, :, given_at:given_at + w], keep[:, :, given_at:given_at + w] = x1_test, True
        g = torch.Generator(device).manual_seed(seed)
        drawn = []
        for sl in runs.batches(n, max(1, batch // INPAINT_PARTICLES), f"outpainting ({name.replace('_', ' ')})", log):
            out = chain.inpaint(x1[sl], keep[sl], size=(h, 2 * w), stride=stride, particles=INPAINT_PARTICLES,
                                refine=0, generator=g)
            square = out[:, :, w - given_at:2 * w - given_at]                          # (m, h, w), the drawn part
            drawn.append(_as_saved(vq.decode(square)).cpu())
        drawn = torch.cat(drawn)
        features, predicted = judge_images(judge, drawn)
        result[name] = {"fd": round(frechet_distance(*feature_stats(features), *reference), 3),
                        "same_class": round((predicted == data["test"][1][:n]).float().mean().item(), 4),
                        "same_colour": round((ds.dominant_colours(ds.to_uint8(drawn)) == given_colour).float().mean().item(), 4)}
        if real_wide is not None:    # scenes: is the drawn half's sky the given scene's?
            same = ds.scene_skies(ds.to_uint8(drawn)) == ds.scene_skies(x_test[:n])
            result[name]["same_sky"] = round(same.float().mean().item(), 4)
    drawn = {name: (torch.cat([_as_saved(ib.decode_canvas(vq, x.to(device))).cpu() for x in torch.cat(parts).split(64)]),
                    labels) for name, parts in codes.items()}
    if real_wide is not None:
        drawn["real"] = (real_wide[0][:n], real_wide[1][:n])
    f = vq.cfg.factor
    for name, (images, truth) in drawn.items():
        rows = {"fd": [], "accuracy": []}
        for o in result["offsets"]:
            features, predicted = judge_images(judge, images[..., o * f:(o + w) * f])
            rows["fd"].append(round(frechet_distance(*feature_stats(features), *reference), 3))
            rows["accuracy"].append(round((predicted == truth).float().mean().item(), 4))
        whole = [k for k, o in enumerate(result["offsets"]) if o % w == 0]
        seams = [k for k, o in enumerate(result["offsets"]) if o % w == w // 2]
        mean = lambda v, ks: round(sum(v[k] for k in ks) / len(ks), 3)
        if real_wide is not None:    # scenes: is the sky at the canvas's right end the sky at its left end?
            ends = [x if x.dtype == torch.uint8 else ds.to_uint8(x) for x in (images[..., :w * f], images[..., -w * f:])]
            rows["same_sky_at_both_ends"] = round((ds.scene_skies(ends[0]) == ds.scene_skies(ends[1])).float().mean().item(), 4)
        result[name] = {**rows, "fd_whole_tiles": mean(rows["fd"], whole), "fd_across_seams": mean(rows["fd"], seams),
                        "accuracy_whole_tiles": mean(rows["accuracy"], whole),
                        "accuracy_across_seams": mean(rows["accuracy"], seams),
                        "fd_mean": mean(rows["fd"], range(len(rows["fd"]))),
                        "accuracy_mean": mean(rows["accuracy"], range(len(rows["fd"])))}
    return result


def _prompt_rows(vq: ib.VQGAN, chain: ib.ImageBART, data: dict, judged, n: int, guidance: float, batch: int,
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
    if captions is not None and ds.shape_caption_parts(captions[0]) is not None:
        held = set(chain.cfg.holdout)
        combos = [(ds.PALETTE_NAMES[c], ds.SHAPE_CLASSES[k], c, k) for k in range(len(ds.SHAPE_CLASSES)) for c in ds.SHAPE_FOREGROUNDS]
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
                hit = ds.dominant_colours(ds.to_uint8(images)) == colours
                result[row]["colour_accuracy"] = round(hit.float().mean().item(), 4)
                result[row]["prompts"] = len(set(prompts))
    return result


@torch.no_grad()
def evaluate_selection(vq: ib.VQGAN, chain: ib.ImageBART, data: dict, judge: Judge, n: int = 1000,
                       guidance: float = DEFAULT_EVAL_GUIDANCE, *, accept: float | None = None,
                       rerank: int | None = None, scorer: str = "classifier", classifier: CodeClassifier | None = None,
                       classifier_info: dict | None = None, batch: int = 250, seed: int = 0, log=runs.say) -> dict:
    """The sample rows of evaluate_run (a class chain's samples_guidance_0 and samples_guided, a
    text chain's prompts_* and heldout_*), with every sample chosen by sample_best_of:
      accept = R  rejection sampling with the code classifier (Table 2, left): the samples asked
                  of each class (or prompt) are the fraction R of ceil(n_c / R) candidates that it
                  finds most likely to show their class (for a prompt, the shape it names)
      rerank = K  each sample the best of its own K candidates (Fig. 3) by `scorer`: "classifier"
                  (log p(c | x_1), the class only) or "bayes" (imagebart.bayes_score: the whole
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
        raise runs.UserError(f"the test split has {len(x_test)} image(s); the judge needs at least 4")
    real_a, y_a = x_test[:n], y_test[:n]
    judged = _judging(judge, x_test[n:2 * n])
    result = {"n": n, "selection": {"accept": accept} if accept is not None else {"rerank": rerank, "scorer": scorer,
                                                                                  "per": "sample"},
              "reference": f"judge features of real test images {n}..{2 * n - 1}", "real_test": judged(real_a, y_a)}
    if classifier is not None:
        # the two networks on the same real images: the judge on pixels, the classifier on their codes
        x1_a = torch.cat([vq.encode(ds.to_float(real_a[sl].to(device))) for sl in runs.batches(n, batch)])
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
                    device="cpu", log=runs.say, inpaint: dict | None = None, out: str | None = None,
                    shipped_judges: bool = True, canvas: tuple[int, int] | None = None, stride: int = 1,
                    accept: float | None = None, rerank: int | None = None, scorer: str = "classifier",
                    classifier_steps: int | None = None, workers: int | None = None) -> dict:
    """Judge a run folder: its data set (as recorded, or `dataset` instead), that data set's
    judges (cached in judge_dir), evaluate_run; -> the figures, also written to `out`
    (default <run>/eval.json). With `canvas` (a grid of codes one training image tall and
    wider), evaluate_canvas instead: the seams of patch-wise sampling (default out
    <run>/eval_canvas_<H>x<W>.json, in pixels). With `accept` or `rerank`, evaluate_selection
    instead, its code classifier cached in judge_dir too (default out <run>/eval_accept_<R>.json
    or <run>/eval_rerank_<K>_<scorer>.json: eval.json keeps the plain rows). `inpaint`: the
    completions' refine, particles and context (evaluate_run)."""
    selecting = accept is not None or rerank is not None
    if selecting and canvas is not None:
        raise runs.UserError("--accept and --rerank choose among samples of the training size; --size judges "
                             "panoramas: give one of them")
    vq, chain = runs.load_run(run, device)
    if selecting and chain.num_labels is None and chain.tokenizer is None:
        raise runs.UserError("this run's chain is unconditional: --accept and --rerank choose samples by how well "
                             "they show their class or prompt, so they need a conditional run")
    if dataset is not None:
        record = ds.dataset_record(dataset, vq.cfg.resolution, data_root, vq.cfg.train_size, vq.cfg.test_size)
    else:
        record = runs.recorded_dataset(run)
        if record is None:
            raise runs.UserError(f"{run} does not record which data set it was trained on (made before runs "
                                 f"recorded it); name it with --dataset shapes, scenes, cifar or folder:PATH")
    if record["resolution"] != vq.cfg.resolution:
        raise runs.UserError(f"the data set is recorded at {record['resolution']}px, the first stage takes "
                             f"{vq.cfg.resolution}px")
    with runs.user_errors():
        data = ds.load_recorded_dataset(record)
    # a spot check that these are the images the run was tokenized from (a wrong --dataset)
    if os.path.exists(runs.tokens_path(run)):
        codes = runs.load_tokens(run)["test"][:64].long()
        x = data["test"][0][:len(codes)]
        agree = (vq.encode(ds.to_float(x.to(device))).cpu() == codes[:len(x)]).float().mean().item()
        if agree < 0.9:
            log(f"warning: only {agree:.0%} of the codes of the first test images match {runs.tokens_path(run)}: "
                f"{record['spec']} may not be the data set this run was trained on")
    cfg = JudgeConfig() if judge_steps is None else dataclasses.replace(JudgeConfig(), steps=judge_steps)
    judge, judge_info = judge_for(data, record, judge_dir, cfg, device, log, shipped_judges)
    if canvas is not None:
        if judge is None or not chain.num_labels:
            raise runs.UserError("the seams are judged on class-conditional panoramas: this run needs labels")
        t0 = time.time()
        result = {"run": run, "dataset": record["spec"], "judge": judge_info,
                  **evaluate_canvas(vq, chain, data, judge, canvas, n, stride, seed=seed, log=log,
                                    real_wide=real_wide_images(record, canvas[0] * vq.cfg.factor, canvas[1] * vq.cfg.factor, n))}
        result["eval_seconds"] = round(time.time() - t0, 1)
        f = vq.cfg.factor
        path = out or os.path.join(run, f"eval_canvas_{canvas[0] * f}x{canvas[1] * f}.json")
        runs.save_json_atomic(result, path)
        log(f"wrote {path}")
        return result
    if selecting:
        if judge is None:
            raise runs.UserError("this data set has no labels, so no judge to tell whether the chosen samples "
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
        runs.save_json_atomic(result, path)
        log(f"wrote {path}")
        return result
    lower_half_judge = judge_for(data, record, judge_dir, dataclasses.replace(cfg, blank="upper"), device, log,
                                 shipped_judges)[0] \
        if judge is not None else None
    t0 = time.time()
    result = {"run": run, "dataset": record["spec"], "judge": judge_info,
              **evaluate_run(vq, chain, data, judge, n, guidance, seed=seed, log=log,
                             lower_half_judge=lower_half_judge, workers=workers, **(inpaint or {}))}
    result["eval_seconds"] = round(time.time() - t0, 1)           # the judges' own training not included
    path = out or runs.eval_path(run)
    runs.save_json_atomic(result, path)
    log(f"wrote {path}")
    return result


# =====================================================================================
# The command line: python evaluate.py --run RUN
# =====================================================================================

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Judge a trained run with a classifier trained on its data set "
                                            "(accuracy and Frechet distance in the judge's features, not FID)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", default=None,
                   help="a run folder (vq.pt, scale_<t>.pt); default runs/shapes once trained, else the shipped run")
    p.add_argument("--out", default=None, help="the figures, JSON (default <run>/eval.json; with --size, --accept or "
                                               "--rerank a file of its own beside it)")
    p.add_argument("--eval-n", type=int, default=1000, help="images per row (at most half the test split)")
    p.add_argument("--guidance", type=float, default=DEFAULT_EVAL_GUIDANCE,
                   help="w of the guided samples row (classifier-free guidance); 0 = no guided row")
    p.add_argument("--refine", type=int, default=ib.INPAINT_REFINE,
                   help="the completions by the paper's masked process (Sec. 4.3): forward-backward rounds per scale")
    p.add_argument("--particles", type=int, default=INPAINT_PARTICLES,
                   help="the completions by this code's particles: particles per image; 0 = no such rows")
    p.add_argument("--context", choices=("clean", "noised"), default="clean",
                   help="completions: given tokens clean at every scale (Sec. 4.3), or noised like x_t")
    p.add_argument("--seed", type=int, default=0, help="every row's generator")
    p.add_argument("--size", default=None, metavar="HxW",
                   help="instead: the seams of patch-wise sampling (Sec. 4.2) on canvases of H x W pixels, one "
                        "training image tall")
    p.add_argument("--stride", type=int, default=1, help="--size: columns the window moves at a time")
    choose = p.add_argument_group("instead: samples chosen among candidates, rejection (Table 2) or reranking (Fig. 3)")
    choose.add_argument("--accept", type=float, default=None, metavar="R",
                        help="rejection with the classifier of codes at acceptance rate R in (0, 1]")
    choose.add_argument("--rerank", type=int, default=None, metavar="K", help="each sample the best of K candidates")
    choose.add_argument("--scorer", choices=("bayes", "classifier"), default=None,
                        help="--rerank's score (default bayes: the chain's own log p(x|c) - log p(x|null))")
    choose.add_argument("--classifier-steps", type=int, default=None,
                        help=f"training steps of a new classifier of codes (default {CodeClassifierConfig.steps})")
    judge = p.add_argument_group("the judge")
    judge.add_argument("--dataset", default=None, help="shapes | scenes | cifar | folder:PATH, instead of the run's recorded one")
    judge.add_argument("--data-root", default="data", help="where CIFAR-10 is, with --dataset cifar")
    judge.add_argument("--judge-dir", default="runs/judges",
                       help="cache of judges, one per data set, and of the classifiers of codes")
    judge.add_argument("--fresh-judges", action="store_true",
                       help="train the judges into --judge-dir even where assets/judges ships them")
    judge.add_argument("--judge-steps", type=int, default=None,
                       help=f"training steps of a new judge (default {JudgeConfig.steps})")
    p.add_argument("--device", default=None)
    return p


def check_selection(accept, rerank, scorer, classifier_steps) -> None:
    """--accept, --rerank, --scorer and --classifier-steps, before any work (sample.py's too)."""
    if scorer is not None and rerank is None:
        raise runs.UserError("--scorer picks --rerank's score; --accept always scores with the classifier of codes")
    if classifier_steps is not None and classifier_steps < 1:
        raise runs.UserError(f"--classifier-steps must be >= 1, got {classifier_steps}")
    if accept is not None and rerank is not None:
        raise runs.UserError("give --accept or --rerank, not both: each keeps the best candidates, by a rate or a count")
    if accept is not None and not 0 < accept <= 1:       # nan fails this too
        raise runs.UserError(f"--accept must lie in (0, 1], got {accept:g}")
    if rerank is not None and rerank < 1:
        raise runs.UserError(f"--rerank must be >= 1, got {rerank}")


def main():
    # --- every option checked before any work
    args = build_parser().parse_args()
    check_judge_options(args.eval_n, args.judge_steps)
    runs.check_number(args.guidance, "--guidance", 0)
    runs.check_number(args.seed, "--seed", 0, runs.SEED_MAX, whole=True)
    runs.check_number(args.refine, "--refine", 0, whole=True)
    runs.check_number(args.particles, "--particles", 0, whole=True)
    check_selection(args.accept, args.rerank, args.scorer, args.classifier_steps)
    if args.stride != 1 and not args.size:
        raise runs.UserError("--stride moves the windows of a --size canvas; give --size")
    if args.size and (args.accept is not None or args.rerank is not None):
        raise runs.UserError("--accept and --rerank choose among samples of the training size; --size judges "
                             "panoramas: give one of them")
    args.run, home = runs.choose_run(args.run)
    if not os.path.isdir(args.run):
        raise runs.UserError(f"no run at {args.run}; train one with: python train_chain.py --out {args.run}")
    if args.out is None and home != args.run:           # a shipped run: its figures go to the working folder
        args.out = os.path.join(home, "eval.json")
    own = os.path.realpath(args.out or runs.eval_path(args.run)) == os.path.realpath(runs.eval_path(args.run))
    if args.out is not None:              # never another of a run's own files; JSON; a writable folder
        if not own or home != args.run:
            runs.refuse_run_file("--out", args.out, args.run)
        if not args.out.lower().endswith(".json"):
            raise runs.UserError(f"--out {args.out}: the judge's figures are JSON; give a name ending in .json")
        runs.ensure_writable_dir(os.path.dirname(os.path.abspath(args.out)))
    device = runs.pick_device(args.device)
    size = runs.parse_size(args.size, args.stride, runs.vqgan_from_checkpoint(
        runs.load_checkpoint(runs.vq_path(args.run), "vq")).cfg) if args.size else None
    # --- the run's own eval.json is part of the end of a run, which train_chain.py may be
    # writing now: claimed, and refused before any work when another process holds it
    claim = None
    if own and size is None and args.accept is None and args.rerank is None:
        claim = runs.final_claim(args.run)
        holder = claim.take()
        if holder is not None:
            raise runs.UserError(f"{claim.describe(holder)}: let it finish, or write these figures elsewhere "
                                 f"with --out FILE.json")
    try:
        result = evaluate_folder(args.run, dataset=args.dataset, data_root=args.data_root, judge_dir=args.judge_dir,
                                 n=args.eval_n, guidance=args.guidance, judge_steps=args.judge_steps, seed=args.seed,
                                 device=device, out=args.out, shipped_judges=not args.fresh_judges,
                                 inpaint=dict(refine=args.refine, context=args.context, particles=args.particles),
                                 canvas=size, stride=args.stride, accept=args.accept, rerank=args.rerank,
                                 scorer="classifier" if args.accept is not None else args.scorer or "bayes",
                                 classifier_steps=args.classifier_steps)
    finally:
        if claim is not None:
            claim.release()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    runs.run_main(main)
