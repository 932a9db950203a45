"""Sharded scans and evaluations on torch.distributed (gloo, CPU): the merged result is the whole.

One group of WORLD processes is spawned once for the module (imports dominate the cost) and runs
every scenario in order; each rank saves what it got, and the tests compare that with the
single-process answer computed here on the same planted model.
"""

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from checks import assert_same_scan
from planted import planted_model, sentences

import tl_spikesink as ts
from tl_spikesink.evaluation.decoupling import experiment
from tl_spikesink.evaluation.scoring import evaluate_all
from tl_spikesink.interventions import spike_ablation
from tl_spikesink.probes.scan import ScanConfig

WORLD = 3
TEXTS = sentences(8, seed=7, min_words=3, max_words=40)
"""8 sequences over 3 ranks: shards of 3, 3 and 2 (uneven)."""
FEW = TEXTS[:2]
"""2 sequences over 3 ranks: rank 2's shard is empty."""
CALIBRATION = sentences(5, seed=8)
CONFIG = ScanConfig(batch_size=3)
DEADLINE_S = 240
"""Generous bound on the whole group; a hang would hit it instead of stalling CI."""


def scoring_model():
    """The planted model with a random unembedding, so losses and KL are not trivial."""
    model = planted_model()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.unembed.W_U.copy_(torch.randn(model.unembed.W_U.shape, generator=gen))
    return model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One rank: every scenario in order, then a rank that raises, then a rank that dies."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=DEADLINE_S),
    )
    model = scoring_model()
    got = {}
    got["uneven"] = ts.distributed.scan_distributed(model, TEXTS, CONFIG, progress=False)
    got["empty"] = ts.distributed.scan_distributed(model, FEW, CONFIG, progress=False)
    # The decoupling table: clean, then every standard intervention, each evaluation sharded.
    got["table"] = experiment(
        model, TEXTS, calibration=CALIBRATION, config=CONFIG, progress=False, distributed=True
    )
    # Without a clean row the sink heads come from a sharded clean scan.
    zero = spike_ablation(got["uneven"], mode="zero", model=model)
    got["without_clean"] = ts.distributed.evaluate_all_distributed(
        model, ts.tokenize(model, TEXTS), [zero], config=CONFIG, progress=False
    )[0]
    got["evaluation_few"] = ts.distributed.evaluate_distributed(model, FEW, config=CONFIG, progress=False)
    got["hooks_left"] = [name for name, hp in model.hook_dict.items() if hp.fwd_hooks]

    if rank == 1:
        import tl_spikesink.distributed as d

        def broken(*args, **kwargs):
            raise RuntimeError("planted failure")

        d.scan_corpus = broken
    start = time.monotonic()
    try:
        ts.distributed.scan_distributed(model, TEXTS, CONFIG, progress=False)
    except ts.SpikeSinkError as e:
        got["error"] = str(e), time.monotonic() - start
    torch.save(got, Path(out_dir) / f"rank{rank}.pt")

    if rank == 2:
        os._exit(3)  # dies without a word, inside the next exchange's wait
    start = time.monotonic()
    try:
        ts.distributed.scan_distributed(model, FEW, CONFIG, progress=False)
    except ts.SpikeSinkError as e:
        torch.save((str(e), time.monotonic() - start), Path(out_dir) / f"lost{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each rank got, and how long the group took."""
    out = tmp_path_factory.mktemp("distributed")
    port = _free_port()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, port, str(out))) for r in range(WORLD)]
    start = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(max(1.0, DEADLINE_S - (time.monotonic() - start)))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, f"ranks {hung} hung"
    assert [p.exitcode for p in procs] == [0, 0, 3]
    got = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    lost = {r: torch.load(out / f"lost{r}.pt", weights_only=False) for r in (0, 1)}
    return got, lost


@pytest.fixture(scope="module")
def model():
    return scoring_model()


@pytest.fixture(scope="module")
def single(model):
    """The single-process decoupling table on the same corpora."""
    return experiment(model, TEXTS, calibration=CALIBRATION, config=CONFIG, progress=False)


@pytest.mark.parametrize("key, texts", [("uneven", TEXTS), ("empty", FEW)])
def test_sharded_scan_equals_the_single_process_scan(ranks, model, key, texts):
    got, _ = ranks
    whole = ts.scan(model, texts, CONFIG, progress=False)
    for r in range(WORLD):
        merged = got[r][key]
        assert_same_scan(merged, whole)
        assert merged.corpus == whole.corpus  # recorded as the one corpus, not as shards
        assert merged.spikes.channels == whole.spikes.channels
        # Shards name the tokens of their own candidates, a superset of the whole's: a lookup.
        assert whole.spikes.token_strings.items() <= merged.spikes.token_strings.items()
        assert merged.environment["world_size"] == str(WORLD)
        assert not got[r]["hooks_left"]
    # Every rank holds the very same result, not just an equal-looking one.
    assert all(
        torch.equal(got[r][key].sinks.alpha_sum, got[0][key].sinks.alpha_sum) for r in (1, 2)
    )


