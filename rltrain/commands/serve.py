"""``rltrain serve [overrides]``: vLLM behind rltrain's HTTP API, for ``rollout.vllm.mode=server``
(rltrain/rollout/server.py, docs/scale.md)."""

from __future__ import annotations

import json
from pathlib import Path

from rltrain.commands.setup import command_config, exit_config_error, exit_error

USAGE = ("usage: [RLTRAIN_SERVE_TOKEN=...] rltrain serve model.source=hf model.path=DIR [rollout.vllm.host=H "
         "rollout.vllm.port=P adapter=lora ...]\n"
         "vLLM on this machine's devices behind rltrain's HTTP API; train against it with\n"
         "RLTRAIN_SERVE_TOKEN=... rltrain train rollout=vllm rollout.vllm.mode=server rollout.vllm.url=http://H:P ...\n"
         "Without RLTRAIN_SERVE_TOKEN a server on 127.0.0.1 prints a token of its own; on any other host it is needed.")


def main(args: list[str]) -> None:
    config = command_config(args, USAGE)
    if config is None:
        return
    problem = context_problem(config.model)
    if problem:  # vLLM's own refusal comes after its start, as a many-line validation error
        exit_config_error(problem)
    from rltrain.rollout.server import ServerError, serve

    try:
        serve(config)
    except ServerError as err:
        exit_error(err)


def context_problem(model) -> str | None:
    """What is wrong with ``model.max_context`` for a model directory (``model.source=hf``): more tokens than the
    ``max_position_embeddings`` of its config.json, which vLLM refuses. None when it fits, or when that cannot be told
    without vLLM (a hub id, another source, RoPE scaling, which stretches the positions)."""
    from rltrain.config import ModelSource

    config_file = Path(model.path) / "config.json"
    if model.source != ModelSource.hf or not config_file.is_file():
        return None
    try:
        settings = json.loads(config_file.read_text())
    except ValueError as err:
        return f"model.path={model.path}: its config.json is not JSON ({err})"
    positions = settings.get("max_position_embeddings")
    if isinstance(positions, int) and not settings.get("rope_scaling") and model.max_context > positions:
        return (f"model.max_context={model.max_context} is more than the {positions} positions of model.path="
                f"{model.path} (max_position_embeddings in its config.json); set model.max_context<={positions}")
    return None
