"""Train ImageBART's reverse chain: one transformer per scale t = T..2 (paper Sec. 3.3, 4.1).

    python train_chain.py --dataset shapes --preset tiny     # 2-core CPU: first stage + chain, minutes
    python train_chain.py --dataset cifar                    # one GPU: the user's main run
    python train_chain.py --dataset cifar --scale 3          # one scale only (scales train in parallel)
    python train_chain.py --out runs/shapes_text --first-stage runs/shapes --condition text   # prompts (Sec. 4.2)

A run folder without a first stage gets one first (train_vq.py's code, same preset). Each
scale is trained on its own from the codes in tokens.pt, with the loss of Eq. 7 (Eq. 8 at
t = 2), and saved as scale_<t>.pt. When every scale is done, the likelihood bound is
evaluated on the test codes (bound.json) and a grid of samples is written (samples.png);
on labelled data, the judge of `evaluate.py` then scores the run (eval.json).
Re-running the same command resumes; a finished scale is not trained again.

The chain is conditioned on the data set's class labels when it has them (--condition class),
on its captions with --condition text (every encoder reads the caption's tokens next to x_t;
the decoder-only scale reads them as a prefix), or on nothing (--condition none).
"""
import argparse
import copy
import dataclasses
import json
import math
import os
import shutil
import time

import torch

import data as ds
import evaluate
import imagebart as ib
import runs
from train_vq import train_first_stage

# Fields that may change when a run is resumed; the others define the model and must match.
RESUMABLE = {"steps", "log_every", "ckpt_every", "eval_batches", "dtype"}   # dtype: a run may resume elsewhere


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    runs.add_run_args(p)
    p.add_argument("--scale", type=int, default=None, help="train only the model of this t (2..T)")
    p.add_argument("--condition", choices=("class", "text", "none"), default=None,
                   help="what the chain is conditioned on: the class labels, the captions (Sec. 4.2), or "
                        "nothing (default: class when the data set has labels, else none)")
    p.add_argument("--holdout", default=None, metavar="'COLOUR SHAPE,...'",
                   help="shapes: leave out of the chain's training every image of these colour-shape "
                        "combinations, e.g. 'green star,blue ring' (matched on what drew the image)")
    p.add_argument("--workers", type=int, default=None,
                   help="on a CPU: processes that train scales at the same time (default: one per core, up to "
                        "one per scale); 1 = one scale after the other")
    p.add_argument("--first-stage", default=None, metavar="RUN",
                   help="reuse the first stage (vq.pt, tokens.pt) of another run folder")
    p.add_argument("--samples", type=int, default=8, help="samples per row of samples.png")
    p.add_argument("--eval-n", type=int, default=1000,
                   help="at the end, judge N images per row (evaluate.py; labelled data only); 0 = skip")
    p.add_argument("--judge-dir", default="runs/judges", help="cache of judges, one per data set")
    p.add_argument("--fresh-judges", action="store_true",
                   help="train the judges into --judge-dir even where assets/judges ships them")
    p.add_argument("--judge-steps", type=int, default=None,
                   help=f"training steps of a new judge (default {evaluate.JudgeConfig.steps})")
    p.add_argument("--ship", action="store_true",
                   help="write the trained run's shipped copy to assets/pretrained/shapes (EMA weights in bf16) "
                        "and train nothing: for maintainers, after a change of checkpoint format or tiny preset")
    runs.add_speed_args(p)
    runs.add_config_args(p, ib.ChainConfig)
    return p


def first_stage(args, out: str) -> tuple[dict, dict]:
    """Make sure `out` has vq.pt and tokens.pt (copied, or trained); -> (the tokens, the seconds
    the first stage's parts took when it was trained here)."""
    times = {}
    # --first-stage RUN: copy its vq.pt and tokens.pt (each once; a copy is never overwritten)
    for path in (runs.vq_path, runs.tokens_path):
        if args.first_stage:
            src, dst = path(args.first_stage), path(out)
            if not os.path.exists(src):
                raise runs.UserError(f"--first-stage {args.first_stage} has no {os.path.basename(src)}")
            if not os.path.exists(dst):
                with runs.replacing(dst) as tmp:
                    shutil.copyfile(src, tmp)
    # no first stage yet: train one with the preset of the same name (train_vq.py's code)
    if not os.path.exists(runs.tokens_path(out)):
        vq_cfg = runs.preset_config(ib.VQ_PRESETS, args.preset)    # an unknown name: one line, before any work
        print(f"{out} has no first stage yet: training one with preset {args.preset!r}", flush=True)
        times = train_first_stage(vq_cfg, args.dataset, out, args.data_root, args.lpips_weights, args.device,
                                  dtype=args.dtype)
    # the codes must be the ones this vq.pt writes: same K after shrinking, same grid
    tokens = runs.load_tokens(out)
    vq_ckpt = runs.load_checkpoint(runs.vq_path(out), "vq")
    vq_cfg = ib.VQConfig(**vq_ckpt["config"])
    grid = vq_cfg.resolution // vq_cfg.factor
    K_vq = vq_ckpt["model"]["used_codes"].numel()
    if tokens["num_codes"] != K_vq or tuple(tokens["train"].shape[1:]) != (grid, grid):
        raise runs.UserError(f"{runs.tokens_path(out)} (K = {tokens['num_codes']}, grid {tuple(tokens['train'].shape[1:])}) "
                             f"does not match {runs.vq_path(out)} (K = {K_vq}, grid {(grid, grid)})")
    return tokens, times


