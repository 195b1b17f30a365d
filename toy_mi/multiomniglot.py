"""Spatial-MultiOmniglot: how SMoCo, XMoCo and CM-ACC cope as the mutual information I(x;y) grows.

Paper: Ma, Zeng, McDuff, Song, "Active Contrastive Learning of Audio-Visual Video Representations", ICLR 2021,
Appendix B "Effect of mutual information", Figure 3(a) (../shared/papers/cm_acc_active_contrastive_av.txt), after
Ozair et al. 2019. Its claim: with 50K training pairs all methods reach ~99% up to 2 characters (e^I = 55, 2,860 is
below 50K); from 3 characters (e^I = 137,280) plain MoCo (SMoCo) falls sharply, XMoCo beats it up to 5 characters
and matches it from 6, and CM-ACC stays best by a large margin.

Protocol (numbers are cited in the code as "line N"):
     1  for c = 1..9:  train, eval = Spatial-MultiOmniglot(c)      # toy_mi/omniglot_data.py: 50K training pairs,
                                                                    #   drawers 1-15; evaluation pairs, drawers 16-20
     2      for method in SMoCo (both readings), XMoCo, CM-ACC (and seed in --seeds):
     3          pretrain with moco_acc.main (x is modality v, y is a)  # METHODS: the moco_acc flags of each
     4          f = frozen backbone of the x query encoder              # global-average-pooled features
     5          for i = 1..c: linear classifier features(x) -> z_i on training x's, accuracy on eval x's
     6          accuracy[c][method] = mean over the c grid positions
  I(x;y) = sum_i ln l_i nats (4.007 for one character, 34.435 for nine). Chance is 1/l_i (1.8% for one character).
  A random-initialised backbone is probed the same way ("random init" column) as the floor of line 5. Line 5's
  accuracies are kept per position (how much of each character the encoder learned), and each run's final loss.

Choices the paper leaves open, and mine:
  * SMoCo, two readings, both run. Fig. 3a calls it "the regular MoCo" and explains its fall from 3 characters by
    e^I exceeding the training-set size, an argument about contrasting x with y: `smoco` ("SMoCo x-y") is one MoCo
    for both images, one query encoder, one key encoder and one queue (moco_acc --shared-encoder), x queries
    against y keys and the reverse, a random dictionary. Table 1 calls the unimodal models S_MoCo, "two models on
    visual clips and audio clips, respectively": `smoco_shift` ("SMoCo x-x'") is two MoCos (moco_acc --unimodal),
    x against a shifted x' and y against y', instance discrimination within a modality.
    Caution on x-y, from the construction: x and y are identically distributed (y shows the next character of each
    cell), and a shared encoder scores pairs symmetrically, s(a, b) = g(a).g(b). Summed over the characters of an
    alphabet, sum_z u_z.u_{z+1} <= sum_z |u_z|^2 (u_z: mean embedding of character z), so a y that shows the
    query's own characters scores, on average, at least as high as its partner. Caution on x-x': its positive is
    the same drawing, so nothing asks its encoder to ignore the handwriting (the drawer), which the probe tests on
    held-out drawers.
  * Views. moco_acc wants two views of each modality: each is the pair's image with every cell shifted by up to
    --shift pixels, independently. Without them SMoCo x-x' would compare an image with itself. The cross-modal
    methods contrast x's query view with y's key view, so for them the shifts only add noise.
  * Data layout (grid, drawers, 32 px cells from 105 px by area averaging): see toy_mi/omniglot_data.py.
  * Encoders: the full protocol uses moco_acc's image ResNet-18 (3x3 stem, no max-pool); --quick and --preset cpu
    the small CNN (--preset cpu on 16 px cells, --downsample 2). The features probed are the backbone's (before the
    projection head and the additional FC layer).
  * Own partners: moco_acc masks each query's own partner out of its negatives (item ids tracked beside the
    dictionaries), so CM-ACC's pool cannot hand a query its own positive as a negative while XMoCo's queue does not.
  * Probe: logistic regression (common.linear_probe: standardised L2-normalised features, SGD, cosine lr) on the
    first --probe-train training pairs' x, tested on --num-eval pairs drawn by the held-out drawers.
  * Final loss: moco_acc's loss per direction (x queries and y queries; SMoCo x-x': x against x', y against y'),
    averaged over the last 10% of the steps. Chance, a critic that scores all K+1 candidates alike, is ln(K+1). The
    floor is E ln(1 + B), B ~ Binomial(K, 1/e^I): the loss of the true critic p(y|x)/p(y), for which only the B
    negatives that show the partner's characters tie with it (loss_floor; for the x-y methods with a random
    queue). InfoNCE's bound I >= ln(K+1) - loss cannot exceed ln(K+1) = 8.25 nats at K = 3,840, below I from c = 3.
  * The paper states no settings for this toy; the defaults are its main experiments' (Section 5: M = 128,
    K = 30 x 128, N = 300 x 128, m = 0.999, tau = 0.7, Adam 1e-3 after 500 warm-up steps) with 50 epochs (mine).

The CPU preset (--preset cpu), what it keeps of the paper and what it scales:
  * Pairs and dictionary as the paper: 50,000 training pairs and K = 3,840 keys per modality, so K is 7.7% of the
    pairs as in the paper and e^I(2) = 2,860 < K < 50,000 < e^I(3) = 137,280. A query's dictionary then holds
    K / e^I negatives showing all of its partner's characters: 70 at c = 1, 1.3 at c = 2, 0.03 at c = 3, so from 3
    characters the loss can be won by reading some of the characters, the regime change Fig. 3a is about. (Fewer
    pairs with K in the same ratio would put K below e^I(2); K = 3,840 with 5,000 pairs would make the dictionary
    most of the data.)
  * Scaled: the small CNN on 16 px cells, M = 32 (so the queue spans 120 steps), tau 0.2 (at the paper's 0.7 the
    small CNN's features barely moved in the --quick runs), m 0.99 (the key encoder's time constant, 100 steps, is
    short beside the run; 0.9 hurt with 5,000 pairs and K = 1,024: XMoCo 54.3% against 58.3% at c = 3), 50
    warm-up steps, 2 epochs = 3,124 steps. CM-ACC's pool is the smallest moco_acc allows (K + 2M = 3,904) and is
    redrawn every 40 steps, 0.4 of the key encoder's time constant 1 / (1 - m) = 100 steps, as one epoch of 390
    steps is of 1,000 at the paper's m = 0.999 (kept for a whole epoch, stale pool keys become a shortcut: see
    moco_acc.py).
  * Why 2 epochs: at 1 epoch (1,562 steps, seed 0, c = 1) SMoCo x-y reached 94.3%, XMoCo 95.7%, CM-ACC 92.7%; at 2
    epochs SMoCo x-y 95.6%, CM-ACC 96.5%. SMoCo x-x' does not get there at any length tried: 91.9% at 1 epoch,
    91.1% at 2 (93.2-93.8% at 1 epoch with lr 3e-3, an MLP head or --shift 4; 90.0% with tau 0.1). Nothing else
    tried beat the seed noise (about 1.5 points): lr 3e-3 (XMoCo 91.6%, CM-ACC 93.1%), an MLP head (XMoCo 93.6%,
    CM-ACC 88.2%), a longer probe (30 or 100 epochs, 10,000 or 50,000 training x's: within 0.6 points).
  * Cost, single-threaded CPU seconds per training step on the machine below: 55 (c = 1), 145 (c = 3) and 210 ms
    (c = 5) for XMoCo, SMoCo x-y and x-x'; CM-ACC about 2.5 times as much (140 ms at c = 1: the pool's rendering
    and key encoding). A run at c = 1 takes 180 CPU s (CM-ACC 380), its probe 4 s. The sweep, 75 runs, estimated
    from these per-step times: about 3.2 h per seed on one core, so about 5 h for 3 seeds with --jobs 2, more than
    twice the 2 hours the preset was meant for. One epoch would halve it at the price of c = 1 convergence (above).

Commands:
    python toy_mi/multiomniglot.py --quick --json quick.json       # 1 and 2 characters, small CNN, CPU
    python toy_mi/multiomniglot.py --preset cpu --json cpu.json --plot cpu.png   # the scaled protocol (above)
    python toy_mi/multiomniglot.py --json full.json --plot fig3a.png --jobs 0    # 1..9 characters, ResNet-18: one GPU
    python toy_mi/multiomniglot.py --help                          # every flag, from the Config block below
  A flag typed on the command line keeps its value under a preset, even the default's (`--preset cpu --seeds 0`
  runs seed 0 only). --jobs N (default 2, one per core) runs N runs at once, each its own process with one thread
  (OMP_NUM_THREADS=1): on the 2-core CPU two threads per process beside a second job made a step 10-40x slower.
  Each run's directory under --out-dir holds moco_acc's config.json, metrics.jsonl, checkpoint.pt (saved every
  epoch and every 10 minutes), data.json, log.txt and probe.json; a rerun of the command resumes or reuses every
  (c, method, seed), so a killed sweep continues where it ended, and SIGTERM (or Ctrl-C) saves the running runs'
  checkpoints first. The JSON is rewritten whenever a character count is complete. The datasets are cached in
  --cache-dir. --omniglot also accepts torchvision's PNG download (ROOT/omniglot-py/images_background/...).

Results (the sweep's table and figure, with commands, commits and machines): RESULTS.md, section
"toy_mi: Spatial-MultiOmniglot".
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
# `python toy_mi/multiomniglot.py` puts toy_mi/ on sys.path, not the repo root where moco_acc.py lives.
sys.path.insert(0, str(REPO))
import common  # noqa: E402
import engine  # noqa: E402
import moco_acc  # noqa: E402
from engine import NON_NEGATIVE, option  # noqa: E402

sys.path.insert(0, str(REPO / "toy_mi"))
import omniglot_data  # noqa: E402

DATASET = "multiomniglot"  # the name this script registers in moco_acc.DATASETS
# App. B calls SMoCo "the regular MoCo": one encoder (with its key encoder and queue) for x and y alike, x against
# y and the reverse. smoco_shift is Table 1's S_MoCo, "two models", one per modality: x against a shifted x'.
METHODS = {"smoco": ["--shared-encoder", "--sampling", "random"],  # one MoCo, x against y, a random queue
           "smoco_shift": ["--unimodal", "--sampling", "random"],  # two MoCos, x against x' and y against y'
           "xmoco": ["--sampling", "random"],  # x against y, one encoder each, the queue holds the batch's own keys
           "cmacc": ["--sampling", "active"]}  # x against y, the dictionary holds actively sampled keys
INIT = "init"  # the random-initialised x encoder, probed as the floor of line 5
SHORT = {INIT: "random init", "smoco": "SMoCo x-y", "smoco_shift": "SMoCo x-x'", "xmoco": "XMoCo", "cmacc": "CM-ACC"}
LONG = {INIT: "random init (untrained x encoder)",
        "smoco": "SMoCo x-y: one MoCo, x against y (App. B's regular MoCo)",
        "smoco_shift": "SMoCo x-x': two MoCos, x against shifted x' (Table 1's S_MoCo)",
        "xmoco": "XMoCo: x against y, random queue",
        "cmacc": "CM-ACC: x against y, actively sampled dictionary"}
MEAN, STD = 0.086, 0.245  # ink fraction of the nine alphabets' 32 px glyphs, all characters and drawers
LOSS_TAIL = 0.1  # the final loss is the mean of the logged losses over the last 10% of the steps


# ---------------------------------------------------------------------------------------------------------------------
# Config: every field is a flag; its help text and default come from here and nowhere else.
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Config:
    # data (toy_mi/omniglot_data.py)
    omniglot: str = option(str(REPO.parent / "shared" / "data" / "omniglot"),
                           "Omniglot: a folder with images_background.npz + alphabets.json, or torchvision's PNG "
                           "download (ROOT, ROOT/omniglot-py or its images_background folder)")
    cache_dir: str = option("~/.cache/negsampling/multiomniglot", "where built datasets are cached (.pt files)")
    characters: tuple[int, ...] = option((1, 2, 3, 4, 5, 6, 7, 8, 9), "numbers of characters c to run (1..9)")
    num_train: int = option(50000, "training pairs, drawers 1-15 (the paper: 50K)")
    num_eval: int = option(10000, "evaluation pairs, held-out drawers 16-20 (probe test set)")
    shift: int = option(2, "view augmentation: every 32 px cell moves by up to this many pixels, per view")
    downsample: int = option(1, "average-pool the 32 px cells by this factor before the encoders (2: 16 px, a "
                                "quarter of the compute)", choices=(1, 2, 4))
    # pretraining: forwarded to moco_acc.py
    methods: tuple[str, ...] = option(("smoco", "smoco_shift", "xmoco", "cmacc"), "methods to pretrain (smoco: "
                                      "one MoCo, x against y; smoco_shift: two MoCos, x against shifted x')",
                                      choices=tuple(METHODS))
    arch: str = option("resnet18", "encoders (moco_acc --arch): image ResNet-18 or the small CPU CNN",
                       choices=("resnet18", "small"))
    mlp: bool = option(False, "MoCo v2's MLP projection head instead of a linear one (moco_acc --mlp)")
    batch_size: int = option(128, "mini-batch M of pairs")
    moco_k: int = option(3840, "dictionary size K per modality. Set it from --num-train as the paper does: K = "
                               "3,840 for 50K pairs (7.7%%) lies between e^I at c = 2 (2,860) and at c = 3 "
                               "(137,280), so a query's dictionary holds negatives showing all of its partner's "
                               "characters up to c = 2 and almost none from c = 3 (the CPU preset keeps both)")
    pool_size: int = option(38400, "CM-ACC candidate pool N per modality")
    pool_every: int = option(0, "CM-ACC: steps between pool redraws (0: at each epoch start, Alg. 2 lines 6-7)")
    moco_t: float = option(0.7, "temperature tau of the contrastive loss (Section 5: 0.7)")
    moco_m: float = option(0.999, "momentum of the key encoders")
    lr: float = option(1e-3, "Adam learning rate after the warm-up")
    warmup_steps: int = option(500, "linear warm-up steps")
    epochs: int = option(50, "pretraining epochs over the training pairs")
    max_steps: int = option(0, "end every pretraining at this step (0: all epochs)")
    bn_splits: int = option(8, "BatchNorm groups standing for GPUs (shuffle BN on one device)")
    workers: int = option(4, "data loader processes")
    # probe
    probe_train: int = option(10000, "training pairs whose x trains the per-position linear classifiers")
    probe_epochs: int = option(100, "epochs of each linear classifier")
    probe_lr: float = option(0.1, "SGD learning rate of the linear classifiers (cosine decay)")
    # run
    preset: str = option("none", "flags not typed on the command line take the preset's values (PRESETS below): "
                                 "'quick' (CI-sized), 'cpu' (c = 1..5, 4 methods, 3 seeds: the scaled protocol)",
                         choices=("none", "quick", "cpu"))
    quick: bool = option(False, "the same as --preset quick")
    data_seed: int = option(0, "seed of the dataset draw (the same pairs for every run)")
    seeds: tuple[int, ...] = option((0,), "seeds of the pretraining and the probes: one run per (c, method, seed)")
    jobs: int = option(2, "runs at once, each in its own single-threaded process (OMP_NUM_THREADS=1): one per CPU "
                          "core; 0: every run in this process with torch's threads (one GPU, or a debugger)",
                       check=NON_NEGATIVE)
    unit: str = option("", "run only this 'c method seed' (method 'init': probe the random encoder) in this process, "
                           "single-threaded, and save its probe.json: what each --jobs process runs")
    out_dir: str = option("runs/multiomniglot", "one moco_acc run directory per (c, method, seed) under here")
    json: str = option("", "write {'results': [{'characters', 'mi_nats', 'e_mi', 'num_train', 'moco_k', "
                           "'chance_loss', 'floor_loss', 'chance_probe', <method>: {'mean', 'std', 'runs', "
                           "'positions', 'loss'}, ...}]} here ('init': the random encoder; accuracies in [0, 1]); "
                           "rewritten whenever a character count is complete")
    plot: str = option("", "save the figure here: probe and loss against c, probe per grid position (needs "
                           "matplotlib; skipped without it)")


# --quick: 1 and 2 characters, 3,200 training pairs, the small CNN, one epoch of 100 steps of 32 pairs per run. tau
# = 0.2: at the paper's 0.7 the small CNN's features barely move in so few steps. The CM-ACC pool is redrawn every
# 25 steps: drawn once per epoch, the single epoch would pick every negative from keys of the random-initialised
# encoder (its loss then fell to 1.2 against 11 for XMoCo: easy negatives).
QUICK = {"characters": (1, 2), "num_train": 3200, "num_eval": 1000, "arch": "small", "batch_size": 32,
         "moco_k": 512, "pool_size": 1024, "pool_every": 25, "moco_t": 0.2, "moco_m": 0.99, "warmup_steps": 10,
         "epochs": 1, "bn_splits": 4, "workers": 0, "probe_train": 3000, "probe_epochs": 30}
# --preset cpu: sized in the docstring ("The CPU preset").
CPU = {**QUICK, "characters": (1, 2, 3, 4, 5), "num_train": 50000, "num_eval": 2000, "batch_size": 32,
       "moco_k": 3840, "pool_size": 3904, "pool_every": 40, "epochs": 2, "warmup_steps": 50, "bn_splits": 2,
       "probe_train": 10000, "seeds": (0, 1, 2), "downsample": 2, "out_dir": "runs/multiomniglot_cpu"}
PRESETS = {"quick": QUICK, "cpu": CPU}


def field_flags(name: str) -> set[str]:
    """The command-line spellings of a field: '--moco-k' (and '--no-quick' for a boolean's negation)."""
    flag = name.replace("_", "-")
    return {f"--{flag}", f"--no-{flag}"}


def typed_flags(argv: list[str] | None) -> set[str]:
    """The flags typed on the command line, whatever their values ('--moco-k 3840' and '--moco-k=3840' alike), read
    from the tokens as engine.parse_config reads them for a resumed run."""
    return {token.split("=", 1)[0] for token in (sys.argv[1:] if argv is None else argv) if token.startswith("--")}


def resolve_preset(cfg: Config, typed: set[str] = frozenset()) -> Config:
    """With --preset (or --quick), every field whose flag was not typed takes the preset's value: a typed flag keeps
    its value even when it equals the default (`--preset cpu --seeds 0` runs seed 0 only)."""
    preset = "quick" if cfg.quick else cfg.preset
    if preset == "none":
        return cfg
    return dataclasses.replace(cfg, **{k: v for k, v in PRESETS[preset].items() if not field_flags(k) & typed})


def parse(argv: list[str] | None = None) -> Config:
    return resolve_preset(engine.parse_config(Config, argv, __doc__), typed_flags(argv))


def explicit_argv(cfg: Config) -> list[str]:
    """Every field as a flag: a --jobs process parses back exactly this config, whatever the defaults and presets."""
    argv = []
    for f in dataclasses.fields(Config):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]  # str(float) is its repr: parses back to the same float
    return argv


