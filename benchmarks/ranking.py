"""How well kerastl's transferability scores pick the backbone (and the cut)
to fine-tune, on an offline zoo (issue #36).

The zoo: eleven backbones built and pretrained here, offline, once (cached
in kerastl's cache folder like the demo's CNN), that differ for real:

* architectures: small CNNs (``kerastl.pretrained.small_cnn``) of three
  widths and two depths, MobileNetV2 at 32x32 (Keras Applications), a small
  KerasHub ViT (``benchmarks/peft.py``'s);
* pretraining sources: digits rendered from fonts (``syn_digits``), the same
  restricted to the digits 0-4, and none (random weights);
* pretraining lengths: 500 images for 4 epochs, 4,000 for 1, 4,000 for 10.

Targets (labelled training images; test split of the target):

* ``digits10``: scikit-learn digits, 10 labels per class (100 images);
* ``digits100``: the same, 100 per class (1,000);
* ``digits_m50``: ``digits_m`` (the MNIST-M recipe on them), 50 per class;
* ``digits_m3``: ``digits_m`` 0/1/2, 60 per class (180 images).

Ground truth: each backbone fine-tuned on each target with kerastl's
defaults (``kerastl.fine_tune(model, train, validation, seed=seed)``: what
``kerastl finetune`` does with no flags; 300 validation images outside the
labelled ones), test accuracy, per seed. Scores: ``rank_backbones`` on the
same labelled images, per method: LogME (the default) and the regularised
H-score as ``rank_backbones`` runs them by default (on 30 images per
class on average, at least 300: a subset of ``digits100`` and ``digits_m50``),
the cross-validated linear probe (the baseline) on every image, and LogME
on every image (``logme_all``). LEEP and NCE
need each candidate's source classifier, which the random-weight members of
the zoo do not have, so they are left out here.

Per target and seed: the weighted Kendall tau (``scipy.stats.weightedtau``,
as in the LogME paper) between each method's scores and the fine-tuned
accuracies, and the top-1 regret (the best accuracy minus that of the model
ranked first); then their means over seeds. Time: ranking every model with
each method (features included, models already built) against fine-tuning
the best model.

Per block (``--blocks``): the 4-block CNN's blocks ranked by LogME and the
linear probe (``rank_backbones(blocks=True)``); the block ranked first is
the cut (frozen up to and including it), compared with
``transfer_depth_sweep`` (every number of frozen blocks, fine-tuned for
as many steps as kerastl's default main phase and scored on the test
split) on each target.

    python benchmarks/ranking.py [--targets ...] [--seeds 3] [--markdown]

The tables in the README and docs/features.md are ``--seeds 6`` (the
per-block check 3 seeds): about 15 minutes a seed on 2 CPU cores; ``--seed
N --no-blocks --json F`` runs one seed per process and ``--merge`` joins
them. ``--timing`` afterwards, on a quiet machine.

Results are written after each run (``benchmarks/ranking.json``); a rerun
skips the runs already there.
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
from kerastl.analysis import (BackboneRanking, rank_backbones,  # noqa
                              transfer_depth_sweep)

# name -> (architecture, pretraining source, samples, epochs)
ZOO = {
    "cnn_syn": ("cnn", "syn", 4000, 10),  # the demo's CNN
    "cnn_syn_1ep": ("cnn", "syn", 4000, 1),
    "cnn_syn_500": ("cnn", "syn", 500, 4),
    "cnn_syn_0to4": ("cnn", "syn_0to4", 4000, 10),
    "cnn_narrow_syn": ("cnn_narrow", "syn", 4000, 5),
    "cnn_wide_syn": ("cnn_wide", "syn", 4000, 5),
    "cnn_deep_syn": ("cnn_deep", "syn", 4000, 5),
    "cnn_random": ("cnn", None, 0, 0),
    "cnn_wide_random": ("cnn_wide", None, 0, 0),
    "mobilenet_v2_syn": ("mobilenet_v2", "syn", 4000, 5),
    "vit_syn": ("vit", "syn", 8000, 8),  # benchmarks/peft.py's
}
WIDTHS = {"cnn": (16, 32, 64), "cnn_narrow": (8, 16, 32),
          "cnn_wide": (32, 64, 128), "cnn_deep": (16, 32, 64, 128)}
# name -> (domain, labels per class, classes)
TARGETS = {"digits10": ("digits", 10, 10), "digits100": ("digits", 100, 10),
           "digits_m50": ("digits_m", 50, 10), "digits_m3": ("digits_m", 60, 3)}
METHODS = ["logme", "h_score", "linear_probe", "logme_all"]
# method -> (rank_backbones' method, max_samples): the estimators as
# rank_backbones runs them by default (30 images per class on average, at
# least 300), the linear probe (the baseline) and LogME on every image.
RUNS = {"logme": ("logme", "auto"), "h_score": ("h_score", "auto"),
        "linear_probe": ("linear_probe", None), "logme_all": ("logme", None)}
DEFAULT = "logme"
BLOCK_MODEL = "cnn_deep_syn"


# -- the zoo -----------------------------------------------------------------

def _source_data(source, samples):
    x, y = datasets.syn_digits(samples if source == "syn" else 2 * samples)
    if source == "syn_0to4":
        keep = y < 5
        x, y = x[keep][:samples], y[keep][:samples]
    return x, y


def _pretrain_cnn(name):
    arch, source, samples, epochs = ZOO[name]
    keras.utils.set_random_seed(0)
    model = pretrained.small_cnn(widths=WIDTHS[arch], name=name)
    if source is not None:
        x, y = _source_data(source, samples)
        clf = kerastl.build_classifier(model, int(y.max()) + 1, freeze=False,
                                       bn="train")
        clf.compile(keras.optimizers.Adam(2e-3),
                    "sparse_categorical_crossentropy")
        clf.fit(x, y, batch_size=64, epochs=epochs, verbose=0)
    return model


def _pretrain_mobilenet(name):
    _, source, samples, epochs = ZOO[name]
    keras.utils.set_random_seed(0)
    backbone = kerastl.load_backbone("mobilenet_v2", weights=None,
                                     input_shape=(32, 32, 3))
    model = kerastl.build_classifier(backbone, 10, freeze=False)
    kerastl.unfreeze(model, bn="train", recompile=False)
    for layer in backbone.model.layers:  # see boundary_cache.py
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    model.compile(keras.optimizers.Adam(1e-3),
                  "sparse_categorical_crossentropy")
    x, y = _source_data(source, samples)
    model.fit(x, y, batch_size=64, epochs=epochs, verbose=0)
    return backbone


def zoo(names=None):
    """name -> a function giving a fresh copy of that pretrained backbone
    (built and pretrained on the first call, then read from the cache)."""
    makers = {}
    for name in names or ZOO:
        arch = ZOO[name][0]
        if name == "cnn_syn":
            arrays = pretrained.pretrained_backbone()[0].get_weights()
        elif arch == "vit":
            import peft
            makers[name] = peft.backbones(["vit"])["vit"]
            continue
        else:
            path = os.path.join(pretrained.cache_dir(), f"ranking_{name}_keras"
                                f"{keras.__version__}.npz")
            if not os.path.isfile(path):
                start = time.perf_counter()
                built = (_pretrain_mobilenet if arch == "mobilenet_v2"
                         else _pretrain_cnn)(name)
                built = getattr(built, "model", built)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = path + f".tmp{os.getpid()}.npz"
                np.savez(tmp, *built.get_weights())
                os.replace(tmp, path)
                print(f"zoo: {name} built in "
                      f"{time.perf_counter() - start:.0f} s", flush=True)
            with np.load(path) as data:
                arrays = [data[f"arr_{i}"] for i in range(len(data.files))]
        makers[name] = _maker(arch, arrays, name)
    return makers


def _maker(arch, arrays, name):
    def make():
        if arch == "mobilenet_v2":
            model = kerastl.load_backbone("mobilenet_v2", weights=None,
                                          input_shape=(32, 32, 3))
            model.model.set_weights(arrays)
            return model
        model = pretrained.small_cnn(widths=WIDTHS[arch], name=name)
        model.set_weights(arrays)
        return model
    return make


def describe(name):
    """One line: the architecture and the pretraining of a zoo member."""
    arch, source, samples, epochs = ZOO[name]
    what = {"mobilenet_v2": "MobileNetV2 32x32",
            "vit": "ViT 4x128, 8x8 patches"}.get(
        arch, "CNN " + "-".join(map(str, WIDTHS.get(arch, ()))))
    if source is None:
        return f"{what}, random weights"
    source = {"syn": "syn_digits", "syn_0to4": "syn_digits 0-4"}[source]
    return f"{what}, {source} {samples} x {epochs} epochs"


# -- the targets -------------------------------------------------------------

def target(name, seed, validation=300):
    """``(train, validation, test, classes)`` of a target at one seed."""
    import recipes  # the same split as the recipes benchmark's tasks

    domain, per_class, classes = TARGETS[name]
    return recipes.few_shot_task(domain, per_class, classes, seed,
                                 validation=validation)


# -- the runs ----------------------------------------------------------------

def fine_tuned(make, data, seed):
    """Test accuracy and seconds of kerastl's defaults."""
    train, val, test, classes = data
    keras.utils.set_random_seed(seed)
    model = kerastl.build_classifier(make(), classes, seed=seed)
    start = time.perf_counter()
    kerastl.fine_tune(model, train, val, seed=seed)
    seconds = time.perf_counter() - start
    acc = float(model.evaluate(*test, batch_size=256, verbose=0)[1])
    keras.backend.clear_session()
    return {"test": acc, "seconds": seconds}


