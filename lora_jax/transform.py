"""`wrap`: run any apply function with LoRA deltas, computing ``x·W + s·((x·a)·b)``, never ``W + s·a·b``.

``wrap(fn)(params, deltas, *args, **kw) == fn(merge(params, deltas), *args, **kw)`` up to float rounding.

How: `fn` is traced to a jaxpr (`jax.make_jaxpr`) with the params as inputs, and the jaxpr is evaluated
by a small interpreter in which each targeted kernel W is a `_Lora` value: W together with its factors
kept *aligned* to W's axes,

    a_full: W.shape with output axes set to 1, plus a trailing r axis
    b_full: W.shape with input axes set to 1, plus a trailing r axis,   V = W + Σ_r a_full·b_full

so view-like ops (casts, transposes, reshapes, broadcasts, slices, scalar scaling) apply to W and to the
factors alike. Where a `_Lora` meets `dot_general`, `conv_general_dilated` or a row `gather`, the use is
rewritten into the base op plus the low-rank path; higher-order primitives (`pjit`, `scan`, `while`,
`cond`, `checkpoint`, custom_jvp/vjp calls) are re-entered through the public `jax.lax` / `jax.checkpoint`
APIs with the interpreter inside. Any other use materialises ``W + s·a·b`` for that use alone, with a
warning naming the primitive and the path (an error with ``strict=True``).

Since the base W only ever enters the same ops as in `fn`, differentiating with respect to the deltas
never computes a W-shaped gradient: that is the compute LoRA saves (Hu et al. 2021, section 4.2).
"""

from __future__ import annotations

import dataclasses
import functools
import string
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from lora_jax.core import paired_leaves
from lora_jax.delta import LoraDelta
from lora_jax.spec import LoraAxes, path_str

__all__ = ["wrap", "infer_axes", "FallbackWarning"]


class FallbackWarning(UserWarning):
  """A targeted weight met an op with no factored rule; W + s·a·b was materialised for that use."""


# ----------------------------------------------------------------------------------------------------
# The tracked value


@dataclasses.dataclass
class _Lora:
  """A view of a targeted kernel: value ``w + Σ_r a[..., r] * b[..., r]`` (a, b broadcast against w).

  `origin[i]` is the set of W's original axes that view axis i comes from (for axis inference).
  In inference mode `a` and `b` are None and only `w` and `origin` are tracked.
  """

  w: Any
  a: Any
  b: Any
  origin: tuple
  path: str
  dropout: float = 0.0

  def replace(self, **kw) -> "_Lora":
    return dataclasses.replace(self, **kw)


def _own_axes(ndim: int) -> tuple:
  """The origin of an untouched kernel: view axis i is W's axis i."""
  return tuple(frozenset({i}) for i in range(ndim))


def _aligned_factors(w, d: LoraDelta):
  """a_full, b_full (see module doc) from a delta; scale folded into b; both cast to W's dtype."""
  ax, n = d.axes, w.ndim
  a = d.a.reshape(d.a.shape[:-1] + (1,) * len(ax.outputs) + d.a.shape[-1:])
  a = jnp.transpose(a, tuple(np.argsort(ax.stack + ax.inputs + ax.outputs)) + (n,))
  ns = len(ax.stack)
  b = jnp.moveaxis(d.b, ns, -1)
  b = b.reshape(b.shape[:ns] + (1,) * len(ax.inputs) + b.shape[ns:])
  b = jnp.transpose(b, tuple(np.argsort(ax.stack + ax.inputs + ax.outputs)) + (n,))
  b = b.astype(jnp.float32) * d.scale
  return a.astype(w.dtype), b.astype(w.dtype)


def _labels(n: int) -> list[str]:
  if n > len(string.ascii_letters):
    raise ValueError("lora_jax.wrap: too many dimensions in one contraction")
  return list(string.ascii_letters[:n])


def _present(f, shape) -> list[int]:
  """Axes of `shape` along which factor `f` varies (its other axes have size 1)."""
  return [i for i in range(len(shape)) if f.shape[i] != 1 and shape[i] != 1]


def _squeeze_to(f, keep: list[int]):
  return f.reshape([f.shape[i] for i in keep] + [f.shape[-1]])


