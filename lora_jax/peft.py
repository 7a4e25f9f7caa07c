"""Hugging Face PEFT adapter files: export lora_jax deltas for PyTorch, import PEFT adapters into JAX.

A PEFT LoRA adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with, per
adapted ``nn.Linear`` (weight ``(out, in)``), ``<module>.lora_A.weight: (r, in)`` and
``<module>.lora_B.weight: (out, r)``, scaled by ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA). Our
Flax kernels are ``(in, out)``, so ``lora_A = aᵀ`` and ``lora_B = bᵀ``; per-leaf scales are written as
PEFT ``rank_pattern`` / ``alpha_pattern`` entries so that every module's ``alpha / r`` equals our scale.

Fully trained leaves (`FullLeaf`, ``LoraSpec.train_full``) are PEFT's ``modules_to_save``: the whole
module is listed in the config and its parameters are stored under the module's own name,
``base_model.model.<module>.weight`` / ``.bias`` (PEFT keeps them in memory as
``<module>.modules_to_save.default.weight`` and drops the ``modules_to_save.<adapter>.`` part on disk;
both spellings are read). A parameter of the module that was not trained in full is not written, and
PEFT then keeps the base value for it, as lora_jax does. Names come from the family's tables
(projections, norms, embeddings); a top-level module of ours with no Hugging Face counterpart, such as
`BertClassifier`'s ``classifier`` head, keeps its own name (the PyTorch model must call it the same).

Supported model families: those of `lora_jax.models.registry` with a PEFT task type, e.g. ``"llama"``,
``"mistral"``, ``"qwen2"``, ``"qwen3"`` (also with ``nn.scan``-stacked layers) and ``"bert"``, i.e. Hugging
Face ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` /
``BertModel``. The module names come from each family's ``hf_projections`` table.

    lj.peft.save_peft("adapter/", deltas, model_type="llama")     # PeftModel.from_pretrained(hf, "adapter/")
    deltas = lj.peft.load_peft("adapter/", variables, model_type="llama")
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from typing import Any

import jax
import numpy as np

from lora_jax.coverage import check_coverage
from lora_jax.delta import LoraDelta
from lora_jax.dora import DoraDelta, is_dora
from lora_jax.full import FullLeaf, is_full
from lora_jax.spec import LoraAxes, path_str

__all__ = ["save_peft", "load_peft", "to_peft", "module_name"]


def _family(model_type: str):
    from lora_jax.models import registry

    supported = sorted(t for t, f in registry.FAMILIES.items() if f.peft_task_type is not None)
    if model_type not in supported:
        raise ValueError(f"model_type={model_type!r} is not supported for PEFT files; use one of {supported}")
    return registry.FAMILIES[model_type]


def _kernel_path(family) -> re.Pattern:
    """``<layers>_<i>/<projection>/kernel`` (or the scan stack ``<layers>/<projection>/kernel``)."""
    return re.compile(rf"(?:params/)?{re.escape(family.layers)}(?:_(\d+))?/(.+)/kernel")


def module_name(path: str, model_type: str, layer: int | None = None) -> str:
    """HF module name of our kernel `path` (``layer`` picks one layer of a scan-stacked kernel)."""
    family = _family(model_type)
    m = _kernel_path(family).fullmatch(path)
    if not m or m.group(2) not in family.hf_projections:
        raise ValueError(
            f"{path}: no Hugging Face {model_type} module corresponds to this parameter; PEFT export supports "
            f"the per-layer projections {sorted(family.hf_projections)} (paths like "
            f"params/{family.layers}_0/attn/query/kernel)."
        )
    i = m.group(1) if m.group(1) is not None else layer
    if i is None:
        raise ValueError(f"{path}: a stacked kernel needs a layer index")
    return family.hf_module(m.group(2), i)


_HF_PARAM = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def _full_name(path: str, family) -> tuple[str, str, bool] | None:
    """``(HF module, parameter, transpose)`` of our leaf `path` as a PEFT ``modules_to_save`` tensor, or
    None when it has no Hugging Face name (a scan-stacked leaf, a leaf we cannot name).

    Per-layer projections and norms, embeddings and top-level modules come from the family's name
    tables; any other top-level module (a classification head) keeps its own name.
    """
    import sys

    tables = sys.modules[family.from_hf.__module__]
    parts = path.split("/")
    parts = parts[1:] if parts[0] == "params" else parts
    if len(parts) < 2 or parts[-1] not in _HF_PARAM:
        return None
    module, leaf = "/".join(parts[:-1]), parts[-1]
    norms = getattr(tables, "HF_NORMS", {})
    top = {k: v[0] for k, v in getattr(tables, "HF_TOP", {}).items()}
    top.update({f"embeddings/{k}": v for k, v in getattr(tables, "HF_EMBEDDINGS", {}).items()})
    m = re.fullmatch(rf"{re.escape(family.layers)}_(\d+)/(.+)", module)
    if m:
        rest = m.group(2)
        if rest in family.hf_projections:
            hf = family.hf_module(rest, int(m.group(1)))
        elif rest in norms:
            hf = family.hf_layer.format(i=int(m.group(1))) + norms[rest]
        else:
            return None
    elif module in top:
        hf = top[module]
    elif "/" in module or module == family.layers:
        return None
    else:
        hf = module
    return hf, _HF_PARAM[leaf], leaf == "kernel"


def _full_tensor(path: str, f: FullLeaf, family, model_type: str) -> tuple[str, str, np.ndarray]:
    """``(HF module, tensor name, array)`` of a fully trained leaf for `to_peft` (transposed kernel)."""
    name = _full_name(path, family)
    if name is None:
        raise ValueError(
            f"{path}: this fully trained leaf (LoraSpec.train_full) has no Hugging Face {model_type} module "
            f"name, so it cannot be a PEFT modules_to_save entry. PEFT export supports per-layer "
            f"projections and norms, embeddings and top-level modules (a classification head), with layers "
            f"unstacked (scan_layers=False). Save it with lj.adapter.save_adapter instead."
        )
    module, param, transpose = name
    x = np.asarray(f.value, np.float32)
    return module, f"base_model.model.{module}.{param}", np.ascontiguousarray(x.T if transpose else x)


def to_peft(deltas: Any, model_type: str) -> tuple[dict, dict[str, np.ndarray]]:
    """``(adapter_config, tensors)`` in PEFT's format for the deltas of a llama/bert model (fully trained
    leaves as ``modules_to_save``)."""
    family = _family(model_type)
    leaves = jax.tree_util.tree_flatten_with_path(
        deltas, is_leaf=lambda x: isinstance(x, LoraDelta) or is_full(x)
    )[0]
    tensors, per_module, dropouts, doras, to_save = {}, {}, set(), set(), set()
    for p, d in leaves:
        if is_full(d):
            module, key, x = _full_tensor(path_str(p), d, family, model_type)
            tensors[key] = x
            to_save.add(module)
            continue
        if not isinstance(d, LoraDelta):
            continue
        path = path_str(p)
        a, b = np.asarray(d.a, np.float32), np.asarray(d.b, np.float32)
        stacked = d.axes == LoraAxes((0,), (1,), (2,))
        if not (stacked or d.axes == LoraAxes()):
            raise ValueError(
                f"{path}: only (in, out) kernels and (layers, in, out) stacks map to PEFT Linear "
                f"layers, found {d.axes}"
            )
        layers = range(a.shape[0]) if stacked else [None]
        for i in layers:
            name = module_name(path, model_type, i)
            ai, bi = (a[i], b[i]) if stacked else (a, b)
            tensors[f"base_model.model.{name}.lora_A.weight"] = np.ascontiguousarray(ai.T)
            tensors[f"base_model.model.{name}.lora_B.weight"] = np.ascontiguousarray(bi.T)
            if is_dora(d):  # DoRA: one magnitude per output feature, PEFT's `lora_magnitude_vector`
                mi = np.asarray(d.m, np.float32)
                tensors[f"base_model.model.{name}.lora_magnitude_vector"] = np.ascontiguousarray(
                    mi[i] if stacked else mi
                )
            doras.add(is_dora(d))
            per_module[name] = (ai.shape[-1], d.scale * ai.shape[-1])  # (r, alpha) with alpha / r == scale
        dropouts.add(d.dropout)
    if not per_module:
        raise ValueError("to_peft: the deltas hold no LoraDelta")
    if len(doras) > 1:
        raise ValueError(
            "to_peft: some deltas are DoRA and some plain LoRA; a PEFT adapter has one use_dora "
            "flag for all its modules. Export them as two adapters."
        )
    r, alpha = collections.Counter(per_module.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": family.peft_task_type,
        "r": int(r),
        "lora_alpha": float(alpha),
        "target_modules": sorted(per_module),
        "bias": "none",
        "use_rslora": False,
        "lora_dropout": max(dropouts),  # PEFT has one rate for all modules
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": sorted(to_save) or None,
        "use_dora": doras == {True},
        "rank_pattern": {re.escape(n): int(v[0]) for n, v in per_module.items() if v[0] != r},
        "alpha_pattern": {re.escape(n): float(v[1]) for n, v in per_module.items() if v[1] != alpha},
    }
    return config, tensors


def _replace_durably(tmp: str, path: str) -> None:
    """Flushes `tmp` to disk and renames it to `path` (a reader sees the old file or the new, never part)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_peft(folder: str | os.PathLike, deltas: Any, model_type: str, base_model: str | None = None) -> str:
    """Writes a PEFT adapter folder that ``peft.PeftModel.from_pretrained(hf_model, folder)`` loads.

    Each of the two files is written under a temporary name and renamed, tensors first: an interrupted
    save leaves the previous files (or none), never a truncated one.
    """
    from safetensors.numpy import save_file

    config, tensors = to_peft(deltas, model_type)
    config["base_model_name_or_path"] = base_model
    os.makedirs(folder, exist_ok=True)
    st_path = os.path.join(folder, "adapter_model.safetensors")
    cfg_path = os.path.join(folder, "adapter_config.json")
    try:
        save_file(tensors, st_path + ".tmp", metadata={"format": "pt"})
        with open(cfg_path + ".tmp", "w") as f:
            json.dump(config, f, indent=2)
        _replace_durably(st_path + ".tmp", st_path)
        _replace_durably(cfg_path + ".tmp", cfg_path)
    finally:
        for tmp in (st_path + ".tmp", cfg_path + ".tmp"):
            if os.path.exists(tmp):
                os.remove(tmp)
    return str(folder)


