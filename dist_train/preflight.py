"""Checks that depend only on the config and the files it names, run once before any rank starts.

    cfg = load_config(path, overrides)       # every key's range (dist_train/config.py validate)
    preflight(cfg, on_cuda=False)             # model size, directories, kernel, profiling, dataset, tokenizer, resume

``dist-train launch`` runs it in the launcher (the ranks it starts skip it: ``PREFLIGHT_ENV``); ``dist-train
run`` under torchrun/mpiexec runs it in every rank before the process group exists. Each problem is a
``ConfigError`` — one line naming the key, the file and what would be valid; the CLI exits 2 — instead of
a traceback from every rank after start-up (docs/launching.md, "What each failure does").
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, NamedTuple, Optional

import torch

from parallelism.context.kernels import get_kernel

from .checkpoint import compat
from .checkpoint import manifest as mf
from .checkpoint.bridge import model_shapes
from .checkpoint.foreign import describe_foreign_tree
from .checkpoint.manager import (checkpoint_extra, checkpoint_root, consumed_samples, effective_resume,
                                 newer_checkpoints_message, occupied_message, resume_candidates, trained_digest,
                                 trained_tokenizer)
from .checkpoint.storage import CheckpointError, CheckpointIOError
from .config import Config, ConfigError
from .cost import memory_model, model_params, rank_inputs
from .data.datasets import indexed_part, same_data_message, split_part, training_identity
from .data.documents import resolve_eod_id, unknown_eod_message
from .data.fingerprint import comparable_digest
from .data.integrity import check_bin_size, prefix_hint, read_index
from .data.overlap import Checked, checked_dataset, held_out_overlap_message, overlap_checked
from .data.sidecar import named_tokenizer_message, other_tokenizer_message, sidecar_tokenizer
from .data.tokenizer import get_tokenizer
from .data.weather import other_dataset_message, weather_meta, weather_settings
from .dryrun import device_profile
from .engines import autocast_dtype, cpu_autocast_refusal
from .engines.deepspeed import check_deepspeed_keys
from .evaluation import held_out_overrun
from .plan.profiles import DeviceProfile
from .profiling import check_profile

#: set by the launcher in every rank's environment once it has run the preflight for the job
PREFLIGHT_ENV = "DIST_TRAIN_PREFLIGHT_DONE"


def preflight(cfg: Config, on_cuda: bool, ranks_per_host: int = 1) -> None:
    """Raise ConfigError on the first problem (see the module doc); ``on_cuda``: the ranks use CUDA;
    ``ranks_per_host``: ranks sharing one host's memory (CPU ranks)."""
    check_model_fits(cfg, on_cuda, ranks_per_host)
    check_writable_dir("run.dir", cfg.run.dir)
    ckpt_key = "checkpoint.dir" if cfg.checkpoint.dir else "run.dir (its checkpoints/)"
    check_writable_dir(ckpt_key, checkpoint_root(cfg.checkpoint, cfg.run.dir))
    check_engine(cfg, on_cuda)
    check_profile(cfg, on_cuda)  # profile.ranks in the job, profile.memory on CUDA
    checked = check_data(cfg)
    check_resume(cfg, checked)


def check_engine(cfg: Config, on_cuda: bool, forward_only: bool = False) -> None:
    """What the ranks' engine is built with: the attention kernel, and the DeepSpeed keys under the ranks' autocast
    dtype (``on_cuda``: the ranks use CUDA). Shared by the launch pre-flight and ``dist-train eval``'s
    (``forward_only``: no backward runs, no optimizer is built)."""
    check_attention_kernel(cfg, on_cuda, forward_only)
    check_deepspeed_keys(cfg, autocast_dtype(cfg, torch.device("cuda" if on_cuda else "cpu")) == torch.bfloat16,
                         forward_only)


# -- model size -------------------------------------------------------------------------------------
def check_model_fits(cfg: Config, on_cuda: bool, ranks_per_host: int) -> None:
    """Refuse a model whose weights, gradients and optimizer state alone — on its most loaded rank, by the
    cost model (dist_train/cost/memory.py) — exceed the device's memory (CPU: the host's RAM shared by its
    ranks). Activations are left out on purpose: this catches impossible sizes, not tight ones."""
    prof, label = device_profile(on_cuda)
    sh, loc = rank_inputs(cfg, prof)
    mem = memory_model(cfg, sh, prof, loc)
    states = mem["weights"] + mem["grads"] + mem["optimizer"] + mem["ddp_buckets"] + mem["zero_buckets"]
    refuse_beyond_memory(cfg, (prof, label), on_cuda, ranks_per_host, states,
                         "weights, gradients and optimizer state alone", "parallel.tp, parallel.pp, parallel.zero_stage")


