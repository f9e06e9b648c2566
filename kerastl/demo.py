"""``kerastl demo``: the main job end to end, offline, in a few minutes on a CPU.

1. Pretrain a small CNN on a source task: digits rendered from the fonts
   bundled with matplotlib (:func:`kerastl.datasets.syn_digits`). The
   weights are cached (``KERASTL_CACHE_DIR``, default ``~/.cache/kerastl``),
   so later runs skip this step.
2. Transfer it to the target task, scikit-learn's handwritten digits with
   ``per_class`` labelled images per class, three ways: feature extraction
   (frozen backbone, new head), partial fine-tuning (the last block and the
   head) and full fine-tuning (BatchNorm frozen), next to the same network
   trained from scratch.
3. Pick the best by accuracy on held-out validation images (not the test
   set), report test accuracy, export it with
   :func:`kerastl.export_savedmodel`, and write ``report.md`` with plots.
"""

import json
import os
import time

STRATEGIES = ("feature extraction", "partial fine-tuning",
              "full fine-tuning", "from scratch")


def small_cnn(size=32, widths=(16, 32, 64), name="small_cnn"):
    """A small conv net (one block per width) taking RGB in [0, 255]."""
    import keras

    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    for filters in widths:
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization(momentum=0.9)(x)
        x = keras.layers.ReLU()(x)
        x = keras.layers.MaxPooling2D()(x)
    return keras.Model(inputs, x, name=name)


def pretrain(backbone, samples=4000, epochs=10, seed=0, verbose=0):
    """Trains ``backbone`` with a softmax head on ``syn_digits`` (the source).

    Returns the source classifier (sharing the backbone's layers).
    """
    import keras

    from kerastl import datasets
    from kerastl.heads import build_classifier

    keras.utils.set_random_seed(seed)
    source = build_classifier(backbone, 10, freeze=False, bn="train")
    source.compile(keras.optimizers.Adam(2e-3),
                   "sparse_categorical_crossentropy", metrics=["accuracy"])
    xs, ys = datasets.syn_digits(samples, seed=seed)
    source.fit(xs, ys, batch_size=64, epochs=epochs, verbose=verbose)
    return source


