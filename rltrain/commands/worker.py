"""``rltrain worker --connect HOST:PORT``: a rollout worker for a trainer on another machine (``trainer.max_staleness
> 0`` with ``rollout.worker_address=HOST:PORT``; rltrain/rollout/remote.py, docs/async.md)."""

from __future__ import annotations

import argparse

from rltrain.commands.setup import exit_error

USAGE = ("RLTRAIN_WORKER_TOKEN=... rltrain worker --connect HOST:PORT [--threads N] [--device cpu|cuda]\n"
         "Generates for the trainer started with RLTRAIN_WORKER_TOKEN=... rltrain train trainer.max_staleness=1 "
         "rollout.worker_address=HOST:PORT ...")


def main(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="rltrain worker", usage=USAGE)
    parser.add_argument("--connect", required=True, help="the trainer's rollout.worker_address")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="", help="where to generate (default: cuda if there is one, else cpu)")
    parser.add_argument("--wait", type=float, default=600.0, help="seconds to wait for the trainer to listen")
    options = parser.parse_args(args)
    from rltrain.rollout.remote import WorkerError, connect_and_serve

    try:
        connect_and_serve(options.connect, threads=options.threads, device=options.device, wait_s=options.wait)
    except (WorkerError, ValueError, ConnectionError) as err:
        exit_error(err)