def parse_unit(cfg: Config) -> tuple[int, str, int]:
    parts = cfg.unit.split()
    if (len(parts) != 3 or not parts[0].isdigit() or not parts[2].isdigit()
            or parts[1] not in (INIT, *METHODS)):
        common.fail(f"--unit '{cfg.unit}': expected 'c method seed' with a method of {', '.join((INIT, *METHODS))}")
    return int(parts[0]), parts[1], int(parts[2])


def check_config(cfg: Config) -> None:
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        common.fail("run this sweep as one process (--jobs starts its own processes, one run each)")
    most = len(omniglot_data.ALPHABETS)
    characters = (parse_unit(cfg)[0],) if cfg.unit else cfg.characters
    if not characters or any(not 1 <= c <= most for c in characters):
        common.fail(f"--characters {' '.join(map(str, characters))}: each must be 1..{most}")
    if not 0 < cfg.probe_train <= cfg.num_train:
        common.fail(f"--probe-train {cfg.probe_train} must be 1..--num-train ({cfg.num_train})")
    if cfg.num_eval < 1 or cfg.shift < 0:
        common.fail(f"--num-eval {cfg.num_eval} must be positive and --shift {cfg.shift} non-negative")
    if not cfg.seeds:
        common.fail("--seeds: give at least one")


