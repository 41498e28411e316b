"""Sample from a trained ImageBART run: samples, classes, trajectories, masked editing, the page.

    python sample.py --class all --n 8                          # one row per class -> sample.png
    python sample.py --trajectory                               # x_T ... x_1 decoded, one strip per sample
    python sample.py --inpaint test:8 --mask upper              # regenerate the upper half (Sec. 4.3)
    python sample.py --run runs/shapes_text --prompt "a red star" --guidance 1
    python sample.py --size 32x128 --class star                 # patch-wise, beyond the training size (Sec. 4.2)
    python sample.py --class star --n 8 --accept 0.25           # rejection with a classifier (Table 2)
    python sample.py --benchmark                                # cached vs. uncached decoding, no run needed
    python sample.py --serve                                    # a page to paint masks on: http://127.0.0.1:8000/

Sampling runs the reverse chain (Sec. 3.3): x_T uniform, then x_{t-1} ~ p^{t-1}(x_{t-1} | x_t, c) for
t = T..2 (c a class, a prompt, or the null condition), then x_0 = G(x_1). --temperature, --top-k
and --top-p take one value, or a comma list of one per scale for t = T, T-1, ..., 2.
"""
import argparse
import base64
import io
import json
import math
import os
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
from evaluate import MASK_KINDS, pixel_mask, refuse, token_mask


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add, per_scale = p.add_argument, "one value, or one per scale t = T..2"
    # --- what is drawn: from which run, how many, under which condition (Sec. 3.3, 4.2)
    add("--run", help="a run folder; default runs/shapes once trained, else the shipped run")
    add("--n", type=int, default=64, help="number of samples (per class with --class all)")
    add("--seed", type=int, default=0)
    add("--class", dest="classes",
        help="class index or name, comma list (one per sample, cycled) or 'all' (one row per class)")
    add("--prompt", dest="prompts", action="append", metavar="TEXT",
        help="a text chain's prompt, e.g. 'a red star'; repeat it for more rows")
    # --- how: this code's sampling options, one value or one per scale
    add("--temperature", default="1.0", help=per_scale)
    add("--top-k", help=per_scale)
    add("--top-p", help=per_scale)
    add("--guidance", type=float, default=0.0, help="classifier-free guidance weight w: (1+w) cond - w uncond")
    add("--no-cache", action="store_true", help="decode without the key/value cache (slow; for study)")
    # --- where the images go
    add("--out", help="grid PNG (default <run>/sample.png, trajectory.png, inpaint.png; the working folder for a "
                      "shipped run)")
    add("--out-dir", help="also write one PNG per sample here (for FID tools)")
    add("--npz", help="also save uint8 NHWC images, codes and labels here")
    add("--trajectory", action="store_true", help="decode every x_t of the chain, x_T ... x_1")
    # --- masked editing (Sec. 4.3)
    add("--inpaint", help="image file(s), comma-separated, or test:N (N test images)")
    add("--mask", help=f"the region to regenerate: {', '.join(MASK_KINDS)}, or a PNG (white = regenerate); "
                       f"default upper, or none with --size")
    add("--completions", type=int, default=6, help="completions per inpainted image")
    add("--refine", type=int, default=ib.INPAINT_REFINE,
        help="inpainting: forward-backward rounds per scale (none at t = T), the paper's masked process")
    add("--particles", type=int,
        help="inpainting, this code's own: draws per image, resampled by how well they fit the given tokens")
    add("--context", choices=("clean", "noised"), default="clean",
        help="inpainting: given tokens clean at every scale (Sec. 4.3), or noised like x_t")
    # --- beyond the training canvas (Sec. 4.2)
    add("--size", metavar="HxW", help="draw (or complete) H x W pixels, patch-wise")
    add("--stride", type=int, default=1, help="--size: columns the window moves at a time; 1 = Taming's rule")
    add("--place", choices=("left", "right", "center"),
        help="--inpaint with --size: where the given image goes on the canvas (default left)")
    add("--tiled", action="store_true", help="--size: the baseline, independent samples side by side")
    add("--across", action="store_true",
        help="two conditions (--class A,B or --prompt A --prompt B), left and right, mixed in between")
    evaluate.add_selection_args(p)
    add("--device")
    # --- instead of sampling: loss curves, the editing page, the decoding benchmark (no run needed)
    add("--plot", action="store_true", help="draw the run's loss curves from its logs (loss_*.png)")
    add("--serve", action="store_true", help="serve a page to paint masks on and regenerate them")
    add("--host", default="127.0.0.1", help="--serve: the address to listen on")
    add("--port", type=int, default=8000, help="--serve: the port (0 = any free one)")
    add("--benchmark", action="store_true", help="time cached vs. uncached decoding; one JSON line")
    add("--preset", default="tiny", help="--benchmark: the random chain's preset")
    add("--batch", type=int, default=16, help="--benchmark: the batch")
    for name in BENCHMARK_FIELDS:
        add(f"--{name}", type=int, help=f"--benchmark: the random chain's {name}")
    add("--cached-only", action="store_true", help="--benchmark: the cached sampler alone, seconds per image (Fig. 8)")
    return p


