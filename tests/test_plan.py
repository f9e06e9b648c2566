"""One training plan: the experiment schema, the plan every entry point
builds the same way, what trains resolved once, and the batch order."""

import json
import numbers

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerastl
from conftest import write_folder
from kerastl import cli, experiment, freezing, schema, spec
from kerastl.errors import ConfigError
from kerastl.plan import TrainingPlan


# -- the schema: every key declared once ------------------------------------------

def test_a_key_added_in_one_place_has_its_default_check_and_flag(
        monkeypatch, capsys):
    key = schema.Key("label_smoothing", 0.0, (numbers.Real,),
                     "label smoothing of the loss",
                     check=lambda v: 0 <= v < 1, expected="a number in [0, 1)")
    monkeypatch.setattr(schema, "KEYS", schema.KEYS + (key,))
    assert schema.defaults()["label_smoothing"] == 0.0
    assert schema.resolve({"model": "m", "data": "d"})["label_smoothing"] \
        == 0.0
    with pytest.raises(ConfigError, match=r"'label_smoothing' is 2 "
                                          r"\(--label-smoothing\): expected "
                                          r"a number in \[0, 1\)"):
        schema.resolve({"model": "m", "data": "d", "label_smoothing": 2})
    args = cli.build_parser().parse_args(
        ["finetune", "--label-smoothing", "0.1"])
    assert args.label_smoothing == 0.1
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--help"])
    assert "--label-smoothing" in capsys.readouterr().out


def test_unknown_keys_and_wrong_types_are_refused_with_the_flag():
    with pytest.raises(ConfigError, match=r"Unknown experiment key 'epoch' "
                                          r"\(did you mean 'epochs', "
                                          r"--epochs\?\)"):
        schema.resolve({"epoch": 3})
    with pytest.raises(ConfigError, match=r"'epochs' is 'ten' \(--epochs\): "
                                          r"expected an integer or null\."):
        schema.resolve({"model": "m", "data": "d", "epochs": "ten"})
    with pytest.raises(ConfigError, match=r"'batch_size' is True "
                                          r"\(--batch-size\)"):
        schema.resolve({"model": "m", "data": "d", "batch_size": True})
    with pytest.raises(ConfigError, match=r"'bn' is 'sometimes' \(--bn\): "
                                          r"expected one of frozen, train"):
        schema.resolve({"model": "m", "data": "d", "bn": "sometimes"})
    with pytest.raises(ConfigError, match=r"needs 'data' \(in the config or "
                                          r"as --data\)"):
        schema.resolve({"model": "m"})
    with pytest.raises(ConfigError, match="--freeze-up-to.*strategies partial, lora"):
        schema.resolve({"model": "m", "data": "d", "strategy": "full",
                        "freeze_up_to": 2})


def test_the_choice_lists_are_the_librarys_constants(capsys):
    keys = schema.keys()
    assert keys["strategy"].choices is spec.FINE_TUNING_STRATEGIES
    assert keys["bn"].choices is spec.BN_MODES
    assert keys["export_input"].choices is spec.INPUT_MODES
    assert keys["distribute"].choices is spec.DEVICE_STRATEGIES
    assert freezing.BN_MODES is spec.BN_MODES
    assert kerastl.serving.INPUT_MODES is spec.INPUT_MODES
    # The same words in --help as in the schema.
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--strategy {" + ",".join(spec.FINE_TUNING_STRATEGIES) + "}" \
        in help_text
    assert "--mixed-precision {none,float16,bfloat16}" in help_text
    assert "--distribute {" + ",".join(spec.DEVICE_STRATEGIES) + "}" \
        in help_text


def test_yaml_switch_words_and_null_aliases():
    e = schema.resolve({"model": "m", "data": "d", "boundary_cache": True,
                        "jit": False, "weights": "random"})
    assert e["boundary_cache"] is True and e["jit"] is False
    assert e["weights"] is None
    plan = TrainingPlan.from_experiment(dict(e, boundary_cache="off",
                                             mixed_precision="bfloat16"))
    assert plan.boundary_cache is False and plan.jit_compile is False
    assert plan.mixed_precision == "mixed_bfloat16"


# -- one plan, resolved once, whatever the entry point -----------------------------

