"""The package layout the design promises: the method and the pipeline do not import the testing
module (tiny models); only a `tiny:` model name asked for by the user loads it."""

from __future__ import annotations

import subprocess
import sys

PRODUCT_MODULES = ("esft", "esft.model", "esft.select", "esft.scores", "esft.trainable", "esft.adapter",
                   "esft.demo.pretrain", "esft.demo.quickstart", "pipeline.cli", "pipeline.run", "pipeline.train",
                   "pipeline.train_worker", "pipeline.tune", "pipeline.profile", "pipeline.evaluate", "pipeline.register")


def _loaded_after(statements: str) -> set[str]:
    program = f"import sys\n{statements}\nprint(' '.join(m for m in sys.modules if m.startswith('esft')))"
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_product_code_never_imports_the_testing_module():
    loaded = _loaded_after("\n".join(f"import {name}" for name in PRODUCT_MODULES))
    assert "esft.model" in loaded and "esft.testing" not in loaded


def test_a_tiny_model_name_loads_the_testing_module_on_request():
    loaded = _loaded_after("from esft.model import load_model\nload_model('tiny:mixtral')")
    assert "esft.testing" in loaded
