"""`ray job submit` of a pipeline stage against a local `ray start --head` (token auth on)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from esft.demo import synthetic
from tests.conftest import save_model_with_tokenizer, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PORT, DASHBOARD_PORT = 6391, 8299


def ray_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", **(env or {})}
    return subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True, timeout=timeout, env=environment, cwd=ROOT)


@pytest.fixture(scope="module")
def head_node(tmp_path_factory):
    temp_dir = tmp_path_factory.mktemp("ray-head")
    started = ray_cli("start", "--head", "--node-ip-address=127.0.0.1", f"--port={PORT}", "--dashboard-host=127.0.0.1",
                      f"--dashboard-port={DASHBOARD_PORT}", "--num-cpus=2", f"--temp-dir={temp_dir}", "--include-dashboard=true")
    assert started.returncode == 0, started.stderr[-2000:]
    yield f"http://127.0.0.1:{DASHBOARD_PORT}"
    ray_cli("stop", "--force")
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow  # a Ray head node and a submitted job
def test_profile_stage_runs_as_a_ray_job(head_node, tmp_path):
    corpus = synthetic.rows("math", 40, seed=5)
    model = save_model_with_tokenizer(tmp_path / "model", corpus)
    data = write_jsonl(tmp_path / "task.jsonl", corpus)
    out = tmp_path / "profile"
    submitted = ray_cli(
        "job", "submit", "--working-dir", ".", "--",
        sys.executable, "-m", "pipeline", "profile", "--model", str(model), "--data", str(data), "--out", str(out),
        "--n-sample-tokens", "300", "--seq-len", "64",
        env={"RAY_AUTH_MODE": "token", "RAY_API_SERVER_ADDRESS": head_node},
    )
    assert submitted.returncode == 0, (submitted.stdout + submitted.stderr)[-3000:]
    assert "succeeded" in submitted.stdout + submitted.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["token_scores"]) == ["1", "2", "3"]
