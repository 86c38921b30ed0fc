"""backends/probe: the CPU GEMM library is decided by measurement (either winner, per use), cached per machine and
torch version, read back without measuring again, and overridable; bad overrides fail with one line."""

import json

import pytest
import torch

from hf_moe_mt.backends import cpu_gemm, enable_fast_cpu, experts_modules, probe

from ..modeling.conftest import make_model

pytestmark = pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="torch built without oneDNN")
PRODUCTS = 7  # linear: forward, dx, dW, decode forward; experts: forward, dx, dW


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MOE_MT_CACHE", str(tmp_path))
    monkeypatch.delenv(probe.ENV_OVERRIDE, raising=False)
    monkeypatch.setattr(probe, "_memo", {})
    return tmp_path / probe.CACHE_FILE


def fake_timer(monkeypatch, onednn_seconds: dict[str, float], bmm_seconds: float = 2.0,
               packed_seconds: dict[str, float] | None = None, workers_seconds: float = 1.0):
    """Each call on torch's library (and the per-expert loop on the calling thread, and oneDNN with a plain
    weight in the packed comparison) takes 1 s, on oneDNN `onednn_seconds[use]`, the padded bmm `bmm_seconds`,
    the loop on the worker threads `workers_seconds`, a packed weight `packed_seconds[use]` (default 2 s:
    slower); records every timed call."""
    calls = []
    packed_seconds = packed_seconds or {"linear": 2.0, "experts": 2.0}

    def seconds(name, candidate, call):
        calls.append(candidate)
        use = name.split()[0]
        return {"onednn": onednn_seconds[use], "bmm": bmm_seconds, "workers": workers_seconds,
                "packed": packed_seconds.get(use)}.get(candidate, 1.0)

    monkeypatch.setattr(probe, "_seconds", seconds)
    return calls


@pytest.mark.parametrize("linear,experts", [(0.5, 0.5), (2.0, 0.5), (0.5, 0.97), (1.3, 1.3)])
def test_each_use_goes_to_the_library_that_measured_faster(linear, experts, cache, monkeypatch):
    calls = fake_timer(monkeypatch, {"linear": linear, "experts": experts})
    choice = probe.choose_gemm()
    assert choice.source == "probe"
    assert choice.linear == ("onednn" if linear < 0.95 else "torch")
    assert choice.experts == ("onednn" if experts < 0.95 else "torch")  # within the 5 % margin: torch's default
    # the probe's whole cost, a fixed number of GEMMs: every product, the workers/caller and bmm/loop pairs, and
    # two packed/plain pairs per use
    assert len(calls) == (PRODUCTS + 2 + 2 * 2) * 2 * (probe.REPEATS + 1)
    assert choice.ratios["linear dW"] == pytest.approx(linear) and choice.ratios["experts dx"] == pytest.approx(experts)
    assert not choice.experts_bmm and not choice.linear_packed and not choice.experts_packed


@pytest.mark.parametrize("linear,experts", [(0.5, 0.5), (2.0, 0.5), (0.5, 2.0)])
@pytest.mark.parametrize("packed_seconds", [0.7, 0.97])
def test_inference_reads_packed_onednn_weights_where_they_beat_the_uses_own_library(linear, experts, packed_seconds,
                                                                                    cache, monkeypatch):
    """Whichever library a use trains on: packed oneDNN decoding against that library's plain GEMM."""
    fake_timer(monkeypatch, {"linear": linear, "experts": experts}, packed_seconds={"linear": packed_seconds,
                                                                                      "experts": packed_seconds})
    choice = probe.choose_gemm()
    faster = packed_seconds < 0.95  # within the 5 % margin: plain weights on the use's own library
    assert choice.linear_packed == faster and choice.experts_packed == faster
    measured = {name.split()[0] for name in choice.ratios if name.endswith("packed/plain")}
    assert measured == {"linear", "experts"}
    for use in ("linear", "experts"):
        library = getattr(choice, use)
        expected = "" if not faster else " (packed for inference)" if library == "onednn" else \
            " (inference on packed oneDNN)"
        assert f"{'Linear' if use == 'linear' else 'expert'} GEMMs: {library}{expected}," in choice.describe()


def test_the_packed_comparison_times_the_uses_own_library_on_plain_weights(monkeypatch):
    """The "plain" side runs torch's F.linear for a use on torch, oneDNN for a use on oneDNN."""
    def run_each_once(name, calls):
        for call in calls.values():
            call()
        return {label: 1.0 for label in calls}

    monkeypatch.setattr(probe, "_best_seconds", run_each_once)
    calls = []
    monkeypatch.setattr(probe, "onednn_linear", lambda *a, **k: calls.append(k.get("packed", False)) or a[0])
    probe._packed_ratios("experts", 4, "torch")
    assert calls == [True, True]  # only the packed side went to oneDNN
    calls.clear()
    probe._packed_ratios("experts", 4, "onednn")
    assert calls == [False, True, False, True]


