"""kerastl's default fine-tuning recipe against the recipes a Keras user
would write instead, on five offline transfer tasks (issue #34).

Tasks (each: labelled training images, 300 validation images from the rest
of the target's training split, and its test split):

* ``cnn_digits10``: the demo's small CNN pretrained on ``syn_digits``
  (``kerastl.pretrained``) -> scikit-learn digits, 10 labels per class;
* ``cnn_digits_m50``: the same CNN -> ``digits_m``, 50 per class;
* ``own_cnn_3class``: a user's own smaller CNN, saved as a ``.keras`` file
  and loaded by path, -> a 3-class task of 180 images (``digits_m`` 0, 1, 2;
  60 per class);
* ``mobilenet_digits10``: MobileNetV2 at 96x96 pretrained offline on
  ``syn_digits`` (``benchmarks/boundary_cache.py``'s weights) -> digits,
  10 per class;
* ``vit_digits50``: a small KerasHub ViT pretrained offline on ``syn_digits``
  (``benchmarks/peft.py``'s) -> digits, 50 per class.

Recipes, each on the same images, model and seeds:

* ``defaults``: ``kerastl.fine_tune(model, train, validation, seed=seed)``:
  what ``kerastl finetune --model M --data D`` does, no flags;
* ``guide``: the Keras transfer-learning guide as it is written, in plain
  Keras (``model.fit`` on a ``tf.data`` pipeline): the backbone frozen, the
  head trained with ``Adam()`` for 20 epochs, then everything unfrozen
  (BatchNorm in inference mode) at ``Adam(1e-5)`` for 10 epochs, batch 64,
  ``RandomRotation(0.1)`` augmentation (the guide's
  ``RandomFlip("horizontal")`` left out: it breaks digits);
* ``fastai``: fastai's ``fine_tune`` reproduced in Keras: one frozen epoch
  at ``base_lr=2e-3`` one-cycle (BatchNorm of the frozen body stays in
  inference mode; fastai trains it), then
  everything at ``slice(base_lr/200, base_lr/2)`` (``kerastl.LRSpread``)
  one-cycle (linear warmup over 30% from ``lr/5``, cosine to 0), AdamW
  (betas 0.9/0.99, decoupled weight decay 0.01), batch 64; its main phase
  gets as many steps as kerastl's defaults take (fastai leaves the number of
  epochs to the user);
* ``grid``: the best on validation of 12 configurations (main-phase rate
  1e-5 / 1e-4 / 1e-3 x strategy partial / full x (budget, augmentation)
  (100 steps, none) / (400 steps, light)), after a 100-step head phase at
  ``Adam(1e-3)``; reported on the test split: what an expert gets by
  searching.

``--candidates`` runs variations of the defaults instead (the ablation that
chose them): each named change of the recipe, on the same data.

    python benchmarks/recipes.py [--tasks ...] [--seeds 3] [--json F]
    python benchmarks/recipes.py --candidates [--tasks ...]

Prints per task the absolute test accuracy of each recipe (mean, spread
over seeds), then the differences, then wall time, and the acceptance check.
Results are written after each run (``--json``), and a rerun skips the runs
already there.
"""

import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kerastl  # noqa: E402
from kerastl import datasets, pretrained  # noqa: E402
from kerastl import plan as plan_lib  # noqa: E402
from kerastl.sampling import few_shot  # noqa: E402

TASKS = ["cnn_digits10", "cnn_digits_m50", "own_cnn_3class",
         "mobilenet_digits10", "vit_digits50"]
RECIPES = ["defaults", "guide", "fastai", "grid"]
GRID = [(rate, strategy, steps, augment)
        for rate in (1e-5, 1e-4, 1e-3)
        for strategy in ("partial", "full")
        for steps, augment in ((100, None), (400, "light"))]


# -- the tasks ----------------------------------------------------------------

def _own_cnn():
    """A user's own small CNN, trained on their source data and saved as a
    ``.keras`` file (written once into kerastl's cache folder)."""
    path = os.path.join(pretrained.cache_dir(),
                        f"recipes_own_cnn_keras{keras.__version__}.keras")
    if not os.path.isfile(path):
        keras.utils.set_random_seed(1)
        cnn = pretrained.small_cnn(widths=(8, 16, 32), name="my_cnn")
        pretrained.pretrain(cnn, samples=2000, epochs=5, seed=1)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + f".{os.getpid()}.keras"
        cnn.save(tmp)
        os.replace(tmp, path)
    return path