def _read_config(path: str) -> dict:
    """``adapter_config.json`` as a dict, with the fields `load_peft` uses checked (file and field named)."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: not valid JSON ({e.msg}, line {e.lineno} column {e.colno}); the PEFT adapter "
            f"config is corrupted or was edited by hand."
        ) from None
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: not a UTF-8 text file ({e.reason}); the PEFT adapter config is corrupted."
        ) from None
    if not isinstance(cfg, dict):
        raise ValueError(
            f"{path}: expected a JSON object (PEFT's LoraConfig), found a JSON {type(cfg).__name__}."
        )
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    problems = [f"the field {k!r} is missing" for k in ("r", "lora_alpha") if k not in cfg]
    if "r" in cfg and not (isinstance(cfg["r"], int) and not isinstance(cfg["r"], bool) and cfg["r"] >= 1):
        problems.append(f"'r' must be a positive integer, found {cfg['r']!r}")
    if "lora_alpha" in cfg and not number(cfg["lora_alpha"]):
        problems.append(f"'lora_alpha' must be a finite number, found {cfg['lora_alpha']!r}")
    if not number(cfg.get("lora_dropout", 0.0)) or not 0 <= cfg.get("lora_dropout", 0.0) < 1:
        problems.append(f"'lora_dropout' must be a number in [0, 1), found {cfg.get('lora_dropout')!r}")
    for k in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(k) or {}, dict):
            problems.append(f"{k!r} must be an object (module pattern -> value), found {cfg[k]!r}")
    for k in ("target_modules", "exclude_modules", "modules_to_save"):
        v = cfg.get(k)
        if not (
            v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(t, str) for t in v))
        ):
            problems.append(f"{k!r} must be a list of module names or a regex string, found {v!r}")
    v = cfg.get("layers_to_transform")
    if not (v is None or isinstance(v, int) or (isinstance(v, list) and all(isinstance(i, int) for i in v))):
        problems.append(f"'layers_to_transform' must be a layer index or a list of them, found {v!r}")
    if problems:
        raise ValueError(f"{path}: {'; '.join(problems)}. Nothing was loaded.")
    return cfg


def _matches(spec, name: str) -> bool:
    """PEFT's module matching: a regex string is full-matched, a list entry matches a name ending in it."""
    if isinstance(spec, str):
        return spec == "all-linear" or re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _targeted_paths(params: Any, cfg: dict, found: dict, family, model_type: str) -> set[str]:
    """The key paths of `params` that the PEFT adapter targets in this model.

    A projection (``self_attn.q_proj``) is targeted when the adapter has it for some layer or
    ``target_modules`` names it in some layer of this model; it is then targeted in every layer, except
    those outside ``layers_to_transform`` and the modules of ``exclude_modules``. (A list of exact module
    names, as `save_peft` writes, thus targets its projections in every layer: an adapter for 2 layers
    does not cover 3.)
    """
    kernel_path = _kernel_path(family)
    layers = cfg.get("layers_to_transform")
    layers = None if layers is None else {layers} if isinstance(layers, int) else set(layers)
    kernels = []  # (path, projection, [(layer, module name)])
    for p, w in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = path_str(p)
        m = kernel_path.fullmatch(path)
        if m and m.group(2) in family.hf_projections:
            indices = range(np.shape(w)[0]) if m.group(1) is None else [int(m.group(1))]
            kernels.append((path, m.group(2), [(i, module_name(path, model_type, i)) for i in indices]))
    projections = {
        proj
        for _, proj, names in kernels
        for _, n in names
        if n in found or (cfg.get("target_modules") is not None and _matches(cfg["target_modules"], n))
    }
    excluded = lambda n: bool(cfg.get("exclude_modules")) and _matches(cfg["exclude_modules"], n)
    return {
        path
        for path, proj, names in kernels
        if proj in projections and any((layers is None or i in layers) and not excluded(n) for i, n in names)
    }


