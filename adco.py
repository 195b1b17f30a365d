"""AdCo: MoCo v2 encoders trained against learnable negative adversaries (Adversarial Contrast).

Paper: Qianjiang Hu, Xiao Wang, Wei Hu, Guo-Jun Qi, "AdCo: Adversarial Contrast for Efficient Learning of
Unsupervised Representations from Self-Trained Negative Adversaries", CVPR 2021
(../shared/papers/adco_adversarial_contrast.txt). MoCo's queue is replaced by K free vectors n_k, the "negative
adversaries". The encoder minimizes the contrastive loss of Eq. (1) and the adversaries maximize it (Eq. 2): the
gradient of Eq. (6) moves each n_k towards the queries that it is most often confused with, so all K adversaries
follow the representation as it changes, where a queue renews only its oldest B entries per step.

One training step, as implemented here (line numbers are cited in the code):
     0  W = norm(g_k(aug(x))) for K random images x      # W: KxC, once, before step 0 (Sec. 5.1) (initial_adversaries)
     1  x_q, x_k = aug(x), aug(x)                         # two views of a batch             (AugmentedViews, MultiView)
     2  q = norm(g_q(x_q))                                # q: NxC                           (AdCo.forward)
     3  k = norm(g_k(x_k)).detach()                       # k: NxC, shuffle BN               (AdCo.forward)
     4  n = norm(W)                                       # n: KxC, the adversaries in use   (adco_loss)
     5  L_t = -1/N sum_i log e^{q_i.k_i/t} / (e^{q_i.k_i/t} + sum_k e^{q_i.n_k/t})   # Eq. (1) (adco_loss)
     6  theta <- theta - lr_theta * dL_{t=0.12}/dtheta    # Eq. (3), SGD, n held fixed       (train_step)
     7  W <- W + lr_N * dL_{t=0.02}/dW                    # Eq. (4)-(6), SGD ascent, q held fixed; gradient averaged
                                                          #   over ranks; --adv-loss J ascends J (Sec. 4.1) instead
        W <- W/|W| row by row                             # Sec. 5.1: unit norm after each update (--renormalize)
     8  theta_k <- m theta_k + (1 - m) theta              # MoCo's momentum update           (train_step)
The paper calls the updates alternating; as in the official code, both players take their gradient from the same
forward pass (lines 2-5) and step one after the other, so the adversaries cost one KxC gradient per step and no extra
pass through the encoder (the paper's Table 2: 2.26 GPU-hours per epoch against MoCo v2's 2.12).

Where the paper and its public code (maple-research-lab/AdCo, ../shared/papers/README.md) differ, and what I follow:
- Negatives. Eq. (1) contrasts q_i with its positive and the K adversaries only; the official code also uses the
  keys of the whole global batch (its own rank's other keys included) as negatives, with labels offset by the
  *local* GPU index, wrong beyond one node. I follow Eq. (1): no batch keys, so no rank offsets to get wrong.
- Initialisation (Sec. 5.1: "output feature vectors over randomly drawn training images"). The official code fills
  the adversaries with keys during a first pass in which it also trains the encoder against random adversaries. I
  encode K random training images (one augmented view each) with the untrained key encoder and train nothing.
- The adversaries are stored as W: KxC and used as n = W/|W| (the official code does the same and adds weight decay
  on W). Footnote 1 of Sec. 3.2 asks for the derivative w.r.t. the vector before normalization; autograd takes it
  through F.normalize, i.e. (I - n n^T)/|W| applied to Eq. (6). tests/test_adco.py checks it by hand.
- Renormalization. Sec. 5.1: "All negative adversaries are also l2-normalized in each iteration to have a unit norm
  after they are updated by the SGD optimizer"; the official code never does it, so there |W| drifts (each step
  adds a component orthogonal to W, and the momentum keeps adding it) and the angular step, about lr |dL/dn| / |W|^2,
  shrinks as |W| grows. I follow the paper (--renormalize, the default); --no-renormalize gives the official code.
  The SGD momentum buffer is left as it is, as the sentence says nothing of it.
- The adversaries' lr (--adv-lr) follows its own cosine schedule, as the paper says of both players (the official
  code keeps 3.0).
- Multi-crop (Sec. 5.2.1, five crops 224/192/160/128/96 px): as in the official code, one more full-size crop gives
  the key and the five crops are queries; their losses (and the adversaries' gradients) are summed. Crop sides scale
  with the image (32 px CIFAR: 32, 27, 23, 18, 14), with the official scale ranges. Not combined with --symmetric
  (neither is the official code).
- Symmetric loss (Appendix A, official code): each view is query once and key once, and the two losses are
  averaged, 0.5/0.5, for both players (the official update_sym_network weighs the encoder's losses and the
  adversaries' gradients by 0.5 each). MoCo's CIFAR demo, which moco_ring.py --symmetric follows, sums them instead:
  at the same lr its step is twice ours. The appendix is not in the text I have, so the official code decides here.
- Defaults for CIFAR follow MoCo's CIFAR-10 demo as moco_ring.py does (ResNet-18, 3x3 stem, SplitBN 8, batch 512,
  m 0.99, SGD lr 0.06 cosine, wd 5e-4) with K = 4096 adversaries (the demo's queue size); the AdCo-specific values
  are the paper's ImageNet ones (--moco-t 0.12, --adv-t 0.02, --adv-lr 3.0, --adv-momentum 0.9, --adv-wd 1e-4),
  untuned for CIFAR.

Run:
    python adco.py                                                 # CIFAR-10 (downloaded), ResNet-18, one device
    python adco.py --symmetric                                     # Appendix A
    python adco.py --no-renormalize                                # the official code: |W| left to drift
    python adco.py --multi-crop                                    # Sec. 5.2.1
    python adco.py --augment cpu                                   # PIL in loader workers (default: device)
    python adco.py --dataset folder --data-root ../shared/data/cifar10-jpg --arch small --workers 2   # CPU
    torchrun --nproc_per_node=4 adco.py --batch-size 512           # 4 GPUs (global batch 512), or 4 CPU processes
    torchrun --nproc_per_node=8 adco.py --dataset folder --data-root imagenet --image-size 224 --arch resnet50 \\
        --num-adversaries 65536 --batch-size 256 --lr 0.03 --weight-decay 1e-4 --moco-m 0.999 # the paper's ImageNet run
    python engine.py probe runs/adco/checkpoint.pt                 # linear probe of the saved backbone

Results (what reproduces at CPU scale, what needs a GPU, with commands, commits and machines): RESULTS.md.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common
import engine
from engine import NON_NEGATIVE, POSITIVE, at_least, between, option

# ---------------------------------------------------------------------------------------------------------------------
# The two players' objectives (Eqs. 1, 2 and Sec. 4.1)
# ---------------------------------------------------------------------------------------------------------------------
def adco_loss(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """The contrastive loss L(theta, N) of Eq. (1): both players' objective, at their own temperatures.

    q: NxC queries and k: NxC keys (L2-normalized; row i of k is q_i's positive q'_i); negatives: KxC adversaries,
    normalized here, as they are stored unnormalized. Returns
        -1/N sum_i log( e^{q_i.k_i/t} / (e^{q_i.k_i/t} + sum_k e^{q_i.n_k/t}) ).
    Gradients reach q and negatives, whichever require them; k comes from the momentum encoder and is detached.
    The minimax of Eq. (2) then reads: the encoder descends adco_loss(q, k, W.detach(), 0.12) and the adversaries
    ascend adco_loss(q.detach(), k, W, 0.02), whose gradient is Eq. (6) pulled back through the normalization.
    """
    n = F.normalize(negatives, dim=1)  # n: KxC, Alg. line 4
    l_pos = torch.einsum("nc,nc->n", q, k.detach()).unsqueeze(1)  # l_pos: Nx1
    l_neg = q @ n.T  # l_neg: NxK
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # logits: Nx(1+K), positive at index 0
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def adversary_j(q: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """The alternative adversarial objective J of Sec. 4.1, maximized by the adversaries only (--adv-loss J).

    J = -t sum_k log( 1 / sum_i e^{q_i.n_k/t} ) = t sum_k logsumexp_i(q_i.n_k/t), so that
    dJ/dn_k = sum_i p(q_i|n_k) q_i (Eq. 7): each adversary moves to the mean of the queries it is closest to.
    q: NxC (normalized), negatives: KxC (normalized here). Each adversary's weights p(q_i|n_k) sum to one and are
    not divided by N*t, so at the same --adv-lr its steps are far longer than Eq. (6)'s. The paper found J worse
    than L (Sec. 4.2) and gives no settings for it.
    """
    n = F.normalize(negatives, dim=1)  # n: KxC
    return temperature * torch.logsumexp(q @ n.T / temperature, dim=0).sum()  # logsumexp over the N queries


# ---------------------------------------------------------------------------------------------------------------------
# Config: every field is a flag (`adv_lr` -> `--adv-lr`); help and default live here only
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Config(engine.ImageRunConfig):
    """AdCo's options; the data, run and kNN options every image script shares are in engine.ImageRunConfig."""
    # encoder
    dim: int = option(128, "feature dimension C of the contrastive space", check=at_least(1))
    mlp: bool = option(True, "MoCo v2 MLP projection head (--no-mlp: MoCo v1 linear head)")
    bn_splits: int = option(8, "BatchNorm groups on one device (SplitBatchNorm imitates that many GPUs); "
                               "under torchrun each process is one group", check=at_least(1))
    # MoCo
    moco_m: float = option(0.99, "momentum m of the key encoder (the paper: 0.999 on ImageNet)", check=between(0, 1))
    moco_t: float = option(0.12, "temperature t of the encoder's loss (Sec. 5.1)", check=POSITIVE)
    # Averaged, as the official code does for both players: at the same lr the step is one direction's size, half
    # that of MoCo's CIFAR demo, which sums the two (moco_ring.py --symmetric). tests/test_adco.py checks the scale.
    symmetric: bool = option(False, "symmetric loss (Appendix A): each view is query once and key once, the two "
                                    "losses averaged 0.5/0.5 as in the official code (MoCo's demo sums them)")
    # AdCo: the negative adversaries (Sec. 3.2, 5.1)
    num_adversaries: int = option(4096, "number K of negative adversaries (the paper: 65536 on ImageNet)",
                                  check=at_least(1))
    adv_t: float = option(0.02, "temperature t of the adversaries' objective (Sec. 5.1)", check=POSITIVE)
    adv_lr: float = option(3.0, "SGD learning rate of the adversaries (cosine decay to 0)", check=NON_NEGATIVE)
    adv_momentum: float = option(0.9, "SGD momentum of the adversaries", check=between(0, 1))
    adv_wd: float = option(1e-4, "weight decay of the (unnormalized) adversaries", check=NON_NEGATIVE)
    # On by default: the paper (Sec. 5.1) says so; off is the official code, where |W| drifts (1.00 -> 1.25 in 40
    # CPU steps) and the adversaries' angular step shrinks with it.
    renormalize: bool = option(True, "l2-normalize every adversary after each of its SGD steps (Sec. 5.1); "
                                     "--no-renormalize: the official code, which never does")
    adv_loss: str = option("ce", "what the adversaries maximize: 'ce' the contrastive loss (Eq. 1), "
                                 "'J' the alternative of Sec. 4.1 (Eq. 7)", choices=("ce", "J"))
    multi_crop: bool = option(False, "five query crops of decreasing size against one full-size key crop (Sec. 5.2.1)")
    # optimization
    epochs: int = option(200, "training epochs", check=at_least(1))
    batch_size: int = option(512, "global batch size (split evenly over processes)", check=at_least(1))
    lr: float = option(0.06, "SGD learning rate of the encoder (cosine decay to 0)", check=NON_NEGATIVE)
    momentum: float = option(0.9, "SGD momentum", check=between(0, 1))
    weight_decay: float = option(5e-4, "SGD weight decay", check=NON_NEGATIVE)


