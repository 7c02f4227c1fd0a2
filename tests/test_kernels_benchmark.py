"""benchmarks/attention.py runs end to end on CPU (interpreted kernels, tiny sizes)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path


def test_quick_sweep_runs_and_writes_json(tmp_path, monkeypatch):
    path = Path(__file__).parents[1] / "benchmarks" / "attention.py"
    spec = importlib.util.spec_from_file_location("attention_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "_QUICK_SWEEP", dict(bench._QUICK_SWEEP, decode=[(2, 20)], mixed=[(1, 5, 1, 20)]))
    out = tmp_path / "attention.json"
    monkeypatch.setattr(sys, "argv", ["attention.py", "--smoke", "--repeats", "1", "--output", str(out)])
    bench.main()
    report = json.loads(out.read_text())
    assert report["quick"] and report["command"].endswith(str(out)) and len(report["git_commit"]) == 40
    rows = report["results"]
    timed = {(r["workload"], r["backend"]) for r in rows if "ms" in r}
    assert {"xla", "pallas", "dense"} <= {backend for _, backend in timed}
    assert ("decode b=2 ctx=20 gqa=2", "jax_paged_attention") in timed
    assert all(r["ms"] > 0 and r["hbm_gb_s"] > 0 and r["tflop_s"] > 0 for r in rows if "ms" in r)
