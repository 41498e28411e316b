"""Sample from a trained ImageBART run: samples, classes, trajectories, masked editing.

    python sample.py --run runs/shapes                          # unconditional grid -> runs/shapes/sample.png
    python sample.py --run runs/shapes --class all --guidance 1 # one row per class
    python sample.py --run runs/shapes --trajectory             # x_T ... x_1 decoded, one strip per sample
    python sample.py --run runs/shapes --inpaint test:8 --mask upper   # regenerate the upper half
    python sample.py --run runs/shapes --inpaint my.png --mask mask.png --class 3
    python sample.py --run runs/shapes_text --prompt "a red star" --prompt "a blue ring" --guidance 1
    python sample.py --benchmark                                # cached vs. uncached decoding, no run needed
    python sample.py --run runs/shapes --evaluate               # the judge's figures -> runs/shapes/eval.json
    python sample.py --run runs/shapes --plot                   # loss curves -> runs/shapes/loss_*.png

Sampling runs the reverse chain (Sec. 3.3): x_T uniform, then x_{t-1} ~ p^{t-1}(x_{t-1} | x_t, c)
(c a class, a prompt, or the null condition)
for t = T..2, then x_0 = G(x_1). --temperature, --top-k and --top-p take one value or a
comma list with one value per scale, for t = T, T-1, ..., 2.
"""
import argparse
import dataclasses
import json
import math
import os
import time

import numpy as np
import torch
from PIL import Image

import imagebart as ib
from imagebart import MASK_KINDS, pixel_mask, token_mask   # shared with the judge (imagebart.py, appendix C)


# -----------------------------------------------------------------------------
# command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", default="runs/shapes", help="a run folder (vq.pt, scale_<t>.pt)")
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
    p.add_argument("--guidance", type=float, default=0.0,
                   help="classifier-free guidance weight w: (1+w) cond - w uncond; 0 = plain conditional")
    p.add_argument("--no-cache", action="store_true", help="decode without the key/value cache (slow; for study)")
    p.add_argument("--out", default=None, help="grid PNG (default <run>/sample.png, trajectory.png, inpaint.png); "
                                               "with --evaluate the JSON (default <run>/eval.json)")
    p.add_argument("--out-dir", default=None, help="also write one PNG per sample here (for FID tools)")
    p.add_argument("--npz", default=None, help="also save uint8 NHWC images, codes and labels here")
    p.add_argument("--trajectory", action="store_true", help="decode every x_t of the chain (paper Fig. 5)")
    p.add_argument("--inpaint", default=None, help="image file(s), comma-separated, or test:N (N test images)")
    p.add_argument("--mask", default="upper", help=f"region to regenerate: {', '.join(MASK_KINDS)}, or a PNG (white = regenerate)")
    p.add_argument("--completions", type=int, default=6, help="completions per inpainted image")
    p.add_argument("--refine", type=int, default=ib.INPAINT_REFINE,
                   help="forward-backward rounds per scale when inpainting (none at t = T)")
    p.add_argument("--context", choices=("clean", "noised"), default="clean",
                   help="inpainting: given tokens clean at every scale (Sec. 4.3), or noised like x_t")
    p.add_argument("--device", default=None)
    p.add_argument("--plot", action="store_true", help="draw the run's loss curves from its log.jsonl (loss_*.png)")
    p.add_argument("--benchmark", action="store_true", help="time cached vs. uncached decoding and print JSON")
    p.add_argument("--preset", default="tiny", help="chain preset for --benchmark")
    p.add_argument("--batch", type=int, default=16, help="batch for --benchmark")
    judge = p.add_argument_group("--evaluate: judge the run with a classifier trained on its data set (not FID)")
    judge.add_argument("--evaluate", action="store_true",
                       help="accuracy and Frechet distance of reconstructions, samples (guidance 0 and --guidance, "
                            f"or {ib.DEFAULT_EVAL_GUIDANCE:g} when that is 0) and completions -> <run>/eval.json")
    judge.add_argument("--dataset", default=None,
                       help="shapes | cifar | folder:PATH, instead of the data set the run recorded")
    judge.add_argument("--data-root", default="data", help="where CIFAR-10 is, with --dataset cifar")
    judge.add_argument("--judge-dir", default="runs/judges", help="cache of judges, one per data set")
    judge.add_argument("--eval-n", type=int, default=1000, help="images per row (at most half the test split)")
    judge.add_argument("--judge-steps", type=int, default=None,
                       help=f"training steps of a new judge (default {ib.JudgeConfig.steps})")
    return p


# -----------------------------------------------------------------------------
# sampling options and conditions, checked before any sampling

