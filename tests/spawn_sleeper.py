"""The rank function of test_spawn's killed-parent test, in a module of its own that imports neither torch nor pytest:
the parent process that imports it to start its ranks (and a fresh rank that unpickles it) is SIGKILLed in the test,
and importing test_spawn there cost each parent ~3 s of CPU and each rank pytest's import, for nothing the test checks
(the fork server still preloads all of dist_train.spawn.PRELOAD, and a fresh rank still imports torch to start)."""
import time
from pathlib import Path


def sleep_forever(rank: int, world_size: int, started_dir: str) -> None:
    """Say this rank is in its function (a file ``started_dir/RANK``), then sleep."""
    Path(started_dir, str(rank)).touch()
    time.sleep(600)
