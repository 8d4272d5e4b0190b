"""bench/gpu.py, the GPU workload's script, runs end to end at smoke size on the CPU (so it is ready
for a session with a device)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

torch.set_num_threads(1)

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu.py"


def test_gpu_bench_smoke_run_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "gpu.json"
    sizes = {
        "--n-train": 48,
        "--n-query": 6,
        "--base-channels": 4,
        "--projection-dim": 32,
        "--chunk-size": 16,
    }
    args = ["--device", "cpu", "--repeats", "1", "--out", str(out)]
    args += [str(v) for item in sizes.items() for v in item]
    assert module.main(args) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"tracin_rp", "trak", "ekfac"}
    for r in rows.values():
        assert r["finite"] and r["shape"] == [6, 48] and r["time_s"] > 0
