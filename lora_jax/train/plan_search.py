"""The largest batch or sequence length that fits the device memory, found by compiling.

Each candidate is a full compile of the train step by the memory planner (`lora_jax.train.plan`):
the search doubles from the smallest value until a compile does not fit, then bisects, all in one
child process (one JAX start-up, the devices built once).

Example (a few compiles; ``lora-jax plan ... --search batch`` on the command line)::

    from lora_jax.train.plan import PlanRequest
    best = search(PlanRequest("llama-3-8b", mesh="fsdp=-1", target="tpu:v5e:2x2"), "batch")["best"]
    best["batch"], best["per_device"]["total"]
"""

from __future__ import annotations

import dataclasses

from lora_jax.train import plan as plan_lib
from lora_jax.train import plan_targets

__all__ = ["search", "search_here"]


def search(
    request: plan_lib.PlanRequest,
    axis: str = "batch",
    *,
    limit: int | None = None,
    max_compiles: int = 10,
    timeout: float | None = None,
) -> dict:
    """The largest ``batch`` (a multiple of ``data·fsdp``) or ``seq`` (a multiple of 128) that fits.

    Doubles from the smallest value until a compile does not fit the device memory (or reaches
    `limit`), then bisects; all compiles run in one child process.

    Returns:
      ``{"axis", "best" (the report of the largest fitting value, or None), "tried": [{"value",
      "total", "fits"}, ...]}``.
    """
    c = plan_lib.check(request)
    if c.device_memory is None:
        raise ValueError("searching what fits needs --device-memory (the cpu target has none of its own).")
    if axis not in ("batch", "seq"):
        raise ValueError(f"search axis {axis!r}: expected 'batch' or 'seq'.")
    job = {
        "request": dataclasses.asdict(request),
        "search": {"axis": axis, "limit": limit, "max_compiles": max_compiles},
    }
    return plan_targets.run_worker(job, c.target, c.num_devices, timeout)


def search_here(request: plan_lib.PlanRequest, axis: str, limit: int | None, max_compiles: int) -> dict:
    """`search` in this process (started with `plan_targets.environment`, as `search` does)."""
    c = plan_lib.check(request)
    unit = c.mesh_sizes["data"] * c.mesh_sizes["fsdp"] if axis == "batch" else 128
    devices = plan_targets.compile_devices(c.target, c.num_devices)
    tried: list[dict] = []
    reports: dict[int, dict] = {}

    def fits(n: int) -> bool:
        change = {"batch": n} if axis == "batch" else {"seq": n, "loss_tokens": None}
        rep = plan_lib.compile_plan(dataclasses.replace(request, **change), devices)
        reports[n] = rep
        tried.append(
            {
                "value": n,
                "total": rep["per_device"]["total"],
                "fits": bool(rep["fits"]),
                "compile_seconds": rep["compile_seconds"],
            }
        )
        return bool(rep["fits"])

    good, bad, n = 0, None, unit
    while len(tried) < max_compiles and (limit is None or n <= limit):
        if not fits(n):
            bad = n
            break
        good, n = n, n * 2
    while bad is not None and bad - good > unit and len(tried) < max_compiles:
        mid = (good + bad) // 2 // unit * unit
        if fits(mid):
            good = mid
        else:
            bad = mid
    return {"axis": axis, "best": reports.get(good), "tried": tried}
