"""`dist-train bench ckpt --engine`: its flags refused before any rank, and the per-rank results turned into rows,
baseline/ours ratios, the table, the CSV and the PNG (synthetic results: nothing is timed here); one small real
run end to end (slow)."""
from __future__ import annotations

import argparse
import csv
import gc
import json
from types import SimpleNamespace

import pytest

from dist_train.bench import _ckpt_engines as engines
from dist_train.bench import _os_meters
from dist_train.bench.cli import ckpt as cli
from dist_train.cli import main

MIB = 1 << 20


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_engine_layouts_parsed_and_bad_flags_refused_with_one_line(tmp_path):
    d = ("--dir", str(tmp_path))
    assert cli.check(_args("--engine", "zero3-dp2, fsdp2-dp2-tp2,zero3-dp2", *d)).layouts == ["zero3-dp2",
                                                                                             "fsdp2-dp2-tp2"]
    assert cli.check(_args("--size-gb", "0.001", *d)) == int(0.001 * (1 << 30))  # the raw-disk mode as before
    assert cli.check(_args("--engine", "zero2-dp2,fsdp2-dp2", "--fsdp-baseline", "dcp", *d)).fsdp_baseline == "dcp"
    for argv, words in [(("--engine", "zero4-dp2"), "valid: fsdp2-dp2-tp2, fsdp2-dp2, zero1-dp2"),
                        (("--engine", ","), "unknown layout (none)"),
                        (("--engine", "zero2-dp2", "--size-gb", "1"), "--size-gb = 1.0 with --engine"),
                        (("--engine", "zero2-dp2", "--d-model", "66"), "multiple of 4"),
                        (("--engine", "zero2-dp2", "--layers", "0"), "--layers = 0"),
                        (("--csv", "x.csv"), "--csv is written by the --engine mode only"),
                        (("--engine", "zero2-dp2", "--fsdp-baseline", "dcp"), "no FSDP2 layout in --engine"),
                        (("--fsdp-baseline", "dcp"), "--fsdp-baseline dcp is for the --engine mode")]:
        with pytest.raises(ValueError, match=None) as e:
            cli.check(_args(*argv, *d))
        assert words in str(e.value) and "\n" not in str(e.value), (argv, str(e.value))


def test_an_engine_run_without_room_for_its_checkpoints_is_refused_before_any_rank(tmp_path, monkeypatch):
    """Every round's checkpoints stay until the layout ends: d 768 with 5 repeats writes ~9 GiB per layout. A --dir
    without that room failed in the ranks (no space left) after minutes of measuring; now one line first."""
    free = {"bytes": 1 << 40}
    monkeypatch.setattr(cli.shutil, "disk_usage", lambda path: SimpleNamespace(free=free["bytes"]))
    argv = ("--engine", "fsdp2-dp2,zero2-dp2", "--d-model", "768", "--repeats", "5", "--dir", str(tmp_path))
    assert cli.check(_args(*argv)).layouts == ["fsdp2-dp2", "zero2-dp2"]
    free["bytes"] = 8 << 30  # 7 rounds (warm-up, 5 repeats, tensor meter) x 28 B x 48.0 M parameters = 8.8 GiB
    with pytest.raises(ValueError) as e:
        cli.check(_args(*argv))
    assert "writes up to 8.8 GiB there at once, 8.0 GiB available" in str(e.value) and "\n" not in str(e.value), e


