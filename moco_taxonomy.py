"""MoCo taxonomy: attractive and contrastive objectives in the encoder and decoder spaces, for skeleton sequences.

Paper: Amor Ben Tanfous, Aimen Zerroug, Drew Linsley, Thomas Serre, "How and What to Learn: Taxonomizing
Self-Supervised Learning for 3D Action Recognition", WACV 2022 (supplementary material:
../shared/papers/taxonomy_ssl_3d_action_supplementary.txt). A recurrent encoder E of joint sequences is trained with
MoCo (query encoder, momentum key encoder, queue) and a decoder D reconstructs the input from E's state. Four
objectives: attraction or contrast (Eq. 1: InfoNCE; Eq. 2: its attraction and repulsion terms) in the space of E
or of D. Table 1 trains all 15 non-empty combinations; Table 2 shows the attractive encoder alone collapsing.

Algorithm 1, extended to the four objectives of Table 1 (line numbers are cited in the code):
     1  x1, x2 = aug(x), aug(x)                      # x: NxTxJx3; x itself is the "ground truth"  (SkeletonViews)
     2  h_gt, z_gt = Enc_q(x)                        # h: NxH last state, z: NxC unit projection   (TaxonomyMoCo)
     3  h_q, q = Enc_q(x1)                           # queries
     4  h_k, k = Enc_k(x2).detach()                  # keys, momentum encoder
     5  x_rec = Dec_q(h_gt)                          # reconstruction of x: NxTxJx3
     6  L_CE = CE([q.k, q Q_E^T] / t, 0)             # Eq. (1); Q_E: KxC queue of keys        (contrastive_loss)
     7  L_AE = mean(2 - 2 q.z_gt)                    # attraction of Eq. (2) alone             (attractive_encoder_loss)
     8  L_AD = mean((x_rec - x)^2)                   # reconstruction                          (attractive_decoder_loss)
     9  d_q, d_k = norm(Dec_q(h_q)), norm(Dec_k(h_k)).detach()  # decoded query and key, flattened: NxD, D = T*J*3
    10  L_CD = CE([d_q.d_k, d_q Q_D^T] / t, 0)       # Eq. (1) in D's space; Q_D: K_DxD        (contrastive_loss)
    11  L = [L_CE] + w_1 [L_AE] + w_2 [L_AD] + [L_CD]   # the terms selected by --objectives      (total_loss)
    12  L.backward(); update(Enc_q, Dec_q)                                                         (train_step)
    13  Enc_k = m Enc_k + (1 - m) Enc_q; Dec_k = m Dec_k + (1 - m) Dec_q
    14  enqueue(Q_E, k); enqueue(Q_D, d_k)           # FIFO, the oldest minibatch leaves
Evaluation (the paper's tables): linear probe and kNN of the action labels on the frozen h of Enc_q.

Where the paper and its public code (serre-lab/ssl_actionrec, modules/moco_td.py) differ, and what I follow:
- Alg. 1 writes L_AB = 2-2*(z_q+z_gt).sum(), a typo for the cosine: the public code computes 2 - 2 q.z_gt on unit
  vectors, averaged over the batch. I do the same, with gradients through both q and z_gt (Alg. 1 and the code
  detach neither), which is what lets L_AE alone collapse (Table 2).
- Alg. 1 sums the squared reconstruction error over T, J and 3 and divides by N; I average over the coordinates too
  (Alg. 1's value / (T*J*3)), so that w_2 = 1 puts L_AD on the scale of the other terms. The public code uses L1.
- L_CD is in Table 1 but not in Alg. 1. The public code (MocoBUTDcon) scores decoded sequences by -|d_q - d_k|_1 / t
  with a momentum decoder and a decoder queue of 640, but never enqueues into that queue (it keeps its random
  initial values). I enqueue the decoded keys (line 14) and score pairs by Eq. (1)'s dot product of unit vectors,
  as in E's space, with the same t. A distance has the data's units: with -MSE / t, t = 0.1, on the synthetic
  motions (metres) L_CD alone lowered the kNN top-1 of the random-init encoder from 64% to 38% in 300 steps; the
  dot product raised it to 71.5% (--width 64 --synthetic-size 800, one run each).
- Sequences have a fixed length T (resample when you write the arrays, or pass --frames); the public code pads and
  masks variable lengths. Each sequence is centred (mean over frames and joints), as the public code's Center().
- Augmentations: temporal crop, rotation, shear, joint jitter. The public code uses temporal flip + shear in
  [-1, 1]; I leave flip out (it turns "sit down" into "stand up").
- The momentum update follows the optimizer step (Alg. 1 order); the public code updates before encoding the keys,
  the same sequence of updates shifted by one step.
- Defaults are the public code's N-UCLA config: GRU 1 x 512, linear projection to 128, Adam 1e-3 (constant, so
  there is no schedule), gradient norm clipped at 25, batch 32, K 1024, K_D 640, m 0.999, t 0.1, w_1 = w_2 = 1.
- --precision fp32 by default, also on a GPU: the recurrent nets are small, and bf16 ones are untested on a GPU.
  With bf16 the linear layers autocast, a recurrent net on a CPU stays fp32 (run_recurrent), the losses stay fp32.

Data (--dataset npz --data-root DIR): DIR/train.npz and DIR/test.npz, each with `sequences` float32 (N, T, J, 3),
joint coordinates (x, y, z) per frame, and `labels` int64 (N,) in 0..C-1. NTU RGB+D and N-UCLA cannot be
redistributed: convert them yourself (one body per sequence; e.g. NTU's 25 joints or N-UCLA's 20, in metres,
resampled to T = 50 frames as in the paper's code). --dataset synthetic (the default) generates labelled stick-figure
motions instead: 10 parametric actions (SYNTHETIC_CLASSES) of a 15-joint figure, with random speed, phase,
amplitude, idle sway of every joint angle, body size, viewpoint, position and joint noise (synthetic_motions): for
tests and demos only, numbers on them say nothing about NTU or N-UCLA. The checkpoint's "backbone" is Enc_q's
recurrent net: it loads strictly into nn.GRU(J*3, width, layers, batch_first=True) (nn.LSTM for --cell lstm).

Run (each evaluation also trains the linear probe, --probe-epochs; `python engine.py probe` is for image scripts):
    python moco_taxonomy.py                                        # synthetic motions, L_AE + L_CE + L_AD (best row)
    python moco_taxonomy.py --objectives ce cd                     # any row of Table 1
    python moco_taxonomy.py --precision bf16 --log-every 1         # bf16 autocast (losses fp32), every step logged
    python moco_taxonomy.py --dataset npz --data-root data/ucla --frames 50       # your own arrays
    python moco_taxonomy.py taxonomy --epochs 20 --out-dir runs/taxonomy          # all 15 rows, prints the table
    torchrun --nproc_per_node=4 moco_taxonomy.py --batch-size 128  # 4 GPUs (global batch 128), or 4 CPU processes

Results (what reproduces at CPU scale, what needs a GPU, with commands, commits and machines): RESULTS.md.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import engine
from engine import NON_NEGATIVE, POSITIVE, at_least, between, option

# Table 1's columns, in its order.
OBJECTIVES = ("ae", "ce", "ad", "cd")
OBJECTIVE_NAMES = {"ae": "L_AE", "ce": "L_CE", "ad": "L_AD", "cd": "L_CD"}


# ---------------------------------------------------------------------------------------------------------------------
# The four objectives (Alg. 1 lines 6-11)
# ---------------------------------------------------------------------------------------------------------------------
def contrastive_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. (1), InfoNCE: -log e^{q.k/t} / (e^{q.k/t} + sum_j e^{q.Q_j/t}), averaged over the N queries.

    q: NxD queries, k: NxD keys (row i is q_i's positive), queue: KxD negatives, all unit vectors. L_CE with the
    encoder's q, k, Q_E; L_CD with the decoded d_q, d_k, Q_D. Gradients reach q only: keys come from the momentum
    networks and the queue is a buffer.
    """
    k, queue = k.detach(), queue.detach()
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(1)  # l_pos: Nx1, the attraction term of Eq. (2)
    l_neg = q @ queue.T  # l_neg: NxK, inside the repulsion term of Eq. (2)
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # logits: Nx(1+K), positive at index 0
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def attractive_encoder_loss(q: torch.Tensor, z_gt: torch.Tensor) -> torch.Tensor:
    """L_AE: mean over N of 2 - 2 q.z_gt = |q - z_gt|^2 for unit vectors (q: NxC, z_gt: NxC of the unaugmented x).

    Attraction without repulsion. Both sides carry gradients (Alg. 1), so a constant embedding is a global
    minimum: this is the collapse of Table 2.
    """
    return (2.0 - 2.0 * (q * z_gt).sum(dim=1)).mean()


