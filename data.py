"""The images: shapes and scenes (built in), CIFAR-10, any folder of images, captions.

Each data set comes whole: uint8 images (N, 3, H, W), labels or None, captions or None. Bad input: ValueError.
"""
import glob
import hashlib
import os
import pickle
import re
import shutil
import tarfile
import urllib.request
import warnings
from math import cos, pi, sin
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

# ----- Shapes, built in ---------------------------------------------------------------
SHAPE_CLASSES = ["circle", "square", "triangle", "diamond", "plus", "ring", "star", "frame", "cross", "half-disc"]
# Seven colours on one flat black background: a code is a 4x4 patch, so each colour pair spells an outline in codes
# of its own; on 56 pairs the tiny chain drew blobs (42 % judged), on one 94.7 % (README). The class is the shape alone.
PALETTE_NAMES = ["red", "yellow", "green", "cyan", "blue", "magenta", "white", "black"]
PALETTE = np.array([[230, 25, 50], [255, 215, 0], [40, 170, 60], [60, 220, 230],
                    [20, 60, 200], [210, 40, 210], [245, 245, 245], [25, 25, 25]])
SHAPE_FOREGROUNDS = [0, 1, 2, 3, 4, 5, 6]  # palette rows a shape may have
SHAPE_BACKGROUNDS = [7]                    # palette rows a background may have (never the shape's)


