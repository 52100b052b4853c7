"""Stage cache keys (pipeline.cache_keys, pipeline.run.stage): results are reused only for the same
settings, the same data bytes and the same model files."""

from __future__ import annotations

import os

from pipeline.cache_keys import content_hash, digest, keyed, model_fingerprint
from pipeline.run import stage, stage_key


def test_a_stage_reruns_when_its_data_file_is_regenerated_in_place(tmp_path):
    data, model = tmp_path / "train.jsonl", tmp_path / "model"
    data.write_text('{"row": 1}\n')
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    runs = []
    settings = {"data": [str(data)], "model": str(model), "top_p": 0.2}

    def work() -> int:
        runs.append(1)
        return len(runs)

    assert stage(tmp_path, "profile", stage_key(settings), work)["result"] == 1
    assert stage(tmp_path, "profile", stage_key(settings), work)["result"] == 1  # unchanged: skipped
    data.write_text('{"row": 1}\n')  # the same bytes written again (a regenerated, identical corpus)
    assert stage(tmp_path, "profile", stage_key(settings), work)["result"] == 1
    data.write_text('{"row": 2}\n')  # same path, other rows
    assert stage(tmp_path, "profile", stage_key(settings), work)["result"] == 2
    (model / "model.safetensors").write_bytes(b"other weights")  # the model directory changed
    assert stage(tmp_path, "profile", stage_key(settings), work)["result"] == 3
    assert stage(tmp_path, "profile", stage_key({**settings, "top_p": 0.3}), work)["result"] == 4  # a setting changed
    assert len(runs) == 4


def test_content_hash_follows_bytes_and_names_not_times(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text("x\n")
    before = content_hash(str(folder))
    os.utime(folder / "a.jsonl", ns=(1, 1))
    assert content_hash(str(folder)) == before  # a touched file is the same data
    (folder / "a.jsonl").rename(folder / "b.jsonl")
    assert content_hash(str(folder)) != before  # another file name is another dataset layout
    assert content_hash("org/dataset") == content_hash("org/dataset") != content_hash("org/other")
    assert content_hash(None) is None


def test_model_fingerprint_sees_changed_files_without_reading_them(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"w")
    before = model_fingerprint(str(tmp_path))
    os.utime(tmp_path / "model.safetensors", ns=(10**18, 10**18))
    assert model_fingerprint(str(tmp_path)) != before
    assert model_fingerprint("deepseek-ai/DeepSeek-V2-Lite") == "deepseek-ai/DeepSeek-V2-Lite"
    assert model_fingerprint(None) is None


def test_keyed_hashes_named_paths_and_leaves_other_settings(tmp_path):
    data = tmp_path / "a.jsonl"
    data.write_text("1\n")
    settings = {"data": [str(data)], "general_data": str(data), "lr": 1e-3, "model": "tiny:deepseek_v2"}
    key = keyed(settings, data=["data", "general_data"], models=["model"])
    assert key == {"data": [content_hash(str(data))], "general_data": content_hash(str(data)), "lr": 1e-3,
                   "model": "tiny:deepseek_v2"}
    data.write_text("2\n")
    assert digest(keyed(settings, data=["data"])) != digest(key)
    assert digest({"a": 1, "b": 2}) == digest({"b": 2, "a": 1})
