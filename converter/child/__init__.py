"""The converter's TensorFlow work, each run in a child process of its own (converter.runner),
so a crash in the TFLite converter or tf2onnx costs one reported failure, never the session:

    python -m converter.child.litert JOB.json           # LiteRT strategies (converter.strategies)
    python -m converter.child.litert variant JOB.json   # one rung of the --budget search
    python -m converter.child.onnx export JOB.json      # Keras/SavedModel -> ONNX fp32 (tf2onnx)
    python -m converter.child.onnx quantize JOB.json    # ONNX fp32 -> QDQ int8 (ONNX Runtime)
    python -m converter.child.batchnorm JOB.json        # BatchNorm statistics vs calibration

``models`` loads a source model (Keras, legacy h5, SavedModel) and ``rebuild`` rebuilds one for
conversion (static batch, unrolled or legacy LSTM, CAM head). Nothing in the parent process
imports this package's modules at module level: they import TensorFlow.
"""
