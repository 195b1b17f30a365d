"""Step-throughput benchmarks: each method's training step beside its baseline, in one run, on the same batch.

    python benchmark.py ring                 # MoCoRing vs MoCo v2 (+ bare encoder fwd+bwd on a GPU)
    python benchmark.py ring --arch resnet18 --batch-size 256 --steps 50
    python benchmark.py data                 # the data path: PIL vs device augmentation, end to end (issue 13)
    python benchmark.py gpu                  # every GPU figure of issue 13 in one run (--smoke: CPU, seconds)

Synthetic fixed batch (no data loading), warm-up steps first, then the median of several timed windows; prints
images/s per variant and the ratio to the baseline. A measurement, never an assertion: the figures quoted in
README.md name the command and the machine they came from.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
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
    iterations (issue 12), for the first `anchors` anchors of one batch of N = --batch-size images: n = 2N-2
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
                row["pgd_iters"] = last[name]["pgd_iters"]
                label += f", {row['pgd_iters']:.0f} it"
            row["variant"] = f"{name} ({label})"
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# The data path (issue 13): `python benchmark.py data` and the prepared GPU suite `python benchmark.py gpu`
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
    samplers = {path: common.EpochSampler(len(data.pretrain), batch_size, seed=0) for path in common.AUGMENT_CHOICES}
    cpu = common.make_loader(common.AugmentedViews(data.pretrain, common.MultiView([tf, tf])), batch_size, workers,
                             device, samplers["cpu"])
    tic = time.perf_counter()
    memory = common.load_into_memory(data.pretrain, device, workers)
    decode_s = time.perf_counter() - tic
    on_device = common.DeviceViewLoader(memory, common.DeviceAugment(data.image_size, data.mean, data.std), 2,
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
    memory = common.load_into_memory(pil, torch.device("cpu"))
    augment = common.DeviceAugment(data.image_size, data.mean, data.std)
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
    """Issue 17: what seeding one sample costs in a loader worker, before (torch.random.fork_rng + manual_seed, which
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
    parser = common.OneLineErrorParser(
        description="The data path (issue 13): augmentation ms/image of the PIL and the device path on one thread, "
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
    device = common.init_distributed()
    torch.backends.cudnn.benchmark = True
    data, source = image_data(args.data_root, 32)
    print(f"data: {data.image_size} px, {source}; {machine(device)}, torch {torch.__version__}")
    augment = augment_ms_per_image(data, args.augment_images, args.windows)
    print("augmentation, two views, one thread, decode excluded (median ms/image: wall | this thread's CPU time):")
    for path, t in augment.items():
        print(f"  {path:<7} {t['wall']:8.4f} | {t['cpu_time']:8.4f}")
    print(f"  device path {augment['cpu']['cpu_time'] / augment['device']['cpu_time']:.1f}x faster (CPU time)")
    seeding = seeding_us_per_sample()
    print(f"per-sample seeding in the PIL path (issue 17, us per sample, CPU time): torch.random.fork_rng + "
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
              "end_to_end_images_per_s": {path: rates[path] for path in common.AUGMENT_CHOICES},
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
    """Every GPU figure of issue 13 item 6 in one run (under 8 minutes on one GPU), written to one JSON."""
    import tempfile

    parser = common.OneLineErrorParser(
        description="The prepared GPU suite (issue 13): step ratios Ring/MoCo, AdCo/MoCo, MMCL-INV/SimCLR, CM-ACC "
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
    device = common.init_distributed()
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
    report["end_to_end_images_per_s"] = {path: rates[path] for path in common.AUGMENT_CHOICES}
    report["step_only_images_per_s"] = rates["step only"]
    report["decode_into_memory_s"] = decode_s
    report["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    report["bare_encoder_images_per_s"] = bare_encoder_rate(size.arch, "cifar", views, size.steps)
    ceiling = report["bare_encoder_images_per_s"]
    for path in common.AUGMENT_CHOICES:
        print(f"MoCo v2 end to end, {path:<6} {rates[path]:9.1f} images/s, {rates[path] / ceiling:6.1%} of the bare "
              f"encoder ({ceiling:.1f})")
    with tempfile.TemporaryDirectory() as tmp:
        report["torchrun_smoke"] = torchrun_smoke(args, Path(tmp) / "run")
    print(f"torchrun smoke: exit {report['torchrun_smoke']['returncode']} in {report['torchrun_smoke']['wall_s']:.0f} s")
    report["wall_s"] = time.perf_counter() - tic
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.json} ({report['wall_s']:.0f} s)")


BENCHMARKS = {"ring": bench_ring, "mmcl": bench_mmcl, "adco": bench_adco, "acc": bench_acc}
COMMANDS = {"data": data_main, "gpu": gpu_main}  # their own flags and output


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
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
