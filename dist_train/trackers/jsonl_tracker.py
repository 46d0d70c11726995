"""``metrics.jsonl``: one JSON object per logged step, appended by rank 0 (line-buffered)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..atomic_write import write_text_atomic
from ..config import Config


class JsonlTracker:
    def __init__(self, path: Path, start_step: int):
        self.path = path
        if path.exists():
            self._truncate_after(start_step)
        self._f = open(path, "a", buffering=1)

    def _truncate_after(self, start_step: int) -> None:
        """A resumed run redoes the steps after its checkpoint: drop their old records so every step appears
        once (a crash may have logged steps the checkpoint did not keep; a run starting at step 0 in an old
        run directory starts a new curve). A torn last line is dropped too."""
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if int(rec.get("step", 0)) <= start_step:
                keep.append(line)
        write_text_atomic(self.path, "".join(f"{line}\n" for line in keep))

    def log(self, step: int, record: dict) -> None:
        self._f.write(json.dumps({"step": step, **record}) + "\n")

    def flush(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self.flush()
            self._f.close()


def open_tracker(cfg: Config, run_dir: Path, start_step: int) -> JsonlTracker:
    return JsonlTracker(run_dir / "metrics.jsonl", start_step)
