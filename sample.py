"""Sample from a trained ImageBART run: samples, classes, trajectories, masked editing.

    python sample.py --run runs/shapes                          # unconditional grid -> runs/shapes/sample.png
    python sample.py --run runs/shapes --class all --guidance 1 # one row per class
    python sample.py --run runs/shapes --trajectory             # x_T ... x_1 decoded, one strip per sample
    python sample.py --run runs/shapes --inpaint test:8 --mask upper   # regenerate the upper half
    python sample.py --run runs/shapes --inpaint my.png --mask mask.png --class 3
    python sample.py --run runs/shapes_text --prompt "a red star" --prompt "a blue ring" --guidance 1
    python sample.py --run runs/shapes --class all --n 8 --accept 0.25   # rejection with a classifier (Table 2)
    python sample.py --run runs/shapes_text --prompt "a red star" --n 2 --rerank 32   # best 2 of 32 (Fig. 3)
    python sample.py --benchmark                                # cached vs. uncached decoding, no run needed
    python sample.py --benchmark --cached-only --batch 50 --T 5 # seconds per image against T (Fig. 8)
    python sample.py --run runs/shapes --plot                   # loss curves -> runs/shapes/loss_*.png
    python sample.py --run runs/shapes --serve                  # a page to paint masks on: http://127.0.0.1:8000/

Sampling runs the reverse chain (Sec. 3.3): x_T uniform, then x_{t-1} ~ p^{t-1}(x_{t-1} | x_t, c)
(c a class, a prompt, or the null condition)
for t = T..2, then x_0 = G(x_1). --temperature, --top-k and --top-p take one value or a
comma list with one value per scale, for t = T, T-1, ..., 2.
"""
import argparse
import base64
import contextlib
import dataclasses
import io
import json
import math
import os
import tempfile
import threading
import time
import traceback

import numpy as np
import torch
from einops import rearrange
from PIL import Image

import data as ds
import evaluate
import imagebart as ib
import runs
from evaluate import MASK_KINDS, pixel_mask, token_mask   # shared with the judge


# -----------------------------------------------------------------------------
# command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # --- what is drawn: from which run, how many, under which condition (Sec. 3.3, 4.2)
    p.add_argument("--run", default=None,
                   help="a run folder (vq.pt, scale_<t>.pt); default runs/shapes once trained, else the shipped run")
    p.add_argument("--n", type=int, default=64, help="number of samples (per class with --class all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", default="1.0", help="one value, or one per scale t = T..2")
    p.add_argument("--top-k", default=None, help="one value, or one per scale t = T..2")
    p.add_argument("--top-p", default=None, help="one value, or one per scale t = T..2")
    p.add_argument("--class", dest="classes", default=None,
                   help="class index or name, comma list (one per sample, cycled) or 'all' (one row per class)")
    p.add_argument("--prompt", dest="prompts", action="append", default=None, metavar="TEXT",
                   help="a text-conditional run's prompt, e.g. 'a red star'; repeat it for more rows "
                        "(with --inpaint: cycled over the completions)")
    # --- how: this code's sampling options (imagebart.Sampling), one value or one per scale
    p.add_argument("--guidance", type=float, default=0.0,
                   help="classifier-free guidance weight w: (1+w) cond - w uncond; 0 = plain conditional")
    p.add_argument("--no-cache", action="store_true", help="decode without the key/value cache (slow; for study)")
    # --- where the images go: a grid, and for other tools one PNG per image or one .npz
    p.add_argument("--out", default=None, help="grid PNG (default <run>/sample.png, trajectory.png, inpaint.png; the working folder for a shipped run)")
    p.add_argument("--out-dir", default=None, help="also write one PNG per sample here (for FID tools)")
    p.add_argument("--npz", default=None, help="also save uint8 NHWC images, codes and labels here")
    p.add_argument("--trajectory", action="store_true", help="decode every x_t of the chain, x_T ... x_1")
    # --- masked editing (Sec. 4.3): which images, which region, how many completions
    p.add_argument("--inpaint", default=None, help="image file(s), comma-separated, or test:N (N test images)")
    p.add_argument("--mask", default=None, help=f"region of the image to regenerate: {', '.join(MASK_KINDS)}, or a PNG "
                                              f"(white = regenerate); default upper, or none with --size")
    p.add_argument("--completions", type=int, default=6, help="completions per inpainted image")
    # --- beyond the training canvas (Sec. 4.2): patch-wise sampling, outpainting, two conditions
    p.add_argument("--size", default=None, metavar="HxW",
                   help="draw (or complete) images of H x W pixels, larger than the training size, patch-wise "
                        "through sliding windows on every scale (Sec. 4.2)")
    p.add_argument("--stride", type=int, default=1,
                   help="--size: columns the window moves at a time; 1 = centred on every target (Taming "
                        "Transformers' rule), larger = faster, a rule of its own")
    p.add_argument("--place", choices=("left", "right", "center"), default=None,
                   help="--inpaint with --size: where the given image goes on the canvas; the rest is drawn "
                        "(default left: the image is extended to the right)")
    p.add_argument("--tiled", action="store_true",
                   help="--size: the baseline instead, independent samples of the training size side by side "
                        "(with seams between them)")
    p.add_argument("--across", action="store_true",
                   help="two conditions (--class A,B or --prompt A --prompt B): the first on the left, the "
                        "second on the right, mixed in between")
    # --- masked editing's procedure: the paper's rounds, or this code's particles
    p.add_argument("--refine", type=int, default=ib.INPAINT_REFINE,
                   help="inpainting: forward-backward rounds per scale (none at t = T), the paper's masked process")
    p.add_argument("--particles", type=int, default=None,
                   help="inpainting, this code's own: draws per image and scale, resampled by how well they fit the "
                        "given tokens (default: none, the paper's process)")
    p.add_argument("--context", choices=("clean", "noised"), default="clean",
                   help="inpainting: given tokens clean at every scale (Sec. 4.3), or noised like x_t")
    p.add_argument("--device", default=None)
    # --- instead of sampling: the loss curves, or the editing page
    p.add_argument("--plot", action="store_true", help="draw the run's loss curves from its log.jsonl (loss_*.png)")
    p.add_argument("--serve", action="store_true", help="serve a page to paint masks on and regenerate them")
    p.add_argument("--host", default="127.0.0.1", help="--serve: the address to listen on")
    p.add_argument("--port", type=int, default=8000, help="--serve: the port (0 = any free one)")
    choose = p.add_argument_group("choosing among candidates: rejection (Table 2) and reranking (Fig. 3); "
                                  "the classifier of codes that chooses is not the judge")
    choose.add_argument("--accept", type=float, default=None, metavar="R",
                        help="rejection sampling with a classifier: per class (or prompt) draw ceil(n / R) "
                             "candidates, keep the n it finds most likely to show their class; R in (0, 1], "
                             "1 = plain sampling")
    choose.add_argument("--rerank", type=int, default=None, metavar="K",
                        help="best of K: per class or prompt draw K candidates, keep the --n <= K best by --scorer "
                             "(Fig. 3's best 2 of 32: --rerank 32 --n 2)")
    choose.add_argument("--scorer", choices=("bayes", "classifier"), default=None,
                        help="--rerank's score: bayes (default) = the chain's own log p(x|c) - log p(x|null), "
                             "both from its bound; classifier = log p(class|x) of the classifier of codes")
    choose.add_argument("--classifier-steps", type=int, default=None,
                        help=f"training steps of a new classifier of codes (default {evaluate.CodeClassifierConfig.steps}); "
                             f"it is cached in --judge-dir")
    choose.add_argument("--judge-dir", default="runs/judges", help="the cache of the classifiers of codes")
    # --- instead of sampling: the decoding benchmarks, on a random chain (no run needed)
    p.add_argument("--benchmark", action="store_true", help="time cached vs. uncached decoding and print JSON")
    p.add_argument("--preset", default="tiny", help="chain preset for --benchmark")
    p.add_argument("--batch", type=int, default=16, help="batch for --benchmark")
    for name, what in BENCHMARK_FIELDS.items():
        p.add_argument(f"--{name}", type=int, default=None, help=f"--benchmark: the random chain's {what} "
                                                                 f"(default: --preset's)")
    p.add_argument("--cached-only", action="store_true",
                   help="--benchmark: time the cached sampler alone, in seconds per image (Fig. 8), without "
                        "the uncached reference")
    return p


