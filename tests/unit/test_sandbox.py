"""The compute sandbox with real child processes: environment, limits, kills, network, output checks.

The ``child_*`` functions at the top are tasks that run *inside* the sandboxed child (the child
imports this module by name, hence no module-level imports of the DB or Celery layers); the tests
drive them through ``worker.sandbox`` as the worker does.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from app.estimators import Cancelled, NumericalError, Runtime, TaskSpec, get_estimator, init_model
from app.problems import ProblemError
from app.settings import Settings
from worker import sandbox

HERE = "tests.unit.test_sandbox"


# --- tasks run inside the child -------------------------------------------------------------------


def child_environment(payload, inputs, out, progress) -> dict:
    libc = ctypes.CDLL(None)
    deathsig = ctypes.c_int(0)
    libc.prctl(2, ctypes.byref(deathsig), 0, 0, 0)  # PR_GET_PDEATHSIG
    names = ("RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_AS", "RLIMIT_CORE")
    return {
        "env": dict(os.environ),
        "rlimits": {name: list(resource.getrlimit(getattr(resource, name))) for name in names},
        "nice": os.nice(0),
        "no_new_privs": libc.prctl(39, 0, 0, 0, 0),  # PR_GET_NO_NEW_PRIVS
        "pdeathsig": deathsig.value,
        "session_leader": os.getsid(0) == os.getpid(),
        "cwd": os.getcwd(),
        "parent_environ_readable": _readable(f"/proc/{os.getppid()}/environ"),
        "capabilities": int(_status_field("CapEff"), 16) | int(_status_field("CapBnd"), 16),
    }


def _readable(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.read()
    except OSError:
        return False
    return True


def _status_field(name: str) -> str:
    with open("/proc/self/status") as fh:
        return next(line.split()[1] for line in fh if line.startswith(name + ":"))


def child_write(payload, inputs, out, progress) -> dict:
    (out / "big.bin").write_bytes(b"\0" * payload["bytes"])
    return {}


def child_allocate(payload, inputs, out, progress) -> dict:
    np.ones(payload["bytes"], dtype=np.uint8)
    return {}


def child_spin(payload, inputs, out, progress) -> dict:
    while True:
        pass


def child_sleep_with_grandchild(payload, inputs, out, progress) -> dict:
    grandchild = subprocess.Popen(["sleep", "600"])
    Path(payload["pid_file"]).write_text(str(grandchild.pid))
    time.sleep(600)
    return {}


def child_tick(payload, inputs, out, progress) -> dict:
    Path(payload["pid_file"]).write_text(str(os.getpid()))
    for i in range(10**6):
        progress("ticking", i, 10**6)
        time.sleep(0.01)
    return {}


def child_connect(payload, inputs, out, progress) -> dict:
    try:
        socket.create_connection(("127.0.0.1", payload["port"]), timeout=3).close()
        return {"connected": True}
    except OSError as exc:
        return {"connected": False, "error": str(exc)}


def child_probe_files(payload, inputs, out, progress) -> dict:
    """What a confined child can still reach: its input, and nothing else of the worker's files."""
    import decimal  # noqa: F401 - a module first imported after confinement still loads

    def denied(action) -> bool:
        try:
            action()
        except PermissionError:
            return True
        return False

    def read(path: str) -> bytes:
        with open(path, "rb") as fh:
            return fh.read()

    return {
        "input": inputs["data"].read_text(),
        "neighbour_denied": denied(lambda: read(payload["neighbour"])),
        "data_dir_listing_denied": denied(lambda: os.listdir(payload["data_dir"])),
        "checkout_denied": denied(lambda: read(payload["checkout_file"])),
        "outside_write_denied": denied(lambda: Path(payload["outside"]).write_text("x")),
        "tcp_denied": denied(lambda: socket.create_connection(("127.0.0.1", payload["port"]), timeout=3)),
        "scratch_write": (out / "note.txt").write_text("ok") == 2,
    }


def child_threads(payload, inputs, out, progress) -> dict:
    """A confined child with several compute threads: torch's pool and a new thread are confined too."""
    import threading

    import torch

    seen: dict = {}

    def probe() -> None:
        try:
            Path(payload["neighbour"]).read_bytes()
            seen["denied"] = False
        except PermissionError:
            seen["denied"] = True

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    a = torch.randn(256, 256)
    return {
        "threads": torch.get_num_threads(),
        "tasks": len(os.listdir("/proc/self/task")),
        "product_ok": bool(torch.allclose(a @ a.T, (a @ a.T).T)),
        "thread_denied": seen["denied"],
    }


