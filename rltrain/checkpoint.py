"""Checkpoints: everything a run needs to go on exactly as if it had never stopped.

Layout of ``RUN/checkpoints/step_000120/``:

    model/      the policy's weights as safetensors (a full model, or a PEFT adapter directory) and the tokenizer;
                loads with ``from_pretrained`` / ``PeftModel.from_pretrained`` like any saved model
    state.pt    step, RNG states (python, numpy, torch) and the state of every registered component (optimizer and
                schedule, prompt sampler, and whatever later algorithms register: hint statistics, value-predictor
                history, ...). Plain tensors and containers only: loaded with ``torch.load(weights_only=True)``.
    meta.json   step, time, the run config and the size of every file above; written last

A checkpoint is built in a hidden temporary directory next to the others and renamed into place, so a directory named
``step_*`` is complete unless the disk lied; ``meta.json``'s file sizes catch that, and ``latest`` skips such a
directory with a warning. One registration point (``Checkpointer.register``) carries any object with
``state_dict()`` / ``load_state_dict()``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from rltrain.distributed import World

log = logging.getLogger("rltrain.checkpoint")

PREFIX = "step_"
TMP_PREFIX = ".tmp-"


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class CheckpointError(RuntimeError):
    pass


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"{PREFIX}{step:06d}"


def incomplete(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint (no meta.json, which is written last; a listed file missing or of
    another size than written), or None."""
    try:
        files = json.loads((path / "meta.json").read_text())["files"]
        sizes = {name: (path / name).stat().st_size if (path / name).is_file() else None for name in files}
    except FileNotFoundError:
        return "no meta.json (it is written last)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"meta.json cannot be read ({type(err).__name__}: {err})"
    for name, size in sizes.items():
        if size != files[name]:
            return f"{name} is missing" if size is None else f"{name} is {size} bytes, {files[name]} when written"
    return None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def changed_files(path: Path, under: str = "") -> list[str]:
    """The files of checkpoint ``path`` (only those in its folder ``under``, if given) whose content no longer has
    the sha256 recorded when it was written (a same-size corruption, which sizes cannot see). Checked on restore
    only: reading every file costs about a second per GB, too much for the listing that runs after every save."""
    recorded = json.loads((path / "meta.json").read_text()).get("sha256", {})  # none in checkpoints before digests
    names = [name for name in recorded if not under or Path(name).parts[0] == under]
    return [name for name in names if sha256(path / name) != recorded[name]]


def complete_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints under ``directory/checkpoints`` (or ``directory`` itself), oldest first.
    Incomplete ones are skipped with a warning."""
    found = []
    for path in _step_dirs(directory):
        reason = incomplete(path)
        if reason is None:
            found.append(path)
        else:
            log.warning("skipping checkpoint %s: incomplete or corrupt: %s", path, reason)
    return found


def _step_dirs(directory: str | Path) -> list[Path]:
    """The ``step_*`` directories under ``directory/checkpoints`` (or ``directory`` itself), oldest first."""
    directory = Path(directory)
    root = directory / "checkpoints" if (directory / "checkpoints").is_dir() else directory
    if not root.is_dir():
        return []
    return [path for path in sorted(root.glob(f"{PREFIX}*")) if path.name[len(PREFIX):].isdigit()]


def _size(checkpoint: Path) -> int:
    return sum(json.loads((checkpoint / "meta.json").read_text())["files"].values())


def latest(directory: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory (or of its ``checkpoints/`` folder), if any."""
    found = complete_checkpoints(directory)
    return found[-1] if found else None


