"""MoCoRing: MoCo v2 whose negatives are a "ring" of the queue (conditional NCE).

Paper: Mike Wu, Milan Mosse, Chengxu Zhuang, Daniel Yamins, Noah Goodman, "Conditional Negative Sampling for
Contrastive Learning of Visual Representations", ICLR 2021 (../shared/papers/ring_conditional_negative_sampling.txt).
Theorem 3.1: negatives drawn from a subset S_B of the data that is "close" to the anchor (CNCE) still give a
lower bound on mutual information, looser than NCE's but of lower variance (Theorem 3.2). Section 4 takes S_B to be
a ring: the queue entries whose similarity to the query lies between the w_l-th and w_u-th percentiles.

Algorithm 1 (MoCoRing), as implemented here (line numbers are cited in the code):
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
    12  anneal(w_l)                                    # Section 4, Appendix E           (anneal_lower)
With --ring-lower 0 --ring-upper 100 the ring is the whole queue and this is exactly MoCo v2 (InfoNCE, Eq. 4).

Where the paper and its public code differ (../shared/papers/README.md):
- Alg. 1 writes logsumexp(ring) without the positive; Theorem 3.1 and the public code keep it. I keep it.
- The paper (Sec. 4) anneals w_l upwards; the public code anneals its outer threshold from 100% to 10% of the
  queue, which is the same move in percentile terms (w_l: 0 -> 90). The public code's default ring is the closest
  10% of the queue minus the closest 10% of that: percentiles [90, 99], our defaults.
- Defaults for CIFAR follow MoCo's CIFAR-10 demo (ResNet-18, 3x3 stem, SplitBN 8, batch 512, K 4096, m 0.99,
  t 0.1, SGD 0.06 cosine, wd 5e-4), the recipe whose kNN numbers are the known reference.

Run:
    python moco_ring.py                                            # CIFAR-10 (downloaded), ResNet-18, one device
    python moco_ring.py --ring-lower 0 --ring-upper 100            # the MoCo v2 baseline
    python moco_ring.py --dataset folder --data-root ../shared/data/cifar10-jpg --arch small --workers 2   # CPU
    torchrun --nproc_per_node=4 moco_ring.py --batch-size 512      # 4 GPUs (global batch 512), or 4 CPU processes
    python common.py probe runs/moco_ring/checkpoint.pt            # linear probe of the saved backbone

Results measured (2-core CPU, no GPU, torch 2.14.1; README.md has every command):
- ring_loss equals a naive per-query loop at five ring widths and MoCo's InfoNCE bit for bit at (0, 100);
  1 process with --bn-splits 2 and 2 gloo processes give the same first-step loss (0.0713495); resume is exact.
- Small CNN on the CIFAR-10 JPEGs, 300 steps of batch 128, ring annealed to [90, 99] over the first 156:
  kNN top-1 30.9% (random init) -> 37.9% (tests/test_moco_ring.py, 75 s).
- Step throughput, small CNN, batch 256, K 4096 (python benchmark.py ring --steps 20): MoCo v2 845 images/s,
  MoCoRing 817, x0.966.
- Not yet measured: CIFAR-10/100, STL-10 ResNet-18 runs of the paper's length (need a GPU). The paper's Table 1:
  MoCo 83.1 -> MoCoRing 86.1 on CIFAR-10 (linear probe); MoCo's CIFAR demo: kNN 82.6 at 200 epochs.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
from common import option

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
        # backward for 256 x 4096 similarities at w_l = 90 on the 2-core CPU. Gradients flow back through `values` to the entries kept.
        closest_first = l_neg.topk(num_entries - lo, dim=1).values  # Nx(K-lo), descending similarity
        l_neg = closest_first[:, num_entries - hi:]  # l_neg: Nx(hi-lo), the ring
    # Line 8. The paper's listing writes logsumexp(ring) alone; Theorem 3.1's estimator (and the public code) keeps
    # the positive in the denominator: without it the loss is no bound on MI and is unbounded below (a query can
    # push its whole ring away forever). I follow the theorem.
    logits = torch.cat([l_pos, l_neg], dim=1)  # logits: Nx(1+|ring|), positive at index 0
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def sample_ring_indices(similarity: torch.Tensor, lower: float, upper: float, num_samples: int,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw `num_samples` negatives per row uniformly (with replacement) from that row's ring.

    similarity: NxM scores of N anchors against M candidates (a memory bank: IRing, Eq. 3, or the toy of Appendix B).
    Returns NxS indices into the M candidates, S = num_samples. This is q(v | v*) of Theorem 3.1 restricted to the
    ring: each candidate inside the ring is equally likely, as p(A | S_B) renormalizes the uniform marginal.
    """
    lo, hi = ring_bounds(similarity.shape[1], lower, upper)
    order = similarity.argsort(dim=1)[:, lo:hi]  # order: Nx(hi-lo), candidate ids in the ring, far -> close
    pick = torch.randint(0, hi - lo, (similarity.shape[0], num_samples), generator=generator,
                         device=similarity.device)  # pick: NxS positions inside the ring
    return order.gather(1, pick)  # NxS candidate ids


