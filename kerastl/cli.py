"""The ``kerastl`` command line.

Every command has ``--help`` and exits non-zero with a one-line error on bad
input. The console script starts here through ``kerastl_cli`` (outside the
package), which keeps ``--help``, ``--version`` and ``zoo list`` free of Keras
and TensorFlow; :func:`main` imports the full API before the commands that
need it.
"""

import argparse
import json
import os
import re
import sys
import warnings


def _kerastl_warnings_as_lines():
    """kerastl's own warnings ("kerastl: ...") print as one line, as the
    errors do; other packages' warnings are shown as Python shows them."""
    show = warnings.showwarning
    if getattr(show, "kerastl", False):
        return

    def showwarning(message, category, filename, lineno, file=None,
                    line=None):
        text = " ".join(str(message).split())
        if text.startswith("kerastl: "):
            print("kerastl: warning: " + _cli_terms(text[len("kerastl: "):]),
                  file=sys.stderr, flush=True)
        else:
            show(message, category, filename, lineno, file, line)

    showwarning.kerastl = True
    warnings.showwarning = showwarning


def _quiet_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _load_api(kerastl):
    """Imports kerastl's whole API: under the launcher the package is lazy,
    and its first public name imports all of it (a no-op otherwise)."""
    return kerastl.Backbone


def import_api_quietly():
    """Import kerastl's API (Keras, TensorFlow) without their start-up lines.

    TensorFlow 2.21 writes its loading messages (oneDNN, CUDA drivers) from
    C++ before its logging is set up, ignoring ``TF_CPP_MIN_LOG_LEVEL``.
    Unless you asked for TensorFlow's logs (``TF_CPP_MIN_LOG_LEVEL`` below
    3), the process's stderr goes to a temporary file during the import;
    when the import fails, what it wrote is shown with the error.
    """
    import tempfile

    import kerastl

    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") != "3" or \
            "tensorflow" in sys.modules:
        _load_api(kerastl)
        return
    sys.stderr.flush()
    log = None
    try:
        log = tempfile.TemporaryFile()
        saved = os.dup(2)
    except OSError:  # no writable temp folder, or stderr closed: just import
        if log is not None:
            log.close()
        _load_api(kerastl)
        return
    with log:
        os.dup2(log.fileno(), 2)
        try:
            _load_api(kerastl)
        except BaseException:
            os.dup2(saved, 2)
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _format_table(headers, rows):
    cols = [[str(h)] + [str(r[i]) for r in rows] for i, h in enumerate(headers)]
    widths = [max(len(c) for c in col) for col in cols]
    right = [all(str(r[i]).replace(",", "").isdigit() for r in rows) and rows
             for i in range(len(headers))]

    def line(cells):
        return "  ".join(c.rjust(w) if r else c.ljust(w)
                         for c, w, r in zip(cells, widths, right)).rstrip()

    out = [line([str(h) for h in headers]),
           "  ".join("-" * w for w in widths)]
    out += [line([str(c) for c in r]) for r in rows]
    return "\n".join(out)


def _millions(n):
    return f"{n / 1e6:.1f}M" if n else "-"


def _origin(c, markdown=False):
    """Where a zoo entry's model comes from, for the zoo tables."""
    if c.is_hub:
        return "TF Hub" if markdown else "tfhub"
    if c.is_kerashub:
        return f"KerasHub `{c.preset}`" if markdown else \
            f"kerashub:{c.preset}"
    return f"keras.applications.{c.constructor}"


def zoo_markdown_table():
    """The zoo as a Markdown table (docs/zoo.md's, kept in sync by a test)."""
    from kerastl.zoo import list_configs

    lines = ["| name | source | params | top-1 | input | min | preprocessing "
             "| blocks |", "|---|---|---:|---:|---:|---:|---|---|"]
    for c in list_configs():
        ref = c.reference
        top1 = f"{ref['top1'] * 100:.1f}%" if ref.get("top1") else "-"
        origin = _origin(c, markdown=True)
        lines.append(f"| `{c.name}` | {origin} | {_millions(ref.get('params'))} "
                     f"| {top1} | {c.default_size} | {c.min_size} | "
                     f"{c.preprocessing} | {', '.join(c.block_names)} |")
    return "\n".join(lines)


