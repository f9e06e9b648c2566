"""Linear CKA, CKA by block and the transfer-depth sweep."""

import keras
import numpy as np
import pytest
from scipy.stats import ortho_group

import kerastl
from kerastl.errors import KerastlError


@pytest.fixture
def reference():
    np.random.seed(1337)
    x = np.random.randn(100, 10)
    y = np.random.randn(100, 10) + x
    return x, y


def test_linear_cka_matches_the_reference_notebook(reference):
    x, y = reference
    assert kerastl.analysis.linear_cka(x, y) == pytest.approx(0.55761, abs=5e-6)
    assert kerastl.analysis.linear_cka(x, y, debiased=True) == pytest.approx(
        0.51346, abs=5e-6)


@pytest.mark.parametrize("debiased", [False, True])
def test_linear_cka_invariances(reference, debiased):
    x, y = reference
    assert kerastl.analysis.linear_cka(x, x, debiased) == pytest.approx(1.0)
    base = kerastl.analysis.linear_cka(x, y, debiased)
    q = ortho_group.rvs(10, random_state=0)
    assert kerastl.analysis.linear_cka(x @ q, y, debiased) == pytest.approx(base)
    assert kerastl.analysis.linear_cka(7.5 * x, y, debiased) == pytest.approx(base)
    assert kerastl.analysis.linear_cka(x + 3.0, y, debiased) == pytest.approx(base)
    # Not invariant to arbitrary invertible linear maps: a real test.
    a = np.diag(np.arange(1, 11) ** 2.0)
    assert kerastl.analysis.linear_cka(x @ a, y, debiased) != pytest.approx(base,
                                                                   abs=1e-3)


def test_linear_cka_errors():
    with pytest.raises(KerastlError, match="same examples"):
        kerastl.analysis.linear_cka(np.ones((5, 2)), np.ones((6, 2)))
    with pytest.raises(KerastlError, match="at least 4"):
        kerastl.analysis.linear_cka(np.ones((3, 2)), np.ones((3, 2)), debiased=True)


def cnn(seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    for i, filters in enumerate((4, 8, 8)):
        x = keras.layers.Conv2D(filters, 3, padding="same",
                                name=f"conv{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
        x = keras.layers.MaxPooling2D(name=f"pool{i}")(x)
    return keras.Model(inputs, x, name="cnn")


def test_cka_by_block(tmp_path):
    x = np.random.default_rng(0).uniform(0, 255, (64, 16, 16, 3))
    a = cnn(0)
    same = kerastl.analysis.cka_by_block(a, a, x)
    blocks = kerastl.block_map(a).names
    assert same.blocks_a == blocks and same.matrix.shape == (len(blocks),) * 2
    np.testing.assert_allclose(np.diag(same.matrix), 1.0, rtol=1e-6)
    # The same architecture with other weights: below 1 somewhere, and the
    # identical copy (a clone with a's weights) gives 1 on the diagonal.
    other = kerastl.analysis.cka_by_block(a, cnn(1), x)
    assert min(other.diagonal().values()) < 0.99
    clone = cnn(1)
    clone.set_weights(a.get_weights())
    np.testing.assert_allclose(
        list(kerastl.analysis.cka_by_block(a, clone, x).diagonal().values()), 1.0,
        rtol=1e-6)
    assert blocks[0] in str(other)
    pytest.importorskip("matplotlib")
    other.plot(tmp_path / "cka.png")
    assert (tmp_path / "cka.png").stat().st_size > 0


def separable_images(n_per_class, seed):
    """Three classes told apart by colour: easy for any small CNN."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n_per_class)
    x = rng.uniform(0, 60, (len(y), 16, 16, 3))
    x[np.arange(len(y)), :, :, y] += 180
    return x.astype("float32"), y


def test_transfer_depth_sweep_restores_the_backbone(tmp_path):
    backbone = cnn(0)
    before = [w.copy() for w in backbone.get_weights()]
    train = separable_images(8, 0)
    val = separable_images(10, 1)
    sweep = kerastl.analysis.transfer_depth_sweep(
        backbone, train, val, depths=[0, 3], train_sizes=[2, 8],
        epochs=15, batch_size=8, optimizer=lambda: keras.optimizers.Adam(1e-2))
    assert len(sweep) == 4
    assert {(r["train_size"], r["frozen"]) for r in sweep} == {
        (2, 0), (2, 3), (8, 0), (8, 3)}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in sweep)
    # Runs start from the given weights; the backbone is left as it was.
    for w0, w1 in zip(before, backbone.get_weights()):
        np.testing.assert_array_equal(w0, w1)
    assert all(l.trainable for l in backbone.layers)
    assert max(r["accuracy"] for r in sweep if r["train_size"] == 8) > 0.9
    assert set(sweep.best()) == {2, 8}
    assert "best" in str(sweep)
    pytest.importorskip("matplotlib")
    sweep.plot(tmp_path / "depth.png")
    assert (tmp_path / "depth.png").stat().st_size > 0


def test_sweep_errors():
    with pytest.raises(KerastlError, match="depths go from"):
        kerastl.analysis.transfer_depth_sweep(cnn(0), separable_images(2, 0),
                                     separable_images(2, 1), depths=[9])
    with pytest.raises(KerastlError, match="per class"):
        kerastl.analysis.transfer_depth_sweep(cnn(0), separable_images(2, 0),
                                     separable_images(2, 1), depths=[0],
                                     train_sizes=[5])
