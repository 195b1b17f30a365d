"""Tests for the Spatial-MultiOmniglot experiment (CM-ACC App. B, Fig. 3a): toy_mi/omniglot_data.py (the builder) and
toy_mi/multiomniglot.py (pretraining through moco_acc.py, per-position linear probes).

The builder is checked against what the construction promises, each computed here independently: I(x;y) from
the closed form and from the empirical joint of the drawn characters, y's characters as a function of x's, the
pixels of every cell against the glyph table, disjoint drawers, seeding, and the PNG loader against the npz one.
"""
import json
import math
import sys
from collections import defaultdict

import pytest
import torch

from conftest import DATA, ROOT, run_script

sys.path.insert(0, str(ROOT / "toy_mi"))
import omniglot_data as od  # noqa: E402
import multiomniglot  # noqa: E402

OMNIGLOT = DATA / "omniglot"
pytestmark = pytest.mark.skipif(not (OMNIGLOT / "images_background.npz").is_file(),
                                reason="../shared/data/omniglot not found")


@pytest.fixture(scope="module")
def nine(tmp_path_factory):
    """The nine-character dataset, 4000 training and 1000 evaluation pairs, built once for the module."""
    cache = tmp_path_factory.mktemp("cache")
    train, evaluation = od.load_or_build(OMNIGLOT, 9, 4000, 1000, seed=0, cache_dir=cache)
    return train, evaluation, cache


def with_characters(split, c):
    """The c-character dataset drawn from the first c alphabets of a built split's glyph tables."""
    return od.MultiOmniglot(split.glyphs[:c], **od.build(split.glyphs[:c], 4000, 1000, seed=0)["train"])


# ---------------------------------------------------------------------------------------------------------------------
# The builder
# ---------------------------------------------------------------------------------------------------------------------
def test_alphabets_are_the_nine_largest_of_the_background_split_in_the_papers_order():
    table = json.loads((OMNIGLOT / "alphabets.json").read_text())["background"]
    largest = sorted(table, key=lambda a: -a["characters"])[:9]  # stable: Armenian (id 27) before Mkhedruli (729)
    assert tuple(a["alphabet"] for a in largest) == od.ALPHABETS
    assert [a["characters"] for a in largest] == [55, 52, 48, 47, 46, 43, 42, 41, 41]  # Appendix B's list


def test_glyphs_are_32px_area_averages_of_the_105px_strokes(nine):
    train = nine[0]
    assert [tuple(g.shape) for g in train.glyphs] == [(l, 20, 32, 32) for l in (55, 52, 48, 47, 46, 43, 42, 41, 41)]
    strokes = od.load_npz(OMNIGLOT, od.ALPHABETS[:1])[0][3, 7]  # Tifinagh character 4, drawer 8: 105x105 bool
    # Independently: blow every source pixel up to 32x32 sub-pixels (3360x3360), then average 105x105 blocks.
    fine = strokes.double().repeat_interleave(32, 0).repeat_interleave(32, 1)
    expected = fine.view(32, 105, 32, 105).mean((1, 3))
    assert (train.glyphs[0][3, 7].double() - 255 * expected).abs().max() <= 0.5 + 1e-9
    assert train.glyphs[0][3, 7].double().sum() == pytest.approx(255 * strokes.sum().item() * (32 / 105) ** 2,
                                                                  rel=0.02)  # ink is conserved


@pytest.mark.parametrize("c", range(1, 10))
def test_grid_has_exactly_c_cells_and_mutual_information_is_the_sum_of_log_alphabet_sizes(nine, c):
    split = nine[0] if c == 9 else with_characters(nine[0], c)
    m, n = split.grid
    assert (m, n) == [(1, 1), (1, 2), (1, 3), (2, 2), (1, 5), (2, 3), (1, 7), (2, 4), (3, 3)][c - 1]
    assert tuple(split.x(0).shape) == tuple(split.y(0).shape) == (32 * m, 32 * n)
    sizes = [55, 52, 48, 47, 46, 43, 42, 41, 41][:c]
    assert split.mutual_information == pytest.approx(sum(math.log(l) for l in sizes), abs=1e-12)
    assert split.mutual_information == pytest.approx({1: 4.007, 9: 34.435}.get(c, split.mutual_information),
                                                     abs=5e-4)


