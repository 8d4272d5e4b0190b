"""Memory-bounded train-side features (app/estimators/features.py) and streamed state files.

* Features written through the memory-mapped path give the same TRAK / LoGra / TracIn-RP scores and
  self-influence as the in-memory path, also through the worker's state file.
* The streamed safetensors writer round-trips through ``safetensors.safe_open`` and the mapping reader.
* The supervisor's state-file check (worker/sandbox.py ``copy_state_file``) keeps every guarantee.
* Fitting and scoring TRAK with ~200 MB of features under a 32 MB budget stays far below the feature
  size in anonymous memory (enforced with ``RLIMIT_DATA`` in a subprocess, not timed).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from app.estimators import (
    InfluenceProblem,
    Recipe,
    Runtime,
    TaskSpec,
    features,
    get_estimator,
    init_model,
    train,
)
from app.estimators.features import (
    FeatureWriter,
    block_rows,
    gram_columns,
    gram_rows,
    load_tensors,
    row_chunks,
    save_tensors,
)
from app.problems import ProblemError
from worker import sandbox
from worker.compute import _write_state, read_state

ROOT = Path(__file__).resolve().parents[2]
CLS = TaskSpec("classification", "cross_entropy")
MAPPED_BUDGET = 16 * 1024  # feature matrices of a few KiB are mapped; row blocks of 2 KiB


# --- the feature matrix ----------------------------------------------------------------------------


def test_writer_keeps_small_matrices_in_memory_and_maps_large_ones(tmp_path):
    rows = torch.arange(60, dtype=torch.float64).reshape(20, 3)
    small = FeatureWriter(20, 3, torch.float64, budget=1024, scratch_dir=tmp_path)  # 480 B <= 512 B
    big = FeatureWriter(20, 3, torch.float64, budget=1024, scratch_dir=tmp_path, matrices=3)
    unbounded = FeatureWriter(20, 3, torch.float64, scratch_dir=tmp_path)
    assert not small.memory_mapped and big.memory_mapped and not unbounded.memory_mapped
    for writer in (small, big, unbounded):
        for s in range(0, 20, 7):
            writer.write(rows[s : s + 7])
        assert torch.equal(writer.finish(), rows)
    assert list(tmp_path.iterdir()) == []  # the mapped file was unlinked once mapped
    mapped = big.finish()
    mapped[0, 0] = -1.0  # a writable view of the mapping
    assert float(mapped[0, 0]) == -1.0
    with pytest.raises(ValueError):
        big.write(rows[:1])  # full
    with pytest.raises(ValueError):
        FeatureWriter(2, 3, torch.float32).write(rows[:1])  # dtype
    with pytest.raises(ValueError):
        FeatureWriter(2, 3, torch.float64).finish()  # not filled


def test_row_chunks_and_gram_matrices():
    g = torch.Generator().manual_seed(0)
    Phi = torch.randn(23, 5, generator=g, dtype=torch.float32)
    blocks = list(row_chunks(Phi, 3, 20, rows=4))
    assert [(s, e) for s, e, _ in blocks] == [(3, 7), (7, 11), (11, 15), (15, 19), (19, 20)]
    assert all(b.dtype == torch.float64 for _, _, b in blocks)
    assert torch.equal(torch.cat([b for _, _, b in blocks]), Phi[3:20].double())
    assert list(row_chunks(Phi, 5, 5)) == []
    assert block_rows(5, budget=8 * 5 * 8 * 8) == 8  # 1/8 of the budget in 8-byte rows of 5
    P64 = Phi.double()
    np.testing.assert_allclose(torch.tril(gram_columns(Phi, budget=320)), torch.tril(P64.T @ P64), rtol=1e-13)
    np.testing.assert_allclose(gram_rows(Phi, budget=320), P64 @ P64.T, rtol=1e-13)


# --- same scores through the memory-mapped path ------------------------------------------------------


@pytest.fixture(scope="module")
def trained():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (70,), generator=g)
    x = 0.7 * torch.randn(4, 12, generator=g, dtype=torch.float64)[y] + torch.randn(
        70, 12, generator=g, dtype=torch.float64
    )
    model = init_model("mlp", {"in_features": 12, "hidden": [16], "num_classes": 4}, 0).double()
    res = train(
        model, CLS, x[:63], y[:63], Recipe(learning_rate=0.1, epochs=3, batch_size=9, num_checkpoints=2)
    )
    return InfluenceProblem(
        model=model,
        task=CLS,
        weights=res.weights,
        train_x=x[:63],
        train_y=y[:63],
        query_x=x[63:],
        query_y=y[63:],
        checkpoints=res.checkpoints,
        measurement="margin",
    )


CASES = [
    ("trak", {"projection_dim": 32}),  # primal: Phi^T Phi
    ("trak", {"projection_dim": 128, "projection": "gaussian", "damping": 0.1}),  # dual: Phi Phi^T
    ("trak", {"projection_dim": 20, "use_checkpoints": False}),
    ("logra", {"k_in": 4, "k_out": 3}),
    ("tracincp", {"projection_dim": 24}),
    ("tracincp", {"projection_dim": 24, "normalize": "cosine"}),
]


@pytest.mark.parametrize("name,params", CASES)
def test_memory_mapped_features_give_the_same_scores(trained, tmp_path, monkeypatch, name, params):
    mapped: list[tuple[int, int]] = []
    real = features._mapped_matrix

    def spy(n, k, dtype, scratch_dir):
        mapped.append((n, k))
        return real(n, k, dtype, scratch_dir)

    monkeypatch.setattr(features, "_mapped_matrix", spy)
    est = get_estimator(name)
    self_too = params.get("normalize") != "cosine"
    memory = Runtime(dtype=torch.float64, chunk_size=16)
    disk = Runtime(
        dtype=torch.float64, chunk_size=16, memory_budget_bytes=MAPPED_BUDGET, scratch_dir=tmp_path
    )

    expected = est.attribute(trained, params, want_self_influence=self_too, runtime=memory)
    assert not mapped
    state = est.fit(trained, params, disk)
    assert mapped and all(n == trained.n_train for n, _ in mapped)
    assert list(tmp_path.iterdir()) == []
    _write_state(tmp_path / "state.safetensors", state, MAPPED_BUDGET)  # streamed from the mappings
    reread = read_state(tmp_path / "state.safetensors")  # memory-mapped again
    assert reread.info == json.loads(json.dumps(state.info))
    for s in (state, reread):
        for rng in (None, (5, 41)):
            got = est.attribute(
                trained, params, want_self_influence=self_too, runtime=disk, state=s, train_range=rng
            )
            cols = slice(*rng) if rng else slice(None)
            np.testing.assert_allclose(got.scores, expected.scores[:, cols], rtol=1e-10, atol=1e-13)
            if self_too:
                np.testing.assert_allclose(
                    got.self_influence, expected.self_influence[cols], rtol=1e-10, atol=1e-13
                )
    fresh = est.attribute(trained, params, want_self_influence=self_too, runtime=disk)
    np.testing.assert_allclose(fresh.scores, expected.scores, rtol=1e-10, atol=1e-13)


# --- streamed safetensors ------------------------------------------------------------------------------


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "features_0": torch.randn(37, 5, generator=g),
        "kernel/inverse": torch.randn(5, 5, generator=g, dtype=torch.float64),
        "q": torch.rand(37, generator=g, dtype=torch.float64),
        "steps": torch.arange(3),
        "odd": torch.randn(3, generator=g),  # 12 bytes: must not misalign what follows
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(6, 8, generator=g)[:, ::2],
        "half": torch.randn(4, generator=g).to(torch.bfloat16),
        "mask": torch.tensor([True, False, True]),
    }


def test_streamed_safetensors_round_trip(tmp_path):
    tensors = _tensors()
    info = json.dumps({"n_train": 37, "form": "primal"})
    path = tmp_path / "state.safetensors"
    size = save_tensors(path, tensors, {"info": info}, budget=64)  # 8-byte blocks: many writes per tensor
    assert size == path.stat().st_size
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"info": info}
        assert sorted(handle.keys()) == sorted(tensors)
        for name, tensor in tensors.items():
            loaded = handle.get_tensor(name)
            assert loaded.dtype == tensor.dtype and torch.equal(loaded, tensor), name
    header, metadata, start = features.read_header(path)
    assert start % 8 == 0 and metadata == {"info": info}
    for entry in header.values():  # every tensor can be mapped in place
        itemsize = np.dtype(features._DTYPES[entry["dtype"]][1]).itemsize
        assert (start + entry["data_offsets"][0]) % itemsize == 0
    mapped, metadata = load_tensors(path)
    assert metadata == {"info": info}
    for name, tensor in tensors.items():
        assert mapped[name].dtype == tensor.dtype and torch.equal(mapped[name], tensor), name
    before = path.read_bytes()
    mapped["features_0"].mul_(0)  # copy-on-write: this process's pages only
    assert path.read_bytes() == before
    assert torch.equal(load_tensors(path)[0]["features_0"], tensors["features_0"])


def test_mapping_reader_reads_the_safetensors_librarys_files(tmp_path):
    tensors = {k: v.contiguous() for k, v in _tensors().items()}
    save_file(tensors, str(tmp_path / "lib.safetensors"), metadata={"info": "{}"})
    loaded, metadata = load_tensors(tmp_path / "lib.safetensors")
    assert metadata == {"info": "{}"}
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), name


def test_streaming_from_a_mapped_feature_matrix(tmp_path):
    writer = FeatureWriter(1000, 7, budget=1, scratch_dir=tmp_path)
    values = torch.randn(1000, 7)
    for s in range(0, 1000, 300):
        writer.write(values[s : s + 300])
    save_tensors(tmp_path / "f.safetensors", {"features": writer.finish()}, budget=800)
    with safe_open(str(tmp_path / "f.safetensors"), framework="pt") as handle:
        assert torch.equal(handle.get_tensor("features"), values)


# --- the supervisor's check of a child's state file ----------------------------------------------------


def _state_file(path: Path, tensors: dict | None = None, metadata: dict | None = None) -> Path:
    save_tensors(
        path,
        tensors if tensors is not None else {"features_0": torch.randn(40, 3), "q": torch.rand(40).double()},
        metadata if metadata is not None else {"info": json.dumps({"n_train": 40})},
    )
    return path


def _copy(src: Path, tmp_path: Path, max_bytes: int = 2**20) -> sandbox.StateFile:
    return sandbox.copy_state_file(
        src,
        tmp_path / "copy.safetensors",
        max_bytes=max_bytes,
        what="state",
        parameter="/method/params/damping",
    )


def test_copy_state_file_accepts_a_valid_state_and_keeps_its_bytes(tmp_path):
    src = _state_file(tmp_path / "state.safetensors")
    checked = _copy(src, tmp_path)
    assert checked.path.read_bytes() == src.read_bytes()
    assert checked.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    assert checked.size_bytes == src.stat().st_size and checked.info == {"n_train": 40}
    assert checked.tensors == {"features_0": ("F32", (40, 3)), "q": ("F64", (40,))}
    ints = _state_file(tmp_path / "ints.safetensors", {"steps": torch.arange(5)}, {})
    assert _copy(ints, tmp_path).info == {}


def _problem_code(call) -> ProblemError:
    with pytest.raises(ProblemError) as caught:
        call()
    return caught.value


def test_copy_state_file_refuses_what_the_old_loader_refused(tmp_path):
    def refused(path: Path, max_bytes: int = 2**20) -> ProblemError:
        return _problem_code(lambda: _copy(path, tmp_path, max_bytes))

    bad = torch.randn(40, 3)
    bad[17, 2] = float("nan")
    nan = refused(_state_file(tmp_path / "nan.safetensors", {"features_0": bad}))
    assert nan.code == "numerical-instability" and nan.status == 422
    assert nan.errors[0].pointer == "/method/params/damping"
    inf = torch.rand(40).double()
    inf[39] = float("inf")
    assert refused(_state_file(tmp_path / "inf.safetensors", {"q": inf})).code == "numerical-instability"
    for name, tensors, metadata in [
        ("f16", {"x": torch.randn(3).half()}, None),
        ("i32", {"x": torch.arange(3, dtype=torch.int32)}, None),
        ("none", {}, None),
        ("meta", None, {"info": "{}", "other": "x"}),
        ("notobject", None, {"info": "[1, 2]"}),
        ("nonjson", None, {"info": "{nan"}),
        ("nan-info", None, {"info": '{"a": NaN}'}),
    ]:
        problem = refused(_state_file(tmp_path / f"{name}.safetensors", tensors, metadata))
        assert problem.code == "invalid-output", name
    good = _state_file(tmp_path / "good.safetensors")
    raw = good.read_bytes()
    (tmp_path / "short.safetensors").write_bytes(raw[:-4])
    (tmp_path / "long.safetensors").write_bytes(raw + b"\0" * 4)
    (tmp_path / "junk.safetensors").write_bytes(b"\x80\x04junk" + raw)
    for name in ("short", "long", "junk"):
        assert refused(tmp_path / f"{name}.safetensors").code == "invalid-output", name
    assert refused(good, max_bytes=len(raw) - 1).code == "invalid-output"
    os.symlink(good, tmp_path / "link.safetensors")
    assert refused(tmp_path / "link.safetensors").code == "invalid-output"
    length = int.from_bytes(raw[:8], "little")
    lying = json.loads(raw[8 : 8 + length])
    lying["q"]["shape"] = [41]
    header = json.dumps(lying).encode()
    (tmp_path / "lying.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header + raw[8 + length :]
    )
    assert refused(tmp_path / "lying.safetensors").code == "invalid-output"


def test_outputs_state_file_uses_the_sandbox_file_limit(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "meta.json").write_text("{}")
    _state_file(out / "state.safetensors")
    limits = sandbox.Limits(60, 60, None, 2**20, 64, 256, 0, 1, False, False, tmp_path)
    checked = sandbox.Outputs(out, limits).state_file("state", tmp_path / "staged", "/method/params")
    assert checked.path == tmp_path / "staged" and checked.info == {"n_train": 40}
    small = sandbox.Limits(60, 60, None, 100, 64, 256, 0, 1, False, False, tmp_path)
    problem = _problem_code(lambda: sandbox.Outputs(out, small).state_file("state", tmp_path / "s2"))
    assert problem.code == "invalid-output"


def test_a_memory_mapped_state_goes_through_the_sandbox_and_back(tmp_path):
    """The child fits TRAK with mapped features and streams the state; the supervisor copies and checks
    it; a second child maps that file and scores the same."""
    from app.settings import Settings
    from tests.unit.test_sandbox import Recorder, _linear_problem_files

    settings = Settings(
        data_dir=tmp_path / "ia",
        sandbox_scratch_dir=tmp_path / "scratch",
        torch_threads=1,
        device="cpu",
        sandbox_memory_bytes=3 * 1024**3,
    )
    payload, inputs, data = _linear_problem_files(tmp_path)
    params = {"projection_dim": 8, "projection": "gaussian"}
    payload["method"] = {"name": "trak", "params": params}
    payload["runtime"]["memory_budget_bytes"] = 2048  # 40 x 8 float32 features (1280 B) are mapped
    results = []
    for run in range(2):
        with sandbox.Sandbox(sandbox.Limits.from_settings(settings)) as box:
            out = box.run("worker.compute:influence", payload, inputs, Recorder())
            results.append((out.array("scores", (3, 40)), out.array("self_influence", (40,))))
            if run == 0:
                checked = out.state_file("state", tmp_path / "stored.safetensors", "/method/params")
                assert checked.info["form"] == "primal" and checked.tensors["features_0"] == ("F32", (40, 8))
                inputs = {**inputs, "state": checked.path}
            else:
                assert "load_seconds" in out.mapping("state")
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    x, y = torch.as_tensor(data["x"]), torch.as_tensor(data["y"])
    problem = InfluenceProblem(
        model=data["model"], task=CLS, weights=data["model"].state_dict(), train_x=x, train_y=y,
        query_x=x[:3], query_y=y[:3],
    )  # fmt: skip
    expected = get_estimator("trak").attribute(problem, params, want_self_influence=True)
    np.testing.assert_allclose(results[1][0], expected.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(results[1][1], expected.self_influence, rtol=1e-5, atol=1e-6)


# --- peak memory ----------------------------------------------------------------------------------------

_PEAK = textwrap.dedent(
    """
    import resource, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from app.estimators import InfluenceProblem, Runtime, TaskSpec, get_estimator, init_model

    def vm_data():
        for line in open("/proc/self/status"):
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024

    n, d, k, limit = 400_000, 32, 128, 64 * 2**20  # features: n x k float32 = 195 MiB
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, d, generator=g), torch.randint(0, 5, (n,), generator=g)
    model = init_model("linear", {"in_features": d, "num_classes": 5}, 0)
    weights = {name: v.detach().clone() for name, v in model.state_dict().items()}

    def problem(rows):
        return InfluenceProblem(model=model, task=TaskSpec(), weights=weights, train_x=x[:rows],
                                train_y=y[:rows], query_x=x[:2], query_y=y[:2], measurement="margin")

    params = {"projection_dim": k, "projection": "countsketch"}
    trak = get_estimator("trak")
    scratch = Path(sys.argv[1])
    bounded = Runtime(chunk_size=4096, memory_budget_bytes=32 * 2**20, scratch_dir=scratch)
    unbounded = Runtime(chunk_size=4096)
    trak.attribute(problem(5000), params, want_self_influence=True, runtime=bounded)  # warm-up
    resource.setrlimit(resource.RLIMIT_DATA, (vm_data() + limit, resource.RLIM_INFINITY))
    try:
        trak.fit(problem(n), params, unbounded)
        print("UNENFORCED")  # the limit does not bite here: the check below would prove nothing
        sys.exit(0)
    except (MemoryError, RuntimeError) as exc:
        assert "allocate" in str(exc) or isinstance(exc, MemoryError), exc
    out = trak.attribute(problem(n), params, want_self_influence=True, runtime=bounded)
    assert out.scores.shape == (2, n) and out.self_influence.shape == (n,)
    print("OK")
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA and /proc are Linux")
def test_trak_fit_and_score_stay_far_below_the_feature_size(tmp_path):
    """~195 MiB of float32 features (and a 390 MiB float64 copy before) under a 32 MiB budget: the whole
    fit and scoring run with at most 64 MiB of new anonymous memory (RLIMIT_DATA counts malloc'd and
    anonymous mappings, not the shared file mapping of the features), while the in-memory path is
    refused under the same limit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _PEAK, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    if done.stdout.strip() == "UNENFORCED":
        pytest.skip("RLIMIT_DATA is not enforced on this kernel")
    assert done.returncode == 0 and done.stdout.strip() == "OK", done.stderr[-3000:]
