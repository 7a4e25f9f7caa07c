"""`lora-jax finetune --data FILE` end to end: each format (and packing) runs and writes its held-out loss and
samples; bad data is a one-line error; a run killed with SIGKILL mid-epoch resumes with the same batches;
two processes read disjoint shares whose union is the data set."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import SLOW_CLI, child_env, free_port, launched, run_processes

pytestmark = pytest.mark.usefixtures("compilation_cache")  # helpers.CACHE_ENV

CLI = [sys.executable, "-m", "lora_jax.train.cli"]
TINY = [
    "finetune",
    "--model",
    "tiny-llama",
    "--warmup",
    "1",
    "--batch",
    "4",
    "--max-len",
    "40",
    "--samples",
    "2",
    "--no-progress",
]


PC = [
    {"prompt": f"Question {i}: is {i} even?\nAnswer:", "completion": " yes" if i % 2 == 0 else " no"}
    for i in range(30)
]
CHAT = [
    {
        "messages": [
            {"role": "system", "content": "Answer yes or no."},
            {"role": "user", "content": f"Is {i} even?"},
            {"role": "assistant", "content": "yes" if i % 2 == 0 else "no"},
        ]
    }
    for i in range(30)
]
TEXT = [{"text": f"Line {i}: " + "the quick brown fox " * (1 + i % 4)} for i in range(30)]
# Labels that share their first token (" very"): accuracy by each label's whole likelihood.
SHARED = [
    {"prompt": f"Review {i}: it was", "completion": " very good" if i % 2 else " very bad"} for i in range(30)
]


def _run(args, timeout=600):
    return subprocess.run(CLI + args, env=child_env(), capture_output=True, text=True, timeout=timeout)


def _write(path, rows):
    import pandas as pd

    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    return path


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.assets
@pytest.mark.parametrize(
    "name, rows, fmt, extra",
    [
        ("pc.jsonl", PC, "prompt-completion", []),
        ("chat.json", CHAT, "messages", ["--pack", "--max-len", "64"]),
        ("text.parquet", TEXT, "text", ["--pack"]),
        ("pc.csv", PC, "prompt-completion", ["--eval-every", "2"]),
        ("shared.jsonl", SHARED, "prompt-completion", []),
    ],
)
def test_finetune_on_a_data_file(tmp_path, name, rows, fmt, extra):
    from lora_jax import checkpoint

    data, out = _write(tmp_path / name, rows), tmp_path / "run"
    ft = _run(TINY + ["--data", str(data), "--steps", "5", "--out", str(out), *extra])
    assert ft.returncode == 0, ft.stderr[-3000:]
    assert f"data: {name} ({fmt}): train 27 examples, validation 3" in ft.stdout
    evals = [r for r in _records(out / "metrics.jsonl") if r["kind"] == "eval"]
    steps = [2, 4] if "--eval-every" in extra else []
    assert [r["step"] for r in evals] == steps + [0, 5]  # periodic, then base (step 0) and adapter
    assert all(
        r["val_loss"] > 0 and r["val_perplexity"] == pytest.approx(np.exp(r["val_loss"])) for r in evals
    )
    assert ("val_accuracy" in evals[-1]) == (fmt != "text")  # yes/no completions: a detected label set
    scoring = {"text": None, "shared.jsonl": "whole answer"}.get(
        fmt if fmt == "text" else name, "first token"
    )
    samples = _records(out / "samples.jsonl")
    assert [(s["model"], s["index"]) for s in samples] == [("base", 0), ("base", 1), ("lora", 0), ("lora", 1)]
    res = json.loads((out / "results.json").read_text())
    assert res["data"]["format"] == fmt and res["data"]["packed"] == ("--pack" in extra)
    assert res["data"]["label_scoring"] == scoring
    if scoring:
        assert 0 <= res["lora_accuracy"] <= 1 and res["lora"]["scored"] == 3
    assert res["base_loss"] == evals[-2]["val_loss"] and res["lora_loss"] == evals[-1]["val_loss"]
    if "--pack" in extra:
        assert res["data"]["padding"] < res["data"]["padding_unpacked"]
        assert "packed into" in ft.stdout
    # The adapter names the data file, not where it was on this machine.
    assert checkpoint.adapter_info(out / "adapter")["extra"]["config"]["data"] == name
    # A second run reads the tokens back from the run's cache.
    assert len(list((out / "data_cache").glob("tokens-train-0of1-*.npz"))) == 1


@pytest.mark.assets
def test_bad_data_is_a_one_line_error(tmp_path):
    rows = CHAT[:3] + [{"messages": [{"role": "robot", "content": "hi"}]}]
    data = _write(tmp_path / "bad.jsonl", rows)
    ft = _run(TINY + ["--data", str(data), "--steps", "5", "--out", str(tmp_path / "run")])
    assert ft.returncode == 2
    line = ft.stderr.strip().splitlines()[-1]
    assert line == (
        "lora-jax: error: bad.jsonl line 4: field 'messages[0].role': 'robot' is not one of 'system', "
        "'user', 'assistant'."
    )
    missing = _run(TINY + ["--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "run2")])
    assert missing.returncode == 2 and "nope.jsonl' does not exist" in missing.stderr.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.assets
def test_sigkill_mid_epoch_resumes_with_the_same_batches(tmp_path):
    # 15 rows: 2 held out, 13 train -> 3 batches of 4 per epoch; killed after step 4 = mid-epoch 2.
    data = _write(tmp_path / "d.jsonl", PC[:15])
    args = TINY + ["--data", str(data), "--steps", "8", "--checkpoint-every", "1", "--lr", "1e-2"]
    # The uninterrupted reference first: it fills the compilation cache the later runs read.
    ref = _run(args + ["--out", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "killed"
    with launched([SLOW_CLI + args + ["--out", str(out)]]) as [victim]:
        deadline = time.time() + 400
        while time.time() < deadline and victim.poll() is None:
            if any(p.name.isdigit() and int(p.name) >= 4 for p in (out / "checkpoints").glob("*")):
                break
            time.sleep(0.2)
        assert victim.poll() is None, "finished before it could be killed: " + victim.output()[1][-2000:]
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    killed_at = max(int(p.name) for p in (out / "checkpoints").glob("*") if p.name.isdigit())
    assert 4 <= killed_at < 8 and killed_at % 3 != 0  # mid-epoch

    again = _run(args + ["--out", str(out)])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from step {killed_at}" in again.stdout
    steps = lambda run: {
        r["step"]: r for r in _records(tmp_path / run / "metrics.jsonl") if r["kind"] == "train"
    }
    a, b = steps("ref"), steps("killed")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for k in range(killed_at + 1, 9):  # the same batches (token counts) and the same losses after the restart
        assert a[k]["tokens"] == b[k]["tokens"] and a[k]["loss"] == b[k]["loss"], k
    from safetensors.numpy import load_file

    x, y = (load_file(str(tmp_path / r / "adapter" / "adapter.safetensors")) for r in ("ref", "killed"))
    for k in x:
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)  # bit for bit


@pytest.mark.slow
@pytest.mark.assets
def test_two_processes_read_disjoint_shares(tmp_path):
    from lora_jax.data import files

    data, out, port = _write(tmp_path / "d.jsonl", PC), tmp_path / "run", free_port()
    args = TINY + [
        "--data",
        str(data),
        "--steps",
        "3",
        "--out",
        str(out),
        "--coordinator",
        f"127.0.0.1:{port}",
        "--num-processes",
        "2",
    ]
    stdouts = run_processes([CLI + args + ["--process-id", str(i)] for i in range(2)])
    assert "/ 2 processes" in stdouts[0] and "processes_reading" in (out / "results.json").read_text()
    train, _ = files.carve(len(PC), 0.1)
    shares = []
    for i in range(2):
        [path] = (out / "data_cache").glob(f"tokens-train-{i}of2-*.npz")
        shares.append(set(np.load(path)["rows"].tolist()))
    assert not shares[0] & shares[1] and shares[0] | shares[1] == set(train.tolist())
    assert json.loads((out / "results.json").read_text())["data"]["processes_reading"] == 2
