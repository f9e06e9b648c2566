"""Nothing lost, nothing silently wrong: where kerastl writes, what it
pairs, what it loads."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerastl
from kerastl import atomic
from kerastl.serving import ExportError, export_savedmodel


def tiny_classifier():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(2, 3, name="c1")(inputs)
    return kerastl.build_classifier(keras.Model(inputs, x), 2, dropout=0.0)


def snapshot(root):
    return {os.path.relpath(os.path.join(d, f), root):
            open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(root) for f in files}


# -- 1. an export never deletes a user's folder --------------------------------

@pytest.fixture
def project(tmp_path, monkeypatch):
    root = tmp_path / "project"
    (root / "src").mkdir(parents=True)
    (root / "src" / "main.py").write_text("print('mine')\n")
    (root / "README.txt").write_text("my project\n")
    monkeypatch.chdir(root / "src")
    return root


@pytest.mark.parametrize("where", ["cwd", "parent", "home", "root",
                                   "user folder", "user folder, overwrite"])
def test_export_refuses_folders_it_must_not_replace(project, monkeypatch,
                                                    tmp_path, where):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("export A=1\n")
    monkeypatch.setenv("HOME", str(home))
    user = tmp_path / "mine"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("notes")
    (user / "sub" / "data.csv").write_text("1,2\n")
    path, overwrite, match = {
        "cwd": (".", True, "the working directory"),
        "parent": ("..", True, "a parent of the working directory"),
        "home": (str(home), True, "the home folder"),
        "root": ("/", True, "a filesystem root"),
        "user folder": (str(user), False, "was not written by kerastl"),
        "user folder, overwrite": (str(user), True,
                                   "was not written by kerastl"),
    }[where]
    before = {r: snapshot(r) for r in (project, home, user)}
    with pytest.raises(ExportError, match=match):
        export_savedmodel(tiny_classifier(), path, overwrite=overwrite)
    for r, files in before.items():
        assert snapshot(r) == files
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_export_replaces_its_own_export_only_when_asked(tmp_path):
    path = tmp_path / "export"
    export_savedmodel(tiny_classifier(), path)
    assert atomic.written_by_kerastl(path)
    first = (path / "saved_model.pb").read_bytes()
    with pytest.raises(ExportError, match="overwrite=True"):
        export_savedmodel(tiny_classifier(), path)
    assert (path / "saved_model.pb").read_bytes() == first
    export_savedmodel(tiny_classifier(), path, overwrite=True)
    assert atomic.written_by_kerastl(path)
    # An empty folder is fine without overwrite.
    (tmp_path / "empty").mkdir()
    export_savedmodel(tiny_classifier(), tmp_path / "empty")


def test_outputs_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = export_savedmodel(tiny_classifier(), tmp_path / "export")
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o755


# -- 8. killed writers: no leftovers, never a missing destination ---------------

def dead_writer_leftovers(dest, pid=999999999):
    """What a writer killed between the two renames of a replacement
    leaves: its temporary folder and the old copy, made and marked as
    kerastl makes them, under the pid of a process that no longer runs."""
    import shutil
    tmp = atomic.temporary_folder(str(dest), "tmp")
    old = atomic.temporary_folder(str(dest), "old")
    shutil.rmtree(old)  # replace_folder's first rename, as it does it
    os.rename(dest, old)
    out = []
    for folder, kind in ((tmp, "tmp"), (old, "old")):
        dead = folder.replace(f"-{os.getpid()}-", f"-{pid}-")
        os.rename(folder, dead)
        atomic.write_marker(os.path.join(dead, atomic.PARTIAL), kind=kind,
                            pid=pid)
        out.append(dead)
    return out


def test_a_replacement_killed_between_its_renames_is_put_back(tmp_path):
    dest = tmp_path / "out"
    with atomic.atomic_folder(dest) as tmp:
        open(os.path.join(tmp, "v1"), "w").close()
    dead_writer_leftovers(dest)
    assert not dest.exists()
    assert len(os.listdir(tmp_path)) == 2
    atomic.recover(dest)
    assert sorted(os.listdir(dest)) == [".kerastl", "v1"]
    assert os.listdir(tmp_path) == ["out"]


# Each writer of kerastl, run in a process that stops ("paused") at the
# worst moment: before its final rename, or between the two renames of a
# replacement. The test kills it there with SIGKILL.
WRITERS = {
    "atomic": """
        with atomic.atomic_folder(DEST, overwrite=True) as tmp:
            open(os.path.join(tmp, "new"), "w").close()
    """,
    "export": """
        import keras, kerastl
        inputs = keras.Input((8, 8, 3))
        x = keras.layers.Conv2D(2, 3)(inputs)
        model = kerastl.build_classifier(keras.Model(inputs, x), 2)
        kerastl.export_savedmodel(model, DEST, overwrite=True)
    """,
    "finetune run": """
        import keras, numpy as np
        from kerastl import cli
        root = os.path.dirname(os.path.dirname(DEST))
        images, net = os.path.join(root, "img"), os.path.join(root, "n.keras")
        rng = np.random.default_rng(0)
        for c in ("a", "b"):
            os.makedirs(os.path.join(images, c), exist_ok=True)
            for j in range(4):
                keras.utils.save_img(os.path.join(images, c, f"{j}.png"),
                                     rng.integers(0, 255, (16, 16, 3)),
                                     scale=False)
        if not os.path.exists(net):  # a small user model: the run is the point
            inputs = keras.Input((16, 16, 3))
            x = keras.layers.Conv2D(4, 3, strides=2)(inputs)
            keras.Model(inputs, keras.layers.Conv2D(4, 3)(x)).save(net)
        assert cli.main(["finetune", "--model", net, "--data", images,
                         "--output", DEST, "--epochs", "1", "--head-epochs", "0",
                         "--quiet",
                         "--overwrite"]) == 0
    """,
    "cache entry": """
        import keras, numpy as np, kerastl
        inputs = keras.Input((8, 8, 3))
        model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(
            inputs), name="fixed")
        cache = kerastl.FeatureCache(os.path.dirname(DEST))
        kerastl.extract_features(model, np.ones((2, 8, 8, 3), "float32"),
                                 cache=cache, verbose=0)
    """,
}
# kerastl_cli's lazy package: `from kerastl import atomic` does not import
# Keras (the writers that need it import it themselves).
PAUSE = """
    import os, sys, time
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import kerastl_cli
    kerastl_cli.LAZY_PACKAGE = True
    from kerastl import atomic
    DEST = sys.argv[1]

    def paused(tmp, path):
        if sys.argv[2] == "between renames" and os.path.exists(path):
            import shutil                        # replace_folder's first
            old = atomic.temporary_folder(path, "old")   # rename ...
            shutil.rmtree(old)
            atomic.write_marker(os.path.join(path, atomic.PARTIAL),
                                kind="old", pid=os.getpid())
            os.rename(path, old)
        print("paused", flush=True)
        time.sleep(600)                          # ... and killed here

    atomic.replace_folder = paused