def ranked(makers, data, method, blocks=False):
    """Scores of every model by ``method`` and the seconds it took (the
    models built beforehand: loading is not the estimator's cost)."""
    models = {name: make() for name, make in makers.items()}
    estimator, max_samples = RUNS[method]
    start = time.perf_counter()
    rows = rank_backbones(models, data[0], method=estimator, blocks=blocks,
                          max_samples=max_samples, verbose=0)
    seconds = time.perf_counter() - start
    keras.backend.clear_session()
    return {"scores": {(f"{r['model']}/{r['block']}" if blocks else
                        r["model"]): r["score"] for r in rows
                       if r["skipped"] is None},
            "model_seconds": {r["model"]: r["seconds"] for r in rows},
            "seconds": seconds}


def depth_sweep(make, data, seed, batch_size=32):
    """Test accuracy per cut: ``transfer_depth_sweep`` with as many steps
    as kerastl's default main phase takes on these images (the sweep's own
    default, 20 epochs, leaves a head on frozen features under-trained on
    100 images: 80 steps)."""
    train, _, test, _ = data
    per_epoch = math.ceil(len(train[0]) / batch_size)
    epochs, passes = kerastl.TrainingPlan().budget(per_epoch)
    epochs *= passes  # (the sweep's epochs are passes over the data)
    sweep = transfer_depth_sweep(make(), train, test, seeds=(seed,),
                                 epochs=epochs, batch_size=batch_size)
    keras.backend.clear_session()
    return {r["frozen_up_to"]: r["accuracy"] for r in sweep}


