"""TensorFlow Hub SavedModels as real Keras 3 layers.

``tensorflow_hub.KerasLayer`` is a Keras 2 (``tf_keras``) layer: Keras 3
models reject it, and its ``trainable`` is all-or-nothing.
:class:`HubLayer` is a ``keras.layers.Layer`` over a SavedModel: the
SavedModel's own ``tf.Variable`` objects become the layer's Keras variables
(shared, not copied, so what the optimizer updates is what the SavedModel's
functions read), ``training`` reaches SavedModels that take it (the Reusable
SavedModel convention), regularization losses are added, and single
variables can be frozen, so part of a Hub model can be fine-tuned.

TensorFlow backend only: a SavedModel is a TensorFlow graph.
"""

import hashlib
import inspect
import os
import re

import keras

from kerastl import _keras_private as _private
from kerastl.errors import KerastlError
from kerastl.freezing import set_variables_trainable
from kerastl.network import is_timeout, reachable, socket_timeout
from kerastl.spec import KAGGLE_HANDLE, BlockRule

# What an offline TF Hub download error tells the user to do.
OFFLINE_ADVICE = ("Offline? Download the model where there is internet and "
                  "set TFHUB_CACHE_DIR to that cache, or pass the local "
                  "SavedModel folder as the handle.")

# What the user trusted with trust_hub_path(): folders (everything under
# them) and handles (exactly). See is_trusted().
_TRUSTED_PATHS = []
_TRUSTED_HANDLES = []
# owner/model/framework/variation[/version]


# -- resolving handles --------------------------------------------------------------

def _is_url(handle):
    return handle.startswith(("http://", "https://", "gs://"))


def _is_kaggle_handle(handle):
    return (not _is_url(handle) and not os.path.exists(handle)
            and bool(KAGGLE_HANDLE.match(handle)))


def _check_saved_model(path, handle):
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise KerastlError(
            f"{handle!r} is a folder without saved_model.pb: not a "
            "SavedModel. Pass the folder that model.export() or "
            "tf.saved_model.save() wrote.")
    return path


def hub_cache_path(handle):
    """Where tensorflow_hub caches ``handle`` (honours TFHUB_CACHE_DIR)."""
    from tensorflow_hub import resolver

    cache = resolver.tfhub_cache_dir(use_temp=True)
    return os.path.join(cache, hashlib.sha1(handle.encode("utf8")).hexdigest())


def resolve_handle(handle, timeout=15.0):
    """The local SavedModel folder for a TF Hub handle.

    * a local folder (or ``file://`` URL): used as is;
    * an ``https://`` URL (tfhub.dev, Kaggle models, any host serving a
      compressed SavedModel) or ``gs://`` path: resolved and cached by
      ``tensorflow_hub`` (``TFHUB_CACHE_DIR`` is honoured); a cached model
      needs no network;
    * a Kaggle handle ``owner/model/framework/variation[/version]``:
      downloaded with ``kagglehub`` (``pip install kagglehub``).

    Offline, a remote handle that is not cached fails within ``timeout``
    seconds with a :class:`~kerastl.KerastlError`.
    """
    handle = os.fspath(handle)
    if handle.startswith("file://"):
        handle = handle[len("file://"):]
    if os.path.isdir(handle):
        return _check_saved_model(handle, handle)
    if _is_kaggle_handle(handle):
        try:
            import kagglehub
        except ImportError:
            raise KerastlError(
                f"{handle!r} looks like a Kaggle model handle; downloading it "
                "needs kagglehub: pip install kagglehub. (Or pass its "
                "https://www.kaggle.com/models/... URL.)") from None
        reachable("https://www.kaggle.com", timeout, OFFLINE_ADVICE)
        try:
            return _check_saved_model(kagglehub.model_download(handle), handle)
        except KerastlError:
            raise
        except Exception as e:  # kagglehub raises its own types
            raise KerastlError(f"kagglehub could not download {handle!r}: "
                               f"{e}") from None
    if not _is_url(handle):
        raise KerastlError(
            f"TF Hub handle {handle!r} is neither a local SavedModel folder, "
            "an http(s)/gs URL nor a Kaggle handle owner/model/framework/"
            "variation[/version].")
    try:
        import tensorflow_hub as hub
    except ImportError:
        raise KerastlError("Remote TF Hub handles need tensorflow-hub: pip "
                           "install tensorflow-hub.") from None
    cached = hub_cache_path(handle)
    if os.path.isfile(os.path.join(cached, "saved_model.pb")):
        return cached
    reachable(handle, timeout, OFFLINE_ADVICE)
    # tensorflow_hub opens URLs without a timeout: a server that accepts and
    # then stalls would hang forever. A default socket timeout bounds every
    # connect and read (a download that keeps receiving data is not cut).
    try:
        with socket_timeout(timeout):
            return _check_saved_model(hub.resolve(handle), handle)
    except KerastlError:
        raise
    except Exception as e:
        if is_timeout(e):
            raise KerastlError(
                f"Cannot reach {handle!r}: the server did not answer within "
                f"{timeout:g} s. Offline? Set TFHUB_CACHE_DIR to a cache that "
                "holds the model, or pass the local SavedModel folder.") \
                from None
        raise KerastlError(f"tensorflow_hub could not resolve {handle!r}: "
                           f"{e}") from None


