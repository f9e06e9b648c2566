"""More than one device: each training equals the single-device run.

The jobs (tests/distributed_jobs.py) train on the same global batches from
the same weights; each runs in a fresh process, because logical devices,
TF_CONFIG and the Keras backend are fixed when a process starts.

Tolerance: every weight within ``1e-5 + 1e-4 x |w|`` of the single-device
run's. Replicas sum their gradients in another order than one device
does, so results agree to float32 rounding (measured: 3e-8 to 1.2e-6 after
12 steps), not to the bit. The DANN runs use SGD and GaninLambda up to 0.3:
under Adam (which divides by sqrt(v) where a gradient is ~0) or at full
reversal strength (an adversarial game), rounding grows to 1e-3 within a
few steps between any two runs that sum in another order, one device
against another included.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

# One worker runs this module (pytest-xdist), and its costly fixtures are
# session-scoped: computed once, however the worker interleaves modules.
pytestmark = pytest.mark.xdist_group("distribute")

TESTS = os.path.dirname(os.path.abspath(__file__))
JOBS = os.path.join(TESTS, "distributed_jobs.py")


def test_this_modules_tests_share_one_worker(request):
    """The session fixtures below cost about 30 s each, once per worker that
    runs this module: ``--dist loadgroup`` (pytest.ini) must send the whole
    group to one worker. pytest 9.2 drops the ``@group`` suffix xdist uses
    for that (pytest-dev/pytest-xdist#1386), and the run silently takes
    minutes longer; setup.py's test extra pins a pytest below 9.2."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not run by pytest-xdist with --dist loadgroup")
    assert request.node.nodeid.endswith("@distribute"), (
        f"pytest-xdist did not group {request.node.nodeid}: pytest "
        f"{pytest.__version__} with this pytest-xdist drops --dist "
        f"loadgroup's groups (pytest-dev/pytest-xdist#1386); install the "
        f"test extra (pip install -e '.[test]'), which pins a pytest that "
        f"keeps them")


# Without collectives (one device, JAX's DataParallel) one process runs both
# jobs, in this order; tf.distribute's collectives need a process per job
# (a second model in the same process mismatches the collective instances).
JOBS_RUN = "classifier,dann"


def _run(job, mode, out, env=None, timeout=600):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu",
               **(env or {}))
    env.pop("KERAS_BACKEND", None)
    if mode == "jax_single":
        env["KERAS_BACKEND"] = "jax"
        mode = "single"
    return subprocess.Popen([sys.executable, JOBS, job, mode, str(out)],
                            env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-2000:] + err[-4000:]
    return out


def _weights(path):
    with np.load(path) as data:
        return {k: data[k] for k in data}


def _assert_same(reference, other):
    assert set(reference) == set(other)
    for k in reference:
        np.testing.assert_allclose(other[k], reference[k], rtol=1e-4,
                                   atol=1e-5, err_msg=k)


def _both_jobs(root, mode):
    """``{job: weights}`` of both jobs, run in one process."""
    _finish(_run(JOBS_RUN, mode, root))
    return {job: _weights(root / f"{job}.npz") for job in
            JOBS_RUN.split(",")}


@pytest.fixture(scope="session")
def single(tmp_path_factory):
    """(job, mode) -> the single-device weights (TensorFlow and JAX): one
    process per backend, the two running at the same time."""
    root = tmp_path_factory.mktemp("single")
    procs = {}
    for mode in ("single", "jax_single"):
        (root / mode).mkdir()
        procs[mode] = _run(JOBS_RUN, mode, root / mode)
    out = {}
    for mode, proc in procs.items():
        _finish(proc)
        for job in JOBS_RUN.split(","):
            out[job, mode] = _weights(root / mode / f"{job}.npz")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("job", ["classifier", "dann"])