BENCHMARK_FIELDS = ("T", "n_embd", "n_layer_enc", "n_layer_dec")   # enough for the Table 3 runs' configs
OPTION_NAMES = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p", "guidance": "--guidance"}
BATCH = 256          # rows per batch of sampling and inpainting (completions x particles)


# -----------------------------------------------------------------------------
# sampling options and conditions, checked before any sampling

def sampling_options(args, T: int, K: int | None = None, names: dict = OPTION_NAMES, log=print) -> dict:
    """--temperature, --top-k, --top-p (one value or T-1) and --guidance, through runs.check_number; a top-k
    of at least K keeps every code, which is said."""
    def parse(text, key, **rule):
        if text is None:
            return None
        values = [runs.check_number(v, names[key], **rule) for v in str(text).split(",")]
        refuse(len(values) not in (1, T - 1), f"{names[key]} has {len(values)} values; give 1, or {T - 1} for this "
                                              f"chain's {T - 1} scales (t = {T}..2)")
        return values[0] if len(values) == 1 else values
    top_k = parse(args.top_k, "top_k", low=1, whole=True)
    if K is not None and top_k is not None and max(top_k if isinstance(top_k, list) else [top_k]) >= K:
        log(f"note: {names['top_k']} {args.top_k}: a top-k of at least K = {K} (this run's codes) keeps every "
            f"code, so it filters nothing")
    return dict(temperature=parse(args.temperature, "temperature", low=0, above=True), top_k=top_k,
                top_p=parse(args.top_p, "top_p", low=0, high=1, above=True),
                guidance=runs.check_number(args.guidance, names["guidance"], 0), use_cache=not args.no_cache)


def parse_condition(args, chain: ib.ImageBART, n: int, device, across: bool = False) -> tuple[dict, int | None]:
    """--class or --prompt -> (the sampling methods' condition: {"labels": (n',)}, {"text": ids (n', text_len)}
    or {}; samples per row). --class all, --prompt: n of each, a row each; a class list is cycled; across: the pair."""
    refuse(args.prompts and args.classes is not None, "give --class or --prompt, not both")
    if args.classes is None and not args.prompts:
        refuse(args.guidance, "--guidance needs --class or --prompt: it steers towards a condition")
        return {}, None
    text = chain.tokenizer is not None
    kind = "conditioned on text" if text else "class-conditional" if chain.num_labels else "unconditional"
    if args.prompts:
        refuse(not text, f"this run's chain is {kind}; it takes no --prompt (train one with --condition text)")
        if unknown := chain.tokenizer.unknown(args.prompts):
            print(f"warning: not in this run's vocabulary, read as <unk>: {', '.join(unknown)}")
        with runs.user_errors():                               # too long: one line
            ids = chain.tokenizer.encode(args.prompts)         # (prompts, text_len)
        return ({"text": list(args.prompts)}, None) if across else ({"text": ids.repeat_interleave(n, 0).to(device)}, n)
    refuse(not chain.num_labels, f"this run's chain is {kind}; " + ("use --prompt, not --class" if text
                                                                    else "it takes no --class"))
    if args.classes == "all":
        return {"labels": torch.arange(chain.num_labels, device=device).repeat_interleave(n)}, n
    words = [c.strip() for c in args.classes.split(",")]                # each an index ("6") or a name ("star")
    names = [] if all(w.lstrip("-").isdigit() for w in words) else runs.run_class_names(args.run)
    for w in words:
        known = f"one of {', '.join(names)}" if names else "an index (this run records no class names)"
        refuse(not w.lstrip("-").isdigit() and w not in names,
               f"--class {w!r}: no class of that name; give {known}, a comma list, or 'all'")
    classes = [int(w) if w.lstrip("-").isdigit() else names.index(w) for w in words]
    bad = [c for c in classes if not 0 <= c < chain.num_labels]
    refuse(bad, f"class {bad[0] if bad else ''} is outside this data set's labels 0..{chain.num_labels - 1}")
    if across:
        return {"labels": classes}, None
    return {"labels": torch.tensor(classes).repeat(math.ceil(n / len(classes)))[:n].to(device)}, None


