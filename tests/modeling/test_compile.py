"""torch.compile: the forward compiles and matches eager; in a forward with capacity and padding, graph breaks come
only from inside the MoE layer (data-dependent token counts) and every dense module runs inside a compiled graph.
Decoding (dropless, static cache) compiles without any graph break, beam search included."""

import logging
import re

import pytest
import torch
from torch import nn

from hf_moe_mt.modeling_moe_mt import MoEMTAttention

from .conftest import make_model, random_batch


class _GraphBreakLocations(logging.Handler):
    """Collects the innermost user-code file of every graph break dynamo logs."""

    def __init__(self):
        super().__init__()
        self.files = []

    def emit(self, record):
        locations = re.findall(r'File "([^"]+)", line \d+', record.getMessage())
        if "Graph break" in record.getMessage() and locations:
            self.files.append(locations[-1].rsplit("/", 1)[-1])


def _record_eager_dense_calls(model) -> list[str]:
    """Names of dense modules that ran outside a compiled graph (hooks are traced into compiled code)."""
    eager_calls = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.LayerNorm, nn.Linear, MoEMTAttention)):
            module.register_forward_hook(
                lambda *_, name=name: None if torch.compiler.is_compiling() else eager_calls.append(name)
            )
    return eager_calls


def _compile_and_run(backend: str):
    model, batch = make_model(), random_batch()
    with torch.no_grad():
        expected = model(**batch).logits
    eager_calls = _record_eager_dense_calls(model)
    torch._dynamo.reset()
    handler, logger = _GraphBreakLocations(), logging.getLogger("torch._dynamo")
    torch._logging.set_logs(graph_breaks=True)
    logger.addHandler(handler)
    try:
        with torch.no_grad():
            # dynamic=False: see the xfail below (encoder and decoder MoE calls differ in shape, which would
            # otherwise make the MoE frame dynamic on the very first forward).
            logits = torch.compile(model, backend=backend, dynamic=False)(**batch).logits
    finally:
        logger.removeHandler(handler)
        torch._logging.set_logs()
        torch._dynamo.reset()
    return logits, expected, handler.files, eager_calls


def _check(backend: str, tolerance: float) -> None:
    logits, expected, break_files, eager_calls = _compile_and_run(backend)
    torch.testing.assert_close(logits, expected, atol=tolerance, rtol=tolerance)
    assert "moe.py" in break_files  # the MoE layer's host syncs do break the graph ...
    assert "modeling_moe_mt.py" not in break_files  # ... the model's own code never does
    assert eager_calls == []  # and every dense module still runs compiled


def test_compiled_forward_matches_eager_and_breaks_only_in_moe():
    _check("eager", 1e-5)  # dynamo tracing only: ~15 s


@pytest.mark.slow
def test_inductor_compiled_forward_matches_eager():
    _check("inductor", 1e-4)  # + C++ code generation: ~70 s on 2 cores


def test_compiled_forward_handles_a_new_batch_shape():
    model = make_model()
    compiled = torch.compile(model, backend="eager")
    try:
        for src_len in (9, 12):
            batch = random_batch(src_len=src_len)
            with torch.no_grad():
                torch.testing.assert_close(compiled(**batch).logits, model(**batch).logits, atol=1e-5, rtol=1e-5)
    finally:
        torch._dynamo.reset()


def _translate(model, batch, **kwargs):
    with torch.no_grad():
        return model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=6,
                              min_new_tokens=6, **kwargs)


@pytest.mark.parametrize("num_beams", [1, 4])
def test_static_cache_translates_like_the_dynamic_cache(num_beams):
    model, batch = make_model(num_experts_per_tok=2, init_std=0.3), random_batch()
    expected = _translate(model, batch, num_beams=num_beams)
    assert len(set(expected[:, 1:].flatten().tolist())) > 2  # a random model that does not repeat one token
    assert torch.equal(_translate(model, batch, num_beams=num_beams, cache_implementation="static"), expected)


def test_compiled_beam_search_has_no_graph_break_and_no_recompilation():
    """Beam search with a static cache and the forward compiled with fullgraph=True (a graph break raises): the
    tokens equal eager decoding, and a second batch of the same shape runs without recompiling. backend="eager":
    dynamo's tracing decides graph breaks, code generation is not needed for that."""
    model, batch = make_model(num_experts_per_tok=2, init_std=0.3), random_batch()
    other = random_batch(seed=1)
    expected = [_translate(model, b, num_beams=4) for b in (batch, other)]
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, fullgraph=True, dynamic=False, backend="eager")
    try:
        assert torch.equal(_translate(model, batch, num_beams=4, cache_implementation="static"), expected[0])
        with torch.compiler.set_stance("fail_on_recompile"):
            assert torch.equal(_translate(model, other, num_beams=4, cache_implementation="static"), expected[1])
    finally:
        torch._dynamo.reset()
