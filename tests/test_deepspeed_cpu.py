"""DeepSpeed on CPU workers without compiled extensions (no Ray here): a first run must not need a
C++ build, and a build interrupted once must not hang every later run."""

from __future__ import annotations

import pytest


@pytest.mark.timeout(120)  # without the fix this waits on the stale lock forever
def test_cpu_workers_never_build_or_wait_for_the_shared_memory_op(tmp_path, monkeypatch):
    import deepspeed.ops
    from deepspeed.comm.torch import build_shm_op
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    from pipeline.train_worker import _without_shared_memory_all_reduce

    # What a compile killed half-way leaves behind: torch's build lock, and no module.
    extensions = tmp_path / "torch_extensions"
    build_dir = extensions / ShareMemCommBuilder.NAME  # where torch builds it under TORCH_EXTENSIONS_DIR
    build_dir.mkdir(parents=True)
    (build_dir / "lock").touch()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, ShareMemCommBuilder.NAME,
                        deepspeed.ops.__compatible_ops__.get(ShareMemCommBuilder.NAME))  # restored afterwards

    _without_shared_memory_all_reduce()
    assert build_shm_op() is None  # DeepSpeed falls back to torch.distributed's all-reduce
    assert sorted(p.name for p in build_dir.iterdir()) == ["lock"]  # nothing was built or waited for