def _dense_delta(a, b, shape, dtype):
  """Σ_r a·b as a dense array of `shape` (one einsum over the present axes, then a broadcast)."""
  n = len(shape)
  lab = _labels(n + 1)
  pa, pb = _present(a, shape), _present(b, shape)
  out = sorted(set(pa) | set(pb))
  spec = (f"{''.join(lab[i] for i in pa)}{lab[n]},{''.join(lab[i] for i in pb)}{lab[n]}"
          f"->{''.join(lab[i] for i in out)}")
  res = jnp.einsum(spec, _squeeze_to(a, pa), _squeeze_to(b, pb), preferred_element_type=jnp.float32)
  res = res.reshape([shape[i] if i in out else 1 for i in range(n)])
  return jnp.broadcast_to(res, shape).astype(dtype)


# ----------------------------------------------------------------------------------------------------
# Interpreter context


@dataclasses.dataclass
class _Ctx:
  strict: bool
  warned: set
  key: Any = None                 # dropout key (None: no dropout)
  counter: list = dataclasses.field(default_factory=lambda: [0])
  record: dict | None = None      # inference mode: path -> list of (kind, {W axis: role})

  def sub(self, key) -> "_Ctx":
    return dataclasses.replace(self, key=key, counter=[0])

  def next_key(self):
    self.counter[0] += 1
    return jax.random.fold_in(self.key, self.counter[0])

  @property
  def inferring(self) -> bool:
    return self.record is not None

  def note(self, v: _Lora, kind: str, roles: dict[int, str]):
    if self.record is not None:
      self.record.setdefault(v.path, []).append((kind, roles))


def _materialize(ctx: _Ctx, v, prim: str | None):
  """The dense value of a tracked view; warns (or raises when strict) naming `prim` and the path."""
  if not isinstance(v, _Lora):
    return v
  if prim is not None:
    if ctx.inferring:
      ctx.note(v, "fallback:" + prim, {})
    elif ctx.strict:
      raise ValueError(
          f"lora_jax.wrap(strict=True): {v.path} is used by primitive `{prim}`, which has no factored "
          f"LoRA rule, so W + s·a·b would have to be materialised. Use wrap(fn) to allow it, or change "
          f"the model so the weight reaches a dot_general/conv/gather through view-like ops only.")
    elif (prim, v.path) not in ctx.warned:
      ctx.warned.add((prim, v.path))
      warnings.warn(
          f"lora_jax.wrap: {v.path} is used by primitive `{prim}`, which has no factored LoRA rule; "
          f"W + s·a·b is materialised for this use (slower, more memory). Pass strict=True to make this "
          f"an error.", FallbackWarning, stacklevel=2)
  if v.a is None:
    return v.w
  return v.w + _dense_delta(v.a, v.b, v.w.shape, v.w.dtype)


# ----------------------------------------------------------------------------------------------------
# The interpreter


def _bind(eqn, invals):
  bind_params = eqn.primitive.get_bind_params(eqn.params)
  # Older JAX returns (subfuns, params); newer JAX returns params alone.
  subfuns, params = bind_params if isinstance(bind_params, tuple) else ((), bind_params)
  ctx_manager = getattr(getattr(eqn, "ctx", None), "manager", None)
  if ctx_manager is None:
    out = eqn.primitive.bind(*subfuns, *invals, **params)
  else:
    with ctx_manager:
      out = eqn.primitive.bind(*subfuns, *invals, **params)
  return out if eqn.primitive.multiple_results else [out]


def _eval(ctx: _Ctx, jaxpr, consts, args) -> list:
  env = {}

  def read(v):
    return v.val if isinstance(v, jcore.Literal) else env[v]

  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    if any(isinstance(x, _Lora) for x in invals):
      rule = _RULES.get(eqn.primitive.name, _fallback_rule)
      outs = rule(ctx, eqn, invals)
    else:
      outs = _bind(eqn, invals)
    for v, x in zip(eqn.outvars, outs):
      if not isinstance(v, jcore.DropVar):
        env[v] = x
  return [read(v) for v in jaxpr.outvars]


def _plain(ctx, vals, prim):
  return [_materialize(ctx, x, prim) for x in vals]


def _fallback_rule(ctx, eqn, invals):
  return _bind(eqn, _plain(ctx, invals, eqn.primitive.name))


# ---- view-like ops: apply to w and to both factors ------------------------------------------------


