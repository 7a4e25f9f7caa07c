"""Adapter files and the merged export: round trips, and clear errors on a wrong model or a bad file."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import adapter, checkpoint
from lora_jax.train import loop


@pytest.fixture(scope="module")
def tiny():
    model, variables = loop.tiny_llama(128, scan_layers=False)
    spec = lj.LoraSpec(rank=4, alpha=8.0, targets=r".*/attn/(query|value)/kernel")
    deltas = lj.init(jax.random.key(0), variables, spec)
    # Nonzero b so the round trip checks both factors.
    deltas = jax.tree_util.tree_map(
        lambda x: x + 0.01 * jnp.arange(x.size, dtype=x.dtype).reshape(x.shape) / x.size, deltas)
    return model, variables, spec, deltas


def _same(x, y):
    lx, ly = jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)
    return len(lx) == len(ly) and all(np.array_equal(a, b) for a, b in zip(lx, ly, strict=True))


def test_checkpoint_module_re_exports_the_adapter_names():
    # Code written against lj.checkpoint keeps working: the very same objects.
    assert lj.checkpoint.save_adapter is lj.adapter.save_adapter
    for name in adapter.__all__:
        assert getattr(checkpoint, name) is getattr(adapter, name), name
        assert name in checkpoint.__all__


def test_adapter_round_trip(tiny, tmp_path, capsys):
    model, variables, spec, deltas = tiny
    ident = {"name": "tiny", "config": {"hidden_size": 32}}
    file = adapter.save_adapter(tmp_path / "adapter", deltas, spec, base_model=ident, extra={"acc": 0.5})
    assert "MiB" in capsys.readouterr().out and file.name == "adapter.safetensors"
    back = adapter.load_adapter(tmp_path / "adapter", variables, base_model={"name": "tiny"})
    assert jax.tree_util.tree_structure(back, is_leaf=lj.is_delta) == jax.tree_util.tree_structure(
        deltas, is_leaf=lj.is_delta)
    assert _same(back, deltas)
    d0 = back["params"]["layers_0"]["attn"]["query"]["kernel"]
    assert d0.scale == 2.0 and d0.axes == lj.LoraAxes()
    info = adapter.adapter_info(file)
    assert adapter.spec_from_json(info["spec"]) == spec and info["extra"] == {"acc": 0.5}
    assert info["deltas"]["params/layers_1/attn/value/kernel"]["scale"] == 2.0
    ids = jnp.arange(6, dtype=jnp.int32)[None]
    got = jax.jit(lj.wrap(model.apply))(variables, back, ids)
    want = jax.jit(model.apply)(lj.merge(variables, deltas), ids)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_adapter_on_wrong_model_is_a_clear_error(tiny, tmp_path):
    _, _, spec, deltas = tiny
    adapter.save_adapter(tmp_path, deltas, spec, base_model={"name": "tiny"}, verbose=False)
    _, other = loop.tiny_llama(256, scan_layers=False)  # another vocabulary: embed differs, not a target
    wider = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape[:-1] + (x.shape[-1] * 2,), x.dtype), other)
    with pytest.raises(ValueError, match=r"\(4 problem\(s\)\).*\n  params/layers_0/attn/query/kernel: does not fit the "
                                         r"model's kernel of shape \(32, 64\): .* needs a \(32, 4\) and b \(4, 64\), "
                                         r"found a \(32, 4\) and b \(4, 32\)"):
        adapter.load_adapter(tmp_path, wider)
    stacked = loop.tiny_llama(128, scan_layers=True)[1]
    with pytest.raises(ValueError, match=r"params/layers_0/attn/query/kernel: not a parameter of this model"):
        adapter.load_adapter(tmp_path, stacked)
    with pytest.raises(ValueError, match=r"base model 'name': the adapter was made for 'tiny', this model is 'x'"):
        adapter.load_adapter(tmp_path, other, base_model={"name": "x"})


def test_unknown_path_names_the_closest_model_paths(tiny, tmp_path):
    _, _, spec, deltas = tiny
    adapter.save_adapter(tmp_path, deltas, spec, verbose=False)
    stacked = loop.tiny_llama(128, scan_layers=True)[1]  # one stacked "layers" instead of layers_0, layers_1
    with pytest.raises(ValueError, match=r"params/layers_1/attn/value/kernel: not a parameter of this model "
                                         r"\(closest: \['params/layers/attn/value/kernel', '[^']*', '[^']*'\]\)"):
        adapter.load_adapter(tmp_path, stacked)


def test_corrupted_adapter_is_a_clear_error(tiny, tmp_path):
    _, variables, spec, deltas = tiny
    file = adapter.save_adapter(tmp_path, deltas, spec, verbose=False)
    raw = bytearray(file.read_bytes())
    raw[-5] ^= 0xFF  # flip bits in the last tensor's data
    file.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum mismatch, the file is corrupted"):
        adapter.load_adapter(file, variables)
    file.write_bytes(bytes(raw[:40]))  # truncated header
    with pytest.raises(ValueError, match="not a readable safetensors adapter"):
        adapter.load_adapter(file, variables)
    with pytest.raises(ValueError, match="adapter file not found"):
        adapter.load_adapter(tmp_path / "nope.safetensors", variables)


def test_merged_export(tiny, tmp_path):
    from safetensors.numpy import load_file
    _, variables, _, deltas = tiny
    file = adapter.save_merged(tmp_path, variables, deltas)
    merged = load_file(str(file))
    want = lj.merge(variables, deltas)["params"]["layers_1"]["attn"]["value"]["kernel"]
    np.testing.assert_array_equal(merged["params/layers_1/attn/value/kernel"], want)
