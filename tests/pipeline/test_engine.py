"""The engine on toy stages: keys, caching, resume, locks, publish, verify."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import toy_stages

from pipeline.cache import ArtifactStore
from pipeline.config import load_config
from pipeline.errors import ConfigError, InputError, LockBusy
from pipeline.executor import LocalExecutor
from pipeline.io import sha256_file
from pipeline.registry import Registry
from pipeline.runner import Pipeline
from pipeline.stage import RunEnv
from pipeline.verify import verify_store

HERE = Path(__file__).resolve().parent  # this module, for subprocesses that import it
TESTS_DIR = HERE.parent  # tests/: toy_stages.py


def make_pipe(work: Path, *sets: str, workers: int = 1) -> Pipeline:
    reg = Registry(toy_stages.STAGES)
    cfg = load_config(reg, sets=list(sets))
    env = RunEnv(work_dir=work, dataset="toy")
    return Pipeline(reg, cfg, env, LocalExecutor(workers), progress=False)


def log_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def artifact_bytes(pipe: Pipeline, stage: str) -> dict[str, str]:
    d = pipe.artifact_dir(stage)
    return {p.relative_to(d).as_posix(): sha256_file(p) for p in sorted(d.rglob("*.parquet"))}


def test_keys_follow_output_affecting_params_only(tmp_path):
    base = make_pipe(tmp_path)
    assert make_pipe(tmp_path).resolve("numbers").key == base.resolve("numbers").key
    assert make_pipe(tmp_path, "numbers.n=21").resolve("numbers").key != base.resolve("numbers").key
    # a runtime field changes neither this stage's key nor downstream keys
    runtime = make_pipe(tmp_path, "numbers.workers=4")
    assert runtime.resolve("numbers").key == base.resolve("numbers").key
    assert runtime.resolve("squares").key == base.resolve("squares").key
    # an upstream param change propagates to downstream keys; a downstream one does not go up
    up = make_pipe(tmp_path, "numbers.offset=3")
    assert up.resolve("squares").key != base.resolve("squares").key
    down = make_pipe(tmp_path, "squares.power=3")
    assert down.resolve("numbers").key == base.resolve("numbers").key
    assert down.resolve("squares").key != base.resolve("squares").key


def test_version_bump_changes_key(tmp_path, monkeypatch):
    before = make_pipe(tmp_path).resolve("numbers").key
    monkeypatch.setattr(toy_stages.Numbers, "version", "2")
    assert make_pipe(tmp_path).resolve("numbers").key != before


def test_run_publishes_complete_artifact_and_rerun_does_no_work(tmp_path, toy_log):
    pipe = make_pipe(tmp_path)
    plan = pipe.run("squares")
    assert [(i.name, i.state) for i in plan] == [("numbers", "missing"), ("squares", "missing")]
    d = pipe.artifact_dir("numbers")
    assert (d / "_SUCCESS").is_file()
    assert sorted(p.name for p in (d / "numbers").iterdir()) == [
        f"part-{i:05d}.parquet" for i in range(4)
    ]
    values = pq.read_table(d / "numbers").column("value").to_pylist()
    assert sorted(values) == list(range(20))
    squares = pq.read_table(pipe.artifact_dir("squares") / "squares").column("value").to_pylist()
    assert squares == [v * v for v in range(20)]
    manifest = json.loads((d / "_manifest.json").read_text())
    for rel, info in manifest["files"].items():
        assert sha256_file(d / rel) == info["sha256"]
        assert pq.ParquetFile(d / rel).metadata.num_rows == info["rows"]
    assert manifest["tables"] == {"numbers": 20}
    assert manifest["stats"]["total"] == 20
    assert manifest["key_params"] == {"n": 20, "per_shard": 5, "offset": 0, "bad_input": False}
    assert manifest["upstream"] == {}
    assert json.loads((pipe.artifact_dir("squares") / "_manifest.json").read_text())[
        "upstream"] == {"numbers": pipe.resolve("numbers").key}
    # no temp dirs or locks left as directories
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".tmp-")]
    calls = len(log_lines(toy_log))
    assert calls == 5  # 4 shards + squares

    again = make_pipe(tmp_path)
    plan = again.run("squares")
    assert all(i.state == "cached" for i in plan)
    assert len(log_lines(toy_log)) == calls


def test_changed_param_reruns_only_downstream_of_it(tmp_path, toy_log):
    make_pipe(tmp_path).run("squares")
    n_before = len(log_lines(toy_log))
    plan = make_pipe(tmp_path, "squares.power=3").plan("squares")
    assert [(i.name, i.state) for i in plan] == [("numbers", "cached"), ("squares", "stale")]
    make_pipe(tmp_path, "squares.power=3").run("squares")
    assert log_lines(toy_log)[n_before:] == ["squares"]


def test_resume_after_crash_recomputes_only_unfinished_shards(tmp_path, toy_log, monkeypatch):
    clean = make_pipe(tmp_path / "clean")
    clean.run("numbers")
    toy_log.unlink()

    monkeypatch.setenv("TOY_FAIL_AT", "2")
    pipe = make_pipe(tmp_path / "crash")
    with pytest.raises(RuntimeError, match="simulated crash"):
        pipe.run("numbers")
    assert not pipe.store.is_published("toy", "numbers", pipe.resolve("numbers").key)
    assert log_lines(toy_log) == ["numbers 0", "numbers 1", "numbers 2"]

    monkeypatch.delenv("TOY_FAIL_AT")
    make_pipe(tmp_path / "crash").run("numbers")
    assert log_lines(toy_log)[3:] == ["numbers 2", "numbers 3"]
    m = json.loads((pipe.artifact_dir("numbers") / "_manifest.json").read_text())
    assert m["stats"]["shards_resumed"] == 2
    assert artifact_bytes(pipe, "numbers") == artifact_bytes(clean, "numbers")


def test_sigkill_mid_run_resumes_byte_identical(tmp_path, toy_log):
    clean = make_pipe(tmp_path / "clean")
    clean.run("numbers")
    script = textwrap.dedent(f"""
        import sys; sys.path[:0] = [{str(HERE)!r}, {str(TESTS_DIR)!r}]
        from test_engine import make_pipe
        from pathlib import Path
        make_pipe(Path({str(tmp_path / "killed")!r})).run("numbers")
    """)
    env = {**os.environ, "NEMO_PIPE_TEST_KILL_AFTER_SHARDS": "3"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    killed = make_pipe(tmp_path / "killed")
    key = killed.resolve("numbers").key
    assert not killed.store.is_published("toy", "numbers", key)
    assert len(list((killed.store.tmp_dir("toy", "numbers", key) / "_shards").iterdir())) == 3

    toy_log.unlink()
    killed.run("numbers")
    assert log_lines(toy_log) == ["numbers 3"]
    assert artifact_bytes(killed, "numbers") == artifact_bytes(clean, "numbers")


def test_process_pool_gives_same_bytes(tmp_path):
    seq = make_pipe(tmp_path / "seq")
    seq.run("numbers")
    pool = make_pipe(tmp_path / "pool", workers=2)
    pool.run("numbers")
    assert artifact_bytes(pool, "numbers") == artifact_bytes(seq, "numbers")


def test_a_failed_shard_in_a_pool_drops_the_queued_ones(tmp_path, toy_log, monkeypatch):
    """Shard 0 fails at once; leaving the pool waited for all 19 queued shards to run, whose
    results were then thrown away (hours, on a real stage). Only those already handed to a
    worker (2 running, a few in the call queue) may still finish."""
    monkeypatch.setenv("TOY_FAIL_AT", "0")
    monkeypatch.setenv("TOY_SHARD_SECONDS", "0.3")
    pipe = make_pipe(tmp_path, "numbers.per_shard=1", workers=2)
    with pytest.raises(RuntimeError, match="simulated crash in shard 0"):
        pipe.run("numbers")
    ran = [x for x in log_lines(toy_log) if x.startswith("numbers ")]
    assert len(ran) <= 8, ran


def test_input_error_publishes_nothing_and_leaves_no_tmp(tmp_path):
    pipe = make_pipe(tmp_path, "numbers.bad_input=true")
    with pytest.raises(InputError, match="toy input is bad"):
        pipe.run("numbers")
    stage_dir = tmp_path / "toy" / "numbers"
    assert not [p for p in stage_dir.iterdir() if not p.name.endswith(".lock")]


def test_lock_busy_without_wait(tmp_path):
    pipe = make_pipe(tmp_path)
    key = pipe.resolve("numbers").key
    with pipe.store.lock("toy", "numbers", key), pytest.raises(LockBusy, match="another"):
        make_pipe(tmp_path).run("numbers", wait=False)
    make_pipe(tmp_path).run("numbers", wait=False)  # free again


def test_concurrent_runs_one_waits_and_artifact_is_correct(tmp_path, toy_log):
    script = textwrap.dedent(f"""
        import sys; sys.path[:0] = [{str(HERE)!r}, {str(TESTS_DIR)!r}]
        from test_engine import make_pipe
        from pathlib import Path
        make_pipe(Path({str(tmp_path)!r}), "numbers.n=200", "numbers.per_shard=2").run("numbers")
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
             for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    pipe = make_pipe(tmp_path, "numbers.n=200", "numbers.per_shard=2")
    values = pq.read_table(pipe.artifact_dir("numbers") / "numbers").column("value").to_pylist()
    assert values == list(range(200))
    # the second run found the artifact published once it got the lock: each shard ran once
    assert sorted(log_lines(toy_log)) == sorted(f"numbers {i}" for i in range(100))
    checked, problems = verify_store(ArtifactStore(tmp_path))
    assert checked == 1 and problems == []


