"""The procedural shapes32 set: deterministic, its factors exact, held-out draws disjoint."""

import numpy as np
import pytest
import torch

from unstir import data


def test_shapes32_is_deterministic_and_its_factors_are_exact():
    """Same seed, same images; each image's covered area (pixel values over the colour) is the shape's
    exact area pi r^2 to within the 4 x 4 supersampling's edge error (measured at most 5.3%, for the
    smallest axis-aligned squares), its colour is the labelled one (an
    image that cut a shape off would lose area)."""
    d, f = data.shapes32(600, 5, return_factors=True)
    again = data.shapes32(600, 5)
    assert torch.equal(d.x, again.x) and torch.equal(d.labels, again.labels)
    assert d.shape == (3, 32, 32) and d.levels == 256 and d.num_classes == 18
    assert torch.equal(d.labels, torch.as_tensor(6 * f["shape"] + f["colour"]))
    pixels = ((d.x + 1) * 127.5).round().double()  # 8-bit values
    colours = torch.tensor(data.COLOURS, dtype=torch.float64)[torch.as_tensor(f["colour"])]
    area = (pixels.sum(1) / colours.sum(1)[:, None, None]).sum((1, 2)).numpy()
    assert np.abs(area / (np.pi * f["r"] ** 2) - 1).max() < 0.07
    brightest = pixels.flatten(2).argmax(2)  # a fully covered pixel carries the colour itself
    full = pixels.flatten(2).gather(2, brightest[:, :, None])[..., 0]
    assert (full - colours).abs().max() <= 0.5
    assert set(np.unique(f["shape"])) == {0, 1, 2} and set(np.unique(f["colour"])) == set(range(6))


def test_shapes32_held_out_draws_are_not_the_training_draws():
    train, test = data.load("shapes32", n=500), data.load("shapes32-test", n=500)
    assert train.name == "shapes32" and test.name == "shapes32-test"
    assert not (train.x[:, None] == test.x[None]).flatten(2).all(2).any()


def test_shapes32_bad_input():
    with pytest.raises(ValueError, match="n must be a positive integer, got 0"):
        data.shapes32(0)


def test_patches32_train_and_test_come_from_disjoint_columns(monkeypatch):
    import sklearn.datasets
    from types import SimpleNamespace

    real = data.load("patches32", n=40, seed=3)
    assert real.shape == (3, 32, 32) and real.levels == 256 and set(real.labels.tolist()) == {0, 1}
    torch.testing.assert_close(real.x, data.load("patches32", n=40, seed=3).x, rtol=0, atol=0)
    assert not torch.equal(real.x, data.load("patches32", n=40, seed=4).x)
    # Photographs whose red channel is the column (rounded 255 col / 639): column 479 reads 191, column 480
    # reads 192, at full and half scale alike, so the red channel tells which side of the split a patch is on.
    cols = np.rint(np.arange(640) * 255 / 639).astype(np.uint8)
    photo = np.zeros((427, 640, 3), np.uint8)
    photo[:, :, 0] = cols
    monkeypatch.setattr(sklearn.datasets, "load_sample_images", lambda: SimpleNamespace(images=[photo, photo]))
    red = lambda spec: data.from_unit_range(data.load(spec, n=2000, seed=0).x[:, 0])
    train, test = red("patches32"), red("patches32-test")
    assert train.max() == 191 and test.min() == 192 and train.min() == 0 and test.max() == 255
