"""Fully trained leaves (`LoraSpec(train_full=...)`, `lj.FullLeaf`, PEFT's ``modules_to_save``).

References: `wrap` against the function at the merged params (values and gradients, float32, <= 1e-6
relative), SGD steps by hand, the adapter file and PEFT round trips (a tiny BERT sequence classifier in
PyTorch/PEFT, logits <= 1e-4), and a MiniLM classifier trained with its head in full whose saved and
reloaded adapter reproduces its validation logits and accuracy bit for bit.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax as lj
from lora_jax.adapter import load_adapter, save_adapter, spec_from_json, spec_to_json


class Net(nn.Module):
    """Dense -> LayerNorm -> relu -> head: a kernel for LoRA, a norm and a head to train in full."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(16, name="body")(x)
        h = nn.relu(nn.LayerNorm(name="norm")(h))
        return nn.Dense(3, name="head")(h)


SPEC = lj.LoraSpec(
    rank=2, alpha=4.0, targets="params/body/kernel", train_full=("params/head/.*", ".*/norm/scale")
)


def _setup(key=0):
    model = Net()
    x = jax.random.normal(jax.random.key(key), (5, 8))
    params = model.init(jax.random.key(1), x)
    return model, params, x


def _perturbed(deltas, key=2):
    """Deltas moved away from their init: b and every fully trained value get random offsets."""
    leaves, treedef = jax.tree_util.tree_flatten(deltas)
    keys = jax.random.split(jax.random.key(key), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)]
    )


def test_init_copies_and_merge_of_a_fresh_tree_is_the_params():
    _, params, _ = _setup()
    d = lj.init(jax.random.key(0), params, SPEC)
    full = d["params"]["head"]["kernel"]
    assert lj.is_full(full) and not lj.is_delta(full)
    assert lj.is_delta(d["params"]["body"]["kernel"]) and d["params"]["body"]["bias"] is None
    assert d["params"]["norm"]["bias"] is None and lj.is_full(d["params"]["norm"]["scale"])
    np.testing.assert_array_equal(full.value, params["params"]["head"]["kernel"])
    assert full.value is not params["params"]["head"]["kernel"]
    merged = lj.merge(params, d)
    for a, b in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    half = lj.init(jax.random.key(0), params, lj.LoraSpec(**{**SPEC.__dict__, "dtype": jnp.bfloat16}))
    assert half["params"]["head"]["bias"].value.dtype == jnp.bfloat16
    # A bfloat16 base: the trained copy is float32; merge and wrap cast it back to the base dtype.
    p16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    d16 = lj.init(jax.random.key(0), p16, SPEC)
    assert d16["params"]["head"]["kernel"].value.dtype == jnp.float32
    assert lj.merge(p16, d16)["params"]["head"]["kernel"].dtype == jnp.bfloat16