def test_force_rebuilds_target_only(tmp_path, toy_log):
    make_pipe(tmp_path).run("squares")
    n = len(log_lines(toy_log))
    plan = make_pipe(tmp_path).run("squares", force=True)
    assert [(i.name, i.state) for i in plan] == [("numbers", "cached"), ("squares", "forced")]
    assert log_lines(toy_log)[n:] == ["squares"]


def test_verify_names_corrupted_and_missing_files(tmp_path):
    pipe = make_pipe(tmp_path)
    pipe.run("numbers")
    d = pipe.artifact_dir("numbers")
    assert verify_store(ArtifactStore(tmp_path)) == (1, [])
    part = d / "numbers" / "part-00001.parquet"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    (d / "numbers" / "part-00002.parquet").unlink()
    _, problems = verify_store(ArtifactStore(tmp_path))
    described = {(p.file, p.what) for p in problems}
    assert ("numbers/part-00001.parquet", "checksum differs from the manifest") in described
    assert ("numbers/part-00002.parquet", "missing") in described


def test_status_states(tmp_path):
    make_pipe(tmp_path).run("numbers")
    rows = {r.name: r for r in make_pipe(tmp_path).status()}
    assert rows["numbers"].state == "done" and rows["numbers"].rows == 20
    assert rows["squares"].state == "missing"
    rows = {r.name: r for r in make_pipe(tmp_path, "numbers.n=3").status()}
    assert rows["numbers"].state == "stale"