def child_arrays(payload, inputs, out, progress) -> dict:
    scores = np.arange(6, dtype=payload["dtype"]).reshape(payload["shape"])
    if payload.get("nan"):
        scores[0, 0] = np.nan
    np.save(out / "scores.npy", scores)
    return {"rows": 2}


def child_estimator_error(payload, inputs, out, progress) -> dict:
    raise NumericalError("the inverse diverged; increase damping", parameter="/method/params/damping")


def child_disk_full(payload, inputs, out, progress) -> dict:
    with open("/dev/full", "wb") as fh:  # every write fails with ENOSPC
        fh.write(b"scores")
    return {}


def child_crash(payload, inputs, out, progress) -> dict:
    os.kill(os.getpid(), signal.SIGSEGV)
    return {}


# --- helpers --------------------------------------------------------------------------------------


class Recorder:
    """A job reporter without a database: records progress; cancelled once ``done`` reaches ``cancel_at``."""

    def __init__(self, cancel_at: int | None = None) -> None:
        self.events: list[tuple[str, int, int]] = []
        self.cancel_at = cancel_at
        self.cancelled = False

    def __call__(self, phase: str, done: int, total: int) -> None:
        self.events.append((phase, done, total))
        self.cancelled = self.cancelled or (self.cancel_at is not None and done >= self.cancel_at)
        self.check()

    def check(self) -> None:
        if self.cancelled:
            raise Cancelled("test")


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(
        data_dir=tmp_path / "ia",
        sandbox_scratch_dir=tmp_path / "scratch",
        torch_threads=1,
        device="cpu",
        sandbox_memory_bytes=3 * 1024**3,
    )


def fresh(settings: Settings) -> sandbox.Sandbox:
    """A child of its own (``acquire`` would also start the next task's child)."""
    return sandbox.Sandbox(sandbox.Limits.from_settings(settings))


def run(settings: Settings, task: str, payload: dict | None = None, reporter=None, inputs=None):
    with fresh(settings) as box:
        out = box.run(f"{HERE}:{task}", payload or {}, inputs or {}, reporter or Recorder())
        return out.meta, box


def problem_of(excinfo) -> ProblemError:
    assert isinstance(excinfo.value, ProblemError), excinfo.value
    return excinfo.value


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as fh:  # a zombie (not yet reaped by its parent) counts as gone
        return fh.read().rsplit(")", 1)[1].split()[0] == "Z"


# --- environment and limits -----------------------------------------------------------------------


def test_child_environment_has_no_credentials_and_its_limits(settings, tmp_path, monkeypatch):
    monkeypatch.setenv("IA_DATABASE_URL", "postgresql+psycopg://user:secret@db/ia")
    monkeypatch.setenv("IA_BROKER_URL", "redis://:secret@broker:6379/0")
    monkeypatch.setenv("IA_API_KEY_PEPPER", "pepper")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    meta, box = run(settings, "child_environment")
    env = meta["env"]
    assert not [k for k in env if k.startswith("IA_")]
    assert not [v for v in env.values() if "secret" in v or "pepper" in v]
    assert set(env) <= {
        "GLIBC_TUNABLES",
        "PATH",
        "HOME",
        "TMPDIR",
        "LANG",
        "PYTHONPATH",
        "PYTHONNOUSERSITE",
        "PYTHONDONTWRITEBYTECODE",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "CUDA_VISIBLE_DEVICES",
        "LD_LIBRARY_PATH",
        "LC_CTYPE",  # Python's C-locale coercion may add it
    }
    assert env["HOME"] == meta["cwd"] == str(box.scratch) and env["OMP_NUM_THREADS"] == "1"
    assert env["GLIBC_TUNABLES"] == sandbox.MALLOC_TUNABLES
    limits = meta["rlimits"]
    assert limits["RLIMIT_CPU"][0] == settings.sandbox_cpu_seconds
    assert limits["RLIMIT_FSIZE"] == [settings.sandbox_max_file_bytes] * 2
    assert limits["RLIMIT_NOFILE"] == [settings.sandbox_max_open_files] * 2
    assert limits["RLIMIT_AS"] == [settings.sandbox_memory_bytes] * 2
    assert limits["RLIMIT_CORE"] == [0, 0]
    # the user's processes and threads when the child started, plus the allowance
    nproc = limits["RLIMIT_NPROC"]
    assert nproc[0] == nproc[1] and 0 < nproc[0] - settings.sandbox_max_processes <= 4 * sandbox.user_tasks(
        os.getuid()
    )
    assert meta["nice"] >= settings.sandbox_nice
    assert meta["no_new_privs"] == 1 and meta["pdeathsig"] == signal.SIGKILL and meta["session_leader"]
    assert not meta["parent_environ_readable"], "the supervisor's environment holds the credentials"
    assert meta["capabilities"] == 0
    assert not box.scratch.exists(), "the scratch folder is removed"


