"""The images: shapes and scenes (built in), CIFAR-10, any folder of images, captions.

Each data set comes whole: uint8 images (N, 3, H, W), labels or None, captions or None. Bad input: ValueError.
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

SHAPE_CLASSES = ["circle", "square", "triangle", "diamond", "plus", "ring", "star", "frame", "cross", "half-disc"]


def _polygon(cx, cy, r, n, rot):
    return [(cx + r * math.cos(rot + 2 * math.pi * k / n), cy + r * math.sin(rot + 2 * math.pi * k / n))
            for k in range(n)]


def _draw_shape(draw: ImageDraw.ImageDraw, kind: int, cx, cy, r, rot, color, bg):
    """One shape per class, drawn on a 4x canvas; `r` is the half-size in pixels."""
    name, w = SHAPE_CLASSES[kind], r * 0.35
    box, hole = [cx - r, cy - r, cx + r, cy + r], [cx - r * 0.55, cy - r * 0.55, cx + r * 0.55, cy + r * 0.55]
    star = [(r * (1.15 if k % 2 == 0 else 0.5), -math.pi / 2 + rot * 0.2 + math.pi * k / 5) for k in range(10)]
    polygons = {"square": _polygon(cx, cy, r * 1.3, 4, rot * 0.3 + math.pi / 4),
                "triangle": _polygon(cx, cy + r * 0.2, r * 1.2, 3, -math.pi / 2 + rot * 0.3),
                "diamond": [(cx, cy - r * 1.2), (cx + r * 0.7, cy), (cx, cy + r * 1.2), (cx - r * 0.7, cy)],  # tall
                "star": [(cx + rr * math.cos(a), cy + rr * math.sin(a)) for rr, a in star]}  # corners far and near
    if name in polygons:
        draw.polygon(polygons[name], fill=color)
    elif name in ("circle", "ring"):                      # a ring is a disc with a hole
        draw.ellipse(box, fill=color)
    elif name == "frame":
        draw.rectangle(box, fill=color)
    elif name == "plus":                                  # a wide bar and a tall one
        for bar in ([cx - r, cy - w, cx + r, cy + w], [cx - w, cy - r, cx + w, cy + r]):
            draw.rectangle(bar, fill=color)
    elif name == "cross":                                 # an X: two thick diagonals
        for ends in ([(cx - r, cy - r), (cx + r, cy + r)], [(cx - r, cy + r), (cx + r, cy - r)]):
            draw.line(ends, fill=color, width=max(1, int(r * 0.55)))
    elif name == "half-disc":
        draw.pieslice([cx - r, cy - r * 0.6, cx + r, cy + r * 1.4], 180, 360, fill=color)
    if name in ("ring", "frame"):
        (draw.ellipse if name == "ring" else draw.rectangle)(hole, fill=bg)


# Colours: seven named ones on a flat black background. A code stands for a 4x4 patch, so each (shape, background)
# colour pair spells an outline with codes of its own: on any background (56 pairs) the tiny chain drew blobs
# (42 % judged their class), on one it learns each outline once (94.7 %, README). The class is the shape alone.
PALETTE_NAMES = ["red", "yellow", "green", "cyan", "blue", "magenta", "white", "black"]
PALETTE = np.array([[230, 25, 50], [255, 215, 0], [40, 170, 60], [60, 220, 230],
                    [20, 60, 200], [210, 40, 210], [245, 245, 245], [25, 25, 25]])
SHAPE_FOREGROUNDS = [0, 1, 2, 3, 4, 5, 6]  # palette rows a shape may have
SHAPE_BACKGROUNDS = [7]                    # palette rows a background may have (never the shape's)


def dominant_colours(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> (B,) the non-background palette row most pixels are nearest to (-1: none)."""
    pixels = rearrange(images.float(), "b c h w -> b (h w) c")
    nearest = torch.cdist(pixels, torch.as_tensor(PALETTE, dtype=torch.float32)[None]).argmin(-1)   # (B, HW)
    counts = F.one_hot(nearest, len(PALETTE)).sum(1)                                   # (B, colours)
    counts[:, SHAPE_BACKGROUNDS] = 0
    return torch.where(counts.sum(1) > 0, counts.argmax(1), -1)


