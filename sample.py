"""Sample from a trained ImageBART run: samples, classes, trajectories, masked editing, the page.

    python sample.py --class all --n 8                          # one row per class -> sample.png
    python sample.py --inpaint test:8 --mask upper              # regenerate the upper half (Sec. 4.3)
    python sample.py --size 32x128 --class star                 # patch-wise, beyond the training size (Sec. 4.2)
    python sample.py --serve                                    # a page to paint masks on: http://127.0.0.1:8000/

Sampling runs the reverse chain (Sec. 3.3): x_T uniform, then x_{t-1} ~ p^{t-1}(x_{t-1} | x_t, c) for t = T..2 (c a
class, a prompt, or the null condition), then x_0 = G(x_1). --temperature, --top-k, --top-p: one value or one per scale.
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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    # --- what is drawn: from which run, how many, under which condition (Sec. 3.3, 4.2)
    add("--run", help="a run folder; default runs/shapes once trained, else the shipped run")
    add("--n", type=int, default=64, help="number of samples (per class with --class all)")
    add("--seed", type=int, default=0)
    add("--class", dest="classes", help="an index or name, a comma list (one per sample, cycled) or 'all' (a row each)")
    add("--prompt", dest="prompts", action="append", metavar="TEXT", help="a text chain's prompt; repeat for more rows")
    # --- how: this code's sampling options, one value or one per scale
    for flag in ("--temperature", "--top-k", "--top-p"):
        add(flag, default="1.0" if flag == "--temperature" else None, help="one value, or one per scale t = T..2")
    add("--guidance", type=float, default=0.0, help="classifier-free guidance weight w: (1+w) cond - w uncond")
    add("--no-cache", action="store_true", help="decode without the key/value cache (slow; for study)")
    # --- where the images go
    add("--out", help="grid PNG (default sample.png, trajectory.png or inpaint.png in the run; here for a shipped run)")
    add("--out-dir", help="also write one PNG per sample here (for FID tools)")
    add("--npz", help="also save uint8 NHWC images, codes and labels here")
    add("--trajectory", action="store_true", help="decode every x_t of the chain, x_T ... x_1")
    # --- masked editing (Sec. 4.3)
    add("--inpaint", help="image file(s), comma-separated, or test:N (N test images)")
    add("--mask", help=f"what to regenerate: {', '.join(MASK_KINDS)} or a PNG (white); default upper (none: --size)")
    add("--completions", type=int, default=6, help="completions per inpainted image")
    add("--refine", type=int, default=ib.INPAINT_REFINE, help="the masked process's rounds per scale below t = T")
    add("--particles", type=int, help="inpainting, this code's own: draws per image, resampled by their fit")
    add("--context", choices=("clean", "noised"), default="clean", help="inpainting: given tokens as given, or noised")
    # --- beyond the training canvas (Sec. 4.2)
    add("--size", metavar="HxW", help="draw (or complete) H x W pixels, patch-wise")
    add("--stride", type=int, default=1, help="--size: columns the window moves at a time; 1 = Taming's rule")
    add("--place", choices=("left", "right", "center"), help="--inpaint --size: where the image goes (default left)")
    add("--tiled", action="store_true", help="--size: the baseline, independent samples side by side")
    add("--across", action="store_true", help="two conditions (--class A,B or --prompt A --prompt B), left and right")
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
BATCH = 256          # rows per batch of sampling and inpainting (completions x particles)


# ----- Sampling options and conditions, checked before any sampling ----------------------------
def sampling_options(args, T: int, K: int, name=lambda key: "--" + key.replace("_", "-"), log=print) -> dict:
    """--temperature, --top-k, --top-p (one value, or T - 1) and --guidance, checked; `name` names each in errors."""
    def parse(text, key, **rule):       # None, one value, or one per scale
        got = [runs.check_number(v, name(key), **rule) for v in str(text).split(",")] if text is not None else [None]
        refuse(len(got) not in (1, T - 1), f"{name(key)} has {len(got)} values; give 1, or {T - 1} (t = {T}..2)")
        return got[0] if len(got) == 1 else got
    top_k = parse(args.top_k, "top_k", low=1, whole=True)
    if top_k is not None and max(top_k if isinstance(top_k, list) else [top_k]) >= K:
        log(f"note: {name('top_k')} {args.top_k}: a top-k of at least K = {K} keeps every code, so it filters nothing")
    return dict(temperature=parse(args.temperature, "temperature", low=0, above=True), top_k=top_k,
                top_p=parse(args.top_p, "top_p", low=0, high=1, above=True),
                guidance=runs.check_number(args.guidance, name("guidance"), 0), use_cache=not args.no_cache)


def parse_condition(args, chain: ib.ImageBART, n: int, device, across: bool = False) -> tuple[dict, int | None]:
    """--class/--prompt -> ({"labels"}, {"text": ids} or {}; per row): 'all', prompts: n each; a list cycles."""
    refuse(args.prompts and args.classes is not None, "give --class or --prompt, not both")
    if args.classes is None and not args.prompts:
        refuse(args.guidance, "--guidance needs --class or --prompt: it steers towards a condition")
        return {}, None
    if args.prompts:
        refuse(chain.tokenizer is None, "this run's chain takes no --prompt (train one with --condition text)")
        if unknown := chain.tokenizer.unknown(args.prompts):
            print(f"warning: not in this run's vocabulary, read as <unk>: {', '.join(unknown)}")
        with runs.user_errors():                               # too long: one line
            ids = chain.tokenizer.encode(args.prompts)         # (prompts, text_len)
        return ({"text": list(args.prompts)}, None) if across else ({"text": ids.repeat_interleave(n, 0).to(device)}, n)
    refuse(not chain.num_labels, "this run's chain takes no --class" + ("; use --prompt" if chain.tokenizer else ""))
    if args.classes == "all":
        return {"labels": torch.arange(chain.num_labels, device=device).repeat_interleave(n)}, n
    classes, words = [], [c.strip() for c in args.classes.split(",")]   # each an index ("6") or a name ("star")
    names = [] if all(w.lstrip("-").isdigit() for w in words) else runs.run_class_names(args.run)   # read once
    for w in words:
        if not w.lstrip("-").isdigit():
            known = f"one of {', '.join(names)}" if names else "an index (this run records no class names)"
            refuse(w not in names, f"--class {w!r}: no class of that name; give {known}, a comma list, or 'all'")
        classes.append(int(w) if w.lstrip("-").isdigit() else names.index(w))
        refuse(not 0 <= classes[-1] < chain.num_labels,
               f"class {classes[-1]} is outside this data set's labels 0..{chain.num_labels - 1}")
    labels = classes if across else torch.tensor(classes).repeat(math.ceil(n / len(classes)))[:n].to(device)
    return {"labels": labels}, None


def check_options(args) -> None:
    """Every number and every combination of the command line, before any work."""
    for name, low, high in (("seed", 0, runs.SEED_MAX), ("batch", 1, None), ("port", 0, 65535), ("refine", 0, None),
                            ("particles", 1, None), ("n", 1, None), ("completions", 1, None)):
        if getattr(args, name) is not None:                             # --particles: only where given
            runs.check_number(getattr(args, name), f"--{name}", low, high, whole=True)
    given = [f"--{name}" for name in BENCHMARK_FIELDS if getattr(args, name) is not None]
    refuse(not args.benchmark and (given or args.cached_only), f"{', '.join(given) or '--cached-only'}: for "
           f"--benchmark's random chain, not a run's")
    evaluate.check_selection(args.accept, args.rerank, args.scorer, args.classifier_steps)
    if args.accept is not None or args.rerank is not None:
        flag = "--accept" if args.accept is not None else "--rerank"
        for other in ("inpaint", "serve", "trajectory", "size", "across", "plot", "benchmark"):
            refuse(getattr(args, other), f"{flag} chooses among new samples; it does not apply to --{other}")
        refuse(args.rerank is not None and args.n > args.rerank, f"--rerank {args.rerank} keeps the best --n of "
               f"{args.rerank} candidates per class or prompt; --n {args.n} is more than {args.rerank}")
    refuse(args.stride != 1 and not args.size, "--stride moves the windows of a --size canvas; give --size")
    refuse(args.tiled and (not args.size or args.across), "--tiled draws the baseline of a --size canvas, not --across")
    refuse(args.place and not (args.inpaint and args.size), "--place puts an --inpaint image on a larger --size canvas")
    classes = [c for c in (args.classes or "").split(",") if c.strip()] if args.classes != "all" else []
    refuse(args.across and (len(args.prompts or []) + len(classes) != 2 or (args.prompts and args.classes)),
           "--across takes exactly two conditions: --class A,B or --prompt A --prompt B")
    refuse(args.trajectory and args.inpaint, "--trajectory draws the strips of samples; it does not apply to --inpaint")
    refuse(args.inpaint and args.classes == "all", "--inpaint takes one --class, or a list cycled, not 'all'")
    # outputs: never a run's own file; the kind of file their names say; folders writable, made now
    extensions = tuple(e for e in ds.IMAGE_EXTENSIONS if Image.registered_extensions().get(e) in Image.SAVE)
    for flag, path, ends, kind in (("--out", args.out, extensions, "a grid is an image"),
                                   ("--npz", args.npz, (".npz",), "the arrays go into an .npz file")):
        if path is not None:
            runs.refuse_run_file(flag, path, args.run)
            runs.ensure_writable_dir(os.path.dirname(os.path.abspath(path)))
            refuse(not path.lower().endswith(ends), f"{flag} {path}: {kind}; give a name ending in {', '.join(ends)}")
    if args.out_dir:
        runs.refuse_shipped(args.out_dir, "--out-dir")
        runs.ensure_writable_dir(args.out_dir)


# ----- Images in and out: a grid, and for other tools one PNG per image or one .npz -------------
def write(args, grid: torch.Tensor, nrow: int, name: str, images, codes, labels) -> str:
    """uint8 grid -> --out (default `name` in args.home); uint8 images -> --out-dir, with codes, labels -> --npz."""
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


def read_image(file, resolution: int, what: str, url: bool = False) -> torch.Tensor:
    """A path, bytes, or (url) the page's data URL -> x_0 (1, 3, H, W) in [-1, 1], resized and center-cropped."""
    try:
        file = base64.b64decode(file.split(",", 1)[1], validate=True) if url else file
        with Image.open(io.BytesIO(file) if isinstance(file, bytes) else file) as im:
            pixels = ds.resize_center_crop(im, resolution)
    except FileNotFoundError:
        raise runs.UserError(f"{what}: no such file") from None
    except Exception:
        raise runs.UserError(f"{what} is not an image that can be read (PNG, JPEG, ...)") from None
    return ds.to_float(torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None])


