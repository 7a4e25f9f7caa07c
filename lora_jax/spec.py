"""What to adapt: `LoraSpec` (rank, alpha, targets, per-leaf overrides) and `LoraAxes`.

A spec selects parameters by regular expressions matched *in full* against "/"-joined key paths, the
same names `jax.tree_util.keystr(path, simple=True, separator="/")` prints, e.g.
``params/layers_3/attn/query/kernel``. Selecting nothing is an error, never a silent no-op.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax._closest import closest

__all__ = ["LoraAxes", "LoraSpec", "path_str"]

INITS = ("kaiming", "gaussian")
# Inits that move W's principal part into the delta, so they change the base: `lj.init_with_residual`.
# "pissa_niter_<n>" is PiSSA with a randomized SVD of n subspace iterations (PEFT's spelling).
# "loftq" / "loftq_iter_<n>" (LoftQ) also quantize the residual: `init_with_residual(..., qspec=)`.
RESIDUAL_INITS = ("pissa", "olora", "loftq")


def residual_init(init: str) -> bool:
    """Whether `init` is a PiSSA / OLoRA / LoftQ init (one that needs `init_with_residual`)."""
    return isinstance(init, str) and (
        init in RESIDUAL_INITS or bool(re.fullmatch(r"(pissa_niter|loftq_iter)_[1-9]\d*", init))
    )


def path_str(path) -> str:
    """ "/"-joined key path, e.g. ``params/h_0/attn/query/kernel``."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


@dataclasses.dataclass(frozen=True)
class LoraAxes:
    """Which axes of a kernel W are stacked-layer, input and output axes.

    The delta of W is ``a: (*stack, *inputs, r)`` and ``b: (*stack, r, *outputs)``, each group of dims in
    the order listed here. Together the three tuples must list every axis of W exactly once.

    Examples:
      >>> LoraAxes(inputs=(0,), outputs=(1,))          # Dense (in, out), the default for 2-D kernels
      LoraAxes(stack=(), inputs=(0,), outputs=(1,))
      >>> conv = LoraAxes(inputs=(0, 1, 2), outputs=(3,))  # Conv (kh, kw, in, out)
      >>> qkv = LoraAxes(inputs=(0,), outputs=(1, 2))      # DenseGeneral (embed, heads, head_dim)
      >>> stacked = LoraAxes(stack=(0,), inputs=(1,), outputs=(2,))  # nn.scan: (layers, in, out)
    """

    stack: tuple[int, ...] = ()
    inputs: tuple[int, ...] = (0,)
    outputs: tuple[int, ...] = (1,)

    def __post_init__(self):
        for name in ("stack", "inputs", "outputs"):
            object.__setattr__(self, name, tuple(int(i) for i in getattr(self, name)))

    def check(self, ndim: int, where: str) -> LoraAxes:
        """Normalises negative axes and checks that the axes partition ``range(ndim)``."""
        norm = lambda t: tuple(i % ndim if -ndim <= i < ndim else i for i in t)
        axes = LoraAxes(norm(self.stack), norm(self.inputs), norm(self.outputs))
        listed = sorted(axes.stack + axes.inputs + axes.outputs)
        if listed != list(range(ndim)) or not axes.inputs or not axes.outputs:
            raise ValueError(
                f"{where}: axes {self} do not fit a {ndim}-D kernel: stack, inputs and outputs must list each "
                f"axis 0..{ndim - 1} exactly once, with at least one input and one output axis."
            )
        return axes

    @staticmethod
    def default(ndim: int, num_stack: int = 0) -> LoraAxes:
        """Leading `num_stack` axes stacked, then one input axis and the remaining output axes."""
        return LoraAxes(tuple(range(num_stack)), (num_stack,), tuple(range(num_stack + 1, ndim)))