# ---------------------------------------------------------------------------------------------------------------------
# Spatial-MultiOmniglot as moco_acc's paired data: x is modality v, y is modality a
# ---------------------------------------------------------------------------------------------------------------------
def to_input(image: torch.Tensor, downsample: int = 1) -> torch.Tensor:
    """uint8 [...x]HxW ink -> [...x]3x(H/s)x(W/s) standardised (s = downsample, by area average), the RGB input of
    moco_acc's image encoders (a batch of images takes one pass)."""
    ink = image.float().unsqueeze(-3) / 255  # [...x]1xHxW
    if downsample > 1:
        ink = F.avg_pool2d(ink, downsample)
    return ((ink - MEAN) / STD).expand(*ink.shape[:-3], 3, -1, -1)


def shifted_views(cells: torch.Tensor, views: int, shift: int, generator: torch.Generator) -> torch.Tensor:
    """c x 32 x 32 -> views x c x 32 x 32: in every view every cell translated by its own (dy, dx) in [-shift,
    shift], zeros moving in. One indexing op for all views and cells: per-cell slicing cost more than the encoders'
    step in the CM-ACC pool, which renders N pairs at every redraw."""
    c = cells.shape[0]
    if shift == 0:
        return cells.expand(views, -1, -1, -1)
    padded = F.pad(cells, (shift, shift, shift, shift))  # c x (32+2s) x (32+2s)
    offsets = torch.randint(0, 2 * shift + 1, (views, c, 2), generator=generator)  # views x c x (dy, dx)
    span = torch.arange(omniglot_data.CELL)
    rows = (offsets[..., 0, None] + span)[..., :, None]  # views x c x 32 x 1
    cols = (offsets[..., 1, None] + span)[..., None, :]  # views x c x 1 x 32
    return padded[torch.arange(c).view(1, c, 1, 1), rows, cols]  # views x c x 32 x 32