def refuse_beyond_memory(cfg: Config, device: tuple[DeviceProfile, str], on_cuda: bool, ranks_per_host: int,
                         need: float, counted: str, shard_keys: str) -> None:
    """Raise ConfigError (one line) when ``need`` bytes per rank — ``counted`` says of what — exceed the device's
    memory (``device``: ``device_profile(on_cuda)``; CPU: the host's RAM shared by its ``ranks_per_host`` ranks);
    ``shard_keys``: the settings that would spread them over more ranks."""
    prof, label = device
    capacity = prof.memory_bytes / (1 if on_cuda else max(1, ranks_per_host))
    if need > capacity:
        p = cfg.parallel
        where = f"a {label} device" if on_cuda else f"this host's {prof.memory_gib:.0f} GiB shared by {ranks_per_host} rank(s)"
        raise ConfigError(f"model: {model_params(cfg) / 1e9:,.2f}B parameters need {need / 2**30:,.1f} GiB per rank for "
                          f"{counted} (tp={p.tp}, pp={p.pp}, zero_stage={p.zero_stage}"
                          + (", fsdp" if p.fsdp else "") + f"), more than the {capacity / 2**30:,.1f} GiB of {where}; "
                          f"shrink model.* or shard it ({shard_keys})")


# -- directories ----------------------------------------------------------------------------------
def check_writable_dir(key: str, path) -> None:
    """``path`` is a writable directory, or can be created as one; probes by writing (permission bits say
    nothing for root, or on a read-only mount) and leaves nothing behind."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{key} = {path}: is a file, not a directory")
    existing = p
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key} = {path}: cannot be created, {existing} is a file")
    try:
        if p.is_dir():
            tempfile.TemporaryFile(dir=p, prefix=".dist_train_probe").close()  # unlinked on close
        else:
            Path(tempfile.mkdtemp(dir=existing, prefix=".dist_train_probe")).rmdir()
    except OSError as e:
        where = p if p.is_dir() else existing
        raise ConfigError(f"{key} = {path}: {where} is not writable ({e.strerror or e})") from None


# -- attention kernel -------------------------------------------------------------------------------
def check_attention_kernel(cfg: Config, on_cuda: bool, forward_only: bool = False) -> None:
    """The block kernel must exist on the device the ranks use (e.g. flash needs CUDA and flash-attn), and the
    layers around it must run their backward there under the precision asked for (unless ``forward_only``: an
    evaluation)."""
    device = torch.device("cuda" if on_cuda else "cpu")
    dtype = autocast_dtype(cfg, device)  # the ranks' (trainer.py builds the engine with it)
    refusal = cpu_autocast_refusal(cfg, dtype, device.type, forward_only)
    if refusal:
        raise ConfigError(refusal)
    try:
        get_kernel(cfg.parallel.attn_kernel, device, dtype or torch.float32)
    except (ValueError, ImportError) as e:
        raise ConfigError(f"parallel.attn_kernel = {cfg.parallel.attn_kernel!r} on {device.type} ranks: "
                          f"{str(e).splitlines()[0]}") from None


# -- data ---------------------------------------------------------------------------------------------
def check_data(cfg: Config) -> dict[str, Checked]:
    """The data the ranks will read: the dataset's files and shares, the tokenizer, the end-of-document id.
    Returns each indexed dataset it read, by prefix (so :func:`check_resume` need not read its index again)."""
    d = cfg.data
    checked = _check_indexed(cfg) if d.source == "indexed" else {}
    if d.source == "weather":
        _check_weather(cfg)
    if d.tokenizer != "byte" and not Path(d.tokenizer).is_file():
        raise ConfigError(f"data.tokenizer = {d.tokenizer}: no such file (byte, or the path of a tokenizer.json)")
    # data.path's sidecar as _check_indexed read it (it is there only for a dataset whose .bin and .idx are: one to
    # be prepared at start-up gets its sidecar then), read once for the checks below
    sidecar = checked[d.path].sidecar if d.path in checked else None
    check_named_tokenizer(cfg, sidecar)
    check_end_of_document(cfg, sidecar)
    return checked


def check_named_tokenizer(cfg: Config, sidecar: Optional[dict]) -> None:
    """The tokenizer.json data.tokenizer names is the one the prepared dataset's ``sidecar`` records (by
    fingerprint; None: no prepared dataset, or one built elsewhere), unless ``checkpoint.allow_config_change`` holds
    data.tokenizer (as for a resume onto another tokenizer's data)."""
    d = cfg.data
    if sidecar is None or "data.tokenizer" in cfg.checkpoint.allow_config_change:
        return
    try:
        other = named_tokenizer_message(d.path, d.tokenizer, sidecar)
    except ValueError as e:  # an unreadable tokenizer.json
        raise ConfigError(f"data.tokenizer = {d.tokenizer}: {str(e).splitlines()[0]}") from None
    if other:
        raise ConfigError(other)


def _check_weather(cfg: Config) -> None:
    """The weather source: channels the model fits, non-empty split shares, a usable data.path directory."""
    d, m = cfg.data, cfg.model
    if not m.in_channels == m.out_channels == d.channels:
        # every rank would refuse its first batch (models/swin.check_batch): input and target are the same fields
        raise ConfigError(f"data.channels = {d.channels} with model.in_channels = {m.in_channels}, model.out_channels "
                          f"= {m.out_channels}: the weather source forecasts the next step of all its fields, so "
                          f"each batch's input and target have data.channels fields; set all three equal")
    pairs = d.steps - 1  # forecasting pairs (t, t+1) of data.steps time steps (data/weather.WeatherDataset)
    for part in ("train", "valid") if cfg.train.eval_every else ("train",):
        lo, hi = split_part(pairs, d.split, part)
        if hi <= lo:  # the rank's WeatherBatcher would refuse it after start-up
            raise ConfigError(f"data.split = {d.split!r}: the {part} share of the {pairs} weather samples (data.steps "
                              f"= {d.steps}) is empty; give it a larger share or more data.steps")
        if part == "valid":  # the rank's Evaluator would refuse it after start-up
            _check_held_out(cfg, hi - lo)
    if not d.path:
        raise ConfigError("data.path is not set: give the directory of the weather dataset (generated there "
                          "on first use)")
    if Path(d.path).exists() and not Path(d.path).is_dir():
        raise ConfigError(f"data.path = {d.path}: is a file; the weather source needs a directory")
    if not Path(d.path).exists():
        check_writable_dir("data.path", d.path)  # generated there by rank 0
    elif d.image and len(d.image) == 2:  # rank 0 would refuse to regenerate another job's dataset in place
        other = other_dataset_message(d.path, weather_meta(**weather_settings(d, cfg.run.seed)))
        if other:
            raise ConfigError(other)


def check_end_of_document(cfg: Config, sidecar: Optional[dict]) -> None:
    """A GPT document option (data.document_mask / reset_positions / eod_mask_loss) needs an end-of-document id
    inside the vocabulary: one outside it (the byte tokenizer's 256 under model.vocab_size = 64) never occurs, and
    the option would silently do nothing. ``sidecar``: data.path's, as :func:`check_data` read it."""
    d = cfg.data
    if cfg.model.kind != "gpt" or not d.document_options_on:
        return
    unknown = unknown_eod_message(d, sidecar)
    if unknown:
        raise ConfigError(unknown)
    try:
        eod = resolve_eod_id(d, sidecar)
    except ValueError:  # an unreadable tokenizer: check_data's refusal, or the trainer's
        return
    if eod >= cfg.model.vocab_size:
        option = d.document_options_on[0]
        raise ConfigError(f"data.{option}: the end-of-document id {eod} (data.eod_id null: the dataset's, else the "
                          f"tokenizer's) is outside model.vocab_size = {cfg.model.vocab_size}, so no document would "
                          "ever end; set data.eod_id to a token id the data holds")


def _check_held_out(cfg: Config, held_out: int) -> None:
    """An evaluation reading more than the ``held_out`` validation samples would count some twice: refused."""
    refusal = held_out_overrun(cfg, held_out)
    if refusal:
        raise ConfigError(refusal)


def _check_held_out_documents(cfg: Config, checked: dict[str, Checked]) -> None:
    """Held-out documents that are training documents too (data/overlap.py): more than data.valid_overlap_max of
    them is refused, the validation loss would be optimistic. ``checked``: the datasets as read, by prefix."""
    try:
        overlap = held_out_overlap_message(cfg, checked)
    except ValueError as e:  # a damaged document table, named by its key (Checked.key) as any dataset's problem
        raise ConfigError(str(e).splitlines()[0]) from None
    if overlap:
        raise ConfigError(overlap)


def _samples(part: tuple[int, int]) -> int:
    """The number of samples in ``part`` = [first, end) (:func:`~.data.datasets.indexed_part`)."""
    first, end = part
    return end - first


def _check_indexed(cfg: Config) -> dict[str, Checked]:
    """Returns data.path and data.valid_path as read (index and sidecar), by prefix (none when data.path is built at
    start-up)."""
    d, m = cfg.data, cfg.model
    checked: dict[str, Checked] = {}  # the index and sidecar each check read, for the later checks
    hash_documents = overlap_checked(cfg)  # then a .bin scanned for its token ids is hashed in that same read

    def check(prefix: str, key: str) -> None:
        checked[prefix] = checked_dataset(prefix, m.vocab_size, d.seq_len, key, hash_documents)

    if d.valid_path:
        try:  # the held-out dataset must exist (nothing builds it) and pass the same checks
            check(d.valid_path, "data.valid_path")
        except ValueError as e:
            raise ConfigError(str(e).splitlines()[0]) from None
    if not d.path:
        raise ConfigError("data.path is not set: give the prefix of a Megatron indexed dataset "
                          "(dist-train data prepare --output PREFIX)")
    have = [Path(f"{d.path}{s}").is_file() for s in (".bin", ".idx")]
    if all(have):
        try:
            check(d.path, "data.path")
            # the parts the ranks read (data.split's training share; its validation share when validation reads it):
            # an empty one is refused by every rank's dataset after start-up
            samples = {part: _samples(indexed_part(d.path, checked[d.path].index.tokens, d.seq_len, d.split, part))
                       for part in (("train", "valid") if cfg.train.eval_every and not d.valid_path else ("train",))}
        except ValueError as e:
            raise ConfigError(str(e).splitlines()[0]) from None
        if d.valid_path:  # both sidecars as check_indexed_dataset read them (a bad one is refused there)
            both = checked[d.path], checked[d.valid_path]
            sidecars = both[0].sidecar, both[1].sidecar
            other = (same_data_message(d.path, d.valid_path, (both[0].identity, both[1].identity))
                     or other_tokenizer_message(d.path, d.valid_path, "data.path", "data.valid_path", sidecars))
            if other:
                raise ConfigError(other)
        if cfg.train.eval_every:  # the ranks' Evaluator would refuse it after start-up
            held_out = checked.get(d.valid_path)
            _check_held_out(cfg, _samples(indexed_part(d.valid_path, held_out.index.tokens, d.seq_len, None, "train",
                                                       "data.valid_path"))
                            if held_out else samples["valid"])
        _check_held_out_documents(cfg, checked)
        return checked
    if d.prepare is None:
        missing = " and ".join(f"{d.path}{s}" for s, h in zip((".bin", ".idx"), have) if not h)
        raise ConfigError(f"data.path = {d.path}: {missing} not found"
                          + (prefix_hint(d.path) or f"; build it with 'dist-train data prepare --input FILES --output "
                                                    f"{d.path}' or set data.prepare: python-stdlib"))
    # rank 0 builds it at start-up: the tokenizer must load and fit the model, the directory be writable
    try:
        tok = get_tokenizer(d.tokenizer)
    except ValueError as e:
        raise ConfigError(f"data.tokenizer = {d.tokenizer}: {str(e).splitlines()[0]}") from None
    if tok.vocab_size > m.vocab_size:
        raise ConfigError(f"data.tokenizer = {d.tokenizer} has {tok.vocab_size} tokens but model.vocab_size = "
                          f"{m.vocab_size}: ids up to {tok.vocab_size - 1} would be outside the embedding; set "
                          f"model.vocab_size >= {tok.vocab_size}")
    check_writable_dir("data.path (its directory)", Path(d.path).parent)
    return checked


# -- resume -----------------------------------------------------------------------------------------
def verified_manifest(ckpt: Path) -> tuple[Optional[dict], str]:
    """The checkpoint module's verification as done at resume, minus the shard contents that the loader
    checks while reading them: manifest, every file's size, the small files' checksums. Returns (the manifest
    body, '') when valid, else (None, the first problem). An I/O error that may pass raises ``CheckpointIOError``, as
    in the manager: no verdict on the bytes, no fall-back."""
    try:
        body = mf.read_manifest(ckpt)
        problems = mf.verify_files(ckpt, body, size_only=mf.shards_verified_while_loading(body))
    except CheckpointIOError:
        raise
    except CheckpointError as e:
        problems = [str(e)]
    return (None, problems[0]) if problems else (body, "")


class VerifiedCandidate(NamedTuple):
    """:func:`newest_verified`'s answer: the first candidate that verifies (None: none does), its manifest body,
    and the damaged candidates walked past before it, each with its first problem."""
    checkpoint: Optional[Path]
    manifest: Optional[dict]
    damaged: list[tuple[Path, str]]


def newest_verified(candidates: list[Path], key: str) -> VerifiedCandidate:
    """Walk ``candidates`` (newest first, ``resume_candidates``' order) to the first that verifies
    (:func:`verified_manifest`), past damaged ones, as the ranks' manager does. An I/O error that may pass is no
    verdict on the bytes: neither a fall-back to an older checkpoint nor damage, but one line (ConfigError) naming
    ``key`` (the setting that chose the candidates, e.g. ``checkpoint.resume = auto``) and the error."""
    damaged = []
    for ckpt in candidates:
        try:
            body, problem = verified_manifest(ckpt)
        except CheckpointIOError as e:  # the ranks would stop on it too (restartable)
            raise ConfigError(f"{key}: {e}; its bytes may well be good: try again once the file system "
                              "answers") from None
        if body is not None:
            return VerifiedCandidate(ckpt, body, damaged)
        damaged.append((ckpt, problem))
    return VerifiedCandidate(None, None, damaged)


def _train_samples(cfg: Config, checked: Mapping[str, Checked]) -> Optional[int]:
    """Samples of the GPT's indexed training data as the trainer reads it (None: other data, or not prepared yet).
    ``checked``: :func:`check_data`'s datasets (data.path's index is read here when they lack it)."""
    d = cfg.data
    if cfg.model.kind != "gpt" or d.source != "indexed" or not d.path or not Path(f"{d.path}.idx").is_file():
        return None
    try:
        if d.path in checked:
            index = checked[d.path].index
        else:
            index = read_index(d.path)
            check_bin_size(d.path, index)  # as the trainer's IndexedTokenDataset: a mismatched .bin counts nothing
        return _samples(indexed_part(d.path, index.tokens, d.seq_len, d.split, "train"))
    except ValueError:  # unreadable or too small: check_data's refusal, or the trainer's
        return None


def _training_identity(cfg: Config, checked: Mapping[str, Checked]) -> tuple[Optional[str], Optional[str]]:
    """:func:`training_identity`, (None, None) when the sidecar cannot be read (check_data's refusal). ``checked``:
    see :func:`_train_samples`; data.path's identity is taken from there, computed once per pre-flight."""
    read = checked.get(cfg.data.path) if cfg.data.path and cfg.model.kind == "gpt" else None
    if read is not None:  # training_identity's two values, from the sidecar check_data read
        return read.identity, sidecar_tokenizer(read.sidecar)
    try:
        return training_identity(cfg)
    except ValueError:
        return None, None


def check_model_shapes(cfg: Config, ckpt: Path, manifest: dict) -> None:
    """A checkpoint (GPT or Swin) whose saved config records a model of this kind must hold the tensors (names and
    shapes) this config builds: a checkpoint of another size cannot be loaded, whatever
    ``checkpoint.allow_config_change`` lists (the ranks' own check would refuse it, after every rank started).
    Both sides are the tp=1 single-tile model's tensors (``bridge.model_shapes``: the GPT's from its config, the
    Swin's from a meta-device build), the layout-independent checkpoint format, so a change of dp/tp/pp/cp/wp
    passes. ``manifest``: its verified manifest body."""
    saved_model = (manifest.get("config") or {}).get("model")
    if not isinstance(saved_model, Mapping) or saved_model.get("kind", "gpt") != cfg.model.kind:
        return  # a change of model.kind is compat.check_config's refusal
    saved = {k[len("model."):]: list(v["shape"]) for k, v in (manifest.get("tensors") or {}).items()
             if k.startswith("model.")}
    want = {k: list(v) for k, v in model_shapes(cfg).items()}
    if saved == want:
        return
    changed = [f"{k} {old!r} -> {new!r}" for k, old, new in
               compat.config_differences(manifest["config"], cfg.to_dict()) if k.startswith("model.")]
    other = sorted(k for k in want.keys() & saved.keys() if want[k] != saved[k])
    alone = sorted(saved.keys() ^ want.keys())
    tensors = "; ".join(([f"{len(other)} tensor(s) of other shapes, e.g. {other[0]} saved {saved[other[0]]}, now "
                          f"{want[other[0]]}"] if other else [])
                        + ([f"{len(alone)} tensor(s) in only one of them, e.g. {alone[0]}"] if alone else []))
    elsewhere = ("train this model in another run.dir" if cfg.checkpoint.resume == "auto" else
                 "start this model from scratch (checkpoint.resume: none)")
    raise ConfigError(f"checkpoint {ckpt} holds a model of another size than this config's"
                      + (f": {', '.join(changed)}" if changed else "")
                      + f" ({tensors}); no resume can load it, whatever "
                      f"checkpoint.allow_config_change lists: keep the checkpoint's model sizes, or {elsewhere}")


def check_resume_matches(cfg: Config, ckpt: Path, manifest: dict, checked: Mapping[str, Checked]) -> None:
    """The checkpoint the ranks will resume from (``manifest``: its verified manifest body) was saved with this
    model config and dataset (or the differences are allowed): the trainer's checks (checkpoint/compat.py),
    here before any rank starts. ``checked``: see :func:`_train_samples`."""
    check_model_shapes(cfg, ckpt, manifest)
    extra = checkpoint_extra(ckpt)
    current_digest, tokenizer = _training_identity(cfg, checked)
    digest = comparable_digest(trained_digest(extra), current_digest, cfg.data.path)
    try:
        changes = compat.check_config(ckpt, manifest.get("config"), cfg.to_dict(),
                                      cfg.checkpoint.allow_config_change, consumed_samples(extra),
                                      trained_digest(extra), digest, trained_tokenizer(extra), tokenizer)
        compat.check_dataset(ckpt, extra, _train_samples(cfg, checked),
                             cfg.checkpoint.allow_config_change, cfg.data.path, changes, digest)
        compat.check_tokenizer(ckpt, extra, tokenizer, cfg.checkpoint.allow_config_change, cfg.data.path)
    except compat.ResumeMismatchError as e:
        raise ConfigError(str(e)) from None


def check_resume(cfg: Config, checked: Mapping[str, Checked] = MappingProxyType({})) -> None:
    """``checkpoint.resume`` = PATH must exist and verify (a dir of checkpoints: one of them, newest first, as
    auto); ``auto`` must find at least one checkpoint that verifies when there are any (the trainer would
    otherwise stop after every rank started). The candidates are the manager's (``resume_candidates``).
    ``checked``: :func:`check_data`'s datasets, when it ran."""
    root = checkpoint_root(cfg.checkpoint, cfg.run.dir)
    mode = effective_resume(cfg.checkpoint, root)
    if mode == "none":
        occupied = occupied_message(root)
        if occupied:
            raise ConfigError(occupied)
        return
    foreign = describe_foreign_tree(root if mode == "auto" else Path(mode))
    if foreign:
        raise ConfigError(f"checkpoint.resume = {mode}: {foreign}, then resume from OUT (or set "
                          "checkpoint.resume=none)")
    try:  # the manager's candidates, by the same function: this verdict is the ranks' choice
        candidates, single = resume_candidates(mode, root)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not candidates:
        return
    if mode == "auto":
        where = f"checkpoint.resume = auto: every checkpoint under {root} is damaged"
        hint = "; repair them, or move them away to start from scratch"
    else:
        where = f"checkpoint.resume = {mode}: " + ("damaged" if single else "every checkpoint is damaged")
        hint = ""
    found = newest_verified(candidates, f"checkpoint.resume = {mode}")
    if found.checkpoint is None:
        problems = [problem if single else f"{ckpt.name}: {problem}" for ckpt, problem in found.damaged]
        raise ConfigError(f"{where} ({' | '.join(problems)}){hint}")
    check_resume_matches(cfg, found.checkpoint, found.manifest, checked)
    newer = None if mode == "auto" else newer_checkpoints_message(root, mode, found.manifest["step"],
                                                                  [ckpt for ckpt, _ in found.damaged])
    if newer:
        raise ConfigError(newer)