# ----- Samples, and samples chosen among candidates (Table 2, Fig. 3) ----------------------------
def sample(args, vq, chain, opts, g, device, size=None) -> None:
    """Samples (Sec. 3.3), BATCH at a time, or chosen among candidates; --size, --across, --tiled: Sec. 4.2."""
    cond, per_row = parse_condition(args, chain, args.n, device, args.across)
    n = len(next(iter(cond.values()))) if cond and not args.across else args.n
    (h, w), (H, W) = chain.cfg.grid, size or chain.cfg.grid
    if args.accept is not None or args.rerank is not None:
        xs = [select(args, chain, opts, g, device, cond, per_row, n)]
    else:
        states = []
        for sl in runs.batches(n, BATCH, "sampling" if n > BATCH else None):
            here, m = cond if args.across else {k: v[sl] for k, v in cond.items()}, sl.stop - sl.start
            if (size or args.across) and not args.tiled:
                xs = ib.sample_canvas(chain, m, size=size, stride=args.stride, across=args.across, trajectory=True,
                                      generator=g, **here, **opts)
            else:   # --tiled, the baseline of patch-wise sampling: rows x cols training-size samples side by side
                rows, cols = (math.ceil(H / h), math.ceil(W / w)) if args.tiled else (1, 1)
                each = {k: v.repeat_interleave(rows * cols, 0) for k, v in here.items()}
                xs = chain.sample(m * rows * cols, trajectory=True, generator=g, **each, **opts)
                xs = [rearrange(x, "(n r c) h w -> n (r h) (c w)", r=rows, c=cols)[:, :H, :W] for x in xs]
            states.append([x.cpu() for x in xs])
        xs = [torch.cat(s) for s in zip(*states)]                # [x_T, ..., x_1], each (n, H, W)
    images, labels = decode(vq, xs[-1]), None if args.across else cond.get("labels")
    grid, nrow, name = images, per_row or max(1, math.ceil(math.sqrt(n * H / W))), "sample.png"      # squarish
    note = f" (one row per {'prompt' if args.prompts else 'class'})" if per_row else ""
    if args.trajectory:     # each strip: x_T .. x_1, every state decoded by the first stage
        grid = torch.stack([decode(vq, x) for x in xs[:-1]] + [images], dim=1).flatten(0, 1)
        nrow, name, note = chain.T, "trajectory.png", f": each row decodes x_{chain.T} (left) ... x_1 (right)"
    print(f"wrote {write(args, grid, nrow, name, images, xs[-1], labels)}{note}", flush=True)