# -- trust ---------------------------------------------------------------------------

def trust_hub_path(path_or_handle):
    """Trusts a SavedModel folder (and everything under it) or one handle
    (a URL or Kaggle handle, exactly as written) when loading ``.keras``
    files.

    A SavedModel is a program: its graph can read and write files. So, like
    Keras's own ``TFSMLayer``, a :class:`HubLayer` in a ``.keras`` file is
    re-loaded under ``safe_mode=True`` (Keras's default) only when the user
    trusted its handle explicitly: here, in ``KERASTL_TRUSTED_HUB_PATHS``
    (folders, separated by ``os.pathsep``) or in
    ``KERASTL_TRUSTED_HUB_HANDLES`` (URLs or Kaggle handles, separated by
    spaces or commas). No host is trusted by default: a ``.keras`` file
    chooses its handles, and a URL's download lands in a cache that any
    program of the user's can write. ``keras.models.load_model(...,
    safe_mode=False)`` loads any handle. See SECURITY.md.

    Raises:
        KerastlError: an empty or relative path (it would trust whatever
            the working directory holds at each load); pass an absolute
            folder.
    """
    if not isinstance(path_or_handle, (str, os.PathLike)):
        raise KerastlError(
            f"trust_hub_path({path_or_handle!r}): expected an absolute "
            "folder path, a URL or a Kaggle handle.")
    value = os.fspath(path_or_handle)
    if _is_url(value) or _is_kaggle_handle(value):
        _TRUSTED_HANDLES.append(value)
    else:
        _TRUSTED_PATHS.append(os.path.realpath(_absolute(
            value, "trust_hub_path")))


def _absolute(path, where):
    """``path`` if it is a non-empty absolute folder path; else the error
    that says what to pass."""
    if not isinstance(path, str) or not path.strip():
        raise KerastlError(
            f"{where}: an empty path would trust the working directory and "
            "everything under it; pass the absolute path of the SavedModel "
            "folder (or of a folder of them).")
    if not os.path.isabs(path):
        raise KerastlError(
            f"{where}: {path!r} is a relative path; it would be trusted "
            "wherever the working directory is at each load. Pass an "
            f"absolute path, e.g. {os.path.abspath(path)!r}.")
    return path


def clear_trusted():
    """Forgets every folder and handle trusted with :func:`trust_hub_path`
    in this process (``KERASTL_TRUSTED_HUB_PATHS`` still counts)."""
    del _TRUSTED_PATHS[:]
    del _TRUSTED_HANDLES[:]


