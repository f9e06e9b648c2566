"""LoRA, bias-only and norm-only tuning against head-only, partial and full
fine-tuning (offline).

Two backbones pretrained offline on digits rendered from fonts
(``kerastl.datasets.syn_digits``): a small KerasHub ViT (``ViTBackbone``,
32x32 images, 8x8 patches, 4 layers of width 128, 4 heads; ``--vit-heads
2`` gives heads of 64 dimensions as in ViT-Ti/S/B) and the demo's small CNN
(``kerastl.pretrained``). Each is transferred to three targets: scikit-learn
digits with 10 and with 50 labelled images per class, and ``digits_m`` (the
MNIST-M recipe on them) with 50 per class, over several seeds, by eight
methods on the same images and the same step budget:

* ``head``: the new head only (every backbone block frozen);
* ``partial``: the first half of the blocks frozen, the rest trained;
* ``full``: everything trained (BatchNorm frozen, kerastl's default);
* ``lora4`` / ``lora8`` / ``lora16``: ``strategy="lora"`` at that rank
  (``lora_targets="auto"``: attention query and value in the ViT, every
  convolution in the CNN);
* ``bias``: biases only (BitFit); ``norm``: normalisation layers only.

Every method runs kerastl's two phases (a head phase, then the method) and
takes the best of a grid of learning rates (AdamW; five per method, half
a decade apart; ``--rates N`` for the first N, ``--rates 1:4`` for the
middle three), chosen on a validation set
of 300 target images outside the labelled ones; the test split reports it.
Prints, per backbone and target: test accuracy (mean and spread over
seeds), trainable parameters, optimizer-state bytes and step time, then the
acceptance check of issue #37 (on the ViT: LoRA at the default rank at least
as accurate as the better of head-only and partial, within 2 points of
full, with at most 5% of full's trainable parameters and optimizer state).

    python benchmarks/peft.py [--models vit cnn] [--seeds 3] [--steps 150]
"""

import argparse
import json
import math
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kerastl  # noqa: E402
from kerastl import datasets, pretrained  # noqa: E402
from kerastl.sampling import few_shot  # noqa: E402

METHODS = ["head", "partial", "full", "lora4", "lora8", "lora16", "bias",
           "norm"]
# The two learning rates each method chooses from (on validation).
_LOW, _HIGH = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2), (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
RATES = {"head": _HIGH, "partial": _LOW, "full": _LOW, "lora": _HIGH,
         "bias": _HIGH, "norm": _HIGH}
TARGETS = {"digits10": ("digits", 10), "digits50": ("digits", 50),
           "digits_m50": ("digits_m", 50)}
DEFAULT_RANK = 8  # kerastl.lora's default
HEADS = 4  # the ViT's attention heads (--vit-heads)


# -- the backbones ---------------------------------------------------------

def vit_preset(folder, hidden=128, layers=4, heads=None):
    """A small KerasHub ViT (random weights) saved as a local preset.

    Heads of 64 dimensions, as in ViT-Ti/S/B: Keras's ``enable_lora`` on an
    attention projection (kernel ``width x heads x head_dim``) makes ``A``
    ``width x heads x rank``, so its size grows with the number of heads."""
    heads = heads or HEADS
    import keras_hub

    keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=layers,
        num_heads=heads, hidden_dim=hidden, mlp_dim=2 * hidden).save_to_preset(
            folder)
    keras_hub.layers.ViTImageConverter(
        image_size=(32, 32), scale=1 / 127.5, offset=-1.0).save_to_preset(
            folder)