class PairViews(torch.utils.data.Dataset):
    """moco_acc's common.PairData.train: (index, seed) -> ([x, x'], [y, y'], z_1, (z_1 + 1) mod l_1), two shifted
    views of each image of pair `index`, every random choice a function of `seed` (exact resume). The labels (first
    character) only feed moco_acc's count of distinct classes among the chosen negatives."""

    def __init__(self, split: omniglot_data.MultiOmniglot, shift: int, downsample: int = 1):
        self.split, self.shift, self.downsample = split, shift, downsample

    def __len__(self):
        return len(self.split)

    def __getitem__(self, index_and_seed: tuple[int, int]):
        index, seed = index_and_seed
        s = self.split
        c = len(s.sizes)
        cells = torch.cat([s.cells(s.z[index], int(s.d_x[index])), s.cells(s.z_y[index], int(s.d_y[index]))])
        views = shifted_views(cells, 2, self.shift, torch.Generator().manual_seed(seed))  # 2 x 2c x 32 x 32
        cell = views.shape[-2:]
        # (view, image, cell) -> (image, view, cell): x, x', y, y'
        images = s.tile_views(views.reshape(2, 2, c, *cell).transpose(0, 1).reshape(4, c, *cell))  # 4 x 32m x 32n
        x0, x1, y0, y1 = to_input(images, self.downsample).unbind()  # x, x', y, y': 3 x (32m/s) x (32n/s) each
        return [x0, x1], [y0, y1], int(s.z[index, 0]), int(s.z_y[index, 0])