def cmd_zoo_list(args):
    from kerastl.zoo import list_configs

    if args.markdown:
        print(zoo_markdown_table())
        return 0
    rows = []
    for c in list_configs():
        ref = c.reference
        top1 = f"{ref['top1'] * 100:.1f}%" if ref.get("top1") else "-"
        origin = _origin(c)
        rows.append([c.name, origin, _millions(ref.get("params")),
                     top1, c.default_size, c.min_size, c.preprocessing,
                     len(c.blocks)])
    print(_format_table(["name", "source", "params", "top1", "input",
                         "min", "preprocessing", "blocks"], rows))
    return 0


def _show_hub(c):
    print(f"{c.name}: TF Hub {c.handle}")
    print(f"input {c.default_size}x{c.default_size} (min {c.min_size}), "
          f"preprocessing '{c.preprocessing}' (inside the model: feed RGB in "
          f"[0, 255]), {c.output_size} features")
    rows = [[r.name, "  ".join(r.variables)] for r in c.blocks]
    print(_format_table(["block", "variable regexes (re.search)"], rows))
    print("(Hub models are not built here: that needs the download. "
          "load_backbone('hub:...') checks the regexes against it.)")
    return 0


def _show_kerashub(c):
    print(f"{c.name}: KerasHub preset {c.preset} ({c.architecture})")
    print(f"input {c.default_size}x{c.default_size}, the preset's image "
          "converter inside the model: feed RGB in [0, 255]")
    rows = [[r.name, "  ".join(r.layers)] for r in c.blocks]
    print(_format_table(["block", "layer regexes ({i}: one block per "
                                  "number)"], rows))
    print("(KerasHub presets are not built here: that needs the download. "
          "load_backbone('kerashub:...') checks the blocks against it; "
          'it needs pip install "kerastl[kerashub]".)')
    return 0


def cmd_zoo_show(args):
    from kerastl.zoo import zoo_entry

    config = zoo_entry(args.name)
    if config.is_hub:  # described by its YAML entry: no Keras needed
        return _show_hub(config)
    if config.is_kerashub:
        return _show_kerashub(config)
    stored = None if args.input_size else stored_block_table(config)
    if stored is not None:  # a packaged entry at its own size: no build
        return _print_block_table(config, tuple(stored["input_shape"]),
                                  stored["rows"])
    import_api_quietly()  # a Keras Applications entry is built
    from kerastl import load_backbone

    backbone = load_backbone(args.name, weights=None,
                             input_shape=args.input_size)
    return _print_block_table(backbone.config, backbone.input_shape,
                              backbone.block_table())


# The block tables of the packaged Keras Applications entries at their
# default input size, next to their YAML files: `kerastl zoo show` prints
# them without importing TensorFlow. Written by `python
# tests/test_zoo_all.py`; that test checks them against the built models.
BLOCK_TABLES = "block_tables.json"


def stored_block_table(config):
    """``{"input_shape", "rows"}`` for a packaged Keras Applications entry
    (from :data:`BLOCK_TABLES` beside its YAML file), or None (a user's
    entry, or a table that does not describe this entry's blocks)."""
    path = os.path.join(os.path.dirname(config.path or "."), BLOCK_TABLES)
    try:
        with open(path, encoding="utf-8") as f:
            stored = json.load(f).get(config.name)
    except (OSError, ValueError, AttributeError):
        return None
    if not stored or [r["block"] for r in stored["rows"]] != list(
            config.block_names):
        return None
    return stored


