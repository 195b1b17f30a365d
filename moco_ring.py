"""MoCoRing: MoCo v2 whose negatives are a "ring" of the queue (conditional NCE).

Paper: Mike Wu, Milan Mosse, Chengxu Zhuang, Daniel Yamins, Noah Goodman, "Conditional Negative Sampling for
Contrastive Learning of Visual Representations", ICLR 2021 (../shared/papers/ring_conditional_negative_sampling.txt).
Theorem 3.1: negatives drawn from a subset S_B of the data that is "close" to the anchor (CNCE) still give a
lower bound on mutual information, looser than NCE's but of lower variance (Theorem 3.2). Section 4 takes S_B to be
a ring: the queue entries whose similarity to the query lies between the w_l-th and w_u-th percentiles.

Algorithm 1 (MoCoRing, --negatives queue), as implemented here (line numbers are cited in the code):
     1  tx1, tx2 = aug(x), aug(x)                      # two views of a batch           (AugmentedViews, MultiView)
     2  q = norm(g_q(tx1))                             # q: NxC                         (MoCoRing.forward)
     3  k = norm(g_k(tx2)).detach()                    # k: NxC, shuffle BN             (MoCoRing.forward)
     4  l_pos = sum(q * k) / t                         # Nx1                            (ring_loss)
     5  l_neg = sort(q @ queue.T / t)                  # NxK, farthest -> closest        (ring_loss)
     6  ix_l, ix_u = w_l * K, w_u * K                  # percentile -> index             (ring_bounds)
     7  ring = l_neg[:, ix_l:ix_u]                     # Nx|ring|                        (ring_loss)
     8  loss = -l_pos + logsumexp([l_pos, ring])       # positive kept (Theorem 3.1)     (ring_loss)
     9  loss.backward(); step(g_q)                     #                                  (train_step)
    10  g_k = m * g_k + (1 - m) * g_q                  # momentum update                 (train_step)
    11  enqueue(queue, k); dequeue(queue)              # FIFO                            (train_step)
    12  anneal(w_l); anneal(w_u)                       # Section 4, Appendix E           (ring_schedule)
With --ring-lower 0 --ring-upper 100 the ring is the whole queue and this is exactly MoCo v2 (InfoNCE, Eq. 4).

IRing (--negatives bank): instance discrimination (Wu et al. 2018; the paper's Eq. 3) with the ring. One encoder g,
one view per image, a memory bank M of one normalized embedding per training index (MemoryBank):
    v = norm(g(t(x_i)))                                # v: NxC                         (MoCoRing.forward_bank)
    l_pos = v . M[i] / t                               # Nx1, the bank's own entry       (bank_ring_loss)
    j_1..j_k ~ U(ring of v among M minus M[i])          # percentiles [w_l, w_u], distinct  (sample_ring_negatives)
    loss = -l_pos + logsumexp([l_pos, v . M[j_1..k] / t])                                 (bank_ring_loss)
    M[i] <- norm(m M[i] + (1 - m) v)                   # after the step; m = 0 default   (MemoryBank.update)
    anneal(w_l); anneal(w_u)                                                              (ring_schedule)
--ring-lower 0 --ring-upper 100 is IR itself. CMCRing (two encoders on L and ab colour channels, two banks swapped)
is not implemented: it needs a Lab colour pipeline and split-channel encoders that nothing else here uses, and the
public code has none to check against (../shared/papers/README.md).

Where the paper and its public code (mhw32/contrastive-ring-public) differ (../shared/papers/README.md):
- Alg. 1 writes logsumexp(ring) without the positive; Theorem 3.1 and the public code keep it. I keep it.
- Annealing. Alg. 1 ends with anneal(w_l); anneal(w_u) and Appendix E moves the outer threshold from 100% to 10% of
  the set over 100 epochs. The public code anneals its outer threshold f (1 -> 0.1) and, with dynamic_inner (which
  its `x or True` forces on), cuts the closest 10% *of that outer set*, so in percentiles the ring goes
  [0, 90] -> [90, 99]: w_u moves too. That is the default here (--anneal-upper); --no-anneal-upper keeps w_u at
  --ring-upper (the text of Sec. 4, which anneals w_l only). --anneal step is the public code's StepThresholdPolicy:
  10 levels (f = 1.0, 0.9, ..., 0.1), each held a tenth of the span. --anneal linear reaches the target after
  --anneal-epochs (the public linspace gets there one step earlier). Their released configs switch annealing off.
- IRing's bank momentum: the paper (Sec. 2) stores "the embedding of the view of x_i observed last epoch", the public
  config has m = 0: --bank-m 0 by default (Wu et al. 2018's own code: 0.5). The public code draws k - 1 = 4095
  negatives and adds the positive; here --bank-negatives k = 4096 negatives plus the positive, as Eq. 3 writes.
- IRing's draws: the public NCERing (like Wu et al.'s NCEAverage) draws with replacement and may draw the query's
  own entry (about 0.08 times per query at n = 50,000; 3 times at n = 1,280). Here the k negatives are distinct
  ring members, never the own entry, so the whole bank with k >= M - 1 is the full softmax over the bank.
- --symmetric sums both directions (loss_12 + loss_21), as MoCo's CIFAR demo that the flag names does; the logged
  loss is therefore about twice the asymmetric one.
- Defaults for CIFAR follow MoCo's CIFAR-10 demo (ResNet-18, 3x3 stem, SplitBN 8, batch 512, K 4096, m 0.99,
  t 0.1, SGD 0.06 cosine, wd 5e-4), the recipe whose kNN numbers are the known reference. --recipe paper sets the
  Ring paper's (Sec. 5 "Training Details"): t 0.07, lr 0.03, wd 1e-4, batch 256, 300 epochs with the lr / 10 at
  epochs 200 and 250, K 65536, m 0.999; explicit flags still win. Still not the paper's: its images are resized to
  256 and cropped to 224 px (try --image-size 224; this script crops at the dataset's 32 px), and its linear probe
  reads the pre-pool 512x7x7 feature map where `python engine.py probe` reads the pooled 512-d feature.

Run:
    python moco_ring.py                                            # CIFAR-10 (downloaded), ResNet-18, one device
    python moco_ring.py --ring-lower 0 --ring-upper 100            # the MoCo v2 baseline
    python moco_ring.py --negatives bank                           # IRing (--ring-lower 0 --ring-upper 100: IR)
    python moco_ring.py --recipe paper                             # the paper's CIFAR settings (see above)
    python moco_ring.py --augment cpu                              # PIL in loader workers (default: device)
    python moco_ring.py --dataset folder --data-root ../shared/data/cifar10-jpg --arch small --workers 2   # CPU
    torchrun --nproc_per_node=4 moco_ring.py --batch-size 512      # 4 GPUs (global batch 512), or 4 CPU processes
    python engine.py probe runs/moco_ring/checkpoint.pt            # linear probe of the saved backbone

Results (what reproduces at CPU scale, what needs a GPU, with commands, commits and machines): RESULTS.md.
"""
from __future__ import annotations

