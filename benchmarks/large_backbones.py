"""Larger backbones (issue #9): Llama-3.2-3B, Qwen3-4B and Mistral-7B shapes, with RANDOM weights.

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python benchmarks/large_backbones.py

For each backbone of ``gmsa.training.shapes.REAL_CONFIGS``:
  (a) builds the full-depth GMSA model with the paper's settings on the ``meta`` device (no memory)
      and checks its exact parameter counts against ``gmsa.training.shapes.count_params``;
  (b) estimates memory per GPU for the paper's setup (2 x A100-80GB, bf16, ZeRO-2, gradient
      checkpointing, AE batch 4 x 512 tokens, KEFT batch 16 x 3072 tokens);
  (c) in a child process, saves a DEPTH-REDUCED copy (real widths, heads and vocabulary; only
      ``--layers`` layers) with random weights as a local HF directory, loads it with
      ``GMSA.from_backbone``, compresses a short text at rate 4 and runs one AE and one KEFT (qkv)
      training step (batch 1, 43 context tokens, AdamW, gradient checkpointing): loss finite, exactly the
      stage's parameters changed, time and peak RSS.
Writes ``reports/scale/large_backbones.json`` and ``.md``. Speeds and RAM are from random
weights in depth-reduced copies on this CPU, not from the real models.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from gmsa import GMSA, GMSAConfig
from gmsa.model import GMSAModel, set_stage
from gmsa.training.data import autoencoder_examples, collate, qa_examples
from gmsa.training.shapes import (
    PAPER_AE,
    PAPER_GMSA,
    PAPER_KEFT,
    REAL_CONFIGS,
    TrainSetup,
    count_params,
    memory_per_gpu,
    real_config,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.conftest import CORPUS, tiny_tokenizer  # noqa: E402  (reused, not copied)

GIB = 2**30
RUN_GMSA = {"k_enc": 2, "k_lsa": 1, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "max_context_tokens": 64}
RUN_GMSA |= {"ae_decoder_lora_r": 0, "decoder_lora_r": 16, "lsa_match_embedding_scale": True}  # the paper's decoder
TEXT = " ".join(CORPUS[:4])  # 43 tokens of the tiny word-level tokenizer
QUESTION, ANSWER = "What is the capital of France?", "Paris"


# ----------------------------------------------------------------------------- (a) + (b): shapes only
def meta_counts(name: str, decoder_tuning: str) -> dict[str, int]:
    """Exact counts of the full-depth paper model, built on the meta device (no weights allocated)."""
    with torch.device("meta"):
        decoder = AutoModelForCausalLM.from_config(real_config(name))
        model = GMSAModel(decoder, GMSAConfig(**PAPER_GMSA, decoder_tuning=decoder_tuning))
    counts = {"total": sum(p.numel() for p in model.parameters())}
    for stage, key in (("ae", "ae"), ("keft", f"keft_{decoder_tuning}")):
        set_stage(model, stage)
        counts[key] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return counts


def shape_report(name: str) -> dict:
    """Parameter counts (analytic, checked on meta) and memory per GPU for the paper's setups."""
    cfg = real_config(name)
    analytic = count_params(cfg, GMSAConfig(**PAPER_GMSA))
    checked = meta_counts(name, "qkv") | meta_counts(name, "full")
    mismatches = {k: (v, analytic[k]) for k, v in checked.items() if analytic[k] != v}
    memory = {}
    for setup in (PAPER_AE, PAPER_KEFT, TrainSetup(**(vars(PAPER_KEFT) | {"stage": "keft_full"}))):
        parts = memory_per_gpu(cfg, GMSAConfig(**PAPER_GMSA), setup)
        memory[setup.stage] = {k: round(v / GIB, 2) for k, v in parts.items()}
    return {"params": analytic, "meta_check": "ok" if not mismatches else mismatches, "memory_gib": memory}


