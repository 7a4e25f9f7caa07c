"""Train-state checkpoints: exact round trips, metadata, and clear errors that delete nothing.

The adapter files (`lora_jax.adapter`, re-exported by `lora_jax.checkpoint`) are tested in test_adapter.py.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import checkpoint
from lora_jax.train import loop


@pytest.fixture(scope="module")
def tiny():
  model, variables = loop.tiny_llama(128, scan_layers=False)
  spec = lj.LoraSpec(rank=4, alpha=8.0, targets=r".*/attn/(query|value)/kernel")
  deltas = lj.init(jax.random.key(0), variables, spec)
  # Nonzero b so the round trip checks both factors.
  deltas = jax.tree_util.tree_map(lambda x: x + 0.01 * jnp.arange(x.size, dtype=x.dtype).reshape(x.shape) / x.size,
                                  deltas)
  return model, variables, spec, deltas


def _same(x, y):
  lx, ly = jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)
  return len(lx) == len(ly) and all(np.array_equal(a, b) for a, b in zip(lx, ly))


def test_train_state_exact_round_trip_and_keep(tiny, tmp_path):
  _, _, _, deltas = tiny
  tx = lj.optimizer(__import__("optax").adam(1e-3))
  state = {"deltas": deltas, "opt_state": tx.init(deltas)}
  ckpt = checkpoint.TrainCheckpointer(tmp_path, every=2, keep=2)
  for step in range(1, 7):
    ckpt.save(step, state, {"data_position": step})
  ckpt.wait()
  assert ckpt.all_steps() == [4, 6]
  back, meta = ckpt.restore(jax.tree_util.tree_map(jnp.zeros_like, state))
  assert meta["step"] == 6 and meta["data_position"] == 6
  assert _same(back, state)
  ckpt.close()


def test_mismatched_or_corrupted_train_checkpoint_deletes_nothing(tiny, tmp_path):
  _, variables, _, deltas = tiny
  ckpt = checkpoint.TrainCheckpointer(tmp_path, every=1, keep=3)
  ckpt.save(1, {"deltas": deltas}, {})
  ckpt.close()
  before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
  other = lj.init(jax.random.key(0), variables, lj.LoraSpec(rank=2, targets=r".*/attn/(query|value)/kernel"))
  ckpt = checkpoint.TrainCheckpointer(tmp_path, every=1, keep=3)
  with pytest.raises(ValueError, match=r"(?s)does not match this run.*params/layers_0/attn/query/kernel/a: expected "
                                       r"float32\(32, 2\), found float32\(32, 4\)"):
    ckpt.restore({"deltas": other})
  assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
  # Corrupt the array data: every file of the step's state item.
  for p in (tmp_path / "1" / "state").rglob("*"):
    if p.is_file() and p.stat().st_size > 0 and "metadata" not in p.name:
      p.write_bytes(b"\0garbage" * 4)
  before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
  with pytest.raises(ValueError, match=r"(?s)cannot be read \(corrupted or incomplete\?\).*Nothing was deleted"):
    ckpt.restore({"deltas": deltas})
  assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
  ckpt.close()


def test_metadata_reads_what_was_saved_without_the_arrays(tiny, tmp_path):
  _, _, _, deltas = tiny
  ckpt = checkpoint.TrainCheckpointer(tmp_path, every=1, keep=3)
  with pytest.raises(ValueError, match=r"no checkpoint in .*, so no metadata to read"):
    ckpt.metadata()
  ckpt.save(1, {"deltas": deltas}, {"data_position": 10, "config": {"lr": 0.01}})
  ckpt.save(2, {"deltas": deltas}, {"data_position": 20, "config": {"lr": 0.01}})
  ckpt.wait()
  meta = ckpt.metadata()  # the latest step
  assert meta["step"] == 2 and meta["data_position"] == 20 and meta["config"] == {"lr": 0.01}
  assert "deltas/params/layers_0/attn/query/kernel/a" in meta["paths"]
  assert len(meta["paths"]) == len(meta["leaves"]) == len(jax.tree_util.tree_leaves(deltas))
  assert ckpt.metadata(1)["data_position"] == 10
  assert ckpt.metadata(2) == ckpt.restore({"deltas": deltas})[1]
  with pytest.raises(ValueError, match=r"no checkpoint at step 7 in .*; the steps there are \[1, 2\]"):
    ckpt.metadata(7)
  ckpt.close()
  # Corrupt the JSON of the latest step: a clear error, nothing deleted.
  for p in (tmp_path / "2" / "meta").rglob("*"):
    if p.is_file():
      p.write_text("{not json")
  before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
  ckpt = checkpoint.TrainCheckpointer(tmp_path, every=1, keep=3)
  with pytest.raises(ValueError, match=r"(?s)checkpoint .*2' cannot be read \(corrupted or incomplete\?\).*"
                                       r"Nothing was deleted"):
    ckpt.metadata()
  assert ckpt.metadata(1)["step"] == 1
  assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
  ckpt.close()
