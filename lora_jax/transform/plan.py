"""The plan of a factored ``dot_general``: which axes contract, which side W is on, what the low-rank path is.

A pure function of the equation's dimension numbers and of shapes (x, W and the aligned factors a and b,
see `lora_jax.transform.value`): no arrays, so it can be read, printed and tested on its own. The use
rule in `lora_jax.transform.uses` executes it as

    t   = einsum(first_spec, x, first factor)      # x meets the factor that holds W's contracted axes
    low = einsum(second_spec, t, second factor)    # then the other factor
    out = dot_general(x, W) + broadcast(low.reshape(low_shape), out_shape)

so ``x·W + s·((x·a)·b)`` is computed with two thin contractions instead of building ``W + s·a·b``.

Example:
    A Dense layer, ``x: (batch, in) @ W: (in, out)`` with a delta of rank r:

    >>> p = plan_dot_general((((1,), (0,)), ((), ())), x_shape=(5, 16), w_shape=(16, 32), w_is_rhs=True,
    ...                      a_shape=(16, 1, 4), b_shape=(1, 32, 4))
    >>> p.roles, p.out_shape
    (('inputs', 'outputs'), (5, 32))
    >>> p.low_rank.first, p.low_rank.first_spec, p.low_rank.second_spec
    ('a', 'ab,bd->ad', 'ad,cd->ac')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from lora_jax.transform.value import labels, present

__all__ = ["DotPlan", "LowRankPath", "plan_dot_general"]


@dataclasses.dataclass(frozen=True)
class LowRankPath:
    """The two contractions of the low-rank path (labels: x's axes, then W's free axes, then r).

    Attributes:
        first: ``"a"`` or ``"b"``: the factor x is contracted with first, the one that varies along W's
            contracted axes (``"b"`` for a weight-tied ``attend``, which contracts W's output axis).
        first_axes: W-view axes the first factor varies along (kept when it is squeezed), sorted.
        second_axes: the same for the second factor.
        first_spec: einsum of x with the squeezed first factor, giving t (x's batch and free axes, the
            first factor's uncontracted axes, r).
        second_spec: einsum of t with the squeezed second factor, giving the output axes the low-rank
            path varies along.
        low_shape: the second einsum's result reshaped to the rank of the output (size 1 along output
            axes it does not vary along), then broadcast to `DotPlan.out_shape`.
    """

    first: str
    first_axes: tuple[int, ...]
    second_axes: tuple[int, ...]
    first_spec: str
    second_spec: str
    low_shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class DotPlan:
    """How one ``dot_general`` with an adapted W as one operand is computed.

    Attributes:
        w_is_rhs: W is the right-hand operand (``x @ W``); otherwise the left (``W @ x``).
        roles: per W-view axis, ``"inputs"`` (contracted), ``"stack"`` (a batch dimension) or
            ``"outputs"`` (free): what the use says about W's layout (for axis inference).
        out_shape: the shape of ``dot_general(x, W)``: batch axes, then lhs free axes, then rhs free axes.
        low_rank: the factored low-rank path, or None when there is none to add (no factors: axis
            inference) or when `dense`.
        dense: the contraction runs over axes of both a and b (a trace-like use): factoring is no
            cheaper, so W + s·a·b is materialised for this use.
    """

    w_is_rhs: bool
    roles: tuple[str, ...]
    out_shape: tuple[int, ...]
    low_rank: LowRankPath | None = None
    dense: bool = False


def plan_dot_general(
    dimension_numbers,
    x_shape: Sequence[int],
    w_shape: Sequence[int],
    w_is_rhs: bool,
    a_shape: Sequence[int] | None = None,
    b_shape: Sequence[int] | None = None,
) -> DotPlan:
    """The `DotPlan` of ``dot_general`` between a plain operand x and an adapted weight view W.

    Args:
        dimension_numbers: the equation's ``((lhs_contract, rhs_contract), (lhs_batch, rhs_batch))``.
        x_shape: the plain operand's shape.
        w_shape: the weight view's shape ``S``.
        w_is_rhs: whether W is the right-hand operand.
        a_shape, b_shape: the aligned factors' shapes, ``(*S, r)`` with size 1 along the axes a factor
            does not vary along; None for a plan without a low-rank path (axis inference).
    """
    (lc, rc), (lb, rb) = dimension_numbers
    wc, xc, wb, xb = (rc, lc, rb, lb) if w_is_rhs else (lc, rc, lb, rb)
    n = len(w_shape)
    wfree = [i for i in range(n) if i not in wc and i not in wb]
    xfree = [j for j in range(len(x_shape)) if j not in xc and j not in xb]
    roles = tuple("inputs" if i in wc else "stack" if i in wb else "outputs" for i in range(n))
    out_x, out_w = [x_shape[j] for j in xfree], [w_shape[i] for i in wfree]
    out_shape = tuple([x_shape[j] for j in xb] + (out_x + out_w if w_is_rhs else out_w + out_x))
    if a_shape is None or b_shape is None:
        return DotPlan(w_is_rhs, roles, out_shape)

    pa, pb = set(present(a_shape, w_shape)), set(present(b_shape, w_shape))
    if any(i in pa for i in wc) and any(i in pb for i in wc):
        return DotPlan(w_is_rhs, roles, out_shape, dense=True)
    contracts_b = any(i in pb for i in wc)
    first, pf, ps = ("b", sorted(pb), sorted(pa)) if contracts_b else ("a", sorted(pa), sorted(pb))

    # Labels: x's axes; W's contracted and batch axes share x's labels; W's free axes; then r.
    lab = iter(labels(len(x_shape) + n + 1))
    xl = [next(lab) for _ in range(len(x_shape))]
    wl = [""] * n
    for i, j in zip(wc, xc, strict=True):
        wl[i] = xl[j]
    for i, j in zip(wb, xb, strict=True):
        wl[i] = xl[j]
    for i in wfree:
        wl[i] = next(lab)
    r = next(lab)
    first_l = "".join(wl[i] for i in pf) + r
    # t keeps x's batch and free axes, the first factor's axes that are not contracted, and r.
    t_axes = [xl[j] for j in xb] + [xl[j] for j in xfree]
    t_axes += [wl[i] for i in pf if i not in wc and wl[i] not in t_axes] + [r]
    second_l = "".join(wl[i] for i in ps) + r
    out_v, out_xl = [wl[i] for i in wfree], [xl[j] for j in xfree]
    out = [xl[j] for j in xb] + (out_xl + out_v if w_is_rhs else out_v + out_xl)
    have = set(t_axes) | set(second_l)
    out_present = "".join(c for c in out if c in have)
    return DotPlan(
        w_is_rhs,
        roles,
        out_shape,
        LowRankPath(
            first=first,
            first_axes=tuple(pf),
            second_axes=tuple(ps),
            first_spec=f"{''.join(xl)},{first_l}->{''.join(t_axes)}",
            second_spec=f"{''.join(t_axes)},{second_l}->{out_present}",
            low_shape=tuple(out_shape[k] if c in have else 1 for k, c in enumerate(out)),
        ),
    )
