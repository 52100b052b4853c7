"""`esft tune`: sweeps of 1-3 trials on a tiny model: MLflow parent + nested runs, one profile, a duplicate
selection not retrained, the registry entry, a driver that dies and resumes, a failed trial; ASHA stopping
a trial early from its forwarded validation steps; Optuna's proposals and a searcher that survives a dead
driver; bench/asha_replay.py replaying recorded curves through ASHA."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from esft.demo import synthetic
from esft.trainable import merge_adapter
from tests.conftest import save_model_with_tokenizer, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune_assets")
    task = synthetic.rows("math", 260, seed=5)
    save_model_with_tokenizer(root / "model", task + synthetic.rows("general", 40, seed=6))
    write_jsonl(root / "train.jsonl", task[:240])
    write_jsonl(root / "eval.jsonl", task[240:])
    write_jsonl(root / "general.jsonl", synthetic.rows("general", 40, seed=6))
    return root


@pytest.fixture
def fresh_ray():
    import ray

    ray.shutdown()
    yield
    ray.shutdown()


def sweep_yaml(assets: Path, run_dir: Path, **extra) -> Path:
    config = {
        "name": "tune-test", "run_dir": str(run_dir), "model": str(assets / "model"),
        "train_data": str(assets / "train.jsonl"), "eval_data": str(assets / "eval.jsonl"),
        "general_data": str(assets / "general.jsonl"),
        "profile": {"n_sample_tokens": 1024, "seq_len": 64, "batch_size": 8},
        "train": {"workers": 1, "deepspeed": "zero0", "steps": 4, "batch_size": 2, "seq_len": 64, "lr": 1e-3,
                  "eval_every": 2, "save_every": 4, "eval_rows": 4},
        "eval": {"metric": ["numeric"], "max_new_tokens": 6, "batch_size": 20},
        # A grid of 2 x 2 points: token / gate ranking x a budget of 1 or all 16 experts ("all 16" is one selection
        # for both score functions). The sweeps below narrow it, or replace it with a searcher.
        "search": {"token_top_p": [], "gate_top_p": [], "experts_per_layer": [1, 16],
                   "budget_score_functions": ["token", "gate"]},
        "register": {"model_name": "tune-test"}, **extra,
    }
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def mlflow_runs(run_dir: Path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("esft-sweeps")
    runs = client.search_runs([experiment.experiment_id])
    return (client, [r for r in runs if r.data.tags.get("esft.kind") == "sweep"],
            [r for r in runs if r.data.tags.get("esft.kind") == "trial"])


def kill_driver_after(config_file: Path, run_dir: Path, env: dict, completed_trials: int) -> dict:
    """`esft tune` in its own process, killed (SIGKILL: a crash, or a lost head node) as soon as its journal
    records `completed_trials` completed trials; returns the journal as it was then."""
    from pipeline.sweep_journal import completed, load_journal

    log = run_dir.parent / f"{run_dir.name}-driver.log"
    with log.open("w") as output:
        driver = subprocess.Popen([sys.executable, "-m", "pipeline", "tune", "--config", str(config_file)], cwd=ROOT, env=env,
                                  stdout=output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 900
        try:
            while len(completed(journal := load_journal(run_dir))) < completed_trials:
                assert driver.poll() is None, f"the driver ended before it was killed:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"no {completed_trials} completed trials in 900 s:\n{log.read_text()[-3000:]}"
                time.sleep(0.2)
        finally:
            driver.kill()
            driver.wait()
    return journal


def plant_pickles(run_dir: Path) -> Path:
    """Replace every pickle in the run directory (Tune's experiment state, its searcher's) with one that would
    leave a marker file if anything unpickled it; returns the marker's path."""
    import pickle

    marker = run_dir.parent / "unpickled"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    planted = list(run_dir.rglob("*.pkl"))
    for path in planted:
        path.write_bytes(pickle.dumps(Payload()))
    assert planted  # Tune keeps its experiment state as pickles: there is something to refuse
    return marker