def test_a_refused_layout_exits_2_before_any_rank(tmp_path, capsys):
    assert main(["bench", "ckpt", "--engine", "zero4-dp2", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "zero4-dp2" in err[0] and "zero3-dp2" in err[0], err


def _rank_result(rank: int, scale: float, numel: int) -> dict:
    """What ``_rank`` returns, for two repeats of both paths: ours takes ``scale`` × rank-dependent seconds, the
    baseline twice that and allocates 8 × as much."""
    def run(i: int, mult: float) -> dict:
        t = scale * mult * (1 + rank) * (1 + i)
        return {"save_s": t, "load_s": t / 2, "save_gc_s": t / 10, "load_gc_s": 0.0, "save_rss_bytes": int(mult * MIB),
                "load_rss_bytes": int(mult * 2 * MIB), "save_written_bytes": 10 * MIB, "load_written_bytes": 0,
                "dir_bytes": 20 * MIB, "first": (i % 2 == 0) == (mult == 1)}  # ours first in even rounds

    runs = {"ours": [run(0, 1), run(1, 1)], "baseline": [run(0, 2), run(1, 2)]}
    peaks = {name: {"save_tensor_peak_bytes": MIB * m, "load_tensor_peak_bytes": 3 * MIB * m}
             for name, m in (("ours", 1), ("baseline", 8))}
    return {"runs": runs, "tensor_peaks": peaks, "numel": numel, "state_bytes": 4 * numel}


def test_rows_ratios_table_csv_and_png_from_per_rank_results(tmp_path, capsys):
    numel = 1 << 20
    per_rank = [_rank_result(r, 0.1, numel) for r in range(2)]
    rows = [engines._row("zero2-dp2", name, per_rank, 12 * numel, "d") for name in engines.PATHS]
    ours, base = rows
    # the slowest rank's median (rank 1: 0.2 and 0.4 s over the repeats), the largest rank's peaks, bytes summed
    assert ours["save_s"] == pytest.approx(0.3) and base["save_s"] == pytest.approx(0.6)
    assert ours["load_tensor_peak_bytes"] == 3 * MIB and base["save_tensor_peak_bytes"] == 8 * MIB
    assert ours["written_bytes"] == 20 * MIB and ours["dir_bytes"] == 20 * MIB
    assert ours["save_tensor_peak_of_full_state"] == pytest.approx(MIB / (12 * numel))
    assert [r["rank"] for r in ours["ranks"]] == [0, 1] and ours["ranks"][0]["save_s_runs"] == pytest.approx([0.1, 0.2])
    # by place in the round (slowest rank): ours went first in round 0 (0.2 s), second in round 1 (0.4 s)
    assert (ours["save_s_first"], ours["save_s_second"]) == pytest.approx((0.2, 0.4))
    assert (base["load_s_first"], base["load_s_second"]) == pytest.approx((0.4, 0.2))
    assert ours["save_gc_s"] == pytest.approx(0.03)  # rank 1's median
    assert ours["ranks"][1]["save_gc_s_runs"] == pytest.approx([0.02, 0.04])
    assert engines._by_place(ours, base) == ("s when first / second in the round: save ours 0.200 / 0.400, baseline "
                                             "0.800 / 0.400; load ours 0.100 / 0.200, baseline 0.400 / 0.200; gc ms "
                                             "in save / load: ours 30 / 0, baseline 60 / 0")
    once = {**ours, "save_s_first": None}  # one repeat: the path never went second (or first)
    assert "save ours — / 0.400" in engines._by_place(once, base)
    ratios = engines._ratios(ours, base)
    assert ratios["save_s"] == pytest.approx(2.0) and ratios["save_s_pair_median"] == pytest.approx(2.0)
    assert ratios["load_tensor_peak_bytes"] == pytest.approx(8.0) and ratios["written_bytes"] == pytest.approx(1.0)
    assert ratios["save_rss_bytes"] == pytest.approx(2.0)
    tiny = {**ours, "load_rss_bytes": engines.MEMORY_FLOOR - 1, "save_tensor_peak_bytes": 1024}
    assert engines._ratios(tiny, base)["load_rss_bytes"] is None  # below the floor: no ratio, not 2000x
    assert engines._ratios(tiny, base)["save_tensor_peak_bytes"] == pytest.approx(8 * 1024)  # counted to the byte

    engines._print_table(rows, {"zero2-dp2": ratios})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[3].split() == ["zero2-dp2", "base/ours", "2.00x", "2.00x", "8.00x", "8.00x", "2.00x", "2.00x", "1.00x"], lines

    engines._write_csv(rows, str(tmp_path / "e.csv"))
    with open(tmp_path / "e.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [(r["path"], r["rank"]) for r in table] == [("ours", "0"), ("ours", "1"), ("baseline", "0"),
                                                       ("baseline", "1")]
    assert float(table[3]["save_s"]) == pytest.approx(0.6)

    record = {"model": {"d_model": 64}, "repeats": 2, "load_avg": (1.0, 1.0, 1.0), "rows": rows}
    engines.plot(record, str(tmp_path / "e.png"))
    assert (tmp_path / "e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_gc_clock_counts_the_collector_inside_its_block_only():
    """What ``_cycle`` records as ``save_gc_s``/``load_gc_s``: the collector's time while the call ran."""
    gc.collect()
    with engines.GcClock() as clock:
        cycles = [[] for _ in range(20000)]
        for c in cycles:
            c.append(c)  # reference cycles: only the collector frees them
        del cycles, c
        gc.collect()
    inside = clock.seconds
    assert inside > 0 and clock._tick not in gc.callbacks  # this clock's own callback, removed
    gc.collect()  # outside the block: not counted
    assert clock.seconds == inside


@pytest.mark.slow  # ~30 s: two fresh DeepSpeed ranks, then two FSDP2 ranks, one repeat of each path
def test_bench_ckpt_engine_runs_end_to_end_on_zero2_and_fsdp2_against_sharded_dcp(tmp_path):
    """Every load restored the saved state (the ranks assert it) and the record carries each path's figures."""
    out = tmp_path / "e.json"
    assert main(["bench", "ckpt", "--engine", "zero2-dp2,fsdp2-dp2", "--fsdp-baseline", "dcp", "--d-model", "64",
                 "--layers", "1", "--vocab", "95", "--repeats", "1", "--dir", str(tmp_path), "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert [(r["layout"], r["path"]) for r in record["rows"]] == [("zero2-dp2", "ours"), ("zero2-dp2", "baseline"),
                                                                 ("fsdp2-dp2", "ours"), ("fsdp2-dp2", "baseline")]
    assert "save_checkpoint" in record["rows"][1]["describe"] and "dcp.save" in record["rows"][3]["describe"]
    for row in record["rows"]:
        assert row["save_s"] > 0 and row["load_s"] > 0 and row["written_bytes"] > 0 and row["dir_bytes"] > 0, row
        assert len(row["ranks"]) == 2
    assert list(tmp_path.iterdir()) == [out]  # the checkpoints were removed


def test_a_baseline_s_saved_file_is_fsynced_like_a_directory_s_files(tmp_path, monkeypatch):
    """The full-state-dict baseline saves one file: it must reach the disk as ours does (its save was timed without
    an fsync when the walk took only directories)."""
    one = tmp_path / "tp0.pt"
    one.write_bytes(b"x")
    tree = tmp_path / "step_1"
    (tree / "sub").mkdir(parents=True)
    for name in ("a", "sub/b"):
        (tree / name).write_bytes(b"y")
    synced: list[int] = []
    monkeypatch.setattr(_os_meters.os, "fsync", synced.append)
    _os_meters.fsync_files(one)
    assert len(synced) == 1
    _os_meters.fsync_files(tree)
    assert len(synced) == 3