def sampling_options(args, T: int) -> dict:
    """Parse and check --temperature/--top-k/--top-p (one value or T-1 values) and --guidance."""
    def parse(text, name, cast, ok, why):
        """"0.9" -> 0.9, "1,0.9" -> [1.0, 0.9]; `ok` checks each value's range."""
        if text is None:
            return None
        try:
            values = [cast(v) for v in str(text).split(",")]
        except ValueError:
            raise ib.UserError(f"--{name} takes numbers, got {text!r}") from None
        if not all(ok(v) for v in values):
            raise ib.UserError(f"--{name} {text}: {why}")
        value = values[0] if len(values) == 1 else values
        ib.option_per_scale(value, T, f"--{name}")          # a list needs one value per scale: checked now
        return value
    if args.guidance < 0:
        raise ib.UserError("--guidance must be >= 0")
    return dict(temperature=parse(args.temperature, "temperature", float, lambda v: v > 0, "must be > 0"),
                top_k=parse(args.top_k, "top-k", int, lambda v: v >= 1, "must be >= 1"),
                top_p=parse(args.top_p, "top-p", float, lambda v: 0 < v <= 1, "must lie in (0, 1]"),
                guidance=args.guidance, use_cache=not args.no_cache)


def parse_condition(args, chain: ib.ImageBART, n: int, device) -> tuple[dict, int | None]:
    """--class or --prompt -> (the condition as keyword arguments of the chain's sampling
    methods, {"labels": (n',)} or {"text": token ids (n', text_len)} or {}; samples per row).
    --class all and --prompt give n samples of each class or prompt, one row each (n' = n
    times their number); a comma list of classes is cycled over the n samples."""
    if args.prompts and args.classes is not None:
        raise ib.UserError("give --class or --prompt, not both")
    # no condition: unconditional sampling (on a conditional chain, the null condition)
    if args.classes is None and not args.prompts:
        if args.guidance:
            raise ib.UserError("--guidance needs --class or --prompt: it steers towards a condition")
        return {}, None
    if args.prompts:
        if chain.tokenizer is None:
            kind = "class-conditional" if chain.num_labels else "unconditional"
            raise ib.UserError(f"this run's chain is {kind}; it takes no --prompt (train one with --condition text)")
        unknown = chain.tokenizer.unknown(args.prompts)
        if unknown:
            print(f"warning: not in this run's vocabulary, read as <unk>: {', '.join(unknown)}", flush=True)
        ids = chain.tokenizer.encode(args.prompts)             # (prompts, text_len); too long: one line
        return {"text": ids.repeat_interleave(n, 0).to(device)}, n
    if chain.tokenizer is not None:
        raise ib.UserError("this run's chain is conditioned on text; use --prompt, not --class")
    if not chain.num_labels:
        raise ib.UserError("this run's chain is unconditional; it takes no --class")
    if args.classes == "all":
        return {"labels": torch.arange(chain.num_labels, device=device).repeat_interleave(n)}, n
    classes = [class_index(c.strip(), args.run) for c in args.classes.split(",")]
    bad = [c for c in classes if not 0 <= c < chain.num_labels]
    if bad:
        raise ib.UserError(f"class {bad[0]} is outside this data set's labels 0..{chain.num_labels - 1}")
    # a list is cycled: "--class 1,2 --n 5" gives 1, 2, 1, 2, 1
    return {"labels": torch.tensor(classes).repeat(math.ceil(n / len(classes)))[:n].to(device)}, None


def class_index(text: str, run: str) -> int:
    """A class given by index ("6") or by name ("star"), the names being those tokens.pt records."""
    if text.lstrip("-").isdigit():
        return int(text)
    names = ib.load_tokens(run).get("class_names") or []
    if text not in names:
        known = f"one of {', '.join(names)}" if names else "an index (this run records no class names)"
        raise ib.UserError(f"--class {text!r}: no class of that name; give {known}, a comma list, or 'all'")
    return names.index(text)


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
                images.append(ib.resize_center_crop(im, resolution))
        except FileNotFoundError:
            raise ib.UserError(f"--inpaint {path}: no such file") from None
        except Exception:
            raise ib.UserError(f"--inpaint {path} is not a readable image") from None
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


def save_outputs(args, images: torch.Tensor, codes: torch.Tensor, labels) -> None:
    """--out-dir: one PNG per sample; --npz: uint8 NHWC images, codes, labels. Both are for
    other tools (an FID tool reads the PNGs; numpy users the arrays), so pixels are stored
    as 8-bit, exactly as the grids show them."""
    u8 = ib.to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()                # (B, H, W, 3)
    if args.out_dir:
        for i, img in enumerate(u8):
            Image.fromarray(img).save(os.path.join(args.out_dir, f"{i:06d}.png"))
        print(f"wrote {len(u8)} PNGs to {args.out_dir}", flush=True)
    if args.npz:
        np.savez(args.npz, images=u8, codes=codes.cpu().numpy(),
                 labels=labels.cpu().numpy() if labels is not None else np.zeros(0, dtype=np.int64))
        print(f"wrote {args.npz}", flush=True)