@pytest.mark.parametrize("jit", [False, True])
def test_wrap_matches_merge_values_and_gradients(jit):
    model, params, x = _setup()
    d = _perturbed(lj.init(jax.random.key(0), params, SPEC))
    wrapped = lj.wrap(model.apply)
    f = jax.jit(wrapped) if jit else wrapped
    y, y_ref = f(params, d, x), model.apply(lj.merge(params, d), x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    if not jit:
        return  # gradients under jit only: eager, the interpreter runs op by op (slow, same result)
    # Gradient of a fully trained leaf == gradient of the model w.r.t. that parameter at the merged params.
    loss = lambda d: jnp.sum(jnp.sin(wrapped(params, d, x)))
    g = jax.jit(jax.grad(loss))(d)
    g_ref = jax.grad(lambda p: jnp.sum(jnp.sin(model.apply(p, x))))(lj.merge(params, d))
    for name in ("kernel", "bias"):
        np.testing.assert_allclose(
            g["params"]["head"][name].value, g_ref["params"]["head"][name], rtol=1e-5, atol=1e-6
        )
    np.testing.assert_allclose(
        g["params"]["norm"]["scale"].value, g_ref["params"]["norm"]["scale"], rtol=1e-5
    )


def test_wrap_on_a_quantized_base_leaf():
    """A kernel stored int8 (QLoRA base) and trained in full: its float32 copy replaces it exactly."""
    model, params, x = _setup()
    q = lj.quantize(params, lj.QuantSpec(format="int8", block_size=4, targets=".*/kernel"))
    d = _perturbed(lj.init(jax.random.key(0), q, SPEC))
    np.testing.assert_array_equal(
        lj.init(jax.random.key(0), q, SPEC)["params"]["head"]["kernel"].value,
        q["params"]["head"]["kernel"].dequantize(),
    )
    y = jax.jit(lj.wrap(model.apply))(q, d, x)
    np.testing.assert_allclose(y, model.apply(lj.merge(q, d), x), rtol=1e-5, atol=1e-5)


@pytest.mark.standard_promotion  # optax.adam's bias correction computes `float ** int32`
def test_optimizer_trains_full_leaves_and_count_includes_them():
    _, params, _ = _setup()
    d = lj.init(jax.random.key(0), params, SPEC)
    head = params["params"]["head"]
    assert lj.count_params(d) == 8 * 2 + 2 * 16 + head["kernel"].size + head["bias"].size + 16
    mask = lj.trainable_mask({"p": params, "d": d})
    assert mask["d"]["params"]["head"]["kernel"] == lj.FullLeaf(True)
    assert mask["p"]["params"]["head"]["kernel"] is False
    tree = {"p": params, "d": d}
    g = jax.tree_util.tree_map(jnp.ones_like, tree)
    for tx, b_rate in (
        (lj.optimizer(optax.sgd(0.1)), 1.0),
        (lj.optimizer(lj.loraplus(optax.sgd(0.1), 16.0)), 16.0),
    ):
        upd, _ = tx.update(g, tx.init(tree), tree)
        np.testing.assert_allclose(upd["d"]["params"]["head"]["kernel"].value, -0.1)  # a's (base) rate
        np.testing.assert_allclose(upd["d"]["params"]["body"]["kernel"].b, -0.1 * b_rate, rtol=1e-6)
        assert float(jnp.abs(upd["p"]["params"]["head"]["kernel"]).max()) == 0.0
    tx = lj.optimizer(optax.adam(1e-2))
    state = tx.init(tree)
    shapes = [x.shape for x in jax.tree_util.tree_leaves(state) if hasattr(x, "shape") and x.ndim > 0]
    assert (
        shapes.count(head["kernel"].shape) == 2
    )  # Adam's two moments for the trained head, none for the base


def test_unmerge_raises_naming_the_path():
    _, params, _ = _setup()
    d = lj.init(jax.random.key(0), params, SPEC)
    with pytest.raises(
        ValueError, match=r"unmerge: params/head/bias is trained in full .* cannot be recovered"
    ):
        lj.unmerge(lj.merge(params, d), d)


def test_delta_shardings_follow_w_and_delta_weights_skip_full():
    _, params, _ = _setup()
    d = lj.init(jax.random.key(0), params, SPEC)
    mesh = jax.make_mesh((1, 1), ("fsdp", "tensor"))
    sh = jax.tree_util.tree_map(lambda x: NamedSharding(mesh, P(*([None] * (x.ndim - 1)), "tensor")), params)
    s = lj.delta_shardings(d, sh)
    assert s["params"]["head"]["kernel"] == lj.FullLeaf(sh["params"]["head"]["kernel"])
    assert s["params"]["body"]["kernel"].b.spec == P(None, "tensor")
    placed = jax.device_put(d, s)
    assert placed["params"]["head"]["kernel"].value.sharding.spec == P(None, "tensor")
    specs = lj.delta_partition_specs(d, jax.tree_util.tree_map(lambda x: x.spec, sh))
    assert specs["params"]["norm"]["scale"] == lj.FullLeaf(P("tensor"))
    dw = lj.delta_weights(d)
    assert dw["params"]["head"]["kernel"] is None and dw["params"]["body"]["kernel"].shape == (8, 16)


def test_residual_init_keeps_full_leaves():
    _, params, _ = _setup()
    spec = lj.LoraSpec(rank=2, targets="params/body/kernel", init="pissa", train_full="params/head/kernel")
    res, d = lj.init_with_residual(jax.random.key(0), params, spec)
    assert lj.is_full(d["params"]["head"]["kernel"])
    np.testing.assert_array_equal(res["params"]["head"]["kernel"], params["params"]["head"]["kernel"])
    back = lj.residual.to_original_base(d, d)
    assert back["params"]["head"]["kernel"] is d["params"]["head"]["kernel"]


def test_errors():
    _, params, _ = _setup()
    overlap = lj.LoraSpec(rank=2, targets=".*/kernel", train_full="params/head/.*")
    with pytest.raises(
        ValueError, match=r"both select \['params/head/kernel'\].*either trained in full or adapted"
    ):
        lj.init(jax.random.key(0), params, overlap)
    nothing = lj.LoraSpec(rank=2, targets="params/body/kernel", train_full="params/classifier/.*")
    with pytest.raises(
        ValueError, match=r"train_full pattern 'params/classifier/.\*' matches no parameter.*Closest"
    ):
        lj.init(jax.random.key(0), params, nothing)
    with pytest.raises(TypeError, match=r"LoraSpec.train_full must be a regex"):
        lj.LoraSpec(train_full=3)
    ints = {**params, "step": jnp.zeros((), jnp.int32)}
    with pytest.raises(
        TypeError, match=r"step: LoraSpec.train_full selects a leaf that is not a floating-point"
    ):
        lj.init(jax.random.key(0), ints, lj.LoraSpec(rank=2, targets="params/body/kernel", train_full="step"))
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    with pytest.raises(TypeError, match=r"params/head/bias: LoraSpec.train_full copies the base value"):
        lj.init(jax.random.key(0), abstract, SPEC)
    d = lj.init(jax.random.key(0), params, SPEC)
    bad = jax.tree_util.tree_map(lambda x: x, d)
    bad["params"]["head"]["bias"] = lj.FullLeaf(jnp.zeros(4))
    with pytest.raises(
        ValueError, match=r"params/head/bias: delta does not fit .* fully trained value has shape \(4,\)"
    ):
        lj.merge(params, bad)
    with pytest.raises(ValueError, match=r"params/head/bias: delta does not fit"):
        lj.wrap(Net().apply)(params, bad, jnp.ones((1, 8)))


def test_adapter_file_round_trip_and_misfit(tmp_path):
    model, params, x = _setup()
    d = _perturbed(lj.init(jax.random.key(0), params, SPEC))
    assert spec_from_json(json.loads(json.dumps(spec_to_json(SPEC)))) == SPEC
    f = save_adapter(tmp_path / "a", d, SPEC, verbose=False)
    back = load_adapter(f, params)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(d), strict=True):
        np.testing.assert_array_equal(a, b)
    assert lj.is_full(back["params"]["head"]["kernel"])
    np.testing.assert_array_equal(lj.wrap(model.apply)(params, back, x), lj.wrap(model.apply)(params, d, x))
    # Another head size: refused, naming the leaf and both shapes; nothing loaded.
    wide = jax.tree_util.tree_map(lambda x: x, params)
    wide["params"]["head"] = {"kernel": jnp.zeros((16, 5)), "bias": jnp.zeros(5)}
    with pytest.raises(
        ValueError, match=r"params/head/kernel: does not fit the model's parameter of shape \(16, 5\)"
    ):
        load_adapter(f, wide)
    # An adapter that lost its head (the stored spec trains it in full) is a partial load.
    d_nohead = jax.tree_util.tree_map(lambda x: x, d)
    d_nohead["params"]["head"] = {"kernel": None, "bias": None}
    g = save_adapter(tmp_path / "b", d_nohead, SPEC, verbose=False)
    with pytest.raises(ValueError, match=r"leaves 2 parameter\(s\) that it targets .*params/head/kernel"):
        load_adapter(g, params)