@pytest.mark.slow  # a whole sweep
def test_a_failing_trial_is_marked_failed_in_mlflow(assets, tmp_path, fresh_ray, monkeypatch):
    import ray

    from pipeline.config import build_config, read_yaml
    from pipeline.tune import SweepConfig, run_sweep
    from pipeline.train import PROGRESS_FILE
    from tests.faults import kill_a_train_worker_when

    # A Train worker is killed once training has begun and the trial allows no restart: the trial fails.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ray.init(num_cpus=2, include_dashboard=False)
    run_dir = tmp_path / "failing"
    config = build_config(SweepConfig, read_yaml(sweep_yaml(assets, run_dir)), {})
    config.search = {"token_top_p": [0.5], "gate_top_p": []}
    config.train.update(max_failures=0, save_every=2)
    def training_has_begun() -> bool:
        return any(p.read_text().strip() for p in run_dir.rglob(PROGRESS_FILE))

    with kill_a_train_worker_when(training_has_begun) as killed:
        summary = run_sweep(config)
    assert len(killed) == 1
    assert summary["best"] is None and summary["registered"] is None
    assert summary["rows"][0]["status"].startswith("failed")
    _, parents, trials = mlflow_runs(run_dir)
    assert [t.info.status for t in trials] == ["FAILED"] and "esft.error" in trials[0].data.tags
    assert parents[0].info.status == "FAILED"
    assert json.loads((run_dir / "sweep_summary.json").read_text())["registered"] is None


def test_an_abort_that_hangs_kills_the_train_controller(fresh_ray, monkeypatch):
    """A stopped trial's Train controller that cannot take the abort call (e.g. blocked on a full report queue)
    is killed after ABORT_TIMEOUT_S; one that takes it is left to end by itself."""
    import ray
    from ray.exceptions import RayActorError
    from ray.util.queue import Queue

    import pipeline.tune as tune_module

    @ray.remote(num_cpus=0)
    class Controller:
        def __init__(self, hangs: bool):
            self.hangs = hangs

        def abort(self):
            if self.hangs:
                time.sleep(3600)

        def alive(self):
            return True

    ray.init(num_cpus=2, include_dashboard=False)
    monkeypatch.setattr(tune_module, "ABORT_TIMEOUT_S", 1)
    for hangs in (False, True):
        controller = Controller.remote(hangs)
        tune_module._LIVE_TRAIN_RUN.clear()
        tune_module._LIVE_TRAIN_RUN["handoff"] = Queue(actor_options={"num_cpus": 0})
        tune_module._LIVE_TRAIN_RUN["handoff"].put(controller)
        started = time.monotonic()
        tune_module._abort_live_train_run()
        assert tune_module._LIVE_TRAIN_RUN["aborted"]
        if hangs:
            assert 1 <= time.monotonic() - started < 30
            with pytest.raises(RayActorError):
                ray.get(controller.alive.remote(), timeout=30)
        else:
            assert ray.get(controller.alive.remote(), timeout=30)
    tune_module._LIVE_TRAIN_RUN.clear()


def test_sweep_config_errors_are_clear(assets, tmp_path):
    from pipeline.cli import main as esft

    bad = sweep_yaml(assets, tmp_path / "bad", search={"token_top_p": [1.5]})
    assert esft(["tune", "--config", str(bad)]) == 2
    empty = sweep_yaml(assets, tmp_path / "empty", search={"token_top_p": [], "gate_top_p": []})
    assert esft(["tune", "--config", str(empty)]) == 2
    unknown = sweep_yaml(assets, tmp_path / "unknown", objective={"metrik": "numeric"})
    assert esft(["tune", "--config", str(unknown)]) == 2
    assert not (tmp_path / "bad").exists() and not (tmp_path / "empty").exists()
    both = sweep_yaml(assets, tmp_path / "both", searcher={"num_samples": 2})  # sweep_yaml gives a grid
    assert esft(["tune", "--config", str(both)]) == 2
    for searcher in ({"token_top_p": [0.5, 0.1]}, {"gate_top_p": [0.1, 1.5]}, {"kinds": ["tokens"]}, {"num_samples": 0},
                     {"lr": [0, 0.1]}, {"algorithm": "hyperopt"}):
        bad = sweep_yaml(assets, tmp_path / "searcher", searcher=searcher)
        config = yaml.safe_load(bad.read_text())
        config.pop("search")
        bad.write_text(yaml.safe_dump(config))
        assert esft(["tune", "--config", str(bad)]) == 2, searcher
    for scheduler in ({"metric": "numeric"}, {"reduction_factor": 1}, {"grace_period": 0}, {"algorithm": "pbt"},
                      {"metric": "objective"}):
        assert esft(["tune", "--config", str(sweep_yaml(assets, tmp_path / "scheduler", scheduler=scheduler))]) == 2, scheduler
    late = sweep_yaml(assets, tmp_path / "late", scheduler={"grace_period": 4})  # train.steps is 4: nothing could be stopped
    assert esft(["tune", "--config", str(late)]) == 2
    assert not (tmp_path / "searcher").exists() and not (tmp_path / "scheduler").exists()


