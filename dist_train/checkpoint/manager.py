"""``CheckpointManager``: periodic / final / async saves with an atomic commit, and resume.

    mgr = CheckpointManager(cfg.checkpoint, run_dir=Path(cfg.run.dir), config=cfg.to_dict(),
                            layout={"dp": 2, "tp": 1, "pp": 1, "cp": 1, "wp": [1, 1], "zero_stage": None,
                                    "world_size": 2}, rank=rank, world_size=world)
    extra = mgr.resume(model, optimizer, scheduler)   # None or {"step": int, "consumed_samples": int, ...}
    mgr.maybe_save(step, model, optimizer, scheduler, extra={"step": step, "consumed_samples": n})
    mgr.close()

Commit protocol of one save (every rank runs it; with ``async_save`` in a background thread after the
state was copied to host buffers — that copy is the only training stall):
  1. rank 0 creates ``step_N.tmp/``; all ranks agree it exists.
  2. every rank writes ``rng_rankR.json``; DCP plans, every rank writes its tensor bytes into one raw shard
     file (``storage.ChecksumWriter``: XXH3-64 while writing, one fsync), rank 0 writes ``.metadata``; ranks
     that fail are reported to all (no rank hangs on a peer's error).
  3. all ranks send (file records, non-tensor values, tensor table) to everyone; rank 0, only once every
     rank has reported success, writes ``train_state.json`` and ``manifest.json`` (last), renames
     ``step_N.tmp`` -> ``step_N``, fsyncs the parent, rewrites ``latest`` (temp + rename), prunes.
A rank that dies anywhere before (3) leaves a ``.tmp`` directory, which never counts as a checkpoint.

Loading with verification (``load(verify=True)``, what ``resume`` does): the manifest, the size of every
file and the full checksums of the small files are checked first (split across ranks); the shard bytes are
checked block by block *while* they are read into the model's tensors (``storage.SafeReader``), so a
verified load reads every byte once. A corrupt checkpoint raises ``CorruptCheckpointError`` on every rank;
its tensors may then be partly overwritten — ``resume`` falls back to an older checkpoint, which
overwrites every tensor, or raises.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from dist_train.checkpoint import compat
from dist_train.checkpoint import manifest as mf
from dist_train.checkpoint.comm import CheckpointComm
from dist_train.checkpoint.foreign import describe_foreign_tree
from dist_train.checkpoint.rectangles import local_tensors
from dist_train.checkpoint.state import (HostStager, StateAdapter, TorchStateAdapter, capture_rng, from_json,
                                         join_state, restore_rng, split_state, to_json)
from dist_train.checkpoint.storage import (RAW_FORMAT, CheckpointError, CheckpointIOError, ChecksumWriter,
                                          CorruptCheckpointError, SafeReader, fsync_dir, write_file_durable)
from dist_train.data.fingerprint import comparable_digest
from dist_train.lifecycle import EXIT_DAMAGED

log = logging.getLogger("dist_train.checkpoint")

ON_ERROR = ("stop", "continue")


#: Manifest config entries a converter records that no training config holds: ``ckpt convert --from hf``'s
#: ``hf_config`` (config.json's fields that do not change the computed function: token ids, context length), written
#: back by ``--to hf``. A run resumed from such a checkpoint records them in its own checkpoints too, so a fine-tune
#: of an import exports with the import's fields, not with nulls and data.seq_len.
LINEAGE_KEYS = ("hf_config",)


def checkpoint_root(ckpt_cfg, run_dir) -> Path:
    """Where a run's checkpoints live: ``checkpoint.dir``, else ``run_dir/checkpoints``."""
    return Path(ckpt_cfg.dir) if ckpt_cfg.dir else Path(run_dir) / "checkpoints"


