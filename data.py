"""The images: the built-in shapes and scenes data sets, CIFAR-10, any folder of images, captions.

Every data set is returned whole as a uint8 tensor (N, 3, H, W) plus integer labels (or None)
and captions (or None): at these sizes it fits in memory, and a training step is then one
index. Nothing here imports the method (imagebart.py) or the run plumbing (runs.py); a bad
name, path or file raises ValueError with one line that says what is wrong, which the scripts
print as their one-line error.
"""
import glob
import hashlib
import math
import os
import pickle
import re
import tarfile
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image, ImageDraw

# ----- Shapes, built in ---------------------------------------------------------------

SHAPE_CLASSES = ["circle", "square", "triangle", "diamond", "plus",
                 "ring", "star", "frame", "cross", "half-disc"]


def _polygon(cx, cy, r, n, rot):
    return [(cx + r * math.cos(rot + 2 * math.pi * k / n), cy + r * math.sin(rot + 2 * math.pi * k / n))
            for k in range(n)]


def _draw_shape(draw: ImageDraw.ImageDraw, kind: int, cx, cy, r, rot, color, bg):
    """One shape per class, drawn on a 4x canvas; `r` is the half-size in pixels."""
    name = SHAPE_CLASSES[kind]
    box = [cx - r, cy - r, cx + r, cy + r]
    if name == "circle":
        draw.ellipse(box, fill=color)
    elif name == "square":
        draw.polygon(_polygon(cx, cy, r * 1.3, 4, rot * 0.3 + math.pi / 4), fill=color)
    elif name == "triangle":
        draw.polygon(_polygon(cx, cy + r * 0.2, r * 1.2, 3, -math.pi / 2 + rot * 0.3), fill=color)
    elif name == "diamond":  # a rhombus, taller than wide
        draw.polygon([(cx, cy - r * 1.2), (cx + r * 0.7, cy), (cx, cy + r * 1.2), (cx - r * 0.7, cy)], fill=color)
    elif name == "plus":
        w = r * 0.35
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=color)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=color)
    elif name == "ring":
        draw.ellipse(box, fill=color)
        draw.ellipse([cx - r * 0.55, cy - r * 0.55, cx + r * 0.55, cy + r * 0.55], fill=bg)
    elif name == "star":
        pts = []
        for k in range(10):
            rr = r * 1.15 if k % 2 == 0 else r * 0.5
            a = -math.pi / 2 + rot * 0.2 + math.pi * k / 5
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        draw.polygon(pts, fill=color)
    elif name == "frame":
        draw.rectangle(box, fill=color)
        draw.rectangle([cx - r * 0.55, cy - r * 0.55, cx + r * 0.55, cy + r * 0.55], fill=bg)
    elif name == "cross":  # an X: two thick diagonals
        draw.line([(cx - r, cy - r), (cx + r, cy + r)], fill=color, width=max(1, int(r * 0.55)))
        draw.line([(cx - r, cy + r), (cx + r, cy - r)], fill=color, width=max(1, int(r * 0.55)))
    elif name == "half-disc":
        draw.pieslice([cx - r, cy - r * 0.6, cx + r, cy + r * 1.4], 180, 360, fill=color)


# Colours: a shape takes one of seven well-separated, named palette colours and sits on a flat
# black background. An earlier version drew a dozen colours on backgrounds of any colour with a
# vertical gradient; that carried no lesson and cost a lot. A code of the first stage stands for
# a 4x4 patch, so an edge patch is spelled with a different code for every (shape colour,
# background colour) pair: with 8 colours on any other of them (56 pairs) the prior had to learn
# every outline 56 times over, and the tiny chain drew blobs (its samples were judged their class
# 42 % of the time). With one background it learns each outline once (94.7 %, README). The class
# stays carried by the shape alone: colour, size, position and rotation are drawn independently.
PALETTE_NAMES = ["red", "yellow", "green", "cyan", "blue", "magenta", "white", "black"]
PALETTE = np.array([[230, 25, 50], [255, 215, 0], [40, 170, 60], [60, 220, 230],
                    [20, 60, 200], [210, 40, 210], [245, 245, 245], [25, 25, 25]])
