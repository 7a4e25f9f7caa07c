"""Tests for the Llama family: model, KV-cache generation, GGUF/HF loaders, BPE tokenizer.

Tiny random models run everywhere; ``assets`` tests use the real SmolLM2-135M-Instruct weights and
``torch`` tests compare against transformers' ``LlamaForCausalLM`` (float32, tolerances stated).
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax.models as lm
from lora_jax.models import gguf as lgguf
from lora_jax.models import hf as lhf
from lora_jax.models import llama, tokenizers

TINY = llama.LlamaConfig(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rope_theta=500.0,
    rms_norm_eps=2.0**-16,
    tie_word_embeddings=False,
)


@functools.cache
def _init(cfg=TINY, seed=0):
    """A tiny random model (jitted init, cached: eager Flax init is slow on CPU)."""
    model = llama.Llama(cfg)

    @jax.jit
    def init(key):
        variables = nn_unbox(model.init(key, jnp.zeros((1, 4), jnp.int32)))
        # Norm scales are ones at init; perturb them so layout mistakes show up.
        leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
        keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
        leaves = [
            x + 0.1 * jax.random.normal(k, x.shape) if "scale" in jax.tree_util.keystr(p) else x
            for (p, x), k in zip(leaves, keys)
        ]
        return jax.tree_util.tree_unflatten(treedef, leaves)

    return model, init(jax.random.key(seed))


def nn_unbox(tree):
    import flax.linen as nn

    return nn.unbox(tree)


def _fwd(model, variables, *args, **kwargs):
    """Jitted forward pass (eager Flax is slow on CPU)."""
    return jax.jit(model.apply)(variables, *args, **kwargs)


def _ids(b, t, seed=0, vocab=TINY.vocab_size):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, vocab, jnp.int32)


# ------------------------------------------------------------------------------- model structure


def test_parameter_paths_shapes_and_logical_axes():
    model = llama.Llama(TINY)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    shapes = {
        jax.tree_util.keystr(p, simple=True, separator="/"): x.shape
        for p, x in jax.tree_util.tree_leaves_with_path(nn_unbox(abstract))
    }
    assert shapes["params/embed/embedding"] == (97, 32)
    assert shapes["params/layers_0/attn/query/kernel"] == (32, 64)
    assert shapes["params/layers_1/attn/key/kernel"] == (32, 32)
    assert shapes["params/layers_1/attn/value/kernel"] == (32, 32)
    assert shapes["params/layers_1/attn/out/kernel"] == (64, 32)
    assert shapes["params/layers_1/mlp/gate/kernel"] == (32, 48)
    assert shapes["params/layers_1/mlp/down/kernel"] == (48, 32)
    assert shapes["params/layers_0/attn_norm/scale"] == (32,)
    assert shapes["params/final_norm/scale"] == (32,)
    assert shapes["params/lm_head/kernel"] == (32, 97)
    assert len(shapes) == 3 + 9 * 2  # no biases anywhere

    specs = llama.logical_partition_specs(model)["params"]
    assert tuple(specs["layers_0"]["attn"]["query"]["kernel"]) == ("embed", "heads")
    assert tuple(specs["layers_0"]["attn"]["out"]["kernel"]) == ("heads", "embed")
    assert tuple(specs["layers_0"]["mlp"]["down"]["kernel"]) == ("mlp", "embed")
    assert tuple(specs["embed"]["embedding"]) == ("vocab", "embed")
    assert tuple(specs["final_norm"]["scale"]) == ("norm",)
    used = {
        a
        for s in jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        for a in s
    }
    assert used <= {name for name, _ in llama.LOGICAL_AXIS_RULES_DEFAULT}

    tied = llama.Llama(
        llama.LlamaConfig(**{**TINY.__dict__, "tie_word_embeddings": True, "scan_layers": True})
    )
    specs = llama.logical_partition_specs(tied)["params"]
    assert "lm_head" not in specs
    assert tuple(specs["layers"]["attn"]["query"]["kernel"]) == ("layers", "embed", "heads")
    abstract = jax.eval_shape(tied.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    assert nn_unbox(abstract)["params"]["layers"]["attn"]["query"]["kernel"].shape == (2, 32, 64)


@pytest.mark.parametrize("scan,remat", [(True, False), (False, True), (True, True)])
def test_scan_and_remat_match_plain_model(scan, remat):
    model, variables = _init()
    ids = _ids(2, 7)
    mask = jnp.array([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])
    ref = _fwd(model, variables, ids, attention_mask=mask)

    cfg = llama.LlamaConfig(**{**TINY.__dict__, "scan_layers": scan, "remat": remat})
    other = {
        "params": llama.stack_layers(variables["params"], TINY.num_layers) if scan else variables["params"]
    }
    out = _fwd(llama.Llama(cfg), other, ids, attention_mask=mask)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)

    if not remat:
        return

    def loss(m, v):  # remat changes the backward pass only: check gradients
        return jnp.mean(m.apply(v, ids, attention_mask=mask) ** 2)

    g_ref = jax.jit(jax.grad(lambda v: loss(model, v)))(variables)
    g = jax.jit(jax.grad(lambda v: loss(llama.Llama(cfg), v)))(other)
    if scan:
        g = {"params": llama.unstack_layers(g["params"], TINY.num_layers)}
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g, g_ref)


def test_bfloat16_compute_gives_float32_logits_close_to_fp32():
    model, variables = _init()
    ids = _ids(1, 6)
    ref = _fwd(model, variables, ids)
    out = _fwd(llama.Llama(llama.LlamaConfig(**{**TINY.__dict__, "dtype": jnp.bfloat16})), variables, ids)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, atol=0.05)


# ------------------------------------------------------------------------------- generation


def _argmax_loop(apply_fn, variables, ids, mask, n):
    """Reference without a cache: a full forward pass per new token.

    One fixed-width buffer, right-padded, so it compiles once; causal attention makes the padding on
    the right invisible to earlier positions.
    """
    fwd = jax.jit(apply_fn)
    b, t = ids.shape
    buf = jnp.concatenate([ids, jnp.zeros((b, n), ids.dtype)], axis=1)
    full_mask = jnp.concatenate([mask, jnp.ones((b, n), mask.dtype)], axis=1)
    for i in range(n):
        nxt = jnp.argmax(fwd(variables, buf, attention_mask=full_mask)[:, t + i - 1], axis=-1)
        buf = buf.at[:, t + i].set(nxt.astype(buf.dtype))
    return buf[:, t:]


@pytest.mark.parametrize("scan", [False, True])
def test_kv_cache_generate_equals_no_cache_argmax_loop(scan):
    model, variables = _init()
    if scan:
        model = llama.Llama(llama.LlamaConfig(**{**TINY.__dict__, "scan_layers": True}))
        variables = {"params": llama.stack_layers(variables["params"], TINY.num_layers)}
    ids = _ids(2, 5, seed=3)
    mask = jnp.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])  # second row left-padded
    ref = _argmax_loop(model.apply, variables, ids, mask, 6)
    out = llama.generate(model.apply, variables, ids, 6, attention_mask=mask)
    np.testing.assert_array_equal(out, ref)
    if not scan:  # the padded row gives the same tokens as the same prompt without padding
        alone = llama.generate(model.apply, variables, ids[1:, 2:], 6)
        np.testing.assert_array_equal(out[1:], alone)


def test_generate_takes_variables_as_argument_for_wrapped_apply():
    model, variables = _init()
    ids = _ids(1, 4)

    def wrapped(v, *args, **kw):  # LoRA-style: base + delta, both passed in through the variables
        return model.apply(jax.tree_util.tree_map(jnp.add, v["base"], v["delta"]), *args, **kw)

    zero = jax.tree_util.tree_map(jnp.zeros_like, variables)
    half = jax.tree_util.tree_map(lambda x: 0.5 * x, variables)
    a = llama.generate(wrapped, {"base": variables, "delta": zero}, ids, 5)
    compiled = llama._generate._cache_size()
    b = llama.generate(wrapped, {"base": variables, "delta": half}, ids, 5)
    assert llama._generate._cache_size() == compiled  # new weights, same compiled loop
    scaled = jax.tree_util.tree_map(lambda x: 1.5 * x, variables)
    np.testing.assert_array_equal(a, _argmax_loop(model.apply, variables, ids, jnp.ones_like(ids), 5))
    np.testing.assert_array_equal(b, _argmax_loop(model.apply, scaled, ids, jnp.ones_like(ids), 5))
    assert not np.array_equal(a, b)


def test_generate_sampling_and_eos():
    model, variables = _init()
    ids = _ids(3, 4)
    k = jax.random.key(7)
    s1 = llama.generate(model.apply, variables, ids, 8, key=k, temperature=1.0)
    s2 = llama.generate(model.apply, variables, ids, 8, key=k, temperature=1.0)
    np.testing.assert_array_equal(s1, s2)
    s3 = llama.generate(model.apply, variables, ids, 8, key=jax.random.key(8), temperature=1.0)
    assert not np.array_equal(s1, s3)
    np.testing.assert_array_equal(  # tiny temperature -> greedy
        llama.generate(model.apply, variables, ids, 8, key=k, temperature=1e-6),
        llama.generate(model.apply, variables, ids, 8),
    )

    greedy = np.asarray(llama.generate(model.apply, variables, ids, 8))
    eos = int(greedy[0, 2])
    out = np.asarray(llama.generate(model.apply, variables, ids, 8, eos_id=eos))
    for row_g, row in zip(greedy, out):
        hits = np.flatnonzero(row_g == eos)
        if hits.size:
            n = hits[0]
            np.testing.assert_array_equal(row[: n + 1], row_g[: n + 1])
            assert (row[n:] == eos).all()
        else:
            np.testing.assert_array_equal(row, row_g)


def test_generate_errors():
    model, variables = _init()
    ids = _ids(1, 3)
    with pytest.raises(ValueError, match=r"temperature=0\.7 samples tokens: pass key="):
        llama.generate(model.apply, variables, ids, 2, temperature=0.7)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        llama.generate(model.apply, variables, ids, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        llama.generate(model.apply, variables, ids, 0)
    with pytest.raises(ValueError, match=r"prompt_ids must be \(batch, length\)"):
        llama.generate(model.apply, variables, ids[0], 2)
    with pytest.raises(ValueError, match="must be a multiple of num_kv_heads"):
        llama.LlamaConfig(num_heads=6, num_kv_heads=4)


# ------------------------------------------------------------------------------- HF conversion


def test_from_hf_to_hf_roundtrip_and_errors():
    model, variables = _init()
    config, tensors = llama.to_hf(TINY, variables)
    model2, variables2 = llama.from_hf(json.loads(json.dumps(config)), tensors)
    assert model2.config == TINY
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables2, variables)
    _, stacked = llama.from_hf(config, tensors, scan_layers=True)
    assert stacked["params"]["layers"]["mlp"]["up"]["kernel"].shape == (2, 32, 48)

    bad = dict(tensors)
    bad["model.layers.1.self_attn.k_proj.weight"] = np.zeros((16, 32), np.float32)
    del bad["model.norm.weight"]
    bad["model.layers.9.mlp.up_proj.weight"] = np.zeros((2, 2), np.float32)
    with pytest.raises(
        ValueError,
        match=r"(?s)missing tensor 'model.norm.weight'.*"
        r"'model.layers.1.self_attn.k_proj.weight' has shape \(16, 32\), "
        r"expected \(32, 32\).*unexpected tensor 'model.layers.9.mlp.up_proj.weight'",
    ):
        llama.from_hf(config, bad)
    with pytest.raises(ValueError, match="rope_scaling=.*not supported: rope_type 'dynamic'"):
        llama.from_hf({**config, "rope_scaling": {"rope_type": "dynamic", "factor": 8.0}}, tensors)
    with pytest.raises(ValueError, match="attention_bias or mlp_bias"):
        llama.from_hf({**config, "attention_bias": True}, tensors)


def _write_safetensors(folder, config, tensors, shards=1):
    from safetensors.numpy import save_file

    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    if shards == 1:
        save_file({n: np.ascontiguousarray(tensors[n]) for n in names}, str(folder / "model.safetensors"))
        return
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: np.ascontiguousarray(tensors[n]) for n in part}, str(folder / fname))
        weight_map.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_load_local_folder_sharded_and_errors(tmp_path):
    model, variables = _init()
    config, tensors = llama.to_hf(TINY, variables)
    _write_safetensors(tmp_path / "m", config, tensors, shards=2)
    m2, v2, tok = lm.load(tmp_path / "m", scan_layers=True)
    assert tok is None and m2.config.scan_layers
    ids = _ids(2, 5)
    np.testing.assert_allclose(_fwd(m2, v2, ids), _fwd(model, variables, ids), atol=1e-6)

    with pytest.raises(ValueError, match="neither a known model"):
        lm.load(tmp_path / "nope")
    with pytest.raises(ValueError, match="Model folder not found"):
        lhf.load_hf(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="missing config.json"):
        lhf.load_hf(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(ValueError, match=r"Unsupported model_type 'mamba'.*\['bert', .*'gpt2', 'llama', "):
        lhf.load_hf(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no model.safetensors or model.safetensors.index.json"):
        lhf.load_hf(tmp_path / "empty")
    (tmp_path / "m" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match=r"missing safetensors shards \['model-00002-of-00002"):
        lhf.load_hf(tmp_path / "m")


def test_read_safetensors_bfloat16(tmp_path):
    import ml_dtypes
    from safetensors.numpy import save_file

    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    try:
        save_file({"x": x.astype(ml_dtypes.bfloat16)}, str(tmp_path / "a.safetensors"))
    except Exception:  # noqa: BLE001 - older safetensors cannot write bf16 from numpy
        pytest.skip("safetensors cannot write bfloat16 from numpy here")
    out = lhf.read_safetensors(tmp_path / "a.safetensors")["x"]
    assert out.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(out.astype(np.float32), x)
    (tmp_path / "b.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"b.safetensors: cannot read the safetensors file"):
        lhf.read_safetensors(tmp_path / "b.safetensors")


@pytest.mark.torch
def test_tiny_transformers_llama_gqa_untied_matches(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=500.0,
        rms_norm_eps=2.0**-16,
        tie_word_embeddings=False,
        max_position_embeddings=64,
    )
    ref_model = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in ref_model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    ref_model.save_pretrained(tmp_path / "tiny")
    model, variables, _ = lm.load(tmp_path / "tiny")
    assert model.config.num_kv_heads == 2 and not model.config.tie_word_embeddings
    assert variables["params"]["lm_head"]["kernel"].shape == (32, 97)

    ids = np.random.default_rng(0).integers(0, 97, (2, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0  # right padding: positions agree with transformers' arange
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    out = np.asarray(_fwd(model, variables, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    diff = np.abs(out - ref)[mask.astype(bool)].max()
    print(f"tiny GQA untied Llama vs transformers: max abs diff {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.torch
def test_local_folder_dispatches_gpt2(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(tmp_path / "gpt2")
    ref_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").eval()
    model, variables, tok = lm.load(tmp_path / "gpt2")
    assert type(model).__name__ == "GPT2LMHeadModel" and tok is None
    ids = np.random.default_rng(1).integers(0, 97, (1, 7))
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(_fwd(model, variables, jnp.asarray(ids)), ref, atol=1e-4)


@pytest.mark.assets
def test_minilm_by_name_and_by_folder():
    from lora_jax import assets

    model, variables, tok = lm.load(assets.fetch("minilm"))  # hf.py -> bert.from_hf, tokenizer.json
    assert type(model).__name__ == "BertModel"
    assert tok.encode("Hello world").tokens[:3] == ["[CLS]", "hello", "world"]
    with pytest.raises(ValueError, match="only supported for Llama models, not 'minilm'"):
        lm.load("minilm", scan_layers=True)
    with pytest.raises(
        ValueError,
        match="scan_layers/remat are only supported for .*llama, mistral, qwen2, qwen3, not 'bert'",
    ):
        lm.load(assets.fetch("minilm"), remat=True)


# ------------------------------------------------------------------------------- GGUF


def _llama_cpp_permute(w, n_heads):
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path, cfg, tensors, arch="llama", skip=(), replace=None):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("llama")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_layers)  # llama.cpp's converter's map
    for name, x in tensors.items():
        gname = names.get_name(name, try_suffixes=(".weight",))
        if gname in skip:
            continue
        if name.endswith("q_proj.weight"):
            x = _llama_cpp_permute(x, cfg.num_heads)
        elif name.endswith("k_proj.weight"):
            x = _llama_cpp_permute(x, cfg.num_kv_heads)
        if replace and gname in replace:
            x = replace[gname]
        w.add_tensor(gname, np.ascontiguousarray(x, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.default_rng(0).normal(size=(3 * 8, 5))
    np.testing.assert_array_equal(lgguf.unpermute_rotary(_llama_cpp_permute(w, 3), 3), w)
    assert not np.array_equal(_llama_cpp_permute(w, 3), w)


def test_gguf_tiny_roundtrip_and_errors(tmp_path):
    model, variables = _init()
    _, tensors = llama.to_hf(TINY, variables)
    _write_gguf(tmp_path / "tiny.gguf", TINY, tensors)
    cfg, v2 = lgguf.load_gguf(tmp_path / "tiny.gguf")
    assert cfg == TINY
    ids = _ids(2, 6)
    np.testing.assert_allclose(_fwd(llama.Llama(cfg), v2, ids), _fwd(model, variables, ids), atol=1e-6)

    with pytest.raises(ValueError, match="GGUF file not found"):
        lgguf.load_gguf(tmp_path / "missing.gguf")
    _write_gguf(tmp_path / "arch.gguf", TINY, tensors, arch="mamba")
    with pytest.raises(ValueError, match=r"Unknown GGUF architecture 'mamba'; supported: \['llama'\]"):
        lgguf.load_gguf(tmp_path / "arch.gguf")
    _write_gguf(tmp_path / "shape.gguf", TINY, tensors, replace={"blk.1.ffn_up.weight": np.zeros((48, 31))})
    with pytest.raises(ValueError, match=r"'blk.1.ffn_up.weight' has shape \(48, 31\), expected \(48, 32\)"):
        lgguf.load_gguf(tmp_path / "shape.gguf")
    _write_gguf(tmp_path / "missing_t.gguf", TINY, tensors, skip=("blk.1.ffn_norm.weight",))
    with pytest.raises(ValueError, match=r"lacks tensors .*model.layers.1.post_attention_layernorm.weight"):
        lgguf.load_gguf(tmp_path / "missing_t.gguf")
    with pytest.raises(ValueError, match=r"GGUF tokenizer model 'llama' is not supported"):
        tokenizers.bpe_from_gguf(tmp_path / "tiny.gguf")


def test_chat_template():
    text = tokenizers.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    assert (
        text
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    with pytest.raises(ValueError, match=r"messages\[0\] must have 'role' and 'content'"):
        tokenizers.apply_chat_template([{"role": "user"}])


# A template in the style of Hugging Face chat templates: block tags on their own lines (trim_blocks and
# lstrip_blocks decide the whitespace), raise_exception, loop controls.
_TEMPLATE = """{% for message in messages %}
    {% if message['role'] not in ('system', 'user', 'assistant') %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
    {% if message['role'] == 'system' %}{% continue %}{% endif %}
[{{ message['role'] }}] {{ message['content'] }}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}[assistant] {% endif %}"""


def test_chat_template_is_rendered_with_jinja():
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    text = tokenizers.apply_chat_template(msgs, template=_TEMPLATE, eos_token="</s>")
    assert text == "[user] Hi</s>\n[assistant] Hello</s>\n[assistant] "
    with pytest.raises(ValueError, match="chat template: unknown role tool"):
        tokenizers.apply_chat_template([{"role": "tool", "content": "x"}], template=_TEMPLATE)
    with pytest.raises(ValueError, match="chat template: "):
        tokenizers.apply_chat_template(msgs, template="{% for m in messages %}")  # does not compile
    # A system prompt goes first unless the messages start with one; SmolLM2's default otherwise.
    custom = tokenizers.apply_chat_template([{"role": "user", "content": "Hi"}], system_prompt="Be brief.")
    assert custom.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi")
    hi = [{"role": "user", "content": "Hi"}]
    assert tokenizers.apply_chat_template(
        hi, system_prompt=tokenizers.SMOLLM2_SYSTEM_PROMPT
    ) == tokenizers.apply_chat_template(hi)


@pytest.mark.torch
def test_chat_template_renders_like_transformers(bpe_tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    for template in (_TEMPLATE, tokenizers.SMOLLM2_CHAT_TEMPLATE):
        tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe_tokenizer, eos_token="<|endoftext|>")
        tok.chat_template = template
        for gen in (True, False):
            ref = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            ours = tokenizers.apply_chat_template(
                msgs, template=template, add_generation_prompt=gen, eos_token="<|endoftext|>"
            )
            assert ours == ref
    # A Hugging Face folder's own template is found in tokenizer_config.json.
    tok.save_pretrained(tmp_path)
    assert tokenizers.chat_template(tmp_path) == tokenizers.SMOLLM2_CHAT_TEMPLATE
    assert tokenizers.chat_template(tmp_path / "missing") is None


# ------------------------------------------------------------------------------- real SmolLM2

GETTYSBURG = (
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, "
    "conceived in Liberty, and dedicated to the proposition that all men are created equal. Now we are "
    "engaged in a great civil war, testing whether that nation, or any nation so conceived and so "
    "dedicated, can long endure. We are met on a great battle-field of that war. We have come to "
    "dedicate a portion of that field, as a final resting place for those who here gave their lives "
    "that that nation might live. It is altogether fitting and proper that we should do this."
)


@pytest.mark.assets
def test_smollm2_config_and_paths(smollm2):
    cfg = smollm2["model"].config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        30,
        576,
        9,
        3,
        64,
    )
    assert cfg.tie_word_embeddings and cfg.vocab_size == 49152
    p = smollm2["variables"]["params"]
    assert "lm_head" not in p and p["embed"]["embedding"].shape == (49152, 576)
    assert p["layers_29"]["attn"]["key"]["kernel"].shape == (576, 192)


@pytest.mark.assets
def test_smollm2_tokenizer_roundtrip(smollm2):
    tok = smollm2["tokenizer"]
    for text in [
        GETTYSBURG,
        "  two  spaces, tabs\tand\nnewlines 12345 3.14",
        "naïve café — 東京 🙂",
        tokenizers.apply_chat_template([{"role": "user", "content": "Hello!"}]),
    ]:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == smollm2["special"]["eos"] == 2
    assert tok.encode("2024").tokens == ["2", "0", "2", "4"]  # digits split one by one (SmolLM pre-tokenizer)


@pytest.mark.assets
def test_bpe_from_gguf_file_keeps_the_tokenizer_beside_the_file(smollm2, tmp_path, monkeypatch):
    """The first call builds the tokenizer from the GGUF metadata (`bpe_from_gguf`) and writes its JSON
    beside the file; the next reads only that JSON (the GGUF is not read); an unreadable JSON is rebuilt.
    Each time the same tokenizer as `bpe_from_gguf` (its full JSON, and the ids of text with special
    tokens). The GGUF reader is the session's (parsing the file again takes seconds)."""
    from lora_jax import assets

    link = tmp_path / "model.gguf"  # the cache goes beside the link, not into the asset folder
    link.symlink_to(assets.fetch("smollm2-135m"))
    reads = []

    def read(path_or_reader):  # `bpe_from_gguf` passes the reader on: returned as it is
        if path_or_reader is not smollm2["reader"]:
            reads.append(path_or_reader)
        return smollm2["reader"]

    monkeypatch.setattr(lgguf, "read_gguf", read)
    want = smollm2["tokenizer"]
    text = tokenizers.apply_chat_template([{"role": "user", "content": "naïve 2024 🙂"}])
    first = tokenizers.bpe_from_gguf_file(link)
    assert reads == [link]
    [cached] = tmp_path.glob("model.gguf.tokenizer-*.json")
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    second = tokenizers.bpe_from_gguf_file(link)
    assert reads == [link]  # read from the JSON
    for tok in (first, second):
        assert tok.to_str() == want.to_str()
        assert tok.encode(text).ids == want.encode(text).ids
    cached.write_text("{not json")
    assert tokenizers.bpe_from_gguf_file(link).to_str() == want.to_str() and reads == [link, link]
    assert json.loads(cached.read_text())["model"]["type"] == "BPE"  # rewritten whole