def dominant_colours(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> (B,) the non-background palette row most pixels are nearest to (-1: none)."""
    pixels = images.float().permute(0, 2, 3, 1).flatten(1, 2)                          # (B, HW, 3)
    nearest = torch.cdist(pixels, torch.as_tensor(PALETTE, dtype=torch.float32)[None]).argmin(-1)   # (B, HW)
    counts = (nearest[..., None] == torch.arange(len(PALETTE))).sum(1)                # (B, colours)
    counts[:, SHAPE_BACKGROUNDS] = 0
    return torch.where(counts.sum(1) > 0, counts.argmax(1), -1)


def make_shapes(n: int, seed: int = 0, resolution: int = 32) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """One shape (its class) per image: random colour, size, rotation, place; drawn at 4x, box-filtered; seeded."""
    rng, S, captions = np.random.default_rng(seed), resolution * 4, []
    images, labels = np.empty((n, resolution, resolution, 3), np.uint8), rng.integers(0, len(SHAPE_CLASSES), size=n)
    for i, name in enumerate(SHAPE_CLASSES[k] for k in labels):
        bg = rng.choice(SHAPE_BACKGROUNDS)
        fg = rng.choice([c for c in SHAPE_FOREGROUNDS if c != bg])
        # the half-size r in pixels (the shape spans 50-68 %), the centre near the image's, the rotation
        r, (cx, cy), rot = rng.uniform(0.25, 0.34) * S, S / 2 + rng.uniform(-0.08, 0.08, size=2) * S, rng.uniform(-1, 1)
        bg_rgb, color = (tuple(int(v) for v in PALETTE[c]) for c in (bg, fg))
        draw, w, h = ImageDraw.Draw(canvas := Image.new("RGB", (S, S), bg_rgb)), r * 0.35, r * 0.55
        # polygons: corners (centre's y, radius, angle) around cx, a star's far and near in turn; a tall diamond
        corners = {"square": [(cy, r * 1.3, rot * 0.3 + pi / 4 + 2 * pi * k / 4) for k in range(4)],
                   "triangle": [(cy + r * 0.2, r * 1.2, -pi / 2 + rot * 0.3 + 2 * pi * k / 3) for k in range(3)],
                   "star": [(cy, r * (1.15, 0.5)[k % 2], -pi / 2 + rot * 0.2 + pi * k / 5) for k in range(10)]}
        polygons = {s: [(cx + rr * cos(a), y + rr * sin(a)) for y, rr, a in c] for s, c in corners.items()}
        polygons["diamond"] = [(cx, cy - r * 1.2), (cx + r * 0.7, cy), (cx, cy + r * 1.2), (cx - r * 0.7, cy)]
        if name in polygons:
            draw.polygon(polygons[name], fill=color)
        elif name in ("circle", "ring", "frame"):         # a ring and a frame: a disc and a square with a hole
            holed = [([cx - r, cy - r, cx + r, cy + r], color), ([cx - h, cy - h, cx + h, cy + h], bg_rgb)]
            for xy, fill in holed[:1 if name == "circle" else 2]:
                (draw.rectangle if name == "frame" else draw.ellipse)(xy, fill=fill)
        elif name == "plus":                              # a wide bar and a tall one
            for bar in ([cx - r, cy - w, cx + r, cy + w], [cx - w, cy - r, cx + w, cy + r]):
                draw.rectangle(bar, fill=color)
        elif name == "cross":                             # an X: two thick diagonals
            for ends in ([(cx - r, cy - r), (cx + r, cy + r)], [(cx - r, cy + r), (cx + r, cy - r)]):
                draw.line(ends, fill=color, width=max(1, int(h)))
        else:                                             # half-disc
            draw.pieslice([cx - r, cy - r * 0.6, cx + r, cy + r * 1.4], 180, 360, fill=color)
        images[i] = np.asarray(canvas.resize((resolution, resolution), Image.BOX))
        # the caption of the draws (it draws nothing): size by tertile, position by thirds of its range
        hpos = "left" if cx < 0.4733 * S else "right" if cx > 0.5267 * S else "centre"
        vpos = "upper" if cy < 0.4733 * S else "lower" if cy > 0.5267 * S else "middle"
        captions.append(shape_caption(dict(size=SHAPE_SIZES[min(2, int((r / S - 0.25) / 0.03))], shape=name,
                        colour=PALETTE_NAMES[fg], position=f"{vpos} {hpos}", background=PALETTE_NAMES[bg])))
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels).long(), captions


# ----- Scenes, built in: landscapes that continue sideways -------------------------------
# Patch-wise sampling (Sec. 4.2, Fig. 4) needs data alike at every offset: a scene is a skyline y(x) of the absolute
# column x (its class: the kind), stationary in x, so a wide scene cropped at offset o is the image drawn at o.
SCENE_CLASSES = ["mountains", "hills", "sea", "city", "forest"]
SCENE_SKIES = {"day": (110, 170, 230), "dusk": (225, 135, 85), "night": (25, 30, 70)}
SCENE_GROUNDS = {"day": (40, 105, 50), "dusk": (115, 85, 55), "night": (80, 80, 95)}   # one per sky
SCENE_MAX_WIDTH = 1024          # in pixels at resolution 32: the widest scene the draws support
# widths, heights, every other height (in H): peaks and valleys, tall and low buildings, each wall a step >= 0.1 H
_SCENE_STEPS = {"mountains": ((0.35, 0.6), (0.2, 0.35), (-0.25, -0.15)), "forest": ((0.2, 0.3), (0.25, 0.4), None),
                "city": ((0.2, 0.4), (0.3, 0.45), (0.05, 0.2))}


def _scene(rng, label: int, H: int):
    """Draws one scene -> (its sky's index, y(x): the ground's top, in rows from the top, at absolute columns x)."""
    name, span = SCENE_CLASSES[label], SCENE_MAX_WIDTH * H / 32
    sky, h0 = rng.integers(len(SCENE_SKIES)), rng.uniform(0.4, 0.75) * H    # h0: the horizon's mean
    if name == "sea":                                     # flat and straight, whatever the offset
        return sky, lambda x: np.full_like(x, h0)
    if name == "hills":                                   # a long swell, so every crop sees it, and a ripple
        waves = [(rng.uniform(*period) * H, rng.uniform(0, 2 * np.pi), rng.uniform(*amp) * H)
                 for period, amp in (((1.2, 1.8), (0.1, 0.14)), ((0.6, 0.9), (0.03, 0.05)))]
        return sky, lambda x: h0 + sum(a * np.sin(2 * np.pi * x / period + phase) for period, phase, a in waves)
    (lo, hi), high, low = _SCENE_STEPS[name]              # peaks, buildings or trees at random widths
    widths = rng.uniform(lo, hi, size=int(span / (lo * H)) + 2) * H
    edges = np.concatenate([[-rng.uniform(0, widths[0])], widths]).cumsum()
    heights = rng.uniform(*high, size=len(edges)) * H
    if low:                                               # every other height: see _SCENE_STEPS
        heights[1::2] = rng.uniform(*low, size=len(heights[1::2])) * H

    def skyline(x):
        k = np.clip(np.searchsorted(edges, x) - 1, 0, len(edges) - 2)
        if name == "city":                                # flat roofs between vertical walls
            return h0 + 0.25 * H - heights[k]
        t = (x - edges[k]) / (edges[k + 1] - edges[k])
        if name == "mountains":                           # straight ridges between peaks
            return h0 - ((1 - t) * heights[k] + t * heights[k + 1])
        return h0 + 0.1625 * H - heights[k] * (1 - 2 * np.abs(t - 0.5))      # forest: a pointed crown per tree
    return sky, skyline


def _scenes(n: int, seed: int, resolution: int, width: int | None):
    """-> (images, labels, captions, offsets); not anti-aliased (a blend would tell the class)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(SCENE_CLASSES), size=n)
    scenes = [_scene(rng, int(label), resolution) for label in labels]
    W, span = width or resolution, SCENE_MAX_WIDTH * resolution / 32
    if W > span:
        raise ValueError(f"a scene is at most {int(span)} pixels wide at resolution {resolution}, asked for {W}")
    offsets = rng.uniform(0, span - W, size=n).round() if width is None else np.zeros(n)
    y, colours = (np.arange(resolution) + 0.5)[:, None], list(zip(SCENE_GROUNDS.values(), SCENE_SKIES.values()))
    images = np.stack([np.where((y >= skyline(o + np.arange(W) + 0.5))[..., None], *colours[sky])  # pixel centres
                       for (sky, skyline), o in zip(scenes, offsets)]).astype(np.uint8)
    captions = [f"{SCENE_CLASSES[label]} at {list(SCENE_SKIES)[sky]}" for label, (sky, _) in zip(labels, scenes)]
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels).long(), captions, offsets


