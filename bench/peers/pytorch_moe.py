#!/usr/bin/env python3
"""PyTorch peer for bench/moe: the Mixtral-like MoE layer (d = 1024, ff = 2816 SwiGLU, E = 8,
k = 2) written the usual Hugging Face way (MixtralSparseMoeBlock: softmax top-k, renormalised,
a Python loop over the experts with index_add_), timed on this machine, 2 threads, f32 and bf16,
T in {1, 32, 512}, one layer repeated and a rotation over 4 layers' weights.

With --train it times a training step (forward, MSE, backward, clipping, AdamW) at T = 512, f32,
as bench/moe's BM_TrainStep does.

With --expert JSON_PATH it times one GLU expert (the same module, d = 1024, ff = 2816) at
T in {1, 8, 64, 512}, f32 and bf16, as bench/expert's BM_GluExpert does, and writes
{"pytorch f32": {"1": ms, ...}, "pytorch bf16": {...}} for bench/plot_edge.py.

Not part of the build, the tests or CI: run it by hand (needs Debian's python3-torch) to put the
peer's figures beside bench/moe's in docs/benchmarks.md.  Usage: /usr/bin/python3 bench/peers/pytorch_moe.py
[--expert JSON_PATH | --train]
"""
import json
import sys
import statistics
import time

import torch
import torch.nn.functional as F

D, FF, E, K = 1024, 2816, 8, 2


class Expert(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = torch.nn.Linear(D, FF, bias=False)  # gate
        self.w3 = torch.nn.Linear(D, FF, bias=False)  # up
        self.w2 = torch.nn.Linear(FF, D, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoeBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Linear(D, E, bias=False)
        self.experts = torch.nn.ModuleList(Expert() for _ in range(E))

    def forward(self, x):
        logits = self.gate(x)
        weights = F.softmax(logits, dim=1, dtype=torch.float)
        weights, selected = torch.topk(weights, K, dim=-1)
        weights /= weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        mask = F.one_hot(selected, num_classes=E).permute(2, 1, 0)
        for e in range(E):
            idx, top_x = torch.where(mask[e])
            if top_x.numel() == 0:
                continue
            y = self.experts[e](x[top_x]) * weights[top_x, idx, None]
            out.index_add_(0, top_x, y.to(x.dtype))
        return out


def median_ms(layers, x, reps=5, min_time=0.5):
    """Median over `reps` runs of the mean time per layer call, rotating over `layers`."""
    results = []
    for _ in range(reps):
        calls, start = 0, time.perf_counter()
        while True:
            layers[calls % len(layers)](x)
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time and calls >= len(layers):
                break
        results.append(elapsed / calls * 1e3)
    return statistics.median(results)


def expert_times(path):
    """One GLU expert, called repeatedly, per T and dtype: {"pytorch f32": {"1": ms, ...}}."""
    out = {}
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            expert = Expert().to(dtype)
            name = f"pytorch {str(dtype).removeprefix('torch.').replace('float32', 'f32').replace('bfloat16', 'bf16')}"
            for t in (1, 8, 64, 512):
                x = torch.randn(t, D).to(dtype)
                expert(x)  # warm-up
                out.setdefault(name, {})[str(t)] = median_ms([expert], x)
                print(f"{name} expert T={t:<4d} {out[name][str(t)]:8.3f} ms")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


def train_step_times():
    """A training step of the layer at T = 512, f32 (issue 12, point 8): forward, mean squared
    error against a target, backward, clipping the global norm to 1, torch.optim.AdamW, as
    bench/moe's BM_TrainStep_<backend>/T:512/f32 does (no residual, one block)."""
    torch.manual_seed(0)
    layer = MoeBlock()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-5, weight_decay=1e-2)
    x = torch.empty(512, D).uniform_(-1, 1)
    target = torch.empty(512, D).uniform_(-0.1, 0.1)

    def step():
        opt.zero_grad(set_to_none=False)
        loss = F.mse_loss(layer(x), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(layer.parameters(), 1.0)
        opt.step()

    def forward():
        with torch.no_grad():
            layer(x)

    step()  # warm-up (allocates AdamW's state)
    for name, fn in (("train step", step), ("forward", forward)):
        results = []
        for _ in range(5):
            calls, start = 0, time.perf_counter()
            while True:
                fn()
                calls += 1
                elapsed = time.perf_counter() - start
                if elapsed >= 2.0 and calls >= 3:
                    break
            results.append(elapsed / calls * 1e3)
        print(f"pytorch float32 T=512 {name:10s} {statistics.median(results):8.2f} ms (median of 5)")


def main():
    torch.set_num_threads(2)
    if len(sys.argv) == 3 and sys.argv[1] == "--expert":
        expert_times(sys.argv[2])
        return
    if len(sys.argv) == 2 and sys.argv[1] == "--train":
        train_step_times()
        return
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"mkldnn bf16 {torch.backends.mkldnn.is_available()}")
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            layers = [MoeBlock().to(dtype) for _ in range(4)]
            for t in (1, 32, 512):
                x = torch.randn(t, D).to(dtype)
                for n in (1, 4):
                    for layer in layers[:n]:
                        layer(x)  # warm-up
                    ms = median_ms(layers[:n], x)
                    print(f"pytorch {str(dtype).removeprefix('torch.'):8s} T={t:<4d} layers:{n}  {ms:8.2f} ms")


if __name__ == "__main__":
    main()
