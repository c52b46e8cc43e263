"""`nemo-pipe export-refer OUT --dataset D`: a REFER copy of the dataset whose training refs carry
the generated multi-view expressions as extra sentences.

The method notes write the generated expressions back into the REFER files and train on them;
trainers that read REFER (the official refer.py, the official NeMo loader, CRIS's LMDB builder
`tools/data_process.py`) then see them with no change of their own. What is written, under
`OUT/<the dataset's dir>/` (the layout `REFER(OUT, dataset, splitBy)` opens):

- the refs file under its own name (`refs(<splitBy>).p`: a pickle of protocol 2, what Python 2's
  cPickle wrote and reads; gRefCOCO's `grefs(unc).json`: JSON), holding every record of the
  original unchanged and in its place; each training-split ref with valid views
  (`stages.refer.views.valid_views`) gets one sentence per view appended to `sentences`, in view
  order, with `sent_ids` extended to match. The new sent_ids count up from one above the largest
  sent_id of the file (every split), refs in file order, so no id is reused. The new records are
  built as REFER's (`tokens`, `raw`, `sent_id`, `sent`: `stages.refer.views.refer_sentence`;
  letters of every script are kept). A view is not added when it equals (normalised) a
  sentence the ref already has or a view added before it, when its REFER `sent` is one of
  theirs (REFER's tokens drop punctuation: "guy in t-shirt" is stored as "guy in t shirt"), or
  when it has no REFER token at all (only symbols: it would be an empty training sentence).
  Evaluation refs are never touched, even if `multiview.splits` gave them views.
- `instances.json`, a byte copy of the original (REFER needs it next to the refs; one copy
  serves every partition of the dataset, so an identical one already there is kept).
- `nemo_export(<splitBy>).json` (:func:`record_name`), one per refs file: where the views came
  from (the multiview key and params), the id range given to the new sentences and the
  counts; no REFER reader opens it. G-Ref's two partitions (`refs(umd).p`, `refs(google).p`)
  exported into one OUT each keep their own record.

The views are the multiview artifact the current config resolves to, which must be built (the
key chain ties it to these very REFER files). Files are written to temporary names and renamed
into place; OUT may not be the original data root. An earlier export of the same refs file
(that file or its record in OUT, or the `nemo_export.json` of an older version describing it)
or a different `instances.json` there is replaced only with `--force`.
"""

from __future__ import annotations

import filecmp
import json
import os
import pickle
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import InputError, NotPublished
from pipeline.io import output_dir, output_file
from stages.refer.views import refer_sentence, refer_tokens, valid_views
from stages.text.normalise import normalise_sentence

PICKLE_PROTOCOL = 2  # the REFER pickles were written by Python 2's cPickle
LEGACY_RECORD = "nemo_export.json"  # one record per OUT folder, before one per refs file
_REFS_NAME = re.compile(r"g?refs\((.+)\)\.(?:p|json)")


def record_name(refs_file: str) -> str:
    """The provenance record of one exported refs file: `nemo_export(<splitBy>).json` for
    REFER's `refs(<splitBy>).p` / gRefCOCO's `grefs(<splitBy>).json`, else
    `nemo_export(<file stem>).json`; so partitions sharing a folder keep a record each."""
    m = _REFS_NAME.fullmatch(refs_file)
    return f"nemo_export({m.group(1) if m else Path(refs_file).stem}).json"


@dataclass(frozen=True)
class ExportSummary:
    """What `export-refer` wrote."""

    refs_file: str
    instances_file: str
    record_file: str
    multiview_key: str
    train_split: str
    refs_with_views: int
    added_sentences: int
    first_new_sent_id: int | None
    last_new_sent_id: int | None
    views_of_eval_refs_skipped: int
    views_equal_to_a_sentence: int
    views_without_tokens: int
    views_of_unknown_refs: int


