"""``rltrain eval`` on a tiny model saved to disk: numbers against an independent greedy run with HF ``generate``,
pass@k consistency, the capability breakdown, checkpoint layouts, and one-line errors for bad paths."""

from __future__ import annotations

import copy
import json
import types
from pathlib import Path

import pytest
import torch

from rltrain.cli import compose
from rltrain.commands.eval import main
from rltrain.evaluation import CheckpointPathError, locate
from rltrain.models import load_model, wrap_lora
from rltrain.rollout.collect import PromptIds
from rltrain.sft import warm_start
from rltrain.tasks.prompts import PromptFormatter, load_prompt_sets

# Two kinds, so the breakdown has several groups and a prompt can carry two tags (addition + carry).
TINY = ["experiment=tiny", "task.builtin.train_size=200", "task.eval_size=24", "+task.builtin.mix.addition=1.0",
        "+task.builtin.digits.addition=1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model warm-started just enough to get some prompts right, saved as a model dir."""
    torch.set_num_threads(1)
    config = compose(TINY)
    train_set, eval_set = load_prompt_sets(config.task)
    torch.manual_seed(0)  # the tiny model's initialisation; some seeds learn much less in these few SFT steps
    model, tokenizer = load_model(config.model)
    ids = PromptIds(PromptFormatter(tokenizer, config.task), train_set)
    warm_start(model, tokenizer, [ids[i] for i in range(len(train_set))], [r["answer"] for r in train_set.rows],
               steps=150, lr=3e-3, batch_size=32, seed=0)
    model.eval()
    directory = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    return types.SimpleNamespace(config=config, model=model, tokenizer=tokenizer, rows=eval_set.rows, dir=directory)


@torch.no_grad()
def greedy_replies(model, tokenizer, rows, max_tokens: int) -> list[str]:
    """Greedy completions with ``generate``, one prompt at a time (the tiny experiment: chat template, no system
    prompt or instruction)."""
    replies = []
    for row in rows:
        text = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True,
                                             tokenize=False)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_tokens,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        replies.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return replies


def test_eval_of_a_model_dir(tiny, tmp_path):
    output = tmp_path / "eval.json"
    main(TINY + [f"eval.checkpoint={tiny.dir}", "eval.samples=4", "eval.extrapolate_ks=[16,64]",
                 f"eval.output={output}"])
    result = json.loads(output.read_text())

    # greedy accuracy: the tiny task's reward is the exact answer
    replies = greedy_replies(tiny.model, tiny.tokenizer, tiny.rows, tiny.config.rollout.max_tokens)
    correct = [reply.strip() == row["answer"] for reply, row in zip(replies, tiny.rows)]
    assert [p["completion"] for p in result["per_prompt"]] == replies
    assert [p["correct"] for p in result["per_prompt"]] == correct
    assert result["prompts"] == 24 and result["accuracy"] == pytest.approx(sum(correct) / 24)
    assert 0 < sum(correct) < 24, "a test model that gets everything right or wrong checks little"

    # pass@k: pass@1 is the mean per-prompt success rate, pass@n the fraction of prompts solved at least once
    successes = [p["successes"] for p in result["per_prompt"]]
    assert all(p["attempts"] == 4 for p in result["per_prompt"]) and result["samples"] == 4
    curve = result["pass_at_k"]
    assert list(curve) == ["1", "2", "4"]
    assert curve["1"] == pytest.approx(sum(successes) / (4 * 24))
    assert curve["4"] == pytest.approx(sum(c > 0 for c in successes) / 24)
    assert 0 < curve["1"] < curve["4"], "sampling should solve some prompts and miss others"
    assert all(a <= b for a, b in zip(curve.values(), list(curve.values())[1:]))
    fit = result["beta_binomial"]
    assert list(fit["pass_at_k"]) == ["1", "2", "4", "16", "64"]
    assert all(a <= b for a, b in zip(fit["pass_at_k"].values(), list(fit["pass_at_k"].values())[1:]))
    # The fit's pass@1 is its mean alpha / (alpha + beta). ML weights prompts by how informative they are where the
    # pooled rate weights them equally, so the two differ a little: by at most 0.036 over 600 simulated sets of this
    # size (24 prompts x 4 samples, Beta(0.2..5, 0.2..10)), while the pooled rate's own standard error is ~0.06.
    assert fit["pass_at_k"]["1"] == pytest.approx(fit["alpha"] / (fit["alpha"] + fit["beta"]))
    assert fit["pass_at_k"]["1"] == pytest.approx(curve["1"], abs=0.05)

    # breakdown: counts per tag from the rows themselves; kinds partition the prompts
    by_capability, by_kind = result["breakdown"]["capabilities"], result["breakdown"]["kind"]
    tags = {t for row in tiny.rows for t in row["capabilities"]}
    assert set(by_capability) == tags >= {"addition", "comparison"}
    for tag, group in by_capability.items():
        members = [i for i, row in enumerate(tiny.rows) if tag in row["capabilities"]]
        assert group["prompts"] == len(members)
        assert group["accuracy"] == pytest.approx(sum(correct[i] for i in members) / len(members))
        assert group["pass_at_k"]["4"] == pytest.approx(sum(successes[i] > 0 for i in members) / len(members))
    assert sum(g["prompts"] for g in by_kind.values()) == 24
    assert sum(g["prompts"] * g["accuracy"] for g in by_kind.values()) == pytest.approx(sum(correct))