import copy
import dataclasses
import typing

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import engine
from engine import NON_NEGATIVE, POSITIVE, at_least, between, option

# ---------------------------------------------------------------------------------------------------------------------
# The Ring (Section 4; Algorithm 1 lines 4-8 of the run card) and its loss
# ---------------------------------------------------------------------------------------------------------------------
def ring_bounds(num_entries: int, lower: float, upper: float) -> tuple[int, int]:
    """Slice [lo, hi) of the similarities sorted ascending (far -> close) that the ring keeps (Alg. 1 line 6).

    `lower`/`upper` are percentiles in [0, 100]: lower=0 keeps the farthest entries, upper=100 the closest.
    """
    if not 0.0 <= lower < upper <= 100.0:
        raise ValueError(f"ring percentiles must satisfy 0 <= lower < upper <= 100, got lower={lower}, upper={upper}")
    lo = int(lower / 100.0 * num_entries)  # Alg. 1 line 6: ix_l = w_l * len(queue)
    hi = int(upper / 100.0 * num_entries)  # ix_u = w_u * len(queue)
    return lo, max(hi, lo + 1)  # keep at least one negative however small the queue


def ring_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float,
              lower: float = 0.0, upper: float = 100.0) -> torch.Tensor:
    """MoCoRing loss, the CNCE estimator of Theorem 3.1 with the ring of Section 4 as support S_B.

    q: NxC queries and k: NxC keys (L2-normalized; row i of k is q_i's positive, "index 0" of its logits),
    queue: KxC negatives (rows are keys). Returns the mean over the N queries of
        -log( e^{q.k/t} / (e^{q.k/t} + sum_{j in ring(q)} e^{q.Q[j]/t}) ).
    Gradients reach q only: keys come from the momentum encoder and the queue is a buffer.
    With lower=0, upper=100 the ring is the whole queue and this is MoCo v2's InfoNCE (Eq. 4), bit for bit.
    """
    k, queue = k.detach(), queue.detach()
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(1) / temperature  # l_pos: Nx1, Alg. 1 line 4
    l_neg = q @ queue.T / temperature  # l_neg: NxK, line 5
    num_entries = queue.shape[0]
    lo, hi = ring_bounds(num_entries, lower, upper)
    if (lo, hi) != (0, num_entries):
        # Alg. 1 lines 5-7: sort each query's similarities and keep ranks [lo, hi) counted from the farthest. Only
        # the K-lo closest are needed, so a top-k (closest first) replaces the full sort: 31 vs 137 ms forward +
        # backward for 256 x 4096 similarities at w_l = 90 on the 2-core CPU. Gradients flow back through `values`
        # to the entries kept.
        closest_first = l_neg.topk(num_entries - lo, dim=1).values  # Nx(K-lo), descending similarity
        l_neg = closest_first[:, num_entries - hi:]  # l_neg: Nx(hi-lo), the ring
    # Line 8. The paper's listing writes logsumexp(ring) alone; Theorem 3.1's estimator (and the public code) keeps
    # the positive in the denominator: without it the loss is no bound on MI and is unbounded below (a query can
    # push its whole ring away forever). I follow the theorem.
    logits = torch.cat([l_pos, l_neg], dim=1)  # logits: Nx(1+|ring|), positive at index 0
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def ring_members(similarity: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    """The ring of each row (Section 4): similarity: NxM scores of N anchors against M candidates -> NxR candidate
    ids, R = hi - lo of ring_bounds(M, lower, upper), ordered from the farthest to the closest (up to the order of
    tied scores). When the ring is the whole set, row n is simply 0..M-1 (no ranking needed)."""
    num_candidates, rows = similarity.shape[1], similarity.shape[0]
    lo, hi = ring_bounds(num_candidates, lower, upper)
    if (lo, hi) == (0, num_candidates):
        return torch.arange(num_candidates, device=similarity.device).expand(rows, -1)
    # A top-k of the M-lo closest replaces the full argsort: IRing's whole loss, forward + backward, at M 20000,
    # N 128, w_l 90 took 0.18 s instead of 1.8 s with the argsort (2-core CPU, one thread).
    closest_first = similarity.topk(num_candidates - lo, dim=1).indices  # Nx(M-lo), descending similarity
    return closest_first.flip(1)[:, :hi - lo]  # NxR, ranks lo..hi-1 counted from the farthest


def sample_ring_negatives(similarity: torch.Tensor, own: torch.Tensor, lower: float, upper: float,
                          num_negatives: int, priority: torch.Tensor) -> torch.Tensor:
    """IRing's negatives: up to k = num_negatives bank ids per row, drawn uniformly *without* replacement from the
    row's ring, never the row's own entry.

    similarity: NxM scores against the bank, own: N, the bank id of each row's own entry (its positive), priority:
    NxM uniforms, the random part: the ring's k members of highest priority are drawn, which is a uniform draw of
    k distinct members. The ring is ranked among the M-1 *other* entries; when k is at least the ring's size R,
    every ring member is taken once (the result is NxR). So with the whole bank as the ring and k >= M-1 the
    loss is the full softmax over the bank, Wu et al.'s LinearAverage.
    The public code (and Wu et al.'s NCEAverage) draws with replacement from the whole bank, own entry included:
    at n = 50,000 that costs nothing, but on a bank of 1,280 with k = 4096 each query would meet its own entry
    about 3 times as a negative.
    """
    with torch.no_grad():
        others = similarity.scatter(1, own.unsqueeze(1), float("-inf"))  # the own entry ranks below every other
        num_others = similarity.shape[1] - 1
        lo, hi = ring_bounds(num_others, lower, upper)
        if (lo, hi) == (0, num_others):  # the whole bank but the own entry, ids ascending
            ids = torch.arange(num_others, device=similarity.device).expand(similarity.shape[0], -1)
            ring = ids + (ids >= own.unsqueeze(1)).long()
        else:  # the ring among the others: ranks [lo, hi) of the M-1, i.e. [lo + 1, hi + 1) with the own at rank 0
            closest_first = others.topk(num_others - lo, dim=1).indices  # Nx(M-1-lo), never the own entry
            ring = closest_first.flip(1)[:, :hi - lo]  # ring: NxR
        if num_negatives >= ring.shape[1]:
            return ring
        chosen = priority.gather(1, ring).topk(num_negatives, dim=1).indices  # Nxk distinct ring positions
        return ring.gather(1, chosen)


def bank_ring_loss(q: torch.Tensor, bank: torch.Tensor, index: torch.Tensor, temperature: float, lower: float,
                   upper: float, num_negatives: int, priority: torch.Tensor) -> torch.Tensor:
    """IRing loss: Eq. 3 (instance discrimination, Wu et al. 2018) with negatives drawn from the ring (Section 4).

    q: NxC embeddings g(t(x_i)) (L2-normalized), bank: MxC memory bank M (one normalized row per training image),
    index: N training indices i, priority: NxM uniforms that decide the draw (sample_ring_negatives). The positive
    is the bank's own entry M[i] (Eq. 3; the public code's NCERing likewise); the negatives j_1..j_k are k
    distinct entries other than i whose similarity to q lies between the w_l-th and w_u-th percentiles of the
    other M-1 (all of the ring when it holds k or fewer). Returns the mean over the N queries of
        -log( e^{q.M[i]/t} / (e^{q.M[i]/t} + sum_{s} e^{q.M[j_s]/t}) ),
    the positive kept in the denominator as in Eq. 3 and Theorem 3.1 (Eq. 3's 1/(k+1) is a constant, left out).
    Gradients reach q only (the bank is a buffer).
    """
    bank = bank.detach()
    l_all = q @ bank.T / temperature  # l_all: NxM, q against every bank entry
    l_pos = l_all.gather(1, index.unsqueeze(1))  # l_pos: Nx1, q.M[i]/t
    negatives = sample_ring_negatives(l_all.detach(), index, lower, upper, num_negatives, priority)  # Nxk ids
    l_neg = l_all.gather(1, negatives)  # l_neg: Nxk, the drawn ring entries
    logits = torch.cat([l_pos, l_neg], dim=1)  # logits: Nx(1+k), positive at index 0
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


class MemoryBank(nn.Module):
    """IRing's memory bank (Wu et al. 2018): `vectors: MxC`, one L2-normalized embedding per training index, in a
    buffer (moves with `.to()`, saved in the state_dict). Random unit vectors until an index is first seen, as in
    Wu et al. and the public code."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("vectors", F.normalize(torch.randn(size, dim), dim=1))  # vectors: MxC

    @torch.no_grad()
    def update(self, index: torch.Tensor, embeddings: torch.Tensor, momentum: float) -> None:
        """M[i] <- norm(m M[i] + (1 - m) v_i) for each index i with its new embedding v_i (NxC, normalized).
        m = 0 writes v_i: the bank holds "the embedding of the view of x_i observed last epoch" (Ring, Sec. 2),
        which is the public code's setting (nce_ring.json: m 0); Wu et al. 2018's own code uses m = 0.5."""
        mixed = momentum * self.vectors[index] + (1.0 - momentum) * embeddings.to(self.vectors.dtype)
        self.vectors[index] = F.normalize(mixed, dim=1)


# ---------------------------------------------------------------------------------------------------------------------
# Config: every field is a flag (`ring_lower` -> `--ring-lower`); help and default live here only
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Config(engine.ImageRunConfig):
    """MoCoRing's and IRing's options; the data, run and kNN options every image script shares are in
    engine.ImageRunConfig."""
    # encoder
    dim: int = option(128, "feature dimension C of the contrastive space", check=at_least(1))
    mlp: bool = option(True, "MoCo v2 MLP projection head (--no-mlp: MoCo v1 linear head)")
    bn_splits: int = option(8, "BatchNorm groups on one device (SplitBatchNorm imitates that many GPUs); "
                               "under torchrun each process is one group", check=at_least(1))
    # MoCo (--negatives queue: MoCoRing, Alg. 1) or instance discrimination (--negatives bank: IRing, Eq. 3)
    negatives: str = option("queue", "where the ring's negatives come from: 'queue' MoCoRing (Alg. 1, momentum "
                                     "encoder, FIFO queue); 'bank' IRing (Eq. 3, one encoder, a memory bank of one "
                                     "embedding per training image)", choices=("queue", "bank"))
    moco_k: int = option(4096, "queue size K", check=at_least(1))
    moco_m: float = option(0.99, "momentum m of the key encoder", check=between(0.0, 1.0))
    moco_t: float = option(0.1, "softmax temperature t", check=POSITIVE)
    symmetric: bool = option(False, "symmetric loss of MoCo's CIFAR demo: each view is query once and key once, "
                                    "loss_12 + loss_21 (the demo's sum, not the mean: the gradient is the demo's)")
    bank_negatives: int = option(4096, "IRing: negatives k drawn per query from the ring, distinct and never its "
                                       "own entry (Eq. 3; the public code draws 4095 plus the positive)",
                                 check=at_least(1))
    bank_m: float = option(0.0, "IRing: memory-bank momentum, M[i] <- norm(m M[i] + (1-m) v_i); 0 keeps the "
                                "last epoch's view (Sec. 2, public code); Wu et al. 2018 use 0.5",
                           check=between(0.0, 1.0, include_high=False))
    # Ring (Section 4)
    ring_lower: float = option(90.0, "lower percentile w_l of the ring in [0, 100] (the annealing's target)",
                               check=between(0, 100))
    ring_upper: float = option(99.0, "upper percentile w_u: entries closer than this are not negatives (target)",
                               check=between(0, 100))
    anneal: str = option("linear", "schedule of the ring: 'linear' w_l 0 -> target, 'step' the same in 10 levels "
                                   "(the public code's), 'none' the targets from step 0",
                         choices=("none", "linear", "step"))
    anneal_upper: bool = option(True, "anneal w_u with w_l (Alg. 1's anneal(w_u); the public code's dynamic inner "
                                      "cut: [0, 90] -> [90, 99]); --no-anneal-upper keeps w_u at --ring-upper")
    anneal_epochs: int = option(100, "epochs over which the ring narrows to its targets (Appendix E: 100)",
                                check=NON_NEGATIVE)
    # optimization
    recipe: str = option("demo", "defaults: 'demo' MoCo's CIFAR-10 demo (below); 'paper' the Ring paper's "
                                 "(t 0.07, lr 0.03, wd 1e-4, batch 256, 300 epochs, lr drops 200 250, K 65536, "
                                 "m 0.999); flags given explicitly win", choices=("demo", "paper"))
    epochs: int = option(200, "training epochs", check=at_least(1))
    batch_size: int = option(512, "global batch size (split evenly over processes)", check=at_least(1))
    lr: float = option(0.06, "SGD learning rate", check=POSITIVE)
    lr_drops: tuple[int, ...] = option((), "epochs at which the lr is divided by 10 (the paper: 200 250); none: "
                                           "cosine decay to 0 (MoCo's CIFAR demo)", check=engine.each(at_least(1)))
    momentum: float = option(0.9, "SGD momentum", check=between(0, 1))
    weight_decay: float = option(5e-4, "SGD weight decay", check=NON_NEGATIVE)


# The Ring paper's CIFAR recipe (Sec. 5 "Training Details"; public configs mocov2/moco_ring.json, nce/nce_ring.json).
PAPER_RECIPE = {"moco_t": 0.07, "lr": 0.03, "weight_decay": 1e-4, "batch_size": 256, "epochs": 300,
                "lr_drops": (200, 250), "moco_k": 65536, "moco_m": 0.999}
ANNEAL_LEVELS = 10  # the public code's step policy: thresholds 1.0, 0.9, ..., 0.1 of the set, each for 1/10 of the span


def parse_config(argv: list[str] | None = None) -> Config:
    """Flags -> Config. With --recipe paper the defaults are PAPER_RECIPE's; flags given explicitly still win
    (argparse sees the recipe's values as defaults, so abbreviations and --resume behave as usual)."""
    cfg = engine.parse_config(Config, argv, __doc__)
    if cfg.recipe == "demo":
        return cfg
    fields, hints = {f.name: f for f in dataclasses.fields(Config)}, typing.get_type_hints(Config)
    paper = dataclasses.make_dataclass(
        "PaperRecipe", [(name, hints[name], dataclasses.field(default=value, metadata=fields[name].metadata))
                        for name, value in PAPER_RECIPE.items()], bases=(Config,))
    return Config(**dataclasses.asdict(engine.parse_config(paper, argv, __doc__)))


def ring_schedule(step: int, anneal_steps: int, lower: float, upper: float, policy: str,
                  anneal_upper: bool) -> tuple[float, float]:
    """The ring (w_l, w_u) in percentiles at a global step (Section 4 "Annealing Policy", Appendix E; Alg. 1 line 12).

    Early in training the representation is poor and the "closest" entries are not truly close, so the ring starts
    wide and narrows towards the closest entries. The progress p goes 0 -> 1 over `anneal_steps`:
      none: p = 1 from the first step;
      linear: p = step / anneal_steps (the public code's linspace over anneal_steps points reaches 1 one step
        earlier, at anneal_steps - 1; I keep the paper's "over 100 epochs");
      step: the public code's StepThresholdPolicy: 10 levels p = 0, 1/9, ..., 1, each held anneal_steps // 10 steps.
    w_l = p * lower. The public code anneals the outer threshold f = 1 - 0.9 p (the ring's share of the set, from
    all to 10%) and, with its forced dynamic_inner, cuts the closest 10% *of that outer set*. In percentiles that
    is w_l = 100 (1 - f), w_u = 100 - 10 f: the ring goes [0, 90] -> [90, 99], so w_u moves too (anneal_upper).
    For any targets this keeps the cut's share of the ring fixed: 100 - w_u = (100 - w_l) (100 - upper)/(100 - lower).
    Without anneal_upper, w_u stays at `upper` (the text of Section 4 anneals w_l only).
    """
    if policy == "none" or anneal_steps <= 0:
        progress = 1.0
    elif policy == "linear":
        progress = min(1.0, step / anneal_steps)
    else:
        hold = anneal_steps // ANNEAL_LEVELS  # 0 when the span is under 10 steps: the public code then skips it
        progress = 1.0 if hold == 0 else min(ANNEAL_LEVELS - 1, step // hold) / (ANNEAL_LEVELS - 1)
    w_l = lower * progress
    if not anneal_upper:
        return w_l, upper
    return w_l, 100.0 - (100.0 - w_l) * (100.0 - upper) / (100.0 - lower)


def learning_rate(step: int, steps_per_epoch: int, total_steps: int, cfg: Config) -> float:
    """Cosine decay to 0 (MoCo's CIFAR demo), or with --lr-drops the paper's step schedule: lr / 10 at each listed
    epoch (Sec. 5: "We drop the learning rate twice by a factor of 10 on epochs 200 and 250")."""
    if not cfg.lr_drops:
        return common.cosine_lr(step, total_steps, cfg.lr)
    return cfg.lr * 0.1 ** sum(step >= epoch * steps_per_epoch for epoch in cfg.lr_drops)


# ---------------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------------
class MoCoRing(nn.Module):
    """--negatives queue (MoCoRing): query encoder g_q, momentum key encoder g_k, queue of K keys.
    --negatives bank (IRing): one encoder g (= encoder_q) and a memory bank of `bank_size` entries.
    Queue and bank are buffers, saved with the model."""

    def __init__(self, cfg: Config, bn_splits: int, bank_size: int = 0):
        super().__init__()
        self.cfg = cfg
        self.encoder_q = common.Encoder(common.build_backbone(cfg.arch, cfg.stem, bn_splits), cfg.dim, cfg.mlp)
        if cfg.negatives == "bank":
            self.bank = MemoryBank(bank_size, cfg.dim)  # IR has no key encoder: its keys are the bank's entries
        else:
            self.encoder_k = copy.deepcopy(self.encoder_q).requires_grad_(False)  # g_k starts as g_q
            self.queue = common.Queue(cfg.moco_k, cfg.dim)

    def forward(self, views: list[torch.Tensor], lower: float, upper: float, index: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the loss and what this batch writes: queue mode, the keys to enqueue (NxC, 2NxC if symmetric);
        bank mode, the embeddings v_i (NxC) of the training indices `index` (N)."""
        if self.cfg.negatives == "bank":
            return self.forward_bank(views[0], index, lower, upper, generator)
        x1, x2 = views
        q1 = F.normalize(self.encoder_q(x1).float(), dim=1)  # q: NxC, Alg. 1 line 2
        k2 = F.normalize(common.encode_with_shuffled_bn(self.encoder_k, x2).float(), dim=1)  # k: NxC, line 3
        if self.cfg.symmetric:  # MoCo's symmetric loss: x2 is a query and x1 its key too
            q2 = F.normalize(self.encoder_q(x2).float(), dim=1)
            k1 = F.normalize(common.encode_with_shuffled_bn(self.encoder_k, x1).float(), dim=1)
        with torch.autocast(q1.device.type, enabled=False):  # the loss in fp32: the ring ranks close values
            loss = ring_loss(q1, k2, self.queue.keys, self.cfg.moco_t, lower, upper)
            if not self.cfg.symmetric:
                return loss, k2
            # MoCo's CIFAR demo sums the two directions (loss_12 + loss_21), so at its lr each query takes the
            # step of the asymmetric loss; a 0.5 * (...) mean would halve it.
            loss = loss + ring_loss(q2, k1, self.queue.keys, self.cfg.moco_t, lower, upper)
            return loss, torch.cat([k1, k2])

    def forward_bank(self, x: torch.Tensor, index: torch.Tensor, lower: float, upper: float,
                     generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """IRing: one view per image (Eq. 3: g(t(x_i)) against M; the public code's NCERing alike)."""
        v = F.normalize(self.encoder_q(x).float(), dim=1)  # v: NxC, g(t(x_i))
        # The draw's uniforms are made for the whole global batch and each rank takes its rows, so N processes
        # draw what one process draws (a rank holds rows [rank * N, (rank + 1) * N) of the global batch).
        rows = v.shape[0]
        priority = torch.rand(common.world_size() * rows, self.bank.vectors.shape[0], generator=generator,
                              device=generator.device)[common.rank() * rows:][:rows].to(v.device)
        with torch.autocast(v.device.type, enabled=False):
            loss = bank_ring_loss(v, self.bank.vectors, index, self.cfg.moco_t, lower, upper,
                                  self.cfg.bank_negatives, priority)
        return loss, v.detach()


def train_step(model: MoCoRing, ddp_model: nn.Module, optimizer: torch.optim.Optimizer, views: list[torch.Tensor],
               step: int, steps_per_epoch: int, total_steps: int,
               index: torch.Tensor | None = None) -> dict:
    """One step of Algorithm 1 (or of IRing) at a global step; `index`: the batch's training indices (IRing).
    Returns what gets logged, the loss as a device tensor (read on the host only at log steps)."""
    cfg = model.cfg
    lr = learning_rate(step, steps_per_epoch, total_steps, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    lower, upper = ring_schedule(step, cfg.anneal_epochs * steps_per_epoch, cfg.ring_lower, cfg.ring_upper,
                                 cfg.anneal, cfg.anneal_upper)  # line 12
    # IRing's ring draws: a generator of (seed, step) alone, so a resumed run and every rank draw the same.
    generator = (torch.Generator(views[0].device).manual_seed(cfg.seed * 2**32 + step)
                 if cfg.negatives == "bank" else None)
    with common.autocast(views[0].device, cfg.precision):
        loss, new_entries = ddp_model(views, lower, upper, index, generator)  # lines 1-8
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # line 9
    optimizer.step()
    if cfg.negatives == "bank":
        # After the loss, as in Wu et al. and the public code. Every rank writes the whole global batch's
        # embeddings, so all banks stay identical.
        model.bank.update(common.concat_all_gather(index), common.concat_all_gather(new_entries), cfg.bank_m)
    else:
        common.momentum_update(model.encoder_k, model.encoder_q, cfg.moco_m)  # line 10
        # line 11. Every rank enqueues the keys of the whole global batch, so all queues stay identical.
        model.queue.enqueue(common.concat_all_gather(new_entries))
    return {"loss": common.all_reduce_mean(loss.detach()), "lr": lr, "ring_lower": lower,
            "ring_upper": upper}


# ---------------------------------------------------------------------------------------------------------------------
# Training loop (the same skeleton in every method script)
# ---------------------------------------------------------------------------------------------------------------------
def check_config(cfg: Config, num_images: int) -> None:
    engine.check_batch_size(cfg.batch_size, num_images, cfg.bn_splits)
    if cfg.negatives == "bank" and cfg.symmetric:
        common.fail("--symmetric needs two views and a key encoder; IRing (--negatives bank) has one view per image")
    try:
        ring_bounds(cfg.moco_k if cfg.negatives == "queue" else num_images, cfg.ring_lower, cfg.ring_upper)
    except ValueError as e:
        common.fail(str(e))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(argv)
    run = engine.Run(cfg)
    data = common.load_image_data(cfg.dataset, cfg.data_root, cfg.image_size)
    check_config(cfg, len(data.pretrain))
    cfg.settle(data)

    common.seed_everything(cfg.seed)  # same seed on every rank: identical initial encoders and queue
    model = run.place(MoCoRing(cfg, bn_splits=cfg.bn_splits if common.world_size() == 1 else 1,
                               bank_size=len(data.pretrain)))
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    run.start(model, {"encoder": optimizer}, model.encoder_q.backbone)
    ddp_model = run.distributed(model)

    sampler = common.EpochSampler(len(data.pretrain), cfg.batch_size, cfg.seed)
    views_per_image = 1 if cfg.negatives == "bank" else 2  # IRing: one view (Eq. 3)
    loader = engine.pretrain_batches(data, cfg.augment, sampler, views_per_image,
                                     cfg.batch_size // common.world_size(), cfg.workers, run.device, yield_index=True)
    knn = common.KnnMonitor(data, cfg.knn_bank_size, cfg.knn_test_size, cfg.knn_k, cfg.knn_t, cfg.workers,
                            run.device)
    total_steps = cfg.epochs * sampler.batches_per_epoch
    for step, (views, index) in run.steps(loader, sampler, lambda: {"knn_top1": knn(model.encoder_q.backbone)},
                                          show=("ring_lower", "ring_upper")):
        run.log(train_step(model, ddp_model, optimizer, run.to_device(views), step, sampler.batches_per_epoch,
                           total_steps, index.to(run.device)))


if __name__ == "__main__":
    engine.run_main(main)
