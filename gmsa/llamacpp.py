"""Decoding in llama.cpp (``--engine llamacpp``): a C++ engine in this process, fed gmsa's prompt embeddings.

On a CPU, a decoding step through PyTorch spends about as long outside the matmuls (Python, small
ops) as in them (docs/speed.md); llama.cpp runs the whole step in C++. :class:`LlamaCppDecoder`
loads one GGUF file (:mod:`gmsa.gguf_export`) through ``llama-cpp-python``'s low-level API and
decodes greedily: the ``(n, H)`` prompt (soft tokens, then the question, as
:meth:`gmsa.GMSA.prompt_embeds` builds it) goes in as one embedding batch at positions ``0..n-1``
(the positions gmsa's own decoding gives an unpadded row), then one token per step at ``n, n+1, ...``;
the next token is the argmax of the logits (repetition penalty on the generated tokens, EOS masked
before ``min_new_tokens``, as :func:`gmsa.decoding.greedy_steps`); the KV cache is cleared before each
prompt. :class:`LlamaCppEngine` is the :class:`gmsa.engine_base.Engine` on top: it answers one
prompt at a time and decodes the ids with gmsa's tokenizer.

``llama_cpp`` is imported only when an engine is made (``pip install 'gmsa[llamacpp]'``).
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from .decoding import RepeatDetector, penalise_repeats
from .engine_base import Engine, EngineUnavailableError, GMSALike, per_prompt_limits
from .gguf_export import DEFAULT_WEIGHT_TYPE, exported_gguf
from .kv_handoff import GGML_TYPES, TorchPrefill

INSTALL_HINT = (
    "install llama-cpp-python (it compiles llama.cpp for this CPU: about 20 minutes on one core):\n"
    "  pip install 'gmsa[llamacpp]'      # or: pip install llama-cpp-python"
)
KV_TYPES = ("f16", "f32", "bf16")
PREFILLS = ("torch", "llamacpp")  # who reads the prompt: gmsa's decoder (KV cache handed over), or llama.cpp
BATCH = 512  # positions per llama_decode call of a prefill (llama.cpp's default batch)
CONTEXT_STEP = 1024  # the context grows in whole steps, so that prompts of similar length share one

log = logging.getLogger(__name__)


def import_llama_cpp():
    """The ``llama_cpp`` module (its C library logging to this module's logger), or :class:`EngineUnavailableError`."""
    try:
        import llama_cpp
    except ImportError as err:  # also an OSError-free ImportError when the shared library fails to load
        raise EngineUnavailableError(
            f"the llamacpp engine needs the `llama_cpp` package, which is not importable ({err});\n" + INSTALL_HINT
        ) from err
    global _log_callback
    if _log_callback is None:  # keep the C callback alive as long as the library may call it
        _log_callback = llama_cpp.llama_log_callback(_forward_log)
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    return llama_cpp


# ggml's log levels (ggml.h: 1 debug, 2 info, 3 warn, 4 error, 5 continuation) as this module logs them. Its
# warnings go to INFO: they are notes such as "n_ctx_seq > n_ctx_train", which gmsa decides about itself.
LOG_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.INFO, 4: logging.ERROR}
_log_callback = None


def _forward_log(level: int, text: bytes, _user_data) -> None:
    """llama.cpp's log lines into this module's logger (llama-cpp-python's own callback prints them all)."""
    message = text.decode("utf-8", errors="replace").rstrip()
    if message:
        log.log(LOG_LEVELS.get(level, logging.DEBUG), "llama.cpp: %s", message)


