"""The user's own model and data, named in the YAML.

- ``model.factory: "pkg.module:callable"`` or ``"path/to/file.py:callable"`` with ``model.args``:
  the callable gets ``model.args`` as keyword arguments, plus ``num_classes`` and ``input_shape``
  where its signature names them, and returns a ``torch.nn.Module`` (torch) or a ``keras.Model``.
- ``data.kind: arrays``: ``data.path`` is an ``.npz`` file holding ``x_train``, ``y_train`` and
  optionally ``x_val``, ``y_val`` (integer class labels).
- ``data.kind: python``: ``data.factory`` with ``data.args`` returns ``(train, val)``, each a pair
  of arrays ``(x, y)`` or a map-style dataset (``__len__``, ``__getitem__ -> (x, y)``); ``val``
  may be None.

The data reaches the model as given (no transposition, no normalisation); floating-point inputs
are handed over as float32 and labels as int64. Every problem is one line naming the YAML key
(:class:`~largebatch.config.ConfigError`: exit 2), found by ``largebatch run`` / ``validate``
before anything is launched and again on the ranks.
"""
import importlib
import importlib.util
import inspect
import os
import sys
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from largebatch.config import ConfigError

__all__ = ["uses_user_model", "uses_user_data", "load_callable", "call_factory", "build_data", "build_model",
           "ArrayData", "MapData", "check"]

MODEL_TYPES = {"torch": "a torch.nn.Module", "keras": "a keras.Model"}


def uses_user_model(cfg) -> bool:
    return cfg["model"]["factory"] is not None


def uses_user_data(cfg) -> bool:
    return cfg["data"]["kind"] in ("arrays", "python")


def _last_line(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1].strip()}" if lines else type(err).__name__


def load_callable(key: str, ref: str) -> Callable:
    """The callable ``ref`` names (``module:attr`` or ``file.py:attr``), or ConfigError naming ``key``."""
    where, _, attr = ref.rpartition(":")
    if where.endswith(".py"):
        if not os.path.isfile(where):
            raise ConfigError([f"{key}: no such file {where!r} (from {ref!r})"])
        name = "largebatch_user_" + "".join(c if c.isalnum() else "_" for c in os.path.abspath(where))
        module = sys.modules.get(name)
        if module is None:
            folder = os.path.dirname(os.path.abspath(where))
            if folder not in sys.path:               # the file may import its neighbours
                sys.path.insert(0, folder)
            spec = importlib.util.spec_from_file_location(name, where)
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
            except Exception as err:                 # noqa: BLE001  the user's code: its last line
                raise ConfigError([f"{key}: importing {where} failed: {_last_line(err)}"]) from None
            sys.modules[name] = module
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as err:
            missing = err.name or where
            raise ConfigError([f"{key}: no module named {missing!r} (from {ref!r}; is it on PYTHONPATH?)"]) from None
        except Exception as err:                     # noqa: BLE001
            raise ConfigError([f"{key}: importing {where} failed: {_last_line(err)}"]) from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise ConfigError([f"{key}: {where} has no attribute {attr!r}"])
    if not callable(fn):
        raise ConfigError([f"{key}: {ref} is not callable (got {type(fn).__name__})"])
    return fn


def call_factory(key: str, ref: str, args: Dict, offered: Optional[Dict] = None) -> Any:
    """``ref(**args, **offered)``, ``offered`` only where the signature names them; a problem is
    one line: arguments the signature refuses (``<section>.args``), or what the factory raised."""
    fn = load_callable(key, ref)
    kwargs = dict(args)
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):                  # a builtin without a signature: pass args only
        signature = None
    for name, value in (offered or {}).items():
        if signature is not None and name in signature.parameters and name not in kwargs:
            kwargs[name] = value
    if signature is not None:
        try:
            signature.bind(**kwargs)
        except TypeError as err:
            section = key.rsplit(".", 1)[0]
            raise ConfigError([f"{section}.args: {ref} does not accept them ({err})"]) from None
    try:
        return fn(**kwargs)
    except Exception as err:                         # noqa: BLE001
        raise ConfigError([f"{key}: {ref} raised {_last_line(err)}"]) from None


class ArrayData:
    """Arrays ``x`` (samples first) and integer labels ``y``, batched by index."""

    nhwc_images = False                             # as given: the runners do not transpose

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def labels(self) -> np.ndarray:
        return self.y

    def first(self):
        return self.x[0]

    def batch(self, indices, epoch=0, train=True) -> Tuple[np.ndarray, np.ndarray]:
        indices = np.asarray(indices)
        return self.x[indices], self.y[indices]


class MapData:
    """A map-style dataset (``len``, ``[i] -> (x, y)``), batched by stacking its items."""

    nhwc_images = False

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def first(self):
        return _as_float32(np.asarray(self.dataset[0][0]))

    def labels(self) -> np.ndarray:
        return np.asarray([self.dataset[i][1] for i in range(len(self.dataset))])

    def batch(self, indices, epoch=0, train=True):
        items = [self.dataset[int(i)] for i in indices]
        x = _as_float32(np.stack([np.asarray(item[0]) for item in items]))
        return x, np.asarray([item[1] for item in items]).astype(np.int64)


def _as_float32(x):
    return x.astype(np.float32) if np.issubdtype(x.dtype, np.floating) and x.dtype != np.float32 else x