@pytest.mark.parametrize("workers_seconds,uses_workers", [(0.5, True), (0.97, False), (1.2, False)])
def test_experts_use_the_worker_threads_only_where_they_measured_faster(workers_seconds, uses_workers, cache,
                                                                        monkeypatch):
    fake_timer(monkeypatch, {"linear": 0.5, "experts": 0.5}, workers_seconds=workers_seconds)
    choice = probe.choose_gemm()
    assert choice.experts_workers == uses_workers  # within the 5 % margin: the library's own threading
    assert ("on worker threads" if uses_workers else "one expert at a time") in choice.describe()
    assert choice.ratios["experts loop workers/caller"] == pytest.approx(workers_seconds)
    model = make_model()
    enable_fast_cpu(model)
    assert all(m.implementation.workers == uses_workers for m in experts_modules(model))


@pytest.mark.parametrize("bmm_seconds,uses_bmm", [(0.5, True), (0.97, False), (1.5, False)])
def test_near_uniform_groups_use_a_padded_bmm_only_where_it_measured_faster(bmm_seconds, uses_bmm, cache,
                                                                            monkeypatch):
    fake_timer(monkeypatch, {"linear": 0.5, "experts": 0.5}, bmm_seconds)
    choice = probe.choose_gemm()
    assert choice.experts_bmm == uses_bmm and ("padded bmm" in choice.describe()) == uses_bmm
    assert choice.ratios["experts uniform groups bmm/loop"] == pytest.approx(bmm_seconds)


def test_the_result_is_cached_per_machine_and_read_back_without_measuring(cache, monkeypatch):
    calls = fake_timer(monkeypatch, {"linear": 0.5, "experts": 2.0})
    first = probe.choose_gemm()
    entries = json.loads(cache.read_text())
    assert list(entries) == [probe.machine_key()] and torch.__version__ in probe.machine_key()
    assert probe.cpu_model() in probe.machine_key()
    monkeypatch.setattr(probe, "_memo", {})  # a new process
    calls.clear()
    again = probe.choose_gemm()
    assert calls == [] and again.source == "cache"
    assert (again.linear, again.experts, again.experts_bmm, again.ratios) == (first.linear, first.experts,
                                                                              first.experts_bmm, first.ratios)


def test_another_machine_or_torch_version_measures_again(cache, monkeypatch):
    calls = fake_timer(monkeypatch, {"linear": 0.5, "experts": 0.5})
    probe.choose_gemm()
    monkeypatch.setattr(probe, "_memo", {})
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    calls.clear()
    assert probe.choose_gemm().source == "probe" and calls
    assert len(json.loads(cache.read_text())) == 2


@pytest.mark.parametrize("content", ["{not json", "[]", json.dumps({"KEY": {"linear": "onednn"}})])
def test_a_corrupt_cache_is_measured_over(content, cache, monkeypatch):
    cache.write_text(content.replace("KEY", probe.machine_key()))
    fake_timer(monkeypatch, {"linear": 0.5, "experts": 0.5})
    assert probe.choose_gemm().source == "probe"
    assert json.loads(cache.read_text())[probe.machine_key()]["linear"] == "onednn"


def test_an_unwritable_cache_dir_still_gives_a_measured_choice(tmp_path, cache, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("HF_MOE_MT_CACHE", str(blocker / "cache"))  # a directory below a file
    fake_timer(monkeypatch, {"linear": 2.0, "experts": 0.5})
    choice = probe.choose_gemm()
    assert (choice.linear, choice.experts, choice.source) == ("torch", "onednn", "probe")


@pytest.mark.parametrize("how", ["argument", "environment"])
@pytest.mark.parametrize("library", ["onednn", "torch"])
def test_an_override_skips_the_probe(how, library, cache, monkeypatch):
    calls = fake_timer(monkeypatch, {"linear": 0.5, "experts": 0.5})
    if how == "environment":
        monkeypatch.setenv(probe.ENV_OVERRIDE, library)
    choice = probe.choose_gemm(library if how == "argument" else "auto")
    assert (choice.linear, choice.experts, choice.source) == (library, library, "override")
    assert calls == [] and not cache.exists()


def test_an_unknown_override_is_refused_in_one_line(cache, monkeypatch):
    monkeypatch.setenv(probe.ENV_OVERRIDE, "mkl")
    with pytest.raises(ValueError, match=r"^HF_MOE_MT_CPU_GEMM='mkl' is not one of \('auto', 'onednn', 'torch'\)$"):
        probe.choose_gemm()
    with pytest.raises(ValueError, match=r"^gemm='fast' is not one of"):
        probe.choose_gemm("fast")


def test_the_real_probe_is_short_and_records_its_cost(cache):
    """One real measurement on this machine (no fake timer): every product measured, its cost recorded."""
    choice = probe.choose_gemm()
    assert choice.source == "probe" and choice.linear in ("onednn", "torch") and choice.experts in ("onednn", "torch")
    assert len(choice.ratios) == PRODUCTS + 2 + 2 * 2 and all(ratio > 0 for ratio in choice.ratios.values())
    assert 0 < choice.probe_seconds < 30  # well under a second on a quiet 2-core machine; CI shares its cores
    assert "time ratios oneDNN/torch, workers/caller, bmm/loop, packed/plain" in choice.describe()