# ---- PEFT modules_to_save: a tiny BERT sequence classifier in PyTorch -------------------------------------


def _torch_classifier(seed=0):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    class Classifier(transformers.BertModel):
        """BertModel + mean pooling + ``classifier`` Linear: the PyTorch twin of `bert.BertClassifier`."""

        def __init__(self, config):
            super().__init__(config, add_pooling_layer=False)
            self.classifier = torch.nn.Linear(config.hidden_size, 2)

        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            h = super().forward(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask[..., None].to(h.dtype)
            return self.classifier((h * m).sum(1) / m.sum(1).clamp(min=1e-9))

    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=60,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        attn_implementation="eager",
    )
    return Classifier(config).eval(), config


def _ours(torch_model, config):
    """Our `BertClassifier` with the PyTorch model's weights (its head as ``params/classifier``)."""
    from lora_jax.models import bert

    sd = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    model, variables = bert.from_hf(config.to_dict(), sd)
    head = {"kernel": jnp.asarray(sd["classifier.weight"].T), "bias": jnp.asarray(sd["classifier.bias"])}
    clf = bert.BertClassifier(model.config, num_labels=2)
    return clf, {"params": {**variables["params"], "classifier": head}}


def _batch():
    ids = np.array([[2, 5, 9, 11, 3, 0], [2, 7, 7, 40, 33, 3]], np.int32)
    mask = (ids > 0).astype(np.int32)
    return ids, mask