def test_shipped_sweep_configs_build_their_search():
    from pipeline.config import build_config, read_yaml
    from pipeline.tune import SweepConfig, _tune_config

    grid = build_config(SweepConfig, read_yaml(ROOT / "configs" / "sweep.yaml"), {})
    grid.validate()
    assert grid.searcher_config() is None and grid.scheduler_config() is None and len(grid.space().selections()) == 8
    asha = build_config(SweepConfig, read_yaml(ROOT / "configs" / "sweep_asha.yaml"), {})
    asha.validate()
    assert asha.searcher_config().num_samples >= 6 and asha.max_concurrent_trials * asha.train["workers"] <= 2  # a 2-core machine
    tune_config = _tune_config(asha, {**asha.train, "save_every": asha.train["eval_every"]}, "max", journal={})
    assert tune_config.search_alg.metric == "objective"
    assert (tune_config.scheduler.metric, tune_config.scheduler._mode) == ("valid_answer_accuracy", "max")
    assert grid.train == asha.train  # the bench compares them on the same trials


def test_asha_maximises_answer_accuracy_and_minimises_losses_whatever_the_objective():
    from pipeline.tune import SchedulerConfig, make_scheduler

    train = {"steps": 8, "eval_every": 2}
    for objective_mode in ("max", "min"):
        modes = {metric: make_scheduler(SchedulerConfig(metric=metric), train, objective_mode)._mode
                 for metric in ("valid_answer_accuracy", "valid_loss", "general_loss", "loss", "objective")}
        assert modes == {"valid_answer_accuracy": "max", "valid_loss": "min", "general_loss": "min", "loss": "min",
                         "objective": objective_mode}
    assert make_scheduler(SchedulerConfig(metric="valid_answer_accuracy", mode="min"), train, "max")._mode == "min"


def test_optuna_proposals_stay_inside_the_declared_ranges():
    from pipeline.sweep_journal import optuna_history
    from pipeline.tune import SearcherConfig, make_searcher

    config = SearcherConfig(num_samples=16, startup_trials=4, seed=1, kinds=["token", "gate", "token_budget", "gate_budget"],
                            token_top_p=[0.1, 0.6], gate_top_p=[0.02, 0.2], experts_per_layer=[2, 5], lr=[1e-4, 1e-2],
                            train_shared_experts=[False, True])
    config.validate()
    searcher = make_searcher(config, mode="max")
    searcher.set_search_properties(None, None, {})
    seen, journal = [], {}
    for index in range(config.num_samples):
        if index == 8:  # a resumed sweep: a new searcher, told the journal's completed trials
            before = searcher._ot_study.trials
            searcher = make_searcher(config, mode="max", history=optuna_history(journal))
            recorded = searcher._ot_study.trials
            assert [t.state.name for t in recorded] == [t.state.name for t in before]
            assert ([t.params for t in recorded] == [t.params for t in before]
                    and [t.value for t in recorded] == [t.value for t in before])
        proposal = searcher.suggest(str(index))
        selection = proposal["selection"]
        if "top_p" in selection:
            low, high = getattr(config, f"{selection['score_function']}_top_p")
            assert low <= selection["top_p"] <= high
            assert proposal["kind"] == selection["score_function"]
        else:
            assert 2 <= selection["experts_per_layer"] <= 5 and isinstance(selection["experts_per_layer"], int)
            assert proposal["kind"] == f"{selection['score_function']}_budget"
        assert 1e-4 <= proposal["lr"] <= 1e-2 and proposal["train_shared_experts"] in (False, True)
        seen.append(proposal)
        searcher.on_trial_result(str(index), {"objective": None, "training_iteration": 1})  # a step without the objective
        # stopped early (pruned) or finished with an objective that prefers small token top-p
        done = {"objective": 1.0 - selection.get("top_p", 0.5)} if index % 3 else {"objective": None}
        searcher.on_trial_complete(str(index), done)
        journal[str(index)] = {"trial_id": str(index), "config": proposal, "status": "finished" if index % 3 else "stopped",
                               "result": {**done, "evaluated": bool(index % 3)}, "error": None}
    assert {p["kind"] for p in seen} == set(config.kinds)
    states = [t.state.name for t in searcher._ot_study.trials]
    assert states.count("PRUNED") == 6 and states.count("COMPLETE") == 10


