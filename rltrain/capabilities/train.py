"""``rltrain capabilities train`` (rltrain/commands/capabilities.py): one LoRA adapter per selected capability, GRPO
on its calibrated environment.

    rltrain capabilities train experiment=... adapter=lora capabilities.selected=ANALYSIS/capabilities.yaml \\
        capabilities.output=trace

For each capability (those ``selected`` in the analysis' capabilities.yaml, or ``capabilities.names``):

1. calibrate its environment's difficulty against the base model (rltrain/capabilities/environments.py), over
   ``capabilities.levels`` (default: the target's digit count for that kind and one either side);
2. train a LoRA adapter with the experiment's trainer settings on that environment (``trainer.max_rollouts`` each =
   ``capabilities.rollouts`` / number of capabilities when set, so that the whole set costs a fixed budget), every
   adapter on the same frozen base;
3. write OUTPUT/NAME (the run: final/ is a standard PEFT adapter directory, with a model card README.md) and
   OUTPUT/adapters.yaml (capability, definition, level, calibration, accuracy, run dir), rewritten after each
   adapter so that a later failure loses none that finished.

Checked before anything trains: every name has an environment, the budget gives each adapter at least one step, and
no OUTPUT/NAME exists already (its base_model/ would no longer match a new base).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

from rltrain.capabilities.environments import calibrate, candidate_levels, environment
from rltrain.config import Config, ModelSource


def selected_names(path: str) -> list[str]:
    entries = yaml.safe_load(Path(path).read_text())["capabilities"]
    return [e["name"] for e in entries if e.get("selected")]


class CalibrationError(ValueError):
    """No level of a capability's environment suits the base model (or the levels to try are unknown)."""


def train_adapters(config: Config, names: list[str], out: Path, definitions: dict[str, str]) -> list[dict]:
    """Steps 1-3 for each of ``names`` (checked: each has an environment, OUTPUT/NAME is free): calibrate, train,
    write the model card; OUTPUT/adapters.yaml rewritten after each adapter. Returns its records."""
    from rltrain.export import model_card
    from rltrain.rollout.base import SamplingParams
    from rltrain.rollout.hf import HFEngine
    from rltrain.start import starting_model
    from rltrain.train import RunContext, train

    if config.model.source == ModelSource.tiny and config.model.tiny.sft_task is None:
        # a tiny model's base is its warm start on the task it trains on: pin it to the target task, so that every
        # adapter sits on the base that was analysed (and none learns its environment by SFT)
        tiny = dataclasses.replace(config.model.tiny, sft_task=config.task)
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, tiny=tiny))
    # calibration samples the base (the starting model, no adapter) with the HF engine: nothing to close
    base = starting_model(config)
    tokenizer = base.tokenizer
    engine = HFEngine.for_tokenizer(base.model, tokenizer, config.rollout.batch_size)
    r, cap = config.rollout, config.capabilities
    sampling = SamplingParams(temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for name in names:
        try:
            levels = tuple(cap.levels) or candidate_levels(name, config.task)
            level, table = calibrate(name, config.task, engine, tokenizer, sampling=sampling,
                                     group=max(config.trainer.rollouts_per_prompt, 2), levels=levels)
        except ValueError as err:
            raise CalibrationError(str(err)) from None
        print(f"{name}: level {level} ({', '.join(f'{c.level}: {c.reward_mean:.2f}' for c in table)})")
        trainer = config.trainer
        if cap.rollouts:
            trainer = dataclasses.replace(trainer, max_rollouts=cap.rollouts // len(names), steps=10**6)
        run_config = dataclasses.replace(config, task=environment(name, config.task, level), trainer=trainer,
                                         experiment_name=f"{config.experiment_name}-{name}")
        summary = train(run_config, RunContext(run_dir=out / name))
        adapter_config = json.loads((out / name / "final" / "adapter_config.json").read_text())
        (out / name / "final" / "README.md").write_text(
            model_card(name, adapter_config, capability=name, definition=definitions.get(name, ""),
                       run_dir=out / name))
        records.append({"name": name, "definition": definitions.get(name, ""), "level": level,
                        "calibration": [dataclasses.asdict(c) for c in table],
                        "eval_accuracy_start": summary["eval_accuracy_start"],
                        "eval_accuracy_end": summary["eval_accuracy_end"], "rollouts": summary["rollouts"],
                        "adapter": str(out / name / "final")})
        listing = out / "adapters.yaml.tmp"
        listing.write_text(yaml.safe_dump({"adapters": records}, sort_keys=False))
        listing.replace(out / "adapters.yaml")
    return records