def _view(fn_factor, new_origin):
  """Rule builder: w' = the op on w; a' = fn_factor(eqn, a, v) (same for b); origin from new_origin."""
  def rule(ctx, eqn, invals):
    v = invals[0]
    if any(isinstance(x, _Lora) for x in invals[1:]):
      return _fallback_rule(ctx, eqn, invals)
    w = _bind(eqn, [v.w, *invals[1:]])[0]
    if v.a is None:
      a = b = None
    else:
      a, b = (fn_factor(eqn, f, v, invals) for f in (v.a, v.b))
      if a is None or b is None:  # not representable in factored form
        return _fallback_rule(ctx, eqn, invals)
    origin = new_origin(ctx, eqn, v)
    return [v.replace(w=w, a=a, b=b, origin=origin)]
  return rule


def _same_origin(ctx, eqn, v):
  return v.origin


def _cast_factor(eqn, f, v, invals):
  dt = eqn.params["new_dtype"]
  return f.astype(dt) if jnp.issubdtype(dt, jnp.inexact) else None


def _transpose_factor(eqn, f, v, invals):
  return jnp.transpose(f, tuple(eqn.params["permutation"]) + (f.ndim - 1,))


def _transpose_origin(ctx, eqn, v):
  return tuple(v.origin[i] for i in eqn.params["permutation"])


def _broadcast_factor(eqn, f, v, invals):
  shape, bdims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
  fshape = [1] * len(shape)
  for k, j in enumerate(bdims):
    fshape[j] = f.shape[k]
  return lax.broadcast_in_dim(f, tuple(fshape) + (f.shape[-1],), tuple(bdims) + (len(shape),))


def _broadcast_origin(ctx, eqn, v):
  origin = [frozenset()] * len(eqn.params["shape"])
  for k, j in enumerate(eqn.params["broadcast_dimensions"]):
    origin[j] = v.origin[k]
  return tuple(origin)


def _reshape_groups(old, new):
  """Split a reshape into contiguous groups of old and new axes with equal products."""
  groups, i, j = [], 0, 0
  while i < len(old) or j < len(new):
    if i < len(old) and old[i] == 1 and (j >= len(new) or new[j] != 1):
      groups.append(([i], []))
      i += 1
      continue
    if j < len(new) and new[j] == 1 and (i >= len(old) or old[i] != 1):
      groups.append(([], [j]))
      j += 1
      continue
    gi, gj, po, pn = [i], [j], old[i], new[j]
    i, j = i + 1, j + 1
    while po != pn:
      if po < pn:
        gi.append(i)
        po *= old[i]
        i += 1
      else:
        gj.append(j)
        pn *= new[j]
        j += 1
    groups.append((gi, gj))
  return groups


def _reshape_factor(eqn, f, v, invals):
  if eqn.params.get("dimensions") is not None:
    return None
  old, new = v.w.shape, tuple(eqn.params["new_sizes"])
  fshape = []
  for gi, gj in _reshape_groups(old, new):
    sizes = [f.shape[i] for i in gi]
    if all(s == 1 for s in sizes):
      fshape += [1] * len(gj)
    elif all(f.shape[i] == old[i] for i in gi):
      fshape += [new[j] for j in gj]
    else:  # a group mixing axes the factor varies along with axes it does not
      return None
  return f.reshape(tuple(fshape) + (f.shape[-1],))


def _reshape_origin(ctx, eqn, v):
  new = tuple(eqn.params["new_sizes"])
  origin = [frozenset()] * len(new)
  for gi, gj in _reshape_groups(v.w.shape, new):
    merged = frozenset().union(*(v.origin[i] for i in gi)) if gi else frozenset()
    for j in gj:
      origin[j] = merged
  return tuple(origin)


def _squeeze_factor(eqn, f, v, invals):
  return lax.squeeze(f, tuple(d % v.w.ndim for d in eqn.params["dimensions"]))


def _squeeze_origin(ctx, eqn, v):
  dims = {d % v.w.ndim for d in eqn.params["dimensions"]}
  # A squeezed axis that came from a W axis of size > 1 was indexed (a layer picked from a stack).
  indexed = frozenset().union(*(v.origin[d] for d in dims)) if dims else frozenset()
  if indexed:
    ctx.note(v, "index", {ax: "stack" for ax in indexed})
  return tuple(o for i, o in enumerate(v.origin) if i not in dims)


def _slice_factor(eqn, f, v, invals):
  p = eqn.params
  strides = p["strides"] or (1,) * v.w.ndim
  start, limit, step = [], [], []
  for i in range(v.w.ndim):
    if f.shape[i] == 1:
      start.append(0), limit.append(1), step.append(1)
    else:
      start.append(p["start_indices"][i]), limit.append(p["limit_indices"][i]), step.append(strides[i])
  return lax.slice(f, (*start, 0), (*limit, f.shape[-1]), (*step, 1))


