"""Device profiles as the converter sees them: the CPU, its cores, and which LiteRT kernels
are fast there, which orders the accuracy-budget search
(converter.budget): the cheapest rung *on the target* is tried first.

The kernel ranking comes from XNNPACK's coverage (the delegate LiteRT uses on every profile),
not from timings on those CPUs, which medge has not run on: int8 (QS8) kernels use the dot
product instructions of ARMv8.2-A (Cortex-A76 of a Raspberry Pi 5, A78AE of a Jetson Orin)
and plain NEON on ARMv8.0-A (Cortex-A72 of a Pi 4); fp16 arithmetic needs ARMv8.2-A (elsewhere
fp16 weights are widened to fp32 at load: the compute of fp32, half the file); int16x8 has no
XNNPACK kernels and runs LiteRT's reference kernels everywhere (measured here: 35x slower
than int8 for a wrist-activity CNN). On x86 without VNNI (this build machine) int8 is not
faster than fp32, but no slower, and 4x smaller.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PROFILE_INFO", "ProfileInfo", "cost_rank"]


@dataclass(frozen=True)
class ProfileInfo:
    name: str
    cpu: str
    cores: int  # the CPU's cores: what the agent's ``threads`` may use there (default 1)
    ranking: tuple[str, ...]  # kernel classes, cheapest first
    why: str


_ARMV82 = ("int8", "fp16", "fp32", "int16x8")
PROFILE_INFO = {
    "x86": ProfileInfo(
        "x86", "x86-64 (AVX2; VNNI on some)", 1, ("int8", "fp32", "fp16", "int16x8"),
        "int8 no slower than fp32 and 4x smaller; fp16 weights widen to fp32; int16x8 on "
        "reference kernels",
    ),
    "rpi4": ProfileInfo(
        "rpi4", "Cortex-A72, ARMv8.0-A: NEON, no dot product, no fp16 arithmetic", 4,
        ("int8", "fp16", "fp32", "int16x8"),
        "int8 NEON kernels ahead of fp32; fp16 weights widen to fp32 (half the file); int16x8 "
        "on reference kernels",
    ),
    "rpi5": ProfileInfo(
        "rpi5", "Cortex-A76, ARMv8.2-A: dot product, fp16 arithmetic", 4, _ARMV82,
        "int8 dot-product kernels, then fp16 arithmetic, then fp32; int16x8 on reference "
        "kernels",
    ),
    "jetson": ProfileInfo(
        "jetson", "Cortex-A78AE, ARMv8.2-A (the GPU runs the ONNX/TensorRT artifact)", 6,
        _ARMV82,
        "on its CPU: int8 dot-product kernels, then fp16, then fp32; int16x8 on reference "
        "kernels",
    ),
}  # fmt: skip


def cost_rank(profile: str, precision: str) -> int:
    """Where a precision's kernels stand on ``profile`` (0: cheapest); int8 rungs (full int8,
    float-head, mixed) share the int8 class."""
    ranking = PROFILE_INFO[profile].ranking
    return ranking.index(precision) if precision in ranking else len(ranking)
