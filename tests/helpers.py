"""Small helpers shared by several test modules (import them: ``from helpers import nonzero``)."""

import sys

import flax.linen as nn
import jax


def nonzero(deltas, key=jax.random.key(7)):
    """Deltas with every factor random (a fresh delta has b = 0, which would hide errors in the low-rank
    path): each leaf ~ 0.3 · N(0, 1) in its own shape and dtype."""
    leaves, tree = jax.tree_util.tree_flatten(deltas)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    )


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
