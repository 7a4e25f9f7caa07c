"""Hugging Face PEFT adapter files: export lora_jax deltas for PyTorch, import PEFT adapters into JAX.

A PEFT LoRA adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with, per
adapted ``nn.Linear`` (weight ``(out, in)``), ``<module>.lora_A.weight: (r, in)`` and
``<module>.lora_B.weight: (out, r)``, scaled by ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA). Our
Flax kernels are ``(in, out)``, so ``lora_A = aᵀ`` and ``lora_B = bᵀ``; per-leaf scales are written as
PEFT ``rank_pattern`` / ``alpha_pattern`` entries so that every module's ``alpha / r`` equals our scale.

Supported model families: those of `lora_jax.models.registry` with a PEFT task type, today ``"llama"``
(also with ``nn.scan``-stacked layers) and ``"bert"``, i.e. Hugging Face ``LlamaForCausalLM`` /
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

from lora_jax.delta import LoraDelta
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
        f"params/{family.layers}_0/attn/query/kernel).")
  i = m.group(1) if m.group(1) is not None else layer
  if i is None:
    raise ValueError(f"{path}: a stacked kernel needs a layer index")
  return family.hf_module(m.group(2), i)


def to_peft(deltas: Any, model_type: str) -> tuple[dict, dict[str, np.ndarray]]:
  """``(adapter_config, tensors)`` in PEFT's format for the deltas of a llama/bert model."""
  family = _family(model_type)
  leaves = jax.tree_util.tree_flatten_with_path(deltas, is_leaf=lambda x: isinstance(x, LoraDelta))[0]
  tensors, per_module, dropouts = {}, {}, set()
  for p, d in leaves:
    if not isinstance(d, LoraDelta):
      continue
    path = path_str(p)
    a, b = np.asarray(d.a, np.float32), np.asarray(d.b, np.float32)
    stacked = d.axes == LoraAxes((0,), (1,), (2,))
    if not (stacked or d.axes == LoraAxes()):
      raise ValueError(f"{path}: only (in, out) kernels and (layers, in, out) stacks map to PEFT Linear "
                       f"layers, found {d.axes}")
    layers = range(a.shape[0]) if stacked else [None]
    for i in layers:
      name = module_name(path, model_type, i)
      ai, bi = (a[i], b[i]) if stacked else (a, b)
      tensors[f"base_model.model.{name}.lora_A.weight"] = np.ascontiguousarray(ai.T)
      tensors[f"base_model.model.{name}.lora_B.weight"] = np.ascontiguousarray(bi.T)
      per_module[name] = (ai.shape[-1], d.scale * ai.shape[-1])  # (r, alpha) with alpha / r == scale
    dropouts.add(d.dropout)
  if not per_module:
    raise ValueError("to_peft: the deltas hold no LoraDelta")
  r, alpha = collections.Counter(per_module.values()).most_common(1)[0][0]
  config = {
      "peft_type": "LORA", "task_type": family.peft_task_type, "r": int(r), "lora_alpha": float(alpha),
      "target_modules": sorted(per_module), "bias": "none", "use_rslora": False,
      "lora_dropout": max(dropouts),  # PEFT has one rate for all modules
      "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None,
      "rank_pattern": {re.escape(n): int(v[0]) for n, v in per_module.items() if v[0] != r},
      "alpha_pattern": {re.escape(n): float(v[1]) for n, v in per_module.items() if v[1] != alpha},
  }
  return config, tensors


