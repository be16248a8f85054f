"""Where the benchmark scripts write: a new run folder by default, the committed JSON only when asked."""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re

import pytest

from helpers import BENCH_DIR as BENCH


@pytest.fixture
def machine(bench_path, monkeypatch, tmp_path):
    """benchmarks/_machine.py with its run and results folders moved under tmp_path."""
    import _machine

    monkeypatch.setattr(_machine, "RUNS_DIR", str(tmp_path / "runs" / "bench"))
    monkeypatch.setattr(_machine, "RESULTS_DIR", str(tmp_path / "results"))
    return _machine


def _args(machine, argv):
    p = argparse.ArgumentParser()
    machine.add_output_args(p, "x.json")
    return p.parse_args(argv)


def test_output_path_defaults_to_a_new_run_folder(machine, tmp_path):
    path = machine.output_path(_args(machine, []), "x.json")
    folder = os.path.dirname(path)
    assert os.path.dirname(folder) == machine.RUNS_DIR and os.path.isdir(folder)
    assert re.fullmatch(r"\d{8}-\d{6}(-\d+)?", os.path.basename(folder))
    assert machine.output_path(_args(machine, []), "y.json") == os.path.join(folder, "y.json")  # one per run
    assert machine.output_path(_args(machine, ["--update-results"]), "x.json") == \
        os.path.join(machine.RESULTS_DIR, "x.json")
    assert machine.output_path(_args(machine, ["--json", "/some/where.json"]), "x.json") == "/some/where.json"
    assert machine.output_path(_args(machine, ["--json", ""]), "x.json") == ""


def test_run_folders_are_never_reused(machine):
    first = os.path.dirname(machine.output_path(_args(machine, []), "x.json"))
    machine._this_run.clear()  # a second process in the same second
    second = os.path.dirname(machine.output_path(_args(machine, []), "x.json"))
    assert first != second and os.path.isdir(second)


def _committed_digests():
    out = {}
    for p in sorted(glob.glob(os.path.join(BENCH, "results", "*"))):
        with open(p, "rb") as fh:
            out[p] = hashlib.sha256(fh.read()).hexdigest()
    return out


def test_benchmarks_leave_the_committed_results_alone(machine):
    import bench_backward
    import bench_tlift

    before = _committed_digests()
    bench_backward.main(["--batch", "2", "--classes", "3", "--channels", "8", "--maps", "2x2", "--repeats", "1"])
    bench_tlift.main(["--queries", "20", "--gallery", "50", "--cams", "2", "--spans", "600",
                      "--loop-probes", "5", "--repeats", "1"])
    assert _committed_digests() == before
    (run,) = os.listdir(machine.RUNS_DIR)
    written = sorted(os.listdir(os.path.join(machine.RUNS_DIR, run)))
    assert written == ["cpu_backward.json", "tlift_cpu.json"]
    bench_backward.main(["--batch", "2", "--classes", "3", "--channels", "8", "--maps", "2x2", "--repeats", "1",
                         "--update-results"])
    with open(os.path.join(machine.RESULTS_DIR, "cpu_backward.json")) as fh:
        assert json.load(fh)["benchmark"] == "cpu_backward"


@pytest.mark.parametrize("script", sorted(os.path.basename(p) for p in glob.glob(os.path.join(BENCH, "bench_*.py"))))
def test_every_benchmark_takes_its_path_from_the_shared_rule(script):
    with open(os.path.join(BENCH, script)) as fh:
        src = fh.read()
    assert "add_output_args(" in src and ("output_path(args" in src or "save_result(args" in src)
    assert not re.search(r'join\([^)]*"results"', src)  # no path of its own into benchmarks/results
