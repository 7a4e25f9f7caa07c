"""Adapter files and the merged export: round trips, and clear errors on a wrong model or a bad file."""

import json

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
        lambda x: x + 0.01 * jnp.arange(x.size, dtype=x.dtype).reshape(x.shape) / x.size, deltas
    )
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
        deltas, is_leaf=lj.is_delta
    )
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
        lambda x: jax.ShapeDtypeStruct(x.shape[:-1] + (x.shape[-1] * 2,), x.dtype), other
    )
    with pytest.raises(
        ValueError,
        match=r"\(4 problem\(s\)\).*\n  params/layers_0/attn/query/kernel: does not fit the "
        r"model's kernel of shape \(32, 64\): .* needs a \(32, 4\) and b \(4, 64\), "
        r"found a \(32, 4\) and b \(4, 32\)",
    ):
        adapter.load_adapter(tmp_path, wider)
    stacked = loop.tiny_llama(128, scan_layers=True)[1]
    with pytest.raises(ValueError, match=r"params/layers_0/attn/query/kernel: not a parameter of this model"):
        adapter.load_adapter(tmp_path, stacked)
    with pytest.raises(
        ValueError, match=r"base model 'name': the adapter was made for 'tiny', this model is 'x'"
    ):
        adapter.load_adapter(tmp_path, other, base_model={"name": "x"})


def test_unknown_path_names_the_closest_model_paths(tiny, tmp_path):
    _, _, spec, deltas = tiny
    adapter.save_adapter(tmp_path, deltas, spec, verbose=False)
    stacked = loop.tiny_llama(128, scan_layers=True)[1]  # one stacked "layers" instead of layers_0, layers_1
    with pytest.raises(
        ValueError,
        match=r"params/layers_1/attn/value/kernel: not a parameter of this model "
        r"\(closest: \['params/layers/attn/value/kernel', '[^']*', '[^']*'\]\)",
    ):
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


# ----------------------------------------------------------------------------------------------------
# The header is covered by its checksum; missing fields are named; partial loads are refused.