def is_trusted(handle):
    """Whether the user trusted ``handle`` (see :func:`trust_hub_path`)."""
    handle = os.fspath(handle)
    handles = _TRUSTED_HANDLES + re.split(
        r"[\s,]+", os.environ.get("KERASTL_TRUSTED_HUB_HANDLES", "").strip())
    if _is_url(handle) or _is_kaggle_handle(handle):
        return handle in handles
    path = os.path.realpath(handle[len("file://"):] if handle.startswith(
        "file://") else handle)
    roots = _TRUSTED_PATHS + [
        os.path.realpath(_absolute(p, "KERASTL_TRUSTED_HUB_PATHS"))
        for p in os.environ.get("KERASTL_TRUSTED_HUB_PATHS", "").split(
            os.pathsep) if p]
    return os.path.isdir(path) and any(
        os.path.commonpath([path, r]) == r for r in roots)


# -- the layer ------------------------------------------------------------------------

def _adopt(tf_variable, trainable):
    """A Keras variable that *is* ``tf_variable`` (shares its storage)."""
    v = keras.Variable(initializer="zeros", shape=(), dtype="float32",
                       trainable=trainable,
                       name=tf_variable.name.split(":")[0].replace("/", "_"))
    # Keras's TF Variable keeps its tf.Variable in `_value`; pointing it at
    # the SavedModel's variable makes the optimizer, checkpoints and exports
    # act on what the SavedModel's functions read.
    _private.adopt_tf_variable(v, tf_variable)
    v.hub_name = tf_variable.name
    return v


