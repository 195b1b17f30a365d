"""Step-throughput benchmarks: each method's training step beside its baseline, in one run, on the same batch.

    python benchmark.py ring                 # MoCoRing vs MoCo v2 (+ bare encoder fwd+bwd on a GPU)
    python benchmark.py ring --arch resnet18 --batch-size 256 --steps 50
    python benchmark.py data                 # the data path: PIL vs device augmentation, end to end
    python benchmark.py gpu                  # every GPU figure in one run (--smoke: CPU, seconds)

Synthetic fixed batch (no data loading), warm-up steps first, then the median of several timed windows; prints
images/s per variant and the ratio to the baseline. A measurement, never an assertion: the figures quoted in
README.md name the command and the machine they came from.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

import common
import engine


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
    encoder = common.Encoder(common.build_backbone(arch, stem), 128, True).to(device, memory_format=torch.channels_last)
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
    model = adco.AdCo(adco.Config(arch=args.arch, stem="cifar", num_adversaries=args.queue, batch_size=args.batch_size,
                                  bn_splits=8), bn_splits=8).to(device)
    opt, adv_opt = adco.make_optimizers(model)
    if device.type == "cuda":
        moco, model = moco.to(memory_format=torch.channels_last), model.to(memory_format=torch.channels_last)
    rates = time_interleaved({
        "MoCo v2 (moco_ring, ring 0-100)": lambda i: moco_ring.train_step(moco, moco, moco_opt, views, i, 100, 10_000),
        "AdCo (encoder + adversaries)": lambda i: adco.train_step(model, model, opt, adv_opt, views, i, 10_000),
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
            log.append(moco_acc.train_step(model, model, opt, views, labels, torch.arange(m), i))

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


def print_pgd_stopping(args, views: list[torch.Tensor], anchors: int = 16) -> None:
    """How far above the exact optimum g* of the SVM dual each PGD stopping rule and step stop, and after how many
    iterations, for the first `anchors` anchors of one batch of N = --batch-size images: n = 2N-2
    negatives, RBF kernel at the default sigma^2 25, C 100, beta 0.1, Delta in float32 and PGD from relu(Gaussian)
    as in training (every anchor of the batch is solved: the public code's rule averages over all of them), g* from
    mmcl.svm_dual_exact in float64. Two feature sets: the untrained encoder's on the benchmark batch (crowded, as
    early in training) and random unit vectors (spread out). Printed, as these are not rates."""
    import mmcl

    cfg = mmcl.Config(arch=args.arch, stem="cifar", batch_size=args.batch_size)
    N = args.batch_size
    common.seed_everything(0)
    encoder = mmcl.MMCL(cfg, bn_splits=1).encoder.to(views[0].device)
    with torch.no_grad():
        crowded = torch.cat([torch.nn.functional.normalize(encoder(v).float(), dim=1) for v in views]).cpu()
    spread = torch.nn.functional.normalize(torch.randn(2 * N, cfg.dim, generator=torch.Generator().manual_seed(0)),
                                           dim=1)
    print(f"PGD stopping vs the exact optimum g*: N={N} (n={2 * N - 2}), first {anchors} anchors, RBF sigma^2 "
          f"{cfg.sigma2:g}, C {cfg.C:g}, beta {cfg.beta:g}; % above g* (min..max over anchors), iterations")
    for name, Z in (("untrained encoder on the batch", crowded), ("random unit vectors", spread)):
        rows = torch.arange(N)
        Delta = mmcl.svm_delta(mmcl.kernel_matrix(Z, Z, "rbf", sigma2=cfg.sigma2), rows,
                               mmcl.negative_indices(N, rows))  # Delta: Nxnxn, float32
        mine = Delta[:anchors].double()
        A = mine + cfg.beta * torch.eye(Delta.shape[1], dtype=torch.float64)
        best = mmcl.svm_dual_exact(mine, cfg.C, cfg.beta)

        def g(a):  # the dual objective of each anchor, g(a) = 1/2 a^T (Delta + beta I) a - 2 a^T 1
            return 0.5 * torch.einsum("bi,bij,bj->b", a, A, a) - 2 * a.sum(1)

        def above(alpha):  # (g(alpha) - g*) / |g*| in %, min..max over the anchors
            gap = 100 * (g(alpha[:anchors].double()) - g(best)) / g(best).abs()
            return f"{gap.min().item():+.3f}..{gap.max().item():+.3f}%"

        print(f"  features: {name} (mean cosine {(Z @ Z.T).mean().item():.2f})")
        start = torch.randn(Delta.shape[:2], generator=torch.Generator().manual_seed(1)).relu()
        for step_name, step in (("1/(|Delta|_F+beta), the default", 0.0), ("1e-3, the paper's", 1e-3)):
            for stop in mmcl.PGD_STOP_RULES:
                alpha, iters = mmcl.svm_dual_pgd(Delta, cfg.C, cfg.pgd_steps, cfg.beta, step, cfg.pgd_tol, start, stop)
                its = iters[:anchors]
                span = f"{its.min().item()}" if its.min() == its.max() else f"{its.min().item()}-{its.max().item()}"
                print(f"    step {step_name:<32} stop {stop:<6} {above(alpha):<18} {span} iterations")
        print(f"    {'INV (truncated least squares)':<50}{above(mmcl.svm_dual_inv(Delta, cfg.C, cfg.beta))}")


def bench_mmcl(args, device) -> list[dict]:
    """SimCLR vs MMCL-INV vs MMCL-PGD training steps (same encoder init, batch, Adam), and the memory of the SVM
    part: peak bytes allocated while one batch's Delta is built and solved (GPU), or Delta's own size (CPU: n/a).
    First, how far from the exact optimum PGD's stopping rules stop (print_pgd_stopping)."""
    import functools

    import mmcl

    views = synthetic_views(args.batch_size, args.image_size, device)
    print_pgd_stopping(args, views)
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
                row["pgd_iters"] = float(last[name]["pgd_iters"])  # train_step leaves it on the device
                label += f", {row['pgd_iters']:.0f} it"
            row["variant"] = f"{name} ({label})"
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# The data path: `python benchmark.py data` and the prepared GPU suite `python benchmark.py gpu`
# ---------------------------------------------------------------------------------------------------------------------
CIFAR_JPG = Path(__file__).resolve().parent.parent / "shared" / "data" / "cifar10-jpg"


