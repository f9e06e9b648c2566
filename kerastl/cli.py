"""The ``kerastl`` command line.

Every command has ``--help`` and exits non-zero with a one-line error on bad
input.
"""

import argparse
import os
import sys


def _quiet_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


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


def cmd_zoo_list(args):
    from kerastl.zoo import list_configs

    rows = []
    for c in list_configs():
        ref = c.reference
        top1 = f"{ref['top1'] * 100:.1f}%" if ref.get("top1") else "-"
        rows.append([c.name, c.constructor, _millions(ref.get("params")),
                     top1, c.default_size, c.min_size, c.preprocessing,
                     len(c.blocks)])
    print(_format_table(["name", "constructor", "params", "top1", "input",
                         "min", "preprocessing", "blocks"], rows))
    return 0


def cmd_zoo_show(args):
    from kerastl import load_backbone

    backbone = load_backbone(args.name, weights=None,
                             input_shape=args.input_size)
    c = backbone.config
    print(f"{c.name}: keras.applications.{c.constructor}, input "
          f"{backbone.input_shape}, preprocessing '{c.preprocessing}' "
          "(inside the model: feed RGB in [0, 255])")
    rows = [[r["block"], r["layers"], r["weighted_layers"],
             f"{r['params']:,}", r["output_layer"], r["output_shape"]]
            for r in backbone.block_table()]
    total = sum(r["params"] for r in backbone.block_table())
    print(_format_table(["block", "layers", "weighted", "params",
                         "output layer", "output shape"], rows))
    print(f"total params (without classifier): {total:,}")
    if c.endpoints:
        print("endpoints: " + ", ".join(f"{k}={v}" for k, v in
                                         c.endpoints.items()))
    return 0


def build_parser():
    parser = argparse.ArgumentParser(
        prog="kerastl",
        description="Transfer learning with Keras 3: the model zoo and its "
                    "block maps.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    zoo = sub.add_parser("zoo", help="list the zoo or show one model's blocks")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", metavar="SUBCOMMAND")
    zoo_sub.required = True
    p = zoo_sub.add_parser("list", help="all models: params, input size, "
                                        "block count")
    p.set_defaults(func=cmd_zoo_list)
    p = zoo_sub.add_parser("show", help="one model's block table (builds it "
                                        "with random weights; nothing is "
                                        "downloaded)")
    p.add_argument("name", help="model name, e.g. mobilenet_v2 or ResNet50")
    p.add_argument("--input-size", type=int, default=None,
                   help="input height and width (default: the model's own)")
    p.set_defaults(func=cmd_zoo_show)
    return parser


def main(argv=None):
    _quiet_tensorflow()
    parser = build_parser()
    args = parser.parse_args(argv)
    from kerastl.errors import KerastlError

    try:
        return args.func(args)
    except KerastlError as e:
        print(f"kerastl: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
