"""MLflow registry: versions are MLflow Models that MLflow itself loads and serves; the champion
alias; portable base models; versions of the previous format; no MLflow files outside the store."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from esft.demo import synthetic
from esft.adapter import save_adapter
from esft.families import moe_layers
from esft.select import ExpertConfig
from esft.trainable import apply_expert_config
from pipeline.register import ModelLogging, load_registered, load_registered_model, register_adapter
from pipeline.serving import answer_prompts, plan_base
from tests.conftest import save_model_with_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["What is 3 plus 4?", "Tom has 12 apples and gives 5 of them to Ada. How many apples does Tom have now?"]


def make_adapter(model_dir, out, scale: float):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = ExpertConfig({str(layer.index): [1, 2] for layer in moe_layers(model)})
    apply_expert_config(model, config)
    with torch.no_grad():
        for layer in moe_layers(model):
            layer.experts.esft_down_proj.mul_(scale)
    save_adapter(model, out, config)
    return model.eval()


def register(adapter, run_dir: Path, store: Path, metric: float, name: str = "esft-test", **kwargs):
    return register_adapter(adapter, model_name=name, run_dir=run_dir, metric_name="exact_match", metrics={"exact_match": metric},
                            params={"top_p": 0.2}, tags={"base_model": str(run_dir / "base"), "family": "deepseek_v2",
                                                         "score_function": "token"},
                            tracking_uri=f"sqlite:///{store / 'mlflow.db'}", **kwargs)


def env_without_tracking_uri(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Three versions of one model (the third is the champion), registered from a working
    directory that must stay empty, into a store outside the run directory."""
    root = tmp_path_factory.mktemp("registry")
    run_dir, store, cwd = root / "run", root / "store", root / "cwd"
    cwd.mkdir()
    save_model_with_tokenizer(run_dir / "base", synthetic.rows("math", 20, seed=1))
    trained = {scale: make_adapter(run_dir / "base", run_dir / f"a{scale:g}", scale) for scale in (2.0, 3.0, 4.0)}
    here = os.getcwd()
    os.chdir(cwd)  # nothing may land in the current directory
    try:
        versions = [register(run_dir / f"a{scale:g}", run_dir, store, metric)
                    for scale, metric in ((2.0, 0.5), (3.0, 0.4), (4.0, 0.7))]
    finally:
        os.chdir(here)
    return {"root": root, "run_dir": run_dir, "cwd": cwd, "versions": versions, "champion": trained[4.0],
            "uri": f"sqlite:///{store / 'mlflow.db'}"}


def test_versions_champion_alias_tags_and_loading(registry):
    from mlflow import MlflowClient

    first, worse, better = registry["versions"]
    assert (first.version, worse.version, better.version) == ("1", "2", "3")
    assert first.champion and not worse.champion and better.champion
    assert better.model_uri.startswith("models:/m-")  # an MLflow 3 LoggedModel
    version = MlflowClient(registry["uri"], registry["uri"]).get_model_version_by_alias("esft-test", "champion")
    model_id = better.model_uri.removeprefix("models:/")
    assert str(version.version) == "3" and version.tags["model_uri"] == better.model_uri
    assert version.source.endswith(f"/models/{model_id}/artifacts")  # the LoggedModel's files
    assert {"base_model", "family", "score_function", "metric_name", "metric"} <= set(version.tags)
    assert version.tags["base_source"] == "logged"  # the tiny base is small, so it travels with the version
    assert "mlflow models serve -m models:/esft-test/3" in version.description and "pyfunc.load_model" in version.description

    loaded, _ = load_registered("models:/esft-test@champion", tracking_uri=registry["uri"])
    ids = torch.randint(4, 300, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, registry["champion"](ids).logits)
    assert list(registry["cwd"].iterdir()) == []