def moco_v2_step(arch: str, batch_size: int, queue: int, device: torch.device) -> Callable:
    """step(views, i): one MoCo v2 training step (moco_ring with the whole queue as ring), as bench_ring times."""
    import moco_ring

    cfg = moco_ring.Config(arch=arch, stem="cifar", moco_k=queue, ring_lower=0.0, ring_upper=100.0, anneal="none",
                           batch_size=batch_size, bn_splits=8)
    common.seed_everything(0)
    model = moco_ring.MoCoRing(cfg, bn_splits=8).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
    return lambda views, i: moco_ring.train_step(model, model, opt, views, i, 100, 10_000)


def image_data(data_root: str, image_size: int) -> tuple[common.ImageData, str]:
    """The CIFAR-10 JPEG folder when it is there (../shared/data/cifar10-jpg by default), else synthetic pixels."""
    if data_root and Path(data_root, "train").is_dir():
        return common.load_image_data("folder", data_root, image_size), f"folder {data_root}"
    return common.load_image_data("synthetic", "", image_size), "synthetic (FakeData, 4096 images)"


def endless(loader, sampler: common.EpochSampler):
    """The batches of epoch 0, 1, 2, ... of a loader driven by `sampler`, as the training loop draws them."""
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        yield from loader


def data_loaders(data: common.ImageData, batch_size: int, workers: int, device: torch.device) -> tuple[dict, float]:
    """Both data paths over the same images, seeds and batches: 'cpu' (PIL in `workers` loader processes, what the
    scripts do today) and 'device' (decoded once into memory, augmented in this process). Returns endless batch
    iterators and the seconds the one-off decode into memory took."""
    tf = common.pretrain_transform(data.image_size, data.mean, data.std)
    samplers = {path: common.EpochSampler(len(data.pretrain), batch_size, seed=0) for path in engine.AUGMENT_CHOICES}
    cpu = common.make_loader(common.AugmentedViews(data.pretrain, common.MultiView([tf, tf])), batch_size, workers,
                             device, samplers["cpu"])
    tic = time.perf_counter()
    memory = engine.load_into_memory(data.pretrain, device, workers)
    decode_s = time.perf_counter() - tic
    on_device = engine.DeviceViewLoader(memory, engine.DeviceAugment(data.image_size, data.mean, data.std), 2,
                                        samplers["device"], batch_size)
    return {"cpu": endless(cpu, samplers["cpu"]), "device": endless(on_device, samplers["device"])}, decode_s


def augment_ms_per_image(data: common.ImageData, images: int, windows: int) -> dict[str, dict[str, float]]:
    """Two views of `images` decoded images on one thread, decode excluded: the PIL path as a loader worker runs
    it (common.AugmentedViews: per-sample seed, two pretrain_transform views) and the device path on this CPU
    (one DeviceAugment batch). Median over interleaved windows of wall time and of this thread's CPU time (the
    latter is the fairer figure on a shared machine: it leaves out the time other processes hold the core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pil = [data.pretrain[i] for i in range(images)]  # (PIL image, label), decoded once
    tf = common.pretrain_transform(data.image_size, data.mean, data.std)
    cpu_views = common.AugmentedViews(pil, common.MultiView([tf, tf]))
    memory = engine.load_into_memory(pil, torch.device("cpu"))
    augment = engine.DeviceAugment(data.image_size, data.mean, data.std)
    seeds = torch.randint(0, 2**62, (images,), generator=torch.Generator().manual_seed(0))
    paths = {"cpu": lambda: [cpu_views[(i, int(seeds[i]))] for i in range(images)],
             "device": lambda: augment.views(memory.images, seeds, 2)}
    times = {path: {"wall": [], "cpu_time": []} for path in paths}
    for window in range(windows + 1):  # window 0 warms up
        for path, run in paths.items():
            wall, cpu = time.perf_counter(), time.thread_time()
            run()
            if window:
                times[path]["wall"].append(1000 * (time.perf_counter() - wall) / images)
                times[path]["cpu_time"].append(1000 * (time.thread_time() - cpu) / images)
    torch.set_num_threads(threads)
    return {path: {kind: statistics.median(values) for kind, values in t.items()} for path, t in times.items()}


def seeding_us_per_sample(calls: int = 2000) -> dict[str, float]:
    """What seeding one sample costs in a loader worker, before (torch.random.fork_rng + manual_seed, which
    also queues lazy seeding of every accelerator backend and formats a stack trace) and after (common.seeded_cpu_rng,
    the CPU generator alone). Microseconds per call, this thread's CPU time, best of 5 rounds."""
    def forked(seed):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)

    def cpu_only(seed):
        with common.seeded_cpu_rng(seed):
            pass

    best = {}
    for name, seed_once in (("fork_rng", forked), ("seeded_cpu_rng", cpu_only)):
        rounds = []
        for _ in range(5):
            tic = time.thread_time()
            for seed in range(calls):
                seed_once(seed)
            rounds.append(1e6 * (time.thread_time() - tic) / calls)
        best[name] = min(rounds)
    return best