def check_options(args) -> None:
    """Every number and every combination of the command line, before any work."""
    runs.check_number(args.guidance, "--guidance", 0)
    for name, low, high in (("seed", 0, runs.SEED_MAX), ("batch", 1, None), ("port", 0, 65535), ("refine", 0, None),
                            ("particles", 1, None), ("n", 1, None), ("completions", 1, None)):
        if getattr(args, name) is not None:                             # --particles: only where given
            runs.check_number(getattr(args, name), f"--{name}", low, high, whole=True)
    given = [f"--{name}" for name in BENCHMARK_FIELDS if getattr(args, name) is not None]
    refuse(not args.benchmark and (given or args.cached_only), f"{', '.join(given) or '--cached-only'}: for "
           f"--benchmark's random chain; a run's chain is read from its checkpoints")
    evaluate.check_selection(args.accept, args.rerank, args.scorer, args.classifier_steps)
    if args.accept is not None or args.rerank is not None:
        flag = "--accept" if args.accept is not None else "--rerank"
        for other in ("inpaint", "serve", "trajectory", "size", "across", "plot", "benchmark"):
            refuse(getattr(args, other), f"{flag} chooses among new samples of the training size; it does not "
                                         f"apply to --{other}")
        refuse(args.rerank is not None and args.n > args.rerank, f"--rerank {args.rerank} keeps the best --n of "
               f"{args.rerank} candidates per class or prompt; --n {args.n} is more than {args.rerank}")
    refuse(args.stride != 1 and not args.size, "--stride moves the windows of a --size canvas; give --size")
    refuse(args.tiled and (not args.size or args.across),
           "--tiled draws the baseline of a --size canvas (without --across)")
    refuse(args.place and not (args.inpaint and args.size),
           "--place puts an --inpaint image on a larger --size canvas; give both")
    classes = [c for c in (args.classes or "").split(",") if c.strip()]
    pair = len(args.prompts or []) + (len(classes) if args.classes != "all" else 0) == 2
    refuse(args.across and (not pair or (args.prompts and args.classes)),
           "--across takes exactly two conditions: --class A,B or --prompt A --prompt B")
    refuse(args.trajectory and args.inpaint, "--trajectory draws the strips of samples; it does not apply to --inpaint")
    refuse(args.inpaint and args.classes == "all",
           "--inpaint takes one --class (or a list, cycled over the completions), not 'all'")
    # outputs: never a run's own file; the kind of file their names say; folders writable, made now
    for flag, path in (("--out", args.out), ("--npz", args.npz)):
        if path is not None:
            runs.refuse_run_file(flag, path, args.run)
            runs.ensure_writable_dir(os.path.dirname(os.path.abspath(path)))
    extensions = tuple(e for e in ds.IMAGE_EXTENSIONS if Image.registered_extensions().get(e) in Image.SAVE)
    refuse(args.out and not args.out.lower().endswith(extensions),
           f"--out {args.out}: a grid is an image; give a name ending in {', '.join(extensions)}")
    refuse(args.npz and not args.npz.lower().endswith(".npz"),
           f"--npz {args.npz}: the arrays go into an .npz file; give a name ending in .npz")
    if args.out_dir:
        runs.refuse_shipped(args.out_dir, "--out-dir")
        runs.ensure_writable_dir(args.out_dir)


# -----------------------------------------------------------------------------
# images out: a grid, and for other tools one PNG per image or one .npz

def write(args, grid: torch.Tensor, nrow: int, name: str, images, codes, labels=None) -> str:
    """grid uint8 (C, 3, H, W) -> --out (default `name` in args.home); images uint8 (n, 3, H, W) -> a PNG
    each in --out-dir, and with codes and labels -> --npz. -> the grid's path."""
    path, nhwc = args.out or os.path.join(args.home, name), images.permute(0, 2, 3, 1).numpy()
    runs.save_image_grid(grid, path, nrow=nrow)
    if args.out_dir:
        for i, img in enumerate(nhwc):
            runs.save_image(Image.fromarray(img), os.path.join(args.out_dir, f"{i:06d}.png"))
        print(f"wrote {len(images)} PNGs to {args.out_dir}", flush=True)
    if args.npz:
        labels = np.zeros(0, np.int64) if labels is None else labels.cpu().numpy().astype(np.int64)
        with runs.replacing(args.npz) as tmp, open(tmp, "wb") as f:
            np.savez(f, images=nhwc, codes=codes.cpu().numpy().astype(np.int64), labels=labels)
        print(f"wrote {args.npz}", flush=True)
    return path


def decode(vq: ib.VQGAN, x1: torch.Tensor) -> torch.Tensor:
    """codes (n, H, W) -> uint8 images on the CPU, BATCH at a time (a large grid window by window)."""
    return torch.cat([ds.to_uint8(ib.decode_canvas(vq, x1[sl])).cpu() for sl in runs.batches(len(x1), BATCH)])