def pretrained_vit(samples=8000, epochs=8, seed=0):
    """``(preset folder, backbone weights)``: the ViT pretrained on
    ``syn_digits``, cached like the demo's CNN (``KERASTL_CACHE_DIR``)."""
    cache = pretrained.cache_dir()
    heads = "" if HEADS == 4 else f"_h{HEADS}"  # (4: the first cache names)
    folder = os.path.join(cache, f"peft_vit{heads}_s{seed}")
    weights = os.path.join(
        cache, f"peft_vit{heads}_syn{samples}_e{epochs}_s{seed}_keras"
        f"{keras.__version__}.npz")
    if not os.path.isdir(folder):
        os.makedirs(cache, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cache)
        keras.utils.set_random_seed(seed)
        vit_preset(os.path.join(tmp, "vit"))
        os.replace(os.path.join(tmp, "vit"), folder)
        os.rmdir(tmp)
    if os.path.isfile(weights):
        data = np.load(weights)
        return folder, [data[f"w{i}"] for i in range(len(data.files))]
    keras.utils.set_random_seed(seed)
    backbone = kerastl.load_backbone(folder)
    source = kerastl.build_classifier(backbone, 10, freeze=False,
                                      dropout=0.0)
    steps = epochs * samples // 64
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, steps, warmup_target=1e-3, warmup_steps=steps // 10)
    source.compile(keras.optimizers.AdamW(schedule, weight_decay=0.05),
                   "sparse_categorical_crossentropy", metrics=["accuracy"])
    xs, ys = datasets.syn_digits(samples, seed=seed)
    t = time.time()
    source.fit(xs, ys, batch_size=64, epochs=epochs, verbose=0)
    xv, yv = datasets.syn_digits(1000, split="test", seed=seed)
    acc = source.evaluate(xv, yv, verbose=0)[1]
    print(f"ViT pretrained on syn_digits x{samples}, {epochs} epochs: "
          f"{time.time() - t:.0f} s, source test accuracy {acc:.3f}",
          flush=True)
    arrays = backbone.model.get_weights()
    tmp = weights + f".tmp{os.getpid()}.npz"
    np.savez(tmp, **{f"w{i}": a for i, a in enumerate(arrays)})
    os.replace(tmp, weights)
    return folder, arrays


def backbones(names):
    """name -> a function giving a fresh pretrained kerastl Backbone."""
    out = {}
    if "vit" in names:
        folder, arrays = pretrained_vit()

        def vit():
            backbone = kerastl.load_backbone(folder)
            backbone.model.set_weights(arrays)
            return backbone
        out["vit"] = vit
    if "cnn" in names:
        cnn, _, _ = pretrained.pretrained_backbone()
        arrays = cnn.get_weights()

        def small_cnn():
            model = pretrained.small_cnn()
            model.set_weights(arrays)
            return model
        out["cnn"] = small_cnn
    return out


# -- the targets -----------------------------------------------------------

def target(name, seed, validation=300):
    """``(train, validation, test)`` arrays of a target at one seed."""
    source, per_class = TARGETS[name]
    load = getattr(datasets, source)
    x, y = load("train")
    labelled = few_shot(y, per_class, seed)
    rest = np.setdiff1d(np.arange(len(y)), labelled)
    rest = np.random.default_rng(seed).permutation(rest)[:validation]
    return (x[labelled], y[labelled]), (x[rest], y[rest]), load("test")


# -- one run ---------------------------------------------------------------

def _size(variables):
    return int(sum(math.prod(v.shape) for v in variables))


def run(make_backbone, method, rate, train, steps, head_steps, seed,
        batch=32):
    """Trains one model; returns it with its main phase's figures."""
    keras.utils.set_random_seed(seed)
    model = kerastl.build_classifier(make_backbone(), 10, seed=seed)
    n = len(train[0])
    per_epoch = math.ceil(n / batch)
    strategy = {"head": "features"}.get(method, method)
    rank = None
    if method.startswith("lora"):
        strategy, rank = "lora", int(method[4:])
    settings = dict(
        strategy=strategy, lora_rank=rank, batch_size=batch, seed=seed,
        head_epochs=max(1, round(head_steps / per_epoch)),
        epochs=max(1, round(steps / per_epoch)), patience=None,
        optimizer=keras.optimizers.AdamW(rate, weight_decay=0.01),
        check_features=False)
    timer = PhaseTimer()
    t = time.time()
    kerastl.fine_tune(model, train, callbacks=[timer], **settings)
    seconds = time.time() - t
    optimizer = model.optimizer
    inner = getattr(optimizer, "inner", optimizer)
    state = [v for v in inner.variables
             if v.path.split("/")[-1] not in ("iteration", "learning_rate")]
    main_steps = settings["epochs"] * per_epoch
    return model, {
        "trainable": _size(model.trainable_weights),
        "optimizer_bytes": 4 * _size(state),
        "seconds": seconds,
        "main_step_ms": 1000 * timer.seconds[-1] / main_steps}


class PhaseTimer(keras.callbacks.Callback):
    """Seconds of each ``fit`` (fine_tune's phases), training only."""

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()

    def on_train_end(self, logs=None):
        self.seconds.append(time.perf_counter() - self.start)