def classifier_file(tmp_path):
    inputs = keras.Input((24, 24, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(4, 3, strides=2, activation="relu",
                            name="c1")(x)
    x = keras.layers.Conv2D(6, 3, strides=2, activation="relu",
                            name="c2")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu",
                            name="c3")(x)
    path = tmp_path / "mine.keras"
    keras.Model(inputs, x).save(path)
    return path


@pytest.fixture
def spy(monkeypatch):
    """Counts calls of the one resolver and records the plans fine_tune
    gets; the run stops after training (nothing is saved)."""
    calls, plans = [], []
    resolve = freezing.resolve_trainable

    def counting(*args, **kwargs):
        calls.append(args[1:])
        return resolve(*args, **kwargs)

    real = experiment.fine_tune

    def recording(model, train, validation=None, plan=None, **kwargs):
        result = real(model, train, validation, plan, **kwargs)
        plans.append(plan)
        raise kerastl.KerastlError("stopped after training by the test")

    monkeypatch.setattr(freezing, "resolve_trainable", counting)
    monkeypatch.setattr(experiment, "fine_tune", recording)
    return calls, plans


REQUEST = {"strategy": "partial", "freeze_up_to": "block1", "bn": "train",
           "layer_decay": 0.7}


def test_cli_yaml_and_python_build_the_same_plan_and_resolve_it_once(
        tmp_path, capsys, spy):
    calls, plans = spy
    model_file = classifier_file(tmp_path)
    data = write_folder(tmp_path / "images", per_class=4)
    common = ["--model", str(model_file), "--data", str(data), "--epochs",
              "1", "--head-epochs", "0", "--batch-size", "4"]
    # 1. Command-line flags.
    assert cli.main(["finetune", *common, "--output", str(tmp_path / "a"),
                     "--strategy", "partial", "--freeze-up-to", "block1",
                     "--bn", "train", "--layer-decay", "0.7"]) == 2
    assert "stopped after training" in capsys.readouterr().err
    assert len(calls) == 1
    # 2. The experiment YAML.
    config = tmp_path / "experiment.yaml"
    config.write_text("".join(f"{k}: {v}\n" for k, v in REQUEST.items()))
    assert cli.main(["finetune", "--config", str(config), *common,
                     "--output", str(tmp_path / "b")]) == 2
    assert len(calls) == 2
    # 3. Python, the plan's fields as fine_tune keywords.
    model = kerastl.build_classifier(kerastl.load_backbone(str(model_file)),
                                     2, freeze=None)
    assert len(calls) == 2  # freeze=None: nothing resolved
    x = np.random.default_rng(0).uniform(0, 255, (8, 24, 24, 3))
    y = np.arange(8) % 2
    python = dict(strategy="partial", freeze_up_to="block1", bn="train",
                  multipliers=kerastl.LayerDecay(0.7))
    kerastl.fine_tune(model, (x, y), head_epochs=0, epochs=1, **python)
    assert len(calls) == 3
    cli_plan, yaml_plan = plans
    assert cli_plan.request == yaml_plan.request == python
    assert cli_plan.trainable == yaml_plan.trainable
    assert cli_plan.trainable.frozen == ("block1",)
    assert kerastl.freezing.trainable_blocks(model) == [
        "block2", "block3", "head"]
    # A plan resolved by the caller is not resolved again.
    plan = TrainingPlan(head_epochs=0, epochs=1, **python).resolve(model)
    assert len(calls) == 4
    kerastl.fine_tune(model, (x, y), plan=plan)
    assert len(calls) == 4
    # ...unless a field changes with it.
    kerastl.fine_tune(model, (x, y), plan=plan, freeze_up_to="block2")
    assert len(calls) == 5 and calls[-1] == ("partial", "block2")


def test_build_classifier_freezes_through_the_one_resolver(spy):
    calls, _ = spy
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, name="c1")(inputs)
    x = keras.layers.Conv2D(4, 3, strides=2, name="c2")(x)
    backbone = keras.Model(inputs, x)
    for freeze, trainable in ((True, ["head"]), (False, ["block1", "block2",
                                                          "head"]),
                              (1, ["block2", "head"]),
                              ("block1", ["block2", "head"]),
                              ("full", ["block1", "block2", "head"])):
        model = kerastl.build_classifier(backbone, 2, freeze=freeze)
        assert kerastl.freezing.trainable_blocks(model) == trainable, freeze
    assert [c[0] for c in calls] == [True, False, 1, "block1", "full"]


