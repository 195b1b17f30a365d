"""CM-ACC: cross-modal active contrastive coding (MoCo across two modalities, negatives chosen by active sampling).

Paper: Shuang Ma, Zhaoyang Zeng, Daniel McDuff, Yale Song, "Active Contrastive Learning of Audio-Visual Video
Representations", ICLR 2021 (../shared/papers/cm_acc_active_contrastive_av.txt). A random queue of negatives is
redundant (many keys of one class, many easy ones); CM-ACC fills each modality's dictionary with the M candidates of a
pool that k-means++ picks among gradient embeddings (BADGE, Ash et al. 2020): uncertain and diverse negatives. The
public repository never ran (../shared/papers/README.md); this follows the paper.

Algorithm 2 (Algorithm 1 in detail), as implemented here (line numbers are cited in the code):
     3  D_v, D_a <- K random clips of V, A                   # dictionaries             (Dictionary, draw_dictionaries)
     4  k_i <- h(x_i) for every x_i in D_v, D_a              # key encoders             (encode_samples)
     6  each epoch: U_v, U_a <- N random clips               # pools (--pool-every)     (Pool, draw_pools)
     7  k_n <- h(x_n) for every x_n in U_v, U_a              #                          (encode_samples)
     9  each step: mini-batch B_v, B_a of M pairs            # two views per modality   (common.PairData)
    11  q^a = f_a(a), q^v = f_v(v)                           # queries: MxC             (CMACC.forward)
    13  p(y^_n | v_n, B_a) = softmax_j(k^v_n . q^a_j)        # Eq. (4), v_n in U_v, not in D_v (pseudo_posterior)
    14  y~_n = argmax_j p(y^_n)                              # pseudo-label             (gradient_embedding)
    16  g_n = dCE(p(y^_n), y~_n) / d theta_last               # Eq. (5), closed form     (gradient_embedding)
    17  S_v = k-means++ seeds of {g_n}, #seeds = M           # Algorithm 3              (kmeans_pp_seeds)
    18  D_v <- enqueue(dequeue(D_v), S_v)                    #                          (CMACC.sample_negatives)
 19-27  the same for D_a with the video queries q^v
    29  k^v = h_v(v'), k^a = h_a(a')                         # keys: MxC, shuffle BN    (CMACC.forward)
    30  p(y^v) over [k^a_i, D_a] / tau, p(y^a) over [k^v_i, D_v] / tau   # Eq. (6)      (contrastive_loss)
    32  Adam step on f_v, f_a                                # Eq. (7)                  (train_step)
    33  h <- m h + (1 - m) f; FC(h_a) <- m FC(h_a) + (1 - m) FC(f_v)    # Eq. (8), Sec. 3.3 "additional FC layer"
Algorithm 3 (k-means++ seeding): first seed uniform; each next seed drawn with probability proportional to D^2, the
squared distance to the nearest seed chosen so far.
--sampling random is XMoCo (Algorithm 4: the dictionaries enqueue the mini-batch's own keys, no pool); ohem keeps
the M candidates of largest pseudo-label loss (Table 3); feature runs k-means++ on the keys (Table 2); --unimodal is
SMoCo (two MoCos, v against v', a against a'); --shared-encoder is Appendix B's "regular MoCo" for a pair of one kind
(one encoder, one key encoder, one queue; x queries meet y keys and the reverse); --no-fcl is Table 1's "w/o fcl".

Where the paper, its public code and this script differ:
- The public code draws k-means++ seeds in proportion to D, not D^2, and defines the cross-modal FC layers without
  using them. Here seeds follow Algorithm 3 (tested) and the FC layers are in the loss path: q^v = FC(f_v(v)),
  k^a = FC'(h_a(a)), FC' following FC by momentum (and the other way round).
- Eq. (5)'s "last layer" is theta_q^a in the text, theta_q^v in Alg. 2 line 16. --eq5 query (default) reads it as
  BADGE does, the other modality's M queries as a classifier fed the candidate's key (k-means++ needs only inner
  products: (p_n - onehot(y~_n)) (outer) k_n is never materialized); --eq5 layer is literal: the other modality's
  additional FC layer. Eq. (4) has no temperature (kept), so p_n is nearly uniform and its norms hardly vary.
- Neither keeps a query's own partner out of its negatives (an actively sampled dictionary holds it K / |data| of the
  time, a queue almost never). Here the dictionaries track dataset ids: batch items are never candidates (line 12
  reads U minus (D u B)), an entry with the query's id leaves its denominator (logged: own_partner_v, own_partner_a).
- Alg. 4 enqueues the batch before the loss, so every positive is among its negatives: XMoCo here enqueues after it,
  as MoCo does. Active sampling enqueues S_v, S_a before the loss (Alg. 2).
- One pool of N pairs serves both modalities (the paper draws two). Its keys age for up to an epoch (lines 6-7) while
  positive keys are fresh: on avmnist the queries learn to tell old keys from new (the loss collapses, then jumps
  back to chance at each redraw). That schedule is the default; --pool-every S redraws every S steps.
- The paper gives no epochs, lr decay, projection MLP or audio augmentation: here warm-up then a constant lr, a
  linear head (--mlp: MoCo v2's), light SpecAugment-style masks on the log-mel (else SMoCo's audio task is trivial).

Datasets (--dataset; a new one is one loader function added to DATASETS, see common.PairData):
- avmnist: MNIST digit d paired with a Free Spoken Digit recording of d (fixed per item, as in AV-MNIST); --data-root
  holds mnist5k/mnist_5k.npz and fsdd/recordings/. Both are labelled: kNN of both encoders, classes of the negatives.
- avfolder: --data-root/<video>/frames/00001.jpg... at --fps and <video>/audio.wav (16-bit PCM), cut into clips of
  --clip-frames frames every --clip-stride frames with their audio. From your own video:
      mkdir -p data/myvideo/frames
      ffmpeg -i myvideo.mp4 -vf "fps=10,scale=-2:128" -q:v 3 data/myvideo/frames/%05d.jpg
      ffmpeg -i myvideo.mp4 -vn -ac 1 -ar 16000 -c:a pcm_s16le data/myvideo/audio.wav

Run:
    python moco_acc.py --data-root ../shared/data --arch small --batch-size 64 --moco-k 640 --pool-size 1920 \\
        --moco-m 0.99 --warmup-steps 50 --epochs 20 --workers 2          # avmnist on a laptop CPU
    python moco_acc.py --data-root ../shared/data --sampling random ...  # XMoCo (same flags)
    python moco_acc.py --data-root ../shared/data --pool-every 25 ...     # fresher pools (see above)
    python moco_acc.py --dataset avfolder --data-root ../shared/data/av-clips --batch-size 16 --moco-k 32 \\
        --pool-size 64 --clip-stride 8 --bn-splits 2                     # r3d_18 + audio ResNet-18, one GPU
    torchrun --nproc_per_node=8 moco_acc.py --dataset avfolder --data-root /data/kinetics-av   # paper settings

Results (what reproduces at CPU scale, what needs a GPU, with commands, commits and machines): RESULTS.md.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import random
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common
import engine
from engine import NON_NEGATIVE, POSITIVE, at_least, between, option

MODALITIES = ("v", "a")  # the paper's visual and audio modality; for an image pair (x, y): v is x, a is y


# ---------------------------------------------------------------------------------------------------------------------
# Active sampling (Section 3.2, Algorithms 2-3) and the cross-modal loss (Eq. 6-7)
# ---------------------------------------------------------------------------------------------------------------------
def pseudo_posterior(keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Eq. (4): p(y^_n = j | k_n, B) = softmax_j(k_n . q_j). keys: NxC candidates, queries: MxC -> p: NxM.
    The M queries of the other modality are the "classes"; Eq. (4) has no temperature."""
    return (keys @ queries.T).softmax(dim=1)


