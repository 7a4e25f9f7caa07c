"""Nothing silently wrong, the quick checks: the run folder (lock, atomic files, metrics log, signals),
settings that cannot train, flag-free library errors, one-line CLI errors found before any model is
loaded, evaluation that refuses non-finite scores, and PEFT loads that refuse a partial cover.

The end-to-end runs (divergence, concurrent runs, kills, Ctrl-C, corrupted checkpoints) are in
``test_reliability_cli.py``.
"""

import functools
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lora_jax.train import cli, rundir
from lora_jax.train.config import TrainConfig

# ----------------------------------------------------------------------------------------------------
# The run folder


def _holder(folder, seconds=60):
    """A child process that holds `folder`'s lock; returns it once the lock is taken."""
    code = (
        f"import time; from lora_jax.train import rundir; lock = rundir.RunLock({str(folder)!r}).acquire(); "
        f"print('locked', flush=True); time.sleep({seconds})"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


def test_lock_refuses_a_live_holder_and_takes_over_from_a_dead_one(tmp_path):
    child = _holder(tmp_path)
    try:
        with pytest.raises(
            rundir.FolderInUse,
            match=rf"is in use by another run \(pid {child.pid} on .*\); wait "
            r"for it to finish, or write to another folder",
        ):
            rundir.RunLock(tmp_path).acquire()
        assert json.loads((tmp_path / rundir.LOCK_FILE).read_text())["pid"] == child.pid
    finally:
        child.kill()  # kill -9: the lock file stays, naming a dead pid
        child.wait()
    assert json.loads((tmp_path / rundir.LOCK_FILE).read_text())["pid"] == child.pid
    with rundir.RunLock(tmp_path) as lock:  # the kernel released the dead holder's lock: taken over
        assert lock.held
        assert json.loads((tmp_path / rundir.LOCK_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(rundir.FolderInUse, match=rf"pid {os.getpid()}"):  # one holder, even in-process
            rundir.RunLock(tmp_path).acquire()
    assert not (tmp_path / rundir.LOCK_FILE).exists()  # released: removed


def test_lock_without_flock_uses_the_pid(tmp_path, monkeypatch):
    """Where the file system has no flock, the pid in the lock file decides (a dead pid is taken over)."""
    monkeypatch.setattr(rundir, "_try_flock", lambda fd: None)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / rundir.LOCK_FILE).write_text(json.dumps({"pid": dead.pid}))
    with rundir.RunLock(tmp_path):
        pass
    (tmp_path / rundir.LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "started": "earlier"}))
    with pytest.raises(rundir.FolderInUse, match=rf"pid {os.getppid()}, started earlier"):
        rundir.RunLock(tmp_path).acquire()


def test_check_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    assert rundir.check_folder(tmp_path / "new" / "run") == (tmp_path / "new" / "run").absolute()
    assert not (tmp_path / "new").exists()  # nothing created
    with pytest.raises(ValueError, match=r"'.*file' is a file, not a folder"):
        rundir.check_folder(tmp_path / "file")
    with pytest.raises(ValueError, match=r"'.*file/run' cannot be created: '.*file' is a file, not a folder"):
        rundir.check_folder(tmp_path / "file" / "run")
    with pytest.raises(ValueError, match=r"empty string"):
        rundir.check_folder("")
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o555)
        with pytest.raises(ValueError, match=r"is not writable: its parent '.*ro' does not allow"):
            rundir.check_folder(tmp_path / "ro" / "run")


def test_atomic_path_keeps_the_old_file_on_failure(tmp_path):
    p = tmp_path / "results.json"
    rundir.write_atomic(p, "old\n")
    with pytest.raises(RuntimeError, match="killed"):
        with rundir.atomic_path(p) as tmp:
            tmp.write_text("half of the n")
            raise RuntimeError("killed")
    assert p.read_text() == "old\n"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["results.json"]  # no temporary left
    rundir.write_atomic(p, b"new\n")
    assert p.read_text() == "new\n"
    # A temporary left by a killed writer is removed by the next run (which holds the lock).
    stale = tmp_path / ".loss.png.12345.tmp.png"
    stale.write_bytes(b"\x89PNG half")
    assert rundir.remove_stale_temporaries(tmp_path) == [stale]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["results.json"]


