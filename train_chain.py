"""Train ImageBART's reverse chain: one transformer per scale t = T..2 (paper Sec. 3.3, 4.1).

    python train_chain.py --dataset shapes --preset tiny     # 2-core CPU: first stage + chain, minutes
    python train_chain.py --dataset cifar                    # one GPU: the user's main run
    python train_chain.py --dataset cifar --scale 3          # one scale only (scales train independently)
    python train_chain.py --out runs/shapes_text --first-stage runs/shapes --condition text   # prompts (Sec. 4.2)

A run folder without a first stage gets one first (train_vq.py's, same preset). Each scale is trained on its own
from tokens.pt's codes with the loss of Eq. 7 (Eq. 8 at t = 2) into scale_<t>.pt; then the run ends with the bound on
the test codes (bound.json), samples.png and, on labelled data, evaluate.py's judge (eval.json). The same command
resumes. Text chains: encoders read the caption's tokens beside x_t, the decoder-only scale reads them as a prefix.
"""
import copy
import dataclasses
import json
import math
import os
import shutil
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import data as ds
import evaluate
import imagebart as ib
import runs
import train_vq
from evaluate import refuse
from train_vq import check_first_stage, train_first_stage

RESUMABLE = train_vq.RESUMABLE | {"eval_batches"}   # may change when a run resumes; the others define the model
COLOURS = [ds.PALETTE_NAMES[c] for c in ds.SHAPE_FOREGROUNDS]     # the colours shapes are drawn in


def build_parser():
    p = train_vq.build_parser(__doc__, ib.ChainConfig)
    p.add_argument("--scale", type=int, help="train only the model of this t (2..T); processes may share a run folder")
    p.add_argument("--condition", choices=("class", "text", "none"), help="labels, captions (Sec. 4.2) or nothing "
                   "(default: class when the data set has labels, else none)")
    p.add_argument("--holdout", metavar="'COLOUR SHAPE,...'", help="shapes: combinations the chain never trains on")
    p.add_argument("--first-stage", metavar="RUN", help="reuse the first stage (vq.pt, tokens.pt) of another run")
    p.add_argument("--samples", type=int, default=8, help="samples per row of samples.png")
    p.add_argument("--eval-n", type=int, default=1000, help="judge N images per row at the end (evaluate.py); 0 skips")
    p.add_argument("--judge-dir", default="runs/judges", help="cache of judges, one per data set")
    p.add_argument("--fresh-judges", action="store_true", help="train the judges even where assets/judges ships them")
    p.add_argument("--judge-steps", type=int, help="training steps of a new judge")
    p.add_argument("--ship", action="store_true", help="maintainers: write the run's shipped copy; trains nothing")
    return p


# ----- the config, and the codes x_1 it is trained on -----------------------------------------
def check_options(args) -> ib.ChainConfig:
    """The chain's config from the preset and flags, with every check that needs no data (before any work)."""
    cfg = runs.config_from_args(ib.CHAIN_PRESETS, args.preset, args)
    runs.check_ranges(cfg, positive=("T", "n_embd", "n_head", "n_layer_enc", "steps", "batch_size", "lr",
                                     "grad_clip", "log_every", "ckpt_every", "eval_batches"),
                      non_negative=("n_layer_dec", "warmup", "weight_decay"))
    for name in ("dropout", "ema_decay", "label_dropout"):      # 1 would mean nothing learnt
        runs.check_number(getattr(cfg, name), f"--{name}", 0, 1, below=True)
    if cfg.betas is not None:                                   # --betas alone sets T: one beta per t = 2..T
        T = len(cfg.betas) + 1
        refuse(args.T not in (None, T), f"--T {args.T} disagrees with --betas, which gives {T - 1} betas (t = 2..{T}, "
               f"so T = {T}); give one of the two")
        for beta in cfg.betas:
            runs.check_number(beta, "--betas", 0, 1, above=True)
        with runs.user_errors():
            cfg = dataclasses.replace(cfg, betas=ib.check_betas(cfg.betas), T=T)
    refuse(cfg.T < 2, f"T must be at least 2, got {cfg.T}")
    refuse(cfg.loss not in ("kl", "ce"), f"--loss must be kl or ce, got {cfg.loss!r}")
    refuse(cfg.n_embd % cfg.n_head, f"--n_embd {cfg.n_embd} is not divisible by --n_head {cfg.n_head}")
    refuse(args.scale is not None and not 2 <= args.scale <= cfg.T,
           f"--scale {args.scale} is outside 2..T = 2..{cfg.T}")
    holdout = [" ".join(item.split()) for item in args.holdout.split(",")] if args.holdout else []   # 'green star,...'
    for pair in holdout:
        if len(words := pair.split()) != 2 or words[0] not in COLOURS or words[1] not in ds.SHAPE_CLASSES:
            raise runs.UserError(f"--holdout {pair!r}: expected 'COLOUR SHAPE' with a colour shapes are drawn "
                                 f"in ({', '.join(COLOURS)}) and a shape of {', '.join(ds.SHAPE_CLASSES)}")
    return dataclasses.replace(cfg, holdout=holdout, dtype=args.dtype)