def add_views(refs: list[dict[str, Any]], views: dict[int, list[tuple[str, str]]],
              train_split: str) -> dict[str, Any]:
    """Append each training ref's views to its `sentences` and `sent_ids`, in place; return the
    counts and the id range. Ids start above the largest sent_id of `refs` (every split)."""
    next_id = 1 + max((int(s["sent_id"]) for r in refs for s in r.get("sentences") or []),
                      default=-1)
    first = next_id
    known = set()
    counts = {"refs_with_views": 0, "added_sentences": 0, "views_of_eval_refs_skipped": 0,
              "views_equal_to_a_sentence": 0, "views_without_tokens": 0}
    for ref in refs:
        ref_id = int(ref["ref_id"])
        known.add(ref_id)
        mine = views.get(ref_id)
        if not mine:
            continue
        if ref.get("split") != train_split:
            counts["views_of_eval_refs_skipped"] += len(mine)
            continue
        # "The same sentence" twice over: normalised (articles, case, punctuation) and as
        # REFER stores it (the tokens joined), which can be equal where the normalised forms
        # are not ("guy in t-shirt" and "guy in t shirt" are both sent "guy in t shirt").
        texts = [str(s.get(f, "")) for s in ref["sentences"] for f in ("sent", "raw")]
        have = {normalise_sentence(t) for t in texts}
        have_sent = {str(s.get("sent", "")) for s in ref["sentences"]}
        have_sent |= {" ".join(refer_tokens(t)) for t in texts}
        added = 0
        for _, text in mine:
            record = refer_sentence(text, next_id)
            if not record["tokens"]:  # only symbols: REFER would hold an empty sentence
                counts["views_without_tokens"] += 1
                continue
            norm = normalise_sentence(text)
            if norm in have or record["sent"] in have_sent:
                counts["views_equal_to_a_sentence"] += 1
                continue
            have.add(norm)
            have_sent.add(record["sent"])
            ref["sentences"].append(record)
            if isinstance(ref.get("sent_ids"), list):
                ref["sent_ids"].append(next_id)
            next_id += 1
            added += 1
        counts["refs_with_views"] += bool(added)
        counts["added_sentences"] += added
    counts["views_of_unknown_refs"] = sum(len(v) for r, v in views.items() if r not in known)
    counts["first_new_sent_id"] = first if next_id > first else None
    counts["last_new_sent_id"] = next_id - 1 if next_id > first else None
    return counts


def _write_atomic(path: Path, write: Any) -> None:
    """`write(file)` into a temporary file next to `path`, synced, then renamed into place
    (`output_file`: a failed write leaves nothing and is an error naming the path)."""
    with output_file(path, "REFER copy", "OUT folder") as tmp, open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def export_refer(refs_path: Path, instances_path: Path, fmt: str, out_dir: Path,
                 views: dict[int, list[tuple[str, str]]], train_split: str,
                 provenance: dict[str, Any], force: bool = False) -> ExportSummary:
    """Write the REFER copy of `refs_path` + `instances_path` with `views` into `out_dir`."""
    from stages.refer.files import load_refs_file

    output_dir(out_dir, "REFER copy", "OUT folder")
    if out_dir.resolve() == refs_path.parent.resolve():
        raise InputError(f"{out_dir}: this is the original dataset's own folder; pick another "
                         "OUT so the original REFER files stay as they are")
    targets = [out_dir / refs_path.name, out_dir / instances_path.name,
               out_dir / record_name(refs_path.name)]
    legacy = out_dir / LEGACY_RECORD
    legacy_mine = _legacy_record_of(legacy, refs_path.name)
    there = [t.name for t in (targets[0], targets[2]) if t.exists()]
    there += [legacy.name] if legacy_mine else []
    same_instances = targets[1].is_file() and filecmp.cmp(targets[1], instances_path,
                                                          shallow=False)
    if targets[1].exists() and not same_instances:
        there.append(f"{targets[1].name}, not the original's")
    if there and not force:
        raise InputError(f"{out_dir} already holds an export of {refs_path.name} "
                         f"({'; '.join(there)}); pass --force to replace it, or pick another "
                         "OUT")
    refs = load_refs_file(refs_path, fmt)
    if not isinstance(refs, list) or not all(isinstance(r, dict) and isinstance(
            r.get("sentences"), list) for r in refs):
        raise InputError(f"{refs_path}: expected a list of ref records with sentences; is this "
                         "the refs file ingest read?")
    counts = add_views(refs, views, train_split)
    if fmt == "grefer" and refs_path.suffix == ".json":
        _write_atomic(targets[0], lambda f: f.write(json.dumps(refs).encode()))
    else:
        _write_atomic(targets[0], lambda f: pickle.dump(refs, f, protocol=PICKLE_PROTOCOL))

    def copy_instances(f: Any) -> None:
        with instances_path.open("rb") as src:
            shutil.copyfileobj(src, f)

    if not same_instances:
        _write_atomic(targets[1], copy_instances)
    summary = ExportSummary(refs_file=str(targets[0]), instances_file=str(targets[1]),
                            record_file=str(targets[2]),
                            multiview_key=str(provenance.get("key")), train_split=train_split,
                            **counts)
    record = {**asdict(summary), "source_refs_file": str(refs_path),
              "source_instances_file": str(instances_path), "multiview": provenance}
    _write_atomic(targets[2], lambda f: f.write(
        (json.dumps(record, indent=1, sort_keys=True) + "\n").encode()))
    if legacy_mine:  # superseded by this file's own record: never two records of one export
        legacy.unlink(missing_ok=True)
    return summary


