"""Every benchmark in one run: one table, one JSON file.

    python benchmarks/run.py [--full] [--only NAME ...] [--json results.json]
    python benchmarks/run.py --only NAME ... --update   # replace their rows
    python benchmarks/run.py --compare old.json new.json
    python benchmarks/run.py --markdown results.json   # docs/benchmarks.md

Quick mode (the default, about 10 minutes on 2 CPU cores) runs each
benchmark with fewer images, seeds or steps; ``--full`` with its own
defaults. Prints one table (benchmark, kerastl figure, reference figure,
ratio, target, met) and writes it as JSON (default
``benchmarks/results.json``) with the machine, the Keras backend and the git
commit, so that ``--compare`` can show two commits side by side. The
documentation's measured figures (docs/benchmarks.md and the guide pages)
come from here.

Each benchmark is also a script of its own (``python benchmarks/<name>.py
--help``) that prints more detail.
"""

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402


def _row(name, kerastl, reference, ratio, target, met, unit=""):
    return {"benchmark": name, "kerastl": kerastl, "reference": reference,
            "unit": unit, "ratio": ratio, "target": target, "met": met}


def rows_boundary(results):
    return [_row(f"partial fine-tune, frozen up to "
                 f"{r['name'].rsplit('_', 1)[1]}: boundary cache vs "
                 "end to end", r["kerastl_s"], r["reference_s"],
                 r["reference_s"] / r["kerastl_s"], "speed-up >= 3",
                 r["met"], "s") for r in results]


def rows_boundary_augmented(results):
    return [_row(f"augmented partial fine-tune, frozen up to "
                 f"{r['name'].rsplit('_', 1)[1]}: boundary cache (views) vs "
                 f"end to end (accuracy {r['accuracy_cached']:.3f} vs "
                 f"{r['accuracy_end_to_end']:.3f})", r["kerastl_s"],
                 r["reference_s"], r["reference_s"] / r["kerastl_s"],
                 "speed-up >= 2.5, accuracy within 1 point", r["met"], "s")
            for r in results]


def rows_pipeline(r):
    return [_row("image folder pipeline vs image_dataset_from_directory"
                 "+cache+prefetch", r["kerastl"], r["reference"], r["ratio"],
                 ">= 0.95", r["met"], "images/s")]


def rows_layerwise(r):
    return [_row("LayerwiseOptimizer step vs plain Adam", r["layerwise_ms"],
                 r["plain_ms"], r["ratio"], "<= 1.03", r["ratio"] <= 1.03,
                 "ms/step")]


def rows_step(results):
    return [_row(f"classifier train step vs Keras guide recipe, "
                 f"{r['setting']}", r["kerastl_ms"], r["guide_ms"],
                 r["ratio"], "<= 1.02", r["met"], "ms/step")
            for r in results]


def rows_features(r):
    return [
        _row("extract_features vs backbone.predict",
             r["extract_images_per_s"], r["predict_images_per_s"],
             r["extraction_ratio"], ">= 0.9", r["extraction_ratio"] >= 0.9,
             "images/s"),
        _row("head on cached features vs through the frozen backbone",
             r["warm_s"], r["through_backbone_s"], r["warm_speedup"],
             "speed-up >= 8", r["warm_speedup"] >= 8, "s")]


def rows_precision(results):
    base = next(r for r in results if r["name"] == "float32")
    return [_row(f"{r['name']} vs float32: accuracy (digits transfer); "
                 f"time x{r['time_ratio']:.2f}", r["accuracy"],
                 base["accuracy"], r["accuracy"] / base["accuracy"],
                 "difference <= 0.03", r["met"], "accuracy")
            for r in results if r["name"] != "float32"]


def rows_transfer(results):
    rows = []
    for k, scores in sorted(results.items()):
        best = max(v for name, v in scores.items() if name != "scratch")
        rows.append(_row(f"best transfer vs scratch, {k} labels/class",
                         best, scores["scratch"], best / scores["scratch"],
                         "> scratch", best > scores["scratch"], "accuracy"))
    return rows


