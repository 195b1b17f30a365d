"""Spatial-MultiOmniglot: how SMoCo, XMoCo and CM-ACC cope as the mutual information I(x;y) grows.

Paper: Ma, Zeng, McDuff, Song, "Active Contrastive Learning of Audio-Visual Video Representations", ICLR 2021,
Appendix B "Effect of mutual information", Figure 3(a) (../shared/papers/cm_acc_active_contrastive_av.txt), after
Ozair et al. 2019. Its claim: with 50K training pairs all methods reach ~99% up to 2 characters (e^I = 55, 2,860 is
below 50K); from 3 characters (e^I = 137,280) plain MoCo (SMoCo) falls sharply, XMoCo beats it up to 5 characters
and matches it from 6, and CM-ACC stays best by a large margin.

Protocol (numbers are cited in the code as "line N"):
     1  for c = 1..9:  train, eval = Spatial-MultiOmniglot(c)      # toy_mi/omniglot_data.py: 50K training pairs,
                                                                    #   drawers 1-15; evaluation pairs, drawers 16-20
     2      for method in SMoCo, XMoCo, CM-ACC (and seed in --seeds):
     3          pretrain with moco_acc.main (x is modality v, y is a)  # METHODS: the moco_acc flags of each
     4          f = frozen backbone of the x query encoder              # global-average-pooled features
     5          for i = 1..c: linear classifier features(x) -> z_i on training x's, accuracy on eval x's
     6          accuracy[c][method] = mean over the c grid positions
  I(x;y) = sum_i ln l_i nats (4.007 for one character, 34.435 for nine). Chance is 1/l_i (1.8% for one character).
  A random-initialised backbone is probed the same way ("random init" column) as the floor of line 5.

Choices the paper leaves open, and mine:
  * SMoCo. The paper calls it "the regular MoCo" and explains its fall from 3 characters by e^I exceeding the
    training-set size, an argument about contrasting x with y. So `smoco` is one MoCo for both images: one query
    encoder, one key encoder and one queue (moco_acc --shared-encoder), x queries against y keys and the reverse,
    a random dictionary. Caution, from the construction: x and y are identically distributed (y shows the next
    character of each cell), and a shared encoder scores pairs symmetrically, s(a, b) = g(a).g(b). Summed over the
    characters of an alphabet, sum_z u_z.u_{z+1} <= sum_z |u_z|^2 (u_z: mean embedding of character z), so a y that
    shows the query's own characters scores, on average, at least as high as its partner: this reading cannot
    rank the partner first by character identity at any c, whatever e^I is. `smoco_shift` (x against a shifted x',
    y against y', two MoCos: moco_acc --unimodal) is the other reading, instance discrimination within a modality.
  * Views. moco_acc wants two views of each modality: each is the pair's image with every cell shifted by up to
    --shift pixels, independently. Without them SMoCo (x against x') would compare an image with itself. The
    cross-modal methods contrast x's query view with y's key view, so for them the shifts only add noise.
  * Data layout (grid, drawers, 32 px cells from 105 px by area averaging): see toy_mi/omniglot_data.py.
  * Encoders: the full protocol uses moco_acc's image ResNet-18 (3x3 stem, no max-pool); --quick and --preset cpu
    the small CNN (--preset cpu on 16 px cells, --downsample 2). The features probed are the backbone's (before the
    projection head and the additional FC layer).
  * Own partners: moco_acc masks each query's own partner out of its negatives (item ids tracked beside the
    dictionaries), so CM-ACC's pool cannot hand a query its own positive as a negative while XMoCo's queue does not.
  * Probe: logistic regression (common.linear_probe: standardised L2-normalised features, SGD, cosine lr) on the
    first --probe-train training pairs' x, tested on --num-eval pairs drawn by the held-out drawers.
  * The paper states no settings for this toy; the defaults are its main experiments' (Section 5: M = 128,
    K = 30 x 128, N = 300 x 128, m = 0.999, tau = 0.7, Adam 1e-3 after 500 warm-up steps) with 50 epochs (mine).

Commands:
    python toy_mi/multiomniglot.py --quick --json quick.json       # 1 and 2 characters, small CNN, CPU
    python toy_mi/multiomniglot.py --preset cpu --json cpu.json --plot cpu.png   # the scaled protocol (below)
    python toy_mi/multiomniglot.py --json full.json --plot fig3a.png  # 1..9 characters, ResNet-18: one GPU
    python toy_mi/multiomniglot.py --help                          # every flag, from the Config block below
  One process (it calls moco_acc.main in-process for every run); each run's directory under --out-dir holds
  moco_acc's config.json, metrics.jsonl, checkpoint.pt (saved every epoch) and probe.json, and a rerun resumes or
  reuses it, so an interrupted sweep continues where it stopped (the JSON is rewritten after every c). The dataset is cached
  in --cache-dir. --omniglot also accepts torchvision's PNG download (ROOT/omniglot-py/images_background/...).

Results measured (2-core AMD EPYC CPU, no GPU, torch 2.14.1, shared with other jobs, OMP_NUM_THREADS=1):
    python toy_mi/multiomniglot.py --preset cpu --json cpu.json --plot cpu.png
  5,000 training pairs, small CNN on 16 px cells, 156 steps of 32 pairs, K 1024, tau 0.2, CM-ACC pool 1536 redrawn
  every 40 steps; mean +- std over seeds 0-2 of the held-out probe (mean over grid positions); wall time 3,244 s
  for the 36 runs (load 12-20), and 359 s for the x-x' column (--methods smoco xmoco cmacc smoco_shift):
  chars  I(x;y) nats      e^I   random init        SMoCo        XMoCo       CM-ACC   SMoCo x-x'
      1        4.007       55    65.9 +- 2.1  80.6 +- 1.5  81.9 +- 2.0  81.8 +- 1.9  86.2 +- 0.5
      2        7.959     2860    46.4 +- 1.1  59.5 +- 2.1  62.3 +- 1.0  60.4 +- 3.2  73.1 +- 0.3
      3       11.830   137280    27.3 +- 1.6  38.2 +- 1.6  36.3 +- 3.5  36.1 +- 2.0  52.8 +- 1.1
      4       15.680  6452160    24.3 +- 1.3  32.2 +- 1.2  31.6 +- 2.9  33.8 +- 2.5  48.1 +- 3.0
  Not reproduced: SMoCo does not collapse past e^I = 5,000 (at c = 3 it has the highest mean, within noise),
  CM-ACC does not degrade least (it leads at c = 4 by less than one std), XMoCo does not sit between; all lose
  accuracy with c at about the pace of the random encoder; x-x' learns most at every c and does not collapse. Why, as far as I checked: training has barely begun. Final losses (both directions; chance 2 ln 1025
  = 13.9): SMoCo 12.1-12.2, XMoCo 11.2-11.5, CM-ACC 8.8-10.2 at every c; the probe at c = 1 is 81%, not 99%.
  The paper's mechanism needs the contrastive task solved from a few characters; near chance, no method is
  there, and the probe measures early feature learning. CM-ACC's lower loss comes with pool keys up to 40 steps
  old (moco_acc's stale-key shortcut). Reaching the paper's regime needs ~10x longer runs (50 epochs of 50K in
  the paper): hours here, not run. Own partners in the dictionary (masked): CM-ACC 18-21% of queries, XMoCo 1.4%.
    python toy_mi/multiomniglot.py --quick --json quick.json       (CI-sized: 1-2 characters, 100 steps)
  Before the masking and the shared-encoder SMoCo (one seed, 16 min): random init 75.4 / 46.4%, SMoCo x-x'
  92.8 / 62.3%, XMoCo 89.6 / 53.5%, CM-ACC 87.2 / 55.5% at 1 / 2 characters.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
# `python toy_mi/multiomniglot.py` puts toy_mi/ on sys.path, not the repo root where moco_acc.py lives.
sys.path.insert(0, str(REPO))
import common  # noqa: E402
import moco_acc  # noqa: E402
from common import option  # noqa: E402

sys.path.insert(0, str(REPO / "toy_mi"))
import omniglot_data  # noqa: E402

DATASET = "multiomniglot"  # the name this script registers in moco_acc.DATASETS
# App. B calls SMoCo "the regular MoCo": one encoder (with its key encoder and queue) for x and y alike, x against
# y and the reverse. smoco_shift is this script's first reading, two MoCos of x against a shifted x' (and y, y').
METHODS = {"smoco": ["--shared-encoder", "--sampling", "random"],  # one MoCo, x against y, a random queue
           "xmoco": ["--sampling", "random"],  # x against y, one encoder each, the queue holds the batch's own keys
           "cmacc": ["--sampling", "active"],  # x against y, the dictionary holds actively sampled keys
           "smoco_shift": ["--unimodal", "--sampling", "random"]}  # two MoCos, x against x' and y against y'
NAMES = {"init": "random init", "smoco": "SMoCo", "xmoco": "XMoCo", "cmacc": "CM-ACC", "smoco_shift": "SMoCo x-x'"}
MEAN, STD = 0.086, 0.245  # ink fraction of the nine alphabets' 32 px glyphs, all characters and drawers


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
    methods: tuple[str, ...] = option(("smoco", "xmoco", "cmacc"), "methods to pretrain", choices=tuple(METHODS))
    arch: str = option("resnet18", "encoders (moco_acc --arch): image ResNet-18 or the small CPU CNN",
                       choices=("resnet18", "small"))
    batch_size: int = option(128, "mini-batch M of pairs")
    moco_k: int = option(3840, "dictionary size K per modality")
    pool_size: int = option(38400, "CM-ACC candidate pool N per modality")
    pool_every: int = option(0, "CM-ACC: steps between pool redraws (0: at each epoch start, Alg. 2 lines 6-7)")
    moco_t: float = option(0.7, "temperature tau of the contrastive loss (Section 5: 0.7)")
    moco_m: float = option(0.999, "momentum of the key encoders")
    lr: float = option(1e-3, "Adam learning rate after the warm-up")
    warmup_steps: int = option(500, "linear warm-up steps")
    epochs: int = option(50, "pretraining epochs over the training pairs")
    max_steps: int = option(0, "stop every pretraining at this step (0: all epochs)")
    bn_splits: int = option(8, "BatchNorm groups standing for GPUs (shuffle BN on one device)")
    workers: int = option(4, "data loader processes")
    # probe
    probe_train: int = option(10000, "training pairs whose x trains the per-position linear classifiers")
    probe_epochs: int = option(100, "epochs of each linear classifier")
    probe_lr: float = option(0.1, "SGD learning rate of the linear classifiers (cosine decay)")
    # run
    preset: str = option("none", "flags left at their defaults take the preset's values (PRESETS below): "
                                 "'quick' (CI-sized), 'cpu' (the scaled protocol, about an hour on 2 cores)",
                         choices=("none", "quick", "cpu"))
    quick: bool = option(False, "the same as --preset quick")
    data_seed: int = option(0, "seed of the dataset draw (the same pairs for every run)")
    seeds: tuple[int, ...] = option((0,), "seeds of the pretraining and the probes: one run per (c, method, seed)")
    out_dir: str = option("runs/multiomniglot", "one moco_acc run directory per (c, method, seed) under here")
    json: str = option("", "write {'results': [{'characters', 'mi_nats', 'num_train', 'e_mi', <method>: {'mean', "
                           "'std', 'runs'}, ...}]} here ('init': the random encoder), accuracies in [0, 1]; "
                           "rewritten after every character count")
    plot: str = option("", "save accuracy against characters here (needs matplotlib; skipped without it)")


# --quick: 1 and 2 characters, 3,200 training pairs, the small CNN, one epoch of 100 steps of 32 pairs per run
# (about 10 CPU-minutes in all; 16 minutes of wall time on the shared 2-core machine). tau = 0.2: at the paper's
# 0.7 the small CNN's features barely move in so few steps. The CM-ACC pool is redrawn every 25 steps: drawn once
# per epoch, the single epoch would pick every negative from keys of the random-initialised encoder (its loss then
# fell to 1.2 against 11 for XMoCo: easy negatives).
QUICK = {"characters": (1, 2), "num_train": 3200, "num_eval": 1000, "arch": "small", "batch_size": 32,
         "moco_k": 512, "pool_size": 1024, "pool_every": 25, "moco_t": 0.2, "moco_m": 0.99, "warmup_steps": 10,
         "epochs": 1, "bn_splits": 4, "workers": 0, "probe_train": 3000, "probe_epochs": 30}
# --preset cpu: the paper's mechanism at a CPU's scale. The claim is about e^I against the number of training pairs,
# so the threshold moves with it: with 5,000 pairs, e^I = 55 and 2,860 lie below and 137,280 (3 characters) and
# 6.5M (4) far above, as 50K does for the paper's 1-2 against 3+ characters. Sized in the run card.
CPU = {**QUICK, "characters": (1, 2, 3, 4), "num_train": 5000, "num_eval": 1000, "batch_size": 32, "moco_k": 1024,
       "pool_size": 1536, "pool_every": 40, "epochs": 1, "warmup_steps": 20, "bn_splits": 2, "probe_train": 5000,
       "seeds": (0, 1, 2), "downsample": 2, "out_dir": "runs/multiomniglot_cpu"}
PRESETS = {"quick": QUICK, "cpu": CPU}


def resolve_preset(cfg: Config) -> Config:
    """With --preset (or --quick), every field still at its default takes the preset's value; flags given explicitly
    win."""
    preset = "quick" if cfg.quick else cfg.preset
    if preset == "none":
        return cfg
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    return dataclasses.replace(cfg, **{k: v for k, v in PRESETS[preset].items() if getattr(cfg, k) == defaults[k]})


def check_config(cfg: Config) -> None:
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        common.fail("run this sweep as one process (it calls moco_acc.main in-process for each run)")
    most = len(omniglot_data.ALPHABETS)
    if not cfg.characters or any(not 1 <= c <= most for c in cfg.characters):
        common.fail(f"--characters {' '.join(map(str, cfg.characters))}: each must be 1..{most}")
    if not 0 < cfg.probe_train <= cfg.num_train:
        common.fail(f"--probe-train {cfg.probe_train} must be 1..--num-train ({cfg.num_train})")
    if cfg.num_eval < 1 or cfg.shift < 0:
        common.fail(f"--num-eval {cfg.num_eval} must be positive and --shift {cfg.shift} non-negative")


# ---------------------------------------------------------------------------------------------------------------------
# Spatial-MultiOmniglot as moco_acc's paired data: x is modality v, y is modality a
# ---------------------------------------------------------------------------------------------------------------------
def to_input(image: torch.Tensor, downsample: int = 1) -> torch.Tensor:
    """uint8 HxW ink -> 3x(H/s)x(W/s) standardised (s = downsample, by area average), the RGB input of moco_acc's
    image encoders."""
    ink = image.float().unsqueeze(0) / 255  # 1xHxW
    if downsample > 1:
        ink = F.avg_pool2d(ink, downsample)
    return ((ink - MEAN) / STD).expand(3, -1, -1)


def shifted(cells: torch.Tensor, shift: int) -> torch.Tensor:
    """c x 32 x 32 -> every cell translated by its own (dy, dx) in [-shift, shift], zeros moving in (torch RNG)."""
    if shift == 0:
        return cells
    padded = F.pad(cells, (shift, shift, shift, shift))  # c x (32+2s) x (32+2s)
    offsets = torch.randint(0, 2 * shift + 1, (cells.shape[0], 2)).tolist()
    return torch.stack([p[dy:dy + omniglot_data.CELL, dx:dx + omniglot_data.CELL]
                        for p, (dy, dx) in zip(padded, offsets)])


class PairViews(torch.utils.data.Dataset):
    """moco_acc's common.PairData.train: (index, seed) -> ([x, x'], [y, y'], z_1, (z_1 + 1) mod l_1), two shifted
    views of each image of pair `index`, every random choice a function of `seed` (exact resume). The labels (first
    character) only feed moco_acc's count of distinct classes among the chosen negatives."""

    def __init__(self, split: omniglot_data.MultiOmniglot, shift: int, downsample: int = 1):
        self.split, self.shift, self.downsample = split, shift, downsample

    def __len__(self):
        return len(self.split)

    def views(self, characters: torch.Tensor, drawer: int) -> list[torch.Tensor]:
        cells = self.split.cells(characters, drawer)
        return [to_input(self.split.tile(shifted(cells, self.shift)), self.downsample) for _ in range(2)]

    def __getitem__(self, index_and_seed: tuple[int, int]):
        index, seed = index_and_seed
        s = self.split
        with common.seeded_cpu_rng(seed):
            views_x = self.views(s.z[index], int(s.d_x[index]))
            views_y = self.views(s.z_y[index], int(s.d_y[index]))
        return views_x, views_y, int(s.z[index, 0]), int(s.z_y[index, 0])


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


def pretrain_argv(cfg: Config, method: str, seed: int, run_dir: Path) -> list[str]:
    """moco_acc.py flags of one run (line 3); --resume continues or reuses a run already in run_dir."""
    argv = ["--dataset", DATASET, "--arch", cfg.arch, "--batch-size", str(cfg.batch_size),
            "--moco-k", str(cfg.moco_k), "--pool-size", str(cfg.pool_size), "--moco-t", str(cfg.moco_t),
            "--moco-m", str(cfg.moco_m), "--lr", str(cfg.lr), "--warmup-steps", str(cfg.warmup_steps),
            "--epochs", str(cfg.epochs), "--max-steps", str(cfg.max_steps), "--bn-splits", str(cfg.bn_splits),
            "--workers", str(cfg.workers), "--seed", str(seed), "--out-dir", str(run_dir),
            "--knn-every", "0", "--log-every", "10", *METHODS[method]]
    if "active" in METHODS[method]:  # only where a pool exists, so the other runs' configs never change with it
        argv += ["--pool-every", str(cfg.pool_every)]
    if (run_dir / "checkpoint.pt").is_file():
        argv += ["--resume", str(run_dir / "checkpoint.pt")]
    return argv


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation: one linear classifier per grid position on the frozen x backbone (lines 4-6)
# ---------------------------------------------------------------------------------------------------------------------
def x_backbone(cfg: Config, checkpoint: Path | None) -> torch.nn.Module:
    """The x query encoder's backbone (moco_acc's modality v) from a checkpoint, or freshly initialised."""
    backbone = common.build_modality_backbone("image", cfg.arch, 3, bn_splits=1)
    if checkpoint is not None:
        saved = common.load_checkpoint(str(checkpoint), "moco_acc")["backbone"]  # ModuleDict {v, a}
        backbone.load_state_dict({k[2:]: v for k, v in saved.items() if k.startswith("v.")}, strict=True)
    return backbone


def probe_accuracy(backbone: torch.nn.Module, train: omniglot_data.MultiOmniglot,
                   evaluation: omniglot_data.MultiOmniglot, cfg: Config, seed: int, device: torch.device) -> float:
    """Line 5-6: mean over positions of the held-out accuracy of a linear classifier, in [0, 1]."""
    backbone = backbone.to(device)
    loaders = [common.make_loader(XImages(split, size, cfg.downsample), 256, cfg.workers, device)
               for split, size in ((train, cfg.probe_train), (evaluation, cfg.num_eval))]
    (train_f, train_z), (test_f, test_z) = (common.extract_features(backbone, loader, device) for loader in loaders)
    # train_f: P x D, train_z: P x c; test_f: E x D, test_z: E x c
    accuracies = [common.linear_probe(train_f, train_z[:, i], test_f, test_z[:, i], l, cfg.probe_epochs,
                                      cfg.probe_lr, seed=seed) for i, l in enumerate(train.sizes)]
    return sum(accuracies) / len(accuracies) / 100


def probe_settings(cfg: Config) -> dict:
    return {"probe_train": cfg.probe_train, "num_eval": cfg.num_eval, "probe_epochs": cfg.probe_epochs,
            "probe_lr": cfg.probe_lr}


def saved_probe(run_dir: Path, cfg: Config) -> float | None:
    """The probe accuracy saved in run_dir/probe.json for these probe settings, if any: a finished run is neither
    retrained nor probed again, so a rerun of the sweep (or of an interrupted preset) does only what is missing."""
    path = run_dir / "probe.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["settings"] == probe_settings(cfg):
            return saved["accuracy"]
    return None


def save_probe(run_dir: Path, cfg: Config, accuracy: float) -> float:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "probe.json").write_text(json.dumps({"settings": probe_settings(cfg), "accuracy": accuracy}) + "\n")
    return accuracy


