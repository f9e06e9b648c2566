"""The package's shape: imports point inwards, block maps travel with
models, renamed APIs keep working one release with a warning."""

import ast
import os
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
           "kagglehub", "keras_hub", "jax", "torch", "yaml"}
# The CLI imports its commands lazily so that `kerastl --help` is instant.
LAZY_MODULES = {"kerastl.cli"}
# _keras_private imports Keras internals that pull TensorFlow in lazily.
LAZY_OK_IN = {"kerastl._keras_private": {"keras"}}


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


def test_private_keras_access_lives_in_one_module():
    # `._functional`, `._inbound_nodes` ... : only _keras_private reads them.
    pattern = ("._inbound_nodes", "._nodes_by_depth", "._operations",
               "._compile_config", "._compile_loss", "._tracker",
               "._trainable_variables", "._get_variable_index")
    hits = []
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py") and f != "_keras_private.py":
                text = open(os.path.join(root, f)).read()
                hits += [f"{f}: {p}" for p in pattern if p in text]
    assert not hits, hits


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

    # A fresh process that has never heard of my_tiny_net.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("KERASTL_ZOO_PATH")
    script = textwrap.dedent(f"""
        import json, keras, kerastl
        try:
            kerastl.zoo_entry("my_tiny_net")
            raise SystemExit("the entry should be unknown here")
        except kerastl.UnknownModelError:
            pass
        model = keras.models.load_model({str(path)!r})
        bm = kerastl.block_map(model)
        print(json.dumps({{b: [l.name for l in bm.layers(b)]
                          for b in bm.names}}))
        """)
    proc = subprocess.run([sys.executable, "-c", script], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == expected


# -- renamed public names ------------------------------------------------------

def test_get_config_is_a_deprecated_alias_of_zoo_entry():
    with pytest.warns(DeprecationWarning, match="zoo_entry"):
        entry = kerastl.get_config("resnet50")
    assert entry == kerastl.zoo_entry("resnet50")


def test_lowercase_multiplier_rules_are_deprecated_aliases():
    with pytest.warns(DeprecationWarning, match="LayerDecay"):
        rule = kerastl.layer_decay(0.5)
    assert isinstance(rule, kerastl.LayerDecay) and rule.decay == 0.5
    with pytest.warns(DeprecationWarning, match="LRSpread"):
        assert isinstance(kerastl.lr_spread(0.1), kerastl.LRSpread)


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
    assert base.clone(kerastl.LinearProbe(epochs=300)).fit(x, y).score(x, y) \
        > 0.8


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
    first = kerastl.transfer_depth_sweep(backbone, data, data, epochs=1,
                                         seeds=(3,))
    assert np.random.random() == expected
    second = kerastl.transfer_depth_sweep(backbone, data, data, epochs=1,
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