def test_one_character_mutual_information_matches_the_empirical_joint_of_50k_pairs():
    """Plug-in I(z_x; z_y) over the 50K drawn pairs: ln 55 up to the plug-in bias (-(55-1)/(2N) = -0.0005)."""
    glyphs = [torch.zeros(55, 20, 32, 32, dtype=torch.uint8)]  # the draw does not look at pixels
    split = od.MultiOmniglot(glyphs, **od.build(glyphs, 50000, 10, seed=3)["train"])
    a, b = split.z[:, 0], split.z_y[:, 0]
    joint = torch.zeros(55, 55, dtype=torch.float64).index_put_((a, b), torch.ones(len(a), dtype=torch.float64),
                                                                accumulate=True) / len(a)
    pa, pb = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    nz = joint > 0
    mi = (joint[nz] * (joint[nz] / (pa * pb).expand_as(joint)[nz]).log()).sum().item()
    assert mi == pytest.approx(math.log(55), abs=0.01)


def test_y_shows_the_next_character_of_every_cell_and_is_a_function_of_xs_characters(nine):
    train = nine[0]
    sizes = torch.tensor([55, 52, 48, 47, 46, 43, 42, 41, 41])
    assert torch.equal(train.z_y, (train.z + 1) % sizes)
    assert ((train.z >= 0) & (train.z < sizes)).all()
    partners = defaultdict(set)  # x's character tuple -> every y tuple it comes with
    for zx, zy in zip(train.z.tolist(), train.z_y.tolist()):
        partners[tuple(zx)].add(tuple(zy))
    assert all(len(ys) == 1 for ys in partners.values())
    for i in (0, 1, 1234):  # every cell's pixels, row-major, against the glyph table
        x, y = train.x(i), train.y(i)
        for k in range(9):
            r, col = divmod(k, 3)
            cell = (slice(32 * r, 32 * r + 32), slice(32 * col, 32 * col + 32))
            assert torch.equal(x[cell], train.glyphs[k][train.z[i, k], train.d_x[i]])
            assert torch.equal(y[cell], train.glyphs[k][(train.z[i, k] + 1) % sizes[k], train.d_y[i]])


def test_training_and_evaluation_drawers_are_disjoint_and_independent(nine):
    train, evaluation, _ = nine
    train_drawers = set(train.d_x.tolist()) | set(train.d_y.tolist())
    eval_drawers = set(evaluation.d_x.tolist()) | set(evaluation.d_y.tolist())
    assert train_drawers == set(range(15)) and eval_drawers == set(range(15, 20))
    assert not train_drawers & eval_drawers
    same = (train.d_x == train.d_y).float().mean().item()  # independent uniform drawers coincide 1/15 of the time
    assert same == pytest.approx(1 / 15, abs=4 * math.sqrt((1 / 15) * (14 / 15) / len(train)))


def test_same_seed_same_data_other_seed_other_data_and_the_cache_is_reused(nine, tmp_path, monkeypatch):
    train, evaluation, cache = nine
    glyphs = train.glyphs
    again = od.build(glyphs, 4000, 1000, seed=0)
    for split, drawn in ((train, again["train"]), (evaluation, again["eval"])):
        assert all(torch.equal(getattr(split, k), drawn[k]) for k in ("z", "d_x", "d_y"))
    other = od.build(glyphs, 4000, 1000, seed=1)["train"]
    assert not torch.equal(other["z"], train.z)
    assert torch.equal(od.build(glyphs, 4000, 50, seed=0)["train"]["z"], train.z)  # eval size never moves train
    monkeypatch.setattr(od, "load_alphabets", lambda *a: pytest.fail("rebuilt although the cache holds it"))
    cached, _ = od.load_or_build("/nonexistent", 9, 4000, 1000, seed=0, cache_dir=cache)
    assert torch.equal(cached.z, train.z) and all(torch.equal(a, b) for a, b in zip(cached.glyphs, glyphs))