def test_eval_of_an_adapter_checkpoint_uses_its_base_model(tiny, tmp_path):
    """Layout the trainer writes with LoRA: step_N/model/ (adapter) and step_N/base_model/ (the warm-started base,
    which the config's tiny model is not). Greedy only (samples=1); JSON lands next to model/ by default."""
    checkpoint = tmp_path / "checkpoints" / "step_000002"
    tiny.model.save_pretrained(str(checkpoint / "base_model"), safe_serialization=True)
    tiny.tokenizer.save_pretrained(str(checkpoint / "base_model"))
    lora = wrap_lora(copy.deepcopy(tiny.model), {"r": 4, "target_modules": ["q_proj", "v_proj"]})
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA starts as the identity; make it change the model
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    lora.save_pretrained(str(checkpoint / "model"), safe_serialization=True)

    main(TINY + [f"eval.checkpoint={checkpoint}", "eval.samples=1"])
    result = json.loads((checkpoint / "eval.json").read_text())

    replies = greedy_replies(lora.merge_and_unload().eval(), tiny.tokenizer, tiny.rows, tiny.config.rollout.max_tokens)
    assert [p["completion"] for p in result["per_prompt"]] == replies
    correct = [reply.strip() == row["answer"] for reply, row in zip(replies, tiny.rows)]
    assert result["accuracy"] == pytest.approx(sum(correct) / 24)
    assert "pass_at_k" not in result and result["checkpoint"] == str(checkpoint / "model")