def test_a_resumed_searcher_proposes_the_interrupted_trials_first():
    from pipeline.sweep_journal import optuna_history, optuna_params
    from pipeline.tune import SearcherConfig, make_searcher

    config = SearcherConfig(num_samples=6, startup_trials=1, kinds=["token", "gate_budget"], experts_per_layer=[1, 8],
                            lr=[1e-4, 1e-2], train_shared_experts=[False, True])
    first = make_searcher(config, mode="min")
    proposals = [first.suggest(str(i)) for i in range(3)]
    journal = {"0": {"trial_id": "0", "config": proposals[0], "status": "finished", "result": {"objective": 0.5}},
               "1": {"trial_id": "1", "config": proposals[1], "status": "failed", "result": {}}}
    resumed = make_searcher(config, mode="min", history=optuna_history(journal), pending=[optuna_params(proposals[2])])
    again = resumed.suggest("new")
    assert {k: again[k] for k in ("selection", "lr", "train_shared_experts")} == \
        {k: proposals[2][k] for k in ("selection", "lr", "train_shared_experts")}  # the interrupted trial, same config
    assert [(t.state.name, t.value) for t in resumed._ot_study.trials[:2]] == [("COMPLETE", 0.5), ("FAIL", None)]


def test_a_searcher_starts_from_its_points_to_evaluate_once():
    from pipeline.sweep_journal import optuna_history
    from pipeline.tune import SearcherConfig, make_searcher

    start = [{"kind": "token", "token_top_p": 0.2, "lr": 1e-3, "train_shared_experts": False},
             {"kind": "gate_budget", "experts_per_layer": 3}]
    config = SearcherConfig(num_samples=5, startup_trials=1, seed=3, kinds=["token", "gate_budget"],
                            experts_per_layer=[1, 8], lr=[1e-4, 1e-2], train_shared_experts=[False, True],
                            points_to_evaluate=start)
    config.validate()
    first = make_searcher(config, mode="max")
    proposals = [first.suggest(str(i)) for i in range(3)]
    assert proposals[0]["selection"] == {"score_function": "token", "top_p": 0.2}
    assert proposals[0]["lr"] == 1e-3 and proposals[0]["train_shared_experts"] is False
    assert proposals[1]["selection"] == {"score_function": "gate", "experts_per_layer": 3}  # lr and shared drawn
    assert 1e-4 <= proposals[1]["lr"] <= 1e-2
    # Resumed after the first point finished: the second point comes next, the first is not run again.
    journal = {"0": {"trial_id": "0", "config": proposals[0], "status": "finished", "result": {"objective": 0.5}}}
    resumed = make_searcher(config, mode="max", history=optuna_history(journal))
    again = resumed.suggest("new")
    assert again["selection"] == {"score_function": "gate", "experts_per_layer": 3}
    # Resumed after both: neither is proposed again.
    journal["1"] = {"trial_id": "1", "config": proposals[1], "status": "stopped", "result": {"objective": None}}
    later = make_searcher(config, mode="max", history=optuna_history(journal))
    assert later._start == []


@pytest.mark.parametrize("point, message", [
    ({"kind": "gate", "gate_top_p": 0.1}, "whose kind is one of searcher.kinds"),
    ({"kind": "token", "token_top_p": 0.9}, "token_top_p 0.9 is outside searcher.token_top_p"),
    ({"kind": "token"}, "a token point gives kind, token_top_p"),
    ({"kind": "token", "token_top_p": 0.2, "lr": 1e-3}, "lr is not searched"),
    ({"kind": "token", "token_top_p": 0.2, "train_shared_experts": True}, "train_shared_experts True is not among"),
    ({"kind": "token", "token_top_p": 0.2, "train_shared_experts": 0}, "train_shared_experts 0 is not among"),
    ({"kind": "token", "token_top_p": "2e-1"}, "token_top_p must be a number, got '2e-1'"),
    ({"kind": "token_budget", "experts_per_layer": 2.5}, "experts_per_layer must be an integer"),
    ("token", "must be a mapping"),
])
def test_points_to_evaluate_outside_the_space_are_refused(point, message):
    from pipeline.config import ConfigError
    from pipeline.tune import SearcherConfig

    config = SearcherConfig(kinds=["token", "token_budget"], points_to_evaluate=[point])
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.validate()


def _train_actors_left() -> list[str]:
    """Ray Train / Tune actors still alive: a stopped trial's Train controller and workers, its queues, Ray
    Train's placement-group cleaner, trial actors. (Read from the GCS: the state API needs the dashboard,
    which these tests do not start.)"""
    from ray._private.state import actors

    kinds = ("TrainController", "RayTrainWorker", "_QueueActor", "PlacementGroupCleaner", "run_trial")
    return [a["ActorClassName"] for a in actors().values() if a["State"] != "DEAD" and a["ActorClassName"].endswith(kinds)]