SHAPE_FOREGROUNDS = [0, 1, 2, 3, 4, 5, 6]  # palette rows a shape may have
SHAPE_BACKGROUNDS = [7]                    # palette rows a background may have (never the shape's)


def dominant_colours(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, 3, H, W) -> (B,) the palette row most of each image's pixels are nearest
    to, background rows (SHAPE_BACKGROUNDS) left out: a shape's colour; -1 for an image with
    no pixel off the background."""
    pixels = rearrange(images.float(), "b c h w -> b (h w) c")
    nearest = torch.cdist(pixels, torch.as_tensor(PALETTE, dtype=torch.float32)[None]).argmin(-1)   # (B, HW)
    counts = F.one_hot(nearest, len(PALETTE)).sum(1)                                   # (B, colours)
    counts[:, SHAPE_BACKGROUNDS] = 0
    return torch.where(counts.sum(1) > 0, counts.argmax(1), -1)

def make_shapes(n: int, seed: int = 0, resolution: int = 32) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The built-in data set: one shape per image, 10 classes (SHAPE_CLASSES), in a random
    palette colour on a flat background (SHAPE_FOREGROUNDS, SHAPE_BACKGROUNDS), with a random size,
    rotation and a position near the centre (so that either half of an image shows part of
    the shape: completing an upper half is then a question with an answer). Deterministic in
    (n, seed); drawn at 4x and box-filtered down so edges are anti-aliased. Each image also
    gets the full caption of the parameters that drew it (shape_caption; a caption is made from
    the draws, it draws nothing, so the images do not depend on it).
    -> (uint8 images (n, 3, H, W), long labels (n,), captions [n strings])"""
    rng = np.random.default_rng(seed)
    S = resolution * 4
    images = np.empty((n, resolution, resolution, 3), dtype=np.uint8)
    labels = rng.integers(0, len(SHAPE_CLASSES), size=n)
    captions = []
    for i in range(n):
        bg = rng.choice(SHAPE_BACKGROUNDS)
        fg = rng.choice([c for c in SHAPE_FOREGROUNDS if c != bg])
        r = rng.uniform(0.25, 0.34) * S                        # half-size: the shape spans 50-68 %
        cx, cy = S / 2 + rng.uniform(-0.08, 0.08, size=2) * S
        rot = rng.uniform(-1, 1)
        bg_rgb = tuple(int(v) for v in PALETTE[bg])
        canvas = Image.new("RGB", (S, S), bg_rgb)
        _draw_shape(ImageDraw.Draw(canvas), int(labels[i]), cx, cy, r, rot, tuple(int(v) for v in PALETTE[fg]), bg_rgb)
        images[i] = np.asarray(canvas.resize((resolution, resolution), Image.BOX))
        # words for the draws: size by tertile of its range; the position by the centre's offset,
        # a third of its range either way being "centre"/"middle"
        size = SHAPE_SIZES[min(2, int((r / S - 0.25) / 0.03))]
        hpos = "left" if cx < 0.4733 * S else "right" if cx > 0.5267 * S else "centre"
        vpos = "upper" if cy < 0.4733 * S else "lower" if cy > 0.5267 * S else "middle"
        captions.append(shape_caption(dict(size=size, colour=PALETTE_NAMES[fg], shape=SHAPE_CLASSES[labels[i]],
                                           position=f"{vpos} {hpos}", background=PALETTE_NAMES[bg])))
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels).long(), captions


