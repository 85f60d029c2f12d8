"""``rltrain train [overrides]`` (also ``python -m rltrain.train``, ``torchrun ... -m rltrain.train``): the overrides
of every job checked with one-line errors, then Hydra's entry point, which runs ``rltrain.train.train`` in the run
directory Hydra made (one process per rank under torchrun)."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

from rltrain.checkpoint import CheckpointError
from rltrain.commands.setup import check_overrides_or_exit, exit_error, quiet_transformers
from rltrain.config import DistributedKind
from rltrain.distributed import init_world
from rltrain.errors import ConfigError
from rltrain.memory import release_memory
from rltrain.rewards import RewardError
from rltrain.rollout.server import ServerError
from rltrain.rollout.sync import EngineOutOfSync
from rltrain.rundir import RunDirBusy
from rltrain.stopping import RunInterrupted
from rltrain.tasks.prompts import DatasetError
from rltrain.train import RunContext, TrainingDiverged, train


def _hydra_entry():
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    from rltrain.config import register
    from rltrain.config_checks import to_config
    from rltrain.paths import CONF_DIR

    register()

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
    def main(cfg: DictConfig) -> float:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        config = to_config(cfg)
        if size != 1 and config.distributed.kind == DistributedKind.none:
            raise SystemExit(f"rltrain: distributed=none runs one process, but WORLD_SIZE={size}: choose "
                             "distributed=zero2 or distributed=zero3")
        world = init_world(deepspeed=config.distributed.kind != DistributedKind.none)
        if not world.is_main:  # one voice: rank 0 reports (errors still come from every rank)
            logging.getLogger("rltrain").setLevel(logging.ERROR)
        # Each rank's Hydra names its own output dir (a timestamp may differ by a second): rank 0's is the run's.
        run_dir = Path(world.broadcast(HydraConfig.get().runtime.output_dir))
        ctx = RunContext(run_dir=run_dir, world=world)
        # Processes started from here on (vLLM's engine, reward workers) inherit an ignored SIGUSR1, so that SLURM's
        # warning signal, sent to every process of the job step, reaches only the trainer's handler (rltrain.stopping)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        try:
            return train(config, ctx)["eval_accuracy_end"]
        except (TrainingDiverged, CheckpointError, DatasetError, RewardError, EngineOutOfSync, ServerError,
                RunDirBusy, ConfigError) as err:
            exit_error(err, 1)
        except RunInterrupted as err:  # preempted after a checkpoint: the shell's code for the signal
            exit_error(err, err.exit_code)
        except KeyboardInterrupt:  # a second Ctrl-C while the step finished
            exit_error("interrupted: the step in progress is lost; resume=auto continues from the last checkpoint",
                       130)
        finally:  # the next job of a multirun runs in this process: it starts on the memory this one held
            release_memory()

    return main


def main(argv: list[str] | None = None) -> None:
    """Validate the overrides (every job of a sweep) with one-line errors, then hand over to Hydra."""
    argv = sys.argv[1:] if argv is None else argv
    check_overrides_or_exit(argv)
    quiet_transformers()
    sys.argv = [sys.argv[0]] + argv
    _hydra_entry()()


if __name__ == "__main__":
    main()
