"""Rebuilds of a Keras model that the LiteRT conversion strategies need, and the CAM head.

Runs only in the converter's child process (converter.child.litert): it imports Keras, and
tf_keras for the legacy rebuild. Every function takes a loaded Keras 3 model and returns a new
model with the same weights; none of them trains or changes what the model computes.
"""

from __future__ import annotations

import inspect
import itertools
from typing import Any

__all__ = [
    "CamHead",
    "RebuildError",
    "cam_model",
    "find_cam_head",
    "legacy_lstm",
    "recurrent_layers",
    "static_batch",
]

# Keys a Keras 3 layer config may carry that mean nothing at inference (or are None/default).
_IGNORED = {"seed", "build_config", "compile_config", "quantization_config", "registered_name"}
# Keyword arguments every tf_keras layer accepts on top of its own.
_LEGACY_BASE = {
    "input_dim",
    "input_shape",
    "batch_input_shape",
    "batch_size",
    "weights",
    "activity_regularizer",
    "autocast",
    "implementation",
    "name",
    "trainable",
    "dtype",
    "dynamic",
}
# Layers between a global average pooling and the classifier Dense that do nothing at inference.
_PASS_THROUGH = {
    "Dropout",
    "SpatialDropout1D",
    "SpatialDropout2D",
    "GaussianNoise",
    "GaussianDropout",
    "AlphaDropout",
    "Identity",
}


class RebuildError(Exception):
    """This rebuild does not apply to the model; the message says why, in one line."""


def _keras() -> Any:
    import keras

    return keras


def _walk(layers: list[Any]) -> list[Any]:
    """Every layer, with wrappers (Bidirectional, TimeDistributed) and nested models opened."""
    keras = _keras()
    out = []
    for layer in layers:
        out.append(layer)
        if isinstance(layer, keras.Model):
            out += _walk(layer.layers)
        elif isinstance(layer, keras.layers.Bidirectional):
            out += _walk([layer.forward_layer, layer.backward_layer])
        elif isinstance(layer, keras.layers.Wrapper):
            out += _walk([layer.layer])
    return out


def recurrent_layers(model: Any) -> list[str]:
    """Class names of the model's recurrent layers (LSTM, GRU, SimpleRNN, ConvLSTM...)."""
    keras = _keras()
    return [type(x).__name__ for x in _walk(model.layers) if isinstance(x, keras.layers.RNN)]


def _set_unroll(cfg: Any) -> None:
    if isinstance(cfg, dict):
        if "unroll" in cfg:
            cfg["unroll"] = True
        for v in cfg.values():
            _set_unroll(v)
    elif isinstance(cfg, list):
        for v in cfg:
            _set_unroll(v)


def static_batch(model: Any, unroll: bool) -> Any:
    """The model rebuilt with a batch of one (as the agent runs it) and, with ``unroll``, every
    recurrent layer unrolled over its (static) time axis: plain ops instead of a WHILE loop."""
    keras = _keras()
    if unroll:
        for t in model.inputs:
            if any(d is None for d in t.shape[1:]):
                raise RebuildError(f"input {t.name} has a dynamic axis {tuple(t.shape)}")

    def clone(layer: Any) -> Any:
        cfg = layer.get_config()
        if unroll:
            _set_unroll(cfg)
        return layer.__class__.from_config(cfg)

    inputs = [keras.Input(batch_shape=(1, *t.shape[1:]), dtype=t.dtype) for t in model.inputs]
    new = keras.models.clone_model(
        model, input_tensors=inputs if len(inputs) > 1 else inputs[0], clone_function=clone
    )
    new.set_weights(model.get_weights())
    return new


# ---- the tf_keras (legacy Keras 2) rebuild: LSTM becomes the fused TFLite LSTM op ----------


def _legacy_class(name: str) -> Any:
    import tf_keras

    cls = getattr(tf_keras.layers, name, None)
    if cls is None:
        raise RebuildError(f"layer {name} has no tf_keras equivalent")
    return cls


def _default(v: Any) -> bool:
    return v is None or v is False or v == 0 or v in ("", [], {})


