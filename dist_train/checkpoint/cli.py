"""``dist-train ckpt inspect|verify|convert``: what runs once dist_train/cli.py parsed the flags that the
torch-free :mod:`dist_train.checkpoint_arguments` defines.

PATH is a checkpoint (``…/step_N``) or a checkpoint directory (``…/checkpoints``): inspect and convert then
take its newest complete checkpoint, verify checks every checkpoint in it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dist_train.checkpoint import bridge, hf
from dist_train.checkpoint.foreign import describe_foreign_tree
from dist_train.checkpoint.input_normalisation import sidecar_path
from dist_train.checkpoint.manager import checkpoint_extra
from dist_train.checkpoint import manifest as mf
from dist_train.checkpoint.storage import CheckpointError, load_dcp_metadata
from dist_train.config import KIND_FIELDS, load_config
from dist_train.data.image_batches import NORMALISATION_KEY

EXIT_OK, EXIT_BAD = 0, 1
# the model.* keys a gpt uses (the swin-only ones are left out of what convert prints)
_GPT_KEYS = ("kind", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden", "vocab_size",
             "rope_theta", "rope_scaling", "norm_eps", "tie_embeddings", "init_std", "attention_window")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _checkpoints(path: Path, newest_only: bool) -> list[Path]:
    if not path.is_dir():
        # a step_N that was never written (or pruned by keep_last) is a typo to name, not a damaged checkpoint
        there = [p.name for _, p in mf.list_checkpoints(path.parent)] if path.parent.is_dir() else []
        raise ValueError(f"{path}: no such checkpoint (expected a step_N directory or a directory of them)"
                         + (f"; {path.parent} holds {', '.join(there)}" if there else ""))
    if (path / mf.MANIFEST).exists() or mf._STEP_RE.match(path.name) or path.name.endswith(".tmp"):
        return [path]
    found = mf.complete_checkpoints(path) if newest_only else mf.list_checkpoints(path)
    if not found:
        raise ValueError(f"{path}: contains no {'complete ' if newest_only else ''}step_N checkpoint")
    return [found[0][1]] if newest_only else [p for _, p in found]


def _layout_str(layout: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in layout.items()) or "-"


def _foreign(path: Path) -> bool:
    """Print what ``path`` is when it is some other format's checkpoint (a stock DCP directory also gets
    its tensor table); True when it was one."""
    what = describe_foreign_tree(path)
    if what is None:
        return False
    print(f"NOT A DIST-TRAIN CHECKPOINT: {what}")
    if (path / mf.DCP_METADATA).is_file() and not (path / mf.MANIFEST).exists():
        md = load_dcp_metadata(path / mf.DCP_METADATA)
        rows = sorted((fqn, list(m.size), str(m.properties.dtype).replace("torch.", ""))
                      for fqn, m in md.state_dict_metadata.items())
        w = max([len(r[0]) for r in rows] + [6])
        print(f"tensors     {len(rows)}")
        for name, shape, dtype in rows:
            print(f"  {name:<{w}}  {'x'.join(map(str, shape)) or 'scalar':<16} {dtype}")
    return True


def input_normalisation_line(ckpt: Path) -> str | None:
    """A Swin checkpoint's per-channel input normalisation as one line (None when it records none): what a forecast
    from its weights needs on the way in, (field - mean) / scale, and out, pred * scale + mean."""
    norm = checkpoint_extra(ckpt).get(NORMALISATION_KEY)
    if not norm:
        return None
    def values(key):
        return "[" + ", ".join(f"{v:.6g}" for v in norm[key]) + "]"
    return (f"inputs normalised per channel as (field - mean) / scale, outputs back as pred * scale + mean: "
            f"mean {values('mean')}, scale {values('scale')}")


def optimizer_groups(rows: list[dict]) -> tuple[list[dict], dict[str, list[dict]]]:
    """The tensor table's rows split into those listed one by one (the model's, anything not optimizer state) and
    the optimizer state grouped by kind: ``optim.state.*.exp_avg`` -> its rows (one per parameter, the model's
    shapes; listing them would triple a large model's table)."""
    listed, grouped = [], {}
    for r in rows:
        parts = r["name"].split(".")
        if parts[0] == "optim" and len(parts) > 3:
            grouped.setdefault(f"{'.'.join(parts[:2])}.*.{parts[-1]}", []).append(r)
        else:
            listed.append(r)
    return listed, grouped


def model_line(model: dict) -> str:
    """The recorded model section as one line: its kind, sizes and the fields only that kind reads (set ones)."""
    kind = model.get("kind", "?")
    keys = ("d_model", "n_layers", "n_heads", "ffn_hidden", *KIND_FIELDS.get(kind, ()))
    return f"{kind}: " + ", ".join(f"{k} {model[k]}" for k in keys if model.get(k) is not None)


def inspect(path: Path, json_out: str | None = None, show_all: bool = False) -> int:
    if _foreign(path):
        return EXIT_BAD
    ckpt = _checkpoints(path, newest_only=True)[0]
    try:
        body = mf.read_manifest(ckpt)
    except CheckpointError as e:
        print(f"BAD {e}")
        return EXIT_BAD
    rows = mf.tensor_table(body)
    total = sum(r["bytes"] for r in rows)
    files = body["files"]
    print(f"checkpoint  {ckpt}")
    print(f"step        {body['step']}   contents: {'+'.join(body['contents'])}")
    model = (body.get("config") or {}).get("model")
    if model:  # an import without a config (--from dcp) records none
        print(f"model       {model_line(model)}")
    print(f"layout      {_layout_str(body.get('layout') or {})}")
    print(f"code        {body.get('code_version')}   torch {body.get('torch_version')}")
    normalisation = input_normalisation_line(ckpt)
    if normalisation:
        print(f"inputs      {normalisation.removeprefix('inputs ')}")
    print(f"files       {len(files)}, {_human(sum(f['bytes'] for f in files.values()))}")
    for name in sorted(files):
        print(f"  {name:<28} {_human(files[name]['bytes']):>10}")
    print(f"tensors     {len(rows)}, {_human(total)}")
    listed, grouped = (rows, {}) if show_all else optimizer_groups(rows)
    w = max([len(r["name"]) for r in listed] + [len(k) for k in grouped] + [6])
    print(f"  {'tensor':<{w}}  {'shape':<16} {'dtype':<9} {'bytes':>10}")
    for r in listed:
        print(f"  {r['name']:<{w}}  {'x'.join(map(str, r['shape'])) or 'scalar':<16} {r['dtype']:<9} "
              f"{_human(r['bytes']):>10}")
    for pattern, group in grouped.items():
        dtypes = "/".join(sorted({r["dtype"] for r in group}))
        print(f"  {pattern:<{w}}  {f'{len(group)} tensors':<16} {dtypes:<9} "
              f"{_human(sum(r['bytes'] for r in group)):>10}")
    if grouped:
        print("  (one line per kind of optimizer state; --all lists each tensor)")
    if json_out:
        Path(json_out).write_text(json.dumps({"path": str(ckpt), "step": body["step"], "layout": body.get("layout"),
                                              "files": {k: v["bytes"] for k, v in files.items()},
                                              "tensors": rows,
                                              NORMALISATION_KEY: checkpoint_extra(ckpt).get(NORMALISATION_KEY)},
                                             indent=1))
    return EXIT_OK


def verify(path: Path) -> int:
    if _foreign(path):
        return EXIT_BAD
    status = EXIT_OK
    for ckpt in _checkpoints(path, newest_only=False):
        problems = mf.verify_checkpoint(ckpt)
        if problems:
            status = EXIT_BAD
            print(f"BAD {ckpt}")
            for p in problems:
                print(f"  {p}")
        else:
            body = mf.read_manifest(ckpt)
            size = sum(f["bytes"] for f in body["files"].values())
            print(f"OK  {ckpt}  step {body['step']}, {len(body['files'])} files, {_human(size)} checked")
    return status


def convert(src: Path, out: Path, to: str | None, frm: str | None, config: str | None = None,
            overrides: list[str] | None = None, normalisation_from_data: bool = False) -> int:
    if config and frm != "dcp":
        raise ValueError("--config applies to --from dcp only (the other formats carry their model config)")
    if normalisation_from_data and frm != "dcp":
        raise ValueError("--input-normalisation-from-data applies to --from dcp only (a dist-train checkpoint "
                         "records its normalisation; HF models are GPTs); remove it")
    if overrides and not config:
        raise ValueError(f"--set {overrides[0]}: --set overrides a --config key (with --from dcp), and no --config is "
                         "given, so nothing would read it; give --config or remove --set")
    if to:
        ckpt = _checkpoints(src, newest_only=True)[0]
        if to == "hf":
            export = hf.to_hf(ckpt, out)
            written = export.directory
            print(f"wrote {written / 'model.safetensors'} and {written / 'config.json'} from {ckpt}")
            note = hf.missing_tokenizer_note(export)
            if note:
                print(note, file=sys.stderr)
        elif to == "dcp":
            written = bridge.to_dcp(ckpt, out)
            print(f"wrote {written} (stock DCP, model state dict) from {ckpt}")
        else:
            written = bridge.to_torch(ckpt, out)
            print(f"wrote {written} (torch.save, model state dict) from {ckpt}")
        normalisation = input_normalisation_line(ckpt) if to != "hf" else None
        if normalisation:  # not in the state dict, and a forecast from these weights is wrong without it
            print(f"the model's {normalisation}; written to {sidecar_path(written)} "
                  "(docs/checkpointing.md#using-an-exported-swin)", file=sys.stderr)
        return EXIT_OK
    if frm == "hf":
        written = hf.from_hf(src, out)
        model = {k: v for k, v in mf.read_manifest(written)["config"]["model"].items() if k in _GPT_KEYS}
        print(f"wrote {written} (step 0, weights only); start from it with --set checkpoint.resume={out} and this "
              f"model section:\nmodel: {json.dumps(model)}")
    else:
        cfg = load_config(config, overrides or []) if config else None
        written = bridge.from_dcp(src, out, cfg, normalisation_from_data)
        checked = f"checked against {config}" if cfg else "not checked against a config (give --config to)"
        print(f"wrote {written} (step 0, weights only, {checked}); start from it with --set checkpoint.resume={out}")
        normalisation = input_normalisation_line(written)
        if normalisation:
            print(f"recorded the model's {normalisation} (from {sidecar_path(src)})")
        elif normalisation_from_data:
            print("recorded no input normalisation (--input-normalisation-from-data): a run from it normalises the "
                  "inputs with its own data's training-share statistics")
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    try:
        if args.ckpt_command == "inspect":
            return inspect(args.path, args.json, args.all)
        if args.ckpt_command == "verify":
            return verify(args.path)
        if args.ckpt_command == "convert":
            return convert(args.src, args.out, args.to, args.from_, args.config, args.set,
                           args.input_normalisation_from_data)
    except CheckpointError as e:
        print(f"BAD {e}")
        return EXIT_BAD
    raise ValueError(f"ckpt action {args.ckpt_command!r}: valid actions are inspect, verify, convert")
