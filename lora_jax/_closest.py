"""The closest names: the paths to suggest when a name or a pattern finds nothing.

One helper for every "did you mean" in the library: `LoraSpec` targets that match no parameter, and an
adapter file holding a key path the model does not have. Similarity is `difflib`'s ratio
(``2 * matches / total length``), the best over the given queries; ties keep the candidates' order.
"""

from __future__ import annotations

import difflib
import heapq
import re
from collections.abc import Iterable

__all__ = ["closest"]

# Characters with a meaning in a regular expression; dropped before comparing a pattern with a path.
_REGEX_SYNTAX = re.compile(r"[\\^$.*+?()\[\]{}|]")


def closest(
    queries: str | Iterable[str], candidates: Iterable[str], n: int = 5, *, regex: bool = False
) -> list[str]:
    """The `n` candidates most similar to any of `queries`, most similar first.

    Args:
        queries: a name (e.g. a key path) or several; a candidate scores its best match among them.
        candidates: the names to choose from (e.g. every key path of a model).
        n: how many to return (fewer when there are fewer candidates).
        regex: the queries are regular expressions: their syntax characters are ignored when comparing,
            so ``.*/qurey/kernel`` is compared as ``/qurey/kernel``.

    Returns:
        Up to `n` candidates, best first; equally good candidates keep their order in `candidates`.

    Example:
        >>> paths = ["params/h_0/attn/query/kernel", "params/h_0/attn/key/kernel", "params/h_0/mlp/kernel"]
        >>> closest(".*/qurey/kernel", paths, n=2, regex=True)
        ['params/h_0/attn/query/kernel', 'params/h_0/attn/key/kernel']
        >>> closest("params/layers_0/attn/query/kernel", paths, n=1)
        ['params/h_0/attn/query/kernel']
    """
    if n <= 0:
        return []
    queries = (queries,) if isinstance(queries, str) else tuple(queries)
    if regex:
        queries = tuple(_REGEX_SYNTAX.sub("", q) for q in queries)
    matchers = []
    for q in queries:
        m = difflib.SequenceMatcher(None, autojunk=False)
        m.set_seq2(q)  # a matcher caches facts about its second sequence: keep the query there
        matchers.append(m)
    # A min-heap of the n best so far as (score, -index, name): its root is the one to drop next, the
    # lowest score and, among equal scores, the latest candidate.
    best: list[tuple[float, int, str]] = []
    for i, name in enumerate(candidates):
        full = len(best) == n
        bar = best[0][0] if full else -1.0  # a candidate must score above this to enter
        score = 0.0
        for m in matchers:
            m.set_seq1(name)
            floor = max(bar, score)
            # Cheap upper bounds of the ratio first, as difflib.get_close_matches does.
            if m.real_quick_ratio() > floor and m.quick_ratio() > floor:
                score = max(score, m.ratio())
        if score > bar:
            (heapq.heapreplace if full else heapq.heappush)(best, (score, -i, name))
    return [name for _, _, name in sorted(best, reverse=True)]