def rows_depth(result):
    best = result["sweep"].best()
    sizes = sorted(best)
    depths = [best[s] for s in sizes]
    trend = all(a >= b for a, b in zip(depths, depths[1:]))
    rows = [_row("best frozen depth by labels/class "
                 + "/".join(map(str, sizes)), "/".join(map(str, depths)),
                 None, None, "does not grow with data", trend, "blocks")]
    for label, speed, target in (
            (f"small CNN 32x32, {result['speed']['size']}/class",
             result["speed"], 1.0),
            ("MobileNetV2 96x96, frozen up to stage3 / stage4",
             result["mobilenet"], 1.5)):
        rows.append(_row(
            f"transfer_depth_sweep, {label}: boundary cache vs end to end "
            f"(accuracies within {speed['max_accuracy_difference']:.3f})",
            speed["cached_s"], speed["end_to_end_s"], speed["speedup"],
            f"speed-up >= {target:g}, accuracies within 0.02",
            speed["speedup"] >= target and
            speed["max_accuracy_difference"] <= 0.02, "s"))
    return rows


def rows_domain(summary):
    rows = []
    for pair, runs in summary.items():
        dann = sum(r["acc"]["DANN + AdaBN"] for r in runs) / len(runs)
        best = sum(r["best_baseline"] for r in runs) / len(runs)
        worst = min(r["acc"]["DANN + AdaBN"] - r["best_baseline"]
                    for r in runs)
        rows.append(_row(f"DANN+AdaBN vs the best baseline, {pair}", dann,
                         best, dann / best,
                         ">= +5 points, no seed below",
                         dann - best >= 0.05 and worst >= 0, "accuracy"))
    return rows


# name: (module, quick arguments, full arguments, rows)
def rows_deploy(result):
    keras_ms = result["keras_ms"]
    return [_row(f"MobileNetV2 96x96 {r['format']} file ({r['mb']:.2f} MB): "
                 "one image vs the faster Keras call", r["ms"],
                 keras_ms, keras_ms / r["ms"], "reported", True, "ms/image")
            for r in result["rows"] if r["mb"] is not None]


def rows_peft(result):
    return [_row(f"ViT -> {r['target']}: LoRA rank 8 accuracy vs the better "
                 f"of head-only and partial ({100 * r['param_share']:.1f}% "
                 f"of full's parameters; full {r['full']:.3f})", r["lora"],
                 r["best_of_head_partial"],
                 r["lora"] / r["best_of_head_partial"],
                 ">= 1, within 2 points of full, <= 5% of its parameters",
                 r["met"], "accuracy") for r in result["acceptance"]]


def rows_recipes(rows):
    return [_row(f"default recipe vs the better of the Keras guide and a "
                 f"fastai-style recipe, {r['task']} (grid best "
                 f"{r['grid']:.3f}; time {r['defaults_s']:.0f} s vs guide "
                 f"{r['guide_s']:.0f} s)", r["defaults"],
                 max(r["guide"], r["fastai"]),
                 r["defaults"] - max(r["guide"], r["fastai"]),
                 "difference >= 0 (+2 points on average)",
                 r["defaults"] >= max(r["guide"], r["fastai"]), "accuracy")
            for r in rows]


def rows_ranking(result):
    rows = []
    for target, row in result["targets"].items():
        logme = row["methods"].get("logme")
        probe = row["methods"].get("linear_probe")
        if not logme or not probe:
            continue
        rows.append(_row(
            f"rank {len(row['accuracy'])} backbones on {target}: LogME's "
            f"weighted tau vs the linear probe's (top-1 regret "
            f"{100 * logme['regret']:.1f} points; ranking "
            f"{100 * logme['share_of_best_fine_tune']:.0f}% of fine-tuning "
            f"the best)", logme["tau"], probe["tau"],
            logme["tau"] - probe["tau"], "difference >= 0, regret <= 2",
            logme["tau"] >= probe["tau"] and logme["regret"] <= 0.02,
            "tau"))
    return rows


BENCHMARKS = {
    "boundary_cache": ("boundary_cache", ["--images", "1000"], [],
                       rows_boundary),
    "boundary_cache_augmented": ("boundary_cache",
                                 ["--images", "1000", "--augment", "light"],
                                 [], rows_boundary_augmented),
    "input_pipeline": ("input_pipeline", ["--images", "1000"], [],
                       rows_pipeline),
    "classifier_step": ("classifier_step", ["--pairs", "20"], [],
                        rows_step),
    "precision": ("precision", ["--seeds", "2", "--epochs", "10"], [],
                  rows_precision),
    "layerwise_overhead": ("layerwise_overhead", ["--pairs", "15"], [],
                           rows_layerwise),
    "feature_cache": ("feature_cache", [], [],
                      rows_features),
    "transfer_digits": ("transfer_digits",
                        ["--per-class", "1", "5", "--seeds", "2"],
                        [], rows_transfer),
    "transfer_depth": ("transfer_depth",
                       ["--sizes", "2", "50", "--seeds", "1", "--steps",
                        "100"], [], rows_depth),
    "domain_adaptation": ("domain_adaptation",
                          ["--seeds", "1", "--pairs", "syn_digits:digits"],
                          [], rows_domain),
    "deploy": ("deploy", ["--repeats", "30"], [], rows_deploy),
    "peft": ("peft", ["--models", "vit", "--targets", "digits10",
                      "--seeds", "1", "--methods", "head", "partial",
                      "full", "lora8"], [], rows_peft),
    "ranking": ("ranking", ["--targets", "digits10", "--seeds", "1",
                            "--models", "cnn_syn", "cnn_wide_syn",
                            "cnn_random", "cnn_syn_1ep", "--no-blocks",
                            "--no-save"], ["--no-save"], rows_ranking),
    "recipes": ("recipes", ["--tasks", "cnn_digits10", "--seeds", "1",
                            "--recipes", "defaults", "guide", "fastai",
                            "--no-save"], ["--no-save"],
                rows_recipes),
}