# the chain config fields that --benchmark takes: enough for the Table 3 runs' configs
BENCHMARK_FIELDS = {"T": "number of scales T (x_1 .. x_T)", "n_embd": "width", "n_layer_enc": "encoder layers",
                    "n_layer_dec": "decoder layers"}


# -----------------------------------------------------------------------------
# sampling options and conditions, checked before any sampling

# The options' names as the command line spells them; the editing page passes its own fields'.
OPTION_NAMES = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p", "guidance": "--guidance"}


def sampling_options(args, T: int, K: int | None = None, names: dict = OPTION_NAMES, log=print) -> dict:
    """Parse and check --temperature/--top-k/--top-p (one value or T-1 values) and --guidance,
    every number through runs.check_number. A top-k of at least K (the run's codes) keeps every
    code: it filters nothing, which is said."""
    def parse(text, key, **rule):
        """"0.9" -> 0.9, "1,0.9" -> [1.0, 0.9]; each value checked against `rule`."""
        if text is None:
            return None
        values = [runs.check_number(v, names[key], **rule) for v in str(text).split(",")]
        value = values[0] if len(values) == 1 else values
        with runs.user_errors():                           # a list needs one value per scale: checked now
            ib.option_per_scale(value, T, names[key])
        return value
    top_k = parse(args.top_k, "top_k", low=1, whole=True)
    if K is not None and top_k is not None and max(top_k if isinstance(top_k, list) else [top_k]) >= K:
        log(f"note: {names['top_k']} {args.top_k}: a top-k of at least K = {K} (this run's codes) keeps every code, "
            f"so it filters nothing there")
    return dict(temperature=parse(args.temperature, "temperature", low=0, above=True), top_k=top_k,
                top_p=parse(args.top_p, "top_p", low=0, high=1, above=True),
                guidance=runs.check_number(args.guidance, names["guidance"], 0), use_cache=not args.no_cache)


def parse_condition(args, chain: ib.ImageBART, n: int, device) -> tuple[dict, int | None]:
    """--class or --prompt -> (the condition as keyword arguments of the chain's sampling
    methods, {"labels": (n',)} or {"text": token ids (n', text_len)} or {}; samples per row).
    --class all and --prompt give n samples of each class or prompt, one row each (n' = n
    times their number); a comma list of classes is cycled over the n samples."""
    if args.prompts and args.classes is not None:
        raise runs.UserError("give --class or --prompt, not both")
    # no condition: unconditional sampling (on a conditional chain, the null condition)
    if args.classes is None and not args.prompts:
        if args.guidance:
            raise runs.UserError("--guidance needs --class or --prompt: it steers towards a condition")
        return {}, None
    if args.prompts:
        if chain.tokenizer is None:
            kind = "class-conditional" if chain.num_labels else "unconditional"
            raise runs.UserError(f"this run's chain is {kind}; it takes no --prompt (train one with --condition text)")
        unknown = chain.tokenizer.unknown(args.prompts)
        if unknown:
            print(f"warning: not in this run's vocabulary, read as <unk>: {', '.join(unknown)}", flush=True)
        with runs.user_errors():                               # too long: one line
            ids = chain.tokenizer.encode(args.prompts)         # (prompts, text_len)
        return {"text": ids.repeat_interleave(n, 0).to(device)}, n
    if chain.tokenizer is not None:
        raise runs.UserError("this run's chain is conditioned on text; use --prompt, not --class")
    if not chain.num_labels:
        raise runs.UserError("this run's chain is unconditional; it takes no --class")
    if args.classes == "all":
        return {"labels": torch.arange(chain.num_labels, device=device).repeat_interleave(n)}, n
    words = [c.strip() for c in args.classes.split(",")]
    names = runs.run_class_names(args.run) if not all(w.lstrip("-").isdigit() for w in words) else []
    classes = [class_index(w, names) for w in words]
    bad = [c for c in classes if not 0 <= c < chain.num_labels]
    if bad:
        raise runs.UserError(f"class {bad[0]} is outside this data set's labels 0..{chain.num_labels - 1}")
    # a list is cycled: "--class 1,2 --n 5" gives 1, 2, 1, 2, 1
    return {"labels": torch.tensor(classes).repeat(math.ceil(n / len(classes)))[:n].to(device)}, None


def across_condition(args, chain: ib.ImageBART) -> dict:
    """--across: the two conditions, left and right, as keyword arguments of ImageBART.sample
    ({"labels": [a, b]} or {"text": [A, B]}); checked as parse_condition checks them."""
    if args.prompts:
        if chain.tokenizer is None:
            raise runs.UserError("this run's chain takes no --prompt (train one with --condition text)")
        with runs.user_errors():                             # a too-long prompt: one line, now
            chain.tokenizer.encode(args.prompts)
        return {"text": list(args.prompts)}
    if not chain.num_labels:
        raise runs.UserError("this run's chain is unconditional; --across needs two classes or two prompts")
    names = runs.run_class_names(args.run)
    pair = [class_index(w.strip(), names) for w in args.classes.split(",")]
    bad = [c for c in pair if not 0 <= c < chain.num_labels]
    if bad:
        raise runs.UserError(f"class {bad[0]} is outside this data set's labels 0..{chain.num_labels - 1}")
    return {"labels": pair}


def class_index(text: str, names: list[str]) -> int:
    """A class given by index ("6") or by name ("star"), `names` being the run's (run_class_names)."""
    if text.lstrip("-").isdigit():
        return int(text)
    if text not in names:
        known = f"one of {', '.join(names)}" if names else "an index (this run records no class names)"
        raise runs.UserError(f"--class {text!r}: no class of that name; give {known}, a comma list, or 'all'")
    return names.index(text)


# -----------------------------------------------------------------------------
# choosing among candidates (Table 2, Fig. 3): --accept, --rerank, --scorer

def check_selection_options(args) -> None:
    """--accept, --rerank and --scorer, before any work (no run needed): their ranges, and
    the modes they do not apply to. They choose among new samples of the training size, so not
    among completions (--inpaint, --serve), trajectories, panoramas (--size, --across)."""
    evaluate.check_selection(args.accept, args.rerank, args.scorer, args.classifier_steps)
    if args.accept is None and args.rerank is None:
        return
    flag = "--accept" if args.accept is not None else "--rerank"
    for other, given in (("--inpaint", args.inpaint), ("--serve", args.serve), ("--trajectory", args.trajectory),
                         ("--size", args.size), ("--across", args.across), ("--plot", args.plot),
                         ("--benchmark", args.benchmark)):
        if given:
            raise runs.UserError(f"{flag} chooses among new samples of the training size; it does not apply to {other}")
    if args.rerank is not None and args.n > args.rerank:
        raise runs.UserError(f"--rerank {args.rerank} keeps the best --n of {args.rerank} candidates per class or "
                             f"prompt; --n {args.n} is more than {args.rerank}")


def prompt_classes(args, per_prompt: int) -> torch.Tensor:
    """The class each --prompt names (the one class name of the run among its words), each
    repeated `per_prompt` times as parse_condition repeats the prompts: what the classifier of
    codes scores, p(class | x_1), for a text chain's samples."""
    names = runs.run_class_names(args.run)
    classes = []
    for prompt in args.prompts:
        found = sorted({names.index(w) for w in ib.Tokenizer.words(prompt) if w in names})
        if len(found) != 1:
            raise runs.UserError(f"--prompt {prompt!r} names {'none' if not found else 'more than one'} of this run's "
                                 f"classes ({', '.join(names) or 'none recorded'}); the classifier scores the class a "
                                 f"prompt names, so name one (or --rerank with --scorer bayes)")
        classes.append(found[0])
    return torch.tensor(classes).repeat_interleave(per_prompt)