def select(args, chain, opts, g, device, cond: dict, per_row: int | None, n: int) -> torch.Tensor:
    """--accept, --rerank: the codes x_1 of samples chosen among more candidates, by a classifier or the Bayes score."""
    flag = "--accept" if args.accept is not None else "--rerank"
    refuse(chain.num_labels is None and chain.tokenizer is None, f"this run's chain is unconditional: {flag} chooses "
           f"samples by how well they show their class or prompt, so it needs a conditional run")
    refuse(not cond, f"{flag} needs --class (or --prompt): it keeps the candidates that best show what was asked")
    scorer = "classifier" if args.accept is not None else args.scorer or "bayes"
    if scorer == "bayes":   # its own generator: the bound's draws do not move the samples' random numbers
        score = evaluate.bayes_scorer(chain, cond, torch.Generator(device).manual_seed(args.seed))
    else:                   # a prompt's class: the one class name among its words
        names = runs.run_class_names(args.run) if args.prompts else []
        named = [{names.index(w) for w in ib.Tokenizer.words(prompt) if w in names} for prompt in args.prompts or []]
        for prompt, found in zip(args.prompts or [], named):
            refuse(len(found) != 1, f"--prompt {prompt!r} names {'more than one' if found else 'none'} of this run's "
                   f"classes; the classifier scores the class a prompt names: name one, or --rerank --scorer bayes")
        targets = torch.tensor([c for f in named for c in f]).repeat_interleave(per_row) if named else cond["labels"]
        cfg = evaluate.CodeClassifierConfig(**({"steps": args.classifier_steps} if args.classifier_steps else {}))
        score = evaluate.classifier_score(evaluate.classifier_for(args.run, args.judge_dir, cfg, device)[0], targets)
    best = evaluate.sample_best_of(chain, n, score, **cond, accept=args.accept, rerank=args.rerank, generator=g,
                                   batch=BATCH, what="sampling candidates", **opts)
    how = f"rejection, R = {args.accept:g}" if args.accept else f"best of {args.rerank} by the {scorer} score"
    print(f"kept {n} of {len(best.candidates)} candidates ({how}): sampling {best.sample_seconds:.1f}s, "
          f"scoring {best.score_seconds:.1f}s", flush=True)
    return best.codes