def test_png_folders_in_torchvisions_layout_give_the_same_glyphs_as_the_npz(tmp_path):
    from PIL import Image

    table = {a["alphabet"]: a for a in json.loads((OMNIGLOT / "alphabets.json").read_text())["background"]}
    strokes = od.load_npz(OMNIGLOT, od.ALPHABETS[:2])  # True = ink
    root = tmp_path / "omniglot-py" / "images_background"
    for alphabet, chars in zip(od.ALPHABETS[:2], strokes):
        for k, drawings in enumerate(chars):
            folder = root / alphabet / f"character{k + 1:02d}"
            folder.mkdir(parents=True)
            for d, ink in enumerate(drawings):  # the original files: white background, mode "1"
                Image.fromarray((~ink).numpy()).save(folder / f"{table[alphabet]['first_id'] + k:04d}_{d + 1:02d}.png")
    assert od.find_source(tmp_path) == ("png", root)
    from_png, from_npz = od.load_alphabets(tmp_path, 2), od.load_alphabets(OMNIGLOT, 2)
    assert all(torch.equal(a, b) for a, b in zip(from_png, from_npz))
    with pytest.raises(SystemExit, match="error: .*neither"):
        od.find_source(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------------------------------------------------
def test_pair_views_are_seeded_shifts_of_the_pair(nine):
    train = with_characters(nine[0], 2)
    views = multiomniglot.PairViews(train, shift=0)
    views_x, views_y, label_x, label_y = views[(5, 123)]
    assert torch.equal(views_x[0], multiomniglot.to_input(train.x(5))) and tuple(views_x[0].shape) == (3, 32, 64)
    assert torch.equal(views_y[1], multiomniglot.to_input(train.y(5)))
    assert (label_x, label_y) == (int(train.z[5, 0]), int(train.z_y[5, 0]))
    shifted = multiomniglot.PairViews(train, shift=2)
    first, second = shifted[(5, 123)], shifted[(5, 123)]
    assert all(torch.equal(a, b) for a, b in zip(first[0] + first[1], second[0] + second[1]))  # exact resume
    assert not torch.equal(first[0][0], first[0][1])  # two different views


def test_downsampled_views_are_area_averages():
    image = torch.randint(0, 256, (32, 64), dtype=torch.uint8)
    small = multiomniglot.to_input(image, 2)
    assert tuple(small.shape) == (3, 16, 32)
    expected = (image.double().view(16, 2, 32, 2).mean((1, 3)) / 255 - multiomniglot.MEAN) / multiomniglot.STD
    torch.testing.assert_close(small[0].double(), expected, rtol=0, atol=1e-5)


def test_summary_is_the_mean_and_sample_std_over_seeds():
    out = multiomniglot.summary([0.5, 0.7, 0.9])
    assert out["mean"] == pytest.approx(0.7) and out["std"] == pytest.approx(0.2) and out["runs"] == [0.5, 0.7, 0.9]


def test_bad_flags_give_one_error_line():
    result = run_script("toy_mi/multiomniglot.py", "--characters", "10", check=False)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == ["error: --characters 10: each must be 1..9"]


def test_quick_run_end_to_end_is_far_above_chance_and_smoco_shift_learns_beyond_the_random_encoder(tmp_path):
    """--quick cut to one character and 40 steps of batch 32 (tau 0.1, which moves the small CNN fastest): every
    method's probe is far above chance (1/55); SMoCo x-x' (two MoCos of shifted views) is clearly above the
    random-initialised encoder, both measured in this run (the cross-modal methods and the shared-encoder SMoCo
    need more steps than a test can afford to get there: XMoCo had 69.4% against 72.2% at random init); the JSON has the issue's format ({'mean', 'std', 'runs'} per method); a rerun reuses the
    finished runs and their saved probes and gives the same table."""
    flags = ["--quick", "--characters", "1", "--num-train", "1024", "--num-eval", "500", "--probe-train", "1000",
             "--batch-size", "32", "--moco-k", "128", "--pool-size", "256", "--epochs", "2", "--max-steps", "40",
             "--moco-t", "0.1",
             "--warmup-steps", "5", "--probe-epochs", "20", "--cache-dir", str(tmp_path / "cache"),
             "--methods", "smoco", "xmoco", "cmacc", "smoco_shift",
             "--out-dir", str(tmp_path / "runs")]
    run_script("toy_mi/multiomniglot.py", *flags, "--json", str(tmp_path / "a.json"), timeout=900)  # 4 runs
    results = json.loads((tmp_path / "a.json").read_text())["results"]
    assert len(results) == 1
    row = results[0]
    assert {"characters", "mi_nats", "num_train", "smoco", "xmoco", "cmacc", "init"} <= set(row)
    assert row["characters"] == 1 and row["mi_nats"] == pytest.approx(math.log(55)) and row["num_train"] == 1024
    for method in ("smoco", "xmoco", "cmacc", "smoco_shift", "init"):
        assert set(row[method]) == {"mean", "std", "runs"} and len(row[method]["runs"]) == 1
        assert row[method]["mean"] == row[method]["runs"][0] and row[method]["std"] == 0.0
        assert 10 / 55 < row[method]["mean"] <= 1.0, (method, row)
    assert row["smoco_shift"]["mean"] > row["init"]["mean"] + 0.05, row
    rerun = run_script("toy_mi/multiomniglot.py", *flags, "--json", str(tmp_path / "b.json"),
                       "--plot", str(tmp_path / "fig.png"), timeout=900)
    assert json.loads((tmp_path / "b.json").read_text())["results"] == results  # resumed at the end: no training
    assert (tmp_path / "fig.png").is_file() or "matplotlib is not installed" in rerun.stdout  # optional dependency
