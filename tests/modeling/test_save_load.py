"""save_pretrained / from_pretrained: exact round trips, safetensors, bf16 loading, remote code without the package."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSeq2SeqLM

from hf_moe_mt import MoEMTForConditionalGeneration

from .conftest import make_model, random_batch

REMOTE_CODE_FILES = {"configuration_moe_mt.py", "generation_moe_mt.py", "modeling_moe_mt.py", "moe.py",
                     "moe_kernels.py"}


@pytest.mark.parametrize("tie_word_embeddings", [True, False])
def test_save_load_gives_bit_identical_logits(tmp_path, tie_word_embeddings):
    model = make_model(tie_word_embeddings=tie_word_embeddings)
    batch = random_batch()
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    loaded = MoEMTForConditionalGeneration.from_pretrained(tmp_path)
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    shared = loaded.model.shared.weight  # encoder and decoder always share it; the LM head only when tied
    assert loaded.model.encoder.embed_tokens.weight is shared and loaded.model.decoder.embed_tokens.weight is shared
    assert (loaded.lm_head.weight is shared) == tie_word_embeddings


@pytest.mark.parametrize("tie_word_embeddings", [True, False])
@pytest.mark.parametrize("stored", ["model.shared.weight", "model.encoder.embed_tokens.weight", None])
def test_embedding_tables_are_filled_from_any_tied_copy(tmp_path, tie_word_embeddings, stored):
    """A checkpoint may hold the token table under any of its tied names (or none: then it is reported missing
    and initialised, never left on the meta device); encoder and decoder always end up sharing it."""
    model = make_model(tie_word_embeddings=tie_word_embeddings)
    state = {name: tensor for name, tensor in model.state_dict().items() if not name.endswith("embed_tokens.weight")
             and name != "model.shared.weight" and (tie_word_embeddings is False or name != "lm_head.weight")}
    if stored is not None:
        state[stored] = model.state_dict()["model.shared.weight"]
    model.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded, info = MoEMTForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    shared = loaded.model.shared.weight
    assert shared.device.type == "cpu" and loaded.model.encoder.embed_tokens.weight is shared
    assert loaded.model.decoder.embed_tokens.weight is shared
    if stored is None:
        assert "model.shared.weight" in info["missing_keys"] and shared.abs().sum() > 0
    else:
        assert info["missing_keys"] == set() and torch.equal(shared, model.model.shared.weight)


def test_save_writes_safetensors_auto_map_and_code(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt")) for f in files)
    assert REMOTE_CODE_FILES <= files
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_moe_mt.MoEMTConfig",
        "AutoModelForSeq2SeqLM": "modeling_moe_mt.MoEMTForConditionalGeneration",
    }
    # Public parameter names (EP plans match on them), experts on dim 0, shared embedding stored once.
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.encoder.layers.1.mlp.experts.up_proj").get_shape() == [4, 48, 32]
    assert {"model.encoder.layers.1.mlp.gate.weight", "model.encoder.layers.1.mlp.experts.up_proj",
            "model.decoder.layers.1.mlp.experts.down_proj_bias", "model.decoder.layers.0.mlp.up_proj.weight"} <= keys
    assert "model.encoder.embed_tokens.weight" not in keys and "lm_head.weight" not in keys


def test_auto_model_loads_saved_folder_with_local_classes(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    assert type(loaded) is MoEMTForConditionalGeneration


@pytest.mark.parametrize("path", ["from_pretrained", "from_config"])
def test_bf16_loading_keeps_router_fp32(tmp_path, tiny_model, path):
    tiny_model.save_pretrained(tmp_path)
    if path == "from_pretrained":
        model = MoEMTForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    else:  # a new model in bf16, then the same weights: the router is created fp32 all the same
        model = AutoModelForSeq2SeqLM.from_config(tiny_model.config, dtype=torch.bfloat16).eval()
        model.load_state_dict(tiny_model.state_dict())
    moe = model.model.encoder.layers[1].mlp
    assert moe.gate.weight.dtype == torch.float32
    assert moe.experts.up_proj.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.bfloat16
    batch = random_batch()
    with torch.no_grad():
        logits = model(**batch).logits
        expected = tiny_model(**batch).logits
    assert logits.dtype == torch.bfloat16
    assert torch.allclose(logits.float(), expected, atol=0.1)


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["hf_moe_mt"] = None  # the package may be pip-installed (CI): make any import of it fail
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSeq2SeqLM
    model = AutoModelForSeq2SeqLM.from_pretrained(sys.argv[1], trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    inputs = load_file(sys.argv[2])
    with torch.no_grad():
        logits = model(**inputs).logits
    save_file({"logits": logits.contiguous()}, sys.argv[3])
    """
)


def test_remote_code_loads_without_the_package(tmp_path, tiny_model):
    model_dir, inputs_file, logits_file = tmp_path / "model", tmp_path / "inputs.st", tmp_path / "logits.st"
    tiny_model.save_pretrained(model_dir)
    batch = random_batch()
    save_file(batch, inputs_file)
    with torch.no_grad():
        expected = tiny_model(**batch).logits
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # Same thread count as here: a different GEMM split can change the last bit of a sum.
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"),
               OMP_NUM_THREADS=str(torch.get_num_threads()))
    run = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(model_dir), str(inputs_file), str(logits_file)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert torch.equal(load_file(logits_file)["logits"], expected)
