"""``FeatureCache``: features on disk, computed once and reused."""

import hashlib
import json
import os
import re
import shutil
import warnings

import keras
import numpy as np

from kerastl.atomic import atomic_folder
from kerastl.errors import KerastlError

# 2: meta.json says who wrote it and holds a checksum of every file.
FORMAT_VERSION = 2
# An entry's folder name: its key, 16 bytes in hex.
_ENTRY = re.compile(r"^[0-9a-f]{32}$")


def _file_digest(path):
    """The blake2b digest of a file's bytes (read in 1 MiB pieces)."""
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            h.update(piece)
    return h.hexdigest()


def _entry_meta(folder):
    """An entry's meta.json if kerastl wrote it (this format, or the
    earlier one without a signature), else None."""
    path = os.path.join(folder, "meta.json")
    if os.path.islink(folder) or os.path.islink(path) or \
            not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    ours = meta.get("written_by") == "kerastl" or (
        meta.get("format") == 1 and set(meta) == {"arrays", "key", "format"})
    return meta if ours else None


def hash_array(h, a):
    """Feeds an array's dtype, shape and bytes to the hash ``h``."""
    a = np.ascontiguousarray(a)
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(memoryview(a).cast("B"))


def model_fingerprint(model):
    """A hash of a model's architecture and every weight's value.

    Covers non-trainable weights too (BatchNorm statistics): anything that
    can change what the model computes.
    """
    h = hashlib.blake2b(digest_size=20)
    config = keras.saving.serialize_keras_object(model)
    h.update(json.dumps(config, sort_keys=True, default=repr).encode())
    for v in model.weights:
        h.update(v.path.encode())
        hash_array(h, keras.ops.convert_to_numpy(v))
    return h.hexdigest()


class FeatureCache:
    """Features on disk, computed once and reused.

    One folder per entry, named by a hash of everything that changes the
    features: the model (architecture and every weight value), the layers,
    the pooling, the preprocessing, the input size, the dtype and a
    fingerprint of the data. Change any of them and the key changes, so a
    stale entry is never returned. Entries are plain ``.npy`` files (no
    pickle; ``mmap=True`` memory-maps them) with a ``meta.json`` that lists
    their sizes. An entry is written in a temporary folder and renamed into
    place, so a crash mid-write leaves nothing that loads as valid; an entry
    that does not match its ``meta.json`` (a truncated file) is discarded
    and recomputed.

    Args:
        directory: where the entries live (created on first write).
        mmap: load entries memory-mapped (read-only) instead of into memory.

    Example::

        cache = kerastl.FeatureCache("~/.cache/kerastl/features")
        x = kerastl.extract_features(backbone, images, cache=cache)  # runs
        x = kerastl.extract_features(backbone, images, cache=cache)  # reads
    """

    def __init__(self, directory, mmap=False):
        if not isinstance(directory, (str, os.PathLike)):
            raise KerastlError(f"FeatureCache({directory!r}): expected a "
                               "folder path.")
        self.directory = os.path.abspath(os.path.expanduser(
            os.fspath(directory)))
        self.mmap = bool(mmap)
        self.hits = 0
        self.misses = 0

    def __repr__(self):
        return (f"<FeatureCache {self.directory}: {len(self.entries())} "
                f"entries>")

    @staticmethod
    def key(parts):
        """The entry name for a dict of key parts (JSON-able)."""
        blob = json.dumps(dict(parts, format=FORMAT_VERSION), sort_keys=True,
                          default=repr)
        return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()

    def path(self, key):
        return os.path.join(self.directory, key)

    def entries(self):
        """Names of the complete entries on disk: folders named by a key
        whose ``meta.json`` kerastl wrote."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(e for e in os.listdir(self.directory)
                      if _ENTRY.match(e) and _entry_meta(self.path(e))
                      is not None)

    def clear(self):
        """Deletes every entry kerastl wrote, and nothing else in the
        folder (another file or folder there, even one holding a
        ``meta.json``, stays)."""
        for entry in self.entries():
            shutil.rmtree(self.path(entry), ignore_errors=True)

    @staticmethod
    def _normal(parts):
        return json.loads(json.dumps(parts or {}, sort_keys=True,
                                     default=repr))

    def load(self, key, parts=None):
        """The arrays of an entry (dict), or None if absent or damaged.

        With ``parts`` the entry must have been written for exactly those
        key parts (a renamed or tampered entry is discarded).
        """
        folder = self.path(key)
        meta_path = os.path.join(folder, "meta.json")
        if not os.path.isfile(meta_path):
            return None
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            if meta.get("written_by") != "kerastl":
                raise ValueError("its meta.json was not written by kerastl")
            if parts is not None and meta["key"] != self._normal(parts):
                raise ValueError("its key parts are not the request's")
            arrays = {}
            for name, info in meta["arrays"].items():
                if not isinstance(info["file"], str) or \
                        os.path.basename(info["file"]) != info["file"] or \
                        info["file"].startswith("."):
                    raise ValueError(f"file {info['file']!r} is not a file "
                                     "of the entry")
                file = os.path.join(folder, info["file"])
                if os.path.getsize(file) != info["bytes"]:
                    raise ValueError(f"{info['file']} has "
                                     f"{os.path.getsize(file)} bytes, "
                                     f"expected {info['bytes']}")
                if _file_digest(file) != info["blake2b"]:
                    raise ValueError(f"{info['file']} was changed after "
                                     "it was written (checksum)")
                a = np.load(file, mmap_mode="r" if self.mmap else None,
                            allow_pickle=False)
                if list(a.shape) != info["shape"] or a.dtype.str != \
                        info["dtype"]:
                    raise ValueError(f"{info['file']} is {a.dtype}{a.shape}, "
                                     f"expected {info['dtype']}{info['shape']}")
                arrays[name] = a
        except (OSError, ValueError, KeyError, TypeError) as e:
            warnings.warn(f"kerastl: discarding damaged feature-cache entry "
                          f"{folder} ({e}); recomputing.", stacklevel=3)
            shutil.rmtree(folder, ignore_errors=True)
            return None
        return arrays

    def save(self, key, arrays, parts=None):
        """Writes an entry atomically: a temporary folder, then a rename.

        An entry already there (damaged, or written by a racer) is replaced
        only once the new one is complete.
        """
        # An entry folder is named by its key inside the cache: kerastl's.
        with atomic_folder(self.path(key), "feature-cache entry",
                           checked=False) as tmp:
            meta = {"arrays": {}, "key": self._normal(parts),
                    "format": FORMAT_VERSION, "written_by": "kerastl"}
            for i, (name, a) in enumerate(arrays.items()):
                file = f"{i}.npy"
                full = os.path.join(tmp, file)
                with open(full, "wb") as f:
                    np.save(f, np.ascontiguousarray(a), allow_pickle=False)
                    f.flush()
                    os.fsync(f.fileno())
                meta["arrays"][name] = {
                    "file": file, "bytes": os.path.getsize(full),
                    "shape": list(a.shape), "dtype": a.dtype.str,
                    "blake2b": _file_digest(full)}
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(meta, f, indent=1, default=repr)
                f.flush()
                os.fsync(f.fileno())


def as_cache(cache):
    """``cache=`` of the extraction functions as a :class:`FeatureCache`:
    None, a cache, or a folder path."""
    if cache is None or isinstance(cache, FeatureCache):
        return cache
    if isinstance(cache, (str, os.PathLike)):
        return FeatureCache(cache)
    raise KerastlError(f"cache={cache!r}: expected a folder path or a "
                       "kerastl.FeatureCache.")