def end_to_end_rates(step: Callable, batches: dict, views: list[torch.Tensor], device: torch.device,
                     steps: int, windows: int) -> dict[str, float]:
    """Training images/s with the data path included, for each path, beside the step alone on a fixed batch
    (interleaved windows, so load changes hit all three alike)."""
    def through(batches):
        return lambda i: step(common.to_device(next(batches)[0], device), i)

    variants = {path: through(b) for path, b in batches.items()}
    variants["step only"] = lambda i: step(views, i)
    return time_interleaved(variants, views[0].shape[0], device, steps, warmup=3, windows=windows)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, load {os.getloadavg()[0]:.1f}"


def data_main(argv: list[str]) -> None:
    parser = engine.OneLineErrorParser(
        description="The data path: augmentation ms/image of the PIL and the device path on one thread, "
                    "and training images/s with each path beside the step alone (MoCo v2, moco_ring's model)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--arch", default="small", choices=("small", "resnet18"), help="backbone of the step")
    parser.add_argument("--batch-size", type=int, default=256, help="images per step")
    parser.add_argument("--queue", type=int, default=4096, help="MoCo queue size K")
    parser.add_argument("--data-root", default=str(CIFAR_JPG), help="ImageFolder root (root/train/<class>/*.jpg); "
                                                                   "synthetic pixels when absent")
    parser.add_argument("--workers", type=int, default=2, help="loader processes of the PIL path")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per path")
    parser.add_argument("--windows", type=int, default=5, help="interleaved timing windows (medians)")
    parser.add_argument("--augment-images", type=int, default=256, help="images in the one-thread augment timing")
    parser.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    for flag in ("batch_size", "queue", "steps", "windows", "augment_images", "workers"):
        if getattr(args, flag) < (0 if flag == "workers" else 1):
            parser.error(f"argument --{flag.replace('_', '-')}: must be >= {0 if flag == 'workers' else 1}")
    device = engine.init_distributed()
    torch.backends.cudnn.benchmark = True
    data, source = image_data(args.data_root, 32)
    print(f"data: {data.image_size} px, {source}; {machine(device)}, torch {torch.__version__}")
    augment = augment_ms_per_image(data, args.augment_images, args.windows)
    print("augmentation, two views, one thread, decode excluded (median ms/image: wall | this thread's CPU time):")
    for path, t in augment.items():
        print(f"  {path:<7} {t['wall']:8.4f} | {t['cpu_time']:8.4f}")
    print(f"  device path {augment['cpu']['cpu_time'] / augment['device']['cpu_time']:.1f}x faster (CPU time)")
    seeding = seeding_us_per_sample()
    print(f"per-sample seeding in the PIL path (us per sample, CPU time): torch.random.fork_rng + "
          f"manual_seed {seeding['fork_rng']:.1f}, common.seeded_cpu_rng {seeding['seeded_cpu_rng']:.1f}")
    batches, decode_s = data_loaders(data, args.batch_size, args.workers, device)
    step = moco_v2_step(args.arch, args.batch_size, args.queue, device)
    views = synthetic_views(args.batch_size, data.image_size, device)
    rates = end_to_end_rates(step, batches, views, device, args.steps, args.windows)
    print(f"training, MoCo v2 {args.arch}, batch {args.batch_size}, K {args.queue} (median images/s; PIL path with "
          f"{args.workers} loader workers; the device path decoded the data once in {decode_s:.1f} s):")
    for name, rate in rates.items():
        print(f"  {name:<10} {rate:9.1f}   {rate / rates['step only']:6.1%} of the step alone")
    report = {"augment_ms_per_image": {path: t["cpu_time"] for path, t in augment.items()},
              "augment_wall_ms_per_image": {path: t["wall"] for path, t in augment.items()},
              "end_to_end_images_per_s": {path: rates[path] for path in engine.AUGMENT_CHOICES},
              "step_only_images_per_s": rates["step only"], "seeding_us_per_sample": seeding}
    if device.type == "cuda":
        report["bare_encoder_images_per_s"] = bare_encoder_rate(args.arch, "cifar", views, args.steps)
        print(f"  {'bare encoder fwd+bwd x2 views (ceiling)':<40} {report['bare_encoder_images_per_s']:9.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**report, "machine": machine(device), "data": source, "torch": torch.__version__,
                       "args": vars(args)}, f, indent=2)


def torchrun_smoke(args, out_dir: Path) -> dict:
    """One epoch of moco_ring.py under `torchrun --nproc_per_node=1` (nccl on a GPU, gloo on a CPU)."""
    folder = not args.smoke and Path(args.data_root, "train").is_dir()
    data = ["--dataset", "folder", "--data-root", args.data_root] if folder else ["--dataset", "synthetic"]
    sizes = (["--arch", "small", "--batch-size", "16", "--max-steps", "2", "--image-size", "16", "--knn-bank-size",
              "64", "--knn-test-size", "32", "--workers", "0", "--moco-k", "64", "--bn-splits", "1"] if args.smoke else
             ["--arch", "resnet18", "--batch-size", "256", "--workers", "2"])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               str(Path(__file__).resolve().parent / "moco_ring.py"), *data, *sizes, "--epochs", "1",
               "--out-dir", str(out_dir)]
    tic = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=args.torchrun_timeout)
    metrics = out_dir / "metrics.jsonl"
    last = [json.loads(line) for line in metrics.read_text().splitlines()][-2:] if metrics.is_file() else []
    return {"command": " ".join(command[1:]), "returncode": result.returncode,
            "wall_s": time.perf_counter() - tic, "last_records": last, "stderr_tail": result.stderr[-1500:]}