def make_shapes(n: int, seed: int = 0, resolution: int = 32) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """One shape per image, at a random colour, size, rotation and position near the centre, drawn at 4x and
    box-filtered down; deterministic in (n, seed). -> (uint8 (n, 3, H, W), long labels (n,), n captions)"""
    rng, S, captions = np.random.default_rng(seed), resolution * 4, []
    images = np.empty((n, resolution, resolution, 3), dtype=np.uint8)
    labels = rng.integers(0, len(SHAPE_CLASSES), size=n)
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
        # the caption of the draws (it draws nothing): size by tertile, position by thirds of its range
        size = SHAPE_SIZES[min(2, int((r / S - 0.25) / 0.03))]
        hpos = "left" if cx < 0.4733 * S else "right" if cx > 0.5267 * S else "centre"
        vpos = "upper" if cy < 0.4733 * S else "lower" if cy > 0.5267 * S else "middle"
        captions.append(shape_caption(dict(size=size, colour=PALETTE_NAMES[fg], shape=SHAPE_CLASSES[labels[i]],
                                           position=f"{vpos} {hpos}", background=PALETTE_NAMES[bg])))
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels).long(), captions


# ----- Scenes, built in: landscapes that continue sideways -------------------------------
# Patch-wise sampling (Sec. 4.2, Fig. 4) needs data alike at every horizontal offset. A scene is a skyline
# y(x) of the absolute column x, ground below; its class is the kind of skyline. Every draw is stationary in x,
# so a wide scene (make_wide_scenes) cropped at offset o is the training image drawn at offset o.
SCENE_CLASSES = ["mountains", "hills", "sea", "city", "forest"]
SCENE_SKIES = {"day": (110, 170, 230), "dusk": (225, 135, 85), "night": (25, 30, 70)}
SCENE_GROUNDS = {"day": (40, 105, 50), "dusk": (115, 85, 55), "night": (80, 80, 95)}   # one per sky
SCENE_MAX_WIDTH = 1024          # in pixels at resolution 32: the widest scene the draws support


def _scene_params(rng, label: int, resolution: int) -> dict:
    """Everything that draws one scene, in pixels (x absolute); three sky-and-ground pairs, as shapes have one."""
    H, span = resolution, SCENE_MAX_WIDTH * resolution / 32
    p = {"label": label, "sky": rng.integers(len(SCENE_SKIES)), "horizon": rng.uniform(0.4, 0.75) * H}  # its mean
    name = SCENE_CLASSES[label]
    if name in ("mountains", "city", "forest"):           # peaks, buildings or trees at random widths
        lo, hi = {"mountains": (0.35, 0.6), "city": (0.2, 0.4), "forest": (0.2, 0.3)}[name]
        widths = rng.uniform(lo, hi, size=int(span / (lo * H)) + 2) * H
        p["edges"] = np.concatenate([[-rng.uniform(0, widths[0])], widths]).cumsum()
        high = {"mountains": (0.2, 0.35), "city": (0.3, 0.45), "forest": (0.25, 0.4)}[name]
        p["heights"] = rng.uniform(*high, size=len(p["edges"])) * H
        # peaks and valleys in turn; tall and low buildings in turn: every wall a step of at least 0.1 H
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
    t = (x - p["edges"][k]) / (p["edges"][k + 1] - p["edges"][k])
    if name == "mountains":                               # straight ridges between peaks
        return h0 - ((1 - t) * p["heights"][k] + t * p["heights"][k + 1])
    return h0 + 0.1625 * H - p["heights"][k] * (1 - 2 * np.abs(t - 0.5))      # forest: a pointed crown per tree


def _draw_scene(p: dict, offset: float, width: int, resolution: int) -> np.ndarray:
    """Columns offset .. offset + width of p: uint8 (H, width, 3), not anti-aliased (a blend would tell the class)."""
    x = offset + np.arange(width) + 0.5                                # column centres
    y = (np.arange(resolution) + 0.5)[:, None]                         # row centres
    sky, ground = list(SCENE_SKIES.values())[p["sky"]], list(SCENE_GROUNDS.values())[p["sky"]]
    return np.where((y >= _skyline(p, x, resolution))[..., None], ground, sky).astype(np.uint8)


def _scenes(n: int, seed: int, resolution: int, width: int | None):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(SCENE_CLASSES), size=n)
    params = [_scene_params(rng, int(label), resolution) for label in labels]
    W, span = width or resolution, SCENE_MAX_WIDTH * resolution / 32
    if W > span:
        raise ValueError(f"a scene is at most {int(span)} pixels wide at resolution {resolution}, asked for {W}")
    offsets = rng.uniform(0, span - W, size=n).round() if width is None else np.zeros(n)
    images = np.stack([_draw_scene(p, o, W, resolution) for p, o in zip(params, offsets)])
    captions = [f"{SCENE_CLASSES[p['label']]} at {list(SCENE_SKIES)[p['sky']]}" for p in params]
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels).long(), captions, offsets