def sample(args, vq, chain, opts, g, device, size=None) -> None:
    """Samples (Sec. 3.3), BATCH at a time; --trajectory: a strip x_T ... x_1 per sample. A larger --size canvas
    through windows (Sec. 4.2); --across: two conditions, left to right; --tiled: training-size samples side by side."""
    cond, per_row = parse_condition(args, chain, args.n, device, args.across)
    n = len(next(iter(cond.values()))) if cond and not args.across else args.n
    (h, w), (H, W), f = chain.cfg.grid, size or chain.cfg.grid, vq.cfg.factor
    nrow = chain.T if args.trajectory else per_row or max(1, math.ceil(math.sqrt(n * H / W)))  # squarish
    t0, states = time.time(), []
    for sl in runs.batches(n, BATCH, "sampling" if n > BATCH else None):
        here, m = cond if args.across else {k: v[sl] for k, v in cond.items()}, sl.stop - sl.start
        if (size or args.across) and not args.tiled:
            with runs.user_errors():
                xs = ib.sample_canvas(chain, m, size=size, stride=args.stride, across=args.across, trajectory=True,
                                      generator=g, **here, **opts)
        else:   # --tiled, the baseline of patch-wise sampling: rows x cols training-size samples side by side
            rows, cols = (math.ceil(H / h), math.ceil(W / w)) if args.tiled else (1, 1)
            each = {k: v.repeat_interleave(rows * cols, 0) for k, v in here.items()}
            xs = chain.sample(m * rows * cols, trajectory=True, generator=g, **each, **opts)
            xs = [rearrange(x, "(n r c) h w -> n (r h) (c w)", r=rows, c=cols)[:, :H, :W] for x in xs]
        states.append([x.cpu() for x in xs])
    print(f"sampled {n} images in {time.time() - t0:.1f}s", flush=True)
    xs = [torch.cat(s) for s in zip(*states)]                    # [x_T, ..., x_1], each (n, H, W)
    images, labels = decode(vq, xs[-1]), None if args.across else cond.get("labels")
    if args.trajectory:     # each strip: x_T .. x_1, every state decoded by the first stage
        grid = torch.stack([decode(vq, x) for x in xs[:-1]] + [images], dim=1).flatten(0, 1)
        path = write(args, grid, chain.T, "trajectory.png", images, xs[-1], labels)
        return print(f"wrote {path}: each row decodes x_{chain.T} (left) ... x_1 (right)", flush=True)
    path = write(args, images, nrow, "sample.png", images, xs[-1], labels)
    print(f"wrote {path}" + (f" (one row per {'prompt' if args.prompts else 'class'})" if per_row else ""), flush=True)


def select(args, vq, chain, opts, g, device) -> None:
    """--accept or --rerank: each class's or prompt's samples chosen among more candidates
    (evaluate.sample_best_of), by the classifier of codes or by the chain's Bayes score."""
    flag = "--accept" if args.accept is not None else "--rerank"
    refuse(chain.num_labels is None and chain.tokenizer is None, f"this run's chain is unconditional: {flag} chooses "
           f"samples by how well they show their class or prompt, so it needs a conditional run")
    cond, per_row = parse_condition(args, chain, args.n, device)
    refuse(not cond, f"{flag} needs --class (or --prompt): it keeps the candidates that best show what was asked")
    n, scorer = len(next(iter(cond.values()))), "classifier" if args.accept is not None else args.scorer or "bayes"
    if scorer == "bayes":   # its own generator: the bound's draws do not move the samples' random numbers
        score = evaluate.bayes_scorer(chain, cond, torch.Generator(device).manual_seed(args.seed))
    else:
        targets, names = cond.get("labels"), runs.run_class_names(args.run) if args.prompts else []
        for prompt in args.prompts or []:     # the class a prompt names: the one class name among its words
            found = sorted({names.index(w) for w in ib.Tokenizer.words(prompt) if w in names})
            refuse(len(found) != 1, f"--prompt {prompt!r} names {'none' if not found else 'more than one'} of this "
                   f"run's classes; the classifier scores the class a prompt names, so name one (or --rerank with "
                   f"--scorer bayes)")
            targets = torch.cat([targets, torch.tensor(found * per_row)]) if targets is not None else \
                torch.tensor(found * per_row)
        steps = {"steps": args.classifier_steps} if args.classifier_steps else {}
        classifier, _ = evaluate.classifier_for(args.run, args.judge_dir, evaluate.CodeClassifierConfig(**steps), device)
        score = evaluate.classifier_score(classifier, targets)
    best = evaluate.sample_best_of(chain, n, score, **cond, accept=args.accept, rerank=args.rerank, generator=g,
                                   batch=BATCH, what="sampling candidates", **opts)
    how = f"rejection, R = {args.accept:g}" if args.accept else f"best of {args.rerank} by the {scorer} score"
    print(f"kept {n} of {len(best.candidates)} candidates ({how}): sampling {best.sample_seconds:.1f}s, "
          f"scoring {best.score_seconds:.1f}s", flush=True)
    images = decode(vq, best.codes)
    path = write(args, images, per_row or max(1, math.ceil(math.sqrt(n))), "sample.png", images, best.codes,
                 cond.get("labels"))
    print(f"wrote {path}", flush=True)