def _legacy_config(class_name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """A Keras 3 layer config as tf_keras reads it: dtype policies become names, nested layers
    are translated, initializers/regularizers/constraints dropped (weights are copied after)."""
    cls = _legacy_class(class_name)
    params = inspect.signature(cls.__init__).parameters
    allowed = set(params) | _LEGACY_BASE
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if key.endswith(("_initializer", "_regularizer", "_constraint")) or key in _IGNORED:
            continue
        if key not in allowed:
            if _default(value):
                continue
            raise RebuildError(f"{class_name} option {key}={value!r} has no tf_keras equivalent")
        if isinstance(value, dict) and "class_name" in value and "config" in value:
            name = value["class_name"]
            if name.endswith("DTypePolicy"):
                out[key] = value["config"]["name"]
            else:  # a nested layer (Bidirectional, TimeDistributed)
                out[key] = {"class_name": name, "config": _legacy_config(name, value["config"])}
            continue
        out[key] = value
    return out


def _resolve(arg: Any, tensors: dict[str, Any]) -> Any:
    if isinstance(arg, dict) and arg.get("class_name") == "__keras_tensor__":
        name, node, index = arg["config"]["keras_history"]
        if node != 0:
            raise RebuildError(f"layer {name} is shared (called more than once)")
        t = tensors[name]
        return t[index] if isinstance(t, list | tuple) else t
    if isinstance(arg, list | tuple):
        return [_resolve(a, tensors) for a in arg]
    return arg


def legacy_lstm(model: Any) -> Any:
    """The model rebuilt layer by layer in tf_keras, batch of one, weights copied. The TFLite
    converter turns a tf_keras LSTM into its fused UNIDIRECTIONAL_SEQUENCE_LSTM op, which has
    an int8 kernel; a Keras 3 LSTM becomes a WHILE loop, which full-int8 calibration cannot run.
    """
    try:
        import tf_keras
    except ImportError as exc:
        raise RebuildError("tf_keras is not installed (pip install 'medge[convert]')") from exc
    cfg = _functional_config(model)
    tensors: dict[str, Any] = {}
    legacy_layers: dict[str, Any] = {}
    for layer in cfg["layers"]:
        name = layer["config"]["name"]
        if layer["class_name"] == "InputLayer":
            tensors[name] = _legacy_input(tf_keras, layer)
            continue
        args = _call_args(layer, tensors)
        cls = layer["class_name"]
        new = tf_keras.layers.deserialize(
            {"class_name": cls, "config": _legacy_config(cls, layer["config"])}
        )
        tensors[name] = new(*args)
        legacy_layers[name] = new
    inputs = _pick(cfg["input_layers"], tensors)
    outputs = _pick(cfg["output_layers"], tensors)
    legacy = tf_keras.Model(inputs, outputs if len(outputs) > 1 else outputs[0])
    for layer in model.layers:
        if layer.weights:
            legacy_layers[layer.name].set_weights(layer.get_weights())
    return legacy


def _functional_config(model: Any) -> dict[str, Any]:
    """The model's config as a functional graph: a Sequential's layers chained one after
    another, from its InputLayer."""
    keras = _keras()
    cfg: dict[str, Any] = model.get_config()
    if not isinstance(model, keras.Sequential):
        return cfg
    first, *rest = cfg["layers"]
    if first["class_name"] != "InputLayer":
        raise RebuildError("a Sequential model needs an Input to be rebuilt")
    prev = first["config"]["name"]
    chain = [first]
    for layer in rest:
        history = {"keras_history": [prev, 0, 0]}
        node = {"args": [{"class_name": "__keras_tensor__", "config": history}], "kwargs": {}}
        chain.append({**layer, "inbound_nodes": [node]})
        prev = layer["config"]["name"]
    return {
        "layers": chain,
        "input_layers": [[chain[0]["config"]["name"], 0, 0]],
        "output_layers": [[prev, 0, 0]],
    }


def _legacy_input(tf_keras: Any, layer: dict[str, Any]) -> Any:
    """A tf_keras Input with a batch of one for a Keras 3 InputLayer config."""
    name = layer["config"]["name"]
    shape = layer["config"]["batch_shape"][1:]
    return tf_keras.Input(batch_size=1, shape=shape, dtype=layer["config"].get("dtype"), name=name)


def _call_args(layer: dict[str, Any], tensors: dict[str, Any]) -> list[Any]:
    """The rebuilt tensors a layer is called on; it must be called once, without kwargs."""
    name = layer["config"]["name"]
    nodes = layer.get("inbound_nodes") or []
    if len(nodes) != 1:
        raise RebuildError(f"layer {name} is called {len(nodes)} times")
    kwargs = {k: v for k, v in nodes[0].get("kwargs", {}).items() if v is not None}
    kwargs.pop("training", None)
    if kwargs:
        raise RebuildError(f"layer {name} is called with {sorted(kwargs)}")
    args: list[Any] = _resolve(nodes[0]["args"], tensors)
    return args


def _pick(spec: Any, tensors: dict[str, Any]) -> list[Any]:
    """The rebuilt tensors named by a config's ``input_layers`` or ``output_layers``."""
    specs = [spec] if spec and isinstance(spec[0], str) else spec
    return [
        _resolve({"class_name": "__keras_tensor__", "config": {"keras_history": s}}, tensors)
        for s in specs
    ]


# ---- class activation map -----------------------------------------------------------------


class CamHead:
    """Where a model's class activation map comes from."""

    def __init__(self, layer: str, dense: str, size: tuple[int, int]) -> None:
        self.layer = layer
        self.dense = dense
        self.size = size


def _parents(model: Any) -> dict[str, list[str]]:
    keras = _keras()
    cfg = model.get_config()
    if isinstance(model, keras.Sequential):
        names = [c["config"]["name"] for c in cfg["layers"]]
        return {b: [a] for a, b in itertools.pairwise(names)}

    def sources(arg: Any) -> list[str]:
        if isinstance(arg, dict) and arg.get("class_name") == "__keras_tensor__":
            return [arg["config"]["keras_history"][0]]
        if isinstance(arg, list | tuple):
            return [s for a in arg for s in sources(a)]
        return []

    return {
        c["config"]["name"]: [s for n in c.get("inbound_nodes", []) for s in sources(n["args"])]
        for c in cfg["layers"]
    }


def find_cam_head(model: Any, layer: str | None = None) -> CamHead:
    """The feature layer feeding GlobalAveragePooling2D -> (Dropout...) -> Dense output."""
    keras = _keras()
    if len(model.outputs) != 1:
        raise RebuildError("--cam needs a model with one output (the classifier)")
    parents = _parents(model)
    out_name = model.outputs[0]._keras_history[0].name
    dense = model.get_layer(out_name)
    if not isinstance(dense, keras.layers.Dense):
        raise RebuildError(
            f"--cam needs a Dense classifier as the last layer, not {type(dense).__name__}"
        )
    name = parents[out_name][0] if len(parents.get(out_name, [])) == 1 else None
    while name is not None and type(model.get_layer(name)).__name__ in _PASS_THROUGH:
        name = parents[name][0] if len(parents.get(name, [])) == 1 else None
    gap = model.get_layer(name) if name else None
    if not isinstance(gap, keras.layers.GlobalAveragePooling2D) or gap.keepdims:
        found = type(gap).__name__ if gap is not None else "a merge"
        raise RebuildError(
            f"--cam needs a GlobalAveragePooling2D -> Dense head; '{out_name}' follows {found}"
        )
    if gap.data_format != "channels_last":
        raise RebuildError("--cam needs channels_last feature maps")
    feature = parents[gap.name][0]
    if layer is not None and layer != feature:
        raise RebuildError(
            f"--cam layer '{layer}' does not feed the pooling head (it is '{feature}')"
        )
    shape = model.inputs[0].shape
    if len(shape) != 4:
        raise RebuildError(f"--cam needs an image input (N, H, W, C), not {tuple(shape)}")
    return CamHead(feature, out_name, (int(shape[1]), int(shape[2])))


def cam_model(model: Any, layer: str | None = None) -> tuple[Any, CamHead]:
    """The model with a second output: the class activation map of every class,
    cam[h, w, c] = sum_k A[h, w, k] * W[k, c] (A: the feature maps that the global average
    pooling reads, W: the classifier's Dense kernel; no bias, no ReLU). Because the head is
    GAP then Dense, mean over (h, w) of cam[..., c] plus the bias is exactly class c's logit,
    and for the predicted class ReLU(cam) equals Grad-CAM up to the factor 1/(h*w).

    The map is a 1x1 convolution with the Dense kernel, so the converter quantizes it like
    any other convolution.
    """
    keras = _keras()
    head = find_cam_head(model, layer)
    kernel = model.get_layer(head.dense).get_weights()[0]
    conv = keras.layers.Conv2D(kernel.shape[1], 1, use_bias=False, name="cam")
    cam = conv(model.get_layer(head.layer).output)
    conv.set_weights([kernel[None, None]])
    return keras.Model(model.inputs, [model.outputs[0], cam], name=f"{model.name}_cam"), head
