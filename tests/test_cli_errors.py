"""Bad input at the command line (issue 17): one line `esft: error: ...` naming the input and the
fix, exit 2, before any compute, nothing written. No test here starts Ray."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from esft.data import DataError
from esft.errors import EsftError
from esft.testing import tiny_model
from pipeline.cli import main as esft
from tests.conftest import save_model_with_tokenizer, write_jsonl

ROW = {"messages": [{"role": "user", "content": "What is 3 plus 4?"}, {"role": "assistant", "content": "7"}]}


def one_error_line(capsys) -> str:
    """The command's stderr, which must be exactly one `esft: error:` line."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("esft: error: ") and "\n" not in err, err
    return err


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- a damaged adapter: the file is named, no SafetensorError traceback ---------------------------

@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory) -> Path:
    from esft.adapter import save_adapter
    from esft.families import moe_layers
    from esft.select import ExpertConfig
    from esft.trainable import apply_expert_config

    model = tiny_model("deepseek_v2")
    config = ExpertConfig({str(layer.index): [0, 2] for layer in moe_layers(model)})
    apply_expert_config(model, config)
    return save_adapter(model, tmp_path_factory.mktemp("adapter") / "adapter", config)


def _damage(adapter: Path, how: str) -> None:
    weights = adapter / "model.safetensors"
    raw = weights.read_bytes()
    if how == "empty":
        weights.write_bytes(b"")
    elif how == "truncated":  # an interrupted copy
        weights.write_bytes(raw[: len(raw) // 2])
    else:  # "tampered": the JSON header edited by hand
        weights.write_bytes(raw[:8] + b"{{{{" + raw[12:])


@pytest.mark.parametrize("how", ["empty", "truncated", "tampered"])
@pytest.mark.parametrize("command", ["merge", "eval"])
def test_a_damaged_adapter_file_is_named(good_adapter, tmp_path, capsys, how, command):
    adapter = tmp_path / "adapter"
    shutil.copytree(good_adapter, adapter)
    _damage(adapter, how)
    out = tmp_path / ("merged" if command == "merge" else "metrics.json")
    if command == "merge":
        argv = ["merge", "--model", "tiny:deepseek_v2", "--adapter", str(adapter), "--out", str(out)]
    else:  # checked on the model's skeleton before Ray starts and generation begins
        data = write_jsonl(tmp_path / "eval.jsonl", [ROW])
        argv = ["eval", "--model", "tiny:deepseek_v2", "--tokenizer", str(tmp_path), "--adapter", str(adapter),
                "--data", str(data), "--out", str(out)]
    assert esft(argv) == 2
    error = one_error_line(capsys)
    assert f"{adapter / 'model.safetensors'} is not a readable safetensors file" in error
    assert "copy it again or re-export it" in error
    assert not out.exists()


# --- model paths and types -------------------------------------------------------------------------

def test_a_missing_model_directory_is_one_line(tmp_path, capsys):
    for missing in (str(tmp_path / "no-such-model"), "./no-such-model", "runs/a/no-such-model"):
        assert esft(["inspect", missing]) == 2
        error = one_error_line(capsys)
        assert f"no model directory at {missing}; give an existing model directory or a hub id" in error
        assert "Repo id" not in error
    assert esft(["merge", "--model", str(tmp_path / "gone"), "--adapter", str(tmp_path), "--out", str(tmp_path / "m")]) == 2
    assert "no model directory at" in one_error_line(capsys)


@pytest.mark.parametrize("flags, message", [
    (["--expert-groups", "5"], "expert_groups must divide routed_experts"),
    (["--bias-update-rate", "0.01"], "bias_update_rate must be >= 0, and > 0 only with architecture deepseek_v3"),
    (["--steps", "0"], "steps must be a positive integer"),
    (["--hidden-size", "0"], "hidden_size must be a positive integer"),
    (["--device", "mps"], "device 'mps' is not supported; use cpu or cuda[:N]"),
    (["--device", "gpu0"], "unknown device 'gpu0'; use cpu or cuda[:N]"),
    *([(["--device", "cuda"], "this torch sees no CUDA device; drop --device (CPU)")] if not torch.cuda.is_available() else []),
])
def test_a_bad_pretraining_recipe_is_one_line_before_anything_is_written(tmp_path, capsys, flags, message):
    assert esft(["pretrain", "--out", str(tmp_path / "model"), *flags]) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "model").exists()


def test_an_unknown_model_type_is_one_line(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "brand_new_moe", "architectures": ["BrandNewMoeForCausalLM"]}))
    for command in (["inspect", str(model)],
                    ["merge", "--model", str(model), "--adapter", str(tmp_path), "--out", str(tmp_path / "m")]):
        assert esft(command) == 2
        error = one_error_line(capsys)
        assert ("has model_type 'brand_new_moe', which transformers" in error
                and "ESFT supports the MoE families deepseek_v2" in error)
        assert "pip install" not in error


