"""Nothing silently wrong, end to end (`lora-jax finetune` on the tiny random Llama): a run that diverges
stops at the step with no adapter; two runs on one folder; a kill in the middle of a metrics line; SIGINT
and SIGTERM save the step in progress and the rerun resumes from it; a corrupted checkpoint is refused
and ``--resume-from`` goes back; ``eval`` refuses an adapter that scores NaN.

Runs that must be caught mid-way use `lora-jax` with its train step patched from outside (the product
has no hook for it): it holds before a given step until a file exists, or reports a NaN loss from a
given step on.
"""

import json
import pathlib
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest
from helpers import child_env

pytestmark = [pytest.mark.slow, pytest.mark.assets, pytest.mark.usefixtures("compilation_cache")]

CLI = [sys.executable, "-m", "lora_jax.train.cli"]
PATCHED_CLI = [
    sys.executable,
    "-c",
    """
import os, sys, time
import jax, jax.numpy as jnp
from lora_jax.train import cli
from lora_jax.train import step as step_lib

make = step_lib.make_train_step
nan_from = int(os.environ.get("TEST_NAN_FROM_STEP", "0"))
hold_at = int(os.environ.get("TEST_HOLD_AT_STEP", "0"))  # step k waits for the file TEST_HOLD_FILE
hold_file = os.environ.get("TEST_HOLD_FILE", "")

def patched(*args, **kwargs):
  step = make(*args, **kwargs)
  def run(deltas, opt_state, params, batch, key):
    # the optimizer's update count: the global step, also after a resume
    done = int(next(x for x in jax.tree_util.tree_leaves(opt_state) if jnp.issubdtype(x.dtype, jnp.integer)))
    deadline = time.time() + 300
    if done + 1 == hold_at:  # tell the test that step k is in progress (and held)
      open(hold_file + ".held", "w").close()
    while done + 1 == hold_at and not os.path.exists(hold_file) and time.time() < deadline:
      time.sleep(0.05)
    deltas, opt_state, m = step(deltas, opt_state, params, batch, key)
    if nan_from and done + 1 >= nan_from:
      m = {**m, "loss": jnp.nan}
    return deltas, opt_state, m
  return run

step_lib.make_train_step = patched
sys.exit(cli.main(sys.argv[1:]))
""",
]
TINY = [
    "finetune",
    "--model",
    "tiny-llama",
    "--steps",
    "8",
    "--batch",
    "4",
    "--grad-accum",
    "2",
    "--max-len",
    "40",
    "--eval-size",
    "8",
    "--warmup",
    "2",
    "--lr",
    "1e-2",
    "--keep",
    "3",
    "--no-progress",
]


def _env(**extra):
    return child_env(env={k: str(v) for k, v in extra.items()})


def _run(args, **extra):
    return subprocess.run(CLI + args, env=_env(**extra), capture_output=True, text=True, timeout=600)