# ---------------------------------------------------------------------------------------------------------------------
# Config: every field is a flag (`ring_lower` -> `--ring-lower`); help and default live here only
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Config:
    # data
    dataset: str = option("cifar10", "pretraining data ('folder': ImageFolder root/train, root/test)",
                          choices=common.IMAGE_DATASETS)
    data_root: str = option("./data", "dataset folder (torchvision downloads into it)")
    image_size: int = option(0, "crop side in pixels; 0: the dataset's own (32 CIFAR, 96 STL-10)")
    workers: int = option(4, "data loader processes per training process")
    # encoder
    arch: str = option("resnet18", "backbone ('small': a 4-layer CNN for CPU runs)",
                       choices=("resnet18", "resnet50", "small"))
    stem: str = option("auto", "ResNet stem: 'cifar' 3x3 conv without max-pool; auto: cifar below 100 px",
                       choices=("auto", "cifar", "imagenet"))
    dim: int = option(128, "feature dimension C of the contrastive space")
    mlp: bool = option(True, "MoCo v2 MLP projection head (--no-mlp: MoCo v1 linear head)")
    bn_splits: int = option(8, "BatchNorm groups on one device (SplitBatchNorm imitates that many GPUs); "
                               "under torchrun each process is one group")
    # MoCo
    moco_k: int = option(4096, "queue size K")
    moco_m: float = option(0.99, "momentum m of the key encoder")
    moco_t: float = option(0.1, "softmax temperature t")
    symmetric: bool = option(False, "symmetric loss: each view is query once and key once")
    # Ring (Section 4)
    ring_lower: float = option(90.0, "lower percentile w_l of the ring in [0, 100] (the annealing's target)")
    ring_upper: float = option(99.0, "upper percentile w_u: queue entries closer than this are not negatives")
    anneal: str = option("linear", "schedule of w_l: 'linear' 0 -> w_l, 'step' in 4 jumps, 'none' w_l from step 0",
                         choices=("none", "linear", "step"))
    anneal_epochs: int = option(100, "epochs over which w_l rises to --ring-lower (Appendix E: 100)")
    # optimization
    epochs: int = option(200, "training epochs")
    batch_size: int = option(512, "global batch size (split evenly over processes)")
    lr: float = option(0.06, "SGD learning rate (cosine decay to 0)")
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(5e-4, "SGD weight decay")
    # run
    seed: int = option(0, "random seed (model init, data order, augmentations)")
    out_dir: str = option("runs/moco_ring", "run directory: config.json, metrics.jsonl, checkpoint.pt")
    resume: str = option("", "checkpoint.pt to continue from (same config)")
    max_steps: int = option(0, "stop after this global step (0: train all epochs); the schedules keep --epochs")
    log_every: int = option(1, "steps between metrics.jsonl records")
    knn_every: int = option(5, "epochs between kNN evaluations (0: only at the end)")
    knn_k: int = option(200, "neighbours of the kNN monitor")
    knn_t: float = option(0.1, "temperature of the kNN monitor's vote weights")
    knn_bank_size: int = option(0, "training images in the kNN bank, evenly spaced (0: all)")
    knn_test_size: int = option(0, "test images the kNN monitor classifies, evenly spaced (0: all)")