def scene_skies(images: torch.Tensor) -> torch.Tensor:
    """uint8 scenes (B, 3, H, W) -> (B,) the SCENE_SKIES index nearest to the mean of the top row (sky)."""
    return torch.cdist(images[:, :, 0].float().mean(-1), torch.tensor([*SCENE_SKIES.values()]).float()).argmin(-1)


def make_scenes(n: int, seed: int = 0, resolution: int = 32) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """n crops, each at a random offset of its own wide scene, captioned like "hills at dusk"; (n, 3, H, H)."""
    return _scenes(n, seed, resolution, None)[:3]


def make_wide_scenes(n: int, seed: int = 0, resolution: int = 32, width: int = 256):
    """make_scenes(n, seed)'s scenes, columns 0 to `width`: references for patch-wise sampling. (n, 3, H, width)"""
    return _scenes(n, seed, resolution, width)[:3]


# ----- Captions (Sec. 4.2: text-conditional chains) -------------------------------------
# "a [size] [colour] <shape> [position] [on a <colour> background]", every part but the shape optional,
# e.g. "a large red star in the upper left on a black background"; held-out combinations match on parts.
SHAPE_SIZES = ["small", "medium", "large"]
_POSITION_WORDS = {f"{v} {h}": f"in the {v} {h}" for v in ("upper", "lower") for h in ("left", "right")} | {
    "upper centre": "at the top", "middle left": "on the left", "middle centre": "in the centre",
    "middle right": "on the right", "lower centre": "at the bottom"}
_CAPTION_RE = re.compile("^a(?: (?P<size>{}))?(?: (?P<colour>{}))? (?P<shape>{})(?: (?P<position>{}))?(?: on a "
                         "(?P<background>{}) background)?$".format(*("|".join(map(re.escape, words)) for words in (
                             SHAPE_SIZES, PALETTE_NAMES, SHAPE_CLASSES, _POSITION_WORDS.values(), PALETTE_NAMES))))


def shape_caption(parts: dict) -> str:
    """{"size", "colour", "shape", "position" ("upper left" ...), "background"} -> the caption (None parts left out)."""
    position, background = parts.get("position"), parts.get("background")
    words = ["a", parts.get("size"), parts.get("colour"), parts["shape"], position and _POSITION_WORDS[position],
             background and f"on a {background} background"]
    return " ".join(w for w in words if w)


def shape_caption_parts(caption: str) -> dict | None:
    """The parts of a shapes caption (missing ones None); None if it is not of that grammar."""
    m = _CAPTION_RE.match(caption.strip().lower())
    return m and m.groupdict() | {"position": {v: k for k, v in _POSITION_WORDS.items()}.get(m["position"])}


def mirror_caption(caption: str) -> str:
    """The caption of the mirrored image: "left" and "right" swap (the flipped training copies)."""
    return re.sub(r"\b(left|right)\b", lambda m: {"left": "right", "right": "left"}[m.group(1)], caption)


# ----- CIFAR-10 and folders of images -------------------------------------------------------
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_DIR = "cifar-10-batches-py"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MIN_TEST_IMAGES = 4        # the judge compares two halves of at least 2; the bound's standard error needs 2 grids
TOO_FEW_TEST_IMAGES = (f"the test split must hold at least {MIN_TEST_IMAGES} images to measure anything "
                       f"(the judge compares two halves of at least 2)")
SHAPES_TRAIN_SIZE, SHAPES_TEST_SIZE = 20000, 2000     # shapes and scenes: a run records how many were drawn


