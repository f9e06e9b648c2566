"""Parameter-efficient fine-tuning by block (kerastl.peft): LoRA through
Keras's enable_lora, bias-only and norm-only tuning, merging for serving,
and .keras files that resume exactly."""

import json

import keras
import numpy as np
import pytest

import kerastl
from kerastl import peft
from kerastl.errors import BlockError, KerastlError

from conftest import (M_LOW, save_load_and_resume, small_cnn,
                      step_with_references, two_block_model, write_folder)

# The KerasHub ViT fixture is session-scoped in its worker.
pytestmark = pytest.mark.xdist_group("kerashub")


def _data(n=16, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.uniform(0, 255, (n, size, size, 3)).astype("float32"),
            np.arange(n) % 3)


def _cnn_classifier(seed=0):
    keras.utils.set_random_seed(seed)
    return kerastl.build_classifier(small_cnn(32, 8), 3, dropout=0.0, seed=seed)


def _snapshot(model):
    return {v.path: np.array(v.numpy()) for v in model.weights}


def _moved(model, before):
    return {v.path for v in model.weights
            if not np.array_equal(v.numpy(), before[v.path])}


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """A small KerasHub ViT saved as a local preset folder."""
    from test_kerashub import _families

    backbone, converter, blocks = _families()["vit"]
    folder = str(tmp_path_factory.mktemp("peft_vit") / "vit")
    backbone().save_to_preset(folder)
    converter().save_to_preset(folder)
    return folder, blocks


def test_lora_trains_only_its_factors_and_the_head():
    model = _cnn_classifier()
    x, y = _data()
    reference = model.predict(x, verbose=0)
    names = kerastl.lora(model, rank=2)
    convs = [l.name for l in model.layers
             if isinstance(l, keras.layers.Conv2D)]
    assert len(convs) == 2 and names == convs
    # B starts at zero: the model computes what it computed before.
    np.testing.assert_array_equal(model.predict(x, verbose=0), reference)
    before = _snapshot(model)
    history = kerastl.fine_tune(model, (x, y), strategy="lora", head_epochs=0,
                                epochs=2, batch_size=8,
                                optimizer=keras.optimizers.Adam(1e-2))
    moved = _moved(model, before)
    factors = {f"{n}/lora_kernel_{ab}" for n in names for ab in "ab"}
    assert moved == factors | {"head_predictions/kernel",
                               "head_predictions/bias"}
    # Nothing is frozen before the first LoRA block: no prefix to cache.
    assert history.fine_tune.boundary_cache != "used"


def test_lora_on_keras_applications_blocks_and_the_boundary_cache():
    backbone = kerastl.load_backbone("mobilenet_v2", weights=None,
                                     input_shape=(32, 32, 3))
    model = kerastl.build_classifier(backbone, 3, dropout=0.0, seed=0)
    kerastl.lora(model, rank=4, blocks="stage4:")
    bm = kerastl.block_map(model)
    assert bm.validate() == []
    layers = peft.lora_layers(model)
    # Keras has no enable_lora for depthwise convolutions: left frozen.
    assert {type(l).__name__ for l in layers} == {"Conv2D"}
    for layer in layers:
        block = bm.block_of(layer.name)
        assert block in ("stage4", "top")
        for v in (layer.lora_kernel_a, layer.lora_kernel_b):
            # Exactly one block owns each factor: its layer's.
            owners = [b for b in bm.names
                      if any(v is w for w in bm.variables(b))]
            assert owners == [block], (v.path, owners)
    x, y = _data(8)
    before = _snapshot(model)
    history = kerastl.fine_tune(
        model, (x, y), strategy="lora", freeze_up_to="stage3", lora_rank=4,
        head_epochs=0, epochs=1, batch_size=4, check_features=False,
        multipliers=kerastl.LayerDecay(0.7))
    assert history.fine_tune.boundary_cache == "used"
    moved = _moved(model, before)
    assert moved and all("lora_kernel" in p or p.startswith("head")
                         for p in moved), sorted(moved)


