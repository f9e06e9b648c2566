"""More than one worker on this machine: step time and extraction memory.

1. Step time of a MobileNetV2 classifier (96x96, global batch 32, Adam,
   LayerwiseOptimizer) trained by one process and by two
   MultiWorkerMirroredStrategy workers on localhost (the same global
   batches; each worker computes half of each). On a machine with 2 CPU
   cores two workers share the same cores and add a gradient all-reduce
   every step, so they are not expected to be faster: this reports, it does
   not tune.
2. Peak memory (max RSS) of one worker of a two-worker sharded
   ``extract_features`` over a generated dataset (never held in memory)
   whose share for the worker is 10 batches (MobileNetV2, 128x128, batch
   64), against the same worker's share of one batch: if memory is bounded
   by a batch, the two are close although the data is 10 times larger.

    python benchmarks/distributed.py [--json F]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

TRAIN = r"""
import contextlib, json, os, sys, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tensorflow as tf
multi = bool(os.environ.get("TF_CONFIG"))
strategy = tf.distribute.MultiWorkerMirroredStrategy() if multi else None
import numpy as np, keras, kerastl
STEPS, BATCH, SIZE = 8, 32, 96
with strategy.scope() if strategy else contextlib.nullcontext():
    backbone = kerastl.load_backbone("mobilenet_v2", weights=None,
                                     input_shape=(SIZE, SIZE, 3))
    model = kerastl.build_classifier(backbone, 10, freeze=False)
    model.compile(kerastl.LayerwiseOptimizer(keras.optimizers.Adam(1e-3),
                                             kerastl.LayerDecay(0.7), model),
                  "sparse_categorical_crossentropy")
rng = np.random.default_rng(0)
x = rng.uniform(0, 255, (STEPS * BATCH, SIZE, SIZE, 3)).astype("float32")
y = rng.integers(0, 10, STEPS * BATCH)
ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
if multi:
    kerastl.distribute.prepare_distributed_fit(model, ds)
times = []
class T(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.t = time.perf_counter()
    def on_epoch_end(self, epoch, logs=None):
        times.append((time.perf_counter() - self.t) / STEPS)
model.fit(ds, epochs=3, verbose=0, callbacks=[T()])
print("RESULT" + json.dumps({"step_s": min(times[1:])}))
"""

EXTRACT = r"""
import json, os, resource, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tensorflow as tf, numpy as np, keras, kerastl
BATCH, SIZE, N = 64, 128, int(sys.argv[1])
backbone = kerastl.load_backbone("mobilenet_v2", weights=None,
                                 input_shape=(SIZE, SIZE, 3))
def image(i):
    return tf.random.stateless_uniform((SIZE, SIZE, 3), seed=[i, 0],
                                       maxval=255.0)
ds = tf.data.Dataset.range(N).map(image).batch(BATCH)
f = kerastl.extract_features(backbone, ds, cache=sys.argv[2], shard=(0, 2),
                             data_key=f"generated-{N}", verbose=0)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT" + json.dumps({"rss_mb": rss, "rows": len(f),
                             "data_mb": len(f) * SIZE * SIZE * 3 * 4 / 2**20,
                             "batch_mb": BATCH * SIZE * SIZE * 3 * 4 / 2**20}))
"""


def _result(proc):
    out, err = proc.communicate(timeout=1200)
    lines = [l for l in out.splitlines() if l.startswith("RESULT")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(err[-3000:])
    return json.loads(lines[-1][len("RESULT"):])


def _spawn(code, *args, env=None):
    return subprocess.Popen([sys.executable, "-c", code, *args],
                            env=dict(os.environ, **(env or {})), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    print("kerastl: one worker vs two (MultiWorkerMirroredStrategy, "
          "localhost)...", flush=True)
    single = _result(_spawn(TRAIN))["step_s"]
    workers = [f"localhost:{_port()}" for _ in range(2)]
    procs = [_spawn(TRAIN, env={"TF_CONFIG": json.dumps(
        {"cluster": {"worker": workers},
         "task": {"type": "worker", "index": i}})}) for i in range(2)]
    multi = max(_result(p)["step_s"] for p in procs)
    print(f"step time, global batch 32: one worker {single * 1000:.0f} ms, "
          f"two workers {multi * 1000:.0f} ms (ratio {multi / single:.2f})")
    with tempfile.TemporaryDirectory() as cache:
        # Worker 0 of 2 gets every other image: one full batch of its own,
        # against ten.
        small = _result(_spawn(EXTRACT, "128", os.path.join(cache, "a")))
        large = _result(_spawn(EXTRACT, "1280", os.path.join(cache, "b")))
    print(f"sharded extraction (worker 0 of 2), peak RSS: its share of 1 "
          f"batch "
          f"({small['data_mb']:.0f} MB) {small['rss_mb']:.0f} MB, of "
          f"10 batches ({large['data_mb']:.0f} MB) {large['rss_mb']:.0f} MB: "
          f"+{large['rss_mb'] - small['rss_mb']:.0f} MB for "
          f"+{large['data_mb'] - small['data_mb']:.0f} MB of data")
    result = {"step_ms_one_worker": round(single * 1000, 1),
              "step_ms_two_workers": round(multi * 1000, 1),
              "ratio": round(multi / single, 2),
              "rss_mb_1_batch": round(small["rss_mb"]),
              "rss_mb_10_batches": round(large["rss_mb"]),
              "data_mb_10_batches": round(large["data_mb"])}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