def check_options(args) -> ib.ChainConfig:
    """The chain's config from the preset and the flags, with every check that needs no data.
    main() runs it before any work, so a bad flag fails in a second, not after a first stage
    has trained for minutes."""
    cfg = runs.config_from_args(ib.CHAIN_PRESETS, args.preset, args)
    runs.check_ranges(cfg, positive=("T", "n_embd", "n_head", "n_layer_enc", "steps", "batch_size", "lr",
                                     "grad_clip", "log_every", "ckpt_every", "eval_batches"),
                    non_negative=("n_layer_dec", "warmup", "weight_decay"))
    for name in ("dropout", "ema_decay", "label_dropout"):      # probabilities and a decay: 1 would mean nothing learnt
        runs.check_number(getattr(cfg, name), f"--{name}", 0, 1, below=True)
    if cfg.betas is not None:   # --betas alone sets T: one beta per t = 2..T
        if args.T is not None and args.T != len(cfg.betas) + 1:
            raise runs.UserError(f"--T {args.T} disagrees with --betas, which gives {len(cfg.betas)} betas "
                                 f"(t = 2..{len(cfg.betas) + 1}, so T = {len(cfg.betas) + 1}); give one of the two")
        for beta in cfg.betas:
            runs.check_number(beta, "--betas", 0, 1, above=True)
        with runs.user_errors():
            cfg = dataclasses.replace(cfg, betas=ib.check_betas(cfg.betas), T=len(cfg.betas) + 1)
    if cfg.T < 2:
        raise runs.UserError(f"T must be at least 2, got {cfg.T}")
    if cfg.loss not in ("kl", "ce"):
        raise runs.UserError(f"--loss must be kl or ce, got {cfg.loss!r}")
    if cfg.n_embd % cfg.n_head:
        raise runs.UserError(f"--n_embd {cfg.n_embd} is not divisible by --n_head {cfg.n_head}")
    if args.workers is not None:
        runs.check_number(args.workers, "--workers", 1, whole=True)
    if args.scale is not None and not 2 <= args.scale <= cfg.T:
        raise runs.UserError(f"--scale {args.scale} is outside 2..T = 2..{cfg.T}")
    return dataclasses.replace(cfg, holdout=parse_holdout(args.holdout) if args.holdout else [], dtype=args.dtype)


def resolve_config(args, tokens: dict, out: str) -> ib.ChainConfig:
    """The chain's config: check_options's, and what only the codes can say (K after shrinking,
    the grid, the number of labels, the tokenizer), checked against a run being resumed."""
    cfg = check_options(args)
    # --- the condition: class-conditional when the data set has labels, unless --condition says
    condition = args.condition or ("class" if "train_labels" in tokens else "none")
    if condition == "class" and "train_labels" not in tokens:
        raise runs.UserError("--condition class: this data set has no labels (use one subfolder per class)")
    if condition == "text" and "train_captions" not in tokens:
        raise runs.UserError(f"--condition text: {runs.tokens_path(out)} has no captions: it was made before captions "
                             f"existed (remake it: delete it and run train_vq.py with the run's settings), or its "
                             f"data set has none (a folder needs captions.txt or a .txt beside each image)")
    if cfg.holdout and ds.shape_caption_parts((tokens.get("train_captions") or ["-"])[0]) is None:
        raise runs.UserError("--holdout needs the shapes data set (its captions say what drew each image)")
    num_labels = int(tokens["num_labels"]) if condition == "class" else 0
    cfg = dataclasses.replace(cfg, num_codes=int(tokens["num_codes"]), grid=list(tokens["train"].shape[1:]),
                              num_labels=num_labels)
    if condition == "text":   # the tokenizer made with tokens.pt, which every scale then carries
        cfg = dataclasses.replace(cfg, vocab=list(tokens["vocab"]), text_len=int(tokens["text_len"]))
    # a resumed run must describe the same model
    for t in runs.trained_scales(out):
        saved = ib.ChainConfig(**runs.load_checkpoint(runs.scale_path(out, t), "scale")["config"])
        runs.check_same_config(saved, cfg, RESUMABLE, runs.scale_path(out, t))
    return cfg


def parse_holdout(text: str) -> list[str]:
    """--holdout 'green star,blue ring' -> ["green star", "blue ring"], each a palette colour and
    a shape class (only shapes runs know what drew each image: resolve_config checks that)."""
    pairs = []
    colours = [ds.PALETTE_NAMES[c] for c in ds.SHAPE_FOREGROUNDS]      # those a shape is drawn in
    for item in text.split(","):
        words = item.split()
        if len(words) != 2 or words[0] not in colours or words[1] not in ds.SHAPE_CLASSES:
            raise runs.UserError(f"--holdout {item.strip()!r}: expected 'COLOUR SHAPE' with a colour shapes are drawn "
                                 f"in ({', '.join(colours)}) and a shape of {', '.join(ds.SHAPE_CLASSES)}")
        pairs.append(" ".join(words))
    return pairs


