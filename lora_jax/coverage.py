"""Does a loaded adapter cover the model? The targeted leaves that an adapter leaves without a delta.

An adapter made for a model with fewer layers (2 layers loaded into 3) or other parameter names fits
every leaf it names, yet leaves part of the model untouched: the result is a silently different model.
A loader therefore compares what the adapter *targets* in this model (its `LoraSpec`, or the module
names of a PEFT config) with what it *provides*, and refuses a partial load unless asked for one
(``allow_partial=True``).

Example:
    >>> import jax.numpy as jnp
    >>> from lora_jax.delta import LoraDelta
    >>> from lora_jax.spec import LoraSpec
    >>> params = {f"layers_{i}": {"kernel": jnp.zeros((4, 4))} for i in range(3)}
    >>> d = LoraDelta(jnp.zeros((4, 1)), jnp.zeros((1, 4)))
    >>> deltas = {"layers_0": {"kernel": d}, "layers_1": {"kernel": d}, "layers_2": {"kernel": None}}
    >>> uncovered_targets(params, deltas, LoraSpec(rank=1, targets=".*/kernel"))
    ['layers_2/kernel']
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import jax

from lora_jax.delta import is_delta
from lora_jax.full import is_full
from lora_jax.spec import LoraSpec, path_str

__all__ = ["check_coverage", "uncovered_targets"]

# What an adapter targets: a LoraSpec (its `matches`), a predicate on "/"-joined key paths, or the paths.
Targets = LoraSpec | Callable[[str], bool] | Collection[str]


def _predicate(targets: Targets) -> Callable[[str], bool]:
    if isinstance(targets, LoraSpec):
        return targets.matches
    if callable(targets):
        return targets
    if isinstance(targets, str):
        raise TypeError(
            f"targets must be a LoraSpec, a predicate on key paths or a collection of key paths, "
            f"found the string {targets!r}; for a regex use LoraSpec(targets=...)."
        )
    wanted = set(targets)
    return wanted.__contains__


def uncovered_targets(params: Any, deltas: Any, targets: Targets) -> list[str]:
    """The key paths of `params` that `targets` selects but `deltas` gives no `LoraDelta`, in params order.

    Args:
        params: the model's params (arrays or ``jax.ShapeDtypeStruct``s).
        deltas: the loaded deltas: a tree with a `LoraDelta` at some key paths of `params` (None or
            nothing elsewhere).
        targets: what the adapter targets in this model: a `LoraSpec` (e.g. the one stored in the
            adapter), a predicate ``path -> bool`` on "/"-joined key paths, or a collection of key paths.

    Returns:
        The "/"-joined key paths left without a delta; empty when the adapter covers every target.
    """
    match = _predicate(targets)
    adapted = lambda x: is_delta(x) or is_full(x)  # noqa: E731
    covered = {
        path_str(p) for p, d in jax.tree_util.tree_flatten_with_path(deltas, is_leaf=adapted)[0] if adapted(d)
    }
    paths = (path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])
    return [p for p in paths if p not in covered and match(p)]


def check_coverage(
    params: Any, deltas: Any, targets: Targets, *, allow_partial: bool = False, source: str = "the adapter"
) -> list[str]:
    """Raises unless `deltas` give every leaf of `params` that `targets` selects a delta.

    Args:
        params, deltas, targets: as for `uncovered_targets`.
        allow_partial: return the uncovered paths instead of raising.
        source: what the deltas came from, for the message (e.g. ``"adapter '/runs/a/adapter'"``).

    Returns:
        The uncovered key paths (empty, unless `allow_partial`).

    Raises:
        ValueError: some targeted leaves get no delta and `allow_partial` is False; names them.

    Example:
        >>> import jax.numpy as jnp
        >>> params = {"layers_0": {"kernel": jnp.zeros((4, 4))}, "layers_1": {"kernel": jnp.zeros((4, 4))}}
        >>> check_coverage(params, {}, ["layers_1/kernel"], allow_partial=True)
        ['layers_1/kernel']
    """
    missing = uncovered_targets(params, deltas, targets)
    if missing and not allow_partial:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing) - 8} more)" if len(missing) > 8 else "")
        raise ValueError(
            f"{source} leaves {len(missing)} parameter(s) that it targets in this model without a delta: "
            f"{shown}. It was probably made for a model with fewer layers or other parameter names. Load it "
            f"into the model it was made for, or pass allow_partial=True to adapt only part of this model."
        )
    return missing
