"""Sharded scans and evaluations on torch.distributed: one corpus, many processes, one answer.

Data parallelism, one whole model per process: every rank tokenizes the whole corpus (so
chunking, ``max_tokens`` and the sha256 fingerprint are the single-process ones), reads its own
shard (:meth:`Corpus.shard`: chunks ``rank, rank + world, ...``), and the partial results meet
through ``all_gather_object`` and the results' own exact ``merge``, in rank order. Every rank
returns the same merged result, equal to the single-process one on the same corpus (counts and
top-k exactly; float sums up to summation order); write it from rank 0 only.

Failure: before anything is combined, every rank reports success or its error in the same
collective, so a rank that raises makes every rank raise a :class:`SpikeSinkError` naming the
failing rank and its error, never a partial result. A rank that dies outright (killed, out of
memory) closes its connections and the others fail with "lost contact" instead of waiting;
a rank that hangs is caught by the process group's timeout (:data:`DEFAULT_TIMEOUT`).

Outside a process group (and outside torchrun) these functions are the plain single-process
ones, so one script runs under ``python`` and under ``torchrun`` alike.

Example (``torchrun --nproc-per-node 4 my_scan.py``)::

    import tl_spikesink as ts

    model = ts.load("smollm2-135m")   # each rank loads its own copy
    result = ts.scan_distributed(model, texts, batch_size=8)  # joins torchrun's process group
    if ts.distributed.rank() == 0:
        result.to_json("scan.json")
"""

from __future__ import annotations

import functools
import inspect
import io
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from tl_spikesink.anatomy import Anatomy
from tl_spikesink.corpus import Corpus
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.evaluation.scoring import Evaluation, evaluate, evaluate_all
from tl_spikesink.interventions.base import Intervention
from tl_spikesink.probes.scan import ScanConfig, ScanResult, as_corpus, scan, scan_corpus

T = TypeVar("T")