def _pattern_value(patterns: dict, name: str, default):
    # PEFT's rule: a key matches a module when the module name ends with it (at a "." boundary).
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def load_peft(folder: str | os.PathLike, params: Any, model_type: str, *, allow_partial: bool = False) -> Any:
    """Deltas for `params` (a llama/bert variables tree) from a PEFT LoRA adapter folder.

    Every adapter tensor must land on a parameter of matching shape, and every parameter of this model
    that the adapter targets (its ``target_modules``, ``layers_to_transform`` and ``exclude_modules``) must
    get a delta: an adapter made for a model with fewer layers (2 layers into 3) is refused, naming the
    parameters left without one, unless ``allow_partial=True``. Layers of an ``nn.scan`` stack are one
    parameter: a partial load into it is refused even then (load into ``scan_layers=False`` params).

    Raises:
      ValueError: the folder, its ``adapter_config.json`` (invalid JSON, a missing or wrong ``r`` /
        ``lora_alpha``, ...) or its tensors are unusable, or they do not fit this model; the file and the
        field, module or parameter are named. Nothing is loaded partially.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    family = _family(model_type)
    kernel_path = _kernel_path(family)
    cfg_path = os.path.join(folder, "adapter_config.json")
    st_path = os.path.join(folder, "adapter_model.safetensors")
    for p in (cfg_path, st_path):
        if not os.path.exists(p):
            raise ValueError(f"{folder}: not a PEFT adapter folder, missing {os.path.basename(p)}")
    cfg = _read_config(cfg_path)
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("fan_in_fan_out"):
        raise ValueError(
            f"{cfg_path}: only LoRA and DoRA adapters are supported (peft_type=LORA, "
            f"fan_in_fan_out=false); found { ({k: cfg.get(k) for k in ('peft_type', 'use_dora', 'fan_in_fan_out')}) }"
        )
    try:
        tensors = load_file(st_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(
            f"{st_path}: cannot read the adapter tensors ({e}); the file is corrupted or not safetensors"
        ) from None
    found: dict[str, dict[str, np.ndarray]] = {}
    full_found: dict[str, np.ndarray] = {}  # modules_to_save tensors: "<module>.<param>" -> array
    to_save = cfg.get("modules_to_save") or []
    to_save = [to_save] if isinstance(to_save, str) else to_save
    for key, x in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+?)(?:\.modules_to_save\.[^.]+)?\.([^.]+)", key)
        if m and ".lora_" not in key and _matches(to_save, m.group(1)):
            full_found[f"{m.group(1)}.{m.group(2)}"] = x
            continue
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?", key)
        if m:  # DoRA magnitude
            found.setdefault(m.group(1), {})["M"] = x
            continue
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if not m:
            raise ValueError(
                f"{st_path}: unexpected tensor {key!r} (only lora_A / lora_B weights are supported)"
            )
        found.setdefault(m.group(1), {})[m.group(2)] = x
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    used, out = set(), []
    for path, w in ((path_str(p), w) for p, w in leaves):
        name = _full_name(path, family) if full_found else None
        if name is not None and f"{name[0]}.{name[1]}" in full_found:  # a modules_to_save parameter
            key = f"{name[0]}.{name[1]}"
            x = full_found[key]
            x = x.T if name[2] and x.ndim == 2 else x
            if tuple(x.shape) != tuple(np.shape(w)):
                raise ValueError(
                    f"{key} -> {path}: the adapter's modules_to_save tensor has shape {tuple(full_found[key].shape)}"
                    f", which does not fit the parameter of shape {tuple(np.shape(w))}"
                    f"{' (transposed: an nn.Linear weight is (out, in))' if name[2] else ''}. The adapter was "
                    f"made for another model (e.g. another number of labels)."
                )
            used.add(key)
            out.append(FullLeaf(jax.numpy.asarray(x, np.float32)))
            continue
        m = kernel_path.fullmatch(path)
        if not m or m.group(2) not in family.hf_projections:
            out.append(None)
            continue
        stacked = m.group(1) is None
        layers = range(w.shape[0]) if stacked else [None]
        names = [module_name(path, model_type, i) for i in layers]
        present = [n in found for n in names]
        if not any(present):
            out.append(None)
            continue
        if not all(present):
            missing = [n for n, here in zip(names, present, strict=True) if not here]
            raise ValueError(
                f"PEFT adapter {str(folder)!r} covers only {sum(present)} of the {len(names)} layers of the "
                f"stacked kernel {path}, leaving {len(missing)} without a delta ({', '.join(missing[:4])}"
                f"{', ...' if len(missing) > 4 else ''}): it was probably made for a model with fewer layers. "
                f"Load it into the model it was made for; lora_jax keeps one delta per stacked kernel, so a "
                f"partial load (allow_partial=True) needs the layers unstacked (scan_layers=False)."
            )
        a_l, b_l, m_l, scales = [], [], [], set()
        for n, wi in zip(names, [w[i] for i in layers] if stacked else [w]):
            ab = found[n]
            want = {"A", "B", "M"} if cfg.get("use_dora") else {"A", "B"}
            if set(ab) != want:
                raise ValueError(
                    f"{n}: the adapter's tensors for this module are {sorted(ab)} (M: the DoRA "
                    f"lora_magnitude_vector), expected {sorted(want)} for use_dora={bool(cfg.get('use_dora'))}"
                )
            a, b = ab["A"].T, ab["B"].T
            r = a.shape[-1]
            if a.shape[0] != wi.shape[0] or b.shape != (r, wi.shape[1]):
                raise ValueError(
                    f"{n} -> {path}: adapter shapes lora_A {ab['A'].shape}, lora_B {ab['B'].shape} do not "
                    f"fit the kernel of shape {tuple(wi.shape)} (expected lora_A (r, {wi.shape[0]}) and "
                    f"lora_B ({wi.shape[1]}, r)). The adapter was made for another model."
                )
            rank = _pattern_value(cfg.get("rank_pattern") or {}, n, cfg["r"])
            alpha = _pattern_value(cfg.get("alpha_pattern") or {}, n, cfg["lora_alpha"])
            if rank != r:
                raise ValueError(f"{n}: adapter_config says rank {rank} but lora_A has rank {r}")
            scales.add(alpha / (math.sqrt(r) if cfg.get("use_rslora") else r))
            a_l.append(a), b_l.append(b)
            if "M" in ab:
                if ab["M"].shape != (wi.shape[1],):
                    raise ValueError(
                        f"{n}: lora_magnitude_vector has shape {ab['M'].shape}, expected ({wi.shape[1]},)"
                    )
                m_l.append(ab["M"])
            used.add(n)
        ranks = sorted({a.shape[-1] for a in a_l})
        if len(scales) != 1 or len(ranks) != 1:
            raise ValueError(
                f"{path}: the layers of this stacked kernel have different ranks {ranks} or scales "
                f"{sorted(scales)} in the adapter; lora_jax keeps one rank and scale per stacked "
                f"kernel. Load it into the model with scan_layers=False instead."
            )
        axes = LoraAxes((0,), (1,), (2,)) if stacked else LoraAxes()
        a, b = (np.stack(a_l), np.stack(b_l)) if stacked else (a_l[0], b_l[0])
        d = LoraDelta(
            jax.numpy.asarray(a, np.float32),
            jax.numpy.asarray(b, np.float32),
            scale=float(scales.pop()),
            axes=axes,
            dropout=float(cfg.get("lora_dropout", 0.0)),
        )
        if m_l:
            m = jax.numpy.asarray(np.stack(m_l) if stacked else m_l[0], np.float32)
            d = DoraDelta(d.a, d.b, scale=d.scale, axes=d.axes, dropout=d.dropout, m=m)
        out.append(d)
    unused = sorted((set(found) | set(full_found)) - used)
    if unused:
        raise ValueError(
            f"{folder}: adapter modules {unused[:5]} (of {len(unused)}) match no parameter of this "
            f"{model_type} model; refusing a partial load."
        )
    deltas = jax.tree_util.tree_unflatten(treedef, out)
    check_coverage(
        params,
        deltas,
        _targeted_paths(params, cfg, found, family, model_type),
        allow_partial=allow_partial,
        source=f"PEFT adapter {str(folder)!r}",
    )
    return deltas
