"""The judge of samples (evaluation only, not the paper), the classifier of codes that rejection
and reranking choose with (Table 2, Fig. 3), and every row of a run's evaluation.

    python evaluate.py --run runs/shapes        # the judge's figures -> runs/shapes/eval.json

The paper reports FID, whose Inception weights are not available offline, and FID on 32x32 toy
images says little. Instead every labelled data set gets its own judge, a small CNN trained on
its real training images, which gives two figures for a set of N images:
  accuracy  how often the judge sees the class the images should show (the label a sample was
            drawn for, the true label of a test image whose masked part was regenerated);
  FD        the Frechet distance between Gaussians fitted to the judge's penultimate features of
            those images and of N real held-out images: FID's formula on another network, NOT FID.
Its figures compare runs on one data set (the same judge), never with papers. For FID, write
PNGs with `sample.py --out-dir` and use an FID tool. An unlabelled data set has no judge: there
only the reconstructions' PSNR is reported.
"""
from __future__ import annotations

import argparse
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


def refuse(wrong, line: str) -> None:
    """Where `wrong`: the user's mistake, `line` on stderr and exit code 2 (a runs.UserError)."""
    if wrong:
        raise runs.UserError(line)


# ----- Masks for completions (sample.py --inpaint, and the judge) --------------------------

MASK_KINDS = ("upper", "lower", "left", "right", "center", "outer", "random-boxes")