def scene_skies(images: torch.Tensor) -> torch.Tensor:
    """uint8 scenes (B, 3, H, W) -> (B,) the SCENE_SKIES index nearest to the mean of the top row (sky)."""
    top = images[:, :, 0].float().mean(-1)                                            # (B, 3)
    return torch.cdist(top, torch.tensor(list(SCENE_SKIES.values()), dtype=torch.float32)).argmin(-1)


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
_POSITION_WORDS = {"upper left": "in the upper left", "upper centre": "at the top", "upper right": "in the upper right",
                   "middle left": "on the left", "middle centre": "in the centre", "middle right": "on the right",
                   "lower left": "in the lower left", "lower centre": "at the bottom",
                   "lower right": "in the lower right"}
_CAPTION_RE = re.compile(
    "^a(?: (?P<size>{}))?(?: (?P<colour>{}))? (?P<shape>{})(?: (?P<position>{}))?"
    "(?: on a (?P<background>{}) background)?$".format(*("|".join(map(re.escape, words)) for words in
              (SHAPE_SIZES, PALETTE_NAMES, SHAPE_CLASSES, _POSITION_WORDS.values(), PALETTE_NAMES))))


def shape_caption(parts: dict) -> str:
    """{"size", "colour", "shape", "position" ("upper left" ...), "background"} -> the caption (None parts left out)."""
    position, background = parts.get("position"), parts.get("background")
    words = ["a", parts.get("size"), parts.get("colour"), parts["shape"], position and _POSITION_WORDS[position],
             background and f"on a {background} background"]
    return " ".join(w for w in words if w)


def shape_caption_parts(caption: str) -> dict | None:
    """The parts of a shapes caption (missing ones None); None if it is not of that grammar."""
    m = _CAPTION_RE.match(caption.strip().lower())
    if m is None:
        return None
    return m.groupdict() | {"position": {v: k for k, v in _POSITION_WORDS.items()}.get(m["position"])}  # "upper left"


def mirror_caption(caption: str) -> str:
    """The caption of the mirrored image: "left" and "right" swap (the flipped training copies)."""
    return re.sub(r"\b(left|right)\b", lambda m: {"left": "right", "right": "left"}[m.group(1)], caption)