# ----- Scenes, built in: landscapes that continue sideways -------------------------------
# Patch-wise sampling (Sec. 4.2, Fig. 4) draws images wider than the training images through a
# sliding window. It can only work on data that looks alike at every horizontal offset, as
# landscapes do. Each scene here is a skyline, a function y(x) of the
# absolute column x, below which lies the ground. Its class is the kind of skyline, carried by
# its structure alone: the colours (one of three sky-and-ground pairs) and the horizon's height
# are drawn independently of the class. Every process is stationary in x
# (random phases, knots at random offsets), so a training image, a 32-pixel-wide crop at a
# random offset, looks like a crop at any other offset, and a wide scene (make_wide_scenes)
# is the same scene drawn over more columns: its crop at offset o equals the training image
# drawn at offset o.
SCENE_CLASSES = ["mountains", "hills", "sea", "city", "forest"]
SCENE_SKIES = {"day": (110, 170, 230), "dusk": (225, 135, 85), "night": (25, 30, 70)}
SCENE_GROUNDS = {"day": (40, 105, 50), "dusk": (115, 85, 55), "night": (80, 80, 95)}   # one per sky
SCENE_MAX_WIDTH = 1024          # in pixels at resolution 32: the widest scene the draws support


def _scene_params(rng, label: int, resolution: int) -> dict:
    """Everything that draws one scene, in pixels of a `resolution`-tall image (x absolute).
    Three colour pairs only (a sky and its ground): a code of the first stage stands for a 4x4
    patch, so every pair spells each skyline with codes of its own (see the shapes' colours)."""
    H, span = resolution, SCENE_MAX_WIDTH * resolution / 32
    p = {"label": label, "sky": rng.integers(len(SCENE_SKIES)),
         "horizon": rng.uniform(0.4, 0.75) * H}                 # where the skyline averages
    name = SCENE_CLASSES[label]
    if name in ("mountains", "city", "forest"):           # peaks, buildings or trees at random widths
        lo, hi = {"mountains": (0.35, 0.6), "city": (0.2, 0.4), "forest": (0.2, 0.3)}[name]
        widths = rng.uniform(lo, hi, size=int(span / (lo * H)) + 2) * H
        p["edges"] = np.concatenate([[-rng.uniform(0, widths[0])], widths]).cumsum()
        high = {"mountains": (0.2, 0.35), "city": (0.3, 0.45), "forest": (0.25, 0.4)}[name]
        p["heights"] = rng.uniform(*high, size=len(p["edges"])) * H
        # peaks and valleys in turn: a tall zigzag; tall and low buildings in turn, so that
        # every wall is a step of at least 0.1 H (a roof barely above its neighbour reads as sea)
        low = {"mountains": (-0.25, -0.15), "city": (0.05, 0.2)}.get(name)
        if low is not None:
            p["heights"][1::2] = rng.uniform(*low, size=len(p["heights"][1::2])) * H
    elif name == "hills":                                 # a long swell, so every crop sees it, and a ripple
        p["waves"] = [(rng.uniform(*period) * H, rng.uniform(0, 2 * np.pi), rng.uniform(*amp) * H)
                      for period, amp in (((1.2, 1.8), (0.1, 0.14)), ((0.6, 0.9), (0.03, 0.05)))]
    return p


def _skyline(p: dict, x: np.ndarray, H: int) -> np.ndarray:
    """The height of the ground's top (rows from the top of the image) at absolute columns x."""
    name, h0 = SCENE_CLASSES[p["label"]], p["horizon"]
    if name == "sea":                                     # flat and straight, whatever the offset
        return np.full_like(x, h0)
    if name == "hills":                                   # two smooth waves
        return h0 + sum(a * np.sin(2 * np.pi * x / period + phase) for period, phase, a in p["waves"])
    k = np.clip(np.searchsorted(p["edges"], x) - 1, 0, len(p["edges"]) - 2)
    if name == "city":                                    # flat roofs between vertical walls
        return h0 + 0.25 * H - p["heights"][k]
    if name == "mountains":                               # straight ridges between peaks
        t = (x - p["edges"][k]) / (p["edges"][k + 1] - p["edges"][k])
        return h0 - ((1 - t) * p["heights"][k] + t * p["heights"][k + 1])
    t = (x - p["edges"][k]) / (p["edges"][k + 1] - p["edges"][k])     # forest: a pointed crown per tree
    return h0 + 0.1625 * H - p["heights"][k] * (1 - 2 * np.abs(t - 0.5))