def resolve_config(args, tokens: dict, out: str) -> ib.ChainConfig:
    """check_options's config with what only the codes say (K, grid, labels, tokenizer), checked against a resume."""
    cfg = check_options(args)
    condition = args.condition or ("class" if "train_labels" in tokens else "none")
    if condition == "class" and "train_labels" not in tokens:
        raise runs.UserError("--condition class: this data set has no labels (use one subfolder per class)")
    refuse(condition == "text" and "train_captions" not in tokens, f"--condition text: {runs.tokens_path(out)} has "
           f"no captions: its data set has none (a folder needs captions.txt or a .txt beside each image)")
    if cfg.holdout and ds.shape_caption_parts((tokens.get("train_captions") or ["-"])[0]) is None:
        raise runs.UserError("--holdout needs the shapes data set (its captions say what drew each image)")
    text = {"vocab": list(tokens["vocab"]), "text_len": int(tokens["text_len"])} if condition == "text" else {}
    cfg = dataclasses.replace(cfg, num_codes=int(tokens["num_codes"]), grid=list(tokens["train"].shape[1:]),
                              num_labels=int(tokens["num_labels"]) if condition == "class" else 0, **text)
    for t in runs.trained_scales(out):      # a resumed run must describe the same model
        saved = ib.ChainConfig(**runs.load_checkpoint(runs.scale_path(out, t), "scale")["config"])
        runs.check_same_config(saved, cfg, RESUMABLE, runs.scale_path(out, t))
    return cfg


@torch.no_grad()
def bits_per_grid(model: ib.ImageBART, t: int, codes: torch.Tensor, cond: dict, batch: int, max_batches=None):
    """Scale t's term of the bound (Eq. 7, given `cond`) in bits per token, one Monte-Carlo draw per grid of codes
    (M, h, w) -> (M,) (fewer with max_batches), from a fixed generator: the same draws every time."""
    g = torch.Generator(codes.device).manual_seed(1234)
    starts = range(0, len(codes), batch)[:max_batches]          # None: every batch
    return torch.cat([model.scale_bits(codes[i:i + batch], t, generator=g,
                                       **{k: v[i:i + batch] for k, v in cond.items()}).cpu() for i in starts])


# ----- training one scale ---------------------------------------------------------------------
def make_optimizer(net: torch.nn.Module, cfg: ib.ChainConfig, device) -> torch.optim.Optimizer:
    """AdamW (beta2 = 0.95), weight decay on matrices only (not biases, norms, embeddings, positions); fused on GPUs."""
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        (decay if p.dim() >= 2 and not any(s in name for s in ("tok", "pos", "emb")) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def optimizer_step(model: ib.ImageBART, t: int, opt, x1: torch.Tensor, cond: dict, device, ddp=None):
    """One training step of scale t on x1 (B, h, w) (`ddp` under torchrun) -> (loss in nats/token, grad norm)."""
    with runs.autocast(device, model.cfg.dtype):
        loss = model.loss(x1, t, kind=model.cfg.loss, net=ddp, **cond)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.scale(t).parameters(), model.cfg.grad_clip)
    opt.step()
    return loss, grad_norm