def test_lora_on_a_kerashub_vit_targets_attention_and_resumes(vit, tmp_path):
    folder, blocks = vit
    model = kerastl.build_classifier(kerastl.load_backbone(folder), 3,
                                     dropout=0.0, seed=0)
    kerastl.lora(model, rank=2)
    layers = peft.lora_layers(model)
    bm = kerastl.block_map(model)
    assert bm.validate() == []
    by_block = {}
    for layer in layers:
        by_block.setdefault(bm.block_of(layer.weights[0]), []).append(layer)
    # Hu et al.'s (and PEFT's) choice for ViT: query and value projections
    # in the transformer layers; every supported layer elsewhere (the patch
    # convolution and the position embedding).
    for block in ("layer0", "layer1", "layer2"):
        assert sorted(l.name for l in by_block[block]) == ["query", "value"]
        assert {type(l).__name__ for l in by_block[block]} == {"EinsumDense"}
    assert sorted(type(l).__name__ for l in by_block["embed"]) == \
        ["Conv2D", "Embedding"]
    # Only the factors and the head train: not the class token either.
    trained = [v.path for v in model.trainable_weights]
    assert all("lora_" in p or p.startswith("head_") for p in trained), \
        trained
    x, y = _data(8)
    kerastl.fine_tune(model, (x, y), strategy="lora", lora_rank=2,
                      head_epochs=0, epochs=1, batch_size=4,
                      optimizer=keras.optimizers.AdamW(1e-2),
                      check_features=False)
    reference = model.predict(x, verbose=0)
    loaded = save_load_and_resume(model, str(tmp_path / "lora.keras"), x, y,
                                  save=kerastl.save_model)
    assert len(peft.lora_layers(loaded)) == len(layers)
    # Plain Keras: the file serves the merged model (what was saved).
    plain = keras.models.load_model(str(tmp_path / "lora.keras"),
                                    compile=False)
    np.testing.assert_allclose(plain.predict(x, verbose=0), reference,
                               rtol=1e-5, atol=1e-5)
    keras.backend.clear_session()


