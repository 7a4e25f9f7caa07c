"""The planner's compile process: ``python -m lora_jax.train.plan_worker --worker JOB``.

`lora_jax.train.plan_targets.run_worker` starts it with the environment a target needs (simulated host
devices, libtpu's settings, the CUDA plugin); it compiles one plan (or runs one search) and writes the
answer as one marked JSON line on stdout. It sits above `plan` and `plan_search` so neither imports the
other's caller.
"""

from __future__ import annotations

import json
import sys

from lora_jax.train import plan, plan_search, plan_targets


def main(argv: list[str]) -> None:
    """Runs the job in ``argv[1]`` (JSON: ``{"request": ..., "search": ...}``) and prints its answer."""
    job = json.loads(argv[1])
    try:
        request = plan.PlanRequest(**job["request"])
        if "search" in job:
            s = job["search"]
            answer = plan_search.search_here(request, s["axis"], s["limit"], s["max_compiles"])
        else:
            answer = plan.compile_plan(request)
    except (ValueError, TypeError, RuntimeError) as e:
        answer = {"failure": {"type": type(e).__name__, "message": str(e)}}
    sys.stdout.write(plan_targets._MARK + json.dumps(answer) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        main(sys.argv[1:])