def train_scale(model: ib.ImageBART, t: int, tokens: dict, test_cond: dict, out: str, device, world: runs.World):
    """Train p^{t-1}(x_{t-1} | x_t, c), the transformer of scale t, on its own (Sec. 4.4: "training is more robust
    when training all scales independently") into scale_<t>.pt; under torchrun on this process's share (DDP)."""
    cfg, path, net = model.cfg, runs.scale_path(out, t), model.scale(t)
    ema = copy.deepcopy(net).requires_grad_(False)      # the EMA copy is what is evaluated, saved, sampled
    opt = make_optimizer(net, cfg, device)

    # --- resume: weights, EMA and optimizer state of the last checkpoint
    ckpt = runs.load_checkpoint(path, "scale") if os.path.exists(path) else {"step": 0}
    if (step := ckpt["step"]) >= cfg.steps:
        return world.say(f"scale t={t}: finished ({step} steps), skipping")
    if step:
        for module, key in ((net, "model"), (ema, "ema"), (opt, "opt")):
            module.load_state_dict(ckpt[key])
        world.say(f"scale t={t}: resuming from step {step}")
    # one seed per (run, scale, step, process): a resume draws the same batches; DDP averages gradients in backward()
    torch.manual_seed(cfg.seed * 1000 + t * 100003 + step + 7919 * world.rank)
    ddp = DDP(net, device_ids=[device.index] if device.type == "cuda" else None) if world.size > 1 else None

    # --- data: every code grid on the device, a batch indexes `rows`; parts: what drew each shapes image (or None)
    rows, captions = torch.arange(len(tokens["train"])), tokens.get("train_captions")
    parts = [ds.shape_caption_parts(c) for c in captions] if cfg.holdout or model.tokenizer is not None else None
    if cfg.holdout:    # less the held-out combinations
        rows = torch.tensor([i for i, p in enumerate(parts) if f"{p['colour']} {p['shape']}" not in cfg.holdout])
        world.say(f"scale t={t}: {len(captions) - len(rows)} training grids of {', '.join(cfg.holdout)} held out")
    train = tokens["train"][rows].to(device).long()            # x_1 (M, h, w), mirrored copies included
    test = tokens["test"].to(device).long()
    y_train = tokens["train_labels"][rows].to(device) if model.num_labels else None
    shares = f", {world.size} processes of {world.share(cfg.batch_size)} sequences each" if world.size > 1 else ""
    world.say(f"scale t={t} ({'encoder-decoder' if net.has_encoder else 'decoder-only'}, p(x_{t - 1} | x_{t}), "
              f"beta_t = {model.diffusion.beta(t):.3g}, alpha_bar_t = {model.diffusion.alpha_bar(t):.3g}): "
              f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, {len(train)} training code grids, "
              f"device {device}{shares}")
    progress = runs.Progress(cfg.steps, start=step, every=cfg.log_every, prefix=f"t={t} ")
    if world.main:   # steps logged after the checkpoint resumed from are about to run again
        runs.trim_log(runs.log_path(out, t), lambda r: r.get("t") == t and r.get("step", 0) > step)
    first_bad, bad_loss = torch.tensor(-1, device=device), torch.tensor(0.0, device=device)
    while step < cfg.steps:
        net.train()

        # --- learning rate: linear warm-up, then cosine decay to a tenth
        lr = runs.cosine_lr(step, cfg.steps, cfg.lr, warmup=cfg.warmup)
        for group in opt.param_groups:
            group["lr"] = lr

        # --- batch: random code grids x_1 and their conditions, a label_dropout share the null one (guidance)
        idx = torch.randint(0, len(train), (world.share(cfg.batch_size),), device=device)
        cond = {"labels": model.drop_condition(y_train[idx], cfg.label_dropout)} if y_train is not None else {}
        if model.tokenizer is not None:
            # each part of a caption but the shape kept with probability 1/2: short prompts are in distribution too
            keep, details = torch.rand(len(idx), 4) < 0.5, ("size", "colour", "position", "background")
            text = [captions[i] if parts[i] is None else
                    ds.shape_caption({k: parts[i][k] if keep[b, j] else None for j, k in enumerate(details)}
                                     | {"shape": parts[i]["shape"]}) for b, i in enumerate(rows[idx.cpu()].tolist())]
            cond["text"] = model.drop_condition(model.tokenizer.encode(text).to(device), cfg.label_dropout)

        # --- step: the loss of Eq. 7 (Eq. 8 at t = 2), x_t and x_{t-1} drawn inside from q
        loss, grad_norm = optimizer_step(model, t, opt, train[idx], cond, device, ddp)
        # the first step whose loss is not finite, kept on the device (no wait for it each step), read at log steps
        new_bad = (first_bad < 0) & ~torch.isfinite(loss.detach())
        first_bad, bad_loss = torch.where(new_bad, step, first_bad), torch.where(new_bad, loss.detach(), bad_loss)

        # --- EMA of the weights; its decay ramps up, so early averages forget the initialisation
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), net.parameters()):
                p_ema.lerp_(p, 1 - decay)
        step += 1

        # --- logging: a progress line with ETA, log_t<t>.jsonl every log_every steps
        at_checkpoint = step % cfg.ckpt_every == 0 or step == cfg.steps
        if not (step % cfg.log_every == 0 or at_checkpoint):
            continue
        if first_bad.item() >= 0:                    # before a NaN reaches a checkpoint
            raise runs.UserError(f"scale t={t}: the loss became {bad_loss.item()} at step {first_bad.item()}; "
                                 f"stopped, the last good checkpoint is kept in {path}")
        if not world.main:
            continue
        bits = loss.item() / math.log(2)
        progress(step - 1, loss_bits=bits, lr=lr)
        record = {"stage": "chain", "t": t, "step": step, "loss_bits": bits, "grad_norm": grad_norm.item(), "lr": lr}

        # --- evaluate and checkpoint: the test term of the bound with the EMA weights, then scale_<t>.pt
        if at_checkpoint:
            model.scales[str(t)] = ema.eval()
            record["test_bits"] = bits_per_grid(model, t, test, test_cond, 256, cfg.eval_batches).mean().item()
            model.scales[str(t)] = net
            world.say(f"t={t} step {step}: test bound term {record['test_bits']:.4f} bits/token{given(model)} "
                      f"(EMA weights)")
            runs.save_atomic(runs.scale_checkpoint(model, t, ema.state_dict(), step, opt.state_dict()), path)
        runs.append_log(runs.log_path(out, t), record)


