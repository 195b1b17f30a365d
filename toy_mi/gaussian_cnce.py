"""Gaussian toy of the Ring paper (Appendix B, Table 5): NCE and CNCE(w) against the known I(X;Y) of a 2-D Gaussian,
under two readings of the protocol, with the Jensen bound that says what the table can and cannot show.

Paper: Wu, Zhuang, Mosse, Yamins, Goodman, "Conditional Negative Sampling for Contrastive Learning of Visual
Representations" (ICLR 2021), Theorem 3.1 and Appendix B, Table 5.

Algorithm (numbers are cited in the code as "line N"):
     1  z_i ~ N(0, Sz), eps_i ~ N(0, Seps), (x_i, y_i) = z_i + eps_i      i = 1..n, n = 2000 i.i.d. training pairs,
                                                                          and n fresh pairs for the estimates
     2  I(X;Y) = -1/2 log(1 - S12 S21 / (S11 S22)),  S = Sz + Seps       closed form (App. B)
     3  Z(i; j_1..j_k) = log( e^{f_ii} / (1/(k+1)) (e^{f_ii} + sum_l e^{f_{i j_l}}) ),  f_ij = g(x_i)^T h(y_j)
                                                                          Thm 3.1, positive in the sum, k = 100
     4  ring_w(i) = the top (100-w)% of { j != i } ranked by f_ij = g(x_i)^T M[j], M[j] = h(y_j) the memory bank;
        j_1..j_k ~ Uniform(ring_w(i)) with replacement                   w = 0: the whole bank, i.e. NCE (Eq. 2/3)
   --protocol shared (App. B as written: "optimize the NCE objective"; then estimate every column with that critic)
     5  for epoch = 1..100, for each batch b of 128 pairs:
     6      loss = -mean_{i in b} log( e^{f_ii} / sum_{j in b} e^{f_ij} );  Adam(lr 0.03) step on g, h
     7  on the fresh pairs, for w in {0, 10, 25, 50, 75, 90, 95}: estimate(w) = mean over i and 10 draws of Z (3, 4)
   --protocol per-w (one critic per estimator, each trained on the estimator it reports)
     8  for w in {0, 10, 25, 50, 75, 90, 95}: a critic from the seed's initial weights
     9      for epoch = 1..100, for each batch b of 128 pairs:
    10          M[j] = h(y_j), j = 1..n                                   the bank of the current critic
    11          for i in b: j_1..j_k from ring_w(i) (line 4)
    12          loss = -mean_{i in b} Z(i; j_1..j_k);  Adam(lr 0.03) step on g, h
    13      estimate(w) with this critic as line 7, for its own w only
  --protocol both (default) runs the two on the same data. Each seed redraws data and weights.

The bound (why CNCE at high w cannot be positive for a critic that ranks its ring above the positive):
  log is concave, so for the k+1 scores s_0 = f_ii, s_l = f_{i j_l} of line 3
      log( (1/(k+1)) sum_{m=0..k} e^{s_m} ) >= (1/(k+1)) sum_{m=0..k} s_m
      => Z(i; j_1..j_k) <= f_ii - (f_ii + sum_l f_{i j_l}) / (k+1) = k/(k+1) ( f_ii - (1/k) sum_l f_{i j_l} )
  for every draw. The j_l are uniform on ring_w(i), so E[(1/k) sum_l f_{i j_l}] = r_i, the ring's mean score, and
      E[estimate(w)] <= B(w) = k/(k+1) ( mean_i f_ii - mean_i r_i ),     here k = 100, the same k as line 3.
  ring_w(i) is the top (100-w)% of f(x_i, .), so r_i is at least its w-th percentile and grows with w; B(w) <= 0
  as soon as the ring's mean score is at least the positive's on average. A positive CNCE(w) needs a critic whose
  positive beats the mean of its own top (100-w)%: at w = 95, on average over anchors, a y_i that carries only
  0.02 nats of information about x_i must outscore the mean of the bank's top 5%. The exact optimal critic
  f* = log p(x,y)/(p(x)p(y)) does not (tests/test_toy_gaussian.py, closed form, no training): B(w) = 0.042, 0.006,
  -0.032, -0.089, -0.150, -0.203, -0.234 for w = 0 ... 95 (mean of three datasets of 2000 pairs), and its CNCE(w)
  lies below B(w) by 0.021 ... 0.002.
  A critic that does not depend on y (f_ij = a_i) has Z = B(w) = 0 exactly, for every w, and says nothing about
  I(X;Y): that is where the per-w critics end for w >= 25 (below).
  Both tables print B(w) (mean over seeds) under the estimates, and the "spread" mean_i std_j f_ij of each critic:
  a spread near 0 is a critic that ignores y.

Command (CPU only; a toy this small gains nothing from a GPU, so the script never looks for one):
    python toy_mi/gaussian_cnce.py --json table5.json --plot figures/gaussian_cnce.png    # both protocols, 5 seeds
    python toy_mi/gaussian_cnce.py --protocol shared     # App. B as written only (30 s of CPU, 67 s wall at load 8.5)
    python toy_mi/gaussian_cnce.py --help                # every flag, with its default, from the Config block below

Measured (the first command above: both protocols, 5 seeds, all defaults; 2-core AMD EPYC CPU (no GPU), torch
2.14.1, 1 thread, cores shared with other jobs at load 13-19: 1610 s for the seeds, 27 min wall for the command,
592 s of CPU). Mean and std over seeds (n-1); "bound" is B(w) and "spread" mean_i std_j f_ij, both means over seeds:

                     True       NCE      w=10      w=25      w=50      w=75      w=90      w=95
shared mean       0.02041   0.01474  -0.00878  -0.04024  -0.09444  -0.16126  -0.22600  -0.26653
shared std              -   0.00862   0.01460   0.02295   0.03904   0.06131   0.09005   0.11726
shared bound            -   0.03464   0.00645  -0.02849  -0.08664  -0.15575  -0.22128  -0.26265
shared spread           -   0.15103   0.15103   0.15103   0.15103   0.15103   0.15103   0.15103
per-w  mean       0.02041   0.01634   0.00180 -5.77e-07 -8.36e-08 -1.33e-07 -2.15e-07 -1.25e-07
per-w  std              -   0.00910   0.00412  1.28e-06  8.18e-08  5.15e-08  1.29e-07  7.02e-08
per-w  bound            -   0.03218   0.00394 -5.69e-07 -8.36e-08 -1.33e-07 -2.15e-07 -1.25e-07
per-w  spread           -   0.13031   0.02208  2.22e-05  1.92e-07  9.59e-07  1.74e-07  1.07e-07
paper  mean       0.02041   0.01345   0.01241   0.00220  7.29e-05  1.67e-05  5.87e-06  1.97e-06
paper  std              -   0.00100  3.00e-04  1.00e-04  9.00e-06  2.00e-06  1.00e-06  4.00e-06

What this says about Table 5:
  * Both protocols agree with Theorem 3.1: NCE below the true MI on average (0.0147 and 0.0163 vs 0.0204; single
    seeds reach 0.031 on 2000 held-out pairs, whose sampling error is about 0.005), and CNCE(w) <= NCE.
  * Shared critic (App. B as written): CNCE(w) falls from -0.009 (w = 10) to -0.27 (w = 95), negative in every
    seed from w = 25, and it sits just under B(w), which is itself negative from w = 25: the trained critic ranks
    its ring above its positive, as the exact optimal critic does (B(95) = -0.23). No critic that carries the
    MI here (trained or exact) gives Table 5's positive values at w >= 25 under this reading.
  * Per-w critics: each one maximises its own CNCE(w) and, for w >= 25, reaches it by ignoring y (spread at most
    1e-4 in any seed; seed 0's w = 50 critic scores 120-122 for every pair): the estimate equals B(w) and both are
    0 up to float32 noise in the critic's scores (|x| < 3e-6, mixed sign). At w = 10 three of five seeds kept a
    y-dependent critic (estimates 9.1e-3, 4.4e-4, -5.9e-4) and two collapsed (9e-16). Which seeds collapse depends
    on the draw of negatives: a run with the same distribution of negatives but another draw order (the ring
    sorted with argsort, float32 estimates: the code before commit dff0c41) gave w = 10 values 4.7e-7, 4.4e-7,
    1.5e-3, -6.4e-4, 4.8e-7 and NCE 0.0165 +- 0.0069.
  * So Table 5's falling positive values (0.0022 at w = 25 to 2e-6 at w = 95, with small stds) match neither
    reading: the shared reading gives large negative numbers, the per-w reading a flat critic whose estimate is 0
    up to rounding. What the table can show is CNCE(w) <= NCE. What it cannot show is a bias that grows smoothly
    with w while the estimate still measures I(X;Y): from w = 25 on B(w) < 0 for the exact optimal critic and for
    every NCE-trained critic here, and training on CNCE(w) itself reached a non-negative value only with critics
    that carry no information about y.
  * Digits are not portable: the numbers depend on the CPU, the torch build and the exact draw order of the
    negatives (NCE 0.0191 for the shared protocol on one CPU with torch 2.14.1, 0.0162 on another with the draw
    order before commit dff0c41). Compare means within their std over seeds.

Choices the paper leaves open, and mine:
  * Pairs: i.i.d., each point has its own z_i and eps_i (2000 points, as the paper says), unlike the Tschannen et al.
    notebook that shares one z per batch. Sz = [[1,-.5],[-.5,1]] and Seps = [[1,.9],[.9,1]] are sampled separately
    and summed as App. B writes it; only S = Sz + Seps = [[2,.4],[.4,2]] matters for i.i.d. pairs. X = dim 1, Y = dim 2.
  * Critic: separable f(x, y) = g(x)^T h(y), two encoders (one per variable), 5 Linear layers each (1 -> 10 -> 10 ->
    10 -> 10 -> 10), ReLU between, unnormalised outputs and no temperature (a Gaussian's optimal critic is
    quadratic in (x, y), which needs an unbounded score).
  * Normalisation: log(k+1) with k = 100 negatives plus the positive, Theorem 3.1's 1/k over its k terms (Eq. 4).
    The same k = 100 for NCE and CNCE, so the two differ in where negatives come from and nothing else.
  * The ring: App. B says both "the top w_l percentage" and "as w_l increases from 10 to 95, q has smaller
    support"; only "above the w-th percentile" (the top (100-w)%) fits the second and Table 5's falling values,
    and it is Section 4's definition, so it is mine: `ring_members(sim, lower=w, upper=100)`, the one ring of the
    project, with negatives drawn i.i.d. from it (as Theorem 3.1 draws them). Similarity: the critic f(x_i, y_j) =
    g(x_i)^T M[j], which is both Theorem 3.1's S_B = {v : e^{f(u,v)} in B} and the Ring's g(t(x_i))^T g(t'(x)).
    The bank holds the other n-1 points (the positive is never its own negative: V_2..V_k are independent of V_1).
  * Protocol shared, training negatives: the other pairs of the batch (InfoNCE, positive in the denominator); the
    bank is built once, from the trained h on the fresh pairs, so no entry is stale.
  * Protocol per-w, training: the bank is h of all n training pairs recomputed at every step (2000 forwards of a
    tiny MLP; IR's bank of Eq. 3 would be up to an epoch stale), the ring is ranked on it without gradient, and the
    scores of the drawn negatives keep their gradient in g and h, so each step ascends CNCE(w) itself (IR detaches
    bank entries, which here would leave h learning from positives only). The NCE column (w = 0) is trained the same
    way with uniform bank negatives. Every critic of a seed starts from the same weights and data; each has its own
    random stream, so --protocol per-w alone gives the per-w numbers of --protocol both.
  * Evaluation on n fresh pairs from the same distribution, so f is independent of the sample and the bound holds;
    `--eval-split train` evaluates on the training pairs instead.
"""
import json
import math
import statistics
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