def _print_block_table(c, input_shape, table):
    print(f"{c.name}: keras.applications.{c.constructor}, input "
          f"{tuple(input_shape)}, preprocessing '{c.preprocessing}' "
          "(inside the model: feed RGB in [0, 255])")
    rows = [[r["block"], r["layers"], r["weighted_layers"],
             f"{r['params']:,}", r["output_layer"],
             str(tuple(r["output_shape"]))] for r in table]
    total = sum(r["params"] for r in table)
    print(_format_table(["block", "layers", "weighted", "params",
                         "output layer", "output shape"], rows))
    print(f"total params (without classifier): {total:,}")
    if c.endpoints:
        print("endpoints: " + ", ".join(f"{k}={v}" for k, v in
                                         c.endpoints.items()))
    return 0


def _experiment(args):
    """The resolved experiment of ``kerastl finetune``'s arguments."""
    from kerastl import schema

    config = schema.load(args.config) if args.config else {}
    # Only the flags given (argparse leaves the others out): they override
    # the config file, which overrides the defaults.
    given = {k.name: k.from_text(getattr(args, k.name)) if k.choices else
             getattr(args, k.name) for k in schema.KEYS
             if hasattr(args, k.name)}
    return schema.resolve(config, given)


def check_finetune_early(args):
    """What ``kerastl finetune`` can check before Keras and TensorFlow are
    imported (seconds): the config and flags, a zoo name or a .keras file,
    and the image folder's layout (its images are decoded later)."""
    from kerastl.image_folders import scan_image_folder
    from kerastl.zoo.config import check_model_reference

    e = _experiment(args)
    check_model_reference(e["model"])  # (folders are checked when loaded)
    scan_image_folder(e["data"], decode=False)


def cmd_finetune(args):
    experiment = _experiment(args)
    from kerastl import experiment as runs

    try:
        metrics = runs.run_experiment(
            experiment, verbose=0 if args.quiet else 2,
            inputs=[args.config] if args.config else [])
    except runs.RunInterrupted as stop:  # it says what was kept
        if stop.failed:
            print(f"kerastl: error: {_cli_terms(stop.message)}",
                  file=sys.stderr)
            return 2
        print(f"kerastl: interrupted: {stop.message}", file=sys.stderr)
        return 130
    v = metrics["validation"]
    epochs = metrics["epochs_run"]
    print(f"{experiment['model']} ({experiment['strategy']}): validation "
          f"accuracy {v['accuracy']:.3f}, loss {v['loss']:.3f} after "
          f"{epochs} epoch{'s' if epochs != 1 else ''} "
          f"({metrics['seconds']:.0f} s). Outputs in {experiment['output']}")
    if metrics.get("exports"):
        from kerastl.serving import ExportReport

        for report in metrics["exports"].values():
            print("  " + ExportReport(**report).summary())
    return 0


def rank_candidates(args):
    """The zoo names (or files) ``kerastl rank`` scores: ``--models`` as
    given, every zoo entry whose name contains ``--family``, or with
    ``--all-cached`` every entry whose pretrained weights are already on
    this machine (the two together: the cached ones of that family)."""
    from kerastl.errors import KerastlError
    from kerastl.zoo import list_configs

    chosen = [bool(args.models), bool(args.family or args.all_cached)]
    if sum(chosen) != 1:
        raise KerastlError("Say which models to rank: --models a,b,c, "
                           "--family NAME (e.g. --family mobilenet) or "
                           "--all-cached (--family and --all-cached combine)"
                           ".")
    if args.models:
        return [m.strip() for m in args.models.split(",") if m.strip()]
    if args.all_cached:
        from kerastl.zoo.offline import cached_configs, keras_cache_dirs

        configs = cached_configs()
        if args.family:
            configs = [c for c in configs
                       if args.family.lower() in c.name.lower()]
        if not configs:
            family = f" of --family {args.family}" if args.family else ""
            raise KerastlError(
                f"--all-cached: no zoo model{family} has its pretrained "
                f"weights on this machine (looked in "
                f"{', '.join(keras_cache_dirs())}, the TF Hub cache "
                f"(TFHUB_CACHE_DIR) and the KerasHub cache "
                f"(KAGGLEHUB_CACHE)). Load a model once while online, or "
                f"name models with --models.")
        return [c.name for c in configs]
    family = args.family.lower()
    names = [c.name for c in list_configs() if family in c.name.lower()]
    if not names:
        raise KerastlError(f"--family {args.family}: no zoo name contains "
                           "it; see `kerastl zoo list`.")
    return names


