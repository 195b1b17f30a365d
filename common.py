"""What the method scripts share: config, distributed helpers, encoders, queue, momentum update, augmentations,
datasets, kNN / linear-probe evaluation, run directory and checkpoints, and two commands on finished runs.

Every method script (moco_ring.py, adco.py, mmcl.py, moco_acc.py) keeps its own paper's algorithm, loss and
training loop; this module is the toolbox under them. Nothing heavy happens at import.

Linear probe on any saved checkpoint (frozen backbone, features cached once, logistic regression on top):
    python common.py probe runs/moco_ring/checkpoint.pt --epochs 100
Curves of any runs, one line per run (needs matplotlib, which training does not):
    python common.py plot runs/moco_ring runs/adco --out curves.png
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence, get_args, get_origin, get_type_hints

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

CHECKPOINT_FORMAT = "negsampling-checkpoint-v1"


def fail(message: str) -> None:
    """Stop with one clear line on stderr and exit code 1 (bad input, impossible sizes, NaN loss...)."""
    progress = sys.modules.get("tqdm")
    if progress is not None:  # close the open progress bars first, or the last one is printed after the error
        for bar in list(getattr(progress.tqdm, "_instances", ())):
            bar.close()
    raise SystemExit(f"error: {message}")


class DataError(Exception):
    """An input file that cannot be read (a bad image, a broken npz). Raised where the file is read, possibly in a
    loader worker; `run_main` turns it into one error line naming the file."""


def run_main(main: Callable[[], Any]) -> None:
    """A script's entry point: run `main`, turn a DataError (re-raised by the DataLoader with the worker's traceback
    folded into its message) into one error line, and leave the process group cleanly."""
    try:
        main()
    except DataError as e:
        last_line = str(e).strip().splitlines()[-1]
        fail(last_line.split("DataError: ", 1)[-1])
    shutdown_distributed()


# ---------------------------------------------------------------------------------------------------------------------
# Config: one typed dataclass per script; its fields become the argparse flags
# ---------------------------------------------------------------------------------------------------------------------
class Check(NamedTuple):
    """What a valid value of a flag is: `accepts(value)` and the rule in words, for the help and the error line."""
    accepts: Callable[[Any], bool]
    rule: str


def _number_check(test: Callable[[float], bool], rule: str, allow_inf: bool) -> Check:
    # NaN fails every comparison, so it is refused by construction; inf only where a flag gives it a meaning.
    return Check(lambda v: not math.isnan(v) and (allow_inf or not math.isinf(v)) and test(v), rule)


def at_least(low: float, allow_inf: bool = False) -> Check:
    return _number_check(lambda v: v >= low, f">= {low}", allow_inf)


def greater_than(low: float, allow_inf: bool = False) -> Check:
    return _number_check(lambda v: v > low, f"> {low}", allow_inf)


def between(low: float, high: float, include_high: bool = True) -> Check:
    """low <= value <= high, or low <= value < high with include_high=False (a momentum must stay below 1)."""
    if include_high:
        return _number_check(lambda v: low <= v <= high, f"in [{low}, {high}]", False)
    return _number_check(lambda v: low <= v < high, f"in [{low}, {high})", False)


def each(check: Check) -> Check:
    """For tuple flags: every item must pass `check`."""
    return Check(lambda values: all(check.accepts(v) for v in values), f"each {check.rule}")


POSITIVE = greater_than(0)
NON_NEGATIVE = at_least(0)


def option(default: Any, help: str, choices: Sequence[Any] | None = None, check: Check | None = None) -> Any:
    """A config field whose default, help text and valid range live in one place (the help shows the default and
    the rule; `parse_config` refuses a value outside it with one error line, before anything is touched)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "check": check})


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one error line (not the whole usage block) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def parse_config(config_class: type, argv: Sequence[str] | None = None, description: str | None = None):
    """Turn a config dataclass into argparse flags (`batch_size` -> `--batch-size`), parse, return an instance.

    Unknown flags and wrong types are rejected by argparse; booleans get `--flag / --no-flag`; a value outside its
    field's `check` is rejected the same way (exit 2, one line), before any file or process group is touched.
    """
    parser = OneLineErrorParser(description=(description or "").split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        flag = "--" + field.name.replace("_", "-")
        kind, help, choices = hints[field.name], field.metadata["help"], field.metadata.get("choices")
        check = field.metadata.get("check")
        if check is not None:
            help = f"{help} ({check.rule})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, help=help)
        elif get_origin(kind) is tuple:  # tuple[float, ...]: `--flag 1 2 3`
            item = get_args(kind)[0]
            parser.add_argument(flag, type=item, nargs="*", default=field.default, help=help, choices=choices,
                                metavar=item.__name__.upper())
        else:
            parser.add_argument(flag, type=kind, default=field.default, help=help, choices=choices,
                                metavar=None if choices else kind.__name__.upper())
    values = {name: tuple(v) if isinstance(v, list) else v for name, v in vars(parser.parse_args(argv)).items()}
    for field in dataclasses.fields(config_class):
        check = field.metadata.get("check")
        if check is not None and not check.accepts(values[field.name]):
            value = " ".join(map(str, values[field.name])) if isinstance(values[field.name], tuple) else values[field.name]
            parser.error(f"argument --{field.name.replace('_', '-')}: {value} is out of range (must be {check.rule})")
    if "resume" in values and "out_dir" in values:
        # The flags typed on this command line (not their defaults): those are what a resumed run must match.
        typed = {token.split("=", 1)[0] for token in (sys.argv[1:] if argv is None else argv)}
        given = {action.dest: values[action.dest] for action in parser._actions
                 if action.dest in values and typed.intersection(action.option_strings)}
        values = continue_run(values, given)
    return config_class(**values)


def continue_run(values: dict, given: dict) -> dict:
    """Resume by re-running (as DINO does: the run directory is the identity). The checkpoint is --resume's (a
    checkpoint.pt or a run directory), else the one already in --out-dir; without either this is a fresh run.
    Flags not given come from the checkpoint's config; given ones must agree with it, except those that do not
    change the trajectory (RESUME_MAY_CHANGE, and the same data folder spelled differently)."""
    if values["resume"]:
        path = Path(values["resume"])
        path = path / "checkpoint.pt" if path.is_dir() else path
    else:
        path = Path(values["out_dir"]) / "checkpoint.pt"
        if not path.is_file():
            return values  # a fresh run (a directory without a checkpoint holds no run to continue)
    saved = load_checkpoint(str(path))["config"]
    different = sorted(name for name, value in given.items()
                       if name in saved and not same_setting(name, value, saved[name]))
    if different:
        diffs = ", ".join(f"--{name.replace('_', '-')} {saved[name]!r} -> {given[name]!r}" for name in different)
        fail(f"{path} was trained with other settings ({diffs}); to start a new run, pass another --out-dir")
    resumed = {**values, **{name: value for name, value in saved.items() if name in values and name not in given}}
    return {**resumed, "resume": str(path)}


# ---------------------------------------------------------------------------------------------------------------------
# Distributed: torchrun's environment decides; a world of one otherwise, where every gather is the identity
# ---------------------------------------------------------------------------------------------------------------------
def init_distributed() -> torch.device:
    """Join the process group torchrun describes (RANK, LOCAL_RANK, WORLD_SIZE) and return this process's device.

    nccl on GPUs, gloo on CPUs. Each rank takes GPU LOCAL_RANK (the original MoCo put every rank on GPU 0).
    """
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    # The scripts pass DistributedDataParallel(broadcast_buffers=False): torch 2.14 calls that deprecated in favour
    # of `forward_sync_buffers`, which torch 2.11 lacks. Both versions must run, so I keep the old spelling.
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.* is deprecated", category=FutureWarning)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30))
    return device


def shutdown_distributed() -> None:
    """Leave the process group cleanly at the end of a script: wait for every rank (rank 0 may still be writing the
    checkpoint), then destroy the group, so no rank exits while another still talks to it. No-op alone."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """The one gate for printing, logging and saving."""
    return rank() == 0


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (BxD on each rank) from all ranks in rank order: (world*B)xD. No gradient flows back."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        # Every rank's loss used every rank's rows, so the gradient for my rows is the sum over ranks of
        # d loss_r / d rows: all-reduce the full gradient, then keep my slice. (DDP then averages over ranks,
        # which makes the result the gradient of the mean of the ranks' losses, as with one big batch.)
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(world_size())[rank()]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Like `concat_all_gather`, but gradients flow back to every rank's rows (for in-batch negatives)."""
    return x if world_size() == 1 else _GatherWithGrad.apply(x)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (for logging and for averaging a hand-made gradient); identity alone."""
    if world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= world_size()
    return x


@torch.no_grad()
def encode_with_shuffled_bn(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Key-encoder forward with Shuffle BN (MoCo, Sec. 3.3): BatchNorm of the keys sees another sub-batch than
    the queries, so the model cannot cheat on batch statistics. x: BxCxHxW on each rank -> BxD keys, in x's order.

    Under DDP the global batch is permuted (one permutation drawn on rank 0 and broadcast) and each rank encodes
    its slice of it. Alone, the batch is permuted locally and SplitBatchNorm's groups play the GPUs.
    """
    if world_size() == 1:
        perm = torch.randperm(x.shape[0], device=x.device)
        return encoder(x[perm])[perm.argsort()]
    x_all = concat_all_gather(x)  # x_all: (world*B)x...
    perm = torch.randperm(x_all.shape[0], device=x.device)
    dist.broadcast(perm, src=0)
    mine = perm.view(world_size(), -1)[rank()]  # indices of the global batch this rank encodes
    k_all = concat_all_gather(encoder(x_all[mine]))  # k_all: (world*B)xD, in permuted order
    return k_all[perm.argsort()].view(world_size(), x.shape[0], -1)[rank()]


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics are computed over `num_splits` groups of the batch, as if each group
    were on its own GPU (MoCo's CIFAR demo). Same parameters and buffers as BatchNorm2d, so state_dicts match.
    Any input of shape N x C x ... works (1-D audio, 2-D images, 3-D video), so it replaces BatchNorm1d/2d/3d."""

    def __init__(self, num_features: int, num_splits: int = 1, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an N x C x ... input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        n, c, rest, s = x.shape[0], x.shape[1], x.shape[2:], self.num_splits
        # Fold the groups into channels so each (group, channel) pair gets its own mean and variance. Group g is
        # the contiguous rows [g*n/s, (g+1)*n/s), exactly the slice rank g would hold under DDP (MoCo's demo
        # interleaves rows instead), so one device with s splits computes what s processes compute.
        grouped = x.reshape(s, n // s, c, *rest).transpose(0, 1).reshape(n // s, s * c, *rest)
        running_mean, running_var = self.running_mean.repeat(s), self.running_var.repeat(s)
        out = F.batch_norm(grouped, running_mean, running_var, self.weight.repeat(s), self.bias.repeat(s),
                           True, self.momentum, self.eps)
        self.running_mean.copy_(running_mean.view(s, c).mean(0))
        self.running_var.copy_(running_var.view(s, c).mean(0))
        return out.reshape(n // s, s, c, *rest).transpose(0, 1).reshape(x.shape)


# ---------------------------------------------------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    """A four-block CNN (about 0.3 M parameters) for CPU runs and tests; 128-d features."""

    def __init__(self, norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d):
        super().__init__()
        layers, width_in = [], 3
        for width in (32, 64, 128, 128):
            layers += [nn.Conv2d(width_in, width, 3, padding=1, bias=False), norm_layer(width), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            width_in = width
        self.features = nn.Sequential(*layers[:-1], nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = 128

    def forward(self, x):
        return self.features(x)


def cifar_stem(resnet: nn.Module) -> nn.Module:
    """Replace ResNet's 7x7/2 stem and max-pool by a 3x3/1 conv (for 32-96 px images, as in MoCo's CIFAR demo).
    Apply it to `torchvision.models.resnet18()` too before loading a backbone saved with this stem."""
    resnet.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    resnet.maxpool = nn.Identity()
    return resnet


def build_backbone(arch: str, stem: str, bn_splits: int = 1) -> nn.Module:
    """torchvision ResNet-18/50 (fc removed: its state_dict loads strictly into `torchvision.models.resnetXX()`
    once `fc` is dropped and, for stem='cifar', `cifar_stem` applied) or the small CNN. `.out_dim` = feature size."""
    import torchvision

    norm = (lambda c: SplitBatchNorm(c, bn_splits)) if bn_splits > 1 else nn.BatchNorm2d
    if arch == "small":
        return SmallCNN(norm)
    net = getattr(torchvision.models, arch)(norm_layer=norm)
    if stem == "cifar":
        cifar_stem(net)
    net.out_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


def projection_head(in_dim: int, out_dim: int, mlp: bool = True) -> nn.Module:
    """MoCo v2 / SimCLR head: Linear-ReLU-Linear (mlp) or a single Linear (MoCo v1)."""
    if not mlp:
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))


class Encoder(nn.Module):
    """backbone (what is evaluated and exported) + projection head (what the contrastive loss sees)."""

    def __init__(self, arch: str, stem: str, dim: int, mlp: bool, bn_splits: int = 1):
        super().__init__()
        self.backbone = build_backbone(arch, stem, bn_splits)
        self.head = projection_head(self.backbone.out_dim, dim, mlp)

    def forward(self, x):
        return self.head(self.backbone(x))


@torch.no_grad()
def momentum_update(key_encoder: nn.Module, query_encoder: nn.Module, m: float) -> None:
    """theta_k <- m theta_k + (1 - m) theta_q (MoCo Eq. 2), parameters only: BN buffers stay the key encoder's."""
    key_params = [p for p in key_encoder.parameters()]
    query_params = [p.detach() for p in query_encoder.parameters()]
    torch._foreach_lerp_(key_params, query_params, 1.0 - m)  # one fused kernel per dtype instead of one per tensor


class Queue(nn.Module):
    """FIFO dictionary of K keys (MoCo). `keys: KxC`, rows are keys; buffers, so they move with `.to()` and are
    saved in the state_dict. Any batch size works: writes wrap around the end and a batch larger than K keeps its
    last K rows, so nothing crashes and no slot is written twice in one step."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))  # keys: KxC
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write keys (BxC, normalized) at the pointer and advance it: the B oldest entries leave."""
        size = self.keys.shape[0]
        keys = keys[-size:]
        slots = (self.ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.keys[slots] = keys.to(self.keys.dtype)
        self.ptr.copy_((self.ptr + keys.shape[0]) % size)


# ---------------------------------------------------------------------------------------------------------------------
# Augmentations (MoCo v2 / SimCLR recipe)
# ---------------------------------------------------------------------------------------------------------------------
def pretrain_transform(image_size: int, mean: Sequence[float], std: Sequence[float], min_scale: float = 0.2):
    """Random resized crop, colour jitter (p=0.8), grayscale (p=0.2), Gaussian blur from 64 px up (SimCLR drops
    it on CIFAR-sized images), horizontal flip."""
    from torchvision import transforms as T

    steps = [T.RandomResizedCrop(image_size, scale=(min_scale, 1.0)),
             T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
             T.RandomGrayscale(p=0.2)]
    if image_size >= 64:
        kernel = int(0.1 * image_size) // 2 * 2 + 1  # SimCLR: 10% of the image side, odd
        steps.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5))
    steps += [T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]):
    from torchvision import transforms as T

    return T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.ToTensor(), T.Normalize(mean, std)])


