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

import keras

from kerastl import datasets
from kerastl.atomic import atomic_folder, check_destination
from kerastl.errors import KerastlError
from kerastl.serving import export_savedmodel
from kerastl.freezing import trainable_summary
from kerastl.heads import build_classifier
from kerastl.plan import TrainingPlan
from kerastl.pretrained import pretrained_backbone, small_cnn
from kerastl.sampling import few_shot
from kerastl.training import fine_tune

# The scikit-learn digits training split has at least 126 images of each
# class; 20 per class are kept for validation.
MAX_PER_CLASS = 100

# The demo's rows: a label and the fine_tune strategy behind it ("from
# scratch" is "full" on freshly initialised weights, BatchNorm training).
ROWS = {"feature extraction": "features",
              "partial fine-tuning": "partial",
              "full fine-tuning": "full",
              "from scratch": "full"}


def run_demo(output="kerastl_demo", per_class=10, epochs=40,
             source_samples=4000, source_epochs=10, seed=0, verbose=1,
             overwrite=False):
    """Runs the demo; returns its results dict (also in ``results.json``).

    Writes ``report.md``, ``results.json``, ``accuracy.png``,
    ``curves.png`` and the best model's ``savedmodel/`` and ``model.keras``
    into ``output`` (atomically: nothing is left there on failure).
    """
    for arg, value, low in (("per_class", per_class, 1), ("epochs", epochs, 1),
                            ("source_samples", source_samples, 10),
                            ("source_epochs", source_epochs, 1),
                            ("seed", seed, 0)):
        flag = "--" + arg.replace("_", "-")
        if isinstance(value, bool) or not isinstance(value, int) or \
                value < low:
            raise KerastlError(f"{arg} ({flag}) is {value!r}: expected an "
                               f"integer >= {low}.")
    if per_class > MAX_PER_CLASS:
        raise KerastlError(
            f"per_class (--per-class) is {per_class}: the digits training "
            f"split has room for at most {MAX_PER_CLASS} labelled images per "
            "class next to the 20 per class kept for validation.")

    def say(*args):
        if verbose:
            print(*args, flush=True)

    output = os.path.abspath(output)
    check_destination(output, "output folder", overwrite, "pass --overwrite")
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
    train_idx = few_shot(ytr, per_class, seed)
    val_idx = few_shot(ytr, 20, seed + 1, exclude=train_idx)
    train = (xtr[train_idx], ytr[train_idx])
    val = (xtr[val_idx], ytr[val_idx])
    say(f"2/3 target: scikit-learn digits, {per_class} labelled images per "
        f"class ({len(train_idx)}), {len(val_idx)} for validation, "
        f"{len(yte)} for test")
    rows, models, curves = [], {}, {}
    for label, strategy in ROWS.items():
        keras.utils.set_random_seed(seed)  # the demo's seed (--seed)
        t0 = time.time()
        net = small_cnn()
        scratch = label == "from scratch"
        if not scratch:
            net.set_weights(weights)
        model = build_classifier(net, 10, freeze=None)  # the plan decides
        plan = TrainingPlan(
            strategy=strategy, bn="train" if scratch else "frozen",
            head_epochs=0, epochs=epochs,
            optimizer=keras.optimizers.Adam(1e-3), patience=None,
            batch_size=10)
        history = fine_tune(model, train, val, plan).fine_tune
        summary = trainable_summary(model)
        rows.append(dict(
            strategy=label,
            trainable_params=int(sum(r["trainable_params"] for r in summary)),
            validation_accuracy=float(model.evaluate(*val, verbose=0)[1]),
            test_accuracy=float(model.evaluate(xte, yte, verbose=0)[1]),
            seconds=round(time.time() - t0, 1)))
        models[label] = model
        curves[label] = [float(v) for v in history.history["val_accuracy"]]
        say(f"    {label:<20} test accuracy {rows[-1]['test_accuracy']:.3f}"
            f" ({rows[-1]['seconds']:.0f} s)")
    best = max(rows, key=lambda r: r["validation_accuracy"])
    table = format_table(rows, best["strategy"])
    say("3/3 results (best by validation accuracy is exported):\n")
    say(table)
    with atomic_folder(output, "output folder", overwrite,
                       "pass --overwrite") as tmp:
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