# `python toy_mi/gaussian_cnce.py` puts toy_mi/ on sys.path, not the repo root where moco_ring.py lives.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import fail  # noqa: E402
from engine import POSITIVE, at_least, between, each, option, parse_config  # noqa: E402
from moco_ring import ring_bounds, ring_members  # noqa: E402  (the one ring of the project)


# ---------------------------------------------------------------------------------------------------------------------
# Config: every field is a flag; its help text and default come from here and nowhere else.
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Config:
    protocol: str = option("both", "shared: one NCE-trained critic for every estimate; per-w: one critic per "
                                   "estimator, trained on that estimator; both", choices=("shared", "per-w", "both"))
    seeds: int = option(5, "number of runs (seeds 0..N-1); each redraws data and weights", check=at_least(1))
    num_points: int = option(2000, "pairs (x, y) to train on, and to evaluate on (App. B)", check=at_least(2))
    layers: int = option(5, "Linear layers per encoder (App. B: 5)", check=at_least(1))
    hidden: int = option(10, "hidden width of each encoder (App. B: 10)", check=at_least(1))
    embed_dim: int = option(10, "output width of g and h, the critic's inner product", check=at_least(1))
    lr: float = option(0.03, "Adam learning rate, no weight decay (App. B)", check=POSITIVE)
    batch_size: int = option(128, "pairs per step (shared: the batch's other pairs are the negatives)",
                             check=at_least(2))
    epochs: int = option(100, "passes over the training pairs (App. B)", check=at_least(1))
    num_negatives: int = option(100, "k, negatives per anchor for NCE and CNCE, in training (per-w) and estimates",
                                check=at_least(1))
    percentiles: tuple[float, ...] = option((10.0, 25.0, 50.0, 75.0, 90.0, 95.0),
                                            "w: CNCE draws from the bank above the w-th percentile",
                                            check=each(between(0, 100, include_high=False)))
    draws: int = option(10, "independent draws of the k negatives per anchor, averaged", check=at_least(1))
    eval_split: str = option("heldout", "pairs to estimate on: fresh, or the training ones",
                             choices=("heldout", "train"))
    threads: int = option(1, "torch CPU threads (the MLPs are tiny: more do not help)", check=at_least(1))
    json: str = option("", "write both tables (ours and the paper's) as JSON to this path")
    plot: str = option("", "save the estimates against w as a PNG here (needs matplotlib)")