@pytest.mark.slow  # a whole sweep
def test_asha_stops_a_falling_behind_trial_cleanly(assets, tmp_path, fresh_ray, monkeypatch):
    import ray

    from pipeline.config import build_config, read_yaml
    from pipeline.tune import SweepConfig, run_sweep

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ray.init(num_cpus=2, include_dashboard=False)
    run_dir = tmp_path / "asha"
    # One selection, three learning rates run one after the other: on this tiny model lr 0.5 learns far faster
    # than 0.001 and 0.0005, so at the rung (step 2 of 4) the later trials' validation losses are behind and
    # ASHA stops both. The third trial runs in the stopped second one's process (Tune reuses trial processes),
    # whose Train run the reset must abort first.
    config = build_config(SweepConfig, read_yaml(sweep_yaml(assets, run_dir, scheduler={"grace_period": 2})), {})
    config.search = {"token_top_p": [], "gate_top_p": [], "experts_per_layer": [16], "lr": [0.5, 0.001, 0.0005]}
    summary = run_sweep(config)

    rows = {r["lr"]: r for r in summary["rows"]}
    assert rows[0.5]["status"] == "trained" and summary["best"]["lr"] == 0.5
    for lr in (0.001, 0.0005):
        assert rows[lr]["status"] == "stopped early at step 2" and rows[lr]["metric"] is None
        stopped_work = Path(rows[lr]["work_dir"])
        assert (stopped_work / "train" / "ray" / "train" / "checkpoint_000002").is_dir()  # kept: it could be continued
        assert not (stopped_work / "result.json").exists()

    client, parents, trials = mlflow_runs(run_dir)
    assert all(t.info.status == "FINISHED" for t in trials)  # not FAILED / KILLED
    early = [t for t in trials if t.data.tags.get("esft.early_stopped") == "true"]
    [full] = [t for t in trials if "esft.early_stopped" not in t.data.tags]
    assert sorted(t.data.params["lr"] for t in early) == ["0.0005", "0.001"]
    for run in early:
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]  # the partial history
        assert [m.step for m in client.get_metric_history(run.info.run_id, "valid_loss")] == [2]
        assert "adapter" not in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert [m.step for m in client.get_metric_history(full.info.run_id, "loss")] == [1, 2, 3, 4]
    version = client.get_model_version_by_alias("tune-test", "champion")  # only the trial that finished is registered
    assert version.run_id == full.info.run_id
    assert parents[0].data.metrics["early_stopped_trials"] == 2

    deadline = time.monotonic() + 90  # the stopped trials' Train runs: controller, workers, placement group
    while (_train_actors_left() or any(pg["state"] != "REMOVED" for pg in ray.util.placement_group_table().values())) \
            and time.monotonic() < deadline:
        time.sleep(2)
    assert _train_actors_left() == []
    assert [pg["state"] for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"] == []


@pytest.mark.slow  # a whole sweep, twice
def test_a_searched_sweep_survives_a_dead_driver_and_registers_the_best_trial(assets, tmp_path, fresh_ray, monkeypatch):
    import ray

    from pipeline.config import build_config, read_yaml
    from pipeline.register import load_registered
    from pipeline.tune import SweepConfig, run_sweep

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the sweep's default: SQLite in its run dir
    run_dir = tmp_path / "sweep"
    # Optuna + ASHA, 3 trials, all fixed by the starting points and run in this order: all 16 experts ranked by
    # token, the same ranked by gate (one selection: it must reuse the first one's result, replaying its validation
    # steps to ASHA, which cannot stop it on an equal curve), then the first at lr 0.5 (far ahead of lr 1e-3 at
    # ASHA's rung on this tiny model). The driver dies after the second: a searcher that started over would
    # propose the first point again instead of the third.
    points = [{"kind": "token_budget", "experts_per_layer": 16, "lr": 1e-3, "train_shared_experts": False},
              {"kind": "gate_budget", "experts_per_layer": 16, "lr": 1e-3, "train_shared_experts": False},
              {"kind": "token_budget", "experts_per_layer": 16, "lr": 0.5, "train_shared_experts": False}]
    config_file = sweep_yaml(assets, run_dir, scheduler={"grace_period": 2},
                             searcher={"num_samples": 3, "startup_trials": 1, "kinds": ["token_budget", "gate_budget"],
                                       "experts_per_layer": [1, 16], "lr": [1e-4, 0.5], "points_to_evaluate": points})
    config = yaml.safe_load(config_file.read_text())
    config.pop("search")
    config_file.write_text(yaml.safe_dump(config))
    # Both drivers use one local cluster (the dead driver's trials die with its job), started here
    # without a dashboard: a cold Ray start per driver is what a loaded 2-core machine struggles with.
    ray.init(num_cpus=2, include_dashboard=False)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    # 1. the driver is killed once two trials completed (the third, which trains, may be under way: it is interrupted)
    journal = kill_driver_after(config_file, run_dir, env, completed_trials=2)
    done = sorted((e for e in journal.values() if e["status"] == "finished"), key=lambda e: e["result"]["duplicate_of"])
    assert [e["config"]["selection"]["score_function"] for e in done] == ["token", "gate"]
    trained, duplicate = done
    assert duplicate["result"]["duplicate_of"] == trained["trial_id"]
    finished_before = {p: p.stat().st_mtime_ns for p in [Path(trained["result"]["work_dir"]) / "result.json"]}
    profiles = list((run_dir / "profiles").glob("*/expert_scores.json"))
    assert len(profiles) == 1
    profile_mtime = profiles[0].stat().st_mtime_ns
    marker = plant_pickles(run_dir)  # Tune's experiment state and its searcher's, as Tune saved them: never read

    # 2. the same command resumes from the journal: only the missing trial runs, nothing is unpickled
    summary = run_sweep(build_config(SweepConfig, read_yaml(config_file), {}))
    assert not marker.exists()
    # the interrupted trials are remembered beside the journal (which drops them), should the driver die again
    interrupted_before = {e["trial_id"] for e in journal.values() if e["status"] == "running"}
    assert set(json.loads((run_dir / "sweep.json").read_text())["interrupted_trials"]) == interrupted_before
    assert [p.stat().st_mtime_ns for p in (run_dir / "profiles").glob("*/expert_scores.json")] == [profile_mtime]  # profiled once
    assert len(list((run_dir / "trials").glob("*/result.json"))) == 2  # 3 trials, 2 distinct (selection, lr)
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in finished_before.items())  # not redone

    rows = {r["trial_id"]: r for r in summary["rows"]}
    assert len(rows) == 3 and {trained["trial_id"], duplicate["trial_id"]} <= rows.keys()
    assert [r["status"] for r in rows.values()].count("trained") == 2  # nothing failed, interrupted or stopped
    [resumed] = [r for r in rows.values() if r["trial_id"] not in (trained["trial_id"], duplicate["trial_id"])]
    assert resumed["lr"] == 0.5  # the searcher did not start over: the third point, not the first again
    assert rows[duplicate["trial_id"]]["status"] == f"same selection as {trained['trial_id']}"
    assert rows[duplicate["trial_id"]]["experts"] == 48  # 16 experts x 3 MoE layers
    assert rows[duplicate["trial_id"]]["metric"] == rows[trained["trial_id"]]["metric"]
    table_rows = [line for line in (run_dir / "sweep_summary.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table_rows) == 4  # header + 3 trials

    client, parents, trials = mlflow_runs(run_dir)
    assert len(parents) == 1 and sorted(t.data.tags["esft.trial_id"] for t in trials) == sorted(rows)
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {parents[0].info.run_id}
    for run in trials:
        assert run.info.status == "FINISHED"
        assert {"score_function", "experts_per_layer", "selected_experts", "trainable_parameters", "method", "base_model",
                "data_hash"} <= set(run.data.params)
        assert {"numeric", "general_loss", "valid_loss", "tokens_per_second", "train_seconds",
                "objective"} <= set(run.data.metrics)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]  # per-step curve
        assert [m.step for m in client.get_metric_history(run.info.run_id, "valid_loss")] == [2, 4]  # at each evaluation
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"expert_cfg.json", "selection.png", "heatmap.png"} <= artifacts
        assert ("adapter" in artifacts) != ("esft.duplicate_of" in run.data.tags)  # only trained trials carry an adapter

    registered = summary["registered"]
    assert registered["version"] == "1" and registered["champion"]
    version = client.get_model_version_by_alias("tune-test", "champion")
    assert version.tags["selected_experts"] == str(summary["best"]["experts"]) and version.tags["metric_name"] == "numeric"
    assert version.tags["base_model"] == str(assets / "model") and version.tags["base_source"] == "logged"  # small: it travels
    model, _base = load_registered("models:/tune-test@champion", tracking_uri=summary["tracking_uri"])
    untouched = dict(AutoModelForCausalLM.from_pretrained(assets / "model").named_parameters())
    changed = [n for n, p in merge_adapter(model).named_parameters() if not torch.equal(p, untouched[n])]
    assert changed and all(".mlp.experts." in n for n in changed)  # the adapter is in


