"""`srcr sweep --executor ray` on a real local Ray cluster, and the content-addressed stage cache.

The Ray sweeps run `srcr sweep` as a user would, in a child process whose Ray cluster (this machine's two
cores: two worker processes) starts with the sweep and ends with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from srcr.exporter.cli import app
from srcr.exporter.manifest import read_manifest

pytest.importorskip("ray")

SRCR = Path(sys.executable).with_name("srcr")
PROMPTS = str(Path(__file__).parent / "data" / "prompts_small.jsonl")
SWEEP = ["sweep", "--sparsity", "0,0.5", "--bits", "4,8", "--method", "wanda", "--calib-samples", "4",
         "--seq-len", "64", "--eval-windows", "2", "--last-word-items", "5", "--new-tokens", "4",
         "--no-builtin-prompts", "--prompts", PROMPTS]  # fmt: skip
TEMP_PID = re.compile(r"^\..+\.srcr-[0-9a-f]{8}-(?P<pid>\d+)-\d+-[0-9a-f]{8}\.partial$")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def artifacts(folder: Path) -> dict[str, str]:
    return {path.name: sha256(path) for path in sorted(folder.glob("*.gguf"))}


def assert_same_items(local: Path, other: Path) -> None:
    """Every configuration's per-item scores equal the local executor's (the embedder's cosines to float32
    rounding)."""
    names = sorted(path.name for path in local.glob("*.manifest.json"))
    assert names == sorted(path.name for path in other.glob("*.manifest.json")) and len(names) == 4
    for name in names:
        a = read_manifest(local / name).evaluation.items.model_dump()
        b = read_manifest(other / name).evaluation.items.model_dump()
        assert a.keys() == b.keys()
        for key in a:
            if key == "similarity":
                assert a[key] == pytest.approx(b[key], abs=1e-6), (name, key)
            else:
                assert a[key] == b[key], (name, key)


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory, tiny_llama_dir):
    out = tmp_path_factory.mktemp("local") / "sweep"
    result = CliRunner().invoke(app, [*SWEEP, "--model", str(tiny_llama_dir), "--out", str(out), "--no-cache"])
    assert result.exit_code == 0, result.output
    return out


def start_sweep(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [str(SRCR), *SWEEP, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})},
        start_new_session=True,
    )


def wait_for_worker_file(folder: Path, driver: subprocess.Popen, timeout: float = 240) -> int:
    """The pid of a Ray worker writing into the sweep folder (its temporary file's name carries it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert driver.poll() is None, driver.communicate()[0]
        for path in folder.glob(".*.partial") if folder.is_dir() else []:
            match = TEMP_PID.match(path.name)
            if match and int(match["pid"]) != driver.pid:
                return int(match["pid"])
        time.sleep(0.05)
    raise AssertionError("no Ray worker wrote into the sweep folder")


def test_a_ray_sweep_survives_a_killed_worker_and_matches_the_local_sweep(tmp_path, tiny_llama_dir, local_sweep):
    out = tmp_path / "sweep"
    # One CPU a task, as the in-process local sweep's one torch thread: both settings run at once.
    driver = start_sweep("--model", tiny_llama_dir, "--out", out, "--executor", "ray", "--task-cpus", "1", "--no-cache")
    worker = wait_for_worker_file(out, driver)
    os.kill(worker, signal.SIGKILL)  # in the middle of its task: Ray retries the task on another worker
    output, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, output
    assert artifacts(out) == artifacts(local_sweep)  # nothing lost, nothing different
    assert not [path for path in out.iterdir() if path.name.startswith(".") and TEMP_PID.match(path.name)]
    index = json.loads((out / "index.json").read_text())
    assert sorted(index["configurations"]) == sorted(name.removesuffix(".gguf") for name in artifacts(out))
    assert_same_items(local_sweep, out)


def test_ctrl_c_stops_the_clusters_tasks_and_keeps_what_finished(tmp_path, tiny_llama_dir, local_sweep):
    out = tmp_path / "sweep"
    driver = start_sweep("--model", tiny_llama_dir, "--out", out, "--executor", "ray", "--no-cache")
    worker = wait_for_worker_file(out, driver)
    os.kill(driver.pid, signal.SIGINT)  # the driver alone: it must stop the tasks itself
    output, _ = driver.communicate(timeout=120)
    assert driver.returncode == 130, output
    assert "interrupted:" in output and "rerun the same command to resume" in output
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _alive(worker):
        time.sleep(0.2)
    assert not _alive(worker), "a Ray worker kept running after Ctrl-C"
    finished = {path.name for path in out.glob("*.gguf")}
    for name in finished:  # what finished is whole
        assert sha256(out / name) == artifacts(local_sweep)[name]
    result = CliRunner().invoke(app, [*SWEEP, "--model", str(tiny_llama_dir), "--out", str(out), "--no-cache"])
    assert result.exit_code == 0, result.output  # and the local executor resumes it
    assert artifacts(out) == artifacts(local_sweep)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.is_file() and status.read_text().split()[2] == "Z")