def test_registry_order_and_cycle():
    reg = Registry(toy_stages.STAGES)
    assert reg.upstream_order("squares") == ["numbers", "squares"]

    class A(toy_stages.Numbers):
        name, inputs = "a", ("b",)

    class B(toy_stages.Numbers):
        name, inputs = "b", ("a",)

    with pytest.raises(ValueError, match="cycle: a -> b -> a"):
        Registry([A, B]).upstream_order("a")


def test_config_errors_name_the_key(tmp_path):
    reg = Registry(toy_stages.STAGES)
    with pytest.raises(ConfigError, match="unknown config key 'numbers.nn'"):
        load_config(reg, sets=["numbers.nn=3"])
    with pytest.raises(ConfigError, match=r"numbers\.n: must be an integer >= 0 \(got lots\)"):
        load_config(reg, sets=["numbers.n=lots"])
    with pytest.raises(ConfigError, match="unknown config section 'numbrs'"):
        load_config(reg, sets=["numbrs.n=3"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(reg, sets=["numbers.n"])
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("numbers:\n  n: 7\nsquares:\n  power: 3\n")
    cfg = load_config(reg, cfg_file, sets=["numbers.n=9"])
    assert cfg.params_for("numbers").n == 9  # --set wins over the file
    assert cfg.params_for("squares").power == 3
    cfg_file.write_text("numbers: [1, 2]\n")
    with pytest.raises(ConfigError, match="section 'numbers' must be a mapping"):
        load_config(reg, cfg_file)
    cfg_file.write_text("numbers: {n: 1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(reg, cfg_file)


def test_dask_executor_output_equals_local(tmp_path, monkeypatch):
    from pipeline.executor import DaskExecutor

    # spawned dask workers import the toy stages from the tests dir
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS_DIR),
                                                      os.environ.get("PYTHONPATH", "")]))
    local = make_pipe(tmp_path / "local")
    local.run("numbers")
    distributed = make_pipe(tmp_path / "dask")
    distributed.executor = DaskExecutor(workers=2)
    distributed.run("numbers")
    assert artifact_bytes(distributed, "numbers") == artifact_bytes(local, "numbers")
    manifest = json.loads((distributed.artifact_dir("numbers") / "_manifest.json").read_text())
    assert manifest["executor"] == "dask"


