"""The one request loop of the LLM stages: ask, validate per item, repair, record.

Both multiview (views of an image's instances) and augment (distractors of a sentence, per
kind) go through it; what differs comes in as a small `Task` object:

* `requests(job)`: a job's first requests, each asking for some targets (views: the image's
  instance ids, or one each with per-instance prompts; distractors: one target);
* `prompt(job, request)`: the task's prompt for the targets a request still asks for;
* `model_input(job, text)`: what the generator gets (an ``(image, text)`` pair, or the text);
* `budget(...)` / `schema(...)`: the request's max_new_tokens and JSON schema;
* `parse(job, request, text)`: ``(values, problems)`` -- the targets the answer gives valid
  values for, and why each other target is unusable;
* `echo_chars`, `closing`: the repair prompt's echo limit and last line; `names_budget`: say
  the token limit in a truncation message.

Each `generator.generate` call takes the pending requests of up to `batch_size` jobs: jobs
being repaired first, then new ones in order, so batches stay full. ``batch_size=None`` (auto)
takes `AUTO_JOBS` jobs per call and lets the generator size its own batches (the transformers
generator fits them to its memory and halves them after an out-of-memory; see
`stages.models.generation.batching`). An answer's valid targets are kept; only the others are
asked again, with ONE repair prompt (`repair_prompt`: the task's prompt for them, the answer,
why it was rejected), up to `max_attempts` answers per job. A target still unusable after that
is in the job's `failed` with its reason word: ``truncated`` (the last answer was cut off at
its token limit) or ``invalid``. Bad model output never raises; errors of the generator itself
(an out-of-memory even at batch 1, ...) do, after the jobs finished before were cached.

`run_cached` is the same loop behind the request cache: a job whose result is cached is not
asked (and no model is loaded when none is left), every finished job is put in the cache at
once (a kill loses at most the requests in flight), a job whose input cannot be opened
(`Skip`) is recorded but not cached, so a rerun tries it again.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from stages.models.generation.answers import is_truncated
from stages.text.llm_output import join_problems, repair_prompt

__all__ = ["AUTO_JOBS", "INVALID", "KILL_HOOK_ENV", "TRUNCATED", "Outcome", "Plan", "Request",
           "Skip", "Task", "rejection", "run_cached", "run_requests"]

J = TypeVar("J")

# The reason word of a target still without a valid value (the first word of its message).
TRUNCATED = "truncated"  # the last answer was cut off at its token limit
INVALID = "invalid"  # the last answer had no usable value for it (bad JSON, empty view, ...)

KILL_HOOK_ENV = "NEMO_PIPE_TEST_KILL_AFTER_REQUESTS"
# batch_size=None: jobs per generate call, enough to fill the largest batch a generator picks
# (`batching.AUTO_BATCH_CAP`); a kill loses at most these jobs' answers.
AUTO_JOBS = 256


@dataclass(eq=False)
class Request:
    """One request in flight: the targets it asks for, its prompt now (first or repair)."""

    targets: list[str]
    label: str = ""  # in its error messages, after "attempt N" (" (instance 102)")
    data: Any = None  # the task's own (views: the instances the prompt shows)
    text: str = ""


class Outcome(NamedTuple):
    """What the model gave for one job.

    `values`: target -> valid value (a partly bad answer keeps its valid targets); `attempts`:
    answers asked for, per request; `errors`: one message per rejected answer
    (``"attempt N: ..."``), also when a later attempt succeeded; `failed`: target ->
    ``"<reason>: attempt N: <why>"`` for every target still without a value, reason
    `TRUNCATED` or `INVALID`.
    """

    values: dict[str, Any]
    attempts: int
    errors: list[str]
    failed: dict[str, str]


class Task(Protocol[J]):
    """The task-specific half of the request loop (see the module docstring)."""

    echo_chars: int
    closing: str
    names_budget: bool

    def requests(self, job: J) -> list[Request]: ...

    def prompt(self, job: J, request: Request) -> str: ...

    def model_input(self, job: J, text: str) -> Any: ...

    def budget(self, job: J, request: Request, count_tokens: Callable[[str], int] | None,
               cap: int | None) -> int: ...

    def schema(self, job: J, request: Request) -> Mapping[str, Any] | None: ...

    def parse(self, job: J, request: Request,
              text: str) -> tuple[Mapping[str, Any], Mapping[str, str]]: ...


def rejection(problems: Mapping[str, str], truncated: bool, budget: int | None = None) -> str:
    """Why an answer's unusable part was rejected, for the error log and the repair prompt;
    `budget`: the limit to name when it was cut off (None: "its token limit")."""
    text = join_problems(problems.values())
    if not truncated:
        return text
    where = "its token limit" if budget is None else f"its limit of {budget} tokens"
    return (f"the answer was cut off at {where} before it was complete; answer with the "
            f"compact JSON object only ({text})")


@dataclass(eq=False)
class _Live(Generic[J]):
    """One job in flight and its results so far."""

    job: J
    requests: list[Request]
    targets: list[str]
    values: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    attempts: int = 0

    def outcome(self) -> Outcome:
        return Outcome({t: self.values[t] for t in self.targets if t in self.values},
                       self.attempts, list(self.errors),
                       {t: self.failed[t] for t in self.targets if t in self.failed})


def _start(task: Task[J], job: J) -> _Live[J]:
    requests = task.requests(job)
    for request in requests:
        request.text = task.prompt(job, request)
    targets = list(dict.fromkeys(t for r in requests for t in r.targets))
    return _Live(job, requests, targets)


def _judge(task: Task[J], live: _Live[J], request: Request, text: str, budget: int,
           max_attempts: int) -> None:
    """Keep an answer's valid values; repair the request for the rest, or record them."""
    values, problems = task.parse(live.job, request, text)
    live.values.update(values)
    if not problems:
        live.requests.remove(request)
        return
    truncated = is_truncated(text)
    why = rejection(problems, truncated, budget if task.names_budget else None)
    live.errors.append(f"attempt {live.attempts}{request.label}: {why}")
    if live.attempts < max_attempts:  # ask again for the targets without a valid value only
        request.targets = [t for t in request.targets if t in problems]
        request.text = repair_prompt(task.prompt(live.job, request), text, why,
                                     echo_chars=task.echo_chars, closing=task.closing)
        return
    reason = TRUNCATED if truncated else INVALID
    for target, problem in problems.items():
        live.failed[target] = (f"{reason}: attempt {live.attempts}{request.label}: "
                               + (why if truncated else problem))
    live.requests.remove(request)