def test_a_sweep_resumes_only_on_the_same_settings_and_the_same_data(tmp_path):
    from pipeline.config import ConfigError
    from pipeline.tune import _sweep_state

    state, journal = _sweep_state(tmp_path, "settings-a", "data-a", restart=False)  # a new sweep
    assert state == {"fingerprint": "settings-a", "inputs": "data-a"} and journal == {}
    (tmp_path / "sweep.json").write_text(json.dumps({**state, "parent_run_id": "r1"}))
    assert _sweep_state(tmp_path, "settings-a", "data-a", restart=False)[0]["parent_run_id"] == "r1"  # resumed
    with pytest.raises(ConfigError, match="other settings"):
        _sweep_state(tmp_path, "settings-b", "data-a", restart=False)
    with pytest.raises(ConfigError, match="other data"):  # the same config, train.jsonl regenerated in place
        _sweep_state(tmp_path, "settings-a", "data-b", restart=False)
    assert _sweep_state(tmp_path, "settings-a", "data-b", restart=True)[0] == {"fingerprint": "settings-a", "inputs": "data-b"}
    # a sweep started before its inputs were recorded resumes on its settings alone
    (tmp_path / "sweep.json").write_text(json.dumps({"fingerprint": "settings-a", "parent_run_id": "r0"}))
    assert _sweep_state(tmp_path, "settings-a", "data-c", restart=False)[0]["parent_run_id"] == "r0"


