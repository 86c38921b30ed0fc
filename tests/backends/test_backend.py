"""enable_fast_cpu on whole models: the same losses, gradients and beams as the model's standard kernels, nothing
saved with the model, undone by disable_fast_cpu, honoured by expert parallelism and by remote-code copies."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hf_moe_mt import MoEMTForConditionalGeneration
from hf_moe_mt.backends import OFF, cpu_experts, cpu_gemm, disable_fast_cpu, enable_fast_cpu, experts_modules
from hf_moe_mt.moe import GroupedExperts

from ..modeling.conftest import loss_and_grads, make_model, random_batch

pytestmark = pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="torch built without oneDNN")


@pytest.fixture
def onednn_shapes(monkeypatch):
    """Every GEMM forced onto oneDNN at these tiny sizes; records each oneDNN call's weight shape."""
    shapes, real = [], cpu_gemm.onednn_linear

    def recorded(x, w, *args, **kwargs):
        shapes.append(tuple(w.shape))
        return real(x, w, *args, **kwargs)

    monkeypatch.setattr(cpu_gemm, "MIN_FLOPS", 0)
    monkeypatch.setattr(cpu_gemm, "onednn_linear", recorded)
    monkeypatch.setattr(cpu_experts, "onednn_linear", recorded)
    return shapes


@pytest.fixture
def two_threads():
    """Two intra-op threads, so the experts really run on the worker threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("gemm", ["onednn", "torch"])
def test_training_with_the_backend_gives_the_standard_loss_and_gradients(gemm, onednn_shapes, two_threads):
    """Every Linear (attention, dense FFN, LM head) and the experts on the backend, forward and backward, on two
    threads (the experts then run on the worker threads): loss and every gradient equal the standard kernels'."""
    model, batch = make_model(num_experts_per_tok=2).train(), random_batch()
    expected_loss, expected_grads = loss_and_grads(model, batch)
    choice = enable_fast_cpu(model, gemm=gemm)
    assert (choice.linear, choice.experts, choice.source) == (gemm, gemm, "override")
    loss, grads = loss_and_grads(model, batch)
    config = model.config
    if gemm == "onednn":
        assert {(config.vocab_size, config.d_model), (config.d_model, config.vocab_size),  # LM head forward, dx
                (config.expert_ffn_dim, config.d_model), (config.d_model, config.expert_ffn_dim)} <= set(onednn_shapes)
    else:
        assert onednn_shapes == []
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_generate_with_the_backend_gives_the_standard_beams(onednn_shapes):
    model, batch = make_model(num_experts_per_tok=2), random_batch()
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], num_beams=3, max_new_tokens=8,
                  min_new_tokens=8, output_scores=True, return_dict_in_generate=True)
    reference = model.generate(**kwargs)
    enable_fast_cpu(model, gemm="onednn")
    fast = model.generate(**kwargs)
    config = model.config
    assert {(config.d_model, config.d_model), (config.decoder_ffn_dim, config.d_model),
            (config.expert_ffn_dim, config.d_model), (config.vocab_size, config.d_model)} <= set(onednn_shapes)
    assert torch.equal(fast.sequences, reference.sequences)
    for step_fast, step_reference in zip(fast.scores, reference.scores):
        torch.testing.assert_close(step_fast, step_reference, atol=1e-4, rtol=1e-4)


def test_the_backend_changes_no_type_no_weight_and_nothing_saved(tmp_path, onednn_shapes):
    model = make_model()
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    enable_fast_cpu(model, gemm="onednn")
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    assert all(cpu_gemm.routes_to_onednn(m) for m in model.modules() if isinstance(m, nn.Linear))
    assert all(m.implementation is cpu_experts.KERNELS["onednn", False, False, True] for m in experts_modules(model))
    model.save_pretrained(tmp_path)
    loaded = MoEMTForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.config.experts_kernel == "auto"
    assert not any(cpu_gemm.routes_to_onednn(m) for m in loaded.modules())
    assert all(m.implementation == "auto" for m in experts_modules(loaded))
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())


def test_disable_restores_the_standard_kernels_including_a_chosen_one(onednn_shapes):
    model = make_model(experts_kernel="loop")
    enable_fast_cpu(model, gemm="onednn")
    enable_fast_cpu(model, gemm="torch")  # applying again replaces, and still remembers the model's own kernel
    disable_fast_cpu(model)
    assert not any(cpu_gemm.routes_to_onednn(m) for m in model.modules())
    assert all(m.implementation == "loop" for m in experts_modules(model))
    with torch.no_grad():
        model(**random_batch())
    assert onednn_shapes == []


def test_environment_off_leaves_the_model_standard(monkeypatch, onednn_shapes):
    monkeypatch.setenv("HF_MOE_MT_CPU_GEMM", "off")
    model = make_model()
    assert enable_fast_cpu(model) is OFF and "off" in OFF.describe()
    assert all(m.implementation == "auto" for m in experts_modules(model))
    assert not any(cpu_gemm.routes_to_onednn(m) for m in model.modules())


def test_expert_parallel_slices_keep_the_backend_kernel():
    """parallelize_experts builds new experts modules: they must inherit the kernel, in either order."""
    from hf_moe_mt.parallel import ExpertParallelGroups, parallelize_experts

    model = make_model()
    enable_fast_cpu(model, gemm="torch")
    groups = ExpertParallelGroups(ep_size=1, ep_rank=0, ep_group=None, edp_size=1, edp_rank=0, edp_group=None,
                                  world_size=1)
    parallelize_experts(model, groups)
    experts = experts_modules(model)
    assert experts and all(type(m) is not GroupedExperts for m in experts)
    assert all(m.implementation is cpu_experts.KERNELS["torch", False, False, True] for m in experts)


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSeq2SeqLM
    model = AutoModelForSeq2SeqLM.from_pretrained(sys.argv[1], trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    from hf_moe_mt.backends import cpu_experts, cpu_gemm, enable_fast_cpu, experts_modules
    cpu_gemm.MIN_FLOPS = 0
    enable_fast_cpu(model, gemm="onednn")
    experts = experts_modules(model)
    assert experts and all(m.implementation is cpu_experts.KERNELS["onednn", False, False, True] for m in experts)
    assert all(type(m).__module__.startswith("transformers_modules") for m in experts)
    with torch.no_grad():
        logits = model(**load_file(sys.argv[2])).logits
    save_file({"logits": logits.contiguous()}, sys.argv[3])
    """
)


def test_a_model_loaded_as_remote_code_takes_the_backend(tmp_path):
    model = make_model()
    model_dir, inputs_file, logits_file = tmp_path / "model", tmp_path / "inputs.st", tmp_path / "logits.st"
    model.save_pretrained(model_dir)
    batch = random_batch()
    save_file(batch, inputs_file)
    with torch.no_grad():
        expected = model(**batch).logits
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", REMOTE_SCRIPT, str(model_dir), str(inputs_file), str(logits_file)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    torch.testing.assert_close(load_file(logits_file)["logits"], expected, rtol=1e-4, atol=1e-4)