def test_one_range_for_every_count():
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, name="c1")(inputs)
    x = keras.layers.Conv2D(4, 3, strides=2, name="c2")(x)
    model = kerastl.build_classifier(keras.Model(inputs, x), 2)
    resolve = freezing.resolve_trainable
    # 0 to the number of blocks, heads included, for freeze() and plans.
    assert [resolve(model, n).depth for n in range(4)] == [0, 1, 2, 3]
    assert resolve(model, "partial", 3).trainable == ()
    for bad in (-1, 4):
        with pytest.raises(kerastl.errors.BlockError,
                           match=f"{bad}: the model has 3 blocks.*between 0 "
                                 f"and 3"):
            resolve(model, bad)
    with pytest.raises(kerastl.KerastlError, match="Nothing would train"):
        kerastl.fine_tune(model, (np.zeros((2, 16, 16, 3)), np.zeros(2)),
                          freeze_up_to=3, head_epochs=0)
    with pytest.raises(kerastl.KerastlError, match="expected a strategy"):
        resolve(model, 1.5)


def test_a_plan_refuses_bad_fields_before_any_model():
    for kwargs, match in (({"strategy": "most"}, "strategy='most'"),
                          ({"bn": "on"}, "bn='on'"),
                          ({"epochs": 0}, "epochs=0"),
                          ({"head_epochs": -1}, "head_epochs=-1"),
                          ({"patience": 1.5}, "patience=1.5"),
                          ({"seed": "a"}, "seed='a'"),
                          ({"multipliers": 0.7}, "multipliers=0.7"),
                          ({"optimizer": 0.1}, "optimizer=0.1"),
                          ({"boundary_cache": "yes"}, "boundary_cache"),
                          ({"mixed_precision": "float16"},
                           "mixed_precision='float16'"),
                          ({"strategy": "full", "freeze_up_to": 1},
                           "freeze_up_to applies")):
        with pytest.raises(kerastl.KerastlError, match=match):
            TrainingPlan(**kwargs)
    with pytest.raises(TypeError, match="unfreeze_from.*freeze_up_to"):
        TrainingPlan().replace(unfreeze_from=1)


def test_a_plan_resolved_for_another_model_is_refused():
    def net(n):
        inputs = keras.Input((16, 16, 3))
        x = inputs
        for i in range(n):
            x = keras.layers.Conv2D(4, 3, strides=2, padding="same",
                                    name=f"c{i}")(x)
        return kerastl.build_classifier(keras.Model(inputs, x), 2)

    plan = TrainingPlan().resolve(net(2))
    data = (np.zeros((2, 16, 16, 3)), np.zeros(2))
    for call in (lambda: kerastl.fine_tune(net(3), data, plan),
                 lambda: kerastl.fine_tune(net(3), data, None, plan),
                 lambda: kerastl.fine_tune(net(3), data, plan=plan)):
        with pytest.raises(kerastl.errors.BlockError, match="resolved for"):
            call()


# -- the batch order of a seeded plan ---------------------------------------------

def test_seeded_batch_order_depends_on_seed_and_epoch_only():
    from kerastl.batch_order import SeededBatches

    x = np.arange(10)[:, None].astype("float32")
    y = np.arange(10)
    a = SeededBatches((x, y), 4, seed=3)
    order0 = np.concatenate([a[i][1] for i in range(len(a))])
    assert sorted(order0) == list(range(10)) and len(a) == 3
    np.random.seed(0)  # the global state plays no part
    b = SeededBatches((x, {"y": y}), 4, seed=3)
    b.set_epoch(1)
    a.set_epoch(1)
    order1 = np.concatenate([b[i][1]["y"] for i in range(len(b))])
    assert not np.array_equal(order0, order1)
    np.testing.assert_array_equal(
        order1, np.concatenate([a[i][1] for i in range(len(a))]))


def test_augmented_batches_depend_on_seed_and_epoch_only():
    """An epoch's augmented batches are the same whether the epochs before
    it ran in this process or not (a resumed run), as its order is."""
    from kerastl.augment import EpochAugment, augmentation
    from kerastl.batch_order import SeededBatches

    x = np.random.default_rng(0).uniform(0, 255, (8, 16, 16, 3)).astype(
        "float32")

    def batches(seed):
        return SeededBatches((x, np.arange(8)), 4, seed=3, transform=(
            EpochAugment(augmentation("light", seed=seed), seed)))
    straight = batches(5)
    for epoch in range(3):  # epochs 0 to 2 in one process
        straight.set_epoch(epoch)
        last = [straight[i][0] for i in range(len(straight))]
    resumed = batches(5)
    resumed.set_epoch(2)  # epoch 2 first, as a resume starts
    for a, b in zip(last, [resumed[i][0] for i in range(len(resumed))]):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(last[0], x[:4])  # (augmented)


