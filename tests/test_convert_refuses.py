"""The converter and ``medge evaluate`` refuse what they cannot do right (docs/convert.md, "What
is refused"): a channels-first model gets channels-first data, consistently in calibration,
evaluation and on the device; an ambiguous layout, NaN/Inf, a missing split and a damaged
model file are one line each; a regression model is scored as one.

The models are tiny ONNX graphs built here with fixed weights (no TensorFlow, seconds to
convert). The images are real: BreastMNIST (a channels-first RGB classifier gets three
different views of each grey image as its channels) and HC18 fetal-head ultrasound pooled to
22x32 with the real head circumference as the regression target (tests/data/ATTRIBUTION.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converter import ConversionError, ConvertRequest, convert, evaluate_bundle
from converter.layout import keras_channels_first, resolve_layout
from converter.messages import collapse
from edge_agent.bundle import Bundle, Preprocess, TensorSpec
from edge_agent.errors import MedgeError
from edge_agent.model import LoadedModel
from edge_agent.preprocess import byte_table, to_input
from models import breast_cnn

pytestmark = pytest.mark.slow  # converts models (ONNX and Keras)

HC18 = Path(__file__).parent / "data" / "hc18_pooled.npz"
SCALE01 = Preprocess(kind="scale01")


def _model(nodes: list, inits: dict[str, np.ndarray], shape: list[int], out: list[int]) -> bytes:
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, out)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m.SerializeToString()


def _conv_classifier(bias: np.ndarray, channels: int = 3, side: int = 28) -> bytes:
    """Conv 3x3 (fixed random weights) -> ReLU -> global average -> 3 classes, channels first."""
    rng = np.random.default_rng(7)
    nodes = [
        helper.make_node("Conv", ["image", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "g", "gb"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    inits = {
        "w": rng.normal(0, 0.5, (4, channels, 3, 3)),
        "b": np.zeros(4),
        "g": rng.normal(0, 1.0, (4, 3)),
        "gb": bias,
    }
    return _model(nodes, inits, [1, channels, side, side], [1, 3])


def _run(model: bytes, x: np.ndarray) -> np.ndarray:
    """onnxruntime fed the tensors exactly as given, one at a time."""
    s = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: xi[None].astype(np.float32)})[0] for xi in x])


def _chw(x: np.ndarray) -> np.ndarray:
    """HWC uint8 images as the model's float CHW input (scale01)."""
    return np.transpose(x.astype(np.float32) / 255.0, (0, 3, 1, 2))


