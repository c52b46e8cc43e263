"""Compare two work dirs' published artifacts, stage by stage, ignoring keys and manifests.

    python scripts/compare_artifacts.py BEFORE/artifacts AFTER/artifacts

For a refactor: each (dataset, stage) line says whether the key is the same and how many files
are byte-identical, equal in rows with only Parquet metadata changed (e.g. a schema-version
tag), or different. Used for issue 14 (`make demo` before and after the layout change). Exits
1 when a file differs or a stage or file is on one side only, 0 when every file is identical
or equal in rows. A stage with several published keys (several configs) is compared by its
first key in name order, and the line says so.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pyarrow.parquet as pq

SKIP = {"_manifest.json", "_SUCCESS"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def published(root: Path) -> dict[tuple[str, str], list[Path]]:
    """(dataset, stage) -> its published key dirs under a work dir, in name order."""
    out: dict[tuple[str, str], list[Path]] = {}
    for ds in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for stage in sorted(p for p in ds.iterdir() if p.is_dir()):
            for key in sorted(stage.iterdir()):
                if (key / "_SUCCESS").exists():
                    out.setdefault((ds.name, stage.name), []).append(key)
    return out


def files(key_dir: Path) -> dict[str, Path]:
    return {p.relative_to(key_dir).as_posix(): p for p in key_dir.rglob("*")
            if p.is_file() and p.name not in SKIP}


def same_rows(a: Path, b: Path) -> bool:
    if a.suffix != ".parquet":
        return False
    ta, tb = pq.read_table(a), pq.read_table(b)
    return ta.replace_schema_metadata(None).equals(tb.replace_schema_metadata(None))


def compare(before: Path, after: Path) -> tuple[list[str], bool]:
    """(one line per (dataset, stage), whether everything matched)."""
    pa_, pb_ = published(before), published(after)
    lines, matched = [], True
    for ds, stage in sorted(set(pa_) | set(pb_)):
        keys_a, keys_b = pa_.get((ds, stage)), pb_.get((ds, stage))
        if keys_a is None or keys_b is None:
            lines.append(f"{ds:16} {stage:15} only {'after' if keys_b else 'before'}")
            matched = False
            continue
        a, b = keys_a[0], keys_b[0]
        fa, fb = files(a), files(b)
        counts = {"identical": 0, "same rows": 0, "differ": 0}
        notes = [f"{rel} only {'after' if rel in fb else 'before'}"
                 for rel in sorted(set(fa) ^ set(fb))]
        for rel in sorted(set(fa) & set(fb)):
            if sha256(fa[rel]) == sha256(fb[rel]):
                counts["identical"] += 1
            elif same_rows(fa[rel], fb[rel]):
                counts["same rows"] += 1
            else:
                counts["differ"] += 1
                notes.append(f"{rel} differs")
        matched = matched and not notes
        key = "same key" if a.name == b.name else "new key"
        if len(keys_a) > 1 or len(keys_b) > 1:
            key += f" (first of {len(keys_a)} / {len(keys_b)} published keys)"
        summary = ", ".join(f"{v} {k}" for k, v in counts.items())
        lines.append(f"{ds:16} {stage:15} {key}: {summary}" + (f"; {notes[:4]}" if notes else ""))
    return lines, matched


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    report, all_matched = compare(Path(sys.argv[1]), Path(sys.argv[2]))
    print("\n".join(report))
    sys.exit(0 if all_matched else 1)
