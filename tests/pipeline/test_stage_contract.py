"""The stage author's contract (pipeline.stage) and the engine's one hook into the stages.

Typed params (`Stage[P]`), params handed to every shard by the engine, optional libraries
checked before any work, and an engine that names no stage module: the CLI mounts the stages'
commands and declares the common options once.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import toy_stages
import typer

from pipeline.config import load_config
from pipeline.errors import MissingLibrary
from pipeline.executor import LocalExecutor
from pipeline.registry import Registry, dataset_spec, load_commands
from pipeline.runner import Pipeline
from pipeline.stage import Params, RunEnv, Stage, StageContext

REPO = Path(__file__).resolve().parents[2]
MISSING = "nemo_pipe_test_no_such_module"
COMMON = {"--dataset", "--data-root", "--images", "--work-dir", "--config", "--set"}


class NeedsParams(Params):
    use_it: bool = True


class NeedsLib(Stage[NeedsParams]):
    """Reads numbers, and needs a library nobody has when `use_it` is set."""

    name = "needs_lib"
    version = "1"
    inputs = ("numbers",)
    tables = ("copy",)

    def required_libraries(self, params: NeedsParams) -> dict[str, str]:
        return {MISSING: "nosuch"} if params.use_it else {}

    def run(self, ctx: StageContext[NeedsParams]) -> None:
        ctx.write_table("copy", ctx.read_table("numbers", "numbers"))


class AlwaysNeeds(NeedsLib):
    """The static form: a class attribute, whatever the params."""

    name = "always_needs"
    requires = {MISSING: "other"}

    def required_libraries(self, params: NeedsParams) -> dict[str, str]:
        return dict(self.requires)


def make_pipe(work: Path, *sets: str, workers: int = 1) -> Pipeline:
    reg = Registry([*toy_stages.STAGES, NeedsLib, AlwaysNeeds])
    return Pipeline(reg, load_config(reg, sets=list(sets)), RunEnv(work_dir=work, dataset="toy"),
                    LocalExecutor(workers), progress=False)


def test_type_argument_is_the_params_model():
    assert toy_stages.Numbers.params_model is toy_stages.NumbersParams
    assert NeedsLib.params_model is NeedsParams
    assert AlwaysNeeds.params_model is NeedsParams  # inherited from the generic base

    class Plain(Stage):  # no type argument: the base Params, as before
        name, version = "plain", "1"

        def run(self, ctx: StageContext) -> None: ...

    assert Plain.params_model is Params
    with pytest.raises(TypeError, match="differs from the type argument"):
        class Clash(Stage[NeedsParams]):
            name, version = "clash", "1"
            params_model = toy_stages.SquaresParams

            def run(self, ctx: StageContext[NeedsParams]) -> None: ...


@pytest.mark.parametrize("workers", [1, 2])
def test_every_shard_gets_the_stage_params(tmp_path, workers):
    """The toy shards read `offset` from `writer.params`, not from their payload: in this
    process and in spawned ones the values are offset .. offset + n - 1."""
    pipe = make_pipe(tmp_path, "numbers.offset=3", "numbers.n=12", "numbers.per_shard=4",
                     workers=workers)
    pipe.run("numbers")
    values = pq.read_table(pipe.artifact_dir("numbers") / "numbers").column("value").to_pylist()
    assert sorted(values) == list(range(3, 15))


def test_missing_optional_library_fails_before_any_work(tmp_path, toy_log):
    pipe = make_pipe(tmp_path)
    with pytest.raises(MissingLibrary) as err:
        pipe.run("needs_lib")
    msg = str(err.value)
    assert f"'{MISSING}'" in msg and "pip install 'nemo-pipe[nosuch]'" in msg
    assert "needs_lib" in msg and err.value.exit_code == 2
    assert not toy_log.exists()  # numbers, upstream, did not start either
    assert not (tmp_path / "toy").exists()
    with pytest.raises(MissingLibrary, match=r"nemo-pipe\[other\]"):
        make_pipe(tmp_path).run("always_needs")
    # not needed under these params: the stage runs
    make_pipe(tmp_path, "needs_lib.use_it=false").run("needs_lib")
    # a dry plan checks nothing
    assert [i.name for i in make_pipe(tmp_path).plan("needs_lib")] == ["numbers", "needs_lib"]


def test_cli_names_the_extra_for_a_missing_vllm(demo, work):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    from typer.testing import CliRunner

    from pipeline.cli import app

    res = CliRunner().invoke(app, [
        "run", "--stage", "multiview", "--dataset", "refcoco", "--work-dir", str(work),
        "--data-root", str(demo.refer_root), "--images", str(demo.images_dir),
        "--set", "multiview.backend=vllm"])
    assert res.exit_code == 2, res.output
    assert "error: stage 'multiview' needs the optional library 'vllm'" in res.output
    assert "pip install 'nemo-pipe[vllm]'" in res.output
    assert not (work / "refcoco" / "ingest").exists()  # nothing ran


def _imported_modules(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_engine_imports_no_stage_module():
    """The engine reaches the stages only through the registry's hook (by name, at run time)."""
    offenders = {p.relative_to(REPO).as_posix(): sorted(m for m in _imported_modules(p)
                                                        if m.split(".")[0] == "stages")
                 for p in sorted((REPO / "pipeline").rglob("*.py"))}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_cli_import_loads_no_stage_module():
    """Mounting the stages' commands must not import the stages themselves (`--help` stays
    fast); `STAGES` is built when first read."""
    code = ("import sys\nfrom pipeline.cli import app\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'stages'))\n"
            "import stages\nprint(len(stages.STAGES))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    loaded, n = out.stdout.splitlines()
    assert loaded == "['stages', 'stages.tools', 'stages.tools.commands']", out.stderr
    assert int(n) >= 11


def test_cli_mounts_stage_commands_with_the_common_options():
    from pipeline.cli import app

    group = typer.main.get_command(app)
    options = {name: {o for p in cmd.params for o in p.opts if o.startswith("--")}
               for name, cmd in group.commands.items()}
    assert [c.__name__ for c in load_commands()] == [
        "calibrate", "report", "audit", "export_refer", "preview", "demo_data"]
    assert list(options) == ["run", "status", "list-stages", "path", "verify", "gc",
                             "calibrate", "report", "audit", "export-refer", "preview",
                             "demo-data"]
    with_dataset = {name for name, opts in options.items() if opts >= COMMON}
    assert with_dataset == {"run", "status", "path", "gc", "calibrate", "report", "audit",
                            "export-refer", "preview"}
    assert options["verify"] == {"--dataset", "--work-dir"}


def test_dataset_hook():
    assert dataset_spec("refcoco") == ("refcoco", "refcoco")
    assert dataset_spec("anything", module="toy_stages") == ("anything", "anything")
    assert load_commands("toy_stages") == []