@keras.saving.register_keras_serializable(package="kerastl")
class HubLayer(keras.layers.Layer):
    """A TF Hub SavedModel as a Keras 3 layer.

    Works in ``keras.Sequential``, functional and subclassed models. The
    SavedModel's variables are the layer's variables (trainable when
    ``trainable=True``; freeze single ones with :meth:`freeze_variables` or,
    for zoo Hub models, by block with :func:`kerastl.freeze`).

    Args:
        handle: a tfhub.dev / Kaggle URL, a Kaggle handle, or a local
            SavedModel folder (see :func:`resolve_handle`).
        trainable: fine-tune the SavedModel's trainable variables.
        signature: call a named signature (``"serving_default"``) instead
            of the object itself; Keras ``model.export`` artifacts are
            called through their ``serve`` endpoint automatically.
        output_key: the output to return when the SavedModel returns a dict.
        arguments: extra keyword arguments for every call.
        batchnorm_training: pass ``training=True`` through in training (the
            Reusable SavedModel convention: BatchNorm inside updates its
            statistics). ``False`` keeps the SavedModel in inference mode.
        tags: SavedModel tags (TF1 Hub format).
        load_timeout: seconds to wait for an unreachable host.
        blocks: a variable-path block map: an ordered mapping ``{block name:
            regex or list of regexes}`` (``re.search`` on the SavedModel's
            variable names, see :meth:`variable_names`), input to output.
            With it, :func:`kerastl.freeze`, :class:`kerastl.
            LayerwiseOptimizer` and :func:`kerastl.trainable_summary` work
            by block on this layer. Zoo Hub configs supply it.

    Example::

        model = keras.Sequential([
            keras.Input((224, 224, 3)),
            kerastl.HubLayer("https://tfhub.dev/google/imagenet/"
                             "mobilenet_v2_100_224/feature_vector/5"),
            keras.layers.Dense(5, activation="softmax")])
    """

    def __init__(self, handle, trainable=False, signature=None,
                 output_key=None, arguments=None, batchnorm_training=True,
                 tags=None, load_timeout=15.0, blocks=None, **kwargs):
        if keras.backend.backend() != "tensorflow":
            raise KerastlError(
                "HubLayer runs TensorFlow SavedModels and needs the "
                "TensorFlow backend (KERAS_BACKEND=tensorflow); the backend "
                f"is {keras.backend.backend()!r}.")
        import tensorflow as tf

        super().__init__(trainable=trainable, **kwargs)
        if not isinstance(handle, (str, os.PathLike)):
            raise KerastlError(
                f"HubLayer({handle!r}): expected a handle: a SavedModel "
                "folder, an https:// or gs:// URL, or a Kaggle handle.")
        self.handle = os.fspath(handle)
        self.signature = signature
        self.output_key = output_key
        self.arguments = dict(arguments or {})
        self.batchnorm_training = bool(batchnorm_training)
        self.tags = tags
        self.block_rules = _block_rules(blocks)
        path = resolve_handle(self.handle, timeout=load_timeout)
        self._obj = tf.saved_model.load(path, tags=tags)
        self._fn, self.takes_training = self._callable()
        # Under the layer's name, as add_weight does: variable paths read
        # "hub/stem_conv_kernel" and two HubLayers cannot collide.
        with keras.name_scope(self.name, caller=self):
            self._track_saved_model_variables()
        self._regularizers = list(getattr(self._obj, "regularization_losses",
                                          []) or [])
        self.built = True

    def _callable(self):
        obj = self._obj
        if self.signature is not None:
            sigs = getattr(obj, "signatures", {})
            if self.signature not in sigs:
                raise KerastlError(
                    f"{self.handle!r} has no signature {self.signature!r}; "
                    f"it has {sorted(sigs) or 'none'}.")
            return sigs[self.signature], False
        if _has_call(obj):  # the Reusable SavedModel convention
            return obj.__call__, _takes_training(obj.__call__)
        if hasattr(obj, "serve"):  # keras model.export()
            return obj.serve, False
        sigs = getattr(obj, "signatures", {})
        for name in ("serving_default", "default"):  # TF2, TF1 Hub format
            if name in sigs:
                self.signature = name
                return sigs[name], False
        raise KerastlError(
            f"{self.handle!r} is not callable and has no 'serve' endpoint or "
            "'serving_default' signature; pass signature=.")

    def _track_saved_model_variables(self):
        obj = self._obj
        variables = list(getattr(obj, "variables", []) or [])
        trainable_ids = {id(v) for v in getattr(obj, "trainable_variables",
                                                [])}
        if not variables:
            tvs, ntvs = _private.variables_used_by(self._fn)
            variables = list(tvs) + list(ntvs)
            trainable_ids = {id(v) for v in tvs}
        seen = set()
        self.hub_variables = {}
        for tv in variables:
            if id(tv) in seen:
                continue
            seen.add(id(tv))
            kv = _adopt(tv, trainable=id(tv) in trainable_ids and
                        tv.trainable)
            # What the SavedModel allows: frozen variables can come back.
            kv.hub_trainable = kv.trainable
            self._track_variable(kv)
            self.hub_variables[tv.name] = kv

    # -- freezing ---------------------------------------------------------

    def variable_names(self):
        """The SavedModel's variable names (``"dense/kernel:0"`` ...)."""
        return list(self.hub_variables)

    def freeze_variables(self, patterns, frozen=True):
        """Freezes (or with ``frozen=False`` unfreezes) matching variables.

        ``patterns``: regular expressions (``re.search``) or a list of them,
        matched against :meth:`variable_names`. Returns the names changed.
        Variables the SavedModel marks non-trainable (BatchNorm statistics)
        never become trainable.
        """
        if isinstance(patterns, str):
            patterns = [patterns]
        compiled = [re.compile(p) for p in patterns]
        changed = []
        for name, v in self.hub_variables.items():
            if any(c.search(name) for c in compiled):
                if not frozen and not v.hub_trainable:
                    continue
                set_variables_trainable([v], not frozen)
                changed.append(name)
        return changed

    # -- calling ------------------------------------------------------------

    def _run(self, inputs, training):
        kwargs = dict(self.arguments)
        if self.signature is not None and isinstance(inputs, dict):
            kwargs.update(inputs)
            args = ()
        elif self.signature is not None:
            names = list(self._fn.structured_input_signature[1])
            if len(names) != 1:
                raise KerastlError(
                    f"Signature {self.signature!r} takes inputs {names}: "
                    "call the layer on a dict of them.")
            kwargs[names[0]] = inputs
            args = ()
        else:
            args = (inputs,)
        if self.takes_training:
            kwargs["training"] = bool(training and self.trainable and
                                      self.batchnorm_training)
        result = self._fn(*args, **kwargs)
        if isinstance(result, dict):
            if self.output_key is not None:
                if self.output_key not in result:
                    raise KerastlError(
                        f"output_key={self.output_key!r} is not an output of "
                        f"{self.handle!r}; outputs: {sorted(result)}.")
                result = result[self.output_key]
            elif len(result) == 1:
                result = next(iter(result.values()))
            else:
                raise KerastlError(
                    f"{self.handle!r} returns several outputs "
                    f"({sorted(result)}): pass output_key=.")
        return result

    def call(self, inputs, training=False):
        import tensorflow as tf

        out = self._run(inputs, training)
        if self.trainable and self._regularizers:
            self.add_loss(tf.add_n([tf.cast(r(), "float32")
                                    for r in self._regularizers]))
        return out

    def compute_output_spec(self, inputs, training=False):
        import tensorflow as tf

        def spec(x):
            return tf.TensorSpec(x.shape, x.dtype)

        concrete = tf.function(lambda x: self._run(x, False)) \
            .get_concrete_function(tf.nest.map_structure(spec, inputs))
        return tf.nest.map_structure(
            lambda t: keras.KerasTensor(t.shape, dtype=t.dtype.name),
            concrete.structured_outputs)

    def get_config(self):
        config = super().get_config()
        config.update(handle=self.handle, signature=self.signature,
                      output_key=self.output_key, arguments=self.arguments,
                      batchnorm_training=self.batchnorm_training,
                      tags=self.tags,
                      blocks=[{"name": r.name, "variables": list(r.variables)}
                              for r in self.block_rules] or None,
                      frozen_variables=[n for n, v in self.hub_variables
                                        .items() if not v.trainable
                                        and v.hub_trainable])
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        frozen = config.pop("frozen_variables", [])
        if _private.in_safe_mode() is not False and \
                not is_trusted(config["handle"]):
            raise KerastlError(
                f"Refusing to load the SavedModel {config['handle']!r} of a "
                "HubLayer in safe mode: a SavedModel can read and write "
                "files, and a .keras file chooses its handles. If you trust "
                "it, call kerastl.trust_hub_path(handle or folder) first "
                "(or set KERASTL_TRUSTED_HUB_HANDLES / "
                "KERASTL_TRUSTED_HUB_PATHS), or load with "
                "keras.models.load_model(..., safe_mode=False).")
        layer = cls(**config)
        if frozen:
            layer.freeze_variables(["^" + re.escape(n) + "$" for n in frozen])
        return layer