def test_the_stage_cache_refills_a_new_sweep_folder_without_work(tmp_path, tiny_llama_dir, local_sweep, monkeypatch):
    import srcr.exporter.sweep as sweep_module

    cache = tmp_path / "cache"
    first = CliRunner().invoke(
        app, [*SWEEP, "--model", str(tiny_llama_dir), "--out", str(tmp_path / "a"), "--cache-dir", str(cache)]
    )
    assert first.exit_code == 0, first.output
    assert len(list((cache / "artifact").iterdir())) == 4 and len(list((cache / "reference").iterdir())) == 1

    def no_work(*args, **kwargs):
        raise AssertionError("a cached stage ran again")

    monkeypatch.setattr(sweep_module, "prune_stage", no_work)
    monkeypatch.setattr(sweep_module, "reference_stage", no_work)
    again = CliRunner().invoke(
        app, [*SWEEP, "--model", str(tiny_llama_dir), "--out", str(tmp_path / "b"), "--cache-dir", str(cache)]
    )
    assert again.exit_code == 0, again.output
    assert artifacts(tmp_path / "b") == artifacts(tmp_path / "a") == artifacts(local_sweep)
    assert sha256(tmp_path / "b" / "reference.npz") == sha256(tmp_path / "a" / "reference.npz")

    # A damaged entry is not reused: that configuration is exported again, from the cached pruning pass (its
    # pruned weights, importance matrix and report), into the very bytes of a sweep that pruned it; the rest
    # still come from the cache.
    monkeypatch.undo()
    entry = next(path for path in (cache / "artifact").iterdir() if any(path.glob("*wanda-s50-q8-0.gguf")))
    damaged = next(entry.glob("*.gguf"))
    os.unlink(damaged)  # an entry's file is a link to the sweep's: replace it, never write through it
    damaged.write_bytes(b"GGUF" + os.urandom(64))
    prunings = []
    real_prune_stage = sweep_module.prune_stage
    monkeypatch.setattr(sweep_module, "prune_stage", lambda *a, **k: prunings.append(1) or real_prune_stage(*a, **k))
    third = CliRunner().invoke(
        app, [*SWEEP, "--model", str(tiny_llama_dir), "--out", str(tmp_path / "c"), "--cache-dir", str(cache)]
    )
    assert third.exit_code == 0, third.output
    assert prunings == [] and artifacts(tmp_path / "c") == artifacts(local_sweep)
    assert len(list((cache / "pruned").iterdir())) == 2  # the statistics pass and the 50% pass


def test_no_cache_leaves_the_cache_alone(tmp_path, tiny_llama_dir):
    cache = Path(os.environ["SRCR_STAGE_CACHE"])
    result = CliRunner().invoke(
        app, [*SWEEP, "--bits", "8", "--sparsity", "0", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "s"),
              "--no-cache"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert not cache.exists()


def test_without_ray_the_executor_names_the_extra(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails as where it is not installed
    result = CliRunner().invoke(
        app, [*SWEEP, "--model", str(tiny_llama_dir), "--out", str(tmp_path / "s"), "--executor", "ray"]
    )
    assert result.exit_code == 2 and "pip install 'srcr[ray]'" in result.output
    assert not (tmp_path / "s").exists()
    bad = CliRunner().invoke(app, [*SWEEP, "--out", str(tmp_path / "s"), "--executor", "dask"])
    assert bad.exit_code == 2 and "local or ray" in bad.output


def _cluster(*nodes: dict) -> object:
    from types import SimpleNamespace

    return SimpleNamespace(nodes=lambda: [{"Alive": True, "Resources": node} for node in nodes])


def test_a_task_no_node_can_hold_is_refused_instead_of_waiting_for_ever():
    from srcr.base.errors import SrcrError
    from srcr.exporter.distributed import GIB, _check_feasible

    small, gpu = {"CPU": 2.0, "memory": 8.0 * GIB}, {"CPU": 16.0, "GPU": 1.0, "memory": 64.0 * GIB}
    _check_feasible(_cluster(small, gpu), {"num_cpus": 8, "num_gpus": 1, "memory": 20 * GIB})  # the GPU node
    with pytest.raises(SrcrError, match=r"asks for 32 CPUs .* largest node has 16; use --task-cpus 16 or fewer"):
        _check_feasible(_cluster(small, gpu), {"num_cpus": 32, "num_gpus": 0, "memory": GIB})
    with pytest.raises(SrcrError, match=r"1 GPUs .* has 0; use --device cpu"):
        _check_feasible(_cluster(small), {"num_cpus": 1, "num_gpus": 1, "memory": GIB})
    with pytest.raises(SrcrError, match=r"no node of the Ray cluster has 8 CPUs, 0 GPUs, 32 GiB of memory at once"):
        _check_feasible(_cluster({"CPU": 8.0, "memory": 8.0 * GIB}, {"CPU": 2.0, "memory": 64.0 * GIB}),
                        {"num_cpus": 8, "num_gpus": 0, "memory": 32 * GIB})  # fmt: skip