@pytest.mark.assets
def test_smollm2_chat_template_matches_gguf_jinja(smollm2):
    jinja2 = pytest.importorskip("jinja2")
    template = smollm2["reader"].fields["tokenizer.chat_template"].contents()
    msgs = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Thanks"},
    ]
    ref = jinja2.Template(template).render(messages=msgs, add_generation_prompt=True)
    assert tokenizers.apply_chat_template(msgs) == ref
    assert template == tokenizers.SMOLLM2_CHAT_TEMPLATE == tokenizers.chat_template("smollm2-135m")


@pytest.mark.assets
def test_smollm2_greedy_knows_paris(smollm2):
    tok, model = smollm2["tokenizer"], smollm2["model"]
    ids = jnp.asarray([tok.encode("The capital of France is").ids])
    new = llama.generate(model.apply, smollm2["variables"], ids, 4, eos_id=smollm2["special"]["eos"])
    text = tok.decode(np.asarray(new[0]).tolist())
    print(f"SmolLM2: 'The capital of France is' -> {text!r}")
    assert "Paris" in text


@pytest.mark.assets
def test_smollm2_perplexity_far_below_shuffled(smollm2):
    tok, model = smollm2["tokenizer"], smollm2["model"]
    ids = np.asarray(tok.encode(GETTYSBURG).ids)
    shuffled = np.concatenate([ids[:1], np.random.default_rng(0).permutation(ids[1:])])
    batch = jnp.asarray(np.stack([ids, shuffled]))
    logp = jax.nn.log_softmax(model.apply(smollm2["variables"], batch)[:, :-1])
    nll = -jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1)[..., 0].mean(axis=1)
    ppl, ppl_shuffled = np.exp(np.asarray(nll))
    print(f"SmolLM2 perplexity on {len(ids)} tokens: {ppl:.2f}, shuffled: {ppl_shuffled:.1f}")
    assert 1.2 < ppl < 30
    assert ppl_shuffled > 20 * ppl


