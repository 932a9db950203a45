"""The ablation table: train each variant over several seeds and measure it with the scan.

One row per variant; columns the final probe loss, the max spike / median ratio of the residual
stream (any token, then the first token's alone), the sink ratio, the largest first-token sink
score, and the attention distance of the sink heads, each the mean ± standard
deviation over seeds (seed s trains with TrainConfig.seed = base + s: a new initialization and
data order on the same task). A value that does not exist for a seed (no sink head: no sink
distance) is left out of that column's mean, and the column says over how many seeds it is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.results import Result
from tl_spikesink.training.runs import TrainConfig, TrainingRun, train
from tl_spikesink.training.tasks import BigramBackcopy, Task
from tl_spikesink.training.variants import VARIANTS, Variant, variant
from tl_spikesink.views.format import text_table

COLUMNS: tuple[str, ...] = (
    "perplexity",
    "loss",
    "sink_ratio",
    "max_abs",
    "max_spike_ratio",
    "bos_spike_ratio",
    "max_sink_score",
    "sink_head_distance",
)
"""What the table reports: the run's held-out perplexity, then final Snapshot fields."""


@dataclass(frozen=True)
class SeedStat:
    """A quantity measured once per seed: its mean and standard deviation over seeds."""

    values: tuple[float, ...]
    """One value per seed (NaN where the quantity does not exist)."""

    @property
    def present(self) -> tuple[float, ...]:
        """The values that exist."""
        return tuple(v for v in self.values if not math.isnan(v))

    @property
    def mean(self) -> float:
        """Mean over the seeds where the value exists (NaN if none)."""
        p = self.present
        return sum(p) / len(p) if p else math.nan

    @property
    def spread(self) -> float:
        """Sample standard deviation over those seeds (0 for one seed)."""
        p = self.present
        if len(p) < 2:
            return 0.0 if p else math.nan
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in p) / (len(p) - 1))

    def __str__(self) -> str:
        p = self.present
        if not p:
            return "-"
        digits = 3 if abs(self.mean) < 10 else 1
        text = f"{self.mean:.{digits}f} ± {self.spread:.{digits}f}"
        return text if len(p) == len(self.values) else f"{text} ({len(p)}/{len(self.values)})"

    def to_dict(self) -> dict[str, Any]:
        """Mean, spread and the per-seed values."""
        return {"mean": self.mean, "spread": self.spread, "values": list(self.values)}


@dataclass(frozen=True)
class AblationRow:
    """One variant over its seeds."""

    variant: Variant
    runs: tuple[TrainingRun, ...]

    @property
    def name(self) -> str:
        """The variant's name."""
        return self.variant.name

    def stat(self, column: str) -> SeedStat:
        """The final value of `column` (a Snapshot field) over seeds."""
        if column not in COLUMNS:
            raise SpikeSinkError(f"unknown column {column!r}; choose one of {COLUMNS}")
        if column == "perplexity":
            return SeedStat(tuple(r.perplexity for r in self.runs))
        return SeedStat(tuple(float(getattr(r.final, column)) for r in self.runs))

    def to_dict(self) -> dict[str, Any]:
        """The row as plain data (per-seed values and checkpoints included)."""
        return {
            "variant": self.variant.to_dict(),
            "seeds": [r.config.seed for r in self.runs],
            **{c: self.stat(c).to_dict() for c in COLUMNS},
            "checkpoints": [r.checkpoint for r in self.runs],
        }