# -- the measures --------------------------------------------------------------

def weighted_tau(scores, accuracies):
    from scipy.stats import weightedtau
    return float(weightedtau(np.asarray(scores), np.asarray(accuracies))[0])


def regret(scores, accuracies):
    scores, accuracies = np.asarray(scores), np.asarray(accuracies)
    return float(accuracies.max() - accuracies[int(np.argmax(scores))])


def summarise(results, targets, seeds, models):
    """Per target: accuracies, and per method the mean weighted tau, top-1
    regret and ranking time over seeds."""
    out = {}
    for t in targets:
        # the seeds with every model fine-tuned and ranked by every method
        done = [s for s in range(seeds)
                if all(f"ft/{t}/{m}/{s}" in results for m in models) and
                all(f"rank/{t}/{m}/{s}" in results for m in METHODS)]
        if not done:
            continue
        runs = [[results[f"ft/{t}/{m}/{s}"] for m in models] for s in done]
        acc = np.array([[r["test"] for r in seed] for seed in runs])
        ft_s = np.array([[r["seconds"] for r in seed] for seed in runs])
        row = {"accuracy": dict(zip(models, acc.mean(0).tolist())),
               "spread": dict(zip(models, (acc.max(0) - acc.min(0)).tolist())),
               "fine_tune_seconds": dict(zip(models, ft_s.mean(0).tolist())),
               "seeds": len(done), "methods": {}}
        best = int(np.argmax(acc.mean(0)))
        row["best"] = models[best]
        for method in METHODS:
            ranks = [results[f"rank/{t}/{method}/{s}"] for s in done]
            scores = np.array([[r["scores"][m] for m in models]
                               for r in ranks])
            taus = [weighted_tau(scores[i], acc[i]) for i in range(len(done))]
            regrets = [regret(scores[i], acc[i]) for i in range(len(done))]
            seconds = float(np.mean([r["seconds"] for r in ranks]))
            best_seconds = float(ft_s[:, best].mean())
            clock = results.get(f"timing/{t}")
            if clock is not None:  # measured back to back, machine quiet
                seconds, best_seconds = clock[method], clock["fine_tune"]
                row["best_fine_tune_seconds"] = best_seconds
            row["methods"][method] = {
                "tau": float(np.mean(taus)), "taus": [float(t) for t in taus],
                "regret": float(np.mean(regrets)),
                "regret_max": float(np.max(regrets)), "seconds": seconds,
                "share_of_best_fine_tune": seconds / best_seconds,
                "timed_quiet": clock is not None,
                "first": [models[int(np.argmax(scores[i]))]
                          for i in range(len(done))],
                "mean_scores": dict(zip(models, scores.mean(0).tolist()))}
        out[t] = row
    return out