def _draw_scene(p: dict, offset: float, width: int, resolution: int) -> np.ndarray:
    """Columns offset .. offset + width of the scene p: uint8 (resolution, width, 3), each pixel
    the colour at its centre, column by column in absolute x. Edges are not anti-aliased: a
    blend of sky and ground would be a colour of its own, more of it where the skyline is
    longer (forests, cities), and the colours would then tell the class."""
    x = offset + np.arange(width) + 0.5                                # column centres
    y = (np.arange(resolution) + 0.5)[:, None]                         # row centres
    image = np.empty((resolution, width, 3), dtype=np.uint8)
    image[:] = list(SCENE_SKIES.values())[p["sky"]]
    image[y >= _skyline(p, x, resolution)[None]] = list(SCENE_GROUNDS.values())[p["sky"]]
    return image


def _scenes(n: int, seed: int, resolution: int, width: int | None):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(SCENE_CLASSES), size=n)
    params = [_scene_params(rng, int(label), resolution) for label in labels]
    W = width or resolution
    span = SCENE_MAX_WIDTH * resolution / 32
    if W > span:
        raise ValueError(f"a scene is at most {int(span)} pixels wide at resolution {resolution}, asked for {W}")
    offsets = rng.uniform(0, span - W, size=n).round() if width is None else np.zeros(n)
    images = np.stack([_draw_scene(p, o, W, resolution) for p, o in zip(params, offsets)])
    captions = [f"{SCENE_CLASSES[p['label']]} at {list(SCENE_SKIES)[p['sky']]}" for p in params]
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels).long(), captions, offsets


def scene_skies(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, 3, H, W) of scenes -> (B,) the index into SCENE_SKIES of the colour
    nearest to the mean of each image's top row, which is sky in every scene."""
    top = images[:, :, 0].float().mean(-1)                                            # (B, 3)
    return torch.cdist(top, torch.tensor(list(SCENE_SKIES.values()), dtype=torch.float32)).argmin(-1)


def make_scenes(n: int, seed: int = 0, resolution: int = 32) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The built-in landscapes: n crops, `resolution` wide, each at a random whole-pixel offset
    of its own wide scene, 5 classes (SCENE_CLASSES), captions like "hills at dusk".
    Deterministic in (n, seed). -> (uint8 images (n, 3, H, H), long labels (n,), captions)"""
    images, labels, captions, _ = _scenes(n, seed, resolution, None)
    return images, labels, captions


def make_wide_scenes(n: int, seed: int = 0, resolution: int = 32, width: int = 256):
    """The same n scenes as make_scenes(n, seed), each drawn whole from column 0 to `width`:
    seam-free references for patch-wise sampling. -> (uint8 (n, 3, H, width), labels, captions)"""
    images, labels, captions, _ = _scenes(n, seed, resolution, width)
    return images, labels, captions


# ----- Captions (Sec. 4.2: text-conditional chains) -------------------------------------
# A shapes caption spells the parameters that drew the image, in a fixed grammar:
#     "a [size] [colour] <shape> [position] [on a <colour> background]"
#     e.g. "a large red star in the upper left on a black background"
# Every part but the shape may be left out, so "a red star" and "a star at the top" are
# captions too. Training draws a random level of detail at every step (train_chain.py), and
# shape_caption_parts reads the parts back from any caption of this grammar: held-out
# combinations are matched on those parts, not on words.
SHAPE_SIZES = ["small", "medium", "large"]
_POSITION_WORDS = {"upper left": "in the upper left", "upper centre": "at the top",
                   "upper right": "in the upper right", "middle left": "on the left",
                   "middle centre": "in the centre", "middle right": "on the right",
                   "lower left": "in the lower left", "lower centre": "at the bottom",
                   "lower right": "in the lower right"}
_CAPTION_RE = re.compile(
    "^a(?: (?P<size>{}))?(?: (?P<colour>{}))? (?P<shape>{})(?: (?P<position>{}))?(?: on a (?P<background>{}) background)?$"
    .format(*("|".join(map(re.escape, words)) for words in
              (SHAPE_SIZES, PALETTE_NAMES, SHAPE_CLASSES, _POSITION_WORDS.values(), PALETTE_NAMES))))


def shape_caption(parts: dict) -> str:
    """{"size", "colour", "shape", "position" ("upper left" ...), "background"} -> the caption;
    a part that is missing or None is left out (the shape must be there)."""
    words = ["a"] + [parts[k] for k in ("size", "colour") if parts.get(k)] + [parts["shape"]]
    if parts.get("position"):
        words.append(_POSITION_WORDS[parts["position"]])
    if parts.get("background"):
        words.append(f"on a {parts['background']} background")
    return " ".join(words)


def shape_caption_parts(caption: str) -> dict | None:
    """The parts of a shapes caption (missing ones None); None if it is not of that grammar."""
    m = _CAPTION_RE.match(caption.strip().lower())
    if m is None:
        return None
    parts = m.groupdict()
    if parts["position"]:
        parts["position"] = {v: k for k, v in _POSITION_WORDS.items()}[parts["position"]]
    return parts


def mirror_caption(caption: str) -> str:
    """The caption of the mirrored image: "left" and "right" swap (the flipped training copies)."""
    swap = {"left": "right", "right": "left"}
    return re.sub(r"\b(left|right)\b", lambda m: swap[m.group(1)], caption)


CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_DIR = "cifar-10-batches-py"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def load_cifar(root: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 from its python pickle batches in `root/cifar-10-batches-py`; downloaded and checked
    against its MD5 when missing and a network is there."""
    folder = os.path.join(root, CIFAR_DIR)
    if not os.path.isdir(folder):
        archive = os.path.join(root, os.path.basename(CIFAR_URL))
        try:
            download(CIFAR_URL, archive, CIFAR_MD5)
        except OSError as e:
            raise ValueError(f"CIFAR-10 is not under {root} and could not be downloaded ({e}); "
                             f"download {CIFAR_URL} and put it (or its extracted {CIFAR_DIR}/) in {root}/") from None
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