class MultiView:
    """Apply each transform to the same image: `MultiView([t, t])` is the two-crop of MoCo/SimCLR; give it
    several transforms for multi-crop."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image):
        return [t(image) for t in self.transforms]


# ---------------------------------------------------------------------------------------------------------------------
# Device augmentation and in-memory datasets (issue 13): the MoCo v2 / SimCLR recipe of `pretrain_transform`,
# applied to a uint8 batch on the training device, every sample with parameters drawn from its own seed
# ---------------------------------------------------------------------------------------------------------------------
# Why not kornia: it draws a batch's parameters from the global generator as one tensor, so a sample's crop would
# depend on its batch position and on the RNG state (exact resume and 1 == N processes would need a wrapper around
# every sampler), and it would be a run-time dependency for about 200 lines. The ops below are torchvision's own
# formulas; tests/test_augment.py checks them op by op against torchvision.transforms.functional.
AUGMENT_CHOICES = ("device", "cpu")
_UNIFORMS_PER_VIEW = 64  # counters reserved per view in a sample's random stream (53 used)
_CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop.get_params tries 10 boxes, then falls back to a centre crop


def _splitmix64(x):
    """The splitmix64 finaliser on a numpy uint64 array (wraps modulo 2^64 by definition, on every CPU)."""
    import numpy as np

    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def seeded_uniforms(seeds: torch.Tensor, count: int, stream: int = 0) -> torch.Tensor:
    """`count` uniforms in [0, 1) per seed: N seeds -> Nxcount float64. Counter-based (splitmix64 of the mixed seed
    plus the counter), so row i is a pure function of seeds[i], the stream and the counter: it never depends on
    the batch it sits in, the batch size, the device or any generator state. `stream` separates the views."""
    import numpy as np

    mixed = _splitmix64(seeds.cpu().numpy().astype(np.uint64)[:, None] + np.uint64(0x9E3779B97F4A7C15))
    counters = np.arange(stream * count + 1, (stream + 1) * count + 1, dtype=np.uint64)[None, :]
    bits = _splitmix64(mixed + counters * np.uint64(0x9E3779B97F4A7C15))
    return torch.from_numpy((bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53)  # 53 random bits, as torch


class ViewParams(NamedTuple):
    """One view's parameters for N samples (CPU tensors), what torchvision's transforms would draw for each sample:
    crop box (top, left, height, width: RandomResizedCrop.get_params), jitter applied (RandomApply p=0.8), the
    order of brightness/contrast/saturation/hue (ColorJitter.get_params' randperm: Nx4 op ids) and their factors
    (Nx4: b, c, s in [0.6, 1.4], h in [-0.1, 0.1]), grayscale (p=0.2), blur applied (p=0.5) and its sigma, flip."""
    top: torch.Tensor
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    jitter: torch.Tensor
    order: torch.Tensor
    factors: torch.Tensor
    grayscale: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    flip: torch.Tensor


class DeviceAugment:
    """`pretrain_transform` on a batch: random resized crop (scale (min_scale, 1), ratio (3/4, 4/3), bilinear with
    torchvision's antialias), colour jitter 0.4/0.4/0.4/0.1 in a random order with p=0.8, grayscale p=0.2, Gaussian
    blur (kernel 10% of the side, sigma in (0.1, 2), p=0.5) from 64 px up, horizontal flip, normalisation.

    `augment(images, seeds, view)`: images NxCxHxW uint8 on any device (all one size), seeds N int64 (the
    EpochSampler's) -> NxCxSxS float32, S = image_size. Sample i's parameters are `seeded_uniforms(seeds[i], ..,
    stream=view)`: a pure function of its seed, hence exact resume and 1-process == N-process parity."""

    CPU_CHUNK = 128  # images per slice on a CPU: measured fastest; 64 or 96 ~1.1x slower, 256 ~1.3x

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], min_scale: float = 0.2):
        self.size, self.min_scale = image_size, min_scale
        self.mean, self.std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
        self.blur_kernel = int(0.1 * image_size) // 2 * 2 + 1 if image_size >= 64 else 0  # as pretrain_transform

    def __call__(self, images: torch.Tensor, seeds: torch.Tensor, view: int = 0) -> torch.Tensor:
        params = self.params(seeds, images.shape[-2], images.shape[-1], view)
        if images.device.type != "cpu":
            return self.apply(images, params)
        # On a CPU: one thread, as the ~100 small ops gain nothing from more and lose much at each op's barrier
        # when the cores are busy (measured end to end: 15 images/s with 2 threads against 51 for the step alone);
        # slices of CPU_CHUNK images keep the intermediates in the cache, each written straight into its rows of
        # the result. Each sample's result is the same either way.
        out = torch.empty(images.shape[0], images.shape[1], self.size, self.size)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for start in range(0, images.shape[0], self.CPU_CHUNK):
                rows = slice(start, start + self.CPU_CHUNK)
                self.apply(images[rows], ViewParams(*(t[rows] for t in params)), out=out[rows])
        finally:
            torch.set_num_threads(threads)
        return out

    def views(self, images: torch.Tensor, seeds: torch.Tensor, num_views: int) -> list[torch.Tensor]:
        return [self(images, seeds, view) for view in range(num_views)]

    def params(self, seeds: torch.Tensor, height: int, width: int, view: int = 0) -> ViewParams:
        u = seeded_uniforms(seeds, _UNIFORMS_PER_VIEW, stream=view)  # u: Nx64, one column per draw
        a = _CROP_ATTEMPTS
        # RandomResizedCrop.get_params, its 10 attempts at once: area fraction ~ U(scale), log-ratio ~ U(log ratio),
        # the first attempt whose box fits wins; none fits: the centre crop clamped to the ratio range.
        area = height * width * (self.min_scale + (1.0 - self.min_scale) * u[:, 0:a])  # Nx10
        log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[:, a:2 * a]
        w = torch.sqrt(area * torch.exp(log_ratio)).round()  # round half to even, as Python's round()
        h = torch.sqrt(area / torch.exp(log_ratio)).round()
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = fits.to(torch.uint8).argmax(1, keepdim=True)  # first fitting attempt (0 where none fits)
        h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
        top = (u[:, 2 * a] * (height - h + 1)).floor()  # torch.randint(0, height - h + 1)
        left = (u[:, 2 * a + 1] * (width - w + 1)).floor()
        none_fit = ~fits.any(1)
        if none_fit.any():
            in_ratio = width / height
            fh, fw = ((round(width / (3 / 4)), width) if in_ratio < 3 / 4 else
                      (height, round(height * 4 / 3)) if in_ratio > 4 / 3 else (height, width))
            h[none_fit], w[none_fit] = float(fh), float(fw)
            top[none_fit], left[none_fit] = float((height - fh) // 2), float((width - fw) // 2)
        b = 2 * a + 2  # 22 columns used so far
        factors = torch.stack([0.6 + 0.8 * u[:, b + 5], 0.6 + 0.8 * u[:, b + 6], 0.6 + 0.8 * u[:, b + 7],
                               -0.1 + 0.2 * u[:, b + 8]], dim=1)  # ColorJitter(0.4, 0.4, 0.4, 0.1).get_params
        return ViewParams(top.long(), left.long(), h.long(), w.long(), jitter=u[:, b] < 0.8,
                          order=u[:, b + 1:b + 5].argsort(1),  # a uniformly random permutation of the 4 ops
                          factors=factors.float(), grayscale=u[:, b + 9] < 0.2,
                          blur=(u[:, b + 10] < 0.5) & (self.blur_kernel > 0),
                          sigma=(0.1 + 1.9 * u[:, b + 11]).float(), flip=u[:, b + 12] < 0.5)

    def apply(self, images: torch.Tensor, p: ViewParams, out: torch.Tensor | None = None) -> torch.Tensor:
        """The view of each image for the given parameters: crop + resize + flip, jitter, grayscale, blur, normalise
        (into `out` when given)."""
        device, (height, width) = images.device, images.shape[-2:]
        # The rows to blur and to hue are read from the parameters as drawn, on the CPU: a GPU is never waited for
        # (nonzero() on a device tensor would wait for everything queued before it, the training step included).
        drawn, blurred = p, p.blur.nonzero().squeeze(1)
        p = ViewParams(*(t.to(device, non_blocking=True) for t in p))
        if height <= self.size and width <= self.size and self.size & (self.size - 1) == 0:  # e.g. CIFAR at 32 px
            x = crop_enlarge(images, p, self.size).div_(255.0)  # x: NxCxSxS in [0, 1]
        else:  # some crops shrink (the antialiased filter), or S is no power of two (see crop_enlarge)
            rows = resize_matrix(p.top, p.height, height, self.size).div_(255.0)  # NxSxH, ToTensor's /255 folded in
            cols = resize_matrix(p.left, p.width, width, self.size, p.flip)  # NxSxW, mirrored where flipped
            x = crop_resize(images, rows, cols)
        color_jitter(x, drawn.jitter, drawn.order, drawn.factors)
        if len(blurred):  # before the grayscale (pretrain_transform blurs after it): both are linear and the blur
            # treats every channel alike, so they commute up to float rounding; the grayscale then joins Normalize
            blurred = blurred.to(device, non_blocking=True)
            x[blurred] = gaussian_blur(x[blurred], self.blur_kernel, p.sigma[blurred])
        # Flipping last (pretrain_transform's order) or first gives the same image: the colour ops act per pixel
        # and the blur is symmetric with reflect padding, so the flip lives in the crop (mirrored columns).
        return grayscale_normalize(x, p.grayscale, self.mean.to(device), self.std.to(device), out)


def resize_matrix(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int,
                  flip: torch.Tensor | None = None) -> torch.Tensor:
    """NxSxI matrices (S = out_size, I = in_size): row o holds the weights of the input pixels that make output
    pixel o when the pixels [start, start + length) of each sample are resized to S pixels, bilinear with
    antialiasing when shrinking: the filter of PIL and of torch's `interpolate(..., antialias=True)` (what
    torchvision's resized_crop uses): a triangle of half-width max(scale, 1) centred on (o + 0.5) * scale, cut to
    the crop, normalised. `flip`: mirror those samples' outputs."""
    device = start.device
    scale = (length.float() / out_size).view(-1, 1, 1)  # input pixels per output pixel
    center = (torch.arange(out_size, device=device, dtype=torch.float32).view(1, -1, 1) + 0.5) * scale  # NxSx1
    if flip is not None:
        center = torch.where(flip.view(-1, 1, 1), center.flip(1), center)
    pixel = torch.arange(in_size, device=device).view(1, 1, -1) - start.view(-1, 1, 1)  # Nx1xI, crop coordinates
    inside = ((pixel >= 0) & (pixel < length.view(-1, 1, 1))).float()
    weight = (pixel.float() + 0.5 - center).abs_().div_(scale.clamp(min=1.0)).neg_().add_(1.0).clamp_(min=0.0)
    weight.mul_(inside)  # 1 - |distance| / half-width, outside the crop: 0
    return weight.div_(weight.sum(2, keepdim=True))


def crop_resize(images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """out[n, c] = rows[n] @ images[n, c] @ cols[n].T for NxCxHxW images, NxSxH rows, NxSxW cols: each sample's
    own crop and resize as two batched matrix products (the separable filter; faster than a gather on a CPU)."""
    n, c, height, width = images.shape
    x = torch.bmm(images.float().view(n, c * height, width), cols.transpose(1, 2))  # Nx(C*H)xS
    return torch.matmul(rows.unsqueeze(1), x.view(n, c, height, -1))  # NxCxSxS


def crop_enlarge(images: torch.Tensor, p: ViewParams, size: int) -> torch.Tensor:
    """crop_resize's result (NxCxSxS, S = size, pixel values as given) when no crop is larger than S: the
    antialiased filter then is plain bilinear, the triangle of half-width 1 at u = (o + 0.5) * scale - 0.5 crop
    pixels, cut to the crop and renormalised, i.e. u clamped to [0, length - 1] (torch's interpolate, which
    torchvision's resized_crop calls, clamps the same way). grid_sample does that in one pass over the output,
    1.2-1.9x faster on a CPU than building the matrices and the two products (measured); flips mirror u.
    Only for S a power of two: grid_sample's [-1, 1] coordinates go through (g + 1) * S / 2, which is exact then
    but otherwise shifts u by up to ~S * 1.2e-7 pixels (1.1e-5 in pixel value at 96 px, measured)."""
    n, _, height, width = images.shape

    def coordinates(start, length, in_size, flip=None):  # NxS, in grid_sample's [-1, 1] (align_corners=False)
        u = (torch.arange(size, device=images.device) + 0.5) * (length.float().view(-1, 1) / size) - 0.5
        u = torch.minimum(u.clamp_(min=0.0), (length - 1).float().view(-1, 1)).add_(start.view(-1, 1))
        if flip is not None:
            u = torch.where(flip.view(-1, 1), u.flip(1), u)
        return u.add_(0.5).mul_(2.0 / in_size).sub_(1.0)

    rows, cols = coordinates(p.top, p.height, height), coordinates(p.left, p.width, width, p.flip)
    grid = torch.stack(torch.broadcast_tensors(cols.view(n, 1, size), rows.view(n, size, 1)), dim=-1)  # NxSxSx2
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Nx3xHxW -> Nx1xHxW luma with torchvision's rgb_to_grayscale weights (ITU-R 601-2), as one matrix product
    (same value, 2.5x faster on the CPU than the weighted sum of three planes)."""
    n, _, height, width = x.shape
    return torch.matmul(_LUMA.to(x.device), x.reshape(n, 3, height * width)).view(n, 1, height, width)


_LUMA = torch.tensor([0.2989, 0.587, 0.114])


def grayscale_normalize(x: torch.Tensor, gray: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """RandomGrayscale (the samples where `gray`, N bool, become their luma in every channel) then Normalize(mean,
    std), in two passes over the batch instead of four: out = x (1 - g) / std + luma(x) g / std - mean / std with g
    = 1 on the grey samples, 0 elsewhere (x exactly: luma * 0 adds 0). Same value up to float rounding."""
    g = gray.to(x.dtype).view(-1, 1, 1, 1)
    inv_std = std.reciprocal()
    out = torch.addcmul(-mean * inv_std, x, (1.0 - g) * inv_std, out=out)
    return out.addcmul_(grayscale(x), g * inv_std)


def adjust_hue(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue (RGB -> HSV, h + hue mod 1, HSV -> RGB) for N images and N factors, in the closed
    form that never builds the HSV image: a hue rotation keeps each pixel's max and min channel, and channel c of
    the result is min + (max - min) * clamp(||k| - 3| - 1, 0, 1) with k = 6h + s_c, s = 0, -2, -4 for R, G, B.
    That is torchvision's _hsv2rgb sector table (max - (max - min) * clamp(2 - |k' - 2|, 0, 1), k' = (6h + 5, 3, 1)
    mod 6) with the "mod 6" dropped: 6h + 6 hue in [-1.6, 5.6) keeps k in [-5.6, 5.6), where ||k| - 3| is the
    distance from k + 3 to the nearest multiple of 6, which is |k' - 2| wherever the clamp tells them apart (below
    2). Same value up to float rounding.
    Written for the CPU, where it was the costliest op: amax/amin, comparisons into float masks blended by lerp
    (exact for 0/1 weights) and no remainder run ~3x faster than maximum on channel views, torch.where on bool
    masks and remainder (measured)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    spread = maxc - minc
    divisor = spread.clamp(min=torch.finfo(x.dtype).tiny)  # grey pixels: 0 / tiny = 0; any hue gives max there
    max_is_r = torch.eq(maxc, r, out=torch.empty_like(maxc))  # 1.0 / 0.0
    max_is_g = torch.eq(maxc, g, out=torch.empty_like(maxc))
    # 6h by torchvision's _rgb2hsv sectors, first match wins: max = r: (g - b) / d; max = g: 2 + (b - r) / d; else
    # max = b: 4 + (r - g) / d. In [-1, 5).
    h6 = torch.lerp((r - g).div_(divisor).add_(4.0), (b - r).div_(divisor).add_(2.0), max_is_g)
    h6 = torch.lerp(h6, (g - b).div_(divisor), max_is_r)
    h6.add_(6.0 * hue.view(-1, 1, 1))
    k = h6.unsqueeze(1) + _HUE_SHIFTS.to(x.device)  # k: Nx3xHxW
    k.abs_().sub_(3.0).abs_().clamp_(1.0, 2.0)  # the clamp's "- 1" goes into the base: min - (max - min)
    return torch.addcmul(minc.sub_(spread).unsqueeze(1), spread.unsqueeze(1), k)


_HUE_SHIFTS = torch.tensor([0.0, -2.0, -4.0]).view(1, 3, 1, 1)


def color_jitter(x: torch.Tensor, applied: torch.Tensor, order: torch.Tensor, factors: torch.Tensor) -> None:
    """ColorJitter in place, with per-sample factors (Nx4: brightness, contrast, saturation, hue) applied in each
    sample's own order (Nx4 op ids) to the samples where `applied`, clamped to [0, 1] after each op.
    Brightness, contrast and saturation are all torchvision's _blend, clamp(f x + (1 - f) target) with target
    black, the image's mean grey level and the grey image. So at each of the 4 positions one pass does
    x <- clamp(a x + b gray + c) for the whole batch, each sample with the weights of the op it has there
    (brightness a = f; contrast a = f, c = (1 - f) mean; saturation a = f, b = 1 - f) or the identity (a = 1, b =
    c = 0: x exactly) where it has hue or no jitter; then the hue runs on the rows that have it there. (Gathering
    the rows of each of the 16 (position, op) pairs cost about twice as much on a CPU, measured.)
    The parameters may stay on the CPU while x is on a GPU (DeviceAugment.apply): the weights then travel as three
    Nx4 tensors and the rows to hue are found on the host, without waiting for the GPU."""
    at_position = factors.gather(1, order)  # Nx4: the factor of the op at each position
    blend = applied.view(-1, 1) & (order != 3)
    weight_x = torch.where(blend, at_position, 1.0)  # a, Nx4
    weight_gray = torch.where(blend & (order == 2), 1.0 - at_position, 0.0)  # b
    weight_mean = torch.where(blend & (order == 1), 1.0 - at_position, 0.0)  # c / mean
    hue = applied.view(-1, 1) & (order == 3)
    weight_x, weight_gray, weight_mean = (w.to(x.device, non_blocking=True)
                                          for w in (weight_x, weight_gray, weight_mean))
    n, _, height, width = x.shape
    luma = _LUMA.to(x.device)
    for position in range(4):
        mean_gray = x.mean((2, 3)) @ luma  # N: the mean of the grey image, as the luma of the channel means
        # b gray + c = b luma . x + c: one batched product (Nx1x3 @ Nx3x(HW), plus c) for the whole target
        target = torch.baddbmm((weight_mean[:, position] * mean_gray).view(-1, 1, 1),
                               weight_gray[:, position].view(-1, 1, 1) * luma, x.view(n, 3, height * width))
        torch.addcmul(target.view(n, 1, height, width), x, weight_x[:, position].view(-1, 1, 1, 1),
                      out=x).clamp_(0.0, 1.0)
        rows = hue[:, position].nonzero().squeeze(1)
        if len(rows):
            shifts = at_position[rows, position].to(x.device, non_blocking=True)
            rows = rows.to(x.device, non_blocking=True)
            x.index_copy_(0, rows, adjust_hue(x.index_select(0, rows), shifts))


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """torchvision's gaussian_blur (reflect padding, kernel of `kernel_size` taps) with a sigma per sample, as two
    1-D passes (the 2-D kernel is their outer product)."""
    n, c, height, width = x.shape
    half = (kernel_size - 1) * 0.5
    taps = torch.linspace(-half, half, kernel_size, device=x.device)
    kernel = torch.exp(-0.5 * (taps / sigma.view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N*C)xk, one kernel per plane
    pad = kernel_size // 2
    planes = F.pad(x.reshape(1, n * c, height, width), [pad, pad, pad, pad], mode="reflect")
    planes = F.conv2d(planes, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    planes = F.conv2d(planes, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    return planes.view(n, c, height, width)


class ImagesInMemory(NamedTuple):
    """A dataset decoded once: `images` NxCxHxW uint8 (on the training device when there is room), `labels` N."""
    images: torch.Tensor
    labels: torch.Tensor


def dataset_bytes(dataset) -> int:
    """Bytes a dataset takes as one uint8 RGB tensor: torchvision's CIFAR and STL-10 keep their pixels in `.data`;
    otherwise the first image's size times the count."""
    if hasattr(dataset, "data"):
        return int(dataset.data.size)
    width, height = dataset[0][0].size
    return len(dataset) * 3 * height * width


def fits_in_memory(dataset, device: torch.device) -> bool:
    """Whether the images fit in a quarter of the device's memory (GPU) or of the machine's RAM (CPU): CIFAR's
    150 MB and STL-10's 3.9 GB do on a 16 GB machine; a large ImageFolder keeps the PIL path."""
    if device.type == "cuda":
        room = torch.cuda.mem_get_info(device)[1]
    else:
        room = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return dataset_bytes(dataset) <= room // 4


def augment_path(requested: str, dataset, device: torch.device) -> str:
    """The data path for --augment: 'device' when asked and the images fit (fits_in_memory), else 'cpu' (PIL in
    loader workers), saying so on the main process."""
    if requested == "device" and not fits_in_memory(dataset, device):
        if is_main():
            print(f"note: the images ({dataset_bytes(dataset) / 2**30:.1f} GiB) do not fit in a quarter of the "
                  f"{device.type} memory: augmenting with PIL in loader workers (--augment cpu)")
        return "cpu"
    return requested


def load_into_memory(dataset, device: torch.device, workers: int = 0) -> ImagesInMemory:
    """Decode a dataset of (PIL image, label) once into an ImagesInMemory on `device`. torchvision's CIFAR and
    STL-10 arrays are taken as they are; any other dataset (an ImageFolder, FakeData) is decoded image by image,
    in `workers` processes; an unreadable file stops with one line naming it (read_image's DataError)."""
    import numpy as np

    if hasattr(dataset, "data") and isinstance(dataset.data, np.ndarray) and dataset.data.dtype == np.uint8:
        data = torch.from_numpy(dataset.data)
        images = data.permute(0, 3, 1, 2) if data.shape[-1] == 3 else data  # CIFAR: NxHxWx3 -> Nx3xHxW
        labels = torch.as_tensor(np.asarray(getattr(dataset, "targets", getattr(dataset, "labels", None))))
        return ImagesInMemory(images.contiguous().to(device), labels.long())
    loader = torch.utils.data.DataLoader(_Decoded(dataset), batch_size=256, num_workers=workers,
                                         collate_fn=list, generator=torch.Generator())
    pairs = [pair for batch in loader for pair in batch]
    sizes = {image.shape[:2] for image, _ in pairs}
    if len(sizes) > 1:
        fail(f"the images are not all one size ({', '.join('x'.join(map(str, s)) for s in sorted(sizes)[:3])}...): "
             "the device augmentation holds them as one tensor; use --augment cpu")
    images = torch.from_numpy(np.stack([image for image, _ in pairs])).permute(0, 3, 1, 2)  # NxHxWx3 -> Nx3xHxW
    return ImagesInMemory(images.contiguous().to(device), torch.tensor([label for _, label in pairs]))


class _Decoded(torch.utils.data.Dataset):
    """(PIL image, label) -> (HxWx3 uint8 numpy array, label). Arrays, not tensors: a worker sends each tensor
    through a file descriptor, and 256 of them per batch exceed the open-file limit."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        import numpy as np

        image, label = self.base[i]
        return np.asarray(image.convert("RGB")), label


class DeviceViewLoader:
    """The device path's stand-in for `make_loader(AugmentedViews(...), ..., sampler)`: iterating it yields, per
    batch, the same pair the DataLoader would, (views, labels), or (views, indices) with `yield_index` (IRing's
    bank). views: `num_views` NxCxSxS float tensors on the images' device, made by `augment` from the seeds the
    sampler hands out; labels or indices: N int64 on the CPU. No worker processes: while the step runs on batch t,
    one background thread indexes and augments batch t + 1 (as a DataLoader's workers prefetch), so augmenting
    overlaps the step instead of adding to it (2-core CPU, `benchmark.py data`: 98% of the step-only rate against
    94% without). A batch is a pure function of the sampler's seeds: which thread makes it changes no number."""

    def __init__(self, memory: ImagesInMemory, augment: DeviceAugment, num_views: int, sampler: EpochSampler,
                 batch_size: int, yield_index: bool = False):
        self.memory, self.augment, self.num_views = memory, augment, num_views
        self.sampler, self.batch_size, self.yield_index = sampler, batch_size, yield_index

    def __len__(self):
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self):
        from concurrent.futures import ThreadPoolExecutor

        batches, device = self._batches(), self.memory.images.device
        # torch ops release the GIL: a real second thread. On a GPU it takes the data's device as its current one, so
        # that under torchrun it never opens a context on GPU 0 (a new thread starts there).
        with ThreadPoolExecutor(1, initializer=torch.cuda.set_device if device.type == "cuda" else None,
                                initargs=(device,)) as prefetcher:
            upcoming = prefetcher.submit(next, batches, None)
            while (batch := upcoming.result()) is not None:  # re-raises what the thread raised
                upcoming = prefetcher.submit(next, batches, None)
                yield batch

    def _batches(self):
        import itertools

        pairs = iter(self.sampler)
        while batch := list(itertools.islice(pairs, self.batch_size)):
            index, seeds = torch.tensor(batch, dtype=torch.long).T  # index: N, seeds: N (< 2^62)
            images = self.memory.images[index.to(self.memory.images.device)]  # NxCxHxW uint8
            views = self.augment.views(images, seeds, self.num_views)
            yield views, (index if self.yield_index else self.memory.labels[index])


class StepMetrics:
    """What a training loop logs, kept on the device between log steps (issue 13: no host sync per step). `add`
    (every step) queues two tiny device ops and never waits for the GPU; `pop` (every --log-every steps) returns
    the last step's numbers as floats in one transfer, after calling `on_nonfinite(loss, step)` for the first step
    since the previous pop whose loss was NaN or infinite, so a divergence is still named at the step it began."""

    def __init__(self):
        self.latest: dict = {}
        self.bad_step: torch.Tensor | None = None  # step of the first non-finite loss since the last pop, or -1
        self.bad_loss: torch.Tensor | None = None

    def add(self, step: int, stats: dict) -> None:
        self.latest = stats
        loss = torch.as_tensor(stats["loss"]).detach().double()
        if self.bad_step is None:
            self.bad_step, self.bad_loss = torch.full_like(loss, -1.0), torch.zeros_like(loss)
        first = ~torch.isfinite(loss) & (self.bad_step < 0)
        self.bad_step = torch.where(first, float(step), self.bad_step)
        self.bad_loss = torch.where(first, loss, self.bad_loss)

    def pop(self, on_nonfinite: Callable[[float, int], Any]) -> dict:
        if self.bad_step is None:  # nothing added since the last pop
            return {}
        on_device = [name for name, value in self.latest.items() if torch.is_tensor(value)]
        values = torch.stack([self.latest[name].detach().double().reshape(()) for name in on_device] +
                             [self.bad_step, self.bad_loss]).tolist()  # the one host sync
        bad_step, bad_loss = values[-2:]
        record = {**self.latest, **dict(zip(on_device, values))}
        self.bad_step = self.bad_loss = None
        if bad_step >= 0:
            on_nonfinite(bad_loss, int(bad_step))
        return record


# ---------------------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------------------
IMAGE_DATASETS = ("cifar10", "cifar100", "stl10", "folder", "synthetic")
_STATS = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
          "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclasses.dataclass
class ImageData:
    """Untransformed (PIL, label) datasets: `pretrain` for training, `memory`/`test` for the kNN monitor and probe."""
    pretrain: torch.utils.data.Dataset
    memory: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    num_classes: int
    image_size: int
    mean: tuple
    std: tuple


def load_image_data(name: str, root: str, image_size: int = 0, download: bool = True) -> ImageData:
    """`cifar10`/`cifar100`/`stl10` through torchvision (STL-10 pretrains on train+unlabeled); `folder` reads
    ImageFolder trees `root/train` and `root/test`; `synthetic` is random pixels, for speed tests only.
    image_size 0 means the dataset's own (32 for CIFAR, 96 for STL-10, the first image's for a folder)."""
    import torchvision.datasets as D

    if name not in IMAGE_DATASETS:
        fail(f"unknown dataset '{name}' (choose from {', '.join(IMAGE_DATASETS)})")
    mean, std = _STATS.get(name, _IMAGENET_STATS)
    if name == "synthetic":
        size = image_size or 32
        train = D.FakeData(4096, (3, size, size), num_classes=10, random_offset=0)
        test = D.FakeData(512, (3, size, size), num_classes=10, random_offset=4096)
        return ImageData(train, train, test, 10, size, mean, std)
    if name == "folder":
        for split in ("train", "test"):
            if not (Path(root) / split).is_dir():
                fail(f"--data-root {root}: no '{split}/' folder (the 'folder' dataset wants root/train/<class>/*.jpg "
                     "and root/test/<class>/*.jpg)")
        try:
            train, test = (D.ImageFolder(Path(root) / split, loader=read_image) for split in ("train", "test"))
        except FileNotFoundError as e:  # torchvision: "Couldn't find any class folder in ..." or no image files
            fail(f"--data-root {root}: {str(e).splitlines()[0]} (the 'folder' dataset wants root/train/<class>/*.jpg)")
        return ImageData(train, train, test, len(train.classes), image_size or train[0][0].size[0], mean, std)
    root_existed = Path(root).exists()
    try:
        if name == "stl10":
            pretrain = D.STL10(root, split="train+unlabeled", download=download)
            memory, test = D.STL10(root, split="train", download=download), D.STL10(root, split="test", download=download)
            return ImageData(pretrain, memory, test, 10, image_size or 96, mean, std)
        cls = D.CIFAR10 if name == "cifar10" else D.CIFAR100
        train, test = cls(root, train=True, download=download), cls(root, train=False, download=download)
    except (RuntimeError, OSError) as e:  # torchvision: "Dataset not found or corrupted", or no network
        if not root_existed and Path(root).is_dir() and not any(Path(root).iterdir()):
            Path(root).rmdir()  # torchvision made it for the download that failed: leave nothing behind
        fail(f"cannot load {name} from --data-root {root}: {str(e).splitlines()[0]}. Offline, '--dataset folder "
             f"--data-root DIR' reads DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg")
    return ImageData(train, train, test, len(train.classes), image_size or 32, mean, std)


def read_image(path: str):
    """ImageFolder's loader, with one clear error naming the file for an unreadable image (empty, truncated, not
    an image) instead of PIL's traceback from inside a loader worker."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise DataError(f"cannot read image {path} ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


@contextlib.contextmanager
def seeded_cpu_rng(seed: int):
    """Run a block with torch's CPU generator seeded to `seed`, then give the generator its old state back.

    This is what `torch.random.fork_rng(devices=[])` + `torch.manual_seed(seed)` do for the CPU, without their cost
    in a per-sample hot loop: manual_seed also queues lazy seeding of every accelerator backend, and fork_rng
    formats a stack trace for its warning check, about 87 us a call, as much as a 32 px view's augmentation."""
    generator = torch.default_generator
    saved = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(saved)


class AugmentedViews(torch.utils.data.Dataset):
    """(image, label) dataset -> (views, label), where the augmentation of sample i in epoch e is a pure function of
    the seed the sampler hands over with i. Resuming mid-epoch therefore replays the very same crops, whatever
    the number of loader workers."""

    def __init__(self, base: torch.utils.data.Dataset, views: Callable):
        self.base, self.views = base, views

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index_and_seed: tuple[int, int]):
        index, seed = index_and_seed
        image, label = self.base[index]
        with seeded_cpu_rng(seed):  # torchvision's random transforms draw from torch's CPU generator
            return self.views(image), label


class EpochSampler(torch.utils.data.Sampler):
    """Yields (index, augmentation seed) for this rank. Epoch e's order is a permutation drawn from (seed, e);
    global batch b is rows [b*B, (b+1)*B) of it and rank r reads its r-th contiguous slice, so gathering the ranks'
    batches gives the same global batch as one process. The incomplete last batch is dropped (MoCo's queue and
    SplitBN want full batches). `start_batch` skips the batches of an epoch already trained before a resume."""

    def __init__(self, num_samples: int, global_batch: int, seed: int):
        self.num_samples, self.global_batch, self.seed = num_samples, global_batch, seed
        self.batches_per_epoch = num_samples // global_batch
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self):
        return (self.batches_per_epoch - self.start_batch) * (self.global_batch // world_size())

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g)
        seeds = torch.randint(0, 2**62, (self.num_samples,), generator=g)
        local = self.global_batch // world_size()
        for b in range(self.start_batch, self.batches_per_epoch):
            rows = order[b * self.global_batch + rank() * local:][:local]
            yield from zip(rows.tolist(), seeds[rows].tolist())


class Transformed(torch.utils.data.Dataset):
    """(image, label) -> (transform(image), label), deterministic transforms only (evaluation)."""

    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        image, label = self.base[i]
        return self.transform(image), label


def evenly_spaced_indices(n: int, size: int) -> torch.Tensor:
    """`size` indices spread over range(n) (every class of a sorted ImageFolder); all n for size 0."""
    return torch.arange(n) if size <= 0 or size >= n else torch.linspace(0, n - 1, size).long()


def evenly_spaced_subset(dataset, size: int):
    """`size` samples spread over the whole dataset; all of it for size 0."""
    if size <= 0 or size >= len(dataset):
        return dataset
    return torch.utils.data.Subset(dataset, evenly_spaced_indices(len(dataset), size).tolist())


def make_loader(dataset, batch_size: int, workers: int, device: torch.device, sampler=None,
                persistent: bool = False) -> torch.utils.data.DataLoader:
    """`persistent`: keep the worker processes across epochs (the training loader: no restart cost per epoch)."""
    # A private generator: creating an iterator must not draw from the global RNG, or a resumed run (which creates
    # one mid-epoch) would drift from an uninterrupted one. Randomness comes from EpochSampler's seeds instead.
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                                       num_workers=workers, pin_memory=device.type == "cuda",
                                       generator=torch.Generator(), drop_last=False,
                                       persistent_workers=persistent and workers > 0)


def pretrain_batches(data: ImageData, augment: str, sampler: EpochSampler, num_views: int, batch_size: int,
                     workers: int, device: torch.device, yield_index: bool = False):
    """The training batches of an image script: per step (views, labels), or (views, training indices) with
    `yield_index` (IRing's bank); views: `num_views` tensors NxCxSxS, augmented by the MoCo v2 / SimCLR recipe with
    the seeds `sampler` hands out. --augment device (when the images fit, augment_path): decoded once into memory
    on `device` and augmented there in batches (DeviceViewLoader); cpu: PIL in `workers` loader processes. Both
    paths draw the same distribution of views; a resumed run and N processes see the views one process would."""
    if augment_path(augment, data.pretrain, device) == "device":
        return DeviceViewLoader(load_into_memory(data.pretrain, device, workers),
                                DeviceAugment(data.image_size, data.mean, data.std), num_views, sampler, batch_size,
                                yield_index)
    transform = pretrain_transform(data.image_size, data.mean, data.std)
    images = _WithIndex(data.pretrain) if yield_index else data.pretrain
    return make_loader(AugmentedViews(images, MultiView([transform] * num_views)), batch_size, workers, device,
                       sampler, persistent=True)


class _WithIndex(torch.utils.data.Dataset):
    """(image, label) -> (image, index): AugmentedViews hands the second item through, so the loader yields (views,
    index). Pretraining never reads the label."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index: int):
        return self.base[index][0], index


# ---------------------------------------------------------------------------------------------------------------------
# Audio and video encoders (CM-ACC's modalities): moco_acc.py builds one per modality from its PairData.kinds
# ---------------------------------------------------------------------------------------------------------------------
def split_batchnorm(net: nn.Module, splits: int) -> nn.Module:
    """Replace every BatchNorm of a freshly built network by SplitBatchNorm (nothing to do for one split)."""
    for name, child in net.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and splits > 1:
            setattr(net, name, SplitBatchNorm(child.num_features, splits))
        else:
            split_batchnorm(child, splits)
    return net


class BasicBlock1d(nn.Module):
    def __init__(self, width_in: int, width: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv1d(width_in, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm1d(width)
        self.conv2 = nn.Conv1d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm1d(width)
        self.shortcut = nn.Identity() if stride == 1 and width_in == width else nn.Sequential(
            nn.Conv1d(width_in, width, 1, stride, bias=False), nn.BatchNorm1d(width))

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


class AudioResNet18(nn.Module):
    """ResNet-18 with 1D kernels (Section 5): the mel bands are input channels, convolutions run along time."""

    def __init__(self, bands: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(bands, 64, 7, 2, 3, bias=False), nn.BatchNorm1d(64), nn.ReLU(inplace=True))
        blocks, width_in = [], 64
        for stage, width in enumerate((64, 128, 256, 512)):
            for block in range(2):
                blocks.append(BasicBlock1d(width_in, width, 2 if stage > 0 and block == 0 else 1))
                width_in = width
        self.blocks = nn.Sequential(*blocks, nn.AdaptiveAvgPool1d(1), nn.Flatten())
        self.out_dim = 512

    def forward(self, x):
        return self.blocks(self.stem(x))


def small_cnn(conv: type, norm: type, pool: nn.Module, channels: int, widths=(32, 64, 128)) -> nn.Sequential:
    """Three conv-BN-ReLU blocks (stride 2 after the first) and global average pooling, for CPU runs."""
    layers, width_in = [], channels
    for i, width in enumerate(widths):
        layers += [conv(width_in, width, 3, stride=1 if i == 0 else 2, padding=1, bias=False), norm(width),
                   nn.ReLU(inplace=True)]
        width_in = width
    net = nn.Sequential(*layers, pool, nn.Flatten())
    net.out_dim = widths[-1]
    return net


def build_modality_backbone(kind: str, arch: str, in_channels: int, bn_splits: int) -> nn.Module:
    """The encoder of one modality of a pair (kind: 'image', 'audio' or 'video'), `.out_dim` = feature size."""
    if kind == "image":
        net = build_backbone(arch, "cifar")  # image pairs here are small (28-96 px): 3x3 stem, no max-pool
    elif kind == "audio":
        net = (AudioResNet18(in_channels) if arch == "resnet18" else
               small_cnn(nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d(1), in_channels, (64, 128, 128)))
    elif arch == "resnet18":  # video
        import torchvision

        net = torchvision.models.video.r3d_18(weights=None)
        net.out_dim, net.fc = net.fc.in_features, nn.Identity()
    else:
        net = small_cnn(nn.Conv3d, nn.BatchNorm3d, nn.AdaptiveAvgPool3d(1), in_channels)
    return split_batchnorm(net, bn_splits)


class Branch(nn.Module):
    """backbone (what is evaluated and exported) + projection head."""

    def __init__(self, backbone: nn.Module, dim: int, mlp: bool):
        super().__init__()
        self.backbone = backbone
        self.head = projection_head(backbone.out_dim, dim, mlp)

    def forward(self, x):
        return self.head(self.backbone(x))


# ---------------------------------------------------------------------------------------------------------------------
# Audio-visual data (CM-ACC's pairs). A paired dataset is a loader function cfg -> PairData, registered in
# moco_acc.DATASETS; cfg is moco_acc.Config (data_root, mel_bands; avfolder also fps, clip_frames, clip_stride,
# frame_size).
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PairData:
    """Everything the training loop knows about a paired dataset.

    train: indexed by (index, seed), the pairs EpochSampler yields, and returns
        ([v_query, v_key], [a_query, a_key], label_v, label_a): two augmented views of each modality of item
        `index`, every random choice a function of `seed` (exact resume). Labels are ints, -1 where unknown; they
        are only counted in the logs, never used for training.
    kinds: encoder family of (v, a): 'video' (3xTxHxW clips), 'audio' (bands x frames log-mel), 'image' (3xHxW).
    in_channels: input channels of (v, a) (mel bands for audio, 3 otherwise).
    num_classes: label classes (0 when unlabelled).
    knn: {modality: (bank, test)} datasets of (input, label) with evaluation transforms, for the kNN monitor.
    An image-pair dataset (x, y) plugs in with kinds ('image', 'image').
    """
    train: torch.utils.data.Dataset
    kinds: tuple[str, str]
    in_channels: tuple[int, int]
    num_classes: int
    knn: dict


def read_wav(path, start: int = 0, count: int | None = None) -> tuple[torch.Tensor, int]:
    """Mono waveform in [-1, 1) of a 16-bit PCM wav, frames [start, start + count), and its sample rate. Python's
    wave module: from torchaudio 2.9 on, torchaudio.load needs torchcodec, which may not be installed."""
    import wave

    with wave.open(str(path)) as w:
        if w.getsampwidth() != 2:
            fail(f"{path}: {8 * w.getsampwidth()}-bit audio; convert it to 16-bit PCM (ffmpeg -c:a pcm_s16le)")
        w.setpos(min(start, w.getnframes()))
        raw = w.readframes(w.getnframes() - start if count is None else count)
        channels, rate = w.getnchannels(), w.getframerate()
    audio = torch.frombuffer(bytearray(raw), dtype=torch.int16).float() if raw else torch.zeros(0)
    return audio.view(-1, channels).mean(1) / 32768.0, rate


class LogMel:
    """80-band log-mel spectrogram (Appendix A), 25 ms windows every 10 ms, LibROSA's Slaney filterbank and 80 dB
    dynamic range, standardized per clip. Returns bands x frames: the bands are the channels of the audio encoder's
    1D convolutions."""

    def __init__(self, bands: int):
        self.bands, self.transforms = bands, {}

    def __call__(self, audio: torch.Tensor, rate: int) -> torch.Tensor:
        import torchaudio

        if rate not in self.transforms:
            window = int(0.025 * rate)
            self.transforms[rate] = torchaudio.transforms.MelSpectrogram(
                rate, n_fft=2 ** math.ceil(math.log2(2 * window)), win_length=window, hop_length=rate // 100,
                n_mels=self.bands, norm="slaney", mel_scale="slaney")
        db = 10 * self.transforms[rate](audio).clamp_min(1e-10).log10()  # mel power in dB: bands x frames
        db = db.clamp_min(db.max() - 80.0)  # LibROSA's power_to_db(top_db=80): silence and padding sit at the floor
        return (db - db.mean()) / (db.std() + 1e-5)


def mask_spectrogram(mel: torch.Tensor, max_bands: int = 8, max_fraction: float = 0.1) -> torch.Tensor:
    """One band mask and one time mask (SpecAugment), drawn from torch's RNG (seeded per item by the dataset)."""
    bands, frames = mel.shape
    out = mel.clone()
    width = int(torch.randint(0, max_bands + 1, ()))
    start = int(torch.randint(0, bands - width + 1, ()))
    out[start:start + width] = 0.0
    width = int(torch.randint(0, int(max_fraction * frames) + 1, ()))
    start = int(torch.randint(0, frames - width + 1, ()))
    out[:, start:start + width] = 0.0
    return out


def fixed_length(audio: torch.Tensor, length: int, random_offset: bool) -> torch.Tensor:
    """Crop or zero-pad a waveform to `length` samples, at a random offset (a time shift) or centered."""
    excess = audio.shape[0] - length
    offset = int(torch.randint(0, abs(excess) + 1, ())) if random_offset else abs(excess) // 2
    if excess >= 0:
        return audio[offset:offset + length]
    return F.pad(audio, (offset, -excess - offset))


class DigitPairs(torch.utils.data.Dataset):
    """avmnist: item i is MNIST image i (digit d) with a fixed spoken recording of digit d (FSDD, 1 s at 8 kHz).
    mode 'train': (index, seed) -> two views of each; 'image' / 'audio': index -> (evaluation input, digit)."""

    MEAN, STD = 0.1307, 0.3081

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, recordings: list[Path], mode: str, bands: int):
        self.images, self.labels, self.recordings, self.mode = images, labels, recordings, mode
        self.mel = LogMel(bands)

    def __len__(self):
        return len(self.labels)

    def image(self, i: int, augment: bool) -> torch.Tensor:
        from torchvision.transforms import v2

        x = self.images[i].float().div(255).unsqueeze(0)  # 1x28x28
        if augment:
            x = v2.RandomResizedCrop(28, scale=(0.5, 1.0), ratio=(0.8, 1.25), antialias=True)(x)
        return ((x - self.MEAN) / self.STD).expand(3, -1, -1)  # 3x28x28 for the RGB image encoders

    def audio(self, i: int, augment: bool) -> torch.Tensor:
        wav, rate = read_wav(self.recordings[i])
        mel = self.mel(fixed_length(wav, rate, augment), rate)  # bands x 101
        return mask_spectrogram(mel) if augment else mel

    def __getitem__(self, item):
        if self.mode == "image":
            return self.image(item, False), int(self.labels[item])
        if self.mode == "audio":
            return self.audio(item, False), int(self.labels[item])
        index, seed = item
        with seeded_cpu_rng(seed):
            views_v = [self.image(index, True) for _ in range(2)]
            views_a = [self.audio(index, True) for _ in range(2)]
        label = int(self.labels[index])
        return views_v, views_a, label, label