# ---------------------------------------------------------------------------------------------------------------------
# Data and the closed-form mutual information (App. B)
# ---------------------------------------------------------------------------------------------------------------------
SIGMA_Z = torch.tensor([[1.0, -0.5], [-0.5, 1.0]], dtype=torch.float64)
SIGMA_EPS = torch.tensor([[1.0, 0.9], [0.9, 1.0]], dtype=torch.float64)
SIGMA = SIGMA_Z + SIGMA_EPS  # [[2, .4], [.4, 2]]: the covariance of (X, Y)

# Table 5 of the paper: (mean, std) per column; w -> (mean, std) for CNCE.
PAPER = {"true": 0.02041, "nce": (0.01345, 0.001),
         "cnce": {10.0: (0.01241, 3e-4), 25.0: (0.00220, 1e-4), 50.0: (7.29e-5, 9e-6), 75.0: (1.67e-5, 2e-6),
                  90.0: (5.87e-6, 1e-6), 95.0: (1.97e-6, 4e-6)}}
PROTOCOLS = ("shared", "per-w")


def true_mi(sigma: torch.Tensor = SIGMA) -> float:
    """I(X;Y) of a bivariate Gaussian, -1/2 log(1 - S12 S21 / (S11 S22)) (App. B; line 2). In nats."""
    rho2 = sigma[0, 1] * sigma[1, 0] / (sigma[0, 0] * sigma[1, 1])  # squared correlation
    return -0.5 * math.log1p(-float(rho2))


