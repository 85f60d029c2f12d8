"""The LLM-judge labeler (TRACE's labeler (b)): batched reply scoring equals an unbatched reference, each pass
samples from the softmax of the judge's scores with its own seed, and `rltrain capabilities analyze
capabilities.labeler=judge` runs N passes through contrast's K-of-N selection on a task with or without tags."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rltrain.capabilities.labelers import DEFINITIONS, JUDGE_REPLIES, JudgeLabeler, judge_text, mean_logprobs
from rltrain.config import ModelConfig, ModelSource
from rltrain.models import tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parent.parent
ROWS = [{"prompt": "max(12,47)"}, {"prompt": "count(a,abca)"}, {"prompt": "31-17"}]
COMPLETIONS = ["47", "3", "24"]
PASSED = [True, False, False]
NAMES = ["comparison", "counting", "subtraction"]


@pytest.fixture(scope="module")
def judge():
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    model = tiny_model(ModelConfig(source=ModelSource.tiny), tokenizer).eval()
    return model, tokenizer


@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])
def test_batched_reply_scores_equal_one_sequence_at_a_time(judge, kind):
    """Left-padded batches with explicit positions: GPT-2's learned absolute positions catch an offset that
    Qwen2's rotary ones would not."""
    model, tokenizer = judge
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(1)
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=4)
        model = GPT2LMHeadModel(config).eval()
    heads = [tokenizer(t)["input_ids"] for t in ("max(1,2)=", "a longer head of text here", "x")]
    tails = [tokenizer(t)["input_ids"] for t in ("NA", "PRESENT", "LACKING")]
    got = mean_logprobs(model, heads, tails, pad_token_id=tokenizer.pad_token_id, batch_size=2)
    for k, (h, t) in enumerate(zip(heads, tails)):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([h + t])).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        want = sum(logp[len(h) - 1 + j, tok] for j, tok in enumerate(t)) / len(t)
        assert got[k].item() == pytest.approx(want.item(), abs=1e-5)


def test_passes_sample_the_judges_softmax_with_their_own_seeds(judge):
    model, tokenizer = judge
    labeler = JudgeLabeler(model, tokenizer, NAMES, DEFINITIONS, temperature=1.0, seed=3)
    scores = labeler.scores(ROWS, COMPLETIONS, PASSED)
    assert scores.shape == (3, 3, 3) and torch.isfinite(scores).all()
    # the prompt carries the outcome and the definition: flipping them changes the scores
    assert not torch.equal(scores, JudgeLabeler(model, tokenizer, NAMES, DEFINITIONS).scores(ROWS, COMPLETIONS,
                                                                                            [not p for p in PASSED]))
    runs = [labeler.label(ROWS, COMPLETIONS, run=r, passed=PASSED) for r in range(400)]
    assert runs[5] == labeler.label(ROWS, COMPLETIONS, run=5, passed=PASSED)  # a pass is reproducible
    assert len({json.dumps(r) for r in runs}) > 1  # and passes differ
    probs = torch.softmax(scores, -1)
    for i in range(3):
        for c in range(3):
            for k, reply in enumerate(JUDGE_REPLIES):
                share = sum(r[i][c] == reply for r in runs) / len(runs)
                assert share == pytest.approx(probs[i, c, k].item(), abs=0.08)
    greedy = JudgeLabeler(model, tokenizer, NAMES, DEFINITIONS, temperature=0.0)
    want = [[JUDGE_REPLIES[k] for k in row] for row in scores.argmax(-1).tolist()]
    assert all(greedy.label(ROWS, COMPLETIONS, run=r, passed=PASSED) == want for r in range(3))


def test_judge_text_and_missing_definitions_are_named():
    text = judge_text("carry", DEFINITIONS["carry"], "47+38", " 85", True)
    assert "47+38" in text and "85" in text and "right" in text and DEFINITIONS["carry"] in text
    with pytest.raises(ValueError, match=r"no definition for capabilities \['tool_use'\]"):
        JudgeLabeler(None, None, ["tool_use"], DEFINITIONS)


@pytest.mark.slow
def test_analyze_with_the_judge_runs_n_passes_through_k_of_n(tmp_path):
    run = [sys.executable, "-m", "rltrain", "capabilities", "analyze", "experiment=tiny_trace", "trainer.num_threads=1",
           "capabilities.labeler=judge", "capabilities.runs=4", "capabilities.k=3", "capabilities.prompts=12",
           "capabilities.samples=2", "model.tiny.sft_steps=20"]
    out = tmp_path / "cap"
    done = subprocess.run(run + [f"capabilities.output={out}"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = yaml.safe_load((out / "capabilities.yaml").read_text())
    assert (result["labeler"], result["runs"], result["k"], result["trajectories"]) == ("judge", 4, 3, 24)
    for c in result["capabilities"]:
        assert 0 <= c["runs_passed"] <= 4 and c["selected"] == (c["runs_passed"] >= 3)
        assert c["definition"] == DEFINITIONS[c["name"]]
    labels = [json.loads(x)["labels"] for x in (out / "trajectories.jsonl").read_text().splitlines()]
    assert len(labels) == 24 and all(v in JUDGE_REPLIES for row in labels for v in row.values())
    # a capability of the user's own, defined on the command line; and one without a definition is refused
    own = subprocess.run(run + [f"capabilities.output={tmp_path / 'own'}", "capabilities.names=[tool_use]",
                                "+capabilities.definitions.tool_use=calls the right tool"], cwd=REPO,
                         capture_output=True, text=True)
    assert own.returncode == 0, own.stderr[-2000:]
    entry = yaml.safe_load((tmp_path / "own" / "capabilities.yaml").read_text())["capabilities"][0]
    assert entry["name"] == "tool_use" and entry["definition"] == "calls the right tool"
    bad = subprocess.run(run + [f"capabilities.output={tmp_path / 'bad'}", "capabilities.names=[tool_use]"],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "tool_use" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
