"""Flipped bits in saved files: a training checkpoint or an adapter with a flipped bit is refused, never
restored as a silently wrong value.

Each test walks every file that was written and flips one bit at many offsets of each (12 to 48 per
file). A flip may land in bytes that orbax / tensorstore never read back (``commit_success.txt``, the
per-process OCDBT tree nodes that the merged tree replaced, ...): then the restored values are
bit-identical, which is fine. Any other flip must raise a ``ValueError``: tensorstore's own CRC-32C on the
OCDBT tree nodes, a JSON or zstd decoding error, or the CRC32 checksums that lora_jax stores (orbax does
not checksum the array data, which sits in the data files next to the tree nodes). Run with ``-s`` to see
the counts per file.
"""

import collections
import logging
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import free_port, result_line, run_processes

import lora_jax as lj
from lora_jax import adapter, checkpoint

FLIPS_PER_FILE = 12  # at least; one per 256 bytes in larger files, up to 48


def _offsets(size: int) -> list[int]:
    n = min(48, max(FLIPS_PER_FILE, size // 256))
    return sorted(set(np.linspace(0, size - 1, n).astype(int).tolist()))


def _flip(raw: bytes, offset: int) -> bytes:
    bad = bytearray(raw)
    bad[offset] ^= 1 << (offset % 8)  # a different bit at each offset
    return bytes(bad)


def _tree(root: pathlib.Path) -> list:
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*") if p.is_file())


def _same(x, y) -> bool:
    lx, ly = jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)
    return len(lx) == len(ly) and all(np.array_equal(a, b) for a, b in zip(lx, ly, strict=True))


SPEC = lj.LoraSpec(rank=8, alpha=16.0, targets=r".*/kernel")


def _params():
    return {
        "params": {
            f"layers_{i}": {
                "attn": {"query": {"kernel": jnp.zeros((64, 64))}, "value": {"kernel": jnp.zeros((64, 8))}}
            }
            for i in range(2)
        }
    }


@pytest.fixture(scope="module")
def train_state():
    """Deltas and Adam state of a small model: large leaves (own data files, not checksummed by
    tensorstore) and small ones (inlined in the OCDBT tree nodes), float32 and bfloat16, and a scalar."""
    keys = (jax.random.fold_in(jax.random.key(0), i) for i in range(10**6))
    deltas = lj.init(next(keys), _params(), SPEC)
    deltas = jax.tree_util.tree_map(lambda x: jax.random.normal(next(keys), x.shape, x.dtype), deltas)
    tx = lj.optimizer(optax.adam(1e-3))
    opt_state = tx.init(deltas)
    opt_state = jax.tree_util.tree_map(
        lambda x: (
            jax.random.uniform(next(keys), x.shape, x.dtype)
            if jnp.issubdtype(x.dtype, jnp.floating)
            else x + 7
        ),
        opt_state,
    )
    return {"deltas": deltas, "opt_state": opt_state, "ema": jnp.arange(300, dtype=jnp.bfloat16)}


def test_bit_flips_in_every_file_of_a_train_checkpoint_raise_or_change_nothing(train_state, tmp_path, caplog):
    # orbax leaves the reads of the other leaves running after the first failure; asyncio logs each.
    caplog.set_level(logging.CRITICAL, logger="asyncio")
    ckpt = checkpoint.TrainCheckpointer(tmp_path, every=1, keep=3)
    ckpt.save(1, train_state, {"data_position": 1})
    ckpt.save(2, train_state, {"data_position": 2})
    ckpt.close()
    paths = set(ckpt.metadata(2)["paths"])
    template = jax.tree_util.tree_map(jnp.zeros_like, train_state)
    before = _tree(tmp_path)
    files = sorted(p for p in (tmp_path / "2").rglob("*") if p.is_file())
    assert any("ocdbt" in p.parent.parent.name for p in files)  # the array data files are among them
    outcome = collections.Counter()
    per_file = {}
    ckpt = checkpoint.TrainCheckpointer(tmp_path, every=1, keep=3)
    for file in files:
        raw = file.read_bytes()
        seen = per_file[str(file.relative_to(tmp_path))] = collections.Counter()
        for offset in _offsets(len(raw)):
            file.write_bytes(_flip(raw, offset))
            try:
                back, meta = ckpt.restore(template)
            except ValueError as e:
                message = str(e)
                assert "checkpoint" in message and "Nothing was" in message, message
                if "do not match the checksums saved with them" in message:
                    kind = "lora_jax crc32 of a leaf"
                    assert "(step 2) is corrupted" in message, message
                    named = message.split("saved with them: ")[1].split("]")[0]
                    assert any(f"'{p}'" in named for p in paths), message
                    assert "restore an earlier step ([1])" in message, message
                elif "its metadata does not match its checksum" in message:
                    kind = "lora_jax crc32 of the metadata"
                    assert "(step 2) is corrupted" in message, message
                else:
                    kind = "unreadable (orbax / tensorstore)"
            else:
                assert _same(back, train_state), f"{file}: a flip at byte {offset} restored wrong values"
                assert meta["step"] == 2 and meta["data_position"] == 2
                kind = "identical"
            finally:
                file.write_bytes(raw)
            seen[kind] += 1
            outcome[kind] += 1
    ckpt.close()
    assert _tree(tmp_path) == before  # nothing deleted, nothing left behind
    flips = sum(outcome.values())
    report = "\n".join(f"  {name}: {dict(c)}" for name, c in per_file.items())
    print(f"\n{flips} flips in {len(files)} files: {dict(outcome)}\n{report}")
    # Leaves in their own data files are covered by nothing but lora_jax's checksums: those flips used to
    # restore silently as wrong values.
    assert outcome["lora_jax crc32 of a leaf"] >= 2 * FLIPS_PER_FILE
    # Most flips in the files that a restore reads raise; the rest hit bytes it never reads (the tail of a
    # data file holding the per-process tree nodes that the merged tree replaced, unused metadata fields).
    read = [c for c in per_file.values() if c["identical"] < sum(c.values())]
    raised = sum(sum(c.values()) - c["identical"] for c in read)
    assert raised >= 0.8 * sum(sum(c.values()) for c in read)


def test_bit_flips_anywhere_in_an_adapter_file_raise(train_state, tmp_path):
    deltas, params = train_state["deltas"], _params()
    file = adapter.save_adapter(
        tmp_path, deltas, SPEC, base_model={"name": "toy"}, extra={"acc": 0.5}, verbose=False
    )
    info = adapter.adapter_info(file)
    raw = file.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    offsets = sorted(set(_offsets(len(raw)) + _offsets(8 + header_len) + list(range(0, len(raw), 97))))
    outcome = collections.Counter()
    for offset in offsets:
        file.write_bytes(_flip(raw, offset))
        try:
            back = adapter.load_adapter(file, params)
        except ValueError as e:
            outcome["raised"] += 1
            assert str(file) in str(e)
        else:  # never observed; allowed only if nothing changed
            assert _same(back, deltas) and adapter.adapter_info(file) == info, offset
            outcome["identical"] += 1
        finally:
            file.write_bytes(raw)
    print(
        f"\n{len(offsets)} flips in a {len(raw)}-byte adapter ({8 + header_len} header bytes): {dict(outcome)}"
    )
    assert outcome["raised"] >= 0.95 * len(offsets)
    assert _same(adapter.load_adapter(file, params), deltas)  # the restored file reads fine


WORKER = r"""
import pathlib, sys
out, port, pid, phase = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from lora_jax import checkpoint

mesh = jax.make_mesh((2, 2), ("x", "y"))
full = np.arange(64 * 48, dtype=np.float32).reshape(64, 48) / 7
put = lambda x, spec: jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i: x[i])
whole = lambda tree: {k: multihost_utils.process_allgather(v, tiled=True) for k, v in tree.items()}
state = {"w": put(full, P("x", "y")), "r": put(full[:8], P()), "v": put(full[:, :16], P(None, "x"))}
# Another sharding, whose shards do not contain the saved blocks: checked after a gather.
other = {"w": put(0 * full, P(None, ("x", "y"))), "r": put(0 * full[:8], P("x")), "v": put(0 * full[:, :16], P("y"))}
root = pathlib.Path(out)
if phase == "read":  # fresh processes: nothing read before the flip can be served from a cache
    errors = []
    for template in (state, other):
        ckpt = checkpoint.TrainCheckpointer(root, every=1)
        try:
            ckpt.restore(template)
            errors.append(None)
        except ValueError as e:
            errors.append(str(e).split("corrupted: ")[1].split(". ")[0])
        ckpt.close()
    print("RESULT", errors, flush=True)
    sys.exit(0)
ckpt = checkpoint.TrainCheckpointer(root, every=1)
ckpt.save(1, state, {})
ckpt.wait()
blocks = [len(r["blocks"]) for r in ckpt.metadata(1)["crc32"]]
for template in (state, other):
    back, _ = ckpt.restore(template)
    got, want = whole(back), whole(state)
    assert all(np.array_equal(got[k], want[k]) for k in state)
ckpt.close()
multihost_utils.sync_global_devices("flip")
if pid == 0:  # one bit of the data that process 1 wrote
    data = max((p for p in (root / "1" / "state").rglob("*") if p.parent.name == "d" and "process_1" in str(p)),
               key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 8
    data.write_bytes(bytes(raw))
multihost_utils.sync_global_devices("flipped")
print("RESULT", blocks, flush=True)
"""


def test_checksums_of_arrays_sharded_across_two_processes(tmp_path):
    """Two processes save arrays sharded across both, read them back under two shardings, then one bit of
    the data process 1 wrote is flipped; fresh processes (so that no read is served from what the writers
    cached before the flip) must refuse it under both shardings, naming the leaf."""

    def run(phase: str) -> list[str]:
        port = free_port()
        argvs = [[sys.executable, "-c", WORKER, str(tmp_path), str(port), str(i), phase] for i in range(2)]
        return [result_line(out) for out in run_processes(argvs, devices=2)]

    # Leaves r (replicated), v (2 blocks), w (2x2 blocks), each read back exactly under both shardings.
    assert run("write") == ["RESULT [1, 2, 4]"] * 2
    # Both processes refuse the flipped bit, both ways.
    want = "1 of 3 leaves do not match the checksums saved with them: ['w']"
    assert run("read") == [f"RESULT {[want, want]}"] * 2