"""
ONCE = """
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import kerastl_cli
    kerastl_cli.LAZY_PACKAGE = True
    from kerastl import atomic
    DEST = sys.argv[1]
"""


@pytest.mark.slow
@pytest.mark.parametrize("writer, moment", [
    # Both moments of the one mechanism (atomic.replace_folder), then each
    # writer killed inside it: that it writes through it at all. (Each
    # writer's case starts three processes; "between renames" for the
    # export and the run repeated the atomic case at ~25 s each.)
    ("atomic", "before the rename"), ("atomic", "between renames"),
    ("export", "before the rename"),
    ("finetune run", "before the rename"),
    ("cache entry", "before the rename")])  # entries are never replaced
def test_kill_9_mid_write_leaves_nothing_after_the_next_run(tmp_path, writer,
                                                            moment):
    folder = tmp_path / "out"
    folder.mkdir()
    dest = folder / "dest"
    code = textwrap.dedent(WRITERS[writer])
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    once = [sys.executable, "-c", textwrap.dedent(ONCE) + code, str(dest)]
    if writer != "cache entry":
        subprocess.run(once, check=True, capture_output=True, env=env)
        first = snapshot(dest)
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(PAUSE) +
                             code, str(dest), moment],
                            stdout=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:  # the writer may print progress first
        if line.strip() == "paused":
            break
    else:
        pytest.fail("the writer never reached its rename")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [f for f in os.listdir(folder) if f.startswith(".")]  # leftovers
    if moment == "before the rename" and writer != "cache entry":
        assert snapshot(dest) == first  # the old version stays in place
    subprocess.run(once, check=True, capture_output=True, env=env)
    names = os.listdir(folder)
    assert not [f for f in names if f.startswith(".")], names
    if writer == "cache entry":
        assert len(names) == 1 and os.path.isfile(
            folder / names[0] / "meta.json")
    else:
        assert names == ["dest"] and atomic.written_by_kerastl(dest)


# -- 2. features keep their labels ------------------------------------------------

def labelled_images(n=32, size=8):
    """Images whose label is readable from their pixels."""
    rng = np.random.default_rng(0)
    y = np.arange(n) % 4
    x = rng.uniform(0, 10, (n, size, size, 3)).astype("float32")
    x[..., 0] += 60.0 * y[:, None, None]
    return x, y


def mean_red():
    inputs = keras.Input((8, 8, 3))
    out = keras.layers.GlobalAveragePooling2D()(inputs)
    return keras.Model(inputs, out)


def assert_aligned(features, labels):
    assert len(features) == len(labels) == 32
    np.testing.assert_array_equal(
        np.round((features[:, 0] - 5) / 60).astype(int), labels)


@pytest.mark.parametrize("cached", [False, True])
def test_labels_stay_with_their_images_in_a_reshuffling_dataset(tmp_path,
                                                                cached):
    x, y = labelled_images()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(
        64, reshuffle_each_iteration=True).batch(8)
    cache = str(tmp_path / "cache") if cached else None
    for _ in range(2):  # the second call reads the cache (when there is one)
        f, labels = kerastl.extract_features(mean_red(), ds, cache=cache,
                                             return_labels=True, verbose=0)
        assert_aligned(f, labels)


@pytest.mark.parametrize("cached", [False, True])
def test_labels_stay_aligned_with_image_dataset_from_directory(tmp_path,
                                                               cached):
    x, y = labelled_images()
    for i, (image, label) in enumerate(zip(x, y)):
        folder = tmp_path / "images" / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        keras.utils.save_img(str(folder / f"{i}.png"), image, scale=False)
    ds = keras.utils.image_dataset_from_directory(   # shuffle=True default
        str(tmp_path / "images"), image_size=(8, 8), batch_size=8,
        verbose=False)
    cache = str(tmp_path / "cache") if cached else None
    for _ in range(2):
        f, labels = kerastl.extract_features(mean_red(), ds, cache=cache,
                                             return_labels=True, verbose=0)
        # PNG rounds the pixels: recompute the label from the red channel.
        np.testing.assert_array_equal(
            np.round((f[:, 0] - 5) / 60).astype(int), labels)


# -- 3. safe mode loads no SavedModel the user has not trusted ------------------

class Evil(tf.Module):
    """A SavedModel whose forward pass writes a file (any program could)."""

    def __init__(self, target):
        super().__init__()
        self.target = target
        self.w = tf.Variable(tf.ones((3, 2)))

    @tf.function(input_signature=[tf.TensorSpec((None, 3), tf.float32)])
    def __call__(self, x):
        tf.io.write_file(self.target, "pwned")
        return tf.matmul(x, self.w)


def keras_file_with_handle(tmp_path, handle):
    """A .keras file whose HubLayer names ``handle`` (as an attacker's)."""
    import json
    import zipfile

    benign = tmp_path / "benign"
    tf.saved_model.save(Evil(str(tmp_path / "ignored")), str(benign))
    layer = kerastl.HubLayer(str(benign))
    model = keras.Sequential([keras.Input((3,)), layer])
    path = tmp_path / "evil.keras"
    model.save(path)
    with zipfile.ZipFile(path) as z:
        files = {n: z.read(n) for n in z.namelist()}
    config = json.loads(files["config.json"])
    text = json.dumps(config).replace(json.dumps(str(benign))[1:-1], handle)
    files["config.json"] = text.encode()
    with zipfile.ZipFile(path, "w") as z:
        for n, data in files.items():
            z.writestr(n, data)
    return str(path)


@pytest.mark.parametrize("handle", [
    "https://storage.googleapis.com/any-bucket/model",
    "http://tfhub.dev/google/model/1",
    "https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/feature_vector/5",
    "owner/model/tensorFlow2/variation",      # a Kaggle handle
    "a/b/c/d",                                # a missing relative path
    "PLANTED",                                # an attacker's local folder
])
def test_safe_mode_refuses_untrusted_savedmodels_and_runs_nothing(
        tmp_path, monkeypatch, handle):
    kerastl.tfhub.clear_trusted()
    monkeypatch.delenv("KERASTL_TRUSTED_HUB_PATHS", raising=False)
    monkeypatch.delenv("KERASTL_TRUSTED_HUB_HANDLES", raising=False)
    target = tmp_path / "pwned.txt"
    planted = tmp_path / "planted"
    tf.saved_model.save(Evil(str(target)), str(planted))
    if handle == "PLANTED":
        handle = str(planted)
    path = keras_file_with_handle(tmp_path, handle)
    resolved = []
    # Wherever the handle would resolve (the TF Hub cache, a Kaggle
    # download), the attacker's SavedModel is waiting.
    monkeypatch.setattr(kerastl.tfhub, "resolve_handle",
                        lambda h, **k: resolved.append(h) or str(planted))
    with pytest.raises(kerastl.KerastlError, match="trust_hub_path"):
        keras.models.load_model(path)
    assert resolved == [] and not target.exists()
    # Trusted explicitly, it loads (and runs: the user's decision).
    kerastl.trust_hub_path(handle)
    model = keras.models.load_model(path)
    model.predict(np.ones((1, 3), "float32"), verbose=0)
    assert target.exists()


# -- 4. a config file cannot blow up -------------------------------------------------

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, c in zip("abcdefgh", "bcdefghi")) + "model: *i\n"


