"""`hf-moe-mt analyze`: expert usage per layer and language as JSON (counts prune can reuse) and heatmaps."""

import json

import pytest
import torch

from hf_moe_mt.cli import main as cli_main
from hf_moe_mt.tools.analyze import ExpertUsage, layer_statistics, usage_fractions
from hf_moe_mt.tools.prune import load_usage, prune

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def analysis(exported_dir, run_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("usage") / "usage"
    code = cli_main(["analyze", str(exported_dir), "--corpus", str(run_dir / "corpus"), "--split", "train",
                     "--max-sentences", "6", "--batch-size", "4", "--output", str(output)])
    assert code == 0
    return output, json.loads((output / "expert_usage.json").read_text())


def test_analyze_writes_counts_fractions_statistics_and_heatmaps(analysis):
    output, report = analysis
    assert report["layers"] == ["encoder.1", "decoder.1"] and report["num_experts"] == 4
    assert set(report["counts"]) == {f"{x}-en" for x in "ar de es fr hi ru zh".split()} | {
        f"en-{x}" for x in "ar de es fr hi ru zh".split()}
    for layer in report["layers"]:
        stack = layer.split(".")[0]
        total = sum(sum(report["counts"][d][layer]) for d in report["counts"])
        assert total == sum(t[stack] for t in report["tokens"].values())  # top-1: one choice per real token
        assert sum(report["fractions"][layer]) == pytest.approx(1.0)
    # per language: encoder layers count the language as source, decoder layers as target
    de_encoder = report["counts"]["de-en"]["encoder.1"]
    assert report["fractions_by_language"]["de"]["encoder.1"] == pytest.approx(usage_fractions(torch.tensor(de_encoder)))
    assert (output / "expert_usage.png").read_bytes()[:8] == PNG
    assert sorted(p.name for p in (output / "heatmaps").iterdir()) == ["decoder.1.png", "encoder.1.png"]


def test_prune_reuses_the_analyze_counts(analysis, exported_dir, tmp_path):
    output, report = analysis
    usage = load_usage(output / "expert_usage.json")
    pruned = prune(exported_dir, tmp_path / "p", "1", usage=output / "expert_usage.json", progress=False)
    for layer in report["layers"]:
        counts = usage.layer_counts()[layer]
        assert pruned["models"]["all"]["kept"][layer] == [int(torch.argmax(counts))]  # no ties: argmax is first


def test_layer_statistics_of_balanced_and_collapsed_layers():
    balanced, collapsed = layer_statistics(torch.tensor([5, 5, 5, 5])), layer_statistics(torch.tensor([0, 20, 0, 0]))
    assert balanced == {"normalized_entropy": pytest.approx(1.0), "load_cv": 0.0, "unused_experts": 0}
    assert collapsed["normalized_entropy"] == pytest.approx(0.0) and collapsed["unused_experts"] == 3
    assert collapsed["load_cv"] == pytest.approx(3 ** 0.5)


def test_by_language_groups_encoder_by_source_and_decoder_by_target():
    usage = ExpertUsage(["encoder.1", "decoder.1"], 2,
                        {"de-en": {"encoder.1": [3, 0], "decoder.1": [0, 4]},
                         "en-de": {"encoder.1": [0, 5], "decoder.1": [6, 0]}},
                        {"de-en": {"encoder": 3, "decoder": 4}, "en-de": {"encoder": 5, "decoder": 6}})
    view = usage.by_language()
    assert view["de"]["encoder.1"].tolist() == [3, 0] and view["de"]["decoder.1"].tolist() == [6, 0]
    assert view["en"]["encoder.1"].tolist() == [0, 5] and view["en"]["decoder.1"].tolist() == [0, 4]


def test_analyze_refuses_a_used_output_without_overwrite(analysis, exported_dir, run_dir, capsys):
    output, _ = analysis
    assert cli_main(["analyze", str(exported_dir), "--corpus", str(run_dir / "corpus"), "--output", str(output)]) == 2
    assert "--overwrite" in capsys.readouterr().err.strip().splitlines()[-1]
