"""Distributed profiling on a local Ray (2 CPUs): exactness, replica independence, budget, outputs, errors."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch

from esft.scores import ExpertScores, ScoresError, add_rows, profile_rows
from esft.select import load_layer_scores, select_experts
from transformers import AutoModelForCausalLM

from pipeline.data import pack_block
from pipeline.profile import ProfileConfig, run_profile
from esft.demo import synthetic
from tests.conftest import save_model_with_tokenizer, write_jsonl

pytestmark = pytest.mark.usefixtures("local_ray")
SEQ_LEN, BATCH = 64, 4


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_profile_assets(tmp_path_factory.mktemp("profile"))


def make_profile_assets(root) -> dict:
    """A tiny DeepSeek-V2 with a tokenizer, saved as a model directory, and two task corpora."""
    corpus = synthetic.rows("math", 120, seed=1)
    model_dir = save_model_with_tokenizer(root / "model", corpus)
    math = write_jsonl(root / "math.jsonl", corpus)
    chat = write_jsonl(root / "chat.jsonl", [
        {"messages": [{"role": "user", "content": f"Say hello to person {i}."},
                      {"role": "assistant", "content": f"Hello, person number {i}! Have a nice day."}]}
        for i in range(80)
    ])
    return {"root": root, "model": str(model_dir), "math": str(math), "chat": str(chat)}


def config(assets, out, **overrides) -> ProfileConfig:
    values = dict(model=assets["model"], data=[assets["math"]], out=str(out), n_sample_tokens=1500,
                  seq_len=SEQ_LEN, batch_size=BATCH, seed=3)
    return ProfileConfig(**{**values, **overrides})


def packed_rows(assets, budget: int, chunk_rows: int, lines: list[str] | None = None) -> dict[str, np.ndarray]:
    """The math corpus packed as one block by the pipeline's packer, its chunks concatenated."""
    lines = lines or open(assets["math"]).read().splitlines()
    chunks = list(pack_block(pa.table({"text": lines}), kind="jsonl", where=assets["math"], tokenizer=assets["model"],
                             trust_remote_code=False, template="reference", seq_len=SEQ_LEN, seed=3, max_tokens=budget,
                             loss_tokens_only=False, chunk_rows=chunk_rows))
    return {key: np.concatenate([chunk[key] for chunk in chunks]) for key in chunks[0]}


def test_packing_streams_chunks_of_the_same_rows_and_reports_every_skip(assets):
    lines = open(assets["math"]).read().splitlines()
    lines[5:5] = ["not json", '{"messages": []}']  # two malformed rows
    whole = packed_rows(assets, 10**6, chunk_rows=10**9, lines=lines)  # the whole corpus: every row read
    chunks = list(pack_block(pa.table({"text": lines}), kind="jsonl", where=assets["math"], tokenizer=assets["model"],
                             trust_remote_code=False, template="reference", seq_len=SEQ_LEN, seed=3, max_tokens=10**6,
                             loss_tokens_only=False, chunk_rows=BATCH))
    assert len(chunks) > 3 and all(len(c["input_ids"]) == BATCH for c in chunks[:-1])
    for key in ("input_ids", "attention_mask", "token_mask"):
        assert np.array_equal(np.concatenate([c[key] for c in chunks]), whole[key]), key
    assert sum(int(c["skipped_rows"].sum()) for c in chunks) == int(whole["skipped_rows"].sum()) == 2
    assert [e for c in chunks for e in c["skipped_example"] if e][0].startswith(assets["math"])


def test_packed_chunks_reach_the_replicas_as_blocks_of_their_own_from_tasks_of_their_own(assets, monkeypatch, capsys):
    """One read block (a small corpus) must still come out as one block per chunk: as one block
    it would reach a single replica whatever the pool size, and only once all of it is packed."""
    import pipeline.data
    from pipeline.data import packed_dataset, resolve_source
    from pipeline.profile import profiling_stream

    monkeypatch.setattr(pipeline.data, "CHUNK_ROWS", 2 * BATCH)
    source = resolve_source(assets["math"])
    dataset = packed_dataset(source, tokenizer=assets["model"], trust_remote_code=False, template="reference",
                             seq_len=SEQ_LEN, seed=3, max_tokens=10**6, loss_tokens_only=False, batch_size=BATCH)
    rows_per_block = [entry.metadata.num_rows for bundle in dataset.iter_internal_ref_bundles() for entry in bundle.blocks]
    whole = packed_rows(assets, 10**6, chunk_rows=10**9)
    assert sum(rows_per_block) == len(whole["input_ids"]) > 4 * BATCH
    assert all(rows == 2 * BATCH for rows in rows_per_block[:-1]) and 0 < rows_per_block[-1] <= 2 * BATCH
    # Packing runs in its own tasks, not fused into the replicas' actors (one replica x one CPU is
    # the request Ray Data used to fuse it into), so it overlaps their start-up and compute.
    profiling_stream(config(assets, "unused", replicas=1, cpus_per_replica=1.0), source).explain()
    physical = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "ActorPoolMapOperator[MapBatches(RoutingProfiler)]" in physical
    assert "TaskPoolMapOperator[MapBatches(pack_block)->StreamingRepartition" in physical


