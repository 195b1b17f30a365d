"""The run machinery under the method scripts: nothing in here is an equation, and a first read can skip it.

- flags: each script's typed Config becomes its argparse flags (`option`, `parse_config`), checked in one line;
- processes: `init_distributed` joins torchrun's process group (a world of one otherwise);
- data path: `pretrain_batches` decodes the images once and augments them on the device (DeviceAugment), or
  falls back to PIL in loader workers, drawing the same views either way;
- run directory and checkpoints: config.json, metrics.jsonl, checkpoint.pt written atomically, resumed exactly;
- stopping: a checkpoint every few minutes and on SIGTERM / Ctrl-C (CheckpointTimer);
- two commands on finished runs:
    python engine.py probe runs/moco_ring/checkpoint.pt     linear probe of the frozen backbone
    python engine.py plot runs/moco_ring runs/adco --out curves.png    curves (needs matplotlib)
"""
from __future__ import annotations

import argparse
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
from tqdm import tqdm

import common
from common import DataError, fail, is_main, world_size

CHECKPOINT_FORMAT = "negsampling-checkpoint-v1"


def run_main(main: Callable[[], Any]) -> None:
    """A script's entry point: run `main`, turn a DataError (re-raised by the DataLoader with the worker's traceback
    folded into its message) into one error line, and leave the process group cleanly."""
    try:
        main()
    except DataError as e:
        last_line = str(e).strip().splitlines()[-1]
        fail(last_line.split("DataError: ", 1)[-1])
    except KeyboardInterrupt:  # a second Ctrl-C while stopping: the user chose not to wait for the save
        print("stopped at once, without saving", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT)
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


AUGMENT_CHOICES = ("device", "cpu")  # --augment: see pretrain_batches


def script_tag(config_class: type) -> str:
    """A script is its file: the run's tag (in checkpoints, in the default --out-dir) is the name of the file that
    defines its Config, so `cp moco_ring.py my_ring.py` is a new method with its own runs."""
    return Path(sys.modules[config_class.__module__].__file__).stem


@dataclasses.dataclass
class RunConfig:
    """The options every script shares: where the run lives, how it is logged, evaluated and saved."""
    seed: int = option(0, "random seed (model init, data order, augmentations)", check=NON_NEGATIVE)
    workers: int = option(min(4, os.cpu_count() or 1), "data loader processes per training process (by default "
                                                        "4, or this machine's CPUs if fewer)", check=NON_NEGATIVE)
    precision: str = option("auto", "autocast of the encoders: 'bf16' or 'fp32' (losses stay fp32); auto: bf16 "
                                    "on a GPU, fp32 on a CPU", choices=common.PRECISION_CHOICES)
    out_dir: str = option("", "run directory: config.json, metrics.jsonl, checkpoint.pt (default: runs/<script>)")
    resume: str = option("", "checkpoint.pt or run directory to continue from; re-running a command continues the "
                             "run its --out-dir holds")
    max_steps: int = option(0, "stop after this global step (0: train all epochs); the schedules keep --epochs",
                            check=NON_NEGATIVE)
    log_every: int = option(10, "steps between metrics.jsonl records (the loss is read from the device, and "
                                "checked for NaN, only then)", check=at_least(1))
    checkpoint_minutes: float = option(10.0, "minutes between checkpoints; they are also written at each epoch end, "
                                             "at the last step and on SIGTERM/SIGINT", check=NON_NEGATIVE)
    knn_every: int = option(5, "epochs between kNN evaluations (0: only at the end)", check=NON_NEGATIVE)
    knn_k: int = option(200, "neighbours of the kNN monitor", check=at_least(1))
    knn_t: float = option(0.1, "temperature of the kNN monitor's vote weights", check=POSITIVE)
    knn_bank_size: int = option(0, "training items in the kNN bank, evenly spaced (0: all)", check=NON_NEGATIVE)
    knn_test_size: int = option(0, "test items the kNN monitor classifies, evenly spaced (0: all)", check=NON_NEGATIVE)