@pytest.mark.assets
def test_smollm2_scan_remat_and_cache_match(smollm2):
    """scan+remat layout gives the plain logits; cached generate equals a no-cache argmax loop."""
    cfg = llama.LlamaConfig(**{**smollm2["model"].config.__dict__, "scan_layers": True, "remat": True})
    scan_model = llama.Llama(cfg)
    params = smollm2["variables"]["params"]
    stacked = {"params": llama.stack_layers(params, cfg.num_layers)}
    tok = smollm2["tokenizer"]
    prompt = tok.encode("Water boils at a temperature of").ids
    ids = jnp.asarray([prompt])
    np.testing.assert_allclose(
        scan_model.apply(stacked, ids),
        smollm2["model"].apply(smollm2["variables"], ids),
        atol=1e-4,
        rtol=1e-4,
    )

    n_new, width = 6, len(prompt) + 6
    step = jax.jit(scan_model.apply)  # fixed width: right padding never affects earlier positions (causal)
    seq = list(prompt)
    for _ in range(n_new):
        buf = jnp.asarray([seq + [0] * (width - len(seq))])
        seq.append(int(jnp.argmax(step(stacked, buf)[0, len(seq) - 1])))
    out = llama.generate(scan_model.apply, stacked, ids, n_new)
    assert np.asarray(out[0]).tolist() == seq[len(prompt) :]