class XImages(torch.utils.data.Dataset):
    """Probe input: index -> (unshifted x, its characters z: c)."""

    def __init__(self, split: omniglot_data.MultiOmniglot, size: int, downsample: int = 1):
        self.split, self.size, self.downsample = split, size, downsample

    def __len__(self):
        return self.size

    def __getitem__(self, i: int):
        return to_input(self.split.x(i), self.downsample), self.split.z[i]


def register(train: omniglot_data.MultiOmniglot, shift: int, downsample: int = 1) -> None:
    """Plug the training split into moco_acc as --dataset multiomniglot (a loader function in DATASETS)."""
    moco_acc.DATASETS[DATASET] = lambda _cfg: common.PairData(
        PairViews(train, shift, downsample), kinds=("image", "image"), in_channels=(3, 3), num_classes=train.sizes[0],
        knn={})


def run_dir(cfg: Config, c: int, method: str, seed: int) -> Path:
    return Path(cfg.out_dir) / f"c{c}" / method / f"seed{seed}"


def pretrain_argv(cfg: Config, method: str, seed: int, directory: Path) -> list[str]:
    """moco_acc.py flags of one run (line 3); --resume continues or reuses a run already in the directory."""
    argv = ["--dataset", DATASET, "--arch", cfg.arch, "--batch-size", str(cfg.batch_size),
            "--moco-k", str(cfg.moco_k), "--pool-size", str(cfg.pool_size), "--moco-t", str(cfg.moco_t),
            "--moco-m", str(cfg.moco_m), "--lr", str(cfg.lr), "--warmup-steps", str(cfg.warmup_steps),
            "--epochs", str(cfg.epochs), "--max-steps", str(cfg.max_steps), "--bn-splits", str(cfg.bn_splits),
            "--workers", str(cfg.workers), "--seed", str(seed), "--out-dir", str(directory),
            "--knn-every", "0", "--log-every", "10", *(["--mlp"] if cfg.mlp else []), *METHODS[method]]
    if "active" in METHODS[method]:  # only where a pool exists, so the other runs' configs never change with it
        argv += ["--pool-every", str(cfg.pool_every)]
    if (directory / "checkpoint.pt").is_file():
        argv += ["--resume", str(directory / "checkpoint.pt")]
    return argv


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation: one linear classifier per grid position on the frozen x backbone (lines 4-6), and the final loss
# ---------------------------------------------------------------------------------------------------------------------
def x_backbone(cfg: Config, checkpoint: Path | None) -> torch.nn.Module:
    """The x query encoder's backbone (moco_acc's modality v) from a checkpoint, or freshly initialised."""
    backbone = common.build_modality_backbone("image", cfg.arch, 3, bn_splits=1)
    if checkpoint is not None:
        saved = engine.load_checkpoint(str(checkpoint), "moco_acc")["backbone"]  # ModuleDict {v, a}
        backbone.load_state_dict({k[2:]: v for k, v in saved.items() if k.startswith("v.")}, strict=True)
    return backbone


def probe_positions(backbone: torch.nn.Module, train: omniglot_data.MultiOmniglot,
                    evaluation: omniglot_data.MultiOmniglot, cfg: Config, seed: int,
                    device: torch.device) -> list[float]:
    """Line 5: held-out accuracy in [0, 1] of a linear classifier per grid position (row-major); line 6 averages."""
    backbone = backbone.to(device)
    loaders = [common.make_loader(XImages(split, size, cfg.downsample), 256, cfg.workers, device)
               for split, size in ((train, cfg.probe_train), (evaluation, cfg.num_eval))]
    (train_f, train_z), (test_f, test_z) = (common.extract_features(backbone, loader, device) for loader in loaders)
    # train_f: P x D, train_z: P x c; test_f: E x D, test_z: E x c
    return [common.linear_probe(train_f, train_z[:, i], test_f, test_z[:, i], l, cfg.probe_epochs, cfg.probe_lr,
                                seed=seed) / 100 for i, l in enumerate(train.sizes)]


def final_loss(directory: Path) -> dict:
    """Mean logged loss per direction over the last LOSS_TAIL of the steps: {'v': x queries, 'a': y queries,
    'mean': their average}, in nats (moco_acc logs 'loss' as the sum of the two)."""
    records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss_v" in r]
    last = max(r["step"] for r in records)
    tail = [r for r in records if r["step"] > (1 - LOSS_TAIL) * last] or records[-1:]
    out = {m: sum(r[f"loss_{m}"] for r in tail) / len(tail) for m in ("v", "a")}
    return {**out, "mean": (out["v"] + out["a"]) / 2}


def loss_floor(k: int, e_mi: float) -> float:
    """E ln(1 + B), B ~ Binomial(K, 1/e^I): the InfoNCE loss of the true critic p(y|x)/p(y) = e^I [y shows z + 1],
    0 otherwise, with K negatives drawn from the marginal: only the B negatives showing the partner's characters
    tie with it. The lowest expected loss of any critic; a temperature-scaled cosine cannot reach it."""
    b = torch.arange(k + 1, dtype=torch.float64)  # K+1
    log_p = torch.distributions.Binomial(k, probs=torch.tensor(1 / e_mi, dtype=torch.float64)).log_prob(b)
    return (log_p.exp() * torch.log1p(b)).sum().item()


