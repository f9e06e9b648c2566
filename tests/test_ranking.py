"""Ranking backbones without fine-tuning: the transferability estimators
against their formulas computed naively, and rank_backbones / kerastl rank."""

import json
from pathlib import Path

import keras
import numpy as np
import pytest

import kerastl
from kerastl import cli
from kerastl.analysis import rank_backbones
from kerastl.features import transferability as T

from conftest import small_cnn, write_folder


def problem(n=60, d=12, classes=3, seed=0, signal=1.5):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    y[:classes] = np.arange(classes)  # every class present
    f = rng.normal(size=(n, d))
    f[:, :classes] += signal * np.eye(classes)[y]
    return f, y


def source_predictions(y, source_classes=5, seed=0):
    """Softmax rows of a source classifier loosely tied to the labels."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(y), source_classes))
    logits[np.arange(len(y)), y % source_classes] += 2.0
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True)


# -- each estimator against its formula ---------------------------------------

@pytest.mark.parametrize("shape,dead", [((60, 12), False), ((20, 50), False),
                                        ((60, 12), True)],
                         ids=["n>d", "n<d", "dead units"])
def test_logme_is_the_log_evidence_at_a_fixed_point(shape, dead):
    f, y = problem(*shape, signal=4.0)
    if dead:  # units that never fire and a duplicated one: F'F is singular
        f[:, -3:-1] = 0.0
        f[:, -1] = f[:, 0]
    score, details = T.logme(f, y, return_details=True)
    n = len(f)
    naive = []
    for k in range(3):
        t = (y == k).astype(float)
        alpha, beta = details["alpha"][k], details["beta"][k]
        # The marginal of t = F w + e: N(0, I / beta + F F' / alpha).
        cov = np.eye(n) / beta + f @ f.T / alpha
        _, logdet = np.linalg.slogdet(cov)
        naive.append(-0.5 * (n * np.log(2 * np.pi) + logdet
                             + t @ np.linalg.solve(cov, t)) / n)
        if n < f.shape[1]:
            continue  # t can be interpolated: beta grows without bound
        # ... and (alpha, beta) is MacKay's fixed point of that evidence.
        a = alpha * np.eye(f.shape[1]) + beta * f.T @ f
        m = beta * np.linalg.solve(a, f.T @ t)
        gamma = f.shape[1] - alpha * np.trace(np.linalg.inv(a))
        np.testing.assert_allclose(alpha, gamma / (m @ m), rtol=1e-5)
        np.testing.assert_allclose(
            beta, (n - gamma) / np.sum((t - f @ m) ** 2), rtol=1e-5)
    np.testing.assert_allclose(details["evidence"], naive, rtol=1e-6)
    np.testing.assert_allclose(score, np.mean(naive), rtol=1e-6)


def test_h_score_against_its_formula_and_ledoit_wolf_against_sklearn():
    from sklearn.covariance import ledoit_wolf

    f, y = problem()
    n = len(f)
    centred = f - f.mean(0)
    cov = centred.T @ centred / n
    class_mean = np.stack([centred[y == y[i]].mean(0) for i in range(n)])
    between = class_mean.T @ class_mean / n
    np.testing.assert_allclose(
        T.h_score(f, y, shrinkage=None),
        np.trace(np.linalg.pinv(cov) @ between), rtol=1e-6)
    shrunk, a = ledoit_wolf(f)
    ours_a, ours_cov = T.ledoit_wolf_shrinkage(f)
    np.testing.assert_allclose(ours_a, a, rtol=1e-6)
    np.testing.assert_allclose(ours_cov, shrunk, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(
        T.h_score(f, y), np.trace(np.linalg.inv(shrunk) @ ((1 - a) * between)),
        rtol=1e-6)


def test_leep_and_nce_against_their_formulas():
    _, y = problem()
    theta = source_predictions(y)
    n, classes, source = len(y), 3, theta.shape[1]
    joint = np.array([[sum(theta[i, z] for i in range(n) if y[i] == c) / n
                       for z in range(source)] for c in range(classes)])
    leep = np.mean([np.log(sum(joint[y[i], z] / joint[:, z].sum()
                               * theta[i, z] for z in range(source)))
                    for i in range(n)])
    np.testing.assert_allclose(T.leep(theta, y), leep, rtol=1e-6)
    z = theta.argmax(1)
    hard = np.array([[np.sum((y == c) & (z == s)) / n for s in range(source)]
                     for c in range(classes)])
    nce = sum(hard[c, s] * np.log(hard[c, s] / hard[:, s].sum())
              for c in range(classes) for s in range(source) if hard[c, s])
    np.testing.assert_allclose(T.nce(theta, y), nce, rtol=1e-6)


def test_every_estimator_ignores_the_order_of_samples():
    f, y = problem()
    theta = source_predictions(y)
    order = np.random.default_rng(1).permutation(len(y))
    for name, (fn, takes) in T.ESTIMATORS.items():
        x = theta if takes == "source" else f
        np.testing.assert_allclose(fn(x[order], y[order]), fn(x, y),
                                   rtol=1e-9, err_msg=name)


def test_labels_of_any_values_give_the_same_score():
    f, y = problem()
    names = np.array(["cat", "dog", "emu"])[y]
    assert T.logme(f, names) == pytest.approx(T.logme(f, y), rel=1e-12)


def test_a_single_class_or_too_few_samples_is_a_clear_error():
    f, y = problem()
    for name, (fn, takes) in T.ESTIMATORS.items():
        x = source_predictions(y) if takes == "source" else f
        with pytest.raises(kerastl.KerastlError, match="at least two classes"):
            fn(x, np.zeros(len(y)))
        with pytest.raises(kerastl.KerastlError,
                           match="more samples than classes"):
            fn(x[:3], np.arange(3))
    with pytest.raises(kerastl.KerastlError, match="softmax"):
        T.leep(f, y)  # features are not probabilities


# -- rank_backbones ---------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    x, y = kerastl.datasets.digits("train")
    import tensorflow as tf

    return tf.image.resize(x[:240], (32, 32)).numpy(), y[:240]


@pytest.fixture(scope="module")
def pretrained():
    return kerastl.pretrained.small_cnn()


def test_a_pretrained_backbone_ranks_above_random_ones(digits, pretrained,
                                                       tmp_path):
    keras.utils.set_random_seed(0)
    cache = kerastl.FeatureCache(str(tmp_path / "cache"))
    candidates = {"pretrained": pretrained, "random": small_cnn(width=8),
                  "missing": str(tmp_path / "missing.keras")}
    ranking = rank_backbones(candidates, digits,
                             method=["logme", "h_score", "linear_probe"],
                             cache=cache, verbose=0)
    assert ranking.best["model"] == "pretrained"
    scored = {r["model"]: r["scores"] for r in ranking if not r["skipped"]}
    # Every method agrees here, the probe's accuracy included.
    for method in ("logme", "h_score", "linear_probe"):
        assert scored["pretrained"][method] > scored["random"][method], method
    assert scored["pretrained"]["linear_probe"] > 0.8
    skipped = [r for r in ranking if r["skipped"]]
    assert [r["model"] for r in skipped] == ["missing"]
    assert "does not exist" in skipped[0]["skipped"]
    assert "recommended: pretrained" in str(ranking)
    # A second ranking on the same data reads the features from the cache.
    hits = cache.hits
    again = rank_backbones({"pretrained": pretrained}, digits, cache=cache,
                           verbose=0)
    assert cache.hits == hits + 1
    assert again[0]["score"] == pytest.approx(scored["pretrained"]["logme"])


def test_blocks_are_ranked_and_leep_needs_the_source_classifier(
        digits, pretrained):
    ranking = rank_backbones([pretrained], digits, blocks=True, verbose=0)
    order = kerastl.block_map(pretrained).base_blocks
    assert sorted(r["block"] for r in ranking) == sorted(order)
    assert ranking.blocks == {ranking[0]["model"]: list(order)}
    assert ranking.freeze_up_to in order[:-1]
    assert len({r["score"] for r in ranking}) == len(ranking)
    skipped = rank_backbones([pretrained], digits, method="leep",
                             verbose=0)[0]["skipped"]
    assert "source classifier" in skipped
    # A classifier with a softmax head: LEEP and NCE from its predictions,
    # LogME from the features before its head.
    classifier = kerastl.build_classifier(pretrained, 10, freeze=None)
    row = rank_backbones([classifier], digits, method=["leep", "nce",
                                                       "logme"],
                         verbose=0)[0]
    assert row["skipped"] is None
    assert row["scores"]["leep"] <= 0 and row["scores"]["nce"] <= 0
    assert row["scores"]["logme"] == pytest.approx(
        rank_backbones([pretrained], digits, verbose=0)[0]["score"])


def test_the_cut_to_fine_tune_is_the_best_block_but_never_the_last():
    from kerastl.analysis import BackboneRanking

    def ranking(scores, order=("b1", "b2", "b3")):
        rows = [dict(model="m", block=b, scores={"logme": v}, score=v,
                     seconds=0.0, skipped=None) for b, v in scores.items()]
        return BackboneRanking(rows, ["logme"], {"m": list(order)})

    assert ranking({"b1": 0.1, "b2": 0.5, "b3": 0.2}).freeze_up_to == "b2"
    # The last block first: freezing it too would leave only the head.
    last = ranking({"b1": 0.1, "b2": 0.2, "b3": 0.9})
    assert last.best["block"] == "b3" and last.freeze_up_to == "b2"
    assert last.to_dict()["best"]["freeze_up_to"] == "b2"
    assert "freeze up to b2" in str(last) and "--freeze-up-to b2" in str(last)
    assert ranking({"b1": 0.3}, order=("b1",)).freeze_up_to is None
    assert BackboneRanking([], ["logme"]).freeze_up_to is None


def test_max_samples_ranks_on_a_subset_that_only_it_passes_through(
        digits, pretrained, monkeypatch):
    """The subset is taken before the models run (a forward pass per
    image ranked, not per image given) and scores what ranking the same
    images directly scores."""
    x, y = digits
    seen, given = [], []
    real = kerastl.analysis.extract_features

    def counting(model, data, **kwargs):
        seen.append(len(data[0]))
        given.append(data)
        return real(model, data, **kwargs)

    monkeypatch.setattr(kerastl.analysis, "extract_features", counting)
    ranking = rank_backbones([pretrained], (x, y), max_samples=50, seed=3,
                             verbose=0)
    n = seen[0]
    assert seen == [n] and 45 <= n <= 55
    assert ranking.samples == (n, len(y))
    assert f"ranked on {n} of the {len(y)} labelled" in str(ranking)
    # Classes in proportion, and images of the data with their labels.
    xs, ys = given[0]
    assert abs(np.bincount(ys, minlength=10) / n -
               np.bincount(y, minlength=10) / len(y)).max() < 0.03
    index = {x[i].tobytes(): y[i] for i in range(len(y))}
    assert all(index[a.tobytes()] == b for a, b in zip(xs, ys))
    direct = rank_backbones([pretrained], (xs, ys), max_samples=None,
                            verbose=0)
    assert ranking[0]["score"] == pytest.approx(direct[0]["score"],
                                                rel=1e-6)
    assert direct.samples is None
    # "auto": 30 per class, at least 300: all 240 images here.
    seen.clear()
    assert rank_backbones([pretrained], (x, y), verbose=0).samples is None
    assert seen == [len(y)]
    with pytest.raises(kerastl.KerastlError, match="max_samples=1"):
        rank_backbones([pretrained], (x, y), max_samples=1)


def test_a_subset_of_a_folder_or_a_dataset_is_the_same_images(tmp_path,
                                                              pretrained):
    """Folders are cut by links to the chosen files (each model reads them
    at its own size; the links go afterwards), datasets by position."""
    import tensorflow as tf

    from kerastl.features.extract import data_labels, labelled_subset

    folder = write_folder(tmp_path / "images", per_class=9, size=32)
    every, labels = kerastl.extract_features(
        pretrained, str(folder), return_labels=True, verbose=0)
    assert np.array_equal(data_labels(str(folder)), labels)
    keep = [0, 4, 9, 10, 17]
    with labelled_subset(str(folder), keep) as part:
        features, part_labels = kerastl.extract_features(
            pretrained, part, return_labels=True, verbose=0)
        links = part
    assert not Path(links).exists()
    np.testing.assert_allclose(features, every[keep], rtol=1e-5, atol=1e-6)
    assert np.array_equal(part_labels, labels[keep])
    x = np.random.default_rng(0).uniform(0, 255, (12, 32, 32, 3))
    y = np.arange(12) % 3
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
    assert np.array_equal(data_labels(ds), y)
    with labelled_subset(ds, [1, 5, 11]) as part:
        features, part_labels = kerastl.extract_features(
            pretrained, part, return_labels=True, verbose=0)
    np.testing.assert_allclose(
        features, kerastl.extract_features(pretrained, x[[1, 5, 11]],
                                           verbose=0), rtol=1e-5, atol=1e-6)
    assert list(part_labels) == [1, 2, 2]
    # A dataset that reshuffles on every pass: the subset is taken once,
    # so every model scores the same images.
    shuffled = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(12)
    with labelled_subset(shuffled, [0, 1, 2, 3]) as part:
        assert isinstance(part, tuple) and len(part[0]) == 4
    # Interrupted inside the block: the temporary folder goes, and every
    # image of the user's folder stays (the links are removed, not what
    # they point to).
    before = sorted(str(p) for p in folder.rglob("*.png"))
    with pytest.raises(KeyboardInterrupt):
        with labelled_subset(str(folder), keep) as part:
            links = part
            raise KeyboardInterrupt
    assert not Path(links).exists()
    assert sorted(str(p) for p in folder.rglob("*.png")) == before
    # Images without class subfolders have no labels to rank on.
    flat = tmp_path / "flat"
    flat.mkdir()
    keras.utils.save_img(str(flat / "a.png"), np.zeros((8, 8, 3)))
    assert data_labels(str(flat)) is None


def test_bad_method_is_a_clear_error(digits, pretrained):
    with pytest.raises(kerastl.KerastlError, match="logme"):
        rank_backbones([pretrained], digits, method="logm")


# -- kerastl rank ---------------------------------------------------------------------

def test_rank_command_skips_what_cannot_load_and_prints_json(
        tmp_path, capsys, pretrained):
    images = write_folder(tmp_path / "images", per_class=12, size=32)
    pretrained.save(tmp_path / "mine.keras")
    code = cli.main(["rank", "--data", str(images), "--models",
                     f"{tmp_path / 'mine.keras'},mobilenet_v9", "--json",
                     "--cache", str(tmp_path / "cache")])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)  # stdout is the JSON only
    assert result["best"]["model"].endswith("mine.keras")
    skipped = [r for r in result["rows"] if r["skipped"]]
    assert skipped[0]["model"] == "mobilenet_v9"
    assert "Unknown model 'mobilenet_v9'" in skipped[0]["skipped"]
    assert "[2/2] mobilenet_v9: skipped: Unknown model" in err
    assert "Traceback" not in err
    # --max-samples takes auto, all or a count; anything else is refused.
    code = cli.main(["rank", "--data", str(images), "--models",
                     str(tmp_path / "mine.keras"), "--max-samples", "10",
                     "--no-cache"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "ranked on 10 of the 24 labelled images" in out
    with pytest.raises(SystemExit):
        cli.main(["rank", "--data", str(images), "--models", "x",
                  "--max-samples", "1"])
    assert "--max-samples: '1': expected auto, all, or a number of images" \
        in capsys.readouterr().err
    for flag, value, message in (
            ("--method", "foo", "--method: 'foo': expected one or more of "
                                "logme, h_score"),
            ("--input-size", "-4", "--input-size: '-4': expected a whole "
                                   "number >= 1")):
        with pytest.raises(SystemExit):
            cli.main(["rank", "--data", str(images), "--models", "x", flag,
                      value])
        assert message in capsys.readouterr().err
    # Neither --models nor --family: one line naming both.
    code = cli.main(["rank", "--data", str(images)])
    assert code == 2
    assert "--models a,b,c, --family NAME" in capsys.readouterr().err


def test_the_cross_validated_probe_is_linear_probes_model_in_numpy():
    """rank_backbones' linear-probe baseline trains LinearProbe's softmax
    probe in NumPy (seconds for many candidates instead of minutes): on
    the same features it predicts as the Keras probe does."""
    from kerastl.features.probes import softmax_probe

    f, y = problem(n=200, d=32, classes=4, seed=1, signal=2.0)
    ft, yt = problem(n=400, d=32, classes=4, seed=2, signal=2.0)
    # One batch per epoch (no order to differ) from the same start: the
    # Keras probe's steps, in float64.
    probe = kerastl.LinearProbe(epochs=60, batch_size=len(f))
    model = probe.build_model(32, 4, f.mean(0), f.var(0) + 1e-6)
    start = [w.numpy() for w in model.trainable_weights]
    model.compile(keras.optimizers.Adam(1e-2),
                  "sparse_categorical_crossentropy")
    model.fit(f, y, batch_size=len(f), epochs=60, verbose=0)
    expected = model.predict(ft, verbose=0)
    ours = softmax_probe(f, y, ft, 4, batch_size=len(f), initial=start)
    assert np.mean(ours == expected.argmax(1)) > 0.99
    assert np.mean(ours == yt) > 0.45  # it learned (chance: 0.25)
    # Its own start and shuffled batches: not less accurate than
    # LinearProbe's.
    keras.utils.set_random_seed(0)
    ours = softmax_probe(f, y, ft, 4, batch_size=64)
    theirs = kerastl.LinearProbe(epochs=60, batch_size=64).fit(f, y)
    assert np.mean(ours == yt) >= theirs.score(ft, yt) - 0.03


# -- kerastl rank --all-cached ----------------------------------------------------

def _empty_caches(tmp_path, monkeypatch):
    """Every weights cache kerastl looks in, empty, under tmp_path."""
    from kerastl.zoo import offline

    models = tmp_path / "keras_home" / "models"
    models.mkdir(parents=True)
    monkeypatch.setattr(offline, "keras_cache_dirs", lambda: [str(models)])
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "tfhub"))
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    return models


def test_all_cached_lists_the_zoo_entries_whose_weights_are_on_disk(
        tmp_path, monkeypatch):
    import hashlib

    from kerastl.zoo import zoo_entry
    from kerastl.zoo.offline import cached_configs

    models = _empty_caches(tmp_path, monkeypatch)
    assert cached_configs() == []
    for name in ("resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
                 "mobilenet_1_0_224_tf_no_top.h5",
                 "efficientnetv2-b0_notop.h5",
                 "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
                 # with the ImageNet classifier: not what kerastl loads
                 "resnet50_weights_tf_dim_ordering_tf_kernels.h5",
                 # other widths than the zoo's MobileNets (alpha 1.0)
                 "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224"
                 "_no_top.h5",
                 "weights_mobilenet_v3_large_224_0.75_float_no_top_v2.h5"):
        (models / name).write_bytes(b"")
    hub = zoo_entry("hub_resnet_v2_50")
    saved = tmp_path / "tfhub" / hashlib.sha1(
        hub.handle.encode("utf8")).hexdigest()
    saved.mkdir(parents=True)
    (saved / "saved_model.pb").write_bytes(b"")
    # A KerasHub preset counts once its weights arrived, not its config.
    from kerastl.zoo import kerashub

    preset = Path(kerashub.kaggle_cache(kerashub.builtin_presets()[
        zoo_entry("kerashub_resnet_50").preset]))
    preset.mkdir(parents=True)
    (preset / "config.json").write_text("{}")
    assert "kerashub_resnet_50" not in [c.name for c in cached_configs()]
    (preset / "model.weights.h5").write_bytes(b"")
    names = [c.name for c in cached_configs()]
    # ResNet50V2's file is not ResNet50's; MobileNet's is not MobileNetV2's.
    assert names == ["efficientnet_v2_b0", "hub_resnet_v2_50",
                     "kerashub_resnet_50", "mobilenet",
                     "mobilenet_v3_small", "resnet50_v2"]


def test_rank_all_cached_ranks_what_the_cache_holds(tmp_path, monkeypatch,
                                                  capsys):
    models = _empty_caches(tmp_path, monkeypatch)
    images = write_folder(tmp_path / "images", per_class=8, size=32)
    args = ["rank", "--data", str(images), "--all-cached", "--no-cache",
            "--input-size", "96"]
    code = cli.main(args)
    err = capsys.readouterr().err
    assert code == 2 and "--all-cached: no zoo model has its pretrained " \
        "weights on this machine" in err and "--models" in err
    (models / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_"
              "top.h5").write_bytes(b"")
    cli.main(args + ["--json"])
    out, err = capsys.readouterr()
    assert [r["model"] for r in json.loads(out)["rows"]] == ["mobilenet_v2"]
    assert "[1/1] mobilenet_v2" in err and "Traceback" not in err
    code = cli.main(args + ["--family", "resnet"])
    assert code == 2
    assert "no zoo model of --family resnet" in capsys.readouterr().err