# --- a malformed training line names what a CLI user can do -----------------------------------------

def test_a_malformed_training_line_says_fix_or_delete(tmp_path, capsys):
    model = save_model_with_tokenizer(tmp_path / "model", [ROW])
    data = write_jsonl(tmp_path / "train.jsonl", [ROW] * 3)
    with data.open("a") as handle:
        handle.write('{"messages": [oops\n')
    out = tmp_path / "run"
    capsys.readouterr()  # the model's saving progress is not the command's output
    assert esft(["train", "--model", str(model), "--data", str(data), "--out", str(out), "--method", "fft", "--steps", "1"]) == 2
    error = one_error_line(capsys)
    assert f"{data}:4: invalid JSON" in error and "fix or delete these lines" in error
    assert not out.exists()


# --- one --out policy: an existing target is refused unless --overwrite -----------------------------

def _select(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"token_scores": {"1": {"0": 0.7, "1": 0.3}}, "gate_scores": {"1": {"0": 0.7, "1": 0.3}}}))
    return ["select", "--scores", str(summary), "--score-function", "token", "--top-p", "0.5", "--out", str(out), *extra]


def _existing_file(tmp_path: Path) -> Path:
    path = tmp_path / "existing.json"
    path.write_text("user data")
    return path


def _non_empty_dir(tmp_path: Path) -> Path:
    path = tmp_path / "existing"
    path.mkdir()
    (path / "keep.txt").write_text("user data")
    return path


# (argv for an --out, which existing target, the expected message)
OUT_CASES = {
    "select over a file": (lambda t, out: _select(t, out), _existing_file, "already exists; pass --overwrite"),
    "select into a directory": (lambda t, out: _select(t, out), _non_empty_dir, "is a directory, but a file is written there"),
    "eval over a file": (lambda t, out: ["eval", "--model", "tiny:deepseek_v2", "--data", "d.jsonl", "--out", str(out)],
                         _existing_file, "already exists; pass --overwrite"),
    "data into a non-empty directory": (lambda t, out: ["data", "--out", str(out), "--train-rows", "2", "--eval-rows", "1"],
                                        _non_empty_dir, "already exists; pass --overwrite"),
    "merge over a file": (lambda t, out: ["merge", "--model", "tiny:deepseek_v2", "--adapter", str(t), "--out", str(out)],
                          _existing_file, "is a file, but a directory is written there"),
    "merge into a non-empty directory": (lambda t, out: ["merge", "--model", "tiny:deepseek_v2", "--adapter", str(t),
                                                         "--out", str(out)],
                                         _non_empty_dir, "already exists; pass --overwrite"),
    "profile into a non-empty directory": (lambda t, out: ["profile", "--model", "tiny:deepseek_v2", "--data", "d.jsonl",
                                                           "--out", str(out)],
                                           _non_empty_dir, "already exists; pass --overwrite"),
    "train over a file": (lambda t, out: ["train", "--model", "tiny:deepseek_v2", "--data", "d.jsonl", "--out", str(out)],
                          _existing_file, "is a file, but a directory is written there"),
}


