"""Spatial-MultiOmniglot (Ozair et al. 2019, as used in CM-ACC Appendix B): paired images (x, y) of c Omniglot
characters with a known mutual information I(x;y) = sum_i ln l_i.

Construction (one pair; c = 1..9 characters):
     1  alphabet i = the i-th of ALPHABETS (the nine largest of Omniglot's background split, the paper's order), l_i
        characters; its glyphs downsampled from 105x105 to 32x32 (area average of the ink, so thin strokes stay)
     2  z_i ~ Uniform{0..l_i-1} independently, i = 1..c
     3  d_x, d_y ~ Uniform(drawers of the split) independently    # one drawer per image ("x by one drawer")
     4  x = grid of glyph(alphabet i, z_i, d_x)                    # m x n cells of 32x32, row-major, c = m*n
     5  y = grid of glyph(alphabet i, (z_i + 1) mod l_i, d_y)
  y's characters are a bijection of x's, z can be read off x, and the drawers carry no information about z, so
  I(x;y) = I(z;z) = H(z) = sum_i ln l_i: 4.007 nats for one character (Tifinagh, 55), 34.435 for nine.
  Training pairs use drawers 1-15, evaluation pairs the held-out drawers 16-20: a probe trained on training images
  is tested on handwriting it has never seen.

Grid per c (exact m x n = c with m the largest divisor <= sqrt(c), so every cell holds a character and the sum in
I(x;y) runs over all mn cells as in the paper): 1x1, 1x2, 1x3, 2x2, 1x5, 2x3, 1x7, 2x4, 3x3.

Sources: the project's npz arrays (a folder with images_background.npz and alphabets.json, ../shared/data/omniglot)
or the original PNG folders as torchvision downloads them (ROOT/omniglot-py/images_background/<Alphabet>/
<character>/<id>_<drawer>.png; ROOT, ROOT/omniglot-py or the images_background folder itself). torchvision's
Omniglot class cannot read the npz (it checks the zip's MD5), hence the small loaders here.

A built dataset is cached as one .pt file (glyphs of the c alphabets + the index tensors z, d_x, d_y of both splits,
a few MB), keyed by (c, sizes, seed), so a run never rebuilds it; images are rendered from that on access.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import engine  # noqa: E402

# The paper's alphabet order (Appendix B), which is the order of size in the background split; l_i in brackets.
ALPHABETS = ("Tifinagh", "Japanese_(hiragana)", "Gujarati", "Japanese_(katakana)", "Bengali", "Grantha",
             "Sanskrit", "Armenian", "Mkhedruli_(Georgian)")  # 55, 52, 48, 47, 46, 43, 42, 41, 41
DRAWERS = 20
TRAIN_DRAWERS = tuple(range(15))  # drawers 1-15 (0-based 0..14)
EVAL_DRAWERS = tuple(range(15, 20))  # drawers 16-20, held out
CELL = 32  # pixels per grid cell (the paper: 32x32)
CACHE_FORMAT = "multiomniglot-v1"  # bump when the construction changes, so old cache files are never reused


# ---------------------------------------------------------------------------------------------------------------------
# Loading the nine alphabets: npz arrays or the original PNG folders
# ---------------------------------------------------------------------------------------------------------------------
def find_source(root: str | Path) -> tuple[str, Path]:
    """('npz', folder) or ('png', images_background folder) for a user-given path; one error line otherwise."""
    root = Path(root).expanduser()
    if (root / "images_background.npz").is_file():
        return "npz", root
    for folder in (root, root / "images_background", root / "omniglot-py" / "images_background"):
        if folder.name == "images_background" and folder.is_dir():
            return "png", folder
    common.fail(f"--omniglot {root}: neither images_background.npz + alphabets.json (the project's arrays) nor "
                "[omniglot-py/]images_background/<Alphabet>/<character>/*.png (torchvision's layout) is there")


def load_npz(folder: Path, alphabets=ALPHABETS) -> list[torch.Tensor]:
    """Strokes of each alphabet, bool (l_i, 20, 105, 105), True = ink, rows in global-id order, columns = drawers."""
    import numpy as np

    if not (folder / "alphabets.json").is_file():
        common.fail(f"{folder}: alphabets.json is missing (it maps the npz rows to alphabets)")
    ranges = {a["alphabet"]: (a["first_id"], a["last_id"]) for a in
              json.loads((folder / "alphabets.json").read_text())["background"]}
    with np.load(folder / "images_background.npz") as arrays:
        images = arrays["images"]  # bool 964x20x105x105, True = background; decompressed once (0.2 GB)
    # Row r is global id r + 1.
    return [torch.from_numpy(~images[ranges[a][0] - 1:ranges[a][1]]) for a in alphabets]


def load_png(folder: Path, alphabets=ALPHABETS) -> list[torch.Tensor]:
    """Same tensors as load_npz, from images_background/<Alphabet>/<character>/<id>_<drawer>.png."""
    import numpy as np
    from PIL import Image

    out = []
    for alphabet in alphabets:
        characters = [d for d in (folder / alphabet).iterdir() if d.is_dir()] if (folder / alphabet).is_dir() else []
        if not characters:
            common.fail(f"{folder / alphabet}: no character folders (is this Omniglot's images_background?)")
        strokes = []
        # Characters in global-id order (the file prefix), which is the npz's row order.
        for character in sorted(characters, key=lambda d: min(int(p.stem.split("_")[0]) for p in d.glob("*.png"))):
            files = sorted(character.glob("*.png"), key=lambda p: int(p.stem.split("_")[1]))  # by drawer
            if len(files) != DRAWERS:
                common.fail(f"{character}: {len(files)} PNG files, expected one per drawer ({DRAWERS})")
            strokes.append(torch.from_numpy(np.stack([~np.asarray(Image.open(p).convert("1"), dtype=bool)
                                                      for p in files])))
        out.append(torch.stack(strokes))
    return out


def load_alphabets(root: str | Path, count: int = len(ALPHABETS)) -> list[torch.Tensor]:
    """The first `count` alphabets of ALPHABETS as 32x32 uint8 glyphs (l_i, 20, 32, 32), 255 = full ink."""
    kind, folder = find_source(root)
    strokes = (load_npz if kind == "npz" else load_png)(folder, ALPHABETS[:count])
    return [downsample(s) for s in strokes]


def downsample(strokes: torch.Tensor) -> torch.Tensor:
    """bool (..., 105, 105) -> uint8 (..., 32, 32): the exact ink fraction of each output pixel's square (105/32
    source pixels a side, partial pixels weighted by their overlap). Nearest or max pooling would break or thicken
    the 2-3 px strokes; torch's "area" mode rounds the squares to whole source pixels."""
    size = strokes.shape[-1]
    edges = torch.linspace(0, size, CELL + 1, dtype=torch.float64)
    pixels = torch.arange(size, dtype=torch.float64)
    # overlap[i, p]: length of source pixel p inside output pixel i's interval, over that interval's length.
    overlap = (torch.minimum(edges[1:, None], pixels + 1) - torch.maximum(edges[:-1, None], pixels)).clamp_min(0)
    overlap = overlap / (size / CELL)  # CELL x size, rows sum to 1
    ink = overlap @ strokes.double() @ overlap.T  # ... x CELL x CELL
    return (ink * 255).round().to(torch.uint8)