@dataclass(frozen=True, repr=False)
class AblationTable(Result):
    """The ablation table, with every run (and so every emergence curve) it came from."""

    rows: tuple[AblationRow, ...]
    config: TrainConfig
    """Settings shared by all rows (the seed is the first seed's)."""
    task: dict[str, Any]

    def row(self, name: str) -> AblationRow:
        """The row of variant `name`."""
        for r in self.rows:
            if r.name == name:
                return r
        raise SpikeSinkError(f"no row {name!r}; rows are {[r.name for r in self.rows]}")

    def merge(self, other: AblationTable) -> AblationTable:
        """The table over both tables' seeds (same variants, settings and task; new seeds)."""
        if [r.name for r in self.rows] != [r.name for r in other.rows]:
            raise SpikeSinkError("tables to merge must have the same variants in the same order")
        if replace(self.config, seed=0) != replace(other.config, seed=0) or self.task != other.task:
            raise SpikeSinkError("tables to merge must share the training settings and the task")
        mine = {run.config.seed for run in self.runs}
        if mine & {run.config.seed for run in other.runs}:
            raise SpikeSinkError("tables to merge must have disjoint seeds")
        rows = tuple(
            AblationRow(a.variant, a.runs + b.runs)
            for a, b in zip(self.rows, other.rows, strict=True)
        )
        return replace(self, rows=rows)

    @property
    def runs(self) -> tuple[TrainingRun, ...]:
        """Every training run, row by row."""
        return tuple(run for r in self.rows for run in r.runs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready table: settings, rows, and every run's emergence history."""
        from tl_spikesink.views.format import json_clean

        return json_clean(
            {
                "config": asdict(self.config),
                "task": self.task,
                "rows": [r.to_dict() for r in self.rows],
                "runs": [run.to_dict() for run in self.runs],
            }
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AblationTable:
        """The table :meth:`to_dict` wrote, every run and emergence curve included."""
        runs = {}
        for r in d["runs"]:
            run = TrainingRun.from_dict(r)
            runs[run.variant.name, run.config.seed] = run
        rows = tuple(
            AblationRow(
                Variant.from_dict(row["variant"]),
                tuple(runs[row["variant"]["name"], s] for s in row["seeds"]),
            )
            for row in d["rows"]
        )
        return cls(rows, TrainConfig.from_dict(d["config"]), dict(d["task"]))

    def __str__(self) -> str:
        return render(self)


HEADER: dict[str, str] = {
    "perplexity": "held-out ppl",
    "max_abs": "Spike",
    "loss": "final loss",
    "max_spike_ratio": "spike/med",
    "bos_spike_ratio": "BOS spike/med",
    "sink_ratio": "sink ratio",
    "max_sink_score": "max BOS α",
    "sink_head_distance": "sink dist",
}
"""Short column titles of the text and HTML tables."""


def summary_rows(t: AblationTable) -> list[dict[str, str]]:
    """One dict per variant: the columns as "mean ± sd" text (the text and HTML tables)."""
    return [
        {
            "variant": r.name,
            "seeds": str(len(r.runs)),
            **{HEADER[c]: str(r.stat(c)) for c in COLUMNS},
        }
        for r in t.rows
    ]


def settings_line(t: AblationTable) -> str:
    """The shared training settings, in one line."""
    c = t.config
    return (
        f"{t.task.get('kind')}: {c.n_layers} layers, d_model {c.d_model}, d_head {c.d_head}, "
        f"d_mlp {c.d_mlp}, {c.steps} steps of {c.batch_size}x{c.seq_len}, lr {c.lr:g}, "
        f"wd {c.weight_decay:g}"
    )


def render(t: AblationTable) -> str:
    """The text table `print(table)` and the CLI show."""
    rows = summary_rows(t)
    return "\n".join(
        [
            f"tl_spikesink ablation on {settings_line(t)}",
            "",
            *text_table(list(rows[0]), [list(r.values()) for r in rows]),
            "",
            "mean ± sd over seeds (k/n: the value exists for k of n seeds). held-out ppl: on text",
            "no run trained on; the rest on the final probe batch. sink ratio: the paper's Eq. 28",
            f"(T = min(length, 64), ε = {t.config.epsilon}); Spike: the largest |x| at resid_post",
            "(the paper's absolute Spike, read in every channel); spike/med: max over layers of",
            "resid_post top-1 |x| / median |x| (any token); BOS spike/med: the same on the first",
            "token only; max BOS α: the largest first-token score of any head; sink dist: mean",
            "attention distance of the first-token sink heads (tokens).",
        ]
    )


def load_table(path: str | Path) -> AblationTable:
    """Read a table written by :meth:`AblationTable.to_json` (or ``tl-spikesink ablate --json``)."""
    import json

    try:
        return AblationTable.from_dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SpikeSinkError(
            f"{path} is not an ablation table ({type(e).__name__}: {e}); pass the file that "
            "AblationTable.to_json or `tl-spikesink ablate --json` wrote"
        ) from None


def ablation_study(
    variants: Sequence[str | Variant] | str = ("baseline", "sandwich", "gate_input"),
    *,
    seeds: int | Sequence[int] = 3,
    config: TrainConfig | None = None,
    task: Task | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    workers: int = 1,
    finished_only: bool = False,
    reuse: AblationTable | str | Path | None = None,
) -> AblationTable:
    """Train every variant over `seeds` seeds and tabulate the final measurements.

    Args:
        variants: names from :data:`~tl_spikesink.training.variants.VARIANTS` or Variant objects,
            or "all" for every named variant; "paper" for every row of the paper's Tables 3–8
            (:data:`~tl_spikesink.training.tables.PAPER_ROWS`), "paper:NAME" for one of them.
        seeds: how many seeds per variant (config.seed, config.seed + 1, ...), or the seeds
            themselves (tables of disjoint seeds, e.g. from parallel processes, merge).
        config: size and optimization settings (default :class:`TrainConfig`).
        task: the data (default :class:`BigramBackcopy`).
        out: folder for checkpoints, one subfolder per run (``{variant}/seed{s}``); none if None.
            Each run is saved as it finishes, and a run whose folder already holds a finished
            run of the same variant, settings and task is read back instead of trained again,
            so a long table can be built over several sittings.
        progress: show progress bars.
        workers: train this many runs at once, each in its own process with one thread (tiny
            models train faster as parallel single-threaded runs than as one multi-threaded
            run). Runs are seeded, so the table does not depend on the number of workers, up
            to the floating-point differences of thread counts. Workers are spawned and
            re-import the calling script, which therefore needs an
            ``if __name__ == "__main__":`` guard (notebooks and the CLI need nothing).
        finished_only: train nothing: tabulate the finished runs found under `out` (and in
            `reuse`), each row with the seeds it has; rows with none are left out. A table
            still being built over several sittings can be read at any time.
        reuse: a table (or the JSON file :meth:`AblationTable.to_json` wrote) whose runs of the
            same variant, settings, task and seed are taken as they are, not trained again.
            Checkpoints are not committed, but a table's JSON is: with it a table can be
            finished on another machine, or after its checkpoint folder is gone.

    Returns:
        The :class:`AblationTable`; `print(table)` shows it.
    """
    config = config or TrainConfig()
    chosen = resolve_variants(variants, config)
    task = task or BigramBackcopy()
    if isinstance(seeds, int):
        seeds = [config.seed + s for s in range(seeds)]
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise SpikeSinkError(f"seeds must be a positive count or distinct seeds, got {seeds}")
    if workers < 1:
        raise SpikeSinkError(f"workers must be at least 1, got {workers}")
    jobs = [
        (v, replace(config, seed=s), task, None if out is None else Path(out) / v.name / f"seed{s}")
        for v in chosen
        for s in seeds
    ]
    if finished_only and out is None and reuse is None:
        raise SpikeSinkError(
            "finished_only reads runs back: give `out`, the folder they were saved in, or "
            "`reuse`, a table that holds them"
        )
    reused = {} if reuse is None else _runs_by_key(reuse)
    done: dict[tuple[str, int], TrainingRun] = {}
    todo = []
    for job in jobs:
        if (known := _known_run(*job, reused)) is not None:
            done[job[0].name, job[1].seed] = known
        else:
            todo.append(job)
    if finished_only:
        return _finished_table(chosen, seeds, done, config, task, out)
    bar = tqdm(total=len(todo), desc="ablate", unit="run", disable=not progress)
    if workers == 1 or not todo:  # nothing to train: no pool to start
        for job in todo:
            bar.set_postfix_str(f"{job[0].name} seed {job[1].seed}")
            done[job[0].name, job[1].seed] = _train_job(*job, progress=progress)
            bar.update()
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed
        from concurrent.futures.process import BrokenProcessPool

        # spawn, not fork: a forked child inherits the parent's torch thread pools and locks.
        context = multiprocessing.get_context("spawn")
        try:
            with ProcessPoolExecutor(min(workers, len(todo)), mp_context=context) as pool:
                futures = [pool.submit(_train_job, *job, progress=False, threads=1) for job in todo]
                for future in as_completed(futures):
                    run = future.result()
                    done[run.variant.name, run.config.seed] = run
                    bar.set_postfix_str(f"{run.variant.name} seed {run.config.seed}")
                    bar.update()
        except BrokenProcessPool:
            raise SpikeSinkError(
                "a training worker died before finishing. Spawned workers re-import the calling "
                "script: call ablation_study(..., workers=N) from a notebook, the CLI, or a script "
                "file under `if __name__ == '__main__':` (not from stdin), or use workers=1"
            ) from None
    bar.close()
    rows = tuple(AblationRow(v, tuple(done[v.name, s] for s in seeds)) for v in chosen)
    return AblationTable(rows, replace(config, seed=seeds[0]), task.to_dict())


def resolve_variants(variants: Sequence[str | Variant] | str, config: TrainConfig) -> list[Variant]:
    """Variants from names ("all", "paper", "paper:NAME", a VARIANTS name) or Variant objects."""
    from tl_spikesink.training.tables import paper_row, paper_variants

    if isinstance(variants, str):
        variants = [variants]
    chosen: list[Variant] = []
    for v in variants:
        if v == "all":
            chosen += VARIANTS.values()
        elif v == "paper":
            chosen += paper_variants(config)
        elif isinstance(v, str) and v.startswith("paper:"):
            chosen.append(paper_row(v.removeprefix("paper:")).variant(config))
        else:
            chosen.append(variant(v))
    names = [v.name for v in chosen]
    if not chosen or len(set(names)) != len(names):
        raise SpikeSinkError(f"variants must be non-empty with distinct names, got {names}")
    return chosen


def _finished_table(
    chosen: list[Variant],
    seeds: list[int],
    done: dict[tuple[str, int], TrainingRun],
    config: TrainConfig,
    task: Task,
    out: Any,
) -> AblationTable:
    rows = []
    for v in chosen:
        if runs := tuple(done[v.name, s] for s in seeds if (v.name, s) in done):
            rows.append(AblationRow(v, runs))
    if not rows:
        raise SpikeSinkError(
            f"no finished run under {out} (or in the reused table) has these variants, settings "
            "and task; check the folder and that the settings are the ones the runs were "
            "trained with"
        )
    return AblationTable(tuple(rows), replace(config, seed=seeds[0]), task.to_dict())


def _runs_by_key(reuse: AblationTable | str | Path) -> dict[tuple[str, int], TrainingRun]:
    table = reuse if isinstance(reuse, AblationTable) else load_table(reuse)
    return {(run.variant.name, run.config.seed): run for run in table.runs}


def _known_run(
    v: Variant,
    config: TrainConfig,
    task: Task,
    out: Path | None,
    reused: dict[tuple[str, int], TrainingRun],
) -> TrainingRun | None:
    run = reused.get((v.name, config.seed))
    if run is not None and _same_run(run, v, config, task):
        return run
    return None if out is None else finished_run(v, config, task, out)


def _same_run(run: TrainingRun, v: Variant, config: TrainConfig, task: Task) -> bool:
    import json

    same_task = json.loads(json.dumps(task.to_dict())) == run.task
    return run.variant == v and run.config == config and same_task


def finished_run(v: Variant, config: TrainConfig, task: Task, out: Path) -> TrainingRun | None:
    """The run saved in `out` if it trained `v` under `config` on `task` (else None)."""
    import json

    try:
        run = TrainingRun.from_dict(json.loads((out / "meta.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return replace(run, checkpoint=str(out)) if _same_run(run, v, config, task) else None


def _train_job(
    v: Variant,
    config: TrainConfig,
    task: Task,
    out: Path | None,
    *,
    progress: bool,
    threads: int | None = None,
) -> TrainingRun:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    return train(v, config, task, out=out, progress=progress)[1]


__all__ = [
    "AblationRow",
    "AblationTable",
    "SeedStat",
    "ablation_study",
    "finished_run",
    "load_table",
    "resolve_variants",
]
