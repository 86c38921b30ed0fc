"""The model's own files are standard transformers code: exact `nn.Linear` projections, Hub remote code free of
private ops and threads, and an import that changes nothing in the process but the registrations."""

import ast
import json
import os
import subprocess
import sys

from torch import nn

from hf_moe_mt.backends import experts_modules

from .conftest import make_model

PRIVATE_OPS = {"mkldnn", "_linear_pointwise", "set_num_threads"}  # backend ops and thread-count changes
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "out_proj", "up_proj", "down_proj", "lm_head")


def test_every_projection_and_the_lm_head_is_exactly_nn_linear():
    """bitsandbytes, torch.ao quantization, fp8/GGUF integrations and PEFT find layers by this type."""
    model = make_model()
    projections = [(name, module) for name, module in model.named_modules() if name.endswith(LINEAR_NAMES)
                   and not name.endswith("experts")]
    config = model.config
    attention = 4 * config.encoder_layers + 8 * config.decoder_layers  # q, k, v, out per attention block
    dense_layers = (config.encoder_layers - len(config.sparse_layers("encoder"))
                    + config.decoder_layers - len(config.sparse_layers("decoder")))
    assert len(projections) == attention + 2 * dense_layers + 1  # dense FFNs: up, down; the LM head
    assert all(type(module) is nn.Linear for _, module in projections), [
        (name, type(module)) for name, module in projections if type(module) is not nn.Linear]
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))  # no subclass anywhere


def test_remote_code_imports_only_flat_siblings_and_no_private_ops_or_threads(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    remote = sorted(name for name in os.listdir(tmp_path) if name.endswith(".py"))
    assert remote == ["configuration_moe_mt.py", "generation_moe_mt.py", "modeling_moe_mt.py", "moe.py",
                      "moe_kernels.py"]
    for name in remote:
        tree = ast.parse((tmp_path / name).read_text())
        private = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)} & PRIVATE_OPS
        assert not private, f"{name} uses {private}"
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and f"{node.module}.py" in remote, f"{name}: from {'.' * node.level}{node.module}"
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not {m.split(".")[0] for m in modules} & {"threading", "concurrent", "ctypes", "hf_moe_mt"}, modules
    assert json.loads((tmp_path / "config.json").read_text())["experts_kernel"] == "auto"
    assert all(m.implementation == "auto" for m in experts_modules(model))


IMPORT_SCRIPT = """
import os, sys, threading
before = dict(os.environ)
threads = threading.active_count()
import hf_moe_mt
from transformers import AutoModelForSeq2SeqLM, pipeline
assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())
assert threading.active_count() == threads
assert "hf_moe_mt.backends" not in sys.modules and "hf_moe_mt.runtime" not in sys.modules
print("ok")
"""


def test_importing_the_package_changes_no_environment_and_starts_no_threads():
    env = {key: value for key, value in os.environ.items() if key not in ("THP_MEM_ALLOC_ENABLE",)}
    run = subprocess.run([sys.executable, "-c", IMPORT_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
