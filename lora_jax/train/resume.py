"""Resuming a run: check that a checkpoint belongs to these settings, then restore it.

`check_resume` runs before anything expensive is loaded: a checkpoint made with other values of
`config.TRAJECTORY_FIELDS` (or on other data files) is refused with every difference listed, and a
corrupted one names the ``--resume-from`` step that goes back to the previous checkpoint. `restore`
places the saved deltas and optimizer state like the run's setup.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import sys
from typing import Any

from lora_jax import checkpoint
from lora_jax.train.config import DATA_FIELDS, LEGACY_DEFAULTS, TRAJECTORY_FIELDS, VARIANT_FIELDS, TrainConfig
from lora_jax.train.engine import Setup
from lora_jax.train.mesh import log

__all__ = ["check_resume", "restore"]


def _from_orbax(exc: BaseException | None, obj: Any = None) -> bool:
    """Whether an exception Python could not report (or its coroutine) is a leftover of an orbax read."""
    code = getattr(obj, "cr_code", None)
    if code is not None and "orbax" in code.co_filename:
        return True
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return True
    tb = getattr(exc, "__traceback__", None)
    while tb is not None:
        if "orbax" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


class _OrbaxLeftovers(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        leftover = record.getMessage().startswith("Task exception was never retrieved")
        return not (leftover and _from_orbax(record.exc_info[1] if record.exc_info else None))


@contextlib.contextmanager
def _quiet_failed_reads():
    """Around a checkpoint read. When an orbax read fails, its other reads still in flight end later, as
    coroutines never finished and callbacks into a closed event loop, which Python prints to stderr
    ("Exception ignored in ...", "Event loop is closed", "Task exception was never retrieved") after the
    error is raised, repeating it as pages of tensorstore specs. Those are dropped; everything else goes to
    the previous hooks. After a failure the filter stays (the leftovers surface whenever they are collected).
    """
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _from_orbax(unraisable.exc_value, unraisable.object):
            previous(unraisable)

    sys.unraisablehook = hook
    leftovers = _OrbaxLeftovers()
    logging.getLogger("asyncio").addFilter(leftovers)
    try:
        yield
    except BaseException:
        raise
    else:
        sys.unraisablehook = previous
        logging.getLogger("asyncio").removeFilter(leftovers)


def _resume_hint(ckpt: checkpoint.TrainCheckpointer, error: Exception, step: int) -> str:
    """A checkpoint error of `ckpt` at `step`, with the library's hint replaced by the ``--resume-from`` one."""
    text = re.sub(r"\.?\s*See full TensorStore details:.*?(?=\. Nothing was)", "", str(error), flags=re.S)
    text = re.split(
        r"(?:restore an earlier step \(|there is no earlier checkpoint here;|move the folder away to "
        r"restart from an earlier step)",
        text,
    )[0].rstrip()
    if not text.endswith(";"):
        return str(error)  # not the library's corruption message: leave it as it is
    earlier = [s for s in ckpt.all_steps() if s < step]
    out = ckpt.directory.parent
    if earlier:
        return (
            f"{text} to go back to the checkpoint of step {earlier[-1]}, rerun with --resume-from {earlier[-1]} "
            f"(the newer checkpoints are moved to {ckpt.directory / 'set_aside'}, nothing is deleted), or use "
            f"another --out to start over."
        )
    return (
        f"{text} there is no earlier checkpoint: use another --out (or move {str(out)!r} away) to start over."
    )


def check_resume(ckpt: checkpoint.TrainCheckpointer, cfg: TrainConfig) -> bool:
    """Whether `ckpt` holds a run of `cfg` to resume (False: none there): its latest checkpoint, or the one
    of step ``cfg.resume_from``.

    Raises:
      ValueError: the checkpoint was made with other values of `TRAJECTORY_FIELDS` (every difference
        listed); its metadata cannot be read or fails its checksum (the message says which
        ``--resume-from`` goes back to the previous checkpoint); ``resume_from`` is not a saved step.
        Nothing is restored or deleted.
    """
    step = cfg.resume_from
    if step is None:
        step = ckpt.latest_step()
        if step is None:
            return False
    elif step not in ckpt.all_steps():
        raise ValueError(
            f"--resume-from {step}: there is no checkpoint of step {step} in {str(ckpt.directory)!r}; the "
            f"steps there are {ckpt.all_steps()}."
        )
    try:
        with _quiet_failed_reads():
            saved = ckpt.metadata(step)
        stored = {
            **{k: getattr(TrainConfig, k) for k in DATA_FIELDS + VARIANT_FIELDS},
            **LEGACY_DEFAULTS,
            **saved.get("config", {}),
        }
    except ValueError as e:
        raise ValueError(_resume_hint(ckpt, e, step)) from None
    now = dataclasses.asdict(cfg)
    diff = {k: (stored.get(k), now[k]) for k in TRAJECTORY_FIELDS if stored.get(k) != now[k]}
    if diff:
        raise ValueError(
            f"{ckpt.directory} holds a run with other settings; nothing was restored or "
            f"deleted. Differences (checkpoint, now): {diff}. Use the same flags or another --out."
        )
    if saved.get("data_fingerprint") and cfg.data != "movie-reviews":
        from lora_jax.data import files

        if saved["data_fingerprint"] != files.data_fingerprint(cfg.data):
            raise ValueError(
                f"{ckpt.directory} holds a run on other data: the files of --data {cfg.data!r} changed since "
                f"it was saved; nothing was restored or deleted. Use the same files or another --out."
            )
    return True


def restore(
    ckpt: checkpoint.TrainCheckpointer, setup: Setup, step: int | None = None
) -> tuple[Any, Any, int, dict | None]:
    """``(deltas, opt_state, step, base_detail)`` of the latest checkpoint (or that of `step`), placed like
    `setup`'s. With `step`, the newer checkpoints are then moved to ``checkpoints/set_aside/`` (only after
    the restore succeeded), so the run continues from `step`.

    ``base_detail`` is the base model's test evaluation stored with the run (None if it had none yet).

    Raises:
      ValueError: the checkpoint does not match the setup, cannot be read, or fails its checksums (the
        message says which ``--resume-from`` goes back further). Nothing is deleted.
    """
    which = ckpt.latest_step() if step is None else step
    try:
        with _quiet_failed_reads():
            state, meta = ckpt.restore({"deltas": setup.deltas, "opt_state": setup.opt_state}, step=which)
    except ValueError as e:
        raise ValueError(_resume_hint(ckpt, e, which)) from None
    step = int(meta["step"])
    moved = ckpt.set_aside_after(step) if which != ckpt.latest_step() else []
    if moved:
        log(f"moved the checkpoints after step {step} to {moved[0].parent}")
    log(f"resumed from step {step} ({ckpt.directory})")
    return state["deltas"], state["opt_state"], step, meta.get("base_detail")
