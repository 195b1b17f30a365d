"""What a method needs, shared by the scripts: distributed gathers, encoders, the queue and momentum update, the
augmentation recipe, datasets, kNN and linear-probe evaluation, and, last, the audio-visual data of moco_acc.py.

Every method script (moco_ring.py, adco.py, mmcl.py, moco_acc.py, moco_taxonomy.py) keeps its own paper's
algorithm, loss and training loop; this module is the toolbox under them. The run machinery that holds no
equation (flags, run directory, checkpoints, stopping, the device data path, the probe and plot commands) is in
engine.py. Nothing heavy happens at import.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm


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


# ---------------------------------------------------------------------------------------------------------------------
# Distributed: torchrun's environment decides; a world of one otherwise, where every gather is the identity
# ---------------------------------------------------------------------------------------------------------------------
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
    """backbone (what is evaluated and exported) + projection head (what the contrastive loss sees); the backbone is
    an image network (`build_backbone`) or, in moco_acc.py, one per modality (`build_modality_backbone`)."""

    def __init__(self, backbone: nn.Module, dim: int, mlp: bool):
        super().__init__()
        self.backbone = backbone
        self.head = projection_head(backbone.out_dim, dim, mlp)

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
            memory = D.STL10(root, split="train", download=download)
            test = D.STL10(root, split="test", download=download)
            return ImageData(pretrain, memory, test, 10, image_size or 96, mean, std)
        cls = D.CIFAR10 if name == "cifar10" else D.CIFAR100
        train, test = cls(root, train=True, download=download), cls(root, train=False, download=download)
    except (RuntimeError, OSError) as e:  # torchvision: "Dataset not found or corrupted", or no network
        if not root_existed and Path(root).is_dir() and not any(Path(root).iterdir()):
            Path(root).rmdir()  # torchvision made it for the download that failed: leave nothing behind
        fail(f"cannot load {name} from --data-root {root}: {str(e).splitlines()[0]}. Offline, read the bundled "
             f"CIFAR-10 JPEGs with '--dataset folder --data-root ../shared/data/cifar10-jpg' (any DIR/train/<class>/"
             f"*.jpg and DIR/test/<class>/*.jpg), and on a CPU add '--arch small'")
    return ImageData(train, train, test, len(train.classes), image_size or 32, mean, std)


def read_image(path: str):
    """ImageFolder's loader, with one clear error naming the file for an unreadable image (empty, truncated, not
    an image) instead of PIL's traceback from inside a loader worker."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"cannot read image {path} ({reason})") from None


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


class WithEvalTransform(torch.utils.data.Dataset):
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


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation: weighted kNN monitor (MoCo CIFAR demo / Wu et al. 2018) and linear probe
# ---------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def extract_features(backbone: nn.Module, loader, device: torch.device,
                     desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalized backbone features (NxD) and labels (N) of every sample the loader yields, eval mode, with a
    progress bar under `desc` on the main process (an evaluation may take minutes: it should not look frozen)."""
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not is_main(), dynamic_ncols=True):
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
    bank, bank_labels = extract_features(backbone, memory_loader, device, "kNN: bank features")
    correct = 0
    test = extract_features(backbone, test_loader, device, "kNN: test features")
    for features, labels in zip(*(t.split(1024) for t in test)):
        correct += (knn_predict(features, bank, bank_labels, num_classes, k, temperature) == labels).sum().item()
    return 100.0 * correct / len(test_loader.dataset)


class KnnMonitor:
    """kNN top-1 of a backbone during training: bank = training images with test transforms, queries = test split.
    Runs on the main process (others wait at a barrier) and returns the accuracy there, None elsewhere."""

    def __init__(self, data: ImageData, bank_size: int, test_size: int, k: int, temperature: float, workers: int,
                 device: torch.device):
        tf = eval_transform(data.image_size, data.mean, data.std)
        self.memory = make_loader(WithEvalTransform(evenly_spaced_subset(data.memory, bank_size), tf), 256, workers,
                                  device)
        self.test = make_loader(WithEvalTransform(evenly_spaced_subset(data.test, test_size), tf), 256, workers, device)
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
CHANNELS_LAST_CHOICES = ("auto", "on", "off")  # --channels-last


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