def download(url: str, path: str, md5: str | None = None, timeout: float = 30) -> str:
    """url -> path, unless it is there already: written to path.part first and renamed when whole,
    so a stopped download never leaves a half file under the name that is looked for; with `md5`,
    checked (ValueError if it differs). Network and disk errors raise OSError. -> path"""
    import urllib.request
    if not os.path.exists(path):
        print(f"downloading {url} to {path} ...", flush=True)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if os.path.lexists(path + ".part"):        # a stopped download, or a link: removed, never written through
            os.remove(path + ".part")
        with urllib.request.urlopen(url, timeout=timeout) as r, open(path + ".part", "xb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
            size = r.headers.get("Content-Length")
            if size is not None and f.tell() != int(size):
                raise OSError(f"{url}: {f.tell()} of {size} bytes")
        os.replace(path + ".part", path)
    if md5 is not None:
        with open(path, "rb") as f:
            found = hashlib.md5(f.read()).hexdigest()
        if found != md5:
            raise ValueError(f"{path} has MD5 {found}, expected {md5}; delete it and try again")
    return path


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists and numpy arrays, nothing else: a pickle can run any code,
    so weights and data from outside are read with only these classes allowed."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
               ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def resize_center_crop(im: Image.Image, resolution: int) -> np.ndarray:
    """RGB, shorter side resized to `resolution`, then the central square: uint8 (H, W, 3)."""
    im = im.convert("RGB")
    s = resolution / min(im.size)
    im = im.resize((max(resolution, round(im.width * s)), max(resolution, round(im.height * s))), Image.BICUBIC)
    left, top = (im.width - resolution) // 2, (im.height - resolution) // 2
    return np.asarray(im.crop((left, top, left + resolution, top + resolution)))


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# The fewest test images anything can be measured on: the judge compares two disjoint halves of
# at least 2 images (evaluate_run), and the bound's standard error needs 2 grids.
MIN_TEST_IMAGES = 4
TOO_FEW_TEST_IMAGES = (f"the test split must hold at least {MIN_TEST_IMAGES} images to measure anything "
                       f"(the judge compares two halves of at least 2)")


def load_folder(path: str, resolution: int) -> tuple[torch.Tensor, torch.Tensor | None, list[str] | None]:
    """Every image under `path`, RGB, shorter side resized to `resolution`, center-cropped.
    With one subfolder per class (and no loose images) the sorted subfolder names give labels.
    Captions come from `path/captions.txt` (lines "file<TAB>caption", the file named relative to
    `path`) or from a .txt file beside an image with its name (cat.png -> cat.txt); None when
    there are neither, else "" for an image without one."""
    if not os.path.isdir(path):
        raise ValueError(f"image folder {path} does not exist")
    files = _image_files(path)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {path}")
    classes = _folder_classes(path, files)
    labeled = bool(classes)
    listed = _read_captions_txt(path)
    images, labels, captions, bad = [], [], [], 0
    for p in files:
        try:
            with Image.open(p) as im:
                images.append(resize_center_crop(im, resolution))
        except Exception:
            bad += 1
            continue
        if labeled:
            labels.append(classes.index(os.path.relpath(p, path).split(os.sep)[0]))
        beside = os.path.splitext(p)[0] + ".txt"
        if os.path.relpath(p, path).replace(os.sep, "/") in listed:
            captions.append(listed[os.path.relpath(p, path).replace(os.sep, "/")])
        elif os.path.exists(beside):
            with open(beside, encoding="utf-8") as f:
                captions.append(" ".join(f.read().split()))
        else:
            captions.append("")
    if bad:
        warnings.warn(f"skipped {bad} unreadable image file(s) under {path}")
    if not images:
        raise ValueError(f"none of the {len(files)} image files under {path} could be read")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    has_captions = any(captions)
    if has_captions and not all(captions):
        print(f"{path}: {sum(not c for c in captions)} of {len(captions)} images have no caption "
              f"(they get the empty one)", flush=True)
    return x, (torch.tensor(labels) if labeled else None), (captions if has_captions else None)


def _image_files(path: str) -> list[str]:
    return sorted(p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                  if p.lower().endswith(IMAGE_EXTENSIONS))


def _folder_classes(path: str, files: list[str]) -> list[str]:
    """The sorted subfolder names when every image sits in one of two or more subfolders
    (each subfolder a class), else [] (an unlabelled folder)."""
    classes = sorted({os.path.relpath(p, path).split(os.sep)[0] for p in files})
    labeled = all(os.sep in os.path.relpath(p, path) for p in files) and len(classes) > 1
    return classes if labeled else []


def class_names(name: str) -> list[str]:
    """The class names of a data set, in label order ([] when it has no labels): what
    sample.py --class accepts besides an index."""
    if name == "shapes":
        return list(SHAPE_CLASSES)
    if name == "scenes":
        return list(SCENE_CLASSES)
    if name == "cifar":
        return list(CIFAR_CLASSES)
    path = name[len("folder:"):]
    return _folder_classes(path, _image_files(path))


def _read_captions_txt(path: str) -> dict:
    """{file relative to path: caption} from path/captions.txt, or {} without one."""
    listed = {}
    if os.path.exists(os.path.join(path, "captions.txt")):
        with open(os.path.join(path, "captions.txt"), encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if "\t" not in line:
                    raise ValueError(f"{path}/captions.txt line {n}: expected 'file<TAB>caption'")
                name, caption = line.rstrip("\n").split("\t", 1)
                listed[name.strip().replace(os.sep, "/")] = " ".join(caption.split())
    return listed


def check_folder_split(path: str, images: int) -> int:
    """The size of a folder's test split (a fixed tenth of its `images`), refused with the number
    of images needed when it is too small to measure anything on. -> that size."""
    n_test = images // 10
    if n_test < MIN_TEST_IMAGES:              # a "held-out" figure on no held-out image would mean nothing
        raise ValueError(f"{path} holds {images} image(s), so its test split (a fixed tenth) holds {n_test}; "
                         f"{TOO_FEW_TEST_IMAGES}: give the folder at least {10 * MIN_TEST_IMAGES} images")
    return n_test


def check_dataset(name: str) -> None:
    """shapes, scenes, cifar or folder:PATH with PATH a folder of enough images; one clear line otherwise
    (before any work; the images themselves are read, and counted again, when training starts)."""
    if name.startswith("folder:"):
        if not os.path.isdir(name[len("folder:"):]):
            raise ValueError(f"image folder {name[len('folder:'):]} does not exist")
        check_folder_split(name[len("folder:"):], len(_image_files(name[len("folder:"):])))
    elif name not in ("shapes", "scenes", "cifar"):
        raise ValueError(f"unknown data set {name!r}; use shapes, scenes, cifar or folder:PATH")


def load_dataset(name: str, split: str, resolution: int = 32, data_root: str = "data",
                 shapes_size: tuple[int, int] = (20000, 2000)):
    """-> (uint8 images (N, 3, H, W), long labels (N,) or None, number of classes or 0,
    captions [N strings] or None). `folder:PATH` has no held-out split of its own: a fixed
    tenth of it is the test split."""
    if name in ("shapes", "scenes"):                      # drawn from a seed: 0 trains, 1 tests
        n = shapes_size[0] if split == "train" else shapes_size[1]
        make, classes = (make_shapes, SHAPE_CLASSES) if name == "shapes" else (make_scenes, SCENE_CLASSES)
        x, y, captions = make(n, seed=0 if split == "train" else 1, resolution=resolution)
        return x, y, len(classes), captions
    if name == "cifar":
        if resolution != 32:
            raise ValueError("CIFAR-10 images are 32x32; use --resolution 32")
        x, y = load_cifar(data_root, split)
        return x, y, 10, None
    if name.startswith("folder:"):
        x, y, captions = load_folder(name[len("folder:"):], resolution)
        g = torch.Generator().manual_seed(0)  # a fixed shuffle, so the split never changes
        order = torch.randperm(len(x), generator=g)
        n_test = check_folder_split(name[len("folder:"):], len(x))
        idx = order[n_test:] if split == "train" else order[:n_test]
        num_classes = int(y.max()) + 1 if y is not None else 0
        return (x[idx], (y[idx] if y is not None else None), num_classes,
                [captions[i] for i in idx.tolist()] if captions is not None else None)
    raise ValueError(f"unknown data set {name!r}; use shapes, scenes, cifar or folder:PATH")


# ----- Which images a run was trained on --------------------------------------------------
# The shapes data set is drawn from a seed: a run records how many images of it there were.
SHAPES_TRAIN_SIZE, SHAPES_TEST_SIZE = 20000, 2000


def dataset_record(spec: str, resolution: int, data_root: str = "data", train_size: int = SHAPES_TRAIN_SIZE,
                   test_size: int = SHAPES_TEST_SIZE) -> dict:
    """What a run stores (in vq.pt and tokens.pt) to find its real images again: the spec, the
    resolution, and where the images are (absolute paths) or, for shapes, how many there are."""
    record = {"spec": spec, "resolution": int(resolution)}
    if spec in ("shapes", "scenes"):
        record.update(train_size=int(train_size), test_size=int(test_size))
    elif spec == "cifar":
        record["data_root"] = os.path.abspath(data_root)
    elif spec.startswith("folder:"):
        record["spec"] = "folder:" + os.path.abspath(spec[len("folder:"):])
    return record


def load_recorded_dataset(record: dict) -> dict:
    """{split: (uint8 images, labels or None, number of classes, captions or None)}."""
    sizes = (record.get("train_size", SHAPES_TRAIN_SIZE), record.get("test_size", SHAPES_TEST_SIZE))
    return {split: load_dataset(record["spec"], split, record["resolution"], record.get("data_root", "data"), sizes)
            for split in ("train", "test")}


# ----- Pixels: uint8 on disk and in memory, floats in [-1, 1] for the networks ----------------

def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Horizontal flip of a random half of the batch: the augmentation of the judge here and of
    the first stage (train_vq.py)."""
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
    mse = (x - y).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))