def save_peft(folder: str | os.PathLike, deltas: Any, model_type: str, base_model: str | None = None) -> str:
  """Writes a PEFT adapter folder that ``peft.PeftModel.from_pretrained(hf_model, folder)`` loads."""
  from safetensors.numpy import save_file
  config, tensors = to_peft(deltas, model_type)
  config["base_model_name_or_path"] = base_model
  os.makedirs(folder, exist_ok=True)
  save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(folder, "adapter_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return str(folder)


def _pattern_value(patterns: dict, name: str, default):
  # PEFT's rule: a key matches a module when the module name ends with it (at a "." boundary).
  for key, value in patterns.items():
    if re.match(rf"(.*\.)?({key})$", name):
      return value
  return default


def load_peft(folder: str | os.PathLike, params: Any, model_type: str) -> Any:
  """Deltas for `params` (a llama/bert variables tree) from a PEFT LoRA adapter folder.

  Every adapter tensor must land on a parameter of matching shape; anything else is a ValueError
  naming the module, never a partial load.
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
  with open(cfg_path) as f:
    cfg = json.load(f)
  if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora") or cfg.get("fan_in_fan_out"):
    raise ValueError(f"{cfg_path}: only plain LoRA adapters are supported (peft_type=LORA, no DoRA, "
                     f"fan_in_fan_out=false); found {({k: cfg.get(k) for k in ('peft_type', 'use_dora', 'fan_in_fan_out')})}")
  try:
    tensors = load_file(st_path)
  except (SafetensorError, OSError, ValueError) as e:
    raise ValueError(f"{st_path}: cannot read the adapter tensors ({e}); the file is corrupted or not "
                     f"safetensors") from None
  found: dict[str, dict[str, np.ndarray]] = {}
  for key, x in tensors.items():
    m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
    if not m:
      raise ValueError(f"{st_path}: unexpected tensor {key!r} (only lora_A / lora_B weights are supported)")
    found.setdefault(m.group(1), {})[m.group(2)] = x
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  used, out = set(), []
  for path, w in ((path_str(p), w) for p, w in leaves):
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
      raise ValueError(f"{path}: the adapter covers only some layers of this stacked kernel "
                       f"({sum(present)} of {len(names)}); lora_jax keeps one rank per stacked kernel")
    a_l, b_l, scales = [], [], set()
    for n, wi in zip(names, [w[i] for i in layers] if stacked else [w]):
      ab = found[n]
      if set(ab) != {"A", "B"}:
        raise ValueError(f"{n}: the adapter has lora_{'A' if 'A' not in ab else 'B'} missing")
      a, b = ab["A"].T, ab["B"].T
      r = a.shape[-1]
      if a.shape[0] != wi.shape[0] or b.shape != (r, wi.shape[1]):
        raise ValueError(f"{n} -> {path}: adapter shapes lora_A {ab['A'].shape}, lora_B {ab['B'].shape} do not "
                         f"fit the kernel of shape {tuple(wi.shape)} (expected lora_A (r, {wi.shape[0]}) and "
                         f"lora_B ({wi.shape[1]}, r)). The adapter was made for another model.")
      rank = _pattern_value(cfg.get("rank_pattern") or {}, n, cfg["r"])
      alpha = _pattern_value(cfg.get("alpha_pattern") or {}, n, cfg["lora_alpha"])
      if rank != r:
        raise ValueError(f"{n}: adapter_config says rank {rank} but lora_A has rank {r}")
      scales.add(alpha / (math.sqrt(r) if cfg.get("use_rslora") else r))
      a_l.append(a), b_l.append(b)
      used.add(n)
    ranks = sorted({a.shape[-1] for a in a_l})
    if len(scales) != 1 or len(ranks) != 1:
      raise ValueError(f"{path}: the layers of this stacked kernel have different ranks {ranks} or scales "
                       f"{sorted(scales)} in the adapter; lora_jax keeps one rank and scale per stacked "
                       f"kernel. Load it into the model with scan_layers=False instead.")
    axes = LoraAxes((0,), (1,), (2,)) if stacked else LoraAxes()
    a, b = (np.stack(a_l), np.stack(b_l)) if stacked else (a_l[0], b_l[0])
    out.append(LoraDelta(jax.numpy.asarray(a, np.float32), jax.numpy.asarray(b, np.float32),
                         scale=float(scales.pop()), axes=axes, dropout=float(cfg.get("lora_dropout", 0.0))))
  unused = sorted(set(found) - used)
  if unused:
    raise ValueError(f"{folder}: adapter modules {unused[:5]} (of {len(unused)}) match no parameter of this "
                     f"{model_type} model; refusing a partial load.")
  return jax.tree_util.tree_unflatten(treedef, out)