def evaluate(model, data):
    return float(model.evaluate(*data, batch_size=256, verbose=0)[1])


def measure(make_backbone, method, data, steps, head_steps, seed,
            previous=None, rates=None):
    """The method at its best rate on validation: that run's test accuracy
    and costs. ``previous``: this method's record from an earlier run of
    the benchmark (``--resume``): only the rates it did not try run."""
    train, val, test = data
    family = "lora" if method.startswith("lora") else method
    best = previous
    tried = list(previous["tried"]) if previous else []
    for rate in grid(family, rates):
        if rate in tried:
            continue
        model, figures = run(make_backbone, method, rate, train, steps,
                             head_steps, seed)
        record = dict(figures, val=evaluate(model, val), rate=rate,
                      test=evaluate(model, test))
        if best is None or record["val"] > best["val"]:
            best = record
        tried.append(rate)
        keras.backend.clear_session()
    return dict(best, tried=tried)


def grid(family, rates=None):
    """The rates a method tries: all, the first N (``"3"``) or a slice
    (``"1:4"``) of its grid."""
    if rates is None:
        return RATES[family]
    if ":" in str(rates):
        a, b = (int(x) if x else None for x in str(rates).split(":"))
        return RATES[family][a:b]
    return RATES[family][:int(rates)]


# -- the report ------------------------------------------------------------

def summarise(results, models, targets, methods):
    rows = {}
    for m in models:
        for t in targets:
            print(f"\n{m} -> {t}")
            print(f"  {'method':8s} {'test acc':>15s} {'trainable':>10s} "
                  f"{'% full':>7s} {'opt state':>10s} {'step ms':>8s}")
            full = [r for r in results if r["model"] == m and r["target"] == t
                    and r["method"] == "full"]
            full_params = full[0]["trainable"] if full else None
            for method in methods:
                rs = [r for r in results if r["model"] == m and
                      r["target"] == t and r["method"] == method]
                if not rs:
                    continue
                acc = [r["test"] for r in rs]
                row = {"mean": float(np.mean(acc)), "std": float(np.std(acc)),
                       "trainable": rs[0]["trainable"],
                       "optimizer_bytes": rs[0]["optimizer_bytes"],
                       "step_ms": float(np.mean([r["main_step_ms"]
                                                 for r in rs])),
                       "seconds": float(np.mean([r["seconds"] for r in rs])),
                       "rates": [r["rate"] for r in rs]}
                rows[(m, t, method)] = row
                share = 100 * row["trainable"] / full_params \
                    if full_params else float("nan")
                print(f"  {method:8s} {row['mean']:8.3f} ± {row['std']:.3f} "
                      f"{row['trainable']:10,d} {share:6.1f}% "
                      f"{row['optimizer_bytes']:10,d} {row['step_ms']:8.1f}")
    return rows


def acceptance(rows, targets, rank=DEFAULT_RANK):
    """Issue #37's check on the ViT, per target."""
    out = []
    for t in targets:
        get = lambda method: rows.get(("vit", t, method))  # noqa: E731
        lora, head, partial, full = (get(f"lora{rank}"), get("head"),
                                     get("partial"), get("full"))
        if not all((lora, head, partial, full)):
            continue
        better = max(head["mean"], partial["mean"])
        share = lora["trainable"] / full["trainable"]
        state = lora["optimizer_bytes"] / full["optimizer_bytes"]
        met = (lora["mean"] >= better - 1e-9 and
               lora["mean"] >= full["mean"] - 0.02 and share <= 0.05 and
               state <= 0.05)
        out.append({"target": t, "lora": lora["mean"],
                    "best_of_head_partial": better, "full": full["mean"],
                    "param_share": share, "state_share": state, "met": met})
        print(f"ViT {t}: lora{rank} {lora['mean']:.3f} vs max(head, partial) "
              f"{better:.3f} and full {full['mean']:.3f}; parameters "
              f"{100 * share:.1f}% of full, optimizer state "
              f"{100 * state:.1f}%: {'met' if met else 'NOT met'}")
    return out


NAMES = {"head": "head only", "partial": "partial", "full": "full",
         "lora4": "LoRA r=4", "lora8": "LoRA r=8 (default)",
         "lora16": "LoRA r=16", "bias": "bias only", "norm": "norm only"}