def summarise_blocks(results, targets, seeds):
    out = {}
    for t in targets:
        done = [s for s in range(seeds) if f"sweep/{t}/{s}" in results and
                all(f"blocks/{t}/{m}/{s}" in results
                    for m in ("logme", "linear_probe"))]
        if not done:
            continue
        sweeps = [results[f"sweep/{t}/{s}"] for s in done]
        cuts = list(sweeps[0])
        acc = np.array([[s[c] for c in cuts] for s in sweeps])
        row = {"sweep": dict(zip(cuts, acc.mean(0).tolist())),
               "seeds": len(done),
               "best_cut": cuts[int(np.argmax(acc.mean(0)))], "methods": {}}
        for method in ("logme", "linear_probe"):
            ranks = [results[f"blocks/{t}/{method}/{s}"] for s in done]
            gaps, firsts, raw_gaps, cuts_ = [], [], [], []
            for s, r in enumerate(ranks):
                rows = [dict(model=k.split("/")[0], block=k.split("/")[1],
                             score=v, scores={method: v}, seconds=0.0,
                             skipped=None) for k, v in r["scores"].items()]
                order = [c for c in cuts if c != "-"]
                ranking = BackboneRanking(rows, [method],
                                          {rows[0]["model"]: order})
                first, cut = ranking.best["block"], ranking.freeze_up_to
                cut = cut or "-"
                firsts.append(first)
                cuts_.append(cut)
                raw_gaps.append(float(acc[s].max() - sweeps[s][first]))
                gaps.append(float(acc[s].max() - sweeps[s][cut]))
            row["methods"][method] = {
                "first": firsts, "raw_gap": float(np.mean(raw_gaps)),
                "cut": cuts_, "gap": float(np.mean(gaps))}
        out[t] = row
    return out


def report(results, targets, seeds, models):
    summary = summarise(results, targets, seeds, models)
    for t, row in summary.items():
        print(f"\n{t}: fine-tuned test accuracy (kerastl defaults, mean of "
              f"{row['seeds']} seeds; best {row['best']})")
        for m in models:
            print(f"  {m:18s} {row['accuracy'][m]:.3f} "
                  f"(spread {row['spread'][m]:.3f}, "
                  f"{row['fine_tune_seconds'][m]:.0f} s)")
        for method, r in row["methods"].items():
            print(f"  {method:13s} weighted tau {r['tau']:+.3f}  top-1 "
                  f"regret {100 * r['regret']:.1f} points (max "
                  f"{100 * r['regret_max']:.1f})  ranking {r['seconds']:.1f}"
                  f" s = {100 * r['share_of_best_fine_tune']:.0f}% of "
                  f"fine-tuning the best; first: {', '.join(r['first'])}")
    blocks = summarise_blocks(results, targets, seeds)
    for t, row in blocks.items():
        sweep = ", ".join(f"{c} {a:.3f}" for c, a in row["sweep"].items())
        print(f"\n{t}, {BLOCK_MODEL} frozen up to: {sweep}")
        for method, r in row["methods"].items():
            print(f"  {method}: ranked first {', '.join(r['first'])} "
                  f"({100 * r['raw_gap']:.1f} points below the best cut); "
                  f"recommended cut (freeze_up_to) {', '.join(r['cut'])}: "
                  f"{100 * r['gap']:.1f} points below")
    result = {"targets": summary, "blocks": blocks,
              "acceptance": acceptance(summary, blocks)}
    for line in result["acceptance"]["lines"]:
        print(line)
    return result