def test_seeded_plans_train_alike_with_and_without_the_boundary_cache():
    """The same seed gives the same batches on both paths, and the same run
    twice, without touching the global random state."""
    def run(cache):
        keras.utils.set_random_seed(1)
        inputs = keras.Input((8, 8, 3))
        x = keras.layers.Conv2D(3, 3, name="c1")(inputs)
        x = keras.layers.Conv2D(3, 3, strides=2, name="c2")(x)
        model = kerastl.build_classifier(keras.Model(inputs, x), 2,
                                         dropout=0.0, freeze=None)
        rng = np.random.default_rng(0)
        data = (rng.uniform(0, 255, (20, 8, 8, 3)).astype("float32"),
                np.arange(20) % 2)
        np.random.seed(123)
        history = kerastl.fine_tune(
            model, data, freeze_up_to=1, head_epochs=0, epochs=3,
            batch_size=4, seed=7, boundary_cache=cache,
            optimizer=keras.optimizers.SGD(0.05)).fine_tune
        assert np.random.random() == \
            np.random.RandomState(123).random_sample()
        return history, model.predict(data[0], verbose=0)

    cached, p1 = run(True)
    again, p2 = run(True)
    end_to_end, p3 = run(False)
    assert cached.boundary_cache == "used"
    assert end_to_end.boundary_cache == "boundary_cache=False"
    np.testing.assert_array_equal(p1, p2)
    assert cached.history["loss"] == again.history["loss"]
    np.testing.assert_allclose(cached.history["loss"],
                               end_to_end.history["loss"], rtol=1e-5)
    np.testing.assert_allclose(p1, p3, rtol=1e-5, atol=1e-6)


# -- budgets in steps and the schedule -------------------------------------------

def test_the_budget_is_counted_in_steps_unless_epochs_are_given():
    plan = TrainingPlan()  # 10 passes, at least 300 steps, at most 3,000
    # 100 images: 75 passes of 4 steps, in 15 epochs of 5 passes (20 steps)
    assert (plan.phase_epochs(4), plan.epoch_passes(4)) == (15, 5)
    assert (plan.phase_epochs(50), plan.epoch_passes(50)) == (10, 1)
    assert plan.phase_epochs(600) == 5  # 19,200 images: capped at 3,000
    assert plan.phase_epochs(5000) == 1
    assert plan.phase_epochs(None) == 10  # unknown length: 10 epochs
    assert plan.epoch_passes(None) == 1
    # The head phase, a third: 100 steps, 5 epochs of 5 passes.
    assert (plan.phase_epochs(4, head=True),
            plan.epoch_passes(4, head=True)) == (5, 5)
    # 3 data (7 steps a pass): 43 passes, in 15 epochs of 3 (315 steps).
    assert (plan.phase_epochs(7), plan.epoch_passes(7)) == (15, 3)
    # Data that cannot be repeated (a PyDataset): an epoch is one pass.
    assert (plan.phase_epochs(4, repeat=False),
            plan.epoch_passes(4, repeat=False)) == (75, 1)
    # Epochs given: one pass each, as in Keras.
    assert (TrainingPlan(epochs=3).phase_epochs(4),
            TrainingPlan(epochs=3).epoch_passes(4)) == (3, 1)
    assert TrainingPlan(min_steps=0).phase_epochs(4) == 2  # 10 passes
    # Never more than max_steps: 10 passes of 3 steps in 1 epoch of 7.
    small = TrainingPlan(min_steps=0, max_steps=30)
    assert (small.phase_epochs(3), small.epoch_passes(3)) == (1, 7)
    assert (small.phase_epochs(30), small.epoch_passes(30)) == (1, 1)
    with pytest.raises(kerastl.KerastlError, match="max_steps=10 is below "
                                                   "min_steps=300"):
        TrainingPlan(max_steps=10)


