"""Peak memory and time of one stage-1 training step (AdamW, fp32) of a preset, in a fresh process:
``python benchmarks/peak_memory.py --preset tiny --batch 32`` prints one JSON line.

CPU: the rise of the process's peak resident set size (ru_maxrss) over its size before the model is
built: weights, gradients, optimizer state and activations. CUDA: torch.cuda.max_memory_allocated."""

import argparse
import json
import resource
import time

import torch

import stvq


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * resource.getpagesize() / 2**20
    model = stvq.create("tokenizer", "styled", preset=args.preset).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.rand(args.batch, 3, model.image_size, model.image_size, device=device) * 2 - 1
    times = []
    for _ in range(2):  # the first step allocates the optimizer state
        start = time.perf_counter()
        out = model(images, noise_sigma=0.1)
        loss = (out.reconstruction - images).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    print(json.dumps({"preset": args.preset, "batch": args.batch, "device": args.device, "peak_mb": round(peak, 1), "step_s": round(times[-1], 3)}))


if __name__ == "__main__":
    main()