def _dynamic_slice_factor(eqn, f, v, invals):
  starts = invals[1:1 + v.w.ndim]
  sizes = eqn.params["slice_sizes"]
  idx = [jnp.zeros((), jnp.int32) if f.shape[i] == 1 else starts[i] for i in range(v.w.ndim)]
  idx = [jnp.asarray(i).astype(jnp.int32) for i in idx]
  sz = [1 if f.shape[i] == 1 else sizes[i] for i in range(v.w.ndim)]
  return lax.dynamic_slice(f, (*idx, jnp.zeros((), jnp.int32)), (*sz, f.shape[-1]))


def _identity_factor(eqn, f, v, invals):
  return f


def _scalar_mul_rule(ctx, eqn, invals):
  """``c * W`` for a scalar c is still low-rank: scale w and b."""
  x, y = invals
  v, c = (x, y) if isinstance(x, _Lora) else (y, x)
  if isinstance(c, _Lora) or np.ndim(c) != 0:
    return _fallback_rule(ctx, eqn, invals)
  w = _bind(eqn, [v.w, c] if v is x else [c, v.w])[0]
  b = None if v.b is None else v.b * jnp.asarray(c).astype(v.b.dtype)
  return [v.replace(w=w, b=b)]


def _neg_rule(ctx, eqn, invals):
  v = invals[0]
  return [v.replace(w=-v.w, b=None if v.b is None else -v.b)]


# ---- uses: rewrite into base op + low-rank path ---------------------------------------------------


def _dropout(ctx, v: _Lora, x):
  if ctx.key is None or v.dropout == 0.0 or ctx.inferring:
    return x
  keep = 1.0 - v.dropout
  mask = jax.random.bernoulli(ctx.next_key(), keep, x.shape)
  return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


def _dot_general_rule(ctx, eqn, invals):
  lhs, rhs = invals
  if isinstance(lhs, _Lora) and isinstance(rhs, _Lora):
    return _dot_general_rule(ctx, eqn, [lhs, _materialize(ctx, rhs, "dot_general (both operands adapted)")])
  p = eqn.params
  (lc, rc), (lb, rb) = p["dimension_numbers"]
  w_is_rhs = isinstance(rhs, _Lora)
  v, x = (rhs, lhs) if w_is_rhs else (lhs, rhs)
  vc, xc, vb, xb = (rc, lc, rb, lb) if w_is_rhs else (lc, rc, lb, rb)
  n = v.w.ndim
  vfree = [i for i in range(n) if i not in vc and i not in vb]
  xfree = [i for i in range(x.ndim) if i not in xc and i not in xb]
  roles = {}
  for i in vc:
    roles.update({ax: "inputs" for ax in v.origin[i]})
  for i in vb:
    roles.update({ax: "stack" for ax in v.origin[i]})
  for i in vfree:
    roles.update({ax: "outputs" for ax in v.origin[i]})
  ctx.note(v, "dot_general", roles)
  base = _bind(eqn, [x, v.w] if w_is_rhs else [v.w, x])[0]
  if v.a is None:
    return [base]

  shape = v.w.shape
  pa, pb = set(_present(v.a, shape)), set(_present(v.b, shape))
  ca, cb = [i for i in vc if i in pa], [i for i in vc if i in pb]
  if ca and cb:
    # Contracting over axes of both factors at once (a trace-like use): no cheaper than dense.
    return _materialize_operands(ctx, eqn, lhs, rhs)
  first, second, pf, ps = (v.b, v.a, pb, pa) if cb else (v.a, v.b, pa, pb)

  lab = iter(_labels(x.ndim + n + 1))
  xl = [next(lab) for _ in range(x.ndim)]
  vl = [None] * n
  for i, j in zip(vc, xc):
    vl[i] = xl[j]
  for i, j in zip(vb, xb):
    vl[i] = xl[j]
  for i in vfree:
    vl[i] = next(lab)
  r = next(lab)
  pf, ps = sorted(pf), sorted(ps)
  first_l = "".join(vl[i] for i in pf) + r
  # t keeps x's batch and free axes, the first factor's axes that are not contracted, and r.
  t_axes = [xl[j] for j in xb] + [xl[j] for j in xfree]
  t_axes += [vl[i] for i in pf if i not in vc and vl[i] not in t_axes] + [r]
  dt = x.dtype
  pet = p.get("preferred_element_type")
  xin = _dropout(ctx, v, x)
  t = jnp.einsum(f"{''.join(xl)},{first_l}->{''.join(t_axes)}", xin, _squeeze_to(first, pf).astype(dt),
                 precision=p.get("precision"), preferred_element_type=pet)
  t = t.astype(dt)
  second_l = "".join(vl[i] for i in ps) + r
  bl = [xl[j] for j in xb]
  out_v = [vl[i] for i in vfree]
  out_x = [xl[j] for j in xfree]
  out = bl + (out_x + out_v if w_is_rhs else out_v + out_x)
  have = set(t_axes) | set(second_l)
  out_present = [c for c in out if c in have]
  low = jnp.einsum(f"{''.join(t_axes)},{second_l}->{''.join(out_present)}", t,
                   _squeeze_to(second, ps).astype(dt), precision=p.get("precision"),
                   preferred_element_type=pet)
  low = low.reshape([base.shape[k] if c in have else 1 for k, c in enumerate(out)])
  return [base + jnp.broadcast_to(low, base.shape).astype(base.dtype)]