@pytest.mark.parametrize("address", ["not an address", "tcp://head"])
def test_a_malformed_scheduler_address_is_refused_before_any_work(address):
    from pipeline.executor import make_executor

    with pytest.raises(ConfigError, match="not a dask scheduler address.*tcp://HOST:PORT"):
        make_executor("dask", scheduler=address)
    with pytest.raises(ConfigError, match="only with --executor dask"):
        make_executor("local", scheduler="tcp://head:8786")


def test_an_unreachable_scheduler_is_an_error_and_publishes_nothing(tmp_path):
    """It was a traceback (OSError after the connect timeout), exit 1, temp dir left."""
    import dask

    from pipeline.executor import make_executor

    pipe = make_pipe(tmp_path)
    pipe.executor = make_executor("dask", scheduler="tcp://127.0.0.1:1")  # nothing listens
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}), \
            pytest.raises(ConfigError, match="127.0.0.1:1: cannot connect.*omit --scheduler"):
        pipe.run("numbers")
    assert not [p for p in (tmp_path / "toy" / "numbers").iterdir()
                if not p.name.endswith(".lock")]


def test_disk_full_mid_write_is_a_clear_error_and_resumes(tmp_path, toy_log, monkeypatch):
    import errno

    import pipeline.shards as shards_module
    from pipeline.errors import StorageError

    real = shards_module.write_parquet
    calls = {"n": 0}

    def flaky(table, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(table, path, *args, **kwargs)

    monkeypatch.setattr(shards_module, "write_parquet", flaky)
    pipe = make_pipe(tmp_path)
    with pytest.raises(StorageError, match="No space left on device.*rerun"):
        pipe.run("numbers")
    key = pipe.resolve("numbers").key
    assert not pipe.store.is_published("toy", "numbers", key)
    assert len(list((pipe.store.tmp_dir("toy", "numbers", key) / "_shards").iterdir())) == 2
    monkeypatch.setattr(shards_module, "write_parquet", real)
    make_pipe(tmp_path).run("numbers")
    assert pipe.store.is_published("toy", "numbers", key)
    assert log_lines(toy_log) == ["numbers 0", "numbers 1", "numbers 2", "numbers 2",
                                  "numbers 3"]


def test_permission_error_on_publish_is_a_clear_error(tmp_path, monkeypatch):
    import errno

    from pipeline.cache import ArtifactStore as Store
    from pipeline.errors import StorageError

    def denied(self, tmp, final):
        raise PermissionError(errno.EACCES, "Permission denied", str(final))

    monkeypatch.setattr(Store, "publish", denied)
    pipe = make_pipe(tmp_path)
    with pytest.raises(StorageError, match="Permission denied"):
        pipe.run("numbers")
    assert not pipe.store.is_published("toy", "numbers", pipe.resolve("numbers").key)