def _fmt(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def table(rows):
    head = ["benchmark", "kerastl", "reference", "unit", "ratio", "target",
            "met"]
    cells = [[r["benchmark"], _fmt(r["kerastl"]), _fmt(r["reference"]),
              r["unit"], _fmt(r["ratio"]), r["target"],
              "error" if r.get("error") else "yes" if r["met"] else "NO"]
             for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *cells)]
    line = lambda cs: "  ".join(str(c).ljust(w)  # noqa: E731
                                for c, w in zip(cs, widths)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths])]
                     + [line(c) for c in cells])


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True,
                              cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        return None


def markdown(path):
    rows = json.load(open(path))["rows"]
    lines = ["| benchmark | kerastl | reference | unit | ratio | target | met |",
             "|---|---:|---:|---|---:|---|---|"]
    lines += [f"| {r['benchmark']} | {_fmt(r['kerastl'])} | "
              f"{_fmt(r['reference'])} | {r['unit']} | {_fmt(r['ratio'])} | "
              f"{r['target']} | {'yes' if r['met'] else 'no'} |"
              for r in rows]
    print("\n".join(lines))


def compare(old_path, new_path):
    old, new = (json.load(open(p)) for p in (old_path, new_path))
    before = {r["benchmark"]: r for r in old["rows"]}
    print(f"{old.get('commit')} -> {new.get('commit')}")
    for r in new["rows"]:
        o = before.get(r["benchmark"])
        print(f"{r['benchmark']}: ratio {_fmt(o and o['ratio'])} -> "
              f"{_fmt(r['ratio'])}, met {o and o['met']} -> {r['met']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true",
                        help="each benchmark's own defaults (slow)")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS))
    parser.add_argument("--json", default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results.json"))
    parser.add_argument("--update", action="store_true",
                        help="keep the other benchmarks' rows of --json")
    parser.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"))
    parser.add_argument("--markdown", metavar="JSON",
                        help="print a results file as a Markdown table")
    args = parser.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if args.markdown:
        return markdown(args.markdown)
    rows, start = [], time.time()
    for name in args.only or BENCHMARKS:
        module, quick, full, to_rows = BENCHMARKS[name]
        print(f"\n=== {name} ({'full' if args.full else 'quick'})",
              flush=True)
        t = time.time()
        try:
            result = importlib.import_module(module).main(
                full if args.full else quick)
            new = to_rows(result)
        except Exception as e:  # one broken benchmark does not hide others
            new = [dict(_row(name, None, None, None, "-", False),
                        error=f"{type(e).__name__}: {e}")]
        for r in new:
            r["seconds"] = round(time.time() - t, 1)
        for r in new:
            r["source"] = name
        rows += new
        keras.backend.clear_session()
    if args.update and os.path.exists(args.json):
        ran = set(args.only or BENCHMARKS)
        with open(args.json) as f:
            kept = [r for r in json.load(f)["rows"]
                    if r.get("source") not in ran]
        order = list(BENCHMARKS)
        rows = sorted(kept + rows, key=lambda r: order.index(r["source"]))
    print(f"\n{time.time() - start:.0f} s in all")
    report = {"commit": _commit(), "mode": "full" if args.full else "quick",
              "backend": keras.backend.backend(),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "keras": keras.__version__, "rows": rows,
              "updated": sorted(args.only) if args.update else None}
    with open(args.json, "w") as f:
        # numpy scalars (bool_, float64) as plain JSON values
        json.dump(report, f, indent=2, default=lambda o: o.item())
    print(f"written: {args.json}")
    return report


if __name__ == "__main__":
    main()