def run_bounded(code):
    """Runs ``code`` in a process capped at 1 s of CPU time and 2 GB."""
    script = textwrap.dedent("""
        import resource, sys, time
        start = time.process_time()
        import kerastl_cli
        kerastl_cli.LAZY_PACKAGE = True  # the readers need no Keras
        import kerastl._yaml, kerastl.schema, kerastl.zoo.config
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.process_time()
    """) + textwrap.dedent(code) + textwrap.dedent("""
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
        print("cpu", time.process_time() - t0, "grown_kb", grown)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True,
                          text=True, timeout=120,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    cpu, grown = proc.stdout.split()[-3], proc.stdout.split()[-1]
    return proc.stdout, float(cpu), int(grown)


@pytest.mark.parametrize("where", ["experiment", "zoo"])
def test_an_alias_bomb_is_refused_fast_and_small(tmp_path, where):
    path = tmp_path / ("experiment.yaml" if where == "experiment"
                       else "bomb.yaml")
    path.write_text(BOMB if where == "experiment" else
                    "name: bomb\nsource: keras.applications\n" + BOMB)
    assert len(BOMB) < 700
    load = ("kerastl.schema.load" if where == "experiment"
            else "kerastl.zoo.config.load_config_file")
    out, cpu, grown_kb = run_bounded(f"""
        try:
            {load}({str(path)!r})
            print("LOADED")
        except kerastl.errors.ConfigError as e:
            print("REFUSED", str(e)[:300])
    """)
    assert "REFUSED" in out and "100,000 values" in out, out
    assert cpu < 1.0 and grown_kb < 100 * 1024, (cpu, grown_kb)


def test_error_messages_never_print_a_huge_value(tmp_path):
    from kerastl import _yaml
    value = [[["x" * 1000] * 1000] * 1000]
    assert len(_yaml.short(value)) < 200
    from kerastl import schema
    with pytest.raises(kerastl.errors.ConfigError) as e:
        schema.resolve({"model": value, "data": "d"})
    assert len(str(e.value)) < 400


# -- 5. a user zoo entry cannot replace a packaged model ------------------------

def test_a_user_entry_with_a_taken_name_is_an_error(tmp_path, monkeypatch):
    entry = textwrap.dedent("""\
        name: {name}
        source: keras.applications
        constructor: MobileNetV2
        constructor_args: {{alpha: 0.35}}
        input: {{default_size: 96, min_size: 32}}
        preprocessing: tf
        blocks:
          - {{name: stem, layers: ['^Conv1']}}
          - {{name: rest, until: out_relu}}
        """)
    monkeypatch.setenv("KERASTL_ZOO_PATH", str(tmp_path))
    # A variant of a packaged constructor under its own name: fine, and the
    # packaged name still means the packaged model.
    (tmp_path / "mobilenet_v2_035.yaml").write_text(
        entry.format(name="mobilenet_v2_035"))
    assert kerastl.zoo_entry("mobilenet_v2").name == "mobilenet_v2"
    assert kerastl.zoo_entry("MobileNetV2").name == "mobilenet_v2"
    assert kerastl.zoo_entry("mobilenet_v2_035").name == "mobilenet_v2_035"
    # Taking the packaged name is an error naming both files.
    (tmp_path / "mine.yaml").write_text(entry.format(name="mobilenet_v2"))
    with pytest.raises(kerastl.errors.ConfigError,
                       match="mine.yaml.*already taken.*mobilenet_v2"):
        kerastl.zoo_entry("mobilenet_v2")


# -- 6. no silently wrong or empty results --------------------------------------

def test_dann_data_that_would_train_zero_steps_is_refused():
    xs = np.zeros((8, 8, 8, 3), "float32")
    ys = np.zeros(8, "int64")
    with pytest.raises(kerastl.KerastlError, match="target has 0 samples"):
        kerastl.adaptation.domain_dataset((xs, ys), xs[:0], batch_size=4)
    with pytest.raises(kerastl.KerastlError,
                       match="source has 8 samples, fewer than batch_size=16"):
        kerastl.adaptation.domain_dataset((xs, ys), xs, batch_size=16)


def test_nan_features_are_refused_by_the_probe_and_extraction():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 4)).astype("float32")
    y = np.arange(20) % 2
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(kerastl.KerastlError, match="1 of 20 rows.*rows 3"):
        kerastl.LinearProbe(epochs=1).fit(bad, y)
    probe = kerastl.LinearProbe(epochs=1).fit(x, y)
    with pytest.raises(kerastl.KerastlError, match="NaN"):
        probe.score(bad, y)
    images = rng.uniform(0, 255, (4, 8, 8, 3)).astype("float32")
    images[2, 0, 0, 0] = np.nan
    with pytest.raises(kerastl.KerastlError, match="rows 2.*NaN pixels"):
        kerastl.extract_features(mean_red(), images, verbose=0)


def test_a_layerwise_optimizer_for_another_model_is_refused():
    def model(prefix):
        x = keras.Input((3,))
        h = keras.layers.Dense(2, name=f"{prefix}_low")(x)
        return keras.Model(x, keras.layers.Dense(1, name=f"{prefix}_top")(h))
    a, b = model("a"), model("b")
    opt = kerastl.LayerwiseOptimizer(keras.optimizers.SGD(0.1),
                                     {"a_low": 0.1}, a)
    b.compile(opt, "mse")
    with pytest.raises(kerastl.KerastlError, match="made for another model"):
        b.fit(np.ones((4, 3)), np.ones((4, 1)), verbose=0)


@pytest.mark.parametrize("make, match", [
    (lambda: kerastl.adaptation.GaninLambda(gamma=float("nan")), "gamma=nan"),
    (lambda: kerastl.adaptation.GaninLambda(scale=-1.0), "scale=-1.0"),
    (lambda: kerastl.adaptation.GaninLearningRate(mu0=float("inf")), "mu0=inf"),
    (lambda: kerastl.recommend_strategy(float("nan"), "high"),
     "n_labelled_per_class=nan"),
    (lambda: kerastl.recommend_strategy(10, True), "similarity=True"),
    (lambda: kerastl.datasets.digits(dtype="int8"), "dtype='int8'"),
    (lambda: kerastl.build_classifier(tiny_backbone(), 1),
     "num_classes=1 with activation='softmax'"),
])
def test_silently_wrong_inputs_are_refused(make, match):
    with pytest.raises(kerastl.KerastlError, match=match.replace(
            "(", r"\(").replace("[", r"\[")):
        make()


def tiny_backbone():
    inputs = keras.Input((8, 8, 3))
    return keras.Model(inputs, keras.layers.Conv2D(2, 3)(inputs))


def test_information_loss_refuses_logits_and_takes_them_when_told():
    logits = np.array([[2.0, -1.0, 0.5], [0.1, 3.0, -2.0]], "float32")
    with pytest.raises(kerastl.KerastlError, match="from_logits=True"):
        kerastl.adaptation.information_loss(logits)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(
        float(kerastl.adaptation.information_loss(logits, from_logits=True)),
        float(kerastl.adaptation.information_loss(probs)), rtol=1e-5)


def test_adapt_batch_norm_refuses_an_empty_target():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.BatchNormalization()(keras.layers.Conv2D(2, 3)(inputs))
    model = keras.Model(inputs, x)
    with pytest.raises(kerastl.KerastlError, match="n >= 1"):
        kerastl.adaptation.adapt_batch_norm(model, np.zeros((0, 8, 8, 3), "float32"))
    empty = tf.data.Dataset.from_tensor_slices(
        np.zeros((0, 8, 8, 3), "float32")).batch(4)
    with pytest.raises(kerastl.KerastlError, match="empty target"):
        kerastl.adaptation.adapt_batch_norm(model, empty)
    images = np.zeros((4, 8, 8, 3), "float32")
    with pytest.raises(kerastl.KerastlError, match="batch_size=1"):
        kerastl.adaptation.adapt_batch_norm(model, images, batch_size=1)
    with pytest.raises(kerastl.KerastlError, match="infinite"):
        kerastl.adaptation.adapt_batch_norm(
            model, tf.data.Dataset.from_tensor_slices(images).repeat())


def test_build_classifier_takes_numpy_integers():
    model = kerastl.build_classifier(tiny_backbone(), np.int64(3))
    assert model.output.shape == (None, 3)


def test_a_tampered_cache_entry_is_discarded_not_trusted(tmp_path):
    import json
    cache = kerastl.FeatureCache(tmp_path / "cache")
    model = mean_red()
    x = np.random.default_rng(0).uniform(0, 255, (4, 8, 8, 3)) \
        .astype("float32")
    first = kerastl.extract_features(model, x, cache=cache, verbose=0)
    (entry,) = cache.entries()
    meta_path = tmp_path / "cache" / entry / "meta.json"
    meta = json.loads(meta_path.read_text())
    secret = tmp_path / "secret.npy"
    np.save(secret, np.full((4, 3), 7.0, "float32"))
    meta["arrays"]["features/output"]["file"] = "../../secret.npy"
    meta_path.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="not a file of the entry"):
        again = kerastl.extract_features(model, x, cache=cache,
                                         verbose=0)
    np.testing.assert_array_equal(again, first)
    # An entry renamed to another request's key is discarded as well.
    other = kerastl.extract_features(model, x[:2], cache=cache,
                                     verbose=0)
    entries = cache.entries()
    meta = json.loads((tmp_path / "cache" / entries[0] / "meta.json")
                      .read_text())
    assert len(entries) == 2 and other.shape == (2, 3)
    a, b = (tmp_path / "cache" / e for e in entries)
    os.rename(a, tmp_path / "cache" / "swap")
    os.rename(b, a)
    os.rename(tmp_path / "cache" / "swap", b)
    with pytest.warns(UserWarning, match="key parts"):
        np.testing.assert_array_equal(
            kerastl.extract_features(model, x, cache=cache, verbose=0),
            first)


def test_cache_clear_deletes_only_entries(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    cache = kerastl.FeatureCache(tmp_path)
    kerastl.extract_features(mean_red(), np.zeros((2, 8, 8, 3), "float32"),
                             cache=cache, verbose=0)
    assert len(cache.entries()) == 1
    cache.clear()
    assert cache.entries() == [] and (tmp_path / "mine.txt").exists()


# -- round two --------------------------------------------------------------------
# 4. only what kerastl wrote is ever replaced, cleaned up or renamed

def user_folder(path, marker=None):
    """A user's folder with files (and, optionally, a planted marker)."""
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("mine")
    (path / "sub" / "data.csv").write_text("1,2\n")
    if marker == "empty":
        (path / atomic.MARKER).write_text("")
    elif marker == "symlink":
        real = path.parent / "real_marker"
        real.write_text('{"written_by": "kerastl"}')
        os.symlink(real, path / atomic.MARKER)
    elif marker == "not json":
        (path / atomic.MARKER).write_text("kerastl")
    return path


@pytest.mark.parametrize("marker", ["empty", "symlink", "not json"])
def test_a_planted_marker_does_not_make_a_folder_kerastls(tmp_path, marker):
    folder = user_folder(tmp_path / "mine", marker)
    before = snapshot(folder)
    assert not atomic.written_by_kerastl(folder)
    with pytest.raises(ExportError, match="not written by kerastl"):
        export_savedmodel(tiny_classifier(), folder, overwrite=True)
    assert snapshot(folder) == before


@pytest.mark.parametrize("name", [".model.tmp-backup", ".model.old-2024",
                                  ".model.tmp-123-abcdefgh",
                                  ".model.old-123-abcdefgh"])
def test_folders_named_like_leftovers_are_not_touched(tmp_path, name):
    """Only folders kerastl made (its name pattern and its
    .kerastl-partial file inside) count as leftovers."""
    user = user_folder(tmp_path / name)
    before = snapshot(user)
    export_savedmodel(tiny_classifier(), tmp_path / "model")
    export_savedmodel(tiny_classifier(), tmp_path / "model", overwrite=True)
    assert snapshot(user) == before
    assert sorted(os.listdir(tmp_path)) == sorted([name, "model"])


def test_an_export_through_a_symlink_is_refused_and_leaves_nothing(tmp_path):
    export_savedmodel(tiny_classifier(), tmp_path / "real")
    os.symlink(tmp_path / "real", tmp_path / "link")
    with pytest.raises(ExportError, match="symbolic link"):
        export_savedmodel(tiny_classifier(), tmp_path / "link",
                          overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]
    assert atomic.written_by_kerastl(tmp_path / "real")


def test_cache_clear_deletes_only_the_entries_kerastl_wrote(tmp_path):
    cache = kerastl.FeatureCache(tmp_path)
    kerastl.extract_features(mean_red(), np.zeros((2, 8, 8, 3), "float32"),
                             cache=cache, verbose=0)
    # A user's folder that holds a meta.json, even under a key-like name.
    for name in ("results", "0123456789abcdef0123456789abcdef"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "meta.json").write_text('{"experiment": 1}')
        (tmp_path / name / "table.csv").write_text("1,2\n")
    before = {n: snapshot(tmp_path / n) for n in
              ("results", "0123456789abcdef0123456789abcdef")}
    assert len(cache.entries()) == 1
    cache.clear()
    assert cache.entries() == []
    for name, files in before.items():
        assert snapshot(tmp_path / name) == files


def test_resume_onto_a_folder_with_stray_run_files_deletes_nothing(
        tmp_path, capsys):
    from conftest import write_folder
    from kerastl import cli

    data = write_folder(tmp_path / "images", per_class=3, size=16)
    out = user_folder(tmp_path / "run", "empty")
    (out / "INTERRUPTED.json").write_text('{"interrupted": true}')
    (tmp_path / ".run.backup").mkdir()
    before = snapshot(out)
    code = cli.main(["finetune", "--model", "mobilenet_v2", "--data",
                     str(data), "--output", str(out), "--resume"])
    assert code == 2
    assert "Nothing to resume" in capsys.readouterr().err
    assert snapshot(out) == before
    assert os.listdir(tmp_path / ".run.backup") == []


# 6. trusting a TF Hub path takes an absolute one

@pytest.mark.parametrize("path", ["", "  ", "models/m", "."])
def test_trust_refuses_empty_and_relative_paths(path, monkeypatch):
    with pytest.raises(kerastl.KerastlError, match="absolute path"):
        kerastl.trust_hub_path(path)
    monkeypatch.setenv("KERASTL_TRUSTED_HUB_PATHS", "models/m")
    with pytest.raises(kerastl.KerastlError,
                       match="KERASTL_TRUSTED_HUB_PATHS: 'models/m' is a "
                             "relative path"):
        kerastl.tfhub.is_trusted("/some/where")


# 7. the boundary cache judges "random" by behaviour

class DrawsWithTensorFlow(keras.layers.Layer):
    """Noise from tf.random: no SeedGenerator for a type check to see."""

    def call(self, x, training=False):
        return x + tf.random.uniform(tf.shape(x)) if training else x


class DrawsWithKerasRandom(keras.layers.Layer):
    """Noise from keras.random without a seed generator."""

    def call(self, x):
        return x + keras.random.normal(keras.ops.shape(x))


@pytest.mark.parametrize("layer", [DrawsWithTensorFlow, DrawsWithKerasRandom])
def test_the_boundary_cache_refuses_a_prefix_that_behaves_randomly(layer):
    inputs = keras.Input((8, 8, 3))
    x = layer()(inputs)
    x = keras.layers.Conv2D(2, 3, name="c1")(x)
    x = keras.layers.Conv2D(2, 3, strides=2, name="c2")(x)
    model = kerastl.build_classifier(keras.Model(inputs, x), 2, freeze=None)
    data = (np.random.default_rng(0).uniform(0, 255, (8, 8, 8, 3))
            .astype("float32"), np.arange(8) % 2)
    history = kerastl.fine_tune(model, data, freeze_up_to=1, head_epochs=0,
                                epochs=1, check_features=False).fine_tune
    assert "different outputs for the same images" in history.boundary_cache
    with pytest.raises(kerastl.errors.BoundaryCacheError,
                       match="different outputs"):
        kerastl.fine_tune(model, data, freeze_up_to=1, head_epochs=0,
                          epochs=1, boundary_cache=True,
                          check_features=False)


# 8. sharding refuses data that reshuffles on every pass

def test_sharding_refuses_a_reshuffling_dataset(tmp_path):
    x, y = labelled_images()
    data = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(32, seed=1) \
        .batch(8)
    with pytest.raises(kerastl.KerastlError, match="another order on every "
                                                   "pass.*Shard before"):
        kerastl.extract_features(mean_red(), data, cache=tmp_path / "c",
                                 shard=(0, 2), verbose=0)
    once = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(
        32, seed=1, reshuffle_each_iteration=False).batch(8)
    kerastl.extract_features(mean_red(), once, cache=tmp_path / "c",
                             shard=(0, 2), verbose=0)


# 9. no more silent results

def test_with_a_chief_only_the_chief_writes(monkeypatch):
    import json
    import types

    from kerastl import distribute

    cluster = {"chief": ["localhost:1"], "worker": ["localhost:2",
                                                    "localhost:3"]}
    for task, writes in ((("chief", 0), True), (("worker", 0), False),
                         (("worker", 1), False)):
        monkeypatch.setenv("TF_CONFIG", json.dumps(
            {"cluster": cluster, "task": {"type": task[0],
                                          "index": task[1]}}))
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        strategy = types.SimpleNamespace(cluster_resolver=resolver)
        assert distribute.is_chief(strategy) is writes, task
    # Without a chief, worker 0 writes.
    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": {"worker": cluster["worker"]},
         "task": {"type": "worker", "index": 0}}))
    strategy = types.SimpleNamespace(
        cluster_resolver=tf.distribute.cluster_resolver
        .TFConfigClusterResolver())
    assert distribute.is_chief(strategy)


