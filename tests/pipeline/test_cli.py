"""The CLI as a user drives it: run, dry-run, status, path, verify, list-stages, demo-data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()


def common(demo, work):
    return ["--dataset", "refcoco", "--work-dir", str(work), "--data-root", str(demo.refer_root),
            "--images", str(demo.images_dir)]


def test_run_status_path_verify_round_trip(demo, work):
    dry = runner.invoke(app, ["run", "--stage", "ingest", "--dry-run", *common(demo, work)])
    assert dry.exit_code == 0, dry.output
    assert dry.output.split()[:2] == ["ingest", "missing"]
    assert not (work / "refcoco" / "ingest").exists()  # a dry run changes nothing

    path = runner.invoke(app, ["path", "--stage", "ingest", *common(demo, work)])
    assert path.exit_code == 1

    res = runner.invoke(app, ["run", "--stage", "ingest", *common(demo, work)])
    assert res.exit_code == 0, res.output
    artifact = res.output.strip().splitlines()[-1]
    assert (work / "refcoco" / "ingest").as_posix() in artifact

    # locations are remembered: status and path work without --data-root/--images
    short = ["--dataset", "refcoco", "--work-dir", str(work)]
    path = runner.invoke(app, ["path", "--stage", "ingest", "--table", "refs", *short])
    assert path.exit_code == 0, path.output
    assert path.output.strip() == f"{artifact}/refs"
    status = runner.invoke(app, ["status", *short])
    line = next(ln for ln in status.output.splitlines() if ln.startswith("ingest"))
    fields = line.split()
    assert fields[1] == "done" and artifact.endswith(fields[2])
    manifest = json.loads(Path(artifact, "_manifest.json").read_text())
    assert int(fields[3]) == sum(f["rows"] for f in manifest["files"].values())

    report = runner.invoke(app, ["status", "--stage", "ingest", *short])
    assert report.exit_code == 0 and '"split_counts"' in report.output
    missing = runner.invoke(app, ["status", "--stage", "negatives", *short])
    assert missing.exit_code == 1 and "not built" in missing.output

    again = runner.invoke(app, ["run", "--stage", "ingest", *short])
    assert again.output.split()[:2] == ["ingest", "cached"]

    ok = runner.invoke(app, ["verify", "--work-dir", str(work)])
    assert ok.exit_code == 0 and "1 artifact(s): 0 problem(s)" in ok.output
    part = next((work / "refcoco" / "ingest").glob("*/sentences/part-00000.parquet"))
    part.write_bytes(part.read_bytes()[:-10] + b"0123456789")
    bad = runner.invoke(app, ["verify", "--work-dir", str(work)])
    assert bad.exit_code == 1 and "sentences/part-00000.parquet" in bad.output


def test_bad_set_is_a_clear_error(demo, work):
    res = runner.invoke(app, ["run", "--stage", "ingest", *common(demo, work),
                              "--set", "ingest.strickt=true"])
    assert res.exit_code == 2
    assert "unknown config key 'ingest.strickt'" in res.output


def test_unknown_stage(demo, work):
    res = runner.invoke(app, ["run", "--stage", "ingst", *common(demo, work)])
    assert res.exit_code == 2 and "unknown stage 'ingst'" in res.output


def test_list_stages_and_help():
    res = runner.invoke(app, ["list-stages"])
    assert res.exit_code == 0 and res.output.startswith("ingest (v3)")
    for cmd in ("run", "status", "path", "verify", "demo-data", "list-stages"):
        assert runner.invoke(app, [cmd, "--help"]).exit_code == 0


def test_status_and_help_do_not_import_heavy_libraries(demo, work):
    """`status`, `path` and `--help` must stay fast: no torch/pyarrow/faiss/transformers."""
    code = (
        "import sys\n"
        "from pipeline.cli import app\n"
        "from typer.testing import CliRunner\n"
        "r = CliRunner().invoke(app, sys.argv[1:])\n"
        "heavy = [m for m in ('torch', 'pyarrow', 'open_clip', 'faiss', 'transformers', "
        "'polars', 'dask') if m in sys.modules]\n"
        "print(r.exit_code, heavy)\n"
    )
    for args in (["--help"], ["status", *common(demo, work)],
                 ["path", "--stage", "ingest", *common(demo, work)]):
        out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                             text=True, env=os.environ)
        assert out.stdout.strip().endswith("[]"), (args, out.stdout, out.stderr)


def test_demo_data_command(tmp_path):
    out = tmp_path / "d"
    res = runner.invoke(app, ["demo-data", str(out), "--n-images", "12", "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert (out / "refer" / "refcoco" / "refs(unc).p").is_file()
    again = runner.invoke(app, ["demo-data", str(out)])
    assert again.exit_code == 2 and "error:" in again.output


def test_gc_removes_only_what_no_current_config_uses(demo, work):
    short = ["--dataset", "refcoco", "--work-dir", str(work)]
    assert runner.invoke(app, ["run", "--stage", "ingest", *common(demo, work)]).exit_code == 0
    old = runner.invoke(app, ["run", "--stage", "ingest", *short,
                              "--set", "ingest.images_per_shard=5"])
    assert old.exit_code == 0, old.output
    stage_dir = work / "refcoco" / "ingest"
    (stage_dir / ".tmp-deadbeef").mkdir()
    (stage_dir / ".tmp-deadbeef" / "x").write_text("partial")
    assert len([p for p in stage_dir.iterdir() if not p.name.startswith(".")]) == 2

    dry = runner.invoke(app, ["gc", "--keep-current", "--dry-run", *short])
    assert dry.exit_code == 0 and "would remove" in dry.output
    assert len([p for p in stage_dir.iterdir() if not p.name.startswith(".")]) == 2

    plain = runner.invoke(app, ["gc", *short])  # only the abandoned temp dir
    assert plain.exit_code == 0 and not (stage_dir / ".tmp-deadbeef").exists()
    assert len([p for p in stage_dir.iterdir() if not p.name.startswith(".")]) == 2

    current = runner.invoke(app, ["path", "--stage", "ingest", *short]).output.strip()
    res = runner.invoke(app, ["gc", "--keep-current", *short])
    assert res.exit_code == 0, res.output
    left = [p for p in stage_dir.iterdir() if not p.name.startswith(".")]
    assert [str(p) for p in left] == [current]


def test_run_rebuilds_a_corrupt_cached_artifact(demo, work):
    short = ["--dataset", "refcoco", "--work-dir", str(work)]
    assert runner.invoke(app, ["run", "--stage", "ingest", *common(demo, work)]).exit_code == 0
    artifact = Path(runner.invoke(app, ["path", "--stage", "ingest", *short]).output.strip())
    good = {p.relative_to(artifact): p.read_bytes() for p in artifact.rglob("*.parquet")}

    (artifact / "refs" / "part-00000.parquet").unlink()  # a deleted part: caught by size check
    res = runner.invoke(app, ["run", "--stage", "ingest", *short])
    assert res.exit_code == 0 and "corrupt" in res.output and "refs/part-00000" in res.output
    assert {p.relative_to(artifact): p.read_bytes() for p in artifact.rglob("*.parquet")} == good

    part = artifact / "sentences" / "part-00000.parquet"  # a flipped byte: same size
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    res = runner.invoke(app, ["run", "--stage", "ingest", *short])
    assert res.output.split()[:2] == ["ingest", "cached"]  # the cheap check cannot see it
    assert runner.invoke(app, ["verify", "--work-dir", str(work)]).exit_code == 1
    res = runner.invoke(app, ["run", "--stage", "ingest", "--verify", *short])
    assert res.exit_code == 0 and "checksum differs" in res.output
    assert runner.invoke(app, ["verify", "--work-dir", str(work)]).exit_code == 0
    assert part.read_bytes() == good[part.relative_to(artifact)]


def test_help_texts_survive_rich_markup():
    """typer renders help with rich, which swallows `[word ...]` as a markup tag: the env
    variables and defaults of the common options were invisible ("Artifact root ."). No help
    text may hold a bracket that rich would read as a tag, and the hints show."""
    import re

    import typer

    command = typer.main.get_command(app)
    tag = re.compile(r"\[[a-zA-Z#/@]")
    for name, sub in command.commands.items():
        for param in sub.params:
            assert not tag.search(getattr(param, "help", None) or ""), (name, param.name)
    out = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "250"}).output
    for hint in ("NEMO_WORK_DIR", "default ./artifacts", "NEMO_DATA_ROOT", "NEMO_IMAGES"):
        assert hint in out, hint


@pytest.mark.parametrize(("args", "words"), [
    (["run", "--dataset", "refcoco"], "run: missing option '--stage'"),
    (["run", "--stage", "ingest", "--dataset", "refcoco", "--workers", "0"],
     "run: invalid value for '--workers'"),
    (["status", "--dataset", "refcoco", "--bogus"], "status: no such option: --bogus"),
    (["demo-data", "x", "--n-images", "11"], "demo-data: invalid value for '--n-images'"),
    (["sttus"], "no such command 'sttus'"),
])
def test_usage_errors_are_one_error_line_with_exit_2(tmp_path, args, words):
    """typer printed click's usage errors in a boxed "Error" panel, unlike every other bad
    input; they are `error: <command>: <what> (see <command> --help)` now, still exit 2."""
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert words in lines[0] and lines[0].endswith(" --help`)")
    assert not (tmp_path / "x").exists()


def test_no_arguments_still_print_the_help():
    res = runner.invoke(app, [])
    assert "Commands" in res.output and "error:" not in res.output


def test_help_states_every_state_and_exit_status():
    """`status --help` listed done / stale / missing without corrupt; `path --help` said only
    "exit 1 if unbuilt", though a corrupt artifact or a refused config exits 2."""
    wide = {"COLUMNS": "250"}
    status = " ".join(runner.invoke(app, ["status", "--help"], env=wide).output.split())
    assert "done / stale / missing / corrupt" in status
    path = " ".join(runner.invoke(app, ["path", "--help"], env=wide).output.split())
    assert "exit 1 if unbuilt, 2 if it is corrupt or `run` would refuse the config" in path


def test_verify_on_a_work_dir_that_does_not_exist_is_an_error(tmp_path):
    """'checked 0 artifact(s)', exit 0, passed a mistyped --work-dir as verified."""
    res = runner.invoke(app, ["verify", "--work-dir", str(tmp_path / "typo")])
    assert res.exit_code == 2
    assert f"work dir {tmp_path / 'typo'} does not exist" in res.output
    assert not (tmp_path / "typo").exists()


def test_status_without_a_data_root_says_why_once(tmp_path, monkeypatch):
    monkeypatch.delenv("NEMO_DATA_ROOT", raising=False)
    res = runner.invoke(app, ["status", "--dataset", "refcoco", "--work-dir",
                              str(tmp_path / "w")])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert sum("no data root for refcoco" in x for x in lines) == 1
    assert lines[-1].startswith("every stage: no data root for refcoco: pass --data-root")
    assert all(" unresolved " in x for x in lines[1:-1]) and len(lines) > 3


def test_path_refuses_what_run_would_refuse(demo, work):
    """A split the dataset lacks is found by the stage's preflight: `path` printed a key for it
    and advised `run`, which then failed. Both say the same now."""
    bad = ["--set", "hard_negatives.source_splits=[nosuch]", "--set", "embed.model=tiny",
           "--set", "embed.pretrained=null", "--set", "multiview.backend=template"]
    path = runner.invoke(app, ["path", "--stage", "hard_negatives", *common(demo, work), *bad])
    # the dry run printed the plan and exit 0 ("stale") for a config the run refuses
    dry = runner.invoke(app, ["run", "--stage", "hard_negatives", "--dry-run",
                              *common(demo, work), *bad])
    assert not work.exists()  # neither changed anything
    run = runner.invoke(app, ["run", "--stage", "hard_negatives", *common(demo, work), *bad])
    for res in (path, run, dry):
        assert res.exit_code == 2, res.output
        assert "hard_negatives.source_splits" in res.output and "nosuch" in res.output
    assert str(work) not in path.output.splitlines()[0]  # no artifact path printed


def test_dry_run_refuses_a_missing_optional_library(demo, work):
    """`--dry-run` skipped the library check `run` makes: vLLM missing passed as a plan."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    res = runner.invoke(app, ["run", "--stage", "multiview", "--dry-run", *common(demo, work),
                              "--set", "multiview.backend=vllm"])
    assert res.exit_code == 2, res.output
    assert "error: stage 'multiview' needs the optional library 'vllm'" in res.output


