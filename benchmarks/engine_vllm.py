"""vLLM side of the engine comparison (run in vLLM's own venv, after ``engine_hf.py``); see docs/serving.md."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    from vllm import LLM, SamplingParams

    out = Path(sys.argv[1])
    hf = json.loads((out / "hf.json").read_text())
    rows = torch.load(out / "embeds.pt")
    start = time.perf_counter()
    llm = LLM(
        model=str(out / "decoder"), enable_prompt_embeds=True, dtype="float32", max_model_len=1024, enforce_eager=True
    )
    report = {"load_s": time.perf_counter() - start}
    params = SamplingParams(temperature=0.0, max_tokens=hf["new_tokens"], ignore_eos=True)

    def run(batch_size: int) -> list[list[int]]:
        outputs = []
        for first in range(0, len(rows), batch_size):
            prompts = [{"prompt_embeds": row} for row in rows[first : first + batch_size]]
            outputs += llm.generate(prompts, params, use_tqdm=False)
        return [list(output.outputs[0].token_ids) for output in outputs]

    run(1)  # warm-up
    for batch_size in (1, len(rows)):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            ids = run(batch_size)
            times.append(time.perf_counter() - start)
        key = f"bs{batch_size}"
        report[key] = {"s": statistics.median(times), "token_ids": ids, "same_as_hf": ids == hf[key]["token_ids"]}
    (out / "vllm.json").write_text(json.dumps(report, indent=1) + "\n")
    print({key: value for key, value in report.items() if not isinstance(value, dict)})
    print({key: (value["s"], value["same_as_hf"]) for key, value in report.items() if isinstance(value, dict)})


if __name__ == "__main__":  # vLLM starts its engine in a spawned process
    main()