def test_metrics_partial_last_line_and_trim(tmp_path):
    p = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"kind": "train", "step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    p.write_text("\n".join(lines) + "\n" + lines[0][:17])  # a kill in the middle of the 6th line
    assert [r["step"] for r in rundir.read_metrics(p)] == [1, 2, 3, 4, 5]
    assert rundir.trim_metrics(p, 3) == 2
    assert p.read_text() == "\n".join(lines[:3]) + "\n"
    # A damaged line elsewhere is skipped with a warning naming it.
    p.write_text(lines[0] + "\n{garbage\n" + lines[1] + "\n")
    with pytest.warns(UserWarning, match=r"metrics.jsonl' line 2 is not a JSON record; skipped"):
        assert [r["step"] for r in rundir.read_metrics(p)] == [1, 2]
    assert rundir.read_metrics(tmp_path / "none.jsonl") == []
    assert rundir.trim_metrics(tmp_path / "none.jsonl", 3) == 0


def test_stop_signals():
    previous = signal.getsignal(signal.SIGINT)
    with rundir.StopSignals(announce=False) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop.signum == signal.SIGINT  # no KeyboardInterrupt: the loop saves, then stops
        with pytest.raises(rundir.Interrupted, match="interrupted by SIGINT"):  # the second one stops at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is previous
    e = rundir.Interrupted(signal.SIGTERM, 7, "/runs/a/checkpoints")
    assert isinstance(e, KeyboardInterrupt) and e.step == 7
    assert str(e) == "interrupted by SIGTERM: checkpoint of step 7 saved in /runs/a/checkpoints"


# ----------------------------------------------------------------------------------------------------
# Settings that cannot train, and library errors without CLI flags


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": math.nan}, r"--lr must be a finite number, got nan"),
        ({"lr": math.inf}, r"--lr must be a finite number, got inf"),
        ({"lr": 0.0}, r"--lr must be in \(0, 1\]"),
        ({"lr": -1e-2}, r"--lr must be in \(0, 1\] .* got -0\.01"),
        ({"lr": 1e3}, r"--lr must be in \(0, 1\] .* got 1000\.0"),
        ({"alpha": 0.0}, r"--alpha must be > 0 \(the LoRA scale is alpha / rank; 0 trains nothing\)"),
        ({"alpha": math.nan}, r"--alpha must be a finite number, got nan"),
        ({"alpha": math.inf}, r"--alpha must be a finite number, got inf"),
        ({"weight_decay": -0.1}, r"--weight-decay must be >= 0, got -0\.1"),
        ({"weight_decay": math.nan}, r"--weight-decay must be a finite number"),
        ({"weight_decay": 5000.0}, r"--weight-decay 5000\.0 times --lr 0\.001 must be < 1"),
        ({"dropout": 1.0}, r"--dropout must be in \[0, 1\), got 1\.0"),
        ({"dropout": -0.5}, r"--dropout must be in \[0, 1\)"),
        ({"seed": -1}, r"--seed must be in \[0, 2\*\*32\)"),
        ({"seed": 2**32}, r"--seed must be in \[0, 2\*\*32\)"),
        ({"dtype": "int8"}, r"--dtype must be one of float32, bfloat16, float16, got 'int8'"),
        ({"prompt": "no review here"}, r"--prompt must contain \{text\}"),
        (
            {"prompt": "{review}: {text}"},
            r"--prompt '\{review\}: \{text\}' is not a template with only \{text\}",
        ),
        ({"targets": "(query"}, r"--targets '\(query' is not a regular expression"),
        ({"out": " "}, r"--out must name a folder"),
        ({"resume_from": 0}, r"--resume-from must be a saved step \(>= 1\), got 0"),
        ({"num_processes": 0}, r"--num-processes must be >= 1"),
        ({"process_id": 2, "num_processes": 2}, r"--process-id must be in \[0, --num-processes\)"),
        ({"steps": 0}, r"--steps must be >= 1, got 0"),
        ({"batch": 6, "grad_accum": 4}, r"--batch 6 must be a multiple of --grad-accum 4"),
    ],
)
def test_config_refuses_numbers_that_cannot_train(kwargs, message):
    with pytest.raises(ValueError, match=r"invalid training config: .*" + message):
        TrainConfig(model="tiny-llama", **kwargs)