# -----------------------------------------------------------------------------
# masked editing (Sec. 4.3)

INPAINT_BATCH = 256    # completions per batch: small jobs run as one batch, large ones report progress
SAMPLE_BATCH = 256     # the same for samples


def inpaint(args, vq, chain, opts, g, device) -> None:
    """--inpaint: regenerate the --mask region of each input, --completions times, and write
    one row per input: the original, the masked input, the completions."""
    cfg = vq.cfg
    # --- the inputs, as codes x_1: test codes straight from tokens.pt, or image files encoded
    H = cfg.resolution
    if args.inpaint.startswith("test:"):
        try:
            n_img = int(args.inpaint[5:])
        except ValueError:
            raise ib.UserError(f"--inpaint test:N needs a number, got {args.inpaint!r}") from None
        tokens = ib.load_tokens(args.run)
        if not 1 <= n_img <= len(tokens["test"]):
            raise ib.UserError(f"--inpaint test:N takes N in 1..{len(tokens['test'])} (this run's test images), "
                               f"got {n_img}")
        x1 = tokens["test"][:n_img].long().to(device)
        x0 = vq.decode(x1)                             # the images as the first stage sees them
    else:
        x0 = ib.to_float(load_images(args.inpaint, H).to(device))
        x1 = vq.encode(x0)
    B = len(x1)
    # --- the mask: drawn in pixels, then a token is regenerated when any of its f x f pixels is
    regen_px = pixel_mask(args.mask, H, H, args.seed)
    regen = token_mask(regen_px, cfg.factor)
    if not regen.any():
        raise ib.UserError("the mask selects nothing to regenerate (it is all black): the output would be the input")
    if regen.all():
        raise ib.UserError("the mask covers the whole image, so nothing is given: that is plain sampling; "
                           "run sample.py without --inpaint")
    # --- the completions: every input repeated once per completion, in batches of INPAINT_BATCH
    # (a progress line after each when there is more than one)
    reps = args.completions
    # a list of classes, or several prompts, cycle over the completions
    cond, _ = parse_condition(args, chain, 1 if args.prompts else B * reps, device)
    if args.prompts:
        cond["text"] = cond["text"].repeat(math.ceil(B * reps / len(args.prompts)), 1)[:B * reps]
    given = x1.repeat_interleave(reps, 0)                  # (B * reps, h, w): each input once per completion
    keep = (~regen).expand(B * reps, -1, -1)
    completions = []
    for sl in ib.batches(B * reps, INPAINT_BATCH, "inpainting" if B * reps > INPAINT_BATCH else None):
        completions.append(chain.inpaint(given[sl], keep[sl], refine=args.refine, context=args.context,
                                         generator=g, **{k: v[sl] for k, v in cond.items()}, **opts))
    completions = torch.cat(completions)
    assert (completions[keep] == given[keep]).all(), "kept tokens changed"
    images = vq.decode(completions).view(B, reps, 3, H, H)
    # the masked input: regenerated region shown grey, on the pixel mask's exact shape
    shown = torch.where(regen_px.to(device)[None, None], torch.zeros_like(x0), x0)
    grid = torch.cat([x0[:, None], shown[:, None], images], dim=1).flatten(0, 1)
    path = args.out or os.path.join(args.run, "inpaint.png")
    ib.save_image_grid(grid, path, nrow=reps + 2)
    print(f"wrote {path}: per row the original, the masked input ({int(regen.sum())} of {regen.numel()} "
          f"tokens regenerated), {reps} completions", flush=True)
    save_outputs(args, images.flatten(0, 1), completions, cond.get("labels"))


# -----------------------------------------------------------------------------
# the decoding benchmark and the judge