def training_rows(tokens: dict, cfg: ib.ChainConfig) -> torch.Tensor:
    """Indices of the training code grids the chain learns from: all of them, less those
    whose image shows a held-out combination. Matched on the full caption's parts (what drew
    the image), so it does not matter how a training step shortens the caption."""
    if not cfg.holdout:
        return torch.arange(len(tokens["train"]))
    held = set(cfg.holdout)
    parts = [ds.shape_caption_parts(c) for c in tokens["train_captions"]]
    return torch.tensor([i for i, p in enumerate(parts) if f"{p['colour']} {p['shape']}" not in held])


def param_groups(net: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; biases, norms, embeddings and position tables are left alone."""
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        is_matrix = p.dim() >= 2 and not any(s in name for s in ("tok", "pos", "emb"))
        (decay if is_matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def condition_of(model: ib.ImageBART, tokens: dict, split: str, device) -> dict:
    """The condition of every code grid of a split, as keyword arguments of the chain's
    methods: {"labels": (M,)}, {"text": token ids (M, text_len)} of the full captions, or {}."""
    if model.num_labels:
        return {"labels": tokens[f"{split}_labels"].to(device)}
    if model.tokenizer is not None:
        return {"text": model.tokenizer.encode(tokens[f"{split}_captions"]).to(device)}
    return {}


def caption_batch(captions: list[str], parts: list, idx: list[int]) -> list[str]:
    """The captions of a batch at a random level of detail: each part of a shapes caption but
    the shape (size, colour, position, background) is kept with probability 1/2, so that short
    prompts like "a red star" are as much in distribution as full ones. Other captions are
    used whole."""
    keep = torch.rand(len(idx), 4) < 0.5
    out = []
    for b, i in enumerate(idx):
        p = parts[i]
        if p is None:
            out.append(captions[i])
            continue
        shortened = {k: p[k] if keep[b, j] else None for j, k in enumerate(("size", "colour", "position", "background"))}
        out.append(ds.shape_caption(shortened | {"shape": p["shape"]}))
    return out


@torch.no_grad()
def bits_per_grid(model: ib.ImageBART, t: int, codes: torch.Tensor, cond: dict, batch: int,
                  max_batches=None) -> torch.Tensor:
    """Scale t's term of the bound (Eq. 7; on -log p(x_1 | c) given the condition `cond`, see
    condition_of) in bits per token, one Monte-Carlo draw for each grid of `codes` (M, h, w)
    -> (M,) (fewer with max_batches). A fixed generator makes the draws the same at every
    evaluation."""
    g = torch.Generator(codes.device).manual_seed(1234)
    out = []
    for b, i in enumerate(range(0, len(codes), batch)):
        if max_batches is not None and b >= max_batches:
            break
        c = {k: v[i:i + batch] for k, v in cond.items()}
        out.append(model.scale_bits(codes[i:i + batch], t, generator=g, **c).cpu())
    return torch.cat(out)


def make_optimizer(net: torch.nn.Module, cfg: ib.ChainConfig, device) -> torch.optim.Optimizer:
    """AdamW (beta2 = 0.95, as is usual for transformers); its fused kernel on a GPU."""
    return torch.optim.AdamW(param_groups(net, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95),
                             fused=device.type == "cuda")


def optimizer_step(model: ib.ImageBART, t: int, opt, x1: torch.Tensor, cond: dict, device, ddp=None):
    """One training step of scale t on the batch x1 (B, h, w): the loss of Eq. 7 (bf16 autocast
    on a GPU), backward, gradient clipping, AdamW. Training and --benchmark both run this.
    `ddp`: the scale's DistributedDataParallel wrapper under torchrun, which averages the
    gradients over the processes in backward().
    -> (loss in nats per token, gradient norm), as tensors: reading them waits for the device."""
    net = model.scale(t)
    with runs.autocast(device, model.cfg.dtype):
        loss = model.loss(x1, t, kind=model.cfg.loss, net=ddp, **cond)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), model.cfg.grad_clip)
    opt.step()
    return loss, grad_norm


def train_scale(model: ib.ImageBART, t: int, tokens: dict, out: str, device, world: runs.World = runs.World()) -> None:
    """Train p^{t-1}(x_{t-1} | x_t, c), the transformer of scale t, on its own (Sec. 3.3: the
    scales share nothing, so each can run in a process or on a GPU of its own), and save it as
    scale_<t>.pt. Under torchrun every process runs this on its share of each batch
    (DistributedDataParallel). Its steps go to log_t<t>.jsonl, which only the process that
    trains this scale writes (the holder of its claim, or a worker of it)."""
    cfg = model.cfg
    say = world.say                                    # rank 0 alone speaks
    path = runs.scale_path(out, t)
    net = model.scale(t)
    # the EMA copy is what gets evaluated, saved for sampling and reported
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = make_optimizer(net, cfg, device)

    # --- resume: weights, EMA and optimizer state of the last checkpoint
    step = 0
    if os.path.exists(path):
        ckpt = runs.load_checkpoint(path, "scale")
        if ckpt["step"] >= cfg.steps:
            say(f"scale t={t}: finished ({ckpt['step']} steps), skipping", flush=True)
            return
        net.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        step = ckpt["step"]
        say(f"scale t={t}: resuming from step {step}", flush=True)
    # one seed per (run, scale, step, process): each scale and each process draws its own
    # batches, and a resumed run the same ones every time it is resumed from that step
    torch.manual_seed(cfg.seed * 1000 + t * 100003 + step + 7919 * world.rank)
    ddp = None                          # several processes: DDP averages the gradients in backward()
    if world.size > 1:
        from torch.nn.parallel import DistributedDataParallel
        ddp = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    # --- data: the whole code data set lives on the device; a batch is one index
    rows = training_rows(tokens, cfg)                          # all, less the held-out combinations
    train = tokens["train"][rows].to(device).long()            # x_1 (M, h, w), mirrored copies included
    test = tokens["test"].to(device).long()
    y_train = tokens["train_labels"][rows].to(device) if model.num_labels else None
    test_cond = condition_of(model, tokens, "test", device)
    if model.tokenizer is not None:
        captions = [tokens["train_captions"][i] for i in rows.tolist()]
        parts = [ds.shape_caption_parts(c) for c in captions]  # None for a caption of another kind
    if cfg.holdout:
        say(f"scale t={t}: {len(tokens['train']) - len(rows)} training grids of {', '.join(cfg.holdout)} "
              f"held out", flush=True)
    n_params = sum(p.numel() for p in net.parameters())
    kind = "encoder-decoder" if net.has_encoder else "decoder-only"
    say(f"scale t={t} ({kind}, p(x_{t - 1} | x_{t}), beta_t = {model.diffusion.beta(t):.3g}, "
        f"alpha_bar_t = {model.diffusion.alpha_bar(t):.3g}): {n_params / 1e6:.2f}M parameters, "
        f"{len(train)} training code grids, device {device}"
        + (f", {world.size} processes of {world.share(cfg.batch_size)} sequences each" if world.size > 1 else ""),
        flush=True)

    def test_bound() -> float:
        """This scale's term of the bound on (part of) the test codes, with the EMA weights."""
        model.scales[str(t)] = ema
        ema.eval()
        bits = bits_per_grid(model, t, test, test_cond, 256, cfg.eval_batches).mean().item()
        model.scales[str(t)] = net
        return bits

    def checkpoint():
        runs.save_atomic(runs.scale_checkpoint(model, t, ema.state_dict(), step, opt.state_dict()), path)

    progress = runs.Progress(cfg.steps, start=step, every=cfg.log_every, prefix=f"t={t} ")
    log = None
    if world.main:
        # steps logged after the checkpoint we resume from are about to run again: drop them
        runs.trim_log(runs.log_path(out, t), lambda r: r.get("stage") == "chain" and r.get("t") == t and r.get("step", 0) > step)
        log = open(runs.log_path(out, t), "a")
    first_bad, bad_loss = torch.tensor(-1, device=device), torch.tensor(0.0, device=device)
    while step < cfg.steps:
        net.train()

        # --- learning rate: linear warm-up, then cosine decay to a tenth
        lr = runs.cosine_lr(step, cfg.steps, cfg.lr, warmup=cfg.warmup)
        for group in opt.param_groups:
            group["lr"] = lr

        # --- batch: random code grids x_1 and their conditions (a caption at a random level of
        # detail); a label_dropout share of the conditions becomes the null class or the empty
        # caption, so the same network also learns the unconditional model (guidance)
        idx = torch.randint(0, len(train), (world.share(cfg.batch_size),), device=device)   # this process's share
        cond = {}
        if y_train is not None:
            cond["labels"] = model.drop_condition(y_train[idx], cfg.label_dropout)
        elif model.tokenizer is not None:
            text = model.tokenizer.encode(caption_batch(captions, parts, idx.tolist())).to(device)
            cond["text"] = model.drop_condition(text, cfg.label_dropout)       # (B, text_len)

        # --- step: the loss of Eq. 7 (Eq. 8 at t = 2), x_t and x_{t-1} drawn inside from q
        loss, grad_norm = optimizer_step(model, t, opt, train[idx], cond, device, ddp)
        # the first step whose loss is not finite, kept on the device: reading the loss every
        # step would wait for the device every step (on a GPU, a sync per step); it is read
        # when the step is logged or checkpointed, so a NaN never reaches a checkpoint
        new_bad = (first_bad < 0) & ~torch.isfinite(loss.detach())
        first_bad, bad_loss = torch.where(new_bad, step, first_bad), torch.where(new_bad, loss.detach(), bad_loss)

        # --- EMA of the weights, for evaluation and sampling; its decay ramps up so early
        # averages are not dominated by the random initialisation
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), net.parameters()):
                p_ema.lerp_(p, 1 - decay)
        step += 1

        # --- logging: a progress line with ETA; log.jsonl every log_every steps (the only
        # places, with checkpoints, where a step waits for the device)
        at_checkpoint = step % cfg.ckpt_every == 0 or step == cfg.steps
        if not (step % cfg.log_every == 0 or at_checkpoint):
            continue
        if first_bad.item() >= 0:      # stop before a NaN reaches a checkpoint
            raise runs.UserError(f"scale t={t}: the loss became {bad_loss.item()} at step {first_bad.item()}; "
                                 f"stopped, the last good checkpoint is kept in {path}")
        bits = loss.item() / math.log(2)
        if world.main:
            progress(step - 1, loss_bits=bits, lr=lr)
        record = {"stage": "chain", "t": t, "step": step, "loss_bits": bits, "grad_norm": grad_norm.item(), "lr": lr}

        # --- evaluate and checkpoint: the test term of the bound, then scale_<t>.pt
        if at_checkpoint:
            world.check_same_weights(net, f"scale t={t}, step {step}")
            if not world.main:
                continue
            record["test_bits"] = test_bound()
            print(f"t={t} step {step}: test bound term {record['test_bits']:.4f} bits/token"
                  f"{given(model)} (EMA weights)", flush=True)
            checkpoint()
        if world.main and (step % cfg.log_every == 0 or "test_bits" in record):
            log.write(json.dumps(record) + "\n")
            log.flush()
    if log is not None:
        log.close()