def summary(runs: list[float]) -> dict:
    """{'mean', 'std' (sample std over seeds, 0 for one run), 'runs'} of accuracies in [0, 1]."""
    t = torch.tensor(runs, dtype=torch.float64)
    return {"mean": t.mean().item(), "std": t.std().item() if len(runs) > 1 else 0.0, "runs": runs}


def format_table(results: list[dict], columns: list[str]) -> str:
    lines = [f"{'chars':>5} {'I(x;y) nats':>11} {'e^I':>9} " + " ".join(f"{NAMES[m]:>13}" for m in columns)]
    for r in results:
        lines.append(f"{r['characters']:>5} {r['mi_nats']:>11.3f} {r['e_mi']:>9.3g} "
                     + " ".join(f"{100 * r[m]['mean']:>6.1f} +- {100 * r[m]['std']:>4.1f}" for m in columns))
    return "\n".join(lines)


def save_plot(results: list[dict], columns: list[str], path: str, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path}")
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m in columns:
        ax.errorbar([r["characters"] for r in results], [100 * r[m]["mean"] for r in results],
                    yerr=[100 * r[m]["std"] for r in results], marker="o", capsize=3, label=NAMES[m])
    above = [r["characters"] for r in results if r["e_mi"] > r["num_train"]]
    if above:  # the paper's mechanism: e^I beyond the number of training pairs
        ax.axvspan(min(above) - 0.5, max(above) + 0.5, color="0.92", zorder=0, label="e^I > training pairs")
    ax.set_xlabel("characters c (e^I below each)")
    ax.set_ylabel("held-out probe accuracy (%)")
    ax.set_xticks([r["characters"] for r in results],
                  [f"{r['characters']}\n{r['e_mi']:.3g}" for r in results])
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot written to {path}")