def data_settings(cfg: Config) -> dict:
    """What a run's training data and x images depend on beside c (the run directory's name)."""
    return {"num_train": cfg.num_train, "data_seed": cfg.data_seed, "shift": cfg.shift, "downsample": cfg.downsample,
            "arch": cfg.arch}


def run_settings(cfg: Config, method: str, seed: int, directory: Path) -> dict:
    """Everything a saved probe depends on: the data, the pretraining (moco_acc's flags, without --resume; None for
    the random encoder) and the probe."""
    pretrain = None if method == INIT else [a for a in pretrain_argv(cfg, method, seed, directory)
                                            if a not in ("--resume", str(directory / "checkpoint.pt"))]
    return {"data": data_settings(cfg), "pretrain": pretrain, "probe": {
        "probe_train": cfg.probe_train, "num_eval": cfg.num_eval, "probe_epochs": cfg.probe_epochs,
        "probe_lr": cfg.probe_lr}}


def saved_probe(cfg: Config, c: int, method: str, seed: int) -> dict | None:
    """The probe.json of run (c, method, seed) if it was saved with these settings: a finished run is neither
    retrained nor probed again, so a rerun of the sweep (or of an interrupted one) does only what is missing. A run
    asked to train further (a larger --max-steps) resumes from its checkpoint and is probed again."""
    directory = run_dir(cfg, c, method, seed)
    path = directory / "probe.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("settings") == run_settings(cfg, method, seed, directory):
            return saved
    return None


def check_data(cfg: Config, directory: Path) -> None:
    """moco_acc checks its own flags when it resumes, not the toy's data: data.json does, so that a checkpoint is
    never continued (or reused) on other pairs, views or image sizes."""
    path = directory / "data.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != data_settings(cfg):
            diffs = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} -> {v!r}"
                              for k, v in data_settings(cfg).items() if saved.get(k) != v)
            common.fail(f"{directory} was trained on other data ({diffs}); to start a new run, pass another --out-dir")
    else:
        directory.mkdir(parents=True, exist_ok=True)
        engine.atomic_write(path, lambda p: p.write_text(json.dumps(data_settings(cfg)) + "\n"))


def run_unit(cfg: Config, c: int, method: str, seed: int, device: torch.device) -> dict:
    """Lines 3-5 for one (c, method, seed): pretrain (or resume, or reuse) and probe; saves and returns probe.json:
    {'settings', 'accuracy' (line 6), 'positions' (line 5), 'loss' (final_loss; None for init), 'wall_s', 'cpu_s'
    (this process's CPU time: what the run costs on a free core, as it runs single-threaded)}."""
    tic, cpu = time.perf_counter(), time.process_time()
    train, evaluation = omniglot_data.load_or_build(cfg.omniglot, c, cfg.num_train, cfg.num_eval, cfg.data_seed,
                                                    cfg.cache_dir)
    directory = run_dir(cfg, c, method, seed)
    checkpoint, loss = None, None
    if method != INIT:
        check_data(cfg, directory)
        register(train, cfg.shift, cfg.downsample)
        moco_acc.main(pretrain_argv(cfg, method, seed, directory))  # line 3: trains, resumes or reuses
        checkpoint, loss = directory / "checkpoint.pt", final_loss(directory)
    common.seed_everything(seed)  # the random encoder's weights (init) and the classifiers' initial weights
    positions = probe_positions(x_backbone(cfg, checkpoint), train, evaluation, cfg, seed, device)  # lines 4-5
    saved = {"settings": run_settings(cfg, method, seed, directory), "accuracy": sum(positions) / len(positions),
             "positions": positions, "loss": loss, "wall_s": time.perf_counter() - tic,
             "cpu_s": time.process_time() - cpu}
    directory.mkdir(parents=True, exist_ok=True)
    engine.atomic_write(directory / "probe.json", lambda p: p.write_text(json.dumps(saved) + "\n"))
    return saved


# ---------------------------------------------------------------------------------------------------------------------
# The sweep: one process per run (--jobs), results gathered from the runs' probe.json
# ---------------------------------------------------------------------------------------------------------------------
def all_units(cfg: Config) -> list[tuple[int, str, int]]:
    """Line 1-2's runs, smallest c first (its table row is complete soonest)."""
    return [(c, m, s) for c in cfg.characters for s in cfg.seeds for m in (INIT, *cfg.methods)]


def die_with_parent() -> None:
    """In a --jobs process, before it starts: SIGTERM when the sweep process dies, even by SIGKILL, so a run never
    outlives its sweep (and never meets a second copy of itself when the sweep is started again). Linux only."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def run_jobs(cfg: Config, todo: list[tuple[int, str, int]], done) -> list[str]:
    """Run the units, cfg.jobs at a time, each as `multiomniglot.py <every flag> --unit 'c method seed'` in its own
    single-threaded process (on a 2-core CPU two threads per process, beside another job, made a step 10-40x
    slower). Its output goes to log.txt in its run directory; done(unit, probe) is called as each one ends.
    SIGTERM or Ctrl-C here: the running units get SIGTERM, save their checkpoints and exit. Returns the failures."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_MININTERVAL": "60"}
    pending, running, failures = list(todo), {}, []
    previous = None
    if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit("error: ended by SIGTERM; the same command "
                                                                       "continues the sweep"))
    try:
        while pending or running:
            while pending and len(running) < cfg.jobs:
                unit = pending.pop(0)
                directory = run_dir(cfg, *unit)
                directory.mkdir(parents=True, exist_ok=True)
                worker = dataclasses.replace(cfg, preset="none", quick=False, json="", plot="", jobs=0,
                                             unit=" ".join(map(str, unit)))
                with open(directory / "log.txt", "a") as log:  # the child holds its own descriptor
                    running[unit] = subprocess.Popen(
                        [sys.executable, str(Path(__file__).resolve()), *explicit_argv(worker)], stdout=log,
                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                        preexec_fn=die_with_parent)  # a group of its own: a terminal's Ctrl-C reaches the sweep only
            time.sleep(0.5)
            for unit, process in list(running.items()):
                if process.poll() is None:
                    continue
                del running[unit]
                probe = saved_probe(cfg, *unit)
                if process.returncode or probe is None:
                    log = run_dir(cfg, *unit) / "log.txt"
                    failures.append(f"{' '.join(map(str, unit))} (exit {process.returncode}, {log})")
                    print(f"c={unit[0]} {SHORT[unit[1]]} seed {unit[2]} failed (exit {process.returncode}); last "
                          f"lines of {log}:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-5:]),
                          flush=True)
                else:
                    done(unit, probe)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        for process in running.values():
            process.terminate()  # moco_acc saves a checkpoint at SIGTERM and exits
        for process in running.values():
            try:
                process.wait(timeout=300)
            except subprocess.TimeoutExpired:
                process.kill()
    return failures