def test_a_layerwise_optimizer_for_a_model_sharing_only_the_head_is_refused():
    """Two kerastl classifiers share their head's layer names: the table
    must cover every variable, not just one."""
    def classifier(width):
        inputs = keras.Input((8, 8, 3))
        x = keras.layers.Conv2D(width, 3)(inputs)
        return kerastl.build_classifier(keras.Model(inputs, x), 2,
                                        freeze=False)
    a, b = classifier(2), classifier(3)
    opt = kerastl.LayerwiseOptimizer(keras.optimizers.SGD(0.1),
                                     kerastl.LayerDecay(0.5), a)
    b.compile(opt, "sparse_categorical_crossentropy")
    with pytest.raises(kerastl.KerastlError,
                       match=r"made for another model, or before layers were "
                             r"added to this one: \d+ of the \d+"):
        b.fit(np.ones((4, 8, 8, 3)), np.zeros(4), verbose=0)


def test_dann_refuses_nan_images():
    x = np.zeros((8, 8, 8, 3), "float32")
    bad = x.copy()
    bad[3, 0, 0, 0] = np.nan
    with pytest.raises(kerastl.KerastlError,
                       match="target images hold NaN.*image 3"):
        kerastl.adaptation.domain_dataset((x, np.zeros(8)), bad,
                                          batch_size=4)
    with pytest.raises(kerastl.KerastlError, match="source images hold NaN"):
        kerastl.adaptation.domain_dataset((bad, np.zeros(8)), x,
                                          batch_size=4)