def test_a_resumed_grid_runs_the_points_no_earlier_life_completed(assets, tmp_path):
    from pipeline.config import build_config, read_yaml
    from pipeline.tune import SweepConfig, _tune_config, grid_points

    config = build_config(SweepConfig, read_yaml(sweep_yaml(assets, tmp_path / "grid")), {})
    points = grid_points(config.space())  # budget 1 / 16 experts x token / gate: 4 points
    assert len(points) == 4
    # an earlier life: the first point finished, the second stopped early, the third failed, the fourth was running
    journal = {str(i): {"trial_id": str(i), "config": {**point, "kind": "x"}, "status": status, "result": {}}
               for i, (point, status) in enumerate(zip(points, ["finished", "stopped", "failed", "running"]))}
    search = _tune_config(config, config.train, "max", journal).search_alg
    assert [search.suggest(str(i)) for i in range(2)] == [points[3], search.FINISHED]  # the interrupted one runs again
    search = _tune_config(config, config.train, "max", {k: journal[k] for k in ("0", "3")}).search_alg
    assert [search.suggest(str(i)) for i in range(4)] == [points[1], points[2], points[3], search.FINISHED]
    all_done = {**journal, "3": {**journal["3"], "status": "finished"}}
    assert _tune_config(config, config.train, "max", all_done) is None  # nothing left to run
    # the trial's learning rate is part of the point: the same selection at another lr is still to run
    other_lr = {"0": {**journal["0"], "config": {**points[0], "lr": 0.5}}}
    assert _tune_config(config, config.train, "max", other_lr).search_alg.suggest("0") == points[0]


def test_a_resumed_sweep_deletes_the_runs_of_the_trials_it_reruns(tmp_path):
    """A driver that died between logging a trial to MLflow and journaling it (or while logging it) left a run
    for a trial the journal calls interrupted; its rerun logs it again under a new id, so the old run goes."""
    from mlflow import MlflowClient

    from pipeline.tracking import TRIAL_TAG, SweepTracker, start_parent_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = start_parent_run(uri, "esft-sweeps", tmp_path / "artifacts", "s", {}, None)
    client = MlflowClient(uri)
    experiment = client.get_run(parent).info.experiment_id
    other_sweep = start_parent_run(uri, "esft-sweeps", tmp_path / "artifacts", "other", {}, None)
    for trial_id, status, sweep in (("logged", "FINISHED", parent), ("half-logged", None, parent), ("kept", "FINISHED", parent),
                                    ("logged", "FINISHED", other_sweep)):  # the same trial id in another sweep
        run = client.create_run(experiment, tags={TRIAL_TAG: trial_id, "mlflow.parentRunId": sweep})
        if status:
            client.set_terminated(run.info.run_id, status=status)
    tracker = SweepTracker(uri, parent, "model", "data")
    assert tracker.forget(["logged", "half-logged", "never-logged"]) == 2
    assert [tracker.trial_run_id(t) is None for t in ("logged", "half-logged", "kept")] == [True, True, False]
    assert SweepTracker(uri, other_sweep, "model", "data").trial_run_id("logged") is not None  # not this sweep's
    assert tracker.forget(["logged"]) == 0  # again, as a driver that died once more would: nothing left