@pytest.fixture(scope="module")
def channels_first(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The classifier (biases centred on the calibration images, so every class occurs), the
    images as HWC RGB, labelled with what onnxruntime says when fed CHW directly."""
    d = tmp_path_factory.mktemp("nchw")
    with np.load(breast_cnn.DATA) as npz:
        grey_t, grey_v = npz["train_images"][:120], npz["val_images"]

    def rgb(g: np.ndarray) -> np.ndarray:  # three views of the real image, as H x W x 3
        return np.stack([g, 255 - g, g[:, :, ::-1]], axis=-1)

    xt, xv = rgb(grey_t), rgb(grey_v)
    logit = np.log(_run(_conv_classifier(np.zeros(3)), _chw(xt)))
    model = _conv_classifier(-(logit - logit.mean(1, keepdims=True)).mean(0))
    (d / "cf.onnx").write_bytes(model)
    yt, yv = _run(model, _chw(xt)).argmax(1), _run(model, _chw(xv)).argmax(1)
    np.savez(d / "rgb.npz", train_images=xt, train_labels=yt, val_images=xv, val_labels=yv)
    out = d / "bundle"
    convert(
        ConvertRequest(
            model=d / "cf.onnx",
            calib=d / "rgb.npz",
            eval=d / "rgb.npz",
            out=out,
            preprocess=SCALE01,
            labels=["a", "b", "c"],
            onnx_input="quantize",
            float_artifacts="none",
        )
    )
    return {"dir": d, "model": model, "xv": xv, "yv": yv, "bundle": out}


def test_a_channels_first_int8_model_gets_channels_first_data(channels_first: dict) -> None:
    c = channels_first
    xv, yv = c["xv"], c["yv"]
    assert len(set(yv.tolist())) == 3  # the model tells the images apart
    # fed as the old converter did (HWC bytes reshaped into [1, 3, 28, 28]), it says otherwise
    wrong = _run(c["model"], (xv.astype(np.float32) / 255.0).reshape(-1, 3, 28, 28)).argmax(1)
    assert np.mean(wrong == yv) < 0.9
    bundle = Bundle.load(c["bundle"])
    report = json.loads((c["bundle"] / "report.json").read_text())
    assert [a.inputs[0].layout for a in bundle.manifest.artifacts] == ["NCHW", "NCHW"]
    assert report["float"]["accuracy"] == 1.0  # calibration/evaluation data went in as CHW
    int8 = (c["bundle"] / "model_int8.onnx").read_bytes()
    direct = _run(int8, _chw(xv)).argmax(1)  # the int8 artifact fed CHW by hand
    for precision, want in (("fp32", yv), ("int8", direct)):
        model = LoadedModel(bundle, "onnx", precision=precision)  # the device's own path
        got = np.array([model.predict(s).pred for s in xv])  # HWC images, as a camera gives
        assert np.array_equal(got, want), precision
        result = evaluate_bundle(
            c["bundle"], c["dir"] / "rgb.npz", runtime="onnx", precision=precision
        )
        assert result["accuracy"] == pytest.approx(float(np.mean(want == yv)))
    assert report["onnx-int8"]["accuracy"] == pytest.approx(float(np.mean(direct == yv)))


def test_a_channels_first_keras_model_is_converted_channels_first(
    channels_first: dict, tmp_path: Path
) -> None:
    """Keras says data_format channels_first: the LiteRT child calibrates on CHW data, and the
    artifact, run by the device on HWC images, does what LiteRT fed CHW directly does."""
    import keras
    from ai_edge_litert.interpreter import Interpreter

    xv = channels_first["xv"]
    keras.utils.set_random_seed(3)
    inner = keras.Sequential(
        [
            keras.Input((3, 28, 28)),
            keras.layers.Conv2D(
                4, 3, padding="same", activation="relu", data_format="channels_first"
            ),
            keras.layers.GlobalAveragePooling2D(data_format="channels_first"),
            keras.layers.Dense(3),
        ]
    )
    logits = inner.predict(_chw(xv), verbose=0)
    inner.layers[-1].bias.assign(-(logits - logits.mean(1, keepdims=True)).mean(0))
    model = keras.Sequential([inner, keras.layers.Softmax()])
    model.save(tmp_path / "cf.keras")
    y = model.predict(_chw(xv), verbose=0).argmax(1)
    data = _npz(tmp_path / "rgb.npz", x=xv, y=y)
    out = tmp_path / "bundle"
    convert(
        ConvertRequest(
            model=tmp_path / "cf.keras",
            calib=data,
            eval=data,
            out=out,
            preprocess=SCALE01,
            labels=["a", "b", "c"],
            onnx=False,
            strategies=["dynamic-range"],
            float_artifacts="none",
        )
    )
    bundle = Bundle.load(out)
    art = bundle.manifest.artifacts[0]
    assert (art.inputs[0].shape, art.inputs[0].layout) == ([1, 3, 28, 28], "NCHW")
    report = json.loads((out / "report.json").read_text())
    assert report["float"]["accuracy"] == 1.0  # the child was fed CHW
    interp = Interpreter(str(out / art.file))
    interp.allocate_tensors()
    i, o = interp.get_input_details()[0]["index"], interp.get_output_details()[0]["index"]
    direct = []
    for t in _chw(xv):
        interp.set_tensor(i, t[None])
        interp.invoke()
        direct.append(int(interp.get_tensor(o).argmax()))
    device = LoadedModel(bundle, "litert")
    assert [device.predict(s).pred for s in xv] == direct


def test_the_device_transposes_images_for_a_channels_first_input() -> None:
    spec = TensorSpec(name="x", shape=[1, 3, 4, 5], dtype="float32", layout="NCHW")
    img = np.arange(60, dtype=np.float32).reshape(4, 5, 3)
    assert np.array_equal(to_input(img, spec)[0], img.transpose(2, 0, 1))
    grey = TensorSpec(name="x", shape=[1, 1, 4, 5], dtype="float32", layout="NCHW")
    assert np.array_equal(to_input(img[..., 0], grey)[0, 0], img[..., 0])
    with pytest.raises(MedgeError, match=r"is not \(H, W, C\) = \(4, 5, 3\)"):
        to_input(img.transpose(2, 0, 1), spec)  # a CHW sample: the device takes HWC images
    q = {"scale": 1 / 255, "zero_point": -128}
    int8 = TensorSpec(name="x", shape=[1, 3, 4, 5], dtype="int8", layout="NCHW", quantization=q)
    assert byte_table(SCALE01, int8) is None  # a byte lookup would keep the HWC order


def test_an_ambiguous_layout_is_an_error_asking_for_layout(tmp_path: Path) -> None:
    x = np.zeros((8, 8, 8, 8), np.uint8)  # channels could be the first axis or the last
    np.savez(tmp_path / "d.npz", x=x, y=np.zeros(8, np.int64))
    (tmp_path / "sq.onnx").write_bytes(_conv_classifier(np.zeros(3), channels=8, side=8))
    req = dict(
        model=tmp_path / "sq.onnx",
        calib=tmp_path / "d.npz",
        eval=tmp_path / "d.npz",
        out=tmp_path / "out",
        labels=["a", "b", "c"],
        onnx_input="quantize",
    )
    with pytest.raises(ConversionError, match="give --layout nchw or --layout nhwc"):
        convert(ConvertRequest(**req))  # type: ignore[arg-type]
    with pytest.raises(ConversionError, match="--layout nchw is for image inputs"):
        convert(ConvertRequest(**{**req, "layout": "nchw", "model": _flat(tmp_path)}))  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


def _flat(tmp_path: Path) -> Path:
    nodes = [helper.make_node("Gemm", ["image", "g", "gb"], ["probs"])]
    p = tmp_path / "flat.onnx"
    p.write_bytes(_model(nodes, {"g": np.ones((512, 3)), "gb": np.zeros(3)}, [1, 512], [1, 3]))
    return p


def test_layouts_are_read_from_the_model(tmp_path: Path) -> None:
    import keras

    m = keras.Sequential(
        [
            keras.Input((3, 8, 8)),
            keras.layers.Conv2D(2, 3, data_format="channels_first"),
            keras.layers.GlobalAveragePooling2D(data_format="channels_first"),
        ]
    )
    m.save(tmp_path / "cf.keras")
    assert keras_channels_first(tmp_path / "cf.keras", "keras")
    assert not keras_channels_first(breast_cnn.WEIGHTS, "keras")
    assert resolve_layout("cf.keras", "keras", None, None, [(8, 8, 3)], True) == "NCHW"
    assert resolve_layout("m.onnx", "onnx", [1, 3, 224, 224], None, [(224, 224, 3)]) == "NCHW"
    assert resolve_layout("m.onnx", "onnx", [1, 224, 224, 3], None, [(224, 224, 3)]) == "NHWC"
    # a sensor window shaped as an image (magic wand, [1, 128, 3, 1]): read the one way it fits
    assert resolve_layout("w.tflite", "tflite", [1, 128, 3, 1], None, [(128, 3)]) == "NHWC"
    assert resolve_layout("e.tflite", "tflite", [1, 260], None, [(260,)]) == "NC"
    with pytest.raises(ConversionError, match=r"looks channels-first: store images as \(H, W, C\)"):
        resolve_layout("m.onnx", "onnx", [1, 3, 28, 28], None, [(3, 28, 28)])
    with pytest.raises(
        ConversionError,
        match="samples must be images .3, 28, 28., got .28, 28, "
        "3.; is it channels-first. --layout nchw",
    ):
        resolve_layout("m.onnx", "onnx", [1, 3, 28, 28], "nhwc", [(28, 28, 3)])  # the old bug


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_nan_a_missing_split_and_a_damaged_model_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "cf.onnx").write_bytes(_conv_classifier(np.zeros(3)))
    x = np.random.default_rng(0).random((6, 28, 28, 3)).astype(np.float32)
    y = np.arange(6) % 3
    good = _npz(tmp_path / "good.npz", train_images=x, train_labels=y, val_images=x, val_labels=y)
    bad_x = x.copy()
    bad_x[2, 0, 0, 0], bad_x[4, 1, 1, 1], bad_x[4, 2, 2, 2] = np.nan, np.nan, np.inf
    nan = _npz(tmp_path / "nan.npz", train_images=x, train_labels=y, val_images=bad_x, val_labels=y)
    only_test = _npz(tmp_path / "test.npz", test_images=x, test_labels=y)
    base = dict(
        model=tmp_path / "cf.onnx",
        calib=good,
        eval=good,
        out=tmp_path / "out",
        labels=["a", "b", "c"],
        onnx_input="quantize",
    )
    cases = {
        "nan.npz (split val): 2 NaN and 1 Inf values in 2 of 6 evaluation samples": {"eval": nan},
        "no split 'test' (--calib-split); the file has splits: train, val": {"calib_split": "test"},
        "no split 'tets' (--eval-split); the file has splits: test": {
            "eval": only_test,
            "eval_split": "tets",
        },
        "no 'train' split for calibration and no x/y keys (splits: test); name the one to use "
        "with --calib-split": {"calib": only_test},
    }
    for message, change in cases.items():
        with pytest.raises(ConversionError) as err:
            convert(ConvertRequest(**{**base, **change}))  # type: ignore[arg-type]
        assert message in str(err.value) and "\n" not in str(err.value)
    for name, text, what in (
        ("m.keras", b"garbage", "Keras"),
        ("m.onnx", b"\x00\x01junk", "ONNX"),
        ("m.tflite", b"12345678", "LiteRT"),
        ("m.h5", b"x" * 64, "Keras HDF5"),
    ):
        (tmp_path / name).write_bytes(text)
        with pytest.raises(ConversionError, match=rf"^{name} is not a {what} model: "):
            convert(ConvertRequest(**{**base, "model": tmp_path / name}))  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


def test_evaluate_refuses_a_missing_split_and_nan(channels_first: dict, tmp_path: Path) -> None:
    data = channels_first["dir"] / "rgb.npz"
    with pytest.raises(
        ConversionError,
        match=r"no split 'test' \(--split\); the file has splits: "
        "train, val",
    ):
        evaluate_bundle(channels_first["bundle"], data, split="test", runtime="onnx")
    x = channels_first["xv"].astype(np.float32)
    x[0, 0, 0, 0] = np.nan
    bad = _npz(tmp_path / "bad.npz", x=x, y=channels_first["yv"])
    with pytest.raises(ConversionError, match=r"bad.npz \(x/y\): 1 NaN values in 1 of 78"):
        evaluate_bundle(channels_first["bundle"], bad, runtime="onnx")


def test_the_cli_says_it_in_one_line_and_exits_non_zero(channels_first: dict) -> None:
    d = channels_first["dir"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "medge",
            "convert",
            str(d / "cf.onnx"),
            "--calib",
            str(d / "rgb.npz"),
            "--eval",
            str(d / "rgb.npz"),
            "--calib-split",
            "test",
            "--out",
            str(d / "never"),
            "--onnx-input",
            "quantize",
            "--layout",
            "nchw",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"medge: error: {d / 'rgb.npz'}: no split 'test' (--calib-split); the file has splits: "
        "train, val"
    ]


@pytest.fixture(scope="module")
def regression(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A linear model of head circumference on 22x32 pooled HC18 images (ridge regression fitted
    here on the 120 training images), as an ONNX graph: Flatten -> Gemm -> one value, in mm."""
    d = tmp_path_factory.mktemp("regression")
    with np.load(HC18) as npz:
        xt, yt = npz["train_images"], npz["train_targets"].astype(np.float64)
        xv, yv = npz["val_images"], npz["val_targets"].astype(np.float64)
    a = np.c_[xt.reshape(len(xt), -1) / 255.0, np.ones(len(xt))]
    w = np.linalg.solve(a.T @ a + 10.0 * np.eye(a.shape[1]), a.T @ yt)
    nodes = [
        helper.make_node("Flatten", ["image"], ["f"]),
        helper.make_node("Gemm", ["f", "g", "gb"], ["hc_mm"]),
    ]
    model = _model(nodes, {"g": w[:-1, None], "gb": w[-1:]}, [1, 22, 32, 1], [1, 1])
    (d / "hc.onnx").write_bytes(model)
    out = d / "bundle"
    convert(
        ConvertRequest(
            model=d / "hc.onnx",
            calib=HC18,
            eval=HC18,
            out=out,
            preprocess=SCALE01,
            task="regression",
            activation="none",
            onnx_input="quantize",
            float_artifacts="none",
        )
    )
    direct = _run(model, xv[..., None].astype(np.float32) / 255.0)[:, 0]
    return {"bundle": out, "direct": direct, "y": yv}


def test_a_regression_model_is_scored_in_its_units(regression: dict) -> None:
    report = json.loads((regression["bundle"] / "report.json").read_text())
    m = Bundle.load(regression["bundle"]).manifest
    assert m.task == "regression" and m.decode.kind == "regression"
    err = regression["direct"] - regression["y"]
    f = report["float"]
    assert f["n"] == 50
    assert f["mae"] == pytest.approx(np.abs(err).mean(), rel=1e-4)
    assert f["rmse"] == pytest.approx(np.sqrt((err**2).mean()), rel=1e-4)
    assert f["bias"] == pytest.approx(err.mean(), rel=1e-4)
    assert f["loa_high"] - f["loa_low"] == pytest.approx(2 * 1.96 * err.std(ddof=1), rel=1e-3)
    assert f["mae_ci"][0] < f["mae"] < f["mae_ci"][1]
    assert f["pearson_r"] > 0.4  # a weak but real model: it does follow head size (0.50)
    q = report["onnx-int8"]
    assert abs(q["mae"] - f["mae"]) < 2.0  # mm
    vs = report["vs_float"]["onnx-int8"]
    assert vs["pearson_r"] > 0.99 and abs(vs["bias"]) < 2.0
    md = (regression["bundle"] / "report.md").read_text()
    assert "| mae |" in md and "Agreement with float (Bland-Altman" in md
    got = evaluate_bundle(regression["bundle"], HC18, runtime="onnx", precision="int8")
    assert got["mae"] == pytest.approx(q["mae"], rel=1e-6)


def test_a_single_output_model_is_not_scored_as_a_classifier(tmp_path: Path) -> None:
    """The regression model run as the default classifier: one line, no traceback (it was an
    IndexError in the confusion matrix: head circumferences taken for 330 classes)."""
    nodes = [
        helper.make_node("Flatten", ["image"], ["f"]),
        helper.make_node("Gemm", ["f", "g", "gb"], ["hc_mm"]),
    ]
    model = _model(nodes, {"g": np.ones((704, 1)), "gb": np.zeros(1)}, [1, 22, 32, 1], [1, 1])
    (tmp_path / "hc.onnx").write_bytes(model)
    with np.load(HC18) as d:
        x, y = d["val_images"], d["val_targets"]
    values = _npz(tmp_path / "values.npz", x=x, y=y)
    five = _npz(tmp_path / "five.npz", x=x, y=np.arange(len(x)) % 5)
    base = dict(model=tmp_path / "hc.onnx", out=tmp_path / "out", onnx_input="quantize")
    for data, said in (
        (values, "labels y hold values such as 99.34, not class indices"),
        (five, "hc.onnx outputs 1 values per sample but 5 labels were given"),
    ):
        for wrap in ("quantize", "wrap"):
            with pytest.raises(ConversionError) as err:
                convert(ConvertRequest(**{**base, "calib": data, "eval": data, "onnx_input": wrap}))  # type: ignore[arg-type]
            assert said in str(err.value) and "--task regression" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_repeated_messages_are_said_once_with_a_count() -> None:
    said = collapse([f"tensor '{n}' has no calibration range" for n in "abcde"] + ["other"] * 2)
    assert said == [
        "tensor 'a' has no calibration range (said 5 times: 'a', 'b', 'c', ...)",
        "other",
    ]