def load_avmnist(cfg: Any) -> PairData:
    """MNIST (500 per digit: 400 train, 100 test) with FSDD (recordings 0-4 of each speaker and digit are its
    standard test split). Training image j of digit d is paired with training recording j mod R_d of digit d."""
    import numpy as np

    root = Path(cfg.data_root)
    npz, wav_dir = root / "mnist5k" / "mnist_5k.npz", root / "fsdd" / "recordings"
    if not npz.is_file() or not wav_dir.is_dir():
        fail(f"--data-root {cfg.data_root}: avmnist needs mnist5k/mnist_5k.npz and fsdd/recordings/ in it")
    try:
        with np.load(npz) as arrays:
            images, labels = torch.from_numpy(arrays["images"]), torch.from_numpy(arrays["labels"]).long()
    except (OSError, ValueError, KeyError) as e:  # not an npz, a pickle, or missing arrays
        fail(f"cannot read {npz} as MNIST arrays 'images' and 'labels' ({str(e).splitlines()[0][:100]})")
    train_rows, test_rows = [], []
    for d in range(10):
        rows = (labels == d).nonzero().squeeze(1)
        train_rows.append(rows[:400])
        test_rows.append(rows[400:])
    train_rows, test_rows = torch.cat(train_rows), torch.cat(test_rows)
    wavs = sorted(wav_dir.glob("*.wav"), key=lambda p: (int(p.stem.split("_")[0]), p.stem))
    splits = {"train": [p for p in wavs if int(p.stem.split("_")[2]) >= 5],
              "test": [p for p in wavs if int(p.stem.split("_")[2]) < 5]}
    by_digit = [[p for p in splits["train"] if int(p.stem.split("_")[0]) == d] for d in range(10)]
    seen = [0] * 10
    partners = []
    for d in labels[train_rows].tolist():
        partners.append(by_digit[d][seen[d] % len(by_digit[d])])
        seen[d] += 1
    train = DigitPairs(images[train_rows], labels[train_rows], partners, "train", cfg.mel_bands)
    knn = {"v": (DigitPairs(images[train_rows], labels[train_rows], [], "image", cfg.mel_bands),
                 DigitPairs(images[test_rows], labels[test_rows], [], "image", cfg.mel_bands)),
           "a": tuple(DigitPairs(None, torch.tensor([int(p.stem[0]) for p in splits[s]]), splits[s], "audio",
                                 cfg.mel_bands) for s in ("train", "test"))}
    return PairData(train, ("image", "audio"), (3, cfg.mel_bands), 10, knn)


