"""Export for publishing: the card (model-index from `evaluate`, training data, licence), bf16 and sharded
weights, push-to-hub through huggingface_hub (mocked: no network), and one-line errors for bad inputs."""

import json
import shutil
from dataclasses import asdict

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForSeq2SeqLM

from hf_moe_mt.cli import main as cli_main
from hf_moe_mt.data import bible
from hf_moe_mt.tools.evaluate import evaluate_model
from hf_moe_mt.tools.export import export_model
from hf_moe_mt.tools.model_card import data_licence
from hf_moe_mt.tools.translate import load_translator, translate


@pytest.fixture(scope="module")
def evaluation_json(exported_dir, run_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("eval") / "eval"
    evaluate_model(exported_dir, run_dir / "corpus", directions=[("de", "en"), ("en", "fr")], num_beams=1,
                   max_new_tokens=4, output_dir=output, progress=False)
    return output / "evaluation.json"


@pytest.fixture(scope="module")
def run_with_config(run_dir, tmp_path_factory):
    """A training output directory as `hf-moe-mt train` leaves it: model/, corpus/, train_config.json, summary."""
    root = tmp_path_factory.mktemp("trained") / "run"
    shutil.copytree(run_dir / "model", root / "model")
    shutil.copytree(run_dir / "tokenizer", root / "tokenizer")
    shutil.copytree(run_dir / "corpus", root / "corpus")
    (root / "train_config.json").write_text(json.dumps({"model": {"config": {"num_experts": 4}},
                                                        "training": {"max_steps": 40, "learning_rate": 0.002}}))
    (root / "train_summary.json").write_text(json.dumps({"global_step": 40, "train_loss": 5.25, "eval_loss": 5.5}))
    return root


def test_card_has_model_index_sections_and_a_real_usage_pair(run_with_config, evaluation_json, tmp_path):
    metrics = json.loads(evaluation_json.read_text())
    export_model(run_with_config / "model", tmp_path / "out", run_with_config / "tokenizer", metrics=metrics)
    card = ModelCard.load(tmp_path / "out" / "README.md", ignore_metadata_errors=False)
    results = {(r.dataset_config, r.metric_type): r for r in card.data.eval_results}
    assert set(results) == {("de-en", "bleu"), ("de-en", "chrf"), ("en-fr", "bleu"), ("en-fr", "chrf")}
    assert results[("en-fr", "chrf")].metric_value == round(metrics["directions"]["en-fr"]["chrf"], 2)
    assert results[("de-en", "bleu")].task_type == "translation" and results[("de-en", "bleu")].dataset_split == "test"
    assert card.data.license == "other" and card.data.license_name == "training-data-licence-unknown"  # jsonl data
    text = card.text
    for section in ("## Training data", "## Training", "## Evaluation", "## Intended use", "## Limitations",
                    "## Citation"):
        assert section in text, section
    assert 'src_lang="de", tgt_lang="en"' in text and "Und Gott sprach" in text
    assert "| de-en | 17 | 1 | 2 |" in text  # train / validation / test pairs from build_info.json
    assert "max_steps: 40" in text and "global_step 40" in text
    assert "https://github.com/)" not in text
    assert json.loads((tmp_path / "out" / "eval_results.json").read_text()) == metrics


def bible_info(languages, public_domain_only):
    versions = bible.select_versions(languages, public_domain_only)
    return {"config": {"source": "bible"}, "source": {"versions": {c: asdict(v) for c, v in versions.items()}}}


def test_licence_follows_the_bible_versions_the_data_used():
    assert data_licence(bible_info(["de", "fr"], public_domain_only=True))[:2] == ("apache-2.0", None)
    licence, name, text = data_licence(bible_info(["de", "pt"], public_domain_only=False))
    assert (licence, name) == ("other", "copyrighted-training-data")
    assert "Almeida Corrigida Fiel 1995 (pt)" in text and "public_domain_only" in text
    assert data_licence(None)[:2] == ("other", "training-data-licence-unknown")


def test_license_option_overrides_the_data_default(run_with_config, tmp_path):
    export_model(run_with_config / "model", tmp_path / "mit", run_with_config / "tokenizer", license="mit")
    assert ModelCard.load(tmp_path / "mit" / "README.md").data.license == "mit"


def test_bf16_export_keeps_routers_fp32_and_translates(run_dir, tmp_path):
    export_model(run_dir / "model", tmp_path / "bf16", run_dir / "tokenizer", dtype="bf16")
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "bf16")
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if "mlp.gate" not in n} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if "mlp.gate" in n} == {torch.float32}
    fp32 = AutoModelForSeq2SeqLM.from_pretrained(run_dir / "model")
    assert torch.equal(model.state_dict()["lm_head.weight"], fp32.state_dict()["lm_head.weight"].bfloat16())
    assert translate(load_translator(tmp_path / "bf16", "de", "en", dtype="bfloat16"), ["Danke."], num_beams=1,
                     max_new_tokens=4)[0] is not None