def few_shot(x, y, per_class, seed, exclude=None):
    """``per_class`` random samples of each class (indices not in exclude)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    allowed = np.ones(len(y), bool)
    if exclude is not None:
        allowed[exclude] = False
    idx = np.concatenate([
        rng.choice(np.flatnonzero((y == c) & allowed), per_class,
                   replace=False) for c in np.unique(y)])
    return idx


def cache_dir():
    return os.environ.get("KERASTL_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "kerastl")


def pretrained_backbone(samples=4000, epochs=10, seed=0, verbose=0):
    """The demo's source backbone, from the cache or pretrained now.

    Returns ``(backbone, seconds, cached)``.
    """
    import keras

    start = time.time()
    backbone = small_cnn()
    name = (f"demo_small_cnn_syn{samples}_e{epochs}_s{seed}_"
            f"keras{keras.__version__}.weights.h5")
    path = os.path.join(cache_dir(), name)
    if os.path.isfile(path):
        try:
            backbone.load_weights(path)
            return backbone, time.time() - start, True
        except Exception:  # a damaged cache file: pretrain again
            os.remove(path)
    pretrain(backbone, samples, epochs, seed, verbose=verbose)
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = path + f".tmp{os.getpid()}.weights.h5"
    backbone.save_weights(tmp)
    os.replace(tmp, path)
    return backbone, time.time() - start, False


def run_demo(output="kerastl_demo", per_class=10, epochs=40,
             source_samples=4000, source_epochs=10, seed=0, verbose=1):
    """Runs the demo; returns its results dict (also in ``results.json``).

    Writes ``report.md``, ``results.json``, ``accuracy.png``,
    ``curves.png`` and the best model's ``savedmodel/`` and ``model.keras``
    into ``output`` (atomically: nothing is left there on failure).
    """
    import keras

    from kerastl import datasets
    from kerastl.atomic import atomic_folder, check_new_folder
    from kerastl.export import export_savedmodel
    from kerastl.freezing import trainable_summary
    from kerastl.heads import build_classifier

    def say(*args):
        if verbose:
            print(*args, flush=True)

    output = os.path.abspath(output)
    check_new_folder(output, "choose another one")
    start = time.time()
    say(f"1/3 source: small CNN on syn_digits ({source_samples} images, "
        f"{source_epochs} epochs)")
    backbone, pre_seconds, cached = pretrained_backbone(
        source_samples, source_epochs, seed)
    say(f"    {'from the cache' if cached else 'pretrained'} in "
        f"{pre_seconds:.0f} s")
    weights = backbone.get_weights()
    xtr, ytr = datasets.digits("train")
    xte, yte = datasets.digits("test")
    train_idx = few_shot(xtr, ytr, per_class, seed)
    val_idx = few_shot(xtr, ytr, 20, seed + 1, exclude=train_idx)
    train = (xtr[train_idx], ytr[train_idx])
    val = (xtr[val_idx], ytr[val_idx])
    say(f"2/3 target: scikit-learn digits, {per_class} labelled images per "
        f"class ({len(train_idx)}), {len(val_idx)} for validation, "
        f"{len(yte)} for test")
    rows, models, curves = [], {}, {}
    for strategy in STRATEGIES:
        keras.utils.set_random_seed(seed)
        t0 = time.time()
        net = small_cnn()
        if strategy != "from scratch":
            net.set_weights(weights)
        freeze = {"feature extraction": True, "partial fine-tuning": 2,
                  "full fine-tuning": False, "from scratch": False}[strategy]
        bn = "train" if strategy == "from scratch" else "frozen"
        model = build_classifier(net, 10, freeze=freeze, bn=bn)
        model.compile(keras.optimizers.Adam(1e-3),
                      "sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        history = model.fit(*train, validation_data=val, batch_size=10,
                            epochs=epochs, verbose=0)
        summary = trainable_summary(model)
        rows.append(dict(
            strategy=strategy,
            trainable_params=int(sum(r["trainable_params"] for r in summary)),
            validation_accuracy=float(model.evaluate(*val, verbose=0)[1]),
            test_accuracy=float(model.evaluate(xte, yte, verbose=0)[1]),
            seconds=round(time.time() - t0, 1)))
        models[strategy] = model
        curves[strategy] = [float(v) for v in
                            history.history["val_accuracy"]]
        say(f"    {strategy:<20} test accuracy {rows[-1]['test_accuracy']:.3f}"
            f" ({rows[-1]['seconds']:.0f} s)")
    best = max(rows, key=lambda r: r["validation_accuracy"])
    table = format_table(rows, best["strategy"])
    say("3/3 results (best by validation accuracy is exported):\n")
    say(table)
    with atomic_folder(output) as tmp:
        best_model = models[best["strategy"]]
        best_model.save(os.path.join(tmp, "model.keras"))
        export_savedmodel(best_model, os.path.join(tmp, "savedmodel"))
        results = dict(rows=rows, best=best["strategy"], per_class=per_class,
                       epochs=epochs, source_samples=source_samples,
                       source_epochs=source_epochs, seed=seed,
                       pretrained_from_cache=cached,
                       pretrain_seconds=round(pre_seconds, 1),
                       seconds=round(time.time() - start, 1), curves=curves)
        plots = _plots(tmp, rows, curves)
        with open(os.path.join(tmp, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        with open(os.path.join(tmp, "report.md"), "w") as f:
            f.write(_report(results, table, plots))
    say(f"\nbest: {best['strategy']}; exported to {output}/savedmodel; "
        f"report: {output}/report.md ({results['seconds']:.0f} s in all)")
    return results


def format_table(rows, best=None):
    head = (f"{'strategy':<22}{'trainable params':>18}{'val acc':>10}"
            f"{'test acc':>10}{'seconds':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        mark = " *" if r["strategy"] == best else ""
        lines.append(f"{r['strategy']:<22}{r['trainable_params']:>18,}"
                     f"{r['validation_accuracy']:>10.3f}"
                     f"{r['test_accuracy']:>10.3f}{r['seconds']:>9.0f}{mark}")
    return "\n".join(lines)


def _plots(folder, rows, curves):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh([r["strategy"] for r in rows],
            [r["test_accuracy"] for r in rows], color="tab:blue")
    ax.set_xlim(0, 1)
    ax.set_xlabel("test accuracy")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "accuracy.png"), dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for strategy, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, label=strategy)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "curves.png"), dpi=100)
    plt.close(fig)
    return ["accuracy.png", "curves.png"]


def _report(results, table, plots):
    lines = [
        "# kerastl demo report", "",
        f"Source: a small CNN pretrained on syn_digits "
        f"({results['source_samples']} images, {results['source_epochs']} "
        f"epochs{', from the cache' if results['pretrained_from_cache'] else ''}"
        f"). Target: scikit-learn digits, {results['per_class']} labelled "
        f"images per class, {results['epochs']} epochs per strategy.", "",
        "```", table, "```", "",
        f"Best by validation accuracy (`*`): **{results['best']}**, exported "
        "to `savedmodel/` (serve signature: float RGB in [0, 255]) and "
        "`model.keras`.", ""]
    lines += [f"![{p}]({p})" for p in plots]
    lines += ["", f"Total time: {results['seconds']:.0f} s.", ""]
    return "\n".join(lines)