@pytest.mark.parametrize("case", OUT_CASES)
def test_an_existing_out_is_refused_and_left_as_it_was(tmp_path, capsys, case):
    argv, make_target, message = OUT_CASES[case]
    target = make_target(tmp_path)
    command = argv(tmp_path, target)
    before = snapshot(tmp_path)
    assert esft(command) == 2
    error = one_error_line(capsys)
    assert f"--out {target}" in error and message in error
    assert snapshot(tmp_path) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary file left behind"


def test_overwrite_replaces_an_existing_out(tmp_path, capsys):
    out = _existing_file(tmp_path)
    assert esft(_select(tmp_path, out, "--overwrite")) == 0
    assert json.loads(out.read_text())["experts"] == {"1": [0]}
    corpus = _non_empty_dir(tmp_path)
    assert esft(["data", "--out", str(corpus), "--train-rows", "2", "--eval-rows", "1", "--overwrite"]) == 0
    assert not (corpus / "keep.txt").exists()  # replaced as a whole, like every other directory output
    assert (corpus / "math" / "train.jsonl").read_text().count("\n") == 2


# --- an unwritable --out: one line before any work --------------------------------------------------

WRITERS = {
    "select": lambda t, out: _select(t, out / "cfg.json"),
    "profile": lambda t, out: ["profile", "--model", "tiny:deepseek_v2", "--data", "d.jsonl", "--out", str(out / "p")],
    "train": lambda t, out: ["train", "--model", "tiny:deepseek_v2", "--data", "d.jsonl", "--out", str(out / "run")],
    "merge": lambda t, out: ["merge", "--model", "tiny:deepseek_v2", "--adapter", str(t), "--out", str(out / "m")],
    "eval": lambda t, out: ["eval", "--model", "tiny:deepseek_v2", "--data", "d.jsonl", "--out", str(out / "m.json")],
    "data": lambda t, out: ["data", "--out", str(out / "corpus"), "--train-rows", "2", "--eval-rows", "1"],
    "quickstart": lambda t, out: ["quickstart", "--out", str(out / "qs"), "--steps", "1"],
    "pretrain": lambda t, out: ["pretrain", "--out", str(out / "model"), "--steps", "1"],
}


@pytest.fixture
def read_only_dir(tmp_path, monkeypatch) -> Path:
    """A directory this process cannot write in. Root ignores permission bits (but not a read-only
    file system), so for root os.access is made to answer as it does on a read-only mount."""
    directory = tmp_path / "read-only"
    directory.mkdir()
    directory.chmod(0o555)
    if os.geteuid() == 0:
        real_access = os.access
        monkeypatch.setattr("esft.io.os.access", lambda path, mode: Path(path) != directory and real_access(path, mode))
    yield directory
    directory.chmod(0o755)


@pytest.mark.parametrize("command", WRITERS)
def test_an_unwritable_out_is_refused_before_any_work(tmp_path, capsys, read_only_dir, command):
    assert esft(WRITERS[command](tmp_path, read_only_dir)) == 2
    error = one_error_line(capsys)
    assert f"{read_only_dir} is read-only or not writable by this user; choose a writable --out" in error
    assert list(read_only_dir.iterdir()) == []


@pytest.mark.parametrize("command", WRITERS)
def test_an_out_under_a_file_is_refused(tmp_path, capsys, command):
    blocker = _existing_file(tmp_path)
    assert esft(WRITERS[command](tmp_path, blocker)) == 2
    assert f"{blocker} is a file, not a directory" in one_error_line(capsys)
    assert blocker.read_text() == "user data"


# --- the boundary: user errors are one line, bugs keep their traceback ------------------------------

def _raising(error: BaseException):
    def command(args):
        raise error

    return command


