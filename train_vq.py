"""Train the first stage (VQGAN, paper Sec. 3.2), shrink its codebook, tokenize the data.

    python train_vq.py --dataset shapes --preset tiny      # 2-core CPU, a few minutes
    python train_vq.py --dataset cifar --preset cifar      # one GPU

Writes vq.pt, tokens.pt, log.jsonl, vq_recon.png, loss_vq.png into --out (default runs/<dataset>); the same command
resumes from the last checkpoint and leaves a finished run as it is. The file reads: setup; the GAN step (Eq. 3-4,
Taming Transformers' hinge loss and adaptive weight); finishing (held-out PSNR, the codebook shrunk to the codes in
use, Sec. 4.1, the data as codes x_1 in tokens.pt); train_first_stage(), the whole stage, which train_chain.py calls.
"""
import argparse
import dataclasses
import json
import os
import time
import types

import torch
from torch.utils.flop_counter import FlopCounterMode

import data as ds
import imagebart as ib
import runs
from evaluate import refuse

RESUMABLE = {"steps", "log_every", "ckpt_every", "dtype"}   # may change when a run resumes (dtype: on another machine)


# ----- setup: models, optimizers, resume ------------------------------------------------------
def check_first_stage(cfg: ib.VQConfig, dataset: str) -> None:
    """One line for a config or a data set no first stage can train with, before any work."""
    runs.check_vq_config(cfg)
    with runs.user_errors():
        ds.check_dataset(dataset)


def setup(cfg: ib.VQConfig, ckpt: dict | None, device: torch.device, lpips_weights: str | None,
          compile: str | None = None) -> types.SimpleNamespace:
    """The GAN loop's state, new or resumed from `ckpt`: cfg, vq, disc, opt_g, opt_d, step, lpips (None: no weights)."""
    step = ckpt["step"] if ckpt else 0
    torch.manual_seed(cfg.seed + step)      # one seed per (run, step): a resumed run draws the same batches
    # the perceptual loss: a new run uses it when its weights are found; a resumed one keeps doing what it did
    lpips = runs.build_lpips(lpips_weights) if ckpt is None or cfg.has_perceptual else None
    refuse(lpips is None and ckpt is not None and cfg.has_perceptual,
           "this run was trained with the perceptual loss but its weights are gone")
    vq = ib.VQGAN(dataclasses.replace(cfg, has_perceptual=lpips is not None)).to(device)
    disc = ib.PatchDiscriminator(cfg.disc_layers, cfg.disc_ch).to(device)
    # Adam with beta1 = 0.5, the usual choice for GANs (and taming-transformers')
    opt_g, opt_d = (torch.optim.Adam(m.parameters(), lr=cfg.lr, betas=(0.5, 0.9)) for m in (vq, disc))
    for module, key in ((vq, "model"), (disc, "disc"), (opt_g, "opt_g"), (opt_d, "opt_d")) if ckpt else ():
        module.load_state_dict(ckpt[key])
    for module in (vq, disc):
        runs.compile_module(module, compile)       # in place: the state dicts keep their keys
    return types.SimpleNamespace(cfg=vq.cfg, vq=vq, disc=disc, opt_g=opt_g, opt_d=opt_d, step=step,
                                 lpips=lpips and lpips.to(device))


