"""The package's shape: layers declared once and imports that respect them,
private access in one module, block maps that travel with models, a small
public API."""

import ast
import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import kerastl

PACKAGE = os.path.dirname(os.path.abspath(kerastl.__file__))

# Function-local imports of these stay allowed: they keep TensorFlow, TF Hub
# and the optional packages off ``import kerastl``'s path or out of the CLI's
# start-up.
LAZY_OK = {"tensorflow", "tensorflow_hub", "matplotlib", "sklearn", "PIL",
           "kagglehub", "keras_hub", "jax", "torch", "yaml", "onnxruntime",
           "ai_edge_litert"}
# The CLI imports its commands lazily so that `kerastl --help` is instant.
LAZY_MODULES = {"kerastl.cli"}
# _keras_private imports Keras internals that pull TensorFlow in lazily.
LAZY_OK_IN = {"kerastl._keras_private": {"keras"},
              # The CLI checks an image folder before importing Keras.
              "kerastl.image_folders": {"keras"}}


def module_name(path):
    rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3]
    parts = rel.split(os.sep)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_imports():
    """``{module: [(imported kerastl module, line, top_level)]}``."""
    modules = {}
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                modules[module_name(os.path.join(root, f))] = \
                    os.path.join(root, f)
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(open(path).read())
        top = set(id(n) for n in tree.body)
        edges = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                # `from kerastl import freezing` imports kerastl.freezing.
                targets = [f"{node.module}.{a.name}" for a in node.names
                           if f"{node.module}.{a.name}" in modules] \
                    or [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                if t in modules:
                    edges.append((t, node.lineno, id(node) in top))
        graph[name] = edges
    return graph


def test_no_import_cycle_among_kerastl_modules():
    graph = package_imports()
    # A package's __init__ re-exports its modules; the edges that matter
    # are module -> module (a cycle through kerastl/__init__ is the public
    # API importing everything).
    edges = {m: {t for t, _, _ in e if t != "kerastl" and t != m}
             for m, e in graph.items()}
    state, path = {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == "open":
                cycle = path[path.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_the_block_map_core_depends_on_nothing_peripheral():
    graph = package_imports()
    core = {t for t, _, _ in graph["kerastl.blocks"]}
    assert core <= {"kerastl._keras_private", "kerastl.errors",
                    "kerastl.spec"}, core


def test_kerastl_imports_are_at_module_level():
    graph = package_imports()
    local = [f"{m}:{line} imports {t}" for m, edges in graph.items()
             if m not in LAZY_MODULES for t, line, top in edges if not top]
    assert not local, "\n".join(local)


def test_function_local_imports_are_only_lazy_optional_packages():
    bad = []
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(root, f)
            if module_name(path) in LAZY_MODULES:
                continue
            tree = ast.parse(open(path).read())
            top = set(id(n) for n in tree.body)
            for node in ast.walk(tree):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and \
                        id(node) not in top:
                    names = [node.module] if isinstance(
                        node, ast.ImportFrom) else [a.name for a in node.names]
                    for n in names:
                        if n.split(".")[0] not in LAZY_OK | LAZY_OK_IN.get(
                                module_name(path), set()):
                            bad.append(f"{path}:{node.lineno} {n}")
    assert not bad, "\n".join(bad)


# -- the layers, declared once --------------------------------------------------

# The package's modules in layers, from the centre outwards: a module may
# import modules of its own layer and of the layers before it, never of a
# later one. The package docstring and docs/layout.md ("Project layout") show
# this list (rendered by render_layout(); `python tests/test_architecture.py`
# prints it); the tests below fail when a module imports a later layer, when
# a module is missing here, or when either document says something else.
LAYERS = [
    ("Foundation", "no Keras model code; nothing of kerastl but each other", [
        ("errors", "KerastlError and its family"),
        ("spec", "the vocabulary read without Keras: block rules, "
                 "strategies, BatchNorm modes, export inputs"),
        ("schema", "the experiment's keys, each declared once"),
        ("_keras_private", "the few private Keras attributes kerastl "
                           "touches"),
        ("_yaml", "bounded YAML reading"),
        ("atomic", "folders written whole or not at all"),
        ("network", "offline checks for downloads"),
        ("sampling", "few_shot: examples per class"),
        ("batch_order", "array batches in an order drawn from (seed, pass)"),
        ("prebuild", "a compiled model built before fit: one trace of "
                     "the train step"),
        ("rendering", "digits drawn from matplotlib's fonts"),
    ]),
    ("Block map", "what a block is", [
        ("blocks", "BlockRule, BlockMap, block_map (every model)"),
    ]),
    ("What acts on blocks", None, [
        ("distribute", "device strategies; exact losses and BN across "
                       "replicas"),
        ("freezing", "the one resolver and applier of what trains "
                     "(BatchNorm policy included), GradualUnfreezing"),
        ("peft", "LoRA (Keras's enable_lora), bias-only and norm-only "
                 "tuning by block; merge_lora; what .keras files lose"),
        ("layerwise", "LayerwiseOptimizer, LayerDecay, LRSpread"),
        ("heads", "the one head builder, pooling of maps and tokens"),
        ("boundary", "the frozen blocks run once (boundary cache)"),
    ]),
    ("Model sources", None, [
        ("preprocessing", "ImagePreprocessing: the [0, 255] input contract"),
        ("tfhub", "HubLayer: TF Hub SavedModels as Keras 3 layers"),
        ("zoo", "the YAML zoo, Keras Applications, KerasHub presets"),
        ("backbone", "load_backbone, Backbone"),
    ]),
    ("Training", None, [
        ("augment", "named augmentation policies of Keras's own layers, "
                    "on the training batches only"),
        ("plan", "TrainingPlan: how a model is fine-tuned, one value"),
        ("training", "fine_tune: the one driver"),
        ("advice", "recommend_strategy"),
    ]),
    ("Methods", None, [
        ("features", "extract_features, FeatureCache, LinearProbe, "
                     "transferability estimators"),
        ("adaptation", "GradientReversal, DANN, ADDA, AdaMatch, AdaBN, adapt "
                       "(the default recipe), selection, borrowing source "
                       "data"),
        ("analysis", "linear CKA, transfer-depth sweeps, ranking "
                     "backbones"),
        ("serving", "export: SavedModel, LiteRT and ONNX files, each run "
                    "by its runtime before it is kept; inference models"),
        ("saving", "save_model, load_model: a .keras file with kerastl's "
                   "classes, LoRA factors and trainable flags"),
    ]),
    ("Application", None, [
        ("image_folders", "image folders as checked data and tf.data "
                          "pipelines"),
        ("datasets", "offline digit domains"),
        ("pretrained", "the small CNN pretrained offline (demos, "
                       "tutorials)"),
        ("resume", "what a run keeps to resume exactly: backup, epoch log, "
                   "best checkpoint, early stopping"),
        ("experiment", "kerastl finetune: a run and its outputs"),
        ("demo", "kerastl demo"),
        ("cli", "the kerastl command (started by kerastl_cli.py)"),
    ]),
]


def render_layout(layers=LAYERS):
    """The layers as the package docstring and docs/layout.md show them."""
    lines = []
    for title, note, modules in layers:
        lines.append(f"{title} ({note})" if note else title)
        for name, text in modules:
            words, line = text.split(), f"    {name:<18}"
            for word in words:
                if len(line) + len(word) > 76 and line.strip() != name:
                    lines.append(line.rstrip())
                    line = " " * 22
                line += word + " "
            lines.append(line.rstrip())
    return "\n".join(lines)


def unit_of(module):
    """The layer unit of a module: ``kerastl.zoo.kerashub`` -> ``zoo``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def layer_violations(graph, layers=LAYERS):
    """Imports of a later layer, and modules no layer declares."""
    rank = {name: i for i, (_, _, modules) in enumerate(layers)
            for name, _ in modules}
    problems = []
    for module, edges in sorted(graph.items()):
        unit = unit_of(module)
        if unit is None:
            continue  # kerastl/__init__: the public API imports everything
        if unit not in rank:
            problems.append(f"{module} is in no layer: add it to LAYERS")
            continue
        for target, line, _ in edges:
            other = unit_of(target)
            if other is None or other == unit:
                continue
            if other not in rank:
                problems.append(f"{module}:{line} imports {target}, which "
                                "is in no layer")
            elif rank[other] > rank[unit]:
                problems.append(
                    f"{module}:{line} imports {target}: layer "
                    f"{layers[rank[other]][0]!r} is after "
                    f"{layers[rank[unit]][0]!r}")
    return problems


def test_no_module_imports_a_later_layer():
    graph = package_imports()
    assert not layer_violations(graph), "\n".join(layer_violations(graph))
    declared = {n for _, _, modules in LAYERS for n, _ in modules}
    present = {unit_of(m) for m in graph} - {None}
    assert declared == present, (declared - present, present - declared)


def test_the_layer_check_fails_on_a_planted_violation():
    planted = {"kerastl.blocks": [("kerastl.training", 12, True)],
               "kerastl.features.extract": [("kerastl.freezing", 3, True)],
               "kerastl.newmodule": [("kerastl.errors", 1, True)]}
    problems = layer_violations(planted)
    assert len(problems) == 2, problems
    assert "kerastl.blocks:12 imports kerastl.training" in problems[0]
    assert "kerastl.newmodule is in no layer" in problems[1]


def _between_markers(text, where):
    found = re.search(r"<!-- layout:start -->\n(.*?)\n<!-- layout:end -->",
                      text, re.S)
    assert found, f"{where} lost its layout markers"
    return found.group(1)


def test_docstring_and_docs_show_the_declared_layers():
    expected = render_layout()
    assert _between_markers(kerastl.__doc__, "kerastl/__init__.py") == \
        expected, "paste `python tests/test_architecture.py` into the docstring"
    page = open(os.path.join(os.path.dirname(PACKAGE), "docs",
                             "layout.md")).read()
    assert _between_markers(page, "docs/layout.md") == expected, \
        "paste `python tests/test_architecture.py` into docs/layout.md"


# -- private access: one module, checked on the syntax tree -------------------

# The one module allowed to read private Keras (and KerasHub, TensorFlow)
# attributes; everything else goes through its named accessors.
PRIVATE_OK = {"_keras_private.py"}


def private_accesses(source, path="<source>"):
    """``(line, what)`` for every private access in ``source``:

    * ``x._name`` on anything but ``self``, ``cls`` or ``super()``;
    * ``getattr``/``hasattr``/``setattr``/``delattr`` (also
      ``monkeypatch.setattr``) with a ``"_name"`` string;
    * an import of ``<package>.src`` (Keras's, KerasHub's internals);
    * ``from kerastl.<module> import _name`` (another module's private
      name; private *modules* such as ``kerastl._yaml`` are the package's
      own and may be imported).
    """
    found = []

    def private(name):
        return name.startswith("_") and not (name.startswith("__") and
                                             name.endswith("__"))

    for node in ast.walk(ast.parse(source, path)):
        if isinstance(node, ast.Attribute) and private(node.attr):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if isinstance(owner, ast.Call) and isinstance(
                    owner.func, ast.Name) and owner.func.id == "super":
                continue
            found.append((node.lineno, f".{node.attr}"))
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else \
                func.attr if isinstance(func, ast.Attribute) else None
            if name in ("getattr", "hasattr", "setattr", "delattr") and \
                    len(node.args) >= 2 and isinstance(
                        node.args[1], ast.Constant) and isinstance(
                        node.args[1].value, str) and \
                    private(node.args[1].value):
                found.append((node.lineno,
                              f"{name}(..., {node.args[1].value!r})"))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [node.module or ""] if isinstance(
                node, ast.ImportFrom) else [a.name for a in node.names]
            for module in modules:
                if "src" in module.split(".")[1:]:
                    found.append((node.lineno, f"import {module}"))
            if isinstance(node, ast.ImportFrom) and (
                    node.module or "").startswith("kerastl"):
                modules_here = package_modules()
                for alias in node.names:
                    if private(alias.name) and \
                            f"{node.module}.{alias.name}" not in modules_here:
                        found.append((node.lineno, f"from {node.module} "
                                                   f"import {alias.name}"))
    return found


def package_modules():
    names = set()
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                names.add(module_name(os.path.join(root, f)))
    return names


def test_private_access_lives_in_one_module():
    root = os.path.dirname(PACKAGE)
    hits = []
    for folder in ("kerastl", "tests", "benchmarks"):
        for dirpath, _, files in os.walk(os.path.join(root, folder)):
            for f in sorted(files):
                if not f.endswith(".py") or f in PRIVATE_OK:
                    continue
                path = os.path.join(dirpath, f)
                hits += [f"{os.path.relpath(path, root)}:{line}: {what}"
                         for line, what in private_accesses(
                             open(path).read(), path)]
    assert not hits, "\n".join(hits)


def test_the_private_access_check_fails_on_planted_violations():
    planted = textwrap.dedent("""
        import keras.src.backend
        from keras_hub.src.utils import preset_utils
        from kerastl.features.cache import _as_cache
        from kerastl import _yaml
        model._layers
        getattr(model, "_compile_config")
        monkeypatch.setattr(hub, "_TRUSTED", [])
        self._fine
        cls._fine
        super()._fine()
        model.__class__
        """)
    what = [w for _, w in private_accesses(planted)]
    assert what == ["import keras.src.backend",
                    "import keras_hub.src.utils",
                    "from kerastl.features.cache import _as_cache",
                    "._layers", "getattr(..., '_compile_config')",
                    "setattr(..., '_TRUSTED')"], what


# -- a block map travels with the model ---------------------------------------

USER_ENTRY = textwrap.dedent("""\
    name: my_tiny_net
    source: keras.applications
    constructor: MobileNetV2
    input: {default_size: 96, min_size: 32}
    preprocessing: tf
    blocks:
      - {name: early, layers: ['^Conv1', '^bn_Conv1', '^expanded_conv_']}
      - {name: late, until: out_relu}
    """)


@pytest.mark.slow
def test_keras_file_from_a_user_zoo_entry_loads_without_the_entry(
        tmp_path, monkeypatch):
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    (zoo / "my_tiny_net.yaml").write_text(USER_ENTRY)
    monkeypatch.setenv("KERASTL_ZOO_PATH", str(zoo))
    backbone = kerastl.load_backbone("my_tiny_net", weights=None,
                                     input_shape=(32, 32, 3))
    model = kerastl.build_classifier(backbone, 3)
    before = kerastl.block_map(model)
    assert before.names == ["early", "late", "head"]
    path = tmp_path / "model.keras"
    model.save(path)
    expected = {b: [l.name for l in before.layers(b)] for b in before.names}

    # The zoo no longer knows my_tiny_net (the registry follows
    # KERASTL_ZOO_PATH): the rules come from the file alone.
    monkeypatch.delenv("KERASTL_ZOO_PATH")
    with pytest.raises(kerastl.errors.UnknownModelError):
        kerastl.zoo_entry("my_tiny_net")
    keras.backend.clear_session()
    bm = kerastl.block_map(keras.models.load_model(path))
    assert {b: [l.name for l in bm.layers(b)] for b in bm.names} == expected


# -- the public API -------------------------------------------------------------

def test_removed_aliases_are_gone_and_their_replacements_work():
    # 0.1.0 ships without the aliases kept "one release" (docs/changelog.md,
    # "Changed in this release").
    for old in ("get_config", "layer_decay", "lr_spread", "frozen_blocks",
                "STRATEGIES", "hub"):
        assert not hasattr(kerastl, old), old
    assert kerastl.zoo_entry("resnet50").name == "resnet50"
    assert isinstance(kerastl.LayerDecay(0.5), kerastl.LayerDecay)
    assert isinstance(kerastl.LRSpread(0.1), kerastl.LRSpread)


def test_linear_probe_keeps_the_scikit_learn_estimator_contract():
    base = pytest.importorskip("sklearn.base")
    probe = kerastl.LinearProbe(kind="svm", C=0.5, epochs=3)
    clone = base.clone(probe)
    assert clone is not probe and clone.get_params() == probe.get_params()
    assert clone.set_params(C=2) is clone and clone.C == 2 and probe.C == 0.5
    with pytest.raises(kerastl.KerastlError, match="no parameter gamma"):
        clone.set_params(gamma=1)
    x = np.random.default_rng(0).normal(size=(40, 5)).astype("float32")
    y = (x[:, 0] > 0).astype(int)
    assert base.clone(kerastl.LinearProbe(epochs=30, learning_rate=0.1)) \
        .fit(x, y).score(x, y) > 0.8


def test_depth_sweep_leaves_the_global_random_state_alone():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(2, 3, name="c1")(inputs)
    backbone = keras.Model(inputs, x)
    rng = np.random.default_rng(0)
    data = (rng.uniform(0, 255, (8, 8, 8, 3)).astype("float32"),
            np.arange(8) % 2)
    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)
    first = kerastl.analysis.transfer_depth_sweep(backbone, data, data, epochs=1,
                                         seeds=(3,))
    assert np.random.random() == expected
    second = kerastl.analysis.transfer_depth_sweep(backbone, data, data, epochs=1,
                                          seeds=(3,))
    assert [r["accuracy"] for r in first] == [r["accuracy"] for r in second]


@pytest.mark.slow
def test_load_model_needs_no_import_to_remember(tmp_path):
    backbone = kerastl.load_backbone("mobilenet_v2", weights=None,
                                     input_shape=(32, 32, 3))
    path = tmp_path / "m.keras"
    kerastl.build_classifier(backbone, 2).save(path)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    plain = subprocess.run(
        [sys.executable, "-c", f"import keras; keras.models.load_model("
                               f"{str(path)!r})"],
        capture_output=True, text=True, env=env, timeout=300)
    assert plain.returncode != 0 and "ImagePreprocessing" in plain.stderr
    ours = subprocess.run(
        [sys.executable, "-c", f"import kerastl; m = kerastl.load_model("
                               f"{str(path)!r}); print(kerastl.block_map("
                               f"m).names[-1])"],
        capture_output=True, text=True, env=env, timeout=300)
    assert ours.returncode == 0, ours.stderr[-2000:]
    assert ours.stdout.strip().splitlines()[-1] == "head"


if __name__ == "__main__":  # the layout block for the docstring and docs
    print(render_layout())