def anneal_lower(step: int, anneal_steps: int, target: float, policy: str, stages: int = 4) -> float:
    """The lower percentile w_l at a global step (Section 4 "Annealing Policy", Appendix E).

    Early in training the representation is poor and the "closest" entries are not truly close, so the ring
    starts as the whole lower range (w_l = 0, plain MoCo below w_u) and narrows towards the closest entries.
    none: `target` from the first step; linear: 0 -> target over `anneal_steps`, then constant;
    step: the same range climbed in `stages` equal jumps.
    """
    if policy == "none" or anneal_steps <= 0:
        return target
    progress = min(1.0, step / anneal_steps)
    if policy == "linear":
        return target * progress
    return target * math.floor(progress * stages) / stages


# ---------------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------------
class MoCoRing(nn.Module):
    """Query encoder g_q, momentum key encoder g_k, queue of K keys (buffers: saved with the model)."""

    def __init__(self, cfg: Config, bn_splits: int):
        super().__init__()
        self.cfg = cfg
        self.encoder_q = common.Encoder(cfg.arch, cfg.stem, cfg.dim, cfg.mlp, bn_splits)
        self.encoder_k = copy.deepcopy(self.encoder_q).requires_grad_(False)  # g_k starts as g_q
        self.queue = common.Queue(cfg.moco_k, cfg.dim)

    def forward(self, views: list[torch.Tensor], lower: float, upper: float) -> tuple[torch.Tensor, torch.Tensor]:
        """views: two NxCxHxW batches. Returns the loss and the keys to enqueue (NxC, or 2NxC if symmetric)."""
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
            loss = 0.5 * (loss + ring_loss(q2, k1, self.queue.keys, self.cfg.moco_t, lower, upper))
            return loss, torch.cat([k1, k2])


def train_step(model: MoCoRing, ddp_model: nn.Module, optimizer: torch.optim.Optimizer, views: list[torch.Tensor],
               step: int, steps_per_epoch: int, total_steps: int) -> dict[str, float]:
    """One step of Algorithm 1 at a global step; returns what gets logged."""
    cfg = model.cfg
    lr = common.cosine_lr(step, total_steps, cfg.lr)
    for group in optimizer.param_groups:
        group["lr"] = lr
    lower = anneal_lower(step, cfg.anneal_epochs * steps_per_epoch, cfg.ring_lower, cfg.anneal)  # line 12
    with common.autocast(views[0].device):
        loss, keys = ddp_model(views, lower, cfg.ring_upper)  # lines 1-8
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # line 9
    optimizer.step()
    common.momentum_update(model.encoder_k, model.encoder_q, cfg.moco_m)  # line 10
    # line 11. Every rank enqueues the keys of the whole global batch, so all queues stay identical.
    model.queue.enqueue(common.concat_all_gather(keys))
    return {"loss": common.all_reduce_mean(loss.detach()).item(), "lr": lr, "ring_lower": lower,
            "ring_upper": cfg.ring_upper}