@contextlib.contextmanager
def quiet_single_process() -> Iterator[None]:
    """DCP warns on every single-process save/load ("assuming the intent is to … in a single process");
    world 1 is a supported mode here, not an accident."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _describe(e: BaseException) -> str:
    """One line for any failure; DCP's ``CheckpointException`` (a BaseException carrying every rank's
    exception) becomes ``rank r: OSError: [Errno 28] No space left on device; …``."""
    failures = getattr(e, "failures", None)
    if isinstance(e, CheckpointException) and failures:
        return "; ".join(f"rank {r}: {_describe(pair[0] if isinstance(pair, tuple) else pair)}"
                         for r, pair in sorted(failures.items()))
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}"


def _corruption(e: BaseException) -> bool:
    """True when ``e`` (possibly DCP's all-rank ``CheckpointException``) carries a verification failure."""
    failures = getattr(e, "failures", None)
    if isinstance(e, CheckpointException) and failures:
        return any(_corruption(pair[0] if isinstance(pair, tuple) else pair) for pair in failures.values())
    return isinstance(e, CorruptCheckpointError)


DELETING = ".deleting"  # suffix of a checkpoint directory being deleted (never a step_N name: never loaded)


def discard(path: Path) -> None:
    """Delete a checkpoint directory so that no kill can leave a half-deleted ``step_N``: rename it to
    ``step_N.deleting`` first (atomic; made durable), then delete. Leftovers are removed by the next prune."""
    doomed = path.with_name(path.name + DELETING)
    if doomed.exists():  # an earlier delete of the same name was interrupted
        shutil.rmtree(doomed, ignore_errors=True)
    try:
        os.replace(path, doomed)
        fsync_dir(path.parent)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


REPLACED = ".replaced"  # suffix (+ pid) of a step_N moved aside while a re-save of step N commits


def restore_interrupted_replace(root: Path) -> list[str]:
    """Put back each ``step_N.replaced<pid>`` whose ``step_N`` is missing: a re-save of step N was killed
    between moving the old ``step_N`` aside and renaming the new one in, so the old one is still the
    committed step N. Returns the restored names."""
    restored = []
    for p in sorted(Path(root).glob(f"step_*{REPLACED}*")):
        stem, _, pid = p.name.partition(REPLACED)
        final = p.with_name(stem)
        # not step_N.replaced<pid>.deleting: that one was being deleted after its re-save committed
        if not pid.isdigit() or final.exists():
            continue
        os.replace(p, final)
        fsync_dir(final.parent)
        restored.append(final.name)
    return restored


def nonfinite_tensor(tensors: dict[str, torch.Tensor]) -> Optional[str]:
    """The first key (sorted) of a floating tensor holding NaN or ±inf (this rank's part of a DTensor, its
    blocks of a ``Rectangles``: ``local_tensors``), else None.

    One ``aminmax`` per tensor: min and max propagate NaN, and ±inf is the min or the max. ``isfinite(x).all()``
    allocated a bool per element (the largest temporaries of a save or load) and took 16× as long on one thread
    (cProfile of one ZeRO-3 dp2 rank loading 15 M parameters, `bench ckpt --engine` sized: 0.20 of its 0.48 s)."""
    for key in sorted(tensors):
        for local in local_tensors(tensors[key]):
            if local.is_floating_point() and local.numel():
                low, high = torch.aminmax(local.detach())
                if not bool(torch.isfinite(torch.stack((low, high))).all()):
                    return key
    return None


class CheckpointDirInUse(CheckpointError):
    """A run would save beside checkpoints of another run or lineage (``checkpoint.resume: none`` into a
    directory of checkpoints, or a PATH older than the directory's newest); bad input: exit 2."""

    exit_code = 2


class CheckpointDamaged(CheckpointError):
    """Every checkpoint a resume could use failed verification for its content (checksums, sizes, a missing file,
    NaN/inf tensors, an unparsable manifest): a restart would re-read the same bytes, so not restartable
    (``EXIT_DAMAGED``). Nothing was deleted or rewritten; the message says what to do."""

    exit_code = EXIT_DAMAGED


def damaged_remedy(root: Path, single: bool = False) -> str:
    """What to do when every checkpoint is damaged (they are left as they are, for inspection or repair); ``single``:
    checkpoint.resume named the one checkpoint ``root``."""
    if single:
        return "it is left untouched: repair it, or set checkpoint.resume to another checkpoint"
    return (f"they are left untouched: repair them, or move the damaged step_N directories out of {root} (a fresh "
            "start there needs them gone), or start fresh with another run.dir or checkpoint.dir")


def occupied_message(root: Path) -> Optional[str]:
    """One line refusing a fresh run whose checkpoint dir ``root`` already holds ``step_N`` checkpoints (None when
    it holds none): its saves would share ``keep_last`` with them, so pruning would delete the older run's
    checkpoints (or the fresh run's own first saves, being the oldest) and a step both reach would replace theirs."""
    found = [p.name for _, p in mf.list_checkpoints(root)]
    if not found:
        return None
    return (f"checkpoint.resume = none, but {root} holds checkpoints ({compat.shortened_list(found)}) of an earlier run: a fresh run "
            "there would prune or replace them; resume them (checkpoint.resume=auto), or start fresh with another "
            "run.dir or checkpoint.dir, or move them away")


def layout_changes(saved: Optional[dict], current: Optional[dict]) -> str:
    """The entries of two checkpoint layouts (``{"dp": 2, "tp": 1, ..., "world_size": 2}``) that differ, as
    ``"dp 2 -> 1, cp 1 -> 2"`` (one readable clause, not two dicts); a layout not recorded is named as such."""
    if not isinstance(saved, dict) or not isinstance(current, dict):
        return f"{saved!r} -> {current!r}"
    keys = list(saved) + [k for k in current if k not in saved]
    changed = [f"{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]
    return ", ".join(changed) or "the same entries"


def saved_extra(train_state: dict) -> dict:
    """The ``extra`` dict (step, consumed_samples, train_digest, ...) of a checkpoint's parsed ``train_state.json``."""
    return from_json(train_state.get("extra") or {})


def checkpoint_extra(ckpt: Path) -> dict:
    """:func:`saved_extra` of the checkpoint directory ``ckpt`` (its ``train_state.json``, read here)."""
    return saved_extra(json.loads((Path(ckpt) / mf.TRAIN_STATE).read_text()))


def consumed_samples(extra: dict) -> Optional[int]:
    """The samples a checkpoint's run had consumed, from its ``saved_extra`` (None: not recorded)."""
    value = extra.get("consumed_samples")
    return int(value) if isinstance(value, int) else None


def trained_digest(extra: dict) -> Optional[str]:
    """The token digest of the data a checkpoint's run trained on, from its ``saved_extra`` (None: not recorded:
    other data, or a dataset prepared without one)."""
    value = extra.get("train_digest")
    return value if isinstance(value, str) else None


def trained_tokenizer(extra: dict) -> Optional[str]:
    """The fingerprint of the tokenizer a checkpoint's model learnt its ids from, from its ``saved_extra`` (None: not
    recorded: other data, an older checkpoint, a dataset prepared without one)."""
    value = extra.get("train_tokenizer")
    return value if isinstance(value, str) and value else None


def effective_resume(ckpt_cfg: Any, root: Path) -> str:
    """The resume mode a start uses: ``checkpoint.resume``, except on a restart (``checkpoint.restart``, set by the
    launchers on every restart and every start of a batch job) once the run's checkpoint dir ``root`` holds a
    ``step_N``: then ``auto``, the run's newest. A restart before the run's first save thus starts from what
    ``checkpoint.resume`` names (an HF import, another run's step), not from scratch."""
    if getattr(ckpt_cfg, "restart", False) and mf.list_checkpoints(root):
        return "auto"
    return ckpt_cfg.resume


def resume_candidates(mode: str, root: Path) -> tuple[list[Path], bool]:
    """The checkpoints a resume with ``checkpoint.resume = mode`` tries, newest first, and whether ``mode`` names
    one checkpoint (it must verify: no fallback). The pre-flight and the manager both take them from here, so the
    pre-flight's verdict and the manager's choice cannot disagree on what counts.

    ``auto``: every ``step_N`` under the run's checkpoint dir ``root`` (none: a fresh start, ``[]``); a DIR of
    checkpoints: every ``step_N`` under it, the same way; a ``step_N`` dir (or any dir holding a manifest): that
    one. Every ``step_N`` counts, complete or not: the commit renames ``step_N.tmp`` to ``step_N`` only once the
    manifest is durable, so a ``step_N`` without a valid manifest is damage, skipped with a warning line like any
    other, never silently. Raises ValueError (one line) when PATH does not exist or holds no ``step_N``."""
    if mode == "auto":
        return [p for _, p in mf.list_checkpoints(root)], False
    path = Path(mode)
    if not path.exists():
        raise ValueError(f"checkpoint.resume = {mode}: no such checkpoint (a step_N directory, a directory of them, "
                         "auto or none)")
    if (path / mf.MANIFEST).exists() or mf.is_step_dir_name(path.name):
        return [path], True
    candidates = [p for _, p in mf.list_checkpoints(path)]
    if not candidates:
        raise ValueError(f"checkpoint.resume = {mode}: no step_N checkpoint there (expected a step_N directory with "
                         f"{mf.MANIFEST}, or a directory of them)")
    return candidates, False


def newer_checkpoints_message(root: Path, mode: str, step: int, damaged: Iterable[Path] = ()) -> Optional[str]:
    """One line refusing ``checkpoint.resume = PATH`` at ``step`` when the run's checkpoint dir ``root`` holds
    newer ``step_N`` checkpoints (None when it does not): every restart resumes with ``resume: auto``, which
    takes the newest, so a crash would silently drop this run's progress for that older lineage. ``damaged``:
    the checkpoints this resume tried and found damaged (a PATH that is ``root`` itself falls back past them as
    auto does; auto would skip them too); any other newer one counts, complete or not, since it was not verified."""
    skipped = {p.resolve() for p in damaged}
    newer = [p.name for s, p in mf.list_checkpoints(root) if s > step and p.resolve() not in skipped]
    if not newer:
        return None
    return (f"checkpoint.resume = {mode} is at step {step}, but {root} holds newer checkpoints "
            f"({compat.shortened_list(newer)}) that a "
            "restart (checkpoint.restart takes the newest) would resume instead of this run's: to roll back, move "
            "them away; to continue them, set checkpoint.restart=true (it keeps this PATH for a start before the "
            "run's first save) or checkpoint.resume=auto")


def _tensor_info(t: torch.Tensor) -> dict:
    """Global shape/dtype/bytes (a DTensor reports its global shape)."""
    return {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
            "bytes": t.numel() * t.element_size()}


class CheckpointManager:
    """Saves and restores model, optimizer, LR schedule, counters and every rank's RNG (see module doc).

    ``cfg``: an object with ``every, keep_last, async_save, resume, dir, on_error`` (``CheckpointConfig``).
    ``adapter``: how (model, optimizer) become flat state dicts; engines (DeepSpeed) pass their own.
    ``fault_hook``: called with a phase name (``"staged"``, ``"shards_written"``, ``"before_commit"``) on
    every rank during a save; fault-injection tests use it to kill or fail a rank at a precise point.
    ``io_threads``: threads per rank reading/writing (and checksumming) shard bytes; 2 measured best on a
    2-core machine (docs/benchmarks/ckpt.md).
    ``data_digest``: the token digest of the dataset this run trains on (its sidecar's,
    :func:`dist_train.data.datasets.training_identity`); a checkpoint that recorded the same ``train_digest`` takes
    a changed data.path as the same text under a new name (``compat.config_differences``). ``data_samples``: the
    samples per epoch of that dataset (the batcher's ``samples_per_epoch``); with ``data_digest``, ``load`` refuses a
    dataset re-prepared or replaced under the checkpoint (``compat.check_dataset``) before reading any shard.
    ``data_tokenizer``: the fingerprint of the tokenizer that dataset was prepared with (its sidecar's); ``load``
    refuses one other than the checkpoint's ``train_tokenizer`` (``compat.check_tokenizer``).
    ``layout``: this run's parallel layout, recorded with each checkpoint; a load restores the RNG states only from
    a checkpoint of the same layout or of one of ``same_layouts`` (what an older version recorded for the same
    execution).
    """

    def __init__(self, cfg: Any, run_dir: Union[str, os.PathLike], config: Optional[dict] = None,
                 layout: Optional[dict] = None, rank: int = 0, world_size: int = 1,
                 adapter: Optional[StateAdapter] = None, io_threads: int = 2,
                 data_digest: Optional[str] = None, data_samples: Optional[int] = None,
                 same_layouts: Sequence[dict] = (), data_tokenizer: Optional[str] = None) -> None:
        if cfg.on_error not in ON_ERROR:
            raise ValueError(f"checkpoint.on_error = {cfg.on_error!r}: valid values are {', '.join(ON_ERROR)}")
        if cfg.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last = {cfg.keep_last}: must be >= 1")
        if cfg.every < 0:
            raise ValueError(f"checkpoint.every = {cfg.every}: must be >= 0")
        if io_threads < 1:
            raise ValueError(f"io_threads = {io_threads}: must be >= 1")
        self.cfg = cfg
        self.root = checkpoint_root(cfg, run_dir)
        self.config = config or {}
        self.data_digest, self.data_samples, self.data_tokenizer = data_digest, data_samples, data_tokenizer
        self.layout = dict(layout or {"world_size": world_size})
        self.layout.setdefault("world_size", world_size)
        # layouts an older checkpoint of the same execution recorded (the trainer's ``recorded_layouts``)
        self.same_layouts = [self.layout] + [dict(other) for other in same_layouts]
        self.rank, self.world_size = rank, world_size
        self.comm = CheckpointComm(rank, world_size)
        self.adapter = adapter or TorchStateAdapter()
        self.io_threads = io_threads
        self.fault_hook: Optional[Callable[[str], None]] = None
        self.resumed_from: Optional[Path] = None
        # checkpoints under the checkpoint dir that this run's resume found damaged and skipped: pruning neither
        # counts them toward keep_last nor deletes them; a save of the same step replaces one
        self.found_damaged: list[Path] = []
        self.saved_config: dict = {}  # the config recorded in the checkpoint loaded last
        self.config_changes: list = []  # (key, saved, current) allowed by checkpoint.allow_config_change
        self.last_stall_s = 0.0  # time the last save() blocked the caller
        self.last_write_s = 0.0  # time the last write+commit took (background time when async)
        self.failed_saves = 0
        self._last_step: Optional[int] = None
        self._stager = HostStager()
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pending: Optional[tuple[int, Future]] = None

    # ------------------------------------------------------------------------------------------
    # saving
    # ------------------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        """True when ``maybe_save(step)`` saves: ``every > 0`` and ``step % every == 0``."""
        return self.cfg.every > 0 and step % self.cfg.every == 0

    def maybe_save(self, step: int, model, optimizer=None, scheduler=None, extra: Optional[dict] = None) -> bool:
        """Save when ``every > 0`` and ``step % every == 0``; returns what ``save`` returns (False: no save)."""
        if self.due(step):
            return self.save(step, model, optimizer, scheduler, extra)
        return False

    def save(self, step: int, model, optimizer=None, scheduler=None, extra: Optional[dict] = None) -> bool:
        """Save unconditionally. With ``async_save`` this blocks only to wait for a previous save and to copy the
        state to host memory. True when this call committed the checkpoint (synchronous) or handed it to the writer
        thread (``async_save``: whether that one commits is known at ``wait``/``close``, per ``on_error``); False
        when nothing was saved: this step was already saved by this manager, the state was not finite, or the
        synchronous save failed under ``on_error = continue`` (counted in ``failed_saves``)."""
        self.wait()
        if step == self._last_step:
            return False
        t0 = time.perf_counter()
        payload = self._collect(step, model, optimizer, scheduler, extra)
        bad = nonfinite_tensor(payload["tensors"])
        refused = self.comm.agree(None if bad is None else f"tensor '{bad}' holds NaN/inf values (not committed)")
        if refused:  # never commit (and never prune a good checkpoint for) a diverged state
            self._failed(step, CheckpointError("; ".join(refused)))
            return False
        self._last_step = step  # reset by _failed
        if self.cfg.async_save:
            payload["tensors"] = self._stager.stage(payload["tensors"])
            self._fire("staged")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-writer")
            self._pending = (step, self._pool.submit(self._write, payload))
        else:
            try:
                self._write(payload)
            except (Exception, CheckpointException) as e:  # noqa: BLE001 - classified by on_error
                self._failed(step, e)
                return False
        self.last_stall_s = time.perf_counter() - t0
        return True

    def wait(self) -> None:
        """Block until the in-flight async save (if any) finished; surface its failure per ``on_error``."""
        if self._pending is None:
            return
        step, fut = self._pending
        self._pending = None
        try:
            fut.result()
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - classified by on_error
            self._failed(step, e)

    def close(self) -> None:
        """Finish the in-flight save and stop the writer thread."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            self._stager.release()

    def _failed(self, step: int, e: BaseException) -> None:
        self.failed_saves += 1
        self._last_step = None
        good = self.last_good()
        msg = f"checkpoint save at step {step} failed: {_describe(e)} — last good checkpoint: {good or 'none'} (untouched)"
        if self.cfg.on_error == "stop":
            raise CheckpointError(msg) from e
        if self.rank == 0:
            log.warning("%s; continuing (checkpoint.on_error=continue)", msg)

    def last_good(self) -> Optional[str]:
        """Name of the newest complete checkpoint (``step_N``) not found damaged at resume, or None."""
        good = self._good_checkpoints()
        return good[0][1].name if good else None

    def _good_checkpoints(self) -> list[tuple[int, Path]]:
        """Newest-first complete checkpoints under the checkpoint dir, less those this run's resume found damaged."""
        damaged = {p.resolve() for p in self.found_damaged}
        return [(s, p) for s, p in mf.complete_checkpoints(self.root) if p.resolve() not in damaged]

    def _forget_damaged(self, committed: Path) -> None:
        """``committed`` (a ``step_N`` just committed) replaced the damaged checkpoint of that name, if any."""
        self.found_damaged = [d for d in self.found_damaged if d.resolve() != committed.resolve()]

    def _fire(self, phase: str) -> None:
        if self.fault_hook is not None:
            self.fault_hook(phase)

    def _collect(self, step: int, model, optimizer, scheduler, extra: Optional[dict]) -> dict:
        """Everything one save needs, taken on the caller's thread (state dicts hold live tensors)."""
        model_sd, optim_sd = self.adapter.get(model, optimizer)
        tensors, values = split_state({"model": model_sd, "optim": optim_sd})
        extra = dict(extra or {})
        extra.setdefault("step", step)
        extra.setdefault("consumed_samples", 0)
        return {
            "step": step, "tensors": tensors, "values": values,
            "table": {k: _tensor_info(t) for k, t in tensors.items()},
            "rng": capture_rng(),
            "scheduler": to_json(scheduler.state_dict(), "scheduler") if scheduler is not None else None,
            "extra": to_json(extra, "extra"),
            "contents": ["model"] + (["optim"] if optim_sd is not None else [])
                        + (["scheduler"] if scheduler is not None else []) + ["rng"],
        }

    def save_tensors(self, step: int, tensors: dict[str, torch.Tensor], extra: Optional[dict] = None) -> None:
        """Synchronously commit a model-only checkpoint from ``{fqn: tensor}`` (no optimizer, schedule or RNG):
        what ``ckpt convert --from hf`` writes; resuming from it restores the weights only."""
        tensors = {f"model.{k}": v for k, v in tensors.items()}
        extra = dict(extra or {})
        extra.setdefault("step", step)
        extra.setdefault("consumed_samples", 0)
        self._write({"step": step, "tensors": tensors, "values": {}, "rng": None, "scheduler": None,
                     "table": {k: _tensor_info(t) for k, t in tensors.items()}, "extra": to_json(extra, "extra"),
                     "contents": ["model"]})
        self._last_step = step

    def _write(self, p: dict) -> None:
        """The commit protocol (module doc). Runs on every rank; raises on every rank when any rank failed."""
        t0 = time.perf_counter()
        step, comm = p["step"], self.comm
        name = mf.step_dir_name(step)
        tmp, final = self.root / f"{name}.tmp", self.root / name
        err = None
        if self.rank == 0:
            try:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
            except OSError as e:
                err = f"cannot create {tmp}: {e}"
        self._raise_if(comm.agree(err), tmp)

        err, records = None, {}
        if p["rng"] is not None:
            try:
                rng_name = mf.rng_file_name(self.rank)
                records[rng_name] = write_file_durable(tmp / rng_name, json.dumps(p["rng"]).encode(), atomic=False)
            except OSError as e:
                err = f"{tmp / mf.rng_file_name(self.rank)}: {e}"
            self._raise_if(comm.agree(err), tmp)

        writer = ChecksumWriter(tmp, thread_count=self.io_threads)
        try:
            with quiet_single_process():
                dcp.save(p["tensors"], storage_writer=writer, process_group=comm.group,
                         no_dist=not comm.distributed)
        except (Exception, CheckpointException) as e:  # DCP reports every rank's failure to every rank
            self._cleanup(tmp)
            raise CheckpointError(f"writing shards to {tmp} failed: {_describe(e)}") from e
        records.update(writer.records)
        self._fire("shards_written")

        reports = comm.all_gather({"files": records, "values": p["values"], "table": p["table"]})
        self._fire("before_commit")
        err = None
        if self.rank == 0:
            try:
                self._commit(p, tmp, final, reports)
            except Exception as e:  # noqa: BLE001 - reported to every rank below
                err = f"{type(e).__name__}: {e}"
                self._cleanup(tmp)
        err = comm.broadcast(err)
        if err:
            raise CheckpointError(f"commit of {final} failed on rank 0: {err}")
        self._forget_damaged(final)  # every rank: rank 0's commit replaced it, and last_good() is asked everywhere
        self.last_write_s = time.perf_counter() - t0

    def _commit(self, p: dict, tmp: Path, final: Path, reports: list[dict]) -> None:
        """Rank 0, after every rank reported its files: train_state, manifest (last), rename, latest, prune."""
        files, values, table = {}, {}, {}
        for r in reports:  # union: ranks holding different parameters (pipeline stages) contribute their keys
            files.update(r["files"])
            values.update(r["values"])
            table.update(r["table"])
        train_state = {"step": p["step"], "extra": p["extra"], "scheduler": p["scheduler"], "values": values}
        files[mf.TRAIN_STATE] = write_file_durable(tmp / mf.TRAIN_STATE, json.dumps(train_state).encode(),
                                                   atomic=False)
        body = {
            "step": p["step"], "contents": p["contents"], "layout": self.layout, "world_size": self.world_size,
            "config": json.loads(json.dumps(self.config, default=str)), "code_version": mf.code_version(),
            "torch_version": torch.__version__, "created_unix": time.time(), "files": files, "tensors": table,
            "shard_format": RAW_FORMAT,
        }
        mf.write_manifest(tmp, body, atomic=False)  # made durable by fsync_dir + rename below
        fsync_dir(tmp)
        replaced = None
        if final.exists():  # re-saving a step (e.g. a resumed run reaching the same step): swap, then delete
            replaced = final.with_name(final.name + f"{REPLACED}{os.getpid()}")
            os.replace(final, replaced)
        os.replace(tmp, final)
        fsync_dir(self.root)
        # committed from here on: nothing below may report the save as failed
        self._forget_damaged(final)  # before _prune: the new step_N counts toward keep_last
        try:
            mf.write_latest(self.root, final.name)
        except OSError as e:
            log.warning("checkpoint %s is committed, but rewriting %s failed (%s): it still names %s; "
                        "resume: auto takes the newest complete checkpoint, not 'latest'", final.name,
                        self.root / mf.LATEST, _describe(e), mf.read_latest(self.root) or "nothing")
        if replaced is not None:
            discard(replaced)
        try:
            self._prune(p["step"])
        except OSError as e:  # the new checkpoint is committed; a failed cleanup must not undo that
            log.warning("checkpoint pruning under %s failed: %s", self.root, e)

    def _prune(self, current_step: int) -> None:
        """Keep the newest ``keep_last`` complete checkpoints, the newest complete one, the one just committed
        (a run rolled back to an older step saves below newer ones) and the one this run resumed from; drop
        stale ``.tmp`` dirs of earlier steps (saves that died). Checkpoints the resume found damaged are neither
        counted (a damaged newest one would take a good one's place) nor deleted (left for inspection)."""
        # first: once an old step_N is pruned below, its leftover step_N.replaced<pid> (a re-save that committed,
        # then was killed before deleting it) would look interrupted and come back as step_N
        restore_interrupted_replace(self.root)
        complete = self._good_checkpoints()
        keep = {p for _, p in complete[: self.cfg.keep_last]} | {self.root / mf.step_dir_name(current_step)}
        if complete:
            keep.add(complete[0][1])
        if self.resumed_from is not None:
            keep.add(self.resumed_from.resolve())
            keep.add(self.resumed_from)
        for _, p in complete:
            if p not in keep and p.resolve() not in keep:
                discard(p)
        for p in self.root.glob("step_*.tmp"):
            try:
                if int(p.name[len("step_"):-len(".tmp")]) < current_step:
                    discard(p)
            except ValueError:
                continue
        for p in [*self.root.glob(f"step_*{DELETING}"), *self.root.glob(f"step_*{REPLACED}*")]:
            shutil.rmtree(p, ignore_errors=True)  # left by a process killed while deleting

    def _raise_if(self, errors: list[str], tmp: Path) -> None:
        if errors:
            self._cleanup(tmp)
            raise CheckpointError("; ".join(errors))

    def _cleanup(self, tmp: Path) -> None:
        """Rank 0 removes a failed save's ``.tmp`` dir (frees space on a full disk); never a committed one."""
        if self.rank == 0 and tmp.name.endswith(".tmp"):
            shutil.rmtree(tmp, ignore_errors=True)

    # ------------------------------------------------------------------------------------------
    # resuming
    # ------------------------------------------------------------------------------------------
    def resume(self, model, optimizer=None, scheduler=None) -> Optional[dict]:
        """Restore per ``cfg.resume`` (``auto`` | ``none`` | PATH; on a restart :func:`effective_resume`); None on a
        fresh start, else the saved ``extra`` dict (at least ``step`` and ``consumed_samples``). ``auto`` takes the
        newest checkpoint under the checkpoint dir and falls back to older ones (one warning line each) when it
        fails verification; PATH as a dir of ``step_N`` does the same over that dir; PATH as one ``step_N`` must
        verify. A PATH older than a checkpoint in the checkpoint dir that this resume did not find damaged is
        refused (:func:`newer_checkpoints_message`)."""
        restored = None
        if self.rank == 0 and self.root.is_dir():
            try:
                restored = restore_interrupted_replace(self.root)
            except OSError as e:
                restored = f"cannot restore an interrupted re-save under {self.root}: {e}"
        problem = self.comm.broadcast(restored if isinstance(restored, str) else None)
        if problem:
            raise CheckpointError(problem)
        mode = self.comm.broadcast(effective_resume(self.cfg, self.root) if self.rank == 0 else None)
        if restored and self.rank == 0:
            log.warning("restored %s under %s: a re-save of that step was killed before it committed",
                        ", ".join(restored), self.root)
        if mode in (None, "", "none"):
            refused = self.comm.broadcast(occupied_message(self.root) if self.rank == 0 else None)
            if refused:
                raise CheckpointDirInUse(refused)
            return None
        foreign = describe_foreign_tree(self.root if mode == "auto" else Path(mode))
        if foreign:  # never start fresh beside (or fail obscurely on) someone else's weights
            raise CheckpointError(f"checkpoint.resume = {mode}: {foreign}")
        candidates, single = resume_candidates(mode, self.root)
        if not candidates:
            return None
        problems_seen, damaged = [], []
        for i, ckpt in enumerate(candidates):
            try:
                extra = self.load(ckpt, model, optimizer, scheduler, verify=True)
            except CorruptCheckpointError as e:
                problem = e.problem
            else:
                newer = self.comm.broadcast(newer_checkpoints_message(self.root, mode, int(extra["step"]), damaged)
                                            if mode != "auto" and self.rank == 0 else None)
                if newer:
                    raise CheckpointDirInUse(newer)
                self.found_damaged = damaged
                return extra
            if single:
                raise CheckpointDamaged(f"checkpoint {ckpt} failed verification: {problem}; "
                                        + damaged_remedy(ckpt, single=True))
            problems_seen.append(problem)
            damaged.append(ckpt)
            nxt = candidates[i + 1].name if i + 1 < len(candidates) else None
            if self.rank == 0:
                log.warning("checkpoint %s failed verification (%s); %s", ckpt.name, problem,
                            f"falling back to {nxt}" if nxt else "no older checkpoint")
        where = self.root if mode == "auto" else Path(mode)
        raise CheckpointDamaged(f"no valid checkpoint under {where}: " + " | ".join(problems_seen) + "; "
                                + damaged_remedy(where))

    def _verify_collective(self, ckpt: Path) -> tuple[Optional[dict], list[str]]:
        """Manifest + every file's size and checksums, except the contents of the shards that the loader verifies
        while reading them; the files are split across ranks, results shared. Returns (the manifest body as this
        rank read it, every rank's problems): the body is None only when this rank's problems say why."""
        body, io_error = None, None
        try:
            body = mf.read_manifest(ckpt)
            names = sorted(body["files"])[self.rank::self.world_size]
            mine = mf.verify_files(ckpt, body, names, size_only=mf.shards_verified_while_loading(body))
        except CheckpointIOError as e:
            mine, io_error = [], str(e)
        except CheckpointError as e:
            mine = [str(e)]
        problems, io_errors = [], []
        for rank_problems, rank_io_error in self.comm.all_gather((mine, io_error)):
            problems.extend(p for p in rank_problems if p not in problems)
            io_errors += [rank_io_error] if rank_io_error else []
        if io_errors:  # on every rank: no fall-back past a checkpoint that may be good, no verdict of damage
            raise CheckpointIOError(f"checkpoint {ckpt} could not be read: {io_errors[0]}; not falling back to an "
                                    "older checkpoint (this one may be good): a restart tries again")
        return body, problems

    def load(self, ckpt: Union[str, os.PathLike], model, optimizer=None, scheduler=None,
             verify: bool = True, with_rng: bool = True) -> dict:
        """Load one checkpoint directory into (model, optimizer, scheduler) in place; restore this rank's
        RNG when the saved layout equals ours (or one of ``same_layouts``) and ``with_rng`` (False: an evaluation,
        with no random stream to continue). Returns the saved ``extra`` dict. ``verify``: see the module
        doc; a failure raises ``CorruptCheckpointError(message, problem)`` on every rank."""
        ckpt = Path(ckpt)
        if verify:  # the manifest verified is the one loaded: read once
            body, problems = self._verify_collective(ckpt)
            if problems:
                raise CorruptCheckpointError(f"checkpoint {ckpt} failed verification: {problems[0]}", problems[0])
        else:
            body = mf.read_manifest(ckpt)
        ts = json.loads((ckpt / mf.TRAIN_STATE).read_text())
        extra, allowed = saved_extra(ts), getattr(self.cfg, "allow_config_change", None) or ()
        data_path = (self.config.get("data") or {}).get("path")
        digest = comparable_digest(trained_digest(extra), self.data_digest, data_path)
        self.config_changes = compat.check_config(ckpt, body.get("config"), self.config, allowed,
                                                  consumed_samples(extra), trained_digest(extra), digest,
                                                  trained_tokenizer(extra), self.data_tokenizer)
        if self.rank == 0 and self.config.get("model") and not (body.get("config") or {}).get("model"):
            log.warning("checkpoint %s records no model config (`ckpt convert --from dcp` without --config): its "
                        "weights load into model.* as configured now, and nothing checks the keys that change the "
                        "function without changing a tensor's shape (rope_theta, rope_scaling, norm_eps, "
                        "attention_window); convert it again with --config to record them", ckpt)
        compat.check_dataset(ckpt, extra, self.data_samples, allowed, data_path, self.config_changes, digest)
        compat.check_tokenizer(ckpt, extra, self.data_tokenizer, allowed, data_path)
        with_optim = optimizer is not None and "optim" in body["contents"]
        # a checkpoint without optimizer state (e.g. converted from HF) leaves the optimizer untouched —
        # in particular not initialised by get_state_dict's zero-gradient step
        model_sd, optim_sd = self.adapter.get(model, optimizer if with_optim else None)
        tensors, _ = split_state({"model": model_sd, "optim": optim_sd})
        saved = body["tensors"]
        # ranks may hold different parameters (pipeline stages): the model's keys are the union
        model_keys = set().union(*self.comm.all_gather(sorted(k for k in tensors if k.startswith("model."))))
        compat.check_tensors(ckpt, saved, model_keys, {k: t.shape for k, t in tensors.items()})
        absent = sorted(k for k in tensors if k not in saved)  # optimizer state of a matching model
        if absent:
            raise compat.ResumeMismatchError(f"checkpoint {ckpt} has no optimizer state for {absent[0]}"
                                             + (f" and {len(absent) - 1} more" if len(absent) > 1 else ""))
        self.saved_config = body.get("config") or {}
        checked_while_reading = verify and bool(mf.shards_verified_while_loading(body))
        reader = SafeReader(ckpt, records=body["files"] if checked_while_reading else None, threads=self.io_threads)
        try:
            with quiet_single_process():
                dcp.load(tensors, storage_reader=reader, process_group=self.comm.group,
                         no_dist=not self.comm.distributed)
        except (Exception, CheckpointException) as e:  # DCP's is a BaseException: make it one line
            if _corruption(e):
                raise CorruptCheckpointError(f"checkpoint {ckpt} failed verification: {_describe(e)}",
                                             _describe(e)) from None
            raise CheckpointError(f"loading {ckpt} failed: {_describe(e)}") from None
        bad = nonfinite_tensor(tensors)
        problems = self.comm.agree(None if bad is None else f"{ckpt}: tensor '{bad}' holds NaN/inf values")
        if problems:  # saved before non-finite states were refused: as unusable as a damaged one
            raise CorruptCheckpointError(f"checkpoint {ckpt} failed verification: {problems[0]}", problems[0])
        values = ts["values"]
        where = str(ckpt / mf.TRAIN_STATE)
        model_sd = join_state("model", model_sd, tensors, values, where)
        optim_sd = join_state("optim", optim_sd, tensors, values, where) if with_optim else None
        self.adapter.set(model, optimizer if with_optim else None, model_sd, optim_sd)
        if scheduler is not None and ts.get("scheduler") is not None:
            scheduler.load_state_dict(from_json(ts["scheduler"]))
        rng = with_rng and "rng" in body["contents"]
        if rng and body.get("layout") in self.same_layouts:
            restore_rng(json.loads((ckpt / mf.rng_file_name(self.rank)).read_text()))
        elif rng and self.rank == 0:
            log.warning("checkpoint %s was saved with another layout (%s): weights and optimizer resharded, RNG "
                        "states not restored (ranks keep their seeded streams)",
                        ckpt.name, layout_changes(body.get("layout"), self.layout))
        for key in LINEAGE_KEYS:  # carried on to this run's checkpoints (a config of its own has none)
            if key in self.saved_config and key not in self.config:
                self.config[key] = self.saved_config[key]
        self.resumed_from = ckpt
        self._last_step = body["step"]
        extra.setdefault("step", body["step"])
        extra.setdefault("consumed_samples", 0)
        return extra