def test_writing_past_the_file_size_limit_is_a_resource_limit(settings):
    settings = settings.model_copy(update={"sandbox_max_file_bytes": 1024 * 1024})
    with pytest.raises(ProblemError) as excinfo:
        run(settings, "child_write", {"bytes": 2 * 1024 * 1024})
    problem = problem_of(excinfo)
    assert problem.code == "resource-limit" and "IA_SANDBOX_MAX_FILE_BYTES" in problem.detail


def test_allocating_past_the_memory_limit_is_a_resource_limit(settings):
    with pytest.raises(ProblemError) as excinfo:
        run(settings, "child_allocate", {"bytes": 4 * 1024**3})
    problem = problem_of(excinfo)
    assert problem.code == "resource-limit" and "memory" in problem.detail


def test_cpu_time_limit_kills_with_resource_limit(settings):
    settings = settings.model_copy(update={"sandbox_cpu_seconds": 3})  # the imports take some of it
    with pytest.raises(ProblemError) as excinfo:
        run(settings, "child_spin")
    assert problem_of(excinfo).code == "resource-limit" and "CPU" in excinfo.value.detail


def test_wall_clock_timeout_kills_the_whole_process_group(settings, tmp_path):
    # unconfined: the task writes its grandchild's pid outside its scratch folder
    settings = settings.model_copy(update={"sandbox_wall_seconds": 10.0, "sandbox_filesystem": False})
    pid_file = tmp_path / "grandchild.pid"
    started = time.monotonic()
    with pytest.raises(ProblemError) as excinfo:
        run(settings, "child_sleep_with_grandchild", {"pid_file": str(pid_file)})
    assert problem_of(excinfo).code == "timeout"
    assert time.monotonic() - started < 25
    assert gone(int(pid_file.read_text())), "what the child started is killed with it"
    assert list((tmp_path / "scratch").iterdir()) == []


def test_cancel_kills_the_child_at_once(settings, tmp_path):
    settings = settings.model_copy(update={"sandbox_filesystem": False})  # the pid file is outside scratch
    pid_file = tmp_path / "child.pid"
    reporter = Recorder(cancel_at=5)
    with fresh(settings) as box:
        with pytest.raises(Cancelled):
            box.run(f"{HERE}:child_tick", {"pid_file": str(pid_file)}, {}, reporter)
        assert not box.alive()
    assert gone(int(pid_file.read_text()))
    assert reporter.events[0] == ("ticking", 0, 10**6)