def summary(runs: list[float]) -> dict:
    """{'mean', 'std' (sample std over seeds, 0 for one run), 'runs'} of accuracies in [0, 1] (or losses)."""
    t = torch.tensor(runs, dtype=torch.float64)
    return {"mean": t.mean().item(), "std": t.std().item() if len(runs) > 1 else 0.0, "runs": runs}


def collect(cfg: Config, sizes: dict[int, tuple[int, ...]]) -> list[dict]:
    """One row per character count whose runs have all saved their probes (sizes[c]: the alphabet sizes l_i)."""
    rows = []
    for c in cfg.characters:
        saved = {m: [saved_probe(cfg, c, m, s) for s in cfg.seeds] for m in (INIT, *cfg.methods)}
        if any(p is None for probes in saved.values() for p in probes):
            continue
        e_mi = math.prod(sizes[c])
        row = {"characters": c, "mi_nats": omniglot_data.mutual_information(sizes[c]), "e_mi": float(e_mi),
               "num_train": cfg.num_train, "moco_k": cfg.moco_k, "chance_loss": math.log(cfg.moco_k + 1),
               "floor_loss": loss_floor(cfg.moco_k, e_mi), "chance_probe": sum(1 / l for l in sizes[c]) / c}
        for m, probes in saved.items():
            row[m] = summary([p["accuracy"] for p in probes])
            per_position = [summary([p["positions"][i] for p in probes]) for i in range(c)]
            row[m]["positions"] = {"mean": [s["mean"] for s in per_position], "std": [s["std"] for s in per_position]}
            row[m]["loss"] = None if m == INIT else summary([p["loss"]["mean"] for p in probes])
        rows.append(row)
    return rows


def format_table(results: list[dict], columns: list[str]) -> str:
    """Probe (mean +- std over seeds, %), final loss per direction (nats) and the probe per grid position."""
    lines = [f"{'chars':>5} {'I(x;y) nats':>11} {'e^I':>9} " + " ".join(f"{SHORT[m]:>13}" for m in columns)]
    for r in results:
        lines.append(f"{r['characters']:>5} {r['mi_nats']:>11.3f} {r['e_mi']:>9.3g} "
                     + " ".join(f"{100 * r[m]['mean']:>6.1f} +- {100 * r[m]['std']:>4.1f}" for m in columns))
    trained = [m for m in columns if m != INIT]
    lines.append(f"final loss per direction (nats), K = {results[0]['moco_k'] if results else '-'}:")
    lines.append(f"{'chars':>5} {'ln(K+1)':>8} {'floor':>6} " + " ".join(f"{SHORT[m]:>13}" for m in trained))
    for r in results:
        lines.append(f"{r['characters']:>5} {r['chance_loss']:>8.2f} {r['floor_loss']:>6.2f} "
                     + " ".join(f"{r[m]['loss']['mean']:>6.2f} +- {r[m]['loss']['std']:>4.2f}" for m in trained))
    lines.append("probe per grid position (%, mean over seeds; position 1 is Tifinagh, then the paper's order):")
    for r in results:
        lines.append(f"{r['characters']:>5} " + "  ".join(
            f"{SHORT[m]} " + "/".join(f"{100 * a:.0f}" for a in r[m]["positions"]["mean"]) for m in columns))
    return "\n".join(lines)