def backbone_maker(task):
    """A function giving a fresh pretrained backbone for ``task``."""
    if task.startswith("cnn_"):
        import peft
        return peft.backbones(["cnn"])["cnn"]
    if task == "own_cnn_3class":
        path = _own_cnn()
        return lambda: kerastl.load_backbone(path)
    if task == "mobilenet_digits10":
        import boundary_cache
        weights = boundary_cache.pretrained_weights()
        return lambda: kerastl.load_backbone(
            "mobilenet_v2", weights=weights, input_shape=(96, 96, 3))
    if task == "vit_digits50":
        import peft
        return peft.backbones(["vit"])["vit"]
    raise SystemExit(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")


def task_data(task, seed, validation=300):
    """``(train, validation, test)`` arrays of ``task`` at ``seed``."""
    source, per_class, classes, size = {
        "cnn_digits10": ("digits", 10, 10, 32),
        "cnn_digits_m50": ("digits_m", 50, 10, 32),
        "own_cnn_3class": ("digits_m", 60, 3, 32),
        "mobilenet_digits10": ("digits", 10, 10, 96),
        "vit_digits50": ("digits", 50, 10, 32)}[task]
    return few_shot_task(source, per_class, classes, seed, size, validation)


def few_shot_task(domain, per_class, classes, seed, size=32,
                  validation=300):
    """``(train, validation, test, classes)``: ``per_class`` labelled
    images of the first ``classes`` classes of ``domain``'s training
    split, ``validation`` others from it, and its test split."""
    load = getattr(datasets, domain)

    def split(name):
        x, y = load(name, size=size)
        keep = y < classes
        return x[keep], y[keep]
    x, y = split("train")
    labelled = few_shot(y, per_class, seed)
    rest = np.setdiff1d(np.arange(len(y)), labelled)
    rest = np.random.default_rng(seed).permutation(rest)[:validation]
    return (x[labelled], y[labelled]), (x[rest], y[rest]), split("test"), \
        classes


# -- the recipes -----------------------------------------------------------

def _epochs(n, batch, steps):
    return max(1, round(steps / math.ceil(n / batch)))


def one_cycle(rate, steps, pct_start=0.3, div=5.0):
    """fastai's one-cycle in Keras: linear warmup from ``rate / div`` over
    ``pct_start`` of the steps, then cosine to 0."""
    warm = max(1, int(pct_start * steps))
    return keras.optimizers.schedules.CosineDecay(
        rate / div, max(1, steps - warm), warmup_target=rate,
        warmup_steps=warm)


def guide(model, train, val, seed):
    """The Keras guide's recipe in plain Keras, as the guide writes it: a
    ``tf.data`` pipeline that augments each batch, ``base_model.trainable
    = False`` and ``fit`` for 20 epochs, then everything trainable except
    BatchNorm (the guide calls the base with ``training=False``) and
    ``fit`` again at ``Adam(1e-5)`` for 10 epochs; no kerastl in the
    loop (no boundary cache, no step budget)."""
    import tensorflow as tf

    augment = keras.layers.RandomRotation(0.1, seed=seed)
    data = tf.data.Dataset.from_tensor_slices(train).shuffle(
        len(train[0]), seed=seed).batch(64).map(
        lambda x, y: (augment(x, training=True), y)).prefetch(2)
    head = {l.name for l in kerastl.block_map(model).layers("head")}
    for layer in model.layers:
        layer.trainable = layer.name in head
    model.compile(keras.optimizers.Adam(), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(data, epochs=20, validation_data=val, verbose=0)
    for layer in model.layers:
        layer.trainable = not isinstance(
            layer, keras.layers.BatchNormalization)
    model.compile(keras.optimizers.Adam(1e-5),
                  "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model.fit(data, epochs=10, validation_data=val, verbose=0)


def fastai(model, train, val, seed, main_steps):
    n, batch, base_lr = len(train[0]), 64, 2e-3
    per_epoch = math.ceil(n / batch)
    epochs = max(1, round(main_steps / per_epoch))

    def adamw(rate, steps, pct_start, div):
        return keras.optimizers.AdamW(
            one_cycle(rate, steps, pct_start, div), weight_decay=0.01,
            beta_2=0.99)
    # fine_tune(freeze_epochs=1): one frozen epoch, one-cycle with
    # pct_start 0.99.
    kerastl.fine_tune(
        model, train, val, strategy="features", head_epochs=0, epochs=1,
        optimizer=adamw(base_lr, per_epoch, 0.99, 25.0), patience=None,
        batch_size=batch, seed=seed, check_features=False)
    base_lr /= 2
    return kerastl.fine_tune(
        model, train, val, strategy="full", bn="train", head_epochs=0,
        epochs=epochs, optimizer=adamw(base_lr, epochs * per_epoch, 0.3, 5.0),
        multipliers=kerastl.LRSpread(1 / 100, 1.0), patience=None,
        batch_size=batch, seed=seed, check_features=False)


def grid_run(model, train, val, seed, config):
    rate, strategy, steps, augment = config
    n = len(train[0])
    return kerastl.fine_tune(
        model, train, val, strategy=strategy, head_epochs=_epochs(n, 32, 100),
        epochs=_epochs(n, 32, steps), optimizer=keras.optimizers.Adam(rate),
        patience=None, batch_size=32, augment=augment, seed=seed,
        check_features=False)


# -- candidate defaults (the ablation) ---------------------------------------

class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Sparse categorical cross-entropy with label smoothing."""

    def __init__(self, smoothing=0.1, classes=10, name="smoothed_ce"):
        super().__init__(name=name)
        self.smoothing, self.classes = smoothing, classes

    def call(self, y_true, y_pred):
        y = keras.ops.one_hot(keras.ops.cast(
            keras.ops.reshape(y_true, (-1,)), "int32"), self.classes)
        return keras.losses.categorical_crossentropy(
            y, y_pred, label_smoothing=self.smoothing)


def budget(n, batch, low, high):
    """Epochs of a phase on ``n`` images: kerastl's step budget
    (:func:`kerastl.plan.phase_epochs`) with ``low`` and ``high`` steps."""
    return plan_lib.phase_epochs(None, math.ceil(n / batch), low, high)


CANDIDATE = dict(rate=1e-3, head_rate=1e-3, schedule="cosine", wd=0.01,
                 smoothing=0.1, augment="light", strategy="full", bn="train",
                 multipliers=None, head=True, low=300,
                 high=3000, head_low=100, head_high=1000, patience=None)
CHANGES = {
    "K": {},
    "constant": {"schedule": "constant"},
    "no_wd": {"wd": 0.0},
    "no_smoothing": {"smoothing": 0.0},
    "no_augment": {"augment": None},
    "strong_augment": {"augment": "strong"},
    "partial": {"strategy": "partial"},
    "bn_frozen": {"bn": "frozen"},
    "spread": {"multipliers": kerastl.LRSpread(0.01, 1.0)},
    "layer_decay": {"multipliers": kerastl.LayerDecay(0.7)},
    "rate_3e-4": {"rate": 3e-4},
    "rate_3e-3": {"rate": 3e-3},
    "no_head": {"head": False},
    "rate_3e-3_no_augment": {"rate": 3e-3, "augment": None},
    "constant_no_augment": {"schedule": "constant", "augment": None},
    "min_steps_1000": {"low": 1000},
    "epochs10": {"low": 0, "high": 10 ** 9, "head_low": 0,
                 "head_high": 10 ** 9},
    "patience": {"patience": 3},
}


def candidate(model, train, val, seed, classes, **changes):
    c = dict(CANDIDATE, **changes)
    n, batch = len(train[0]), 32
    per_epoch = math.ceil(n / batch)
    epochs = budget(n, batch, c["low"], c["high"])
    steps = epochs * per_epoch
    optimizer = plan_lib.make_optimizer(None, c["rate"], steps,
                                        c["schedule"], c["wd"])
    loss = SmoothedSparseCrossentropy(c["smoothing"], classes) \
        if c["smoothing"] else "sparse_categorical_crossentropy"
    return kerastl.fine_tune(
        model, train, val, strategy=c["strategy"], bn=c["bn"],
        head_epochs=budget(n, batch, c["head_low"], c["head_high"])
        if c["head"] else 0, epochs=epochs,
        head_optimizer=keras.optimizers.Adam(c["head_rate"]),
        optimizer=optimizer, multipliers=c["multipliers"],
        patience=c["patience"], batch_size=batch, augment=c["augment"],
        seed=seed, loss=loss, check_features=False), steps


# -- running -----------------------------------------------------------------

def evaluate(model, data):
    return float(model.evaluate(*data, batch_size=256, verbose=0)[1])


def one_run(make, data, seed, recipe, config=None):
    """Trains a fresh model by ``recipe``; its validation and test accuracy
    and wall time."""
    train, val, test, classes = data
    keras.utils.set_random_seed(seed)
    model = kerastl.build_classifier(make(), classes, seed=seed)
    start = time.perf_counter()
    if recipe == "defaults":
        kerastl.fine_tune(model, train, val, seed=seed)
    elif recipe == "guide":
        guide(model, train, val, seed)
    elif recipe == "fastai":
        fastai(model, train, val, seed, config)
    elif recipe.startswith("grid"):
        grid_run(model, train, val, seed, config)
    else:
        candidate(model, train, val, seed, classes, **CHANGES[recipe])
    seconds = time.perf_counter() - start
    record = {"val": evaluate(model, val), "test": evaluate(model, test),
              "seconds": seconds}
    keras.backend.clear_session()
    return record


def default_steps(n, batch=32):
    """The main-phase steps of kerastl's defaults on ``n`` images."""
    per_pass = math.ceil(n / batch)
    epochs, passes = kerastl.TrainingPlan().budget(per_pass)
    return epochs * passes * per_pass


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=TASKS, choices=TASKS)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--recipes", nargs="+", default=None)
    parser.add_argument("--candidates", action="store_true",
                        help="run the ablation of the defaults instead")
    parser.add_argument("--json", default=None)
    parser.add_argument("--report", action="store_true",
                        help="only print the tables of --json")
    parser.add_argument("--markdown", action="store_true",
                        help="print the tables of --json as Markdown")
    parser.add_argument("--no-save", action="store_true",
                        help="keep the results in memory only")
    args = parser.parse_args(argv)
    recipes = args.recipes or (list(CHANGES) if args.candidates else
                               ["defaults", "guide", "fastai"] +
                               [f"grid{i}" for i in range(len(GRID))])
    path = args.json or os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        "recipes_candidates.json" if args.candidates else "recipes.json")
    results = json.load(open(path)) if os.path.isfile(path) and \
        not args.no_save else {}
    if args.markdown:
        return markdown(results, args.tasks, args.seeds, args.candidates)
    makers = {}
    if not args.report:  # seed by seed: every task has rows early
        for seed, task in ((s, t) for s in range(args.seeds)
                           for t in args.tasks):
            if all(f"{task}/{r}/{seed}" in results for r in recipes):
                continue
            if task not in makers:
                makers[task] = backbone_maker(task)
            make = makers[task]
            data = task_data(task, seed)
            for recipe in recipes:
                key = f"{task}/{recipe}/{seed}"
                if key in results:
                    continue
                config = None
                if recipe.startswith("grid"):
                    config = GRID[int(recipe[4:])]
                elif recipe == "fastai":
                    config = default_steps(len(data[0][0]))
                results[key] = one_run(make, data, seed, recipe, config)
                r = results[key]
                print(f"{key}: val {r['val']:.3f} test {r['test']:.3f} "
                      f"{r['seconds']:.0f} s", flush=True)
                if not args.no_save:
                    _write(path, results)
    return report(results, args.tasks, args.seeds, args.candidates)


def _rows(results, task, recipe, seeds):
    return [results.get(f"{task}/{recipe}/{s}") for s in range(seeds)]


def _grid_best(results, task, seeds):
    """Per seed: the grid configuration best on validation, its record."""
    out = []
    for s in range(seeds):
        runs = [results.get(f"{task}/grid{i}/{s}") for i in range(len(GRID))]
        if all(runs):  # (a seed counts once its 12 runs are in)
            best = max(runs, key=lambda r: r["val"])
            out.append(dict(best, seconds=sum(r["seconds"] for r in runs)))
        else:
            out.append(None)
    return out


def _to_grid(results, task, seeds):
    """Mean of defaults minus the grid's best over the seeds that have
    both (the grid may have fewer seeds), or nan."""
    diffs = [d["test"] - g["test"] for d, g in zip(
        _rows(results, task, "defaults", seeds),
        _grid_best(results, task, seeds)) if d and g]
    return float(np.mean(diffs)) if diffs else float("nan")


def _mean(rows, key="test"):
    vals = [r[key] for r in rows if r]
    return (float(np.mean(vals)), float(np.std(vals)), len(vals)) \
        if vals else (float("nan"), 0.0, 0)


def report(results, tasks, seeds, candidates=False):
    names = list(CHANGES) if candidates else ["defaults", "guide", "fastai",
                                              "grid"]
    table = {}
    for task in tasks:
        print(f"\n{task}: test accuracy (mean ± sd over seeds), seconds")
        for name in names:
            rows = _grid_best(results, task, seeds) if name == "grid" else \
                _rows(results, task, name, seeds)
            acc, sd, k = _mean(rows)
            secs = _mean(rows, "seconds")[0]
            table[(task, name)] = acc, secs
            if k:
                print(f"  {name:14s} {acc:.3f} ± {sd:.3f} (n={k})  "
                      f"{secs:6.1f} s")
    if candidates:
        return table
    print("\nacceptance (#34): defaults vs max(guide, fastai), vs grid best")
    gains, near, rows = [], 0, []
    for task in tasks:
        d, dt = table[(task, "defaults")]
        g, gt = table[(task, "guide")]
        f, _ = table[(task, "fastai")]
        best, _ = table[(task, "grid")]
        gain = d - max(g, f)
        gains.append(gain)
        to_grid = _to_grid(results, task, seeds)  # on the same seeds
        near += to_grid >= -0.015
        print(f"  {task:20s} defaults {d:.3f}  better baseline "
              f"{max(g, f):.3f} ({100 * gain:+.1f})  grid {best:.3f} "
              f"({100 * to_grid:+.1f} on its seeds)  time vs guide "
              f"{dt / gt:.2f}x")
        rows.append({"task": task, "defaults": d, "guide": g, "fastai": f,
                     "grid": best, "defaults_s": dt, "guide_s": gt})
    print(f"  mean gain over the better baseline: "
          f"{100 * np.nanmean(gains):+.1f} points (target >= +2, and >= 0 on "
          f"every task); within 1.5 of the grid on {near} of {len(tasks)} "
          "(target >= 4 of 5)")
    return rows


def markdown(results, tasks, seeds, candidates=False):
    """The results as the Markdown tables of the documentation."""
    if candidates:
        names = sorted({k.split("/")[1] for k in results},
                       key=lambda n: list(CHANGES).index(n)
                       if n in CHANGES else 99)
        print("| change from the starting recipe | " + " | ".join(tasks) +
              " | mean |")
        print("|---|" + "---:|" * (len(tasks) + 1))
        for name in names:
            accs = [_mean(_rows(results, t, name, seeds))[0] for t in tasks]
            cells = ["-" if a != a else f"{a:.3f}" for a in accs]
            mean = "-" if any(a != a for a in accs) else \
                f"{np.mean(accs):.3f}"
            label = "none (the starting recipe)" if name == "K" else name
            print(f"| {label} | " + " | ".join(cells) + f" | {mean} |")
        return None
    print("| task | kerastl defaults | Keras guide | fastai-style | "
          "grid best (12) | defaults - better baseline | defaults - grid "
          "(its seeds) | seconds: defaults / guide / fastai / grid |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for task in tasks:
        cells, times, accs = [], [], {}
        for name in ("defaults", "guide", "fastai", "grid"):
            rows = _grid_best(results, task, seeds) if name == "grid" \
                else _rows(results, task, name, seeds)
            acc, sd, k = _mean(rows)
            accs[name] = acc
            cells.append("-" if not k else
                         f"{acc:.3f} ± {sd:.3f}" + ("" if k == seeds
                                                     else f" (n={k})"))
            times.append("-" if not k else f"{_mean(rows, 'seconds')[0]:.0f}")
        if all(a != a for a in accs.values()):
            continue  # not run yet
        better = max(accs["guide"], accs["fastai"])
        to_grid = _to_grid(results, task, seeds)  # on the grid's seeds
        print(f"| {task} | " + " | ".join(cells) +
              f" | {100 * (accs['defaults'] - better):+.1f} | "
              + ("-" if to_grid != to_grid else f"{100 * to_grid:+.1f}")
              + " | " + " / ".join(times) + " |")
    return None


def _write(path, data):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