def acceptance(summary, blocks):
    lines = ["", "Acceptance (issue #36):"]
    d = [row["methods"].get(DEFAULT) for row in summary.values()]
    p = [row["methods"].get("linear_probe") for row in summary.values()]
    ok_regret = sum(r is not None and r["regret"] <= 0.02 for r in d)
    lines.append(f"  {DEFAULT} top-1 regret <= 2 points on {ok_regret} of "
                 f"{len(d)} targets (need 3 of 4)")
    taus = [r["tau"] for r in d if r]
    probe_taus = [r["tau"] for r in p if r]
    if taus and probe_taus:
        lines.append(f"  mean weighted tau: {DEFAULT} {np.mean(taus):+.3f}, "
                     f"linear probe {np.mean(probe_taus):+.3f} (need >=)")
        # The same difference run by run (target and seed): its standard
        # error says how much of it is the seeds.
        diffs = np.array([a - b for r, q in zip(d, p) if r and q
                          for a, b in zip(r["taus"], q["taus"])])
        if len(diffs) > 1:
            lines.append(
                f"  {DEFAULT} - linear probe, per run: {diffs.mean():+.3f} "
                f"(standard error {diffs.std(ddof=1) / np.sqrt(len(diffs)):.3f}"
                f", {len(diffs)} runs; ahead in {int((diffs > 0).sum())})")
    shares = [r["share_of_best_fine_tune"] for r in d if r]
    if shares:
        lines.append(f"  ranking time / fine-tuning the best: "
                     f"{', '.join(f'{100 * s:.1f}%' for s in shares)} "
                     f"(need <= 15%: {sum(s <= 0.15 for s in shares)} of "
                     f"{len(shares)})")
    ok_blocks = sum(r["methods"].get(DEFAULT, {}).get("gap", 1) <= 0.02
                    for r in blocks.values())
    lines.append(f"  per block: the recommended cut (the first-ranked block, "
                 f"not the last) within 2 points of the "
                 f"sweep's best on {ok_blocks} of {len(blocks)} targets "
                 f"(need 3)")
    return {"regret_targets": ok_regret, "lines": lines,
            "tau": float(np.mean(taus)) if taus else None,
            "probe_tau": float(np.mean(probe_taus)) if probe_taus else None,
            "block_targets": ok_blocks}


def markdown(results, targets, seeds, models):
    summary = summarise(results, targets, seeds, models)
    short = {"logme": "LogME", "h_score": "H-score",
             "linear_probe": "linear probe (all images)",
             "logme_all": "LogME (all images)"}
    print("| target (seeds) | best model (accuracy) | " + " | ".join(
        f"{short[m]}: tau / regret / time" for m in METHODS) + " |")
    print("|---|---|" + "---|" * len(METHODS))
    for t, row in summary.items():
        cells = []
        for m in METHODS:
            r = row["methods"].get(m)
            cells.append("-" if r is None else
                         f"{r['tau']:+.2f} / {100 * r['regret']:.1f} / "
                         f"{r['seconds']:.1f} s")
        tuning = row.get("best_fine_tune_seconds",
                         row["fine_tune_seconds"][row["best"]])
        print(f"| {t} ({row['seeds']}) | {row['best']} "
              f"({row['accuracy'][row['best']]:.3f}; fine-tuning "
              f"{tuning:.0f} s) | " + " | ".join(cells) + " |")
    print()
    print("| model | architecture, pretraining | " + " | ".join(summary) +
          " |")
    print("|---|---|" + "---:|" * len(summary))
    for m in models:
        print(f"| {m} | {describe(m)} | " + " | ".join(
            f"{row['accuracy'][m]:.3f} ± {row['spread'][m] / 2:.3f}"
            for row in summary.values()) + " |")
    blocks = summarise_blocks(results, targets, seeds)
    if blocks:
        print()
        print(f"| target (seeds) | {BLOCK_MODEL}: test accuracy frozen up to | "
              "best | LogME: first block; recommended cut | linear probe: "
              "first block; recommended cut |")
        print("|---|---|---|---|---|")
        for t, row in blocks.items():
            sweep = ", ".join(f"{c} {a:.3f}" for c, a in row["sweep"].items())
            none = {"first": ["-"], "raw_gap": 0, "cut": ["-"], "gap": 0}
            cells = [f"{'/'.join(r['first'])} ({-100 * r['raw_gap']:+.1f}); "
                     f"cut {'/'.join(r['cut'])} ({-100 * r['gap']:+.1f})"
                     for r in (row["methods"].get("logme", none),
                               row["methods"].get("linear_probe", none))]
            print(f"| {t} ({row['seeds']}) | {sweep} | {row['best_cut']} | " +
                  " | ".join(cells) + " |")
    return summary


