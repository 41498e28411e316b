"""Profile one training step of a chain scale: where a step's time goes on this device.

    python .ci/gpu-profile.py [--preset cifar] [--t 2] [--steps 5] [--out profile.json]

One JSON object (printed, and written to --out): the top kernels by device time; the device's
busy time against the wall time of a step (the rest is time between kernels: launches and host
work); the time of each part of the step, labelled as the paper's parts (the diffusion's
draws and posterior, Eq. 5-6; the network's forward; the KL of Eq. 7; backward; AdamW); and
the host-device synchronisations seen in the trace. On a CPU the same runs with the CPU's
activities only (useful to check the script, not to read GPU figures from).
"""
import argparse
import dataclasses
import json
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import imagebart as ib  # noqa: E402
import runs  # noqa: E402
from train_chain import make_optimizer  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cifar")
    p.add_argument("--t", type=int, default=2, help="the scale to profile (2 = encoder-decoder, T = decoder-only)")
    p.add_argument("--steps", type=int, default=5, help="profiled steps, after 5 warm-up steps")
    p.add_argument("--dtype", default="auto", choices=runs.DTYPES)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = runs.pick_device(None)
    dtype = runs.resolve_dtype(args.dtype, device)
    cfg = dataclasses.replace(runs.preset_config(ib.CHAIN_PRESETS, args.preset), num_codes=512 if args.preset == "cifar"
                              else 256, grid=[8, 8], num_labels=10, dtype=dtype)
    torch.manual_seed(0)
    chain = ib.ImageBART(cfg).to(device)
    t, net = args.t, chain.scale(args.t)
    opt = make_optimizer(net, cfg, device)
    x1 = torch.randint(0, cfg.num_codes, (cfg.batch_size, cfg.N), device=device)
    labels = torch.randint(0, 10, (cfg.batch_size,), device=device)
    D = chain.diffusion

    def step():
        # ImageBART.loss, written out in its parts so that each gets its own label
        with record_function("diffusion: x_t ~ q(x_t | x_1), posterior, x_{t-1} draw (Eq. 5-6)"):
            x_t = D.q_sample(x1, t)
            q = D.q_posterior(x_t, x1, t)
            x_tm1 = D.draw(q)
        with runs.autocast(device, dtype):
            with record_function("network forward"):
                logits = net(x_t, x_tm1, labels)
            with record_function("KL to the posterior (Eq. 7)"):
                loss = D.kl(q, logits).mean()
        with record_function("backward"):
            opt.zero_grad(set_to_none=True)
            loss.backward()
        with record_function("clip + AdamW"):
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
        return loss

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(5):
        step()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        sync()
    wall = (time.perf_counter() - t0) / args.steps
    events = prof.key_averages()
    on_device = lambda e: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))
    kernels = sorted((e for e in events if on_device(e) > 0), key=on_device, reverse=True)
    busy = sum(on_device(e) for e in events) / 1e3 / args.steps          # ms of kernels per step
    parts = {e.key: {"cpu_ms": round(e.cpu_time_total / 1e3 / args.steps, 3),
                     "device_ms": round(getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0))
                                        / 1e3 / args.steps, 3)}
             for e in events if e.key.startswith(("diffusion", "network", "KL", "backward", "clip"))}
    syncs = {e.key: e.count // args.steps for e in events
             if any(s in e.key for s in ("Synchronize", "item", "_local_scalar_dense", "Memcpy DtoH", "nonzero"))}
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "preset": args.preset, "t": t, "dtype": dtype, "batch": cfg.batch_size,
              "step_ms_wall": round(1e3 * wall, 3), "kernels_ms_per_step": round(busy, 3),
              "between_kernels_fraction": round(max(0.0, 1 - busy / (1e3 * wall)), 3) if device.type == "cuda" else None,
              "kernel_launches_per_step": sum(e.count for e in kernels) // args.steps,
              "parts": parts, "syncs_per_step": syncs,
              "top_kernels": [{"name": e.key[:100], "ms_per_step": round(on_device(e) / 1e3 / args.steps, 3),
                               "calls_per_step": e.count // args.steps} for e in kernels[:15]]}
    print(json.dumps(result), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