# ----- the end of a run: the bound, samples, the judge ----------------------------------------
def given(chain: ib.ImageBART) -> str:
    """How a reported bound is conditioned: on -log p(x_1 | c), not -log p(x_1)."""
    return " given the class" if chain.num_labels else " given the caption" if chain.tokenizer is not None else ""


def finish_run(args, out: str, tokens: dict, test_cond: dict, T: int, device, times: dict) -> None:
    """Once every scale is trained: the bound on all test codes, per scale (bound.json), samples.png and the judge's
    figures (eval.json), unless they are newer than every scale's checkpoint already (a finished run run again)."""
    judged = args.eval_n and "train_labels" in tokens          # the judge's figures (evaluate.py)
    files = [runs.bound_path(out)] + ([runs.eval_path(out)] if judged else [])
    newest = max(os.path.getmtime(runs.scale_path(out, t)) for t in range(2, T + 1))
    if all(os.path.exists(f) and os.path.getmtime(f) >= newest for f in files):
        return print(f"{', '.join(map(os.path.basename, files))}: up to date with every scale "
                     f"(python evaluate.py --run {out} judges the run again)", flush=True)
    t0 = time.time()
    vq, chain = runs.load_run(out, device)
    test = tokens["test"].to(device).long()
    grids = {t: bits_per_grid(chain, t, test, test_cond, 256) for t in range(chain.T, 1, -1)}   # t -> (M,)
    # one Monte-Carlo draw per grid and scale: the standard error is that of the mean over the grids' totals
    total, K = sum(grids.values()), chain.diffusion.K
    report = {"bits_per_token": total.mean().item(), "standard_error": (total.std() / len(total) ** 0.5).item(),
              "per_scale": {str(t): v.mean().item() for t, v in grids.items()}, "uniform_bits": math.log2(K),
              "num_codes": K, "T": chain.T, "test_grids": len(test), "exact": chain.T == 2,
              "condition": "class" if chain.num_labels else "text" if chain.tokenizer is not None else "none",
              "terms": "Eq. 2's terms t = 2..T, on -log2 p(x_1 | c) (the first stage's L_1 left out)"}
    runs.save_json(report, runs.bound_path(out))
    runs.trim_log(runs.log_path(out), lambda r: r.get("stage") == "bound")              # one bound record
    runs.append_log(runs.log_path(out), {"stage": "bound", **report})
    print(f"test {'exact NLL' if chain.T == 2 else 'upper bound on NLL'}{given(chain)}: "
          f"{report['bits_per_token']:.4f} ± {report['standard_error']:.4f} bits/token (uniform: log2 K = "
          f"{math.log2(K):.3f})" + "".join(f"\n  t={t}: {v}" for t, v in report["per_scale"].items()), flush=True)

    # samples.png, fixed seed; text chains: a row per shape (colours cycling) and held-out pair, else 8 test captions
    n, n_rows, labels, text, rows = args.samples, 1, None, None, "unconditional"
    if chain.num_labels:
        n_rows, rows = chain.num_labels, "one row per class"
        labels = torch.arange(n_rows, device=device).repeat_interleave(n)
    elif chain.tokenizer is not None:
        prompts = list(dict.fromkeys(c for c in tokens["test_captions"] if c))[:8]
        if ds.shape_caption_parts(tokens["test_captions"][0]) is not None:
            prompts = [f"a {COLOURS[k % len(COLOURS)]} {shape}" for k, shape in enumerate(ds.SHAPE_CLASSES)] + \
                [f"a {combination}" for combination in chain.cfg.holdout]
        n_rows, rows = len(prompts), "one row per prompt: " + "; ".join(prompts)
        text = [p for p in prompts for _ in range(n)]
    samples = chain.sample(n_rows * n, labels, text=text, generator=torch.Generator(device).manual_seed(0))
    runs.save_image_grid(vq.decode(samples), os.path.join(out, "samples.png"), nrow=n)
    print(f"wrote {runs.bound_path(out)} and {os.path.join(out, 'samples.png')} ({rows})", flush=True)
    times["bound and samples"] = time.time() - t0
    if judged:
        t0 = time.time()
        result = evaluate.evaluate_folder(out, judge_dir=args.judge_dir, n=args.eval_n, judge_steps=args.judge_steps,
                                          device=device, shipped_judges=not args.fresh_judges)
        print(json.dumps(result), flush=True)
        times["evaluation"] = result["eval_seconds"]
        times["judges and real images"] = time.time() - t0 - result["eval_seconds"]