def _touch(directory: Path, *names: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_text("{}")
    return directory


MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _complete(checkpoint: Path) -> Path:
    """What makes a trainer checkpoint complete (rltrain.checkpoint): meta.json with every file's size."""
    files = {str(p.relative_to(checkpoint)): p.stat().st_size for p in checkpoint.rglob("*") if p.is_file()}
    (checkpoint / "meta.json").write_text(json.dumps({"step": int(checkpoint.name.split("_")[1]), "files": files}))
    return checkpoint


def test_checkpoint_layouts(tmp_path):
    model = _touch(tmp_path / "plain", *MODEL_FILES)
    assert (locate(model).weights, locate(model).adapter) == (model, False)
    adapter = _touch(tmp_path / "lonely_adapter", *ADAPTER_FILES)
    assert (locate(adapter).adapter, locate(adapter).base) == (True, None)  # the config's model is the base

    step = tmp_path / "run" / "checkpoints" / "step_000120"
    _touch(step / "model", *ADAPTER_FILES)
    _touch(step / "base_model", *MODEL_FILES)
    for path in (step, step / "model"):
        assert locate(path) == locate(step) and locate(path).base == step / "base_model"

    run = tmp_path / "run"
    _complete(step)
    _touch(run / "checkpoints" / "step_000200" / "model", *MODEL_FILES)  # newer, but without meta.json: incomplete
    assert locate(run) == locate(step)
    _touch(run / "final", *MODEL_FILES)
    assert locate(run) == locate(run / "final") and not locate(run).adapter

    _touch(tmp_path / "unfinished_run" / "checkpoints" / "step_000001" / "model", *MODEL_FILES)
    with pytest.raises(CheckpointPathError, match="no complete checkpoint"):
        locate(tmp_path / "unfinished_run")


@pytest.mark.parametrize("files,message", [
    (("config.json", "pytorch_model.bin", "tokenizer.json"), "not a model dir"),  # pickled weights are never loaded
    (("adapter_config.json", "adapter_model.bin"), "neither a model"),
    (("config.json", "model.safetensors"), "no tokenizer files"),
    (("notes.txt",), "not a model dir"),
])
def test_unloadable_directories(tmp_path, files, message):
    with pytest.raises(CheckpointPathError, match=message):
        locate(_touch(tmp_path / "x", *files))


@pytest.mark.parametrize("override,message", [
    ("eval.checkpoint=/nonexistent/run", "rltrain: config error: eval.checkpoint: no directory /nonexistent/run"),
    ("eval.samples=0", "rltrain: config error: eval.ks must lie in"),
])
def test_bad_checkpoint_or_config_is_one_line_and_exit_2(override, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(TINY + [override])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_evaluate_during_training_returns_the_metrics_contract(tiny):
    """``evaluate`` as rltrain/train.py's run_eval calls it, on the engine the trainer builds."""
    from rltrain.evaluation import evaluate
    from rltrain.rewards import RewardScorer
    from rltrain.rollout.hf import HFEngine
    from rltrain.tasks.prompts import PromptSet

    engine = HFEngine(tiny.model, eos_token_ids=[tiny.tokenizer.eos_token_id], pad_token_id=tiny.tokenizer.pad_token_id,
                      batch_size=64)
    ids = PromptIds(PromptFormatter(tiny.tokenizer, tiny.config.task), PromptSet(tiny.rows, "eval"))
    result = evaluate(engine, ids, RewardScorer.from_config(tiny.config.task), tiny.tokenizer,
                      max_tokens=tiny.config.rollout.max_tokens, samples=4, temperature=1.0, top_p=1.0)
    replies = greedy_replies(tiny.model, tiny.tokenizer, tiny.rows, tiny.config.rollout.max_tokens)
    correct = [reply.strip() == row["answer"] for reply, row in zip(replies, tiny.rows)]
    assert result["eval_accuracy"] == pytest.approx(sum(correct) / 24) == result["eval_reward_mean"]
    assert list(result["eval_pass_at_k"]) == ["1", "2", "4"]
    comparison = [c for c, row in zip(correct, tiny.rows) if row["kind"] == "comparison"]
    assert result["eval_accuracy_by_capability"]["comparison"] == pytest.approx(sum(comparison) / len(comparison))
    assert [s["completion"] for s in result["eval_samples"]] == replies[:3]


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "header":  # the 8-byte length, then the JSON header
        data[12] ^= 0xFF
    else:  # one byte of tensor data: same size, valid format
        data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how, problem", [
    ("truncated", "the weights cannot be loaded, the files are damaged or not a model's (SafetensorError: Error while "
                  "deserializing header: incomplete metadata, file not fully covered)"),
    ("header", "the weights cannot be loaded, the files are damaged or not a model's (SafetensorError: Error while "
               "deserializing header: "),
])
def test_damaged_weights_are_one_line_and_exit_2(tiny, tmp_path, capsys, how, problem):
    """They were safetensors' traceback from deep inside transformers."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny.dir, model)
    _damage(model / "model.safetensors", how)
    with pytest.raises(SystemExit) as exit_:
        main(TINY + [f"eval.checkpoint={model}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"rltrain: config error: eval.checkpoint: {model}: {problem}")


def test_a_checkpoints_weights_damaged_at_the_same_size_are_refused(tiny, tmp_path, capsys):
    """A trainer checkpoint records each file's sha256 (rltrain.checkpoint): a flipped byte in the tensor data loads
    without complaint, and was evaluated as if it were the trained model."""
    import shutil

    from rltrain.checkpoint import sha256

    checkpoint = tmp_path / "checkpoints" / "step_000003"
    shutil.copytree(tiny.dir, checkpoint / "model")
    files = sorted(p for p in checkpoint.rglob("*") if p.is_file())
    (checkpoint / "meta.json").write_text(json.dumps({
        "step": 3, "files": {str(p.relative_to(checkpoint)): p.stat().st_size for p in files},
        "sha256": {str(p.relative_to(checkpoint)): sha256(p) for p in files}}))
    _damage(checkpoint / "model" / "model.safetensors", "data")
    with pytest.raises(SystemExit) as exit_:
        main(TINY + [f"eval.checkpoint={checkpoint}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err == (f"rltrain: config error: eval.checkpoint: {checkpoint}: "
                                             "model/model.safetensors changed since the checkpoint was written (sha256 "
                                             "differs): the weights are damaged\n")
    assert not (checkpoint / "eval.json").exists()
