"""More than one device: strategies, and what stays exact across replicas.

:func:`strategy` makes the ``tf.distribute`` strategy the CLI's
``--distribute`` names (a *device* strategy: where training runs, not what
trains); :func:`strategy_scope` is the scope optimizers for a model must be
made in; :func:`prepare_distributed_fit` works around Keras
3's failure to start ``fit`` under ``MultiWorkerMirroredStrategy``. The
rest is what kerastl's own losses need to stay exact under
``tf.distribute``:

Keras scales the loss it computes by ``1 / replicas`` so that the summed
gradients of the replicas equal the gradient of the mean over the global
batch; a model that computes its loss itself (``DANN.compute_loss``) must
do the same. A loss that is not a mean over samples (the class-balance term
of the information loss, batch statistics) must see the global batch, not
the replica's share of it. On one device, and on the JAX backend (where
``keras.distribution`` runs one program over the global batch), every
function here returns its input.

TensorFlow is imported only on the TensorFlow backend.
"""

import contextlib
import json
import os
import subprocess
import sys

import keras
from keras import ops

from kerastl import _keras_private as _private
from kerastl._keras_private import all_sublayers
from kerastl.errors import KerastlError
from kerastl.spec import DEVICE_STRATEGIES


def _strategy():
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf
    strategy = tf.distribute.get_strategy()
    return strategy if strategy.num_replicas_in_sync > 1 else None


def replicas():
    """How many replicas share each global batch (1 off ``tf.distribute``)."""
    strategy = _strategy()
    return strategy.num_replicas_in_sync if strategy else 1


def scale_loss(value):
    """``value / replicas``: what Keras does to the losses it computes."""
    n = replicas()
    return value if n == 1 else ops.multiply(value, 1.0 / n)


def global_mean(local_mean, local_count):
    """The mean over the global batch from each replica's mean and count.

    Differentiable: the gradient reaching each replica is its share of the
    global mean's gradient (TensorFlow's all-reduce passes gradients).
    """
    if _strategy() is None:
        return local_mean
    import tensorflow as tf
    context = tf.distribute.get_replica_context()
    if context is None:  # cross-replica context: nothing to combine
        return local_mean
    count = ops.cast(local_count, local_mean.dtype)
    total = context.all_reduce("sum", local_mean * count)
    return total / context.all_reduce("sum", count)


def synchronize_batch_norm(model):
    """Batch statistics over the global batch, not each replica's share:
    ``synchronized=True`` on every BatchNormalization layer of ``model``
    when it trains under a multi-replica ``tf.distribute`` strategy (its
    own, or the one in scope)."""
    if _strategy() is None and not is_distributed(model):
        return
    for layer in all_sublayers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True


def strategy_scope(model):
    """The scope of ``model``'s ``tf.distribute`` strategy (a no-op on one
    device and on other backends): optimizers built for it must have their
    variables mirrored like the model's."""
    strategy = getattr(model, "distribute_strategy", None)
    return strategy.scope() if strategy is not None else \
        contextlib.nullcontext()


def strategy(name):
    """The ``tf.distribute`` strategy for ``name`` (TensorFlow backend).

    * ``"none"``: None (one device);
    * ``"mirrored"``: ``MirroredStrategy`` over every GPU of this machine
      (its CPU if it has none);
    * ``"multi-worker"``: ``MultiWorkerMirroredStrategy``; every machine
      runs the same command with its own ``TF_CONFIG`` (the cluster's
      ``host:port`` list and this worker's index). TensorFlow waits for
      every worker to start, and cannot be interrupted meanwhile: when the
      cluster has not started within ``KERASTL_WORKER_TIMEOUT`` seconds
      (default 300), a watchdog prints why and ends the process (killed:
      exit status 137).

    Create it before the model, and build and compile the model in
    ``strategy.scope()``.
    """
    if name in (None, "none"):
        return None
    if name not in DEVICE_STRATEGIES:
        raise KerastlError(f"distribute={name!r}: expected one of "
                           f"{', '.join(DEVICE_STRATEGIES)}.")
    if keras.backend.backend() != "tensorflow":
        raise KerastlError(
            f"distribute={name!r} uses tf.distribute: the TensorFlow backend."
            " On JAX, set keras.distribution.DataParallel() instead (see "
            "docs/devices.md, More than one device).")
    import tensorflow as tf
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    jobs, task = _tf_config()
    timeout = float(os.environ.get("KERASTL_WORKER_TIMEOUT", WORKER_TIMEOUT_S))
    # TensorFlow blocks inside C++, holding the interpreter, until every
    # task has started: no Python thread or signal handler runs meanwhile,
    # and SIGTERM is ignored. A separate, tiny watchdog process ends this
    # one (SIGKILL) with the reason when the cluster has not started in
    # time; it is stopped as soon as the strategy exists.
    peers = [a for v in jobs.values() for a in v]
    message = (
        f"kerastl: error: the cluster in TF_CONFIG did not start within "
        f"{timeout:g} s: it lists {len(peers)} tasks ({', '.join(peers)}) "
        f"and this is {task[0]} {task[1]}. Start the same command on every "
        "machine with its own TF_CONFIG (or set KERASTL_WORKER_TIMEOUT, in "
        "seconds, to wait longer).")
    watchdog = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(timeout),
         message], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        return tf.distribute.MultiWorkerMirroredStrategy()
    finally:
        watchdog.kill()
        watchdog.wait()