def test_a_fresh_process_loads_the_champion_with_mlflow_and_answers_like_esft_generate(registry, tmp_path):
    script = ("import json, mlflow, pandas as pd\n"
              "model = mlflow.pyfunc.load_model('models:/esft-test@champion')\n"
              f"frame = model.predict(pd.DataFrame({{'prompt': {PROMPTS!r}}}), params={{'max_new_tokens': 6}})\n"
              f"listed = model.predict({PROMPTS!r}, params={{'max_new_tokens': 6}})\n"
              "print(json.dumps({'frame': list(frame), 'list': list(listed)}))\n")
    env = env_without_tracking_uri(MLFLOW_TRACKING_URI=registry["uri"])
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    answers = json.loads(done.stdout.strip().splitlines()[-1])
    assert (answers["frame"] == answers["list"] and len(answers["frame"]) == 2
            and all(isinstance(a, str) for a in answers["frame"]))

    generated = []
    for prompt in PROMPTS:
        cli = subprocess.run([sys.executable, "-m", "pipeline", "generate", "models:/esft-test@champion", "--prompt", prompt,
                              "--tracking-uri", registry["uri"], "--max-new-tokens", "6"],
                             cwd=tmp_path, env=env_without_tracking_uri(PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                             timeout=300)
        assert cli.returncode == 0, cli.stderr[-3000:]
        generated.append(cli.stdout.rstrip("\n"))
    assert answers["frame"] == generated
    assert list(tmp_path.iterdir()) == []  # neither wrote MLflow files into its working directory


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.mark.slow  # `mlflow models serve` in a subprocess
def test_mlflow_models_serve_answers_invocations(registry, tmp_path):
    expected = answer_prompts(load_registered_model("models:/esft-test@champion", registry["uri"]), PROMPTS[:1], max_new_tokens=6)
    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/esft-test@champion",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                              cwd=tmp_path, env=env_without_tracking_uri(MLFLOW_TRACKING_URI=registry["uri"]),
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not answer /ping in time"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).close()
                break
            except OSError:
                time.sleep(1)
        reply = _post(f"http://127.0.0.1:{port}/invocations",
                      {"dataframe_records": [{"prompt": PROMPTS[0]}], "params": {"max_new_tokens": 6}})
        assert reply == {"predictions": expected}
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn worker
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def test_a_version_loads_after_its_run_directory_is_removed(tmp_path):
    run_dir, store = tmp_path / "run", tmp_path / "store"
    save_model_with_tokenizer(run_dir / "base", synthetic.rows("math", 20, seed=2))
    trained = make_adapter(run_dir / "base", run_dir / "adapter", 3.0)
    register(run_dir / "adapter", run_dir, store, 0.5, name="portable")
    shutil.rmtree(run_dir)
    model, base = load_registered("models:/portable@champion", tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    ids = torch.randint(4, 300, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, trained(ids).logits)
    assert not base.startswith(str(run_dir))


def test_a_base_model_left_out_is_found_by_fingerprint_or_named_when_missing(tmp_path, monkeypatch):
    import mlflow.pyfunc

    run_dir, store = tmp_path / "run", tmp_path / "store"
    save_model_with_tokenizer(run_dir / "base", synthetic.rows("math", 20, seed=3))
    trained = make_adapter(run_dir / "base", run_dir / "adapter", 2.5)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    register(run_dir / "adapter", run_dir, store, 0.5, name="by-reference", options=ModelLogging(log_base_model="never"))
    ids = torch.randint(4, 300, (1, 12))
    with torch.no_grad():
        reference = trained(ids).logits
        assert torch.equal(load_registered("models:/by-reference/1", uri)[0](ids).logits, reference)  # found where it was

    moved = tmp_path / "elsewhere" / "base"
    shutil.move(run_dir / "base", moved)
    with pytest.raises(ValueError, match=r"base model of this version.*fingerprint sha256:.*base_model_path"):
        load_registered("models:/by-reference/1", uri)
    with torch.no_grad():
        assert torch.equal(load_registered("models:/by-reference/1", uri, base_model=str(moved))[0](ids).logits, reference)
    other = save_model_with_tokenizer(tmp_path / "other", synthetic.rows("math", 20, seed=4))
    with pytest.raises(ValueError, match="is not the base model this version was trained on"):
        load_registered("models:/by-reference/1", uri, base_model=str(other))

    # MLflow's own loader takes the same override through the model config.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    pyfunc = mlflow.pyfunc.load_model("models:/by-reference/1", model_config={"base_model_path": str(moved)})
    assert pyfunc.predict(PROMPTS[:1], params={"max_new_tokens": 4}) == answer_prompts(
        load_registered_model("models:/by-reference/1", uri, base_model=str(moved)), PROMPTS[:1], max_new_tokens=4)


def test_a_hub_base_model_stays_a_hub_id_with_its_cached_revision(tmp_path):
    fields, logged = plan_base("deepseek-ai/DeepSeek-V2-Lite")
    assert logged is None and fields["base_source"] == "hub" and fields["base_model"] == "deepseek-ai/DeepSeek-V2-Lite"
    snapshot = tmp_path / "models--org--moe" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--org--moe" / "refs").mkdir()
    (tmp_path / "models--org--moe" / "refs" / "main").write_text("a" * 40)
    from pipeline.serving import hub_revision

    assert hub_revision("org/moe", cache_dir=str(tmp_path)) == "a" * 40
    with pytest.raises(ValueError, match="does not exist"):
        plan_base(str(tmp_path / "no-such-model"))


def test_a_version_of_the_previous_format_still_loads_or_fails_clearly(tmp_path):
    from mlflow import MlflowClient

    run_dir, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    save_model_with_tokenizer(run_dir / "base", synthetic.rows("math", 20, seed=5))
    trained = make_adapter(run_dir / "base", run_dir / "adapter", 2.0)
    client = MlflowClient(uri, uri)
    experiment = client.create_experiment("old", artifact_location=(tmp_path / "mlartifacts").as_uri())
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(run_dir / "adapter"), artifact_path="adapter")
    client.create_registered_model("old-format")
    for base in (str(run_dir / "base"), str(tmp_path / "gone")):  # the way esft registered before: a bare adapter directory
        client.create_model_version("old-format", f"{run.info.artifact_uri}/adapter", run_id=run.info.run_id,
                                    tags={"base_model": base})
    ids = torch.randint(4, 300, (1, 12))
    with torch.no_grad():
        assert torch.equal(load_registered("models:/old-format/1", uri)[0](ids).logits, trained(ids).logits)
    with pytest.raises(ValueError, match=r"bare adapter registered by an older esft.*--base-model"):
        load_registered("models:/old-format/2", uri)


def test_generate_names_a_missing_registry_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["generate", "models:/nope@champion", "--prompt", "hi"]) == 2
    assert "esft: error: no MLflow tracking URI" in capsys.readouterr().err
    assert main(["generate", "models:/nope@champion", "--prompt", "hi", "--tracking-uri",
                 f"sqlite:///{tmp_path / 'none.db'}"]) == 2
    assert "no MLflow database at" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no ./mlflow.db, no new empty database