BERT_SPEC = lj.LoraSpec(
    rank=2, alpha=4.0, targets=r".*/attn/(query|value)/kernel", train_full=r"params/classifier/.*"
)


@pytest.mark.torch
def test_peft_loads_our_export_with_the_head(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    hf, config = _torch_classifier()
    clf, variables = _ours(hf, config)
    d = _perturbed(lj.init(jax.random.key(0), variables, BERT_SPEC))
    ids, mask = _batch()
    ours = np.asarray(lj.wrap(clf.apply)(variables, d, ids, mask))
    lj.peft.save_peft(tmp_path, d, "bert")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["classifier"]
    from safetensors.numpy import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    with torch.no_grad():
        theirs = pm(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).numpy()
    assert np.abs(theirs - np.asarray(clf.apply(variables, ids, mask))).max() > 1e-2  # the head did change
    np.testing.assert_allclose(theirs, ours, atol=1e-4)


@pytest.mark.torch
def test_we_load_peft_modules_to_save(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    hf, config = _torch_classifier(seed=1)
    clf, variables = _ours(hf, config)
    pc = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        task_type="FEATURE_EXTRACTION",
    )
    pm = peft.get_peft_model(hf, pc)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    pm.eval()
    ids, mask = _batch()
    with torch.no_grad():
        theirs = pm(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).numpy()
    pm.save_pretrained(str(tmp_path))
    d = lj.peft.load_peft(tmp_path, variables, "bert")
    assert lj.is_full(d["params"]["classifier"]["kernel"]) and lj.is_full(d["params"]["classifier"]["bias"])
    np.testing.assert_allclose(np.asarray(lj.wrap(clf.apply)(variables, d, ids, mask)), theirs, atol=1e-4)
    # Another number of labels: refused, naming the tensor and both shapes.
    wide = {
        "params": {**variables["params"], "classifier": {"kernel": jnp.zeros((16, 3)), "bias": jnp.zeros(3)}}
    }
    with pytest.raises(
        ValueError,
        match=r"classifier.bias -> params/classifier/bias: .* shape \(2,\), which does not fit .* \(3,\)",
    ):
        lj.peft.load_peft(tmp_path, wide, "bert")


def test_peft_names_of_full_leaves_and_unnamed_ones_refused():
    from lora_jax.models import bert

    config = bert.BertConfig(vocab_size=60, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32)
    _, variables = bert.init(jax.random.key(0), config, num_labels=2)
    named = r"params/embeddings/(ln/scale|word/embedding)|.*/layers_1/attn_ln/bias|.*layers_0/attn/out/bias"
    spec = lj.LoraSpec(
        rank=2, targets=r".*/attn/query/kernel", train_full=rf"{named}|.*/layers_0/mlp/act_scale"
    )
    variables["params"]["encoder"]["layers_0"]["mlp"]["act_scale"] = jnp.ones(4)
    d = lj.init(jax.random.key(0), variables, spec)
    with pytest.raises(
        ValueError, match=r"layers_0/mlp/act_scale: this fully trained leaf .* has no Hugging Face bert"
    ):
        lj.peft.to_peft(d, "bert")
    del d["params"]["encoder"]["layers_0"]["mlp"]["act_scale"]
    config_, tensors = lj.peft.to_peft(d, "bert")
    assert config_["modules_to_save"] == [
        "embeddings.LayerNorm",
        "embeddings.word_embeddings",
        "encoder.layer.0.attention.output.dense",
        "encoder.layer.1.attention.output.LayerNorm",
    ]
    prefix = "base_model.model."
    assert tensors[prefix + "embeddings.word_embeddings.weight"].shape == (
        60,
        16,
    )  # an embedding: not transposed
    for name in ("embeddings.LayerNorm.weight", "encoder.layer.1.attention.output.LayerNorm.bias"):
        assert tensors[prefix + name].shape == (16,)


# ---- MiniLM: a real classifier trained with its head in full, saved and reloaded ------------------------


@pytest.mark.slow
@pytest.mark.assets
@pytest.mark.standard_promotion  # optax.adamw's bias correction
def test_minilm_classifier_with_trained_head_reloads_exactly(minilm, movie_reviews, tmp_path):
    from lora_jax import data
    from lora_jax.models import bert

    model, variables, tok = minilm
    # The first two layers of MiniLM (real weights and tokenizer), a fresh head trained in full.
    cfg = bert.BertConfig(**{**model.config.__dict__, "num_layers": 2})
    p = variables["params"]
    small = {
        "params": {
            "embeddings": p["embeddings"],
            "encoder": {k: p["encoder"][k] for k in ("layers_0", "layers_1")},
        }
    }
    clf, base = bert.classifier_from_encoder(jax.random.key(0), bert.BertModel(cfg), small)
    train = data.encode_classification(movie_reviews["train"][:32], tok, 16)
    val = data.encode_classification(movie_reviews["validation"][:48], tok, 16)
    spec = lj.LoraSpec(
        rank=4, alpha=8.0, targets=r".*/attn/(query|value)/kernel", train_full=r"params/classifier/.*"
    )
    d = lj.init(jax.random.key(1), base, spec)
    tx = optax.adamw(3e-3)
    state = tx.init(d)
    apply = lj.wrap(clf.apply)

    @jax.jit
    def step(d, state, ids, mask, y):
        def loss(d):
            logits = apply(base, d, ids, mask)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        l, g = jax.value_and_grad(loss)(d)
        u, state = tx.update(g, state, d)
        return optax.apply_updates(d, u), state, l

    for i in range(4):
        sl = slice(8 * i, 8 * i + 8)
        d, state, _ = step(d, state, train["input_ids"][sl], train["attention_mask"][sl], train["labels"][sl])
    assert (
        float(
            jnp.abs(d["params"]["classifier"]["kernel"].value - base["params"]["classifier"]["kernel"]).max()
        )
        > 0
    )
    logits = jax.jit(apply)(base, d, val["input_ids"], val["attention_mask"])
    save_adapter(tmp_path, d, spec, verbose=False)
    # A fresh base with another random head: the file brings the trained one.
    _, other = bert.classifier_from_encoder(jax.random.key(7), bert.BertModel(cfg), small)
    back = load_adapter(tmp_path, other)
    again = jax.jit(apply)(other, back, val["input_ids"], val["attention_mask"])
    np.testing.assert_array_equal(np.asarray(again), np.asarray(logits))
    acc = lambda z: float((np.argmax(np.asarray(z), -1) == val["labels"]).mean())
    assert acc(again) == acc(logits)
    merged = jax.jit(clf.apply)(lj.merge(other, back), val["input_ids"], val["attention_mask"])
    np.testing.assert_allclose(np.asarray(merged), np.asarray(logits), atol=1e-4)


# ---- `lora-jax finetune` flags: --dora, --init, --loraplus-ratio, --train-full --------------------------


@pytest.fixture(scope="module")
def tiny_llama():
    from lora_jax.train import loop

    return loop.tiny_llama(64)


def _built(tiny_llama, argv):
    from lora_jax.train import config, loop
    from lora_jax.train import mesh as mesh_lib

    cfg = config.from_args(["--model", "tiny-llama", "--warmup", "0", "--lr", "1e-2", *argv])
    model, variables = tiny_llama
    mesh = mesh_lib.make_mesh(cfg.mesh)
    setup = loop.build(
        model,
        variables,
        loop.lora_spec(cfg, variables),
        mesh=mesh,
        lr=cfg.lr,
        steps=cfg.steps,
        warmup=cfg.warmup,
        loraplus_ratio=cfg.loraplus_ratio,
    )
    return cfg, variables, setup


@pytest.mark.standard_promotion  # optax.adamw's bias correction
def test_cli_dora_loraplus_and_train_full_reach_spec_and_optimizer(tiny_llama):
    cfg, variables, setup = _built(
        tiny_llama, ["--dora", "--loraplus-ratio", "4", "--train-full", "params/final_norm/scale"]
    )
    assert setup.spec.dora and setup.spec.train_full == ("params/final_norm/scale",)
    q = setup.deltas["params"]["layers"]["attn"]["query"]["kernel"]
    assert isinstance(q, lj.DoraDelta)
    norm = setup.deltas["params"]["final_norm"]["scale"]
    np.testing.assert_array_equal(norm.value, variables["params"]["final_norm"]["scale"])
    g = jax.tree_util.tree_map(jnp.ones_like, setup.deltas)
    upd, _ = setup.tx.update(g, setup.opt_state, setup.deltas)
    q_upd = upd["params"]["layers"]["attn"]["query"]["kernel"]
    # First adamw step at the peak rate: lr·sign(g) for a and the full leaf, 4x that for b and m.
    np.testing.assert_allclose(q_upd.a, -1e-2, rtol=1e-4)
    np.testing.assert_allclose(q_upd.b, -4e-2, rtol=1e-4)
    np.testing.assert_allclose(q_upd.m, -4e-2, rtol=1e-4)
    np.testing.assert_allclose(upd["params"]["final_norm"]["scale"].value, -1e-2, rtol=1e-4)


def test_cli_init_pissa_trains_on_the_residual_and_exports_against_the_original(tiny_llama, tmp_path):
    from lora_jax.train import loop

    cfg, variables, setup = _built(tiny_llama, ["--init", "pissa", "--rank", "4", "--no-export-merged"])
    assert setup.spec.init == "pissa" and setup.initial is not None
    k = ("params", "layers", "attn", "query", "kernel")
    w0, res = variables, setup.params
    for key in k:
        w0, res = w0[key], res[key]
    assert float(jnp.abs(res - w0).max()) > 1e-3  # the base was replaced by the residual
    merged = lj.merge(setup.params, setup.deltas)
    for a, b in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(variables), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    trained = _perturbed(setup.deltas)
    loop.export(cfg, tmp_path, setup, trained, {"name": "tiny"}, {})
    back = load_adapter(tmp_path / "adapter", variables)
    assert back["params"]["layers"]["attn"]["query"]["kernel"].rank == 8  # 2r against the original base
    want, got = lj.merge(setup.params, trained), lj.merge(variables, back)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize(
    "argv, match",
    [
        (
            ["--init", "svd"],
            r"--init must be one of kaiming, gaussian, pissa, olora or pissa_niter_<n>, got 'svd'",
        ),
        (
            ["--loraplus-ratio", "0"],
            r"--loraplus-ratio must be a finite number > 0 \(the paper recommends 16\)",
        ),
        (["--dora", "--quantize", "nf4"], r"--dora with --quantize is not supported"),
        (["--dora", "--init", "olora"], r"--dora with --init olora is not supported"),
        (["--train-full", "(head"], r"--train-full '\(head' is not a regular expression"),
    ],
)
def test_cli_variant_flag_errors(argv, match):
    from lora_jax.train import config

    with pytest.raises(ValueError, match=match):
        config.from_args(argv)


def test_train_checkpoint_round_trip_keeps_full_leaves(tmp_path):
    from lora_jax import checkpoint

    _, params, _ = _setup()
    d = _perturbed(lj.init(jax.random.key(0), params, SPEC))
    ckpt = checkpoint.TrainCheckpointer(tmp_path / "ckpt", every=1, async_save=False)
    try:
        ckpt.save(1, {"deltas": d}, {"note": "full"}, force=True)
        back, _ = ckpt.restore({"deltas": lj.init(jax.random.key(0), params, SPEC)})
    finally:
        ckpt.close()
    assert lj.is_full(back["deltas"]["params"]["head"]["kernel"])
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves({"deltas": d}), strict=True):
        np.testing.assert_array_equal(a, b)