def classifier_config(args) -> evaluate.CodeClassifierConfig:
    base = evaluate.CodeClassifierConfig()
    return base if args.classifier_steps is None else dataclasses.replace(base, steps=args.classifier_steps)


def select(args, vq: ib.VQGAN, chain: ib.ImageBART, opts: dict, g, device) -> None:
    """--accept or --rerank: the samples of every class or prompt chosen among more candidates
    (evaluate.sample_best_of), by the classifier of codes or by the chain's Bayes score; then written
    as plain samples are (grid, --out-dir, --npz)."""
    flag = "--accept" if args.accept is not None else "--rerank"
    if chain.num_labels is None and chain.tokenizer is None:
        raise runs.UserError(f"this run's chain is unconditional: {flag} chooses samples by how well they show their "
                             f"class or prompt, so it needs a conditional run")
    cond, per_row = parse_condition(args, chain, args.n, device)
    if not cond:
        raise runs.UserError(f"{flag} needs --class (or --prompt): it keeps the candidates that best show what was asked")
    n = len(next(iter(cond.values())))
    scorer = "classifier" if args.accept is not None else args.scorer or "bayes"
    if scorer == "bayes":   # its own generator: the bound's draws do not move the samples' random numbers
        score = evaluate.bayes_scorer(chain, cond, torch.Generator(device).manual_seed(args.seed))
    else:
        targets = cond["labels"] if "labels" in cond else prompt_classes(args, per_row)
        classifier, _ = evaluate.classifier_for(args.run, args.judge_dir, classifier_config(args), device)
        score = evaluate.classifier_score(classifier, targets)
    best = evaluate.sample_best_of(chain, n, score, **cond, accept=args.accept, rerank=args.rerank, generator=g,
                                   batch=SAMPLE_BATCH, what="sampling candidates", **opts)
    how = f"rejection with the classifier, R = {args.accept:g}" if args.accept is not None else \
        f"best of {args.rerank} per {'prompt' if args.prompts else 'class'} by the {scorer} score"
    print(f"kept {n} of {len(best.candidates)} candidates ({how}): sampling {best.sample_seconds:.1f}s, "
          f"scoring {best.score_seconds:.1f}s", flush=True)
    write_samples(args, vq, best.codes, per_row, cond.get("labels"))


# -----------------------------------------------------------------------------
# beyond the training canvas (Sec. 4.2): --size, --place, --across

def check_canvas_options(args) -> None:
    """--stride, --tiled, --place and --across, before any work: --stride, --tiled and --place
    need --size (and --place --inpaint); --across exactly two classes or two prompts."""
    if args.stride != 1 and not args.size:
        raise runs.UserError("--stride moves the windows of a --size canvas; give --size")
    if args.tiled and (not args.size or args.across):
        raise runs.UserError("--tiled draws the baseline of a --size canvas (without --across)")
    if args.place and not (args.inpaint and args.size):
        raise runs.UserError("--place puts an --inpaint image on a larger --size canvas; give both")
    if args.across:
        classes = [c for c in (args.classes or "").split(",") if c.strip()]
        count = len(args.prompts or []) or (len(classes) if args.classes not in (None, "all") else 0)
        if count != 2 or (args.prompts and args.classes):
            raise runs.UserError("--across takes exactly two conditions: --class A,B or --prompt A --prompt B")


def tiled_samples(args, chain: ib.ImageBART, cond: dict, n: int, size, g, opts) -> list[torch.Tensor]:
    """--tiled: for each of n canvases, independent samples of the training size (same condition)
    put side by side and one above the other, cut to the canvas: [x_T, ..., x_1], each (n, H, W)."""
    if size is None or args.across:
        raise runs.UserError("--tiled draws the baseline of a --size canvas (without --across)")
    (h, w), (H, W) = chain.cfg.grid, size
    rows, cols = math.ceil(H / h), math.ceil(W / w)
    each = {k: v.repeat_interleave(rows * cols, 0) for k, v in cond.items()}
    states = chain.sample(n * rows * cols, trajectory=True, generator=g, **each, **opts)
    return [rearrange(x, "(n r c) h w -> n (r h) (c w)", r=rows, c=cols)[:, :H, :W] for x in states]


def canvas_origin(image: tuple[int, int], canvas: tuple[int, int], place: str) -> tuple[int, int]:
    """Where an image of (h, w) codes goes on a canvas of (H, W): at the left, the right or the
    centre, vertically centred. -> (top, left)."""
    (h, w), (H, W) = image, canvas
    return (H - h) // 2, {"left": 0, "right": W - w, "center": (W - w) // 2}[place]


def place_on_canvas(x1: torch.Tensor, keep: torch.Tensor, grid: tuple[int, int], place: str):
    """x1, keep (B, h, w) of the given image -> (x1, keep) (B, H, W) of the canvas: the image
    placed (canvas_origin), the rest to be drawn (keep False)."""
    B, h, w = x1.shape
    top, left = canvas_origin((h, w), grid, place)
    canvas = torch.zeros(B, *grid, dtype=x1.dtype, device=x1.device)
    given = torch.zeros(B, *grid, dtype=torch.bool, device=x1.device)
    canvas[:, top:top + h, left:left + w] = x1
    given[:, top:top + h, left:left + w] = keep
    return canvas, given