DEFAULT_TIMEOUT = timedelta(minutes=30)
"""How long a rank waits for the others, at start-up and at each exchange of results; ranks
finish their shards at different times, so it must exceed the slowest shard's lead."""

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """Whether torchrun's environment variables are set (RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""
    return all(k in os.environ for k in _TORCHRUN_ENV)


def init_from_env(timeout: timedelta = DEFAULT_TIMEOUT) -> bool:
    """Join the process group torchrun describes in the environment, if not joined already.

    The backend is nccl when CUDA is available (this rank's GPU is ``LOCAL_RANK``), else gloo.

    Args:
        timeout: how long to wait for the other ranks, at start-up and at each collective.

    Returns:
        True if this call initialized the group (the caller should destroy it), False if one
        was already initialized.
    """
    if dist.is_initialized():
        return False
    if not launched_by_torchrun():
        missing = [k for k in _TORCHRUN_ENV if k not in os.environ]
        raise SpikeSinkError(
            f"no process group is initialized and {', '.join(missing)} not set; launch with "
            "`torchrun --nproc-per-node N ...` or call torch.distributed.init_process_group first"
        )
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        backend = "nccl"
    dist.init_process_group(backend, timeout=timeout)
    return True


@contextmanager
def torchrun_session(timeout: timedelta = DEFAULT_TIMEOUT) -> Iterator[int | None]:
    """Under torchrun, hold the process group for the block and yield this rank; else None."""
    if not launched_by_torchrun():
        yield None
        return
    owned = init_from_env(timeout)
    try:
        yield dist.get_rank()
    finally:
        if owned:
            dist.destroy_process_group()


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> tuple[int, int]:
    if dist.is_available() and not dist.is_initialized() and launched_by_torchrun():
        init_from_env()
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sharded(single: Callable[..., T]) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Make a sharded body callable with `single`'s own signature; outside a group, run `single`.

    The body gets this rank, the world size and `single`'s arguments by name (defaults applied),
    so the distributed variants cannot drift from the functions they shard.
    """
    signature = inspect.signature(single)

    def wrap(body: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(body)
        def sharded(*args: Any, **kwargs: Any) -> T:
            here, world = _world()
            if world == 1:
                return single(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return body(here, world, **bound.arguments)

        sharded.__signature__ = signature  # type: ignore[attr-defined]
        return sharded

    return wrap


@_sharded(scan)
def scan_distributed(
    here: int,
    world: int,
    model: Any,
    texts: Sequence[str] | str | Corpus | None,
    config: ScanConfig | None,
    progress: bool,
    settings: dict[str, Any],
) -> ScanResult:
    """:func:`tl_spikesink.probes.scan`, each rank reading its own shard; every rank gets the whole.

    Called as :func:`scan` is (its signature); `here` and `world` come from the decorator.

    Args:
        here: this rank.
        world: the number of ranks.
        model: this rank's model (a whole copy; see the README on large models).
        texts: the same texts (or Corpus) on every rank; None for the default corpus.
        config: settings, the same on every rank.
        progress: show a progress bar (rank 0 only).
        settings: overrides of single fields of `config` (e.g. ``batch_size=4``).

    Returns:
        The merged :class:`ScanResult`, identical on every rank and equal to the
        single-process scan of the corpus; its environment records ``world_size``.

    Raises:
        SpikeSinkError: on every rank, if any rank failed (naming it and its error) or the
            ranks read different corpora.

    Example:
        >>> result = scan_distributed(model, texts, batch_size=4)  # doctest: +SKIP
        >>> if ts.distributed.rank() == 0:  # doctest: +SKIP
        ...     result.to_json("scan.json")
    """
    config = replace(config or ScanConfig(), **settings)

    def task() -> tuple[dict[str, Any], ScanResult | None]:
        corpus = _prepare(model, texts, config)
        shard = corpus.shard(here, world)
        shown = progress and here == 0
        part = scan_corpus(model, shard, config, progress=shown) if shard.chunks else None
        return corpus.describe(), part

    record, parts = _exchange("scan", task, here, world)
    return _whole(_merge(parts), record, world)


@_sharded(evaluate)
def evaluate_distributed(
    here: int,
    world: int,
    model: Any,
    texts_or_corpus: Sequence[str] | str | Corpus | None,
    intervention: Intervention | None,
    config: ScanConfig | None,
    sink_heads: Sequence[tuple[int, int]] | None,
    progress: bool,
) -> Evaluation:
    """:func:`tl_spikesink.evaluation.scoring`, sharded over the ranks; every rank gets the whole.

    Example:
        >>> iv = ts.spike_ablation(result, mode="zero", model=model)  # doctest: +SKIP
        >>> ev = evaluate_distributed(model, texts, iv)  # doctest: +SKIP
        >>> ev.loss, ev.kl  # the single-process numbers, up to summation order  # doctest: +SKIP
    """
    config = config or ScanConfig()
    corpus = _prepare(model, texts_or_corpus, config)
    return evaluate_all_distributed(
        model, corpus, [intervention], config=config, sink_heads=sink_heads, progress=progress
    )[0]


@_sharded(evaluate_all)
def evaluate_all_distributed(
    here: int,
    world: int,
    model: Any,
    corpus: Corpus,
    interventions: Sequence[Intervention | None],
    config: ScanConfig,
    sink_heads: Sequence[tuple[int, int]] | None,
    progress: bool,
) -> list[Evaluation]:
    """:func:`tl_spikesink.evaluation.scoring.evaluate_all`, sharded; :func:`experiment` uses it.

    The clean model's sink heads (whose attention distance every row reports) are a fact of
    the whole corpus, not of a shard: when not given they come from the merged clean
    evaluation if one is asked for, else from a sharded clean scan (one extra forward pass
    over the corpus, which a single process gets for free from its scoring pass).
    """
    shard = corpus.shard(here, world)
    shown = progress and here == 0
    wanted = list(interventions)
    heads = None if sink_heads is None else tuple(tuple(h) for h in sink_heads)

    def run(ivs: list[Intervention | None], heads: tuple) -> list[Evaluation]:
        def task() -> tuple[dict[str, Any], list[Evaluation] | None]:
            if not shard.chunks:
                return corpus.describe(), None
            evs = evaluate_all(model, shard, ivs, config=config, sink_heads=heads, progress=shown)
            return corpus.describe(), evs

        record, parts = _exchange("evaluation", task, here, world)
        merged = [_merge(list(row)) for row in zip(*parts, strict=True)]
        return [replace(ev, scan=_whole(ev.scan, record, world)) for ev in merged]

    clean = None
    if heads is None and None in wanted:
        # Shards would each pick their own sink heads; merge with none, then take the whole's.
        clean = run([None], ())[0]
        heads = clean.scan.sinks.sink_heads
        clean = replace(clean, sink_heads=heads)
    elif heads is None and wanted:
        heads = scan_distributed(model, corpus, config, progress=progress).sinks.sink_heads
    rest = [iv for iv in wanted if iv is not None or clean is None]
    done = iter(run(rest, heads) if rest else [])
    return [clean if iv is None and clean is not None else next(done) for iv in wanted]


def _prepare(model: Any, texts: Sequence[str] | str | Corpus | None, config: ScanConfig) -> Corpus:
    Anatomy.of(model)  # a clear error before tokenizing, if this is no TransformerLens model
    return as_corpus(model, texts, config)


def _exchange(
    what: str, task: Callable[[], tuple[dict[str, Any], T | None]], here: int, world: int
) -> tuple[dict[str, Any], list[T]]:
    """Run `task` on every rank; if all succeed, every rank gets every rank's part, in rank order.

    `task` returns (the corpus record, this rank's part or None for an empty shard). Parts
    travel as torch.save bytes, serialized inside the guarded block so that a part that cannot
    be serialized fails like any other error, and loaded onto the CPU whatever device made them.
    """
    local: Exception | None = None
    try:
        record, part = task()
        buffer = io.BytesIO()
        torch.save(part, buffer)
        outcome = (None, record, buffer.getvalue())
    except Exception as exc:  # every error must reach the other ranks, whatever its type
        local = exc
        outcome = (f"{type(exc).__name__}: {exc}", None, None)
    gathered: list[Any] = [None] * world
    try:
        dist.all_gather_object(gathered, outcome)
    except Exception as exc:
        raise SpikeSinkError(
            f"the sharded {what} lost contact with the other ranks on rank {here} of {world} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); another "
            "process probably died or hung: see its log"
        ) from local or exc
    failed = [f"rank {r} of {world}: {error}" for r, (error, _, _) in enumerate(gathered) if error]
    if failed:
        raise SpikeSinkError(
            f"the sharded {what} failed on {len(failed)} rank(s), so no rank returns a partial "
            f"result; {'; '.join(failed)}"
        ) from local
    records = [record for _, record, _ in gathered]
    if any(r != records[0] for r in records):
        raise SpikeSinkError(
            f"the ranks read different corpora ({[r['sha256'][:12] for r in records]} "
            f"with {[r['n_tokens'] for r in records]} tokens); give every rank the same texts "
            "and settings"
        )
    parts = [
        torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)
        for _, _, blob in gathered
    ]
    return records[0], [p for p in parts if p is not None]


def _merge(parts: list[T]) -> T:
    # Rank order, so every rank builds the same object from the same parts.
    return functools.reduce(lambda a, b: a.merge(b), parts)


def _whole(result: ScanResult, record: dict[str, Any], world: int) -> ScanResult:
    """The merged shards recorded as the one corpus they partition, with the world size."""
    backend = dist.get_backend() if dist.is_initialized() else ""
    env = {**result.environment, "world_size": str(world), "backend": str(backend)}
    return replace(result, corpus=(record,), environment=env)


__all__ = [
    "DEFAULT_TIMEOUT",
    "evaluate_all_distributed",
    "evaluate_distributed",
    "init_from_env",
    "launched_by_torchrun",
    "rank",
    "scan_distributed",
    "torchrun_session",
]