def _arrays(key, what, x, y):
    """(x, y) checked: same length, at least one sample, integer labels, one label per sample."""
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim < 1 or len(x) == 0:
        raise ConfigError([f"{key}: {what}: expected at least one sample, got x of shape {x.shape}"])
    if y.ndim != 1 or len(y) != len(x):
        raise ConfigError([f"{key}: {what}: expected one label per sample ({len(x)}), got y of shape {y.shape}"])
    if not np.issubdtype(y.dtype, np.integer):
        whole = np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y))
        if not whole:
            sample = next((v for v in y.ravel() if not (isinstance(v, (int, np.integer)) or float(v).is_integer())),
                          y.ravel()[0])
            sample = sample.item() if isinstance(sample, np.generic) else sample
            raise ConfigError([f"{key}: {what}: expected integer class labels, got {y.dtype} values such as "
                               f"{sample!r}"])
    if y.min() < 0:
        raise ConfigError([f"{key}: {what}: expected class labels >= 0, got {int(y.min())}"])
    return ArrayData(_as_float32(x), y.astype(np.int64))


def _split(key, what, value):
    """A factory's train or val as ArrayData / MapData."""
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(hasattr(v, "__len__") for v in value):
        return _arrays(key, what, *value)
    if hasattr(value, "__len__") and hasattr(value, "__getitem__"):
        if len(value) == 0:
            raise ConfigError([f"{key}: {what}: expected at least one sample, got an empty dataset"])
        item = value[0]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ConfigError([f"{key}: {what}: expected items (x, y), got {type(item).__name__}"])
        return MapData(value)
    raise ConfigError([f"{key}: {what}: expected a pair of arrays (x, y) or a map-style dataset "
                       f"(__len__, __getitem__), got {type(value).__name__}"])


def _read_npz(path):
    key = "data.path"
    try:
        with np.load(path, allow_pickle=False) as npz:
            files = {name: npz[name] for name in npz.files}
    except Exception as err:                         # noqa: BLE001  not an .npz, truncated, ...
        raise ConfigError([f"{key}: cannot read {path!r} as an .npz file ({_last_line(err)})"]) from None
    missing = [k for k in ("x_train", "y_train") if k not in files]
    if missing:
        raise ConfigError([f"{key}: expected arrays x_train and y_train in {path!r}, missing {', '.join(missing)} "
                           f"(has: {', '.join(sorted(files)) or 'none'})"])
    if ("x_val" in files) != ("y_val" in files):
        raise ConfigError([f"{key}: expected both x_val and y_val in {path!r} or neither"])
    train = _arrays(key, "x_train/y_train", files["x_train"], files["y_train"])
    val = _arrays(key, "x_val/y_val", files["x_val"], files["y_val"]) if "x_val" in files else None
    return train, val


def build_data(cfg, derived) -> Tuple[Any, Optional[Any]]:
    """(train, val or None) for data.kind arrays / python; ``derived`` gets num_classes (from the
    labels unless configured, which must then cover them), input_shape and the sample counts."""
    d = cfg["data"]
    if d["kind"] == "arrays":
        train, val = _read_npz(d["path"])
        key = "data.path"
    else:
        key = "data.factory"
        got = call_factory(key, d["factory"], d["args"])
        if not (isinstance(got, (tuple, list)) and len(got) == 2):
            raise ConfigError([f"{key}: {d['factory']} returned {type(got).__name__}; expected (train, val)"])
        train = _split(key, "train", got[0])
        val = None if got[1] is None else _split(key, "val", got[1])
    top = max(int(s.labels().max()) for s in (train, val) if s is not None)
    configured = derived.get("num_classes")
    if configured is None:
        derived["num_classes"] = top + 1
    elif top >= configured:
        which = "data.num_classes" if cfg["data"]["num_classes"] is not None else "model.num_classes"
        raise ConfigError([f"{which}: expected at least {top + 1} (the labels go up to {top}), got {configured}"])
    derived["input_shape"] = tuple(int(n) for n in np.shape(train.first()))
    derived["train_samples"], derived["val_samples"] = len(train), len(val) if val is not None else 0
    return train, val


def build_model(cfg, derived, framework: str):
    """``model.factory`` called with ``model.args`` (and num_classes / input_shape where named);
    its result checked against the framework's model type."""
    ref = cfg["model"]["factory"]
    offered = {"num_classes": derived.get("num_classes"), "input_shape": derived.get("input_shape")}
    model = call_factory("model.factory", ref, cfg["model"]["args"], offered)
    if framework == "torch":
        import torch
        ok = isinstance(model, torch.nn.Module)
    else:
        import keras
        ok = isinstance(model, keras.Model)
    if not ok:
        raise ConfigError([f"model.factory: {ref} returned {type(model).__name__}; expected "
                           f"{MODEL_TYPES[framework]} (framework {framework!r})"])
    return model


def check(exp, build_model_fn: Optional[Callable] = None):
    """Before launch: the user's data and model built once on this node. Returns
    ``(problems, facts)``: one line per problem, else what a dry run prints (parameters, shapes)."""
    cfg, derived = exp.cfg, dict(exp.derived)
    facts = []
    try:
        if uses_user_data(cfg):
            train, val = build_data(cfg, derived)
            x, y = train.batch(np.arange(min(len(train), derived["per_worker_batch"])))
            facts.append(f"data: {len(train)} training samples, {derived['val_samples']} validation, "
                         f"{derived['num_classes']} classes; first batch x {tuple(x.shape)} {x.dtype}, "
                         f"y {tuple(y.shape)} {y.dtype}")
        if uses_user_model(cfg) and build_model_fn is not None:
            model = build_model_fn(cfg, derived)
            facts.append(f"model: {derived['model']}, {count_parameters(model):,} parameters")
    except ConfigError as err:
        return err.problems, facts
    return [], facts


def count_parameters(model) -> int:
    if hasattr(model, "count_params"):              # keras
        return int(model.count_params())
    return sum(p.numel() for p in model.parameters())
