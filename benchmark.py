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
    return time_interleaved({"": step}, images_per_step, device, steps, warmup, windows)[""]


def time_interleaved(variants: dict[str, Callable[[int], object]], images_per_step: int, device: torch.device,
                     steps: int, warmup: int = 5, windows: int = 5) -> dict[str, float]:
    """Median images/s of each variant's step(i). The variants take turns window by window, so a machine that
    gets busier or quieter during the run shifts all of them alike and their ratios stay meaningful."""
    for step in variants.values():
        for i in range(warmup):
            step(i)
    per_window = max(1, steps // windows)
    rates = {name: [] for name in variants}
    for w in range(windows):
        for name, step in variants.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            tic = time.perf_counter()
            for i in range(per_window):
                step(warmup + w * per_window + i)
            if device.type == "cuda":
                torch.cuda.synchronize()
            rates[name].append(images_per_step * per_window / (time.perf_counter() - tic))
    return {name: statistics.median(r) for name, r in rates.items()}


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
    variants = {}
    for name, lower, upper in (("MoCo v2 (ring 0-100)", 0.0, 100.0), ("MoCoRing (ring 90-99)", 90.0, 99.0)):
        cfg = moco_ring.Config(arch=args.arch, stem="cifar", moco_k=args.queue, ring_lower=lower, ring_upper=upper,
                               anneal="none", batch_size=args.batch_size, bn_splits=8)
        common.seed_everything(0)
        model = moco_ring.MoCoRing(cfg, bn_splits=8).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
        variants[name] = (lambda m, o: lambda i: moco_ring.train_step(m, m, o, views, i, 100, 10_000))(model, opt)
    rates = time_interleaved(variants, args.batch_size, device, args.steps)
    rows = [{"variant": name, "images_per_s": rate} for name, rate in rates.items()]
    if device.type == "cuda":
        rows.append({"variant": "bare encoder fwd+bwd x2 views", "images_per_s":
                     bare_encoder_rate(args.arch, "cifar", views, args.steps)})
    return rows


def bench_adco(args, device) -> list[dict]:
    """MoCo v2 (moco_ring's step with the whole queue as ring) beside AdCo's step: both players, K = --queue."""
    import adco
    import moco_ring

    views = synthetic_views(args.batch_size, args.image_size, device)
    common.seed_everything(0)
    moco = moco_ring.MoCoRing(moco_ring.Config(arch=args.arch, stem="cifar", moco_k=args.queue, ring_lower=0.0,
                                               ring_upper=100.0, anneal="none", batch_size=args.batch_size,
                                               bn_splits=8), bn_splits=8).to(device)
    moco_opt = torch.optim.SGD(moco.encoder_q.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
    common.seed_everything(0)
    model = adco.AdCo(adco.Config(arch=args.arch, stem="cifar", bank_size=args.queue, batch_size=args.batch_size,
                                  bn_splits=8), bn_splits=8).to(device)
    opt, bank_opt = adco.make_optimizers(model)
    if device.type == "cuda":
        moco, model = moco.to(memory_format=torch.channels_last), model.to(memory_format=torch.channels_last)
    rates = time_interleaved({
        "MoCo v2 (moco_ring, ring 0-100)": lambda i: moco_ring.train_step(moco, moco, moco_opt, views, i, 100, 10_000),
        "AdCo (encoder + adversaries)": lambda i: adco.train_step(model, model, opt, bank_opt, views, i, 10_000),
    }, args.batch_size, device, args.steps)
    rows = [{"variant": name, "images_per_s": rate} for name, rate in rates.items()]
    if device.type == "cuda":
        rows.append({"variant": "bare encoder fwd+bwd x2 views", "images_per_s":
                     bare_encoder_rate(args.arch, "cifar", views, args.steps)})
    return rows


def bench_acc(args, device) -> list[dict]:
    """XMoCo (--sampling random) beside CM-ACC's samplers at the paper's ratios M : K : N = 1 : 30 : 300
    (M = --batch-size; --queue is not used), two image modalities, synthetic pool keys. Each row's name carries the
    median time split of a step in ms: encoding (queries + keys) / sampling / update (loss, backward, Adam,
    momentum, enqueue). The last row is the pool refresh (N key-encoder forwards per modality, once per epoch)."""
    import moco_acc

    m = args.batch_size
    v_q, v_k, a_q, a_k = synthetic_views(m, args.image_size, device, n_views=4)
    views = {"v": [v_q, v_k], "a": [a_q, a_k]}
    labels = {x: torch.full((m,), -1, dtype=torch.long) for x in moco_acc.MODALITIES}
    variants, splits, models = {}, {}, {}
    for name, sampling in (("XMoCo (random)", "random"), ("CM-ACC (active)", "active"),
                           ("CM-ACC (feature k-means++)", "feature"), ("CM-ACC (OHEM)", "ohem")):
        cfg = moco_acc.Config(arch=args.arch, batch_size=m, moco_k=30 * m, pool_size=300 * m, sampling=sampling,
                              bn_splits=8, warmup_steps=0)
        common.seed_everything(0)
        model = moco_acc.CMACC(cfg, ("image", "image"), (3, 3), bn_splits=8).to(device)
        for x in moco_acc.MODALITIES if sampling != "random" else ():  # a pool as after lines 6-7
            model.pool[x].keys.copy_(torch.nn.functional.normalize(torch.randn(300 * m, cfg.dim), dim=1))
            model.pool[x].ids.copy_(torch.arange(300 * m))
        opt = torch.optim.Adam([*model.query.parameters(), *model.fc_query.parameters()], lr=cfg.lr)
        splits[name], models[name] = [], model

        def step(i, model=model, opt=opt, log=splits[name]):
            log.append(moco_acc.train_step(model, model, opt, views, labels, i))

        variants[name] = step
    rates = time_interleaved(variants, m, device, args.steps)
    rows = []
    for name, rate in rates.items():
        ms = {part: 1000 * statistics.median(s[f"time_{part}_s"] for s in splits[name])
              for part in ("encode", "sample", "update")}
        rows.append({"variant": f"{name} {ms['encode']:.0f}/{ms['sample']:.0f}/{ms['update']:.0f} ms",
                     "images_per_s": rate, **{f"{part}_ms": t for part, t in ms.items()}})
    model = models["CM-ACC (active)"]
    tic = time.perf_counter()
    with torch.no_grad(), common.autocast(device):
        for _ in range(300):
            for x, view in (("v", v_k), ("a", a_k)):
                model.encode_keys(x, view, shuffle_bn=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    rows.append({"variant": f"pool refresh: N={300 * m} x 2 key fwd",
                 "images_per_s": 300 * m / (time.perf_counter() - tic)})
    return rows


def bench_mmcl(args, device) -> list[dict]:
    """SimCLR vs MMCL-INV vs MMCL-PGD training steps (same encoder init, batch, Adam), and the memory of the SVM
    part: peak bytes allocated while one batch's Delta is built and solved (GPU), or Delta's own size (CPU: n/a)."""
    import functools

    import mmcl

    views = synthetic_views(args.batch_size, args.image_size, device)
    variants, last, configs = {}, {}, {}
    for name, loss, solver in (("SimCLR", "simclr", "inv"), ("MMCL-INV", "mmcl", "inv"), ("MMCL-PGD", "mmcl", "pgd")):
        cfg = mmcl.Config(arch=args.arch, stem="cifar", loss=loss, solver=solver, batch_size=args.batch_size)
        common.seed_everything(0)
        model = mmcl.MMCL(cfg, bn_splits=1).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(model.encoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        last[name], configs[name] = {}, cfg

        def step(i, model=model, opt=opt, log=last[name]):
            log.update(mmcl.train_step(model, model, opt, views, i, 100, 10_000))

        variants[name] = step
    rows = []
    for name, rate in time_interleaved(variants, args.batch_size, device, args.steps).items():
        row, cfg = {"variant": name, "images_per_s": rate}, configs[name]
        if cfg.loss == "mmcl":
            N, n = args.batch_size, 2 * args.batch_size - 2
            row["delta_bytes"] = N * n * n * 4  # Delta: Nxnxn fp32
            label = f"Delta {row['delta_bytes'] / 2**20:.0f} MB, peak n/a"
            if device.type == "cuda":
                g = torch.Generator().manual_seed(0)
                z1, z2 = (torch.nn.functional.normalize(torch.randn(N, cfg.dim, generator=g), dim=1).to(device)
                          for _ in range(2))
                kernel = functools.partial(mmcl.kernel_matrix, kind="rbf", sigma2=cfg.sigma2)
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                with torch.no_grad():
                    mmcl.mmcl_loss(z1, z2, kernel, cfg.C, cfg.solver)
                row["solver_peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
                label = f"solver peak {row['solver_peak_bytes'] / 2**20:.0f} MB"
            if cfg.solver == "pgd":
                row["pgd_iters"] = last[name]["pgd_iters"]
                label += f", {row['pgd_iters']:.0f} it"
            row["variant"] = f"{name} ({label})"
        rows.append(row)
    return rows


BENCHMARKS = {"ring": bench_ring, "mmcl": bench_mmcl, "adco": bench_adco, "acc": bench_acc}


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