def test_sharded_export_reloads_identically(run_dir, tmp_path):
    export_model(run_dir / "model", tmp_path / "sharded", run_dir / "tokenizer", max_shard_size="100KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) >= 2 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    original = AutoModelForSeq2SeqLM.from_pretrained(run_dir / "model").state_dict()
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "sharded").state_dict()
    assert all(torch.equal(original[k], reloaded[k]) for k in original)


class FakeHfApi:
    """Records what export asks of the Hub; checks the folder is complete when the upload starts."""

    calls = []

    def __init__(self, token=None):
        pass

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
        from huggingface_hub import RepoUrl

        self.calls.append(("create_repo", repo_id, private, exist_ok))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, repo_id, folder_path, repo_type=None, commit_message=None):
        names = sorted(p.name for p in folder_path.iterdir())
        self.calls.append(("upload_folder", repo_id, str(folder_path), names))


def test_push_to_hub_creates_the_repo_and_uploads_the_finished_folder(run_dir, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.calls = []
    code = cli_main(["export", "--checkpoint", str(run_dir / "model"), "--tokenizer", str(run_dir / "tokenizer"),
                     "--output", str(tmp_path / "pushed"), "--push-to-hub", "me/moe-mt", "--private"])
    assert code == 0 and "pushed to https://huggingface.co/me/moe-mt" in capsys.readouterr().out
    (create, upload) = FakeHfApi.calls
    assert create == ("create_repo", "me/moe-mt", True, True)
    assert upload[:3] == ("upload_folder", "me/moe-mt", str(tmp_path / "pushed"))
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", "training_info.json"} <= set(upload[3])


def test_push_to_hub_offline_fails_in_one_line_after_the_folder_is_complete(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code = cli_main(["export", "--checkpoint", str(run_dir / "model"), "--tokenizer", str(run_dir / "tokenizer"),
                     "--output", str(tmp_path / "offline"), "--push-to-hub", "me/moe-mt"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len([line for line in error if "error" in line]) == 1
    assert error[-1].startswith("hf-moe-mt export: error: push to me/moe-mt failed (")
    assert "is complete: upload it later with `hf upload me/moe-mt" in error[-1]
    assert (tmp_path / "offline" / "model.safetensors").is_file() and (tmp_path / "offline" / "README.md").is_file()


def broken_copy(run_dir, tmp_path, how):
    folder = tmp_path / how
    shutil.copytree(run_dir / "model", folder)
    weights = folder / "model.safetensors"
    if how == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif how == "corrupt":
        data = bytearray(weights.read_bytes())
        data[:8] = b"\xff" * 8
        weights.write_bytes(bytes(data))
    elif how == "other_architecture":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "m2m_100"}))
    elif how == "missing_shard":
        AutoModelForSeq2SeqLM.from_pretrained(run_dir / "model").save_pretrained(folder, max_shard_size="100KB")
        next(folder.glob("model-00002-*.safetensors")).unlink()
    return folder


@pytest.mark.parametrize("how, message", [
    ("truncated", "is truncated or corrupt"), ("corrupt", "is truncated or corrupt"),
    ("other_architecture", "holds a 'm2m_100' model, not a 'moe_mt' one (turn it into one with `hf-moe-mt upcycle`)"),
    ("missing_shard", "is missing; copy the whole checkpoint folder"),
])
def test_bad_checkpoints_give_one_line_errors_and_write_nothing(run_dir, tmp_path, capsys, how, message):
    folder = broken_copy(run_dir, tmp_path, how)
    code = cli_main(["export", "--checkpoint", str(folder), "--tokenizer", str(run_dir / "tokenizer"),
                     "--output", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and error[-1].startswith("hf-moe-mt export: error: ") and message in error[-1], error[-1]
    assert "Traceback" not in "\n".join(error)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_bad_metrics_file_is_refused_before_anything_is_written(run_dir, tmp_path, capsys):
    (tmp_path / "m.json").write_text(json.dumps({"schema": "something/9", "directions": {}}))
    code = cli_main(["export", "--checkpoint", str(run_dir / "model"), "--tokenizer", str(run_dir / "tokenizer"),
                     "--output", str(tmp_path / "out"), "--metrics", str(tmp_path / "m.json")])
    assert code == 2 and "is not 'hf_moe_mt.evaluation/1'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
