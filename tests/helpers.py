"""Small helpers shared by several test modules (import them: ``from helpers import nonzero``).

Importing this module initialises no JAX backend, so a worker script that must call
``jax.distributed.initialize`` first may import it too.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence

import flax.linen as nn
import jax


def nonzero(deltas, key=None):
    """Deltas with every factor random (a fresh delta has b = 0, which would hide errors in the low-rank
    path): each leaf ~ 0.3 · N(0, 1) in its own shape and dtype; ``key`` defaults to ``jax.random.key(7)``."""
    key = jax.random.key(7) if key is None else key
    leaves, tree = jax.tree_util.tree_flatten(deltas)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    )


def sub_jaxprs(params: Mapping) -> Iterator:
    """The jaxprs in an equation's params (scan, cond, jit, remat, custom_vjp bodies), open. Walks the
    params itself: `jax.extend.core.jaxprs_in_params` is not in every JAX the project supports."""
    for value in params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(sub, jax.extend.core.ClosedJaxpr):
                yield sub.jaxpr
            elif isinstance(sub, jax.extend.core.Jaxpr):
                yield sub


def all_eqns(jaxpr) -> Iterator:
    """Every equation of `jaxpr` and of the jaxprs inside its equations, depth first."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in sub_jaxprs(eqn.params):
            yield from all_eqns(sub)


class Block(nn.Module):
    """A residual block with two Dense kernels (``query``, ``value``), scanned by `Stack`."""

    @nn.compact
    def __call__(self, x, _):
        h = nn.Dense(x.shape[-1], name="query")(nn.LayerNorm()(x))
        return x + nn.Dense(x.shape[-1], name="value")(nn.gelu(h)), None


class Stack(nn.Module):
    """`layers` Blocks under ``nn.scan`` (kernels stacked ``(layers, d, d)``), optionally remat'ed."""

    layers: int = 3
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        block = nn.remat(Block) if self.remat else Block
        x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.layers)(
            name="layers"
        )(x, None)
        return x


# The `lora-jax` CLI with one second of sleep after each checkpoint save, patched in from outside (the
# product has no hook for it), so a test has time to kill the run between steps.
SLOW_CLI = [
    sys.executable,
    "-c",
    """
import sys, time
from lora_jax import checkpoint
from lora_jax.train import cli

save = checkpoint.TrainCheckpointer.save

def slow_save(self, *args, **kwargs):
  started = save(self, *args, **kwargs)
  time.sleep(1.0)
  return started

checkpoint.TrainCheckpointer.save = slow_save
sys.exit(cli.main(sys.argv[1:]))
""",
]

# Environment of CLI subprocesses for one persistent compilation cache per test module: a later run loads
# the programs an earlier run compiled (the same executables) instead of compiling them again. Filled by
# the `compilation_cache` fixture (tests/conftest.py) for the module that uses it; empty otherwise.
CACHE_ENV: dict[str, str] = {}


# --------------------------------------------------------------------------------------------------
# Child processes: CLI runs, worker scripts and several JAX processes on localhost (`jax.distributed`).
#
#     port = free_port()
#     outs = run_processes([[sys.executable, "-c", WORKER, str(port), str(i)] for i in range(2)], devices=4)
#     assert result(outs[0]) == {...}
#
# Each child runs on the CPU platform with `devices` simulated devices (set before JAX starts in it) and
# `CACHE_ENV`. Its stdout and stderr go to temporary files, not pipes: a child that prints a lot while it
# waits for its peer cannot block on a full pipe that nobody reads.


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a ``jax.distributed`` coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The suite compiles hundreds of small programs, and XLA's CPU backend spends most of their time in LLVM:
# without its optimisation passes they compile ~30% faster (conftest sets these for the test process too).
# What is compiled, and so every value checked, is the same HLO program; only the machine code is slower.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def child_env(devices: int = 1, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a child: the CPU platform with ``devices`` devices and
    `FAST_COMPILE_FLAGS`, `CACHE_ENV` (empty unless the module uses the ``compilation_cache`` fixture),
    then ``env`` on top."""
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE_FLAGS}",
        **CACHE_ENV,
        **(env or {}),
    }


class Child(subprocess.Popen):
    """A started child (a `subprocess.Popen`) whose stdout and stderr go to temporary files."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str]):
        self._logs = [tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") for _ in range(2)]
        super().__init__(
            [str(a) for a in argv], env=env, stdout=self._logs[0], stderr=self._logs[1], text=True
        )

    def output(self) -> tuple[str, str]:
        """(stdout, stderr) written so far."""
        texts = []
        for f in self._logs:
            f.seek(0)
            texts.append(f.read())
        return texts[0], texts[1]

    def describe(self, tail: int = 4000) -> str:
        """The command (long arguments such as a ``-c`` script shortened), its exit code and its stderr tail."""
        argv = " ".join(a if len(a) <= 80 else a[:40].strip() + " ..." for a in self.args)
        state = "still running" if self.returncode is None else f"exit code {self.returncode}"
        return f"`{argv}`: {state}; stderr tail:\n{self.output()[1][-tail:]}"


def spawn(argv: Sequence[str], *, devices: int = 1, env: Mapping[str, str] | None = None) -> Child:
    """Start ``argv`` with `child_env` (``devices``, ``env``). The caller kills it; `launched` does that."""
    return Child(argv, child_env(devices, env))


@contextlib.contextmanager
def launched(
    argvs: Sequence[Sequence[str]], *, devices: int = 1, env: Mapping[str, str] | None = None
) -> Iterator[list[Child]]:
    """Start one child per argv (`spawn`); on leaving, however that happens, kill those still running.

    For a child the test kills itself (a victim killed mid-run), or to watch children while they run;
    `run_processes` is the usual way to run them to the end.
    """
    children = []
    try:
        for argv in argvs:
            children.append(spawn(argv, devices=devices, env=env))
        yield children
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
            c.wait()
            for f in c._logs:
                f.close()


def run_processes(
    argvs: Sequence[Sequence[str]],
    *,
    devices: int = 1,
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
    tail: int = 4000,
) -> list[str]:
    """Run one child per argv at once (several JAX processes of one job) and return their stdouts in order.

    Every child must exit with code 0. As soon as one fails, the others are killed (peers would wait for
    it until their own timeouts) and an ``AssertionError`` shows each failed child's stderr tail (``tail``
    characters); after ``timeout`` seconds, the same with the children still running.
    """
    with launched(argvs, devices=devices, env=env) as children:
        deadline = time.monotonic() + timeout
        while None in (codes := [c.poll() for c in children]):  # poll every child, each time
            if any(code not in (None, 0) for code in codes) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        bad = [c for c in children if c.returncode != 0]
        if bad:
            what = "failed" if any(c.returncode is not None for c in bad) else f"timed out after {timeout} s"
            bad = [c for c in bad if c.returncode is not None] or bad
            raise AssertionError(
                f"{len(bad)} of {len(children)} processes {what}:\n"
                + "\n".join(c.describe(tail) for c in bad)
            )
        return [c.output()[0] for c in children]


def result_line(stdout: str) -> str | None:
    """The last line of ``stdout`` that starts with ``RESULT`` (how the workers report), or None."""
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT")]
    return lines[-1] if lines else None


def result(stdout: str):
    """The JSON value of the last ``RESULT <json>`` line of ``stdout``, or None if there is none."""
    line = result_line(stdout)
    return None if line is None else json.loads(line[len("RESULT") :])