def gradient_embedding(keys: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (5) in closed form, factored: (residual: NxM, features: NxC), g_n = residual[n] (outer) features[n].

    The last layer is read as a linear classifier over the M queries, W = queries (MxC), fed the candidate's key:
    logits = W k_n, p_n = softmax (Eq. 4), pseudo-label y~_n = argmax p_n (Alg. 2 line 14). The gradient of
    CE(p_n, y~_n) with respect to W is (p_n - onehot(y~_n)) k_n^T (BADGE). Its norm is small when the model is sure
    of the pseudo-label (uncertainty); its direction says which query the candidate confuses (diversity).
    """
    p = pseudo_posterior(keys, queries)  # p: NxM
    residual = p - F.one_hot(p.argmax(dim=1), p.shape[1]).to(p.dtype)  # p - onehot(y~): NxM
    return residual, keys


def layer_gradient_embedding(keys: torch.Tensor, inputs: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """Eq. (5) read literally (--eq5 layer): the gradient of CE(p_n, y~_n) with respect to the parameters of the
    last layer of the other modality's query encoder (its additional FC layer, weight CxD and bias C), which maps
    the M queries' inputs h_j (inputs: MxD) to u_j, q_j = u_j / |u_j|. With r = p_n - onehot(y~_n) and
    dq_j/du_j = (I - q_j q_j^T) / |u_j|: dCE/dW = sum_j r_nj (I - q_j q_j^T) k_n h_j^T / |u_j|, and the bias
    gradient is the same sum without h_j^T. Returns the N x (C D + C) embeddings, materialized (4 (CD + C) bytes per
    candidate: 66 KB at C = D = 128, so 2.5 GB at the paper's N = 38400)."""
    inputs = inputs.float()
    u = layer(inputs)  # u: MxC
    q = F.normalize(u, dim=1)  # q: MxC, the queries of Eq. (4)
    residual, _ = gradient_embedding(keys, q)  # r: NxM
    tangent = keys.unsqueeze(1) - (keys @ q.T).unsqueeze(2) * q.unsqueeze(0)  # (I - q_j q_j^T) k_n: NxMxC
    a = residual.unsqueeze(2) * tangent / u.norm(dim=1).view(1, -1, 1)  # dCE/du_j: NxMxC
    weight = torch.einsum("nmc,md->ncd", a, inputs)  # dCE/dW: NxCxD
    return torch.cat([weight.flatten(1), a.sum(1)], dim=1)  # N x (CD + C)


def kmeans_pp_seeds(X: torch.Tensor | tuple[torch.Tensor, torch.Tensor], k: int,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Algorithm 3 (k-means++ seeding): k distinct indices into the N points, in the order they were picked.

    X: NxD points, or a pair (R: NxM, F: NxC) standing for the N points R[n] (outer) F[n] flattened (the gradient
    embeddings of `gradient_embedding`, never materialized). The first seed is uniform (line 2); each next one is
    drawn with probability proportional to D^2, the squared distance to its nearest seed so far (lines 5-10).
    """
    if isinstance(X, torch.Tensor):
        sq_norm = X.pow(2).sum(1)  # ||x_n||^2: N

        def dot(i):
            return X @ X[i]  # <x_n, x_i>: N
    else:
        R, feats = X
        sq_norm = R.pow(2).sum(1) * feats.pow(2).sum(1)  # ||r (outer) f||^2 = ||r||^2 ||f||^2

        def dot(i):
            return (R @ R[i]) * (feats @ feats[i])  # <r (outer) f, r' (outer) f'> = (r . r') (f . f')
    n = sq_norm.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"cannot pick {k} seeds among {n} points")
    picks = torch.empty(k, dtype=torch.long, device=sq_norm.device)
    picks[:1] = torch.randint(n, (1,), generator=generator, device=sq_norm.device)  # line 2: uniform
    nearest = torch.full_like(sq_norm, math.inf)  # D^2 to the nearest seed: N
    unchosen = torch.ones_like(sq_norm)
    for j in range(1, k):
        c = picks[j - 1]
        nearest = torch.minimum(nearest, (sq_norm + sq_norm[c] - 2 * dot(c)).clamp_min(0))  # line 6
        nearest[c], unchosen[c] = 0.0, 0.0  # exactly 0: rounding must never let a seed be drawn twice
        # Lines 8-10: P = cumsum(D^2), the seed is where a uniform draw on [0, P[-1]) falls. If every remaining
        # point coincides with a seed, D^2 is all 0: draw uniformly among the unchosen instead, so that the k
        # indices stay distinct (torch.where: no host sync on a GPU).
        cumulative = torch.where(nearest.sum() > 0, nearest, unchosen).double().cumsum(0)  # P: N
        u = torch.rand(1, generator=generator, device=cumulative.device, dtype=torch.float64) * cumulative[-1]
        picks[j:j + 1] = torch.searchsorted(cumulative, u, right=True)  # first n with P[n] > u: never a 0 weight
    return picks


def select_negatives(sampling: str, keys: torch.Tensor, queries: torch.Tensor, num: int,
                     generator: torch.Generator | None = None,
                     last_layer: tuple[torch.Tensor, nn.Linear] | None = None) -> torch.Tensor:
    """`num` distinct indices into the candidate keys (NxC, the pool minus the dictionary) for the dictionary
    that the queries (MxC, the other modality's mini-batch) are contrasted with. Alg. 2 lines 12-17.
    last_layer: (inputs h: MxD, layer) of the queries' last layer, for Eq. (5) read literally (--eq5 layer)."""
    if sampling == "active" and last_layer is not None:
        return kmeans_pp_seeds(layer_gradient_embedding(keys, *last_layer), num, generator)
    if sampling == "active":
        return kmeans_pp_seeds(gradient_embedding(keys, queries), num, generator)
    if sampling == "feature":  # Table 2: k-means++ on the feature embeddings (the keys) instead
        return kmeans_pp_seeds(keys, num, generator)
    # ohem (Table 3): the candidates of largest cross-entropy at their pseudo-label, -log p(y~_n) = lse - max
    logits = keys @ queries.T  # NxM, Eq. (4)
    return (logits.logsumexp(dim=1) - logits.max(dim=1).values).topk(num).indices


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, dictionary: torch.Tensor, temperature: float,
                     query_ids: torch.Tensor | None = None, dictionary_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. (6)-(7): mean over the M queries of -log( e^{q.k+/tau} / (e^{q.k+/tau} + sum_j e^{q.D[j]/tau}) ).
    q: MxC queries of one modality, k: MxC their positives (keys of the partner modality), dictionary: KxC.

    query_ids (M) and dictionary_ids (K) are dataset indices (-1 unknown): an entry with dictionary_ids[j] ==
    query_ids[i] >= 0 is the query's own partner (or another view of it), a key of its positive pair, and leaves
    query i's denominator. Without this an actively sampled dictionary holds the query's own partner about K / |data|
    of the time while a queue of recent batches almost never does, which biases every comparison between them."""
    l_pos = torch.einsum("mc,mc->m", q, k.detach()).unsqueeze(1)  # l_pos: Mx1
    l_neg = q @ dictionary.detach().T  # l_neg: MxK
    if query_ids is not None and dictionary_ids is not None:
        own = (dictionary_ids.unsqueeze(0) == query_ids.unsqueeze(1)) & (query_ids.unsqueeze(1) >= 0)  # MxK
        l_neg = l_neg.masked_fill(own, -math.inf)  # e^{-inf} = 0: out of the sum; the positive stays at index 0
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # Mx(1+K), positive at index 0
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def stream_seed(*parts) -> int:
    """A seed for one named random stream (pool of epoch e, selection at step t...), independent of the global RNG
    so that a resumed run draws what an uninterrupted one draws, whatever the global RNG went through."""
    return random.Random("/".join(map(str, parts))).getrandbits(63)


# ---------------------------------------------------------------------------------------------------------------------
# Config: every field is a flag (`moco_k` -> `--moco-k`). The paired datasets, their audio and video encoders
# and the pair kNN monitor are in common.py ("Audio-visual data", "Audio and video encoders").
# ---------------------------------------------------------------------------------------------------------------------
# --dataset: a loader function cfg -> common.PairData per name; other code may add its own (toy_mi/).
DATASETS = {"avmnist": common.load_avmnist, "avfolder": common.load_avfolder}


@dataclasses.dataclass
class Config(engine.RunConfig):
    """CM-ACC's options; the run and kNN options every script shares are in engine.RunConfig (redeclared here
    where a pair of modalities changes their meaning)."""
    # data
    dataset: str = option("avmnist", "paired data (see the docstring): 'avmnist' digits seen and spoken, "
                                     "'avfolder' pre-extracted videos, or any name added to DATASETS")
    data_root: str = option("./data", "dataset folder (avmnist: holds mnist5k/ and fsdd/; avfolder: one folder "
                                      "per video)")
    fps: float = option(10.0, "avfolder: frame rate the frames were extracted at (Appendix A: 10)", check=POSITIVE)
    clip_frames: int = option(16, "avfolder: frames per clip (Appendix A: 16 for pretraining)", check=at_least(1))
    clip_stride: int = option(16, "avfolder: frames between clip starts; each start is jittered within it",
                              check=at_least(1))
    frame_size: int = option(112, "avfolder: side of the square crop fed to the video encoder (paper: 224)",
                             check=at_least(1))
    mel_bands: int = option(80, "mel bands of the audio input (Appendix A: 80)", check=at_least(1))
    # encoders
    arch: str = option("resnet18", "encoders: 'resnet18' is 3D-ResNet-18 (torchvision r3d_18) for video, "
                                   "ResNet-18 with 1D kernels for audio, ResNet-18 for images; 'small' CNNs for CPU",
                       choices=("resnet18", "small"))
    dim: int = option(128, "feature dimension C of the contrastive space", check=at_least(1))
    mlp: bool = option(False, "MoCo v2 MLP projection head instead of a linear one")
    fcl: bool = option(True, "the additional FC layer on every encoder, momentum-updated across modalities "
                             "(--no-fcl: Table 1's 'w/o fcl')")
    bn_splits: int = option(8, "BatchNorm groups on one device (imitates that many GPUs for shuffle BN); under "
                               "torchrun each process is one group", check=at_least(1))
    # Only the image encoders take it (2-D convolutions): the audio encoder's kernels are 1-D, and the video
    # encoder's 3-D convolutions would want torch.channels_last_3d, which common.to_device does not apply.
    channels_last: str = option("auto", "channels_last memory format for images and encoders; auto: on a GPU",
                                choices=common.CHANNELS_LAST_CHOICES)
    # CM-ACC
    moco_k: int = option(3840, "dictionary size K of each modality (paper: 30 x 128)", check=at_least(1))
    pool_size: int = option(38400, "candidate pool size N of each modality, drawn each epoch (paper: 300 x 128)",
                            check=at_least(1))
    pool_every: int = option(0, "steps between pool redraws (0: at each epoch start, Alg. 2 lines 6-7); pool keys "
                                "age until redrawn (see the docstring)", check=NON_NEGATIVE)
    moco_m: float = option(0.999, "momentum m of the key encoders (Eq. 8)", check=between(0, 1))
    moco_t: float = option(0.7, "softmax temperature tau of the contrastive loss (Eq. 6)", check=POSITIVE)
    sampling: str = option("active", "negatives: 'active' (k-means++ on gradient embeddings, the paper), 'random' "
                                     "(XMoCo: the batch's own keys), 'ohem' (top-M loss), 'feature' (k-means++ on "
                                     "keys)",
                           choices=("active", "random", "ohem", "feature"))
    eq5: str = option("query", "Eq. (5)'s 'last layer': 'query' (BADGE's reading: the other modality's M queries "
                               "as a classifier's weights, closed form, the default) or 'layer' (literal: the "
                               "additional FC layer of the other modality's query encoder; needs --fcl)",
                      choices=("query", "layer"))
    unimodal: bool = option(False, "SMoCo: contrast each modality with itself (two MoCos) instead of across")
    shared_encoder: bool = option(False, "regular MoCo across a pair of one kind (App. B's SMoCo): one query "
                                         "encoder, one key encoder, one queue; x queries meet y keys and the "
                                         "reverse (needs --sampling random)")
    # optimization
    epochs: int = option(100, "training epochs (the paper gives none)", check=at_least(1))
    batch_size: int = option(128, "global mini-batch size M of pairs (split evenly over processes)", check=at_least(1))
    lr: float = option(1e-3, "Adam learning rate gamma, constant after the warm-up", check=NON_NEGATIVE)
    warmup_steps: int = option(500, "linear warm-up steps (Section 5: 500 iterations)", check=NON_NEGATIVE)
    # run (shared with every script; here pools and k-means++ draw from the seed too, and each modality has a kNN)
    seed: int = option(0, "random seed (model init, data order, augmentations, pools, k-means++)", check=NON_NEGATIVE)
    knn_every: int = option(5, "epochs between kNN evaluations of each labelled modality (0: only at the end)",
                            check=NON_NEGATIVE)
    knn_bank_size: int = option(0, "training items in each kNN bank, evenly spaced (0: all)", check=NON_NEGATIVE)
    knn_test_size: int = option(0, "test items each kNN monitor classifies, evenly spaced (0: all)", check=NON_NEGATIVE)


def learning_rate(step: int, warmup_steps: int, base_lr: float) -> float:
    """Section 5: Adam at gamma = 1e-3 "after a warm-up period of 500 iterations": linear warm-up, then constant
    (the paper states no decay)."""
    return base_lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else base_lr


# ---------------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------------
class Dictionary(common.Queue):
    """common.Queue (keys: KxC) plus the dataset index of every entry (ids: K, -1 unknown), to rule the pool
    candidates already in the dictionary out (Alg. 2 line 12)."""

    def __init__(self, size: int, dim: int):
        super().__init__(size, dim)
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, ids: torch.Tensor) -> None:
        """keys: BxC, ids: B. A batch larger than K keeps its last K rows, keys and ids alike (common.Queue)."""
        ids = ids[-self.ids.shape[0]:]
        self.ids[(self.ptr + torch.arange(ids.shape[0], device=ids.device)) % self.ids.shape[0]] = ids
        super().enqueue(keys)


class Pool(nn.Module):
    """One modality's candidate pool U (Alg. 2 lines 6-7): keys NxC from the key encoder when the pool was drawn,
    dataset ids N and labels N (-1 unknown, only counted in the logs). Buffers: a resumed run keeps its pool."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("keys", torch.zeros(size, dim))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))


class CMACC(nn.Module):
    """Query encoders f_v, f_a and momentum key encoders h_v, h_a, each with its additional FC layer; dictionaries
    D_v, D_a and pools U_v, U_a (buffers: saved with the model)."""

    def __init__(self, cfg: Config, kinds: tuple[str, str], in_channels: tuple[int, int], bn_splits: int):
        super().__init__()
        self.cfg = cfg
        # Queries of modality m are contrasted with keys (and the dictionary) of modality partner[m].
        self.partner = {m: m for m in MODALITIES} if cfg.unimodal else {"v": "a", "a": "v"}
        # --shared-encoder (regular MoCo): the same modules stand for both modalities, so `own` lists each once.
        self.own = MODALITIES[:1] if cfg.shared_encoder else MODALITIES
        branches = [common.Encoder(common.build_modality_backbone(kind, cfg.arch, c, bn_splits), cfg.dim, cfg.mlp)
                    for kind, c in zip(kinds[:len(self.own)], in_channels)]
        self.query = nn.ModuleDict({m: branches[i % len(branches)] for i, m in enumerate(MODALITIES)})
        self.key = copy.deepcopy(self.query).requires_grad_(False)  # h starts as f (deepcopy keeps the sharing)
        fcs = [nn.Linear(cfg.dim, cfg.dim) if cfg.fcl else nn.Identity() for _ in self.own]
        self.fc_query = nn.ModuleDict({m: fcs[i % len(fcs)] for i, m in enumerate(MODALITIES)})
        # Sec. 3.3: the FC on the key encoder h_a is a moving average of the FC on f_v (and vice versa), so the pair
        # that meets in the loss, q^v and k^a, ends in the same layer. Keyed by the key encoder's modality.
        self.fc_key = copy.deepcopy(nn.ModuleDict({self.partner[m]: self.fc_query[m] for m in MODALITIES}))
        self.fc_key.requires_grad_(False)
        queues = [Dictionary(cfg.moco_k, cfg.dim) for _ in self.own]
        self.dictionary = nn.ModuleDict({m: queues[i % len(queues)] for i, m in enumerate(MODALITIES)})
        pool_size = 0 if cfg.sampling == "random" else cfg.pool_size
        self.pool = nn.ModuleDict({m: Pool(pool_size, cfg.dim) for m in MODALITIES})

    def encode_keys(self, m: str, x: torch.Tensor, shuffle_bn: bool) -> torch.Tensor:
        """k = normalize(FC(h_m(x))): NxC, no gradient."""
        with torch.no_grad():
            features = (common.encode_with_shuffled_bn(self.key[m], x) if shuffle_bn else self.key[m](x))
            return F.normalize(self.fc_key[m](features).float(), dim=1)

    def forward(self, views: dict[str, list[torch.Tensor]]):
        """views[m] = [query view, key view], each Mx... Returns queries q[m] (grad) and keys k[m] (no grad): MxC."""
        h = {m: self.query[m](views[m][0]) for m in MODALITIES}  # inputs of the additional FC layers: MxC
        if self.cfg.eq5 == "layer":  # kept for the selection, which differentiates with respect to that layer
            self.fc_inputs = {m: h[m].detach() for m in MODALITIES}
        q = {m: F.normalize(self.fc_query[m](h[m]).float(), dim=1) for m in MODALITIES}
        k = {m: self.encode_keys(m, views[m][1], shuffle_bn=True) for m in MODALITIES}  # Alg. 2 line 29
        return q, k

    @torch.no_grad()
    def sample_negatives(self, q: dict[str, torch.Tensor], step: int,
                         batch_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Alg. 2 lines 10-27: for each dictionary, choose M candidates of its pool and enqueue them.
        batch_ids: the dataset indices of the global mini-batch (M), never candidates: a query's own partner is
        its positive, not a negative. Returns the labels of the chosen candidates (-1 unknown) per dictionary."""
        chosen_labels = {}
        for m in MODALITIES:
            pool, dictionary = self.pool[m], self.dictionary[m]
            # The queries that will meet D_m in the loss, from the whole global batch (every rank the same M).
            queries = common.concat_all_gather(q[self.partner[m]].detach())  # queries: MxC
            excluded = dictionary.ids if batch_ids is None else torch.cat([dictionary.ids, batch_ids])
            candidates = (~torch.isin(pool.ids, excluded)).nonzero().squeeze(1)  # U \ (D u B), line 12
            generator = torch.Generator(device=queries.device)
            generator.manual_seed(stream_seed("select", self.cfg.seed, step, m))
            last_layer = None
            if self.cfg.eq5 == "layer":
                last_layer = (common.concat_all_gather(self.fc_inputs[self.partner[m]]), self.fc_query[self.partner[m]])
            picked = candidates[select_negatives(self.cfg.sampling, pool.keys[candidates], queries, queries.shape[0],
                                                 generator, last_layer)]  # lines 13-17
            if common.world_size() > 1:
                dist.broadcast(picked, src=0)  # every rank computed the same picks; rank 0's make it certain
            dictionary.enqueue(pool.keys[picked], pool.ids[picked])  # line 18
            chosen_labels[m] = pool.labels[picked]
        return chosen_labels

    @torch.no_grad()
    def momentum_update(self) -> None:
        """Eq. (8), and the additional FC layers across modalities (Sec. 3.3)."""
        for m in self.own:  # once per distinct encoder: a shared one moves by m, not m^2
            common.momentum_update(self.key[m], self.query[m], self.cfg.moco_m)
            if self.cfg.fcl:
                common.momentum_update(self.fc_key[self.partner[m]], self.fc_query[m], self.cfg.moco_m)

    def backbones(self) -> nn.ModuleDict:
        return nn.ModuleDict({m: self.query[m].backbone for m in MODALITIES})


@torch.no_grad()
def encode_samples(model: CMACC, dataset, indices: torch.Tensor, seeds: torch.Tensor, batch_size: int, workers: int,
                   device: torch.device) -> tuple[dict, dict, torch.Tensor]:
    """Key-encode dataset items (Alg. 2 lines 4 and 7) in global batches: rank r encodes its slice of each batch
    (the slice it would hold in training, so that BatchNorm groups match one process with --bn-splits), then the
    slices are gathered: every rank returns all keys {m: NxC}, labels {m: N} and ids N, in the order of `indices`.
    Key encoders stay in training mode, as for the keys of a training step (batch statistics)."""
    local = batch_size // common.world_size()
    pairs = list(zip(indices.tolist(), seeds.tolist()))
    mine = [pair for b in range(0, len(pairs), batch_size)
            for pair in pairs[b + common.rank() * local:b + (common.rank() + 1) * local]]
    keys, labels = {m: [] for m in MODALITIES}, {m: [] for m in MODALITIES}
    channels_last = common.channels_last(model.cfg.channels_last, device)
    for views_v, views_a, label_v, label_a in common.make_loader(dataset, local, workers, device, mine):
        for m, views, label in (("v", views_v, label_v), ("a", views_a, label_a)):
            with common.autocast(device, model.cfg.precision):
                key_view = common.to_device(views[1], device, channels_last)
                keys[m].append(common.concat_all_gather(model.encode_keys(m, key_view, shuffle_bn=False)))
            labels[m].append(common.concat_all_gather(label.to(device)))
    return ({m: torch.cat(keys[m]) for m in MODALITIES}, {m: torch.cat(labels[m]) for m in MODALITIES},
            indices.to(device))


class WithItemIds(torch.utils.data.Dataset):
    """A common.PairData.train whose items also return their dataset index (the id the dictionaries track)."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index_and_seed: tuple[int, int]):
        return (*self.dataset[index_and_seed], index_and_seed[0])


def draw_items(num_items: int, size: int, *stream) -> tuple[torch.Tensor, torch.Tensor]:
    """`size` distinct dataset indices and their augmentation seeds, from a named random stream."""
    g = torch.Generator().manual_seed(stream_seed(*stream))
    return torch.randperm(num_items, generator=g)[:size], torch.randint(0, 2**62, (size,), generator=g)


def draw_dictionaries(model: CMACC, dataset, cfg: Config, device: torch.device) -> None:
    """Alg. 2 lines 3-4: K random items, encoded by the key encoders, fill both dictionaries."""
    keys, _, ids = encode_samples(model, dataset, *draw_items(len(dataset), cfg.moco_k, "dictionary", cfg.seed),
                                  cfg.batch_size, cfg.workers, device)
    for m in MODALITIES:
        model.dictionary[m].enqueue(keys[m], ids)


def draw_pools(model: CMACC, dataset, cfg: Config, step: int, device: torch.device) -> None:
    """Alg. 2 lines 6-7: N random items (a stream of the step), encoded by the current key encoders, become both
    modalities' pools."""
    keys, labels, ids = encode_samples(model, dataset, *draw_items(len(dataset), cfg.pool_size, "pool", cfg.seed, step),
                                       cfg.batch_size, cfg.workers, device)
    for m in MODALITIES:
        model.pool[m].keys.copy_(keys[m])
        model.pool[m].ids.copy_(ids)
        model.pool[m].labels.copy_(labels[m])


def train_step(model: CMACC, ddp_model: nn.Module, optimizer: torch.optim.Optimizer,
               views: dict[str, list[torch.Tensor]], labels: dict[str, torch.Tensor], ids: torch.Tensor,
               step: int, timed: bool = True) -> dict:
    """One step of Algorithm 2 (Algorithm 4 for --sampling random) at a global step; returns what gets logged, the
    losses and counts as device tensors (read on the host only at log steps). ids: this process's M dataset
    indices (the same for both modalities: item i is a pair); labels: M per modality, on the CPU (-1 unknown).
    timed: measure the split of the step (time_encode_s, time_sample_s, time_update_s), which on a GPU costs a
    synchronisation at each of its four marks: the loop asks for it at log steps only, the steps it logs."""
    cfg, device = model.cfg, views["v"][0].device
    ids = ids.to(device)
    global_ids = common.concat_all_gather(ids)  # M: the whole batch, as the dictionaries hold global entries
    lr = learning_rate(step, cfg.warmup_steps, cfg.lr)
    for group in optimizer.param_groups:
        group["lr"] = lr
    tic = clock(device, timed)
    with common.autocast(device, cfg.precision):
        q, k = ddp_model(views)  # lines 11, 20, 29
    encoded = clock(device, timed)
    chosen = None if cfg.sampling == "random" else model.sample_negatives(q, step, global_ids)  # lines 10-27
    sampled = clock(device, timed)
    # Queries whose own partner sits in the dictionary they meet: masked out of the loss, counted in the logs.
    own_partner = {m: torch.isin(ids, model.dictionary[model.partner[m]].ids).float().mean() for m in MODALITIES}
    with torch.autocast(device.type, enabled=False):  # line 30, Eq. (6), in fp32
        losses = {m: contrastive_loss(q[m], k[model.partner[m]], model.dictionary[model.partner[m]].keys, cfg.moco_t,
                                      ids, model.dictionary[model.partner[m]].ids)
                  for m in MODALITIES}
    optimizer.zero_grad(set_to_none=True)
    # Each query encoder only reaches its own term, so the sum gives each the gradient of Eq. (7).
    (losses["v"] + losses["a"]).backward()
    optimizer.step()  # line 32
    model.momentum_update()  # line 33
    if chosen is None:
        # Alg. 4 lines 13-14 (after the loss, as in MoCo): the whole global batch's keys, so all ranks stay equal.
        chosen = {m: common.concat_all_gather(labels[m].to(device)) for m in MODALITIES}
        for m in MODALITIES:
            model.dictionary[m].enqueue(common.concat_all_gather(k[m]), global_ids)
    updated = clock(device, timed)
    # loss_v is the loss of the v queries (direction v -> a, or v -> v' with --unimodal), loss_a the other one.
    stats = {f"loss_{m}": common.all_reduce_mean(losses[m].detach()) for m in MODALITIES}
    stats.update({f"own_partner_{m}": common.all_reduce_mean(own_partner[m]) for m in MODALITIES})
    stats.update(loss=stats["loss_v"].double() + stats["loss_a"].double(), lr=lr)  # float64, as the host summed
    if timed:
        stats.update(time_encode_s=encoded - tic, time_sample_s=sampled - encoded, time_update_s=updated - sampled)
    for m in MODALITIES:
        if (labels[m] >= 0).all():  # a labelled dataset (on the CPU: no wait for the device); its pools are too
            # The paper's Figures 2 and 4: distinct classes among the M negatives enqueued this step, over M.
            stats[f"neg_classes_{m}"] = distinct_fraction(chosen[m])
    return stats


def distinct_fraction(labels: torch.Tensor) -> torch.Tensor:
    """Distinct values among the labels (M) over M, as a float64 device tensor: unique() would wait for the device
    to learn its output's size."""
    ordered = labels.sort().values
    return (1 + (ordered[1:] != ordered[:-1]).sum()).double() / ordered.numel()


def clock(device: torch.device, sync: bool = True) -> float:
    if sync and device.type == "cuda":
        torch.cuda.synchronize(device)  # the GPU runs ahead: time what it did, not what it was told
    return time.perf_counter()


# ---------------------------------------------------------------------------------------------------------------------
# Training loop (the same skeleton in every method script)
# ---------------------------------------------------------------------------------------------------------------------
def load_pair_data(cfg: Config) -> common.PairData:
    if cfg.dataset not in DATASETS:  # checked here, not by argparse choices, so other code can add datasets
        common.fail(f"unknown dataset '{cfg.dataset}' (choose from {', '.join(DATASETS)})")
    return DATASETS[cfg.dataset](cfg)


def check_config(cfg: Config, data: common.PairData) -> None:
    num_items = len(data.train)
    engine.check_batch_size(cfg.batch_size, num_items, cfg.bn_splits)
    if cfg.eq5 == "layer" and not cfg.fcl:
        common.fail("--eq5 layer differentiates with respect to the additional FC layer: it needs --fcl")
    if cfg.shared_encoder and (cfg.sampling != "random" or cfg.unimodal):
        common.fail("--shared-encoder is regular MoCo across the pair: it needs --sampling random, no --unimodal")
    if cfg.shared_encoder and (data.kinds[0] != data.kinds[1] or data.in_channels[0] != data.in_channels[1]):
        common.fail(f"--shared-encoder needs two modalities of one kind; {cfg.dataset} pairs "
                    f"{' and '.join(data.kinds)}")
    if cfg.moco_k % cfg.batch_size or cfg.moco_k > num_items:
        common.fail(f"--moco-k {cfg.moco_k} must be a multiple of --batch-size {cfg.batch_size} (it is encoded in "
                    f"batches) and at most the dataset size ({num_items} pairs)")
    if cfg.sampling != "random" and (cfg.pool_size % cfg.batch_size or cfg.pool_size > num_items
                                     or cfg.pool_size < cfg.moco_k + 2 * cfg.batch_size):
        common.fail(f"--pool-size {cfg.pool_size} must be a multiple of --batch-size {cfg.batch_size}, at least "
                    f"--moco-k + 2 x --batch-size = {cfg.moco_k + 2 * cfg.batch_size} (M candidates outside the "
                    f"dictionary and the mini-batch) and at most the dataset size ({num_items} pairs)")


def main(argv: list[str] | None = None) -> None:
    cfg = engine.parse_config(Config, argv, __doc__)
    run = engine.Run(cfg)
    data = load_pair_data(cfg)
    check_config(cfg, data)

    common.seed_everything(cfg.seed)  # same seed on every rank: identical initial encoders
    bn_splits = cfg.bn_splits if common.world_size() == 1 else 1  # under torchrun each process is one BN group
    model = run.place(CMACC(cfg, data.kinds, data.in_channels, bn_splits))
    optimizer = torch.optim.Adam([*model.query.parameters(), *model.fc_query.parameters()], lr=cfg.lr)
    run.start(model, {"encoder": optimizer}, model.backbones())
    ddp_model = run.distributed(model)
    if not run.resumed:  # a resumed run has its dictionaries (and pools) from the checkpoint
        draw_dictionaries(model, data.train, cfg, run.device)  # Alg. 2 lines 3-4

    sampler = common.EpochSampler(len(data.train), cfg.batch_size, cfg.seed)
    loader = common.make_loader(WithItemIds(data.train), cfg.batch_size // common.world_size(), cfg.workers,
                                run.device, sampler, persistent=True)
    knn = common.PairKnn(data, cfg, run.device)
    for step, (views_v, views_a, label_v, label_a, ids) in run.steps(loader, sampler, lambda: knn(model.backbones()),
                                                                     show=("loss_v", "loss_a")):
        if cfg.sampling != "random" and step % (cfg.pool_every or sampler.batches_per_epoch) == 0:
            draw_pools(model, data.train, cfg, step, run.device)  # Alg. 2 lines 6-7
        views = {"v": run.to_device(views_v), "a": run.to_device(views_a)}
        # The split of the step is timed on logged steps only: on a GPU each of its marks waits for the device.
        run.log(train_step(model, ddp_model, optimizer, views, {"v": label_v, "a": label_a}, ids, step,
                           timed=run.is_logged(step)))


if __name__ == "__main__":
    engine.run_main(main)