# ----- the GAN step (Eq. 3-4) -----------------------------------------------------------------
def gan_step(gan, x: torch.Tensor, gan_on: bool, world: runs.World = runs.World()) -> dict:
    """One GAN step on images x (B, 3, H, W) in [-1, 1]: the autoencoder's, then (gan_on) the discriminator's. Under
    torchrun gradients and lambda are averaged by hand (lambda needs the last layer's gradients, which DDP hides)."""
    cfg, vq, disc, lpips = gan.cfg, gan.vq, gan.disc, gan.lpips
    zero = torch.zeros((), device=x.device)
    # --- generator (autoencoder) step: f_rec + L_cb + lambda * the GAN term (Eq. 3-4)
    with runs.autocast(x.device, cfg.dtype):
        z = vq.encoder(x)                                                # E(x): (B, D, h, w)
        z_q, q_loss, codes = vq.quantizer(z)                             # L_cb (Eq. 4), codes (B, h, w)
        x_rec = vq.decoder(z_q)                                          # G(z_q)
        rec_loss = (x - x_rec).abs().mean()                              # L1 reconstruction
        n = cfg.perceptual_batch or cfg.batch_size                       # LPIPS on part of the batch
        p_loss = lpips(x[:n], x_rec[:n]).mean() if lpips is not None and cfg.perceptual_weight > 0 else zero
        nll = rec_loss + cfg.perceptual_weight * p_loss                  # f_rec (Eq. 3: LPIPS; + L1 here)
        g_loss = -disc(x_rec).mean() if gan_on else zero
    lam = ib.adaptive_weight(nll, g_loss, vq.decoder.conv_out.weight) * cfg.disc_weight if gan_on else torch.zeros(())
    lam = world.sum_(lam.clone()) / world.size                           # one lambda for every process
    loss = nll + lam * g_loss + q_loss
    gan.opt_g.zero_grad(set_to_none=True)
    loss.backward()
    world.average_gradients(vq)
    gan.opt_g.step()
    # --- discriminator step: hinge loss on real images against the (detached) reconstructions
    d_loss = torch.zeros(())
    if gan_on:
        with runs.autocast(x.device, cfg.dtype):
            d_loss = ib.hinge_d_loss(disc(x), disc(x_rec.detach()))
        gan.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        world.average_gradients(disc)
        gan.opt_d.step()
    return {"loss": loss, "rec": rec_loss, "lpips": p_loss, "q": q_loss, "g": g_loss, "d": d_loss,
            "lambda": lam, "codes": codes, "z": z}


def codebook_stats(full_indices: torch.Tensor, num_codes: int) -> tuple[int, float]:
    """How much of the codebook is alive: (codes used, perplexity exp(H), near the number used if used evenly)."""
    p = torch.bincount(full_indices.flatten(), minlength=num_codes).float()
    p = p[p > 0] / p.sum()
    return len(p), float((-(p * p.log()).sum()).exp())