def sample_pairs(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n i.i.d. pairs (line 1): z ~ N(0, Sz), eps ~ N(0, Seps), (x, y) = z + eps. Returns x: Nx1, y: Nx1."""
    z = torch.randn(n, 2, generator=generator, dtype=torch.float64) @ torch.linalg.cholesky(SIGMA_Z).T  # z: Nx2
    eps = torch.randn(n, 2, generator=generator, dtype=torch.float64) @ torch.linalg.cholesky(SIGMA_EPS).T  # eps: Nx2
    xy = (z + eps).float()  # xy: Nx2, covariance SIGMA
    return xy[:, :1], xy[:, 1:]


# ---------------------------------------------------------------------------------------------------------------------
# The estimator of Theorem 3.1 (line 3), its ring (line 4) and its Jensen bound
# ---------------------------------------------------------------------------------------------------------------------
def cnce_terms(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Z = log( e^{f_pos} / (1/(k+1)) (e^{f_pos} + sum_l e^{f_neg_l}) ) (Thm 3.1; line 3).

    pos: ...x1, neg: ...xk (any leading shape). Returns Z with the leading shape. Thm 3.1's 1/k over its k terms
    (the positive among them) is 1/(k+1) here: k negatives plus the positive, as in Eq. 4.
    """
    k = neg.shape[-1]
    return (pos - torch.cat([pos, neg], dim=-1).logsumexp(dim=-1, keepdim=True)).squeeze(-1) + math.log(k + 1)


def split_positive(scores: torch.Tensor, anchor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scores: BxN, f(x_b, y_j) of B anchors against a bank of N; anchor: B, the bank id of each row's own y.

    Returns pos: Bx1, f(x_b, y_b), and others: Bx(N-1), the scores of the other bank entries (ids ascending): the
    positive is never its own negative, since Thm 3.1's V_2..V_k are independent of V_1.
    """
    b, n = scores.shape
    ids = torch.arange(n - 1).expand(b, n - 1)
    others = ids + (ids >= anchor.unsqueeze(1)).long()  # others: Bx(N-1), bank ids skipping each row's own
    return scores.gather(1, anchor.unsqueeze(1)), scores.gather(1, others)


def ring_terms(scores: torch.Tensor, anchor: torch.Tensor, w: float, num: int,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Positives and `num` negatives per anchor drawn uniformly, with replacement, from ring_w (line 4).

    scores: BxN as in split_positive. The ring is the top (100-w)% of the row's other N-1 scores, ranked on the
    scores without their gradient; w = 0 keeps them all (uniform negatives: NCE). Returns pos: Bx1, neg: Bx`num`,
    both carrying the gradient of `scores`.
    """
    pos, others = split_positive(scores, anchor)  # pos: Bx1, others: Bx(N-1)
    ring = ring_members(others.detach(), w, 100.0)  # ring: BxR, positions among the others
    pick = torch.randint(0, ring.shape[1], (ring.shape[0], num), generator=generator)  # i.i.d., as Thm 3.1 draws
    return pos, others.gather(1, ring.gather(1, pick))  # neg: Bxnum


def estimate_per_draw(f: torch.Tensor, w: float, num_negatives: int, draws: int,
                      generator: torch.Generator) -> torch.Tensor:
    """NCE (w = 0) or CNCE(w) of an NxN score matrix (line 7). f[i, j] = f(x_i, y_j), positives on the diagonal.

    Returns D values, D = draws: the mean over the N anchors of Z for each independent draw of k negatives.
    """
    n, k = f.shape[0], num_negatives
    pos, neg = ring_terms(f, torch.arange(n), w, draws * k, generator)  # one draw of all D*k: one sort per row
    z = cnce_terms(pos.unsqueeze(1).expand(n, draws, 1), neg.view(n, draws, k))  # z: NxD
    return z.mean(dim=0)


def jensen_bound(f: torch.Tensor, w: float, num_negatives: int) -> float:
    """B(w) = k/(k+1) (mean_i f_ii - mean_i r_i), r_i the mean score of ring_w(i): E[estimate(w)] <= B(w).

    log is concave, so log((1/(k+1)) sum_m e^{s_m}) >= (1/(k+1)) sum_m s_m for the k+1 scores of line 3, which
    gives Z <= k/(k+1) (f_pos - mean_l f_neg_l) for every draw; negatives are uniform on the ring, so the
    expectation of their mean is r_i. f: NxN as in estimate_per_draw.
    """
    n, k = f.shape[0], num_negatives
    pos, others = split_positive(f, torch.arange(n))  # pos: Nx1, others: Nx(N-1)
    lo, hi = ring_bounds(n - 1, w, 100.0)  # the slice ring_members returns
    ring_mean = others.sort(dim=1).values[:, lo:hi].mean(dim=1)  # r_i: N
    return k / (k + 1) * (pos.mean() - ring_mean.mean()).item()


# ---------------------------------------------------------------------------------------------------------------------
# The critic f(x, y) = g(x)^T h(y) and its two trainings: shared (lines 5-6), per-w (lines 9-12)
# ---------------------------------------------------------------------------------------------------------------------
def make_encoder(cfg: Config) -> torch.nn.Sequential:
    """`layers` Linear layers, ReLU between them: 1 -> hidden -> ... -> hidden -> embed_dim."""
    dims = [1] + [cfg.hidden] * (cfg.layers - 1) + [cfg.embed_dim]
    modules: list[torch.nn.Module] = []
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        modules += [torch.nn.Linear(d_in, d_out), torch.nn.ReLU()]
    return torch.nn.Sequential(*modules[:-1])  # no ReLU on the output: the critic's scores must be signed


def new_critic(cfg: Config, seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Encoders g (for x) and h (for y), initialised from `seed`: every critic of one seed starts alike."""
    torch.manual_seed(seed)  # nn.Linear draws its initial weights from the global generator
    return make_encoder(cfg), make_encoder(cfg)


def train_shared(x: torch.Tensor, y: torch.Tensor, cfg: Config, seed: int,
                 generator: torch.Generator) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Maximise the in-batch NCE bound (lines 5-6). x: Nx1, y: Nx1. Returns the encoders g and h."""
    g, h = new_critic(cfg, seed)
    opt = torch.optim.Adam([*g.parameters(), *h.parameters()], lr=cfg.lr)
    for _ in range(cfg.epochs):
        for b in torch.randperm(x.shape[0], generator=generator).split(cfg.batch_size):
            f = g(x[b]) @ h(y[b]).T  # f: BxB, f[i, j] = f(x_i, y_j); positives on the diagonal
            # line 6: cross-entropy with target i is -log(e^{f_ii} / sum_j e^{f_ij}), the positive in the sum.
            loss = F.cross_entropy(f, torch.arange(len(b)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return g, h


def train_per_w(x: torch.Tensor, y: torch.Tensor, w: float, cfg: Config, seed: int,
                generator: torch.Generator) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Maximise the estimator CNCE(w) itself (NCE for w = 0), lines 9-12. x: Nx1, y: Nx1. Returns g and h."""
    g, h = new_critic(cfg, seed)
    opt = torch.optim.Adam([*g.parameters(), *h.parameters()], lr=cfg.lr)
    for _ in range(cfg.epochs):
        for b in torch.randperm(x.shape[0], generator=generator).split(cfg.batch_size):
            bank = h(y)  # M: NxC, line 10: the bank of the current critic, recomputed (2000 tiny forwards) so no
            # entry is stale; it keeps its gradient, so the step below is the gradient of CNCE(w) in g and h.
            scores = g(x[b]) @ bank.T  # scores: BxN, f(x_b, y_j) against every training pair
            pos, neg = ring_terms(scores, b, w, cfg.num_negatives, generator)  # line 11: pos Bx1, neg Bxk
            loss = -cnce_terms(pos, neg).mean()  # line 12
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return g, h


# ---------------------------------------------------------------------------------------------------------------------
# One seed of each protocol (lines 1-13)
# ---------------------------------------------------------------------------------------------------------------------
def stream(seed: int, name: str) -> torch.Generator:
    """A generator for one critic's batch order and negatives, fixed by (seed, name) whatever else runs: the per-w
    numbers are the same under --protocol per-w and --protocol both."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}".encode()))


def score_matrix(g: torch.nn.Module, h: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """f: NxN, f[i, j] = g(x_i)^T h(y_j) = g(x_i)^T M[j] (the bank of line 4), positives on the diagonal.

    In float64, so the estimates and bounds are those of the float32 critic and not float32 rounding: a collapsed
    critic (seed 0's per-w critic at w = 50 scores 120-122, the same for every y) gives Z as a difference of equal
    scores near 120: its estimate is 4.8e-7 in float32 (rounding alone) and 9e-16 in float64.
    """
    with torch.no_grad():
        return (g(x) @ h(y).T).double()


def spread(f: torch.Tensor) -> float:
    """mean_i std_j f(x_i, y_j): how much the critic's score depends on y. 0: y-independent, every Z is 0."""
    return f.std(dim=1).mean().item()


def run_seed(cfg: Config, seed: int, protocols: tuple[str, ...] = PROTOCOLS) -> dict:
    """Both protocols for one seed, on the same data. Returns {protocol: {"nce", "cnce": {w}, "bound": {w},
    "spread": {w}}}; "bound" and "spread" hold w = 0 (the NCE critic or estimate) too."""
    data = torch.Generator().manual_seed(seed)
    train = sample_pairs(cfg.num_points, data)  # x: Nx1, y: Nx1 (line 1)
    heldout = sample_pairs(cfg.num_points, data)  # independent of f, so the bound of Thm 3.1 applies
    evaluate_on = heldout if cfg.eval_split == "heldout" else train
    ws = (0.0, *cfg.percentiles)
    result = {}
    if "shared" in protocols:
        gen = stream(seed, "shared")
        f = score_matrix(*train_shared(*train, cfg, seed, gen), *evaluate_on)  # lines 5-6
        est = {w: estimate_per_draw(f, w, cfg.num_negatives, cfg.draws, gen).mean().item() for w in ws}  # line 7
        result["shared"] = {"nce": est[0.0], "cnce": {w: est[w] for w in cfg.percentiles},
                            "bound": {w: jensen_bound(f, w, cfg.num_negatives) for w in ws},
                            "spread": {w: spread(f) for w in ws}}
    if "per-w" in protocols:
        est, bound, spreads = {}, {}, {}
        for w in ws:  # line 8
            gen = stream(seed, f"per-w {w:g}")
            f = score_matrix(*train_per_w(*train, w, cfg, seed, gen), *evaluate_on)  # lines 9-12
            est[w] = estimate_per_draw(f, w, cfg.num_negatives, cfg.draws, gen).mean().item()  # line 13
            bound[w], spreads[w] = jensen_bound(f, w, cfg.num_negatives), spread(f)
        result["per-w"] = {"nce": est[0.0], "cnce": {w: est[w] for w in cfg.percentiles},
                           "bound": bound, "spread": spreads}
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Table 5: summary, printing, JSON, plot
# ---------------------------------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize(per_seed: list[dict]) -> dict:
    """Table 5's layout for one protocol: mean/std over seeds of NCE, CNCE(w), B(w) and the spread (keys: w as
    strings; "0" is the NCE column)."""
    ws = list(per_seed[0]["bound"])
    columns = {"nce": mean_std([r["nce"] for r in per_seed]),
               "cnce": {f"{w:g}": mean_std([r["cnce"][w] for r in per_seed]) for w in per_seed[0]["cnce"]}}
    for key in ("bound", "spread"):
        columns[key] = {f"{w:g}": mean_std([r[key][w] for r in per_seed]) for w in ws}
    per_seed_json = [{key: r[key] if key == "nce" else {f"{w:g}": v for w, v in r[key].items()} for key in r}
                     for r in per_seed]
    return {**columns, "per_seed": per_seed_json}


def paper_table() -> dict:
    return {"true": PAPER["true"], "nce": dict(zip(("mean", "std"), PAPER["nce"])),
            "cnce": {f"{w:g}": dict(zip(("mean", "std"), ms)) for w, ms in PAPER["cnce"].items()}}


def _num(v: float) -> str:
    """Fixed point for the table's larger values, scientific for the tiny ones."""
    return f"{v:>10.5f}" if v == 0 or abs(v) >= 1e-3 else f"{v:>10.2e}"


def format_table(tables: dict, paper: dict, true: float) -> str:
    """Table 5's layout: per protocol the estimate's mean and std over seeds, the mean Jensen bound B(w) and the
    mean spread of the critic's scores; then the paper's row."""
    any_table = next(iter(tables.values()))
    ws = list(any_table["cnce"])
    lines = [" " * 15 + f"{'True':>10}{'NCE':>10}" + "".join(f"{'w=' + w:>10}" for w in ws)]
    for name, table in tables.items():
        rows = (("mean", [table["nce"]["mean"]] + [table["cnce"][w]["mean"] for w in ws]),
                ("std", [table["nce"]["std"]] + [table["cnce"][w]["std"] for w in ws]),
                ("bound", [table["bound"][w]["mean"] for w in ["0", *ws]]),
                ("spread", [table["spread"][w]["mean"] for w in ["0", *ws]]))
        for stat, cells in rows:
            first = _num(true) if stat == "mean" else f"{'-':>10}"
            lines.append(f"{name:<7}{stat:<8}{first}" + "".join(_num(c) for c in cells))
    for stat in ("mean", "std"):
        first = _num(paper["true"]) if stat == "mean" else f"{'-':>10}"
        cells = [paper["nce"]] + [paper["cnce"].get(w) for w in ws]
        lines.append(f"{'paper':<7}{stat:<8}{first}" + "".join(_num(c[stat]) if c else f"{'n/a':>10}" for c in cells))
    return "\n".join(lines)


def import_pyplot():
    """matplotlib is optional (training does not need it): imported only for --plot, with one error line."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        fail("--plot needs matplotlib, which is not installed (pip install matplotlib), or leave out --plot")
    return plt


def save_plot(tables: dict, paper: dict, true: float, path: str) -> None:
    """Estimate against w (w = 0: NCE) per protocol with its Jensen bound, the paper's Table 5 and the true MI;
    left on a linear axis, right on a symmetric-log one, where the paper's 1e-6 values can be seen."""
    plt = import_pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax in axes:
        for (name, table), color, dx in zip(tables.items(), ("tab:blue", "tab:orange"), (-0.8, 0.8)):
            ws = [dx + float(w) for w in ["0", *table["cnce"]]]  # shifted by dx so the error bars do not overlap
            cells = [table["nce"], *table["cnce"].values()]
            ax.errorbar(ws, [c["mean"] for c in cells], [c["std"] for c in cells], marker="o", ms=4, capsize=3,
                        color=color, label=f"ours, {name} critic (mean, std over seeds)")
            ax.plot([float(w) for w in table["bound"]], [c["mean"] for c in table["bound"].values()], ls=":",
                    color=color, label=f"Jensen bound B(w), {name} critic")
        paper_ws = [0.0] + [float(w) for w in paper["cnce"]]
        paper_cells = [paper["nce"], *paper["cnce"].values()]
        ax.errorbar(paper_ws, [c["mean"] for c in paper_cells], [c["std"] for c in paper_cells], marker="s", ms=4,
                    capsize=3, color="tab:green", label="paper, Table 5")
        ax.axhline(true, color="k", lw=1, label="true I(X;Y)")
        ax.axhline(0.0, color="gray", lw=0.5)
        ax.set_xlabel("w (percentile; 0 = NCE)")
    axes[0].set_ylabel("estimate of I(X;Y) (nats)")
    axes[0].set_title("linear axis")
    axes[1].set_yscale("symlog", linthresh=1e-6)
    axes[1].set_title("symmetric log axis (linear within 1e-6)")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"plot written to {path}")


def check_destination(path: str, flag: str) -> None:
    """Refuse an output file that cannot be written now, before the run, rather than after it (one error line)."""
    target = Path(path)
    if target.is_dir():
        fail(f"{flag} {path} is a folder: give a file name")
    if not target.parent.is_dir():
        fail(f"{flag} {path}: the folder {target.parent} does not exist")


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(Config, argv, __doc__)
    for path, flag in ((cfg.json, "--json"), (cfg.plot, "--plot")):
        if path:
            check_destination(path, flag)
    if cfg.plot:
        import_pyplot()  # a missing matplotlib is said now, not after the run
    torch.set_num_threads(cfg.threads)
    protocols = PROTOCOLS if cfg.protocol == "both" else (cfg.protocol,)
    start = time.perf_counter()
    per_seed: dict[str, list[dict]] = {name: [] for name in protocols}
    for seed in range(cfg.seeds):
        for name, r in run_seed(cfg, seed, protocols).items():
            per_seed[name].append(r)
            print(f"seed {seed} {name:<6}: NCE {r['nce']:.5f}  "
                  + "  ".join(f"w={w:g} {v:.2e}" for w, v in r["cnce"].items()), flush=True)
    wall_s = time.perf_counter() - start
    tables, paper, true = {name: summarize(rows) for name, rows in per_seed.items()}, paper_table(), true_mi()
    print(format_table(tables, paper, true))
    print(f"{cfg.seeds} seed(s) in {wall_s:.1f} s")
    result = {"true": true, "protocols": tables, "paper": paper, "config": asdict(cfg), "wall_s": wall_s}
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(result, indent=2))
    if cfg.plot:
        save_plot(tables, paper, true, cfg.plot)
    return result


if __name__ == "__main__":
    main()