@pytest.mark.parametrize("protected", [False, True])
def test_a_protected_supervisor_hides_its_environment_from_a_same_user_child(protected):
    """The non-dumpable flag itself, apart from the capability drop: both processes run with the
    same user and no capabilities (as a Docker worker does), so only the flag can refuse the read."""
    capless = list(sandbox._drop_capabilities())  # () unless this runs as root
    target_code = (
        "import sys\n"
        "from worker import sandbox\n"
        "if sys.argv[1] == '1': sandbox.protect_supervisor()\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    target = subprocess.Popen(
        [*capless, sys.executable, "-c", target_code, "1" if protected else "0"],
        cwd=sandbox.ROOT,
        env={**os.environ, "IA_DATABASE_URL": "postgresql://user:secret@db/ia"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert target.stdout.readline() == b"ready\n"
        read = f"open('/proc/{target.pid}/environ', 'rb').read()"
        reader = subprocess.run([*capless, sys.executable, "-c", read], capture_output=True, timeout=60)
        assert (reader.returncode == 0) is not protected, reader.stderr.decode()[-500:]
    finally:
        target.kill()
        target.wait()


def test_network_is_isolated_when_unshare_is_permitted(settings):
    if not sandbox.network_isolated(sandbox.Limits.from_settings(settings)):
        pytest.skip("this machine does not permit network namespaces")
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=2).close()
    except OSError:
        pytest.skip("nothing listens on 127.0.0.1:6379 here")
    meta, _ = run(settings, "child_connect", {"port": 6379})
    assert meta["connected"] is False, meta


def test_a_confined_child_reads_its_inputs_and_nothing_else(settings, tmp_path):
    if not sandbox.filesystem_confined(sandbox.Limits.from_settings(settings)):
        pytest.skip("Landlock is not available here")
    store = settings.data_dir / "artifacts"
    store.mkdir(parents=True)
    (store / "mine.txt").write_text("my input")
    (store / "another-tenant.txt").write_text("not yours")
    listener = socket.create_server(("127.0.0.1", 0))
    payload = {
        "neighbour": str(store / "another-tenant.txt"),
        "data_dir": str(settings.data_dir),
        "checkout_file": str(Path(sandbox.__file__).resolve().parents[1] / "pyproject.toml"),
        "outside": str(tmp_path / "planted.txt"),
        "port": listener.getsockname()[1],
    }
    isolated_by_landlock_alone = settings.model_copy(update={"sandbox_network": False})
    with listener:
        meta, _ = run(
            isolated_by_landlock_alone, "child_probe_files", payload, inputs={"data": store / "mine.txt"}
        )
    assert meta == {
        "input": "my input",
        "neighbour_denied": True,
        "data_dir_listing_denied": True,
        "checkout_denied": True,
        "outside_write_denied": True,
        "tcp_denied": sandbox.landlock.abi_version() >= 4,
        "scratch_write": True,
    }
    assert not (tmp_path / "planted.txt").exists()


def test_a_confined_child_with_several_threads(settings, tmp_path):
    """torch starts its intra-op threads as soon as it is told to use more than one, so the child sets
    the thread count after confining itself (the README's first command runs with all cores)."""
    if not sandbox.filesystem_confined(sandbox.Limits.from_settings(settings)):
        pytest.skip("Landlock is not available here")
    neighbour = tmp_path / "another-tenant.txt"
    neighbour.write_text("not yours")
    meta, _ = run(
        settings.model_copy(update={"torch_threads": 2}), "child_threads", {"neighbour": str(neighbour)}
    )
    assert meta["threads"] == 2 and meta["product_ok"] and meta["thread_denied"]


def test_errors_map_to_problems(settings):
    from worker import runner

    with pytest.raises(ProblemError) as excinfo:
        run(settings, "child_estimator_error")
    expected = runner._problem_for(
        NumericalError("the inverse diverged; increase damping", parameter="/method/params/damping")
    )
    assert problem_of(excinfo).to_dict() == expected
    with pytest.raises(ProblemError) as excinfo:
        run(settings, "child_crash")
    assert problem_of(excinfo).code == "internal-error" and "SIGSEGV" in excinfo.value.detail
    with pytest.raises(ProblemError) as excinfo:  # unconfined: the task writes to /dev/full
        run(settings.model_copy(update={"sandbox_filesystem": False}), "child_disk_full")
    assert problem_of(excinfo).code == "disk-full" and excinfo.value.status == 507
    parent_side = runner._problem_for(OSError(errno.ENOSPC, "No space left on device"))
    assert parent_side["code"] == "disk-full" and parent_side["status"] == 507


# --- output validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload,code",
    [
        ({"dtype": "float32", "shape": [2, 3]}, None),
        ({"dtype": "float64", "shape": [2, 3], "nan": True}, "numerical-instability"),
        ({"dtype": "float64", "shape": [3, 2]}, "invalid-output"),
        ({"dtype": "int64", "shape": [2, 3]}, "invalid-output"),
    ],
)
def test_outputs_are_validated(settings, payload, code):
    with fresh(settings) as box:
        out = box.run(f"{HERE}:child_arrays", payload, {}, Recorder())
        if code is None:
            np.testing.assert_array_equal(out.array("scores", (2, 3)), np.arange(6).reshape(2, 3))
            return
        with pytest.raises(ProblemError) as excinfo:
            out.array("scores", (2, 3), "/method/params/damping")
    problem = problem_of(excinfo)
    assert problem.code == code
    if code == "numerical-instability":
        assert problem.status == 422 and problem.errors[0].pointer == "/method/params/damping"


