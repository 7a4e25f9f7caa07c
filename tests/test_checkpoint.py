"""Train-state checkpoints: exact round trips, metadata, and clear errors that delete nothing.

The adapter files (`lora_jax.adapter`, re-exported by `lora_jax.checkpoint`) are tested in test_adapter.py.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import checkpoint
from lora_jax._checksums import json_crc32
from lora_jax.train import loop


@pytest.fixture(scope="module")
def tiny():
    model, variables = loop.tiny_llama(128, scan_layers=False)
    spec = lj.LoraSpec(rank=4, alpha=8.0, targets=r".*/attn/(query|value)/kernel")
    deltas = lj.init(jax.random.key(0), variables, spec)
    # Nonzero b so the round trip checks both factors.
    deltas = jax.tree_util.tree_map(
        lambda x: x + 0.01 * jnp.arange(x.size, dtype=x.dtype).reshape(x.shape) / x.size, deltas
    )
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
    other = lj.init(
        jax.random.key(0), variables, lj.LoraSpec(rank=2, targets=r".*/attn/(query|value)/kernel")
    )
    ckpt = checkpoint.TrainCheckpointer(tmp_path, every=1, keep=3)
    with pytest.raises(
        ValueError,
        match=r"(?s)does not match this run.*params/layers_0/attn/query/kernel/a: expected "
        r"float32\(32, 2\), found float32\(32, 4\)",
    ):
        ckpt.restore({"deltas": other})
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    # Corrupt the array data: every file of the step's state item.
    for p in (tmp_path / "1" / "state").rglob("*"):
        if p.is_file() and p.stat().st_size > 0 and "metadata" not in p.name:
            p.write_bytes(b"\0garbage" * 4)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(
        ValueError, match=r"(?s)cannot be read \(corrupted or incomplete\?\).*Nothing was deleted"
    ):
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
    with pytest.raises(
        ValueError,
        match=r"(?s)checkpoint .*2' cannot be read \(corrupted or incomplete\?\).*"
        r"Nothing was deleted",
    ):
        ckpt.metadata()
    assert ckpt.metadata(1)["step"] == 1
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    ckpt.close()


def _rewrite_meta(tmp_path, step, fn):
    """Rewrites the JSON metadata of `step` with `fn(meta)`, as a careless edit would (valid JSON)."""
    (file,) = [
        p
        for p in (tmp_path / str(step) / "meta").rglob("*")
        if p.is_file() and p.name != "commit_success.txt"
    ]
    file.write_text(json.dumps(fn(json.loads(file.read_text()))))


def _flip_in_largest_data_file(tmp_path, step):
    data = max(
        (p for p in (tmp_path / str(step) / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
        key=lambda p: p.stat().st_size,
    )
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 3] ^= 0x10
    data.write_bytes(bytes(raw))


def test_checksums_are_stored_and_verified_and_name_the_step_and_leaf(tmp_path):
    state = {"w": jax.random.normal(jax.random.key(0), (64, 64)), "count": jnp.int32(3)}
    ckpt = checkpoint.TrainCheckpointer(tmp_path, every=1, keep=3)
    ckpt.save(1, state, {"data_position": 1})
    ckpt.save(2, state, {"data_position": 2})
    ckpt.close()
    meta = ckpt.metadata(2)
    assert len(meta["crc32"]) == 2 and all(isinstance(c, int) for c in meta["crc32"])
    assert isinstance(meta["meta_crc32"], int)
    _flip_in_largest_data_file(tmp_path, 2)  # the array bytes: orbax alone restores them silently
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    ckpt = checkpoint.TrainCheckpointer(tmp_path, every=1, keep=3)
    with pytest.raises(
        ValueError,
        match=r"checkpoint '.*2' \(step 2\) is corrupted: 1 of 2 leaves do not match the "
        r"checksums saved with them: \['w'\]\. Nothing was restored or deleted; "
        r"restore an earlier step \(\[1\]\)",
    ):
        ckpt.restore(state)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    back, meta = ckpt.restore(state, step=1)  # an older step on purpose
    assert _same(back, state) and meta["step"] == 1
    ckpt.close()


def test_edited_metadata_is_refused(tmp_path):
    state = {"w": jnp.arange(4.0)}
    ckpt = checkpoint.TrainCheckpointer(tmp_path, every=1, keep=3)
    ckpt.save(1, state, {"data_position": 1})
    ckpt.save(2, state, {"data_position": 2})
    ckpt.close()
    _rewrite_meta(tmp_path, 2, lambda m: {**m, "data_position": 3})
    ckpt = checkpoint.TrainCheckpointer(tmp_path, every=1, keep=3)
    with pytest.raises(
        ValueError,
        match=r"checkpoint '.*2' \(step 2\) is corrupted: its metadata does not match its "
        r"checksum meta_crc32\. Nothing was deleted; restore an earlier step \(\[1\]\)",
    ):
        ckpt.metadata()
    with pytest.raises(
        ValueError, match=r"\(step 2\) is corrupted: its metadata does not match its checksum"
    ):
        ckpt.restore(state)
    # A checksum key lost without the other is corruption too, not "an old checkpoint".
    _rewrite_meta(tmp_path, 1, lambda m: {k: v for k, v in m.items() if k != "crc32"})
    with pytest.raises(
        ValueError, match=r"\(step 1\) is corrupted: its metadata does not match its checksum"
    ):
        ckpt.restore(state, step=1)
    ckpt.close()


def test_malformed_checksum_record_is_refused(tmp_path):
    state = {"w": jnp.arange(4.0)}
    ckpt = checkpoint.TrainCheckpointer(tmp_path, every=1)
    ckpt.save(1, state, {})
    ckpt.close()

    def edit(m):
        m = {**m, "crc32": ["x"]}
        return {**m, "meta_crc32": json_crc32(m, "meta_crc32")}  # a consistent record that is not one of ours

    _rewrite_meta(tmp_path, 1, edit)
    ckpt = checkpoint.TrainCheckpointer(tmp_path, every=1)
    with pytest.raises(
        ValueError,
        match=r"\(step 1\) is corrupted: its checksum record 'crc32' is missing or malformed. "
        r"Nothing was restored or deleted; there is no earlier checkpoint here",
    ):
        ckpt.restore(state)
    ckpt.close()


def test_checkpoint_without_checksums_restores_with_a_warning(tmp_path):
    state = {"w": jnp.arange(4.0)}
    ckpt = checkpoint.TrainCheckpointer(tmp_path, every=1)
    ckpt.save(1, state, {"data_position": 1})
    ckpt.close()
    # As an older lora_jax wrote it: no checksums at all.
    _rewrite_meta(tmp_path, 1, lambda m: {k: v for k, v in m.items() if k not in ("crc32", "meta_crc32")})
    ckpt = checkpoint.TrainCheckpointer(tmp_path, every=1)
    with pytest.warns(
        UserWarning,
        match=r"was written without checksums \(an older lora_jax\): its arrays are "
        r"restored unverified",
    ):
        back, meta = ckpt.restore(state)
    assert _same(back, state) and meta["data_position"] == 1
    ckpt.close()


def test_resume_from_an_older_step_sets_the_newer_ones_aside(tmp_path):
    state = {"w": jax.random.normal(jax.random.key(0), (64, 64))}
    ckpt = checkpoint.TrainCheckpointer(tmp_path, every=1, keep=5)
    for step in range(1, 5):
        ckpt.save(step, jax.tree_util.tree_map(lambda x, s=step: x + s, state), {"data_position": step})
    ckpt.wait()
    _flip_in_largest_data_file(tmp_path, 4)
    with pytest.raises(
        ValueError,
        match=r"\(step 4\) is corrupted.*restore an earlier step \(\[1, 2, 3\]\) with "
        r"restore\(\.\.\., step=\.\.\.\), after set_aside_after\(step\)",
    ):
        ckpt.restore(state)
    back, meta = ckpt.restore(state, step=2)
    assert meta["step"] == 2 and _same(back, jax.tree_util.tree_map(lambda x: x + 2, state))
    moved = ckpt.set_aside_after(2)
    assert moved == [tmp_path / "set_aside" / "3", tmp_path / "set_aside" / "4"]
    assert all((p / "state").is_dir() for p in moved)  # set aside, not deleted
    assert ckpt.all_steps() == [1, 2] and ckpt.latest_step() == 2
    assert ckpt.save(3, state, {"data_position": 3})  # not skipped as "older than the latest"
    ckpt.wait()
    assert ckpt.all_steps() == [1, 2, 3]
    assert ckpt.set_aside_after(2) == [tmp_path / "set_aside" / "3.1"]  # a second time: nothing overwritten
    ckpt.close()
    ckpt = checkpoint.TrainCheckpointer(tmp_path, every=1, keep=5)
    assert ckpt.all_steps() == [1, 2]  # the set-aside folder is not taken for a checkpoint
    ckpt.close()


def test_bad_steps_and_meta_are_clear_errors(tmp_path):
    state = {"w": jnp.arange(4.0)}
    ckpt = checkpoint.TrainCheckpointer(tmp_path, every=1)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint in "):
        ckpt.restore(state)
    ckpt.save(1, state, {})
    ckpt.save(3, state, {})
    ckpt.wait()
    with pytest.raises(ValueError, match=r"no checkpoint at step 2 in .*; the steps there are \[1, 3\]"):
        ckpt.restore(state, step=2)
    with pytest.raises(ValueError, match=r"no checkpoint at step 2 in .*; the steps there are \[1, 3\]"):
        ckpt.set_aside_after(2)
    with pytest.raises(ValueError, match=r"step must be a non-negative int, found '3'"):
        ckpt.restore(state, step="3")
    with pytest.raises(TypeError, match=r"TrainCheckpointer.save: meta must be JSON-able"):
        ckpt.save(4, state, {"when": object()})
    assert ckpt.all_steps() == [1, 3]
    ckpt.close()