# ---------------------------------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------------------------------
def grid_shape(characters: int) -> tuple[int, int]:
    """m x n = c exactly, m the largest divisor <= sqrt(c): 1x1 1x2 1x3 2x2 1x5 2x3 1x7 2x4 3x3."""
    m = max(d for d in range(1, math.isqrt(characters) + 1) if characters % d == 0)
    return m, characters // m


def mutual_information(sizes) -> float:
    """I(x;y) = sum_i ln l_i nats: y's characters are a bijection of x's, uniform and independent."""
    return sum(math.log(l) for l in sizes)


def draw_pairs(sizes: tuple[int, ...], num: int, drawers: tuple[int, ...], generator: torch.Generator) -> dict:
    """Lines 2-3: characters z: Nxc (z[:, i] uniform in 0..l_i-1) and one drawer per image, d_x, d_y: N."""
    z = torch.stack([torch.randint(l, (num,), generator=generator) for l in sizes], dim=1)  # z: Nxc
    pick = torch.tensor(drawers)
    d_x = pick[torch.randint(len(drawers), (num,), generator=generator)]  # d_x: N
    d_y = pick[torch.randint(len(drawers), (num,), generator=generator)]  # d_y: N, independent of d_x
    return {"z": z, "d_x": d_x, "d_y": d_y}