def single_process_scores(assets, budget: int, threads: int) -> ExpertScores:
    """The same packed rows, profiled in this process with the same batch boundaries and thread
    count as a replica: the same computation, so the same bits."""
    packed = packed_rows(assets, budget, chunk_rows=10**9)
    model = AutoModelForCausalLM.from_pretrained(assets["model"])
    scores = ExpertScores.empty((1, 2, 3), 16, 2)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for start in range(0, len(packed["input_ids"]), BATCH):
            part = {k: torch.from_numpy(packed[k][start:start + BATCH]).long()
                    for k in ("input_ids", "attention_mask", "token_mask")}
            rows = profile_rows(model, part["input_ids"], part["attention_mask"], part["token_mask"])
            for b in range(len(rows)):
                if scores.total_tokens < budget:
                    add_rows(scores, rows.row(b))
    finally:
        torch.set_num_threads(previous_threads)
    return scores


def test_pipeline_sums_equal_single_process_and_do_not_depend_on_replicas(assets, tmp_path, monkeypatch):
    import pipeline.data

    monkeypatch.setattr(pipeline.data, "CHUNK_ROWS", BATCH)  # packed rows stream to the replicas a batch at a time
    # Same batches whatever the replica count, and one thread everywhere: the same computation in
    # every replica and here, so the sums are bit-identical (a different thread count may round
    # the router weights differently on some CPUs; see pipeline/profile.py).
    one = run_profile(config(assets, tmp_path / "one", replicas=1, threads_per_replica=1))[0].scores
    two = run_profile(config(assets, tmp_path / "two", replicas=2, threads_per_replica=1))[0].scores
    expected = single_process_scores(assets, 1500, threads=1)
    for result in (one, two):
        assert np.array_equal(result.selections_LE, expected.selections_LE)
        assert np.array_equal(result.gate_mass_fixed_LE, expected.gate_mass_fixed_LE)
        assert np.array_equal(result.tokens_L, expected.tokens_L)
        assert np.array_equal(result.seq_mean_gate_LE, expected.seq_mean_gate_LE)
    # budget: stop at the first row that reaches it
    assert 1500 <= one.total_tokens < 1500 + SEQ_LEN
    assert one.metadata["tokens_used"] == one.total_tokens
    for function in ("token", "gate"):
        a = select_experts(load_layer_scores(tmp_path / "one", function), top_p=0.2)
        b = select_experts(load_layer_scores(tmp_path / "two", function), top_p=0.2)
        assert a == b


def test_replicas_get_the_same_batches_from_a_corpus_of_many_blocks(assets, tmp_path, monkeypatch):
    """Blocks of different row counts, rebundled into batches: the bundling happens before the
    replicas, so 1 and 2 replicas compute the same batches and the sums are bit-identical."""
    import pipeline.data

    monkeypatch.setattr(pipeline.data, "BLOCK_BYTES", 2048)  # the corpus becomes several blocks
    runs = [run_profile(config(assets, tmp_path / f"r{n}", replicas=n, threads_per_replica=1, n_sample_tokens=4000))[0].scores
            for n in (1, 2)]
    one, two = runs
    assert one.total_tokens >= 4000
    for name in ("tokens_L", "selections_LE", "gate_mass_fixed_LE", "seq_mean_selections_LE", "seq_mean_gate_LE"):
        assert np.array_equal(getattr(one, name), getattr(two, name)), name


def test_outputs_and_multi_task_overlap(assets, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="esft")
    out = tmp_path / "multi"
    results = run_profile(config(assets, out, data=[assets["math"], assets["chat"]], n_sample_tokens=100_000))
    assert [r.task for r in results] == ["math", "chat"]
    for task in ("math", "chat"):
        names = {p.name for p in (out / task).iterdir()}
        assert {"expert_scores.json", "summary.json", "heatmap_token.png", "heatmap_gate.png",
                "concentration.md", "concentration.json"} <= names
        summary = json.loads((out / task / "summary.json").read_text())
        assert list(summary["token_scores"]) == ["1", "2", "3"]
    overlap = json.loads((out / "overlap.json").read_text())
    shared = overlap["pairs"]["math|chat"]
    assert len(shared) == 3 and all(0 <= n <= 16 for n in shared)
    # a budget larger than the data is a warning, and the whole corpus is used
    assert "holds only" in caplog.text
    assert results[1].scores.metadata["tokens_used"] < 100_000