@pytest.mark.assets
@pytest.mark.torch
def test_smollm2_logits_match_transformers(smollm2):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config, tensors = llama.to_hf(smollm2["model"].config, smollm2["variables"])  # back to HF layout
    hf_config = transformers.LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"})
    with torch.device("meta"):  # skip the random init of 135M weights (seconds on 2 cores)
        ref_model = transformers.LlamaForCausalLM(hf_config).eval()
    state = {k: torch.from_numpy(v) for k, v in tensors.items()}
    missing, unexpected = ref_model.load_state_dict(state, strict=False, assign=True)
    assert set(missing) <= {"lm_head.weight"} and not unexpected  # tied to embed_tokens
    ref_model.tie_weights()
    ref_model.model.rotary_emb = type(ref_model.model.rotary_emb)(config=hf_config)  # buffers off meta
    assert ref_model.lm_head.weight.data_ptr() == ref_model.model.embed_tokens.weight.data_ptr()
    assert not [n for n, t in [*ref_model.named_parameters(), *ref_model.named_buffers()] if t.is_meta]

    ids = np.asarray([smollm2["tokenizer"].encode("The capital of France is Paris, and").ids])
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(ids)).logits.numpy()
    out = np.asarray(smollm2["model"].apply(smollm2["variables"], jnp.asarray(ids)))
    diff = np.abs(out - ref).max()
    print(
        f"SmolLM2 vs transformers LlamaForCausalLM (fp32): max abs diff {diff:.2e} "
        f"(logits up to {np.abs(ref).max():.1f})"
    )
    assert diff <= 1e-3


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_rope_scaling_in_either_config_key_is_rejected(key):
    cfg = {
        "vocab_size": 8,
        "hidden_size": 8,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        key: {"rope_type": "yarn", "factor": 8.0, "rope_theta": 5e5},
    }
    with pytest.raises(ValueError, match=f"{key}=.*not supported"):
        llama.config_from_hf(cfg)
    cfg[key] = {"rope_type": "default", "rope_theta": 5e5}
    assert llama.config_from_hf(cfg).rope_theta in (5e5, 1e4)