# ----- finishing: evaluate, shrink the codebook, tokenize -------------------------------------
@torch.no_grad()
def finish(vq: ib.VQGAN, out: str, device, data: dict, dataset: dict, lpips_weights: str | None) -> dict:
    """Evaluate on held-out images (PSNR, LPIPS, codes used), shrink the codebook to the codes of the training images
    and their mirror images (Sec. 4.1; the test split stays unseen by K), tokenize. -> seconds per part."""
    t0 = time.time()
    vq.eval()
    (x_train, y_train, num_classes, c_train), (x_test, y_test, _, c_test) = data["train"], data["test"]
    # images per pass: 64 on a CPU, whose caches then hold the activations (3x faster than 1 000), 1 000 on a GPU
    batch = 64 if device.type == "cpu" else 1000
    pieces = lambda x: (ds.to_float(x[sl].to(device)) for sl in runs.batches(len(x), batch))
    encode_all = lambda x: torch.cat([vq.encode(piece).cpu() for piece in pieces(x)]).to(torch.int16)
    psnr, lp, codes, lpips = [], [], [], runs.build_lpips(lpips_weights, quiet=True)
    for x in pieces(x_test):
        z_q, _, idx = vq.quantizer(vq.encoder(x))
        rec = ds.to_float(ds.to_uint8(vq.decoder(z_q)))                # as it would be saved as 8-bit
        psnr.append(ds.psnr(x, rec))
        lp += [lpips.to(device)(x, rec)] if lpips else []
        codes.append(idx.flatten())
    used, ppl = codebook_stats(torch.cat(codes), vq.cfg.codebook_size)
    metrics = {"psnr": torch.cat(psnr).mean().item(), "codes_used": used, "codebook_size": vq.cfg.codebook_size,
               "perplexity": ppl} | ({"lpips": torch.cat(lp).mean().item()} if lp else {})
    t1 = time.time()
    # and the mirror images (the chain can no longer flip pixels); before shrinking, encode() gives full indices
    full_train = torch.cat([encode_all(x_train), encode_all(x_train.flip(-1))]).long()
    vq.shrink(full_train.unique())
    metrics["codes_after_shrinking"] = vq.num_codes
    print("held-out: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                   for k, v in metrics.items()), flush=True)
    # vq.pt again, now shrunk (which marks it finished); the GAN's states are kept as they were
    ckpt = runs.load_checkpoint(runs.vq_path(out), "vq")
    runs.save_atomic(runs.vq_checkpoint(vq, ckpt["disc"], ckpt["opt_g"], ckpt["opt_d"], ckpt["step"], dataset,
                                        shrunk=True, metrics=metrics), runs.vq_path(out))
    tokens = {"kind": "tokens", "train": vq.code_map.cpu()[full_train].to(torch.int16), "test": encode_all(x_test),
              "num_codes": vq.num_codes, "dataset": dataset, "num_labels": num_classes if y_train is not None else 0}
    if y_train is not None:   # the mirrored copies keep their labels; names for sample.py --class NAME
        tokens |= {"train_labels": torch.cat([y_train, y_train]), "test_labels": y_test,
                   "class_names": ds.class_names(dataset["spec"])}
    if c_train is not None:   # captions (a mirrored image's has left and right swapped) and the tokenizer: the
        # training captions' words, the longest caption of either split as its length
        train_captions = c_train + [ds.mirror_caption(c) for c in c_train]
        tokens |= {"train_captions": train_captions, "test_captions": c_test,
                   "vocab": ib.Tokenizer.build(train_captions).vocab,
                   "text_len": ib.Tokenizer.build(train_captions + list(c_test)).max_len}
    runs.save_atomic(tokens, runs.tokens_path(out))
    runs.trim_log(runs.log_path(out), lambda r: r.get("stage") == "vq_eval")          # one evaluation record
    runs.append_log(runs.log_path(out), {"stage": "vq_eval", **metrics})
    print(f"wrote {runs.tokens_path(out)}: {len(tokens['train'])} train + {len(tokens['test'])} test code grids "
          f"of {tuple(tokens['test'].shape[1:])}, K = {vq.num_codes} ({time.time() - t1:.0f}s)", flush=True)
    print(f"wrote {', '.join(runs.plot_run(out, parts={'vq'}))}", flush=True)     # the loss curves
    return {"held-out check": t1 - t0, "tokenizing": time.time() - t1}


# ----- the whole first stage (resume, the GAN loop, finishing), as train_chain.py calls it ------
def train_first_stage(cfg: ib.VQConfig, args, out: str, device: torch.device, world: runs.World) -> dict:
    """Train (or resume) the first stage of `cfg` on --dataset in `out`, shrink, tokenize; the caller has run
    check_first_stage and holds the folder's lock; rank 0 alone writes. -> seconds per part ({}: nothing to do)."""
    share = world.share(cfg.batch_size)        # a global batch that the processes can split
    cfg, path = dataclasses.replace(cfg, dtype=runs.resolve_dtype(args.dtype, device)), runs.vq_path(out)
    ckpt = runs.load_checkpoint(path, "vq") if os.path.exists(path) else None
    if ckpt is not None:      # a resumed run keeps its saved config; only the RESUMABLE fields may change
        saved = ib.VQConfig(**ckpt["config"])
        runs.check_same_config(saved, dataclasses.replace(cfg, has_perceptual=saved.has_perceptual), RESUMABLE, path)
        refuse(ckpt["shrunk"] and cfg.steps > ckpt["step"],
               f"{path} is finished (step {ckpt['step']}) and its codebook shrunk; train longer in a new --out")
        cfg = dataclasses.replace(saved, **{k: getattr(cfg, k) for k in RESUMABLE})
        if ckpt["shrunk"] and os.path.exists(runs.tokens_path(out)):
            world.say(f"first stage in {out} is finished (step {ckpt['step']}): {ckpt.get('metrics', {})}")
            return {}
    dataset, root, sizes = args.dataset, args.data_root, (cfg.train_size, cfg.test_size)
    record = ds.dataset_record(dataset, cfg.resolution, root, *sizes)
    with runs.user_errors():
        data = {split: ds.load_dataset(dataset, split, cfg.resolution, root, sizes) for split in ("train", "test")}
    world.say(f"{dataset}: {len(data['train'][0])} training images, {len(data['test'][0])} test images"
              + (" (a fixed tenth of the folder)" if dataset.startswith("folder:") else ""))
    if ckpt is not None and ckpt["shrunk"]:
        # trained and shrunk, but tokens.pt is missing: unshrink and tokenize again (shrinking is deterministic)
        vq = runs.vqgan_from_checkpoint(ckpt).to(device)
        vq.code_map.copy_(torch.arange(cfg.codebook_size))
        vq.used_codes = torch.arange(cfg.codebook_size, device=device)
        return finish(vq, out, device, data, record, args.lpips_weights) if world.main else {}
    refuse(ckpt is not None and runs.trained_scales(out),
           f"{out} holds trained chain scales; retraining its first stage would invalidate them. Use another --out")
    t0 = time.time()
    gan = setup(cfg, ckpt, device, args.lpips_weights, args.compile)
    if world.size > 1:    # the same initial weights everywhere (seeded alike above), then each process its own
        # batches; on GPUs the discriminator's BatchNorm spans the whole batch
        torch.manual_seed(cfg.seed + gan.step + 7919 * world.rank)
        if device.type == "cuda":
            gan.disc = torch.nn.SyncBatchNorm.convert_sync_batchnorm(gan.disc)
    if ckpt is not None:
        world.say(f"resuming {path} from step {gan.step}")
    r, side = cfg.resolution, cfg.resolution // cfg.factor
    shares = f", {world.size} processes of {share} images each" if world.size > 1 else ""
    world.say(f"VQGAN: {sum(p.numel() for p in gan.vq.parameters()) / 1e6:.2f}M parameters, {r}x{r} -> "
              f"{side}x{side} codes, K = {cfg.codebook_size}, device {device}{shares}")

    # --- the GAN loop; under torchrun every process runs it on its share of each batch, rank 0 writes
    vq, x_train = gan.vq, data["train"][0].to(device)         # uint8 images resident on the device
    fixed = ds.to_float(data["test"][0][:16]).to(device)       # the reconstructions of vq_recon.png
    progress = runs.Progress(cfg.steps, start=gan.step, every=cfg.log_every, prefix="vq ")
    if world.main:   # steps logged after the checkpoint resumed from are about to run again
        runs.trim_log(runs.log_path(out), lambda r: r.get("stage") == "vq" and r.get("step", 0) > gan.step)
    while (step := gan.step) < cfg.steps:
        vq.train()

        # --- learning rate: linear warm-up, then cosine decay (the generator; the discriminator keeps cfg.lr)
        lr = runs.cosine_lr(step, cfg.steps, cfg.lr, warmup=min(200, cfg.steps // 10))
        for group in gan.opt_g.param_groups:
            group["lr"] = lr

        # --- batch: random images, half of them mirrored (this process's share of it)
        idx = torch.randint(0, len(x_train), (share,))
        x = ds.random_flip(ds.to_float(x_train[idx.to(device)]))

        # --- the GAN step; the adversarial terms join once reconstructions are fair
        m = gan_step(gan, x, step >= cfg.disc_start, world)

        # --- dead-code restarts onto this batch's encoder outputs, none late on (the codes settle before shrinking);
        # under torchrun: dead by every process's counts, moved by rank 0, sent to the others
        restarted = 0
        if cfg.restart_every and (step + 1) % cfg.restart_every == 0 and step < 0.8 * cfg.steps:
            world.sum_(vq.quantizer.hits)
            restarted = vq.quantizer.restart_dead_codes(m["z"].detach()) if world.main else 0
            vq.quantizer.hits.zero_()
            if world.size > 1:
                torch.distributed.broadcast(vq.quantizer.codebook.weight.data, src=0)
        gan.step = step = step + 1
        if not torch.isfinite(m["loss"]):            # the message is built only when it is needed
            raise runs.UserError(f"the loss became {m['loss'].item()} at step {step}; the last good checkpoint is "
                                 f"kept in {path}")
        if not world.main:
            continue

        # --- logging: a progress line with ETA, and log.jsonl every log_every steps
        used, ppl = codebook_stats(m["codes"], cfg.codebook_size)
        losses = {k: m[k].item() for k in ("rec", "lpips", "q", "g", "d")}
        progress(step - 1, **losses, codes=used)
        if step % cfg.log_every == 0 or step == cfg.steps:
            runs.append_log(runs.log_path(out), {"stage": "vq", "step": step, **losses, "lambda": float(m["lambda"]),
                                                 "batch_codes": used, "batch_perplexity": ppl, "restarted": restarted,
                                                 "lr": lr, "time": time.time()})

        # --- checkpoint, and vq_recon.png: two pairs of rows of 8, originals above their reconstructions
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            runs.save_atomic(runs.vq_checkpoint(vq, gan.disc.state_dict(), gan.opt_g.state_dict(),
                                                gan.opt_d.state_dict(), step, record), path)
            with torch.no_grad():
                rec = vq.eval().decoder(vq.quantizer(vq.encoder(fixed))[0]).clamp(-1, 1)
            runs.save_image_grid(torch.cat([fixed[:8], rec[:8], fixed[8:16], rec[8:16]]),
                                 os.path.join(out, "vq_recon.png"), nrow=8)
    times = {"first stage": time.time() - t0}
    world.say(f"first stage trained in {times['first stage']:.0f}s")
    return times | finish(vq, out, device, data, record, args.lpips_weights) if world.main else times


def report_benchmark(name: str, args, cfg, device, step, unit: str, per_step: int, calls: int = 1, **fields) -> None:
    """--benchmark's JSON line: a step's FLOPs (torch's counter over a call of step(), `calls` steps), time, MFU."""
    with FlopCounterMode(display=False) as counter:
        step()
    flops, seconds = counter.get_total_flops() / calls, runs.time_steps(step, args.bench_steps, device) / calls
    print(json.dumps({"benchmark": name, "preset": args.preset, "compile": args.compile, "dtype": cfg.dtype, **fields,
                      "step_ms": round(1e3 * seconds, 2), f"{unit}_per_s": round(per_step / seconds, 1),
                      **runs.speed_report(device, flops, seconds, args.peak_tflops, cfg.dtype)}), flush=True)


def build_parser(doc: str = __doc__, config=ib.VQConfig) -> argparse.ArgumentParser:
    """Both training scripts' options: the run's, then one per field of `config` (which override the preset)."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    runs.add_run_args(p)
    runs.add_config_args(p, config)
    return p


def main():
    args = build_parser().parse_args()
    runs.choose_preset(args)
    cfg = runs.config_from_args(ib.VQ_PRESETS, args.preset, args)
    check_first_stage(cfg, args.dataset)                       # before any work (and any process group)
    if args.benchmark:   # GAN steps (LPIPS when its weights are found) of a random first stage on random images
        device = runs.pick_device(args.device)
        cfg = dataclasses.replace(cfg, dtype=runs.resolve_dtype(args.dtype, device))
        gan = setup(cfg, None, device, args.lpips_weights, args.compile)       # seeded by cfg.seed
        x = torch.rand(cfg.batch_size, 3, cfg.resolution, cfg.resolution, device=device) * 2 - 1
        return report_benchmark("train_vq", args, cfg, device, lambda: gan_step(gan, x, gan_on=True), "images",
                                cfg.batch_size, batch_size=cfg.batch_size, resolution=cfg.resolution,
                                perceptual=gan.lpips is not None,
                                params_M=round(sum(p.numel() for p in gan.vq.parameters()) / 1e6, 3))
    out = runs.run_dir(args.dataset, args.out)
    world, device = runs.init_world(args.device)              # torchrun: one process of several
    world.on_rank_0(lambda: (runs.ensure_writable_dir(out), runs.lock_run(out)))   # held for the world
    train_first_stage(cfg, args, out, device, world)
    runs.leave_world(world)


if __name__ == "__main__":
    runs.run_main(main)