def test_a_tilde_or_empty_work_dir_and_data_root(demo, tmp_path, monkeypatch):
    """A quoted `~` (env files, docker --env-file, systemd) made a dir literally named `~` in
    the cwd, and an empty NEMO_WORK_DIR put the dataset dirs straight into the cwd."""
    home = tmp_path / "home"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(home))
    loc = ["--dataset", "refcoco", "--images", str(demo.images_dir)]
    home.mkdir()
    os.symlink(demo.refer_root, home / "data")
    for env, extra, want in [
        ({"NEMO_WORK_DIR": "~/art"}, [], home / "art"),
        ({}, ["--work-dir", "~/w"], home / "w"),
        ({"NEMO_WORK_DIR": ""}, [], cwd / "artifacts"),
    ]:
        res = runner.invoke(app, ["path", "--stage", "ingest", *loc, *extra,
                                  "--data-root", "~/data"], env=env)
        assert res.exit_code == 1, res.output  # built nowhere yet, but resolved
        assert res.output.splitlines()[0].startswith(f"{want}/refcoco/ingest/"), res.output
    res = runner.invoke(app, ["path", "--stage", "ingest", *loc, "--work-dir", "~/w"],
                        env={"NEMO_DATA_ROOT": "~/data"})
    assert res.exit_code == 1 and res.output.startswith(f"{home}/w/refcoco/ingest/"), res.output
    assert list(cwd.iterdir()) == []  # nothing named `~`, no dataset dir in the cwd


def test_status_and_path_leave_a_new_work_dir_uncreated(demo, tmp_path):
    """They only look: hashing the inputs for the ingest key made `<work>/.cache` (and so the
    work dir) on a mistyped --work-dir. `run` still keeps the hashes for the next call."""
    work = tmp_path / "new-work"
    for cmd in (["status"], ["path", "--stage", "ingest"]):
        res = runner.invoke(app, [*cmd, *common(demo, work)])
        assert res.exit_code in (0, 1), res.output
        assert not work.exists(), cmd
    assert runner.invoke(app, ["run", "--stage", "ingest", *common(demo, work)]).exit_code == 0
    assert (work / ".cache" / "file_hashes.sqlite").is_file()
