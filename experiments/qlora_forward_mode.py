"""Could `wrap` on a quantized base support forward-mode autodiff? The compiled memory of the alternatives.

`wrap` decodes a quantized kernel at each use inside a ``jax.custom_vjp`` whose backward pass decodes it
again, tied to the cotangent, so that no dense copy of W lives from the forward to the backward pass. JAX
cannot apply forward mode (``jax.jvp``, ``jax.jacfwd``) to a custom_vjp. The public ways to allow it give
reverse mode as the transpose of a linear tangent map, in which the backward's decode can only depend on
forward-pass values. This script compiles the train step (gradient w.r.t. the deltas) of a stack of
quantized Dense layers with each way of writing the base product and reports its temporaries against
plain LoRA on the dense base (the growth in dense kernels), and whether ``jax.jvp`` runs:

- ``custom_vjp``: what `wrap` does (`lora_jax.transform.quantized._base_use`);
- ``checkpoint``: the use under ``jax.checkpoint`` (``nothing_saveable``): the backward recomputes the
  decode;
- ``custom_jvp``: a custom JVP whose tangent ``jvp(x ↦ x·dequant(Wq))`` is under ``jax.checkpoint``, the
  decode untied from the forward's (no common subexpression with it).

(``jax.custom_derivatives.linear_call`` could tie the transposed decode to the cotangent, but it has no
batching rule, so ``vmap`` of a gradient would fail, and its JVP requires constant residuals.)

Usage:
    python experiments/qlora_forward_mode.py [--layers 6] [--dim 256]

Prints a table and writes ``results/qlora_forward_mode.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp

import lora_jax as lj
from lora_jax.transform import quantized as Q
from lora_jax.transform.interpreter import bind

ORIGINAL = Q._base_use


def _parts(eqn, v, operands, i):
    others = operands[:i] + operands[i + 1 :]
    op_args = tuple(tuple(inv[:j] + inv[j + 1 :]) for _, inv, j in v.ops)

    def run(others, op_args, q):
        q = tuple(None if a is None else jax.lax.stop_gradient(a) for a in q)
        return bind(eqn, [*others[:i], Q._decode_view(v, q, op_args), *others[i:]])[0]

    def primal(others, op_args, q):
        x = next((o for o in others if jnp.issubdtype(jnp.result_type(o), jnp.inexact)), None)
        return run(others, op_args, q if x is None else Q._tied(q, x))

    return list(others), op_args, tuple(v.q), run, primal


def base_use_checkpoint(eqn, v, operands, i):
    others, op_args, q, _, primal = _parts(eqn, v, operands, i)
    return jax.checkpoint(primal, policy=jax.checkpoint_policies.nothing_saveable)(others, op_args, q)


def base_use_custom_jvp(eqn, v, operands, i):
    others, op_args, q, run, primal = _parts(eqn, v, operands, i)

    @jax.custom_jvp
    def use(others, op_args, q):
        return primal(others, op_args, q)

    @use.defjvp
    def _jvp(primals, tangents):
        o, a, qq = primals
        t_o, t_a, _ = tangents

        @jax.checkpoint
        def tangent(o, a, qq, t_o, t_a):
            return jax.jvp(lambda o, a: run(o, a, qq), (o, a), (t_o, t_a))[1]

        return primal(o, a, qq), tangent(o, a, qq, t_o, t_a)

    return use(others, op_args, q)


VARIANTS = {"custom_vjp": ORIGINAL, "checkpoint": base_use_checkpoint, "custom_jvp": base_use_custom_jvp}


class Deep(nn.Module):
    layers: int
    dim: int

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            x = x + nn.Dense(self.dim, name=f"dense_{i}")(jnp.tanh(x))
        return x


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--dim", type=int, default=256)
    args = ap.parse_args()
    m = Deep(args.layers, args.dim)
    x = jax.random.normal(jax.random.key(1), (8, 16, args.dim))
    v = m.init(jax.random.key(0), x)
    q = lj.quantize(v, lj.QuantSpec(targets=".*/kernel"))
    d = lj.init(jax.random.key(0), v, lj.LoraSpec(rank=8, targets=".*/kernel"))
    d = jax.tree.map(lambda t: t + 0.01, d)  # b != 0
    loss = lambda d, p: jnp.mean(jnp.square(lj.wrap(m.apply)(p, d, x)))  # noqa: E731
    step = jax.jit(jax.grad(loss))
    kernel = args.dim * args.dim * 4
    lora_temp = step.lower(d, v).compile().memory_analysis().temp_size_in_bytes
    want = step(d, lj.dequantize(q))
    rows = []
    for name, fn in VARIANTS.items():
        Q._base_use = fn
        try:
            temp = jax.jit(jax.grad(loss)).lower(d, q).compile().memory_analysis().temp_size_in_bytes
            got = jax.jit(jax.grad(loss))(d, q)
            err = max(
                float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w)))
                for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
            )
            t = jax.tree.map(jnp.ones_like, d)
            try:
                jax.jvp(lambda d: loss(d, q), (d,), (t,))
                jvp = "runs"
            except TypeError as e:
                jvp = "TypeError: " + str(e).split(":")[0][:40]
        finally:
            Q._base_use = ORIGINAL
        rows.append(
            dict(
                variant=name,
                temp_mb=temp / 2**20,
                growth_kernels=(temp - lora_temp) / kernel,
                grad_rel_err=err,
                jvp=jvp,
            )
        )
    print(
        f"{args.layers} quantized Dense kernels {args.dim}x{args.dim} (nf4), batch 8x16, rank 8; "
        f"plain LoRA temporaries {lora_temp / 2**20:.2f} MB"
    )
    print("| base product | temp MB | growth over plain LoRA (dense kernels) | grad rel. err | jax.jvp |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['temp_mb']:.2f} | {r['growth_kernels']:.2f} | {r['grad_rel_err']:.1e} "
            f"| {r['jvp']} |"
        )
    out = pathlib.Path(__file__).parent / "results" / "qlora_forward_mode.json"
    out.write_text(json.dumps(dict(config=vars(args), lora_temp_bytes=lora_temp, rows=rows), indent=1))


if __name__ == "__main__":
    main()