def test_mirrored_strategy_on_two_logical_cpus(single, job, tmp_path):
    _finish(_run(job, "mirrored", tmp_path))
    _assert_same(single[job, "single"], _weights(tmp_path / f"{job}.npz"))


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("job", ["classifier", "dann"])
def test_multi_worker_mirrored_strategy_with_two_workers(single, job,
                                                         tmp_path):
    workers = [f"localhost:{_free_port()}" for _ in range(2)]
    procs = [_run(job, "multi_worker", tmp_path, env={"TF_CONFIG": json.dumps(
        {"cluster": {"worker": workers},
         "task": {"type": "worker", "index": i}})}) for i in range(2)]
    for proc in procs:
        _finish(proc)
    _assert_same(single[job, "single"], _weights(tmp_path / f"{job}.npz"))


@pytest.fixture(scope="session")
def jax_data_parallel(tmp_path_factory):
    pytest.importorskip("jax")
    return _both_jobs(tmp_path_factory.mktemp("jax_dp"), "jax_data_parallel")


@pytest.mark.slow
@pytest.mark.parametrize("job", ["classifier", "dann"])
def test_jax_data_parallel_on_two_host_devices(single, jax_data_parallel,
                                               job):
    _assert_same(single[job, "jax_single"], jax_data_parallel[job])
    # And the JAX run is the TensorFlow run.
    _assert_same(single[job, "single"], single[job, "jax_single"])


@pytest.mark.slow
def test_finetune_on_two_workers_from_the_command_line(tmp_path):
    """kerastl finetune --distribute multi-worker, the same command on two
    workers (TF_CONFIG differs): both train, the first writes the run."""
    from conftest import small_cnn, write_folder

    images = write_folder(tmp_path / "images", per_class=12, size=32)
    small_cnn().save(tmp_path / "net.keras")  # the CLI's path, a small model
    out = tmp_path / "run"
    workers = [f"localhost:{_free_port()}" for _ in range(2)]
    procs = []
    for i in range(2):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_CONFIG=json.dumps(
            {"cluster": {"worker": workers},
             "task": {"type": "worker", "index": i}}))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "kerastl_cli", "finetune", "--model",
             str(tmp_path / "net.keras"),
             "--data", str(images), "--output", str(out), "--epochs", "1",
             "--head-epochs", "0",
             "--strategy", "full", "--batch-size", "8", "--quiet",
             "--distribute", "multi-worker"], env=env, cwd=str(tmp_path),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _finish(proc)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["experiment"]["distribute"] == "multi-worker"
    assert metrics["epochs_run"] == 1
    assert (out / "model.keras").is_file() and (out / "savedmodel").is_dir()


def test_multi_worker_without_tf_config_says_what_to_set(monkeypatch):
    import kerastl
    from kerastl import distribute
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(kerastl.KerastlError, match="TF_CONFIG"):
        distribute.strategy("multi-worker")
    with pytest.raises(kerastl.KerastlError, match="mirrored"):
        distribute.strategy("two-gpus")


def test_resume_is_refused_on_several_workers(tmp_path, capsys):
    from kerastl.cli import main
    from conftest import write_folder

    images = write_folder(tmp_path / "images", per_class=3, size=32)
    code = main(["finetune", "--model", "mobilenet_v2", "--data",
                 str(images), "--output", str(tmp_path / "run"), "--resume",
                 "--distribute", "multi-worker"])
    assert code != 0
    assert "--resume with --distribute multi-worker" in \
        capsys.readouterr().err


SHARD_WORKER = """
import numpy as np, keras, kerastl
model = keras.models.load_model({weights!r})
x = np.load({images!r})
part = kerastl.extract_features(model, (x, np.arange(len(x))), cache={cache!r},
                                shard=({index}, {count}), batch_size=8,
                                return_labels=True, verbose=0)
print("PART", len(part[0]))
"""