# Sec. 5.2.1's five crops, 224/192/160/128/96 px on ImageNet, as fractions of the image side, with the official
# code's RandomResizedCrop scale ranges (the smaller the crop, the smaller the region it may cover).
MULTI_CROPS = ((224 / 224, 0.2, 1.0), (192 / 224, 0.172, 0.86), (160 / 224, 0.143, 0.715),
               (128 / 224, 0.114, 0.571), (96 / 224, 0.086, 0.429))


def multi_crop_views(image_size: int, mean, std) -> common.MultiView:
    """The key's full-size MoCo v2 crop, then the five query crops (MoCo v2 colour recipe on each)."""
    transforms = [common.pretrain_transform(image_size, mean, std)]
    for fraction, low, high in MULTI_CROPS:
        crop = common.pretrain_transform(round(fraction * image_size), mean, std, min_scale=low)
        crop.transforms[0].scale = (low, high)  # common's recipe lets every crop cover the whole image
        transforms.append(crop)
    return common.MultiView(transforms)


# ---------------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------------
class AdCo(nn.Module):
    """Query encoder g_q, momentum key encoder g_k, and the adversaries W (a parameter: it moves with .to(), is
    saved in the state_dict, and DDP averages its gradient over ranks together with the encoder's)."""

    def __init__(self, cfg: Config, bn_splits: int):
        super().__init__()
        self.cfg = cfg
        self.encoder_q = common.Encoder(common.build_backbone(cfg.arch, cfg.stem, bn_splits), cfg.dim, cfg.mlp)
        self.encoder_k = copy.deepcopy(self.encoder_q).requires_grad_(False)  # g_k starts as g_q
        # W: KxC. Random until main() writes encoded images into it (line 0); stored unnormalized, used normalized.
        self.adversaries = nn.Parameter(F.normalize(torch.randn(cfg.num_adversaries, cfg.dim), dim=1))

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder_q(x).float(), dim=1)  # q: NxC, line 2

    def key(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(common.encode_with_shuffled_bn(self.encoder_k, x).float(), dim=1)  # k: NxC, line 3

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """views: [x1, x2], or [key crop, five query crops] with multi-crop; NxCxHxW each.

        Returns the encoder's loss (Eq. 1 at moco_t, the adversaries held fixed), the adversaries' objective
        (Eq. 1 at adv_t, or J, the queries held fixed) and the first view's queries (NxC, detached, for logging).
        """
        cfg = self.cfg
        if cfg.multi_crop:
            k = self.key(views[0])
            pairs, weight = [(self.query(x), k) for x in views[1:]], 1.0  # losses summed over the crops
        else:
            x1, x2 = views
            pairs, weight = [(self.query(x1), self.key(x2))], 1.0
            if cfg.symmetric:  # Appendix A, averaged as in the official code (see Config.symmetric)
                pairs, weight = pairs + [(self.query(x2), self.key(x1))], 0.5
        with torch.autocast(views[0].device.type, enabled=False):  # fp32: t = 0.02 puts logits up to 50
            # Eq. (2), one side detached in each term: the loss reaches only theta, the objective only W.
            loss = sum(weight * adco_loss(q, k, self.adversaries.detach(), cfg.moco_t) for q, k in pairs)
            if cfg.adv_loss == "ce":
                objective = sum(weight * adco_loss(q.detach(), k, self.adversaries, cfg.adv_t) for q, k in pairs)
            else:
                # J's logsumexp runs over the queries, so it needs the global batch: every rank then computes the
                # same gradient, and averaging it over ranks gives J of the global batch as one process would.
                objective = sum(weight * adversary_j(common.concat_all_gather(q.detach()), self.adversaries, cfg.adv_t)
                                for q, _ in pairs)
        return loss, objective, pairs[0][0].detach()


@torch.no_grad()
def initial_adversaries(encoder_k: nn.Module, dataset, transform, size: int, global_batch: int, workers: int,
                        device: torch.device, seed: int, precision: str = "auto") -> torch.Tensor:
    """Line 0 (Sec. 5.1): the adversaries start as the untrained key encoder's outputs on `size` random training
    images, one augmented view each. Returns n: KxC, normalized, the same on every rank and for any number of ranks.

    The images and their augmentation seeds come from `seed` alone. They are encoded in global batches split over
    the ranks as in training (so BatchNorm sees the same groups as one process with --bn-splits = world size), then
    gathered. A copy of g_k does the work: its train-mode BatchNorm would otherwise move g_k's running statistics.
    """
    g = torch.Generator().manual_seed(seed)
    padded = math.ceil(size / global_batch) * global_batch  # whole batches; the surplus is dropped below
    rows = torch.randperm(len(dataset), generator=g)[torch.arange(padded) % len(dataset)]  # distinct while possible
    seeds = torch.randint(0, 2**62, (padded,), generator=g)
    local = global_batch // common.world_size()
    mine = torch.arange(padded).view(-1, global_batch)[:, common.rank() * local:][:, :local].reshape(-1)
    loader = common.make_loader(common.AugmentedViews(dataset, transform), local, workers, device,
                                sampler=list(zip(rows[mine].tolist(), seeds[mine].tolist())))
    encoder = copy.deepcopy(encoder_k).train()
    keys = []
    for x, _ in loader:
        with common.autocast(device, precision):
            keys.append(common.concat_all_gather(F.normalize(encoder(common.to_device(x, device)).float(), dim=1)))
    return torch.cat(keys)[:size]  # n: KxC


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Maximum of a tensor over ranks (for logging); identity alone."""
    if common.world_size() > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


@torch.no_grad()
def adversaries_rank_gap(adversaries: torch.Tensor) -> float:
    """Largest |W - W of rank 0| over ranks: 0.0 when the adversaries are identical everywhere, as they must be
    (same start, same all-reduced gradient, same SGD step). Checked at every evaluation; 0.0 alone."""
    if common.world_size() == 1:
        return 0.0
    reference = adversaries.detach().clone()
    dist.broadcast(reference, src=0)
    return all_reduce_max((adversaries.detach() - reference).abs().max()).item()


def make_optimizers(model: AdCo) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """The encoder's SGD (Eq. 3) and the adversaries' own SGD (Eq. 4, Sec. 5.1). maximize=True is Eq. (4)'s
    ascent: it negates the gradient before adding weight decay and momentum, the update the official code writes
    by hand (v <- 0.9 v - dL/dW + wd W; W <- W - lr v)."""
    cfg = model.cfg
    return (torch.optim.SGD(model.encoder_q.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                            weight_decay=cfg.weight_decay),
            torch.optim.SGD([model.adversaries], lr=cfg.adv_lr, momentum=cfg.adv_momentum, weight_decay=cfg.adv_wd,
                            maximize=True))


def train_step(model: AdCo, ddp_model: nn.Module, optimizer: torch.optim.Optimizer,
               adversary_optimizer: torch.optim.Optimizer, views: list[torch.Tensor], step: int,
               total_steps: int) -> dict:
    """One step of both players (lines 1-8) at a global step; returns what gets logged, as device tensors where
    they come from the step (read on the host only at log steps)."""
    cfg = model.cfg
    lr = common.cosine_lr(step, total_steps, cfg.lr)
    adv_lr = common.cosine_lr(step, total_steps, cfg.adv_lr)  # the adversaries' own schedule
    for group in optimizer.param_groups:
        group["lr"] = lr
    for group in adversary_optimizer.param_groups:
        group["lr"] = adv_lr
    with common.autocast(views[0].device, cfg.precision):
        loss, objective, q = ddp_model(views)  # lines 1-5
    with torch.no_grad():  # "tracking" (Sec. 3.3): how close each new query is to its nearest adversary
        nearest = (q @ F.normalize(model.adversaries, dim=1).T).max(dim=1).values  # nearest: N
    optimizer.zero_grad(set_to_none=True)
    adversary_optimizer.zero_grad(set_to_none=True)
    # The two graphs share no leaf (the loss sees W detached, the objective sees q detached), so one backward gives
    # each player its own gradient, and DDP averages both over the ranks in the same all-reduce (line 7's average).
    (loss + objective).backward()
    optimizer.step()  # line 6: descent
    adversary_optimizer.step()  # line 7: ascent (maximize=True), weight decay still shrinks W
    if cfg.renormalize:  # Sec. 5.1: back to unit norm, so |W| cannot grow and shorten the next angular step
        with torch.no_grad():
            model.adversaries.copy_(F.normalize(model.adversaries, dim=1))
    common.momentum_update(model.encoder_k, model.encoder_q, cfg.moco_m)  # line 8
    return {"loss": common.all_reduce_mean(loss.detach()), "adv_loss": common.all_reduce_mean(objective.detach()),
            "nearest_sim_mean": common.all_reduce_mean(nearest.mean()),
            "nearest_sim_max": all_reduce_max(nearest.max()),
            "adversary_norm": model.adversaries.detach().norm(dim=1).mean(), "lr": lr, "adv_lr": adv_lr}


# ---------------------------------------------------------------------------------------------------------------------
# Training loop (the same skeleton in every method script)
# ---------------------------------------------------------------------------------------------------------------------
def check_config(cfg: Config, num_images: int) -> None:
    engine.check_batch_size(cfg.batch_size, num_images, cfg.bn_splits)
    if cfg.symmetric and cfg.multi_crop:
        common.fail("--symmetric and --multi-crop cannot be combined (nor can they in the official code)")
    if cfg.multi_crop and round(MULTI_CROPS[-1][0] * cfg.image_size) < 8:
        common.fail(f"--multi-crop: images of {cfg.image_size} px make a smallest crop under 8 px")


def main(argv: list[str] | None = None) -> None:
    cfg = engine.parse_config(Config, argv, __doc__)
    run = engine.Run(cfg)
    data = common.load_image_data(cfg.dataset, cfg.data_root, cfg.image_size)
    cfg.settle(data)  # first: check_config measures the multi-crop sides against the resolved crop side
    check_config(cfg, len(data.pretrain))

    common.seed_everything(cfg.seed)  # same seed on every rank: identical initial encoders
    model = run.place(AdCo(cfg, bn_splits=cfg.bn_splits if common.world_size() == 1 else 1))
    optimizer, adversary_optimizer = make_optimizers(model)
    run.start(model, {"encoder": optimizer, "adversaries": adversary_optimizer}, model.encoder_q.backbone)
    ddp_model = run.distributed(model)

    augment = common.pretrain_transform(data.image_size, data.mean, data.std)
    if not run.resumed:  # line 0, from a private generator: the global RNG stays as a resumed run would find it
        model.adversaries.data.copy_(initial_adversaries(model.encoder_k, data.pretrain, augment, cfg.num_adversaries,
                                                         cfg.batch_size, cfg.workers, run.device, cfg.seed,
                                                         cfg.precision))
    sampler = common.EpochSampler(len(data.pretrain), cfg.batch_size, cfg.seed)
    if cfg.multi_crop:  # six crops of five sizes and their own scale ranges: the PIL path makes them
        if cfg.augment == "device" and common.is_main():
            print("note: --multi-crop makes its crops with PIL in the loader processes (--augment cpu)")
        crops = multi_crop_views(data.image_size, data.mean, data.std)
        loader = common.make_loader(common.AugmentedViews(data.pretrain, crops), cfg.batch_size // common.world_size(),
                                    cfg.workers, run.device, sampler, persistent=True)
    else:
        loader = engine.pretrain_batches(data, cfg.augment, sampler, 2, cfg.batch_size // common.world_size(),
                                         cfg.workers, run.device)
    knn = common.KnnMonitor(data, cfg.knn_bank_size, cfg.knn_test_size, cfg.knn_k, cfg.knn_t, cfg.workers,
                            run.device)

    def evaluate() -> dict:  # the rank gap stays 0.0 while every rank holds the same adversaries, as it must
        return {"knn_top1": knn(model.encoder_q.backbone),
                "adversaries_rank_gap": adversaries_rank_gap(model.adversaries)}

    total_steps = cfg.epochs * sampler.batches_per_epoch
    for step, (views, _) in run.steps(loader, sampler, evaluate, show=("adv_loss", "nearest_sim_mean")):
        run.log(train_step(model, ddp_model, optimizer, adversary_optimizer, run.to_device(views), step,
                           total_steps))


if __name__ == "__main__":
    engine.run_main(main)