def _materialize_operands(ctx, eqn, lhs, rhs):
  return _bind(eqn, [_materialize(ctx, lhs, eqn.primitive.name + " (contracts axes of both a and b)"),
                     _materialize(ctx, rhs, eqn.primitive.name + " (contracts axes of both a and b)")])


def _conv_rule(ctx, eqn, invals):
  x, v = invals
  p = eqn.params
  if isinstance(x, _Lora) or not isinstance(v, _Lora):
    return _fallback_rule(ctx, eqn, invals)
  dn = p["dimension_numbers"]
  out_dim, in_dim, *spatial = dn.rhs_spec
  ctx.note(v, "conv", {**{ax: "inputs" for i in (in_dim, *spatial) for ax in v.origin[i]},
                       **{ax: "outputs" for ax in v.origin[out_dim]}})
  base = _bind(eqn, [x, v.w])[0]
  if v.a is None:
    return [base]
  shape = v.w.shape
  a_ok = all(v.a.shape[i] == shape[i] for i in (in_dim, *spatial)) and v.a.shape[out_dim] == 1
  b_ok = all(v.b.shape[i] == 1 for i in range(len(shape)) if i != out_dim)
  if not (a_ok and b_ok) or p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
    return _fallback_rule(ctx, eqn, invals)
  # Low-rank path: conv with a (r output channels), then a 1x1 map r -> out with b (PEFT's Conv LoRA).
  a_k = jnp.moveaxis(jnp.squeeze(v.a, out_dim), -1, out_dim).astype(x.dtype)
  params = dict(p)
  params.pop("lhs_shape", None), params.pop("rhs_shape", None)
  xin = _dropout(ctx, v, x)
  low = lax.conv_general_dilated(xin, a_k, p["window_strides"], p["padding"], p["lhs_dilation"],
                                 p["rhs_dilation"], dn, precision=p["precision"],
                                 preferred_element_type=p["preferred_element_type"]).astype(x.dtype)
  feat = dn.out_spec[1]
  b_mat = v.b.reshape(shape[out_dim], v.b.shape[-1]).astype(x.dtype)  # (out, r)
  low = jnp.moveaxis(jnp.moveaxis(low, feat, -1) @ b_mat.T, -1, feat)
  return [base + low.astype(base.dtype)]


def _gather_rule(ctx, eqn, invals):
  v, idx = invals
  if isinstance(idx, _Lora) or not isinstance(v, _Lora):
    return _fallback_rule(ctx, eqn, invals)
  p = eqn.params
  dn = p["dimension_numbers"]
  shape = v.w.shape
  sizes = p["slice_sizes"]
  gathered = [d for d in range(len(shape)) if d in dn.start_index_map and sizes[d] < shape[d]]
  ctx.note(v, "gather", {**{ax: "inputs" for d in gathered for ax in v.origin[d]},
                         **{ax: "outputs" for d in range(len(shape)) if d not in gathered
                            for ax in v.origin[d]}})
  base = _bind(eqn, [v.w, idx])[0]
  if v.a is None:
    return [base]
  if getattr(dn, "operand_batching_dims", ()):
    return _fallback_rule(ctx, eqn, invals)

  def gather_factor(f):
    keep = np.array([0 if f.shape[d] == 1 else 1 for d in dn.start_index_map], np.int32)
    fidx = idx * jnp.asarray(keep, idx.dtype)  # a factor constant along an axis is read at index 0
    fsizes = tuple(1 if f.shape[d] == 1 else sizes[d] for d in range(len(shape))) + (f.shape[-1],)
    fdn = dn._replace(offset_dims=tuple(dn.offset_dims) + (base.ndim,))
    return lax.gather(f, fidx, fdn, fsizes, mode=p["mode"], fill_value=p.get("fill_value"),
                      indices_are_sorted=p["indices_are_sorted"], unique_indices=p["unique_indices"])

  low = _dense_delta(gather_factor(v.a), gather_factor(v.b), base.shape, base.dtype)
  return [base + low]