_WATCHDOG = """
import os, signal, sys, time
pid, timeout, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
time.sleep(timeout)
sys.stderr.write(message + "\\n")
sys.stderr.flush()
os.kill(pid, signal.SIGKILL)
"""


# How long a multi-worker strategy waits for the other workers to start
# (KERASTL_WORKER_TIMEOUT overrides it, in seconds).
WORKER_TIMEOUT_S = 300
_TF_CONFIG_EXAMPLE = (
    "'{\"cluster\": {\"worker\": [\"host1:port\", \"host2:port\"]}, "
    "\"task\": {\"type\": \"worker\", \"index\": 0}}' (index 1 on the second "
    "machine)")


def _tf_config():
    """``(jobs, (task type, index))`` of a checked TF_CONFIG."""
    config = os.environ.get("TF_CONFIG")
    if not config:
        raise KerastlError(
            "distribute='multi-worker' needs TF_CONFIG on every worker: "
            f"{_TF_CONFIG_EXAMPLE}. Set it, then run the same command on "
            "each.")
    try:
        parsed = json.loads(config)
        jobs, task = parsed["cluster"], parsed["task"]
        kind, index = task["type"], task["index"]
    except (ValueError, KeyError, TypeError) as e:
        raise KerastlError(
            f"TF_CONFIG is not a cluster and a task ({type(e).__name__}: "
            f"{e}); expected {_TF_CONFIG_EXAMPLE}.") from None
    ok = isinstance(jobs, dict) and jobs.get("worker") and all(
        isinstance(v, list) and v and all(
            isinstance(a, str) and ":" in a for a in v)
        for v in jobs.values())
    if not ok:
        raise KerastlError(
            f"TF_CONFIG's cluster {jobs!r} is not a list of \"host:port\" "
            f"addresses per job, with at least one worker; expected "
            f"{_TF_CONFIG_EXAMPLE}.")
    if kind not in jobs or isinstance(index, bool) or not isinstance(
            index, int) or not 0 <= index < len(jobs[kind]):
        raise KerastlError(
            f"TF_CONFIG's task {task!r} is not in its cluster (jobs: "
            + ", ".join(f"{k} x{len(v)}" for k, v in jobs.items())
            + "): the task's type must be one of the cluster's jobs and its "
            "index below that job's count.")
    return jobs, (kind, index)


def prepare_distributed_fit(model, data):
    """Builds a compiled ``model`` from the first batch of ``data`` so that
    ``model.fit`` can start under ``MultiWorkerMirroredStrategy``.

    Keras 3 averages a distributed input batch across workers in eager mode
    before the first step (to build the model), which the multi-worker
    strategy refuses (keras-team/keras#20585), and then averages each
    step's scalar logs with a reduction that fails on scalars. After this
    call there is nothing left to build (``fit`` skips that step for good)
    and the model's ``train_step``/``test_step`` return their logs as
    1-element vectors. No-op on other backends. Call it after ``compile`` and before ``fit``, with the data
    ``fit`` gets (a ``tf.data.Dataset`` of batches, or ``(x, y)`` arrays).
    """
    if keras.backend.backend() != "tensorflow":
        return model
    if isinstance(data, (tuple, list)):
        batch = tuple(d[:2] for d in data)
    else:
        batch = next(iter(data))
    _private.build_before_distributed_fit(model, batch)
    return model


def is_chief(strategy):
    """Whether this process writes a run's outputs: the chief of a
    multi-worker run, or its first worker when the cluster has no chief;
    always, otherwise."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    if resolver.task_type == "chief":
        return True
    # Worker 0 writes only in a cluster without a chief: with one, the
    # chief writes (TensorFlow's convention) and worker 0 is a worker.
    has_chief = "chief" in resolver.cluster_spec().jobs
    return resolver.task_type == "worker" and resolver.task_id == 0 and \
        not has_chief


def is_multi_worker(model):
    """Whether ``model`` trains under a strategy spanning several workers."""
    strategy = getattr(model, "distribute_strategy", None)
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:  # one machine
        return False
    spec = resolver.cluster_spec()
    return sum(spec.num_tasks(job) for job in spec.jobs
               if job in ("chief", "worker")) > 1


def is_distributed(model):
    """Whether ``model`` trains on several replicas (``tf.distribute``)."""
    strategy = getattr(model, "distribute_strategy", None)
    return bool(strategy is not None and
                strategy.num_replicas_in_sync > 1) or is_multi_worker(model)