def _same_evaluation(a, b):
    assert (a.name, a.n_predicted, a.agree_sum, a.n_nonfinite) == (
        b.name,
        b.n_predicted,
        b.agree_sum,
        b.n_nonfinite,
    )
    assert a.sink_heads == b.sink_heads
    assert a.loss_sum == pytest.approx(b.loss_sum, rel=1e-9)
    assert a.kl_sum == pytest.approx(b.kl_sum, rel=1e-9, abs=1e-12)
    assert_same_scan(a.scan, b.scan)


def test_sharded_evaluations_equal_the_single_process_ones(ranks, model, single):
    got, _ = ranks
    by_name = {ev.name: ev for ev in single.evaluations}
    assert len(by_name) >= 6 and by_name["zero spikes"].kl > 1e-3  # KL is really compared
    for r in range(WORLD):
        for a, b in zip(got[r]["table"].evaluations, single.evaluations, strict=True):
            _same_evaluation(a, b)
        _same_evaluation(got[r]["without_clean"], by_name["zero spikes"])
    few = evaluate_all(model, ts.tokenize(model, FEW), [None], config=CONFIG, progress=False)
    for r in range(WORLD):  # rank 2's shard is empty
        _same_evaluation(got[r]["evaluation_few"], few[0])


def test_sharded_experiment_table_equals_the_single_process_one(ranks, single):
    got, _ = ranks
    single = single.to_dict()
    for r in range(WORLD):
        sharded = got[r]["table"].to_dict()
        assert [row["name"] for row in sharded["rows"]] == [row["name"] for row in single["rows"]]
        assert (
            sharded["corpus"] == single["corpus"] and sharded["sink_heads"] == single["sink_heads"]
        )
        for a, b in zip(sharded["rows"], single["rows"], strict=True):
            for k in ("n_spike_tokens", "n_nonfinite", "top1_agreement", "sink_ratio"):
                assert a[k] == b[k], (a["name"], k)
            for k in ("loss", "kl", "max_spike_ratio", "sink_head_distance"):
                assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), (a["name"], k)


def test_a_failing_rank_fails_every_rank_with_its_error(ranks):
    got, lost = ranks
    for r in range(WORLD):
        message, seconds = got[r]["error"]
        assert "rank 1 of 3: RuntimeError: planted failure" in message and "partial" in message
        assert seconds < 30
    # A rank that dies outright: the survivors fail at once instead of waiting out the timeout.
    for message, seconds in lost.values():
        assert "lost contact" in message and seconds < 30


def test_outside_a_process_group_it_is_the_plain_scan(planted, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    texts = TEXTS[:4]
    assert_same_scan(
        ts.distributed.scan_distributed(planted, texts, CONFIG, progress=False),
        ts.scan(planted, texts, CONFIG, progress=False),
    )
    with pytest.raises(ts.SpikeSinkError, match="torchrun"):
        ts.distributed.init_from_env()


CLI_RUNNER = """
import sys
sys.path.insert(0, {tests!r})
from planted import planted_model
from tl_spikesink.cli import commands as cli
from tl_spikesink.cli import options
options.load_model = lambda args: planted_model()
sys.exit(cli.main(sys.argv[1:]))
"""


def test_cli_under_torchrun(tmp_path, planted):
    """Two ranks under real torchrun: rank 0 alone prints and writes the merged report."""
    runner = tmp_path / "runner.py"
    runner.write_text(CLI_RUNNER.format(tests=str(Path(__file__).parents[1])))
    text_file = tmp_path / "texts.txt"
    text_file.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "scan.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    command += ["2", str(runner), "scan", "--text-file", str(text_file), "--batch-size", "3"]
    command += ["--json", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=DEADLINE_S, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("tl_spikesink scan of") == 1  # printed once, by rank 0
    report = ts.scan(planted, TEXTS, CONFIG, progress=False)
    written = json.loads(out.read_text())
    assert written["n_tokens"] == report.n_tokens
    assert written["environment"]["world_size"] == "2"
    assert written["spikes"] == json.loads(report.to_json())["spikes"]
