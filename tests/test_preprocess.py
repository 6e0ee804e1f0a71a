from __future__ import annotations

import numpy as np
import pytest

from edge_agent.bundle import Decode, Preprocess, Quantization, TensorSpec
from edge_agent.decode import classify
from edge_agent.errors import MedgeError
from edge_agent.preprocess import byte_table, dequantize, normalize, quantize, to_input


def test_scale01_and_mean_std() -> None:
    img = np.array([[0, 255], [51, 102]], dtype=np.uint8)
    assert normalize(Preprocess(kind="scale01"), img).max() == pytest.approx(1.0)
    x = np.array([[1.0, 10.0], [3.0, 30.0]])
    out = normalize(Preprocess(kind="mean_std", mean=[2.0, 20.0], std=[1.0, 10.0]), x)
    np.testing.assert_allclose(out, [[-1, -1], [1, 1]])


def test_zscore_is_per_channel_over_time() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal([5.0, -3.0, 100.0], [1.0, 4.0, 0.5], size=(200, 3))
    z = normalize(Preprocess(kind="zscore"), w)
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(z.std(axis=0), 1, atol=1e-3)


def test_quantize_round_trip_and_saturation() -> None:
    q = Quantization(scale=1 / 255, zero_point=-128)
    x = np.array([0.0, 0.5, 1.0, 2.0, -1.0], dtype=np.float32)
    qi = quantize(x, q, "int8")
    assert qi.dtype == np.int8
    assert qi.tolist()[0] == -128 and qi.tolist()[3] == 127 and qi.tolist()[4] == -128
    np.testing.assert_allclose(dequantize(qi, q)[:3], x[:3], atol=1 / 255)


def test_to_input_shapes_and_rejects_wrong_size() -> None:
    spec = TensorSpec(name="image", shape=[1, 28, 28, 1], dtype="float32")
    assert to_input(np.zeros((28, 28), np.float32), spec).shape == (1, 28, 28, 1)
    with pytest.raises(MedgeError, match="does not fit input 'image'"):
        to_input(np.zeros((27, 28), np.float32), spec)


def test_binary_threshold_on_positive_class() -> None:
    labels = ["malignant", "benign"]
    raw = np.array([0.3, 0.7])
    assert classify(raw, Decode(), labels, 0).pred_label == "benign"
    assert classify(raw, Decode(threshold=0.25), labels, 0).pred_label == "malignant"


def test_byte_table_prepares_exactly_what_normalize_and_quantize_do() -> None:
    rng = np.random.default_rng(3)
    sample = rng.integers(0, 256, size=(28, 28), dtype=np.uint8)
    for kind in ("scale01", "none"):
        spec = Preprocess(kind=kind)
        for dtype, q in (
            ("int8", Quantization(scale=1 / 255, zero_point=-128)),
            ("uint8", Quantization(scale=0.7, zero_point=3)),
        ):
            t = TensorSpec(name="x", shape=[1, 28, 28, 1], dtype=dtype, quantization=q)
            table = byte_table(spec, t)
            assert table is not None
            want = to_input(normalize(spec, sample), t)
            got = table[sample].reshape(want.shape)
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)
        f = TensorSpec(name="x", shape=[1, 28, 28, 1], dtype="float32")  # a float input too
        table = byte_table(spec, f)
        assert table is not None and table.dtype == np.float32
        want = to_input(normalize(spec, sample), f)
        np.testing.assert_array_equal(table[sample].reshape(want.shape), want)
    f16 = TensorSpec(name="x", shape=[1, 28, 28, 1], dtype="float16")
    assert byte_table(Preprocess(kind="scale01"), f16) is None  # a float16 input: no table
