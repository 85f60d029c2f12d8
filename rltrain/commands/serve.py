"""``rltrain serve [overrides]``: vLLM behind rltrain's HTTP API, for ``rollout.vllm.mode=server``
(rltrain/rollout/server.py, docs/scale.md)."""

from __future__ import annotations

from rltrain.commands.setup import command_config, exit_error

USAGE = ("usage: [RLTRAIN_SERVE_TOKEN=...] rltrain serve model.source=hf model.path=DIR [rollout.vllm.host=H "
         "rollout.vllm.port=P adapter=lora ...]\n"
         "vLLM on this machine's devices behind rltrain's HTTP API; train against it with\n"
         "RLTRAIN_SERVE_TOKEN=... rltrain train rollout=vllm rollout.vllm.mode=server rollout.vllm.url=http://H:P ...\n"
         "Without RLTRAIN_SERVE_TOKEN a server on 127.0.0.1 prints a token of its own; on any other host it is needed.")


def main(args: list[str]) -> None:
    config = command_config(args, USAGE)
    if config is None:
        return
    from rltrain.rollout.server import ServerError, serve

    try:
        serve(config)
    except ServerError as err:
        exit_error(err)