def _start(args, **extra):
    return subprocess.Popen(
        PATCHED_CLI + args, env=_env(**extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _train_steps(out) -> list[int]:
    """The steps of the complete train records in ``out/metrics.jsonl``."""
    try:
        text = (pathlib.Path(out) / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    lines = text.split("\n")[:-1]  # a last line without its newline is not complete
    return [json.loads(line)["step"] for line in lines if '"kind": "train"' in line]


def _wait_for(condition, proc, what, timeout=400):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}: {proc.communicate()[1][-3000:]}")
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def _checkpoints(out) -> list[int]:
    return sorted(int(p.name) for p in (pathlib.Path(out) / "checkpoints").glob("*") if p.name.isdigit())


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("lora-jax: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def test_divergence_at_step_1_writes_nothing(tmp_path):
    """alpha 1e30 passes the settings check (finite, > 0) but its first gradient overflows."""
    out = tmp_path / "run"
    proc = _run(TINY + ["--alpha", "1e30", "--out", str(out)])
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = _one_error_line(proc.stderr)
    assert line.startswith("lora-jax: error: training diverged at step 1: the loss is ")
    assert (
        "and the gradient norm inf. Stopped before saving step 1: no checkpoint was saved and no adapter "
        in line
    )
    assert "Rerun with a lower --lr (now 0.01) or --alpha (now 1e+30)" in line
    assert not (out / "adapter").exists() and not (out / "results.json").exists()
    assert _checkpoints(out) == []
    assert _train_steps(out) == [1] and not (out / ".lock").exists()


def test_divergence_mid_run_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    bad = subprocess.run(
        PATCHED_CLI + TINY + ["--checkpoint-every", "2", "--out", str(out)],
        env=_env(TEST_NAN_FROM_STEP=5),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode == 1, bad.stderr[-3000:]
    line = _one_error_line(bad.stderr)
    assert "training diverged at step 5: the loss is nan" in line
    assert (
        f"Stopped before saving step 5: the last good checkpoint is step 4 ({out / 'checkpoints'}), and no "
        f"adapter was written" in line
    )
    assert max(_checkpoints(out)) == 4 and not (out / "adapter").exists()
    assert _train_steps(out) == [1, 2, 3, 4, 5]
    # The kept checkpoint is good: a run without the fault resumes from it, with no step twice.
    again = _run(TINY + ["--checkpoint-every", "2", "--out", str(out)])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step 4" in again.stdout
    assert _train_steps(out) == list(range(1, 9))


def test_two_runs_on_one_folder(tmp_path):
    out, go = tmp_path / "run", tmp_path / "go"
    first = _start(TINY + ["--out", str(out)], TEST_HOLD_AT_STEP=2, TEST_HOLD_FILE=go)  # holds before step 2
    _wait_for(lambda: len(_train_steps(out)) >= 1, first, "the first run's first step")
    second = _run(TINY + ["--out", str(out)])
    go.touch()
    assert second.returncode == 2
    line = _one_error_line(second.stderr)
    assert line == (
        f"lora-jax: error: {str(out)!r} is in use by another run (pid {first.pid} on "
        f"{socket.gethostname()}, started {json.loads((out / '.lock').read_text())['started']}); wait for "
        f"it to finish, or write to another folder."
    )
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert json.loads((out / "results.json").read_text())["steps"] == 8
    assert _train_steps(out) == list(range(1, 9)) and not (out / ".lock").exists()


def test_kill_in_the_middle_of_a_metrics_line_then_rerun(tmp_path):
    out = tmp_path / "run"
    victim = _start(
        TINY + ["--checkpoint-every", "2", "--out", str(out)],
        TEST_HOLD_AT_STEP=6,
        TEST_HOLD_FILE=tmp_path / "never",
    )
    _wait_for(lambda: len(_train_steps(out)) >= 5, victim, "step 5")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    # What a kill in the middle of writing a record leaves: the start of a line, no newline; and a
    # temporary file of a write that never finished.
    metrics = out / "metrics.jsonl"
    text = metrics.read_text()
    last = text.rstrip("\n").split("\n")[-1]
    metrics.write_text(text.rstrip("\n")[: -len(last)] + last[: len(last) // 2])
    (out / ".loss.png.99999.tmp.png").write_bytes(b"\x89PNG half")
    assert json.loads((out / ".lock").read_text())["pid"] == victim.pid  # the dead run's lock
    killed_at = max(_checkpoints(out))  # 4, or 2 if the async save of step 4 was cut short by the kill
    assert killed_at in (2, 4)

    again = _run(TINY + ["--checkpoint-every", "2", "--out", str(out)])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from step {killed_at}" in again.stdout
    records = [json.loads(line) for line in metrics.read_text().splitlines()]  # every line whole
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 9))  # each step once
    assert (out / "loss.png").stat().st_size > 1000
    assert json.loads((out / "results.json").read_text())["steps"] == 8
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter",
        "checkpoints",
        "loss.png",
        "metrics.jsonl",
        "results.json",
    ]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_the_step_in_progress(tmp_path, sig):
    out, go = tmp_path / "run", tmp_path / "go"
    args = TINY + ["--checkpoint-every", "100", "--out", str(out)]  # no checkpoint but the one on the way out
    victim = _start(args, TEST_HOLD_AT_STEP=4, TEST_HOLD_FILE=go)
    # Step 4 in progress: held inside its train step (after step 3's line, the loop may not be there yet).
    _wait_for(lambda: (tmp_path / "go.held").exists(), victim, "step 4")
    victim.send_signal(sig)  # during step 4
    time.sleep(0.5)
    go.touch()
    _, err = victim.communicate(timeout=300)
    assert victim.returncode == 128 + sig, err[-3000:]
    step = 4
    assert set(_checkpoints(out)) <= {1, step} and step in _checkpoints(
        out
    )  # (orbax keeps the first step too)
    assert _train_steps(out) == list(range(1, step + 1))
    name = signal.Signals(sig).name
    assert f"lora-jax: {name}: saving a checkpoint after the step in progress, then stopping" in err
    last = err.strip().splitlines()[-1]
    assert last == (
        f"lora-jax: interrupted by {name} after step {step}, its checkpoint saved in "
        f"{out / 'checkpoints'}; resume with: lora-jax {shlex.join(args)}"
    )
    assert not (out / "adapter").exists() and not (out / ".lock").exists()
    if sig == signal.SIGTERM:
        return

    # The printed command resumes from that step.
    resume = shlex.split(last.split("resume with: ", 1)[1])
    assert resume[0] == "lora-jax"
    again = _run(resume[1:])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from step {step}" in again.stdout
    assert _checkpoints(out)[-2:] == [step, 8] and _train_steps(out) == list(range(1, 9))

    # A flipped bit in the last checkpoint: refused, naming --resume-from; which then goes back.
    arrays = sorted(
        p for p in (out / "checkpoints" / "8" / "state").rglob("*") if p.is_file() and "/d/" in str(p)
    )
    data = bytearray(arrays[0].read_bytes())
    data[len(data) // 2] ^= 0x10
    arrays[0].write_bytes(bytes(data))
    before = sorted(str(p) for p in out.rglob("*"))
    bad = _run(args)
    assert bad.returncode == 2
    line = _one_error_line(bad.stderr)
    assert f"checkpoint '{out / 'checkpoints' / '8'}'" in line and (
        "is corrupted" in line or "cannot be read" in line
    )
    assert (
        f"to go back to the checkpoint of step {step}, rerun with --resume-from {step} (the newer checkpoints are "
        f"moved to {out / 'checkpoints' / 'set_aside'}, nothing is deleted)"
    ) in line
    assert sorted(str(p) for p in out.rglob("*")) == before  # nothing touched
    back = _run(args + ["--resume-from", str(step)])
    assert back.returncode == 0, back.stderr[-3000:]
    assert f"resumed from step {step}" in back.stdout
    assert (out / "checkpoints" / "set_aside" / "8").is_dir() and _checkpoints(out)[-2:] == [step, 8]
    assert (out / "set_aside" / f"after-step-{step}" / "results.json").is_file()  # the stale products, kept
    assert _train_steps(out) == list(range(1, 9))


def test_eval_refuses_an_adapter_that_scores_nan(tmp_path):
    import dataclasses

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lora_jax import adapter as adapter_lib
    from lora_jax.delta import is_delta
    from lora_jax.models import llama

    out = tmp_path / "run"
    ft = _run(TINY + ["--steps", "2", "--warmup", "1", "--out", str(out)])
    assert ft.returncode == 0, ft.stderr[-3000:]
    info = adapter_lib.adapter_info(out / "adapter")
    config = {k: v for k, v in info["base_model"]["config"].items()}
    model = llama.Llama(
        llama.LlamaConfig(
            **{**config, "dtype": jnp.dtype(config["dtype"]), "param_dtype": jnp.dtype(config["param_dtype"])}
        )
    )
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    deltas = adapter_lib.load_adapter(out / "adapter", shapes)
    broken = jax.tree_util.tree_map(
        lambda d: dataclasses.replace(d, b=d.b * np.nan) if is_delta(d) else d, deltas, is_leaf=is_delta
    )
    adapter_lib.save_adapter(
        tmp_path / "nan",
        broken,
        adapter_lib.spec_from_json(info["spec"]),
        base_model=info["base_model"],
        extra=info["extra"],
        verbose=False,
    )
    ev = _run(["eval", "--adapter", str(tmp_path / "nan"), "--eval-size", "8"])
    assert ev.returncode == 2
    line = _one_error_line(ev.stderr)
    assert "the model's log-probabilities of the label words are not finite (NaN or inf)" in line
    assert "accuracy" not in ev.stdout