# ----- CIFAR-10 and folders of images -------------------------------------------------------
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_DIR = "cifar-10-batches-py"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def load_cifar(root: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 from its pickle batches in root/cifar-10-batches-py, downloaded (MD5 checked) when missing."""
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


def download(url: str, path: str, md5: str, timeout: float = 30) -> None:
    """url -> path unless there, via path.part renamed when whole; then its MD5 checked (ValueError); else OSError."""
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
    with open(path, "rb") as f:
        found = hashlib.file_digest(f, "md5").hexdigest()
    if found != md5:
        raise ValueError(f"{path} has MD5 {found}, expected {md5}; delete it and try again")


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists and numpy arrays only: a pickle can run any code."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype")} | {   # numpy 2 renamed numpy.core numpy._core: either is read
        (f"numpy.{core}.{module}", name) for core in ("core", "_core")
        for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))}

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
MIN_TEST_IMAGES = 4        # the judge compares two halves of at least 2; the bound's standard error needs 2 grids
TOO_FEW_TEST_IMAGES = (f"the test split must hold at least {MIN_TEST_IMAGES} images to measure anything "
                       f"(the judge compares two halves of at least 2)")
UNKNOWN_DATASET = "unknown data set {!r}; use shapes, scenes, cifar or folder:PATH"
SHAPES_TRAIN_SIZE, SHAPES_TEST_SIZE = 20000, 2000     # shapes and scenes: a run records how many were drawn


def load_folder(path: str, resolution: int) -> tuple[torch.Tensor, torch.Tensor | None, list[str] | None]:
    """Every image under `path`, resized and center-cropped; labels from one subfolder per class; captions from
    path/captions.txt ("file<TAB>caption") or a .txt beside an image (cat.png -> cat.txt), else ""."""
    if not os.path.isdir(path):
        raise ValueError(f"image folder {path} does not exist")
    (files, classes), listed, listing = _folder(path), {}, os.path.join(path, "captions.txt")
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {path}")
    if os.path.exists(listing):
        with open(listing, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                name, tab, caption = line.partition("\t")
                if line.strip() and not tab:
                    raise ValueError(f"{path}/captions.txt line {n}: expected 'file<TAB>caption'")
                listed[name.strip().replace(os.sep, "/")] = " ".join(caption.split())   # a blank line: ""
    images, labels, captions = [], [], []
    for p in files:
        try:
            with Image.open(p) as im:
                images.append(resize_center_crop(im, resolution))
        except Exception:
            continue
        rel, beside = os.path.relpath(p, path), os.path.splitext(p)[0] + ".txt"
        if classes:
            labels.append(classes.index(rel.split(os.sep)[0]))
        caption = listed.get(rel.replace(os.sep, "/"))
        if caption is None and os.path.exists(beside):
            with open(beside, encoding="utf-8") as f:
                caption = " ".join(f.read().split())
        captions.append(caption or "")
    if len(images) < len(files):
        warnings.warn(f"skipped {len(files) - len(images)} unreadable image file(s) under {path}")
    if not images:
        raise ValueError(f"none of the {len(files)} image files under {path} could be read")
    if any(captions) and not all(captions):
        print(f"{path}: {captions.count('')} of {len(captions)} images have no caption (they get the empty one)",
              flush=True)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, (torch.tensor(labels) if classes else None), (captions if any(captions) else None)


def _folder(path: str) -> tuple[list[str], list[str]]:
    """(the image files under path, sorted; the classes: the subfolders if every image is in one of 2+, else [])"""
    files = sorted(p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                   if p.lower().endswith(IMAGE_EXTENSIONS))
    classes = sorted({os.path.relpath(p, path).split(os.sep)[0] for p in files})
    labeled = all(os.sep in os.path.relpath(p, path) for p in files) and len(classes) > 1
    return files, classes if labeled else []


def class_names(name: str) -> list[str]:
    """A data set's class names in label order ([] without labels): what sample.py --class accepts."""
    builtin = {"shapes": SHAPE_CLASSES, "scenes": SCENE_CLASSES, "cifar": CIFAR_CLASSES}
    return list(builtin[name]) if name in builtin else _folder(name.removeprefix("folder:"))[1]


def check_folder_split(path: str, images: int) -> int:
    """The size of a folder's test split (a fixed tenth of its `images`), refused when too small."""
    n_test = images // 10
    if n_test < MIN_TEST_IMAGES:              # a "held-out" figure on no held-out image would mean nothing
        raise ValueError(f"{path} holds {images} image(s), so its test split (a fixed tenth) holds {n_test}; "
                         f"{TOO_FEW_TEST_IMAGES}: give the folder at least {10 * MIN_TEST_IMAGES} images")
    return n_test


def check_dataset(name: str) -> None:
    """shapes, scenes, cifar or folder:PATH of enough images, else one clear line (before any work)."""
    if name.startswith("folder:"):
        path = name.removeprefix("folder:")
        if not os.path.isdir(path):
            raise ValueError(f"image folder {path} does not exist")
        check_folder_split(path, len(_folder(path)[0]))
    elif name not in ("shapes", "scenes", "cifar"):
        raise ValueError(UNKNOWN_DATASET.format(name))


def load_dataset(name: str, split: str, resolution: int = 32, data_root: str = "data",
                 shapes_size: tuple[int, int] = (SHAPES_TRAIN_SIZE, SHAPES_TEST_SIZE)):
    """-> (uint8 images (N, 3, H, W), long labels (N,) or None, number of classes or 0, captions or None).
    `folder:PATH` has no held-out split of its own: a fixed tenth of it is the test split."""
    test = split != "train"
    if name in ("shapes", "scenes"):                      # drawn from a seed: 0 trains, 1 tests
        make, classes = (make_shapes, SHAPE_CLASSES) if name == "shapes" else (make_scenes, SCENE_CLASSES)
        x, y, captions = make(shapes_size[1 if test else 0], seed=1 if test else 0, resolution=resolution)
        return x, y, len(classes), captions
    if name == "cifar":
        if resolution != 32:
            raise ValueError("CIFAR-10 images are 32x32; use --resolution 32")
        return *load_cifar(data_root, split), 10, None
    if not name.startswith("folder:"):
        raise ValueError(UNKNOWN_DATASET.format(name))
    path = name.removeprefix("folder:")
    x, y, captions = load_folder(path, resolution)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))   # a fixed shuffle: a fixed split
    n_test = check_folder_split(path, len(x))
    idx = order[:n_test] if test else order[n_test:]
    return (x[idx], None if y is None else y[idx], 0 if y is None else int(y.max()) + 1,
            None if captions is None else [captions[i] for i in idx.tolist()])


# ----- Which images a run was trained on --------------------------------------------------

def dataset_record(spec: str, resolution: int, data_root: str = "data", train_size: int = SHAPES_TRAIN_SIZE,
                   test_size: int = SHAPES_TEST_SIZE) -> dict:
    """What vq.pt and tokens.pt store to find a run's images again: spec, resolution, absolute paths or sizes."""
    record = {"spec": spec, "resolution": int(resolution)}
    if spec in ("shapes", "scenes"):
        record.update(train_size=int(train_size), test_size=int(test_size))
    elif spec == "cifar":
        record["data_root"] = os.path.abspath(data_root)
    elif spec.startswith("folder:"):
        record["spec"] = "folder:" + os.path.abspath(spec.removeprefix("folder:"))
    return record


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
    mse = (x - y).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))