# ----- Masked editing (Sec. 4.3), and outpainting on a larger canvas (Sec. 4.2) ------------------
def inpaint(args, vq, chain, opts, g, device, size=None) -> None:
    """--inpaint: each input's --mask region regenerated --completions times; --size: outpainting (Sec. 4.2)."""
    H, (h, w), reps, place = vq.cfg.resolution, chain.cfg.grid, args.completions, args.place or "left"
    B = len(args.inpaint.split(","))
    if test := args.inpaint.startswith("test:"):
        refuse(not args.inpaint[5:].lstrip("-").isdigit(), f"--inpaint test:N needs a number, got {args.inpaint!r}")
        B, count = int(args.inpaint[5:]), runs.test_count(args.run)
        refuse(not 1 <= B <= count, f"--inpaint test:N takes N in 1..{count} (this run's test images), got {B}")
    refuse(size is not None and (size == (h, w) if place == "center" else size[1] <= w), f"--place {place}: the "
           f"canvas --size {args.size} is no larger than the image in that direction: nothing to draw beyond it")
    mask = args.mask or ("upper" if size is None else None)
    regen_px = pixel_mask(mask, H, H, args.seed) if mask else torch.zeros(H, H, dtype=torch.bool)
    cond, _ = parse_condition(args, chain, 1 if args.prompts else B * reps, device)
    if args.prompts:   # several prompts cycle over the completions
        cond["text"] = cond["text"].repeat(math.ceil(B * reps / len(args.prompts)), 1)[:B * reps]
    # the inputs as codes x_1 (test codes as they are, files encoded) and as the first stage shows them
    if test:
        x1 = runs.test_codes(args.run, vq, first=B).long().to(device)
        x0 = torch.cat([vq.decode(x1[sl]) for sl in runs.batches(B, BATCH)])
    else:
        x0 = torch.cat([read_image(p, H, f"--inpaint {p}") for p in args.inpaint.split(",")]).to(device)
        x1 = torch.cat([vq.encode(x0[sl]) for sl in runs.batches(B, BATCH)])
    rows, xs, keep = edit(vq, chain, x0, x1, regen_px, reps, cond, g, size, place, args.stride,
                          max(1, BATCH // (args.particles or 1)),     # each completion decodes `particles` rows
                          particles=args.particles, context=args.context, refine=args.refine, **opts)
    path = write(args, rows.flatten(0, 1), reps + 2, "inpaint.png", rows[:, 2:].flatten(0, 1), xs[-1],
                 cond.get("labels"))
    print(f"wrote {path}: per row the original, the masked input ({int((~keep).sum())} of {keep.numel()} tokens "
          f"regenerated), {reps} completions", flush=True)


def edit(vq, chain, x0, x1, regen_px, reps, cond, g, size=None, place="left", stride=1, batch=BATCH, **options):
    """Images x_0 and their codes x_1, completed `reps` times each under the mask regen_px (H, W), on a larger canvas
    `size` at `place` -> (uint8 per image: the original, the masked input, the completions; their x_T..x_1; kept)."""
    (h, w), f, B = chain.cfg.grid, vq.cfg.factor, len(x1)
    regen = token_mask(regen_px, f)           # a token is regenerated when any of its f x f pixels is (Sec. 4.3)
    refuse(size is None and not regen.any(), "the mask selects nothing to regenerate: the output would be the input")
    refuse(regen.all(), "the mask covers the whole image, so nothing is given: that is plain sampling")
    canvas, shown = size or (h, w), torch.where(regen_px.to(x0.device)[None, None], torch.zeros_like(x0), x0)
    # on the canvas, at (top, left): the given codes, what is kept of them, and the two pictures (grey: regenerated)
    top, left = (canvas[0] - h) // 2, {"left": 0, "right": canvas[1] - w, "center": (canvas[1] - w) // 2}[place]
    given = torch.zeros(B, *canvas, dtype=torch.long, device=x1.device)
    keep = torch.zeros_like(given, dtype=torch.bool)
    given[:, top:top + h, left:left + w], keep[:, top:top + h, left:left + w] = x1, ~regen.to(x1.device)
    pixels = torch.zeros(2, B, 3, canvas[0] * f, canvas[1] * f, device=x0.device)
    pixels[..., top * f:(top + h) * f, left * f:(left + w) * f] = torch.stack([x0, shown])
    reader, states = ib.windows(chain, canvas, stride) if size else None, []
    for sl in runs.batches(B * reps, batch, "inpainting" if B * reps > batch else None):
        rows = torch.arange(sl.start, sl.stop, device=x1.device) // reps    # the input of each completion
        states.append(evaluate.complete(chain, given[rows], keep[rows], reader=reader, trajectory=True, generator=g,
                                        **{k: v[sl] for k, v in cond.items()}, **options))
    xs = [torch.cat(s) for s in zip(*states)]
    images, (originals, masked) = decode(vq, xs[-1]), ds.to_uint8(pixels).cpu()
    return torch.cat([originals[:, None], masked[:, None], images.unflatten(0, (B, reps))], 1), xs, keep[0]


# ----- The decoding benchmark ------------------------------------------------------------------
def benchmark(args, device) -> None:
    """Cached vs. uncached decoding of a random chain; --cached-only: Fig. 8; --size: windows; --T ...: Table 3."""
    changes = {name: getattr(args, name) for name in BENCHMARK_FIELDS if getattr(args, name) is not None}
    cfg = ib.ChainConfig(**{**vars(runs.preset_config(ib.CHAIN_PRESETS, args.preset)), **changes,
                            "num_codes": 512 if args.preset == "cifar" else 256, "grid": [8, 8], "num_labels": 10})
    runs.check_ranges(cfg, positive=("T", "n_embd", "n_layer_enc"), non_negative=("n_layer_dec",))
    refuse(cfg.T < 2 or cfg.n_embd % cfg.n_head, f"--T must be at least 2 and --n_embd divisible by {cfg.n_head}")
    torch.manual_seed(0)
    chain, labels = ib.ImageBART(cfg).to(device).eval(), torch.arange(args.batch, device=device) % 10

    def run(**kw):                                     # -> (seconds, samples), the same seed every call
        g, out = torch.Generator(device).manual_seed(args.seed), []
        draw = ib.sample_canvas if "size" in kw else ib.ImageBART.sample
        step = lambda: out.append(draw(chain, args.batch, labels, generator=g, **kw))
        return runs.time_steps(step, 1, device, 0), out[0]
    tokens = args.batch * cfg.N * (chain.T - 1)        # every scale writes N tokens per image
    per = lambda seconds: round(seconds / args.batch, 5)
    millions = lambda module: round(sum(p.numel() for p in module.parameters()) / 1e6, 3)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    result = {"preset": args.preset, "device": name, "batch": args.batch, "T": chain.T, "N": cfg.N,
              "threads": torch.get_num_threads(), "params_M": millions(chain),
              "params_by_scale_M": {t: millions(chain.scale(t)) for t in range(chain.T, 1, -1)}} | changes
    run()                                              # warm-up
    if args.size:                                      # the window sampler, Taming's rule and strided
        H, W = runs.parse_size(args.size, args.stride, ib.VQ_PRESETS[args.preset])
        tiles = math.ceil(H * W / cfg.N)
        ordinary = sum(run()[0] for _ in range(tiles)) * H * W / cfg.N / tiles
        result |= {"canvas_codes": [H, W], "ordinary_seconds_per_canvas": per(ordinary)}
        for stride in sorted({1, args.stride if args.stride > 1 else cfg.grid[1] // 2}):
            seconds, x = run(size=(H, W), stride=stride)
            result |= {f"window_stride_{stride}_seconds_per_canvas": per(seconds),
                       f"window_stride_{stride}_slowdown": round(seconds / ordinary, 2)}
            if not args.cached_only and stride == 1:   # the reference is slow: one rule
                result["window_stride_1_same_as_reference"] = bool(torch.equal(x, run(size=(H, W), use_cache=False)[1]))
    elif args.cached_only:
        seconds = sorted(run()[0] for _ in range(3))[1]
        result |= {"seconds_per_image": per(seconds), "cached_tokens_per_s": round(tokens / seconds, 1)}
    else:
        run(use_cache=False)
        (t_cached, x_cached), (t_uncached, x_uncached) = run(), run(use_cache=False)
        result |= {"cached_tokens_per_s": round(tokens / t_cached, 1),
                   "uncached_tokens_per_s": round(tokens / t_uncached, 1), "speedup": round(t_uncached / t_cached, 2),
                   "same_samples": bool((x_cached == x_uncached).all()), "cached_seconds_per_image": per(t_cached)}
    print(json.dumps(result), flush=True)


# ----- The editing page (--serve): paint a mask, regenerate it (Sec. 4.3, Fig. 6) ----------------
# assets/editor.html posts the image and painted mask (PNG data URLs) to /api/complete; /api/info every 3 s: alive?
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "editor.html")
MAX_UPLOAD = 8 * 2 ** 20          # bytes
MAX_COMPLETIONS = 16              # per request: a larger batch would hold the model for long


def data_url(image: torch.Tensor) -> str:
    """A uint8 image (3, H, W) -> a PNG data URL, made in memory."""
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class Editor:
    """The model, loaded once, and the page's requests: on threads, one completion at a time (a lock)."""

    def __init__(self, run: str, device):
        self.run, self.device, self.lock = run, device, threading.Lock()
        self.vq, self.chain = runs.load_run(run, device)
        self.test, self.class_names = runs.test_codes(run, self.vq), runs.run_class_names(run)

    def info(self) -> dict:
        return {"run": self.run, "resolution": self.vq.cfg.resolution, "test_images": len(self.test), "T": self.chain.T,
                "classes": self.class_names if self.chain.num_labels else [], "text": self.chain.tokenizer is not None,
                "mask_kinds": list(MASK_KINDS), "refine": ib.INPAINT_REFINE, "particles": 0,
                "max_completions": MAX_COMPLETIONS}

    def test_image(self, index) -> dict:
        """A test image as the first stage sees it (its codes decoded); a random one without index."""
        index = int(torch.randint(0, len(self.test), ()).item()) if index is None else \
            runs.check_number(index, "the test image", 0, len(self.test) - 1, whole=True)
        with self.lock:
            image = decode(self.vq, self.test[index:index + 1].long().to(self.device))
        return {"index": index, "image": data_url(image[0])}

    def complete(self, body: bytes) -> dict:
        """The page's request, JSON: "image", and "mask" (data URLs, white = regenerate) or "kind"; "class" or
        "prompt"; the sampling options -> the completions, the first's trajectory x_T .. x_1, a grid, as data URLs."""
        try:
            req = json.loads(body or b"{}")
        except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deeply
            raise runs.UserError("the request is not JSON that this page can read") from None
        refuse(not isinstance(req, dict), "the request must be a JSON object (its fields by name)")
        field = lambda key, default=None: default if req.get(key) in (None, "") else req[key]
        whole = lambda key, default, low, high: runs.check_number(field(key, default), key, low, high, whole=True)
        seed, n = whole("seed", 0, 0, runs.SEED_MAX), whole("completions", 4, 1, MAX_COMPLETIONS)
        refine, particles = whole("refine", ib.INPAINT_REFINE, 0, 8), whole("particles", 0, 0, 32) or None
        image = lambda key: read_image(str(req.get(key, "")), self.vq.cfg.resolution, f"the {key}", url=True)
        x0 = image("image").to(self.device)
        if field("kind"):      # never a path: pixel_mask would read a file of the server's
            refuse(req["kind"] not in MASK_KINDS, f"kind must be one of {', '.join(MASK_KINDS)}, got {req['kind']!r}")
            regen_px = pixel_mask(req["kind"], *x0.shape[2:], seed)
        else:
            regen_px = image("mask").mean(1)[0] > 0    # white = regenerate
        # the command line's own checks, on a namespace that looks like its arguments, naming the page's fields
        opts = argparse.Namespace(temperature=str(field("temperature", "1.0")), top_k=field("top_k"), no_cache=False,
                                  top_p=field("top_p"), guidance=runs.check_number(field("guidance", 0), "guidance", 0),
                                  classes=str(req["class"]) if field("class") is not None else None, run=self.run,
                                  prompts=[str(req["prompt"])] if field("prompt") else None)
        notes = []
        sampling = sampling_options(opts, self.chain.T, self.chain.diffusion.K, lambda key: key, notes.append)
        cond = {k: v[:n] for k, v in parse_condition(opts, self.chain, n, self.device)[0].items()}
        with self.lock:       # the input's codes x_1, once per completion, through the masked process
            t0, x1, generator = time.time(), self.vq.encode(x0), torch.Generator(self.device).manual_seed(seed)
            rows, xs, keep = edit(self.vq, self.chain, x0, x1, regen_px, n, cond, generator, batch=n,
                                  particles=particles, refine=refine, **sampling)
            steps = decode(self.vq, torch.stack([x_t[0] for x_t in xs]))
        return {"completions": [data_url(x) for x in rows[0, 2:]], "trajectory": [data_url(x) for x in steps],
                "masked": data_url(rows[0, 1]), "grid": data_url(torch.cat(list(rows[0]), dim=2)), "notes": notes,
                "regenerated_tokens": int((~keep).sum()), "tokens": keep.numel(), "seconds": round(time.time() - t0, 2)}


def make_server(editor: Editor, host: str, port: int):
    """The editing page's HTTP server, a thread per request (the page's heartbeat is answered while a job runs)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import parse_qs, urlparse

    class Handler(BaseHTTPRequestHandler):
        def respond(self) -> None:
            """The endpoint's JSON (or the page); 400: a client's mistake; 500: anything else (traceback here only)."""
            url, resolution = urlparse(self.path), editor.vq.cfg.resolution
            index = parse_qs(url.query).get("index", [""])[0] or None      # none: a random test image
            upload = lambda: {"image": data_url(ds.to_uint8(read_image(self.body(), resolution, "the upload"))[0])}
            work = {"GET /": lambda: open(PAGE, "rb").read(), "GET /api/info": editor.info,
                    "GET /api/test": lambda: editor.test_image(index), "POST /api/upload": upload,
                    "POST /api/complete": lambda: editor.complete(self.body())}.get(f"{self.command} {url.path}")
            try:
                code, body = (200, work()) if work else (404, {"error": f"no page {url.path}"})
            except runs.UserError as e:
                code, body = 400, {"error": str(e)}
            except Exception as e:
                traceback.print_exc()
                code, body = 500, {"error": f"the job failed ({type(e).__name__}); the server's terminal shows why"}
            page = isinstance(body, bytes)
            body = body if page else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/html; charset=utf-8" if page else "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        do_GET = do_POST = respond

        def body(self) -> bytes:
            length = runs.check_number(self.headers.get("Content-Length") or 0, "Content-Length", 0, whole=True)
            if length > MAX_UPLOAD:          # read what a client still sends, so that it hears why
                self.rfile.read(length if length <= 4 * MAX_UPLOAD else 0)
                raise runs.UserError(f"the upload is {length / 2 ** 20:.1f} MB; the limit is {MAX_UPLOAD >> 20} MB")
            return self.rfile.read(length)

        def log_message(self, *args):
            pass

    try:
        return ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        raise runs.UserError(f"cannot serve on {host}:{port}: {e.strerror}") from None


def main():
    args = build_parser().parse_args()
    if not args.benchmark:                    # the benchmark's chain is random: no run needed
        args.run, args.home = runs.choose_run(args.run)    # home: where default outputs go
    check_options(args)
    device = runs.pick_device(args.device)
    if args.benchmark:
        return benchmark(args, device)
    if args.plot:
        runs.refuse_shipped(args.run, "--plot")
        return print(f"wrote {', '.join(runs.plot_run(args.run))}", flush=True)
    if args.serve:            # the editing page on http://HOST:PORT; the model is loaded once, here
        server = make_server(Editor(args.run, device), args.host, args.port)
        print(f"serving {args.run} on http://{args.host}:{server.server_address[1]}/ (Ctrl-C stops)", flush=True)
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: --host {args.host}: anyone who can reach this address can use the page", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("stopped", flush=True)
        return server.server_close()
    vq, chain = runs.load_run(args.run, device)
    opts, size = sampling_options(args, chain.T, chain.diffusion.K), runs.parse_size(args.size, args.stride, vq.cfg)
    g = torch.Generator(device).manual_seed(args.seed)      # one generator: the same command draws the same images
    (inpaint if args.inpaint else sample)(args, vq, chain, opts, g, device, size)


if __name__ == "__main__":
    runs.run_main(main)