@pytest.mark.parametrize("count", [3])
def test_sharded_extraction_in_one_process_reads_back_in_order(tmp_path,
                                                               count):
    import kerastl
    from conftest import small_cnn

    model = small_cnn()
    x = np.random.default_rng(0).uniform(0, 255, (20, 32, 32, 3)).astype(
        "float32")
    y = np.arange(20)
    whole = kerastl.extract_features(model, (x, y), return_labels=True,
                                     batch_size=8, verbose=0)
    cache = kerastl.FeatureCache(str(tmp_path / "cache"))
    # An aborted earlier run left one part of two: it does not count.
    kerastl.extract_features(model, (x, y), cache=cache, shard=(0, 2),
                             batch_size=8, return_labels=True, verbose=0)
    for index in range(count):
        f, labels = kerastl.extract_features(
            model, (x, y), cache=cache, shard=(index, count), batch_size=8,
            return_labels=True, verbose=0)
        np.testing.assert_array_equal(labels, y[index::count])
        if index < count - 1:  # not all parts yet: a reader recomputes
            assert kerastl.FeatureCache(cache.directory).entries()
    reader = kerastl.FeatureCache(cache.directory)
    f, labels = kerastl.extract_features(model, (x, y), cache=reader,
                                         return_labels=True, batch_size=8,
                                         verbose=0)
    assert reader.hits == 1 and reader.misses == 0
    np.testing.assert_array_equal(labels, y)
    np.testing.assert_allclose(f, whole[0], rtol=1e-6, atol=1e-6)
    with pytest.raises(kerastl.KerastlError, match="cache="):
        kerastl.extract_features(model, x, shard=(0, 2))
    with pytest.raises(kerastl.KerastlError, match="index < count"):
        kerastl.extract_features(model, x, cache=cache, shard=(2, 2))


@pytest.mark.slow
def test_two_workers_extract_into_one_cache(tmp_path):
    """Two processes, each its shard, into one cache folder at the same
    time; read back as one array equal to the single-process extraction."""
    import keras
    import kerastl
    from conftest import small_cnn

    # Every worker loads the same saved model (the cache key covers the
    # architecture, layer names included, and every weight).
    small_cnn().save(tmp_path / "model.keras")
    weights = str(tmp_path / "model.keras")
    model = keras.models.load_model(weights)
    x = np.random.default_rng(1).uniform(0, 255, (37, 32, 32, 3)).astype(
        "float32")
    np.save(tmp_path / "x.npy", x)
    cache = str(tmp_path / "cache")
    procs = [subprocess.Popen(
        [sys.executable, "-c", SHARD_WORKER.format(
            tests=TESTS, weights=weights, images=str(tmp_path / "x.npy"),
            cache=cache, index=i, count=2)],
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    parts = [_finish(p) for p in procs]
    assert "PART 19" in parts[0] and "PART 18" in parts[1]
    reader = kerastl.FeatureCache(cache)
    f, labels = kerastl.extract_features(model, (x, np.arange(37)),
                                         cache=reader, return_labels=True,
                                         batch_size=8, verbose=0)
    assert reader.hits == 1
    np.testing.assert_array_equal(labels, np.arange(37))
    np.testing.assert_allclose(
        f, kerastl.extract_features(model, x, verbose=0), rtol=1e-6,
        atol=1e-6)


def test_a_cluster_whose_peer_never_starts_ends_with_a_message(tmp_path):
    """TensorFlow waits for every worker of TF_CONFIG and cannot be
    interrupted there: the watchdog ends the process with the reason."""
    import time

    workers = [f"localhost:{_free_port()}" for _ in range(2)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               KERASTL_WORKER_TIMEOUT="3", TF_CONFIG=json.dumps(
                   {"cluster": {"worker": workers},
                    "task": {"type": "worker", "index": 0}}))
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", "from kerastl import distribute; "
         "distribute.strategy('multi-worker'); print('started')"],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILL
    assert "started" not in proc.stdout
    assert "did not start within 3 s" in proc.stderr
    assert workers[1] in proc.stderr and "KERASTL_WORKER_TIMEOUT" in \
        proc.stderr
    assert time.monotonic() - start < 60