class MultiOmniglot:
    """One split: pair i is (x(i), y(i)), uint8 images (32m)x(32n), rendered from the glyph tables on access.
    glyphs: c tensors (l_i, 20, 32, 32); z: Nxc characters of x; d_x, d_y: N drawers."""

    def __init__(self, glyphs: list[torch.Tensor], z: torch.Tensor, d_x: torch.Tensor, d_y: torch.Tensor):
        self.glyphs, self.z, self.d_x, self.d_y = glyphs, z, d_x, d_y
        self.sizes = tuple(g.shape[0] for g in glyphs)  # l_i
        self.grid = grid_shape(len(glyphs))
        self.z_y = (z + 1) % torch.tensor(self.sizes)  # line 5: y's characters (z_i + 1) mod l_i, Nxc

    def __len__(self) -> int:
        return self.z.shape[0]

    @property
    def mutual_information(self) -> float:
        return mutual_information(self.sizes)

    def cells(self, characters: torch.Tensor, drawer: int) -> torch.Tensor:
        """c x 32 x 32 glyphs of one image (characters: c)."""
        return torch.stack([g[int(k), drawer] for g, k in zip(self.glyphs, characters)])

    def tile(self, cells: torch.Tensor) -> torch.Tensor:
        """c x 32 x 32 -> (32m) x (32n), cell i at row i // n, column i % n."""
        return self.tile_views(cells.unsqueeze(0))[0]

    def tile_views(self, cells: torch.Tensor) -> torch.Tensor:
        """V x c x 32 x 32 -> V x (32m) x (32n): V images tiled at once."""
        m, n = self.grid
        v = cells.shape[0]
        return cells.reshape(v, m, n, CELL, CELL).permute(0, 1, 3, 2, 4).reshape(v, m * CELL, n * CELL)

    def x(self, i: int) -> torch.Tensor:
        return self.tile(self.cells(self.z[i], int(self.d_x[i])))

    def y(self, i: int) -> torch.Tensor:
        return self.tile(self.cells(self.z_y[i], int(self.d_y[i])))


def build(glyphs: list[torch.Tensor], num_train: int, num_eval: int, seed: int) -> dict:
    """Index tensors of both splits; the training stream depends only on (seed, sizes, num_train), so asking for
    more evaluation pairs never changes the training data."""
    sizes = tuple(g.shape[0] for g in glyphs)
    return {"train": draw_pairs(sizes, num_train, TRAIN_DRAWERS, torch.Generator().manual_seed(2 * seed)),
            "eval": draw_pairs(sizes, num_eval, EVAL_DRAWERS, torch.Generator().manual_seed(2 * seed + 1))}


def cache_path(cache_dir: str | Path, characters: int, num_train: int, num_eval: int, seed: int) -> Path:
    return (Path(cache_dir).expanduser() /
            f"{CACHE_FORMAT}_c{characters}_train{num_train}_eval{num_eval}_seed{seed}.pt")


def load_or_build(root: str | Path, characters: int, num_train: int, num_eval: int, seed: int,
                  cache_dir: str | Path) -> tuple[MultiOmniglot, MultiOmniglot]:
    """(train, eval) splits, read from the cache or built from `root` (npz or PNG) and cached atomically."""
    if not 1 <= characters <= len(ALPHABETS):
        common.fail(f"{characters} characters: Spatial-MultiOmniglot has 1 to {len(ALPHABETS)}")
    path = cache_path(cache_dir, characters, num_train, num_eval, seed)
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        glyphs = load_alphabets(root, characters)
        state = {"format": CACHE_FORMAT, "glyphs": glyphs, **build(glyphs, num_train, num_eval, seed)}
        path.parent.mkdir(parents=True, exist_ok=True)
        engine.atomic_write(path, lambda p: torch.save(state, p))
    return tuple(MultiOmniglot(state["glyphs"], **state[split]) for split in ("train", "eval"))