def test_select_model_refuses_logits_nan_and_a_pair_and_reports_ties():
    import warnings

    def net(scale, softmax=True):
        inputs = keras.Input((4,))
        x = keras.layers.Dense(3, kernel_initializer=keras.initializers
                               .Constant(scale))(inputs)
        if softmax:
            x = keras.layers.Softmax()(x)
        return keras.Model(inputs, x)
    xt = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    trio = {"a": net(0.1), "b": net(0.2), "c": net(0.3)}
    with pytest.raises(kerastl.KerastlError, match="logits"):
        kerastl.adaptation.select_model(dict(trio, c=net(0.3, False)),
                                        target=xt)
    nan = xt.copy()
    nan[2, 1] = np.nan
    with pytest.raises(kerastl.KerastlError, match="NaN.*image 2"):
        kerastl.adaptation.select_model(trio, target=nan)
    with pytest.raises(kerastl.KerastlError, match="2 candidate"):
        kerastl.adaptation.select_model({"a": trio["a"], "b": trio["b"]},
                                        target=xt)
    same = {"y": net(0.1), "x": net(0.1), "z": net(0.1)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        choice = kerastl.adaptation.select_model(same, target=xt)
    assert choice.best == "x"
    # (reported at the caller's line)
    assert any("score exactly the same" in str(w.message)
               and w.filename == __file__ for w in caught)
    # The ranking and the table break the tie the same way.
    assert choice.ranking() == ["x", "y", "z"]
    assert choice.table().splitlines()[1].endswith("<- chosen")
    # An argument the method does not take is an error, not ignored.
    with pytest.raises(kerastl.KerastlError, match="'ensemble' takes no "
                       "'score' argument"):
        kerastl.adaptation.select_model(trio, target=xt, score="confidence")


def test_a_cache_file_rewritten_with_the_same_shape_is_not_served(tmp_path):
    cache = kerastl.FeatureCache(tmp_path / "cache")
    x, _ = labelled_images()
    model = mean_red()
    first = kerastl.extract_features(model, x, cache=cache, verbose=0)
    (entry,) = cache.entries()
    meta = json.loads((tmp_path / "cache" / entry / "meta.json").read_text())
    file = tmp_path / "cache" / entry / meta["arrays"]["features/output"][
        "file"]
    np.save(file, np.full_like(first, 7.0))  # same shape, same size
    with pytest.warns(UserWarning, match="changed after it was written"):
        again = kerastl.extract_features(model, x, cache=cache, verbose=0)
    np.testing.assert_array_equal(again, first)


# 10. extraction works on Sequential models again

def test_extract_features_of_a_sequential_model():
    model = keras.Sequential([keras.Input((8, 8, 3)),
                              keras.layers.Conv2D(2, 3),
                              keras.layers.GlobalAveragePooling2D()])
    x = np.ones((4, 8, 8, 3), "float32")
    np.testing.assert_allclose(kerastl.extract_features(model, x, verbose=0),
                               model.predict(x, verbose=0), rtol=1e-6)
    unbuilt = keras.Sequential([keras.layers.Conv2D(2, 3)])
    with pytest.raises(kerastl.KerastlError, match="keras.Input"):
        kerastl.extract_features(unbuilt, x, verbose=0)