def pixel_mask(kind: str, H: int, W: int, seed: int) -> torch.Tensor:
    """(H, W) bool, True = regenerate: one of MASK_KINDS (`seed` places the random boxes), or a
    PNG file (white = regenerate)."""
    m = torch.zeros(H, W, dtype=torch.bool)
    halves = {"upper": (slice(0, H // 2), slice(None)), "lower": (slice(H // 2, None), slice(None)),
              "left": (slice(None), slice(0, W // 2)), "right": (slice(None), slice(W // 2, None))}
    if kind in halves:
        m[halves[kind]] = True
    elif kind in ("center", "outer"):
        m[H // 4:H - H // 4, W // 4:W - W // 4] = True
        m = ~m if kind == "outer" else m
    elif kind == "random-boxes":
        g = torch.Generator().manual_seed(seed)
        for _ in range(3):
            bh, bw = (int(torch.randint(s // 5, s // 2 + 1, (1,), generator=g)) for s in (H, W))
            y0, x0 = (int(torch.randint(0, s - b + 1, (1,), generator=g)) for s, b in ((H, bh), (W, bw)))
            m[y0:y0 + bh, x0:x0 + bw] = True
    else:
        refuse(not os.path.exists(kind), f"--mask {kind}: neither a mask kind ({', '.join(MASK_KINDS)}) nor a file")
        try:
            with Image.open(kind) as im:
                if im.size != (W, H):
                    print(f"note: --mask {kind} is {im.width}x{im.height}; resized to the image's {W}x{H}", flush=True)
                m = torch.from_numpy(np.asarray(im.convert("L").resize((W, H), Image.NEAREST)) > 127)
        except Exception:
            raise runs.UserError(f"--mask {kind} is not a readable image") from None
    return m


def token_mask(pixels: torch.Tensor, factor: int) -> torch.Tensor:
    """(H, W) -> (H/f, W/f): a token is regenerated if any pixel of its f x f patch is."""
    return F.max_pool2d(pixels[None, None].float(), factor)[0, 0] > 0


# ----- The Frechet distance, written out ----------------------------------------------------
# Between N(mu1, C1) and N(mu2, C2) (Dowson & Landau 1982; FID's formula):
#     FD = ||mu1 - mu2||^2 + tr(C1) + tr(C2) - 2 tr((C1^1/2 C2 C1^1/2)^1/2)
# C1^1/2 C2 C1^1/2 is symmetric positive semi-definite, so both roots come from a symmetric
# eigendecomposition (eigh): real eigenvalues, nothing complex to discard.

def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """FD between N(mu1, cov1) and N(mu2, cov2); means (D,), covariances (D, D). In float64."""
    mu1, cov1, mu2, cov2 = (np.asarray(a, dtype=np.float64) for a in (mu1, cov1, mu2, cov2))
    w, V = np.linalg.eigh((cov1 + cov1.T) / 2)
    root1 = (V * np.sqrt(np.clip(w, 0, None))) @ V.T                   # C1^1/2 (round-off below 0 is 0)
    middle = root1 @ cov2 @ root1
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()   # tr(M^1/2)
    return max(0.0, float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * cross))


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """features (N, D) -> (mean (D,), covariance (D, D), divided by N - 1)."""
    features = np.asarray(features, dtype=np.float64)
    if features.shape[0] < 2:
        raise ValueError("a covariance needs at least 2 feature vectors")
    return features.mean(0), np.cov(features, rowvar=False)


# ----- The judge, and the classifier of codes -------------------------------------------------

@dataclass
class JudgeConfig:
    channels: list = field(default_factory=lambda: [16, 32, 64, 128])  # one conv per stage; stride 2 from stage 2
    steps: int = 1000                     # shapes: 100 % of its 2 000 test images after 14 s on 2 cores
    batch_size: int = 64
    lr: float = 2e-3
    max_shift: int = 2                    # augmentation: random translation by up to this many pixels
    seed: int = 0
    blank: str = ""                       # a mask kind ("upper"): that region is grey in every image the judge
                                          # sees, so it classifies from the rest alone


@dataclass
class CodeClassifierConfig:
    n_embd: int = 64                      # each code's learned embedding: the input channels
    channels: list = field(default_factory=lambda: [64, 128])
    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 1                         # the judge's is 0: other initial weights, other batches


class Classifier(nn.Module):
    """The judge: x_0 (B, 3, H, W) in [-1, 1] -> class logits (B, classes); per stage a 3x3 conv, BatchNorm,
    ReLU (stride 2 from stage 2), the mean over positions (the features (B, C) that FD compares), a linear layer.
    With num_codes the classifier of codes that rejection and reranking choose with: x_1 (B, h, w), embedded
    per code. It must not be the judge (a sample chosen and judged by one network proves nothing): it reads
    codes, has two stages, not four, and another seed."""

    def __init__(self, cfg, num_classes: int, num_codes: int = 0):
        super().__init__()
        self.embed = nn.Embedding(num_codes, cfg.n_embd) if num_codes else None
        layers, c_in = [], cfg.n_embd if num_codes else 3
        for i, c_out in enumerate(cfg.channels):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=1 if i == 0 else 2, padding=1, bias=False),  # BN adds the bias
                       nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        self.net, self.head = nn.Sequential(*layers), nn.Linear(c_in, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = rearrange(self.embed(x.long()), "b h w d -> b d h w")      # (B, n_embd, h, w)
        return self.net(x).mean(dim=(2, 3))                                # (B, C, h, w) -> (B, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def random_shift(x: torch.Tensor, max_shift: int, generator=None) -> torch.Tensor:
    """x (B, 3, H, W), each image translated by whole pixels in [-max_shift, max_shift] per axis; edges fill in."""
    B, _, H, W = x.shape
    shift = torch.randint(-max_shift, max_shift + 1, (B, 2), generator=generator).float()
    theta = torch.eye(2, 3).repeat(B, 1, 1)
    theta[:, 0, 2], theta[:, 1, 2] = shift[:, 0] * 2 / W, shift[:, 1] * 2 / H   # affine_grid spans [-1, 1]
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="border", align_corners=False)


def blank_region(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x (B, 3, H, W) in [-1, 1] with the pixels of mask `kind` grey (0); "" = unchanged."""
    return x.masked_fill(pixel_mask(kind, *x.shape[-2:], seed=0).to(x.device), 0.0) if kind else x


@torch.no_grad()
def judge_images(judge: Classifier, images: torch.Tensor, batch: int = 500) -> tuple[np.ndarray, torch.Tensor]:
    """images (N, 3, H, W), uint8 or in [-1, 1] -> (features (N, D) float64, predicted classes (N,))."""
    device = next(judge.parameters()).device
    features, predicted = [], []
    for sl in runs.batches(len(images), batch):
        x = images[sl].to(device)
        f = judge.features(ds.to_float(x) if x.dtype == torch.uint8 else x.float())
        features.append(f.double().cpu())
        predicted.append(judge.head(f).argmax(-1).cpu())
    return torch.cat(features).numpy(), torch.cat(predicted)


@torch.no_grad()
def classify_codes(classifier: Classifier, x1: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """codes (N, h, w) -> log p(class | x_1) (N, classes)."""
    device = next(classifier.parameters()).device
    return torch.cat([classifier(x1[sl].to(device)).float().log_softmax(-1) for sl in runs.batches(len(x1), batch)])


def fit(model: nn.Module, cfg, x: torch.Tensor, y: torch.Tensor, augment, device, prefix: str) -> nn.Module:
    """The judge's and the classifier's training: cfg.steps of Adam, cosine learning rate, cross-entropy on
    batches augment(x[idx], g) of cfg.batch_size. -> the model in eval mode (BatchNorm's running statistics)."""
    torch.manual_seed(cfg.seed)
    model = model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    progress = runs.Progress(cfg.steps, every=max(1, cfg.steps // 5), prefix=prefix)
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = runs.cosine_lr(step, cfg.steps, cfg.lr, warmup=min(50, cfg.steps // 10), final_frac=0.01)
        idx = torch.randint(0, len(x), (cfg.batch_size,), generator=g)
        loss = F.cross_entropy(model(augment(x[idx], g).to(device)), y[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress(step, loss=loss.item())
    return model.eval()


# The judges of the built-in data sets, trained by this code as the quickstart trains them, ship in
# assets/judges/: every clone judges with the very same network. A cache file's name carries the
# digest of exactly the training data and config it was trained on; --fresh-judges trains anew.
SHIPPED_JUDGES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "judges")


def _digest(cfg, *parts) -> str:
    """The cache key: the config and the training data (tensors as bytes, other parts as text)."""
    h = hashlib.sha1(repr(sorted(dataclasses.asdict(cfg).items())).encode())
    for part in parts:
        h.update(part.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if torch.is_tensor(part)
                 else part.encode() if isinstance(part, str) else repr(part).encode())
    return h.hexdigest()[:12]


def _cached(path: str, kind: str, shipped: str | None, train, log=print):
    """The checkpoint cached at `path` (or shipped at `shipped`), else train() -> it, saved at `path`; a file
    of another version is trained again. -> (checkpoint, its file, whether cached)."""
    for found in [path] + ([shipped] if shipped else []):
        if os.path.exists(found):
            try:
                return runs.load_checkpoint(found, kind), found, True
            except runs.UserError as e:
                log(f"{kind}: not using the cached file: {e}")
    runs.ensure_writable_dir(os.path.dirname(path) or ".")
    t0 = time.time()
    ckpt = train() | {"kind": kind, "train_seconds": round(time.time() - t0, 1)}
    runs.save_atomic(ckpt, path)
    log(f"{kind}: trained in {ckpt['train_seconds']:.0f}s, test accuracy {ckpt['test_accuracy']:.2%} -> {path}")
    return ckpt, path, False


def _loaded(model: nn.Module, ckpt: dict, device) -> nn.Module:
    """A network with a checkpoint's weights, on `device`, in eval mode."""
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def _cache_name(record: dict | None) -> str:
    spec = record["spec"] if record else "run"
    name = os.path.basename(spec[len("folder:"):].rstrip("/")) if spec.startswith("folder:") else spec
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name) or "folder"


def judge_for(data: dict, record: dict, judge_dir: str, cfg: JudgeConfig | None = None, device="cpu",
              log=print, shipped: bool = True) -> tuple[Classifier | None, dict]:
    """The judge of a data set, trained once on its real training images (flipped, shifted) and cached by their
    content. -> (the judge, or None for unlabelled data; its summary)."""
    cfg = cfg or JudgeConfig()
    (x_train, y_train, num_classes, _), (x_test, y_test, *_) = data["train"], data["test"]
    if y_train is None:
        return None, {"note": "unlabelled data set: no classifier can be trained, so no judge"}
    file = f"{_cache_name(record)}-{x_train.shape[-1]}px-{_digest(cfg, tuple(x_train.shape), x_train, y_train.long())}.pt"

    def train() -> dict:
        log(f"judge: training a classifier on the {len(x_train)} real training images of {record['spec']}")
        augment = lambda x, g: blank_region(random_shift(ds.random_flip(ds.to_float(x), g), cfg.max_shift, g), cfg.blank)
        judge = fit(Classifier(cfg, num_classes), cfg, x_train, y_train, augment, device, "judge ")
        accuracy = (judge_images(judge, blank_region(ds.to_float(x_test), cfg.blank))[1] == y_test).float().mean()
        return {"config": dataclasses.asdict(cfg), "num_classes": num_classes, "dataset": record,
                "model": {k: v.cpu() for k, v in judge.state_dict().items()}, "test_accuracy": accuracy.item(),
                "test_images": len(x_test)}
    ckpt, path, cached = _cached(os.path.join(judge_dir, file), "judge",
                                 os.path.join(SHIPPED_JUDGES, file) if shipped else None, train, log)
    path = os.path.relpath(path) if path.startswith(SHIPPED_JUDGES) else path
    if cached:
        log(f"judge: loaded {path} (test accuracy {ckpt['test_accuracy']:.2%})")
    judge = _loaded(Classifier(JudgeConfig(**ckpt["config"]), ckpt["num_classes"]), ckpt, device)
    return judge, {"file": path, "cached": cached, "test_accuracy": round(ckpt["test_accuracy"], 4),
                   "test_images": ckpt["test_images"], "train_seconds": ckpt["train_seconds"], "steps": cfg.steps}


def classifier_for(run: str, judge_dir: str, cfg: CodeClassifierConfig | None = None, device="cpu",
                   log=print) -> tuple[Classifier, dict]:
    """The classifier of codes of a run, trained once on its training codes and labels (mirrored copies too) and
    cached beside the judges by them and the first stage's weights. -> (the classifier, its summary)."""
    cfg = cfg or CodeClassifierConfig()
    refuse(not os.path.exists(runs.tokens_path(run)), f"{run} carries no codes of its training images (a shipped "
           f"run), so no classifier of codes can be trained; choose by --scorer bayes, or train a run of your own")
    tokens = runs.load_tokens(run)
    refuse(tokens.get("train_labels") is None,
           f"{run}'s codes carry no labels, so no classifier can choose samples by their class")
    x, y, K, C = tokens["train"].long(), tokens["train_labels"].long(), int(tokens["num_codes"]), int(tokens["num_labels"])
    weights = runs.load_checkpoint(runs.vq_path(run), "vq")["model"]
    first_stage = [z for k in sorted(weights) for z in (k, (weights[k].dtype, tuple(weights[k].shape)), weights[k])]
    digest = _digest(cfg, *first_stage, (K, C, tuple(x.shape)), x, y)
    path = os.path.join(judge_dir, f"{_cache_name(runs.recorded_dataset(run))}-codes{x.shape[1]}x{x.shape[2]}"
                                   f"-classifier-{digest}.pt")

    def train() -> dict:
        log(f"classifier: training a classifier of codes on the {len(x)} training grids of {run}")
        classifier = fit(Classifier(cfg, C, K), cfg, x, y, lambda x, g: x, device, "classifier ")
        accuracy = (classify_codes(classifier, tokens["test"].long()).argmax(-1).cpu() == tokens["test_labels"])
        return {"config": dataclasses.asdict(cfg), "num_codes": K, "num_classes": C, "test_codes": len(tokens["test"]),
                "model": {k: v.cpu() for k, v in classifier.state_dict().items()},
                "test_accuracy": accuracy.float().mean().item()}
    ckpt, path, cached = _cached(path, "code_classifier", None, train, log)
    classifier = _loaded(Classifier(CodeClassifierConfig(**ckpt["config"]), ckpt["num_classes"], ckpt["num_codes"]),
                         ckpt, device)
    return classifier, {"file": path, "cached": cached, "reads": "codes x_1", "seed": cfg.seed,
                        "test_accuracy": round(ckpt["test_accuracy"], 4), "test_codes": ckpt["test_codes"],
                        "steps": cfg.steps}


# ----- Choosing among candidates: rejection (Table 2) and reranking (Fig. 3) -----------------
# The paper's class-conditional ImageNet figures (Table 2, left) come from rejection sampling with
# a classifier, its text samples (Fig. 3) are "best 2 of 32 with reranking as in DALL-E"; no code
# for either is public. A score is score(x1 (m, h, w), rows (m,)) -> (m,): higher follows the
# condition of the asked rows `rows` better.

def classifier_score(classifier: Classifier, targets: torch.Tensor):
    """log p(c | x_1) under the classifier of codes, c = targets[rows] (a label, or the class a prompt names)."""
    def score(x1, rows):
        log_p = classify_codes(classifier, x1)
        return log_p.gather(-1, targets.to(log_p.device)[rows.to(log_p.device), None])[:, 0].to(x1.device)
    return score


@torch.no_grad()
def bayes_score(chain: ib.ImageBART, x1, labels=None, text=None, *, generator=None) -> torch.Tensor:
    """How much the condition c explains x_1, from the chain alone, by Bayes' rule:
        log2 p(x_1 | c) - log2 p(x_1 | null) = log2 p(c | x_1) - log2 p(c)
    in bits per token, per sample (B,), each term replaced by its bound (nll): an estimate, not a
    bound. This code's scorer for reranking (Fig. 3 reranks "as in [56]", DALL-E, with CLIP). Both
    bounds use one generator state (common random numbers), so their noise largely cancels."""
    if labels is None and text is None:
        raise ValueError("the Bayes score compares a condition with the null one: give labels or text")
    generator = generator or torch.Generator(x1.device).manual_seed(0)
    state = generator.get_state()
    given = chain.nll(x1, labels, text, generator=generator)      # -log2 p(x_1 | c), bounded
    generator.set_state(state)                                     # the same draws again
    return chain.nll(x1, generator=generator) - given              # -log2 p(x_1 | null) - ...


def bayes_scorer(chain: ib.ImageBART, cond: dict, generator=None):
    """bayes_score of each candidate under its asked row's condition cond ({"labels": (n,)} or {"text": ...})."""
    return lambda x1, rows: bayes_score(chain, x1, **{k: v[rows] for k, v in cond.items()}, generator=generator)


@dataclass
class BestOf:
    codes: torch.Tensor              # (n, h, w): the kept samples x_1, in the asked order
    candidates: torch.Tensor         # (M, h, w): every candidate drawn, the asked rows' own first
    drawn_for: torch.Tensor          # (M,): the asked row whose condition each candidate was drawn under
    kept: torch.Tensor               # (n,): which candidate each kept sample is
    sample_seconds: float
    score_seconds: float


@torch.no_grad()
def sample_best_of(chain: ib.ImageBART, n: int, score, labels=None, text=None, *, accept: float | None = None,
                   rerank: int | None = None, groups: torch.Tensor | None = None, generator=None, batch: int = 256,
                   what: str | None = None, log=print, **sampling) -> BestOf:
    """n samples, each chosen by `score`: accept = R in (0, 1] is rejection (Table 2), rerank = K best of K (Fig. 3's
    "best 2 of 32": n = 2, K = 32). Each group of n_g asked rows (one per condition, or `groups` (n,)) draws
    ceil(n_g / R) (or K) candidates and keeps its n_g best (ties: the earlier), in drawing order. The asked rows
    are drawn first, `batch` at a time: at R = 1 the samples are chain.sample's. Table 2 says "rejection rate",
    but its values (1.0 ... 0.05) behave as the fraction kept (FID falls with them), so that is what R is here."""
    if (accept is None) == (rerank is None):
        raise ValueError("give accept (rejection sampling) or rerank (best of K), one of them")
    if accept is not None and not 0 < accept <= 1:                    # nan is refused too
        raise ValueError(f"accept must lie in (0, 1], got {accept}")
    if labels is None and text is None:
        raise ValueError("rejection and reranking choose by a condition: give labels or text")
    device = chain.device
    key, asked = ("labels", torch.as_tensor(labels, device=device).long().expand(n)) if labels is not None else \
        ("text", (text if isinstance(text, torch.Tensor) else chain.tokenizer.encode(list(text))).to(device).long())
    if len(asked) != n:
        raise ValueError(f"{len(asked)} conditions for {n} samples")
    groups = torch.unique(asked, dim=0, return_inverse=True)[1] if groups is None else groups.to(device)
    sizes = torch.bincount(groups).tolist()                            # n_g of each group
    if rerank is not None and rerank < max(sizes):
        raise ValueError(f"rerank {rerank} keeps the best n_g of K = {rerank} candidates; a group asks for {max(sizes)}")
    draws = [math.ceil(s / accept - 1e-9) if accept else rerank for s in sizes]   # 1e-9: 100 / 0.05 is 2000
    first = {g: i for i, g in reversed(list(enumerate(groups.tolist())))}        # each group's first asked row
    source = torch.tensor(list(range(n)) + [first[g] for g, (s, d) in enumerate(zip(sizes, draws)) for _ in range(d - s)],
                          dtype=torch.long, device=device)             # (M,) the asked row each candidate is for
    candidates, scores, seconds = [], [], [0.0, 0.0]
    for sl in runs.batches(len(source), batch, what, log):
        t0 = time.perf_counter()
        x1 = chain.sample(len(source[sl]), **{key: asked[source[sl]]}, generator=generator, **sampling)
        t1 = time.perf_counter()
        scores.append(score(x1, source[sl]).float())
        seconds[0], seconds[1] = seconds[0] + t1 - t0, seconds[1] + time.perf_counter() - t1
        candidates.append(x1)
    candidates, scores, kept = torch.cat(candidates), torch.cat(scores), torch.empty(n, dtype=torch.long, device=device)
    for g, s in enumerate(sizes):                                      # each group's n_g best, in its asked places
        members = (groups[source] == g).nonzero()[:, 0]
        best = members[scores[members].sort(descending=True, stable=True).indices[:s]]
        kept[(groups == g).nonzero()[:, 0]] = best.sort().values
    return BestOf(candidates[kept], candidates, source, kept, *seconds)


def complete(chain: ib.ImageBART, x1, keep, particles: int | None = None, context: str = "clean", **options):
    """Masked editing by the paper's process (ImageBART.inpaint), or by this code's particles or
    noised context (imagebart.inpaint_particles, with one particle for the context alone)."""
    if particles or context != "clean":
        return ib.inpaint_particles(chain, x1, keep, particles=particles or 1, context=context, **options)
    return chain.inpaint(x1, keep, **options)


# ----- The figures ----------------------------------------------------------------------

INPAINT_PARTICLES = 10                    # particles per image of the completion rows by particles
DEFAULT_EVAL_GUIDANCE = 0.5               # w of the guided samples row: on the tiny shapes run w = 0.5 judged best


def _saved(x: torch.Tensor) -> torch.Tensor:
    """Generated images in [-1, 1], rounded to 8 bits as a PNG keeps them, on the CPU."""
    return ds.to_float(ds.to_uint8(x)).cpu()


def _decoded(vq: ib.VQGAN, codes: torch.Tensor, batch: int = 250) -> torch.Tensor:
    return torch.cat([_saved(ib.decode_canvas(vq, codes[sl].to(vq.code_map.device))) for sl in runs.batches(len(codes), batch)])


def _encoded(vq: ib.VQGAN, images: torch.Tensor, device, batch: int = 250) -> torch.Tensor:
    """uint8 images (N, 3, H, W) -> their codes x_1 = E(x_0) (N, h, w), `batch` at a time."""
    return torch.cat([vq.encode(ds.to_float(images[sl].to(device))) for sl in runs.batches(len(images), batch)])


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """How often a == b, to 4 digits: an accuracy."""
    return round((a == b.to(a.device)).float().mean().item(), 4)


def judging(judge: Classifier, reference_images: torch.Tensor):
    """-> judged(images, labels or None) -> {"accuracy", "fd"}: how often the judge sees `labels` in
    `images`, and the FD of their features against the reference images'."""
    reference = feature_stats(judge_images(judge, reference_images)[0])

    def judged(images, labels=None) -> dict:
        features, predicted = judge_images(judge, images)
        row = {"fd": round(frechet_distance(*feature_stats(features), *reference), 3)}
        return row if labels is None else {"accuracy": _agreement(predicted, labels)} | row
    return judged


def draw_plain(chain: ib.ImageBART, m: int, cond: dict, targets, guidance: float, generator, what: str, batch: int,
               log=print) -> tuple[torch.Tensor, dict]:
    """How the sample rows are drawn: chain.sample, `batch` at a time. -> (codes (m, h, w), {})."""
    return torch.cat([chain.sample(sl.stop - sl.start, **{k: v[sl] for k, v in cond.items()}, guidance=guidance,
                                   generator=generator) for sl in runs.batches(m, batch, what, log)]), {}


def sample_rows(vq, chain, data: dict, judged, n: int, guidance: float, batch: int, seed: int, log, draw=draw_plain) -> dict:
    """The sample rows at w = 0 and at `guidance`, each drawn by `draw` with a generator seeded by `seed`. A class
    chain: samples_guidance_0 and samples_guided, labels cycled, accuracy against the label drawn for; an
    unconditional one: samples_unconditional, FD only. A text chain on shapes: prompts "a <colour> <shape>" cycled
    (prompts_*; heldout_* for the --holdout combinations, 100 each, at most n) with colour_accuracy (the dominant
    colour, data.dominant_colours); on other captioned data the test captions, against their images' labels."""
    sets = []        # (row prefix, the condition of each sample, the class each should show, its colour)
    captions = data["test"][3]
    if chain.tokenizer is None:
        labels = torch.arange(n) % chain.num_labels if chain.num_labels else None
        sets.append(("samples", {"labels": labels} if labels is not None else {}, labels, None))
    elif captions is not None and ds.shape_caption_parts(captions[0]) is not None:
        held = set(chain.cfg.holdout)
        combos = [(ds.PALETTE_NAMES[c], k, c) for k in range(len(ds.SHAPE_CLASSES)) for c in ds.SHAPE_FOREGROUNDS]
        for key, m in (("prompts", n), ("heldout", min(n, 100 * len(held)))):
            chosen = [x for x in combos if (f"{x[0]} {ds.SHAPE_CLASSES[x[1]]}" in held) == (key == "heldout")]
            if chosen:
                chosen = [chosen[i % len(chosen)] for i in range(m)]
                text = chain.tokenizer.encode([f"a {colour} {ds.SHAPE_CLASSES[k]}" for colour, k, _ in chosen])
                sets.append((key, {"text": text}, torch.tensor([k for _, k, _ in chosen]),
                             torch.tensor([c for *_, c in chosen])))
    else:
        sets.append(("prompts", {"text": chain.tokenizer.encode(captions[:n])}, data["test"][1][:n], None))
    result = {}
    for key, cond, targets, colours in sets:
        for w in [0.0] + ([guidance] if guidance and cond else []):
            row = f"{key}_guidance_0" if w == 0 and cond else f"{key}_guided" if cond else "samples_unconditional"
            g = torch.Generator(chain.device).manual_seed(seed)
            m = len(targets) if targets is not None else n
            codes, info = draw(chain, m, {k: v.to(chain.device) for k, v in cond.items()}, targets, w, g,
                               "eval " + row.replace("_", " ") + (f" (w = {w:g})" if w else ""), batch, log)
            images = _decoded(vq, codes, batch)
            result[row] = ({"guidance": w} if cond else {}) | judged(images, targets) | info
            if colours is not None:
                result[row] |= {"colour_accuracy": _agreement(ds.dominant_colours(ds.to_uint8(images)), colours),
                                "prompts": len(set(zip(colours.tolist(), targets.tolist())))}
    return result


@torch.no_grad()
def evaluate_run(vq: ib.VQGAN, chain: ib.ImageBART, data: dict, judge: Classifier | None = None, n: int = 1000,
                 guidance: float = DEFAULT_EVAL_GUIDANCE, batch: int = 250, seed: int = 0, log=print,
                 lower_half_judge: Classifier | None = None, refine: int = ib.INPAINT_REFINE,
                 particles: int = INPAINT_PARTICLES, context: str = "clean") -> dict:
    """The judge's figures for a trained run, every row on n images (at most half the test split).
    The real test split is cut in two: A = test[:n] and B = test[n:2n], the FD reference of every row.
      real_test                 A: the judge's accuracy (every row's ceiling), FD(A, B) (the floor)
      real_lower_halves         A with the upper half grey, judged by a judge trained on such images:
                                how much of the class the lower half alone tells
      reconstructions           G(E(A)): PSNR against A (dB, 8-bit rounded), accuracy, FD
      completions_upper         A's codes, the upper half regenerated by the paper's masked process
                                (ImageBART.inpaint, `refine` rounds), no label: accuracy against A's, FD
      completions_random_boxes  the same with three random boxes per image (mask seed = image index)
      completions_*_particles   the same two by this code's particles (`particles` per image, no rounds)
      samples_* / prompts_*     sample_rows
    Generated images are rounded to 8 bits; every row has a generator of its own, seeded by `seed`.
    Without a judge (unlabelled data) only the reconstructions' PSNR is computed."""
    device = chain.device
    x_test, y_test, *_ = data["test"]
    refuse(len(x_test) < ds.MIN_TEST_IMAGES, f"the test split has {len(x_test)} image(s); {ds.TOO_FEW_TEST_IMAGES}")
    if n > len(x_test) // 2:
        log(f"judging N = {len(x_test) // 2} images per row, not {n}: the test split holds {len(x_test)}, "
            f"and each row's images and the reference are disjoint halves of it")
        n = len(x_test) // 2
    real_a, y_a = x_test[:n], y_test[:n] if y_test is not None else None
    x1_a = _encoded(vq, real_a, device, batch)                                   # x_1 = E(A)
    recon = _decoded(vq, x1_a, batch)
    psnr = {"psnr": round(ds.psnr(ds.to_float(real_a), recon).mean().item(), 2)}
    if judge is None:
        return {"n": n, "reconstructions": psnr, "note": "unlabelled data set: no judge, so only the reconstructions' PSNR"}
    refuse(chain.num_labels and chain.num_labels != judge.head.out_features, f"the chain knows {chain.num_labels} "
           f"classes, the data set judged on has {judge.head.out_features}: is it the data set the run was trained on?")
    judged = judging(judge, x_test[n:2 * n])
    result = {"n": n, "reference": f"judge features of real test images {n}..{2 * n - 1}, disjoint from the {n} judged",
              "real_test": judged(real_a, y_a)}
    if lower_half_judge is not None:
        predicted = judge_images(lower_half_judge, blank_region(ds.to_float(real_a), "upper"))[1]
        result["real_lower_halves"] = {"accuracy": _agreement(predicted, y_a)}
    result["reconstructions"] = psnr | judged(recon, y_a)
    # --- completions (Sec. 4.3), unconditional: the label is what the judge must recover
    procedures = {"masked_process": dict(refine=refine, context=context)}
    if particles:
        procedures["particles"] = dict(particles=particles, refine=0, context=context)
    result["inpaint"] = procedures
    H, W = real_a.shape[-2:]
    for kind in ("upper", "random-boxes"):
        keep = ~torch.stack([token_mask(pixel_mask(kind, H, W, seed=i), vq.cfg.factor) for i in range(n)]).to(device)
        for name, options in procedures.items():
            g, M = torch.Generator(device).manual_seed(seed), options.get("particles", 1)
            what = f"eval completions ({kind}{', particles' if M > 1 else ''})"
            images = torch.cat([_decoded(vq, complete(chain, x1_a[sl], keep[sl], generator=g, **options), batch)
                                for sl in runs.batches(n, max(1, batch // M), what, log)])
            result[f"completions_{kind.replace('-', '_')}" + ("_particles" if name == "particles" else "")] = judged(images, y_a)
    return result | sample_rows(vq, chain, data, judged, n, guidance, batch, seed, log)


@torch.no_grad()
def evaluate_canvas(vq: ib.VQGAN, chain: ib.ImageBART, data: dict, judge: Classifier, canvas: tuple[int, int], n: int = 500,
                    stride: int = 1, batch: int = 16, seed: int = 0, log=print, real_wide=None) -> dict:
    """What patch-wise sampling buys (Sec. 4.2): n class-conditional panoramas of `canvas` codes (one training
    image tall, wider) through sliding windows, against independent training-size samples tiled side by side,
    with seams. Both are cut into training-size crops at every column offset o (in codes), each offset judged: FD
    against n real test images, and how often the judge sees the panorama's class; summaries where the tiles are
    whole and half-way between, across a seam. `real_wide` (uint8 images of the canvas, labels; scenes) adds real
    wide images, the floor, and how often a canvas's two ends have the same sky. Outpainting: a test image on a
    canvas two images wide, the other half drawn with 10 particles to its right (extend_right) or its left
    (extend_left, written before a left-to-right decoder reads the image), judged on the drawn square."""
    device = chain.device
    (h, w), (H, W), f = chain.cfg.grid, canvas, vq.cfg.factor
    refuse(H != h or W <= w, f"the seams are measured on canvases one training image tall and wider ({h} codes high)")
    x_test, y_test = data["test"][0], data["test"][1]
    n = min(n, len(x_test))
    reference = feature_stats(judge_images(judge, x_test[:n])[0])
    fd = lambda images: round(frechet_distance(*feature_stats(judge_images(judge, images)[0]), *reference), 3)
    labels, tiles = torch.arange(n) % chain.num_labels, math.ceil(W / w)
    g = torch.Generator(device).manual_seed(seed)
    window = torch.cat([ib.sample_canvas(chain, sl.stop - sl.start, labels[sl].to(device), size=canvas, stride=stride,
                                         generator=g).cpu() for sl in runs.batches(n, batch, f"panoramas {H}x{W} codes", log)])
    g = torch.Generator(device).manual_seed(seed)
    tiled = torch.cat([rearrange(chain.sample((sl.stop - sl.start) * tiles, labels[sl].repeat_interleave(tiles).to(device),
                                              generator=g), "(m k) h w -> m h (k w)", k=tiles)[..., :W].cpu()
                       for sl in runs.batches(n, 256, "tiled baseline", log)])
    result = {"n": n, "canvas_codes": [H, W], "stride": stride, "offsets": list(range(W - w + 1))}
    x1_test = _encoded(vq, x_test[:n], device, 256)
    for name, at in (("extend_right", 0), ("extend_left", w)):
        x1 = torch.zeros(n, h, 2 * w, dtype=torch.long, device=device)
        keep = torch.zeros_like(x1, dtype=torch.bool)
        x1[:, :, at:at + w], keep[:, :, at:at + w] = x1_test, True
        g = torch.Generator(device).manual_seed(seed)
        drawn = torch.cat([_saved(vq.decode(ib.inpaint_particles(
            chain, x1[sl], keep[sl], particles=INPAINT_PARTICLES, refine=0, generator=g,
            reader=ib.windows(chain, (h, 2 * w), stride))[:, :, w - at:2 * w - at]))
            for sl in runs.batches(n, max(1, batch // INPAINT_PARTICLES), f"outpainting ({name})", log)])
        same = lambda of: _agreement(of(ds.to_uint8(drawn)), of(x_test[:n]))
        result[name] = {"fd": fd(drawn), "same_class": _agreement(judge_images(judge, drawn)[1], y_test[:n]),
                        "same_colour": same(ds.dominant_colours)} | ({"same_sky": same(ds.scene_skies)} if real_wide else {})
    rows = {"window": (_decoded(vq, window, 64), labels), "tiled": (_decoded(vq, tiled, 64), labels)}
    if real_wide is not None:
        rows["real"] = (real_wide[0][:n], real_wide[1][:n])
    mean = lambda v, ks: round(sum(v[k] for k in ks) / len(ks), 3)
    whole = [k for k, o in enumerate(result["offsets"]) if o % w == 0]
    seams = [k for k, o in enumerate(result["offsets"]) if o % w == w // 2]
    for name, (images, truth) in rows.items():
        crops = [images[..., o * f:(o + w) * f] for o in result["offsets"]]
        row = {"fd": [fd(c) for c in crops], "accuracy": [_agreement(judge_images(judge, c)[1], truth) for c in crops]}
        if real_wide is not None:    # scenes: is the sky at the canvas's right end the one at its left?
            ends = [x if x.dtype == torch.uint8 else ds.to_uint8(x) for x in (images[..., :w * f], images[..., -w * f:])]
            row["same_sky_at_both_ends"] = _agreement(ds.scene_skies(ends[0]), ds.scene_skies(ends[1]))
        result[name] = row | {"fd_whole_tiles": mean(row["fd"], whole), "fd_across_seams": mean(row["fd"], seams),
                              "accuracy_whole_tiles": mean(row["accuracy"], whole),
                              "accuracy_across_seams": mean(row["accuracy"], seams),
                              "fd_mean": mean(row["fd"], range(len(crops))),
                              "accuracy_mean": mean(row["accuracy"], range(len(crops)))}
    return result


@torch.no_grad()
def evaluate_selection(vq: ib.VQGAN, chain: ib.ImageBART, data: dict, judge: Classifier, n: int = 1000,
                       guidance: float = DEFAULT_EVAL_GUIDANCE, *, accept=None, rerank=None, scorer: str = "classifier",
                       classifier=None, classifier_info=None, batch: int = 250, seed: int = 0, log=print) -> dict:
    """evaluate_run's sample rows, each sample chosen by sample_best_of: accept = R, rejection per condition by the
    classifier of codes (Table 2); rerank = K, each sample the best of its own K by `scorer`, "classifier" (the
    class) or "bayes" (bayes_score: the whole condition). evaluate_run's seeds and batches, so R = 1 and
    K = 1 give its rows exactly. Also real_test, and the classifier's accuracy on A's codes and agreement with the judge."""
    if (scorer == "classifier" or accept is not None) and classifier is None:
        raise ValueError("rejection and --scorer classifier need the code classifier")
    x_test, y_test, *_ = data["test"]
    n = min(n, len(x_test) // 2)
    judged = judging(judge, x_test[n:2 * n])
    result = {"n": n, "selection": {"accept": accept} if accept is not None else {"rerank": rerank, "scorer": scorer},
              "reference": f"judge features of real test images {n}..{2 * n - 1}", "real_test": judged(x_test[:n], y_test[:n])}
    if classifier is not None:       # the two networks on the same real images: pixels, and their codes
        by_classifier = classify_codes(classifier, _encoded(vq, x_test[:n], chain.device, batch)).argmax(-1).cpu()
        agrees = _agreement(by_classifier, judge_images(judge, x_test[:n])[1])
        result["classifier"] = (classifier_info or {}) | {"real_test_accuracy": _agreement(by_classifier, y_test[:n]),
                                                          "agrees_with_judge": agrees}

    def draw(chain, m, cond, targets, w, g, what, batch, log):
        """draw_plain's contract, each sample chosen: rejection per condition, reranking per sample."""
        score = bayes_scorer(chain, cond, torch.Generator(chain.device).manual_seed(seed)) \
            if accept is None and scorer == "bayes" else classifier_score(classifier, targets)
        best = sample_best_of(chain, m, score, **cond, accept=accept, rerank=rerank, generator=g, batch=batch,
                              groups=torch.arange(m) if rerank is not None else None, what=what, log=log, guidance=w)
        return best.codes, {"candidates": len(best.candidates), "sample_seconds": round(best.sample_seconds, 1),
                            "score_seconds": round(best.score_seconds, 2)}
    return result | sample_rows(vq, chain, data, judged, n, guidance, batch, seed, log, draw)


def evaluate_folder(run: str, dataset: str | None = None, data_root: str = "data",
                    judge_dir: str = os.path.join("runs", "judges"), n: int = 1000,
                    guidance: float = DEFAULT_EVAL_GUIDANCE, judge_steps: int | None = None, seed: int = 0,
                    device="cpu", log=print, inpaint: dict | None = None, out: str | None = None,
                    shipped_judges: bool = True, canvas=None, stride: int = 1, accept=None, rerank=None,
                    scorer: str = "classifier", classifier_steps: int | None = None) -> dict:
    """Evaluate a run folder on its data set (as recorded, or `dataset`) with its judges (cached in judge_dir):
    evaluate_run -> the figures, also written to `out` (default <run>/eval.json). With `canvas` (codes)
    evaluate_canvas (eval_canvas_<H>x<W>.json, pixels); with accept or rerank evaluate_selection
    (eval_accept_<R>.json, eval_rerank_<K>_<scorer>.json). `inpaint`: the completions' refine, particles, context."""
    vq, chain = runs.load_run(run, device)
    selecting = accept is not None or rerank is not None
    refuse(selecting and chain.num_labels is None and chain.tokenizer is None, "this run's chain is unconditional: "
           "--accept and --rerank choose samples by how well they show their class or prompt, so they need a conditional run")
    record = ds.dataset_record(dataset, vq.cfg.resolution, data_root, vq.cfg.train_size, vq.cfg.test_size) \
        if dataset else runs.recorded_dataset(run)
    refuse(record is None, f"{run} does not record which data set it was trained on; name it with --dataset")
    refuse(record["resolution"] != vq.cfg.resolution,
           f"the data set is recorded at {record['resolution']}px, the first stage takes {vq.cfg.resolution}px")
    with runs.user_errors():
        data = ds.load_recorded_dataset(record)
    if os.path.exists(runs.tokens_path(run)):   # a spot check that these are the images the run was tokenized from
        codes = runs.load_tokens(run)["test"][:64].long()
        agree = (vq.encode(ds.to_float(data["test"][0][:len(codes)].to(device))).cpu() == codes[:len(data["test"][0])])
        if agree.float().mean() < 0.9:
            log(f"warning: only {agree.float().mean():.0%} of the first test images' codes match {runs.tokens_path(run)}: "
                f"{record['spec']} may not be the data set this run was trained on")
    cfg = JudgeConfig() if judge_steps is None else dataclasses.replace(JudgeConfig(), steps=judge_steps)
    judge, judge_info = judge_for(data, record, judge_dir, cfg, device, log, shipped_judges)
    refuse((canvas is not None or selecting) and judge is None,
           "this data set has no labels, so no judge to tell whether the samples show their class")
    t0, f = time.time(), vq.cfg.factor
    if canvas is not None:
        refuse(not chain.num_labels, "the seams are judged on class-conditional panoramas: this run needs labels")
        wide = ds.make_wide_scenes(n, seed=2, resolution=canvas[0] * f, width=canvas[1] * f)[:2] \
            if record["spec"] == "scenes" else None       # real wide scenes: neither split's seed
        figures = evaluate_canvas(vq, chain, data, judge, canvas, n, stride, seed=seed, log=log, real_wide=wide)
        default = f"eval_canvas_{canvas[0] * f}x{canvas[1] * f}.json"
    elif selecting:
        classifier, info = None, None
        if accept is not None or scorer == "classifier":
            ccfg = dataclasses.replace(CodeClassifierConfig(), **({"steps": classifier_steps} if classifier_steps else {}))
            classifier, info = classifier_for(run, judge_dir, ccfg, device, log)
        figures = evaluate_selection(vq, chain, data, judge, n, guidance, accept=accept, rerank=rerank, scorer=scorer,
                                     classifier=classifier, classifier_info=info, seed=seed, log=log)
        default = f"eval_accept_{accept:g}.json" if accept is not None else f"eval_rerank_{rerank}_{scorer}.json"
    else:
        lower = judge_for(data, record, judge_dir, dataclasses.replace(cfg, blank="upper"), device, log,
                          shipped_judges)[0] if judge is not None else None
        t0 = time.time()                                   # the judges' own training not included
        figures = evaluate_run(vq, chain, data, judge, n, guidance, seed=seed, log=log, lower_half_judge=lower,
                               **(inpaint or {}))
        default = "eval.json"
    result = {"run": run, "dataset": record["spec"], "judge": judge_info, **figures,
              "note": "accuracy and Frechet distance in the judge's features: they compare runs on one data set; not FID",
              "eval_seconds": round(time.time() - t0, 1)}
    path = out or os.path.join(run, default)
    runs.save_json(result, path)
    log(f"wrote {path}")
    return result


def check_judge_options(eval_n: int, judge_steps: int | None, zero_skips: bool = False) -> None:
    """--eval-n (images per row; 0 = no evaluation where zero_skips) and --judge-steps."""
    if not (zero_skips and eval_n == 0):
        runs.check_number(eval_n, "--eval-n" + (" (0 skips the evaluation)" if zero_skips else ""), 2, whole=True)
    if judge_steps is not None:
        runs.check_number(judge_steps, "--judge-steps", 1, whole=True)


def check_selection(accept, rerank, scorer, classifier_steps) -> None:
    """--accept, --rerank, --scorer and --classifier-steps, before any work (sample.py's too)."""
    refuse(scorer is not None and rerank is None,
           "--scorer picks --rerank's score; --accept always scores with the classifier of codes")
    if classifier_steps is not None:
        runs.check_number(classifier_steps, "--classifier-steps", 1, whole=True)
    refuse(accept is not None and rerank is not None,
           "give --accept or --rerank, not both: each keeps the best candidates, by a rate or a count")
    if accept is not None and not 0 < accept <= 1:       # nan fails this too
        raise runs.UserError(f"--accept must lie in (0, 1], got {accept:g}")
    refuse(rerank is not None and rerank < 1, f"--rerank must be >= 1, got {rerank}")


def add_selection_args(p: argparse.ArgumentParser) -> None:
    choose = p.add_argument_group("samples chosen among candidates: rejection (Table 2) and reranking (Fig. 3), by "
                                  "a classifier of codes (not the judge) or the chain's own Bayes score")
    choose.add_argument("--accept", type=float, default=None, metavar="R",
                        help="rejection: per class or prompt draw ceil(n / R) candidates, keep the n the classifier "
                             "finds most likely to show it; R in (0, 1]")
    choose.add_argument("--rerank", type=int, default=None, metavar="K", help="best of K candidates")
    choose.add_argument("--scorer", choices=("bayes", "classifier"), default=None,
                        help="--rerank's score: bayes (default) = log p(x|c) - log p(x|null) from the chain's bound; "
                             "classifier = log p(class|x) of the classifier of codes")
    choose.add_argument("--classifier-steps", type=int, default=None,
                        help=f"training steps of a new classifier of codes (default {CodeClassifierConfig.steps})")
    choose.add_argument("--judge-dir", default="runs/judges", help="the cache of judges and classifiers of codes")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a trained run with a classifier trained on its data set "
                                            "(accuracy and Frechet distance in its features, not FID)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--run", help="a run folder; default runs/shapes once trained, else the shipped run")
    add("--out", help="the figures, JSON (default <run>/eval.json; with --size, --accept or --rerank a file of its "
                      "own beside it)")
    add("--eval-n", type=int, default=1000, help="images per row (at most half the test split)")
    add("--guidance", type=float, default=DEFAULT_EVAL_GUIDANCE, help="w of the guided samples row; 0 = none")
    add("--refine", type=int, default=ib.INPAINT_REFINE,
        help="completions by the paper's masked process (Sec. 4.3): forward-backward rounds per scale")
    add("--particles", type=int, default=INPAINT_PARTICLES,
        help="completions by this code's particles: particles per image; 0 = no such rows")
    add("--context", choices=("clean", "noised"), default="clean",
        help="completions: given tokens clean at every scale (Sec. 4.3), or noised like x_t")
    add("--seed", type=int, default=0, help="every row's generator")
    add("--size", metavar="HxW",
        help="instead: the seams of patch-wise sampling (Sec. 4.2) on canvases of H x W pixels, one image tall")
    add("--stride", type=int, default=1, help="--size: columns the window moves at a time")
    add_selection_args(p)
    add("--dataset", help="shapes | scenes | cifar | folder:PATH, instead of the recorded one")
    add("--data-root", default="data", help="where CIFAR-10 is, with --dataset cifar")
    add("--fresh-judges", action="store_true", help="train the judges even where assets/judges ships them")
    add("--judge-steps", type=int, help=f"training steps of a new judge (default {JudgeConfig.steps})")
    add("--device")
    return p


def main():
    args = build_parser().parse_args()
    # --- every option checked before any work
    check_judge_options(args.eval_n, args.judge_steps)
    runs.check_number(args.guidance, "--guidance", 0)
    runs.check_number(args.seed, "--seed", 0, runs.SEED_MAX, whole=True)
    runs.check_number(args.refine, "--refine", 0, whole=True)
    runs.check_number(args.particles, "--particles", 0, whole=True)
    check_selection(args.accept, args.rerank, args.scorer, args.classifier_steps)
    refuse(args.stride != 1 and not args.size, "--stride moves the windows of a --size canvas; give --size")
    selecting = args.accept is not None or args.rerank is not None
    refuse(args.size and selecting, "--accept and --rerank choose among samples of the training size; --size judges "
                                    "panoramas: give one of them")
    args.run, home = runs.choose_run(args.run)
    if args.out is None and home != args.run:           # a shipped run: its figures go to the working folder
        args.out = os.path.join(home, "eval.json")
    own = os.path.realpath(args.out or runs.eval_path(args.run)) == os.path.realpath(runs.eval_path(args.run))
    if args.out is not None:              # never another of a run's own files; JSON; a writable folder
        if not own or home != args.run:
            runs.refuse_run_file("--out", args.out, args.run)
        refuse(not args.out.lower().endswith(".json"),
               f"--out {args.out}: the judge's figures are JSON; give a name ending in .json")
        runs.ensure_writable_dir(os.path.dirname(os.path.abspath(args.out)))
    device = runs.pick_device(args.device)
    size = runs.parse_size(args.size, args.stride, runs.vqgan_from_checkpoint(
        runs.load_checkpoint(runs.vq_path(args.run), "vq")).cfg) if args.size else None
    if own and size is None and not selecting:
        runs.lock_run(args.run)           # the run's own eval.json: not while another process writes the run
    result = evaluate_folder(args.run, dataset=args.dataset, data_root=args.data_root, judge_dir=args.judge_dir,
                             n=args.eval_n, guidance=args.guidance, judge_steps=args.judge_steps, seed=args.seed,
                             device=device, out=args.out, shipped_judges=not args.fresh_judges,
                             inpaint=dict(refine=args.refine, context=args.context, particles=args.particles),
                             canvas=size, stride=args.stride, accept=args.accept, rerank=args.rerank,
                             scorer="classifier" if args.accept is not None else args.scorer or "bayes",
                             classifier_steps=args.classifier_steps)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    runs.run_main(main)