def test_links_and_bad_json_are_refused(tmp_path):
    target = tmp_path / "target.npy"
    np.save(target, np.zeros(3))
    (tmp_path / "link.npy").symlink_to(target)
    with pytest.raises(ProblemError, match="not readable|not a regular"):
        sandbox.read_array(tmp_path / "link.npy", (3,), max_bytes=10**6, what="link")
    with pytest.raises(ProblemError) as excinfo:
        sandbox.loads_plain('{"loss": NaN}', "meta.json")
    assert excinfo.value.code == "invalid-output"
    lying = tmp_path / "lying.npy"
    lying.write_bytes(target.read_bytes()[:-8])  # header says 3 values, the file holds 2
    with pytest.raises(ProblemError, match="size does not match"):
        sandbox.read_array(lying, (3,), max_bytes=10**6, what="lying")


def test_child_problem_passes_nothing_through_unchecked():
    limits = sandbox.Limits.from_settings(Settings())
    report = {"kind": "estimator", "code": "<script>", "detail": "x" * 10_000, "parameter": "not a pointer"}
    problem = sandbox.child_problem(report, limits)
    assert problem.code == "estimator-error" and len(problem.detail) == 2000 and problem.errors == []
    assert sandbox.child_problem({"kind": "disk-full"}, limits).status == 507
    assert sandbox.child_problem("garbage", limits).code == "internal-error"


# --- the real compute tasks -----------------------------------------------------------------------


