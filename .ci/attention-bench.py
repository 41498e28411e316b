"""python .ci/attention-bench.py

Side by side: the chain's bf16 training step on a CPU with attention in fp32 (the code's branch)
against the same step with the branch removed (a copy of imagebart.py without it)."""
import dataclasses
import importlib.util
import os
import sys
import tempfile
import time

import torch

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)
import imagebart as ib
src = open(os.path.join(REPO, "imagebart.py")).read()
a = src.index("        fp32 = q.device.type")
b = src.index("        return self.proj(rearrange(y", a)
plain = ("        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and cache is None,\n"
         "                                           dropout_p=self.dropout if self.training else 0.0)\n")
copy = os.path.join(tempfile.mkdtemp(), "imagebart_plain.py")
open(copy, "w").write(src[:a] + plain + src[b:])
spec = importlib.util.spec_from_file_location("ib_plain", copy)
ibp = importlib.util.module_from_spec(spec); sys.modules["ib_plain"] = ibp; spec.loader.exec_module(ibp)

def make(mod):
    cfg = dataclasses.replace(mod.CHAIN_PRESETS["tiny"], num_codes=256, grid=[8, 8], num_labels=10)
    torch.manual_seed(0)
    chain = mod.ImageBART(cfg)
    opt = torch.optim.AdamW(chain.parameters(), lr=1e-3)
    x1 = torch.randint(0, 256, (32, 8, 8)); y = torch.randint(0, 10, (32,))
    def step(t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = chain.loss(x1, t, y)
        opt.zero_grad(); loss.backward(); opt.step()
    attn = mod.Attention(128, 4, 0.0); x = torch.randn(32, 64, 128, requires_grad=True)
    def attn_step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attn(x, causal=True)
        out.float().sum().backward()
    return step, attn_step

def timed(f, n):
    for _ in range(3): f()
    t0 = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - t0) / n * 1e3

(s_fp32, a_fp32), (s_plain, a_plain) = make(ib), make(ibp)
res = {"with": [], "without": [], "attn_with": [], "attn_without": []}
for r in range(3):
    res["with"].append(timed(lambda: (s_fp32(2), s_fp32(3)), 10) / 2)
    res["without"].append(timed(lambda: (s_plain(2), s_plain(3)), 10) / 2)
    res["attn_with"].append(timed(a_fp32, 30))
    res["attn_without"].append(timed(a_plain, 30))
for k, v in res.items():
    print(k, " ".join(f"{x:.1f}" for x in v), "ms")
print(f"step ratio {min(res['without']) / min(res['with']):.2f}x, attention ratio {min(res['attn_without']) / min(res['attn_with']):.2f}x")
