"""Both scripts end to end on the real simulator, all four tasks, past learning_starts (updates run), with the run
folder, TensorBoard file and JSON evaluation lines checked. The MLP twin runs with escnn made unimportable."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TASKS, assert_finished_line
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TOTAL, LEARNING_STARTS, EVAL_FREQUENCY = 300, 150, 150
SMALL_NETS = {"eq": ["--dihedral-n", "4", "--reg-rep-n", "4"], "mlp": ["--hidden-sizes", "32", "32"]}
BLOCK_ESCNN = (  # run a script with `import escnn` raising ImportError
    "import runpy, sys; sys.modules['escnn'] = None; sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def run_script(script: str, args: list, tmp_path) -> subprocess.CompletedProcess:
    path = os.path.join(ROOT, f"sac_fetch_{'equivariant' if script == 'eq' else 'mlp'}.py")
    prefix = [sys.executable, path] if script == "eq" else [sys.executable, "-c", BLOCK_ESCNN, path]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(prefix + args, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)


def smoke_args(task: str, script: str, run_dir) -> list:
    return [
        "--env-id", f"Fetch{task}Dense-v4", "--total-timesteps", str(TOTAL), "--learning-starts", str(LEARNING_STARTS),
        "--eval-frequency", str(EVAL_FREQUENCY), "--eval-episodes", "2", "--batch-size", "32", "--buffer-size", "1000",
        "--seed", "3", "--exp-name", f"smoke_{script}", "--run-dir", str(run_dir), "--save-model", *SMALL_NETS[script],
        "--final-eval-episodes", "3",
    ]  # fmt: skip


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("script", ["eq", "mlp"])
def test_training_runs_past_learning_starts_and_logs(script, task, tmp_path):
    result = run_script(script, smoke_args(task, script, tmp_path / "runs"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    *records, heldout = [json.loads(line) for line in result.stdout.splitlines()]  # stdout: JSON lines only
    assert [(r["eval_idx"], r["global_step"]) for r in records] == [(0, 150), (1, 300)]
    assert all(0.0 <= r["eval/success_rate"] <= 1.0 and r["eval/return"] <= 0.0 for r in records)
    assert set(heldout) == {"global_step", "heldout/success_rate", "heldout/return", "heldout/episodes"}
    assert heldout["global_step"] == TOTAL and heldout["heldout/episodes"] == 3 and heldout["heldout/return"] <= 0.0

    (run_path,) = glob.glob(str(tmp_path / "runs" / f"Fetch{task}Dense-v4__smoke_{script}__3__*"))
    assert_finished_line(result.stderr, os.path.basename(run_path), run_path, heldout)  # stderr ends naming both
    files = os.listdir(run_path)
    assert {"config.json", "evals.jsonl", "final_eval.json", "model.pt"} <= set(files)
    assert len([f for f in files if f.startswith("events.out.tfevents.")]) == 1
    with open(os.path.join(run_path, "final_eval.json")) as f:
        final = json.load(f)
    assert (
        final["eval_idx"] == 1 and final["global_step"] == TOTAL and final["args"]["env_id"] == f"Fetch{task}Dense-v4"
    )
    assert final["heldout/return"] == heldout["heldout/return"] and final["eval/return"] == records[-1]["eval/return"]
    with open(os.path.join(run_path, "evals.jsonl")) as f:
        assert [json.loads(line) for line in f] == records

    scalars = EventAccumulator(run_path).Reload().Tags()["scalars"]
    for tag in ("charts/episodic_return", "charts/episodic_length", "charts/success_rate", "charts/SPS",
                "losses/qf1_loss", "losses/qf2_loss", "losses/actor_loss", "losses/alpha", "losses/alpha_loss",
                "eval/success_rate", "eval/return", "heldout/success_rate", "heldout/return"):  # fmt: skip
        assert tag in scalars, tag
    qf1 = EventAccumulator(run_path).Reload().Scalars("losses/qf1_loss")
    assert [p.step for p in qf1] == [250]  # update_ratio 1: 150 updates, the 100th at step 250
    episodes = EventAccumulator(run_path).Reload().Scalars("charts/episodic_length")
    assert [e.value for e in episodes] == [50.0] * (TOTAL // 50)
    # the normaliser saw every input the networks are given (model.pt: at the evaluation of step 300): each step's
    # observation plus 6 reset observations (the one after the last episode comes later), and 6 episodes' goals at
    # 50 expected HER samples each
    count = torch.load(os.path.join(run_path, "model.pt"), weights_only=False)["obs_norm"]["count"]
    assert count[:-3].eq(TOTAL + TOTAL // 50).all() and (count[-3:] - TOTAL).abs().max() < 1e-9


@pytest.mark.parametrize("script", ["eq", "mlp"])
def test_saved_model_evaluates_deterministically(script, tmp_path, request):
    result = run_script(script, smoke_args("Reach", script, tmp_path / "runs"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (model,) = glob.glob(str(tmp_path / "runs" / "*" / "model.pt"))
    m = request.getfixturevalue(script)
    first = m.evaluate_checkpoint(model, eval_episodes=3, seed=5)
    assert first["global_step"] == TOTAL and 0.0 <= first["eval/success_rate"] <= 1.0
    assert m.evaluate_checkpoint(model, eval_episodes=3, seed=5) == first
    # the saved actor reproduces the run's own final evaluation (same eval seed and episode count)
    final = json.loads(result.stdout.splitlines()[-2])  # the last periodic evaluation (the held-out line follows)
    again = m.evaluate_checkpoint(model, eval_episodes=2, seed=3 + 1_000_000)
    assert again["eval/return"] == pytest.approx(final["eval/return"], rel=1e-5)
    # the training checkpoint, written after that evaluation, holds the same agent (the README evaluates it)
    checkpoint = os.path.join(os.path.dirname(model), "checkpoint.pt")
    assert m.evaluate_checkpoint(checkpoint, eval_episodes=2, seed=3 + 1_000_000) == again


def test_capture_video_saves_one_video_per_evaluation(tmp_path, monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "egl")
    args = smoke_args("Reach", "mlp", tmp_path / "runs") + ["--capture-video"]
    result = run_script("mlp", args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(result.stdout.splitlines()) == 3  # stdout keeps only the JSON lines: 2 evaluations, 1 held-out
    videos = glob.glob(str(tmp_path / "runs" / "*" / "videos" / "*.mp4"))
    assert len(videos) == 3 and all(os.path.getsize(v) > 1000 for v in videos)  # 2 evaluations, 1 held-out


def test_capture_video_without_a_renderer_fails_before_writing(tmp_path, monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "glfw")  # no display here: GLFW cannot make a context
    monkeypatch.delenv("DISPLAY", raising=False)
    result = run_script("mlp", smoke_args("Reach", "mlp", tmp_path / "runs") + ["--capture-video"], tmp_path)
    assert result.returncode == 2
    assert "error: --capture-video cannot render" in result.stderr and "MUJOCO_GL=egl" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_async_vector_env_with_several_envs_counts_transitions_not_reset_steps(tmp_path):
    """4 async envs: episodes end together every 50 transitions per env, and the autoreset steps are not counted."""
    args = smoke_args("Push", "mlp", tmp_path / "runs") + ["--num-envs", "4", "--vector-env-mode", "async"]
    args[args.index("--total-timesteps") + 1] = "400"
    args[args.index("--eval-frequency") + 1] = "200"
    result = run_script("mlp", args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["global_step"] for r in records] == [200, 400, 400]  # two evaluations, then the held-out one
    (run_path,) = glob.glob(str(tmp_path / "runs" / "*"))
    lengths = EventAccumulator(run_path).Reload().Scalars("charts/episodic_length")
    assert [e.value for e in lengths] == [50.0] * 8 and sorted({e.step for e in lengths}) == [200, 400]


@pytest.mark.parametrize("script", ["eq", "mlp"])
def test_update_ratio_schedules_updates_per_transition(script, request):
    """update_ratio r: after learning_starts, floor((global_step - learning_starts) * r) updates have run, whatever
    num_envs is (a function of the counters, so a resumed run keeps the schedule)."""
    m = request.getfixturevalue(script)
    due = []
    for num_envs, ratio in ((1, 0.25), (4, 0.25), (1, 1.5), (3, 1.0)):
        args = m.Args(num_envs=num_envs, update_ratio=ratio, learning_starts=100)
        loop, counts = m.LoopState(global_step=100), []
        for _ in range(8):
            loop.global_step += num_envs
            counts.append(m.updates_due(args, loop))
            loop.update_idx += counts[-1]
        due.append(counts)
    assert due == [[0, 0, 0, 1, 0, 0, 0, 1], [1] * 8, [1, 2, 1, 2, 1, 2, 1, 2], [3] * 8]


def test_a_quarter_update_ratio_logs_losses_at_the_expected_steps(tmp_path):
    """A real run: with --update-ratio 0.25 the 100th and 200th updates (the loss log points) come at global steps
    150 + 400 and 150 + 800 (learning_starts 150)."""
    args = smoke_args("Push", "mlp", tmp_path / "runs") + ["--update-ratio", "0.25"]
    args[args.index("--total-timesteps") + 1] = "1000"
    args[args.index("--eval-frequency") + 1] = "1000"
    result = run_script("mlp", args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_path,) = glob.glob(str(tmp_path / "runs" / "*"))
    assert [p.step for p in EventAccumulator(run_path).Reload().Scalars("losses/qf1_loss")] == [550, 950]
