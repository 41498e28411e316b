"""The judge of samples (evaluation only, not the paper), the classifier of codes that rejection and reranking
choose with (Table 2, Fig. 3), and every row of a run's evaluation (`python evaluate.py --run runs/shapes`).
The paper's FID needs Inception weights (not available offline) and says little on 32x32 toys: instead each
labelled data set gets its own judge, a small CNN trained on its real training images. For N images, accuracy:
how often the judge sees the class they should show (a sample's label; a test image's true label where its masked
part was regenerated); FD: the Frechet distance between Gaussians fitted to the judge's penultimate features of them
and of N real held-out images, FID's formula on another network, NOT FID. Both compare runs on one data set, never
with papers (for FID: `sample.py --out-dir` PNGs and an FID tool)."""
from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
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
    """(H, W) bool, True = regenerate: one of MASK_KINDS (`seed` places the random boxes), or a PNG (white)."""
    m = torch.zeros(H, W, dtype=torch.bool)
    regions = {"upper": (slice(0, H // 2), slice(None)), "lower": (slice(H // 2, None), slice(None)),
               "left": (slice(None), slice(0, W // 2)), "right": (slice(None), slice(W // 2, None)),
               "center": (slice(H // 4, H - H // 4), slice(W // 4, W - W // 4))}
    if kind in regions or kind == "outer":
        m[regions.get(kind, regions["center"])] = True
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


# ----- The Frechet distance between N(mu1, C1) and N(mu2, C2) (Dowson & Landau 1982; FID's formula), written out:
#     FD = ||mu1 - mu2||^2 + tr(C1) + tr(C2) - 2 tr((C1^1/2 C2 C1^1/2)^1/2), both roots by eigh (symmetric PSD)
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
    return features.mean(0), np.cov(features, rowvar=False)


# ----- The judge, and the classifier of codes -------------------------------------------------
@dataclasses.dataclass
class JudgeConfig:
    channels: list = dataclasses.field(default_factory=lambda: [16, 32, 64, 128])  # a conv per stage, stride 2 from 2
    steps: int = 1000                     # shapes: 100 % of its 2 000 test images after 14 s on 2 cores
    batch_size: int = 64
    lr: float = 2e-3
    max_shift: int = 2                    # augmentation: random translation by up to this many pixels
    seed: int = 0
    blank: str = ""                       # a mask kind ("upper"): that region grey in every image the judge sees


@dataclasses.dataclass
class CodeClassifierConfig:
    n_embd: int = 64                      # each code's learned embedding: the input channels
    channels: list = dataclasses.field(default_factory=lambda: [64, 128])
    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 1                         # the judge's is 0: other initial weights, other batches


class Classifier(nn.Module):
    """The judge: x_0 (B, 3, H, W) in [-1, 1] -> class logits (B, classes); per stage a 3x3 conv, BatchNorm, ReLU
    (stride 2 from stage 2), the mean over positions (the features (B, C) that FD compares), a linear layer. With
    num_codes the classifier of codes x_1 (B, h, w), embedded, that rejection and reranking choose with: not the
    judge (chosen and judged by one network proves nothing), it reads codes, in two stages, from another seed."""

    def __init__(self, cfg, num_classes: int, num_codes: int = 0):
        super().__init__()
        self.embed = nn.Embedding(num_codes, cfg.n_embd) if num_codes else None
        c = [cfg.n_embd if num_codes else 3, *cfg.channels]              # each stage's input and output channels
        self.net = nn.Sequential(*[layer for i in range(len(cfg.channels)) for layer in (
            nn.Conv2d(c[i], c[i + 1], 3, stride=1 if i == 0 else 2, padding=1, bias=False),  # BN adds the bias
            nn.BatchNorm2d(c[i + 1]), nn.ReLU())])
        self.head = nn.Linear(c[-1], num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x.long()).permute(0, 3, 1, 2)                  # (B, h, w, n_embd) -> (B, n_embd, h, w)
        return self.net(x).mean(dim=(2, 3))                                # (B, C, h, w) -> (B, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def random_shift(x: torch.Tensor, max_shift: int, generator=None) -> torch.Tensor:
    """x (B, 3, H, W), each image translated by whole pixels in [-max_shift, max_shift] per axis; edges fill in."""
    m, (B, _, H, W) = max_shift, x.shape
    shift = torch.randint(-m, m + 1, (B, 2), generator=generator).tolist()            # (dx, dy) per image
    padded = F.pad(x, (m, m, m, m), mode="replicate")
    return torch.stack([p[:, m + dy:m + dy + H, m + dx:m + dx + W] for p, (dx, dy) in zip(padded, shift)])


@torch.no_grad()
def judge_images(judge: Classifier, images: torch.Tensor, batch: int = 500) -> tuple[np.ndarray, torch.Tensor]:
    """images (N, 3, H, W), uint8 or in [-1, 1] -> (features (N, D) float64, predicted classes (N,))."""
    device, cast = next(judge.parameters()).device, torch.Tensor.float if images.is_floating_point() else ds.to_float
    fs = [judge.features(cast(images[sl].to(device))) for sl in runs.batches(len(images), batch)]
    return torch.cat([f.double().cpu() for f in fs]).numpy(), torch.cat([judge.head(f).argmax(-1).cpu() for f in fs])


@torch.no_grad()
def classify_codes(classifier: Classifier, x1: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """codes (N, h, w) -> log p(class | x_1) (N, classes)."""
    device = next(classifier.parameters()).device
    return torch.cat([classifier(x1[sl].to(device)).float().log_softmax(-1) for sl in runs.batches(len(x1), batch)])


def fit(make, cfg, x: torch.Tensor, y: torch.Tensor, augment, test, device, log, prefix: str, what: str) -> dict:
    """The network make() (initial weights seeded by cfg.seed) trained: cfg.steps of Adam, cosine learning rate,
    cross-entropy on batches augment(x[idx], g) -> its checkpoint; test(it, in eval mode): which test items it gets."""
    log(f"{prefix}: training a classifier {what}")
    torch.manual_seed(cfg.seed)
    model = make().to(device).train()
    opt, g = torch.optim.Adam(model.parameters(), lr=cfg.lr), torch.Generator().manual_seed(cfg.seed)
    progress = runs.Progress(cfg.steps, every=max(1, cfg.steps // 5), prefix=prefix + " ")
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = runs.cosine_lr(step, cfg.steps, cfg.lr, warmup=min(50, cfg.steps // 10), final_frac=0.01)
        idx = torch.randint(0, len(x), (cfg.batch_size,), generator=g)
        loss = F.cross_entropy(model(augment(x[idx], g).to(device)), y[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress(step, loss=loss.item())
    return {"config": dataclasses.asdict(cfg), "model": {k: v.cpu() for k, v in model.state_dict().items()},
            "test_accuracy": test(model.eval()).float().mean().item()}


# The built-in data sets' judges ship in assets/judges/ (as the quickstart trains them): every clone judges alike.
SHIPPED_JUDGES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "judges")


def _cached(kind: str, cfg, record: dict | None, name: str, parts, judge_dir: str, train, device, log,
            keep=(), shipped=False, info=None) -> tuple[Classifier, dict]:
    """The Classifier of `cfg` cached (or shipped) as <data set>-<name>-<digest of cfg and parts>.pt, else train()
    -> its checkpoint, saved (also over a file of another version) -> (it on `device`, in eval mode; summary | info)."""
    h = hashlib.sha1(repr(sorted(dataclasses.asdict(cfg).items())).encode())
    for part in parts:
        h.update(part.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if torch.is_tensor(part)
                 else part.encode() if isinstance(part, str) else repr(part).encode())
    spec = os.path.basename((record["spec"] if record else "run").removeprefix("folder:").rstrip("/"))
    spec = "".join(c if c.isalnum() or c in "-_." else "-" for c in spec) or "folder"
    file = f"{spec}-{name}-{h.hexdigest()[:12]}.pt"
    for path in filter(os.path.exists, [os.path.join(d, file) for d in [judge_dir] + [SHIPPED_JUDGES] * shipped]):
        try:
            ckpt, cached = runs.load_checkpoint(path, kind), True
            break
        except runs.UserError as e:
            log(f"{kind}: not using the cached file: {e}")
    else:
        path, cached, t0 = os.path.join(judge_dir, file), False, time.time()
        runs.ensure_writable_dir(judge_dir or ".")
        ckpt = train() | {"kind": kind, "train_seconds": round(time.time() - t0, 1)}
        runs.save_atomic(ckpt, path)
        log(f"{kind}: trained in {ckpt['train_seconds']:.0f}s, test accuracy {ckpt['test_accuracy']:.2%} -> {path}")
    path = os.path.relpath(path) if path.startswith(SHIPPED_JUDGES) else path
    if cached and kind == "judge":
        log(f"judge: loaded {path} (test accuracy {ckpt['test_accuracy']:.2%})")
    model = Classifier(type(cfg)(**ckpt["config"]), ckpt["num_classes"], ckpt.get("num_codes", 0))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), {"file": path, "cached": cached, "test_accuracy": round(ckpt["test_accuracy"], 4),
                                     **{k: ckpt[k] for k in keep}, "steps": cfg.steps, **(info or {})}


def judge_for(data: dict, record: dict, judge_dir: str, cfg: JudgeConfig | None = None, device="cpu",
              log=print, shipped: bool = True) -> tuple[Classifier | None, dict]:
    """A data set's judge, trained on its real training images (flipped, shifted) -> (it, or None: unlabelled; info)."""
    cfg = cfg or JudgeConfig()
    (x_train, y_train, num_classes, _), (x_test, y_test, *_) = data["train"], data["test"]
    if y_train is None:
        return None, {"note": "unlabelled data set: no classifier can be trained, so no judge"}
    blank = lambda x: x.masked_fill(pixel_mask(cfg.blank, *x.shape[-2:], seed=0).to(x.device), 0) if cfg.blank else x
    augment = lambda x, g: blank(random_shift(ds.random_flip(ds.to_float(x), g), cfg.max_shift, g))
    test = lambda judge: judge_images(judge, blank(ds.to_float(x_test)))[1] == y_test
    train = lambda: fit(lambda: Classifier(cfg, num_classes), cfg, x_train, y_train, augment, test, device, log,
                        "judge", f"on the {len(x_train)} real training images of {record['spec']}") | {
        "num_classes": num_classes, "dataset": record, "test_images": len(x_test)}
    return _cached("judge", cfg, record, f"{x_train.shape[-1]}px", (tuple(x_train.shape), x_train, y_train.long()),
                   judge_dir, train, device, log, ("test_images", "train_seconds"), shipped)


def classifier_for(run: str, judge_dir: str, cfg: CodeClassifierConfig | None = None, device="cpu",
                   log=print) -> tuple[Classifier, dict]:
    """A run's classifier of codes, trained on its training codes (mirrored too), cached by them and its first stage."""
    cfg = cfg or CodeClassifierConfig()
    refuse(not os.path.exists(runs.tokens_path(run)), f"{run} carries no codes of its training images (a shipped "
           f"run), so no classifier of codes can be trained; choose by --scorer bayes, or train a run of your own")
    tokens = runs.load_tokens(run)
    refuse(tokens.get("train_labels") is None, f"{run}'s codes carry no labels, so no classifier of their class")
    x, y = tokens["train"].long(), tokens["train_labels"].long()
    K, C = int(tokens["num_codes"]), int(tokens["num_labels"])
    weights = runs.load_checkpoint(runs.vq_path(run), "vq")["model"]
    first_stage = [z for k in sorted(weights) for z in (k, (weights[k].dtype, tuple(weights[k].shape)), weights[k])]
    test = lambda m: classify_codes(m, tokens["test"].long()).argmax(-1).cpu() == tokens["test_labels"]
    train = lambda: fit(lambda: Classifier(cfg, C, K), cfg, x, y, lambda x, g: x, test, device, log, "classifier",
                        f"of codes on the {len(x)} training grids of {run}") | {
        "num_codes": K, "num_classes": C, "test_codes": len(tokens["test"])}
    return _cached("code_classifier", cfg, runs.recorded_dataset(run), f"codes{x.shape[1]}x{x.shape[2]}-classifier",
                   (*first_stage, (K, C, tuple(x.shape)), x, y), judge_dir, train, device, log, ("test_codes",),
                   info={"reads": "codes x_1", "seed": cfg.seed})


# ----- Choosing among candidates: rejection (Table 2) and reranking (Fig. 3), whose code is not public: a score
# is score(x1 (m, h, w), rows (m,)) -> (m,), higher where x1 follows the condition of the asked rows `rows` better.
def classifier_score(classifier: Classifier, targets: torch.Tensor):
    """log p(c | x_1) under the classifier of codes, c = targets[rows] (a label, or the class a prompt names)."""
    return lambda x1, rows: classify_codes(classifier, x1).cpu().gather(
        -1, targets.cpu()[rows.cpu(), None])[:, 0].to(x1.device)


@torch.no_grad()
def bayes_score(chain: ib.ImageBART, x1, labels=None, text=None, *, generator=None) -> torch.Tensor:
    """How much c explains x_1, by Bayes' rule from the chain alone: log2 p(x_1 | c) - log2 p(x_1 | null) = log2
    p(c | x_1) - log2 p(c) per token and sample (B,), each term by its bound (nll; an estimate). Reranking's scorer
    here (Fig. 3's is CLIP, "as in [56]"); both bounds draw the same random numbers, so their noise largely cancels."""
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


# sample_best_of's result: the kept samples x_1 (n, h, w), in the asked order; every candidate drawn (M, h, w), the
# asked rows' own first; the asked row each was drawn for (M,); which candidate each kept one is (n,); the seconds
BestOf = collections.namedtuple("BestOf", "codes candidates drawn_for kept sample_seconds score_seconds")


@torch.no_grad()
def sample_best_of(chain: ib.ImageBART, n: int, score, labels=None, text=None, *, accept: float | None = None,
                   rerank: int | None = None, groups: torch.Tensor | None = None, generator=None, batch: int = 256,
                   what: str | None = None, log=print, **sampling) -> BestOf:
    """n samples chosen by `score`: rejection at R = accept in (0, 1] (Table 2's "rejection rate" behaves as the
    fraction kept), or the best of K = rerank (Fig. 3). Each group of n_g asked rows (a condition, or `groups` (n,))
    draws ceil(n_g / R) or K candidates, the asked rows first (R = 1: chain.sample's), and keeps its n_g best."""
    if (accept is None) == (rerank is None) or (labels is None and text is None):
        raise ValueError("give accept (rejection sampling) or rerank (best of K), and labels or text to choose by")
    if accept is not None and not 0 < accept <= 1:                    # nan is refused too
        raise ValueError(f"accept must lie in (0, 1], got {accept}")
    device = chain.device
    key, asked = ("labels", torch.as_tensor(labels, device=device).long().expand(n)) if labels is not None else \
        ("text", (text if isinstance(text, torch.Tensor) else chain.tokenizer.encode(list(text))).to(device).long())
    groups = torch.unique(asked, dim=0, return_inverse=True)[1] if groups is None else groups.to(device)
    sizes = torch.bincount(groups).tolist()                            # n_g of each group
    if rerank is not None and rerank < max(sizes):
        raise ValueError(f"rerank {rerank} keeps the best n_g of K candidates; a group asks for {max(sizes)}")
    draws = [math.ceil(s / accept - 1e-9) if accept else rerank for s in sizes]   # 1e-9: 100 / 0.05 is 2000
    first = {g: i for i, g in reversed(list(enumerate(groups.tolist())))}        # each group's first asked row
    more = [first[g] for g, (s, d) in enumerate(zip(sizes, draws)) for _ in range(d - s)]
    source = torch.tensor(list(range(n)) + more, dtype=torch.long, device=device)  # (M,) the asked row of each
    candidates, scores, seconds = [], [], [0.0, 0.0]
    for sl in runs.batches(len(source), batch, what, log):
        t0 = time.perf_counter()
        candidates.append(chain.sample(len(source[sl]), **{key: asked[source[sl]]}, generator=generator, **sampling))
        t1 = time.perf_counter()
        scores.append(score(candidates[-1], source[sl]).float())
        seconds = [seconds[0] + t1 - t0, seconds[1] + time.perf_counter() - t1]
    candidates, scores, kept = torch.cat(candidates), torch.cat(scores), torch.empty(n, dtype=torch.long, device=device)
    for g, s in enumerate(sizes):                                      # each group's n_g best, in its asked places
        members = (groups[source] == g).nonzero()[:, 0]
        best = members[scores[members].sort(descending=True, stable=True).indices[:s]]
        kept[(groups == g).nonzero()[:, 0]] = best.sort().values
    return BestOf(candidates[kept], candidates, source, kept, *seconds)


def complete(chain: ib.ImageBART, x1, keep, particles: int | None = None, context: str = "clean", **options):
    """Masked editing by the paper's process (ImageBART.inpaint), or by this code's particles or noised context."""
    if particles or context != "clean":
        return ib.inpaint_particles(chain, x1, keep, particles=particles or 1, context=context, **options)
    return chain.inpaint(x1, keep, **options)


# ----- The figures ----------------------------------------------------------------------
INPAINT_PARTICLES = 10                    # particles per image of the completion rows by particles
DEFAULT_EVAL_GUIDANCE = 0.5               # w of the guided samples row: on the tiny shapes run w = 0.5 judged best


def _decoded(vq: ib.VQGAN, codes: torch.Tensor, batch: int = 250) -> torch.Tensor:
    """Codes -> images in [-1, 1], rounded to 8 bits as a PNG keeps them, on the CPU, `batch` at a time."""
    return torch.cat([ds.to_float(ds.to_uint8(ib.decode_canvas(vq, codes[sl].to(vq.code_map.device)))).cpu()
                      for sl in runs.batches(len(codes), batch)])


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """How often a == b, to 4 digits: an accuracy."""
    return round((a == b.to(a.device)).float().mean().item(), 4)


def judging(judge: Classifier, reference_images: torch.Tensor):
    """-> judged(images, labels or None) -> {"accuracy" the judge sees `labels`, "fd" against the reference}."""
    reference = feature_stats(judge_images(judge, reference_images)[0])

    def judged(images, labels=None) -> dict:
        features, predicted = judge_images(judge, images)
        row = {"fd": round(frechet_distance(*feature_stats(features), *reference), 3)}
        return row if labels is None else {"accuracy": _agreement(predicted, labels)} | row
    return judged


@torch.no_grad()
def evaluate_run(vq: ib.VQGAN, chain: ib.ImageBART, data: dict, judge: Classifier | None = None, n: int = 1000,
                 guidance: float = DEFAULT_EVAL_GUIDANCE, batch: int = 250, seed: int = 0, log=print,
                 lower_half_judge: Classifier | None = None, refine: int = ib.INPAINT_REFINE,
                 particles: int = INPAINT_PARTICLES, context: str = "clean", select: dict | None = None,
                 classifier: Classifier | None = None, classifier_info: dict | None = None) -> dict:
    """The judge's figures for a trained run, n images per row (at most half the test split; generated ones rounded
    to 8 bits; each row's generator seeded by `seed`); A = test[:n], B = test[n:2n] every row's FD reference.
    real_test: A (the ceiling's accuracy, the floor's FD); real_lower_halves: A's lower halves by a judge trained on
    them; reconstructions: G(E(A)), also PSNR (alone on unlabelled data); completions_upper, _random_boxes (mask seed
    = image index): A's codes regenerated there, no label, by the masked process (`refine` rounds) or `particles`
    particles (_particles); samples_guidance_0, _guided (w = `guidance`), labels cycled (samples_unconditional); a
    text chain on shapes: prompts_* "a <colour> <shape>" cycled, with colour_accuracy (heldout_*: the --holdout ones,
    100 each), else the test captions. `select` ({"accept": R} by `classifier`, or {"rerank": K, "scorer": ...}):
    real_test, `classifier`'s accuracy and agreement with the judge, the sample rows alone, by sample_best_of."""
    device, (x_test, y_test, *_) = chain.device, data["test"]
    if n > len(x_test) // 2:
        log(f"judging N = {len(x_test) // 2} images per row, not {n}: the test split holds {len(x_test)}, "
            f"and each row's images and the reference are disjoint halves of it")
        n = len(x_test) // 2
    real_a, y_a = x_test[:n], y_test[:n] if y_test is not None else None
    x1_a = torch.cat([vq.encode(ds.to_float(real_a[sl].to(device))) for sl in runs.batches(n, batch)])   # E(A)
    if select is None:
        recon = _decoded(vq, x1_a, batch)
        psnr = {"psnr": round(ds.psnr(ds.to_float(real_a), recon).mean().item(), 2)}
        if judge is None:
            return {"n": n, "reconstructions": psnr,
                    "note": "unlabelled data set: no judge, so only the reconstructions' PSNR"}
    refuse(chain.num_labels and chain.num_labels != judge.head.out_features, f"the chain knows {chain.num_labels} "
           f"classes, the data set judged on has {judge.head.out_features}: is it the data set the run was trained on?")
    judged = judging(judge, x_test[n:2 * n])
    result = {"n": n} | ({"selection": select} if select else {}) | {
        "reference": f"judge features of real test images {n}..{2 * n - 1}, disjoint from the {n} judged",
        "real_test": judged(real_a, y_a)}
    if classifier is not None:       # the two networks on the same real images: pixels, and their codes
        by_classifier, by_judge = classify_codes(classifier, x1_a).argmax(-1).cpu(), judge_images(judge, real_a)[1]
        result["classifier"] = (classifier_info or {}) | {"real_test_accuracy": _agreement(by_classifier, y_a),
                                                          "agrees_with_judge": _agreement(by_classifier, by_judge)}
    if select is None and lower_half_judge is not None:                      # A with its upper half grey (0)
        grey = ds.to_float(real_a).masked_fill(pixel_mask("upper", *real_a.shape[-2:], seed=0), 0.0)
        result["real_lower_halves"] = {"accuracy": _agreement(judge_images(lower_half_judge, grey)[1], y_a)}
    if select is None:
        result["reconstructions"] = psnr | judged(recon, y_a)
        # --- completions (Sec. 4.3), unconditional: the label is what the judge must recover
        result["inpaint"] = procedures = {"masked_process": dict(refine=refine, context=context)} | (
            {"particles": dict(particles=particles, refine=0, context=context)} if particles else {})
        for kind in ("upper", "random-boxes"):
            masks = [token_mask(pixel_mask(kind, *real_a.shape[-2:], seed=i), vq.cfg.factor) for i in range(n)]
            keep = ~torch.stack(masks).to(device)
            for name, options in procedures.items():
                g, M = torch.Generator(device).manual_seed(seed), options.get("particles", 1)
                what = f"eval completions ({kind}{', particles' if M > 1 else ''})"
                images = torch.cat([_decoded(vq, complete(chain, x1_a[sl], keep[sl], generator=g, **options), batch)
                                    for sl in runs.batches(n, max(1, batch // M), what, log)])
                row = f"completions_{kind.replace('-', '_')}" + ("_particles" if name == "particles" else "")
                result[row] = judged(images, y_a)
    # --- the sample rows: (row prefix, the condition of each sample, the class each should show, its colour)
    sets, captions = [], data["test"][3]
    if chain.tokenizer is None:
        labels = torch.arange(n) % chain.num_labels if chain.num_labels else None
        sets.append(("samples", {"labels": labels} if labels is not None else {}, labels, None))
    elif captions is not None and ds.shape_caption_parts(captions[0]) is not None:
        held, name = set(chain.cfg.holdout), lambda k, c: f"{ds.PALETTE_NAMES[c]} {ds.SHAPE_CLASSES[k]}"
        for key, m in (("prompts", n), ("heldout", min(n, 100 * len(held)))):     # (shape, colour) pairs, cycled
            if chosen := [(k, c) for k in range(len(ds.SHAPE_CLASSES)) for c in ds.SHAPE_FOREGROUNDS
                          if (name(k, c) in held) == (key == "heldout")]:
                shapes, colours = torch.tensor([chosen[i % len(chosen)] for i in range(m)]).T
                text = chain.tokenizer.encode([f"a {name(k, c)}" for k, c in zip(shapes.tolist(), colours.tolist())])
                sets.append((key, {"text": text}, shapes, colours))
    else:
        sets.append(("prompts", {"text": chain.tokenizer.encode(captions[:n])}, data["test"][1][:n], None))
    for key, cond, targets, colours in sets:
        cond, m = {k: v.to(device) for k, v in cond.items()}, len(targets) if targets is not None else n
        for w in [0.0] + ([guidance] if guidance and cond else []):
            row = f"{key}_guidance_0" if w == 0 and cond else f"{key}_guided" if cond else "samples_unconditional"
            g, info = torch.Generator(device).manual_seed(seed), {}
            what = "eval " + row.replace("_", " ") + (f" (w = {w:g})" if w else "")
            if select is None:
                codes = torch.cat([chain.sample(sl.stop - sl.start, **{k: v[sl] for k, v in cond.items()}, guidance=w,
                                                generator=g) for sl in runs.batches(m, batch, what, log)])
            else:
                score = bayes_scorer(chain, cond, torch.Generator(device).manual_seed(seed)) \
                    if select.get("scorer") == "bayes" else classifier_score(classifier, targets)
                best = sample_best_of(chain, m, score, **cond, accept=select.get("accept"), rerank=select.get("rerank"),
                                      groups=torch.arange(m) if "rerank" in select else None, generator=g,
                                      batch=batch, what=what, log=log, guidance=w)
                codes, info = best.codes, {"candidates": len(best.candidates), "sample_seconds":
                                           round(best.sample_seconds, 1), "score_seconds": round(best.score_seconds, 2)}
            images = _decoded(vq, codes, batch)
            result[row] = ({"guidance": w} if cond else {}) | judged(images, targets) | info
            if colours is not None:
                result[row] |= {"colour_accuracy": _agreement(ds.dominant_colours(ds.to_uint8(images)), colours),
                                "prompts": len(set(zip(colours.tolist(), targets.tolist())))}
    return result


@torch.no_grad()
def evaluate_canvas(vq: ib.VQGAN, chain: ib.ImageBART, data: dict, judge: Classifier, canvas: tuple[int, int],
                    n: int = 500, stride: int = 1, batch: int = 16, seed: int = 0, log=print, real_wide=None) -> dict:
    """What patch-wise sampling buys (Sec. 4.2): n panoramas of `canvas` codes (one image tall) by sliding windows,
    against training-size samples tiled (with seams), judged on crops at every offset, on whole tiles and across seams;
    `real_wide` (scenes): real wide scenes, the floor, and whether both ends show the same sky. Outpainting: a test
    image's other half drawn with 10 particles to its right (extend_right) or left (extend_left)."""
    device, (h, w), (H, W), f = chain.device, chain.cfg.grid, canvas, vq.cfg.factor
    refuse(H != h or W <= w, f"the seams are measured on canvases one training image tall and wider ({h} codes high)")
    real_wide = ds.make_wide_scenes(n, seed=2, resolution=H * f, width=W * f)[:2] if real_wide else None  # new seed
    x_test, y_test = data["test"][:2]
    n = min(n, len(x_test))
    judged, labels, tiles = judging(judge, x_test[:n]), torch.arange(n) % chain.num_labels, math.ceil(W / w)
    g = torch.Generator(device).manual_seed(seed)
    window = [ib.sample_canvas(chain, sl.stop - sl.start, labels[sl].to(device), size=canvas, stride=stride,
                               generator=g) for sl in runs.batches(n, batch, f"panoramas {H}x{W} codes", log)]
    g = torch.Generator(device).manual_seed(seed)
    tiled = [chain.sample((sl.stop - sl.start) * tiles, labels[sl].repeat_interleave(tiles).to(device), generator=g)
             for sl in runs.batches(n, 256, "tiled baseline", log)]
    tiled = torch.cat(tiled).unflatten(0, (n, tiles)).permute(0, 2, 1, 3).flatten(2)[..., :W]   # side by side
    offsets = range(W - w + 1)
    result = {"n": n, "canvas_codes": [H, W], "stride": stride, "offsets": list(offsets)}
    x1_test = torch.cat([vq.encode(ds.to_float(x_test[sl].to(device))) for sl in runs.batches(n, 256)])
    for name, at in (("extend_right", 0), ("extend_left", w)):
        x1, keep = F.pad(x1_test, (at, w - at)), F.pad(torch.ones_like(x1_test), (at, w - at)).bool()  # the image
        g = torch.Generator(device).manual_seed(seed)
        drawn = torch.cat([ds.to_float(ds.to_uint8(vq.decode(ib.inpaint_particles(
            chain, x1[sl], keep[sl], particles=INPAINT_PARTICLES, refine=0, generator=g,
            reader=ib.windows(chain, (h, 2 * w), stride))[:, :, w - at:2 * w - at]))).cpu()
            for sl in runs.batches(n, max(1, batch // INPAINT_PARTICLES), f"outpainting ({name})", log)])
        same = lambda of: _agreement(of(ds.to_uint8(drawn)), of(x_test[:n]))
        row = judged(drawn, y_test[:n])
        result[name] = {"fd": row["fd"], "same_class": row["accuracy"], "same_colour": same(ds.dominant_colours)} \
            | ({"same_sky": same(ds.scene_skies)} if real_wide else {})
    rows = {"window": (_decoded(vq, torch.cat(window), 64), labels), "tiled": (_decoded(vq, tiled, 64), labels)}
    rows |= {"real": (real_wide[0][:n], real_wide[1][:n])} if real_wide is not None else {}
    parts = {"whole_tiles": offsets[::w], "across_seams": offsets[w // 2::w], "mean": offsets}
    for name, (images, truth) in rows.items():
        crops = [judged(images[..., o * f:(o + w) * f], truth) for o in offsets]
        row = {k: [c[k] for c in crops] for k in ("fd", "accuracy")}
        if real_wide is not None:    # scenes: is the sky at the canvas's right end the one at its left?
            ends = [ds.to_uint8(x) if x.is_floating_point() else x for x in (images[..., :w * f], images[..., -w * f:])]
            row["same_sky_at_both_ends"] = _agreement(ds.scene_skies(ends[0]), ds.scene_skies(ends[1]))
        result[name] = row | {f"{k}_{part}": round(sum(row[k][o] for o in ks) / len(ks), 3)
                              for part, ks in parts.items() for k in ("fd", "accuracy")}
    return result


def evaluate_folder(run: str, dataset: str | None = None, data_root: str = "data",
                    judge_dir: str = os.path.join("runs", "judges"), n: int = 1000,
                    guidance: float = DEFAULT_EVAL_GUIDANCE, judge_steps: int | None = None, seed: int = 0,
                    device="cpu", log=print, inpaint: dict | None = None, out: str | None = None,
                    shipped_judges: bool = True, canvas=None, stride: int = 1, accept=None, rerank=None,
                    scorer: str = "classifier", classifier_steps: int | None = None) -> dict:
    """A run judged on its data set (as recorded, or `dataset`): evaluate_run's figures, also written to `out` (default
    <run>/eval.json); with `canvas` evaluate_canvas's, with accept or rerank the chosen samples', in files beside it."""
    vq, chain = runs.load_run(run, device)
    select = {"rerank": rerank, "scorer": scorer} if rerank is not None else None
    select = {"accept": accept} if accept is not None else select
    refuse(select and chain.num_labels is None and chain.tokenizer is None, "this run's chain is unconditional: "
           "--accept and --rerank choose by how well a sample shows its class or prompt: they need a conditional run")
    record = ds.dataset_record(dataset, vq.cfg.resolution, data_root, vq.cfg.train_size, vq.cfg.test_size) \
        if dataset else runs.recorded_dataset(run)
    refuse(record is None, f"{run} does not record which data set it was trained on; name it with --dataset")
    with runs.user_errors():
        data = ds.load_recorded_dataset(record)
    cfg = JudgeConfig() if judge_steps is None else dataclasses.replace(JudgeConfig(), steps=judge_steps)
    judge, judge_info = judge_for(data, record, judge_dir, cfg, device, log, shipped_judges)
    refuse((canvas is not None or select) and judge is None,
           "this data set has no labels, so no judge to tell whether the samples show their class")
    t0, f = time.time(), vq.cfg.factor                     # the judges' own training not included
    if canvas is not None:
        refuse(not chain.num_labels, "the seams are judged on class-conditional panoramas: this run needs labels")
        figures = evaluate_canvas(vq, chain, data, judge, canvas, n, stride, seed=seed, log=log,
                                  real_wide=record["spec"] == "scenes")
        default = f"eval_canvas_{canvas[0] * f}x{canvas[1] * f}.json"
    else:
        lower = judge_for(data, record, judge_dir, dataclasses.replace(cfg, blank="upper"), device, log,
                          shipped_judges)[0] if judge is not None and not select else None
        steps = {"steps": classifier_steps} if classifier_steps else {}
        classifier, info = classifier_for(run, judge_dir, CodeClassifierConfig(**steps), device, log) \
            if select and select.get("scorer", "classifier") == "classifier" else (None, None)
        t0 = time.time()
        figures = evaluate_run(vq, chain, data, judge, n, guidance, seed=seed, log=log, lower_half_judge=lower,
                               **(inpaint or {}), select=select, classifier=classifier, classifier_info=info)
        default = f"eval_accept_{accept:g}.json" if accept is not None else \
            f"eval_rerank_{rerank}_{scorer}.json" if select else "eval.json"
    result = {"run": run, "dataset": record["spec"], "judge": judge_info, **figures,
              "note": "accuracy and Frechet distance in the judge's features: they compare runs on one data set; "
                      "not FID", "eval_seconds": round(time.time() - t0, 1)}
    runs.save_json(result, path := out or os.path.join(run, default))
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
    refuse(scorer is not None and rerank is None, "--scorer picks --rerank's score; --accept scores by the classifier")
    if classifier_steps is not None:
        runs.check_number(classifier_steps, "--classifier-steps", 1, whole=True)
    refuse(accept is not None and rerank is not None, "give --accept or --rerank, not both: a rate or a count kept")
    refuse(accept is not None and not 0 < accept <= 1, f"--accept must lie in (0, 1], got {accept or 0:g}")  # nan too
    refuse(rerank is not None and rerank < 1, f"--rerank must be >= 1, got {rerank}")


def add_selection_args(p: argparse.ArgumentParser) -> None:
    choose = p.add_argument_group("samples chosen: rejection (Table 2), reranking (Fig. 3)").add_argument
    choose("--accept", type=float, metavar="R", help="rejection: keep n of ceil(n / R) candidates per condition")
    choose("--rerank", type=int, metavar="K", help="best of K candidates")
    choose("--scorer", choices=("bayes", "classifier"), help="--rerank's score: bayes (default) or classifier")
    choose("--classifier-steps", type=int, help=f"a new classifier of codes' steps ({CodeClassifierConfig.steps})")
    choose("--judge-dir", default="runs/judges", help="the cache of judges and classifiers of codes")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a run by a judge trained on its data set (accuracy, FD; not FID)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--run", help="a run folder; default runs/shapes once trained, else the shipped run")
    add("--out", help="the figures, JSON (default <run>/eval.json; --size, --accept, --rerank: a file beside it)")
    add("--eval-n", type=int, default=1000, help="images per row (at most half the test split)")
    add("--guidance", type=float, default=DEFAULT_EVAL_GUIDANCE, help="w of the guided samples row; 0 = none")
    add("--refine", type=int, default=ib.INPAINT_REFINE, help="completions by the masked process: rounds per scale")
    add("--particles", type=int, default=INPAINT_PARTICLES, help="completions by particles, per image; 0 = none")
    add("--context", choices=("clean", "noised"), default="clean", help="completions: given tokens clean, or noised")
    add("--seed", type=int, default=0, help="every row's generator")
    add("--size", metavar="HxW", help="instead: patch-wise sampling's seams (Sec. 4.2) on H x W pixels, one image tall")
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
    refuse(args.size and selecting, "--accept and --rerank choose among samples of the training size: not --size")
    args.run, home = runs.choose_run(args.run)
    if args.out is None and home != args.run:           # a shipped run: its figures go to the working folder
        args.out = os.path.join(home, "eval.json")
    own = os.path.realpath(args.out or runs.eval_path(args.run)) == os.path.realpath(runs.eval_path(args.run))
    if args.out is not None:              # never another of a run's own files; JSON; a writable folder
        if not own or home != args.run:
            runs.refuse_run_file("--out", args.out, args.run)
        refuse(not args.out.lower().endswith(".json"), f"--out {args.out}: the judge's figures are JSON; give a .json")
        runs.ensure_writable_dir(os.path.dirname(os.path.abspath(args.out)))
    device = runs.pick_device(args.device)
    size = runs.parse_size(args.size, args.stride, runs.vqgan_from_checkpoint(
        runs.load_checkpoint(runs.vq_path(args.run), "vq")).cfg) if args.size else None
    if own and size is None and not selecting:
        runs.lock_run(args.run)           # the run's own eval.json: not while another process writes the run
    print(json.dumps(evaluate_folder(
        args.run, args.dataset, args.data_root, args.judge_dir, args.eval_n, args.guidance, args.judge_steps, args.seed,
        device, print, dict(refine=args.refine, context=args.context, particles=args.particles), args.out,
        not args.fresh_judges, size, args.stride, args.accept, args.rerank,
        "classifier" if args.accept is not None else args.scorer or "bayes", args.classifier_steps)), flush=True)


if __name__ == "__main__":
    runs.run_main(main)