def pixels_on_canvas(x0: torch.Tensor, grid: tuple[int, int], place: str, factor: int) -> torch.Tensor:
    """Images (B, 3, r, r) on a grey canvas of grid * factor pixels, where place_on_canvas puts
    their codes: how the given part of an outpainting is shown."""
    top, left = canvas_origin((x0.shape[-2] // factor, x0.shape[-1] // factor), grid, place)
    out = torch.zeros(x0.shape[0], 3, grid[0] * factor, grid[1] * factor, device=x0.device)
    out[..., top * factor:top * factor + x0.shape[-2], left * factor:left * factor + x0.shape[-1]] = x0
    return out


# -----------------------------------------------------------------------------
# images in and out

def load_images(spec: str, resolution: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) from comma-separated image files, resized to the run's resolution."""
    images = []
    for path in spec.split(","):
        try:
            with Image.open(path) as im:
                if im.size != (resolution, resolution):
                    print(f"note: {path} is {im.width}x{im.height}; resized and center-cropped to "
                          f"{resolution}x{resolution}", flush=True)
                images.append(ds.resize_center_crop(im, resolution))
        except FileNotFoundError:
            raise runs.UserError(f"--inpaint {path}: no such file") from None
        except Exception:
            raise runs.UserError(f"--inpaint {path} is not a readable image") from None
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


# What a grid may be saved as: the image formats pillow writes among those the loaders read.
GRID_EXTENSIONS = tuple(e for e in ds.IMAGE_EXTENSIONS if Image.registered_extensions().get(e) in Image.SAVE)


def check_outputs(args) -> None:
    """Every output, checked before any work: never a run's own file (vq.pt, tokens.pt,
    scale_<t>.pt, a log, bound.json, eval.json, a lock); its kind from its extension (a grid is
    an image, --npz .npz, which numpy would otherwise append); its folder writable (made when
    missing)."""
    for flag, path in (("--out", args.out), ("--npz", args.npz)):
        if path is not None:
            runs.refuse_run_file(flag, path, args.run)
    if args.out and not args.out.lower().endswith(GRID_EXTENSIONS):
        raise runs.UserError(f"--out {args.out}: a grid is an image; give a name ending in {', '.join(GRID_EXTENSIONS)}")
    if args.npz and not args.npz.lower().endswith(".npz"):
        raise runs.UserError(f"--npz {args.npz}: the arrays go into an .npz file; give a name ending in .npz")
    for path in (args.out, args.npz):
        if path:
            runs.ensure_writable_dir(os.path.dirname(os.path.abspath(path)))
    if args.out_dir:
        runs.refuse_shipped(args.out_dir, "--out-dir")
        runs.ensure_writable_dir(args.out_dir)


class NpzWriter:
    """--npz, written as the images come, so that memory stays flat at any --n. An .npz is a zip
    of .npy files (np.savez's layout, uncompressed), and an .npy is a header (dtype, shape)
    followed by the array's bytes in order: each array is written that way to a part file of
    its own (`path.<name>.npy.tmp`, made afresh), batch after batch, and the parts are zipped
    into place at the end (runs.replacing), so a job that stops half way leaves no half .npz.
    arrays: {name: (shape, dtype)}."""

    def __init__(self, path: str, arrays: dict):
        self.path, self.shapes = path, {k: shape for k, (shape, _) in arrays.items()}
        self.parts = {k: f"{path}.{k}.npy.tmp" for k in arrays}
        self.files, self.rows = {}, {k: 0 for k in arrays}
        try:
            for k, (shape, dtype) in arrays.items():
                self.files[k] = runs.new_file(self.parts[k])     # never written through a link
                np.lib.format.write_array_header_1_0(self.files[k], {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})
        except OSError as e:
            self.discard()
            raise runs.UserError(f"could not write --npz {path}: {e.strerror or e}") from None

    def write(self, **chunks) -> None:
        """The next rows of each array (numpy, in order)."""
        try:
            for k, v in chunks.items():
                self.files[k].write(np.ascontiguousarray(v).tobytes())
                self.rows[k] += len(v)
        except OSError as e:
            self.discard()
            raise runs.UserError(f"could not write --npz {self.path}: {e.strerror or e}") from None

    def close(self) -> None:
        import zipfile
        assert all(self.rows[k] == self.shapes[k][0] for k in self.rows), (self.rows, self.shapes)
        try:
            for f in self.files.values():
                f.close()
            with runs.replacing(self.path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
                for k, part in self.parts.items():
                    z.write(part, f"{k}.npy")
        finally:
            self.discard()

    def discard(self) -> None:
        for f in self.files.values():
            f.close()
        for part in self.parts.values():
            with contextlib.suppress(FileNotFoundError):
                os.remove(part)


class Outputs:
    """Where one command's images go, batch by batch as they are made, so that memory stays flat
    at any --n: --out-dir (one PNG each, what FID tools read), --npz (NpzWriter: uint8 NHWC
    images, codes, labels), and the first cells of the grid, up to runs.MAX_GRID_PIXELS. A grid
    over that cap shows the first cells that fit and says so, when every image also goes to
    --out-dir or --npz; otherwise the job is refused before any work (`what`: the options that
    make it that large). Pixels are stored as 8-bit, exactly as the grids show them."""

    def __init__(self, args, n: int, cells: int, nrow: int, pixels: int | tuple, code_shape: tuple, labelled: bool,
                 what: str):
        self.args, self.n, self.cells = args, n, cells
        H, W = (pixels, pixels) if isinstance(pixels, int) else pixels      # each image's height and width
        self.shown, self.nrow = runs.grid_fit(cells, nrow, H, W)
        if self.shown < cells:
            width, height = runs.grid_size(cells, nrow, H, W)
            over = (f"a grid of {cells} images would be {width} x {height} = {width * height} pixels, over the "
                    f"cap of {runs.MAX_GRID_PIXELS} (MAX_GRID_PIXELS)")
            if not (args.out_dir or args.npz):
                raise runs.UserError(f"{what}: {over}; write the images with --out-dir DIR or --npz FILE, and the grid "
                                     f"shows the first {self.shown}")
            print(f"note: {over}: it shows the first {self.shown}; all {n} images go to "
                  f"{' and '.join(p for p in (args.out_dir, args.npz) if p)}", flush=True)
        self.kept, self.added, self.written = [], 0, 0
        self.npz = None
        if args.npz:
            self.npz = NpzWriter(args.npz, {"images": ((n, H, W, 3), np.uint8), "codes": ((n, *code_shape), np.int64),
                                            "labels": ((n if labelled else 0,), np.int64)})

    def room(self) -> int:
        """How many more cells the grid shows."""
        return self.shown - self.added

    def grid(self, cells: torch.Tensor) -> None:
        """The next cells of the grid, uint8 (B, 3, H, W), in order; those past the cap are dropped."""
        if self.room() > 0:
            self.kept.append(cells[:self.room()].cpu())
        self.added += len(cells)

    def images(self, images: torch.Tensor, codes: torch.Tensor, labels) -> None:
        """The next images (uint8 (B, 3, H, W)), their codes x_1 and labels, to --out-dir and --npz."""
        u8 = images.permute(0, 2, 3, 1).cpu().numpy()                     # (B, H, W, 3)
        if self.args.out_dir:
            for i, img in enumerate(u8):
                runs.save_image(Image.fromarray(img), os.path.join(self.args.out_dir, f"{self.written + i:06d}.png"))
        if self.npz is not None:
            self.npz.write(images=u8, codes=codes.cpu().numpy().astype(np.int64),
                           **({"labels": labels.cpu().numpy().astype(np.int64)} if labels is not None else {}))
        self.written += len(u8)

    def finish(self, path: str) -> None:
        """The grid to `path`, then --npz moved into place; what was written is said."""
        runs.save_image_grid(torch.cat(self.kept), path, nrow=self.nrow)
        if self.args.out_dir:
            print(f"wrote {self.written} PNGs to {self.args.out_dir}", flush=True)
        if self.npz is not None:
            self.npz.close()
            print(f"wrote {self.args.npz}", flush=True)

    def discard(self) -> None:
        """A job that stops half way: no half .npz."""
        if self.npz is not None:
            self.npz.discard()


def write_samples(args, vq: ib.VQGAN, x1: torch.Tensor, per_row: int | None, labels) -> None:
    """Samples x_1 (n, h, w) decoded a batch at a time into a grid (--out, default
    <run>/sample.png; one row per class or prompt when per_row is given), --out-dir and --npz."""
    n, f = len(x1), vq.cfg.factor
    pixels = (x1.shape[1] * f, x1.shape[2] * f)
    nrow = per_row or max(1, int(math.ceil(math.sqrt(n * pixels[0] / pixels[1]))))   # squarish, also of panoramas
    outputs = Outputs(args, n, n, nrow, pixels, tuple(x1.shape[1:]), labels is not None, f"--n {args.n}")
    try:
        for sl in runs.batches(n, SAMPLE_BATCH):
            images = ds.to_uint8(ib.decode_canvas(vq, x1[sl])).cpu()
            outputs.grid(images)
            outputs.images(images, x1[sl], labels[sl] if labels is not None else None)
    except BaseException:
        outputs.discard()
        raise
    path = args.out or os.path.join(args.home, "sample.png")
    outputs.finish(path)
    print(f"wrote {path}" + (f" (one row per {'prompt' if args.prompts else 'class'})" if per_row else ""),
          flush=True)


# -----------------------------------------------------------------------------
# masked editing (Sec. 4.3)

INPAINT_BATCH = 256    # rows per batch (completions x particles): small jobs run as one batch, large ones report progress
SAMPLE_BATCH = 256     # the same for samples


def inpaint(args, vq, chain, opts, g, device) -> None:
    """--inpaint: regenerate the --mask region of each input, --completions times, and write
    one row per input: the original, the masked input, the completions."""
    cfg = vq.cfg
    H = cfg.resolution
    # --- the inputs: test images (their codes, runs.test_codes), or image files
    if args.inpaint.startswith("test:"):
        try:
            B = int(args.inpaint[5:])
        except ValueError:
            raise runs.UserError(f"--inpaint test:N needs a number, got {args.inpaint!r}") from None
        count = runs.test_count(args.run)
        if not 1 <= B <= count:
            raise runs.UserError(f"--inpaint test:N takes N in 1..{count} (this run's test images), got {B}")
    else:
        B = len(args.inpaint.split(","))
    size = runs.parse_size(args.size, args.stride, vq.cfg)                        # a larger canvas (Sec. 4.2), or None
    place = args.place or "left"
    if size is not None:
        h, w = chain.cfg.grid
        if (place in ("left", "right") and size[1] <= w) or (place == "center" and size == (h, w)):
            raise runs.UserError(f"--place {place}: the canvas --size {args.size} is no larger than the image "
                                 f"in that direction, so there is nothing to draw beyond it")
    # --- the mask: drawn in pixels, then a token is regenerated when any of its f x f pixels is
    # (on a larger canvas no mask is needed: what lies beyond the image is drawn anyway)
    mask = args.mask or ("upper" if size is None else None)
    regen_px = pixel_mask(mask, H, H, args.seed) if mask else torch.zeros(H, H, dtype=torch.bool)
    regen = token_mask(regen_px, cfg.factor)
    if size is None and not regen.any():
        raise runs.UserError("the mask selects nothing to regenerate (it is all black): the output would be the input")
    if regen.all():
        raise runs.UserError("the mask covers the whole image, so nothing is given: that is plain sampling; "
                             "run sample.py without --inpaint")
    # --- the completions: every input once per completion, in batches of INPAINT_BATCH rows
    # (a progress line after each when there is more than one)
    reps = args.completions
    # a list of classes, or several prompts, cycle over the completions
    cond, _ = parse_condition(args, chain, 1 if args.prompts else B * reps, device)
    if args.prompts:
        cond["text"] = cond["text"].repeat(math.ceil(B * reps / len(args.prompts)), 1)[:B * reps]
    # one row per input: the original, the masked input (the regenerated region grey, on the
    # pixel mask's exact shape; on a larger canvas, the image where it is placed), its completions
    f = cfg.factor
    canvas = size or tuple(chain.cfg.grid)                          # (h, w) codes of what is drawn
    outputs = Outputs(args, B * reps, B * (reps + 2), reps + 2, (canvas[0] * f, canvas[1] * f), canvas,
                      "labels" in cond, f"--inpaint {args.inpaint} with --completions {reps}")
    keep_one = ~regen.to(device)                                    # (h, w), True = given
    per_batch = max(1, INPAINT_BATCH // (args.particles or 1))      # each completion decodes `particles` rows
    try:
        # --- the inputs as codes x_1 (test codes as they are, files encoded) and as
        # the first stage shows them, a batch at a time
        if args.inpaint.startswith("test:"):
            x1 = runs.test_codes(args.run, vq, first=B).long().to(device)
            x0 = torch.cat([vq.decode(x1[sl]) for sl in runs.batches(B, SAMPLE_BATCH)])
        else:
            x0 = ds.to_float(load_images(args.inpaint, H).to(device))
            x1 = torch.cat([vq.encode(x0[sl]) for sl in runs.batches(B, SAMPLE_BATCH)])
        shown = torch.where(regen_px.to(device)[None, None], torch.zeros_like(x0), x0)
        if size is not None:   # outpainting: the image on the canvas, the rest drawn through windows
            x0, shown = (pixels_on_canvas(z, size, place, f) for z in (x0, shown))
        originals, masked = ds.to_uint8(x0).cpu(), ds.to_uint8(shown).cpu()
        for sl in runs.batches(B * reps, per_batch, "inpainting" if B * reps > per_batch else None):
            rows = torch.arange(sl.start, sl.stop, device=device) // reps    # the input of each completion
            given, keep = x1[rows], keep_one.expand(len(rows), -1, -1)
            if size is not None:
                given, keep = place_on_canvas(given, keep, size, place)
            completions = chain.inpaint(given, keep, refine=args.refine, context=args.context,
                                        particles=args.particles, size=size, stride=args.stride, generator=g,
                                        **{k: v[sl] for k, v in cond.items()}, **opts)
            assert (completions[keep] == given[keep]).all(), "kept tokens changed"
            images = ds.to_uint8(ib.decode_canvas(vq, completions)).cpu()
            cells = []
            for j, image in zip(range(sl.start, sl.stop), images):
                if j % reps == 0:                                      # a new row: its input first
                    cells += [originals[j // reps], masked[j // reps]]
                cells.append(image)
            outputs.grid(torch.stack(cells))
            outputs.images(images, completions, cond["labels"][sl] if "labels" in cond else None)
    except BaseException:
        outputs.discard()
        raise
    path = args.out or os.path.join(args.home, "inpaint.png")
    outputs.finish(path)
    regenerated = canvas[0] * canvas[1] - int(keep_one.sum())
    print(f"wrote {path}: per row the original, the masked input ({regenerated} of {canvas[0] * canvas[1]} "
          f"tokens regenerated), {reps} completions", flush=True)


# -----------------------------------------------------------------------------
# the decoding benchmark and the judge

def benchmark(args) -> None:
    """Cached vs. uncached decoding of the same randomly initialised chain, batch and seed; with
    --cached-only, the cached sampler alone in seconds per image (Fig. 8, right: time against T);
    with --size, the window sampler on that canvas against ordinary cached sampling of as many
    tokens. --T, --n_embd, --n_layer_enc, --n_layer_dec change the preset's chain, so that the
    Table 3 runs' configs are timed with random weights (no run needed)."""
    device = runs.pick_device(args.device)
    base = runs.preset_config(ib.CHAIN_PRESETS, args.preset)
    K = 512 if args.preset == "cifar" else 256
    changes = {name: getattr(args, name) for name in BENCHMARK_FIELDS if getattr(args, name) is not None}
    cfg = dataclasses.replace(base, num_codes=K, grid=[8, 8], num_labels=10, **changes)
    runs.check_ranges(cfg, positive=("T", "n_embd", "n_layer_enc"), non_negative=("n_layer_dec",))
    if cfg.T < 2:
        raise runs.UserError(f"--T must be at least 2, got {cfg.T}")
    if cfg.n_embd % cfg.n_head:
        raise runs.UserError(f"--n_embd {cfg.n_embd} is not divisible by the preset's n_head {cfg.n_head}")
    if args.batch < 1:
        raise runs.UserError(f"--batch must be >= 1, got {args.batch}")
    torch.manual_seed(0)
    chain = ib.ImageBART(cfg).to(device).eval()
    labels = torch.arange(args.batch, device=device) % 10
    # what is timed: the chain's size (Table 3's configs split about the same parameters over T - 1
    # scales) and the device, by name on a GPU
    size = {"params_M": round(sum(p.numel() for p in chain.parameters()) / 1e6, 3),
            "params_by_scale_M": {t: round(sum(p.numel() for p in chain.scale(t).parameters()) / 1e6, 3)
                                  for t in range(chain.T, 1, -1)},
            "n_embd": cfg.n_embd, "n_layer_enc": cfg.n_layer_enc, "n_layer_dec": cfg.n_layer_dec}
    if device.type == "cuda":
        size["device_name"] = torch.cuda.get_device_name(device)

    def run(**kw) -> tuple[float, torch.Tensor]:
        g = torch.Generator(device).manual_seed(args.seed)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        x = chain.sample(args.batch, labels, generator=g, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, x

    if args.size:
        return benchmark_windows(args, chain, run, device, size)
    if args.cached_only:
        return benchmark_seconds_per_image(args, chain, run, device, size)
    # same seed on both paths: the key/value cache must not change a single sample
    run(use_cache=True)
    run(use_cache=False)                             # warm-up both paths
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_cached, x_cached = run(use_cache=True)
    t_uncached, x_uncached = run(use_cache=False)
    run(graph=True)                                  # warm-up (and on a GPU the capture)
    t_graph, x_graph = run(graph=True)               # static cache; on a GPU each step a CUDA graph
    tokens = args.batch * cfg.N * (chain.T - 1)      # every scale writes N tokens per image
    result = {"preset": args.preset, "device": str(device), "batch": args.batch, "T": chain.T, "N": cfg.N,
              "K": K, "params_per_scale_M": round(sum(p.numel() for p in chain.scale(2).parameters()) / 1e6, 3),
              "threads": torch.get_num_threads(),
              "cached_tokens_per_s": round(tokens / t_cached, 1), "cached_images_per_s": round(args.batch / t_cached, 3),
              "uncached_tokens_per_s": round(tokens / t_uncached, 1),
              "uncached_images_per_s": round(args.batch / t_uncached, 3),
              "speedup": round(t_uncached / t_cached, 2), "same_samples": bool((x_cached == x_uncached).all()),
              "static_cache": "CUDA graph" if device.type == "cuda" else "no graph without CUDA: the static cache only",
              "static_tokens_per_s": round(tokens / t_graph, 1), "static_speedup": round(t_uncached / t_graph, 2),
              "static_same_samples": bool((x_graph == x_cached).all()),
              # graph capture may change the arithmetic's order: then compare what is drawn
              "static_token_frequency_gap": round(float((torch.bincount(x_graph.flatten(), minlength=K) -
                                                         torch.bincount(x_cached.flatten(), minlength=K)).abs().sum()
                                                        / x_cached.numel()), 4),
              "cached_seconds_per_image": round(t_cached / args.batch, 5), **size}
    if device.type == "cuda":
        result["peak_memory_MiB"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    print(json.dumps(result), flush=True)


BENCHMARK_REPEATS = 3     # timed runs of --cached-only; the median is reported (a shared machine's noise)


def benchmark_seconds_per_image(args, chain: ib.ImageBART, run, device, size: dict) -> None:
    """--benchmark --cached-only: seconds per image of the cached sampler at --batch (Fig. 8,
    right, times sampling at batch 50 against the number of scales), the median of
    BENCHMARK_REPEATS runs after a warm-up, with the chain's size."""
    run(use_cache=True)                               # warm-up
    seconds = sorted(run(use_cache=True)[0] for _ in range(BENCHMARK_REPEATS))[BENCHMARK_REPEATS // 2]
    tokens = args.batch * chain.cfg.N * (chain.T - 1)
    result = {"preset": args.preset, "device": str(device), "batch": args.batch, "T": chain.T, "N": chain.cfg.N,
              "threads": torch.get_num_threads(), "seconds_per_image": round(seconds / args.batch, 5),
              "cached_tokens_per_s": round(tokens / seconds, 1), "repeats": BENCHMARK_REPEATS, **size}
    print(json.dumps(result), flush=True)


def benchmark_windows(args, chain: ib.ImageBART, run, device, size: dict) -> None:
    """--benchmark --size HxW: tokens per second of the window sampler on an H x W canvas (the
    preset's first stage: f = 4) with Taming's rule (--stride 1) and with the window moving
    --stride columns at a time (4 unless given), against ordinary cached sampling of as many
    tokens (the canvas's area in training images, each a batch of --batch), in one process;
    and whether the cached window path draws what its plain reference (no cache) draws (not
    with --cached-only). Also in seconds per canvas (per image of that size)."""
    h, w = chain.cfg.grid
    H, W = runs.parse_size(args.size, args.stride, ib.VQ_PRESETS[args.preset])   # its first stage: f = 4
    tiles = H * W / (h * w)                           # the canvas in training grids
    tokens = args.batch * H * W * (chain.T - 1)
    run(use_cache=True)                               # warm-up
    t0 = time.perf_counter()
    for _ in range(math.ceil(tiles)):
        run(use_cache=True)
    ordinary = (time.perf_counter() - t0) / math.ceil(tiles) * tiles
    result = {"preset": args.preset, "device": str(device), "batch": args.batch, "T": chain.T,
              "canvas_codes": [H, W], "threads": torch.get_num_threads(),
              "ordinary_tokens_per_s": round(tokens / ordinary, 1),
              "ordinary_seconds_per_canvas": round(ordinary / args.batch, 5), **size}
    for stride in sorted({1, args.stride if args.stride > 1 else w // 2}):
        seconds, x = run(size=(H, W), stride=stride)
        result[f"window_stride_{stride}_tokens_per_s"] = round(tokens / seconds, 1)
        result[f"window_stride_{stride}_seconds_per_canvas"] = round(seconds / args.batch, 5)
        result[f"window_stride_{stride}_slowdown"] = round(seconds / ordinary, 2)
        if not args.cached_only and (stride == 1 or args.no_cache):   # the reference is slow: one rule
            result[f"window_stride_{stride}_same_as_reference"] = bool(
                torch.equal(x, run(size=(H, W), stride=stride, use_cache=False)[1]))
    print(json.dumps(result), flush=True)


# -----------------------------------------------------------------------------
# the editing page (--serve): paint a mask, regenerate it (Sec. 4.3, Fig. 6 of the paper)

# The page, assets/editor.html: one HTML document with its script inline. It keeps two canvases
# over each other, the image (the run's resolution, shown 8x) and the mask the user paints (red = regenerate),
# sends the image and the mask as PNG data URLs to /api/complete, and shows what comes back.
# Every three seconds it asks /api/info, so it can say when the server has gone away.
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "editor.html")

MAX_UPLOAD = 8 * 2 ** 20          # bytes: a larger upload is refused with a message
MAX_COMPLETIONS = 16              # per request: a larger batch would hold the lock for long
MAX_WAITING = 4                   # completion jobs that may wait for the model behind the running one:
                                  # past it a classroom's extra clicks get 503 "busy, try again", not a queue
                                  # that outlives their patience (about 1 s a job on the 2-core CPU)


class Busy(Exception):
    """Too many completion jobs are waiting for the model: the page says "busy, try again" (503)."""


def field(req: dict, key: str, default=None):
    """A field of a page request; missing, null or "" (an empty input box) = `default`."""
    value = req.get(key)
    return default if value is None or value == "" else value


def data_url(images: torch.Tensor) -> list[str]:
    """images (B, 3, H, W) in [-1, 1] -> PNG data URLs, one per image."""
    # PNG in memory, base64 in the JSON: the page can show it at once, nothing touches the disk
    urls = []
    for img in ds.to_uint8(images).permute(0, 2, 3, 1).cpu().numpy():
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


def read_image(data: bytes, resolution: int, what: str) -> torch.Tensor:
    """Image bytes (any size and mode) -> x_0 (1, 3, H, W) in [-1, 1], resized as --inpaint does."""
    if len(data) > MAX_UPLOAD:
        raise runs.UserError(f"the {what} is {len(data) / 2 ** 20:.1f} MB; the limit is {MAX_UPLOAD // 2 ** 20} MB")
    try:
        with Image.open(io.BytesIO(data)) as im:
            pixels = ds.resize_center_crop(im, resolution)
    except Exception:
        raise runs.UserError(f"the {what} is not an image this server can read (PNG, JPEG, ...)") from None
    return ds.to_float(torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None])


def from_data_url(url: str, what: str) -> bytes:
    try:
        return base64.b64decode(url.split(",", 1)[1], validate=True)
    except Exception:
        raise runs.UserError(f"the {what} is not a data URL") from None


class Editor:
    """The model, loaded once, and the three things the page asks of it. One lock serialises
    the model work: requests come on threads (the page stays responsive, and can tell when
    the server has gone), but two completions never run at once."""

    def __init__(self, run: str, device):
        self.run, self.device = run, device
        self.vq, self.chain = runs.load_run(run, device)
        self.test, self.class_names = runs.test_codes(run, self.vq), runs.run_class_names(run)
        self.lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(1 + MAX_WAITING)      # the running job and those waiting

    def info(self) -> dict:
        """What the page needs to build its controls: classes or a prompt box, mask kinds, limits."""
        return {"run": self.run, "resolution": self.vq.cfg.resolution, "test_images": len(self.test),
                "T": self.chain.T, "classes": self.class_names if self.chain.num_labels else [],
                "text": self.chain.tokenizer is not None, "mask_kinds": list(MASK_KINDS),
                "refine": ib.INPAINT_REFINE, "particles": 0, "max_completions": MAX_COMPLETIONS,
                "max_waiting": MAX_WAITING}

    def test_image(self, index) -> dict:
        """A test image as the first stage sees it (its codes decoded); a random one without index."""
        n = len(self.test)
        # a random pick uses torch's global generator: the seed of a completion is the page's own
        index = int(torch.randint(0, n, ()).item()) if index is None else \
            runs.check_number(index, "the test image", 0, n - 1, whole=True)
        with self.lock:
            image = self.vq.decode(self.test[index:index + 1].long().to(self.device))
        return {"index": index, "image": data_url(image)[0]}

    def upload(self, data: bytes) -> dict:
        """An uploaded file, resized and center-cropped to the run's resolution, shown back."""
        return {"image": data_url(read_image(data, self.vq.cfg.resolution, "upload"))[0]}

    def complete(self, req: dict) -> dict:
        """{"image": data URL, "mask": data URL (white = regenerate) or "kind": a mask kind,
        "class" or "prompt", "guidance", "temperature", "top_k", "top_p", "refine", "particles",
        "completions", "seed"} -> the completions, the trajectory x_T .. x_1 of the first, and
        a grid to download, all as data URLs."""
        H, f = self.vq.cfg.resolution, self.vq.cfg.factor
        if not isinstance(req, dict):
            kind = {list: "an array", str: "a string", bool: "true or false", type(None): "null"}.get(type(req), "a number")
            raise runs.UserError(f"the request must be a JSON object (its fields by name), got {kind}")
        # --- every number first, each through the command line's own check
        seed = runs.check_number(field(req, "seed", 0), "seed", 0, runs.SEED_MAX, whole=True)
        n = runs.check_number(field(req, "completions", 4), "completions", 1, MAX_COMPLETIONS, whole=True)
        refine = runs.check_number(field(req, "refine", ib.INPAINT_REFINE), "refine", 0, 8, whole=True)
        # 0 particles (the default): the paper's masked process; 1..32: this code's particles
        particles = runs.check_number(field(req, "particles", 0), "particles", 0, 32, whole=True) or None
        # --- the input: the page sends the image it shows, at the run's resolution
        x0 = read_image(from_data_url(str(field(req, "image", "")), "image"), H, "image").to(self.device)
        # --- the mask: a kind (random boxes need the seed, so the server draws them), or the
        # painted PNG; a token is regenerated when any pixel of its f x f patch is painted
        if field(req, "kind"):
            if req["kind"] not in MASK_KINDS:     # never a path: pixel_mask would read a file of the server's
                raise runs.UserError(f"kind must be one of {', '.join(MASK_KINDS)}, got {req['kind']!r}")
            regen_px = pixel_mask(req["kind"], H, H, seed)
        else:
            mask = read_image(from_data_url(str(req.get("mask", "")), "mask"), H, "mask")
            regen_px = mask.mean(1)[0] > 0                                  # white (> mid grey) = regenerate
        regen = token_mask(regen_px, f)
        if not regen.any():
            raise runs.UserError("the mask selects nothing to regenerate: paint over part of the image")
        if regen.all():
            raise runs.UserError("the mask covers the whole image, so nothing is given: leave part of it")
        # the command line's own checks, on a namespace that looks like its arguments (an empty
        # field is the option's default; any other value is checked, never silently replaced)
        guidance = runs.check_number(field(req, "guidance", 0), "guidance", 0)
        opts = argparse.Namespace(temperature=str(field(req, "temperature", "1.0")), top_k=field(req, "top_k"),
                                  top_p=field(req, "top_p"), guidance=guidance, no_cache=False, run=self.run,
                                  classes=str(req["class"]) if field(req, "class") is not None else None,
                                  prompts=[str(req["prompt"])] if field(req, "prompt") else None)
        notes = []
        sampling = sampling_options(opts, self.chain.T, self.chain.diffusion.K,
                                    names={k: k for k in OPTION_NAMES}, log=notes.append)
        cond, _ = parse_condition(opts, self.chain, n, self.device)
        if opts.prompts:
            cond["text"] = cond["text"][:n]
        # --- a place in the queue: the running job and MAX_WAITING waiting ones, or 503
        if not self.slots.acquire(blocking=False):
            raise Busy(f"busy, try again: {MAX_WAITING} jobs are already waiting for the model (the most the "
                       f"server queues)")
        try:
            # --- the model work, one request at a time: the input's codes x_1, repeated once per
            # completion, go through the chain with the painted tokens regenerated (Sec. 4.3)
            with self.lock:
                t0 = time.time()
                x1 = self.vq.encode(x0).expand(n, -1, -1)
                keep = (~regen).to(self.device).expand(n, -1, -1)
                g = torch.Generator(self.device).manual_seed(seed)
                trajectory = self.chain.inpaint(x1, keep, refine=refine, particles=particles, trajectory=True,
                                                generator=g, **cond, **sampling)
                images = self.vq.decode(trajectory[-1])
                steps = self.vq.decode(torch.stack([x_t[0] for x_t in trajectory]))    # x_T .. x_1 of the first
        finally:
            self.slots.release()
        shown = torch.where(regen_px.to(self.device)[None, None], torch.zeros_like(x0), x0)
        with tempfile.TemporaryDirectory() as tmp:          # the grid to download: input, masked, completions
            runs.save_image_grid(torch.cat([x0, shown, images]), os.path.join(tmp, "grid.png"), nrow=n + 2)
            with open(os.path.join(tmp, "grid.png"), "rb") as fh:
                grid = "data:image/png;base64," + base64.b64encode(fh.read()).decode()
        return {"completions": data_url(images), "trajectory": data_url(steps), "masked": data_url(shown)[0],
                "grid": grid, "regenerated_tokens": int(regen.sum()), "tokens": regen.numel(),
                "seconds": round(time.time() - t0, 2), "notes": notes}


def make_handler(editor: Editor):
    from http.server import BaseHTTPRequestHandler
    from urllib.parse import parse_qs, urlparse

    class Handler(BaseHTTPRequestHandler):
        def reply(self, code: int, body: bytes, kind: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        # every endpoint answers JSON: the result, or {"error": one line} that the page shows
        def answer(self, work) -> None:
            """Run `work`: a client's mistake (a UserError) is a 400 with its line, a full queue a
            503; anything else is a fault of the server's, a 500 that says the job failed, with
            the traceback printed on the server's terminal (not sent to whoever asked)."""
            try:
                self.reply(200, json.dumps(work()).encode())
            except runs.UserError as e:
                self.reply(400, json.dumps({"error": str(e)}).encode())
            except Busy as e:
                self.reply(503, json.dumps({"error": str(e)}).encode())
            except Exception as e:
                traceback.print_exc()
                self.reply(500, json.dumps({"error": f"the job failed ({type(e).__name__}); the server's terminal "
                                                     f"shows why"}).encode())

        def body(self) -> bytes:
            """The request's body, by its Content-Length: none, a number >= 0 (-1 would read until
            the client closes, holding a thread), at most MAX_UPLOAD."""
            length = runs.check_number(self.headers.get("Content-Length") or 0, "Content-Length", 0, whole=True)
            if length > MAX_UPLOAD:
                self.close_connection = True
                # read (and drop) what a client is still sending, a piece at a time, so that it
                # gets the answer; one that claims far more is answered at once
                left = length if length <= 4 * MAX_UPLOAD else 0
                while left > 0:
                    chunk = self.rfile.read(min(2 ** 16, left))
                    if not chunk:
                        break
                    left -= len(chunk)
                raise runs.UserError(f"the upload is {length / 2 ** 20:.1f} MB; the limit is {MAX_UPLOAD // 2 ** 20} MB")
            return self.rfile.read(length)

        def do_GET(self):
            # the page itself, the run's description, and test images (as the first stage sees them)
            url = urlparse(self.path)
            query = parse_qs(url.query)
            if url.path == "/":
                with open(PAGE, "rb") as page:
                    self.reply(200, page.read(), "text/html; charset=utf-8")
            elif url.path == "/api/info":
                self.answer(editor.info)
            elif url.path == "/api/test":
                index = query.get("index", [""])[0]          # none: a random test image
                self.answer(lambda: editor.test_image(index or None))
            else:
                self.reply(404, json.dumps({"error": f"no page {url.path}"}).encode())

        def do_POST(self):
            # an uploaded image to resize, or a completion job
            if self.path == "/api/upload":
                self.answer(lambda: editor.upload(self.body()))
            elif self.path == "/api/complete":
                def work():
                    try:
                        req = json.loads(self.body() or b"{}")
                    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deeply
                        raise runs.UserError("the request is not JSON that this page can read") from None
                    return editor.complete(req)
                self.answer(work)
            else:
                self.reply(404, json.dumps({"error": f"no endpoint {self.path}"}).encode())

        def log_message(self, *args):     # one line per job is printed by serve(), not per request
            pass

    return Handler


def is_loopback(host: str) -> bool:
    """Whether an address to listen on is reachable from this machine alone (127.x.x.x, ::1, localhost)."""
    import ipaddress
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:                    # a host name: it may resolve to any interface
        return False


def serve(args, device) -> None:
    """--serve: the editing page on http://HOST:PORT (127.0.0.1 unless --host says otherwise)."""
    from http.server import ThreadingHTTPServer
    # a thread per request (the page's heartbeat is answered while a job runs); the model
    # itself is loaded once, here, before the first request
    editor = Editor(args.run, device)
    try:
        server = ThreadingHTTPServer((args.host, args.port), make_handler(editor))
    except OSError as e:
        raise runs.UserError(f"cannot serve on {args.host}:{args.port}: {e.strerror}") from None
    print(f"serving {args.run} on http://{args.host}:{server.server_address[1]}/ (Ctrl-C stops)", flush=True)
    if not is_loopback(args.host):
        print(f"warning: --host {args.host}: anyone who can reach this address can use the page (and this "
              f"machine's time); 127.0.0.1 keeps it to this machine", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.server_close()


# -----------------------------------------------------------------------------
# main: benchmark, inpaint, or sample (with --trajectory: every x_t)

def check_numbers(args) -> None:
    """Every number of the command line, through runs.check_number, before any work (the float
    options' and the lists' values in sampling_options, once the chain says how many scales)."""
    runs.check_number(args.guidance, "--guidance", 0)
    runs.check_number(args.seed, "--seed", 0, runs.SEED_MAX, whole=True)
    if args.benchmark:
        runs.check_number(args.batch, "--batch", 1, whole=True)
    elif args.serve:
        runs.check_number(args.port, "--port", 0, 65535, whole=True)
    if not args.benchmark:
        runs.check_number(args.refine, "--refine", 0, whole=True)
        if args.particles is not None:
            runs.check_number(args.particles, "--particles", 1, whole=True)
        runs.check_number(args.n, "--n", 1, whole=True)
        runs.check_number(args.completions, "--completions", 1, whole=True)


def sample(args, vq, chain, opts, g, device, size=None) -> None:
    """Samples (Sec. 3.3): x_T uniform, then the T - 1 scales in turn, in batches of SAMPLE_BATCH,
    each decoded and written as it comes (Outputs); with --trajectory one strip per sample,
    x_T ... x_1 each decoded by the first stage. On a larger --size canvas through windows
    (Sec. 4.2), with --across a condition changing from left to right, with --tiled the
    baseline of training-size samples side by side."""
    if args.across:     # one pair of conditions for every sample: left and right (Fig. 4)
        cond, per_row, n = across_condition(args, chain), None, args.n
    else:
        cond, per_row = parse_condition(args, chain, args.n, device)
        n = len(next(iter(cond.values()))) if cond else args.n
    T, f = chain.T, vq.cfg.factor
    canvas = size or tuple(chain.cfg.grid)
    pixels = (canvas[0] * f, canvas[1] * f)
    labels = None if args.across else cond.get("labels")
    nrow = T if args.trajectory else per_row or max(1, int(math.ceil(math.sqrt(n * pixels[0] / pixels[1]))))
    what = f"--n {args.n}" + (f" with --class {args.classes}" if args.classes == "all" else "") + \
        (" with --trajectory" if args.trajectory else "") + (f" at --size {args.size}" if size else "")
    outputs = Outputs(args, n, n * T if args.trajectory else n, nrow, pixels, canvas, labels is not None, what)
    t0 = time.time()
    try:
        for sl in runs.batches(n, SAMPLE_BATCH, "sampling" if n > SAMPLE_BATCH else None):
            here = cond if args.across else {k: v[sl] for k, v in cond.items()}
            if args.tiled:      # the baseline of patch-wise sampling: training-size samples, side by side
                trajectory = tiled_samples(args, chain, here, sl.stop - sl.start, size, g, opts)
            else:               # [x_T, ..., x_1], each (b, h, w)
                trajectory = chain.sample(sl.stop - sl.start, trajectory=True, generator=g, size=size,
                                          stride=args.stride, across=args.across, **here, **opts)
            images = ds.to_uint8(ib.decode_canvas(vq, trajectory[-1])).cpu()
            if args.trajectory:
                # the strips the grid still shows: x_T .. x_{2} decoded for those alone
                k = min(len(images), math.ceil(outputs.room() / T))
                if k:
                    steps = [ds.to_uint8(ib.decode_canvas(vq, x_t[:k])).cpu() for x_t in trajectory[:-1]] + [images[:k]]
                    outputs.grid(torch.stack(steps, dim=1).flatten(0, 1))    # (k * T, 3, H, W), row by row
            else:
                outputs.grid(images)
            outputs.images(images, trajectory[-1], labels[sl] if labels is not None else None)
    except BaseException:
        outputs.discard()
        raise
    print(f"sampled {n} images in {time.time() - t0:.1f}s", flush=True)
    path = args.out or os.path.join(args.home, "trajectory.png" if args.trajectory else "sample.png")
    outputs.finish(path)
    if args.trajectory:
        print(f"wrote {path}: each row decodes x_{T} (left) ... x_1 (right)", flush=True)
    else:
        print(f"wrote {path}" + (f" (one row per {'prompt' if args.prompts else 'class'})" if per_row else ""),
              flush=True)


def main():
    # --- the command line, every number and every combination checked before any work
    args = build_parser().parse_args()
    check_numbers(args)
    given = [f"--{name}" for name in BENCHMARK_FIELDS if getattr(args, name) is not None]
    if not args.benchmark and (given or args.cached_only):
        raise runs.UserError(f"{', '.join(given) or '--cached-only'}: for --benchmark's random chain; a run's chain "
                             f"is read from its checkpoints")
    check_selection_options(args)
    if args.benchmark:                        # a random chain: no run needed
        return benchmark(args)
    device = runs.pick_device(args.device)
    args.run, args.home = runs.choose_run(args.run)        # home: where default outputs go
    if not os.path.isdir(args.run):
        raise runs.UserError(f"no run at {args.run}; train one with: python train_chain.py --out {args.run}")
    # --- the modes that read the run but draw no grid: the loss curves, the editing page
    if args.plot:
        runs.refuse_shipped(args.run, "--plot")
        return print(f"wrote {', '.join(runs.plot_run(args.run))}", flush=True)
    if args.serve:
        return serve(args, device)
    if args.trajectory and args.inpaint:
        raise runs.UserError("--trajectory draws the strips of samples; it does not apply to --inpaint")
    # --- outputs: checked, their folders made (and checked writable) now, not after minutes of sampling
    check_outputs(args)
    check_canvas_options(args)
    # --- the run: first stage and chain, EMA weights
    vq, chain = runs.load_run(args.run, device)
    opts = sampling_options(args, chain.T, chain.diffusion.K)
    size = runs.parse_size(args.size, args.stride, vq.cfg)   # a larger canvas, drawn through windows (Sec. 4.2)
    g = torch.Generator(device).manual_seed(args.seed)      # one generator: the same command draws the same images
    # --- masked editing, samples chosen among candidates, or plain samples (with --trajectory every x_t)
    if args.inpaint:
        if args.classes == "all":
            raise runs.UserError("--inpaint takes one --class (or a list, cycled over the completions), not 'all'")
        return inpaint(args, vq, chain, opts, g, device)
    if args.accept is not None or args.rerank is not None:    # candidates, the best kept (Table 2, Fig. 3)
        return select(args, vq, chain, opts, g, device)
    sample(args, vq, chain, opts, g, device, size)


if __name__ == "__main__":
    runs.run_main(main)