def test_merged_export_serves_the_same_outputs_without_lora(tmp_path):
    import tensorflow as tf

    model = _cnn_classifier()
    x, y = _data()
    kerastl.lora(model, rank=2)
    kerastl.fine_tune(model, (x, y), strategy="lora", head_epochs=0,
                      epochs=2, batch_size=8,
                      optimizer=keras.optimizers.Adam(1e-2))
    assert any(np.abs(l.lora_kernel_b.numpy()).max() > 0
               for l in peft.lora_layers(model))
    reference = model.predict(x, verbose=0)
    merged = kerastl.merge_lora(model)
    assert peft.lora_layers(merged) == [] and peft.lora_layers(model)
    assert not any("lora" in v.path for v in merged.weights)
    np.testing.assert_allclose(merged.predict(x, verbose=0), reference,
                               rtol=1e-5, atol=1e-5)
    folder = str(tmp_path / "export")
    kerastl.export_savedmodel(model, folder)
    served = tf.saved_model.load(folder)
    assert not any("lora" in v.name for v in served.variables)
    np.testing.assert_allclose(served.serve(tf.constant(x)).numpy(),
                               reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", ["lora", "bias", "norm"])
def test_save_model_resumes_exactly(strategy, tmp_path):
    model = _cnn_classifier()
    x, y = _data()
    kerastl.fine_tune(model, (x, y), strategy=strategy, lora_rank=2,
                      lora_alpha=4 if strategy == "lora" else None,
                      head_epochs=0, epochs=1, batch_size=8,
                      optimizer=keras.optimizers.Adam(1e-2))
    loaded = save_load_and_resume(model, str(tmp_path / "m.keras"), x, y,
                                  save=kerastl.save_model)
    if strategy == "lora":  # Keras alone would reset a Dense's alpha
        assert {l.lora_alpha for l in peft.lora_layers(loaded)} == {4.0}


@pytest.mark.parametrize("optimizer_first", [False, True],
                         ids=["lora first", "optimizer first"])
def test_layerwise_multiplier_on_a_lora_block_is_exact(optimizer_first):
    model = two_block_model()
    if optimizer_first:  # the factors get their layer's multiplier
        opt = kerastl.LayerwiseOptimizer(keras.optimizers.Adam(0.1),
                                         {"low": M_LOW}, model)
    peft.enable_lora(model, rank=2, blocks="low", targets="all")
    kerastl.freezing.apply_trainable(
        model, kerastl.freezing.resolve_trainable(model, "lora"),
        recompile=False)
    variables = model.trainable_variables
    paths = [v.path for v in variables]
    assert "low/lora_kernel_a" in paths and "low/kernel" not in paths
    if not optimizer_first:
        opt = kerastl.LayerwiseOptimizer(keras.optimizers.Adam(0.1),
                                         {"low": M_LOW}, model)
    refs = []
    for v in variables:
        m = M_LOW if v.path.startswith("low/") else 1.0
        refs.append((m, keras.optimizers.Adam(0.1 * m),
                     keras.Variable(v.numpy(), name="ref")))
    rng = np.random.default_rng(1)
    for _ in range(3):
        step_with_references(opt, variables, [(o, r) for _, o, r in refs],
                             rng)
    for v, (m, _, ref) in zip(variables, refs):
        np.testing.assert_allclose(v.numpy(), ref.numpy(), rtol=2e-6,
                                   atol=1e-7, err_msg=f"{v.path} (m={m})")


def test_bias_only_and_norm_only_train_exactly_what_they_name():
    x, y = _data()
    for tune in (kerastl.tune_biases, kerastl.tune_norms):
        model = _cnn_classifier()
        convs = [l for l in model.layers
                 if isinstance(l, keras.layers.Conv2D)]
        (norm,) = [l for l in model.layers
                   if isinstance(l, keras.layers.BatchNormalization)]
        head = {v.path for v in model.get_layer("head_predictions").weights}
        named = {l.bias.path for l in convs} if tune is kerastl.tune_biases \
            else {norm.gamma.path, norm.beta.path}
        assert set(tune(model)) == named | head
        model.compile(keras.optimizers.Adam(1e-2),
                      "sparse_categorical_crossentropy")
        before = _snapshot(model)
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
        if tune is kerastl.tune_norms:  # BatchNorm trains: its statistics
            named |= {norm.moving_mean.path, norm.moving_variance.path}
        assert _moved(model, before) == named | head
        # Then full fine-tuning: every weight trains again, the ones the
        # tuning froze inside trainable layers (conv kernels) included.
        kerastl.freeze(model, "full", recompile=False)
        assert {v.path for v in model.trainable_weights} == {
            v.path for v in model.weights if "moving" not in v.path
            and not (v.path.startswith(norm.name + "/"))}


def test_plan_and_resolver_take_the_strategies():
    model = _cnn_classifier()
    for strategy in ("lora", "bias", "norm"):
        plan = kerastl.TrainingPlan(strategy=strategy,
                                    freeze_up_to="block1").resolve(model)
        assert plan.trainable.mode == strategy
        assert plan.trainable.frozen == ("block1",)
        assert str(plan.trainable).startswith(
            f"frozen: block1; trainable ({strategy} only)")
    with pytest.raises(KerastlError, match="freeze_up_to applies to"):
        kerastl.TrainingPlan(strategy="full", freeze_up_to="block1")
    with pytest.raises(KerastlError, match="lora_rank=0"):
        kerastl.TrainingPlan(strategy="lora", lora_rank=0)
    with pytest.raises(KerastlError, match="lora_targets"):
        kerastl.TrainingPlan(strategy="lora", lora_targets="mlp")


def test_bad_requests_name_the_fix():
    model = _cnn_classifier()
    with pytest.raises(KerastlError, match="rank=0"):
        kerastl.lora(model, rank=0)
    with pytest.raises(BlockError, match="new head, which trains whole"):
        kerastl.lora(model, blocks="head")
    with pytest.raises(BlockError, match="Unknown block 'stage9'"):
        kerastl.lora(model, blocks="stage9:")
    # bn='train' would do nothing (LoRA keeps norms frozen): refused before
    # the model changes.
    with pytest.raises(KerastlError, match="lora.bn='train'.*tune_norms"):
        kerastl.lora(model, rank=2, bn="train")
    assert peft.lora_layers(model) == []
    with pytest.raises(BlockError, match="a list holds names or indices"):
        kerastl.lora(model, blocks=[["block1"]])
    kerastl.lora(model, rank=2, blocks="block1")
    with pytest.raises(KerastlError, match="already has LoRA of rank 2"):
        kerastl.lora(model, rank=4, blocks="block1")
    with pytest.raises(KerastlError, match="already has LoRA with alpha 2"):
        kerastl.lora(model, rank=2, alpha=16, blocks="block1")
    # A block without a layer Keras can give LoRA to.
    inputs = keras.Input((16, 16, 3))
    h = keras.layers.DepthwiseConv2D(3, name="dw")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    out = keras.layers.Dense(2, name="top")(keras.layers.Flatten()(h))
    depthwise = keras.Model(inputs, out)
    with pytest.raises(KerastlError, match="DepthwiseConv2D"):
        kerastl.lora(depthwise, blocks=0)


def test_finetune_lora_from_the_command_line(tmp_path, capsys):
    """kerastl finetune --strategy lora --lora-rank 2 on a user's .keras
    file: the saved model has the LoRA layers and resumes; the exported
    model has none."""
    from kerastl.cli import main

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    h = keras.layers.Rescaling(1 / 255.0)(inputs)
    h = keras.layers.Conv2D(8, 3, activation="relu", name="c1")(h)
    h = keras.layers.MaxPooling2D(2)(h)
    h = keras.layers.Conv2D(8, 3, activation="relu", name="c2")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    user = keras.Model(inputs, keras.layers.Dense(5, name="old_top")(h))
    path = str(tmp_path / "mine.keras")
    user.save(path)
    images = write_folder(tmp_path / "images", per_class=12, size=32)
    out = tmp_path / "run"
    code = main(["finetune", "--model", path, "--data", str(images),
                 "--output", str(out), "--strategy", "lora", "--lora-rank",
                 "2", "--epochs", "2", "--batch-size", "8", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    tuned = kerastl.load_model(str(out / "model.keras"))
    ranks = {l.name: l.lora_rank for l in peft.lora_layers(tuned)}
    assert ranks == {"c1": 2, "c2": 2}, ranks
    metrics = json.loads((out / "metrics.json").read_text())
    assert "accuracy" in metrics["validation"]