def main():
    # --- command line: everything that can be refused is refused before any work
    started = time.time()
    args = build_parser().parse_args()
    runs.choose_preset(args)
    if args.benchmark:   # a step of every scale of a random chain on random codes (K = 512 for cifar, else 256)
        device = runs.pick_device(args.device)
        args.dtype = runs.resolve_dtype(args.dtype, device)
        cfg = dataclasses.replace(check_options(args), num_codes=512 if args.preset == "cifar" else 256, grid=[8, 8],
                                  num_labels=10)
        torch.manual_seed(cfg.seed)
        model = ib.ImageBART(cfg).to(device)
        x1 = torch.randint(0, cfg.num_codes, (cfg.batch_size, 8, 8), device=device)       # resident on the device
        cond = {"labels": torch.randint(0, 10, (cfg.batch_size,), device=device)}
        for t in range(cfg.T, 1, -1):
            runs.compile_module(model.scale(t), args.compile)
        opts = {t: make_optimizer(model.scale(t), cfg, device) for t in range(cfg.T, 1, -1)}
        steps = lambda: [optimizer_step(model, t, opt, x1, cond, device) for t, opt in opts.items()]   # one per scale
        n, params = cfg.batch_size * cfg.N, sum(p.numel() for p in model.parameters()) / (cfg.T - 1)   # per step, scale
        return train_vq.report_benchmark("train_chain", args, cfg, device, steps, "tokens", n, cfg.T - 1, T=cfg.T,
                                         batch_size=cfg.batch_size, tokens_per_step=n,
                                         params_per_scale_M=round(params / 1e6, 3))
    evaluate.check_judge_options(args.eval_n, args.judge_steps, zero_skips=True)
    runs.check_number(args.samples, "--samples", 1, whole=True)
    cfg = check_options(args)                         # every flag of the chain, before any work
    out = runs.run_dir(args.dataset, args.out)
    if args.ship:                   # the shipped copy of a trained run (ship_run refuses an untrained one)
        written = runs.ship_run(out, runs.SHIPPED_RUN)
        return print(f"wrote {', '.join(written)} ({sum(map(os.path.getsize, written)) / 2 ** 20:.1f} MiB)")
    if args.first_stage and not os.path.isdir(args.first_stage):
        raise runs.UserError(f"--first-stage {args.first_stage} is not a folder")
    if not (args.first_stage or os.path.exists(runs.tokens_path(out))):     # a first stage will be trained
        refuse(args.scale is not None, f"--scale {args.scale} trains one scale of a run that has a first stage; "
               f"train it first: python train_vq.py --dataset {args.dataset} --out {out}")
        check_first_stage(runs.preset_config(ib.VQ_PRESETS, args.preset), args.dataset)
    world, device = runs.init_world(args.device)         # torchrun: one process of several
    args.dtype = runs.resolve_dtype(args.dtype, device)  # auto -> fp32 or bf16, from the hardware
    world.share(cfg.batch_size)                       # a global batch that the processes can split
    world.on_rank_0(lambda: (runs.ensure_writable_dir(out), runs.lock_run(out, args.scale),    # for the world,
                             args.eval_n and runs.ensure_writable_dir(args.judge_dir)))    # and the judge's cache

    # --- the first stage and its codes x_1: copied from --first-stage, or trained here (by every process)
    def copy():                                  # each file once, never over a copy
        for path in (runs.vq_path, runs.tokens_path):
            src, dst = path(args.first_stage), path(out)
            refuse(not os.path.exists(src), f"--first-stage {args.first_stage} has no {os.path.basename(src)}")
            if not os.path.exists(dst):
                with runs.replacing(dst) as tmp:
                    shutil.copyfile(src, tmp)
    times = {}
    if args.first_stage:
        world.on_rank_0(copy)
    elif not os.path.exists(runs.tokens_path(out)):
        world.say(f"{out} has no first stage yet: training one with preset {args.preset!r}")
        times = train_first_stage(runs.preset_config(ib.VQ_PRESETS, args.preset), args, out, device, world)
    if world.size > 1:
        torch.distributed.barrier()              # rank 0 tokenizes (or copies) while the others wait
    tokens, vq = runs.load_tokens(out), runs.load_checkpoint(runs.vq_path(out), "vq")
    vq_cfg, grid = ib.VQConfig(**vq["config"]), tuple(tokens["train"].shape[1:])
    side, K = vq_cfg.resolution // vq_cfg.factor, vq["model"]["used_codes"].numel()
    refuse(tokens["num_codes"] != K or grid != (side, side), f"{runs.tokens_path(out)} (K = {tokens['num_codes']}, "
           f"grid {grid}) does not match {runs.vq_path(out)} (K = {K}, grid {(side, side)})")   # the codes of vq.pt
    cfg = resolve_config(args, tokens, out)
    torch.manual_seed(cfg.seed)      # the weights' initialisation is seeded: a rerun starts every scale alike
    model = ib.ImageBART(cfg).to(device)
    # the condition of every test grid, as keyword arguments of the chain's methods: labels, or the captions' tokens
    test_cond = {"labels": tokens["test_labels"].to(device)} if model.num_labels else {}
    if model.tokenizer is not None:
        test_cond = {"text": model.tokenizer.encode(tokens["test_captions"]).to(device)}
    text = f", {len(cfg.vocab)} words, captions of up to {cfg.text_len}" if cfg.text_len else ""
    world.say(f"chain: T = {cfg.T}, betas {[round(b, 4) for b in model.diffusion.betas]}, alpha_bar "
              f"{[round(model.diffusion.alpha_bar(t), 4) for t in range(1, cfg.T + 1)]}, K = {cfg.num_codes}, "
              f"N = {cfg.N} tokens{text}")

    # --- the scales, coarsest first: each is independent of the others (Sec. 3.3)
    scale_times = {}
    for t in [args.scale] if args.scale else range(cfg.T, 1, -1):
        runs.compile_module(model.scale(t), args.compile)       # in place: the state dict keeps its keys
        t0 = time.time()
        train_scale(model, t, tokens, test_cond, out, device, world)
        scale_times[t] = time.time() - t0
    times["chain"] = sum(scale_times.values())
    runs.leave_world(world)              # under torchrun: the other processes are done, rank 0 reports alone
    if not world.main:
        return
    world.say(f"wrote {', '.join(runs.plot_run(out, parts=set(scale_times)))}")     # the loss curves

    # --- once every scale is trained: the bound, samples and the judge's figures
    done = all(os.path.exists(runs.scale_path(out, t)) and
               runs.load_checkpoint(runs.scale_path(out, t), "scale")["step"] >= cfg.steps for t in range(2, cfg.T + 1))
    if done and (args.scale is None or runs.lock_run_alone()):
        finish_run(args, out, tokens, test_cond, cfg.T, device, times)
    elif done:
        print(f"every scale is trained, but another scale's process is at work in {out}: run "
              f"python train_chain.py --out {out} once it ends, for the bound, samples and the judge", flush=True)
    else:
        print("not every scale is trained yet: the bound and samples come once they are", flush=True)
    times["total"] = time.time() - started
    chain = ", ".join(f"t={t} {s:.0f}s" for t, s in scale_times.items())
    print("where the time went: " + " | ".join(f"{k} {v:.0f}s" + (f" ({chain})" if k == "chain" else "")
                                               for k, v in times.items()), flush=True)


if __name__ == "__main__":
    runs.run_main(main)