def _linear_problem_files(tmp_path: Path) -> tuple[dict, dict, dict]:
    """A linear classifier's weights and a small dataset as the worker stores them, plus the payload."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    y = rng.integers(0, 3, size=40)
    np.savez(tmp_path / "train.npz", X=x, y=y)
    model = init_model("linear", {"in_features": 5, "num_classes": 3}, seed=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    inputs = {"weights": tmp_path / "w.safetensors", "train": tmp_path / "train.npz"}
    inputs["query"] = inputs["train"]
    payload = {
        "model": {
            "architecture": "linear",
            "architecture_params": {"in_features": 5, "num_classes": 3},
            "seed": 0,
            "task": "classification",
            "loss": "cross_entropy",
        },
        "recipe": {},
        "weight_decay": 0.01,
        "measurement": "loss",
        "checkpoints": [],
        "query_rows": [0, 1, 2],
        "method": {"name": "if_exact", "params": {"damping": 0.001}},
        "runtime": {"device": "cpu", "chunk_size": 16, "memory_budget_bytes": 2**30},
        "self_influence": True,
        "fit_state": True,
        "sharding": {"subsets_per_shard": None, "train_shard_size": None, "by_checkpoint": False},
    }
    return payload, inputs, {"x": x, "y": y, "model": model}


def test_influence_task_matches_the_estimator_in_process(settings, tmp_path):
    payload, inputs, data = _linear_problem_files(tmp_path)
    reporter = Recorder()
    with fresh(settings) as box:
        out = box.run("worker.compute:influence", payload, inputs, reporter)
        scores = out.array("scores", (3, 40))
        self_influence = out.array("self_influence", (40,))
        tensors, metadata = out.tensors("state")
        assert out.mapping("state")["fit_seconds"] >= 0 and json.loads(metadata["info"]) is not None
    from app.estimators import InfluenceProblem

    x, y = torch.as_tensor(data["x"]), torch.as_tensor(data["y"])
    problem = InfluenceProblem(
        model=data["model"],
        task=TaskSpec(),
        weights=data["model"].state_dict(),
        train_x=x,
        train_y=y,
        query_x=x[:3],
        query_y=y[:3],
        weight_decay=0.01,
        recipe={},
    )
    estimator = get_estimator("if_exact")
    params = estimator.Params(damping=0.001)
    expected = estimator.attribute(problem, params, want_self_influence=True, runtime=Runtime(chunk_size=16))
    np.testing.assert_allclose(scores, expected.scores, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(self_influence, expected.self_influence, rtol=1e-5, atol=1e-7)
    assert reporter.events and reporter.events[0] == ("loading", 0, 1)


def test_training_task_returns_weights_that_fit_the_architecture(settings, tmp_path):
    from app.db.models import Model
    from worker import runner

    payload, inputs, _ = _linear_problem_files(tmp_path)
    recipe = {"optimizer": "sgd", "learning_rate": 0.1, "epochs": 2, "batch_size": 16, "num_checkpoints": 2}
    row = Model(
        architecture="linear",
        architecture_params=payload["model"]["architecture_params"],
        recipe=recipe,
        task="classification",
        loss="cross_entropy",
    )
    with fresh(settings) as box:
        out = box.run(
            "worker.compute:training",
            {"model": payload["model"], "recipe": recipe, "device": "cpu"},
            {"train": inputs["train"]},
            Recorder(),
        )
        expected = runner._expected_state(row)
        weights = runner._trained_state(out, "weights", expected)
        assert {k: v.shape for k, v in weights.items()} == expected and len(out.meta["checkpoints"]) == 2


# --- lifecycle ------------------------------------------------------------------------------------


def test_prestarted_child_is_reused_and_stale_scratch_is_swept(settings, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / "scratch" / f"{sandbox.SCRATCH_PREFIX}{dead.pid}-old"
    stale.mkdir(parents=True)
    sandbox.prestart(settings)
    try:
        warm = sandbox._warm
        assert warm is not None and not stale.exists()
        with sandbox.acquire(settings) as box:
            assert box is warm
            following = sandbox._warm  # the next task's child starts while this one computes
            assert following is not None and following is not box and following.alive()
            box.run(f"{HERE}:child_arrays", {"dtype": "float32", "shape": [2, 3]}, {}, Recorder())
        with sandbox.acquire(settings) as box:
            assert box is following
            box.run(f"{HERE}:child_arrays", {"dtype": "float32", "shape": [2, 3]}, {}, Recorder())
    finally:
        sandbox.discard()
    assert list((tmp_path / "scratch").iterdir()) == []


def test_a_dead_prestarted_child_is_replaced(settings):
    sandbox.prestart(settings)
    try:
        sandbox._warm.kill()
        with sandbox.acquire(settings) as box:
            assert box.alive()
            assert box.run(f"{HERE}:child_arrays", {"dtype": "float32", "shape": [2, 3]}, {}, Recorder()).meta
    finally:
        sandbox.discard()


def test_the_task_process_never_loads_tenant_tensors():
    """Split trust (README "Sandboxed compute"): worker/runner.py, which holds the credentials, never
    builds a model, reads weights or features, or runs an estimator; its children do (worker/compute.py).
    A call added there that does any of it fails here, the merge of fanned-out jobs included."""
    import ast

    import worker.runner

    tree = ast.parse(Path(worker.runner.__file__).read_text())
    forbidden = {
        "attribute",
        "attribute_with_outputs",
        "estimate",
        "group_scores",
        "fit",
        "build_model",  # (init_model on the meta device, for expected shapes, allocates nothing)
        "load_state",
        "load_arrays",
        "load_state_dict",
        "load_file",
        "InfluenceProblem",
    }
    called = {
        node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
    }
    assert called & forbidden == set()
    assert "plan" in called and "merge_shards" in called  # what the merge does here: sizes and arrays


@pytest.mark.parametrize("name", ["allow_pickle", "file", "info", "masks"])
def test_a_shard_cannot_name_its_measurements_after_the_merge_keys(settings, tmp_path, name):
    """np.savez takes ``file`` and ``allow_pickle`` as its own arguments and the merged npz keeps
    ``info``, ``masks`` and ``seeds``: such a name is an invalid output, not a merge that fails later."""
    from app.storage.artifacts import ArtifactStore
    from worker.runner import _store_subsets

    (tmp_path / "meta.json").write_text(json.dumps({"subsets": [name, "loss"], "info": {}}))
    for stored in (name, "loss"):
        np.save(tmp_path / f"subset.{stored}.npy", np.zeros((2, 3)))
    out = sandbox.Outputs(tmp_path, sandbox.Limits.from_settings(settings))
    with pytest.raises(ProblemError) as excinfo:
        _store_subsets(ArtifactStore(tmp_path / "artifacts"), out, 2)
    assert excinfo.value.code == "invalid-output" and name in str(excinfo.value)
