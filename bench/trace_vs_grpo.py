"""TRACE (capability adapters + router) against one LoRA trained with GRPO on the whole target mix, at the same total
rollout budget: held-out accuracy overall and per capability, per seed (markdown table).

Per seed: the base (``trainer.steps=0``), ``rltrain capabilities analyze`` on it, ``rltrain capabilities train`` on
the selected capabilities with ``capabilities.rollouts=BUDGET``, routed evaluation (``eval.router`` for each
``--routers``), and a single LoRA trained on the target mix with ``trainer.max_rollouts=BUDGET`` evaluated with
``rltrain eval``. Finished steps are reused.

    python bench/trace_vs_grpo.py --out docs/trace_vs_grpo.md --work /tmp/trace --seeds 0 1 2 --budget 30720 \\
        --common experiment=tiny_trace_mix adapter=lora trainer.lr=2e-3
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path


def run(args: list[str], done: Path) -> None:
    if done.exists():
        return
    cmd = [sys.executable, "-m", "rltrain", *args]
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget", type=int, required=True, help="total rollouts for each arm")
    parser.add_argument("--routers", nargs="+", default=["v0", "zero_shot"])
    parser.add_argument("--common", nargs="*", default=[])
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    quiet = ["logger.progress=false", "logger.report=false", "trainer.num_threads=1"]
    rows, caps = [], set()
    for seed in args.seeds:
        w = args.work / f"seed{seed}"
        common = [*args.common, f"trainer.seed={seed}", "trainer.num_threads=1"]
        base_common = [o for o in common if not o.startswith("adapter")]
        run(["train", *base_common, "trainer.steps=0", f"hydra.run.dir={w / 'base'}", *quiet],
            w / "base" / "summary.json")
        run(["capabilities", "analyze", *base_common, f"capabilities.checkpoint={w / 'base'}",
             f"capabilities.output={w / 'cap'}"], w / "cap" / "capabilities.yaml")
        run(["capabilities", "train", *common, f"capabilities.selected={w / 'cap' / 'capabilities.yaml'}",
             f"capabilities.output={w / 'trace'}", f"capabilities.rollouts={args.budget}", "trainer.eval_every=0",
             *quiet[:2]], w / "trace" / "adapters.yaml")
        for router in args.routers:
            run(["eval", *common, f"eval.router={router}", f"eval.adapters={w / 'trace' / 'adapters.yaml'}"],
                w / "trace" / f"eval_router_{router}.json")
        run(["train", *common, f"trainer.max_rollouts={args.budget}", "trainer.steps=1000000",
             "trainer.eval_every=0", f"hydra.run.dir={w / 'grpo'}", *quiet], w / "grpo" / "summary.json")
        run(["eval", *common, f"eval.checkpoint={w / 'grpo'}", f"eval.output={w / 'grpo' / 'eval.json'}"],
            w / "grpo" / "eval.json")
        grpo = json.loads((w / "grpo" / "eval.json").read_text())
        grpo_caps = {k: v["accuracy"] for k, v in grpo["breakdown"].get("capabilities", {}).items()}
        result = {"seed": seed, "GRPO LoRA (whole mix)": (grpo["accuracy"], grpo_caps)}
        for router in args.routers:
            r = json.loads((w / "trace" / f"eval_router_{router}.json").read_text())
            result[f"TRACE adapters, {router} router"] = (r["accuracy"], r["by_capability"])
            result.setdefault("base", (r["single"]["none"]["accuracy"], r["single"]["none"]["by_capability"]))
        caps |= set(grpo_caps)
        rows.append(result)
    caps = sorted(caps)
    lines = ["| seed | arm | overall | " + " | ".join(caps) + " |", "|---|---|---|" + "---|" * len(caps)]
    for result in rows:
        for arm, value in result.items():
            if arm == "seed":
                continue
            overall, by_cap = value
            lines.append(f"| {result['seed']} | {arm} | {overall:.3f} | "
                         + " | ".join(f"{by_cap.get(c, float('nan')):.3f}" for c in caps) + " |")
    arms = [arm for arm in rows[0] if arm != "seed"] if rows else []
    lines += ["", f"Mean over seeds {args.seeds}:", "", "| arm | overall | " + " | ".join(caps) + " |",
              "|---|---|" + "---|" * len(caps)]
    for arm in arms:
        values = [result[arm] for result in rows]
        overall = sum(v[0] for v in values) / len(values)
        per_cap = [sum(v[1].get(c, float("nan")) for v in values) / len(values) for c in caps]
        lines.append(f"| {arm} | {overall:.3f} | " + " | ".join(f"{x:.3f}" for x in per_cap) + " |")
    command = "python bench/trace_vs_grpo.py " + shlex.join(
        ["--out", str(args.out), "--work", str(args.work), "--seeds", *map(str, args.seeds), "--budget",
         str(args.budget), "--routers", *args.routers, "--common", *args.common])
    args.out.write_text("\n".join(lines + ["", f"Same total rollouts per arm: {args.budget:,}.", "",
                                           "    " + command, ""]))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
