"""dist_train/cli.py ``import_command_module``: a command's module is imported with the cyclic GC paused and the
heap then frozen (gc.freeze) only in a process that is dist-train's own (``main()`` reading the process's command
line); a caller that passes ``main`` its arguments (a notebook, a test) keeps every object it holds collectable."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_CALLER = """
import gc, sys, weakref
from dist_train.cli import main

class Cycle:
    '''An object that will refer to itself (collectable only by the cyclic GC).'''

held = Cycle()
held.me = held                     # reachable only through its own cycle once the caller drops it
held.data = bytearray(1 << 20)
alive = weakref.ref(held)
gc_was_on = gc.isenabled()
main(["ckpt", "inspect", sys.argv[1]])     # an in-process caller: imports dist_train.checkpoint.cli first here
del held
gc.collect()
print("freed", alive() is None, "frozen", gc.get_freeze_count(), "gc_on", gc.isenabled() == gc_was_on)
sys.argv = ["dist-train", "launch", sys.argv[2], "--backend", "local"]
main()                             # the console script's call: the process is dist-train's own
print("own_frozen", gc.get_freeze_count() > 0)
"""


def test_in_process_caller_keeps_its_objects_collectable_and_own_process_freezes(tmp_path):
    """An object cycle the caller held when its ``main([...])`` imported a command's module is freed once dropped
    (before: frozen with the whole heap, never collected), nothing is frozen for it and its GC setting is kept;
    ``main()`` in dist-train's own process still freezes what the import left."""
    out = subprocess.run([sys.executable, "-c", _CALLER, str(tmp_path / "no_such_ckpt"),
                          str(tmp_path / "no_such.yaml")], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    lines = out.stdout.splitlines()
    assert "freed True frozen 0 gc_on True" in lines, out.stdout + out.stderr
    assert "own_frozen True" in lines, out.stdout + out.stderr