def load_cifar(root: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 from its pickle batches in root/cifar-10-batches-py, downloaded (MD5 checked) when missing."""
    folder, archive = os.path.join(root, CIFAR_DIR), os.path.join(root, os.path.basename(CIFAR_URL))
    if not os.path.isdir(folder):
        try:
            if not os.path.exists(archive):   # "xb": never written through a link; a cut download fails the MD5
                print(f"downloading {CIFAR_URL} to {archive} ...", flush=True)
                os.makedirs(root or ".", exist_ok=True)
                with urllib.request.urlopen(CIFAR_URL, timeout=30) as r, open(archive, "xb") as f:
                    shutil.copyfileobj(r, f)
            with open(archive, "rb") as f:
                found = hashlib.file_digest(f, "md5").hexdigest()
        except OSError as e:
            raise ValueError(f"CIFAR-10 is not under {root} and could not be downloaded ({e}); "
                             f"download {CIFAR_URL} and put it (or its extracted {CIFAR_DIR}/) in {root}/") from None
        if found != CIFAR_MD5:
            raise ValueError(f"{archive} has MD5 {found}, expected {CIFAR_MD5}; delete it and try again")
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")   # refuses paths outside root
    xs, ys = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            raise ValueError(f"CIFAR-10 batch {path} is missing; remove {folder} to download it again")
        try:
            with open(path, "rb") as f:
                batch = NumpyOnlyUnpickler(f, encoding="bytes").load()
            xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))  # rows are R,G,B planes
            ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
        except (pickle.UnpicklingError, EOFError, KeyError, IndexError, TypeError, ValueError) as e:
            raise ValueError(f"{path} is not in CIFAR-10's format (a pickled dict of 'data' and 'labels'): "
                             f"{type(e).__name__}: {e}") from None
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists and numpy arrays only: a pickle can run any code. (numpy 2 renamed numpy.core _core.)"""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype")} | {(f"numpy.{core}.{m}", f) for core in ("core", "_core")
               for m, f in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def resize_center_crop(im: Image.Image, resolution: int) -> np.ndarray:
    """RGB, shorter side resized to `resolution`, then the central square: uint8 (H, W, 3)."""
    im, s = im.convert("RGB"), resolution / min(im.size)
    im = im.resize((max(resolution, round(im.width * s)), max(resolution, round(im.height * s))), Image.BICUBIC)
    left, top = (im.width - resolution) // 2, (im.height - resolution) // 2
    return np.asarray(im.crop((left, top, left + resolution, top + resolution)))


def load_folder(path: str, resolution: int) -> tuple[torch.Tensor, torch.Tensor | None, list[str] | None]:
    """Every image under `path`, resized and cropped; labels: class subfolders; captions: captions.txt or NAME.txt."""
    (files, classes), listed, listing = _folder(path), {}, Path(path, "captions.txt")
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {path}")
    for n, line in enumerate(listing.read_text(encoding="utf-8").split("\n") if listing.exists() else [], 1):
        name, tab, caption = line.partition("\t")
        if line.strip() and not tab:
            raise ValueError(f"{path}/captions.txt line {n}: expected 'file<TAB>caption'")
        listed[name.strip().replace(os.sep, "/")] = " ".join(caption.split())   # a blank line: ""
    images, labels, captions = [], [], []
    for rel in files:
        try:
            with Image.open(os.path.join(path, rel)) as im:
                images.append(resize_center_crop(im, resolution))
        except Exception:
            continue
        beside = Path(path, rel).with_suffix(".txt")
        labels.append(classes.index(rel.split(os.sep)[0]) if classes else -1)
        if (caption := listed.get(rel.replace(os.sep, "/"))) is None and beside.exists():
            caption = " ".join(beside.read_text(encoding="utf-8").split())
        captions.append(caption or "")
    if len(images) < len(files):
        warnings.warn(f"skipped {len(files) - len(images)} unreadable image file(s) under {path}")
    if not images:
        raise ValueError(f"none of the {len(files)} image files under {path} could be read")
    if any(captions) and not all(captions):
        print(f"{path}: {captions.count('')} of {len(captions)} images have no caption (they get \"\")", flush=True)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, (torch.tensor(labels) if classes else None), (captions if any(captions) else None)


def _folder(path: str) -> tuple[list[str], list[str]]:
    """(image files under path, relative and sorted; classes: the subfolders if every image is in one of 2+, else [])"""
    if not os.path.isdir(path):
        raise ValueError(f"image folder {path} does not exist")
    files = sorted(f for f in glob.glob("**/*", root_dir=path, recursive=True) if f.lower().endswith(IMAGE_EXTENSIONS))
    classes = sorted({f.split(os.sep)[0] for f in files})
    return files, classes if len(classes) > 1 and all(os.sep in f for f in files) else []


def class_names(name: str) -> list[str]:
    """A data set's class names in label order ([] without labels): what sample.py --class accepts."""
    builtin = {"shapes": SHAPE_CLASSES, "scenes": SCENE_CLASSES, "cifar": CIFAR_CLASSES}
    path = name.removeprefix("folder:")
    return list(builtin[name]) if name in builtin else _folder(path)[1] if os.path.isdir(path) else []


def check_folder_split(path: str, images: int) -> int:
    """The size of a folder's test split (a fixed tenth of its `images`), refused when too small."""
    if images // 10 < MIN_TEST_IMAGES:        # a "held-out" figure on no held-out image would mean nothing
        raise ValueError(f"{path} holds {images} image(s), so its test split (a fixed tenth) holds {images // 10}; "
                         f"{TOO_FEW_TEST_IMAGES}: give the folder at least {10 * MIN_TEST_IMAGES} images")
    return images // 10


def check_dataset(name: str) -> None:
    """shapes, scenes, cifar or folder:PATH of enough images, else one clear line (before any work)."""
    if (path := name.removeprefix("folder:")) != name:
        check_folder_split(path, len(_folder(path)[0]))
    elif name not in ("shapes", "scenes", "cifar"):
        raise ValueError(f"unknown data set {name!r}; use shapes, scenes, cifar or folder:PATH")


def load_dataset(name: str, split: str, resolution: int = 32, data_root: str = "data",
                 shapes_size: tuple[int, int] = (SHAPES_TRAIN_SIZE, SHAPES_TEST_SIZE)):
    """-> (uint8 images (N, 3, H, W), long labels (N,) or None, number of classes or 0, captions or None)."""
    test = split != "train"
    if name.startswith("folder:"):                        # no held-out split of its own: a fixed tenth, fixed shuffle
        x, y, captions = load_folder(path := name.removeprefix("folder:"), resolution)
        n_test = check_folder_split(path, len(x))
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0)).tensor_split([n_test])[not test]
        return (x[idx], None if y is None else y[idx], 0 if y is None else int(y.max()) + 1,
                None if captions is None else [captions[i] for i in idx.tolist()])
    check_dataset(name)                                   # shapes, scenes or cifar, else it says so
    if name == "cifar":
        if resolution != 32:
            raise ValueError("CIFAR-10 images are 32x32; use --resolution 32")
        return *load_cifar(data_root, split), 10, None
    x, y, captions = (make_shapes if name == "shapes" else make_scenes)(shapes_size[test], int(test), resolution)
    return x, y, len(class_names(name)), captions         # drawn from a seed: 0 trains, 1 tests


