"""Runs each experiment script in --small mode (a subprocess each) and checks what it writes; checks
that experiments and notebooks use the library as any user would."""

import ast
import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"


def slow(test):
    return pytest.mark.slow(pytest.mark.assets(test))


def _imported_roots(source: str) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_no_second_library_in_experiments():
    """Notebooks import lora_jax, never the experiment scripts; nothing edits sys.path; common.py is gone."""
    scripts = {p.stem for p in EXPERIMENTS.glob("*.py")}
    assert "common" not in scripts
    for p in sorted(EXPERIMENTS.glob("*.py")):
        assert "sys.path" not in p.read_text(), p
    notebooks = sorted((REPO / "notebooks").glob("*.ipynb"))
    assert notebooks
    for p in notebooks:
        code = ["".join(c["source"]) for c in json.loads(p.read_text())["cells"] if c["cell_type"] == "code"]
        roots = set().union(*map(_imported_roots, code))
        assert "lora_jax" in roots and not roots & scripts, (p.name, sorted(roots & scripts))
        assert not any("sys.path" in c for c in code), p.name


def _run(script, *args, out):
    proc = subprocess.run(
        [sys.executable, str(EXPERIMENTS / script), "--small", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@slow
@pytest.mark.parametrize("model", ["minilm", "smollm2"])
def test_rank_ablation_small(model, tmp_path):
    _run("rank_ablation.py", "--model", model, out=tmp_path)
    result = json.loads((tmp_path / f"rank_ablation_{model}.json").read_text())
    kinds = {r["kind"] for r in result["rows"]}
    assert {"full", "lora"} <= kinds
    for row in result["rows"]:
        assert len(row["acc"]) == len(result["settings"]["seeds"]) >= 2
        assert all(0.0 <= a <= 1.0 for a in row["acc"])
        if row["kind"] == "lora":
            if model == "smollm2":  # no classifier head: only the adapter trains
                assert 0 < row["adapter_params"] == row["trainable_params"]
            else:  # MiniLM also trains its classifier head
                assert 0 < row["adapter_params"] < row["trainable_params"]
    assert (tmp_path / f"rank_ablation_{model}.md").read_text().startswith("###")
    assert (tmp_path / f"rank_ablation_{model}.png").stat().st_size > 0


@slow
def test_variants_small_smollm2(tmp_path):
    """The SmolLM2 path of variants.py (the MiniLM path is the same sweep with a head): every variant trains
    and is scored, with the parameter counts of rank 2 on q (576 -> 576) and v (576 -> 192) of one layer."""
    _run("variants.py", "--model", "smollm2", out=tmp_path)
    result = json.loads((tmp_path / "variants_smollm2.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["LoRA", "DoRA", "PiSSA", "OLoRA", "LoRA+"]
    r, n_seeds = result["settings"]["rank"], len(result["settings"]["seeds"])
    lora = r * (576 + 576) + r * (576 + 192)
    assert {k: v["trainable_params"] for k, v in rows.items()} == {
        "LoRA": lora,
        "DoRA": lora + 576 + 192,  # one magnitude per output feature
        "PiSSA": lora,
        "OLoRA": lora,
        "LoRA+": lora,
    }
    for row in rows.values():
        assert len(row["val_acc"]) == len(row["val_loss"]) == n_seeds
        assert all(0.0 <= a <= 1.0 for a in row["val_acc"]) and all(x > 0 for x in row["val_loss"])
        assert row["curve"][-1]["step"] == result["settings"]["steps"]
    assert 0.0 <= result["base_model"]["val_acc"] <= 1.0
    assert len(result["loraplus_steps_to_lora_final_loss"]) == n_seeds
    assert result["dora_over_lora_step_time"]["ratio"] > 0
    assert (tmp_path / "variants_smollm2.md").read_text().startswith("| variant |")


@slow
def test_subspace_small(tmp_path):
    _run("subspace.py", out=tmp_path)
    result = json.loads((tmp_path / "subspace_minilm.json").read_text())
    s = result["settings"]
    for mat in ("q", "v"):
        grid = result["fig3"][mat]["a"]
        assert len(grid) == s["small_rank"] and len(grid[0]) == s["big_rank"]
        assert all(-1e-5 <= x <= 1 + 1e-5 for row in grid for x in row)
        for r in s["amp_ranks"]:
            assert result["table7"][f"{mat}_r{r}"]["amplification"] > 0
    for fig in ("subspace_fig3.png", "subspace_fig4.png"):
        assert (tmp_path / fig).stat().st_size > 0


@slow
def test_throughput_small(tmp_path):
    out = tmp_path / "throughput.json"
    _run("throughput.py", "--no-sweeps", out=out)
    result = json.loads(out.read_text())
    (row,) = result["sizes"]
    for variant in ("full", "wrap", "merge", "hand"):
        assert row[variant]["ms"] > 0 and row[variant]["loss"] == pytest.approx(row["full"]["loss"], rel=0.2)
    # LoRA variants hold the same trainable count; full fine-tuning needs more memory than LoRA.
    assert row["trainable"] > 0
    if row["wrap"]["mem_mb"] is not None:
        assert row["full"]["mem_mb"] > row["wrap"]["mem_mb"]
    assert (tmp_path / "throughput.md").read_text().startswith("###")


@slow
def test_throughput_memory_only_small(tmp_path):
    """Ahead-of-time compile (host target, no weights): one JSON line per row, with bytes and FLOPs."""
    out = tmp_path / "mem.json"
    stdout = _run(
        "throughput.py",
        "--memory-only",
        "--target",
        "cpu",
        "--json",
        "--rows",
        "wrap,wrap:chunked+xla+dots",
        out=out,
    )
    lines = [json.loads(x) for x in stdout.splitlines() if x.startswith("{")]
    assert [(r["variant"], r["levers"]) for r in lines] == [("wrap", "none"), ("wrap", "chunked+xla+dots")]
    for r in lines:
        assert r["total_bytes"] == r["argument_bytes"] + r["temp_bytes"] + r["output_bytes"] > 0
        assert r["flops"] > 0 and r["flops_source"] == "cpu"
    assert json.loads(out.read_text())["rows"] == lines


@slow
def test_latency_small(tmp_path):
    out = tmp_path / "latency.json"
    _run("latency.py", out=out)
    result = json.loads(out.read_text())
    assert result["adapter_params"] > 0 and len(result["rows"]) == 1
    for row in result["rows"]:
        for v in ("base", "merged", "wrap", "adapter"):
            assert row[v]["prefill_ms"] > 0 and row[v]["decode_ms"] > 0
        assert row["merged_vs_wrap_max_abs"] < 1e-4  # float32: the same function, factored or merged
    assert (tmp_path / "latency.md").read_text().startswith("###")