def test_config_lists_every_problem_at_once():
    with pytest.raises(ValueError, match=r"--lr must be a finite number, got nan; --alpha must be > 0"):
        TrainConfig(model="tiny-llama", lr=math.nan, alpha=0.0)


def test_mesh_errors_name_no_flag():
    from lora_jax.train import mesh as mesh_lib

    for text, message in [
        ("data=x", r"^mesh 'data=x': expected comma-separated 'axis=size'"),
        ("data=2,data=1", r"^mesh 'data=2,data=1': axis 'data' given twice"),
        ("data=-1,fsdp=-1", r"^mesh 'data=-1,fsdp=-1': sizes must be positive"),
        ("data=3", r"^mesh 'data=3': it has 3 devices but 8 are available"),
    ]:
        with pytest.raises(ValueError, match=message) as e:
            mesh_lib.parse_mesh(text, 8)
        assert "--" not in str(e.value)
    assert mesh_lib.parse_mesh("data=-1,fsdp=2", None) == {"data": -1, "fsdp": 2, "tensor": 1}  # syntax only
    with pytest.raises(ValueError, match=r"^num_processes=2 needs a coordinator address 'host:port'\.$"):
        mesh_lib.init_distributed(None, 2, None)
    with pytest.raises(ValueError, match=r"^coordinator 'nohost': expected 'host:port'"):
        mesh_lib.init_distributed("nohost", 2, 0)
    with pytest.raises(ValueError, match=r"^a coordinator address needs num_processes and process_id too\.$"):
        mesh_lib.init_distributed("localhost:1234", None, None)
    with pytest.raises(ValueError, match=r"^process_id=3 must be in \[0, num_processes=2\)\.$"):
        mesh_lib.init_distributed("localhost:1234", 2, 3)


def test_check_model(tmp_path):
    from lora_jax.train import loop

    loop.check_model("tiny-llama")
    loop.check_model("smollm2-135m")
    with pytest.raises(
        ValueError,
        match=r"--model 'minilm' is a bert model: lora-jax finetune/eval/generate train "
        r"and score causal language models of the llama/mistral/qwen2/qwen3.* family",
    ):
        loop.check_model("minilm")
    with pytest.raises(
        ValueError, match=r"--model 'nosuch': no such model or folder; use smollm2-135m, tiny-llama"
    ):
        loop.check_model("nosuch")
    with pytest.raises(ValueError, match=r"has no config.json: not a Hugging Face model folder"):
        loop.check_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"is a gpt2 model"):
        loop.check_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ValueError, match=r"is a 't5' model, which lora_jax has no model family for"):
        loop.check_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"its config.json cannot be read"):
        loop.check_model(str(tmp_path))