class LlamaCppDecoder:
    """One GGUF decoder in llama.cpp: greedy ids from a prompt of embeddings ``(n, H)`` or token ids ``(n,)``.

    ``extra_buffers`` lets llama.cpp repack the weights for its AMX and repacked-CPU kernels: its one-position
    steps then run 1.5-1.7x faster here (q8_0: 15.8 against 24.1 ms at one thread, 8.7 against 14.6 at two, the
    shipped decoder over 522 positions). But on this project's Xeon (KVM guest, AMX_INT8) every batch of more
    than one position then crashes in ``ggml_backend_amx_mul_mat`` (llama-cpp-python 0.3.36;
    ggml-org/llama.cpp#20824, machine-dependent, open), so such a decoder takes its prompt only as a handed-over
    KV cache (:meth:`load_state`), never through :meth:`prefill`. Off by default.
    ``flash_attention``: off by default; ``None`` lets llama.cpp decide (on, on a CPU), which rounds the queries
    to f16 and made a step slower here (57 against 43 ms, the shipped decoder over 522 positions, one thread).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        n_threads: int = 1,
        kv_type: str = "f16",
        flash_attention: bool | None = False,
        extra_buffers: bool = False,
    ):
        if n_threads < 1:
            raise ValueError(f"n_threads must be >= 1, got {n_threads}")
        if kv_type not in KV_TYPES:
            raise ValueError(f"kv_type must be one of {KV_TYPES}, got {kv_type!r}")
        self.llama = import_llama_cpp()
        self.path, self.n_threads, self.kv_type, self.flash_attention = Path(path), n_threads, kv_type, flash_attention
        self.extra_buffers = extra_buffers
        if not self.path.is_file():
            raise FileNotFoundError(f"no GGUF file at {self.path}")
        params = self.llama.llama_model_default_params()
        params.use_extra_bufts = extra_buffers
        self.model = self.llama.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.model:
            raise EngineUnavailableError(f"llama.cpp could not load {self.path}")
        self.n_embd = self.llama.llama_n_embd(self.model)
        self.n_vocab = self.llama.llama_vocab_n_tokens(self.llama.llama_model_get_vocab(self.model))
        self.context, self.n_ctx = None, 0
        self.embed_batch = self._batch(BATCH, self.n_embd)
        self.token_batch = self._batch(BATCH, 0)

    def _batch(self, size: int, embd: int):
        batch = self.llama.llama_batch_init(size, embd, 1)
        for i in range(size):
            batch.n_seq_id[i], batch.seq_id[i][0] = 1, 0
        return batch

    def _context(self, n_positions: int):
        """A context holding at least ``n_positions`` (made anew, larger, when a prompt needs more)."""
        if n_positions > self.n_ctx:
            if self.context is not None:
                self.llama.llama_free(self.context)
            params = self.llama.llama_context_default_params()
            params.n_ctx = -(-n_positions // CONTEXT_STEP) * CONTEXT_STEP
            params.n_batch = params.n_ubatch = BATCH
            params.n_threads = params.n_threads_batch = self.n_threads
            params.type_k = params.type_v = GGML_TYPES[self.kv_type][0]
            params.no_perf = True
            if self.flash_attention is not None:  # None: llama.cpp decides (on, on a CPU; it rounds Q to f16)
                params.flash_attn_type = int(self.flash_attention)
            self.context = self.llama.llama_init_from_model(self.model, params)
            if not self.context:
                raise EngineUnavailableError(f"llama.cpp could not make a context of {params.n_ctx} positions")
            self.n_ctx = params.n_ctx
        self.llama.llama_memory_clear(self.llama.llama_get_memory(self.context), True)
        return self.context

    def _decode(self, batch, start: int, count: int, last: bool) -> None:
        """Run ``count`` filled slots of ``batch`` at positions ``start...``; logits for the last one if ``last``."""
        batch.n_tokens = count
        np.ctypeslib.as_array(batch.pos, shape=(count,))[:] = np.arange(start, start + count)
        wanted = np.ctypeslib.as_array(batch.logits, shape=(count,))
        wanted[:] = 0
        wanted[-1] = last
        code = self.llama.llama_decode(self.context, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode failed with code {code} at position {start} ({self.path.name})")

    def prefill(self, prompt: torch.Tensor, reserve: int = 0) -> np.ndarray:
        """Clear the cache, read ``prompt`` (``(n, H)`` embeddings or ``(n,)`` token ids) leaving room for ``reserve``
        more positions: the last position's logits."""
        n = prompt.shape[0]
        is_ids = prompt.dim() == 1
        if n < 1 or (not is_ids and (prompt.dim() != 2 or prompt.shape[1] != self.n_embd)):
            raise ValueError(
                f"a prompt is (n, {self.n_embd}) embeddings or (n,) token ids, n >= 1; got {tuple(prompt.shape)}"
            )
        if self.extra_buffers and n > 1:
            raise ValueError(
                f"this llama.cpp decoder holds repacked (AMX) weights, whose batches of more than one position crash "
                f"on some CPUs (llama.cpp#20824), so it does not read {n}-position prompts: hand it the KV cache of "
                "gmsa's own prefill (prefill='torch', the default), or make it with extra_buffers=False"
            )
        self._context(n + reserve)
        values = prompt.detach().cpu()
        values = values.to(torch.int32) if is_ids else values.to(torch.float32)
        values = values.contiguous().numpy()
        batch = self.token_batch if is_ids else self.embed_batch
        target = batch.token if is_ids else batch.embd
        for start in range(0, n, BATCH):
            part = values[start : start + BATCH]
            ctypes.memmove(target, part.ctypes.data, part.nbytes)
            self._decode(batch, start, part.shape[0], start + part.shape[0] == n)
        return self.logits()

    @property
    def v_trans(self) -> bool:
        """Whether llama.cpp stores the values transposed (it does without flash attention)."""
        if self.flash_attention is None:
            raise ValueError("the cache layout is known only with flash attention set on or off, not left to llama.cpp")
        return not self.flash_attention

    def load_state(self, blob: bytes | np.ndarray, n_positions: int) -> None:
        """Clear the cache and load one sequence's state (``llama_state_seq_get_data``'s layout; bytes, or a
        ``uint8`` array read in place) into a context holding at least ``n_positions``."""
        context = self._context(n_positions)
        if isinstance(blob, np.ndarray):
            blob = np.ascontiguousarray(blob, dtype=np.uint8)
            buffer = (ctypes.c_uint8 * len(blob)).from_buffer(blob)
        else:
            buffer = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
        if self.llama.llama_state_seq_set_data(context, buffer, len(blob), 0) != len(blob):
            raise RuntimeError(f"llama.cpp did not take the handed-over KV cache ({self.path.name}; see its log)")

    def step(self, token: int, position: int) -> np.ndarray:
        """Read one token at ``position``: its logits."""
        self.token_batch.token[0] = token
        self._decode(self.token_batch, position, 1, True)
        return self.logits()

    def logits(self) -> np.ndarray:
        pointer = self.llama.llama_get_logits_ith(self.context, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).astype(np.float32)

    def greedy_ids(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        repetition_penalty: float = 1.0,
        eos_token_id: int | None = None,
        min_new_tokens: int = 0,
        repeat_ngram: int = 0,
        on_prefill: Callable[[], None] | None = None,
        prefill: TorchPrefill | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> list[int]:
        """Greedy ids after ``prompt`` (EOS included when it ends the answer; ``eos_token_id=None``: never ends
        early). ``on_prefill`` is called once the prompt is read (a benchmark's clock), ``on_token`` with each
        id as it is chosen (streaming). ``prefill``: the prompt is read there and its KV cache handed over
        (:class:`gmsa.kv_handoff.TorchPrefill`), else by llama.cpp."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
        if prefill is None:
            logits = self.prefill(prompt, max_new_tokens)
        else:
            logits = prefill(self, prompt, max_new_tokens)
        if on_prefill is not None:
            on_prefill()
        generated = torch.empty(1, 0, dtype=torch.long)
        loops, running = RepeatDetector(1, repeat_ngram), torch.zeros(1, dtype=torch.bool)
        position = prompt.shape[0]
        for index in range(max_new_tokens):
            scores = penalise_repeats(torch.from_numpy(logits)[None], generated, repetition_penalty)[0]
            if eos_token_id is not None and index < min_new_tokens:
                scores[eos_token_id] = -torch.inf
            token = int(scores.argmax())
            if on_token is not None:
                on_token(token)
            generated = torch.cat([generated, torch.tensor([[token]])], dim=1)
            ended = token == eos_token_id or bool(loops.update(generated, running)[0])
            if ended or index == max_new_tokens - 1:
                break
            logits = self.step(token, position)
            position += 1
        return generated[0].tolist()

    def close(self) -> None:
        """Free llama.cpp's context, batches and model (the object is unusable afterwards)."""
        if getattr(self, "model", None) is None:
            return
        if self.context is not None:
            self.llama.llama_free(self.context)
        self.llama.llama_batch_free(self.embed_batch)
        self.llama.llama_batch_free(self.token_batch)
        self.llama.llama_model_free(self.model)
        self.model = self.context = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001  (interpreter shutdown: the library may be gone already)
            pass


class LlamaCppEngine(Engine):
    """llama.cpp on a GGUF decoder, one prompt at a time.

    ``gguf`` is a file, or a function returning one per call (a GMSA's decoder changes with its active
    adapters: answering merges the KEFT LoRA, restating does not; see :func:`llamacpp_engine`).
    Loaded decoders are kept per file. ``extra_buffers`` (:class:`LlamaCppDecoder`): ``None`` turns them on
    when ``prefill`` reads the prompts (llama.cpp then only runs one-position steps, which they speed up).
    """

    name = "llamacpp"
    streams = True

    def __init__(
        self,
        gguf: str | os.PathLike | Callable[[], Path],
        tokenizer: PreTrainedTokenizerBase,
        n_threads: int = 1,
        kv_type: str = "f16",
        prefill: TorchPrefill | None = None,
        extra_buffers: bool | None = None,
    ):
        import_llama_cpp()  # fail early, with the install hint
        self.gguf, self.tokenizer, self.n_threads, self.kv_type = gguf, tokenizer, n_threads, kv_type
        self.prefill = prefill
        self.compiled = prefill is not None and prefill.compiled is not None
        self.extra_buffers = prefill is not None if extra_buffers is None else extra_buffers
        self.decoders: dict[Path, LlamaCppDecoder] = {}

    def decoder(self) -> LlamaCppDecoder:
        """The decoder of the current GGUF file (loaded on first use)."""
        path = Path(self.gguf() if callable(self.gguf) else self.gguf)
        if path not in self.decoders:
            self.decoders[path] = LlamaCppDecoder(path, self.n_threads, self.kv_type, extra_buffers=self.extra_buffers)
        return self.decoders[path]

    def generate(
        self, prompt_embeds, max_new_tokens, repetition_penalty=1.0, min_new_tokens=0, repeat_ngram=0, streamer=None
    ):
        """As :meth:`gmsa.engine_base.Engine.generate`; a ``streamer`` gets each answer's ids as they are chosen
        (``put``) and ``end()`` after each answer, as gmsa's own decoding streams one question at a time."""
        decoder = self.decoder()
        texts = []
        on_token = None if streamer is None else (lambda token: streamer.put(torch.tensor([token])))
        for row, limit in zip(prompt_embeds, per_prompt_limits(max_new_tokens, len(prompt_embeds))):
            eos = self.tokenizer.eos_token_id
            options = {"prefill": self.prefill, "on_token": on_token}
            ids = decoder.greedy_ids(row, limit, repetition_penalty, eos, min_new_tokens, repeat_ngram, **options)
            if streamer is not None:
                streamer.end()
            texts.append(self.tokenizer.decode(ids, skip_special_tokens=True).strip())
        return texts


def llamacpp_engine(
    gmsa: GMSALike,
    weight_type: str = DEFAULT_WEIGHT_TYPE,
    n_threads: int = 1,
    gguf: str | os.PathLike | None = None,
    kv_type: str = "f16",
    prefill: str = "torch",
    extra_buffers: bool | None = None,
    compile_prefill: bool | None = None,
) -> LlamaCppEngine:
    """The llama.cpp engine for ``gmsa``: on ``gguf`` if given, else on :func:`gmsa.gguf_export.exported_gguf`
    of its decoder with the adapters active at each call (exported once per set, then cached).

    ``prefill="torch"`` (default): gmsa's own decoder (``GMSA.fast_decoder``, the adapters active at each
    call) reads the prompt and its KV cache is handed to llama.cpp (:mod:`gmsa.kv_handoff`), which decodes
    the steps, on repacked (AMX) weights unless ``extra_buffers=False``; that prefill is compiled ahead of time
    (:class:`gmsa.aot.CompiledPrefill`, built once per decoder shape and machine) unless
    ``compile_prefill=False`` (``None``: wherever the prefill is gmsa's); ``"llamacpp"``: llama.cpp reads the
    prompt too (slower here: its AMX kernels must stay off, see :class:`LlamaCppDecoder`)."""
    if prefill not in PREFILLS:
        raise ValueError(f"prefill must be one of {PREFILLS}, got {prefill!r}")
    import_llama_cpp()  # before exporting
    source = gguf if gguf is not None else (lambda: exported_gguf(gmsa, weight_type))
    handoff = None
    if prefill == "torch":
        handoff = TorchPrefill(lambda: gmsa.fast_decoder.of(gmsa.model.decoder), compile=compile_prefill is not False)
    elif compile_prefill:
        raise ValueError("compile_prefill compiles gmsa's PyTorch prefill: it needs prefill='torch'")
    return LlamaCppEngine(source, gmsa.tokenizer, n_threads, kv_type, handoff, extra_buffers)