# -----------------------------------------------------------------------------
# the scales at the same time: one process each on a CPU

def scale_workers(requested: int | None, device, world: runs.World, scales: int) -> tuple[int, int]:
    """(processes that train the scales at once, threads each). The scales share nothing (Sec.
    3.3), and a tiny scale's small matrix products barely use a second core: on a 2-core CPU
    the quickstart's two scales trained one after the other in 304, 323 and 343 s, side by side
    on one thread each in 277, 302 and 292 s (alternated, docs/speed.md). So on a CPU each core
    (up to one per scale) trains a scale of its own; on a GPU, or under torchrun, the scales
    take turns.
    A --workers that cannot be had as given is said in one line."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or world.size > 1:
        if requested not in (None, 1):
            world.say(f"--workers {requested}: on {device.type}{' under torchrun' if world.size > 1 else ''} the "
                      f"scales take turns in this process", flush=True)
        return 1, threads
    if requested is not None and scales and requested > scales:
        print(f"--workers {requested}: {scales} scale{'s' if scales > 1 else ''} to train, so {scales} "
              f"process{'es' if scales > 1 else ''}", flush=True)
    if scales < 2:
        return 1, threads
    workers = max(1, min(requested or threads, scales))
    return workers, max(1, threads // workers)


def _scale_worker(out: str, config: dict, t: int, threads: int, compile: str | None) -> float:
    """One scale in a process of its own (train_scales): the chain built as main() builds it
    (same seed, so the same initial weights), then scale t trained with `threads` threads.
    -> seconds."""
    torch.set_num_threads(threads)
    t0 = time.time()
    cfg = ib.ChainConfig(**config)
    torch.manual_seed(cfg.seed)
    model = ib.ImageBART(cfg)
    runs.compile_module(model.scale(t), compile)
    try:
        train_scale(model, t, runs.load_tokens(out), out, torch.device("cpu"))
    except KeyboardInterrupt:           # Ctrl-C reaches every process: the parent says what to do
        pass
    return time.time() - t0


def train_scales(cfg: ib.ChainConfig, scales: list[int], out: str, workers: int, threads: int,
                 compile: str | None) -> dict:
    """Train `scales`, `workers` of them at a time, each in a process of its own (spawned, so
    that none inherits this process's threads). Each writes its own scale_<t>.pt and
    log_t<t>.jsonl; this process holds their claims for them. -> {t: seconds}."""
    import concurrent.futures
    import multiprocessing
    print(f"training scales {', '.join(f't={t}' for t in scales)}: {workers} at a time, in processes of "
          f"{threads} thread{'s' if threads > 1 else ''} each", flush=True)
    config = dataclasses.asdict(cfg)
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {t: pool.submit(_scale_worker, out, config, t, threads, compile) for t in scales}
        try:
            return {t: f.result() for t, f in futures.items()}
        except KeyboardInterrupt:
            pool.shutdown(cancel_futures=True)
            raise


@torch.no_grad()
def final_report(out: str, tokens: dict, device, samples_per_row: int) -> None:
    """Once every scale is trained: the bound on all test codes, per scale, and a sample grid."""
    vq, chain = runs.load_run(out, device)
    test = tokens["test"].to(device).long()
    cond = condition_of(chain, tokens, "test", device)
    grids = {t: bits_per_grid(chain, t, test, cond, 256) for t in range(chain.T, 1, -1)}   # t -> (M,)
    bits_by_scale = {t: v.mean().item() for t, v in grids.items()}
    # The bound is a Monte-Carlo estimate: one draw of x_t, x_{t-1} per test grid and scale.
    # Its standard error is that of a mean over the M grids' totals (it also holds the
    # spread between grids, so it is what a rerun on other test images would move by).
    total = sum(grids.values())
    K = chain.diffusion.K
    report = {"bits_per_token": total.mean().item(), "standard_error": (total.std() / len(total) ** 0.5).item(),
              "per_scale": {str(t): v for t, v in bits_by_scale.items()},
              "uniform_bits": math.log2(K), "num_codes": K, "T": chain.T, "condition": condition_name(chain),
              "test_grids": len(test), "exact": chain.T == 2}
    runs.save_json_atomic(report, runs.bound_path(out))
    runs.trim_log(runs.log_path(out), lambda r: r.get("stage") == "bound")              # one bound record
    with open(runs.log_path(out), "a") as log:
        log.write(json.dumps({"stage": "bound", **report}) + "\n")
    what = ("exact NLL" if chain.T == 2 else "upper bound on NLL") + given(chain)
    print(f"test {what}: {report['bits_per_token']:.4f} ± {report['standard_error']:.4f} bits/token "
          f"(uniform: log2 K = {math.log2(K):.3f})"
          + "".join(f"\n  t={t}: {v:.4f}" for t, v in bits_by_scale.items()), flush=True)

    # samples.png: a fixed seed, so that runs can be compared picture by picture
    g = torch.Generator(device).manual_seed(0)
    labels, text, rows = None, None, "unconditional"
    if chain.num_labels:   # one row per class
        labels = torch.arange(chain.num_labels, device=device).repeat_interleave(samples_per_row)
        rows = "one row per class"
    elif chain.tokenizer is not None:   # one row per prompt
        prompts = sample_prompts(chain, tokens)
        text = [p for p in prompts for _ in range(samples_per_row)]
        rows = "one row per prompt: " + "; ".join(prompts)
    n = samples_per_row * (chain.num_labels or (len(text) // samples_per_row if text else samples_per_row))
    x1 = chain.sample(n, labels, text=text, generator=g)
    runs.save_image_grid(vq.decode(x1), os.path.join(out, "samples.png"), nrow=samples_per_row)
    print(f"wrote {runs.bound_path(out)} and {os.path.join(out, 'samples.png')} ({rows})", flush=True)


def sample_prompts(chain: ib.ImageBART, tokens: dict) -> list[str]:
    """The prompts of samples.png on a text chain: on shapes, every shape once in a colour
    that cycles through the palette, then the held-out combinations; else the first eight
    distinct test captions."""
    if ds.shape_caption_parts(tokens["test_captions"][0]) is not None:
        colours = [ds.PALETTE_NAMES[c] for c in ds.SHAPE_FOREGROUNDS]
        return [f"a {colours[k % len(colours)]} {shape}" for k, shape in enumerate(ds.SHAPE_CLASSES)] + \
            [f"a {combination}" for combination in chain.cfg.holdout]
    return list(dict.fromkeys(c for c in tokens["test_captions"] if c))[:8]


def scale_done(out: str, t: int, steps: int) -> bool:
    """Whether scale_<t>.pt exists and has trained `steps` steps (its weights are not read)."""
    return os.path.exists(runs.scale_path(out, t)) and runs.load_checkpoint(runs.scale_path(out, t), "scale")["step"] >= steps


def condition_name(chain: ib.ImageBART) -> str:
    return "class" if chain.num_labels else "text" if chain.tokenizer is not None else "none"


def given(chain: ib.ImageBART) -> str:
    """How a reported bound is conditioned: on -log p(x_1 | c), not -log p(x_1)."""
    return {"class": " given the class", "text": " given the caption", "none": ""}[condition_name(chain)]


def benchmark(args) -> None:
    """--benchmark: training steps of every scale of a randomly initialised chain of --preset
    on random codes (K = 512 for cifar, else 256; 8x8 grids; 10 classes), timed after a
    warm-up, and the MFU against the peak this run measures. One JSON line."""
    device = runs.pick_device(args.device)
    args.dtype = runs.resolve_dtype(args.dtype, device)
    cfg = check_options(args)
    cfg = dataclasses.replace(cfg, num_codes=512 if args.preset == "cifar" else 256, grid=[8, 8], num_labels=10)
    torch.manual_seed(cfg.seed)
    model = ib.ImageBART(cfg).to(device)
    x1 = torch.randint(0, cfg.num_codes, (cfg.batch_size, 8, 8), device=device)       # resident on the device
    labels = torch.randint(0, 10, (cfg.batch_size,), device=device)
    seconds, flops = 0.0, 0
    for t in range(cfg.T, 1, -1):
        runs.compile_module(model.scale(t), args.compile)
        opt = make_optimizer(model.scale(t), cfg, device)
        seconds += runs.time_steps(lambda: optimizer_step(model, t, opt, x1, {"labels": labels}, device),
                                   args.bench_steps, device)
        flops += 3 * runs.scale_flops(cfg, t) * cfg.batch_size   # forward + backward (twice the forward)
    step = seconds / (cfg.T - 1)                                  # a mean step over the scales
    # --- the parts of a step, in fp32 and bf16: one layer's attentions and MLP, the head + KL
    B, N, d = cfg.batch_size, cfg.N, cfg.n_embd
    h = torch.randn(B, N, d, device=device, requires_grad=True)
    memory = torch.randn(B, N + 1, d, device=device)
    block = ib.Block(d, cfg.n_head, 0.0, cross=True).to(device)
    head = torch.nn.Linear(d, cfg.num_codes, bias=False).to(device)
    q = model.diffusion.q_posterior(x1.flatten(1), torch.randint_like(x1.flatten(1), cfg.num_codes), 2)  # one-hot: t = 2
    parts = {"self-attention (causal)": lambda: block.attn(h, causal=True).float().sum().backward(),
             "cross-attention": lambda: block.cross(h, context=memory).float().sum().backward(),
             "MLP": lambda: block.mlp(h).float().sum().backward(),
             "head and KL (Eq. 7)": lambda: model.diffusion.kl(q, head(h)).mean().backward()}
    result = {"benchmark": "train_chain", "preset": args.preset, "compile": args.compile, "dtype": cfg.dtype, "T": cfg.T,
              "batch_size": cfg.batch_size, "tokens_per_step": cfg.batch_size * cfg.N,
              "params_per_scale_M": round(sum(p.numel() for p in model.parameters()) / (cfg.T - 1) / 1e6, 3),
              "step_ms": round(1e3 * step, 2), "tokens_per_s": round(cfg.batch_size * cfg.N / step, 1),
              **runs.speed_report(device, flops / (cfg.T - 1), step, args.peak_tflops, cfg.dtype),
              "parts_ms": runs.time_parts(parts, device, args.bench_steps)}
    print(json.dumps(result), flush=True)


# -----------------------------------------------------------------------------
# claims: one process per piece of work in a run folder (runs.py)

def first_stage_claimed(args, out: str) -> tuple[dict, dict]:
    """first_stage(), under the claim on out's first stage when it has work to do there (rank 0
    alone). A first stage that another process is training: a --scale t process waits for it
    (the README's per-scale recipe starts every scale at once into a folder with none yet), any
    other process stops with one line, before any work."""
    runs.ensure_writable_dir(out)
    if os.path.exists(runs.vq_path(out)) and os.path.exists(runs.tokens_path(out)):
        return first_stage(args, out)                       # there already: only read
    claim = runs.first_stage_claim(out)
    if args.scale is not None:
        claim.take_waiting()
    else:
        holder = claim.take()
        if holder is not None:
            raise runs.UserError(f"{claim.describe(holder)}: let it finish, or start each scale with --scale t, "
                                 f"which waits for it")
    try:
        runs.remove_stale_tmp(out)
        return first_stage(args, out)                       # trained, copied, or found done by the other
    finally:
        claim.release()


def claim_scales(out: str, cfg: ib.ChainConfig, scales: list[int], claims: list) -> list[int]:
    """Claim every scale of `scales` that is still to train (rank 0, for every process of the
    world, before any training): one that another process is training stops this one with one
    line. The claims go into `claims`, for main() to release. -> the scales to train."""
    todo = [t for t in scales if not scale_done(out, t, cfg.steps)]
    for t in todo:
        claim = runs.scale_claim(out, t)
        holder = claim.take()
        if holder is not None:
            raise runs.UserError(f"{claim.describe(holder)}: let it finish")
        claims.append(claim)
    runs.remove_stale_tmp(out)          # a .tmp of a claimed scale is a killed run's; others' are left alone
    return todo


def final_files(args, out: str, tokens: dict) -> list[str]:
    """What the end of a run writes once every scale is trained: bound.json, samples.png and,
    when the judge scores the run, eval.json."""
    files = [runs.bound_path(out), os.path.join(out, "samples.png")]
    if args.eval_n and "train_labels" in tokens and runs.recorded_dataset(out) is not None:
        files.append(runs.eval_path(out))
    return files


def up_to_date(files: list[str], out: str, T: int) -> bool:
    """Whether every one of `files` was written after the last checkpoint of every scale: the
    end of the run is done for these weights (by this process, or by another of the recipe)."""
    newest = max(os.path.getmtime(runs.scale_path(out, t)) for t in range(2, T + 1))
    return all(os.path.exists(f) and os.path.getmtime(f) >= newest for f in files)


def finish_run(args, out: str, tokens: dict, T: int, device, times: dict) -> None:
    """Once every scale is trained (by this process or by others, one --scale each): the bound,
    samples and the judge's figures, by the one process that claims them. Another that finds
    them claimed, or done for these weights, says so and is done: its own work is saved, and it
    never stops with an error after it (exit 0)."""
    files = final_files(args, out, tokens)
    names = ", ".join(os.path.basename(f) for f in files)
    claim = runs.final_claim(out)
    if up_to_date(files, out, T):
        print(f"{names}: up to date with every scale, nothing left to do "
              f"(python evaluate.py --run {out} judges the run again)", flush=True)
        return
    holder = claim.take()
    if holder is not None:
        print(f"{claim.describe(holder)}: that process writes {names}; this one is done", flush=True)
        return
    try:
        if up_to_date(files, out, T):                   # written by another just before this claim
            print(f"{names}: written by another process meanwhile; this one is done", flush=True)
            return
        t_report = time.time()
        final_report(out, tokens, device, args.samples)
        times["bound and samples"] = time.time() - t_report
        if args.eval_n and "train_labels" in tokens:   # the judge's figures (evaluate.py)
            if runs.recorded_dataset(out) is None:
                print(f"no judge: {out}'s first stage does not record its data set; "
                      f"run python evaluate.py --run {out} --dataset ...", flush=True)
            else:
                t_eval = time.time()
                result = evaluate.evaluate_folder(out, judge_dir=args.judge_dir, n=args.eval_n,
                                                  judge_steps=args.judge_steps, device=device,
                                                  shipped_judges=not args.fresh_judges)
                print(json.dumps(result), flush=True)
                times["evaluation"] = result["eval_seconds"]
                times["judges and real images"] = time.time() - t_eval - result["eval_seconds"]
    finally:
        claim.release()


def main():
    # --- command line: everything that can be refused is refused before any work
    started = time.time()
    args = build_parser().parse_args()
    runs.choose_preset(args)
    if args.benchmark:
        runs.check_speed_args(args)
        return benchmark(args)
    evaluate.check_judge_options(args.eval_n, args.judge_steps, zero_skips=True)
    runs.check_number(args.samples, "--samples", 1, whole=True)
    out = runs.run_dir(args.dataset, args.out)
    if args.ship:                                     # the shipped copy of a trained run, nothing trained
        if not runs.is_trained(out):
            raise runs.UserError(f"--ship copies a trained run, and {out} is not trained yet; train it first")
        written = runs.ship_run(out, runs.SHIPPED_RUN)
        return print(f"wrote {', '.join(written)} ({sum(map(os.path.getsize, written)) / 2 ** 20:.1f} MiB)")
    world, device = runs.init_world(args.device)         # torchrun: one process of several
    args.dtype = runs.resolve_dtype(args.dtype, device)  # auto -> fp32 or bf16, from the hardware
    say = world.say
    if args.first_stage and not os.path.isdir(args.first_stage):
        raise runs.UserError(f"--first-stage {args.first_stage} is not a folder")
    world.share(check_options(args).batch_size)       # a global batch that the processes can split
    if not args.first_stage and not os.path.exists(runs.tokens_path(out)):   # a first stage will be trained
        runs.check_vq_config(runs.preset_config(ib.VQ_PRESETS, args.preset))
        with runs.user_errors():
            ds.check_dataset(args.dataset)
    claims = []                                       # what rank 0 holds for the world, released at the end
    try:
        # --- the first stage and its codes x_1 (trained here when the run folder has none; under
        # torchrun by rank 0 alone, the others waiting for it)
        tokens, times = runs.on_rank_0(world, lambda: first_stage_claimed(args, out)) or (None, {})
        tokens = tokens or runs.load_tokens(out)        # times: where this command's minutes went
        # --- the scales to train, each claimed first (by rank 0, for every process), before their
        # checkpoints are compared with the options: a scale another process is training says so
        options = check_options(args)
        scales = [args.scale] if args.scale else list(range(options.T, 1, -1))
        todo = runs.on_rank_0(world, lambda: claim_scales(out, options, scales, claims), share=True)
        cfg = resolve_config(args, tokens, out)
        if todo and world.main and args.eval_n and "train_labels" in tokens:
            runs.ensure_writable_dir(args.judge_dir)    # the judge's cache, needed at the end: checked now
        # the weights' initialisation is part of the run: seeded, so that a rerun (or a resumed run
        # whose first stage was trained in another process) starts every scale from the same weights
        torch.manual_seed(cfg.seed)
        model = ib.ImageBART(cfg).to(device)
        say(f"chain: T = {cfg.T}, betas {[round(b, 4) for b in model.diffusion.betas]}, alpha_bar "
            f"{[round(model.diffusion.alpha_bar(t), 4) for t in range(1, cfg.T + 1)]}, K = {cfg.num_codes}, "
            f"N = {cfg.N} tokens, {condition_name(model)}-conditioned"
            + (f" ({len(cfg.vocab)} words, captions of up to {cfg.text_len})" if cfg.text_len else ""), flush=True)

        # --- the scales, coarsest first: each is independent of the others (Sec. 3.3)
        t0 = time.time()
        workers, threads = scale_workers(args.workers, device, world, len(todo))
        if workers > 1:                        # one process per scale, side by side (a CPU)
            for t in sorted(set(scales) - set(todo), reverse=True):
                say(f"scale t={t}: finished, skipping", flush=True)
            scale_times = train_scales(cfg, todo, out, workers, threads, args.compile)
        else:                                  # one scale after the other, in this process
            scale_times = {}
            for t in scales:
                runs.compile_module(model.scale(t), args.compile)       # in place: the state dict keeps its keys
                t_scale = time.time()
                train_scale(model, t, tokens, out, device, world)
                scale_times[t] = time.time() - t_scale
        times["chain"] = time.time() - t0
        say(f"chain training took {times['chain']:.0f}s", flush=True)
        if world.main and todo:
            say(f"wrote {', '.join(runs.plot_run(out, parts=set(todo)))}", flush=True)     # the loss curves
        runs.leave_world(world)              # under torchrun: the other processes are done, rank 0 reports alone
        if not world.main:
            return
        for claim in claims:               # the scales are saved: others may read them from here on
            claim.release()

        # --- once every scale is trained (by this process or by others, one --scale each):
        # the bound, samples, and the judge's figures, by whichever process claims them
        if all(scale_done(out, t, cfg.steps) for t in range(2, cfg.T + 1)):
            finish_run(args, out, tokens, cfg.T, device, times)
        else:
            print("not every scale is trained yet: the bound and samples come once they are", flush=True)
        times["total"] = time.time() - started
        chain = ", ".join(f"t={t} {s:.0f}s" for t, s in scale_times.items()) + ("; side by side" if workers > 1 else "")
        print("where the time went: " + " | ".join(f"{k} {v:.0f}s" + (f" ({chain})" if k == "chain" else "")
                                                   for k, v in times.items()), flush=True)
    finally:
        for claim in claims:
            claim.release()


if __name__ == "__main__":
    runs.run_main(main)