def attractive_decoder_loss(x_rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L_AD: mean squared reconstruction error over N, T, J and the 3 coordinates (x_rec, x: NxTxJx3)."""
    return F.mse_loss(x_rec, x)


def total_loss(parts: dict[str, torch.Tensor], w1: float, w2: float) -> torch.Tensor:
    """Alg. 1 line 11: L = [L_CE] + w_1 [L_AE] + w_2 [L_AD] + [L_CD], over the objectives present in `parts`."""
    weights = {"ce": 1.0, "ae": w1, "ad": w2, "cd": 1.0}
    return sum(weights[name] * value for name, value in parts.items())


def taxonomy_rows() -> list[tuple[str, ...]]:
    """The 15 non-empty subsets of the four objectives (Table 1), by size, then in Table 1's column order."""
    return [row for size in range(1, 5) for row in itertools.combinations(OBJECTIVES, size)]


# ---------------------------------------------------------------------------------------------------------------------
# Skeleton sequences: augmentations, the synthetic motion set, the npz format
# ---------------------------------------------------------------------------------------------------------------------
def center(x: torch.Tensor) -> torch.Tensor:
    """Subtract the mean position over frames and joints (x: ...xTxJx3)."""
    return x - x.mean(dim=(-3, -2), keepdim=True)


def resample(x: torch.Tensor, frames: int) -> torch.Tensor:
    """Linear interpolation in time, first and last frames kept: x: LxJx3 -> framesxJx3."""
    length, joints, _ = x.shape
    y = F.interpolate(x.reshape(length, joints * 3).T.unsqueeze(0), size=frames, mode="linear", align_corners=True)
    return y[0].T.reshape(frames, joints, 3)


def rotation_matrix(angles: torch.Tensor) -> torch.Tensor:
    """R = R_z(c) R_y(b) R_x(a) for angles (a, b, c) in radians: 3x3, orthogonal, det 1."""
    (ca, cb, cc), (sa, sb, sc) = angles.cos().tolist(), angles.sin().tolist()
    r_x = torch.tensor([[1.0, 0.0, 0.0], [0.0, ca, -sa], [0.0, sa, ca]])
    r_y = torch.tensor([[cb, 0.0, sb], [0.0, 1.0, 0.0], [-sb, 0.0, cb]])
    r_z = torch.tensor([[cc, -sc, 0.0], [sc, cc, 0.0], [0.0, 0.0, 1.0]])
    return r_z @ r_y @ r_x


def augment(x: torch.Tensor, crop: float, rotate: float, shear: float, jitter: float,
            generator: torch.Generator) -> torch.Tensor:
    """One random view of a sequence x: TxJx3 -> TxJx3 (Alg. 1 line 1), all randomness from `generator`.

    Temporal crop (a window of at least `crop` * T frames, resampled back to T), rotation (angles uniform in
    [-rotate, rotate] degrees about x, y, z), shear (I + S, off-diagonal S uniform in [-shear, shear]), joint
    jitter (Gaussian, std `jitter`), then centring again (a crop moves the mean).
    """
    frames = x.shape[0]
    u = torch.rand(2, generator=generator).tolist()
    length = max(2, round(frames * (crop + (1.0 - crop) * u[0])))
    start = int(u[1] * (frames - length + 1))
    x = resample(x[start:start + length], frames)
    angles = (2.0 * torch.rand(3, generator=generator) - 1.0) * math.radians(rotate)
    s = (2.0 * torch.rand(3, 3, generator=generator) - 1.0) * shear
    transform = rotation_matrix(angles) @ (torch.eye(3) + s - torch.diag(s.diagonal()))  # 3x3
    x = x @ transform.T + jitter * torch.randn(x.shape, generator=generator)
    return center(x)


class SkeletonViews(torch.utils.data.Dataset):
    """(index, seed) -> ([x, x1, x2], label): x the centred sequence and two augmented views (Alg. 1 line 1).

    The views are a pure function of the seed that common.EpochSampler hands over with the index, so a resumed run
    replays the same views whatever the number of loader workers.
    """

    def __init__(self, sequences: torch.Tensor, labels: torch.Tensor, cfg: Config):
        self.sequences, self.labels, self.cfg = sequences, labels, cfg

    def __len__(self):
        return len(self.sequences)

    def __getitem__(self, index_and_seed: tuple[int, int]):
        index, seed = index_and_seed
        g = torch.Generator().manual_seed(seed)
        x, c = self.sequences[index], self.cfg
        views = [augment(x, c.crop, c.rotate, c.shear, c.jitter, g) for _ in range(2)]
        return [x, *views], self.labels[index]


SYNTHETIC_CLASSES = ("wave right", "wave left", "clap", "jumping jack", "walk", "squat", "bow", "kick", "punch",
                     "raise arms")
SYNTHETIC_JOINTS = ("pelvis", "chest", "head", "left shoulder", "left elbow", "left hand", "right shoulder",
                    "right elbow", "right hand", "left hip", "left knee", "left foot", "right hip", "right knee",
                    "right foot")


def _limb(flexion: torch.Tensor, abduction: torch.Tensor, side: float) -> torch.Tensor:
    """Unit direction of a limb segment (degrees, ...): flexion 0 points down, 90 forward (+z), 180 up; abduction
    turns it outwards (side +1: the figure's left, +x). Returns ...x3."""
    f, a = torch.deg2rad(flexion), torch.deg2rad(abduction)
    return torch.stack([side * a.sin(), -a.cos() * f.cos(), a.cos() * f.sin()], dim=-1)


def _class_angles(label: int, u: torch.Tensor, s: torch.Tensor) -> dict[str, torch.Tensor]:
    """Joint angles (degrees, before the amplitude factor) of one synthetic action over time. u = (1 - cos p) / 2
    rises 0 -> 1 -> 0 over a cycle of the phase p, s = sin p swings -1 -> 1; both are NxT."""
    zero = torch.zeros_like(u)
    a = {name: zero for name in ("l_flex", "l_abd", "l_elbow", "r_flex", "r_abd", "r_elbow", "l_hip", "l_hip_abd",
                                 "l_knee", "r_hip", "r_hip_abd", "r_knee", "pitch", "drop")}
    if label == 0:  # wave right: arm up and out, forearm swinging
        a |= {"r_abd": 150 + zero, "r_elbow": 40 * s}
    elif label == 1:  # wave left
        a |= {"l_abd": 150 + zero, "l_elbow": 40 * s}
    elif label == 2:  # clap: arms forward, opening and closing
        a |= {"l_flex": 90 + zero, "r_flex": 90 + zero, "l_abd": 70 * (1 - u), "r_abd": 70 * (1 - u)}
    elif label == 3:  # jumping jack: arms and legs out, a small hop
        a |= {"l_abd": 150 * u, "r_abd": 150 * u, "l_hip_abd": 15 * u, "r_hip_abd": 15 * u, "drop": -0.05 * u}
    elif label == 4:  # walk: legs and arms swinging in antiphase
        a |= {"l_hip": 25 * s, "r_hip": -25 * s, "l_knee": 30 * s.clamp(min=0), "r_knee": 30 * (-s).clamp(min=0),
              "l_flex": -20 * s, "r_flex": 20 * s}
    elif label == 5:  # squat: hips and knees bend, pelvis drops, arms forward for balance
        a |= {"l_hip": 80 * u, "r_hip": 80 * u, "l_knee": 100 * u, "r_knee": 100 * u, "drop": 0.3 * u,
              "l_flex": 90 * u, "r_flex": 90 * u}
    elif label == 6:  # bow: the torso bends forward
        a |= {"pitch": 60 * u, "l_flex": 20 * u, "r_flex": 20 * u}
    elif label == 7:  # kick: the right leg swings forward, knee bent on the way
        a |= {"r_hip": 80 * u * u, "r_knee": 60 * 4 * u * (1 - u)}
    elif label == 8:  # punch: fists in guard, the arms extend forward in turn
        left, right = s.clamp(min=0), (-s).clamp(min=0)
        a |= {"l_flex": 30 + 60 * left, "r_flex": 30 + 60 * right, "l_elbow": 120 - 120 * left,
              "r_elbow": 120 - 120 * right}
    else:  # raise arms: both arms forward and up overhead
        a |= {"l_flex": 170 * u, "r_flex": 170 * u}
    return a


def synthetic_motions(num: int, frames: int, seed: int, yaw: float = 90.0, tilt: float = 15.0, idle: float = 30.0,
                      noise: float = 0.02) -> tuple[torch.Tensor, torch.Tensor]:
    """A labelled set of SYNTHETIC stick-figure motions (not NTU, not N-UCLA): sequences NxTxJx3 (J = 15,
    SYNTHETIC_JOINTS, metres, y up), labels N, classes SYNTHETIC_CLASSES in turn.

    Each sample: one action with a random number of cycles (0.8-2 per sequence), phase and amplitude (x0.7-1.2);
    every joint angle also sways slowly by up to `idle` degrees; random body size (x0.85-1.15), viewpoint (yaw
    uniform in [-yaw, yaw] degrees, tilts in [-tilt, tilt]), position, and Gaussian joint noise (std `noise` m).
    """
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    labels = torch.arange(num) % len(SYNTHETIC_CLASSES)
    t = torch.linspace(0, 1, frames)  # time: T
    cycles, phase, amplitude = 0.8 + 1.2 * rand(num, 1), 2 * math.pi * rand(num, 1), 0.7 + 0.5 * rand(num, 1)
    p = 2 * math.pi * cycles * t + phase  # p: NxT, phase of the action
    u, s = (1 - p.cos()) / 2, p.sin()
    a = {}  # joint angles (degrees) and pelvis drop (m): NxT each
    for c in range(len(SYNTHETIC_CLASSES)):
        rows = labels == c
        for name, value in _class_angles(c, u[rows], s[rows]).items():
            a.setdefault(name, torch.zeros(num, frames))[rows] = amplitude[rows] * value
    for name in sorted(a.keys() - {"drop"}):  # sorted: the random draws must not depend on set order
        sway_hz, sway_phase = 0.2 + 0.8 * rand(num, 1), 2 * math.pi * rand(num, 1)
        a[name] = a[name] + idle * rand(num, 1) * torch.sin(2 * math.pi * sway_hz * t + sway_phase)
    up = _limb(180 - a["pitch"], torch.zeros_like(u), 1.0)  # the torso leans forward by `pitch`
    pelvis = torch.stack([torch.zeros_like(u), 0.95 - a["drop"], torch.zeros_like(u)], dim=-1)  # NxTx3
    chest, right = pelvis + 0.5 * up, torch.tensor([1.0, 0.0, 0.0])
    joints = [pelvis, chest, chest + 0.2 * up]

    def lean(v):  # rotate an arm direction with the torso (about x, by the pitch)
        pitch = torch.deg2rad(a["pitch"])
        return torch.stack([v[..., 0], v[..., 1] * pitch.cos() - v[..., 2] * pitch.sin(),
                            v[..., 1] * pitch.sin() + v[..., 2] * pitch.cos()], dim=-1)

    for side, k in ((1.0, "l"), (-1.0, "r")):
        shoulder = chest + side * 0.18 * right
        elbow = shoulder + 0.28 * lean(_limb(a[f"{k}_flex"], 10 + a[f"{k}_abd"], side))
        hand = elbow + 0.25 * lean(_limb(a[f"{k}_flex"] + a[f"{k}_elbow"], 10 + a[f"{k}_abd"], side))
        joints += [shoulder, elbow, hand]
    for side, k in ((1.0, "l"), (-1.0, "r")):
        hip = pelvis + side * 0.1 * right
        knee = hip + 0.45 * _limb(a[f"{k}_hip"], 5 + a[f"{k}_hip_abd"], side)
        joints += [hip, knee, knee + 0.45 * _limb(a[f"{k}_hip"] - a[f"{k}_knee"], 5 + a[f"{k}_hip_abd"], side)]
    x = torch.stack(joints, dim=2) * (0.85 + 0.3 * rand(num, 1, 1, 1))  # x: NxTxJx3, body size
    view = torch.stack([(2 * rand(num) - 1) * tilt, (2 * rand(num) - 1) * yaw, (2 * rand(num) - 1) * tilt], dim=1)
    r = torch.stack([rotation_matrix(torch.deg2rad(v)) for v in view]).unsqueeze(1)  # Nx1x3x3: the camera's view
    x = x @ r.transpose(-1, -2) + (2 * rand(num, 1, 1, 3) - 1) * torch.tensor([1.0, 0.0, 1.0])
    return x + noise * torch.randn(x.shape, generator=g), labels


@dataclasses.dataclass
class SequenceData:
    """Centred sequences (NxTxJx3, float32) and labels (N, int64) of both splits."""
    train: torch.Tensor
    train_labels: torch.Tensor
    test: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int


def read_npz(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequences` float (N, T, J, 3) and `labels` int (N,) of one split, checked; one error line if wrong."""
    import numpy as np  # torchvision's dependency; only this loader needs it

    if not path.is_file():
        common.fail(f"{path} does not exist (--dataset npz wants DATA_ROOT/train.npz and DATA_ROOT/test.npz)")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = {"sequences", "labels"} - set(f.files)
            if missing:
                common.fail(f"{path} lacks the array(s) {', '.join(sorted(missing))} (has: {', '.join(f.files)})")
            sequences, labels = f["sequences"], f["labels"]
    except (OSError, ValueError) as e:
        common.fail(f"{path} is not a readable .npz file ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    if sequences.ndim != 4 or sequences.shape[3] != 3 or sequences.shape[1] < 2:
        common.fail(f"{path}: sequences have shape {tuple(sequences.shape)}, expected (N, T, J, 3) with T >= 2")
    if labels.shape != (sequences.shape[0],) or labels.dtype.kind not in "iu":
        common.fail(f"{path}: labels have shape {tuple(labels.shape)} and dtype {labels.dtype}, expected integers "
                    f"of shape ({sequences.shape[0]},)")
    if sequences.dtype.kind != "f" or not np.isfinite(sequences).all():
        common.fail(f"{path}: sequences must be finite floats (dtype {sequences.dtype})")
    if labels.size and labels.min() < 0:
        common.fail(f"{path}: labels must be 0..C-1, found {labels.min()}")
    return torch.from_numpy(sequences.astype(np.float32)), torch.from_numpy(labels.astype(np.int64))


def load_sequences(cfg: Config) -> SequenceData:
    """The synthetic motions (train: --synthetic-size, test: a quarter as many) or DATA_ROOT/{train,test}.npz;
    resampled to --frames when it is set, centred."""
    if cfg.frames < 0 or cfg.frames == 1:
        common.fail(f"--frames must be 0 (the data's own) or at least 2, got {cfg.frames}")
    if cfg.dataset == "synthetic":
        if cfg.synthetic_size < 1:
            common.fail(f"--synthetic-size must be at least 1, got {cfg.synthetic_size}")
        frames = cfg.frames or 32
        train, train_labels = synthetic_motions(cfg.synthetic_size, frames, seed=0)
        test, test_labels = synthetic_motions(max(1, cfg.synthetic_size // 4), frames, seed=1)
    else:
        if not cfg.data_root:
            common.fail("--dataset npz needs --data-root (a folder with train.npz and test.npz)")
        (train, train_labels), (test, test_labels) = (read_npz(Path(cfg.data_root) / f"{split}.npz")
                                                      for split in ("train", "test"))
        if train.shape[2] != test.shape[2] or train.shape[1] != test.shape[1]:
            common.fail(f"train.npz has T x J = {train.shape[1]} x {train.shape[2]} but test.npz has "
                        f"{test.shape[1]} x {test.shape[2]}")
        if cfg.frames and cfg.frames != train.shape[1]:
            train, test = (torch.stack([resample(x, cfg.frames) for x in split]) for split in (train, test))
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    return SequenceData(center(train), train_labels, center(test), test_labels, num_classes)


@dataclasses.dataclass
class Config(engine.RunConfig):
    """The taxonomy's options; the run, logging and kNN options every script shares are in engine.RunConfig."""
    # data
    dataset: str = option("synthetic", "'synthetic': generated stick-figure motions (for tests and demos); 'npz': "
                                       "DATA_ROOT/train.npz and test.npz (format in the docstring)",
                          choices=("synthetic", "npz"))
    data_root: str = option("", "folder holding train.npz and test.npz (--dataset npz)")
    frames: int = option(0, "frames T per sequence, resampled linearly (0: the arrays' own; synthetic: 32)",
                         check=NON_NEGATIVE)
    synthetic_size: int = option(2000, "training sequences of the synthetic set (its test split: a quarter as many)",
                                 check=at_least(1))
    # augmentations (Alg. 1 line 1)
    crop: float = option(0.7, "temporal crop: keep a window of at least this fraction of T, resampled to T",
                         check=engine.Check(lambda v: 0 < v <= 1, "in (0, 1]"))
    rotate: float = option(30.0, "rotation: angles uniform in [-r, r] degrees about each axis", check=NON_NEGATIVE)
    shear: float = option(0.3, "shear: off-diagonal entries of I + S uniform in [-s, s] (public code: 1)",
                          check=NON_NEGATIVE)
    jitter: float = option(0.01, "joint jitter: Gaussian noise std per coordinate, in the data's units",
                           check=NON_NEGATIVE)
    # encoder and decoder
    cell: str = option("gru", "recurrent cell of encoder and decoder", choices=("gru", "lstm"))
    layers: int = option(1, "recurrent layers of encoder and decoder (Table 1: 1 or 3; Table 2: 1 to 5)",
                         check=at_least(1))
    width: int = option(512, "hidden units H per layer (Table 1: 512, 'wider' 1024)", check=at_least(1))
    dim: int = option(128, "dimension C of the encoder's contrastive space (linear projection of h)", check=at_least(1))
    # the taxonomy and MoCo
    objectives: tuple[str, ...] = option(("ae", "ce", "ad"), "objectives to train with: any non-empty subset of ae "
                                         "ce ad cd (L_AE, L_CE, L_AD, L_CD; Table 1's rows; default: its best)",
                                         choices=OBJECTIVES)
    w1: float = option(1.0, "weight w_1 of L_AE", check=NON_NEGATIVE)
    w2: float = option(1.0, "weight w_2 of L_AD", check=NON_NEGATIVE)
    moco_k: int = option(1024, "encoder queue size K", check=at_least(1))
    moco_k_dec: int = option(640, "decoder queue size K_D (decoded keys, T*J*3 numbers each)", check=at_least(1))
    moco_m: float = option(0.999, "momentum m of the key encoder and key decoder", check=between(0, 1))
    moco_t: float = option(0.1, "softmax temperature t of L_CE and L_CD", check=POSITIVE)
    # optimization
    epochs: int = option(150, "training epochs", check=at_least(1))
    batch_size: int = option(32, "global batch size (split evenly over processes)", check=at_least(1))
    lr: float = option(1e-3, "Adam learning rate (constant, as in the public code)", check=NON_NEGATIVE)
    weight_decay: float = option(0.0, "Adam weight decay", check=NON_NEGATIVE)
    grad_clip: float = option(25.0, "clip the gradient norm at this value (0: no clipping)", check=NON_NEGATIVE)
    # evaluation
    probe_epochs: int = option(100, "epochs of the linear probe at each evaluation (logistic regression on the "
                                    "frozen h of the kNN bank's sequences; 0: no probe)", check=NON_NEGATIVE)
    # Shared options whose defaults differ here. No loader processes by default: the sequences are already tensors in
    # memory. fp32, not auto: the recurrent nets are small, and bf16 ones are untested on a GPU (bf16 runs on the
    # CPU in the tests). No --channels-last: nothing here convolves (NxTxJx3 joints into a GRU/LSTM).
    workers: int = option(0, "data loader processes per training process", check=NON_NEGATIVE)
    precision: str = option("fp32", "autocast of the encoder and decoder: 'bf16' or 'fp32' (losses stay fp32); "
                                    "auto: bf16 on a GPU, fp32 on a CPU", choices=common.PRECISION_CHOICES)
    knn_every: int = option(10, "epochs between evaluations, kNN and linear probe (0: only at the end)",
                            check=NON_NEGATIVE)
    knn_k: int = option(20, "neighbours of the kNN classifier", check=at_least(1))

    def settle(self, data: SequenceData) -> None:
        """Resolve what depends on the data (the frames T), and spell --objectives one way per row of Table 1."""
        self.frames = data.train.shape[1]
        self.objectives = tuple(o for o in OBJECTIVES if o in self.objectives)


# ---------------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------------
def recurrent(cell: str, in_dim: int, width: int, layers: int) -> nn.Module:
    return (nn.GRU if cell == "gru" else nn.LSTM)(in_dim, width, layers, batch_first=True)


def run_recurrent(rnn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The recurrent net's outputs at every time step (NxTxH). Under a CPU autocast it runs in fp32: PyTorch leaves a
    CPU GRU in fp32 there but sends a CPU LSTM to oneDNN's bf16 kernel, which CPUs without AVX-512 BF16 lack ("could
    not create a primitive descriptor for the LSTM"); one rule then holds for both cells on every CPU. On a GPU
    autocast applies as it is."""
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return rnn(x.float())[0]
    return rnn(x)[0]


class SequenceEncoder(nn.Module):
    """Enc: x NxTxJx3 -> (h, z). h: NxH, the top layer's state after the last frame (what is evaluated and
    decoded); z: NxC, its linear projection, unit-normalized (the contrastive space of L_CE and L_AE)."""

    def __init__(self, cell: str, joints: int, width: int, layers: int, dim: int):
        super().__init__()
        self.rnn = recurrent(cell, joints * 3, width, layers)
        self.head = nn.Linear(width, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states = run_recurrent(self.rnn, x.flatten(2))  # states: NxTxH
        h = states[:, -1]  # h: NxH
        return h, F.normalize(self.head(h).float(), dim=1)


class SequenceDecoder(nn.Module):
    """Dec: h NxH -> NxTxJx3. The state, repeated at every time step, drives a recurrent net whose outputs map
    linearly to the joints (the public code's decoder with its 'seqlast' input)."""

    def __init__(self, cell: str, joints: int, width: int, layers: int, frames: int):
        super().__init__()
        self.rnn = recurrent(cell, width, width, layers)
        self.out = nn.Linear(width, joints * 3)
        self.frames, self.joints = frames, joints

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        states = run_recurrent(self.rnn, h.unsqueeze(1).expand(-1, self.frames, -1).contiguous())  # NxTxH
        return self.out(states).view(h.shape[0], self.frames, self.joints, 3)


class TaxonomyMoCo(nn.Module):
    """Query encoder and decoder, their momentum copies, the queues Q_E (keys) and Q_D (decoded keys): buffers,
    saved with the model."""

    def __init__(self, cfg: Config, joints: int, frames: int):
        super().__init__()
        self.cfg, self.objectives = cfg, frozenset(cfg.objectives)
        self.encoder_q = SequenceEncoder(cfg.cell, joints, cfg.width, cfg.layers, cfg.dim)
        self.encoder_k = copy.deepcopy(self.encoder_q).requires_grad_(False)  # Enc_k starts as Enc_q
        self.decoder_q = SequenceDecoder(cfg.cell, joints, cfg.width, cfg.layers, frames)
        self.decoder_k = copy.deepcopy(self.decoder_q).requires_grad_(False)
        self.queue = common.Queue(cfg.moco_k, cfg.dim)  # Q_E: KxC
        self.queue_dec = common.Queue(cfg.moco_k_dec, frames * joints * 3)  # Q_D: K_DxD, unit decoded keys

    def forward(self, x: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor):
        """x, x1, x2: NxTxJx3 (the sequence and its two views). Returns the loss (line 11), its terms, the batch
        variance of the queries, and what to enqueue: keys (NxC) and decoded keys (NxD), None when unused.
        The networks run under the caller's autocast (--precision); their outputs are cast to fp32 for the losses."""
        use = self.objectives
        parts, keys, decoded_keys = {}, None, None
        # Every row encodes the queries: L_CE and L_AE compare q, L_CD decodes h_q, and with L_AD alone q still
        # gives the logged variance that shows a collapse.
        h_q, q = self.encoder_q(x1)  # q: NxC, line 3
        if use & {"ce", "cd"}:
            with torch.no_grad():
                h_k, k = self.encoder_k(x2)  # k: NxC, line 4
        if use & {"ae", "ad"}:
            h_gt, z_gt = self.encoder_q(x)  # z_gt: NxC, line 2
        if "ad" in use:
            x_rec = self.decoder_q(h_gt).float()  # x_rec: NxTxJx3, line 5
        if "cd" in use:
            d_q = F.normalize(self.decoder_q(h_q).flatten(1).float(), dim=1)  # d_q: NxD, line 9
            with torch.no_grad():
                decoded_keys = F.normalize(self.decoder_k(h_k).flatten(1).float(), dim=1)  # d_k: NxD
        with torch.autocast(x.device.type, enabled=False):  # the losses in fp32
            if "ce" in use:
                parts["ce"], keys = contrastive_loss(q, k, self.queue.keys, self.cfg.moco_t), k  # line 6
            if "ae" in use:
                parts["ae"] = attractive_encoder_loss(q, z_gt)  # line 7
            if "ad" in use:
                parts["ad"] = attractive_decoder_loss(x_rec, x)  # line 8
            if "cd" in use:
                parts["cd"] = contrastive_loss(d_q, decoded_keys, self.queue_dec.keys, self.cfg.moco_t)  # line 10
            # Total variance of unit vectors, 1 - |mean q|^2: 0 when every query is the same point (collapse).
            q_var = 1.0 - q.detach().mean(dim=0).pow(2).sum()
            return total_loss(parts, self.cfg.w1, self.cfg.w2), parts, q_var, keys, decoded_keys


def train_step(model: TaxonomyMoCo, ddp_model: nn.Module, optimizer: torch.optim.Optimizer,
               views: list[torch.Tensor]) -> dict:
    """One step of Algorithm 1; returns what gets logged, the losses, variance and gradient norm as device tensors
    (read on the host only at log steps). (Nothing depends on the step: the learning rate and the momentum are
    constant, as in the public code.)"""
    cfg = model.cfg
    with common.autocast(views[0].device, cfg.precision):
        loss, parts, q_var, keys, decoded_keys = ddp_model(*views)  # lines 1-11
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # line 12
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # The public code clips the gradient norm at 25 (Lightning's gradient_clip_val); the norm is logged either way.
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    optimizer.step()
    common.momentum_update(model.encoder_k, model.encoder_q, cfg.moco_m)  # line 13
    common.momentum_update(model.decoder_k, model.decoder_q, cfg.moco_m)
    # line 14. Every rank enqueues the (decoded) keys of the whole global batch, so all queues stay identical.
    if keys is not None:
        model.queue.enqueue(common.concat_all_gather(keys))
    if decoded_keys is not None:
        model.queue_dec.enqueue(common.concat_all_gather(decoded_keys))
    stats = {"loss": loss.detach(), "q_var": q_var, **{f"loss_{name}": v.detach() for name, v in parts.items()}}
    return {**{name: common.all_reduce_mean(v) for name, v in stats.items()},
            "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm}


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation: kNN and linear probe of the action labels on the frozen h of Enc_q
# ---------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def encode(encoder: SequenceEncoder, sequences: torch.Tensor, device: torch.device, batch_size: int = 512):
    """h (NxH) of every sequence, eval mode."""
    was_training = encoder.training
    encoder.eval()
    h = torch.cat([encoder(x.to(device))[0].float() for x in sequences.split(batch_size)])
    encoder.train(was_training)
    return h


def evaluate(encoder: SequenceEncoder, data: SequenceData, cfg: Config, device: torch.device) -> dict | None:
    """kNN top-1 and linear-probe top-1 (%) of the test split, and the total variance of the unit-normalized test
    features (1 - |mean|^2; near 0 means collapse). On the main process; None elsewhere."""
    result = None
    if common.is_main():
        bank_idx = common.evenly_spaced_indices(len(data.train), cfg.knn_bank_size)
        test_idx = common.evenly_spaced_indices(len(data.test), cfg.knn_test_size)
        train_h, test_h = encode(encoder, data.train[bank_idx], device), encode(encoder, data.test[test_idx], device)
        train_y, test_y = data.train_labels[bank_idx].to(device), data.test_labels[test_idx].to(device)
        bank, queries = F.normalize(train_h, dim=1), F.normalize(test_h, dim=1)
        predicted = common.knn_predict(queries, bank, train_y, data.num_classes, cfg.knn_k, cfg.knn_t)
        result = {"knn_top1": 100.0 * (predicted == test_y).float().mean().item(),
                  "feature_var": 1.0 - queries.mean(dim=0).pow(2).sum().item()}
        if cfg.probe_epochs:
            result["linear_top1"] = common.linear_probe(train_h, train_y, test_h, test_y, data.num_classes,
                                                        cfg.probe_epochs)
    if common.world_size() > 1:
        torch.distributed.barrier()
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Training loop (the same skeleton in every method script)
# ---------------------------------------------------------------------------------------------------------------------
def check_config(cfg: Config, num_sequences: int) -> None:
    if not cfg.objectives:
        common.fail("--objectives needs at least one of ae ce ad cd")
    if len(set(cfg.objectives)) != len(cfg.objectives):
        common.fail(f"--objectives lists one twice: {' '.join(cfg.objectives)}")
    engine.check_batch_size(cfg.batch_size, num_sequences)


def uses_every_parameter(model: TaxonomyMoCo) -> bool:
    """Which parameters a step reaches depends on --objectives (L_AD alone never reaches the projection head, L_CE
    alone never the decoder): DDP must then be told that some get no gradient."""
    return bool(model.objectives & {"ae", "ce"}) and bool(model.objectives & {"ad", "cd"})


def main(argv: list[str] | None = None) -> None:
    cfg = engine.parse_config(Config, argv, __doc__)
    run = engine.Run(cfg)
    data = load_sequences(cfg)
    check_config(cfg, len(data.train))
    cfg.settle(data)

    common.seed_everything(cfg.seed)  # same seed on every rank: identical initial networks and queues
    _, frames, joints, _ = data.train.shape
    model = run.place(TaxonomyMoCo(cfg, joints, frames))
    optimizer = torch.optim.Adam([*model.encoder_q.parameters(), *model.decoder_q.parameters()], lr=cfg.lr,
                                 weight_decay=cfg.weight_decay)
    run.start(model, {"adam": optimizer}, model.encoder_q.rnn)
    ddp_model = run.distributed(model, find_unused_parameters=not uses_every_parameter(model))

    sampler = common.EpochSampler(len(data.train), cfg.batch_size, cfg.seed)
    loader = common.make_loader(SkeletonViews(data.train, data.train_labels, cfg),
                                cfg.batch_size // common.world_size(), cfg.workers, run.device, sampler,
                                persistent=True)
    for _, (views, _labels) in run.steps(loader, sampler, lambda: evaluate(model.encoder_q, data, cfg, run.device),
                                         show=("q_var",)):
        run.log(train_step(model, ddp_model, optimizer, run.to_device(views)))


# ---------------------------------------------------------------------------------------------------------------------
# The taxonomy: every row of Table 1 with the same flags
# ---------------------------------------------------------------------------------------------------------------------
def taxonomy(argv: list[str] | None = None) -> list[dict]:
    """Train the 15 rows of Table 1 with the same flags, each in OUT_DIR/<objectives>, and print the table.

    A row whose run directory already holds a checkpoint is resumed (and skipped once finished), so an interrupted
    taxonomy continues where it stopped. Every row starts from the same initial networks (same --seed).
    """
    argv = list(argv or [])
    base = engine.parse_config(Config, argv, __doc__)
    rows = []
    for row in taxonomy_rows():
        out_dir = Path(base.out_dir) / "-".join(row)
        # The last occurrence of a flag wins; a run directory that holds a checkpoint is continued (parse_config).
        args = [*argv, "--objectives", *row, "--out-dir", str(out_dir)]
        tic = time.perf_counter()
        main(args)
        if common.is_main():
            records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
            last = [r for r in records if "knn_top1" in r][-1]
            rows.append({"objectives": row, "step": last["step"], "minutes": (time.perf_counter() - tic) / 60,
                         **{k: last[k] for k in ("knn_top1", "linear_top1", "feature_var") if k in last}})
    if common.is_main():
        table = taxonomy_table(rows)
        print(table)
        (Path(base.out_dir) / "taxonomy.md").write_text(table + "\n")
    return rows


def taxonomy_table(rows: list[dict]) -> str:
    """Markdown, one line per row of Table 1, sorted by linear-probe (else kNN) accuracy, lowest first as Table 1."""
    score = "linear_top1" if all("linear_top1" in r for r in rows) else "knn_top1"
    lines = ["| " + " | ".join(OBJECTIVE_NAMES[o] for o in OBJECTIVES) + " | linear top-1 | kNN top-1 | feature var "
             "| steps | minutes |", "|" + "---|" * 9]
    for r in sorted(rows, key=lambda r: r[score]):
        marks = " | ".join("x" if o in r["objectives"] else " " for o in OBJECTIVES)
        linear = f"{r['linear_top1']:.2f}" if "linear_top1" in r else "-"
        lines.append(f"| {marks} | {linear} | {r['knn_top1']:.2f} | {r['feature_var']:.3f} | {r['step']} | "
                     f"{r['minutes']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    engine.run_main(lambda: taxonomy(sys.argv[2:]) if sys.argv[1:2] == ["taxonomy"] else main())
