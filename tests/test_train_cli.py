"""`lora-jax` end to end: kill -9 and resume exactly; refuse mismatched or corrupted checkpoints;
`eval` and `generate` with an adapter; the main job with tiny settings (real SmolLM2 + movie reviews)."""

import json
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import SLOW_CLI, child_env

pytestmark = pytest.mark.usefixtures("compilation_cache")  # helpers.CACHE_ENV

CLI = [sys.executable, "-m", "lora_jax.train.cli"]
TINY = [
    "finetune",
    "--model",
    "tiny-llama",
    "--steps",
    "10",
    "--batch",
    "4",
    "--grad-accum",
    "2",
    "--max-len",
    "40",
    "--eval-size",
    "8",
    "--checkpoint-every",
    "3",
    "--keep",
    "2",
    "--warmup",
    "2",
    "--lr",
    "1e-2",
    "--no-progress",
]


def _env():
    return child_env()


def _run(args, timeout=600):
    proc = subprocess.run(CLI + args, env=_env(), capture_output=True, text=True, timeout=timeout)
    return proc


def _adapter(out):
    from safetensors.numpy import load_file

    return load_file(str(pathlib.Path(out) / "adapter" / "adapter.safetensors"))


def _tree(root):
    """The files under `root`, but the run lock (a killed run's stale lock is taken over by the next run)."""
    return sorted(str(p.relative_to(root)) for p in pathlib.Path(root).rglob("*") if p.name != ".lock")


@pytest.mark.slow
@pytest.mark.assets
def test_sigkill_and_restart_resumes_exactly(tmp_path):
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    # The uninterrupted reference first: it fills the compilation cache the later runs read.
    ref = _run(TINY + ["--out", str(ref_out)])
    assert ref.returncode == 0, ref.stderr[-3000:]
    victim = subprocess.Popen(
        SLOW_CLI + TINY + ["--out", str(out)],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:
        steps = [p.name for p in (out / "checkpoints").glob("*") if p.name.isdigit()]
        if any(int(s) >= 6 for s in steps):
            break
        time.sleep(0.2)
    assert victim.poll() is None, (
        "the run finished before it could be killed: " + victim.communicate()[1][-2000:]
    )
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (out / "adapter").exists()
    killed_at = max(int(p.name) for p in (out / "checkpoints").glob("*") if p.name.isdigit())
    assert 6 <= killed_at < 10

    # Mismatched settings: a clear error before anything is touched.
    before = _tree(out)
    bad = _run(TINY + ["--out", str(out), "--lr", "5e-3"])
    assert (
        bad.returncode != 0
        and "holds a run with other settings" in bad.stderr
        and "'lr': (0.01, 0.005)" in bad.stderr
    )
    assert _tree(out) == before

    again = _run(TINY + ["--out", str(out)])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from step {killed_at}" in again.stdout
    a, b = _adapter(ref_out), _adapter(out)
    assert sorted(a) == sorted(b) and len(a) == 4
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # bit for bit
    assert (
        json.loads((out / "results.json").read_text())["lora_accuracy"]
        == json.loads((ref_out / "results.json").read_text())["lora_accuracy"]
    )

    # eval / generate with the adapter (the base model is found from the adapter's metadata).
    ev = _run(["eval", "--adapter", str(out / "adapter"), "--eval-size", "8", "--base"])
    assert ev.returncode == 0, ev.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert f"LoRA accuracy (test, 8 reviews): {res['lora_accuracy']:.4f}" in ev.stdout
    assert f"base accuracy (test, 8 reviews): {res['base_accuracy']:.4f}" in ev.stdout
    gen = _run(
        [
            "generate",
            "--adapter",
            str(out / "adapter"),
            "--prompt",
            "Review: a moving film.\\nSentiment:",
            "--max-new-tokens",
            "3",
        ]
    )
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert gen.stdout.startswith("Review: a moving film.\nSentiment:")

    # A corrupted checkpoint: a clear error, nothing deleted.
    last = out / "checkpoints" / "10"
    for p in (last / "meta").rglob("*"):
        if p.is_file():
            p.write_text("{not json")
    before = _tree(out)
    bad = _run(TINY + ["--out", str(out)])
    assert bad.returncode != 0 and "cannot be read (corrupted or incomplete?)" in bad.stderr
    assert "Nothing was deleted" in bad.stderr
    assert _tree(out) == before


@pytest.mark.slow
@pytest.mark.assets
def test_main_job_end_to_end_small(tmp_path):
    out = tmp_path / "main"
    ft = _run(
        [
            "finetune",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--batch",
            "2",
            "--eval-size",
            "4",
            "--eval-batch",
            "4",
            "--max-len",
            "40",
            "--eval-every",
            "1",
            "--val-size",
            "2",
            "--checkpoint-every",
            "1",
            "--export-merged",
            "--out",
            str(out),
        ]
    )
    assert ft.returncode == 0, ft.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["trainable_params"] == 460_800  # 30 layers x (q: 576x8 + 8x576, v: 576x8 + 8x192)
    assert 0 <= res["base_accuracy"] <= 1 and 0 <= res["lora_accuracy"] <= 1 and res["eval_examples"] == 4
    assert res["adapter_bytes"] < 3 * 2**20
    assert "base model accuracy on 4 test reviews" in ft.stdout and "adapter:" in ft.stdout
    assert (out / "loss.png").stat().st_size > 1000 and (out / "merged" / "merged.safetensors").is_file()
    kinds = [json.loads(l)["kind"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert kinds == ["train", "eval", "train"]


def test_check_resume_refuses_other_settings(tmp_path):
    """The resume check on its own: no checkpoint, a matching one, one of other trajectory settings."""
    import dataclasses

    import jax.numpy as jnp

    from lora_jax import checkpoint
    from lora_jax.train import resume
    from lora_jax.train.config import TrainConfig

    cfg = TrainConfig(model="tiny-llama", steps=4, lr=1e-2)
    ckpt = checkpoint.TrainCheckpointer(tmp_path / "checkpoints", every=1)
    try:
        assert resume.check_resume(ckpt, cfg) is False
        ckpt.save(2, {"w": jnp.zeros(3)}, {"config": dataclasses.asdict(cfg)})
        ckpt.wait()
        assert resume.check_resume(ckpt, cfg) is True
        assert resume.check_resume(ckpt, dataclasses.replace(cfg, out="elsewhere", progress=False)) is True
        with pytest.raises(
            ValueError,
            match=r"holds a run with other settings; nothing was restored or deleted\. "
            r"Differences \(checkpoint, now\): \{'lr': \(0\.01, 0\.005\)\}",
        ):
            resume.check_resume(ckpt, dataclasses.replace(cfg, lr=5e-3))
        # A quantized base is another trajectory (the deltas fit either base, so only this check sees it).
        with pytest.raises(ValueError, match=r"\{'quantize': \(None, 'nf4'\)\}"):
            resume.check_resume(ckpt, dataclasses.replace(cfg, quantize="nf4"))
        old = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "quantize"}  # saved before the field
        ckpt.save(3, {"w": jnp.zeros(3)}, {"config": old})
        ckpt.wait()
        assert resume.check_resume(ckpt, cfg) is True
        assert ckpt.all_steps() == [2, 3]
    finally:
        ckpt.close()
