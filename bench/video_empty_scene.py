"""Does the zoo's video fall detector stay quiet with no person in view?

The empty scene is real: the per-pixel median of the committed GMDCSA24 clip (the person moves,
the room does not), written as a 10 s, 15 fps video with +-3 grey levels of noise per frame. It
runs through the agent's own path (video source with the bundle's window, the LiteRT artifact,
the bundle's fall rule) and prints the highest fall score and the events raised.

    python bench/video_empty_scene.py            # builds the zoo bundle (lean) if not cached

The first committed model fired here at 0.996 (issue 13's note). Since the model is trained
with empty-room negatives (models/video_fall_cnnlstm.py: each training clip's room image as a
still, noisy no_fall window) it prints no event: highest fall score 0.094 over the 43 windows.
That room (subject 3's bedroom) is among the final model's training rooms, so this checks the
device path on an empty room, not a held-out room: the held-out empty-room numbers are the
module's LOSO table (highest 0.31, 0 events). It is still a bench, not a test: a test would
convert the bundle (slow) and belongs in the zoo's tests.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def empty_scene(clip: Path, out: Path, seconds: float = 10.0) -> Path:
    import cv2

    cap = cv2.VideoCapture(str(clip))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    fps = cap.get(cv2.CAP_PROP_FPS) or 15.0
    cap.release()
    room = np.median(np.stack(frames), axis=0).astype(np.int16)
    h, w = room.shape[:2]
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"MJPG"), round(fps), (w, h))
    rng = np.random.default_rng(0)
    for _ in range(int(seconds * round(fps))):
        writer.write(np.clip(room + rng.integers(-3, 4, room.shape), 0, 255).astype(np.uint8))
    writer.release()
    return out


def main() -> None:
    from edge_agent.events import EventTracker
    from edge_agent.model import LoadedModel
    from edge_agent.sources import VideoSettings, open_source
    from medge.zoo import build
    from models import video_fall_cnnlstm as m

    bundle = build("video_fall_cnnlstm", lean=True)
    man = bundle.manifest
    video = empty_scene(m.CLIP, Path(tempfile.mkdtemp()) / "empty-room.avi")
    cfg = VideoSettings(path=video, color="grey", size=m.SIZE, step=3)
    src = open_source(cfg, man.window)
    model = LoadedModel(bundle)
    tracker = EventTracker(man.decode.events, man.labels)
    fall = man.labels.index(m.POSITIVE)
    rate = (man.window.rate_hz if man.window else None) or 5.0
    events, top, n = [], 0.0, 0
    for i, win in enumerate(src.stream(threading.Event())):
        scores = model.infer(model.prepare(win.data))
        top, n = max(top, float(scores[fall])), n + 1
        events += tracker.update(i / rate, scores, win.id)
    events += tracker.finish()
    starts = [e["start"] for e in events if e["state"] == "start"]
    print(json.dumps({"windows": n, "max_fall_score": round(top, 4), "fall_starts_s": starts}))


if __name__ == "__main__":
    main()