def test_asha_replay_gives_the_stops_asha_makes_on_recorded_curves(tmp_path):
    """bench/asha_replay.py on a hand-made sweep record. Expected by hand: rungs at steps 2 and 4 of 8
    (grace 2, reduction factor 2); a trial continues at a rung unless its loss is worse than the median of
    the trials that reached it before (one earlier trial: that trial's loss)."""
    from mlflow import MlflowClient

    spec = importlib.util.spec_from_file_location("bench_asha_replay", ROOT / "bench" / "asha_replay.py")
    asha_replay = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(asha_replay)
    recorded_sweep, replay = asha_replay.recorded_sweep, asha_replay.replay

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("esft-sweeps")
    parent = client.create_run(experiment, tags={"esft.kind": "sweep"}, start_time=1)
    client.log_param(parent.info.run_id, "scheduler", json.dumps({"metric": "valid_loss", "grace_period": 2,
                                                                  "reduction_factor": 2.0}))
    curves = {"a": {2: 1.0, 4: 0.8, 6: 0.6, 8: 0.5}, "b": {2: 1.2}, "c": {2: 0.9, 4: 0.85}}
    for start, (trial_id, curve) in enumerate(curves.items(), start=2):
        stopped = trial_id != "a"
        run = client.create_run(experiment, start_time=start, tags={
            "esft.kind": "trial", "esft.trial_id": trial_id, "mlflow.parentRunId": parent.info.run_id,
            **({"esft.early_stopped": "true"} if stopped else {})})
        for step, value in curve.items():
            client.log_metric(run.info.run_id, "valid_loss", value, step=step)
            client.log_metric(run.info.run_id, "loss", value, step=step)
        if not stopped:
            client.log_metric(run.info.run_id, "objective", 0.25)
    sweep = recorded_sweep(tmp_path)
    assert sweep["steps"] == 8 and [t["trial_id"] for t in sweep["trials"]] == ["a", "b", "c"]
    recorded = replay(sweep, grace=2, reduction_factor=2)
    # a: alone at every rung; b: worse than a at step 2; c: better than the median (1.1) of a and b at step 2,
    # worse than a at step 4
    assert recorded["fates"] == ["full", 2, 4] and recorded["steps_trained"] == 8 + 2 + 4
    assert recorded["best_objective"] == 0.25 and recorded["unknown"] == 0
    # grace 4: b passes step 4 only if it has a value there; its curve ends at 2, so its fate is unknown
    assert replay(sweep, grace=4, reduction_factor=2)["fates"] == ["full", ">2?", 4]

    # Another metric than the recorded scheduler's, maximised: a alone at every rung; b better than a at step 2
    # (its curve ends there: unknown); c better than the median (0.2) of a and b at step 2, worse than a at 4.
    accuracy = {"a": {2: 0.1, 4: 0.2, 6: 0.3, 8: 0.4}, "b": {2: 0.3}, "c": {2: 0.25, 4: 0.15}}
    for run in client.search_runs([experiment], filter_string="tags.`esft.kind` = 'trial'"):
        for step, value in accuracy[run.data.tags["esft.trial_id"]].items():
            client.log_metric(run.info.run_id, "valid_answer_accuracy", value, step=step)
    assert replay(recorded_sweep(tmp_path, "valid_answer_accuracy"), grace=2, reduction_factor=2)["fates"] == ["full", ">2?", 4]

    # A later sweep in the same store, a grid (no scheduler recorded): the last sweep is replayed, on validation loss;
    # e is worse than d at step 2.
    grid = client.create_run(experiment, tags={"esft.kind": "sweep"}, start_time=10)
    for start, (trial_id, curve) in enumerate({"d": {2: 1.0, 4: 0.9, 8: 0.7}, "e": {2: 1.1, 4: 0.8, 8: 0.6}}.items(), 11):
        run = client.create_run(experiment, start_time=start, tags={
            "esft.kind": "trial", "esft.trial_id": trial_id, "mlflow.parentRunId": grid.info.run_id})
        for step, value in curve.items():
            client.log_metric(run.info.run_id, "valid_loss", value, step=step)
            client.log_metric(run.info.run_id, "loss", value, step=step)
    sweep = recorded_sweep(tmp_path)
    assert sweep["scheduler"] == {"metric": "valid_loss"} and [t["trial_id"] for t in sweep["trials"]] == ["d", "e"]
    assert replay(sweep, grace=2, reduction_factor=2)["fates"] == ["full", 2]