def timing(results, args, save):
    """``timing/<target>``: seconds of ranking every model by each method
    (models built beforehand) and of fine-tuning the best model (by mean
    accuracy in ``results``), measured back to back at seed 0, the median
    of three runs each."""
    makers = zoo(args.models)
    summary = summarise(results, args.targets, args.seeds, args.models)
    for t in args.targets:
        if t not in summary:
            continue
        data = target(t, 0)
        ranked(makers, data, DEFAULT)  # warm: the first model pays TF's
        # The median of three runs of each (one run can catch a pause).
        record = {m: float(np.median([ranked(makers, data, m)["seconds"]
                                      for _ in range(3)])) for m in METHODS}
        best = summary[t]["best"]
        record["fine_tune"] = float(np.median(
            [fine_tuned(makers[best], data, 0)["seconds"] for _ in range(3)]))
        record["best"] = best
        results[f"timing/{t}"] = record
        print(f"timing/{t}: {record}", flush=True)
        save()


# -- main ----------------------------------------------------------------------

def _write(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="+", default=list(TARGETS),
                        choices=list(TARGETS))
    parser.add_argument("--models", nargs="+", default=list(ZOO),
                        choices=list(ZOO))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=None,
                        help="run this seed only (several processes can "
                             "share the work, each with its own --json; "
                             "--merge joins them)")
    parser.add_argument("--timing", action="store_true",
                        help="time ranking every model (each method) and "
                             "fine-tuning the best one, one after the other "
                             "on each target (run it on a quiet machine)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="add these results files to --json")
    parser.add_argument("--no-blocks", action="store_true",
                        help="skip the per-block check")
    parser.add_argument("--json", default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "ranking.json"))
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--report", action="store_true",
                        help="only print the tables of --json")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    results = {}
    if os.path.isfile(args.json) and not args.no_save:
        with open(args.json) as f:
            results = json.load(f)
    if args.merge:
        for path in args.merge:
            with open(path) as f:
                results.update(json.load(f))
        _write(args.json, results)
    if args.markdown:
        return markdown(results, args.targets, args.seeds, args.models)

    def save():
        if not args.no_save:
            _write(args.json, results)
    if args.timing:
        timing(results, args, save)
    elif not args.report:
        makers = zoo(args.models)
        for seed in ([args.seed] if args.seed is not None
                     else range(args.seeds)):
            for t in args.targets:
                data = target(t, seed)
                for method in METHODS:
                    key = f"rank/{t}/{method}/{seed}"
                    if key not in results:
                        results[key] = ranked(makers, data, method)
                        print(f"{key}: {results[key]['seconds']:.1f} s",
                              flush=True)
                        save()
                for m in args.models:
                    key = f"ft/{t}/{m}/{seed}"
                    if key not in results:
                        results[key] = fine_tuned(makers[m], data, seed)
                        r = results[key]
                        print(f"{key}: {r['test']:.3f} {r['seconds']:.0f} s",
                              flush=True)
                        save()
                if args.no_blocks or BLOCK_MODEL not in makers:
                    continue
                for method in ("logme", "linear_probe"):
                    key = f"blocks/{t}/{method}/{seed}"
                    if key not in results:
                        results[key] = ranked(
                            {BLOCK_MODEL: makers[BLOCK_MODEL]}, data, method,
                            blocks=True)
                        save()
                key = f"sweep/{t}/{seed}"
                if key not in results:
                    results[key] = depth_sweep(makers[BLOCK_MODEL], data, seed)
                    print(f"{key}: {results[key]}", flush=True)
                    save()
    return report(results, args.targets, args.seeds, args.models)


if __name__ == "__main__":
    main()