@pytest.mark.parametrize("error", [
    pytest.param(lambda: EsftError("the input is wrong; fix it like this"), id="EsftError"),
    pytest.param(lambda: DataError("train.jsonl:3: the input is wrong; fix it like this"), id="a subclass"),
    pytest.param(lambda: PermissionError(13, "Permission denied", "/the/input"), id="PermissionError"),
    pytest.param(lambda: NotADirectoryError(20, "Not a directory", "/the/input"), id="NotADirectoryError"),
    pytest.param(lambda: IsADirectoryError(21, "Is a directory", "/the/input"), id="IsADirectoryError"),
])
def test_a_user_error_from_a_command_is_one_line(tmp_path, capsys, monkeypatch, error):
    raised = error()
    monkeypatch.setattr("pipeline.cli.cmd_select", _raising(raised))
    assert esft(_select(tmp_path, tmp_path / "cfg.json")) == 2
    assert one_error_line(capsys) == f"esft: error: {raised}"


@pytest.mark.parametrize("error", [
    pytest.param(lambda: ValueError("boom"), id="ValueError"),  # numpy, torch, the standard library: a bug
    pytest.param(lambda: OSError(28, "No space left on device"), id="OSError"),  # the environment, not an input
    pytest.param(lambda: RuntimeError("boom"), id="RuntimeError"),
])
def test_any_other_error_keeps_its_traceback(tmp_path, capsys, monkeypatch, error):
    raised = error()
    monkeypatch.setattr("pipeline.cli.cmd_select", _raising(raised))
    with pytest.raises(type(raised)) as caught:
        esft(_select(tmp_path, tmp_path / "cfg.json"))
    assert caught.value is raised
    assert "esft: error" not in capsys.readouterr().err


def test_every_project_error_is_an_esft_error_and_a_value_error():
    from esft.adapter import AdapterError
    from esft.families import UnsupportedModelError
    from esft.io import OutputError
    from esft.scores import ScoresError
    from esft.select import SelectionError
    from pipeline.checkpoint import CheckpointError
    from pipeline.config import ConfigError

    for cls in (AdapterError, CheckpointError, ConfigError, DataError, OutputError, ScoresError, SelectionError,
                UnsupportedModelError):
        assert issubclass(cls, EsftError) and issubclass(cls, ValueError), cls


# --- Ctrl-C at the CLI boundary -------------------------------------------------------------------

def test_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("esft.select.select_experts", interrupted)
    out = tmp_path / "cfg.json"
    assert esft(_select(tmp_path, out)) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("esft: interrupted") and "\n" not in err
    assert not out.exists()


# --- Ctrl-C during training: Ray Train's SIGINT handler ----------------------------------------

class FakeTrainer:
    """Does what Ray Train's fit does to SIGINT: installs its own handler, and on Ctrl-C aborts the
    run with sys.exit(0) from that handler."""

    def __init__(self, interrupted: bool):
        self.interrupted = interrupted

    def fit(self):
        signal.signal(signal.SIGINT, lambda signum, frame: None)
        if self.interrupted:
            raise SystemExit(0)
        return "result"


@pytest.mark.parametrize("interrupted", [False, True])
def test_training_restores_the_callers_sigint_handler(interrupted):
    from pipeline.train import fit_restoring_sigint

    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGINT, mine)
    try:
        if interrupted:
            with pytest.raises(KeyboardInterrupt):
                fit_restoring_sigint(FakeTrainer(interrupted=True))
        else:
            assert fit_restoring_sigint(FakeTrainer(interrupted=False)) == "result"
        assert signal.getsignal(signal.SIGINT) is mine
    finally:
        signal.signal(signal.SIGINT, previous)


# --- more replicas or workers than the cluster has: refused, not a silent hang ----------------------

def fake_cluster(monkeypatch, cpus_per_node: list[float]) -> None:
    """What Ray reports for a cluster of these nodes (no Ray started)."""
    ray = pytest.importorskip("ray")
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": float(sum(cpus_per_node))})
    monkeypatch.setattr(ray, "nodes", lambda: [{"NodeID": f"node{i}", "Alive": True, "NodeManagerAddress": "10.0.0.1",
                                                "Resources": {"CPU": float(c)}} for i, c in enumerate(cpus_per_node)])