# -----------------------------------------------------------------------------
# masked editing (Sec. 4.3), and outpainting on a larger canvas (Sec. 4.2)

def load_images(spec: str, resolution: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) from comma-separated image files, resized and cropped to the run's resolution."""
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


def inpaint(args, vq, chain, opts, g, device) -> None:
    """--inpaint: the --mask region of each input regenerated --completions times; a row per input: the original,
    the masked input, the completions. --size: the image --place'd on a larger canvas, the rest drawn (outpainting)."""
    H, f, reps, (h, w), test = vq.cfg.resolution, vq.cfg.factor, args.completions, chain.cfg.grid, \
        args.inpaint.startswith("test:")
    try:
        B = int(args.inpaint[5:]) if test else len(args.inpaint.split(","))
    except ValueError:
        raise runs.UserError(f"--inpaint test:N needs a number, got {args.inpaint!r}") from None
    count = runs.test_count(args.run) if test else 0
    if test and not 1 <= B <= count:
        raise runs.UserError(f"--inpaint test:N takes N in 1..{count} (this run's test images), got {B}")
    size, place = runs.parse_size(args.size, args.stride, vq.cfg), args.place or "left"
    canvas = size or (h, w)
    refuse(size is not None and (size == (h, w) if place == "center" else size[1] <= w), f"--place {place}: the "
           f"canvas --size {args.size} is no larger than the image in that direction, so there is nothing to draw beyond it")
    # the mask, in pixels; a token is regenerated when any of its f x f pixels is (Sec. 4.3)
    mask = args.mask or ("upper" if size is None else None)
    regen_px = pixel_mask(mask, H, H, args.seed) if mask else torch.zeros(H, H, dtype=torch.bool)
    regen = token_mask(regen_px, f)
    refuse(size is None and not regen.any(),
           "the mask selects nothing to regenerate (it is all black): the output would be the input")
    refuse(regen.all(), "the mask covers the whole image, so nothing is given: that is plain sampling; "
                        "run sample.py without --inpaint")
    cond, _ = parse_condition(args, chain, 1 if args.prompts else B * reps, device)
    if args.prompts:   # several prompts cycle over the completions
        cond["text"] = cond["text"].repeat(math.ceil(B * reps / len(args.prompts)), 1)[:B * reps]
    # the inputs as codes x_1 (test codes as they are, files encoded) and as the first stage shows them
    if test:
        x1 = runs.test_codes(args.run, vq, first=B).long().to(device)
        x0 = torch.cat([vq.decode(x1[sl]) for sl in runs.batches(B, BATCH)])
    else:
        x0 = ds.to_float(load_images(args.inpaint, H).to(device))
        x1 = torch.cat([vq.encode(x0[sl]) for sl in runs.batches(B, BATCH)])
    shown = torch.where(regen_px.to(device)[None, None], torch.zeros_like(x0), x0)    # grey where regenerated
    # on the canvas, at (top, left): the given codes, what is kept of them, and the two pictures
    top, left = (canvas[0] - h) // 2, {"left": 0, "right": canvas[1] - w, "center": (canvas[1] - w) // 2}[place]
    given = torch.zeros(B, *canvas, dtype=torch.long, device=device)
    keep = torch.zeros_like(given, dtype=torch.bool)
    given[:, top:top + h, left:left + w], keep[:, top:top + h, left:left + w] = x1, ~regen.to(device)
    pixels = torch.zeros(2, B, 3, canvas[0] * f, canvas[1] * f, device=device)   # the original and the masked input
    pixels[..., top * f:(top + h) * f, left * f:(left + w) * f] = torch.stack([x0, shown])
    per_batch, completions = max(1, BATCH // (args.particles or 1)), []   # each completion decodes `particles` rows
    reader = ib.windows(chain, canvas, args.stride) if size else None
    for sl in runs.batches(B * reps, per_batch, "inpainting" if B * reps > per_batch else None):
        rows = torch.arange(sl.start, sl.stop, device=device) // reps    # the input of each completion
        out = evaluate.complete(chain, given[rows], keep[rows], particles=args.particles, context=args.context,
                                refine=args.refine, reader=reader, generator=g, **{k: v[sl] for k, v in cond.items()},
                                **opts)
        assert (out[keep[rows]] == given[rows][keep[rows]]).all(), "given tokens changed"
        completions.append(out)
    completions = torch.cat(completions)
    images, (originals, masked) = decode(vq, completions), ds.to_uint8(pixels).cpu()
    grid = torch.cat([originals[:, None], masked[:, None], images.unflatten(0, (B, reps))], 1).flatten(0, 1)
    path = write(args, grid, reps + 2, "inpaint.png", images, completions, cond.get("labels"))
    print(f"wrote {path}: per row the original, the masked input ({int((~keep[0]).sum())} of {canvas[0] * canvas[1]} "
          f"tokens regenerated), {reps} completions", flush=True)


# -----------------------------------------------------------------------------
# the decoding benchmark

def benchmark(args) -> None:
    """Cached against uncached decoding of one random chain, batch and seed (the cache must not change a sample);
    --cached-only: the cached sampler alone, seconds per image, median of three (Fig. 8, right: time against T);
    --size: the window sampler against ordinary sampling of as many tokens. --T, --n_embd, --n_layer_enc and
    --n_layer_dec change the preset's chain: the Table 3 configs, timed with random weights."""
    device = runs.pick_device(args.device)
    changes = {name: getattr(args, name) for name in BENCHMARK_FIELDS if getattr(args, name) is not None}
    cfg = ib.ChainConfig(**{**vars(runs.preset_config(ib.CHAIN_PRESETS, args.preset)), **changes,
                            "num_codes": 512 if args.preset == "cifar" else 256, "grid": [8, 8], "num_labels": 10})
    runs.check_ranges(cfg, positive=("T", "n_embd", "n_layer_enc"), non_negative=("n_layer_dec",))
    refuse(cfg.T < 2 or cfg.n_embd % cfg.n_head,
           f"--T must be at least 2 and --n_embd divisible by {cfg.n_head}, got {cfg.T}, {cfg.n_embd}")
    torch.manual_seed(0)
    chain = ib.ImageBART(cfg).to(device).eval()
    labels, sync = torch.arange(args.batch, device=device) % 10, getattr(torch.cuda, "synchronize", None)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(**kw):
        g = torch.Generator(device).manual_seed(args.seed)
        sync()
        t0 = time.perf_counter()
        x = ib.sample_canvas(chain, args.batch, labels, generator=g, **kw) if "size" in kw else \
            chain.sample(args.batch, labels, generator=g, **kw)
        sync()
        return time.perf_counter() - t0, x
    tokens = args.batch * cfg.N * (chain.T - 1)        # every scale writes N tokens per image
    millions = lambda module: round(sum(p.numel() for p in module.parameters()) / 1e6, 3)
    result = {"preset": args.preset, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
              "batch": args.batch, "T": chain.T, "N": cfg.N, "threads": torch.get_num_threads(),
              "params_M": millions(chain), "params_by_scale_M": {t: millions(chain.scale(t)) for t in range(chain.T, 1, -1)}}
    result |= changes
    run()                                              # warm-up
    if args.size:                                      # the window sampler, Taming's rule and strided
        H, W = runs.parse_size(args.size, args.stride, ib.VQ_PRESETS[args.preset])
        tiles = math.ceil(H * W / cfg.N)
        ordinary = sum(run()[0] for _ in range(tiles)) * H * W / cfg.N / tiles
        result |= {"canvas_codes": [H, W], "ordinary_seconds_per_canvas": round(ordinary / args.batch, 5)}
        for stride in sorted({1, args.stride if args.stride > 1 else cfg.grid[1] // 2}):
            seconds, x = run(size=(H, W), stride=stride)
            result |= {f"window_stride_{stride}_seconds_per_canvas": round(seconds / args.batch, 5),
                       f"window_stride_{stride}_slowdown": round(seconds / ordinary, 2)}
            if not args.cached_only and stride == 1:   # the reference is slow: one rule
                result["window_stride_1_same_as_reference"] = bool(torch.equal(x, run(size=(H, W), use_cache=False)[1]))
    elif args.cached_only:
        seconds = sorted(run()[0] for _ in range(3))[1]
        result |= {"seconds_per_image": round(seconds / args.batch, 5), "cached_tokens_per_s": round(tokens / seconds, 1)}
    else:
        run(use_cache=False)
        (t_cached, x_cached), (t_uncached, x_uncached) = run(), run(use_cache=False)
        result |= {"cached_tokens_per_s": round(tokens / t_cached, 1), "uncached_tokens_per_s": round(tokens / t_uncached, 1),
                   "speedup": round(t_uncached / t_cached, 2), "same_samples": bool((x_cached == x_uncached).all()),
                   "cached_seconds_per_image": round(t_cached / args.batch, 5)}
    print(json.dumps(result), flush=True)


# -----------------------------------------------------------------------------
# the editing page (--serve): paint a mask, regenerate it (Sec. 4.3, Fig. 6)
# assets/editor.html sends the image and the painted mask as PNG data URLs to /api/complete and shows
# what comes back; it asks /api/info every three seconds, to say when the server has gone away.
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "editor.html")
MAX_UPLOAD = 8 * 2 ** 20          # bytes
MAX_COMPLETIONS = 16              # per request: a larger batch would hold the model for long


def data_url(images: torch.Tensor) -> list[str]:
    """images (B, 3, H, W) in [-1, 1] -> PNG data URLs, made in memory."""
    urls = []
    for img in ds.to_uint8(images).permute(0, 2, 3, 1).cpu().numpy():
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


def read_image(data, resolution: int, what: str) -> torch.Tensor:
    """Image bytes, or a data URL -> x_0 (1, 3, H, W) in [-1, 1], resized as --inpaint does."""
    if isinstance(data, str):
        try:
            data = base64.b64decode(data.split(",", 1)[1], validate=True)
        except Exception:
            raise runs.UserError(f"the {what} is not a data URL") from None
    refuse(len(data) > MAX_UPLOAD, f"the {what} is {len(data) / 2 ** 20:.1f} MB; the limit is {MAX_UPLOAD // 2 ** 20} MB")
    try:
        with Image.open(io.BytesIO(data)) as im:
            pixels = ds.resize_center_crop(im, resolution)
    except Exception:
        raise runs.UserError(f"the {what} is not an image this server can read (PNG, JPEG, ...)") from None
    return ds.to_float(torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None])


class Editor:
    """The model, loaded once, and what the page asks of it. Requests come on threads (the page
    stays responsive), and one lock makes two completions never run at once."""

    def __init__(self, run: str, device):
        self.run, self.device = run, device
        self.vq, self.chain = runs.load_run(run, device)
        self.test, self.class_names = runs.test_codes(run, self.vq), runs.run_class_names(run)
        self.lock = threading.Lock()

    def info(self) -> dict:
        return {"run": self.run, "resolution": self.vq.cfg.resolution, "test_images": len(self.test),
                "T": self.chain.T, "classes": self.class_names if self.chain.num_labels else [],
                "text": self.chain.tokenizer is not None, "mask_kinds": list(MASK_KINDS), "refine": ib.INPAINT_REFINE,
                "particles": 0, "max_completions": MAX_COMPLETIONS}

    def test_image(self, index) -> dict:
        """A test image as the first stage sees it (its codes decoded); a random one without index."""
        index = int(torch.randint(0, len(self.test), ()).item()) if index is None else \
            runs.check_number(index, "the test image", 0, len(self.test) - 1, whole=True)
        with self.lock:
            return {"index": index, "image": data_url(self.vq.decode(self.test[index:index + 1].long().to(self.device)))[0]}

    def complete(self, req: dict) -> dict:
        """{"image", "mask" (data URLs; white = regenerate) or "kind", "class" or "prompt", "guidance", "temperature",
        "top_k", "top_p", "refine", "particles", "completions", "seed"} -> the completions, the trajectory x_T .. x_1
        of the first, and a grid, as data URLs."""
        refuse(not isinstance(req, dict), "the request must be a JSON object (its fields by name)")
        field = lambda key, default=None: default if req.get(key) in (None, "") else req[key]
        whole = lambda key, default, low, high: runs.check_number(field(key, default), key, low, high, whole=True)
        H, seed, n = self.vq.cfg.resolution, whole("seed", 0, 0, runs.SEED_MAX), whole("completions", 4, 1, MAX_COMPLETIONS)
        refine, particles = whole("refine", ib.INPAINT_REFINE, 0, 8), whole("particles", 0, 0, 32) or None
        x0 = read_image(str(field("image", "")), H, "image").to(self.device)
        if field("kind"):      # never a path: pixel_mask would read a file of the server's
            refuse(req["kind"] not in MASK_KINDS, f"kind must be one of {', '.join(MASK_KINDS)}, got {req['kind']!r}")
            regen_px = pixel_mask(req["kind"], H, H, seed)
        else:
            regen_px = read_image(str(req.get("mask", "")), H, "mask").mean(1)[0] > 0    # white = regenerate
        regen = token_mask(regen_px, self.vq.cfg.factor)
        refuse(not regen.any(), "the mask selects nothing to regenerate: paint over part of the image")
        refuse(regen.all(), "the mask covers the whole image, so nothing is given: leave part of it")
        # the command line's own checks, on a namespace that looks like its arguments
        opts = argparse.Namespace(temperature=str(field("temperature", "1.0")), top_k=field("top_k"), top_p=field("top_p"),
                                  guidance=runs.check_number(field("guidance", 0), "guidance", 0), no_cache=False,
                                  run=self.run, classes=str(req["class"]) if field("class") is not None else None,
                                  prompts=[str(req["prompt"])] if field("prompt") else None)
        notes = []
        sampling = sampling_options(opts, self.chain.T, self.chain.diffusion.K, {k: k for k in OPTION_NAMES}, notes.append)
        cond = {k: v[:n] for k, v in parse_condition(opts, self.chain, n, self.device)[0].items()}
        with self.lock:       # the input's codes x_1, once per completion, through the masked process
            t0 = time.time()
            x1, keep = self.vq.encode(x0).expand(n, -1, -1), (~regen).to(self.device).expand(n, -1, -1)
            xs = evaluate.complete(self.chain, x1, keep, particles=particles, refine=refine, trajectory=True,
                                   generator=torch.Generator(self.device).manual_seed(seed), **cond, **sampling)
            images, steps = self.vq.decode(xs[-1]), self.vq.decode(torch.stack([x_t[0] for x_t in xs]))
        shown = torch.where(regen_px.to(self.device)[None, None], torch.zeros_like(x0), x0)
        return {"completions": data_url(images), "trajectory": data_url(steps), "masked": data_url(shown)[0],
                "grid": data_url(rearrange(torch.cat([x0, shown, images]), "b c h w -> 1 c h (b w)"))[0],
                "regenerated_tokens": int(regen.sum()), "tokens": regen.numel(), "seconds": round(time.time() - t0, 2),
                "notes": notes}


def make_server(editor: Editor, host: str, port: int):
    """The editing page's HTTP server, a thread per request (the page's heartbeat is answered while
    a job runs); every endpoint answers JSON."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import parse_qs, urlparse

    class Handler(BaseHTTPRequestHandler):
        def reply(self, code: int, body, kind: str = "application/json") -> None:
            body = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def answer(self, work) -> None:
            """JSON: the result; a client's mistake 400 with its line; anything else 500 (the traceback
            on the server's terminal, not sent to whoever asked)."""
            try:
                self.reply(200, work())
            except runs.UserError as e:
                self.reply(400, {"error": str(e)})
            except Exception as e:
                traceback.print_exc()
                self.reply(500, {"error": f"the job failed ({type(e).__name__}); the server's terminal shows why"})

        def body(self) -> bytes:
            """The request's body by its Content-Length (a number >= 0, at most MAX_UPLOAD)."""
            length = runs.check_number(self.headers.get("Content-Length") or 0, "Content-Length", 0, whole=True)
            if length > MAX_UPLOAD:
                self.close_connection = True
                left = length if length <= 4 * MAX_UPLOAD else 0     # read what a client is still sending
                while left > 0 and (chunk := self.rfile.read(min(2 ** 16, left))):
                    left -= len(chunk)
                raise runs.UserError(f"the upload is {length / 2 ** 20:.1f} MB; the limit is {MAX_UPLOAD // 2 ** 20} MB")
            return self.rfile.read(length)

        def request_json(self) -> dict:
            try:
                return json.loads(self.body() or b"{}")
            except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deeply
                raise runs.UserError("the request is not JSON that this page can read") from None

        def do_GET(self):
            url = urlparse(self.path)
            if url.path == "/":
                with open(PAGE, "rb") as page:
                    self.reply(200, page.read(), "text/html; charset=utf-8")
            elif url.path in ("/api/info", "/api/test"):
                index = parse_qs(url.query).get("index", [""])[0] or None      # none: a random test image
                self.answer(editor.info if url.path == "/api/info" else lambda: editor.test_image(index))
            else:
                self.reply(404, {"error": f"no page {url.path}"})

        def do_POST(self):
            if self.path == "/api/upload":
                self.answer(lambda: {"image": data_url(read_image(self.body(), editor.vq.cfg.resolution, "upload"))[0]})
            elif self.path == "/api/complete":
                self.answer(lambda: editor.complete(self.request_json()))
            else:
                self.reply(404, {"error": f"no endpoint {self.path}"})

        def log_message(self, *args):
            pass

    try:
        return ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        raise runs.UserError(f"cannot serve on {host}:{port}: {e.strerror}") from None


def serve(args, device) -> None:
    """--serve: the editing page on http://HOST:PORT; the model is loaded once, here."""
    server = make_server(Editor(args.run, device), args.host, args.port)
    print(f"serving {args.run} on http://{args.host}:{server.server_address[1]}/ (Ctrl-C stops)", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: --host {args.host}: anyone who can reach this address can use the page (and this "
              f"machine's time); 127.0.0.1 keeps it to this machine", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.server_close()


def main():
    args = build_parser().parse_args()
    check_options(args)
    if args.benchmark:                        # a random chain: no run needed
        return benchmark(args)
    device = runs.pick_device(args.device)
    args.run, args.home = runs.choose_run(args.run)        # home: where default outputs go
    if args.out or args.npz:
        check_options(args)                   # again, now that the run is known: its own files
    if args.plot:
        runs.refuse_shipped(args.run, "--plot")
        return print(f"wrote {', '.join(runs.plot_run(args.run))}", flush=True)
    if args.serve:
        return serve(args, device)
    vq, chain = runs.load_run(args.run, device)
    with runs.user_errors():
        opts = sampling_options(args, chain.T, chain.diffusion.K)
    size = runs.parse_size(args.size, args.stride, vq.cfg)
    g = torch.Generator(device).manual_seed(args.seed)      # one generator: the same command draws the same images
    if args.inpaint:
        return inpaint(args, vq, chain, opts, g, device)
    if args.accept is not None or args.rerank is not None:
        return select(args, vq, chain, opts, g, device)
    sample(args, vq, chain, opts, g, device, size)


if __name__ == "__main__":
    runs.run_main(main)
