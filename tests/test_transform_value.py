"""The tracked value: factors aligned to W's axes for every delta layout, dense value equal to merge.

Tolerance: 1e-6 relative in float32 (one rank-3 contraction summed in a different order than merge).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import LoraAxes
from lora_jax.transform.value import LoraValue

R = 3

# name: (W shape, axes)
LAYOUTS = {
    "dense": ((16, 8), LoraAxes()),
    "conv": ((3, 3, 4, 8), LoraAxes(inputs=(0, 1, 2), outputs=(3,))),
    "stacked": ((5, 16, 8), LoraAxes(stack=(0,), inputs=(1,), outputs=(2,))),
    "dense_general": ((16, 4, 6), LoraAxes(inputs=(0,), outputs=(1, 2))),
    "transposed": ((8, 16), LoraAxes(inputs=(1,), outputs=(0,))),
    "cycled": ((8, 5, 16), LoraAxes(stack=(1,), inputs=(2,), outputs=(0,))),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_aligned_factors_and_dense_value(name):
    shape, axes = LAYOUTS[name]
    w = jax.random.normal(jax.random.key(0), shape)
    spec = lj.LoraSpec(rank=R, alpha=6.0, targets="w", axes={"w": axes})
    d = lj.init(jax.random.key(1), {"w": w}, spec)["w"]
    d = lj.LoraDelta(d.a, jax.random.normal(jax.random.key(2), d.b.shape), d.scale, d.axes)  # b != 0
    v = LoraValue.of(w, d, "w")
    # a varies along W's stack and input axes only, b along its stack and output axes only.
    for i, n in enumerate(shape):
        assert v.a.shape[i] == (n if i in axes.stack + axes.inputs else 1)
        assert v.b.shape[i] == (n if i in axes.stack + axes.outputs else 1)
    assert v.a.shape[-1] == v.b.shape[-1] == R
    want = lj.merge({"w": w}, {"w": d})["w"]
    np.testing.assert_allclose(v.dense(), want, rtol=1e-6, atol=1e-6)


def test_arrays_round_trip_and_stacking():
    w = jnp.ones((4, 6, 5))
    d = lj.init(
        jax.random.key(0), {"w": w}, lj.LoraSpec(rank=R, targets="w", axes={"w": LoraAxes((0,), (1,), (2,))})
    )["w"]
    v = LoraValue.of(w, d, "w")
    back = v.with_arrays(v.arrays())
    assert all(x is y for x, y in zip(back.arrays(), v.arrays(), strict=True)) and back.origin == v.origin
    # A factor of size 1 along the scanned axis is broadcast to the scan length.
    flat = v.replace(a=v.a[:1])
    w_s, a_s, b_s = flat.stacked_arrays(4)
    assert w_s.shape == (4, 6, 5) and a_s.shape == (4, 6, 1, R) and b_s.shape == (4, 1, 5, R)
    sliced = v.with_arrays((w[0], v.a[0], v.b[0]), origin=v.origin[1:])
    assert sliced.origin == (frozenset({1}), frozenset({2})) and sliced.path == "w"