# ----------------------------------------------------------------------------------------------------
# The CLI: one line, exit code 2, before any model is loaded


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model (or a data set) fails the test: every error here must come before."""
    from lora_jax.train import loop

    def refuse(*args, **kwargs):
        raise AssertionError("a model or data set was loaded before the error")

    monkeypatch.setattr(loop, "load_model", refuse)
    monkeypatch.setattr(loop, "load_task", refuse)


def _cli(argv, capsys):
    code = cli.main(argv)
    err = capsys.readouterr().err
    return code, err


TINY = [
    "finetune",
    "--model",
    "tiny-llama",
    "--steps",
    "10",
    "--batch",
    "4",
    "--warmup",
    "2",
    "--no-progress",
]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["finetune", "--lr", "-1e-2"], r"--lr must be in \(0, 1\] .* got -0\.01"),
        (["finetune", "--lr", "-inf"], r"--lr must be a finite number, got -inf"),
        (["finetune", "--lr", "nan"], r"--lr must be a finite number, got nan"),
        (["finetune", "--alpha", "-1"], r"--alpha must be > 0"),
        (["finetune", "--weight-decay", "-1e-4"], r"--weight-decay must be >= 0, got -0\.0001"),
        (["finetune", "--seed", "-5"], r"--seed must be in \[0, 2\*\*32\)"),
        (
            ["finetune", "--seed", "1.5"],
            r"argument --seed: invalid int value: '1\.5' \(see 'lora-jax finetune --help'\)",
        ),
        (["finetune", "--dtype", "float64"], r"--dtype must be one of float32, bfloat16, float16"),
        (["finetune", "--steps", "ten"], r"argument --steps: invalid int value: 'ten'"),
        (["finetune", "--lr"], r"argument --lr: expected one argument"),
        (["finetune", "--no-such-flag"], r"unrecognized arguments: --no-such-flag"),
        (
            ["finetune", "--step-sleep", "1"],
            r"unrecognized arguments: --step-sleep 1",
        ),  # the testing hook is gone
        ([], r"the following arguments are required: command"),
        (["finetune", "--model", "minilm"], r"--model 'minilm' is a bert model"),
        (["finetune", "--model", "no/such/folder"], r"--model 'no/such/folder': no such model or folder"),
        (["finetune", "--mesh", "data=two"], r"^--mesh 'data=two': expected comma-separated 'axis=size'"),
        (["finetune", "--mesh", "data=3"], r"^--mesh 'data=3': it has 3 devices but \d+ are available"),
        (["finetune", "--num-processes", "2"], r"--num-processes 2 needs --coordinator host:port"),
        (
            ["finetune", "--coordinator", "localhost:1234"],
            r"--coordinator needs --num-processes and --process-id",
        ),
        (
            ["finetune", "--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"],
            r"--coordinator 'nohost' --num-processes 2 --process-id 0: coordinator 'nohost': expected 'host:port'",
        ),
        (["finetune", "--process-id", "-1"], r"--process-id must be in \[0, --num-processes\)"),
        (["finetune", "--prompt", "Sentiment:"], r"--prompt must contain \{text\}"),
        (["finetune", "--targets", "*kernel"], r"--targets '\*kernel' is not a regular expression"),
        (["finetune", "--dropout", "1"], r"--dropout must be in \[0, 1\)"),
        (["finetune", "--resume-from", "-3"], r"--resume-from must be a saved step"),
        (
            ["finetune", "--batch", "5", "--grad-accum", "2"],
            r"--batch 5 must be a multiple of --grad-accum 2",
        ),
        (
            ["eval", "--adapter", "x", "--eval-size", "0"],
            r"--eval-size must be >= 1 \(leave it out to score the whole",
        ),
        (["eval", "--adapter", "x", "--eval-size", "-8"], r"--eval-size must be >= 1"),
        (["eval", "--adapter", "x", "--eval-batch", "0"], r"--eval-batch must be >= 1"),
        (
            ["eval", "--adapter", "no/such/adapter"],
            r"adapter file not found: 'no/such/adapter/adapter.safetensors'",
        ),
        (["eval", "--adapter", "x", "--split", "dev"], r"argument --split: invalid choice: 'dev'"),
        (["generate", "--adapter", "x", "--prompt", ""], r"--prompt is empty: give the text to continue"),
        (
            ["generate", "--adapter", "x", "--prompt", "hi", "--max-new-tokens", "0"],
            r"--max-new-tokens must be >= 1",
        ),
        (
            ["generate", "--adapter", "x", "--prompt", "hi", "--temperature", "-1"],
            r"--temperature must be a finite",
        ),
        (
            ["generate", "--adapter", "x", "--prompt", "hi", "--temperature", "nan"],
            r"--temperature must be a finite",
        ),
        (
            ["generate", "--adapter", "x", "--prompt", "hi", "--seed", "-1"],
            r"--seed must be in \[0, 2\*\*32\)",
        ),
        (
            ["generate", "--adapter", "x"],
            r"--prompt is empty: give the text to continue \(or --prompts FILE.jsonl\)",
        ),
    ],
)
def test_cli_errors_are_one_line(argv, message, capsys, no_model, tmp_path):
    if argv[:1] == ["finetune"]:
        argv = argv + ["--out", str(tmp_path / "run")]
    code, err = _cli(argv, capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("lora-jax: error: "), err
    assert "Traceback" not in err
    assert __import__("re").search(message, err[len("lora-jax: error: ") :]), err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_cli_unusable_out(capsys, no_model, tmp_path):
    (tmp_path / "file").write_text("x")
    code, err = _cli(TINY + ["--out", str(tmp_path / "file")], capsys)
    assert (
        code == 2 and err == f"lora-jax: error: --out: {str(tmp_path / 'file')!r} is a file, not a folder.\n"
    )
    code, err = _cli(TINY + ["--out", str(tmp_path / "file" / "run")], capsys)
    assert code == 2 and f"--out: {str(tmp_path / 'file' / 'run')!r} cannot be created: " in err
    code, err = _cli(TINY + ["--out", ""], capsys)
    assert code == 2 and "--out must name a folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_cli_checks_against_the_folder_before_loading(capsys, no_model, tmp_path):
    """Errors that need the mesh or the folder: still before the model, and the folder is left usable."""
    code, err = _cli(TINY + ["--warmup", "10", "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and "--warmup 10 is not shorter than the run (--steps 10)" in err
    code, err = _cli(TINY + ["--resume-from", "4", "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and "--resume-from 4: there is no checkpoint of step 4 in" in err
    assert not (tmp_path / "a" / rundir.LOCK_FILE).exists()  # released
    with rundir.RunLock(tmp_path / "a"):
        code, err = _cli(TINY + ["--out", str(tmp_path / "a")], capsys)
    assert code == 2 and f"is in use by another run (pid {os.getpid()} on " in err


def test_cli_debug_shows_the_traceback(capsys, no_model, tmp_path):
    code, err = _cli(["finetune", "--lr", "nan", "--debug", "--out", str(tmp_path)], capsys)
    assert code == 2 and err.startswith("Traceback (most recent call last):")
    assert (
        err.splitlines()[-1]
        == "lora-jax: error: invalid training config: --lr must be a finite number, got nan"
    )


def test_cli_lr_nan_writes_nothing(tmp_path):
    """``--lr nan`` never reaches step 1: refused before JAX starts, in a real process, nothing written."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_jax.train.cli",
            "finetune",
            "--model",
            "tiny-llama",
            "--lr",
            "nan",
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr == "lora-jax: error: invalid training config: --lr must be a finite number, got nan\n"
    assert not out.exists()


