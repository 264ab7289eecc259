"""Omniglot: npz, PNG tree and zip loaders agree; alphabets as clients; bad input is refused."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedmaml.errors import FedmamlError
from fedmaml.tasks.episodes import EpisodeSpec, sample_episode
from fedmaml.tasks.omniglot import OmniglotSource, rotate_classes
from fedmaml.tasks.omniglot_files import download_omniglot, find_alphabets, load_alphabet

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
FIVE_WAY = EpisodeSpec(support=1, query=5, ways=5)


def _needs_shared() -> Path:
    if not (SHARED / "images_background.npz").is_file():
        pytest.skip("../shared/data/omniglot is not available")
    return SHARED


def _drawing(rng: np.random.Generator, size: int = 105) -> np.ndarray:
    """A white image (True) with a random black block of ink (False)."""
    img = np.ones((size, size), dtype=bool)
    r, c = rng.integers(10, size - 40, 2)
    img[r : r + rng.integers(8, 30), c : c + rng.integers(8, 30)] = False
    return img


def _write_tree(root: Path, alphabets: dict[str, int], drawings: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for name, chars in alphabets.items():
        for c in range(chars):
            folder = root / name / f"character{c + 1:02d}"
            folder.mkdir(parents=True)
            for d in range(drawings):
                Image.fromarray(_drawing(rng)).save(folder / f"{c:04d}_{d + 1:02d}.png")
    return root


def _zip_tree(tree: Path, target: Path) -> Path:
    with zipfile.ZipFile(target, "w") as zf:
        for png in sorted(tree.rglob("*.png")):
            zf.write(png, f"{tree.name}/{png.relative_to(tree)}")
    return target


def test_shared_npz_alphabets_are_clients():
    src = OmniglotSource(_needs_shared(), spec=FIVE_WAY)
    assert (src.num_clients("train"), src.num_clients("heldout")) == (30, 20)
    assert src.client_ids("train")[0] == "Arcadian" and "Tifinagh" in src.client_ids("train")
    assert "Angelic" in src.client_ids("heldout")
    greek = src.client(src.client_ids().index("Greek"))
    assert greek.x.shape == (24 * 4 * 15, 1, 28, 28) and greek.x_test.shape[0] == 24 * 4 * 5
    assert torch.unique(greek.y).tolist() == list(range(96))
    assert greek.x.min() == 0 and greek.x.max() == 1 and greek.x.mean() < 0.2  # ink is sparse
    assert greek.x[:, :, 0, :].mean() < 0.01  # the border is background
    task = sample_episode(
        src.client(0, "heldout"), FIVE_WAY, torch.Generator().manual_seed(0), held_out=True
    )
    assert task.support[0].shape == (5, 1, 28, 28) and task.query[0].shape == (25, 1, 28, 28)
    assert src.model_kwargs() == {"ways": 5, "image_size": 28}


def test_shared_zip_tree_and_npz_agree(tmp_path):
    root = _needs_shared()
    with zipfile.ZipFile(root / "images_background_small1.zip") as zf:
        zf.extractall(tmp_path)
    sources = {
        "zip": OmniglotSource(root / "images_background_small1.zip", num_heldout_clients=1),
        "tree": OmniglotSource(tmp_path, num_heldout_clients=1),
    }
    for src in sources.values():
        assert sorted(src.client_ids() + src.client_ids("heldout")) == [
            "Balinese",
            "Early_Aramaic",
            "Greek",
            "Korean",
            "Latin",
        ]
        assert src.num_clients("heldout") == 1
    npz = next(a for a in find_alphabets(root / "images_background.npz") if a.name == "Greek")
    reference = load_alphabet(npz)
    for src in sources.values():
        alphabet = src._alphabets["Greek"]
        assert alphabet.drawings == (20,) * 24
        assert torch.equal(load_alphabet(alphabet), reference)


def test_tiny_tree_zip_and_rotations(tmp_path, caplog):
    tree = _write_tree(tmp_path / "images_background", {"Alpha": 3, "Beta": 2, "Gamma": 3})
    _write_tree(tmp_path / "images_evaluation", {"Delta": 3})
    spec = EpisodeSpec(support=1, query=1, ways=5)
    with caplog.at_level(logging.WARNING):
        src = OmniglotSource(tmp_path, spec=spec, heldout_fraction=0.25)
    # Beta has 2 characters = 8 rotated classes: fits; all usable
    assert src.client_ids() == ["Alpha", "Beta", "Gamma"] and src.client_ids("heldout") == ["Delta"]
    alpha = src.client(0)
    assert alpha.x.shape == (3 * 4 * 6, 1, 28, 28) and alpha.x_test.shape == (3 * 4 * 2, 1, 28, 28)
    assert torch.bincount(alpha.y).tolist() == [6] * 12
    # class 4c + k is class 4c turned by k quarter turns, drawing by drawing
    base = alpha.x[alpha.y == 4]
    assert torch.equal(alpha.x[alpha.y == 5], torch.rot90(base, 1, dims=(-2, -1)))
    assert not torch.equal(alpha.x[alpha.y == 5], base)
    # the same drawings are held out for every rotation of a character
    assert torch.equal(
        alpha.x_test[alpha.y_test == 6],
        torch.rot90(alpha.x_test[alpha.y_test == 4], 2, dims=(-2, -1)),
    )
    # the official zip layout read directly gives the same images
    zipped = OmniglotSource(
        _zip_tree(tree, tmp_path / "images_background.zip"), num_heldout_clients=1
    )
    for name in zipped.client_ids():
        assert torch.equal(
            load_alphabet(zipped._alphabets[name]), load_alphabet(src._alphabets[name])
        )
    # too many ways for Beta (8 classes): skipped with a count in the log
    with caplog.at_level(logging.WARNING):
        fewer = OmniglotSource(tmp_path, spec=EpisodeSpec(1, 1, ways=10))
    assert fewer.client_ids() == ["Alpha", "Gamma"] and "skipped 1 of 4 alphabets" in caplog.text
    with pytest.raises(FedmamlError, match="none of the 4 alphabets"):
        OmniglotSource(tmp_path, spec=EpisodeSpec(1, 1, ways=20))


def test_rotate_classes_labels():
    x = torch.arange(2 * 9, dtype=torch.float32).view(2, 3, 3)
    rx, ry = rotate_classes(x, torch.tensor([0, 1]))
    assert rx.shape == (8, 1, 3, 3) and ry.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert torch.equal(rx[2, 0], torch.rot90(x[0], 1))


def _tiny_npz(root: Path) -> np.ndarray:
    """Two background alphabets (2 and 3 characters of 20 drawings) as npz + csv."""
    rng = np.random.default_rng(1)
    images = np.stack([np.stack([_drawing(rng) for _ in range(20)]) for _ in range(5)])
    np.savez_compressed(root / "images_background.npz", images=images, labels=np.zeros((5, 20)))
    (root / "omniglot_alphabets.csv").write_text(
        "alphabet,split,npz_first_index,npz_last_index\nOne,background,0,1\nTwo,background,2,4\n"
    )
    return images


def test_tiny_npz_with_csv_and_cache(tmp_path):
    images = _tiny_npz(tmp_path)
    src = OmniglotSource(tmp_path, num_heldout_clients=1, seed=3, cache_dir=tmp_path / "cache")
    assert sorted(src.client_ids() + src.client_ids("heldout")) == ["One", "Two"]
    two = OmniglotSource(tmp_path, num_heldout_clients=0).client(1)
    assert two.client_id == "Two" and two.x.shape[0] == 3 * 4 * 15
    cached = load_alphabet(src._alphabets["Two"], 28, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("omniglot-Two-28-*.npy"))) == 1
    again = load_alphabet(src._alphabets["Two"], 28, tmp_path / "cache")
    assert torch.allclose(cached, again, atol=1e-3)
    # area averaging keeps the amount of ink: sum(ink at 28) * (105 / 28)^2 ~ ink pixels at 105
    ink_pixels = float((~images[2, 0]).sum())
    assert abs(float(cached[0].sum()) * (105 / 28) ** 2 - ink_pixels) / ink_pixels < 0.05


def test_cache_dir_run_config_key_reaches_the_loader(tmp_path):
    from fedmaml.config import RunConfig
    from fedmaml.tasks.registry import open_source

    _tiny_npz(tmp_path)
    cache = tmp_path / "cache"
    cfg = RunConfig.from_mapping(
        {
            "task": "omniglot",
            "data-path": str(tmp_path),
            "cache-dir": str(cache),
            "num-train-clients": 2,
            "min-train-nodes": 2,
            "num-heldout-clients": 0,
            "ways": 5,
            "support-size": 1,
            "query-size": 1,
        }
    )
    src = open_source(cfg)
    src.client(0)
    assert len(list(cache.glob("omniglot-*-28-*.npy"))) == 1


@pytest.mark.parametrize(
    ("setup", "needle"),
    [
        ("missing", "no such file or folder"),
        ("empty_dir", "no Omniglot alphabets found"),
        ("corrupt_zip", "not a readable zip"),
        ("zip_no_pngs", "no <Alphabet>/<character>/"),
        ("npz_no_csv", "not the official 964"),
        ("corrupt_npz", "cannot read the npz"),
        ("bad_png", "not a readable PNG"),
        ("text_file", "not an Omniglot source"),
    ],
)
def test_bad_input(tmp_path, setup, needle):
    path = tmp_path / "data"
    if setup == "empty_dir":
        path.mkdir()
    elif setup == "corrupt_zip":
        path = tmp_path / "images_background.zip"
        path.write_bytes(b"PK\x03\x04 not really a zip")
    elif setup == "zip_no_pngs":
        path = tmp_path / "images_background.zip"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("readme.txt", "hello")
    elif setup == "npz_no_csv":
        path = tmp_path / "images_background.npz"
        np.savez_compressed(path, images=np.ones((3, 20, 8, 8), dtype=bool))
    elif setup == "corrupt_npz":
        path = tmp_path / "images_background.npz"
        path.write_bytes(b"garbage")
    elif setup == "bad_png":
        _write_tree(path, {"Alpha": 2}, drawings=2)
        (path / "Alpha" / "character01" / "0000_01.png").write_bytes(b"not a png")
    elif setup == "text_file":
        path = tmp_path / "data.txt"
        path.write_text("x")
    with pytest.raises(FedmamlError, match=needle):
        src = OmniglotSource(path, num_heldout_clients=0)
        src.client(0)


def test_duplicate_alphabets_and_download_needs_consent(tmp_path):
    _write_tree(tmp_path / "images_background_small1", {"Greek": 2}, drawings=4)
    _write_tree(tmp_path / "images_background_small2", {"Greek": 2}, drawings=4)
    with pytest.raises(FedmamlError, match="alphabet Greek found twice"):
        OmniglotSource(tmp_path)
    with pytest.raises(FedmamlError, match="allow_download=True"):
        download_omniglot(tmp_path / "omniglot")
    assert not (tmp_path / "omniglot").exists()


def test_open_source_omniglot(tmp_path):
    from fedmaml.config import RunConfig
    from fedmaml.tasks.registry import open_source

    _write_tree(tmp_path / "images_background", {"Alpha": 2, "Beta": 2}, drawings=4)
    _write_tree(tmp_path / "images_evaluation", {"Gamma": 2}, drawings=4)
    cfg = RunConfig(
        task="omniglot",
        data_path=str(tmp_path),
        num_train_clients=2,
        num_heldout_clients=1,
        ways=5,
        support_size=1,
        query_size=2,
    )
    src = open_source(cfg)
    assert (src.client_ids(), src.client_ids("heldout")) == (["Alpha", "Beta"], ["Gamma"])
    with pytest.raises(FedmamlError, match="has 2 usable; lower num-train-clients to 2"):
        open_source(cfg.replace(num_train_clients=3))
    assert src.model_kwargs()["ways"] == 5
    with pytest.raises(FedmamlError, match="no such file or folder"):
        open_source(cfg.replace(data_path=str(tmp_path / "absent")))