# ---- higher-order primitives ----------------------------------------------------------------------


def _inline(param):
  def rule(ctx, eqn, invals):
    closed = eqn.params[param] if param in eqn.params else eqn.params["fun_jaxpr"]
    jaxpr, consts = (closed.jaxpr, closed.consts) if hasattr(closed, "jaxpr") else (closed, ())
    return _eval(ctx, jaxpr, consts, invals)
  return rule


def _custom_call_rule(ctx, eqn, invals):
  # The primal is re-entered with the interpreter inside; its custom derivative rule is bypassed for a
  # call that consumes adapted weights (it could only produce a W-shaped cotangent).
  closed = eqn.params.get("call_jaxpr") or eqn.params.get("fun_jaxpr")
  return _eval(ctx, closed.jaxpr, closed.consts, invals)


def _checkpoint_rule(ctx, eqn, invals):
  p = eqn.params
  jaxpr = p["jaxpr"]
  loras = [(i, x) for i, x in enumerate(invals) if isinstance(x, _Lora)]
  plain = [x for x in invals if not isinstance(x, _Lora)]
  parts = [(x.w, x.a, x.b) for _, x in loras]

  def body(plain, parts):
    vals, it_p, it_l = [], iter(plain), iter(parts)
    lmap = dict(loras)
    for i in range(len(invals)):
      if i in lmap:
        w, a, b = next(it_l)
        vals.append(lmap[i].replace(w=w, a=a, b=b))
      else:
        vals.append(next(it_p))
    return [_materialize(ctx, o, None) for o in _eval(ctx, jaxpr, (), vals)]

  return jax.checkpoint(body, prevent_cse=p.get("prevent_cse", True), policy=p.get("policy"))(plain, parts)


def _scan_rule(ctx, eqn, invals):
  p = eqn.params
  closed, nc, nk = p["jaxpr"], p["num_consts"], p["num_carry"]
  consts, init, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]
  init = _plain(ctx, init, "scan carry")
  length = p["length"]
  xs_parts = []
  for x in xs:
    if isinstance(x, _Lora):
      ctx.note(x, "scan", {ax: "stack" for ax in x.origin[0]})
      if x.a is None:
        xs_parts.append((x.w, None, None))
      else:
        grow = lambda f: jnp.broadcast_to(f, (length,) + f.shape[1:]) if f.shape[0] == 1 else f
        xs_parts.append((x.w, grow(x.a), grow(x.b)))
    else:
      xs_parts.append(x)
  keys = None if ctx.key is None else jax.random.split(ctx.next_key(), length)

  def body(carry, scanned):
    key, parts = scanned
    sub = ctx if key is None else ctx.sub(key)
    xs_vals = [x.replace(w=part[0], a=part[1], b=part[2], origin=x.origin[1:]) if isinstance(x, _Lora)
               else part for x, part in zip(xs, parts)]
    outs = _eval(sub, closed.jaxpr, closed.consts, [*consts, *carry, *xs_vals])
    outs = _plain(sub, outs, "scan output")
    return outs[:nk], outs[nk:]

  carry, ys = lax.scan(body, list(init), (keys, xs_parts), length=length, reverse=p["reverse"],
                       unroll=p["unroll"])
  return [*carry, *ys]


def _while_rule(ctx, eqn, invals):
  p = eqn.params
  cj, bj, cn, bn = p["cond_jaxpr"], p["body_jaxpr"], p["cond_nconsts"], p["body_nconsts"]
  cconsts, bconsts, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
  init = _plain(ctx, init, "while carry")

  def cond_fun(carry):
    return _eval(ctx, cj.jaxpr, cj.consts, [*cconsts, *carry])[0]

  def body_fun(carry):
    return _plain(ctx, _eval(ctx, bj.jaxpr, bj.consts, [*bconsts, *carry]), "while carry")

  return list(lax.while_loop(cond_fun, body_fun, list(init)))