def _legacy_record_of(path: Path, refs_name: str) -> bool:
    """Whether `path` is an older version's single `nemo_export.json` describing an export of
    `refs_name` (a record describing another refs file, or unreadable, is left alone)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and Path(str(record.get("refs_file", ""))).name == refs_name


def export_refer_command(dataset: str, out: Path, work_dir: Path | None = None,
                         config: Path | None = None, sets: tuple[str, ...] | list[str] = (),
                         data_root: Path | None = None, images: Path | None = None,
                         force: bool = False) -> ExportSummary:
    """Open the pipeline as the CLI does, read the multiview artifact the config resolves to
    and the REFER files ingest reads, and write the export under `out/<dataset dir>/`."""
    from pipeline.api import open_pipeline, published_table
    from stages.ingest import data_locations
    from stages.multiview import VIEWS
    from stages.refer.files import locate_inputs
    from stages.refer.manifests import load_data_manifest

    pipe = open_pipeline(dataset, work_dir, config, sets, data_root, images, progress=False)
    manifest = load_data_manifest(pipe.env.dataset)
    root, _ = data_locations(pipe.env, manifest)
    refs_path, instances_path = locate_inputs(manifest, root)
    key = pipe.resolve("multiview").key
    if not pipe.store.is_published(pipe.env.dataset, "multiview", key):
        raise NotPublished(
            f"multiview ({key}) for {dataset} is not built under {pipe.env.work_dir}: the "
            f"export adds its views. Run `nemo-pipe run --stage multiview --dataset {dataset}` "
            "with the same --config/--set first")
    view_rows = published_table(pipe, "multiview", "views").read().select(
        ["ref_id", "image_id", "ann_id", "view", "text"]).to_pylist()
    failures = published_table(pipe, "multiview", "failures").read().select(
        ["image_id", "ann_ids"]).to_pylist()
    views = valid_views(view_rows, failures, VIEWS)
    m = pipe.store.manifest(pipe.env.dataset, "multiview", key)
    provenance = {"key": key, "params": m.get("params"), "backend": m.get("backend"),
                  "model": m.get("model")}
    return export_refer(refs_path, instances_path, manifest.format, Path(out) / manifest.dir,
                        views, manifest.train_split, provenance, force=force)


def format_summary(s: ExportSummary) -> str:
    ids = (f"sent_ids {s.first_new_sent_id}..{s.last_new_sent_id}"
           if s.added_sentences else "no new sentence")
    lines = [s.refs_file, s.instances_file, s.record_file,
             f"{s.added_sentences} generated expressions added to {s.refs_with_views} "
             f"{s.train_split} refs ({ids}); multiview {s.multiview_key}"]
    if s.views_of_eval_refs_skipped:
        lines.append(f"{s.views_of_eval_refs_skipped} views of evaluation refs left out")
    if s.views_equal_to_a_sentence:
        lines.append(f"{s.views_equal_to_a_sentence} views equal to a sentence of their ref "
                     "not added")
    if s.views_without_tokens:
        lines.append(f"{s.views_without_tokens} views without a REFER token (only symbols) "
                     "not added")
    if s.views_of_unknown_refs:
        lines.append(f"{s.views_of_unknown_refs} views of refs not in the refs file ignored")
    return "\n".join(lines)
