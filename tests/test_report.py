"""``rltrain report`` on synthetic run and sweep dirs with known numbers (matplotlib, no model; a few seconds)."""

import base64
import csv
import io
import json
import math

import numpy as np
import pytest
from matplotlib import image as mpimg
from rich.console import Console

from rltrain.commands.report import main
from rltrain.report import (
    metric_rows,
    read_jsonl,
    rolling_mean,
    split_records,
    write_run_report,
    write_sweep_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVAL_COMPLETION = "<script>alert(1)</script> yes & no"


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def step_record(s: int) -> dict:
    return {"time": 1000.0 + 10 * s, "step": s, "reward_mean": math.nan if s == 28 else s / 100, "accuracy": s / 60,
            "frac_zero_std_groups": 0.5 - s / 100, "completion_len_mean": 10.0 + s, "truncated_frac": 0.1,
            "rollouts": 32, "loss": 0.125, "reward_errors": 1.0 if s == 12 else 0.0, "reward_timeouts": 0.0,
            "time_generate_s": 1.0, "time_reward_s": 0.25, "time_update_s": 2.0, "time_sync_s": 0.5,
            "time_step_s": 4.0}


def eval_record(s: int) -> dict:
    accuracy = 0.2 + s / 100
    return {"time": 1005.0 + 10 * s, "eval_step": s, "eval_accuracy": accuracy, "eval_reward_mean": accuracy,
            "time_eval_s": 3.0, "eval_pass_at_k": {"1": accuracy, "2": accuracy + 0.1, "4": accuracy + 0.2},
            "eval_samples": [{"prompt": f"What is 2 < 3? (eval {s})", "completion": EVAL_COMPLETION, "reward": 1.0}]}


def make_run(run_dir, steps: int = 30) -> None:
    """Eval at 0, 10, 20, 30 (accuracy 0.2 + step/100); reward_mean = step/100 with a skipped (NaN) step 28."""
    run_dir.mkdir(parents=True)
    records = [eval_record(0)]
    for s in range(1, steps + 1):
        records.append(step_record(s))
        if s % 10 == 0:
            records.append(eval_record(s))
    write_jsonl(run_dir / "metrics.jsonl", records)
    write_jsonl(run_dir / "samples.jsonl", [{"step": s, "prompt": f"prompt {s} <&>", "completion": f"answer {s}",
                                             "reward": float(s % 2)} for s in range(1, steps + 1) for _ in range(2)])
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text(
        "experiment_name: test<run>\ntrainer:\n  steps: 30\n  lr: 1.0e-06\n")
    (run_dir / ".hydra" / "overrides.yaml").write_text("- trainer.steps=30\n")


def assert_png(path, min_w: int, min_h: int) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = mpimg.imread(path)
    h, w = pixels.shape[:2]
    assert w >= min_w and h >= min_h and w < 3000 and h < 3000
    assert pixels[..., :3].std() > 0.05  # something was drawn


def test_rolling_mean_skips_nan():
    got = rolling_mean(np.array([1.0, 3.0, math.nan, 5.0, math.nan, math.nan]), 2)
    np.testing.assert_allclose(got, [1.0, 2.0, 3.0, 5.0, 5.0, math.nan])


def test_run_report_numbers_png_and_html(tmp_path):
    run_dir = tmp_path / "run"
    make_run(run_dir)
    png, page = write_run_report(run_dir)
    assert (png, page) == (run_dir / "report.png", run_dir / "report.html")
    assert_png(png, 1000, 800)

    steps, evals = split_records(read_jsonl(run_dir / "metrics.jsonl"))
    rows = {name: (first, last) for name, first, last in metric_rows(steps, evals)}
    assert rows["reward_mean"] == (0.01, 0.30)
    assert rows["time_step_s"] == (4.0, 4.0) and rows["reward_errors"] == (0.0, 0.0)
    assert rows["eval_accuracy"] == (0.2, 0.5)
    assert rows["eval pass@4"] == (pytest.approx(0.4), pytest.approx(0.7))

    text = page.read_text()
    encoded = text.split('src="data:image/png;base64,')[1].split('"')[0]
    assert base64.b64decode(encoded) == png.read_bytes()
    assert "<td>eval accuracy (first -&gt; last eval)</td><td>0.2 -&gt; 0.5</td>" in text
    assert "<td>reward_mean (first 5 -&gt; last 5 steps)</td><td>0.03 -&gt; 0.28</td>" in text  # NaN step 28 skipped
    assert "<td>wall time</td><td>5m00s</td>" in text  # 1005 (eval 0) to 1305 (eval 30)
    assert "<td>reward_mean</td><td>0.01</td><td>0.3</td>" in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt; yes &amp; no" in text and "<script>" not in text
    assert "What is 2 &lt; 3? (eval 30)" in text and "(eval 20)" not in text  # the last eval's samples only
    assert "prompt 1 &lt;&amp;&gt;" in text and "prompt 30 &lt;&amp;&gt;" in text and "prompt 15 " not in text
    assert "experiment_name: test&lt;run&gt;" in text and "lr: 1.0e-06" in text
    assert "<code>trainer.steps=30</code>" in text


def test_run_report_tolerates_a_short_run_without_optional_files(tmp_path):
    run_dir = tmp_path / "short"
    run_dir.mkdir()
    records = [{"time": 0.0, "eval_step": 0, "eval_accuracy": 0.0},
               {"time": 2.0, "step": 1, "reward_mean": math.nan, "accuracy": math.nan, "skipped_update": 1.0,
                "time_generate_s": 1.5},
               {"time": 4.0, "step": 2, "reward_mean": 0.5, "accuracy": 0.25, "time_step_s": 2.0}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"time": 6.0, "st')
    png, page = write_run_report(run_dir)
    assert_png(png, 600, 250)
    text = page.read_text()
    assert "No samples.jsonl" in text and "No .hydra/config.yaml" in text
    assert "<td>reward_mean</td><td>0.5</td><td>0.5</td>" in text
    assert "<td>steps</td><td>2</td>" in text and "<td>wall time</td><td>4.0s</td>" in text


def make_job(sweep_dir, job: int, lr: str, *, rewards=None, evals=None, summary=None, steps_configured: int = 10):
    job_dir = sweep_dir / str(job)
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(f"- experiment=tiny\n- trainer.lr={lr}\n")
    (job_dir / ".hydra" / "config.yaml").write_text(f"trainer:\n  steps: {steps_configured}\n")
    if rewards is not None:
        records = [{"time": 100.0, "eval_step": 0, "eval_accuracy": evals[0]}]
        records += [{"time": 100.0 + 3 * s, "step": s, "reward_mean": r, "rollouts": 16 + s % 2}
                    for s, r in enumerate(rewards, 1)]
        records += [{"time": 100.0 + 3 * len(rewards) + 1.5, "eval_step": len(rewards), "eval_accuracy": evals[1]}]
        write_jsonl(job_dir / "metrics.jsonl", records)
    if summary is not None:
        (job_dir / "summary.json").write_text(json.dumps(summary))


def test_sweep_report_table_csv_md_and_plot(tmp_path):
    sweep = tmp_path / "multirun"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    make_job(sweep, 0, "1e-5", rewards=[s / 20 for s in range(1, 11)], evals=[0.1, 0.35])
    make_job(sweep, 1, "1e-4", rewards=[0.9] * 10, evals=[0.1, 0.9],
             summary={"eval_accuracy_start": 0.1, "eval_accuracy_end": 0.75, "reward_mean_first5": 0.1,
                      "reward_mean_last5": 0.625, "wall_time_s": 42.0})
    make_job(sweep, 2, "1e-3")  # crashed before writing metrics
    make_job(sweep, 10, "3e-3", rewards=[0.5, 0.5, math.nan, 0.75], evals=[0.0, 0.25])  # stopped after 4 of 10
    out = io.StringIO()
    md, csv_path, png = write_sweep_report(sweep, Console(file=out, width=200))

    rows = {int(r["job"]): r for r in csv.DictReader(csv_path.open())}
    assert list(rows) == [0, 1, 2, 10]
    assert float(rows[0]["final_reward"]) == pytest.approx(0.4)  # mean of steps 6..10 = (6+...+10)/5/20
    assert float(rows[0]["final_eval_accuracy"]) == 0.35 and float(rows[0]["wall_time_s"]) == 31.5
    assert float(rows[0]["start_eval_accuracy"]) == 0.1
    assert (rows[0]["steps"], rows[0]["rollouts"], rows[0]["status"]) == ("10", "165", "ok")
    assert rows[0]["overrides"] == "experiment=tiny trainer.lr=1e-5"
    assert (float(rows[1]["final_reward"]), float(rows[1]["final_eval_accuracy"])) == (0.625, 0.75)  # summary.json
    assert float(rows[1]["wall_time_s"]) == 42.0
    assert rows[2]["status"] == "no metrics" and rows[2]["final_reward"] == rows[2]["steps"] == ""
    assert rows[10]["status"] == "incomplete (4/10 steps)"
    assert float(rows[10]["final_reward"]) == pytest.approx(0.5833333333)  # NaN step left out
    assert float(rows[10]["wall_time_s"]) == 13.5

    text = md.read_text()
    assert "Common overrides: `experiment=tiny`" in text
    assert "| 0 | trainer.lr=1e-5 | ok | 10 | 165 | 0.400 | 0.100 | 0.350 | 31.5s |" in text
    assert "| 1 | trainer.lr=1e-4 | ok | 10 | 165 | 0.625 | 0.100 | 0.750 | 42.0s |" in text
    assert "| 2 | trainer.lr=1e-3 | no metrics | - | - | - | - | - | - |" in text
    assert "| 10 | trainer.lr=3e-3 | incomplete (4/10 steps) | 4 | 66 | 0.583 | 0.000 | 0.250 | 13.5s |" in text
    assert "Over seeds" not in text  # the sweep does not vary the seed
    console = out.getvalue()
    assert "no metrics" in console and "trainer.lr=1e-4" in console and "0.625" in console
    assert_png(png, 1000, 400)


def test_a_sweep_over_seeds_gets_their_mean_start_and_end_per_setting(tmp_path):
    sweep = tmp_path / "multirun"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    runs = [("grpo", 0, [0.2, 0.8]), ("grpo", 1, [0.3, 0.6]), ("ppo", 0, [0.2, 0.5]), ("ppo", 1, None)]
    for job, (algorithm, seed, evals) in enumerate(runs):
        make_job(sweep, job, "1e-5", rewards=[0.5] * 10 if evals else None, evals=evals)
        overrides = sweep / str(job) / ".hydra" / "overrides.yaml"
        overrides.write_text(overrides.read_text() + f"- algorithm={algorithm}\n- trainer.seed={seed}\n")
    out = io.StringIO()
    md, _, _ = write_sweep_report(sweep, Console(file=out, width=200))
    text = md.read_text()
    # grpo: start (0.2 + 0.3) / 2, end (0.8 + 0.6) / 2, gain +0.45; ppo: the seed that crashed is left out (1 of 2)
    assert "| algorithm=grpo | 2/2 (0 1) | 0.250 | 0.700 | +0.450 | 0.800 0.600 |" in text
    assert "| algorithm=ppo | 1/2 (0) | 0.200 | 0.500 | +0.300 | 0.500 |" in text
    assert "over seeds" in out.getvalue()


def test_main_rejects_a_dir_that_is_neither(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neither a run dir" in err


def test_main_on_a_run_dir_writes_the_report(tmp_path, capsys):
    make_run(tmp_path / "run", steps=10)
    main([str(tmp_path / "run")])
    assert (tmp_path / "run" / "report.html").exists() and "report.png" in capsys.readouterr().out


def test_the_written_paths_print_whole_however_long(tmp_path, capsys):
    """Rich wrapped them at the console's width (80 columns when not a terminal), cutting a path in two."""
    run = tmp_path / ("a-long-run-directory-name-" * 4) / "run"
    make_run(run, steps=10)
    main([str(run)])
    assert f"{run / 'report.png'}, {run / 'report.html'}" in capsys.readouterr().out


def test_a_run_with_rollouts_ahead_gets_an_off_policy_panel_and_its_wait_time(tmp_path):
    """trainer.max_staleness > 0: staleness and the mismatch KL in one panel, the time waited among the phases; a
    synchronous run (staleness absent or 0) has no such panel."""
    from rltrain.report import _run_panels

    steps = [{**step_record(s), "staleness": min(s - 1, 2), "mismatch_kl": 0.01 * min(s - 1, 2),
              "time_wait_s": 0.1} for s in range(1, 11)]
    titles = [panel[0] for panel in _run_panels(steps, [eval_record(0)])]
    assert "off-policy: staleness and mismatch KL" in titles
    assert "off-policy: staleness and mismatch KL" not in [p[0] for p in _run_panels(
        [{**r, "staleness": 0} for r in steps], [eval_record(0)])]
    run_dir = tmp_path / "run"
    make_run(run_dir, steps=10)
    write_jsonl(run_dir / "metrics.jsonl", [eval_record(0), *steps, eval_record(10)])
    png, _ = write_run_report(run_dir)
    assert_png(png, 1000, 800)


def test_a_run_with_peak_memory_gets_a_memory_panel(tmp_path):
    from rltrain.report import _run_panels

    steps = [{**step_record(s), "peak_memory_gb": 3.0 + s / 10, "peak_memory_growth_gb": 1.0} for s in range(1, 11)]
    title = "memory per step (CUDA allocated on a GPU, resident set on CPU)"
    assert title in [p[0] for p in _run_panels(steps, [eval_record(0)])]
    assert title not in [p[0] for p in _run_panels([step_record(s) for s in range(1, 11)], [eval_record(0)])]
    run_dir = tmp_path / "run"
    make_run(run_dir, steps=10)
    write_jsonl(run_dir / "metrics.jsonl", [eval_record(0), *steps, eval_record(10)])
    png, _ = write_run_report(run_dir)
    assert_png(png, 1000, 800)