# ----------------------------------------------------------------------------- (c): depth-reduced real run
def build_dir(name: str, layers: int, root: Path) -> Path:
    """Save a random-weight, ``layers``-deep copy of ``name`` (bf16) + the tiny tokenizer."""
    tokenizer = tiny_tokenizer()
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id, "bos_token_id": None}
    cfg = real_config(name, num_hidden_layers=layers, **ids)
    if cfg.vocab_size < len(tokenizer):
        raise ValueError(f"{name}: tokenizer ids do not fit the vocabulary")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    path = root / name
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def samples(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """About 4096 strided elements of every parameter: enough to see whether a step changed it."""
    return {n: p.detach().reshape(-1)[:: max(1, p.numel() // 4096)].clone() for n, p in model.named_parameters()}


def train_step(model: GMSAModel, stage: str, batch: dict, lr: float = 1e-3) -> dict:
    """One AdamW step (no weight decay) of ``stage``; checks that exactly the stage's parameters moved."""
    trainable = set(set_stage(model, stage))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    before = samples(model)
    start = time.perf_counter()
    loss = model(**batch)
    loss.backward()
    moved_grad = {n for n, p in model.named_parameters() if p.grad is not None and bool(p.grad.abs().max() > 0)}
    optimizer.step()
    seconds = time.perf_counter() - start
    optimizer.zero_grad(set_to_none=True)
    changed = {n for n, v in samples(model).items() if not torch.equal(v, before[n])}
    return {
        "loss": round(loss.item(), 4),
        "finite": math.isfinite(loss.item()),
        "seconds": round(seconds, 2),
        "trainable_params": sum(p.numel() for p in params),
        "trainable_tensors": len(trainable),
        "tensors_with_grad": len(moved_grad),
        "tensors_changed": len(changed),
        "only_trainable_changed": changed <= trainable,
        "all_with_grad_changed": moved_grad <= changed,
        "unchanged_with_grad": sorted(moved_grad - changed),
    }


def real_run(path: Path, dtype: torch.dtype) -> dict:
    """Load the depth-reduced backbone, compress ``TEXT`` at rate 4, one AE step, one KEFT (qkv) step."""
    start = time.perf_counter()
    gmsa = GMSA.from_backbone(path, GMSAConfig(**RUN_GMSA, decoder_tuning="qkv"), dtype=dtype)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    compressed = gmsa.compress(TEXT, rate=4)
    compress_s = time.perf_counter() - start
    model, tok = gmsa.model, gmsa.tokenizer
    model.train()
    for stack in (model.encoder, model.decoder):
        stack.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ae = collate(autoencoder_examples([{"text": TEXT}], tok, gmsa.config.ae_prompt, 10**6), [4], tok.pad_token_id)
    qa = [{"context": TEXT, "question": QUESTION, "answers": [ANSWER]}]
    keft = collate(qa_examples(qa, tok, 10**6), [4], tok.pad_token_id)
    lr = 1e-3 if dtype == torch.float32 else 1e-2  # bf16: a 1e-3 step rounds away on weights near 1 (norms)
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "params": sum(p.numel() for p in model.parameters()),
        "context_tokens": compressed.n_tokens[0],
        "soft_tokens_shape": list(compressed.soft_tokens[0].shape),
        "soft_tokens_finite": bool(torch.isfinite(compressed.soft_tokens[0]).all()),
        "load_s": round(load_s, 2),
        "compress_s": round(compress_s, 2),
        "lr": lr,
        "ae": train_step(model, "ae", ae, lr),
        "keft_qkv": train_step(model, "keft", keft, lr),
    }


def run_dtype(name: str, layers: int, ram_gb: float) -> torch.dtype:
    """fp32 when weights + the larger stage's grads and Adam states fit ``ram_gb``, else bf16."""
    counts = count_params(real_config(name, num_hidden_layers=layers), GMSAConfig(**RUN_GMSA))
    fp32 = 4 * counts["total"] + 12 * max(counts["ae"], counts["keft_qkv"])
    return torch.float32 if fp32 <= ram_gb * GIB else torch.bfloat16


def child(name: str, layers: int, ram_gb: float) -> dict:
    """Build, run and clean up one depth-reduced backbone (run in its own process: peak RSS is its own)."""
    root = Path(tempfile.mkdtemp(prefix="gmsa-large-"))
    try:
        path = build_dir(name, layers, root)
        dtype = run_dtype(name, layers, ram_gb)
        result = {"layers": layers, **real_run(path, dtype)}
        analytic = count_params(real_config(name, num_hidden_layers=layers), GMSAConfig(**RUN_GMSA))["total"]
        result["params_match_analytic"] = analytic == result["params"]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    ok = [result["soft_tokens_finite"], result["params_match_analytic"]]
    for step in (result["ae"], result["keft_qkv"]):
        ok += [step["finite"], step["only_trainable_changed"], step["all_with_grad_changed"], step["tensors_changed"]]
    result["passed"] = all(bool(x) for x in ok)
    return result


def run_child(name: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", name, "--layers", str(args.layers), "--ram-gb", str(args.ram_gb)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"passed": False, "error": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"wall_s": round(time.perf_counter() - start, 1)}


# ----------------------------------------------------------------------------- report
def _m(n: int) -> str:
    return f"{n / 1e6:,.1f} M" if n < 1e9 else f"{n / 1e9:,.3f} B"


def markdown(results: dict, meta: dict) -> str:
    """Two tables: full-depth shapes (counts, memory per GPU) and the depth-reduced CPU runs."""
    lines = [
        "# Larger backbones: parameters, memory per GPU, depth-reduced CPU runs",
        "",
        f"Generated by `benchmarks/large_backbones.py`. GMSA settings: {meta['paper_gmsa']}. Memory: "
        f"{meta['paper_setup']}. Parameter counts are exact (analytic, checked on a meta-device build).",
        "",
        "| backbone | backbone params | GMSA total | trainable AE | KEFT qkv | KEFT full "
        "| GiB/GPU AE | GiB/GPU KEFT qkv | GiB/GPU KEFT full | meta check |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        p, mem = r["params"], r["memory_gib"]
        cells = [name, _m(p["backbone"]), _m(p["total"]), _m(p["ae"]), _m(p["keft_qkv"]), _m(p["keft_full"])]
        cells += [str(mem[s]["total"]) for s in ("ae", "keft_qkv", "keft_full")] + [str(r["meta_check"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Memory breakdown (GiB per GPU):", "", "| backbone | stage | weights | grads | Adam | activations |"]
    lines.append("|---|---|---:|---:|---:|---:|")
    for name, r in results.items():
        for stage, m in r["memory_gib"].items():
            lines.append(
                f"| {name} | {stage} | {m['weights']} | {m['grads']} | {m['optimizer']} | {m['activations']} |"
            )
    lines += ["", f"**Real runs: RANDOM weights, DEPTH-REDUCED copies** ({meta['run']}).", ""]
    lines.append(
        "| backbone | layers | dtype | params | soft tokens | compress s | AE step s (loss) "
        "| KEFT step s (loss) | peak RSS GiB | passed |"
    )
    lines.append("|---|---:|---|---:|---|---:|---:|---:|---:|---|")
    for name, r in results.items():
        run = r["run"]
        if "error" in run:
            lines.append(f"| {name} | | | | | | | | | no: {run['error'].splitlines()[-1][:80]} |")
            continue
        ae, keft = run["ae"], run["keft_qkv"]
        lines.append(
            f"| {name} | {run['layers']} | {run['dtype']} | {_m(run['params'])} | {run['soft_tokens_shape']} "
            f"| {run['compress_s']} | {ae['seconds']} ({ae['loss']}) | {keft['seconds']} ({keft['loss']}) "
            f"| {run['peak_rss_gib']} | {'yes' if run['passed'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=RUN_GMSA["k_enc"] + 2, help="depth of the reduced copies")
    parser.add_argument("--ram-gb", type=float, default=8.0, help="run in fp32 below this estimate, else bf16")
    parser.add_argument("--only", nargs="*", default=list(REAL_CONFIGS), help="backbones to run")
    parser.add_argument("--out", default="reports/scale/large_backbones")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.layers, args.ram_gb)), flush=True)
        return
    n_tokens = len(tiny_tokenizer()(TEXT)["input_ids"])
    meta = {
        "paper_gmsa": PAPER_GMSA | {"decoder": "frozen in AE"},
        "paper_setup": "2 x A100-80GB, bf16 weights, ZeRO-2 (Adam states + grads sharded over 2), gradient "
        f"checkpointing; AE {vars(PAPER_AE)}; KEFT {vars(PAPER_KEFT)}",
        "run": f"CPU, torch threads {torch.get_num_threads()}, {RUN_GMSA}, batch 1, {n_tokens}-token text, "
        "rate 4, AdamW lr 1e-3 (1e-2 in bf16), no weight decay, gradient checkpointing",
        "weights": "random (no downloads); real runs are depth-reduced copies",
    }
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.only:  # the report is rewritten after each backbone
        results[name] = shape_report(name) | {"run": run_child(name, args)}
        print(name, json.dumps(results[name]["run"]), flush=True)
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(results, meta))


if __name__ == "__main__":
    main()
