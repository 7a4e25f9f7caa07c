"""Gemma 2 and Gemma 3 (text): exact against transformers' PyTorch models, PEFT interchange, errors.

Each family is a tiny random config written by transformers itself (``save_pretrained``, float32,
every weight and norm randomised so that the soft-caps and the (1 + w) norms matter), with a
sequence longer than the sliding window. Tolerances: logits <= 1e-4 relative to the largest
reference logit (float32); greedy generation token for token; ``lj.wrap`` vs PEFT <= 1e-4 relative.
"""

import dataclasses
import json
import shutil
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
import lora_jax.models as lm
from lora_jax import peft as lpeft
from lora_jax.models import gemma, registry

FAMILIES = ("gemma2", "gemma3_text")
SHAPES = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    query_pre_attn_scalar=12,
    sliding_window=4,
    final_logit_softcapping=3.0,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)
ALL_LINEAR = r".*/(attn/(query|key|value|out)|mlp/(gate|up|down))/kernel"


def _rel(ours, ref) -> float:
    return float(np.abs(np.asarray(ours) - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max())


@pytest.fixture(scope="module", params=FAMILIES)
def hf_gemma(request, tmp_path_factory):
    """``(model_type, folder, transformers model)``: a tiny random model saved by transformers."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if request.param == "gemma2":  # layers sliding, full; tied head; attention soft-cap
        cfg = transformers.Gemma2Config(**SHAPES, attn_logit_softcapping=2.0, tie_word_embeddings=True)
        cls = transformers.Gemma2ForCausalLM
    else:  # sliding_window_pattern 2: the same layer types; two RoPE bases, linear scaling on global layers
        cfg = transformers.Gemma3TextConfig(
            **SHAPES,
            sliding_window_pattern=2,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
            tie_word_embeddings=False,
        )
        cls = transformers.Gemma3ForCausalLM
    cfg._attn_implementation = "eager"
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.5 if ("norm" in name or "embed" in name) else 0.25)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, folder, model


def _hf_logits(model, ids, mask=None):
    import torch

    kw = {}
    if mask is not None:
        kw["attention_mask"] = torch.from_numpy(np.asarray(mask))
        kw["position_ids"] = torch.from_numpy(np.maximum(np.cumsum(mask, axis=1) - 1, 0))
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(ids, np.int64)), **kw).logits.numpy()


def _ids_and_mask():
    ids = np.asarray(jax.random.randint(jax.random.key(1), (2, 12), 3, SHAPES["vocab_size"]), np.int64)
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding
    ids[1, :3] = 0
    return ids, mask


@pytest.mark.torch
def test_logits_match_transformers_scan_and_remat_too(hf_gemma):
    model_type, folder, hf = hf_gemma
    model, variables, _ = lm.load(folder)
    assert isinstance(model, gemma.Gemma) and model.config.model_type == model_type
    assert model.config.sliding == (True, False)
    ids, mask = _ids_and_mask()
    ref = _hf_logits(hf, ids, mask)
    valid = mask.astype(bool)
    ours = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(ids, jnp.int32), jnp.asarray(mask)))
    assert ours.dtype == np.float32
    assert _rel(ours[valid], ref[valid]) <= 1e-4
    # The window, the soft-caps and the per-type RoPE are exercised: the final cap (3.0) is saturated,
    # and dropping the window or the attention cap (Gemma 2) / the global RoPE scaling (Gemma 3) is visible.
    assert np.abs(ref).max() > 0.9 * SHAPES["final_logit_softcapping"]
    row = jnp.asarray(ids[:1], jnp.int32)
    other = {"attn_logit_softcapping": None} if model_type == "gemma2" else {"rope_scaling_factor": 1.0}
    for change in ({"sliding_window": None}, other):
        changed = jax.jit(gemma.Gemma(dataclasses.replace(model.config, **change)).apply)(variables, row)
        assert _rel(changed, ours[:1]) > 1e-2, change
    if model_type == "gemma3_text":  # bfloat16 compute (float32 parameters): float32 logits, close
        low = jax.jit(gemma.Gemma(dataclasses.replace(model.config, dtype=jnp.bfloat16)).apply)(
            variables, row
        )
        assert low.dtype == jnp.float32 and _rel(low, ours[:1]) <= 5e-2
    scanned, svars, _ = lm.load(folder, scan_layers=True, remat=True)
    assert svars["params"]["layers"]["attn"]["query"]["kernel"].shape[0] == 2
    out = scanned.apply(svars, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))  # no jit
    assert _rel(np.asarray(out)[valid], ours[valid]) <= 1e-5


@pytest.mark.torch
def test_greedy_generation_matches_transformers_with_kv_cache(hf_gemma):
    import torch

    model_type, folder, hf = hf_gemma
    # Gemma 2 with unrolled layers, Gemma 3 with scanned ones (the layer type a scanned flag).
    model, variables, _ = lm.load(folder, scan_layers=model_type == "gemma3_text")
    prompt = np.asarray(jax.random.randint(jax.random.key(2), (1, 6), 3, SHAPES["vocab_size"]), np.int64)
    with torch.no_grad():
        ref = hf.generate(
            torch.from_numpy(prompt), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
        )[:, 6:].numpy()
    assert ref.shape == (1, 16)
    ours = lm.generate(model.apply, variables, jnp.asarray(prompt, jnp.int32), 16)
    np.testing.assert_array_equal(np.asarray(ours), ref)


def _random_deltas(variables, spec, seed=3):
    d = lj.init(jax.random.key(seed), variables, spec)
    leaves, tree = jax.tree_util.tree_flatten(d)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    )


@pytest.mark.torch
def test_wrap_equals_peft_lora_on_the_exported_adapter(hf_gemma, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model_type, folder, hf = hf_gemma
    model, variables, _ = lm.load(folder)
    deltas = _random_deltas(variables, lj.LoraSpec(rank=4, alpha=8.0, targets=ALL_LINEAR))
    ids = jnp.asarray(_ids_and_mask()[0][:1], jnp.int32)
    wrapped = jax.jit(lj.wrap(model.apply))
    with warnings.catch_warnings():
        warnings.simplefilter("error", lj.FallbackWarning)
        ours = np.asarray(wrapped(variables, deltas, ids))
    lpeft.save_peft(tmp_path, deltas, model_type)
    adapter = json.loads((tmp_path / "adapter_config.json").read_text())
    assert adapter["task_type"] == "CAUSAL_LM" and len(adapter["target_modules"]) == 7 * 2
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    theirs = _hf_logits(peft.PeftModel.from_pretrained(base, tmp_path).eval(), ids)
    assert _rel(theirs, _hf_logits(hf, ids)) > 1e-2  # the adapter changes the model ...
    assert _rel(ours, theirs) <= 1e-4  # ... the same way in both libraries
    # Back: PEFT's files load into the same deltas.
    again = lpeft.load_peft(tmp_path, variables, model_type)
    assert _rel(wrapped(variables, again, ids), ours) <= 1e-6


def test_scanned_remat_wrap_grad_has_no_fallback_and_equals_merge():
    cfg = _tiny(scan_layers=True, remat="dots", final_logit_softcapping=5.0, num_layers=2)
    model = gemma.Gemma(cfg)
    ids = jax.random.randint(jax.random.key(0), (1, 7), 0, 64)
    variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), ids))
    spec = lj.LoraSpec(rank=2, targets=gemma.DEFAULT_TARGETS, axes={".*": lj.LoraAxes((0,), (1,), (2,))})
    deltas = _random_deltas(variables, spec)

    def both(d):
        loss = lambda d: jnp.mean(lj.wrap(model.apply)(variables, d, ids) ** 2)  # noqa: E731
        return jax.value_and_grad(loss)(d), jnp.mean(model.apply(lj.merge(variables, d), ids) ** 2)

    with warnings.catch_warnings():
        warnings.simplefilter("error", lj.FallbackWarning)
        (value, grads), merged = jax.jit(both)(deltas)
    assert _rel(value, merged) <= 1e-5
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(grads))


@pytest.mark.torch
def test_folder_whose_tensors_do_not_fit_its_config(hf_gemma, tmp_path):
    from lora_jax.train import loop

    model_type, folder, _ = hf_gemma
    loop.check_model(str(folder))  # the fine-tuning engine takes a Gemma folder
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] = 80
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError,
        match=rf"{model_type} checkpoint does not fit its config.json .*\n.*tensor "
        r"'model.layers.0.mlp.gate_proj.weight' has shape \(64, 32\), expected \(80, 32\)",
    ):
        lm.load(bad)


def _tiny(model_type="gemma3_text", **kw) -> gemma.GemmaConfig:
    shapes = dict(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2
    )
    return gemma.GemmaConfig(model_type=model_type, head_dim=8, sliding_window=3, **{**shapes, **kw})


def test_config_from_hf_reads_both_layouts_and_the_family_defaults():
    legacy = dict(
        model_type="gemma3_text",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=7,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        rope_theta=1e6,
        rope_local_base_freq=1e4,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
        sliding_window_pattern=6,
        hidden_activation="gelu_pytorch_tanh",
    )
    cfg = gemma.config_from_hf(legacy)
    assert cfg.sliding == (True,) * 5 + (False, True)
    assert (
        cfg.rope_theta,
        cfg.rope_scaling_factor,
        cfg.rope_local_base_freq,
        cfg.rope_local_scaling_factor,
    ) == (
        1e6,
        8.0,
        1e4,
        1.0,
    )
    # Fields left out take transformers' defaults.
    assert (cfg.query_pre_attn_scalar, cfg.sliding_window, cfg.attn_logit_softcapping) == (256.0, 4096, None)
    g2 = gemma.config_from_hf({**legacy, "model_type": "gemma2"})
    assert (g2.attn_logit_softcapping, g2.final_logit_softcapping, g2.max_position_embeddings) == (
        50.0,
        30.0,
        8192,
    )
    rng = np.random.default_rng(0)
    tensors = {
        k: rng.normal(size=shape).astype(np.float32) for k, shape in gemma._expected_hf_shapes(cfg).items()
    }
    model, variables = gemma.from_hf(legacy, tensors, scan_layers=True)
    config, again = gemma.to_hf(model.config, variables)
    assert set(again) == set(tensors) and all(np.array_equal(again[k], tensors[k]) for k in tensors)
    # transformers 5's layout (rope_parameters per layer type) reads back to the same config.
    assert gemma.config_from_hf(config) == dataclasses.replace(cfg, sliding_window_pattern=6)
    # A multimodal Gemma 3 (Gemma3ForConditionalGeneration): its text model, the vision tower skipped.
    multimodal = {"model.vision_tower.vision_model.post_layernorm.weight": np.ones(3, np.float32)}
    for name, x in tensors.items():
        multimodal[name.replace("model.", "model.language_model.", 1)] = x
    wrapper = {"model_type": "gemma3", "text_config": legacy, "vision_config": {}}
    mm_model, mm_variables = gemma.from_hf(wrapper, multimodal, scan_layers=True)
    assert mm_model.config == model.config
    jax.tree_util.tree_map(np.testing.assert_array_equal, mm_variables, variables)
    assert (
        registry.get("gemma3").hf_module("attn/query", 2) == "model.language_model.layers.2.self_attn.q_proj"
    )
    g2 = gemma.GemmaConfig(model_type="gemma2", num_layers=3)
    assert g2.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert g2.rope_local_base_freq == g2.rope_theta


@pytest.mark.parametrize(
    "field, match",
    [
        (
            {"hidden_activation": "relu"},
            r"hidden_activation='relu' is not supported for gemma2; Gemma uses the tanh",
        ),
        ({"attention_bias": True}, r"attention_bias=True is not supported for gemma2; set it to false"),
        ({"use_bidirectional_attention": True}, r"use_bidirectional_attention=True is not supported"),
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
            r"rope_parameters has rope_type='yarn', which is not supported for gemma2; supported: 'default' "
            r"and 'linear'",
        ),
        (
            {"layer_types": ["sliding_attention", "chunked_attention"]},
            r"layer_types=\['sliding_attention', 'chunked",
        ),
        (
            {"model_type": "gemma"},
            r"model_type='gemma' is not a Gemma 2/3 text model; supported: \['gemma2', ",
        ),
    ],
)
def test_unsupported_config_field_values_are_named(field, match):
    config = dict(
        model_type="gemma2",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        head_dim=8,
    )
    with pytest.raises(ValueError, match=match):
        gemma.config_from_hf({**config, **field})


def test_remat_policies_and_logical_axes():
    with pytest.raises(
        ValueError, match=r"remat='some' is not a remat policy; use one of \['none', 'dots', 'full'\]"
    ):
        _tiny(remat="some")
    assert _tiny(remat=True).remat == "full" and _tiny(remat=False).remat == "none"
    specs = gemma.logical_partition_specs(gemma.Gemma(_tiny(scan_layers=True, tie_word_embeddings=False)))
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    assert tuple(specs["params"]["lm_head"]["kernel"]) == ("embed", "vocab")
    axes = {a for s in jax.tree_util.tree_leaves(specs, is_leaf=is_spec) for a in s}
    assert axes - {None} <= {axis for axis, _ in gemma.FAMILY.logical_axis_rules}


def test_train_step_head_interception_sees_soft_capped_logits():
    """The train step projects only the loss positions / computes the loss chunk by chunk by intercepting
    the module named ``lm_head``: Gemma's soft-cap is inside that call, so both see capped logits."""
    from lora_jax.train import loss as loss_lib
    from lora_jax.train import step

    cfg = _tiny(model_type="gemma2", final_logit_softcapping=0.5)  # tied: the head is embed/embedding
    model = gemma.Gemma(cfg)
    ids = jax.random.randint(jax.random.key(0), (2, 5), 0, 64)
    mask = jnp.ones_like(ids)
    variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), ids))
    logits = jax.jit(model.apply)(variables, ids)
    assert float(jnp.abs(logits).max()) <= 0.5 + 1e-6  # the cap is active
    positions = jnp.asarray([[1, 3], [0, 4]], jnp.int32)
    picked = jax.jit(step.at_positions(model.apply))(variables, ids, mask, positions)
    np.testing.assert_allclose(picked, jnp.take_along_axis(logits, positions[..., None], axis=1), atol=1e-6)
    targets, weights = jnp.roll(ids, -1, axis=1), jnp.ones(ids.shape, jnp.float32)
    got = jax.jit(step.chunked_lm_loss(model.apply, chunk=2))(variables, ids, mask, targets, weights)
    want = loss_lib.token_loss(logits, targets, weights)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


def test_planner_table_has_the_public_gemma_shapes():
    """Parameter counts of the planner's Gemma entries, built by this module, against published sizes."""
    from lora_jax.train import plan_configs

    def count(name):
        cfg = gemma.config_from_hf(plan_configs.PUBLIC_CONFIGS[name]["config"])
        return sum(int(np.prod(s)) for s in gemma._expected_hf_shapes(cfg).values())

    assert count("gemma-2-9b") / 1e9 == pytest.approx(9.24, abs=0.01)
    assert count("gemma-2-27b") / 1e9 == pytest.approx(27.23, abs=0.01)
    # KerasHub's gemma3_12b_text: 11,765,788,416 with a 262,144-token vocabulary (64 rows fewer).
    assert count("gemma-3-12b") == 11_765_788_416 + 64 * 3840
    assert count("gemma-3-27b") / 1e9 == pytest.approx(27.01, abs=0.01)
    assert plan_configs.resolve("gemma-3-27b").notes[0].startswith("Gemma 3 planned with the Llama module")