# ----- Which images a run was trained on --------------------------------------------------
def dataset_record(spec: str, resolution: int, data_root: str = "data", train_size: int = SHAPES_TRAIN_SIZE,
                   test_size: int = SHAPES_TEST_SIZE) -> dict:
    """What vq.pt and tokens.pt store to find a run's images again: spec, resolution, absolute paths or sizes."""
    sizes = {"train_size": int(train_size), "test_size": int(test_size)} if spec in ("shapes", "scenes") else {}
    root = {"data_root": os.path.abspath(data_root)} if spec == "cifar" else {}
    spec = "folder:" + os.path.abspath(spec[7:]) if spec.startswith("folder:") else spec
    return {"spec": spec, "resolution": int(resolution), **sizes, **root}


def load_recorded_dataset(record: dict) -> dict:
    """{split: (uint8 images, labels or None, number of classes, captions or None)}."""
    sizes = (record.get("train_size", SHAPES_TRAIN_SIZE), record.get("test_size", SHAPES_TEST_SIZE))
    return {split: load_dataset(record["spec"], split, record["resolution"], record.get("data_root", "data"), sizes)
            for split in ("train", "test")}


# ----- Pixels: uint8 on disk and in memory, floats in [-1, 1] for the networks ----------------
def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Horizontal flip of a random half of the batch (the judge's and train_vq.py's augmentation)."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) in [0, 255] -> float in [-1, 1], the range x_0 lives in."""
    return x_uint8.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float (B, 3, H, W) in [-1, 1] (clamped) -> uint8 in [0, 255], rounded as a PNG keeps it."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image of x, y (B, 3, H, W) in [-1, 1]: the peak-to-peak range is 2."""
    return 10 * torch.log10(4.0 / (x - y).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10))