def _check_limits(max_attempts: int, batch_size: int | None) -> None:
    if max_attempts < 1:
        raise ValueError("max_attempts must be >= 1")
    if batch_size is not None and batch_size < 1:
        raise ValueError("batch_size must be >= 1 or None")


def run_requests(generator: Any, task: Task[J], jobs: Iterable[J], *, max_attempts: int = 3,
                 batch_size: int | None = 8, max_new_tokens: int | None = None,
                 on_done: Callable[[J, Outcome], None] | None = None) -> list[Outcome]:
    """Every job's `Outcome`, in the order `jobs` yields them (see the module docstring).

    `jobs` is read lazily, as batches need new jobs (a job's image is loaded only then).
    Each request's max_new_tokens is ``task.budget`` (counted with
    ``generator.count_tokens`` when it has one) at most `max_new_tokens`; the generator caps it
    further by its context. A generator with ``supports_schema`` gets one ``schema`` per
    request. `on_done(job, outcome)` is called as soon as a job is finished, e.g. to put it in
    a request cache before the others are done.
    """
    _check_limits(max_attempts, batch_size)
    jobs_per_call = AUTO_JOBS if batch_size is None else batch_size
    use_schema = bool(getattr(generator, "supports_schema", False))
    count_tokens = getattr(generator, "count_tokens", None)
    outcomes: dict[int, Outcome] = {}
    order: dict[int, int] = {}  # id(live) -> position in `jobs`
    fresh = iter(jobs)
    retry: deque[_Live[J]] = deque()

    def finish(live: _Live[J]) -> None:
        outcome = live.outcome()
        outcomes[order.pop(id(live))] = outcome
        if on_done is not None:
            on_done(live.job, outcome)

    position = 0
    exhausted = False
    while True:
        batch: list[_Live[J]] = []
        while len(batch) < jobs_per_call and retry:
            batch.append(retry.popleft())
        while len(batch) < jobs_per_call and not exhausted:
            job = next(fresh, _END)
            if job is _END:
                exhausted = True
                break
            live = _start(task, job)
            order[id(live)] = position
            position += 1
            if live.requests:
                batch.append(live)
            else:  # nothing to ask (an image without instances)
                finish(live)
        if not batch:
            break
        pending = [(live, request) for live in batch for request in live.requests]
        budgets = [task.budget(live.job, r, count_tokens, max_new_tokens) for live, r in pending]
        kwargs: dict[str, Any] = {"max_new_tokens": budgets, "batch_size": batch_size}
        if use_schema:
            kwargs["schema"] = [task.schema(live.job, r) for live, r in pending]
        outputs = generator.generate([task.model_input(live.job, r.text) for live, r in pending],
                                     **kwargs)
        if len(outputs) != len(pending):
            raise RuntimeError(f"generator returned {len(outputs)} answers for "
                               f"{len(pending)} requests")
        for live in batch:
            live.attempts += 1
        for (live, request), text, budget in zip(pending, outputs, budgets, strict=True):
            _judge(task, live, request, text, budget, max_attempts)
        for live in batch:
            if live.requests:
                retry.append(live)
            else:
                finish(live)
    return [outcomes[i] for i in sorted(outcomes)]


