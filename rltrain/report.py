"""``rltrain report DIR``: what a run or a sweep did, from the files it wrote.

A run dir (``metrics.jsonl``) gets ``report.png`` (a grid of small plots) and ``report.html`` (self-contained: the
plots embedded, first/final metrics, the run config, sample completions). A Hydra multirun dir (``multirun.yaml``
and job dirs ``0/``, ``1/``, ...) gets a table of its jobs on the console, ``summary.md``, ``summary.csv`` and
``sweep.png`` (every job's reward and eval-accuracy curves). Only files are read: a report can be made while a run
is going, after it crashed, or on another machine.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from rich.console import Console
from rich.table import Table

PHASES = ("time_generate_s", "time_reward_s", "time_wait_s", "time_update_s", "time_sync_s", "time_eval_s")
LAST_STEPS = 5  # a sweep job's final reward is the mean reward_mean of its last 5 steps
PANEL_W, PANEL_H = 4.2, 3.0  # inches per small plot


# ---------------------------------------------------------------------------------------------------- reading files

def read_jsonl(path: Path) -> list[dict]:
    """One dict per line; a run killed mid-write leaves a partial last line, which is left out."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise
    return records


def split_records(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(step records, eval records) of a metrics.jsonl."""
    return [r for r in records if "step" in r], [r for r in records if "eval_step" in r]


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def nan_mean(values) -> float:
    values = [v for v in values if finite(v)]
    return sum(values) / len(values) if values else math.nan


def series(records: list[dict], key: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
    """x and y of the records holding ``key``; a non-number (a skipped step's NaN, a null) becomes NaN."""
    rows = [r for r in records if key in r]
    ys = [r[key] if finite(r[key]) else math.nan for r in rows]
    return np.array([r[x] for r in rows], dtype=float), np.array(ys, dtype=float)


def rolling_mean(y: np.ndarray, window: int) -> np.ndarray:
    """Mean of the finite values among the last ``window`` points (NaN where there are none)."""
    ok = np.isfinite(y)
    sums = np.concatenate([[0.0], np.cumsum(np.where(ok, y, 0.0))])
    counts = np.concatenate([[0], np.cumsum(ok)])
    hi = np.arange(1, len(y) + 1)
    lo = np.maximum(hi - window, 0)
    n = counts[hi] - counts[lo]
    return np.where(n > 0, (sums[hi] - sums[lo]) / np.maximum(n, 1), np.nan)


def smoothing_window(n: int) -> int:
    return max(1, min(25, round(n / 10)))


def pass_at_k(record: dict) -> list[tuple[int, float]]:
    return sorted((int(k), v) for k, v in record.get("eval_pass_at_k", {}).items())


def last_eval_with(evals: list[dict], key: str) -> dict | None:
    found = [r for r in evals if key in r]
    return found[-1] if found else None


def wall_time_s(records: list[dict]) -> float:
    times = [r["time"] for r in records if finite(r.get("time"))]
    return max(times) - min(times) if len(times) > 1 else math.nan


def read_yaml(path: Path):
    return yaml.safe_load(path.read_text()) if path.exists() else None


# ---------------------------------------------------------------------------------------------------- run report

def _figure(n_panels: int, ncols: int = 3) -> tuple[Figure, list]:
    ncols = min(ncols, n_panels)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(PANEL_W * ncols, PANEL_H * nrows + 0.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _style(ax, title: str, xlabel: str = "step") -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if xlabel == "step":
        lo, hi = ax.get_xlim()
        if hi - lo < 2:  # one or two points: whole steps on either side rather than fractional ticks
            ax.set_xlim((lo + hi) / 2 - 1.5, (lo + hi) / 2 + 1.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _raw_and_smooth(ax, x, y, window: int, color: str, label: str | None = None) -> None:
    ax.plot(x, y, ".", color=color, alpha=0.35, markersize=4)
    ax.plot(x, rolling_mean(y, window), "-", color=color, linewidth=1.8, label=label)


def _run_panels(steps: list[dict], evals: list[dict]) -> list:
    """(title, draw function) for each plot the data supports."""
    window = smoothing_window(len(steps))
    smooth = f"dots: per step; line: rolling mean of {window}"
    panels = []

    def curve(key: str, title: str, color: str, ylim=None):
        def draw(ax):
            _raw_and_smooth(ax, *series(steps, key), window, color)
            if ylim:
                ax.set_ylim(*ylim)
            ax.text(0.02, 0.97, smooth, transform=ax.transAxes, fontsize=7, va="top", color="0.35")
        return title, draw

    if any(finite(r.get("reward_mean")) for r in steps):
        panels.append(curve("reward_mean", "reward_mean (rollouts)", "tab:blue"))
    if any(finite(r.get("accuracy")) for r in steps):
        panels.append(curve("accuracy", "accuracy (rollouts with full reward)", "tab:green", (-0.03, 1.03)))
    if any(finite(r.get("eval_accuracy")) for r in evals):
        def draw_eval(ax):
            x, y = series(evals, "eval_accuracy", x="eval_step")
            ax.plot(x, y, "o-", color="tab:purple")
            ends = [(x[0], y[0], "left"), (x[-1], y[-1], "right")] if len(x) > 1 else [(x[0], y[0], "center")]
            for xi, yi, ha in ends:
                ax.annotate(f"{yi:.3f}", (xi, yi), textcoords="offset points", xytext=(0, 7), ha=ha, fontsize=8)
            ax.set_ylim(-0.03, 1.08)
        panels.append(("eval accuracy (greedy)", draw_eval))
    if any(finite(r.get("frac_zero_std_groups")) for r in steps):
        panels.append(curve("frac_zero_std_groups", "groups with zero reward std (no signal)", "tab:red",
                            (-0.03, 1.03)))
    if any(finite(r.get("completion_len_mean")) for r in steps):
        def draw_length(ax):
            _raw_and_smooth(ax, *series(steps, "completion_len_mean"), window, "tab:brown", "completion_len_mean")
            ax.set_ylabel("tokens", fontsize=8)
            handles = ax.get_legend_handles_labels()[0]
            if any("truncated_frac" in r for r in steps):
                twin = ax.twinx()
                handles += twin.plot(*series(steps, "truncated_frac"), "-", color="tab:gray", linewidth=1,
                                     label="truncated_frac (right axis)")
                twin.set_ylim(-0.03, 1.03)
                twin.tick_params(labelsize=8)
            ax.legend(handles=handles, fontsize=7, loc="best")
        panels.append(("completion length", draw_length))
    phases = [k for k in PHASES if any(finite(r.get(k)) for r in steps)]
    ahead = [k for k in ("time_generate_s", "time_reward_s") if any("time_wait_s" in r for r in steps) and k in phases]
    phases = [k for k in phases if k not in ahead]  # rollouts ahead: production runs beside the update, not in line
    if phases or any(finite(r.get("time_step_s")) for r in steps):
        def draw_time(ax):
            x = np.array([r["step"] for r in steps], dtype=float)
            stacks = [np.array([r[k] if finite(r.get(k)) else 0.0 for r in steps]) for k in phases]
            if stacks:
                ax.stackplot(x, *stacks, labels=[k.removeprefix("time_").removesuffix("_s") for k in phases],
                             alpha=0.8)
            if any(finite(r.get("time_step_s")) for r in steps):
                ax.plot(*series(steps, "time_step_s"), "-", color="black", linewidth=1, label="whole step")
            for key in ahead:
                ax.plot(*series(steps, key), ":", linewidth=1, label=f"{key[5:-2]} (ahead)")
            eval_x, eval_y = series(evals, "time_eval_s", x="eval_step")
            if len(eval_x):
                ax.plot(eval_x, eval_y, "v", color="tab:purple", label="eval")
            ax.set_ylabel("seconds", fontsize=8)
            ax.set_ylim(0, ax.get_ylim()[1] * 1.35)  # room for the legend above the curves
            ax.legend(fontsize=7, loc="upper center", ncol=3)
        panels.append(("time per step by phase", draw_time))
    if any(finite(r.get("peak_memory_gb")) for r in steps):
        def draw_memory(ax):
            ax.plot(*series(steps, "peak_memory_gb"), "-", color="tab:blue", linewidth=1, label="peak")
            ax.plot(*series(steps, "peak_memory_growth_gb"), ":", color="tab:blue", linewidth=1,
                    label="growth in the step")
            ax.set_ylabel("GiB", fontsize=8)
            ax.legend(fontsize=7, loc="best")
        panels.append(("memory per step (CUDA allocated on a GPU, resident set on CPU)", draw_memory))
    failures = [k for k in ("reward_errors", "reward_timeouts") if any(finite(r.get(k)) and r[k] for r in steps)]
    if failures:
        def draw_failures(ax):
            for key, color in zip(failures, ("tab:red", "tab:orange")):
                ax.plot(*series(steps, key), "o-", color=color, markersize=2, linewidth=1, label=key)
            ax.legend(fontsize=7)
        panels.append(("reward function failures", draw_failures))
    if any(finite(r.get("loss")) for r in steps):
        panels.append(curve("loss", "loss", "tab:olive"))
    if any(r.get("staleness") for r in steps):  # rollouts ahead: how old each step's samples were, how far they drifted
        def draw_staleness(ax):
            _raw_and_smooth(ax, *series(steps, "mismatch_kl"), window, "tab:red", "mismatch_kl")
            twin = ax.twinx()
            handles = ax.get_legend_handles_labels()[0] + twin.step(
                *series(steps, "staleness"), where="post", color="tab:gray", linewidth=1,
                label="staleness, versions (right axis)")
            twin.set_ylim(-0.1, max(r.get("staleness", 0) for r in steps) + 0.5)
            twin.tick_params(labelsize=8)
            ax.legend(handles=handles, fontsize=7, loc="best")
        panels.append(("off-policy: staleness and mismatch KL", draw_staleness))
    if any(finite(r.get("value_auc")) for r in steps):
        def draw_value(ax):
            for key, color in (("value_auc", "tab:blue"), ("value_auc_unseen", "tab:cyan")):
                ax.plot(*series(steps, key), "-", color=color, linewidth=1, label=f"{key} (running)")
            x, y = series(evals, "eval_value_auc", x="eval_step")
            if len(x):
                ax.plot(x, y, "o", color="tab:purple", markersize=4, label="eval_value_auc (held-out prompts)")
            ax.axhline(0.5, color="0.6", linewidth=0.8, linestyle=":")
            ax.set_ylim(0.3, 1.02)
            ax.legend(fontsize=7, loc="lower right")
        panels.append(("value predictor AUC", draw_value))
    counts = [c for r in steps for c in r.get("budget_counts") or []]
    if counts:
        def draw_budget(ax):
            ax.hist(counts, bins=range(min(counts), max(counts) + 2), color="tab:gray", align="left")
            ax.set_ylabel("groups", fontsize=8)
        panels.append(("rollouts per prompt (all steps)", draw_budget, "rollouts in the group"))
    last_pass = last_eval_with(evals, "eval_pass_at_k")
    if last_pass is not None:
        def draw_pass(ax):
            ks, values = zip(*pass_at_k(last_pass))
            ax.plot(ks, values, "o-", color="tab:purple")
            ax.set_xscale("log", base=2)
            ax.set_xticks(ks, [str(k) for k in ks])
            ax.set_ylim(-0.03, 1.03)
        panels.append((f"pass@k at step {last_pass['eval_step']}", draw_pass, "k"))
    return panels


def plot_run(steps: list[dict], evals: list[dict], path: Path, title: str) -> None:
    panels = _run_panels(steps, evals)
    if not panels:
        panels = [("no metrics yet", lambda ax: ax.text(0.5, 0.5, "no step or eval records", ha="center"))]
    fig, axes = _figure(len(panels))
    for ax, (name, draw, *xlabel) in zip(axes, panels):
        draw(ax)
        _style(ax, name, *xlabel)
    fig.suptitle(title, fontsize=11)
    fig.savefig(path)


def metric_rows(steps: list[dict], evals: list[dict]) -> list[tuple[str, float, float]]:
    """(metric, first finite value, last finite value) for every number in the step records, then the eval ones."""
    rows = []
    for records, skip in ((steps, {"step", "time"}), (evals, {"eval_step", "time"})):
        keys = list(dict.fromkeys(k for r in records for k, v in r.items() if k not in skip and finite(v)))
        for key in keys:
            values = [r[key] for r in records if finite(r.get(key))]
            rows.append((key, values[0], values[-1]))
    with_pass = [r for r in evals if "eval_pass_at_k" in r]
    if with_pass:
        first, last = dict(pass_at_k(with_pass[0])), dict(pass_at_k(with_pass[-1]))
        rows += [(f"eval pass@{k}", first.get(k, math.nan), v) for k, v in last.items()]
    return rows


def fmt(value, digits: int = 4) -> str:
    if not finite(value):
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def fixed(value) -> str:
    return f"{value:.3f}" if finite(value) else "-"


def duration(seconds: float) -> str:
    if not finite(seconds):
        return "-"
    minutes, s = divmod(round(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m" if hours else f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


def _html_table(header: list[str] | None, rows: list[list[str]], classes: str = "") -> str:
    head = "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr></thead>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{classes}">{head}<tbody>{body}</tbody></table>'


def _samples_table(samples: list[dict]) -> str:
    if any("messages" in s for s in samples):
        return _episodes_table(samples)
    rows = [[str(s.get("step", "")), str(s["prompt"]), str(s["completion"]), fmt(s["reward"])] for s in samples]
    return _html_table(["step", "prompt", "completion", "reward"], rows, "samples")


def _episodes_table(samples: list[dict]) -> str:
    """Episodes turn by turn: each assistant turn (its tool calls marked), each tool result (errors marked)."""
    e = html.escape
    rows = []
    for s in samples:
        turns = "".join(_turn_html(m) for m in s.get("messages", []))
        calls = sum(m.get("role") == "assistant" and "<tool_call>" in (m.get("content") or "")
                    for m in s.get("messages", []))
        rows.append(f"<tr><td>{e(str(s.get('step', '')))}</td><td>{e(str(s['prompt']))}</td><td>{turns}</td>"
                    f"<td>{e(fmt(s['reward']))}<br>{calls} tool calls</td></tr>")
    head = "".join(f"<th>{h}</th>" for h in ("step", "prompt", "episode", "reward"))
    return f'<table class="episodes"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _turn_html(message: dict) -> str:
    role, content = str(message.get("role")), str(message.get("content") or "")
    kind = "tool error" if role == "tool" and content.startswith("error:") else role
    kind += " call" if role == "assistant" and "<tool_call>" in content else ""
    label = role + (f" {message['name']}" if message.get("name") else "")
    return (f'<div class="turn {html.escape(kind)}"><span class="role">{html.escape(label)}</span>'
            f"<pre>{html.escape(content)}</pre></div>")


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;
vertical-align:top;font-size:0.9em}th{background:#f3f3f3}table.samples td{white-space:pre-wrap;font-family:monospace}
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:0.85em}img{max-width:100%}
.turn{margin:2px 0;padding:2px 6px;border-left:4px solid #bbb}.turn pre{margin:0;padding:2px;white-space:pre-wrap}
.turn .role{font-size:0.8em;color:#555}.turn.assistant{border-color:#36c}.turn.call{background:#eef3ff}
.turn.tool{border-color:#2a2}.turn.error{border-color:#c33;background:#fff0f0}"""


def write_run_report(run_dir: Path) -> tuple[Path, Path]:
    """report.png and report.html of a run dir; returns their paths."""
    run_dir = Path(run_dir)
    steps, evals = split_records(read_jsonl(run_dir / "metrics.jsonl"))
    png, page = run_dir / "report.png", run_dir / "report.html"
    where = run_dir.resolve()
    title = f"{where.parent.name}/{where.name}: {len(steps)} steps"  # a sweep job's own name is only its number
    plot_run(steps, evals, png, title)

    e = html.escape
    parts = [f"<h1>rltrain run report</h1><p><code>{e(str(run_dir.resolve()))}</code></p>"]
    facts = [["steps", str(len(steps))], ["wall time", duration(wall_time_s(steps + evals))]]
    eval_acc = [r["eval_accuracy"] for r in evals if finite(r.get("eval_accuracy"))]
    if eval_acc:
        facts.append(["eval accuracy (first -> last eval)", f"{fmt(eval_acc[0])} -> {fmt(eval_acc[-1])}"])
    if steps:
        first, last = (nan_mean(r.get("reward_mean") for r in part)
                       for part in (steps[:LAST_STEPS], steps[-LAST_STEPS:]))
        facts.append([f"reward_mean (first {LAST_STEPS} -> last {LAST_STEPS} steps)", f"{fmt(first)} -> {fmt(last)}"])
    parts.append(_html_table(None, facts))
    image = base64.b64encode(png.read_bytes()).decode("ascii")
    parts.append(f'<img alt="training curves" src="data:image/png;base64,{image}">')
    parts.append("<h2>Metrics (first and final value)</h2>")
    parts.append(_html_table(["metric", "first", "final"],
                             [[name, fmt(first), fmt(last)] for name, first, last in metric_rows(steps, evals)]))

    samples_path = run_dir / "samples.jsonl"
    samples = read_jsonl(samples_path) if samples_path.exists() else []
    parts.append("<h2>Sample completions</h2>")
    if samples:
        shown = sorted({samples[0]["step"], samples[-1]["step"]})
        parts.append(f"<p>Steps {' and '.join(map(str, shown))} (of {len({s['step'] for s in samples})} steps "
                     f"in samples.jsonl)</p>")
        parts.append(_samples_table([s for s in samples if s["step"] in shown]))
    else:
        parts.append("<p>No samples.jsonl in this run dir.</p>")
    last_samples = last_eval_with(evals, "eval_samples")
    if last_samples is not None:
        parts.append(f"<h2>Eval samples at step {last_samples['eval_step']} (greedy)</h2>")
        parts.append(_samples_table([{"step": last_samples["eval_step"], **s} for s in last_samples["eval_samples"]]))

    config_path, overrides = run_dir / ".hydra" / "config.yaml", read_yaml(run_dir / ".hydra" / "overrides.yaml")
    parts.append("<h2>Run config</h2>")
    if overrides:
        parts.append(f"<p>Overrides: <code>{e(' '.join(map(str, overrides)))}</code></p>")
    parts.append(f"<pre>{e(config_path.read_text())}</pre>" if config_path.exists()
                 else "<p>No .hydra/config.yaml in this run dir.</p>")
    page.write_text(f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{e(title)}</title>'
                    f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
    return png, page


# ---------------------------------------------------------------------------------------------------- sweep report

@dataclass
class JobSummary:
    job: int
    overrides: list[str]
    status: str  # "ok", "incomplete (k/n steps)", "no metrics"
    steps: int | None
    rollouts: int | None  # generated, hinted ones included (trainer.max_rollouts budgets them)
    final_reward: float  # mean reward_mean of the last 5 steps
    start_eval_accuracy: float  # first eval record (step 0: the starting model)
    final_eval_accuracy: float  # last eval record
    wall_time_s: float
    curves: tuple[list[dict], list[dict]]  # (step records, eval records), for the overlay plot


def summarize_job(job_dir: Path) -> JobSummary:
    overrides = [str(o) for o in read_yaml(job_dir / ".hydra" / "overrides.yaml") or []]
    metrics_path, summary_path = job_dir / "metrics.jsonl", job_dir / "summary.json"
    steps, evals = split_records(read_jsonl(metrics_path)) if metrics_path.exists() else ([], [])
    n_steps = len({r["step"] for r in steps}) if steps else None
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        final_reward, final_eval = summary["reward_mean_last5"], summary["eval_accuracy_end"]
        start_eval, wall = summary["eval_accuracy_start"], summary["wall_time_s"]
    else:
        final_reward = nan_mean(r.get("reward_mean") for r in steps[-LAST_STEPS:])
        last_eval = last_eval_with(evals, "eval_accuracy")
        final_eval = last_eval["eval_accuracy"] if last_eval else math.nan
        first_eval = next((r for r in evals if "eval_accuracy" in r), None)
        start_eval = first_eval["eval_accuracy"] if first_eval else math.nan
        wall = wall_time_s(steps + evals)
    config = read_yaml(job_dir / ".hydra" / "config.yaml") or {}
    expected = config.get("trainer", {}).get("steps")
    if not steps and not summary_path.exists():
        status = "no metrics"
    elif not summary_path.exists() and expected is not None and (n_steps or 0) < expected:
        status = f"incomplete ({n_steps or 0}/{expected} steps)"
    else:
        status = "ok"
    rollouts = sum(int(r.get("rollouts", 0)) for r in steps) if steps else None
    return JobSummary(int(job_dir.name), overrides, status, n_steps, rollouts, final_reward, start_eval, final_eval,
                      wall, (steps, evals))


def summarize_sweep(sweep_dir: Path) -> list[JobSummary]:
    jobs = sorted((p for p in Path(sweep_dir).iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    return [summarize_job(p) for p in jobs]


def split_overrides(jobs: list[JobSummary]) -> tuple[list[str], dict[int, str]]:
    """(overrides every job shares, per job the ones that tell it apart)."""
    common = [o for o in jobs[0].overrides if all(o in j.overrides for j in jobs)] if jobs else []
    return common, {j.job: " ".join(o for o in j.overrides if o not in common) for j in jobs}


COLUMNS = ("job", "overrides", "status", "steps", "rollouts", "final reward", "start eval accuracy",
           "final eval accuracy", "wall time")
SHORT = {"final reward": "reward", "start eval accuracy": "eval start", "final eval accuracy": "eval end",
         "wall time": "time"}  # console headers
SEED = "trainer.seed="


def _cells(job: JobSummary, label: str) -> list[str]:
    return [str(job.job), label or "-", job.status, fmt(job.steps), fmt(job.rollouts), fixed(job.final_reward),
            fixed(job.start_eval_accuracy), fixed(job.final_eval_accuracy), duration(job.wall_time_s)]


SEED_COLUMNS = ("overrides", "seeds", "start eval accuracy", "final eval accuracy", "gain", "final eval per seed")


def seed_rows(jobs: list[JobSummary], labels: dict[int, str]) -> list[list[str]]:
    """Jobs that differ only in ``trainer.seed``, one row each: the mean held-out accuracy at start and end over the
    seeds that finished, and each seed's end. Empty when the sweep does not vary the seed."""
    if not any(SEED in labels[j.job] for j in jobs):
        return []
    groups: dict[str, list[JobSummary]] = {}
    for job in jobs:
        key = " ".join(o for o in labels[job.job].split() if not o.startswith(SEED)) or "-"
        groups.setdefault(key, []).append(job)
    rows = []
    for key, members in groups.items():
        done = [j for j in members if j.status == "ok" and finite(j.final_eval_accuracy)]
        start = nan_mean(j.start_eval_accuracy for j in done)
        end = nan_mean(j.final_eval_accuracy for j in done)
        seeds = " ".join(o.removeprefix(SEED) for j in done for o in j.overrides if o.startswith(SEED)) or "-"
        rows.append([key, f"{len(done)}/{len(members)} ({seeds})", fixed(start), fixed(end),
                     f"{end - start:+.3f}" if finite(end - start) else "-",
                     " ".join(fixed(j.final_eval_accuracy) for j in done) or "-"])
    return rows


def plot_sweep(jobs: list[JobSummary], labels: dict[int, str], path: Path, title: str) -> None:
    fig, (reward_ax, eval_ax) = _figure(2, ncols=2)
    fig.set_size_inches(13, 4.8)
    colors = [f"C{i % 10}" for i in range(len(jobs))]
    window = smoothing_window(max((len(j.curves[0]) for j in jobs), default=0))  # one window: comparable curves
    for job, color in zip(jobs, colors):
        steps, evals = job.curves
        label = f"{job.job}: {labels[job.job] or 'job ' + str(job.job)}" + ("" if steps else " (no metrics)")
        x, y = series(steps, "reward_mean")
        reward_ax.plot(x, rolling_mean(y, window), "-", color=color, label=label)
        eval_ax.plot(*series(evals, "eval_accuracy", x="eval_step"), "o-", color=color, markersize=3, label=label)
    _style(reward_ax, f"reward_mean (rolling mean of {window} steps)")
    _style(eval_ax, "eval accuracy (greedy)", "step")
    eval_ax.set_ylim(-0.03, 1.03)
    handles, names = reward_ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="outside lower center", ncol=min(4, len(handles)), fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.savefig(path)


def write_sweep_report(sweep_dir: Path, console: Console) -> tuple[Path, Path, Path]:
    """Console table, summary.md, summary.csv and sweep.png of a multirun dir; returns the three paths."""
    sweep_dir = Path(sweep_dir)
    jobs = summarize_sweep(sweep_dir)
    common, labels = split_overrides(jobs)
    table = Table(title=f"{sweep_dir}: {len(jobs)} jobs", caption=f"common overrides: {' '.join(common) or '-'}")
    for column in COLUMNS:
        # On a narrow console the overrides fold onto more lines; the numbers are never cut short.
        table.add_column(SHORT.get(column, column), justify="right" if column not in ("overrides", "status") else "left",
                         overflow="fold", no_wrap=column not in ("overrides", "status"))
    for job in jobs:
        table.add_row(*_cells(job, labels[job.job]), style=None if job.status == "ok" else "yellow")
    console.print(table)
    by_seed = seed_rows(jobs, labels)
    if by_seed:
        seeds_table = Table(title="over seeds (jobs that finished)")
        for column in SEED_COLUMNS:
            seeds_table.add_column(column, justify="left" if column == "overrides" else "right", overflow="fold")
        for row in by_seed:
            seeds_table.add_row(*row)
        console.print(seeds_table)

    md, csv_path, png = sweep_dir / "summary.md", sweep_dir / "summary.csv", sweep_dir / "sweep.png"
    lines = [f"# Sweep {sweep_dir.resolve().name}", "", f"Common overrides: `{' '.join(common) or '-'}`", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(job, labels[job.job])) + " |" for job in jobs]
    if by_seed:
        lines += ["", "Over seeds (the mean of the jobs that finished):", "", "| " + " | ".join(SEED_COLUMNS) + " |",
                  "|" + "---|" * len(SEED_COLUMNS)]
        lines += ["| " + " | ".join(row) + " |" for row in by_seed]
    md.write_text("\n".join(lines) + "\n")
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["job", "overrides", "status", "steps", "rollouts", "final_reward", "start_eval_accuracy",
                         "final_eval_accuracy", "wall_time_s"])
        for job in jobs:
            writer.writerow([job.job, " ".join(job.overrides), job.status, *("" if v is None else v
                                                                            for v in (job.steps, job.rollouts)),
                             *("" if not finite(v) else repr(v)
                               for v in (job.final_reward, job.start_eval_accuracy, job.final_eval_accuracy,
                                         job.wall_time_s))])
    plot_sweep(jobs, labels, png, f"{sweep_dir.resolve().name}: {len(jobs)} jobs"
               + (f" (common overrides: {' '.join(common)})" if common else ""))
    return md, csv_path, png