def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Writes and restores checkpoints of one run; components register once, before the loop."""

    def __init__(self, root: str | Path, *, keep: int, world: World = World()) -> None:
        self.root = Path(root)
        self.keep = keep
        self.world = world  # rank 0 writes the shared files; every rank joins the collective saves
        self._components: dict[str, Stateful] = {}

    def register(self, name: str, component: Stateful) -> None:
        if name in self._components:
            raise ValueError(f"checkpoint component {name!r} registered twice")
        self._components[name] = component

    def save(self, step: int, *, policy, tokenizer, meta: dict) -> Path:
        """Write the checkpoint of ``step`` atomically and drop all but the newest ``keep``. Under several ranks
        every rank calls this: the weights (gathered under ZeRO-3) and DeepSpeed's sharded optimizer state
        (``deepspeed/``, one file per rank) are written together, the rest by rank 0, which renames last."""
        world = self.world
        tmp = self.root / f"{TMP_PREFIX}{PREFIX}{step:06d}-{world.broadcast(os.getpid())}"
        short = None
        if world.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            short = self._space_shortage()
            if short is None:
                tmp.mkdir()
        short = world.broadcast(short)  # every rank stops before writing anything
        if short is not None:
            raise CheckpointError(self._cannot_write(step, "too little free space", needed=short[0]))
        failure = None
        try:
            policy.save(tmp / "model")
            if getattr(policy, "engine", None) is not None:
                policy.save_sharded(tmp / "deepspeed")
            world.barrier()
            if world.is_main:
                self._finish(tmp, step, tokenizer, meta)
        except (OSError, RuntimeError) as err:  # a full disk: torch.save says so with a RuntimeError
            failure = f"{type(err).__name__}: {err}"
        failures = [f for f in world.gather(failure) if f is not None]  # every rank learns of any rank's failure
        if failures:
            written = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) if world.is_main else 0
            if world.is_main:
                shutil.rmtree(tmp, ignore_errors=True)  # the earlier checkpoints stay
            raise CheckpointError(self._cannot_write(step, failures[0], written=written))
        return step_dir(self.root, step)

    def _space_shortage(self) -> tuple[int, int] | None:
        """(bytes needed, bytes free) when the disk cannot hold another checkpoint the size of the newest, else None.
        The newest one stays until the new one is complete, so the new one needs room of its own."""
        found = complete_checkpoints(self.root)
        if not found:
            return None
        free = shutil.disk_usage(self.root).free
        needed = _size(found[-1])
        return (needed, free) if free < needed else None

    def _cannot_write(self, step: int, reason: str, *, needed: int = 0, written: int = 0) -> str:
        """One line: which checkpoint, why, the space it needs and has, what is kept, what to do."""
        kept = complete_checkpoints(self.root)
        needed = needed or (_size(kept[-1]) if kept else 0)
        need = (f"about {needed / 1e6:.1f} MB (the last checkpoint's size)" if needed else
                f"more than the {written / 1e6:.1f} MB written when it failed")
        return (f"cannot write the checkpoint of step {step} in {self.root} ({reason}): it needs {need}, "
                f"{shutil.disk_usage(self.root).free / 1e6:.1f} MB are free. Kept: "
                f"{', '.join(p.name for p in kept) or 'no earlier checkpoint'}. Free space (or lower "
                "trainer.keep_checkpoints), then resume=auto continues from the newest one kept")

    def _finish(self, tmp: Path, step: int, tokenizer, meta: dict) -> Path:
        """Rank 0: the tokenizer, the components' state and meta.json beside the weights, the rename, the pruning."""
        final = step_dir(self.root, step)
        tokenizer.save_pretrained(str(tmp / "model"))
        state = {"step": step, "rng": rng_state(),
                 "components": {name: c.state_dict() for name, c in self._components.items()}}
        torch.save(state, tmp / "state.pt")
        written = [p for p in sorted(tmp.rglob("*")) if p.is_file()]
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in written}
        digests = {str(p.relative_to(tmp)): sha256(p) for p in written}
        (tmp / "meta.json").write_text(json.dumps({"step": step, "time": time.time(), "files": files,
                                                   "sha256": digests, **meta}, indent=1, default=str))
        _fsync_tree(tmp)
        if final.exists():  # an older, abandoned timeline's checkpoint of the same step (a resume from before it)
            stale = self.root / f"{TMP_PREFIX}stale-{final.name}-{os.getpid()}"
            os.replace(final, stale)
            shutil.rmtree(stale)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        self._prune()
        return final

    def _prune(self) -> None:
        complete = complete_checkpoints(self.root)
        for old in complete[: max(len(complete) - self.keep, 0)]:
            shutil.rmtree(old)
        for leftover in self.root.glob(f"{TMP_PREFIX}*"):  # from a process killed while writing; none is in flight
            shutil.rmtree(leftover, ignore_errors=True)

    def drop_after(self, step: int) -> None:
        """Delete this run's checkpoints past ``step``: the future of a timeline the run has just left (it resumed
        from an earlier point), which ``resume=auto`` would otherwise prefer to the checkpoints the run writes now."""
        if not self.world.is_main:
            return
        for path in sorted(self.root.glob(f"{PREFIX}*")):
            if path.name[len(PREFIX):].isdigit() and int(path.name[len(PREFIX):]) > step:
                log.warning("deleting checkpoint %s: it comes after step %d, the point this run continues from",
                            path, step)
                shutil.rmtree(path)

    def restore(self, path: Path, *, policy) -> int:
        """Load the checkpoint at ``path`` into the policy and every registered component; returns its step."""
        reason = incomplete(path)
        if reason is not None:
            raise CheckpointError(f"{path}: not a complete checkpoint: {reason}")
        damaged = changed_files(path)
        if damaged:
            raise CheckpointError(f"{path}: {', '.join(damaged)} changed since it was written (sha256 differs): "
                                  "the file is damaged")
        try:
            state = torch.load(path / "state.pt", weights_only=True)
        except Exception as err:  # noqa: BLE001 - a damaged file, whatever the unpickler says about it
            raise CheckpointError(f"{path}: state.pt cannot be read ({type(err).__name__}: {err})") from err
        # A component with no state (e.g. GRPO as an algorithm) may be absent from a checkpoint written before it
        # was registered; one with state may not.
        absent = {name for name in self._components if name not in state["components"]}
        missing = {name for name in absent if self._components[name].state_dict()}
        if missing:
            raise CheckpointError(f"{path}: no state for {sorted(missing)} (was it written by a different algorithm?)")
        try:
            if getattr(policy, "engine", None) is not None:
                if not (path / "deepspeed").is_dir():
                    raise ValueError("written without DeepSpeed: resume it with distributed=none")
                policy.load_sharded(path / "deepspeed")
            else:
                policy.load(path / "model")
        except Exception as err:  # noqa: BLE001 - damaged weights, or weights of another model
            raise CheckpointError(f"{path}: weights cannot be loaded into this model ({type(err).__name__}: "
                                  f"{err})") from err
        for name, component in self._components.items():
            if name in absent:
                continue
            try:
                component.load_state_dict(state["components"][name])
            except (KeyError, ValueError) as err:
                raise CheckpointError(f"{path}: the {name} state does not fit this run ({err})") from err
        set_rng_state(state["rng"])
        return int(state["step"])

    def restore_latest(self, directory: Path, *, policy) -> tuple[int, Path] | None:
        """Restore the newest checkpoint of ``directory`` that loads, skipping incomplete and damaged ones with a
        warning. None when there is no checkpoint at all; when there are some but none loads, an error naming each
        and why (rather than a silent fresh start)."""
        invalid = []
        for path in reversed(_step_dirs(directory)):
            try:
                return self.restore(path, policy=policy), path
            except CheckpointError as err:
                log.warning("skipping checkpoint %s: cannot be loaded (%s)", path, err)
                invalid.append(f"{path.name}: {str(err).removeprefix(f'{path}: ')}")
        if invalid:
            raise CheckpointError(f"{directory}: every checkpoint is invalid, so there is none to resume from "
                                  f"({'; '.join(invalid)}); remove them to start over, or choose another "
                                  "hydra.run.dir")
        return None


def truncate_jsonl(path: Path, step: int) -> None:
    """Drop records logged after ``step`` (by a run that went on past its last checkpoint), atomically."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by the kill
            continue
        if record.get("step", record.get("eval_step", 0)) <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def resume_source(resume: str, run_dir: Path) -> Path | None:
    """``resume`` config value -> the directory to resume from: none, auto (this run dir), a checkpoint or run dir."""
    if resume == "none":
        return None
    if resume == "auto":
        return run_dir
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"resume={resume}: no such directory (give a checkpoint or run directory, or auto)")
    return path


def config_changes(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ between a checkpoint's config and the resuming run's (``resume`` itself aside)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        full = f"{prefix}{key}"
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{full}.")
        elif a != b and full != "resume":
            out.append(f"{full}: {a!r} -> {b!r}")
    return out