def main(argv: list[str] | None = None) -> dict:
    cfg = resolve_preset(common.parse_config(Config, argv, __doc__))
    check_config(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    columns = ["init", *cfg.methods]
    results = []
    for c in cfg.characters:  # line 1
        train, evaluation = omniglot_data.load_or_build(cfg.omniglot, c, cfg.num_train, cfg.num_eval, cfg.data_seed,
                                                        cfg.cache_dir)
        register(train, cfg.shift, cfg.downsample)
        row = {"characters": c, "mi_nats": train.mutual_information, "num_train": cfg.num_train,
               "e_mi": float(torch.tensor(train.sizes, dtype=torch.float64).prod())}
        runs = {m: [] for m in columns}
        for seed in cfg.seeds:
            init_dir = Path(cfg.out_dir) / f"c{c}" / "init" / f"seed{seed}"
            accuracy = saved_probe(init_dir, cfg)
            if accuracy is None:
                common.seed_everything(seed)
                accuracy = save_probe(init_dir, cfg, probe_accuracy(x_backbone(cfg, None), train, evaluation, cfg,
                                                                     seed, device))
            runs["init"].append(accuracy)
            for method in cfg.methods:  # line 2
                run_dir = Path(cfg.out_dir) / f"c{c}" / method / f"seed{seed}"
                accuracy = saved_probe(run_dir, cfg)
                if accuracy is None:
                    moco_acc.main(pretrain_argv(cfg, method, seed, run_dir))  # line 3: trains or resumes
                    accuracy = save_probe(run_dir, cfg, probe_accuracy(x_backbone(cfg, run_dir / "checkpoint.pt"),
                                                                       train, evaluation, cfg, seed, device))  # 4-6
                runs[method].append(accuracy)
        row.update({m: summary(runs[m]) for m in columns})
        results.append(row)
        print(f"{c} character(s), I(x;y) = {row['mi_nats']:.3f} nats: " + ", ".join(
            f"{NAMES[m]} {100 * row[m]['mean']:.1f} +- {100 * row[m]['std']:.1f}%" for m in columns), flush=True)
        if cfg.json:  # after every character count, so an interrupted sweep leaves what it finished
            Path(cfg.json).write_text(json.dumps({"results": results, "config": dataclasses.asdict(cfg),
                                                  "wall_s": time.perf_counter() - start}, indent=2) + "\n")
    wall_s = time.perf_counter() - start
    print(format_table(results, columns))
    print(f"{len(cfg.characters)} x {len(cfg.methods)} x {len(cfg.seeds)} runs in {wall_s:.0f} s on {device.type}")
    output = {"results": results, "config": dataclasses.asdict(cfg), "wall_s": wall_s}
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(output, indent=2) + "\n")
    if cfg.plot:
        save_plot(results, columns, cfg.plot, f"Spatial-MultiOmniglot (CM-ACC Fig. 3a), {cfg.num_train} pairs, "
                                              f"{len(cfg.seeds)} seed(s)")
    return output


if __name__ == "__main__":
    main()