def _max_samples(value):
    """--max-samples: auto, all, or a count of at least 2."""
    if value in ("auto", "all"):
        return None if value == "all" else value
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 2:
        raise argparse.ArgumentTypeError(
            f"{value!r}: expected auto, all, or a number of images >= 2")
    return count


def _rank_methods(value):
    """--method: estimators separated by commas."""
    from kerastl.spec import RANK_METHODS

    methods = [m.strip() for m in value.split(",") if m.strip()]
    unknown = [m for m in methods if m not in RANK_METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(
            f"{value!r}: expected one or more of {', '.join(RANK_METHODS)}, "
            "separated by commas")
    return ",".join(methods)


def _positive_int(value):
    """A count or size of at least 1."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: expected a whole "
                                         "number >= 1")
    return number


def cmd_rank(args):
    """kerastl rank --data FOLDER (--models a,b | --family F |
    --all-cached) [--blocks]."""
    import contextlib

    from kerastl.analysis import rank_backbones

    names = rank_candidates(args)
    cache = None if args.no_cache else os.path.expanduser(args.cache)
    size = (args.input_size, args.input_size, 3) if args.input_size else None
    # With --json, stdout is the JSON only: progress goes to stderr.
    out = contextlib.redirect_stdout(sys.stderr) if args.json else \
        contextlib.nullcontext()
    with out:
        ranking = rank_backbones(
            names, args.data, method=args.method.split(","),
            blocks=args.blocks,
            weights=None if args.weights == "none" else "imagenet",
            input_shape=size, cache=cache, max_samples=args.max_samples,
            verbose=1)
    if args.json:
        print(json.dumps(ranking.to_dict(), indent=1))
    else:
        print(ranking)
    return 0 if ranking.best is not None else 1


def cmd_export(args):
    """kerastl export MODEL.keras --format F [--quantize Q] [--data D]."""
    from kerastl.errors import ExportError
    from kerastl.saving import load_model
    from kerastl.serving import export, inference_model

    if args.quantize and args.format != "litert":
        raise ExportError(f"--quantize {args.quantize} is for --format "
                          "litert.")
    if args.quantize == "int8" and not args.data:
        raise ExportError(
            "--quantize int8 calibrates on your images: pass --data FOLDER "
            "(the training image folder, one subfolder per class).")
    if args.input == "bytes" and args.format != "savedmodel":
        raise ExportError("--input bytes is for --format savedmodel; LiteRT "
                          "and ONNX files take pixels: --input float or "
                          "uint8.")
    # (a DANN, AdaMatch or ADDA file: its classifier, whose input size and
    # classes --data is checked against)
    model = inference_model(load_model(args.model))
    output = args.output or "%s_%s" % (
        os.path.splitext(os.path.basename(args.model.rstrip("/")))[0],
        args.format)
    check = representative = labels = None
    if args.data:
        from kerastl.experiment import (CHECK_IMAGES, REPRESENTATIVE_IMAGES,
                                        sample_images)
        from kerastl.image_folders import (image_folder_arrays,
                                           image_folder_datasets,
                                           scan_image_folder)

        if not 0 < args.validation_split < 1:
            raise ExportError(
                f"--validation-split {args.validation_split}: expected a "
                "fraction between 0 and 1 (exclusive).")
        scan_image_folder(args.data)  # every bad file named, in one error
        size = tuple(model.inputs[0].shape[1:3])
        if None in size:
            if not args.image_size:
                raise ExportError(
                    "The model's input size is not fixed: pass --image-size "
                    "N, the side of the square images the file should "
                    "take.")
            size = (args.image_size, args.image_size)
        split = dict(validation_split=args.validation_split, seed=args.seed)
        arrays = image_folder_arrays(args.data, size, **split)
        if arrays is not None:
            train, val, names = (arrays.train, arrays.validation,
                                 arrays.class_names)
        else:  # too large to decode at once: read what is needed
            train, val = image_folder_datasets(args.data, size,
                                               batch_size=64, **split)
            names = train.class_names
        classes = model.outputs[0].shape[-1]
        if len(names) != classes:
            raise ExportError(
                f"--data {args.data} has {len(names)} classes and the model "
                f"{classes}: pass the folder it was trained on.")
        labels = list(names)
        check = sample_images(val, CHECK_IMAGES)
        if not len(check[0]):
            raise ExportError(
                f"--data {args.data}: the validation split holds no images; "
                "raise --validation-split or add images.")
        if args.quantize == "int8":
            representative = sample_images(train, REPRESENTATIVE_IMAGES)[0]
    report = export(model, output, format=args.format, input=args.input,
                    image_size=args.image_size, quantize=args.quantize,
                    representative_data=representative,
                    validation_data=check, labels=labels,
                    verify=not args.no_check, overwrite=args.overwrite)
    print(report.summary())
    return 0


def _add_experiment_flags(parser):
    """One flag per key of :data:`kerastl.schema.KEYS`, with its help,
    choices and default; a flag left out is not set (the config file or the
    default decides)."""
    from kerastl import schema

    for key in schema.KEYS:
        if key.is_switch:
            parser.add_argument(key.flag, dest=key.name, action="store_true",
                                default=argparse.SUPPRESS, help=key.help)
            continue
        default = "required" if key.required else \
            "none" if key.default is None else key.default
        # A choice stays the word given (from_text() reads it later).
        extra = {"choices": key.cli_choices()} if key.choices else \
            {"type": _text_parser(key)}
        parser.add_argument(key.flag, dest=key.name,
                            default=argparse.SUPPRESS,
                            help=f"{key.help} (default: {default})", **extra)


def _text_parser(key):
    """``key.from_text`` with argparse's error (the flag names itself)."""
    def parse(text):
        try:
            return key.from_text(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = key.name
    return parse


def cmd_demo(args):
    from kerastl.demo import run_demo
    from kerastl.errors import KerastlError

    try:
        import sklearn  # noqa: F401
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise KerastlError(
            f"kerastl demo needs the bundled offline data ({e.name} is "
            "missing): pip install 'kerastl[data]'.") from None
    run_demo(args.output, per_class=args.per_class, epochs=args.epochs,
             source_samples=args.source_samples,
             source_epochs=args.source_epochs, seed=args.seed,
             overwrite=args.overwrite)
    return 0


def _cli_terms(message):
    """The library's advice in command-line terms."""
    message = re.sub(r"input_shape=\((\d+), \d+, 3\)", r"--image-size \1",
                     message)
    message = re.sub(r"kerastl\.load_backbone\('([^']*)', weights='([^']*)'\)",
                     r"--model \1 --weights \2", message)
    message = re.sub(r"kerastl\.load_backbone\('([^']*)'\)", r"--model \1",
                     message)
    message = re.sub(r"weights=None", "--weights none", message)
    message = re.sub(r"weights='([^']*)'", r"--weights \1", message)
    message = re.sub(r"strategy='(\w+)'", r"--strategy \1", message)
    message = message.replace("pass overwrite=True", "pass --overwrite")
    message = re.sub(r"(quantize|format)='(\w+)'", r"--\1 \2", message)
    message = re.sub(r"(--(?:quantize|format) \w+) or '(\w+)'", r"\1 or \2",
                     message)
    message = message.replace(
        "pass image_size=(height, width)",
        "pass --image-size N (the side of the square images to take)")
    message = re.sub(r"image_size=(\d+)", r"--image-size \1", message)
    message = message.replace("leave image_size out",
                              "leave --image-size out")
    return message


def _version():
    from kerastl import __version__  # the package (lazy under kerastl_cli)

    return __version__


def build_parser():
    parser = argparse.ArgumentParser(
        prog="kerastl",
        description="Transfer learning with Keras 3: the model zoo, "
                    "fine-tuning on an image folder, and an offline demo.")
    parser.add_argument("--version", action="version",
                        version=f"kerastl {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    zoo = sub.add_parser("zoo", help="list the zoo or show one model's blocks")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", metavar="SUBCOMMAND")
    zoo_sub.required = True
    p = zoo_sub.add_parser("list", help="all models: params, input size, "
                                        "block count")
    p.add_argument("--markdown", action="store_true",
                   help="print the Markdown table of docs/zoo.md")
    p.set_defaults(func=cmd_zoo_list, needs_keras=False)
    p = zoo_sub.add_parser("show", help="one model's block table (stored "
                                        "for the packaged models; with "
                                        "--input-size, built with random "
                                        "weights; nothing is downloaded)")
    p.add_argument("name", help="model name, e.g. mobilenet_v2 or ResNet50")
    p.add_argument("--input-size", type=int, default=None,
                   help="input height and width (default: the model's own)")
    p.set_defaults(func=cmd_zoo_show, needs_keras=False)

    p = sub.add_parser(
        "finetune", help="fine-tune a zoo model on an image folder",
        description="Fine-tune a zoo model or your own .keras model on an "
                    "image folder (one subfolder per class). Every key of "
                    "the experiment YAML (--config) has a flag; flags "
                    "override the file. Writes model.keras, metrics.json, "
                    "checkpoints/, plots and one folder per --export format "
                    "(savedmodel/, litert/, onnx/) into --output. "
                    "'none' (or 'null') sets a key to null.")
    p.add_argument("--config", help="experiment YAML file", default=None)
    _add_experiment_flags(p)
    p.add_argument("--quiet", action="store_true",
                   help="no per-epoch progress lines")
    p.add_argument("--verbose", action="store_true",
                   help=argparse.SUPPRESS)  # progress is the default now
    p.set_defaults(func=cmd_finetune)

    from kerastl.spec import EXPORT_FORMATS, INPUT_MODES, QUANTIZATIONS

    p = sub.add_parser(
        "export", help="export a trained .keras model as a SavedModel, "
                       "LiteRT or ONNX file, checked by running it",
        description="Export a model trained earlier (a .keras file) for "
                    "serving. The written file is run by its own runtime "
                    "(LiteRT interpreter, onnxruntime, a SavedModel reload) "
                    "and compared with the Keras model before it is kept; "
                    "with --data, on that folder's validation split (the "
                    "same split as kerastl finetune with the same "
                    "--validation-split and --seed), with accuracies, and "
                    "class names go to labels.txt.")
    p.add_argument("model", help="the .keras file")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="savedmodel",
                   help="savedmodel (TF Serving), litert (.tflite: phones, "
                        "edge) or onnx (onnxruntime) (default: savedmodel)")
    p.add_argument("--quantize", choices=QUANTIZATIONS, default=None,
                   help="LiteRT only: dynamic (int8 weights), float16, or "
                        "int8 (weights and activations; needs --data)")
    p.add_argument("--input", choices=INPUT_MODES, default="float",
                   help="what the file takes: float or uint8 pixels in "
                        "[0, 255], or encoded image bytes (savedmodel only) "
                        "(default: float)")
    p.add_argument("--data", default=None,
                   help="the image folder the model was trained on: int8 "
                        "calibration, the check images and labels.txt")
    p.add_argument("--validation-split", type=float, default=0.2,
                   help="the split of --data checked on (default: 0.2)")
    p.add_argument("--seed", type=int, default=0,
                   help="the seed of that split (default: 0)")
    p.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="for a model without a fixed input size: the side "
                        "of the square images the file takes (LiteRT and "
                        "ONNX files, and --input bytes, take one size)")
    p.add_argument("--output", default=None,
                   help="the export folder (default: <model>_<format>)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier kerastl export in --output")
    p.add_argument("--no-check", action="store_true",
                   help="do not run the written file (not recommended)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "rank", help="rank backbones for your images without fine-tuning "
                     "(LogME, H-score, a linear probe)",
        description="Score each model's features of your labelled images "
                    "with a transferability estimator (higher is better) "
                    "and print the models best first. Models that cannot "
                    "be loaded (weights not downloadable offline) are "
                    "skipped with the reason.")
    p.add_argument("--data", required=True,
                   help="image folder, one subfolder per class")
    p.add_argument("--models", default=None,
                   help="comma-separated zoo names or .keras files")
    p.add_argument("--family", default=None,
                   help="every zoo model whose name contains this "
                        "(e.g. mobilenet, efficientnet)")
    p.add_argument("--all-cached", action="store_true",
                   help="every zoo model whose pretrained weights are "
                        "already on this machine (no download)")
    p.add_argument("--blocks", action="store_true",
                   help="also score every block (where to cut)")
    p.add_argument("--method", default="logme", type=_rank_methods,
                   help="logme (default), h_score, linear_probe, or several "
                        "separated by commas (the first orders the table)")
    p.add_argument("--weights", choices=("imagenet", "none"),
                   default="imagenet",
                   help="pretrained weights (default) or none (random, for "
                        "trying the command offline)")
    p.add_argument("--input-size", type=_positive_int, default=None,
                   help="input height and width (default: each model's)")
    p.add_argument("--max-samples", type=_max_samples, default="auto",
                   help="rank on about this many of the images (class "
                        "proportions kept); auto (default): 30 per class "
                        "on average, at least 300; all: every image")
    p.add_argument("--cache", default="~/.cache/kerastl/features",
                   help="feature cache folder: a second ranking of the same "
                        "models on the same data reads it "
                        "(default: ~/.cache/kerastl/features)")
    p.add_argument("--no-cache", action="store_true",
                   help="do not read or write the feature cache")
    p.add_argument("--json", action="store_true",
                   help="print the ranking as JSON")
    p.set_defaults(func=cmd_rank)

    p = sub.add_parser(
        "demo", help="the main job offline: pretrain, transfer three ways, "
                     "compare, export",
        description="Pretrain a small CNN on rendered digits (cached), "
                    "transfer it to scikit-learn's digits by feature "
                    "extraction, partial and full fine-tuning, print the "
                    "comparison, export the best model and write a report.")
    p.add_argument("--output", default="kerastl_demo",
                   help="output folder (default: kerastl_demo)")
    p.add_argument("--per-class", type=int, default=10,
                   help="labelled target images per class (default: 10)")
    p.add_argument("--epochs", type=int, default=40,
                   help="epochs per strategy (default: 40)")
    p.add_argument("--source-samples", type=int, default=4000)
    p.add_argument("--source-epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier demo output in --output")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None):
    _quiet_tensorflow()  # in case TensorFlow is not imported yet
    _kerastl_warnings_as_lines()
    parser = build_parser()
    args = parser.parse_args(argv)
    from kerastl.errors import KerastlError

    try:
        if args.func is cmd_finetune:  # the quick checks come first
            check_finetune_early(args)
        if getattr(args, "needs_keras", True):
            import_api_quietly()  # also registers kerastl's classes
        return args.func(args)
    except KeyboardInterrupt:
        print("kerastl: interrupted.", file=sys.stderr)
        return 130
    except (KerastlError, OSError) as e:
        print(f"kerastl: error: {_cli_terms(' '.join(str(e).split()))}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