def _edit_header(file, fn):
    """Rewrites the adapter's JSON header with `fn(header)`, keeping the tensors (a hand edit)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    with safe_open(str(file), "np") as f:
        header = json.loads(f.metadata()["lora_jax"])
    tensors = load_file(str(file))
    save_file(tensors, str(file), metadata={"lora_jax": json.dumps(fn(header))})


Q0 = "params/layers_0/attn/query/kernel"


def _set(path, value):
    """An edit that sets header[path[0]][path[1]]... to `value`."""

    def edit(header):
        node = header
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        return header

    return edit


@pytest.mark.parametrize(
    "edit",
    [
        _set(("deltas", Q0, "scale"), 4.0),
        _set(("deltas", Q0, "axes"), {"stack": [], "inputs": [1], "outputs": [0]}),
        _set(("deltas", Q0, "dropout"), 0.5),
        _set(("spec", "targets"), [".*/attn/query/kernel"]),
        _set(("spec", "alpha"), 16.0),
        lambda h: {**h, "deltas": {k: v for k, v in h["deltas"].items() if "layers_1" not in k}},
        _set(("base_model", "name"), "other"),
        _set(("extra", "acc"), 0.99),
    ],
    ids=["scale", "axes", "dropout", "targets", "alpha", "list-of-deltas", "base-model", "extra"],
)
def test_edited_header_is_refused(tiny, tmp_path, edit):
    _, variables, spec, deltas = tiny
    file = adapter.save_adapter(
        tmp_path, deltas, spec, base_model={"name": "tiny"}, extra={"acc": 0.5}, verbose=False
    )
    _edit_header(file, edit)
    with pytest.raises(
        ValueError,
        match=r"adapter.safetensors': the adapter header does not match its checksum "
        r"header_crc32: it was edited or corrupted after save_adapter wrote it",
    ):
        adapter.load_adapter(file, variables)
    with pytest.raises(ValueError, match=r"does not match its checksum header_crc32"):
        adapter.adapter_info(file)


def test_header_checksum_survives_json_round_trips(tiny, tmp_path):
    _, variables, spec, deltas = tiny
    # Tuples and int keys change under JSON: the checksum is taken over what a reader will see.
    file = adapter.save_adapter(
        tmp_path,
        deltas,
        spec,
        base_model={"name": "tiny", "shape": (2, 3)},
        extra={"by_step": {10: 0.5}, "nan": float("nan")},
        verbose=False,
    )
    info = adapter.adapter_info(file)
    assert info["format"] == adapter.ADAPTER_FORMAT == "lora_jax.adapter/2"
    assert info["base_model"]["shape"] == [2, 3] and info["extra"]["by_step"] == {"10": 0.5}
    assert _same(adapter.load_adapter(file, variables, base_model={"shape": [2, 3]}), deltas)
    with pytest.raises(TypeError, match=r"save_adapter: base_model and extra must be JSON-able"):
        adapter.save_adapter(tmp_path, deltas, spec, extra={"x": object()}, verbose=False)


@pytest.mark.parametrize(
    "path, named",
    [
        (("deltas", Q0, "scale"), f"deltas/{Q0}/scale"),
        (("deltas", Q0, "crc32_b"), f"deltas/{Q0}/crc32_b"),
        (("spec", "alpha"), "spec/alpha"),
        (("spec", "targets"), "spec/targets"),
        (("base_model",), "base_model"),
        (("header_crc32",), "header_crc32"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_missing_header_field_is_named(tiny, tmp_path, path, named):
    _, variables, spec, deltas = tiny
    file = adapter.save_adapter(tmp_path, deltas, spec, verbose=False)

    def drop(header):
        node = header
        for k in path[:-1]:
            node = node[k]
        del node[path[-1]]
        return header

    _edit_header(file, drop)
    with pytest.raises(
        ValueError,
        match=rf"adapter.safetensors': the adapter header lacks the field\(s\) "
        rf"\['{named}'\] \(corrupted, or edited by hand\?\); nothing was loaded",
    ):
        adapter.load_adapter(file, variables)


def test_malformed_headers_are_clear_errors(tiny, tmp_path):
    _, variables, spec, deltas = tiny
    file = adapter.save_adapter(tmp_path, deltas, spec, verbose=False)
    _edit_header(file, lambda h: [h])
    with pytest.raises(ValueError, match=r"the lora_jax header is a JSON list, not an object"):
        adapter.load_adapter(file, variables)
    file = adapter.save_adapter(tmp_path, deltas, spec, verbose=False)
    _edit_header(file, lambda h: {**h, "deltas": []})
    with pytest.raises(ValueError, match=r"the adapter header field 'deltas' is a JSON list, not an object"):
        adapter.load_adapter(file, variables)
    file = adapter.save_adapter(tmp_path, deltas, spec, verbose=False)
    _edit_header(file, lambda h: {**h, "format": "lora_jax.adapter/3"})
    with pytest.raises(
        ValueError, match=r"unknown adapter format 'lora_jax.adapter/3', expected 'lora_jax.adapter/2'"
    ):
        adapter.load_adapter(file, variables)
    with pytest.raises(ValueError, match=r"spec_from_json: unknown LoraSpec field\(s\) \['ranks'\]"):
        adapter.spec_from_json({**adapter.spec_to_json(spec), "ranks": 3})
    with pytest.raises(ValueError, match=r"spec_from_json: the spec has no 'targets' field"):
        adapter.spec_from_json({"rank": 3})


def test_format_1_adapter_loads_with_a_warning(tiny, tmp_path):
    _, variables, spec, deltas = tiny
    file = adapter.save_adapter(tmp_path, deltas, spec, verbose=False)
    as_v1 = lambda h: {**{k: v for k, v in h.items() if k != "header_crc32"}, "format": "lora_jax.adapter/1"}
    _edit_header(file, as_v1)
    with pytest.warns(
        UserWarning,
        match=r"is a 'lora_jax.adapter/1' adapter: its arrays are checksummed but its "
        r"header \(scales, axes, targets, dropout, the list of deltas\) is not\. "
        r"Load it and save it again with save_adapter to upgrade it",
    ):
        back = adapter.load_adapter(file, variables)
    assert _same(back, deltas)
    adapter.save_adapter(tmp_path, back, spec, verbose=False)  # the upgrade
    assert adapter.adapter_info(tmp_path)["format"] == "lora_jax.adapter/2"
    _edit_header(file, lambda h: {k: v for k, v in as_v1(h).items() if k != "extra"})
    with pytest.raises(ValueError, match=r"lacks the field\(s\) \['extra'\]"):
        adapter.load_adapter(file, variables)


def _llama(num_layers, scan_layers):
    import flax.linen as nn

    from lora_jax.models.llama import Llama, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_layers=num_layers,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        scan_layers=scan_layers,
    )
    return nn.meta.unbox(jax.jit(Llama(cfg).init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))


def test_adapter_into_a_model_with_more_layers_is_refused_unless_partial_is_asked_for(tmp_path):
    spec = lj.LoraSpec(rank=4, alpha=8.0, targets=r".*/attn/(query|value)/kernel")
    two, three = _llama(2, False), _llama(3, False)
    deltas = lj.init(jax.random.key(0), two, spec)
    file = adapter.save_adapter(tmp_path, deltas, spec, verbose=False)
    with pytest.raises(
        ValueError,
        match=r"adapter '.*adapter.safetensors' leaves 2 parameter\(s\) that it targets in "
        r"this model without a delta: params/layers_2/attn/query/kernel, "
        r"params/layers_2/attn/value/kernel\. It was probably made for a model "
        r"with fewer layers .* pass allow_partial=True",
    ):
        adapter.load_adapter(file, three)
    back = adapter.load_adapter(file, three, allow_partial=True)
    assert back["params"]["layers_2"]["attn"]["query"]["kernel"] is None
    assert _same(back["params"]["layers_1"], deltas["params"]["layers_1"])
    assert _same(adapter.load_adapter(file, two), deltas)  # the model it was made for: no flag needed

    # Stacked under nn.scan: a (2, ...) delta cannot be part of a (3, ...) kernel, flag or not.
    stacked_spec = lj.LoraSpec(
        rank=4,
        alpha=8.0,
        targets=r".*/attn/(query|value)/kernel",
        axes={r".*/attn/(query|value)/kernel": lj.LoraAxes(stack=(0,), inputs=(1,), outputs=(2,))},
    )
    two_s, three_s = _llama(2, True), _llama(3, True)
    file = adapter.save_adapter(
        tmp_path / "stacked", lj.init(jax.random.key(0), two_s, stacked_spec), stacked_spec, verbose=False
    )
    for partial in (False, True):
        with pytest.raises(
            ValueError,
            match=r"params/layers/attn/query/kernel: does not fit the model's kernel of "
            r"shape \(3, 32, 32\)",
        ):
            adapter.load_adapter(file, three_s, allow_partial=partial)


def test_coverage_helper_takes_a_spec_a_predicate_or_paths():
    from lora_jax import coverage

    params = {f"layers_{i}": {"q": {"kernel": jnp.zeros((4, 4))}, "norm": jnp.zeros(4)} for i in range(3)}
    d = lj.LoraDelta(jnp.zeros((4, 1)), jnp.zeros((1, 4)))
    deltas = {"layers_0": {"q": {"kernel": d}}}  # any tree holding the deltas at their key paths
    want = ["layers_1/q/kernel", "layers_2/q/kernel"]
    assert coverage.uncovered_targets(params, deltas, lj.LoraSpec(rank=1, targets=".*/kernel")) == want
    assert coverage.uncovered_targets(params, deltas, lambda p: p.endswith("/q/kernel")) == want
    assert coverage.uncovered_targets(params, deltas, {"layers_2/q/kernel", "nowhere"}) == want[1:]
    assert coverage.check_coverage(params, deltas, want, allow_partial=True) == want
    with pytest.raises(
        ValueError,
        match=r"PEFT adapter 'x/' leaves 2 parameter\(s\) that it targets in this model "
        r"without a delta: layers_1/q/kernel, layers_2/q/kernel\.",
    ):
        coverage.check_coverage(params, deltas, want, source="PEFT adapter 'x/'")
    many = {f"layers_{i}": {"kernel": jnp.zeros((4, 4))} for i in range(12)}
    with pytest.raises(ValueError, match=r"leaves 12 parameter\(s\).*layers_5/kernel, \.\.\. \(4 more\)\."):
        coverage.check_coverage(many, {}, lambda p: True)
    with pytest.raises(
        TypeError,
        match=r"targets must be a LoraSpec, a predicate on key paths or a collection of "
        r"key paths, found the string '\.\*'",
    ):
        coverage.uncovered_targets(params, deltas, ".*")
