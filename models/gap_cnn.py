"""The zoo's small image CNN: two conv-BN-ReLU blocks, a last convolution whose maps the class
activation map weighs, global average pooling, softmax (breast_cnn, pneumonia_cnn)."""

from __future__ import annotations

from typing import Any

__all__ = ["gap_cnn"]


def gap_cnn(name: str, size: tuple[int, int] = (28, 28), classes: int = 2) -> Any:
    """A Keras model ``name`` for ``size`` grey images; its last convolution is ``last_conv``
    (the CAM layer) and its softmax ``probs``."""
    import keras
    from keras import layers

    inp = keras.Input((*size, 1), name="image")
    x = inp
    for filters in (16, 32):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
        x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(64, 3, padding="same", activation="relu", name="last_conv")(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.3)(x)
    out = layers.Dense(classes, activation="softmax", name="probs")(x)
    return keras.Model(inp, out, name=name)