def save_plot(results: list[dict], columns: list[str], path: str, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path}")
        return
    colors = {m: f"C{i}" for i, m in enumerate((INIT, *METHODS))}
    chars = [r["characters"] for r in results]
    fig = plt.figure(figsize=(13, 8.5))
    grid = fig.add_gridspec(2, len(columns), height_ratios=(1.25, 1), hspace=0.45, wspace=0.3)
    half = (len(columns) + 1) // 2
    ax = fig.add_subplot(grid[0, :half])
    for m in columns:
        ax.errorbar(chars, [100 * r[m]["mean"] for r in results], yerr=[100 * r[m]["std"] for r in results],
                    marker="o", capsize=3, color=colors[m], label=LONG[m])
    ax.plot(chars, [100 * r["chance_probe"] for r in results], ":", color="0.5", label="chance (mean of 1/l_i)")
    above = [r["characters"] for r in results if r["e_mi"] > r["num_train"]]
    if above:  # the paper's mechanism: e^I beyond the number of training pairs
        ax.axvspan(min(above) - 0.5, max(above) + 0.5, color="0.92", zorder=0, label="e^I > training pairs")
    ax.set_xlabel("characters c (e^I below)")
    ax.set_ylabel("held-out probe accuracy (%),\nmean over positions")
    ax.set_xticks(chars, [f"{r['characters']}\n{r['e_mi']:.3g}" for r in results])
    ax.set_title("probe of the frozen x encoder (mean +- std over seeds)", fontsize=10)
    loss_ax = fig.add_subplot(grid[0, half:])
    for m in columns[1:]:
        loss_ax.errorbar(chars, [r[m]["loss"]["mean"] for r in results], yerr=[r[m]["loss"]["std"] for r in results],
                         marker="o", capsize=3, color=colors[m])
    loss_ax.plot(chars, [r["chance_loss"] for r in results], "--", color="0.3", label="chance, ln(K+1)")
    loss_ax.plot(chars, [r["floor_loss"] for r in results], ":", color="0.3",
                 label="floor of the true critic, E ln(1 + B)")
    loss_ax.set_xlabel("characters c")
    loss_ax.set_ylabel("final loss per direction (nats)")
    loss_ax.set_xticks(chars)
    loss_ax.set_title(f"contrastive loss, last {100 * LOSS_TAIL:.0f}% of the steps, K = {results[0]['moco_k']}",
                      fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    loss_handles, loss_labels = loss_ax.get_legend_handles_labels()
    fig.legend(handles + loss_handles, labels + loss_labels, loc="upper left", bbox_to_anchor=(0.91, 0.89),
               fontsize=8, frameon=False)
    for i, m in enumerate(columns):  # how much each grid position is learned
        pos_ax = fig.add_subplot(grid[1, i])
        for j, r in enumerate(results):
            c = r["characters"]
            pos_ax.errorbar(range(1, c + 1), [100 * a for a in r[m]["positions"]["mean"]],
                            yerr=[100 * s for s in r[m]["positions"]["std"]], marker="o", markersize=3, capsize=2,
                            color=plt.cm.viridis(j / max(1, len(results) - 1)), label=f"c = {c}")
        pos_ax.set_ylim(0, 100)
        pos_ax.set_xticks(range(1, max(chars) + 1))
        pos_ax.set_xlabel("grid position")
        pos_ax.set_title(SHORT[m], fontsize=10, color=colors[m])
        if i == 0:
            pos_ax.set_ylabel("probe accuracy per position (%)")
    pos_handles, pos_labels = pos_ax.get_legend_handles_labels()
    fig.legend(pos_handles, pos_labels, loc="center left", bbox_to_anchor=(0.91, 0.25), fontsize=8, frameon=False,
               title="characters")
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"plot written to {path}")


def main(argv: list[str] | None = None) -> dict | None:
    cfg = parse(argv)
    check_config(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.unit:  # one run, in this process (a --jobs process, or by hand)
        torch.set_num_threads(1)  # one core per run (OMP_NUM_THREADS=1 from run_jobs says the same)
        c, method, seed = parse_unit(cfg)
        saved = saved_probe(cfg, c, method, seed) or run_unit(cfg, c, method, seed, device)
        print(f"c={c} {SHORT[method]} seed {seed}: probe {100 * saved['accuracy']:.1f}%", flush=True)
        return None
    start = time.perf_counter()
    columns = [INIT, *cfg.methods]
    sizes = {}
    for c in cfg.characters:  # line 1: build (or read) every dataset once, before any run reads it
        train, _ = omniglot_data.load_or_build(cfg.omniglot, c, cfg.num_train, cfg.num_eval, cfg.data_seed,
                                               cfg.cache_dir)
        sizes[c] = train.sizes
    units = all_units(cfg)
    todo = [u for u in units if saved_probe(cfg, *u) is None]
    print(f"{len(units)} runs ({len(cfg.characters)} c x {len(cfg.seeds)} seeds x ({len(cfg.methods)} methods + "
          f"random init)): {len(units) - len(todo)} already done, {len(todo)} to run, "
          f"{cfg.jobs or 'in this'} process{'es' if cfg.jobs != 1 else ''}", flush=True)
    complete = len(collect(cfg, sizes))

    def write_json():
        nonlocal complete
        results = collect(cfg, sizes)
        if cfg.json and len(results) > complete:  # whenever a character count is complete
            output = {"results": results, "config": dataclasses.asdict(cfg), "wall_s": time.perf_counter() - start}
            Path(cfg.json).write_text(json.dumps(output, indent=2) + "\n")
        complete = len(results)

    finished = 0

    def done(unit, probe):
        nonlocal finished
        finished += 1
        c, method, seed = unit
        loss = "" if probe["loss"] is None else f", loss {probe['loss']['mean']:.2f} per direction"
        print(f"[{finished}/{len(todo)}, {time.perf_counter() - start:.0f} s] c={c} {SHORT[method]} seed {seed}: "
              f"probe {100 * probe['accuracy']:.1f}% (positions "
              f"{' '.join(f'{100 * a:.0f}' for a in probe['positions'])}){loss}, {probe['wall_s']:.0f} s "
              f"({probe.get('cpu_s', 0):.0f} CPU s)", flush=True)
        write_json()

    failures = []
    if cfg.jobs == 0:
        for unit in todo:
            done(unit, run_unit(cfg, *unit, device))
    else:
        failures = run_jobs(cfg, todo, done)
    results = collect(cfg, sizes)
    wall_s = time.perf_counter() - start
    output = {"results": results, "config": dataclasses.asdict(cfg), "wall_s": wall_s}
    if results:
        print(format_table(results, columns))
    print(f"{len(todo) - len(failures)} of {len(todo)} runs in {wall_s:.0f} s on {device.type}")
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(output, indent=2) + "\n")
    if cfg.plot and results:
        save_plot(results, columns, cfg.plot, f"Spatial-MultiOmniglot (CM-ACC Fig. 3a): {cfg.num_train} training "
                                              f"pairs, K = {cfg.moco_k}, {len(cfg.seeds)} seed(s)")
    if failures:
        common.fail(f"{len(failures)} run(s) failed, the rest are saved (the same command retries them): "
                    + "; ".join(failures))
    return output


if __name__ == "__main__":
    main()