_END = object()


# --------------------------------------------------------------------------------------------
# behind the request cache


class Skip(Exception):  # noqa: N818 - a signal, not an error
    """Raised by a `Plan`'s `open`: the job cannot be asked (its image is unreadable).
    `record` is its result, kept out of the request cache so that a rerun tries again."""

    def __init__(self, record: dict[str, Any]) -> None:
        super().__init__("job skipped")
        self.record = record


@dataclass
class Plan(Generic[J]):
    """One job as the request cache knows it: its item id, its prompt hash, and how to open it
    (called only when it is not cached)."""

    item: str
    phash: str
    open: Callable[[], J]


def _kill_hook(done: int) -> None:
    """Test hook for crash drills: SIGKILL this process after `done` requests were cached."""
    limit = os.environ.get(KILL_HOOK_ENV)
    if limit and done >= int(limit):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def run_cached(task: Task[J], plans: Sequence[Plan[J]], *, cache: str | os.PathLike[str],
               model_key: str, load_generator: Callable[[], Any],
               to_record: Callable[[J, Outcome], dict[str, Any]], max_attempts: int,
               batch_size: int | None, max_new_tokens: int | None = None,
               ) -> tuple[dict[str, dict[str, Any]], dict[str, int], dict[str, Any] | None]:
    """`run_requests` for the plans not in the request cache: ``(records by item, counts,
    usage)``.

    A plan's record is read from the `RequestCache` at `cache`, keyed by (`model_key`, its
    prompt hash, its item), or else generated (`to_record` turns its `Outcome` into the JSON
    record) and put there as soon as its job is finished. Plans with the same item are one
    job. `load_generator()` is called only when something is left to generate. `counts`:
    ``{"generated": jobs answered by the model now, "cached": jobs read from the cache}``;
    `usage` (None when no generator with stats was loaded): this call's share of the
    generator's totals (``generated_tokens``, ``generation_seconds``, ``model_requests``,
    ``truncated_answers``, ``oom_retries``, and ``batch_sizes``: generate calls per batch size,
    for generators that report them).
    """
    from pipeline.request_cache import RequestCache

    _check_limits(max_attempts, batch_size)  # before any cache read or model load
    records: dict[str, dict[str, Any]] = {}
    counts = {"generated": 0, "cached": 0}
    usage: dict[str, Any] | None = None
    with RequestCache(cache) as store:
        todo: list[Plan[J]] = []
        queued: set[str] = set()
        for plan in plans:
            if plan.item in records or plan.item in queued:
                continue
            hit = store.get(model_key, plan.phash, plan.item)
            if hit is not None:
                records[plan.item] = hit
                counts["cached"] += 1
            else:
                queued.add(plan.item)
                todo.append(plan)
        if not todo:
            return records, counts, usage
        generator = load_generator()
        stats = getattr(generator, "stats", None)
        before = _totals(stats) if stats is not None else None
        plan_of: dict[int, Plan[J]] = {}

        def jobs() -> Iterable[J]:
            for plan in todo:
                try:
                    job = plan.open()
                except Skip as skipped:
                    records[plan.item] = skipped.record
                    continue
                plan_of[id(job)] = plan
                yield job

        def on_done(job: J, outcome: Outcome) -> None:
            plan = plan_of.pop(id(job))
            record = to_record(job, outcome)
            store.put(model_key, plan.phash, plan.item, record)
            records[plan.item] = record
            counts["generated"] += 1
            _kill_hook(counts["generated"])

        run_requests(generator, task, jobs(), max_attempts=max_attempts, batch_size=batch_size,
                     max_new_tokens=max_new_tokens, on_done=on_done)
        if stats is not None and before is not None:
            usage = _usage(before, _totals(stats))
    return records, counts, usage


def _totals(stats: Any) -> dict[str, Any]:
    """A generator's running totals now (`GenerationStats`; batch sizes and out-of-memory
    retries only where it reports them)."""
    totals = {"generated_tokens": stats.generated_tokens, "generation_seconds": stats.seconds,
              "model_requests": stats.requests, "truncated_answers": stats.truncated}
    if hasattr(stats, "batch_sizes"):
        totals["oom_retries"] = stats.oom_retries
        totals["batch_sizes"] = dict(stats.batch_sizes)
    return totals


def _usage(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What happened between two `_totals`: differences, batch sizes as ``{"16": calls}``."""
    usage: dict[str, Any] = {k: after[k] - before[k] for k in after if k != "batch_sizes"}
    usage["generation_seconds"] = round(usage["generation_seconds"], 3)
    if "batch_sizes" in after:
        sizes = {size: n - before["batch_sizes"].get(size, 0)
                 for size, n in after["batch_sizes"].items()}
        usage["batch_sizes"] = {str(k): v for k, v in sorted(sizes.items()) if v}
    return usage