def test_an_epoch_of_small_data_is_several_passes_in_their_seeded_orders():
    """Under the step budget an epoch of 4-step data is 5 passes (20
    steps), whatever serves them: seeded batches (pass p in the order of
    (seed, p), as one-pass epochs would be), arrays Keras shuffles, a
    tf.data pipeline, the boundary cache. Validation runs once an epoch."""
    from kerastl.batch_order import SeededBatches

    x = np.arange(10)[:, None].astype("float32")
    y = np.arange(10)
    grouped = SeededBatches((x, y), 4, seed=3, passes=3)
    grouped.set_epoch(1)
    single = SeededBatches((x, y), 4, seed=3)
    expected = []
    for p in (3, 4, 5):
        single.set_epoch(p)
        expected += [single[i][1] for i in range(len(single))]
    assert len(grouped) == 9
    for i, batch in enumerate(expected):
        np.testing.assert_array_equal(grouped[i][1], batch)

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (32, 8, 8, 3)).astype("float32")
    labels = np.arange(32) % 2
    validation = (images[:8], labels[:8])

    class Count(keras.callbacks.Callback):
        validations = 0

        def on_test_begin(self, logs=None):
            Count.validations += 1

    def run(train, **settings):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((8, 8, 3))
        h = keras.layers.Conv2D(4, 3, name="c1")(inputs)
        h = keras.layers.Conv2D(4, 3, strides=2, name="c2")(h)
        model = kerastl.build_classifier(keras.Model(inputs, h), 2,
                                         freeze=None)
        Count.validations = 0
        history = kerastl.fine_tune(
            model, train, validation, head_epochs=0, min_steps=40,
            batch_size=8, patience=None, check_features=False,
            callbacks=[Count()], **settings).fine_tune
        return (len(history.history["loss"]), Count.validations,
                int(model.optimizer.iterations), history.boundary_cache)

    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
    # 10 passes of 4 steps: 2 epochs of 5 passes, 40 steps, 2 validations.
    assert run((images, labels), seed=1)[:3] == (2, 2, 40)
    assert run((images, labels))[:3] == (2, 2, 40)
    # 30 images: 4 steps a pass all the same (the last batch short).
    assert run((images[:30], labels[:30]))[:3] == (2, 2, 40)
    assert run(dataset)[:3] == (2, 2, 40)
    assert run((images, labels), seed=1, strategy="partial",
               freeze_up_to="block1") == (2, 2, 40, "used")
    assert run(dataset, strategy="partial", freeze_up_to="block1",
               boundary_cache=True) == (2, 2, 40, "used")
    # Epochs given: one pass each, as in Keras.
    assert run((images, labels), epochs=3)[:3] == (3, 3, 12)


def test_the_schedule_gives_the_exact_rates_at_warmup_end_and_last_step(
        tmp_path):
    model = kerastl.build_classifier(
        kerastl.load_backbone(str(classifier_file(tmp_path))), 2)
    x = np.random.default_rng(0).uniform(0, 255, (100, 24, 24, 3))
    y = np.arange(100) % 2
    rates = {}

    class Rates(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            opt = self.model.optimizer
            rates[int(opt.iterations)] = float(opt.learning_rate)
    kerastl.fine_tune(model, (x, y), strategy="full", head_epochs=0,
                      min_steps=60, seed=0, callbacks=[Rates()],
                      check_features=False)
    steps, warm = 60, 6  # 15 passes of 4 steps; 10% warmup
    peak = kerastl.TrainingPlan().learning_rate
    assert sorted(rates) == list(range(steps))
    assert int(model.optimizer.iterations) == steps
    assert rates[0] == 0.0
    assert rates[warm - 1] == pytest.approx(peak * (warm - 1) / warm,
                                            rel=1e-6)
    assert rates[warm] == pytest.approx(peak, rel=1e-7)  # warmup's end
    last = steps - 1
    assert rates[last] == pytest.approx(peak * 0.5 * (1 + np.cos(
        np.pi * (last - warm) / (steps - warm))), abs=1e-6 * peak)  # float32
    assert float(model.optimizer.learning_rate) == pytest.approx(
        0.0, abs=1e-12)  # where the schedule ends
    # A constant schedule, and an optimizer given as an object: as given.
    kerastl.fine_tune(model, (x, y), strategy="full", head_epochs=0,
                      epochs=1, schedule="constant", check_features=False)
    assert float(model.optimizer.learning_rate) == pytest.approx(peak)
    kerastl.fine_tune(model, (x, y), strategy="full", head_epochs=0,
                      epochs=1, optimizer=keras.optimizers.SGD(0.05),
                      check_features=False)
    assert float(model.optimizer.learning_rate) == pytest.approx(0.05)


def test_a_180_image_folder_trains_the_minimum_number_of_steps(tmp_path):
    """kerastl finetune with no budget flags: 144 training images (5 steps
    a pass) train 60 passes, 300 steps, not 10 passes of 50; in 15 epochs
    of 4 passes (20 steps), not 60 epochs of 5 steps."""
    model_file = classifier_file(tmp_path)
    data = write_folder(tmp_path / "images", classes=("a", "b", "c"),
                        per_class=60, size=24)
    out = tmp_path / "run"
    assert cli.main(["finetune", "--model", str(model_file), "--data",
                     str(data), "--output", str(out), "--early-stopping",
                     "none", "--export", "none", "--quiet"]) == 0
    model = keras.saving.load_model(out / "model.keras", compile=True)
    assert int(model.optimizer.iterations) == 300
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_run"] == 15