def gpu_main(argv: list[str]) -> None:
    """Every GPU figure in one run (under 8 minutes on one GPU), written to one JSON."""
    import tempfile

    parser = engine.OneLineErrorParser(
        description="The prepared GPU suite: step ratios Ring/MoCo, AdCo/MoCo, MMCL-INV/SimCLR, CM-ACC "
                    "active/random; MoCo v2 end to end with both data paths against the bare encoder; peak memory; "
                    "a one-epoch torchrun smoke. --smoke: tiny sizes on any device, in seconds (CI)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (small CNN, batch 16, 2 steps), for CI")
    parser.add_argument("--data-root", default=str(CIFAR_JPG), help="CIFAR ImageFolder root; synthetic when absent")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--torchrun-timeout", type=int, default=240, help="seconds allowed to the torchrun smoke")
    parser.add_argument("--json", default="gpu_benchmark.json", help="where to write the figures")
    args = parser.parse_args(argv)
    for flag in ("steps", "torchrun_timeout"):
        if getattr(args, flag) < 1:
            parser.error(f"argument --{flag.replace('_', '-')}: must be >= 1")
    device = engine.init_distributed()
    torch.backends.cudnn.benchmark = True
    tic = time.perf_counter()
    size = argparse.Namespace(arch="small", batch_size=16, image_size=16, queue=64, steps=2) if args.smoke else \
        argparse.Namespace(arch="resnet18", batch_size=256, image_size=32, queue=4096, steps=args.steps)
    report = {"machine": machine(device), "torch": torch.__version__, "smoke": args.smoke, "sizes": vars(size),
              "step_ratios": {}}
    for name, bench in (("Ring/MoCo", bench_ring), ("AdCo/MoCo", bench_adco), ("MMCL-INV/SimCLR", bench_mmcl),
                        ("CM-ACC active/random", bench_acc)):
        rows = bench(size, device)
        report["step_ratios"][name] = {"ratio": rows[1]["images_per_s"] / rows[0]["images_per_s"], "rows": rows}
        print(f"{name:<22} x{report['step_ratios'][name]['ratio']:.3f}   ({time.perf_counter() - tic:.0f} s)")
    data, source = image_data("" if args.smoke else args.data_root, size.image_size)
    report["data"] = source
    batches, decode_s = data_loaders(data, size.batch_size, 0 if args.smoke else 2, device)
    step = moco_v2_step(size.arch, size.batch_size, size.queue, device)
    views = synthetic_views(size.batch_size, data.image_size, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rates = end_to_end_rates(step, batches, views, device, size.steps, 3)
    report["end_to_end_images_per_s"] = {path: rates[path] for path in engine.AUGMENT_CHOICES}
    report["step_only_images_per_s"] = rates["step only"]
    report["decode_into_memory_s"] = decode_s
    report["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    report["bare_encoder_images_per_s"] = bare_encoder_rate(size.arch, "cifar", views, size.steps)
    ceiling = report["bare_encoder_images_per_s"]
    for path in engine.AUGMENT_CHOICES:
        print(f"MoCo v2 end to end, {path:<6} {rates[path]:9.1f} images/s, {rates[path] / ceiling:6.1%} of the bare "
              f"encoder ({ceiling:.1f})")
    with tempfile.TemporaryDirectory() as tmp:
        report["torchrun_smoke"] = torchrun_smoke(args, Path(tmp) / "run")
    print(f"torchrun smoke: exit {report['torchrun_smoke']['returncode']} in {report['torchrun_smoke']['wall_s']:.0f} s")
    report["wall_s"] = time.perf_counter() - tic
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.json} ({report['wall_s']:.0f} s)")


# ---------------------------------------------------------------------------------------------------------------------
# One protocol, every method: `python benchmark.py accuracy`
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    script: str | None  # None: the random-init encoder, nothing trained
    flags: tuple[str, ...] = ()  # what makes it this method; every other hyper-parameter stays the script's default


ACCURACY_METHODS = (
    Method("random init", None),
    Method("SimCLR", "mmcl", ("--loss", "simclr")),
    Method("MMCL-INV", "mmcl", ("--loss", "mmcl", "--solver", "inv")),
    Method("MMCL-PGD", "mmcl", ("--loss", "mmcl", "--solver", "pgd")),
    Method("MoCo v2", "moco_ring", ("--ring-lower", "0", "--ring-upper", "100", "--anneal", "none")),
    Method("MoCoRing", "moco_ring"),
    Method("IRing", "moco_ring", ("--negatives", "bank")),
    Method("AdCo", "adco"),
)
BASELINES = ("MoCo v2", "SimCLR")  # every method's difference to these is printed with its standard error
# Defaults given in epochs for the script's default run length (its --epochs default): the protocol moves each to
# the same fraction of its own, shorter run (scaled_defaults). Every other schedule in the scripts is a function of
# the fraction of the run done (cosine lr) or has no schedule (MMCL's constant Adam lr, AdCo's adversaries).
EPOCH_COUNTED = {"moco_ring": ("anneal_epochs",), "mmcl": ("sigma_milestones",), "adco": ()}


@dataclasses.dataclass(frozen=True)
class AccuracyPreset:
    """One protocol: the same data, encoder, batch, run length and evaluation for every method."""
    dataset: str
    data_root: str
    arch: str
    batch_size: int
    epochs: int
    seeds: int
    workers: int
    max_steps: int = 0  # stop early (plumbing only: the schedules keep --epochs)
    image_size: int = 0  # 0: the dataset's own
    eval_bank_size: int = 0  # the evaluation's kNN bank = the probe's training set, evenly spaced (0: all)
    eval_test_size: int = 0  # test images for kNN and probe (0: all)
    probe_epochs: int = 100  # common.linear_probe (its default: 100 epochs, lr 0.1)
    monitor: tuple[str, ...] = ()  # flags of the scripts' own kNN monitor (their logged curve, not the result)
    augment: str = ""  # --augment for the scripts that have it ("": their default, the device path)
    sizes: dict = dataclasses.field(default_factory=dict)  # quick only: script -> flags that shrink its buffers
    note: str = ""


ACCURACY_PRESETS = {
    # Sized on the 2-core CPU (README, "Comparison under one protocol"): 3 seeds x 7 methods in about 45 minutes on
    # quiet cores, 90 with the cores shared. Batch 128, not 256: MMCL's SVM costs N (2N)^3 per step (INV x0.72 of
    # SimCLR's step rate at batch 128, x0.33 at 256), which would have taken most of the budget.
    "cpu": AccuracyPreset("folder", str(CIFAR_JPG), "small", 128, 2, 3, 2,
                          monitor=("--knn-every", "0", "--knn-bank-size", "2000", "--knn-test-size", "1000"),
                          note="CPU scale: two epochs of the 20,000 CIFAR-10 JPEGs per method and seed"),
    # For CI: checks the plumbing (every method trains, resumes, is evaluated and tabulated), not the ranking.
    "quick": AccuracyPreset("synthetic", "", "small", 32, 1, 1, 0, max_steps=2, image_size=16, eval_bank_size=256,
                            eval_test_size=128, probe_epochs=5,
                            monitor=("--knn-every", "0", "--knn-bank-size", "64", "--knn-test-size", "32"),
                            augment="cpu", sizes={"adco": ("--num-adversaries", "64")},  # no decode of all 4096 images
                            note="plumbing only: 2 steps of batch 32 on synthetic 16 px images, tiny evaluation"),
    # One GPU: ResNet-18 on CIFAR-10 (downloaded into --data-root), the scripts' defaults for 200 epochs.
    "gpu": AccuracyPreset("cifar10", "./data", "resnet18", 256, 200, 3, 4,
                          note="ResNet-18, CIFAR-10, 200 epochs (MoCo's CIFAR demo length) for every method"),
}


def scale_epochs(value: int, default_epochs: int, epochs: int) -> int:
    """An epoch count meant for a run of `default_epochs` epochs, moved to the same fraction of a run of `epochs`
    epochs and rounded to the nearest epoch (halves up): the scaling rule of the protocol, the same for every
    script (the scripts count these in whole epochs)."""
    return math.floor(value * epochs / default_epochs + 0.5)


def scaled_defaults(script: str, epochs: int) -> dict[str, dict]:
    """The flags of `script` whose defaults count epochs, at the protocol's run length: {flag: {'default', 'of',
    'value'}}, the values read from the script's Config so they never drift from it."""
    import importlib

    fields = {f.name: f.default for f in dataclasses.fields(importlib.import_module(script).Config)}
    scaled = {}
    for name in EPOCH_COUNTED[script]:
        default = fields[name]
        if isinstance(default, tuple):  # a list of epochs (mmcl's --sigma-milestones)
            value = tuple(scale_epochs(e, fields["epochs"], epochs) for e in default)
        else:
            value = scale_epochs(default, fields["epochs"], epochs)
        scaled["--" + name.replace("_", "-")] = {"default": default, "of": fields["epochs"], "value": value}
    return scaled


def training_command(method: Method, preset: AccuracyPreset, data_root: str, seed: int, run_dir: Path) -> list[str]:
    """The script's normal command line for one (method, seed) under the protocol."""
    import importlib

    script = Path(__file__).resolve().parent / f"{method.script}.py"
    has_augment = "augment" in {f.name for f in dataclasses.fields(importlib.import_module(method.script).Config)}
    flags = [*method.flags, *preset.sizes.get(method.script, ()),
             *(("--augment", preset.augment) if preset.augment and has_augment else ()),
             "--dataset", preset.dataset, "--arch", preset.arch,
             "--batch-size", str(preset.batch_size), "--epochs", str(preset.epochs), "--seed", str(seed),
             "--workers", str(preset.workers), *preset.monitor]
    if data_root:
        flags += ["--data-root", data_root]
    if preset.image_size:
        flags += ["--image-size", str(preset.image_size)]
    if preset.max_steps:
        flags += ["--max-steps", str(preset.max_steps)]
    for flag, scaled in scaled_defaults(method.script, preset.epochs).items():
        value = scaled["value"]
        flags += [flag, *map(str, value if isinstance(value, tuple) else (value,))]
    return [sys.executable, str(script), *flags, "--out-dir", str(run_dir)]


def summary(runs: list[float]) -> dict:
    """{'mean', 'std' (sample std over seeds; None for one run), 'runs'}."""
    return {"mean": statistics.fmean(runs), "std": statistics.stdev(runs) if len(runs) > 1 else None,
            "runs": runs}


def difference(runs: list[float], baseline: list[float]) -> dict:
    """mean(runs) - mean(baseline) with its standard error sqrt(s1^2/n1 + s2^2/n2) (sample variances over seeds;
    None with fewer than two runs on either side) and whether it exceeds 2 SE."""
    diff = statistics.fmean(runs) - statistics.fmean(baseline)
    if len(runs) < 2 or len(baseline) < 2:
        return {"diff": diff, "se": None, "exceeds_2se": None}
    se = math.sqrt(statistics.variance(runs) / len(runs) + statistics.variance(baseline) / len(baseline))
    return {"diff": diff, "se": se, "exceeds_2se": abs(diff) > 2 * se}


class EvalData:
    """The evaluation's images, decoded once into memory (uint8) and normalized batch by batch: the training split
    is the kNN bank and the probe's training set, the test split is classified. At the dataset's own size the
    eval transform (resize + centre crop to the same size, to tensor, normalize) is exactly this normalization."""

    def __init__(self, data: common.ImageData, bank_size: int, test_size: int, workers: int):
        self.num_classes, self.mean, self.std = data.num_classes, data.mean, data.std
        self.splits = {}
        for name, dataset, size in (("train", data.memory, bank_size), ("test", data.test, test_size)):
            memory = engine.load_into_memory(common.evenly_spaced_subset(dataset, size), torch.device("cpu"),
                                             workers)
            if memory.images.shape[-2:] != (data.image_size, data.image_size):
                common.fail(f"the {name} images are {tuple(memory.images.shape[-2:])} px, the protocol evaluates at "
                            f"the dataset's own size ({data.image_size} px)")
            self.splits[name] = memory

    def batches(self, split: str, device: torch.device, batch_size: int = 512):
        memory = self.splits[split]
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        for images, labels in zip(memory.images.split(batch_size), memory.labels.split(batch_size)):
            yield (images.float() / 255 - mean) / std, labels


def evaluate_backbone(backbone: torch.nn.Module, eval_data: EvalData, probe_epochs: int, seed: int,
                      device: torch.device, k: int = 200, temperature: float = 0.1) -> dict:
    """kNN top-1 (common.knn_predict: k 200, t 0.1, the whole bank) and linear-probe top-1 (common.linear_probe on
    the same pooled, L2-normalized backbone features), in %, as the scripts' kNN monitor and `engine.py probe`."""
    backbone = backbone.to(device)
    train_x, train_y = common.extract_features(backbone, eval_data.batches("train", device), device)
    test_x, test_y = common.extract_features(backbone, eval_data.batches("test", device), device)
    correct = sum((common.knn_predict(x, train_x, train_y, eval_data.num_classes, k, temperature) == y).sum().item()
                  for x, y in zip(test_x.split(1024), test_y.split(1024)))
    common.seed_everything(seed)  # linear_probe's classifier init draws from the global RNG (`seed`: batch order)
    linear = common.linear_probe(train_x, train_y, test_x, test_y, eval_data.num_classes, probe_epochs, seed=seed)
    return {"knn": 100.0 * correct / len(test_y), "linear": linear}


def initial_backbone(preset: AccuracyPreset, stem: str, seed: int) -> torch.nn.Module:
    """The encoder every script starts from with --seed `seed`: the backbone is the first module each one builds
    after common.seed_everything(seed) (BatchNorm layers draw nothing, so SplitBN or not gives the same weights)."""
    common.seed_everything(seed)
    return common.build_backbone(preset.arch, stem)


def trained_backbone(run_dir: Path, last_step: int) -> torch.nn.Module:
    """The backbone of a finished run (what `engine.py probe` reads)."""
    state = engine.load_checkpoint(str(run_dir / "checkpoint.pt"))
    if state["step"] != last_step:
        common.fail(f"{run_dir}: the checkpoint is at step {state['step']}, the protocol trains {last_step} steps")
    cfg = state["config"]
    backbone = common.build_backbone(cfg["arch"], cfg["stem"])
    backbone.load_state_dict(state["backbone"], strict=True)
    return backbone


def training_rate(run_dir: Path) -> float | None:
    """Median training images/s of a run's metrics.jsonl records (data path included; the first record, which
    holds the start-up, left out when there are others)."""
    path = run_dir / "metrics.jsonl"
    rates = [r["images_per_s"] for r in map(json.loads, path.read_text().splitlines()) if "images_per_s" in r] \
        if path.is_file() else []
    return statistics.median(rates[1:] or rates) if rates else None


def same_protocol(protocol: dict) -> dict:
    """What a saved result must share with the present protocol to be read back (not the wording of notes), as
    JSON holds it (a tuple of epochs reads back as a list)."""
    return json.loads(json.dumps({key: protocol[key] for key in ("data", "image_size", "arch", "batch_size", "steps",
                                                                 "scaled_defaults", "evaluation")}))


def slug(name: str) -> str:
    return name.lower().replace(" ", "_").replace("-", "_")


def saved_result(method: Method, seed: int, protocol: dict, out_dir: Path) -> dict | None:
    """The result of a finished (method, seed), OUT/<method>/seed<k>.json, if it is there."""
    result_path = out_dir / slug(method.name) / f"seed{seed}.json"
    if not result_path.is_file():
        return None
    saved = json.loads(result_path.read_text())
    if same_protocol(saved["protocol"]) != same_protocol(protocol):
        common.fail(f"{result_path} was measured under another protocol; pass another --out-dir")
    return saved


def run_one(method: Method, seed: int, preset: AccuracyPreset, protocol: dict, data_root: str, stem: str,
            eval_data: EvalData, out_dir: Path, device: torch.device) -> dict | None:
    """Train (or continue training) and evaluate one (method, seed); the result is saved as
    OUT/<method>/seed<k>.json beside the run directory OUT/<method>/seed<k>/, and read back instead of redoing
    the work when it is there. Returns None when the training script failed (its log says why)."""
    run_dir = out_dir / slug(method.name) / f"seed{seed}"
    result_path = run_dir.with_suffix(".json")
    saved = saved_result(method, seed, protocol, out_dir)
    if saved is not None:
        print(f"{method.name}, seed {seed}: done before ({result_path})", flush=True)
        return saved
    tic = time.perf_counter()
    record = {"method": method.name, "seed": seed, "protocol": protocol}
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    if method.script is None:
        backbone = initial_backbone(preset, stem, seed)
    else:
        command = training_command(method, preset, data_root, seed, run_dir)
        print(f"{method.name}, seed {seed}: training ({' '.join(command[1:])})", flush=True)
        with open(run_dir.with_suffix(".log"), "a") as log:  # the script's own output, kept across re-runs
            returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
        if returncode != 0:
            print(f"{method.name}, seed {seed}: {method.script}.py exited {returncode}, see "
                  f"{run_dir.with_suffix('.log')}", flush=True)
            return None
        config = json.loads((run_dir / "config.json").read_text())["config"]
        record.update(command=" ".join(command[1:]), train_s=time.perf_counter() - tic,
                      images_per_s=training_rate(run_dir),
                      augment=config.get("augment", "cpu (PIL in loader workers; the script has no --augment)"))
        backbone = trained_backbone(run_dir, protocol["steps"])
    tic = time.perf_counter()
    record.update(evaluate_backbone(backbone, eval_data, preset.probe_epochs, seed, device),
                  eval_s=time.perf_counter() - tic)
    engine.atomic_write(result_path, lambda p: p.write_text(json.dumps(record, indent=2) + "\n"))
    print(f"{method.name}, seed {seed}: kNN {record['knn']:.2f}%, linear {record['linear']:.2f}%", flush=True)
    return record


def summarize(records: dict[str, list[dict]]) -> list[dict]:
    """Per method: kNN and linear top-1 over seeds (summary), training images/s (mean over seeds), and the
    differences to each baseline (difference) where both have runs."""
    results = []
    for name, runs in records.items():
        if not runs:
            continue
        rates = [r["images_per_s"] for r in runs if r.get("images_per_s") is not None]
        row = {"method": name, "seeds": [r["seed"] for r in runs],
               **{metric: summary([r[metric] for r in runs]) for metric in ("knn", "linear")},
               "images_per_s": statistics.fmean(rates) if rates else None,
               "augment": sorted({r["augment"] for r in runs if "augment" in r}), "vs": {}}
        for base in BASELINES:
            if records.get(base) and base != name:
                row["vs"][base] = {metric: difference([r[metric] for r in runs], [r[metric] for r in records[base]])
                                   for metric in ("knn", "linear")}
        results.append(row)
    return results


def format_results(results: list[dict]) -> str:
    """The table: mean +- std over seeds, the differences to MoCo v2 and SimCLR +- their SE (* beyond 2 SE)."""
    def value(s):
        return f"{s['mean']:6.2f} +- {s['std']:4.2f}" if s["std"] is not None else f"{s['mean']:6.2f}{'':9}"

    def diff(row, base, metric):
        d = row["vs"].get(base, {}).get(metric)
        if d is None:
            return f"{'-':>6}{'':10}"
        if d["se"] is None:
            return f"{d['diff']:+6.2f}{'':10}"
        return f"{d['diff']:+6.2f} +- {d['se']:4.2f}{'*' if d['exceeds_2se'] else ' '}"

    head = (f"{'method':<12} {'n':>2} {'kNN top-1 %':^15} {'vs MoCo v2':^16} {'vs SimCLR':^16} "
            f"{'linear top-1 %':^15} {'vs MoCo v2':^16} {'vs SimCLR':^16} {'images/s':>9}")
    lines = [head, "-" * len(head)]
    for row in results:
        rate = f"{row['images_per_s']:9.1f}" if row["images_per_s"] is not None else f"{'-':>9}"
        lines.append(f"{row['method']:<12} {len(row['seeds']):>2} {value(row['knn'])} {diff(row, 'MoCo v2', 'knn')} "
                     f"{diff(row, 'SimCLR', 'knn')} {value(row['linear'])} {diff(row, 'MoCo v2', 'linear')} "
                     f"{diff(row, 'SimCLR', 'linear')} {rate}")
    lines.append("mean +- std over seeds; differences +- their standard error sqrt(s1^2/n1 + s2^2/n2); "
                 "* beyond 2 SE")
    return "\n".join(lines)


def save_accuracy_plot(results: list[dict], path: str, title: str) -> None:
    """Bars: mean kNN and linear top-1 per method, error bars one std over seeds, dots the single runs."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed (pip install matplotlib): no plot written to {path}", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(8, 3.4))
    x = torch.arange(len(results)).tolist()
    for offset, metric, label in ((-0.2, "knn", "kNN (k 200)"), (0.2, "linear", "linear probe")):
        means = [r[metric]["mean"] for r in results]
        stds = [r[metric]["std"] or 0.0 for r in results]
        ax.bar([i + offset for i in x], means, 0.4, yerr=stds, capsize=3, label=label, alpha=0.8)
        for i, r in zip(x, results):
            ax.plot([i + offset] * len(r[metric]["runs"]), r[metric]["runs"], "k.", markersize=3)
    ax.set_xticks(x, [r["method"] for r in results], fontsize=8)
    low = min(min(r[m]["runs"]) for r in results for m in ("knn", "linear"))
    ax.set_ylim(max(0.0, low - 5), None)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"plot written to {path}")


def accuracy_main(argv: list[str]) -> None:
    parser = engine.OneLineErrorParser(
        description="Pretrain every method under one protocol (same data, encoder, augmentation, batch "
                    "and number of images seen; each method's hyper-parameters at the script's defaults, epoch "
                    "counts scaled to the run) and evaluate each backbone alike (kNN k 200 t 0.1 and the linear "
                    "probe on the whole train / test splits). Re-running continues: finished (method, seed) pairs "
                    "are read back, interrupted trainings resume.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="cpu", choices=sorted(ACCURACY_PRESETS),
                        help="cpu: the small CNN on the CIFAR-10 JPEGs (~90 min, 2 cores); quick: plumbing (CI); "
                             "gpu: ResNet-18 on CIFAR-10 (hours on one GPU)")
    parser.add_argument("--seeds", type=int, default=0, help="seeds 0..N-1 per method (0: the preset's)")
    parser.add_argument("--methods", nargs="+", default=[m.name for m in ACCURACY_METHODS], metavar="NAME",
                        help="a subset of: " + ", ".join(f"'{m.name}'" for m in ACCURACY_METHODS))
    parser.add_argument("--data-root", default="", help="override the preset's data root")
    parser.add_argument("--out-dir", default="", help="run directories and per-run results (default "
                                                      "runs/accuracy/<preset>)")
    parser.add_argument("--json", default="", help="write the protocol and the results here (after every run)")
    parser.add_argument("--plot", default="", help="write a bar plot (PNG) here at the end")
    parser.add_argument("--report-only", action="store_true",
                        help="tabulate the runs finished so far (and write --json, --plot); train nothing")
    args = parser.parse_args(argv)
    if args.seeds < 0:
        parser.error(f"argument --seeds: {args.seeds} is out of range (must be >= 0)")
    known = {m.name: m for m in ACCURACY_METHODS}
    unknown = [name for name in args.methods if name not in known]
    if unknown:
        parser.error(f"argument --methods: unknown {', '.join(unknown)} (choose from {', '.join(known)})")
    preset = ACCURACY_PRESETS[args.preset]
    seeds = args.seeds or preset.seeds
    data_root = args.data_root or preset.data_root
    out_dir = Path(args.out_dir or f"runs/accuracy/{args.preset}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    data = common.load_image_data(preset.dataset, data_root, preset.image_size)
    stem = "cifar" if data.image_size < 100 else "imagenet"  # the scripts' --stem auto
    steps_per_epoch = len(data.pretrain) // preset.batch_size
    steps = min(preset.max_steps or math.inf, preset.epochs * steps_per_epoch)
    protocol = {
        "preset": args.preset, "note": preset.note,
        "data": f"{preset.dataset} {data_root}".strip(), "train_images": len(data.pretrain),
        "test_images": len(data.test), "image_size": data.image_size, "arch": preset.arch,
        "batch_size": preset.batch_size, "epochs": preset.epochs, "steps": steps,
        "images_seen": steps * preset.batch_size, "workers": preset.workers,
        "augmentation": "MoCo v2 / SimCLR recipe (common.pretrain_transform, or engine.DeviceAugment where the "
                        "script has --augment device: the same distribution); one view per image for IRing",
        "scaled_defaults": {script: scaled_defaults(script, preset.epochs) for script in EPOCH_COUNTED},
        "scaling_rule": "a default counted in epochs of the script's default run (--epochs default) is moved to "
                        "the same fraction of this run, rounded to the nearest epoch (halves up)",
        "evaluation": {"knn": {"k": 200, "t": 0.1}, "linear_probe": {"epochs": preset.probe_epochs, "lr": 0.1},
                       "features": "pooled backbone output, L2-normalized (common.extract_features), eval mode",
                       "train_images": preset.eval_bank_size or len(data.memory),
                       "test_images": preset.eval_test_size or len(data.test)},
        "methods": {m.name: (f"{m.script}.py {' '.join(m.flags)}".strip() if m.script else
                             "the seed's initial encoder, untrained") for m in ACCURACY_METHODS},
        "torch": torch.__version__,
    }
    print(f"protocol {args.preset}: {protocol['data']}, {preset.arch}, batch {preset.batch_size}, {steps} steps "
          f"({protocol['images_seen']} images seen) per method and seed, {seeds} seed(s); {machine(device)}",
          flush=True)
    eval_data = None if args.report_only else EvalData(data, preset.eval_bank_size, preset.eval_test_size,
                                                       preset.workers)
    records = {name: [] for name in args.methods}
    failed, missing = [], []

    def write_json():
        if args.json:
            done = [r for runs in records.values() for r in runs]
            report = {"protocol": protocol, "results": summarize(records), "failed": failed, "missing": missing,
                      "machine": machine(device), "wall_s": time.perf_counter() - start,
                      "run_s": sum(r.get("train_s", 0.0) + r["eval_s"] for r in done)}
            engine.atomic_write(Path(args.json), lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))

    for seed in range(seeds):  # seed by seed: an interrupted preset has every method at the seeds it finished
        for name in args.methods:
            if args.report_only:
                record = saved_result(known[name], seed, protocol, out_dir)
                if record is None:
                    missing.append(f"{name} seed {seed}")
                    continue
            else:
                record = run_one(known[name], seed, preset, protocol, data_root, stem, eval_data, out_dir, device)
            if record is None:
                failed.append(f"{name} seed {seed}")
            else:
                records[name].append(record)
            write_json()
    results = summarize(records)
    print(format_results(results))
    if missing:
        print(f"not finished yet: {', '.join(missing)}")
    wall_s = time.perf_counter() - start
    print(f"wall time {wall_s:.0f} s on {machine(device)}, torch {torch.__version__}")
    write_json()
    if args.plot and results:
        save_accuracy_plot(results, args.plot, f"{preset.arch}, {protocol['data'].split('/')[-1]}, "
                                               f"{protocol['images_seen']} images seen, {seeds} seed(s)")
    if failed:
        common.fail(f"{len(failed)} run(s) failed ({', '.join(failed)}): their logs are in {out_dir}; re-run the "
                    "same command to retry them")


BENCHMARKS = {"ring": bench_ring, "mmcl": bench_mmcl, "adco": bench_adco, "acc": bench_acc}
COMMANDS = {"data": data_main, "gpu": gpu_main, "accuracy": accuracy_main}  # their own flags and output


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    parser = engine.OneLineErrorParser(description=__doc__.split("\n\n")[0],
                                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("method", choices=sorted(BENCHMARKS), help="which method to time against its baseline")
    parser.add_argument("--arch", default="small", choices=("small", "resnet18", "resnet50"), help="backbone")
    parser.add_argument("--batch-size", type=int, default=256, help="images per step")
    parser.add_argument("--image-size", type=int, default=32, help="synthetic image side in pixels")
    parser.add_argument("--queue", type=int, default=4096, help="queue / bank size K where the method has one")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant (after 5 warm-up steps)")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    device = engine.init_distributed()
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