def _block_rules(blocks):
    """``HubLayer(blocks=...)`` as a tuple of BlockRules (checked)."""
    if not blocks:
        return ()
    if isinstance(blocks, dict):
        items = list(blocks.items())
    else:  # a list of {"name", "variables"} (get_config) or BlockRules
        items = []
        for b in blocks:
            if isinstance(b, BlockRule):
                items.append((b.name, list(b.variables)))
            elif isinstance(b, dict) and set(b) == {"name", "variables"}:
                items.append((b["name"], b["variables"]))
            else:
                raise KerastlError(
                    f"HubLayer blocks: expected {{block name: regexes}}, got "
                    f"the entry {b!r}.")
    rules, seen = [], set()
    for name, patterns in items:
        if isinstance(patterns, str):
            patterns = [patterns]
        if not isinstance(name, str) or name in seen or not patterns:
            raise KerastlError(
                f"HubLayer blocks: block {name!r} must be a new string name "
                "with at least one variable regex.")
        seen.add(name)
        for p in patterns:
            try:
                re.compile(p)
            except (re.error, TypeError) as e:
                raise KerastlError(
                    f"HubLayer blocks: block {name!r} has an invalid variable "
                    f"regex {p!r}: {e}.") from None
        rules.append(BlockRule(name, variables=tuple(patterns)))
    return tuple(rules)


def _has_call(obj):
    """Whether a loaded SavedModel object has a restored ``__call__``."""
    try:
        return bool(obj.__call__.concrete_functions)
    except AttributeError:
        return False


def _takes_training(fn):
    """Whether a restored function accepts ``training``."""
    try:
        return "training" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