def benchmark(args) -> None:
    """Cached vs. uncached decoding of the same randomly initialised chain, batch and seed."""
    device = ib.pick_device(args.device)
    base = ib.preset_config(ib.CHAIN_PRESETS, args.preset)
    K = 512 if args.preset == "cifar" else 256
    cfg = dataclasses.replace(base, num_codes=K, grid=[8, 8], num_labels=10)
    torch.manual_seed(0)
    chain = ib.ImageBART(cfg).to(device).eval()
    labels = torch.arange(args.batch, device=device) % 10

    def run(use_cache: bool) -> float:
        g = torch.Generator(device).manual_seed(args.seed)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        x = chain.sample(args.batch, labels, use_cache=use_cache, generator=g)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, x

    # same seed on both paths: the key/value cache must not change a single sample
    run(True)
    run(False)                                       # warm-up both paths
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_cached, x_cached = run(True)
    t_uncached, x_uncached = run(False)
    tokens = args.batch * cfg.N * (chain.T - 1)      # every scale writes N tokens per image
    result = {"preset": args.preset, "device": str(device), "batch": args.batch, "T": chain.T, "N": cfg.N,
              "K": K, "params_per_scale_M": round(sum(p.numel() for p in chain.scale(2).parameters()) / 1e6, 3),
              "threads": torch.get_num_threads(),
              "cached_tokens_per_s": round(tokens / t_cached, 1), "cached_images_per_s": round(args.batch / t_cached, 3),
              "uncached_tokens_per_s": round(tokens / t_uncached, 1),
              "uncached_images_per_s": round(args.batch / t_uncached, 3),
              "speedup": round(t_uncached / t_cached, 2), "same_samples": bool((x_cached == x_uncached).all())}
    if device.type == "cuda":
        result["peak_memory_MiB"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    print(json.dumps(result), flush=True)


def evaluate(args, device) -> None:
    """--evaluate: the judge's figures (imagebart.py, appendix C), with the API's sampling
    defaults apart from the guidance; progress lines, then the figures as one JSON line."""
    ib.check_judge_options(args.eval_n, args.judge_steps)
    if args.guidance < 0:
        raise ib.UserError("--guidance must be >= 0")
    result = ib.evaluate_folder(args.run, dataset=args.dataset, data_root=args.data_root, judge_dir=args.judge_dir,
                                n=args.eval_n, guidance=args.guidance or ib.DEFAULT_EVAL_GUIDANCE,
                                judge_steps=args.judge_steps, seed=args.seed, device=device,
                                inpaint=dict(refine=args.refine, context=args.context), out=args.out)
    print(json.dumps(result), flush=True)


# -----------------------------------------------------------------------------
# main: benchmark, evaluate, inpaint, or sample (with --trajectory: every x_t)

def main():
    args = build_parser().parse_args()
    if args.benchmark:
        return benchmark(args)
    device = ib.pick_device(args.device)
    if not os.path.isdir(args.run):
        raise ib.UserError(f"no run at {args.run}; train one with: python train_chain.py --out {args.run}")
    if args.plot:
        return print(f"wrote {', '.join(ib.plot_run(args.run))}", flush=True)
    if args.n < 1 or args.completions < 1 or args.refine < 0:
        raise ib.UserError("--n and --completions must be >= 1, --refine >= 0")
    # --- outputs: their folders made (and checked writable) now, not after minutes of sampling
    for path in (args.out, args.npz):
        if path:
            ib.ensure_writable_dir(os.path.dirname(os.path.abspath(path)))
    if args.out_dir:
        ib.ensure_writable_dir(args.out_dir)
    if args.evaluate:
        return evaluate(args, device)
    # --- the run: first stage and chain, EMA weights
    vq, chain = ib.load_run(args.run, device)
    opts = sampling_options(args, chain.T)
    g = torch.Generator(device).manual_seed(args.seed)
    if args.inpaint:
        if args.classes == "all":
            raise ib.UserError("--inpaint takes one --class (or a list, cycled over the completions), not 'all'")
        return inpaint(args, vq, chain, opts, g, device)
    # --- sampling: x_T uniform, then the T - 1 scales in turn (Sec. 3.3)
    cond, per_row = parse_condition(args, chain, args.n, device)

    n = len(next(iter(cond.values()))) if cond else args.n
    t0 = time.time()
    parts = [chain.sample_chain(sl.stop - sl.start, generator=g, **{k: v[sl] for k, v in cond.items()}, **opts)
             for sl in ib.batches(n, SAMPLE_BATCH, "sampling" if n > SAMPLE_BATCH else None)]
    trajectory = [torch.cat(x_t) for x_t in zip(*parts)]       # [x_T, ..., x_1], each (n, h, w)
    x1 = trajectory[-1]
    print(f"sampled {n} images in {time.time() - t0:.1f}s", flush=True)
    if args.trajectory:
        # one row per sample: x_T, x_{T-1}, ..., x_1, each decoded by the first stage
        strips = torch.stack([vq.decode(x_t) for x_t in trajectory], dim=1)   # (n, T, 3, H, W)
        path = args.out or os.path.join(args.run, "trajectory.png")
        ib.save_image_grid(strips.flatten(0, 1), path, nrow=chain.T)
        print(f"wrote {path}: each row decodes x_{chain.T} (left) ... x_1 (right)", flush=True)
        images = strips[:, -1]
    else:
        images = vq.decode(x1)
        path = args.out or os.path.join(args.run, "sample.png")
        ib.save_image_grid(images, path, nrow=per_row or int(math.ceil(math.sqrt(n))))
        print(f"wrote {path}" + (f" (one row per {'prompt' if args.prompts else 'class'})" if per_row else ""),
              flush=True)
    save_outputs(args, images, x1, cond.get("labels"))


if __name__ == "__main__":
    ib.run_main(main)