def _as_patterns(x, name) -> tuple[str, ...]:
    if x is None:
        return ()
    if isinstance(x, str):
        x = (x,)
    if not isinstance(x, Sequence) or not all(isinstance(p, str) for p in x):
        raise TypeError(f"LoraSpec.{name} must be a regex string or a sequence of them, got {x!r}")
    for p in x:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"LoraSpec.{name}: {p!r} is not a valid regular expression: {e}") from None
    return tuple(x)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Which parameters get a low-rank delta, and how.

    Attributes:
      rank: r, the inner dimension of ``a @ b``.
      alpha: scale numerator; the delta is ``(alpha / rank) * a @ b`` (``alpha / sqrt(rank)`` with rslora).
      targets: regex or regexes; a leaf is targeted when one matches its whole "/"-joined key path.
      exclude: regex or regexes removing leaves from the targets.
      rank_pattern: ``{regex: rank}`` overrides for targeted leaves (first full match wins).
      alpha_pattern: ``{regex: alpha}`` overrides for targeted leaves (first full match wins).
      rslora: rank-stabilised scaling ``alpha / sqrt(rank)`` (Kalajdzievski 2023).
      init: ``"kaiming"`` (a ~ U(±1/sqrt(fan_in)), b zero; PEFT's default) or ``"gaussian"`` (a normal
        with std 1/r, as in PEFT); ``"pissa"``, ``"pissa_niter_<n>"`` (randomized SVD) or ``"olora"``
        move W's principal part into the delta and need ``lj.init_with_residual``; ``"loftq"`` /
        ``"loftq_iter_<n>"`` (a quantized base) fit the delta to the quantization error and need
        ``lj.init_with_residual(..., qspec=)``.
      dropout: dropout rate on the input of the low-rank path (used by `wrap` when given a key).
      dtype: dtype of a and b; None means float32.
      axes: ``{regex: LoraAxes}`` for kernels that are not plain ``(in, out)``: stacked layers, conv,
        multi-dim DenseGeneral kernels. >2-D kernels need an entry here or ``init(..., fn=, args=)``.
      dora: DoRA (Liu et al. 2024): each delta also trains a magnitude per output feature (see
        `lora_jax.dora`).
      dora_detach_norm: with DoRA, treat ‖W + s·a·b‖_col as a constant in the backward pass (the
        paper's section 4.3; PEFT does the same).
      train_full: regex or regexes of leaves trained in full (PEFT's ``modules_to_save``): a classifier
        head, norms, biases, a resized embedding. `init` puts a `FullLeaf` copy of each at its path (see
        `lora_jax.full`); they may not overlap the LoRA targets.

    Example:
      >>> spec = LoraSpec(rank=4, alpha=8.0, targets=r".*/(query|value)/kernel")
      >>> spec.scale_for("params/attn/query/kernel")
      2.0
    """

    rank: int = 8
    alpha: float = 16.0
    targets: str | Sequence[str] = r".*/(query|value)/kernel"
    exclude: str | Sequence[str] = ()
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    rslora: bool = False
    init: str = "kaiming"
    dropout: float = 0.0
    dtype: Any = None
    axes: Mapping[str, LoraAxes] = dataclasses.field(default_factory=dict)
    dora: bool = False
    dora_detach_norm: bool = True
    train_full: str | Sequence[str] = ()

    def __post_init__(self):
        for name in ("dora", "dora_detach_norm"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"LoraSpec.{name} must be True or False, got {getattr(self, name)!r}")
        object.__setattr__(self, "targets", _as_patterns(self.targets, "targets"))
        object.__setattr__(self, "exclude", _as_patterns(self.exclude, "exclude"))
        object.__setattr__(self, "train_full", _as_patterns(self.train_full, "train_full"))
        if not self.targets:
            raise ValueError(
                "LoraSpec.targets is empty: give at least one regex, e.g. r'.*/(query|value)/kernel'."
            )
        object.__setattr__(self, "rank", _check_rank(self.rank, "LoraSpec.rank"))
        if not isinstance(self.alpha, numbers.Real) or isinstance(self.alpha, bool):
            raise TypeError(f"LoraSpec.alpha must be a number, got {self.alpha!r}")
        if self.dtype is not None:
            try:
                dt = jnp.dtype(self.dtype)
            except TypeError:
                dt = None
            if dt is None or not jnp.issubdtype(dt, jnp.floating):
                raise TypeError(
                    f"LoraSpec.dtype={self.dtype!r} is not a floating-point dtype; use e.g. "
                    f"jnp.float32 or jnp.bfloat16 (None means float32)."
                )
        for pat, r in dict(self.rank_pattern).items():
            _as_patterns(pat, "rank_pattern")
            _check_rank(r, f"LoraSpec.rank_pattern[{pat!r}]")
        for pat, a in dict(self.alpha_pattern).items():
            _as_patterns(pat, "alpha_pattern")
            if not isinstance(a, numbers.Real) or isinstance(a, bool):
                raise TypeError(f"LoraSpec.alpha_pattern[{pat!r}] must be a number, got {a!r}")
        for pat, ax in dict(self.axes).items():
            _as_patterns(pat, "axes")
            if not isinstance(ax, LoraAxes):
                raise TypeError(f"LoraSpec.axes[{pat!r}] must be a LoraAxes, got {ax!r}")
        if self.init not in INITS and not residual_init(self.init):
            raise ValueError(
                f"LoraSpec.init={self.init!r} is not one of {INITS}, nor of the inits that change the "
                f"base, {RESIDUAL_INITS}, 'pissa_niter_<n>' or 'loftq_iter_<n>' (for lj.init_with_residual)"
            )
        if not isinstance(self.dropout, numbers.Real) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraSpec.dropout={self.dropout} must be in [0, 1)")

    # Hashable so a spec can be static metadata / a jit static argument.
    def __hash__(self):
        return hash(
            (
                self.rank,
                self.alpha,
                self.targets,
                self.exclude,
                tuple(dict(self.rank_pattern).items()),
                tuple(dict(self.alpha_pattern).items()),
                self.rslora,
                self.init,
                self.dropout,
                str(self.dtype),
                tuple(dict(self.axes).items()),
                self.dora,
                self.dora_detach_norm,
                self.train_full,
            )
        )

    def matches(self, path: str) -> bool:
        """Whether the "/"-joined key path is targeted (and not excluded)."""
        full = lambda pats: any(re.fullmatch(p, path) for p in pats)
        return full(self.targets) and not full(self.exclude)

    def full_matches(self, path: str) -> bool:
        """Whether the "/"-joined key path is trained in full (``train_full``)."""
        return any(re.fullmatch(p, path) for p in self.train_full)

    def select_full(self, paths: Sequence[str], targeted: Sequence[str] = ()) -> list[str]:
        """The paths among `paths` that ``train_full`` selects (none when it is empty).

        Raises:
            ValueError: a ``train_full`` pattern matches no path (with the closest paths), or a selected
                path is also a LoRA target (listed in `targeted`): a leaf is trained in full or low-rank.

        Example:
            >>> spec = LoraSpec(targets=".*/kernel", train_full="head/bias")
            >>> spec.select_full(["head/kernel", "head/bias"], ["head/kernel"])
            ['head/bias']
        """
        if not self.train_full:
            return []
        for pat in self.train_full:
            if not any(re.fullmatch(pat, p) for p in paths):
                raise ValueError(
                    f"LoraSpec.train_full pattern {pat!r} matches no parameter. Patterns must match the whole "
                    f"'/'-joined key path. Closest available paths: {closest(pat, paths, regex=True)}"
                )
        chosen = [p for p in paths if self.full_matches(p)]
        both = [p for p in chosen if p in set(targeted)]
        if both:
            raise ValueError(
                f"LoraSpec.train_full {list(self.train_full)} and the LoRA targets {list(self.targets)} both "
                f"select {both[:8]}{' ...' if len(both) > 8 else ''}: a leaf is either trained in full or "
                f"adapted low-rank. Narrow one of them, e.g. add these paths to LoraSpec.exclude."
            )
        return chosen

    def _override(self, patterns: Mapping[str, Any], path: str, default):
        for pat, value in dict(patterns).items():
            if re.fullmatch(pat, path):
                return value
        return default

    def rank_for(self, path: str) -> int:
        return int(self._override(self.rank_pattern, path, self.rank))

    def alpha_for(self, path: str) -> float:
        return float(self._override(self.alpha_pattern, path, self.alpha))

    def scale_for(self, path: str) -> float:
        r = self.rank_for(path)
        return self.alpha_for(path) / (math.sqrt(r) if self.rslora else r)

    def axes_for(self, path: str) -> LoraAxes | None:
        return self._override(self.axes, path, None)

    def select(self, paths: Sequence[str]) -> list[str]:
        """The targeted paths among `paths`; raises when none is, or when an override matches none."""
        chosen = [p for p in paths if self.matches(p)]
        if not chosen:
            close = closest(self.targets, paths, regex=True)
            raise ValueError(
                f"LoraSpec.targets {list(self.targets)} (exclude {list(self.exclude)}) match no parameter. "
                f"Patterns must match the whole '/'-joined key path. Closest available paths: {close}. "
                f"All {len(paths)} paths start like: {list(paths)[:8]}"
            )
        for name in ("rank_pattern", "alpha_pattern", "axes"):
            for pat in dict(getattr(self, name)):
                if not any(re.fullmatch(pat, p) for p in chosen):
                    raise ValueError(
                        f"LoraSpec.{name} key {pat!r} matches no targeted parameter (it must match the whole path "
                        f"of a leaf that `targets` selects). Targeted paths: {closest(pat, chosen, regex=True)}"
                    )
        return chosen


def _check_rank(r, where) -> int:
    if not isinstance(r, numbers.Integral) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"{where}={r!r}: the rank must be a positive int")
    return int(r)