def markdown(paths):
    """The docs' table (docs/peft.md) from the ``--json`` files."""
    rows = [r for p in paths for r in json.load(open(p))["rows"]]
    runs = json.load(open(paths[0]))
    models = list(dict.fromkeys(r["model"] for r in rows))
    targets = list(dict.fromkeys(r["target"] for r in rows))
    lines = []
    for m in models:
        full = {r["target"]: r for r in rows
                if r["model"] == m and r["method"] == "full"}
        lines += [f"**{'KerasHub ViT' if m == 'vit' else 'small CNN'}** "
                  f"(test accuracy, mean ± std over "
                  f"{runs['seeds']} seeds)", "",
                  "| method | " + " | ".join(targets) +
                  " | trainable parameters | optimizer state | step (ms) |",
                  "|---|" + "---:|" * (len(targets) + 3)]
        for method in METHODS:
            cells = [r for r in rows if r["model"] == m and
                     r["method"] == method]
            if not cells:
                continue
            by_target = {r["target"]: r for r in cells}
            acc = " | ".join(
                f"{by_target[t]['mean']:.3f} ± {by_target[t]['std']:.3f}"
                if t in by_target else "-" for t in targets)
            r = cells[0]
            share = r["trainable"] / full[r["target"]]["trainable"] \
                if r["target"] in full else float("nan")
            step = np.mean([c["step_ms"] for c in cells])
            lines.append(
                f"| {NAMES[method]} | {acc} | {r['trainable']:,} "
                f"({100 * share:.1f}%) | {r['optimizer_bytes'] / 1024:,.0f} "
                f"KiB | {step:.0f} |")
        lines.append("")
    print("\n".join(lines))


def main(argv=None):
    global HEADS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit", "cnn"],
                        choices=["vit", "cnn"])
    parser.add_argument("--targets", nargs="+", default=list(TARGETS),
                        choices=list(TARGETS))
    parser.add_argument("--methods", nargs="+", default=METHODS,
                        choices=METHODS)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150,
                        help="optimizer steps of the main phase")
    parser.add_argument("--head-steps", type=int, default=30,
                        help="optimizer steps of the head phase")
    parser.add_argument("--vit-heads", type=int, default=HEADS,
                        help="the ViT's attention heads (width 128; "
                             "default: 4)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--rates", default=None,
                        help="N: the first N rates of each method's grid; "
                             "A:B: a slice of it (default: all five)")
    parser.add_argument("--resume", metavar="JSON",
                        help="an earlier --json: run only the rates its "
                             "runs did not try")
    parser.add_argument("--markdown", nargs="+", metavar="JSON",
                        help="print the docs' table from --json files")
    args = parser.parse_args(argv)
    if args.markdown:
        return markdown(args.markdown)
    start = time.time()
    HEADS = args.vit_heads
    makers = backbones(args.models)
    results, earlier = [], {}
    if args.resume:
        for r in json.load(open(args.resume))["runs"]:
            family = "lora" if r["method"].startswith("lora") else r["method"]
            r.setdefault("tried", list(RATES[family][:2]))  # the first grid
            earlier[(r["model"], r["target"], r["seed"], r["method"])] = r
    for m in args.models:
        for t in args.targets:
            for seed in range(args.seeds):
                data = target(t, seed)
                for method in args.methods:
                    r = measure(makers[m], method, data, args.steps,
                                args.head_steps, seed,
                                earlier.get((m, t, seed, method)),
                                args.rates)
                    r.update(model=m, target=t, method=method, seed=seed)
                    results.append(r)
                    if args.json:  # so far: an interrupted run --resume-s
                        _write(args.json, {"runs": results,
                                           "seeds": args.seeds,
                                           "steps": args.steps})
                    print(f"  {m} {t} seed {seed} {method:7s} test "
                          f"{r['test']:.3f} (val {r['val']:.3f}, rate "
                          f"{r['rate']:g}) {r['seconds']:.0f} s", flush=True)
    rows = summarise(results, args.models, args.targets, args.methods)
    checks = acceptance(rows, args.targets)
    print(f"\ntotal {time.time() - start:.0f} s")
    out = {"rows": [dict(model=k[0], target=k[1], method=k[2], **v)
                    for k, v in rows.items()], "acceptance": checks,
           "runs": results, "seeds": args.seeds, "steps": args.steps,
           "head_steps": args.head_steps}
    if args.json:
        _write(args.json, out)
    return out


def _write(path, data):
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
