"""What the zoo knows about each of its models: plain data, read by ``medge zoo`` and by
tools/models_table.py (which writes docs/models.md). Nothing here imports TensorFlow."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["ZooModel"]

DataKind = Literal["real", "real + simulated"]


@dataclass(frozen=True)
class ZooModel:
    """One reference model: its task and data, its trained weights, how to convert it, the
    stream the agent runs it on, and the published number it is compared with."""

    name: str  # module name under models/, also the bundle's name (with - for _)
    family: str  # CNN, GRU, LSTM, CNN-LSTM, GAN, U-Net
    task: str  # the converter's --task
    summary: str  # one line: what it does on which data
    data: Path  # npz with train_* and val_* splits: calibration and evaluation
    data_kind: DataKind  # "real + simulated": the simulated part is named in ``split``
    split: str  # how train and val were split (by subject, by record, ...)
    weights: Path  # the committed trained model
    # ConvertRequest fields beyond model/calib/eval/out/profile (its budget, e.g.
    # {"auc": 0.005}: what the int8 file may lose against float)
    convert: dict[str, Any] = field(default_factory=dict)
    anchor: str = ""  # the published number it is compared with, and where it comes from
    stream: str = ""  # the source the agent runs it on (docs/config.md)

    @property
    def module(self) -> str:
        return f"models.{self.name}"

    @property
    def bundle_name(self) -> str:
        return self.name.replace("_", "-")