def test_join_negative_values():
    assert cli._join_negative_values(["finetune", "--lr", "-1e-2", "--seed", "-3", "--prompt", "-x-"]) == [
        "finetune",
        "--lr=-1e-2",
        "--seed=-3",
        "--prompt",
        "-x-",
    ]


# ----------------------------------------------------------------------------------------------------
# Evaluation refuses non-finite scores


def test_evaluate_refuses_nan_logits():
    import jax
    import jax.numpy as jnp

    from lora_jax.train import engine, sentiment
    from lora_jax.train import mesh as mesh_lib

    mesh = mesh_lib.make_mesh("data=-1,fsdp=1,tensor=1", devices=jax.devices()[:1])
    n = 6
    arrays = {
        "input_ids": np.zeros((n, 8), np.int32),
        "attention_mask": np.ones((n, 8), np.int32),
        "prompt_len": np.full((n,), 4, np.int32),
        "labels": np.arange(n, dtype=np.int32) % 2,
    }

    def score(nan_rows):
        def step(deltas, params, batch):
            logp = jnp.zeros((batch["input_ids"].shape[0], 2)).at[:nan_rows].set(jnp.nan)
            valid = batch["valid"].astype(jnp.float32)
            return {"correct": jnp.sum(valid * 0.0), "count": jnp.sum(valid), "logprobs": logp}

        return step

    def setup(nan_rows):
        return engine.Setup(
            model=None,
            mesh=mesh,
            spec=None,
            params={},
            deltas={},
            opt_state=None,
            tx=None,
            schedule=None,
            shardings={"eval_batch": mesh_lib.batch_sharding(mesh)},
            train_step=None,
            score_step=score(nan_rows),
        )

    assert sentiment.evaluate(setup(0), {}, arrays, 4) == 0.0
    with pytest.raises(
        ValueError,
        match=r"evaluation: the model's log-probabilities of the label words are not "
        r"finite \(NaN or inf\) for 2 of 4 examples of a batch.*Refusing to score",
    ):
        sentiment.evaluate(setup(2), {}, arrays, 4)


# ----------------------------------------------------------------------------------------------------
# PEFT: partial loads, config errors, atomic save