# ---------------------------------------------------------------------------------------------------------------------
# Training loop (the same skeleton in every method script)
# ---------------------------------------------------------------------------------------------------------------------
def check_config(cfg: Config, num_images: int) -> None:
    if cfg.batch_size % common.world_size():
        common.fail(f"--batch-size {cfg.batch_size} does not split evenly over {common.world_size()} processes")
    if cfg.batch_size > num_images:
        common.fail(f"--batch-size {cfg.batch_size} is larger than the dataset ({num_images} images)")
    if common.world_size() == 1 and cfg.batch_size % cfg.bn_splits:
        common.fail(f"--batch-size {cfg.batch_size} is not divisible by --bn-splits {cfg.bn_splits}")
    try:
        ring_bounds(cfg.moco_k, cfg.ring_lower, cfg.ring_upper)
    except ValueError as e:
        common.fail(str(e))


def main(argv: list[str] | None = None) -> None:
    cfg = common.parse_config(Config, argv, __doc__)
    device = common.init_distributed()
    data = common.load_image_data(cfg.dataset, cfg.data_root, cfg.image_size)
    check_config(cfg, len(data.pretrain))
    cfg.image_size = data.image_size
    cfg.stem = cfg.stem if cfg.stem != "auto" else ("cifar" if data.image_size < 100 else "imagenet")
    config = dataclasses.asdict(cfg)

    common.seed_everything(cfg.seed)  # same seed on every rank: identical initial encoders and queue
    model = MoCoRing(cfg, bn_splits=cfg.bn_splits if common.world_size() == 1 else 1).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    step = 0
    if cfg.resume:
        state = common.load_checkpoint(cfg.resume, "moco_ring", config)
        model.load_state_dict(state["model"], strict=True)
        optimizer.load_state_dict(state["optimizers"]["encoder"])
        common.set_rng_state(state["rng"])
        step = state["step"]
    # broadcast_buffers=False: the queue is identical on every rank by construction, no need to send it each step.
    ddp_model = (torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
                 if common.world_size() > 1 else model)
    run = common.RunDir(cfg.out_dir, config, "moco_ring", resuming=bool(cfg.resume))

    augment = common.pretrain_transform(data.image_size, data.mean, data.std)
    sampler = common.EpochSampler(len(data.pretrain), cfg.batch_size, cfg.seed)
    loader = common.make_loader(common.AugmentedViews(data.pretrain, common.MultiView([augment, augment])),
                                cfg.batch_size // common.world_size(), cfg.workers, device, sampler)
    evaluate = common.KnnMonitor(data, cfg.knn_bank_size, cfg.knn_test_size, cfg.knn_k, cfg.knn_t, cfg.workers,
                                 device)
    steps_per_epoch = sampler.batches_per_epoch
    total_steps = cfg.epochs * steps_per_epoch
    last_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps

    progress = tqdm(total=last_step, initial=step, disable=not common.is_main(), dynamic_ncols=True)
    while step < last_step:
        epoch, start_batch = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch, start_batch)
        tic, images = time.perf_counter(), 0
        for views, _ in loader:
            stats = train_step(model, ddp_model, optimizer, common.to_device(views, device), step, steps_per_epoch,
                               total_steps)
            step += 1
            common.check_finite(stats["loss"], step)
            images += cfg.batch_size
            progress.update()
            progress.set_postfix(loss=f"{stats['loss']:.3f}", w_l=f"{stats['ring_lower']:.1f}")
            if step % cfg.log_every == 0:
                run.log({"step": step, "epoch": epoch, **stats, "images_per_s": images / (time.perf_counter() - tic)})
                tic, images = time.perf_counter(), 0
            if step == last_step:
                break
        epoch_done = step % steps_per_epoch == 0
        if step == last_step or (epoch_done and cfg.knn_every and (epoch + 1) % cfg.knn_every == 0):
            top1 = evaluate(model.encoder_q.backbone)
            if common.is_main():
                run.log({"step": step, "epoch": epoch, "knn_top1": top1})
                progress.write(f"epoch {epoch} step {step}: kNN top-1 {top1:.2f}%")
        common.save_checkpoint(run.checkpoint_path, "moco_ring", config, step, model, {"encoder": optimizer},
                               model.encoder_q.backbone)
    progress.close()


if __name__ == "__main__":
    main()
    common.shutdown_distributed()
