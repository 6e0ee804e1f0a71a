"""Where the bytes of a LiteRT (.tflite) file go: constant data by type and role, quantization
parameters, tensor names, metadata, and the flatbuffer tables around them.

    python bench/tflite_breakdown.py model_fp32.tflite model_int8.tflite ...

Reads the flatbuffer with the schema that ai-edge-litert ships (no TensorFlow import). The
parts add up to the file size: ``rest`` is what the parts do not name (operator and tensor
tables, op options, shapes, vtables, alignment padding).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

__all__ = ["PARTS", "breakdown", "format_breakdown"]

# tflite TensorType codes -> names, for the types a converted CNN holds
_TYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 7: "int16", 9: "int8"}
PARTS = (
    "int8 weights",  # int8 constants read as an op's filter/weights (input 1)
    "int32 biases",  # int32 constants read as an op's bias (input 2)
    "float32 constants",  # fp32 weights and biases (the fp32 model), float constants left in int8
    "other constants",  # shapes, axes, int8 constants that are neither (e.g. an ADD operand)
    "per-channel scales (float32)",
    "per-channel zero points (int64)",
    "per-tensor quantization",  # one scale + one zero point (+ min/max) per activation tensor
    "tensor names",
    "metadata",  # conversion metadata, min runtime version
    "rest",
)


def _n(vec: object) -> int:
    return 0 if vec is None else len(vec)  # type: ignore[arg-type]


def breakdown(path: Path) -> dict[str, int]:
    """Bytes per part (PARTS) of one .tflite file, plus ``total`` and counts of tensors,
    per-channel tensors and channels, and float32 activation tensors."""
    from ai_edge_litert import schema_py_generated as schema

    raw = Path(path).read_bytes()
    model = schema.ModelT.InitFromPackedBuf(raw, 0)
    out: Counter[str] = Counter()
    meta_buffers = {int(m.buffer) for m in model.metadata or []}
    for b in meta_buffers:
        out["metadata"] += _n(model.buffers[b].data)
    channels = per_channel = float_acts = n_tensors = 0
    counted: set[int] = set()  # buffers already counted (tensors may share one)
    for sg in model.subgraphs:
        role: dict[int, int] = {}  # tensor -> the input position an op first reads it at
        for op in sg.operators:
            for pos, t in enumerate(op.inputs if op.inputs is not None else []):
                if t >= 0:
                    role.setdefault(int(t), pos)
        for i, t in enumerate(sg.tensors):
            n_tensors += 1
            out["tensor names"] += _n(t.name)
            buf = model.buffers[t.buffer] if t.buffer < len(model.buffers) else None
            shared = t.buffer in meta_buffers or t.buffer in counted
            size = _n(buf.data) if buf is not None and not shared else 0
            if buf is not None and not shared and not size and getattr(buf, "size", 0):
                size = int(buf.size)  # data stored outside the flatbuffer (buffer offsets)
            if size:
                counted.add(int(t.buffer))
            dtype = _TYPES.get(int(t.type), f"type{t.type}")
            if size:
                if dtype == "int8" and role.get(i) == 1:
                    out["int8 weights"] += size
                elif dtype == "int32" and role.get(i) == 2:
                    out["int32 biases"] += size
                elif dtype == "float32":
                    out["float32 constants"] += size
                else:
                    out["other constants"] += size
            elif dtype == "float32" and (buf is None or not _n(buf.data)):
                float_acts += 1
            q = t.quantization
            if q is None:
                continue
            n_scale, n_zero = _n(q.scale), _n(q.zeroPoint)
            if n_scale > 1:
                per_channel += 1
                channels += n_scale
                out["per-channel scales (float32)"] += 4 * n_scale
                out["per-channel zero points (int64)"] += 8 * n_zero
            else:
                out["per-tensor quantization"] += 4 * n_scale + 8 * n_zero
            out["per-tensor quantization"] += 4 * (_n(q.min) + _n(q.max))
    named = sum(out[p] for p in PARTS if p != "rest")
    result = {p: int(out[p]) for p in PARTS}
    result["rest"] = len(raw) - named
    result.update(
        total=len(raw),
        tensors=n_tensors,
        per_channel_tensors=per_channel,
        channels=channels,
        float32_activations=float_acts,
    )
    return result


def format_breakdown(parts: dict[str, int], ref_total: int | None = None) -> list[str]:
    """One line per non-empty part: bytes, share of this file and, with ``ref_total`` (the
    fp32 file), share of that file, so the int8/fp32 ratio reads as a sum of parts."""
    lines = []
    for p in PARTS:
        b = parts[p]
        if not b:
            continue
        line = f"{p:32s} {b:>11,} B  {b / parts['total']:6.1%} of file"
        if ref_total:
            line += f"  {b / ref_total:.4f} of fp32"
        lines.append(line)
    return lines


def main(paths: list[str]) -> None:
    for p in paths:
        parts = breakdown(Path(p))
        print(
            f"{p}: {parts['total']:,} bytes, {parts['tensors']} tensors, "
            f"{parts['per_channel_tensors']} per-channel ({parts['channels']:,} channels), "
            f"{parts['float32_activations']} float32 activation tensors"
        )
        for line in format_breakdown(parts):
            print("  " + line)


if __name__ == "__main__":
    main(sys.argv[1:])