@functools.cache
def _llama_vars(layers, scan):
    """The variables of a small Llama as shapes only (``jax.ShapeDtypeStruct``: all a load checks)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from lora_jax.models import llama

    m = llama.Llama(
        llama.LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_layers=layers,
            num_heads=4,
            num_kv_heads=2,
            scan_layers=scan,
        )
    )
    return nn.unbox(jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))


@pytest.fixture(scope="module")
def peft_two_layers(tmp_path_factory):
    import jax

    import lora_jax as lj
    from lora_jax import peft as lpeft

    folder = tmp_path_factory.mktemp("peft") / "two_layers"
    spec = lj.LoraSpec(rank=2, targets=r".*/attn/(query|value)/kernel")
    deltas = jax.jit(lambda k: lj.init(k, _llama_vars(2, False), spec))(jax.random.key(1))
    lpeft.save_peft(folder, deltas, "llama")
    return folder


def test_peft_two_layers_into_three_is_refused(peft_two_layers):
    import jax

    from lora_jax import peft as lpeft
    from lora_jax.delta import is_delta

    three = _llama_vars(3, False)
    with pytest.raises(
        ValueError,
        match=r"PEFT adapter '.*two_layers' leaves 2 parameter\(s\) that it targets in "
        r"this model without a delta: params/layers_2/attn/query/kernel, "
        r"params/layers_2/attn/value/kernel\..*allow_partial=True",
    ):
        lpeft.load_peft(peft_two_layers, three, "llama")
    deltas = lpeft.load_peft(peft_two_layers, three, "llama", allow_partial=True)
    assert deltas["params"]["layers_2"]["attn"]["query"]["kernel"] is None
    assert is_delta(deltas["params"]["layers_1"]["attn"]["query"]["kernel"])
    for allow in (False, True):  # a scan stack is one parameter: no partial load into it
        with pytest.raises(
            ValueError,
            match=r"covers only 2 of the 3 layers of the stacked kernel "
            r"params/layers/attn/query/kernel, leaving 1 without a delta "
            r"\(model.layers.2.self_attn.q_proj\).*scan_layers=False",
        ):
            lpeft.load_peft(peft_two_layers, _llama_vars(3, True), "llama", allow_partial=allow)
    made_for = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), _llama_vars(2, True))
    assert lpeft.load_peft(peft_two_layers, made_for, "llama") is not None  # the model it was made for


def test_peft_layers_to_transform_is_a_full_cover(peft_two_layers, tmp_path):
    """An adapter that says which layers it adapts (PEFT's layers_to_transform) covers what it targets."""
    import shutil

    from lora_jax import peft as lpeft

    folder = tmp_path / "a"
    shutil.copytree(peft_two_layers, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "layers_to_transform": [0, 1]}))
    deltas = lpeft.load_peft(folder, _llama_vars(3, False), "llama")
    assert deltas["params"]["layers_2"]["attn"]["query"]["kernel"] is None


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda c: "{not json",
            r"adapter_config.json: not valid JSON \(Expecting property name enclosed in double "
            r"quotes, line 1 column 2\)",
        ),
        (lambda c: "", r"adapter_config.json: not valid JSON"),
        (
            lambda c: "[1, 2]",
            r"adapter_config.json: expected a JSON object \(PEFT's LoraConfig\), found a JSON list",
        ),
        (
            lambda c: json.dumps({k: v for k, v in c.items() if k != "r"}),
            r"adapter_config.json: the field 'r' is missing",
        ),
        (
            lambda c: json.dumps({k: v for k, v in c.items() if k not in ("r", "lora_alpha")}),
            r"the field 'r' is missing; the field 'lora_alpha' is missing\. Nothing was loaded",
        ),
        (lambda c: json.dumps({**c, "r": "4"}), r"'r' must be a positive integer, found '4'"),
        (lambda c: json.dumps({**c, "r": 0}), r"'r' must be a positive integer, found 0"),
        (
            lambda c: json.dumps({**c, "lora_alpha": None}),
            r"'lora_alpha' must be a finite number, found None",
        ),
        (lambda c: json.dumps({**c, "lora_dropout": 2}), r"'lora_dropout' must be a number in \[0, 1\)"),
        (
            lambda c: json.dumps({**c, "target_modules": 3}),
            r"'target_modules' must be a list of module names",
        ),
        (lambda c: json.dumps({**c, "rank_pattern": [1]}), r"'rank_pattern' must be an object"),
    ],
)
def test_peft_config_errors_name_the_file_and_field(peft_two_layers, tmp_path, edit, message):
    import shutil

    from lora_jax import peft as lpeft

    folder = tmp_path / "a"
    shutil.copytree(peft_two_layers, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(edit(cfg))
    with pytest.raises(ValueError, match=message):
        lpeft.load_peft(folder, _llama_vars(2, False), "llama")


def test_save_peft_is_atomic(peft_two_layers, tmp_path, monkeypatch):
    import shutil

    import jax

    import lora_jax as lj
    from lora_jax import peft as lpeft

    folder = tmp_path / "a"
    shutil.copytree(peft_two_layers, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    spec = lj.LoraSpec(rank=4, targets=r".*/attn/query/kernel")
    deltas = jax.jit(lambda k: lj.init(k, _llama_vars(2, False), spec))(jax.random.key(7))

    def killed(path, *args):
        raise RuntimeError("killed while renaming")

    monkeypatch.setattr(lpeft.os, "replace", killed)
    with pytest.raises(RuntimeError, match="killed while renaming"):
        lpeft.save_peft(folder, deltas, "llama")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # old files whole, no temporaries
    monkeypatch.undo()
    lpeft.save_peft(folder, deltas, "llama")
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


# ----------------------------------------------------------------------------------------------------
# API edges: swapped arguments, dict against FrozenDict


def test_init_with_swapped_arguments_says_so():
    import jax
    import jax.numpy as jnp

    import lora_jax as lj

    params = {"dense": {"kernel": jnp.ones((16, 8))}}
    spec = lj.LoraSpec(rank=2, targets=".*/kernel")
    key = jax.random.key(0)
    for args, kinds in [
        ((key, spec, params), "key is a PRNG key, params a LoraSpec, spec a dict"),
        ((params, key, spec), "key is a dict, params a PRNG key, spec a LoraSpec"),
        ((spec, params, key), "key is a LoraSpec, params a dict, spec a PRNG key"),
    ]:
        with pytest.raises(
            TypeError,
            match=rf"lj.init\(key, params, spec\): the arguments are in the wrong order "
            rf"\({kinds}\)\. Call lj.init\(jax.random.key\(0\), params, ",
        ):
            lj.init(*args)
    with pytest.raises(TypeError, match=r"lj.init: spec must be a LoraSpec, found a dict"):
        lj.init(key, params, {"rank": 2})
    with pytest.raises(
        TypeError, match=r"lj.init: key must be a PRNG key \(jax.random.key\(seed\)\), found an int"
    ):
        lj.init(0, params, spec)
    assert lj.init(jax.random.PRNGKey(0), params, spec)["dense"]["kernel"].a.shape == (
        16,
        2,
    )  # raw keys still work


@pytest.mark.parametrize("frozen", ["params", "deltas", "nested"])
def test_dict_deltas_against_frozendict_params(frozen):
    import jax
    import jax.numpy as jnp
    from flax.core import freeze

    import lora_jax as lj

    params = {"dense": {"kernel": jnp.ones((16, 8))}}
    deltas = lj.init(jax.random.key(0), params, lj.LoraSpec(rank=2, targets=".*/kernel"))
    if frozen == "params":
        params, where, p_type, d_type = freeze(params), "at the top", "FrozenDict", "dict"
    elif frozen == "deltas":
        deltas, where, p_type, d_type = freeze(deltas), "at the top", "dict", "FrozenDict"
    else:
        params, deltas = {"params": freeze(params)}, {"params": deltas}
        where, p_type, d_type = "at 'params'", "FrozenDict", "dict"
    message = (
        rf"deltas do not have the structure of params: they hold the same keys, but {where} params are a "
        rf"{p_type} and deltas a {d_type}\. Build the deltas from these very params"
    )
    apply = lambda p, x: x @ jax.tree_util.tree_leaves(p)[0]  # noqa: E731
    with pytest.raises(ValueError, match=message) as e:
        lj.merge(params, deltas)
    assert "Array(" not in str(e.value)  # no dump of arrays
    with pytest.raises(ValueError, match=message):
        lj.wrap(apply)(params, deltas, jnp.ones((1, 16)))