def test_loss_tokens_only_counts_fewer_tokens(assets, tmp_path):
    everything = run_profile(config(assets, tmp_path / "all", n_sample_tokens=10**6))[0].scores
    answers = run_profile(config(assets, tmp_path / "loss", n_sample_tokens=10**6, loss_tokens_only=True))[0].scores
    assert 0 < answers.total_tokens < everything.total_tokens


def test_bad_inputs_fail_clearly_and_write_nothing(assets, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="no such file"):
        run_profile(config(assets, out, data=[str(tmp_path / "missing.jsonl")]))
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("this is not json\n")
    with pytest.raises(ValueError, match=r"garbage.jsonl:1"):
        run_profile(config(assets, out, data=[str(garbage)]))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        run_profile(config(assets, out, batch_size=0))
    with pytest.raises(ValueError, match="threads_per_replica must be a positive integer"):
        run_profile(config(assets, out, threads_per_replica=0))
    llama = tmp_path / "llama"
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=100, hidden_size=32, intermediate_size=64,
                                                          num_hidden_layers=2, num_attention_heads=2)).save_pretrained(llama)
    with pytest.raises(ValueError, match="unsupported model family 'llama'"):
        run_profile(config(assets, out, model=str(llama)))
    with pytest.raises(ValueError, match="the cluster has 0 GPUs"):
        run_profile(config(assets, out, gpus_per_replica=1))
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


def test_zero_usable_tokens_is_an_error(assets, tmp_path):
    import pyarrow.parquet as pq

    wrong_columns = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"question": ["q1", "q2"], "answer": ["a1", "a2"]}), wrong_columns)
    with pytest.raises(ScoresError, match=r"no usable tokens to profile \(skipped 2 malformed rows: .*wrong.parquet"):
        run_profile(config(assets, tmp_path / "out", data=[str(wrong_columns)]))
    assert not (tmp_path / "out").exists()


def test_cli_profile_then_select(assets, tmp_path):
    from pipeline.cli import main as esft

    out = tmp_path / "cli"
    assert esft(["profile", "--model", assets["model"], "--data", assets["chat"], "--out", str(out),
                 "--n-sample-tokens", "500", "--seq-len", str(SEQ_LEN)]) == 0
    assert esft(["select", "--scores", str(out), "--score-function", "gate", "--top-p", "0.1",
                 "--out", str(tmp_path / "cfg.json")]) == 0
    assert set(json.loads((tmp_path / "cfg.json").read_text())["experts"]) == {"1", "2", "3"}


def test_cpu_replicas_by_default_follow_the_budget_within_the_cpus_and_memory(assets, tmp_path):
    import ray

    from pipeline.cluster import TOKENS_PER_CPU_REPLICA, auto_cpu_replicas
    from pipeline.profile import with_replica_count

    memory = ray.cluster_resources()["memory"]  # the local Ray of these tests: 2 CPUs
    assert auto_cpu_replicas(16384, 10**6) == 1  # a small budget: one replica with every thread
    assert auto_cpu_replicas(2 * TOKENS_PER_CPU_REPLICA, 10**6) == 2
    assert auto_cpu_replicas(8 * TOKENS_PER_CPU_REPLICA, 10**6) == 2  # never more than the CPUs
    assert auto_cpu_replicas(8 * TOKENS_PER_CPU_REPLICA, int(memory // 3)) == 1  # two copies at 2x would not fit
    assert auto_cpu_replicas(8 * TOKENS_PER_CPU_REPLICA, int(memory)) == 1  # not even one fits: still one, never zero
    big_budget = config(assets, tmp_path, n_sample_tokens=2 * TOKENS_PER_CPU_REPLICA)
    assert with_replica_count(big_budget, 10**6).replicas == 2
    assert with_replica_count(replace(big_budget, replicas=1), 10**6).replicas == 1  # the user's choice stands
    assert with_replica_count(replace(big_budget, gpus_per_replica=1.0), 10**6).replicas == 1
    # the default run: 2 one-thread replicas on the 2 CPUs, the sums those of one one-thread replica, bit for bit
    auto = run_profile(config(assets, tmp_path / "auto", n_sample_tokens=2 * TOKENS_PER_CPU_REPLICA))[0]
    single = run_profile(config(assets, tmp_path / "one", n_sample_tokens=2 * TOKENS_PER_CPU_REPLICA, replicas=1,
                                threads_per_replica=1))[0]
    for name in ("tokens_L", "selections_LE", "gate_mass_fixed_LE"):
        assert np.array_equal(getattr(auto.scores, name), getattr(single.scores, name)), name