@pytest.fixture
def two_cpu_cluster(monkeypatch):
    fake_cluster(monkeypatch, [2])


def test_profile_replicas_must_fit_beside_the_readers(two_cpu_cluster):
    from pipeline.cluster import placement_for
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"^8 replicas x 0.25 CPUs \+ 1 CPU to read the data need 3 CPUs; the Ray cluster "
                                          r"offers 2 \(lower --replicas, or add nodes\)"):
        placement_for(8, 0.0, None)
    with pytest.raises(ConfigError, match="lower --replicas or --cpus-per-replica"):
        placement_for(2, 0.0, 1.0)
    assert placement_for(4, 0.0, None, threads=1)["num_cpus"] == 0.25  # 4 x 0.25 + 1 reading CPU fit
    assert placement_for(3, 0.0, None, threads=1)["num_cpus"] == pytest.approx(1 / 3)
    # evaluation streams rows from memory: no reading CPU
    assert placement_for(8, 0.0, None, threads=1, reading_cpus=0)["num_cpus"] == 0.25


def test_train_workers_must_fit_the_cluster(two_cpu_cluster):
    from pipeline.config import ConfigError
    from pipeline.train import TrainConfig, _check_cluster

    with pytest.raises(ConfigError, match=r"8 workers x 1 CPUs asked, the cluster has 2 CPUs; lower --workers"):
        _check_cluster(TrainConfig(model="m", data="d", out="o", workers=8, cpus_per_worker=1))
    _check_cluster(TrainConfig(model="m", data="d", out="o", workers=2, cpus_per_worker=1))


def test_a_replica_or_worker_never_asks_for_more_than_one_node_has(monkeypatch):
    """Three one-CPU nodes: 3 CPUs in all, but a process runs on one node; asking for 2 CPUs would
    wait for a node that never comes."""
    from pipeline.cluster import placement_for
    from pipeline.config import ConfigError
    from pipeline.train import TrainConfig, _check_cluster

    fake_cluster(monkeypatch, [1, 1, 1])
    assert placement_for(1, 0.0, None, threads=1)["num_cpus"] == 1  # (3 - 1 reading) / 1 = 2, capped to a node's 1
    with pytest.raises(ConfigError, match=r"a replica x 2 CPUs does not fit on any node .*largest has 1 CPUs"):
        placement_for(1, 0.0, 2.0)
    with pytest.raises(ConfigError, match=r"a worker x 2 CPUs does not fit on any node .*largest has 1 CPUs"):
        _check_cluster(TrainConfig(model="m", data="d", out="o", workers=1, cpus_per_worker=2))


# --- YAML values of the wrong type: the setting named, before any work ---------------------------

TYPE_CASES = {
    "lr: fast": ("train", {"lr": "fast"}, "lr must be a number, got 'fast'"),
    "steps: forty": ("train", {"steps": "forty"}, "steps must be an integer, got 'forty'"),
    "batch_size: [1, 2]": ("train", {"batch_size": [1, 2]}, "batch_size must be an integer, got [1, 2]"),
    "steps: true": ("train", {"steps": True}, "steps must be an integer, got True"),
    "seq_len: 64.5": ("profile", {"seq_len": 64.5}, "seq_len must be an integer, got 64.5"),
    "max_new_tokens: lots": ("eval", {"max_new_tokens": "lots"}, "max_new_tokens must be an integer, got 'lots'"),
}


@pytest.mark.parametrize("case", TYPE_CASES)
def test_a_setting_of_the_wrong_type_is_named(tmp_path, capsys, case):
    import yaml

    command, values, message = TYPE_CASES[case]
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(values))
    out = tmp_path / "out"
    assert esft([command, "--config", str(config), "--model", "tiny:deepseek_v2", "--out", str(out)]) == 2
    assert f"{config}: {message}" in one_error_line(capsys)
    assert not out.exists()