class VideoClips(torch.utils.data.Dataset):
    """avfolder: (index, seed) -> two views of clip `index` ([3xTxSxS] x2) and of its audio segment ([bands x
    frames] x2), labels -1. The start frame is jittered within the stride (temporal jittering, Appendix A); both
    views of both modalities share it, so the audio stays aligned with the frames."""

    MEAN, STD = (0.43216, 0.394666, 0.37645), (0.22803, 0.22145, 0.216989)  # Kinetics statistics

    def __init__(self, videos: list[tuple[list[Path], Path]], cfg: Any):
        import wave

        self.videos, self.cfg = videos, cfg
        self.items = [(v, s) for v, (frames, _) in enumerate(videos)
                      for s in range(0, len(frames) - cfg.clip_frames + 1, cfg.clip_stride)]
        self.rates = []
        for _, wav_path in videos:
            with wave.open(str(wav_path)) as w:
                self.rates.append(w.getframerate())
        self.mel = LogMel(cfg.mel_bands)

    def __len__(self):
        return len(self.items)

    def augment(self, frames: torch.Tensor) -> torch.Tensor:
        """Random resized crop, flip and grayscale with the same parameters for every frame (Appendix A)."""
        from torchvision.transforms import v2

        size = self.cfg.frame_size
        clip = v2.Compose([v2.RandomResizedCrop(size, scale=(0.3, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                           v2.RandomGrayscale(p=0.2)])(frames).float().div(255)  # Tx3xSxS
        clip = (clip - torch.tensor(self.MEAN).view(3, 1, 1)) / torch.tensor(self.STD).view(3, 1, 1)
        return clip.transpose(0, 1).contiguous()  # 3xTxSxS, the layout of torchvision's video models

    def __getitem__(self, index_and_seed):
        from PIL import Image  # torchvision.io's decoders are deprecated from torchvision 0.29; PIL is everywhere
        from torchvision.transforms.functional import pil_to_tensor

        index, seed = index_and_seed
        video, start = self.items[index]
        frame_paths, wav_path = self.videos[video]
        cfg = self.cfg
        with seeded_cpu_rng(seed):
            start = min(start + int(torch.randint(0, cfg.clip_stride, ())), len(frame_paths) - cfg.clip_frames)
            frames = torch.stack([pil_to_tensor(Image.open(p).convert("RGB"))
                                  for p in frame_paths[start:start + cfg.clip_frames]])  # Tx3xHxW uint8
            views_v = [self.augment(frames) for _ in range(2)]
            rate = self.rates[video]
            first, length = round(start / cfg.fps * rate), round(cfg.clip_frames / cfg.fps * rate)
            audio, rate = read_wav(wav_path, first, length)
            mel = self.mel(F.pad(audio, (0, length - audio.shape[0])), rate)  # bands x (100 per second)
            views_a = [mask_spectrogram(mel) for _ in range(2)]
        return views_v, views_a, -1, -1


def load_avfolder(cfg: Any) -> PairData:
    root = Path(cfg.data_root)
    folders = (sorted(d for d in root.iterdir() if (d / "frames").is_dir() and (d / "audio.wav").is_file())
               if root.is_dir() else [])
    videos = [(sorted((d / "frames").glob("*.jpg")), d / "audio.wav") for d in folders]
    videos = [v for v in videos if len(v[0]) >= cfg.clip_frames]
    if not videos:
        fail(f"--data-root {cfg.data_root}: no <video>/frames/*.jpg + <video>/audio.wav folder with at least "
             f"{cfg.clip_frames} frames (see the ffmpeg commands in moco_acc.py's docstring)")
    return PairData(VideoClips(videos, cfg), ("video", "audio"), (3, cfg.mel_bands), 0, {})


class PairKnn:
    """The kNN monitor (knn_accuracy) for every labelled modality of a PairData: bank = training inputs, queries =
    test inputs (evaluation transforms), backbones[m] = that modality's backbone. Main process only, others wait at
    a barrier."""

    def __init__(self, data: PairData, cfg: Any, device: torch.device):
        self.loaders = {m: [make_loader(evenly_spaced_subset(d, n), 256, cfg.workers, device)
                            for d, n in zip(split, (cfg.knn_bank_size, cfg.knn_test_size))]
                        for m, split in data.knn.items()}
        self.num_classes, self.k, self.t, self.device = data.num_classes, cfg.knn_k, cfg.knn_t, device

    def __call__(self, backbones: nn.ModuleDict) -> dict[str, float]:
        top1 = {}
        if is_main():
            for m, (bank, test) in self.loaders.items():
                top1[f"knn_top1_{m}"] = knn_accuracy(backbones[m], bank, test, self.num_classes, self.device,
                                                     self.k, self.t)
        if world_size() > 1:
            dist.barrier()
        return top1


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation: weighted kNN monitor (MoCo CIFAR demo / Wu et al. 2018) and linear probe
# ---------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def extract_features(backbone: nn.Module, loader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalized backbone features (NxD) and labels (N) of every sample the loader yields, eval mode."""
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    for x, y in loader:
        with autocast(device):
            features.append(F.normalize(backbone(to_device(x, device)).float(), dim=1))
        labels.append(y.to(device))
    backbone.train(was_training)
    return torch.cat(features), torch.cat(labels)


def knn_predict(features: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
                k: int = 200, temperature: float = 0.1) -> torch.Tensor:
    """Weighted kNN: each of the k nearest bank entries (cosine) votes for its label with weight exp(sim/T).
    features: NxD, bank: MxD (normalized), bank_labels: M -> predicted labels N."""
    sim = features @ bank.T  # sim: NxM
    top_sim, top_idx = sim.topk(min(k, bank.shape[0]), dim=1)  # Nxk
    votes = torch.zeros(features.shape[0], num_classes, device=features.device)
    votes.scatter_add_(1, bank_labels[top_idx], (top_sim / temperature).exp())
    return votes.argmax(dim=1)


def knn_accuracy(backbone: nn.Module, memory_loader, test_loader, num_classes: int, device: torch.device,
                 k: int = 200, temperature: float = 0.1) -> float:
    """kNN top-1 (%) of the test split against a bank of training features taken with test transforms."""
    bank, bank_labels = extract_features(backbone, memory_loader, device)
    correct = 0
    for features, labels in zip(*(t.split(1024) for t in extract_features(backbone, test_loader, device))):
        correct += (knn_predict(features, bank, bank_labels, num_classes, k, temperature) == labels).sum().item()
    return 100.0 * correct / len(test_loader.dataset)


class KnnMonitor:
    """kNN top-1 of a backbone during training: bank = training images with test transforms, queries = test split.
    Runs on the main process (others wait at a barrier) and returns the accuracy there, None elsewhere."""

    def __init__(self, data: ImageData, bank_size: int, test_size: int, k: int, temperature: float, workers: int,
                 device: torch.device):
        tf = eval_transform(data.image_size, data.mean, data.std)
        self.memory = make_loader(Transformed(evenly_spaced_subset(data.memory, bank_size), tf), 256, workers, device)
        self.test = make_loader(Transformed(evenly_spaced_subset(data.test, test_size), tf), 256, workers, device)
        self.num_classes, self.k, self.temperature, self.device = data.num_classes, k, temperature, device

    def __call__(self, backbone: nn.Module) -> float | None:
        top1 = None
        if is_main():
            top1 = knn_accuracy(backbone, self.memory, self.test, self.num_classes, self.device, self.k,
                                self.temperature)
        if world_size() > 1:
            dist.barrier()
        return top1


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, epochs: int = 100, lr: float = 0.1,
                 batch_size: int = 256, seed: int = 0) -> float:
    """Logistic regression on frozen (cached, standardized) features, SGD with cosine lr; returns test top-1 (%)."""
    g = torch.Generator().manual_seed(seed)
    mean, std = train_features.mean(0), train_features.std(0) + 1e-6
    train_x, test_x = (train_features - mean) / std, (test_features - mean) / std
    classifier = nn.Linear(train_x.shape[1], num_classes).to(train_x.device)
    opt = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    steps = epochs * math.ceil(len(train_x) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        for idx in torch.randperm(len(train_x), generator=g).split(batch_size):
            loss = F.cross_entropy(classifier(train_x[idx]), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return 100.0 * (classifier(test_x).argmax(1) == test_labels).float().mean().item()


# ---------------------------------------------------------------------------------------------------------------------
# Training conveniences
# ---------------------------------------------------------------------------------------------------------------------
PRECISION_CHOICES = ("auto", "bf16", "fp32")  # --precision
SWITCH_CHOICES = ("auto", "on", "off")  # --channels-last


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast for --precision bf16, none for fp32; 'auto': bf16 on a GPU, fp32 on a CPU (where bf16 is
    slower and changes the numerics the equation tests pin down). The losses stay in fp32 either way."""
    enabled = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def channels_last(setting: str, device: torch.device) -> bool:
    """--channels-last: 'auto' is on for a GPU (faster convolutions with bf16), off for a CPU."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def to_device(x, device: torch.device, channels_last: bool | None = None):
    """Move a batch (tensor or list of tensors) to the device; 4-D images in channels_last memory format when
    asked (None: on a GPU)."""
    if isinstance(x, (list, tuple)):
        return [to_device(v, device, channels_last) for v in x]
    x = x.to(device, non_blocking=True)
    if (device.type == "cuda" if channels_last is None else channels_last) and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def cosine_lr(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0) -> float:
    """Linear warm-up then half-cosine decay to 0, a function of the global step."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class CheckpointTimer:
    """When a training loop should stop to save: every `minutes` of wall time, and at once after SIGTERM or SIGINT
    (a preempted job, Ctrl-C). The loop breaks out of its epoch when `due()` says so; the code after the epoch then
    saves as it does at an epoch end, and the loop goes on from the saved step exactly as a resumed run would (the
    sampler skips the batches already trained), or `stop_if_signalled` ends the run with one line.

    Under torchrun the ranks must agree (their clocks differ, and a signal may reach one rank only): one all-reduce
    of two flags every DDP_CHECK_EVERY calls (an all-reduce read on the host waits for the GPU: issue 13's "no host
    sync per step"; every rank calls `due` once per step, so they count alike). At world size one, no collective."""

    DDP_CHECK_EVERY = 10

    def __init__(self, minutes: float, device: torch.device):
        self.interval, self.device = minutes * 60.0, device
        self.last_save, self.stopping, self.signal_name = time.monotonic(), False, None
        self.calls, self.handlers = 0, {}
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            self.handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _on_signal(self, signum: int, frame) -> None:
        if self.signal_name is not None:  # a second Ctrl-C: the user does not want to wait for the save
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def due(self) -> bool:
        self.calls += 1
        if world_size() > 1 and self.calls % self.DDP_CHECK_EVERY:
            return False
        flags = torch.tensor([float(self.signal_name is not None),
                              float(self.interval > 0 and time.monotonic() - self.last_save >= self.interval)])
        if world_size() > 1:
            flags = flags.to(self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        self.stopping = bool(flags[0])
        return bool(flags.any())

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def stop_if_signalled(self, step: int, checkpoint: Path) -> None:
        if self.stopping:
            self.close()
            fail(f"stopped by {self.signal_name or 'a signal to another rank'} at step {step}; the checkpoint is "
                 f"saved in {checkpoint}: run the same command again to continue")

    def close(self) -> None:
        """Give the signals their previous handlers back (the scripts also run inside tests and notebooks)."""
        for sig, handler in self.handlers.items():
            signal.signal(sig, handler)
        self.handlers = {}


@torch.no_grad()
def average_bn_statistics(model: nn.Module) -> None:
    """Average BatchNorm running statistics over the ranks before evaluating or saving: each rank's come from its
    own slice of every batch, so rank 0's alone would make the saved model depend on the world size."""
    if world_size() == 1:
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for buffer in (module.running_mean, module.running_var):
                dist.all_reduce(buffer)
                buffer /= world_size()


# ---------------------------------------------------------------------------------------------------------------------
# Run directory: config.json, metrics.jsonl, checkpoint.pt (all written by the main process only)
# ---------------------------------------------------------------------------------------------------------------------
def git_state() -> dict:
    """Provenance: the commit and whether the tree had uncommitted changes (None outside a git checkout)."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True)
        return {"git_sha": sha.stdout.strip(), "git_dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.CalledProcessError):
        return {"git_sha": None, "git_dirty": None}


class RunDir:
    """`--out-dir`: config.json (resolved config + provenance), metrics.jsonl (one JSON object per event).

    A directory holds a run once it holds a checkpoint: one killed before its first save is started over. Resumed
    at `step`, metrics.jsonl keeps the records up to that step only, so the replayed steps appear once."""

    def __init__(self, out_dir: str, config: dict, script: str, resuming: bool, step: float = math.inf):
        self.path, self.config = Path(out_dir), config
        if not is_main():
            return
        if self.path.exists() and not self.path.is_dir():
            fail(f"--out-dir {out_dir} is a file, not a directory")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            fail(f"--out-dir {out_dir}: cannot create it ({e.strerror})")
        if not os.access(self.path, os.W_OK | os.X_OK):
            fail(f"--out-dir {out_dir} is not writable")
        if not resuming and self.checkpoint_path.exists():
            # Never lose work (parse_config resumes a run found in --out-dir, so only a caller that bypasses it gets here).
            fail(f"--out-dir {out_dir} already holds a run; re-run its command to continue it, or pass another --out-dir")
        metrics = self.path / "metrics.jsonl"
        if metrics.exists():
            kept = [line for line in metrics.read_text().splitlines() if resuming and _logged_step(line) <= step]
            atomic_write(metrics, lambda p: p.write_text("".join(line + "\n" for line in kept)))
        info = {"script": script, "config": config, **git_state(), "world_size": world_size(),
                "torch": torch.__version__}
        atomic_write(self.path / "config.json", lambda p: p.write_text(json.dumps(info, indent=2) + "\n"))

    def check_finite(self, loss: float, step: int) -> None:
        """Stop at a NaN or infinite loss, naming the settings that usually cause it and what was saved."""
        if math.isfinite(loss):
            return
        suspects = ", ".join(f"--{name.replace('_', '-')} {value}" for name, value in self.config.items()
                             if (name in ("lr", "temperature", "tau") or name.endswith(("_lr", "_t")))
                             and not name.startswith("knn_"))  # the kNN monitor's temperature is not trained with
        saved = (f"The last checkpoint is kept in {self.checkpoint_path}; re-running resumes from it"
                 if self.checkpoint_path.exists() else "No checkpoint had been written yet")
        fail(f"the loss is {loss} at step {step}: training diverged. Usual causes: a learning rate too high or a "
             f"temperature too small ({suspects}). {saved}")

    def log(self, record: dict) -> None:
        if is_main():
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"


def _logged_step(line: str) -> float:
    """The step of one metrics.jsonl record; a line cut short by a kill counts as after every step (dropped)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Write to a temporary file beside `path`, then rename: a crash never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_pos": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(path: Path, script: str, config: dict, step: int, model: nn.Module,
                    optimizers: dict[str, torch.optim.Optimizer], backbone: nn.Module) -> None:
    """Full state (model with its queues/banks, every optimizer, RNG, step, config), atomically, main process only.
    Learning-rate and threshold schedules are functions of `step`, so the step restores them. `backbone` is saved
    again on its own for export (torch.save stores shared tensors once)."""
    if not is_main():
        return
    state = {"format": CHECKPOINT_FORMAT, "script": script, "config": config, "step": step,
             "model": model.state_dict(), "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
             "rng": rng_state(), "backbone": backbone.state_dict()}
    atomic_write(path, lambda p: torch.save(state, p))


# Flags that may change on --resume without changing the trajectory: where and how often things are written or
# evaluated, how data is loaded, and how far to train (--epochs sets the schedules, so it may not change).
RESUME_MAY_CHANGE = {"resume", "out_dir", "max_steps", "workers", "log_every", "knn_every", "checkpoint_minutes"}


def same_setting(name: str, new: Any, saved: Any) -> bool:
    """Whether a resumed run may use `new` where the checkpoint says `saved` (a data folder may be spelled
    differently: relative, absolute, through a link)."""
    if name in RESUME_MAY_CHANGE or new == saved:
        return True
    return name.endswith("_root") and isinstance(new, str) and isinstance(saved, str) and \
        os.path.realpath(new) == os.path.realpath(saved)


def load_checkpoint(path: str, script: str | None = None, config: dict | None = None) -> dict:
    """Load with weights_only=True. With `script`/`config`, refuse a checkpoint of another script or config."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        fail(f"checkpoint {path} does not exist")
    except IsADirectoryError:
        fail(f"checkpoint {path} is a directory")
    except Exception as e:  # pickle errors, zip errors, "weights only" refusals: all mean "not our checkpoint"
        first_line = (str(e).strip().splitlines() or [""])[0][:120]
        fail(f"{path} is not a checkpoint of this project ({type(e).__name__}: {first_line})")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        fail(f"{path} is not a checkpoint of this project (no '{CHECKPOINT_FORMAT}' marker)")
    if script is not None and state["script"] != script:
        fail(f"{path} was written by {state['script']}.py, not {script}.py")
    if config is not None:
        # A setting the checkpoint does not name was added to the script after it was written (e.g. --precision):
        # the checkpoint says nothing about it, so the given value stands and older runs continue after an update.
        # One it names that the script no longer has is refused (the run cannot go on as it was).
        changed = sorted(k for k in state["config"] if not same_setting(k, config.get(k), state["config"][k]))
        if changed:
            diffs = ", ".join(f"{k}: {state['config'].get(k)!r} -> {config.get(k)!r}" for k in changed)
            fail(f"cannot resume {path} with a different config ({diffs})")
    return state


# ---------------------------------------------------------------------------------------------------------------------
# Linear probe entry point: python common.py probe CHECKPOINT
# ---------------------------------------------------------------------------------------------------------------------
PROBED_SCRIPTS = ("moco_ring", "adco", "mmcl")  # image backbones on IMAGE_DATASETS


def probe_main(argv: Sequence[str] | None = None) -> None:
    parser = OneLineErrorParser(description="Linear probe of a saved checkpoint's frozen backbone",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint.pt written by one of the image method scripts")
    parser.add_argument("--epochs", type=int, default=100, help="epochs of logistic regression on cached features")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (cosine decay)")
    parser.add_argument("--data-root", default=None, help="override the data root stored in the checkpoint")
    parser.add_argument("--train-size", type=int, default=0, help="evenly spaced training subset (0: all)")
    parser.add_argument("--test-size", type=int, default=0, help="evenly spaced test subset (0: all)")
    parser.add_argument("--workers", type=int, default=4, help="data loader processes")
    args = parser.parse_args(argv)
    for flag, check in (("epochs", at_least(1)), ("lr", POSITIVE), ("train_size", NON_NEGATIVE),
                        ("test_size", NON_NEGATIVE), ("workers", NON_NEGATIVE)):
        if not check.accepts(getattr(args, flag)):
            parser.error(f"argument --{flag.replace('_', '-')}: {getattr(args, flag)} is out of range "
                         f"(must be {check.rule})")
    state = load_checkpoint(args.checkpoint)
    if state["script"] not in PROBED_SCRIPTS:
        fail(f"{args.checkpoint} was written by {state['script']}.py; the probe reads the image scripts' checkpoints "
             f"({', '.join(s + '.py' for s in PROBED_SCRIPTS)})")
    cfg = state["config"]
    device = init_distributed()
    data = load_image_data(cfg["dataset"], args.data_root or cfg["data_root"], cfg["image_size"], download=True)
    backbone = build_backbone(cfg["arch"], cfg["stem"]).to(device)
    backbone.load_state_dict(state["backbone"], strict=True)
    tf = eval_transform(data.image_size, data.mean, data.std)
    loaders = [make_loader(Transformed(evenly_spaced_subset(d, n), tf), 256, args.workers, device)
               for d, n in ((data.memory, args.train_size), (data.test, args.test_size))]
    (train_x, train_y), (test_x, test_y) = (extract_features(backbone, loader, device) for loader in loaders)
    top1 = linear_probe(train_x, train_y, test_x, test_y, data.num_classes, args.epochs, args.lr)
    print(json.dumps({"checkpoint": args.checkpoint, "step": state["step"], "linear_top1": round(top1, 2)}))


# ---------------------------------------------------------------------------------------------------------------------
# Curves entry point: python common.py plot RUN_DIR [RUN_DIR ...] --out curves.png
# ---------------------------------------------------------------------------------------------------------------------
BOOKKEEPING_KEYS = ("step", "epoch", "lr", "images_per_s")  # logged every step, but not what a reader compares


def read_curves(run_dir: str) -> dict[str, tuple[list[int], list[float]]]:
    """metrics.jsonl of one run as {quantity: (steps, values)}, every numeric quantity except the bookkeeping ones.
    A step logged twice (a resumed run of an older version replayed it) keeps its last value."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        fail(f"{run_dir} is not a run directory: {path} not found")
    by_key: dict[str, dict[int, float]] = {}
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            fail(f"{path}:{line_number} is not a metrics record (one JSON object with a step per line)")
        for key, value in record.items():
            if key not in BOOKKEEPING_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
                by_key.setdefault(key, {})[step] = float(value)
    return {key: (sorted(values), [values[s] for s in sorted(values)]) for key, values in by_key.items()}


def plot_quantities(curves: dict[str, dict]) -> list[str]:
    """The panels to draw, loss and kNN first, then each method's own quantities in alphabetical order."""
    keys = {key for run in curves.values() for key in run}
    first = [key for key in ("loss", "knn_top1") if key in keys]
    return first + sorted(keys - set(first))


def plot_main(argv: Sequence[str] | None = None) -> None:
    parser = OneLineErrorParser(description="Curves of one or more runs: every quantity in metrics.jsonl against "
                                            "the step (except " + ", ".join(BOOKKEEPING_KEYS) + "), one line per run",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="--out-dir of a run (holds metrics.jsonl)")
    parser.add_argument("--out", default="curves.png", help="image to write (the extension picks the format)")
    parser.add_argument("--only", nargs="+", metavar="QUANTITY", default=None,
                        help="draw these quantities only, in this order (default: every one logged)")
    args = parser.parse_args(argv)
    # The runs are read first, so a bad directory gets its own error whether or not matplotlib is installed.
    curves = {run_dir: read_curves(run_dir) for run_dir in args.run_dirs}
    quantities = plot_quantities(curves)
    if args.only:
        missing = [key for key in args.only if key not in quantities]
        if missing:
            fail(f"no run logged {', '.join(missing)} (logged: {', '.join(quantities)})")
        quantities = args.only
    if not quantities:
        fail("nothing to plot: the runs' metrics.jsonl hold no quantity but " + ", ".join(BOOKKEEPING_KEYS))
    try:
        import matplotlib
    except ImportError:
        fail("python common.py plot needs matplotlib, which the scripts themselves do not: pip install matplotlib")
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    columns = min(3, len(quantities))
    rows = math.ceil(len(quantities) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    colours = {run_dir: f"C{i % 10}" for i, run_dir in enumerate(curves)}  # one colour per run in every panel
    for ax, key in zip(axes.flat, quantities):
        for run_dir, run in curves.items():
            if key in run:
                steps, values = run[key]
                sparse = len(steps) < 30  # kNN is measured a few times per run: show the points
                ax.plot(steps, values, color=colours[run_dir], marker="o" if sparse else None, markersize=3,
                        label=Path(run_dir).name)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(quantities):]:
        ax.set_visible(False)
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="upper right", fontsize=8)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda p: fig.savefig(p, dpi=90, format=out.suffix.lstrip(".") or "png"))
    print(f"wrote {out}: {', '.join(quantities)} for {len(curves)} run(s)")


COMMANDS = {"probe": probe_main, "plot": plot_main}

if __name__ == "__main__":
    if sys.argv[1:2] == [] or sys.argv[1] not in COMMANDS:
        sys.exit("usage: python common.py probe CHECKPOINT [...] | python common.py plot RUN_DIR [RUN_DIR ...] "
                 "[--out curves.png] (see --help of each)")
    run_main(lambda: COMMANDS[sys.argv[1]](sys.argv[2:]))