def _cond_rule(ctx, eqn, invals):
  index, ops = invals[0], invals[1:]
  if isinstance(index, _Lora):
    return _fallback_rule(ctx, eqn, invals)
  loras = {i: x for i, x in enumerate(ops) if isinstance(x, _Lora)}
  plain = [x for x in ops if not isinstance(x, _Lora)]

  def branch_fn(br):
    def f(*plain_ops):
      it = iter(plain_ops)
      vals = [loras[i] if i in loras else next(it) for i in range(len(ops))]
      return _plain(ctx, _eval(ctx, br.jaxpr, br.consts, vals), "cond output")
    return f

  return list(lax.switch(index, [branch_fn(br) for br in eqn.params["branches"]], *plain))


_RULES: dict[str, Callable] = {
    "convert_element_type": _view(_cast_factor, _same_origin),
    "transpose": _view(_transpose_factor, _transpose_origin),
    "broadcast_in_dim": _view(_broadcast_factor, _broadcast_origin),
    "reshape": _view(_reshape_factor, _reshape_origin),
    "squeeze": _view(_squeeze_factor, _squeeze_origin),
    "slice": _view(_slice_factor, _same_origin),
    "dynamic_slice": _view(_dynamic_slice_factor, _same_origin),
    "sharding_constraint": _view(_identity_factor, _same_origin),
    "copy": _view(_identity_factor, _same_origin),
    "copy_p": _view(_identity_factor, _same_origin),
    "device_put": None,  # filled below (multiple results)
    "mul": _scalar_mul_rule,
    "neg": _neg_rule,
    "dot_general": _dot_general_rule,
    "conv_general_dilated": _conv_rule,
    "gather": _gather_rule,
    "pjit": _inline("jaxpr"),
    "jit": _inline("jaxpr"),
    "closed_call": _inline("call_jaxpr"),
    "core_call": _inline("call_jaxpr"),
    "custom_jvp_call": _custom_call_rule,
    "custom_vjp_call": _custom_call_rule,
    "custom_vjp_call_jaxpr": _custom_call_rule,
    "checkpoint": _checkpoint_rule,
    "remat": _checkpoint_rule,
    "remat2": _checkpoint_rule,
    "scan": _scan_rule,
    "while": _while_rule,
    "cond": _cond_rule,
}


def _device_put_rule(ctx, eqn, invals):
  # device_put may carry several operands; pass tracked ones through unchanged (it is a no-op on values).
  outs = _bind(eqn, [x.w if isinstance(x, _Lora) else x for x in invals])
  return [x.replace(w=o) if isinstance(x, _Lora) else o for x, o in zip(invals, outs)]


_RULES["device_put"] = _device_put_rule


# ----------------------------------------------------------------------------------------------------
# Public entry points


def _is_dynamic(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _trace(fn, param_leaves, treedef, args, kwargs):
  """jaxpr of ``fn(params, *args, **kwargs)`` with param leaves first, then the array leaves of args."""
  arg_leaves, arg_tree = jax.tree_util.tree_flatten((args, kwargs))
  dyn_pos = [i for i, x in enumerate(arg_leaves) if _is_dynamic(x)]

  def flat_fn(p_leaves, dyn):
    leaves = list(arg_leaves)
    for i, x in zip(dyn_pos, dyn):
      leaves[i] = x
    a, k = jax.tree_util.tree_unflatten(arg_tree, leaves)
    return fn(jax.tree_util.tree_unflatten(treedef, p_leaves), *a, **k)

  spec = lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x) if not hasattr(x, "dtype")
                                        else x.dtype)
  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(
      [spec(w) for w in param_leaves], [spec(arg_leaves[i]) for i in dyn_pos])
  return closed, out_shape, [arg_leaves[i] for i in dyn_pos]