def test_a_float_written_as_yaml_reads_it_is_a_number():
    """PyYAML reads `1e-5` (no dot) as a string; a float setting takes it as the number it is."""
    import yaml

    from pipeline.config import build_config
    from pipeline.train import TrainConfig

    values = yaml.safe_load("lr: 1e-5\nvalidation_fraction: 0.1\n")
    assert values["lr"] == "1e-5"
    config = build_config(TrainConfig, values, {}, where="train.yaml")
    assert config.lr == 1e-5 and isinstance(config.lr, float) and config.validation_fraction == 0.1


# --- a whole pipeline config checked before any work (esft run) ----------------------------------

RUN_CASES = {
    "top_p: 1.5": ({"select": {"score_function": "token", "top_p": 1.5}}, "select: top_p must be in (0, 1], got 1.5"),
    "select as a list": ({"select": [1, 2]}, "select must be a section (a mapping of setting: value), got [1, 2]"),
    "profile as a number": ({"profile": 3}, "profile must be a section (a mapping of setting: value), got 3"),
    "unknown select key": ({"select": {"score_function": "token", "top_p": 0.2, "bogus": 1}},
                           "select: unknown setting(s) bogus; known: experts_per_layer, score_function, top_p"),
    "neither rule": ({"select": {"score_function": "gate"}}, "select: give exactly one of top_p"),
    "score function": ({"select": {"score_function": "mean", "top_p": 0.2}}, "select: score_function must be token or gate"),
    "steps: forty": ({"train": {"steps": "forty"}}, "train: steps must be an integer, got 'forty'"),
    "steps: 0": ({"train": {"steps": 0}}, "train: steps must be a positive integer, got 0"),
    "unknown eval metric": ({"eval": {"metric": ["bleurt"]}}, "eval: unknown metric(s) bleurt"),
    "register key": ({"register": {"bogus": 1}}, "unknown register setting(s) bogus"),
}


@pytest.mark.parametrize("case", RUN_CASES)
def test_a_bad_pipeline_config_fails_before_anything_is_written(tmp_path, capsys, case):
    import yaml

    values, message = RUN_CASES[case]
    config = tmp_path / "run.yaml"
    run_dir = tmp_path / "run"
    config.write_text(yaml.safe_dump({"run_dir": str(run_dir), **values}))
    assert esft(["run", "--config", str(config)]) == 2
    assert f"{config}: {message}" in one_error_line(capsys)
    assert not run_dir.exists()  # no assets, no stage markers: nothing half-written


def test_an_empty_section_is_an_empty_mapping():
    import yaml

    from pipeline.config import build_config
    from pipeline.run import PipelineConfig

    config = build_config(PipelineConfig, yaml.safe_load("profile:\nselect:\n  score_function: gate\n  top_p: 0.1\n"), {})
    assert config.profile == {} and config.selection().top_p == 0.1


# --- libraries' notices kept off the terminal unless -v ------------------------------------------

@pytest.mark.parametrize("verbose", [False, True])
def test_library_notices_are_quiet_unless_verbose(monkeypatch, verbose):
    import logging

    from pipeline.cli import QUIET_ENVIRONMENT, QUIET_LOGGERS, quiet_library_notices

    for name in QUIET_LOGGERS:
        monkeypatch.setattr(logging.getLogger(name), "level", logging.NOTSET)
    for variable in QUIET_ENVIRONMENT:  # absent during the test, as they were before it afterwards
        monkeypatch.setenv(variable, "")
        monkeypatch.delenv(variable)
    monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", "DEBUG")  # what the user exported wins
    quiet_library_notices(verbose)
    assert all((logging.getLogger(name).level == logging.ERROR) != verbose for name in QUIET_LOGGERS)
    assert os.environ["MLFLOW_LOGGING_LEVEL"] == "DEBUG"
    assert ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" in os.environ) != verbose


def test_verbose_shows_the_traceback_behind_an_error(tmp_path, capsys):
    import yaml

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "train": {"steps": "forty"}}))
    assert esft(["-v", "run", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ConfigError" in err
    assert err.strip().splitlines()[-1] == f"esft: error: {config}: train: steps must be an integer, got 'forty'"