@dataclasses.dataclass
class ImageRunConfig(RunConfig):
    """RunConfig plus the image data and backbone options of the image scripts (moco_ring, adco, mmcl)."""
    dataset: str = option("cifar10", "pretraining data ('folder': ImageFolder root/train, root/test)",
                          choices=common.IMAGE_DATASETS)
    data_root: str = option("./data", "dataset folder (torchvision downloads into it)")
    image_size: int = option(0, "crop side in pixels; 0: the dataset's own (32 CIFAR, 96 STL-10)", check=NON_NEGATIVE)
    augment: str = option("device", "where the views are made: 'device' decodes the images once into memory and "
                                    "augments each batch on the training device (falls back to cpu when they do "
                                    "not fit in a quarter of it); 'cpu' PIL in the loader processes",
                          choices=AUGMENT_CHOICES)
    arch: str = option("resnet18", "backbone ('small': a 4-layer CNN for CPU runs)",
                       choices=("resnet18", "resnet50", "small"))
    stem: str = option("auto", "ResNet stem: 'cifar' 3x3 conv without max-pool; auto: cifar below 100 px",
                       choices=("auto", "cifar", "imagenet"))
    channels_last: str = option("auto", "channels_last memory format for images and encoders; auto: on a GPU",
                                choices=common.CHANNELS_LAST_CHOICES)

    def settle(self, data: common.ImageData) -> None:
        """Resolve the options that depend on the data: the crop side and the ResNet stem."""
        self.image_size = data.image_size
        self.stem = self.stem if self.stem != "auto" else ("cifar" if data.image_size < 100 else "imagenet")


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
        if field.default == "":  # derived when empty (--out-dir): the help says from what, argparse adds nothing
            help += "%(default)s"
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
            value = values[field.name]
            value = " ".join(map(str, value)) if isinstance(value, tuple) else value
            parser.error(f"argument --{field.name.replace('_', '-')}: {value} is out of range (must be {check.rule})")
    if "out_dir" in values and not values["out_dir"]:
        values["out_dir"] = f"runs/{script_tag(config_class)}"
    if "resume" in values and "out_dir" in values:
        # The flags typed on this command line (not their defaults): those are what a resumed run must match.
        typed = {token.split("=", 1)[0] for token in (sys.argv[1:] if argv is None else argv)}
        given = {action.dest: values[action.dest] for action in parser._actions
                 if action.dest in values and typed.intersection(action.option_strings)}
        values = continue_run(values, given, script_tag(config_class))
    return config_class(**values)


def continue_run(values: dict, given: dict, script: str) -> dict:
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
    state = load_checkpoint(str(path))
    if state["script"] != script:  # never resume, never overwrite another script's run
        fail(f"{path} holds a run of {state['script']}.py, not of {script}.py: pass another --out-dir")
    saved = state["config"]
    different = sorted(name for name, value in given.items()
                       if name in saved and not same_setting(name, value, saved[name]))
    if different:
        diffs = ", ".join(f"--{name.replace('_', '-')} {saved[name]!r} -> {given[name]!r}" for name in different)
        fail(f"{path} was trained with other settings ({diffs}); to start a new run, pass another --out-dir")
    resumed = {**values, **{name: value for name, value in saved.items() if name in values and name not in given}}
    return {**resumed, "resume": str(path)}


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


# ---------------------------------------------------------------------------------------------------------------------
# Device augmentation and in-memory datasets: the MoCo v2 / SimCLR recipe of `common.pretrain_transform`,
# applied to a uint8 batch on the training device, every sample with parameters drawn from its own seed
# ---------------------------------------------------------------------------------------------------------------------
# Why not kornia: it draws a batch's parameters from the global generator as one tensor, so a sample's crop would
# depend on its batch position and on the RNG state (exact resume and 1 == N processes would need a wrapper around
# every sampler), and it would be a run-time dependency for about 200 lines. The ops below are torchvision's own
# formulas; tests/test_augment.py checks them op by op against torchvision.transforms.functional.
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
    common.EpochSampler's) -> NxCxSxS float32, S = image_size. Sample i's parameters are `seeded_uniforms(seeds[i], ..,
    stream=view)`: a pure function of its seed, hence exact resume and 1-process == N-process parity."""

    CPU_CHUNK = 128  # images per slice on a CPU: measured fastest; 64 or 96 ~1.1x slower, 256 ~1.3x

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], min_scale: float = 0.2):
        self.size, self.min_scale = image_size, min_scale
        self.mean, self.std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
        self.blur_kernel = int(0.1 * image_size) // 2 * 2 + 1 if image_size >= 64 else 0  # as common.pretrain_transform

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
        # Flipping last (common.pretrain_transform's order) or first gives the same image: the colour ops act per pixel
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
    loader = torch.utils.data.DataLoader(DecodedImages(dataset), batch_size=256, num_workers=workers,
                                         collate_fn=list, generator=torch.Generator())
    pairs = [pair for batch in loader for pair in batch]
    sizes = {image.shape[:2] for image, _ in pairs}
    if len(sizes) > 1:
        fail(f"the images are not all one size ({', '.join('x'.join(map(str, s)) for s in sorted(sizes)[:3])}...): "
             "the device augmentation holds them as one tensor; use --augment cpu")
    images = torch.from_numpy(np.stack([image for image, _ in pairs])).permute(0, 3, 1, 2)  # NxHxWx3 -> Nx3xHxW
    return ImagesInMemory(images.contiguous().to(device), torch.tensor([label for _, label in pairs]))


class DecodedImages(torch.utils.data.Dataset):
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

    def __init__(self, memory: ImagesInMemory, augment: DeviceAugment, num_views: int, sampler: common.EpochSampler,
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
    """What a training loop logs, kept on the device between log steps (no host sync per step). `add`
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


