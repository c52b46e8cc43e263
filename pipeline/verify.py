"""Re-check published artifacts against their manifests (checksums, row counts, file set)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.cache import ArtifactStore
from pipeline.io import MANIFEST, SUCCESS, parquet_rows, read_json, sha256_file


@dataclass
class Problem:
    artifact: Path
    file: str
    what: str

    def __str__(self) -> str:
        return f"{self.artifact / self.file}: {self.what}"


def verify_artifact(artifact: Path) -> list[Problem]:
    try:
        manifest = read_json(artifact / MANIFEST)
    except (OSError, ValueError) as exc:
        return [Problem(artifact, MANIFEST, f"manifest unreadable ({exc})")]
    problems: list[Problem] = []
    listed = manifest.get("files", {})
    for rel, want in sorted(listed.items()):
        path = artifact / rel
        if not path.is_file():
            problems.append(Problem(artifact, rel, "missing"))
            continue
        if sha256_file(path) != want["sha256"]:
            problems.append(Problem(artifact, rel, "checksum differs from the manifest"))
            continue
        if "rows" in want:
            try:
                rows = parquet_rows(path)
            except Exception as exc:  # a corrupt Parquet footer raises from pyarrow
                problems.append(Problem(artifact, rel, f"unreadable ({type(exc).__name__})"))
                continue
            if rows != want["rows"]:
                problems.append(Problem(artifact, rel,
                                        f"{rows} rows, manifest says {want['rows']}"))
    for path in sorted(artifact.rglob("*")):
        rel = path.relative_to(artifact).as_posix()
        if path.is_file() and rel not in listed and rel not in (MANIFEST, SUCCESS):
            problems.append(Problem(artifact, rel, "not listed in the manifest"))
    return problems


def quick_check(artifact: Path) -> list[Problem]:
    """Cheap integrity check before reusing a cached artifact: every listed file is there with
    its listed size (a deleted or truncated part). `verify_artifact` also re-hashes."""
    try:
        manifest = read_json(artifact / MANIFEST)
    except (OSError, ValueError) as exc:
        return [Problem(artifact, MANIFEST, f"manifest unreadable ({exc})")]
    problems = []
    for rel, want in sorted(manifest.get("files", {}).items()):
        path = artifact / rel
        if not path.is_file():
            problems.append(Problem(artifact, rel, "missing"))
        elif path.stat().st_size != want["bytes"]:
            problems.append(Problem(artifact, rel, f"{path.stat().st_size} bytes, manifest says "
                                                   f"{want['bytes']}"))
    return problems


def verify_store(store: ArtifactStore, dataset: str | None = None) -> tuple[int, list[Problem]]:
    """(number of artifacts checked, problems found) over every published artifact."""
    checked, problems = 0, []
    for ds in [dataset] if dataset else store.datasets():
        ds_dir = store.work_dir / ds
        if not ds_dir.is_dir():
            continue
        for stage_dir in sorted(p for p in ds_dir.iterdir() if p.is_dir()):
            for key in store.published_keys(ds, stage_dir.name):
                checked += 1
                problems.extend(verify_artifact(store.artifact_dir(ds, stage_dir.name, key)))
    return checked, problems
