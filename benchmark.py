"""Step-throughput benchmarks: each method's training step beside its baseline, in one run, on the same batch.

    python benchmark.py ring                 # MoCoRing vs MoCo v2 (+ bare encoder fwd+bwd on a GPU)
    python benchmark.py ring --arch resnet18 --batch-size 256 --steps 50

Synthetic fixed batch (no data loading), warm-up steps first, then the median of several timed windows; prints
images/s per variant and the ratio to the baseline. A measurement, never an assertion: the figures quoted in
README.md name the command and the machine they came from.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch

import common


def time_steps(step: Callable[[int], object], images_per_step: int, device: torch.device, steps: int,
               warmup: int = 5, windows: int = 5) -> float:
    """Median images/s over `windows` windows of `steps // windows` calls of step(i), after `warmup` calls."""
    for i in range(warmup):
        step(i)
    per_window = max(1, steps // windows)
    rates = []
    for w in range(windows):
        if device.type == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        for i in range(per_window):
            step(warmup + w * per_window + i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(images_per_step * per_window / (time.perf_counter() - tic))
    return statistics.median(rates)


def synthetic_views(batch_size: int, image_size: int, device: torch.device, n_views: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [common.to_device(torch.randn(batch_size, 3, image_size, image_size, generator=g), device)
            for _ in range(n_views)]


def bare_encoder_rate(arch: str, stem: str, views: list[torch.Tensor], steps: int) -> float:
    """Ceiling on a GPU: forward+backward+SGD of one encoder on both views, nothing else (images/s)."""
    device = views[0].device
    encoder = common.Encoder(arch, stem, 128, True).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(encoder.parameters(), lr=0.01, momentum=0.9)

    def step(_):
        with common.autocast(device):
            loss = sum(encoder(v).float().pow(2).mean() for v in views)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return time_steps(step, views[0].shape[0], device, steps)


def bench_ring(args, device) -> list[dict]:
    import moco_ring

    views = synthetic_views(args.batch_size, args.image_size, device)
    rows = []
    for name, lower, upper in (("MoCo v2 (ring 0-100)", 0.0, 100.0), ("MoCoRing (ring 90-99)", 90.0, 99.0)):
        cfg = moco_ring.Config(arch=args.arch, stem="cifar", moco_k=args.queue, ring_lower=lower, ring_upper=upper,
                               anneal="none", batch_size=args.batch_size, bn_splits=8)
        common.seed_everything(0)
        model = moco_ring.MoCoRing(cfg, bn_splits=8).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
        rate = time_steps(lambda i: moco_ring.train_step(model, model, opt, views, i, 100, 10_000),
                          args.batch_size, device, args.steps)
        rows.append({"variant": name, "images_per_s": rate})
    if device.type == "cuda":
        rows.append({"variant": "bare encoder fwd+bwd x2 views", "images_per_s":
                     bare_encoder_rate(args.arch, "cifar", views, args.steps)})
    return rows


BENCHMARKS = {"ring": bench_ring}


def main(argv=None):
    parser = common.OneLineErrorParser(description=__doc__.split("\n\n")[0],
                                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("method", choices=sorted(BENCHMARKS), help="which method to time against its baseline")
    parser.add_argument("--arch", default="small", choices=("small", "resnet18", "resnet50"), help="backbone")
    parser.add_argument("--batch-size", type=int, default=256, help="images per step")
    parser.add_argument("--image-size", type=int, default=32, help="synthetic image side in pixels")
    parser.add_argument("--queue", type=int, default=4096, help="queue / bank size K where the method has one")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant (after 5 warm-up steps)")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    device = common.init_distributed()
    torch.backends.cudnn.benchmark = True
    rows = BENCHMARKS[args.method](args, device)
    base = rows[0]["images_per_s"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{args.method}: arch={args.arch} batch={args.batch_size} image={args.image_size}px on {name}, "
          f"torch {torch.__version__}")
    for row in rows:
        row["ratio_to_first"] = row["images_per_s"] / base
        print(f"  {row['variant']:<40} {row['images_per_s']:10.1f} images/s   x{row['ratio_to_first']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"method": args.method, "device": name, "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