def pretrain_batches(data: common.ImageData, augment: str, sampler: common.EpochSampler, num_views: int,
                     batch_size: int, workers: int, device: torch.device, yield_index: bool = False):
    """The training batches of an image script: per step (views, labels), or (views, training indices) with
    `yield_index` (IRing's bank); views: `num_views` tensors NxCxSxS, augmented by the MoCo v2 / SimCLR recipe with
    the seeds `sampler` hands out. --augment device (when the images fit, augment_path): decoded once into memory
    on `device` and augmented there in batches (DeviceViewLoader); cpu: PIL in `workers` loader processes. Both
    paths draw the same distribution of views; a resumed run and N processes see the views one process would."""
    if augment_path(augment, data.pretrain, device) == "device":
        return DeviceViewLoader(load_into_memory(data.pretrain, device, workers),
                                DeviceAugment(data.image_size, data.mean, data.std), num_views, sampler, batch_size,
                                yield_index)
    transform = common.pretrain_transform(data.image_size, data.mean, data.std)
    images = IndexAsLabel(data.pretrain) if yield_index else data.pretrain
    views = common.AugmentedViews(images, common.MultiView([transform] * num_views))
    return common.make_loader(views, batch_size, workers, device, sampler, persistent=True)


class IndexAsLabel(torch.utils.data.Dataset):
    """(image, label) -> (image, index): AugmentedViews hands the second item through, so the loader yields (views,
    index). Pretraining never reads the label."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index: int):
        return self.base[index][0], index


class EvaluationAbandoned(Exception):
    """Raised inside an evaluation by the first Ctrl-C / SIGTERM, so that the save follows within seconds."""


class CheckpointTimer:
    """When a training loop should stop to save: every `minutes` of wall time, and at once after SIGTERM or SIGINT
    (a preempted job, Ctrl-C). The first signal says at once what will happen; an evaluation in progress is
    abandoned (world of one: under torchrun the ranks would wait for each other); a second Ctrl-C quits without
    saving.

    Under torchrun the ranks must agree (their clocks differ, and a signal may reach one rank only): one all-reduce
    of two flags every DDP_CHECK_EVERY calls (an all-reduce read on the host waits for the GPU; every rank calls
    `due` once per step, so they count alike). At world size one, no collective."""

    DDP_CHECK_EVERY = 10

    def __init__(self, minutes: float, device: torch.device):
        self.interval, self.device = minutes * 60.0, device
        self.last_save, self.stopping, self.signal_name = time.monotonic(), False, None
        self.calls, self.handlers, self.evaluating = 0, {}, False
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            self.handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _on_signal(self, signum: int, frame) -> None:
        if self.signal_name is not None:  # a second Ctrl-C: the user does not want to wait for the save
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        abandon = self.evaluating and world_size() == 1
        print(f"\nstopping ({self.signal_name}): " + ("abandoning the evaluation, " if abandon else "") +
              "saving after this step; press Ctrl-C again to quit without saving", file=sys.stderr, flush=True)
        if abandon:
            raise EvaluationAbandoned

    @property
    def exit_code(self) -> int:
        """The shell's convention, 128 + the signal (130 after Ctrl-C, 143 after SIGTERM or another rank's)."""
        return 128 + (signal.SIGINT if self.signal_name == "SIGINT" else signal.SIGTERM)

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

    def stop_requested(self) -> bool:
        """Whether to stop after the save: the ranks agreed at the last `due`, or (alone) a signal came since."""
        return self.stopping or (world_size() == 1 and self.signal_name is not None)

    def close(self) -> None:
        """Give the signals their previous handlers back (the scripts also run inside tests and notebooks)."""
        for sig, handler in self.handlers.items():
            signal.signal(sig, handler)
        self.handlers = {}


def check_batch_size(batch_size: int, num_items: int, bn_splits: int = 1) -> None:
    """The opening checks every script makes of its batch: it splits evenly over the processes, fits in the data,
    and (one process imitating several GPUs) splits evenly into the BatchNorm groups."""
    if batch_size % world_size():
        fail(f"--batch-size {batch_size} does not split evenly over {world_size()} processes")
    if batch_size > num_items:
        fail(f"--batch-size {batch_size} is larger than the dataset ({num_items} items)")
    if world_size() == 1 and batch_size % bn_splits:
        fail(f"--batch-size {batch_size} is not divisible by --bn-splits {bn_splits}")


class Run:
    """One training run of a method script, so that its `main` reads like the algorithm:

        run = engine.Run(cfg)                                      # processes and device
        model = run.place(Model(cfg)); optimizer = ...
        run.start(model, {"encoder": optimizer}, model.backbone)   # continues a checkpoint when there is one
        for step, batch in run.steps(loader, sampler, evaluate):
            run.log(train_step(model, optimizer, run.to_device(batch), step))

    `steps` yields the global step about to be trained and its batch, epoch after epoch; around the yield it keeps
    the run directory (created once the first batch has decoded: bad images write nothing), metrics.jsonl, the
    progress bar, the evaluations (`evaluate()` returns a dict of numbers, at every --knn-every epochs and at the
    end), checkpoints (every --checkpoint-minutes, at each epoch end, at the end, on SIGTERM / Ctrl-C), a NaN
    check, and the messages: resuming, stopping, finished, and a one-line summary at the end."""

    def __init__(self, cfg: Any):
        self.cfg, self.tag = cfg, script_tag(type(cfg))
        self.device = init_distributed()
        self.channels_last = common.channels_last(getattr(cfg, "channels_last", "off"), self.device)
        self.step, self.resumed = 0, False
        self.model = self.optimizers = self.backbone = self.dir = None

    def place(self, model: nn.Module) -> nn.Module:
        """The model on this process's device; on a GPU its 2-D convolutions in channels_last (a video encoder's 3-D
        ones stay as they are: that memory format holds 4-D tensors only)."""
        model = model.to(self.device)
        if self.channels_last:
            for module in model.modules():
                if isinstance(module, nn.Conv2d):
                    module.to(memory_format=torch.channels_last)
        return model

    def to_device(self, batch):
        return common.to_device(batch, self.device, self.channels_last)

    def distributed(self, model: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
        """DDP under torchrun, the model itself alone. broadcast_buffers=False: queues and banks are identical on
        every rank by construction, no need to send them each step. find_unused_parameters: some parameters get no
        gradient in some configurations (DDP must then look for them each step, which costs time)."""
        if world_size() == 1:
            return model
        return torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False,
                                                         find_unused_parameters=find_unused_parameters)

    def start(self, model: nn.Module, optimizers: dict[str, torch.optim.Optimizer], backbone: nn.Module) -> None:
        """What a checkpoint holds (`backbone` again on its own, for export), restored when the run continues."""
        self.model, self.optimizers, self.backbone = model, optimizers, backbone
        self.config = dataclasses.asdict(self.cfg)
        if self.cfg.resume:
            state = load_checkpoint(self.cfg.resume, self.tag, self.config)
            model.load_state_dict(state["model"], strict=True)
            for name, optimizer in optimizers.items():
                optimizer.load_state_dict(state["optimizers"][name])
            set_rng_state(state["rng"])
            self.step, self.resumed = state["step"], True

    def is_logged(self, step: int) -> bool:
        """Whether `steps` writes the numbers of the step it just yielded to metrics.jsonl (every --log-every steps
        and the last): a step may measure what costs a device sync (a timing) on those steps only."""
        return (step + 1) % self.cfg.log_every == 0 or step + 1 == self.last_step

    def log(self, stats: dict) -> None:
        """The step's numbers (device tensors are fine: they are read on the host every --log-every steps only)."""
        self.stats = stats

    def steps(self, loader, sampler: common.EpochSampler, evaluate: Callable[[], dict | None],
              show: Sequence[str] = ()):
        cfg, per_epoch = self.cfg, sampler.batches_per_epoch
        self.per_epoch = per_epoch
        total = cfg.epochs * per_epoch
        last = self.last_step = min(total, cfg.max_steps) if cfg.max_steps else total
        where = f"{cfg.out_dir} at step {self.step} of {last} (epoch {self.step // per_epoch + 1} of {cfg.epochs})"
        if self.step >= last:
            if is_main():
                print(f"{cfg.out_dir} is finished: step {self.step} of {last}{last_evaluation(Path(cfg.out_dir))}; "
                      "nothing to do: pass another --out-dir to start a new run")
            return
        if self.resumed and is_main():
            print(f"resuming {where}", flush=True)
        timer, metrics, started = CheckpointTimer(cfg.checkpoint_minutes, self.device), StepMetrics(), time.monotonic()
        progress = tqdm(total=last, initial=self.step, disable=not is_main(), dynamic_ncols=True, smoothing=0,
                        desc=self.tag)
        record: dict = {}
        try:
            while self.step < last:
                epoch, start_batch = divmod(self.step, per_epoch)  # epoch: 0-based here, 1-based in every message
                sampler.set_epoch(epoch, start_batch)
                tic, images = time.perf_counter(), 0
                for batch in loader:
                    if self.dir is None:  # the first batch has decoded: the run directory may now be written
                        self.dir = RunDir(cfg.out_dir, self.config, self.tag, resuming=self.resumed, step=self.step)
                    yield self.step, batch
                    self.step += 1
                    metrics.add(self.step, self.stats)
                    images += cfg.batch_size
                    progress.update()
                    if self.step % cfg.log_every == 0 or self.step == last:
                        record = metrics.pop(self.dir.check_finite)  # the loss is read here only; NaN stops the run
                        shown = [name for name in ("loss", *show) if name in record]
                        progress.set_postfix({name: f"{record[name]:.3f}" for name in shown})
                        self.dir.log({"step": self.step, "epoch": epoch + 1, **record,
                                      "images_per_s": images / (time.perf_counter() - tic)})
                        tic, images = time.perf_counter(), 0
                    if self.step == last or timer.due():  # a checkpoint is due mid-epoch: save below, then go on
                        break
                metrics.pop(self.dir.check_finite)  # no checkpoint of a diverged model
                average_bn_statistics(self.model)
                epochs_done, epoch_end = divmod(self.step, per_epoch)
                if not timer.stop_requested() and (self.step == last or (epoch_end == 0 and cfg.knn_every and
                                                                 epochs_done % cfg.knn_every == 0)):
                    self.evaluate(evaluate, timer, progress)
                save_checkpoint(self.dir.checkpoint_path, self.tag, self.config, self.step, self.model,
                                self.optimizers, self.backbone)
                timer.saved()
                if timer.stop_requested():
                    progress.close()
                    if is_main():
                        print(f"stopped by {timer.signal_name or 'a signal to another rank'} at step {self.step} of "
                              f"{last}; the checkpoint is saved in {self.dir.checkpoint_path}: run the same command "
                              "again to continue", file=sys.stderr)
                    raise SystemExit(timer.exit_code)
        finally:
            progress.close()
            timer.close()
        if is_main():
            elapsed = datetime.timedelta(seconds=round(time.monotonic() - started))
            loss = f", final loss {record['loss']:.4f}" if "loss" in record else ""
            print(f"done at step {self.step} of {last} in {elapsed}{loss}{last_evaluation(self.dir.path)}; "
                  f"checkpoint {self.dir.checkpoint_path}")

    def evaluate(self, evaluate: Callable[[], dict | None], timer: CheckpointTimer, progress) -> None:
        timer.evaluating = True
        try:
            results = evaluate()
        except EvaluationAbandoned:
            return
        finally:
            timer.evaluating = False
        if results and is_main():
            epoch = -(-self.step // self.per_epoch)  # the epoch this step ends or falls in, counted from 1
            self.dir.log({"step": self.step, "epoch": epoch, **results})
            progress.write(f"epoch {epoch} step {self.step}: " +
                           ", ".join(f"{name} {value:.2f}" for name, value in results.items()))


def last_evaluation(run_dir: Path) -> str:
    """', knn_top1 37.90' for the last evaluation metrics.jsonl holds (empty when it holds none)."""
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    evaluated = [r for r in records if not any(key in r for key in ("loss", "images_per_s"))]
    if not evaluated:
        return ""
    return "".join(f", {k} {v:.2f}" for k, v in evaluated[-1].items() if k not in ("step", "epoch"))


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
            # Never lose work (parse_config resumes a run found in --out-dir: only a caller that bypasses it gets here)
            fail(f"--out-dir {out_dir} already holds a run; re-run its command to continue it, or pass another "
                 "--out-dir")
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
# Linear probe entry point: python engine.py probe CHECKPOINT
# ---------------------------------------------------------------------------------------------------------------------
IMAGE_CHECKPOINT_KEYS = ("dataset", "data_root", "image_size", "arch", "stem")  # what the probe rebuilds from


def probe_main(argv: Sequence[str] | None = None) -> None:
    parser = OneLineErrorParser(description="Linear probe of a saved checkpoint's frozen backbone",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint.pt of any image script (moco_ring.py, adco.py, mmcl.py, or a "
                                           "copy of one)")
    parser.add_argument("--epochs", type=int, default=100, help="epochs of logistic regression on cached features")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (cosine decay)")
    parser.add_argument("--data-root", default=None, help="override the data root stored in the checkpoint")
    parser.add_argument("--train-size", type=int, default=0, help="evenly spaced training subset (0: all)")
    parser.add_argument("--test-size", type=int, default=0, help="evenly spaced test subset (0: all)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="data loader processes (by default 4, or this machine's CPUs if fewer)")
    args = parser.parse_args(argv)
    for flag, check in (("epochs", at_least(1)), ("lr", POSITIVE), ("train_size", NON_NEGATIVE),
                        ("test_size", NON_NEGATIVE), ("workers", NON_NEGATIVE)):
        if not check.accepts(getattr(args, flag)):
            parser.error(f"argument --{flag.replace('_', '-')}: {getattr(args, flag)} is out of range "
                         f"(must be {check.rule})")
    state = load_checkpoint(args.checkpoint)
    cfg = state["config"]
    missing = [key for key in IMAGE_CHECKPOINT_KEYS if key not in cfg]
    if missing or cfg["dataset"] not in common.IMAGE_DATASETS:
        fail(f"{args.checkpoint} was written by {state['script']}.py, whose backbone is not an image encoder the probe "
             f"can rebuild (its config lacks {', '.join(missing) or 'an image dataset'})")
    device = init_distributed()
    data = common.load_image_data(cfg["dataset"], args.data_root or cfg["data_root"], cfg["image_size"], download=True)
    backbone = common.build_backbone(cfg["arch"], cfg["stem"]).to(device)
    backbone.load_state_dict(state["backbone"], strict=True)
    tf = common.eval_transform(data.image_size, data.mean, data.std)
    loaders = [common.make_loader(common.WithEvalTransform(common.evenly_spaced_subset(d, n), tf), 256, args.workers,
                                  device)
               for d, n in ((data.memory, args.train_size), (data.test, args.test_size))]
    (train_x, train_y), (test_x, test_y) = (common.extract_features(backbone, loader, device, f"probe: {split}")
                                            for loader, split in zip(loaders, ("train features", "test features")))
    top1 = common.linear_probe(train_x, train_y, test_x, test_y, data.num_classes, args.epochs, args.lr)
    print(json.dumps({"checkpoint": args.checkpoint, "step": state["step"], "linear_top1": round(top1, 2)}))


# ---------------------------------------------------------------------------------------------------------------------
# Curves entry point: python engine.py plot RUN_DIR [RUN_DIR ...] --out curves.png
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


Y_LABELS = {"loss": "loss (nats)", "knn_top1": "kNN top-1 (%)", "knn_top1_v": "kNN top-1, vision (%)",
            "knn_top1_a": "kNN top-1, audio (%)", "ring_lower": "w_l (percentile)", "ring_upper": "w_u (percentile)"}
NOT_A_SETTING = {"out_dir", "resume", "workers", "log_every", "knn_every", "checkpoint_minutes", "max_steps"}


def run_labels(run_dirs: Sequence[str]) -> list[str]:
    """A legend label per run: its script, plus the settings in which runs of the same script differ (so two runs
    of moco_ring.py read 'moco_ring ring_lower=0 ring_upper=100' and 'moco_ring'), from each run's config.json."""
    infos = []
    for run_dir in run_dirs:
        path = Path(run_dir) / "config.json"
        infos.append(json.loads(path.read_text()) if path.is_file() else {"script": Path(run_dir).name, "config": {}})
    labels = []
    for info in infos:
        others = [o["config"] for o in infos if o is not info and o.get("script") == info.get("script")]
        differing = [key for key, value in info["config"].items() if key not in NOT_A_SETTING and
                     any(other.get(key) != value for other in others)]
        labels.append(" ".join([str(info.get("script")), *(f"{key}={info['config'][key]}" for key in differing[:3])]))
    return labels


def plot_main(argv: Sequence[str] | None = None) -> None:
    parser = OneLineErrorParser(description="Curves of one or more runs: every quantity in metrics.jsonl against "
                                            "the step (except " + ", ".join(BOOKKEEPING_KEYS) + "), one line per run",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="--out-dir of a run (holds metrics.jsonl)")
    parser.add_argument("--out", default="curves.png", help="image to write (the extension picks the format)")
    parser.add_argument("--only", nargs="+", metavar="QUANTITY", default=None,
                        help="draw these quantities only, in this order (default: every one logged)")
    parser.add_argument("--labels", nargs="+", metavar="LABEL", default=None,
                        help="legend label of each run, in order (default: its script and the settings in which "
                             "the runs differ)")
    args = parser.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.run_dirs):
        parser.error(f"argument --labels: {len(args.labels)} labels for {len(args.run_dirs)} runs")
    # The runs are read first, so a bad directory gets its own error whether or not matplotlib is installed.
    curves = {run_dir: read_curves(run_dir) for run_dir in args.run_dirs}
    labels = dict(zip(args.run_dirs, args.labels or run_labels(args.run_dirs)))
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
        fail("python engine.py plot needs matplotlib, which the scripts themselves do not: pip install matplotlib")
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    columns = 2 if len(quantities) == 4 else min(3, len(quantities))
    rows = math.ceil(len(quantities) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows + 0.5), squeeze=False)
    colours = {run_dir: f"C{i % 10}" for i, run_dir in enumerate(curves)}  # one colour per run in every panel
    for ax, key in zip(axes.flat, quantities):
        values_drawn = []
        for run_dir, run in curves.items():
            if key in run:
                steps, values = run[key]
                sparse = len(steps) < 30  # kNN is measured a few times per run: show the points
                ax.plot(steps, values, color=colours[run_dir], marker="o" if sparse else None, markersize=4,
                        label=labels[run_dir])
                values_drawn += values
        if key.startswith("knn_") and values_drawn and max(values_drawn) - min(values_drawn) < 2.0:
            middle = (max(values_drawn) + min(values_drawn)) / 2  # a 0.05-point axis would look like a large gap
            ax.set_ylim(middle - 1.0, middle + 1.0)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.set_ylabel(Y_LABELS.get(key, key))
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(quantities):]:
        ax.set_visible(False)
    handles = {label: handle for ax in axes.flat for handle, label in zip(*ax.get_legend_handles_labels())}
    legend_rows = math.ceil(len(handles) / 3)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(3, len(handles)), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.05 * legend_rows / rows, 1, 1))  # the legend below the panels, never on one
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda p: fig.savefig(p, dpi=90, format=out.suffix.lstrip(".") or "png"))
    print(f"wrote {out}: {', '.join(quantities)} for {len(curves)} run(s)")


COMMANDS = {"probe": probe_main, "plot": plot_main}

if __name__ == "__main__":
    if sys.argv[1:2] == [] or sys.argv[1] not in COMMANDS:
        sys.exit("usage: python engine.py probe CHECKPOINT [...] | python engine.py plot RUN_DIR [RUN_DIR ...] "
                 "[--out curves.png] (see --help of each)")
    run_main(lambda: COMMANDS[sys.argv[1]](sys.argv[2:]))