def wrap(fn: Callable, *, strict: bool = False) -> Callable:
  """``g(params, deltas, *args, dropout_key=None, **kw) == fn(merge(params, deltas), *args, **kw)``.

  Computed as ``x·W + s·((x·a)·b)`` at every use of an adapted W: no ``W + s·a·b`` is built and, when
  you differentiate with respect to the deltas, no W-shaped gradient is computed.

  Args:
    fn: any function ``fn(params, *args, **kwargs)`` of a params pytree (e.g. a Linen ``model.apply``).
      Array arguments (leaves of args/kwargs that are jax or numpy arrays) are traced; any other leaf
      (bools, ints, strings) is treated as static.
    strict: raise instead of warning when an adapted weight meets an op with no factored rule.

  Returns:
    The wrapped function. Its keyword ``dropout_key`` (a PRNG key) turns on LoRA dropout on the input of
    every low-rank path (rate from ``LoraSpec.dropout``); without it (inference) there is no dropout.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import lora_jax as lj
    >>> f = lambda p, x: x @ p["w"]
    >>> p = {"w": jnp.ones((4, 3))}
    >>> d = lj.init(jax.random.key(0), p, lj.LoraSpec(rank=2, targets="w"))
    >>> bool(jnp.allclose(lj.wrap(f)(p, d, jnp.ones((5, 4))), f(lj.merge(p, d), jnp.ones((5, 4)))))
    True
  """
  warned: set = set()

  @functools.wraps(fn)
  def wrapped(params, deltas, *args, dropout_key=None, **kwargs):
    treedef, pairs = paired_leaves(params, deltas)
    p_leaves = [w for _, w, _ in pairs]
    closed, out_shape, dyn = _trace(fn, p_leaves, treedef, args, kwargs)
    invals = []
    for path, w, d in pairs:
      w = jnp.asarray(w)
      if d is None:
        invals.append(w)
      else:
        a, b = _aligned_factors(w, d)
        invals.append(_Lora(w, a, b, _own_axes(w.ndim), path, d.dropout))
    ctx = _Ctx(strict=strict, warned=warned, key=dropout_key)
    outs = _eval(ctx, closed.jaxpr, closed.consts, [*invals, *dyn])
    outs = [_materialize(ctx, o, None) for o in outs]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

  return wrapped


def infer_axes(fn: Callable, params: Any, paths, args: tuple = (), kwargs: dict | None = None
               ) -> dict[str, LoraAxes]:
  """Stacked, input and output axes of each kernel in `paths`, from how ``fn(params, *args)`` uses it.

  Traced abstractly: no FLOPs, no memory. Contracted axes are inputs, free axes outputs, batch axes (and
  axes indexed away, e.g. by ``nn.scan``) stacked. Conflicting uses raise a ValueError.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  names = [path_str(p) for p, _ in leaves]
  p_leaves = [w for _, w in leaves]
  record: dict = {}

  def run(p_leaves):
    closed, _, dyn = _trace(fn, p_leaves, treedef, args, kwargs or {})
    invals = [_Lora(w, None, None, _own_axes(np.ndim(w)), n)
              if n in paths else w for n, w in zip(names, p_leaves)]
    ctx = _Ctx(strict=False, warned=set(), record=record)
    return _eval(ctx, closed.jaxpr, closed.consts, [*invals, *dyn])

  jax.eval_shape(run, [jax.ShapeDtypeStruct(np.shape(w), w.dtype) for w in p_leaves])
  result = {}
  for n, w in zip(names, p_leaves):
    if n not in paths:
      continue
    uses = record.get(n, [])
    roles: dict[int, set] = {}
    kinds = []
    for kind, r in uses:
      kinds.append(kind)
      for ax, role in r.items():
        roles.setdefault(ax, set()).add(role)
    where = f"{n} (shape {tuple(np.shape(w))})"
    if not any(k in ("dot_general", "conv", "gather") for k in kinds):
      raise ValueError(
          f"cannot infer LoRA axes for {where}: fn never contracts it (uses: {kinds or 'none'}). Give them "
          f"explicitly: LoraSpec(axes={{{n!r}: LoraAxes(stack=..., inputs=..., outputs=...)}}).")
    bad = {ax: sorted(rs) for ax, rs in roles.items() if len(rs) > 1}
    if bad:
      raise ValueError(
          f"cannot infer LoRA axes for {where}: its uses ({kinds}) disagree about axes {bad}. Give them "
          f"explicitly: LoraSpec(axes={{{n!r}: LoraAxes(stack=..., inputs=..., outputs=...)}}).")
    missing = [ax for ax in range(np.ndim(w)) if ax not in roles]
    if missing:
      raise ValueError(f"cannot infer LoRA axes for {where}: axes {missing} are never used by "
                       f"{kinds}. Give them explicitly with LoraSpec(axes=...).")
    group = lambda role: tuple(ax for ax in range(np.ndim(w)) if role in roles[ax])
    result[n] = LoraAxes(group("stack"), group("inputs"), group("outputs"))
  return result