def test_an_unknown_model_name_is_a_clear_error(registry, capsys):
    from pipeline.cli import main

    assert main(["generate", "models:/nope@champion", "--prompt", "hi", "--tracking-uri", registry["uri"]]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("esft: error: models:/nope@champion is not in the registry") and "\n" not in error


def test_the_merged_model_is_also_logged_with_the_transformers_flavor(tmp_path):
    import mlflow.pyfunc
    from mlflow import MlflowClient
    from mlflow.models import Model

    run_dir, store = tmp_path / "run", tmp_path / "store"
    save_model_with_tokenizer(run_dir / "base", synthetic.rows("math", 20, seed=6))
    make_adapter(run_dir / "base", run_dir / "adapter", 2.0)
    registration = register(run_dir / "adapter", run_dir, store, 0.5, name="merged", options=ModelLogging(log_merged=True))
    uri = registration.tracking_uri
    client = MlflowClient(uri, uri)
    merged_id = client.get_model_version("merged", "1").tags["merged_model_uri"].removeprefix("models:/")
    location = client.get_logged_model(merged_id).artifact_location
    assert "transformers" in Model.load(location.removeprefix("file://")).flavors
    answer = mlflow.pyfunc.load_model(location).predict(["User: What is 3 plus 4?\n\nAssistant:"], params={"max_new_tokens": 4})
    assert len(answer) == 1 and isinstance(answer[0], str)


def test_register_settings_are_checked():
    from pipeline.config import ConfigError
    from pipeline.register import check_register_settings

    check_register_settings({"model_name": "x", "log_base_model": "never", "log_merged": True}, {"model_name"}, where="run")
    with pytest.raises(ConfigError, match="log_base_model must be auto, always or never"):
        check_register_settings({"log_base_model": "sometimes"}, set(), where="run")
    with pytest.raises(ConfigError, match="unknown register setting"):
        check_register_settings({"log_everything": True}, set(), where="run")


def test_no_module_sets_the_global_tracking_uri():
    sources = [p for folder in ("pipeline", "bench") for p in (ROOT / folder).rglob("*.py")]
    offenders = [str(p.relative_to(ROOT)) for p in sources if "mlflow.set_tracking_uri(" in p.read_text()
                 or "mlflow.start_run(" in p.read_text()]
    assert offenders == []


def test_no_database_file_is_tracked_by_git():
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "*.db"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert tracked == []
    ignored = subprocess.run(["git", "check-ignore", "mlflow.db", "mlruns/0", "mlartifacts/1"], cwd=ROOT,
                             capture_output=True, text=True)
    assert ignored.stdout.split() == ["mlflow.db", "mlruns/0", "mlartifacts/1"]


def test_registering_the_same_adapter_again_adds_no_version(registry):
    # a rerun after a crash between registration and the stage marker registers the same bytes
    # with the same metric again: no new version; evaluated anew (another value), it is a new one
    from mlflow import MlflowClient

    store = Path(registry["uri"].removeprefix("sqlite:///")).parent
    run_dir = registry["run_dir"]
    first = register(run_dir / "a4", run_dir, store, 0.7, name="esft-idempotent")
    again = register(run_dir / "a4", run_dir, store, 0.7, name="esft-idempotent")
    assert (first.version, again.version) == ("1", "1") and again.champion and again.model_uri == first.model_uri
    reevaluated = register(run_dir / "a4", run_dir, store, 0.75, name="esft-idempotent")
    assert reevaluated.version == "2"
    client = MlflowClient(registry["uri"], registry["uri"])
    assert len(client.search_model_versions("name = 'esft-idempotent'")) == 2
