"""``GMSA``: the one class users touch — compress once, answer many questions."""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .aot import CompiledStack, StackRunner
from .backbone import fingerprint, load_backbone
from .checkpoint import check_backbone, load_trained, read_checkpoint, write_checkpoint
from .chunking import CPU_BATCH_TOKENS, check_window, length_sorted_batches, plan_windows, soft_tokens_to_drop
from .compressed import Compressed
from .config import GMSAConfig
from .decoding import greedy_texts, run_to_end
from .fast_decode import FastDecoder
from .merge import check_rate
from .model import GMSAModel, Packed, autoencoder_decoder, pad, trained_state_dict
from .precision import DtypeChoice, log_choice, resolve_dtype

if TYPE_CHECKING:
    from .engines import Engine


def _as_text_list(texts: str | list[str], what: str) -> list[str]:
    items = [texts] if isinstance(texts, str) else texts
    if not isinstance(items, (list, tuple)) or not items:
        raise TypeError(f"{what} must be a string or a non-empty list of strings, got {type(texts).__name__}")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise TypeError(f"{what}[{i}] must be a string, got {type(item).__name__}")
        if not item.strip():
            raise ValueError(f"{what}[{i}] is empty or whitespace")
    return list(items)


class GMSA:
    """A GMSA compressor: soft tokens from a context, answers from soft tokens.

    Example::

        gmsa = GMSA.from_pretrained()              # the shipped SmolLM2 checkpoint
        ctx = gmsa.compress(["long passage ..."], rate=4)
        gmsa.generate(ctx, ["What is ...?"])       # -> ["..."]
        gmsa.reconstruct(ctx)                      # -> ["long passage ..."]
    """

    def __init__(
        self,
        model: GMSAModel,
        tokenizer: PreTrainedTokenizerBase,
        checkpoint_id: str = "untrained",
        dtype: DtypeChoice | None = None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.checkpoint_id = checkpoint_id
        self.dtype_choice = dtype  # None: run in the dtype the model was built in
        self._prompt_cache: dict[str, list[int]] = {}
        self.engine: Engine | None = None  # None: decode with self.model.decoder in this process
        self.fast_decoder = FastDecoder()  # in-process decoding: LoRA merged, int8 steps where they pay
        self.compiled_encoder: CompiledStack | None = None  # set by compile()
        self._encoder_runner: StackRunner | None = None

    @property
    def config(self) -> GMSAConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.decoder.parameters()).device

    @property
    def inference_dtype(self) -> torch.dtype:
        """The dtype compression and decoding run in (the chosen one, or the model's own)."""
        return self.dtype_choice.dtype if self.dtype_choice is not None else self.model.decoder.dtype

    def hold_inference_dtype(self) -> bool:
        """Cast the whole model to the chosen inference dtype, once; whether it is held in it now.

        Called by every inference method, so the weights are cast once (no per-call casts) the
        first time the model is used. A model that is being trained (some parameter requires
        grad) is left alone: training keeps its trainable weights in fp32 and its own autocast.
        """
        dtype = self.inference_dtype
        if self.model.decoder.dtype == dtype and all(p.dtype == dtype for p in self._trained_params()):
            return True
        if any(p.requires_grad for p in self.model.parameters()):
            return False
        with torch.inference_mode(False):  # plain tensors even when the first call runs in inference mode
            self.model.to(dtype)
            self.fast_decoder.of(self.model.decoder)  # build the decoding copy now, not in the first answer
        return True

    def _trained_params(self) -> list[torch.Tensor]:
        return [p for name, p in self.model.named_parameters() if "lora_" in name or name.startswith("lsa.")]

    # ----------------------------------------------------------------- building and loading
    @classmethod
    def from_backbone(
        cls,
        backbone: str | os.PathLike = "default",
        config: GMSAConfig | None = None,
        dtype: str | torch.dtype = "auto",
    ) -> GMSA:
        """An untrained GMSA (the start of training) on a local or the default backbone.

        ``dtype`` is the inference dtype (see :func:`inference_choice`): ``"auto"`` (bf16 where
        this machine computes it faster, else fp32), ``"float32"`` or ``"bfloat16"``. The model
        is built in fp32 and cast once at its first inference call, unless it is being trained
        (:meth:`hold_inference_dtype`). A ``torch.dtype`` loads the backbone in that dtype directly.
        """
        config = config or GMSAConfig()
        config.backbone = str(backbone)
        decoder, tokenizer, choice = _load_decoder(backbone, dtype)
        config.backbone_fingerprint = fingerprint(decoder)
        return cls(GMSAModel(decoder, config).requires_grad_(False), tokenizer, dtype=choice)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike | None = None,
        backbone: str | os.PathLike | None = None,
        dtype: str | torch.dtype = "auto",
        device: str = "cpu",
    ) -> GMSA:
        """Load a checkpoint written by :meth:`save_pretrained` (default: the shipped one).

        ``backbone`` overrides where the backbone is loaded from (it must be the same
        weights: their fingerprint is checked). ``dtype``: as for :meth:`from_backbone`; the
        trained weights are loaded in full precision and cast with the rest of the model.
        """
        found = read_checkpoint(path)
        decoder, tokenizer, choice = _load_decoder(backbone or found.config.backbone, dtype, device)
        check_backbone(found.config, fingerprint(decoder), found.directory)
        model = GMSAModel(decoder, found.config)
        load_trained(model, found.weights, found.directory)
        return cls(model.requires_grad_(False).to(device), tokenizer, checkpoint_id=found.checkpoint_id, dtype=choice)

    def save_pretrained(
        self,
        directory: str | os.PathLike,
        dtype: torch.dtype | None = torch.bfloat16,
        weights: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Save only the trained parts (encoder LoRA, LSA, tuned decoder) + config, atomically.

        ``weights`` replaces ``trained_state_dict(self.model)``, e.g. full tensors gathered from FSDP shards.
        """
        weights = trained_state_dict(self.model) if weights is None else weights
        write_checkpoint(directory, self.config, weights, dtype)

    # ----------------------------------------------------------------- compress
    def tokenize_contexts(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text; a text over ``config.max_total_tokens`` is a ValueError."""
        ids = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        cap = self.config.max_total_tokens
        for i, row in enumerate(ids):
            if len(row) > cap:
                raise ValueError(
                    f"text {i} has {len(row)} tokens, more than max_total_tokens={cap}, the hard cap on one "
                    f"context (texts longer than the encoder window of {self.config.max_context_tokens} tokens "
                    "are split into windows up to this cap); shorten the text or raise max_total_tokens "
                    "(the command line's --max-total-tokens)"
                )
        return ids

    @torch.inference_mode()
    def compress_steps(
        self,
        texts: str | list[str],
        rate: int | None = None,
        batch_size: int = 8,
        window: int | None = None,
        overlap: int | None = None,
        progress: bool = False,
        max_batch_tokens: int | None = None,
    ) -> Generator[int, None, Compressed]:
        """Compress each text into ``ceil(n_tokens / rate)`` soft tokens, one encoder batch per step.

        A text longer than ``window`` tokens (default ``config.window``) is split into windows
        that re-read ``overlap`` tokens of the previous one (default ``config.window_overlap``, a
        multiple of ``rate``); see :mod:`gmsa.chunking`. The windows of all texts are encoded
        together in length-sorted batches of ``batch_size`` and each text's soft tokens are
        concatenated in order: ``sum_w ceil(new_w / rate)`` of them, which is ``ceil(n / rate)``
        when ``window - overlap`` is a multiple of the rate. ``progress``: a bar over the batches (several, on a tty).
        ``max_batch_tokens`` caps a batch's padded tokens (default: :data:`gmsa.chunking.CPU_BATCH_TOKENS` on a
        CPU, where long windows read faster one or two at a time; no cap on an accelerator).

        Yields the number of windows each batch encoded (for a server that interleaves requests;
        closing the generator stops the work) and returns the :class:`Compressed`.
        :meth:`compress` runs it to its end.
        """
        texts = _as_text_list(texts, "texts")
        rate = check_rate(self.config.default_rate if rate is None else rate)
        self.hold_inference_dtype()
        window = self.config.window if window is None else window
        overlap = self.config.window_overlap if overlap is None else overlap
        check_window(window, overlap, self.config.max_context_tokens)
        ids = self.tokenize_contexts(texts)
        windows = plan_windows([len(row) for row in ids], window, overlap)
        drops = [soft_tokens_to_drop(item, rate) for item in windows]
        rows = [ids[w.text][w.start : w.stop] for w in windows]
        if max_batch_tokens is None and self.device.type == "cpu":
            max_batch_tokens = CPU_BATCH_TOKENS
        batches = length_sorted_batches([len(row) for row in rows], batch_size, max_batch_tokens)
        pieces = yield from self._compress_windows(rows, rate, batches, progress)
        per_text: list[list[torch.Tensor]] = [[] for _ in texts]
        for item, drop, piece in zip(windows, drops, pieces):
            per_text[item.text].append(piece[drop:])
        return Compressed.from_embeddings(
            [torch.cat(parts) for parts in per_text],
            rate,
            [len(row) for row in ids],
            self.config.backbone_fingerprint,
            self.checkpoint_id,
            extra={"backbone": self.config.backbone, "window": window, "overlap": overlap},
        )

    compress = run_to_end(compress_steps, "compress")
    """Compress each text into ``ceil(n_tokens / rate)`` soft tokens: :meth:`compress_steps` run to its end."""

    def _compress_windows(
        self, rows: list[list[int]], rate: int, batches: list[list[int]], progress: bool = False
    ) -> Generator[int, None, list[torch.Tensor]]:
        """Soft tokens ``(ceil(len / rate), H)`` of each id list, read in ``batches`` of row indices (yields per batch).

        The returned tensors are views into the batch outputs; the caller copies (``torch.cat``).
        """
        pieces: list[torch.Tensor] = [torch.empty(0)] * len(rows)
        shown = progress and len(batches) > 1
        for batch in tqdm(batches, desc="compress", unit="batch", disable=None if shown else True, leave=False):
            context_ids, context_mask = pad([rows[i] for i in batch], self.tokenizer.pad_token_id)
            ids, mask = context_ids.to(self.device), context_mask.to(self.device)
            soft, soft_mask = self.model.compress(ids, mask, rate, self.inference_encoder())
            for j, (i, count) in enumerate(zip(batch, soft_mask.sum(dim=1).tolist())):
                pieces[i] = soft[j, :count]
            yield len(batch)
        return pieces

    def inference_encoder(self) -> nn.Module:
        """The encoder :meth:`compress` runs (:meth:`GMSAModel.inference_encoder`: LoRA merged in eval mode),
        through its compiled program after :meth:`compile`."""
        encoder = self.model.inference_encoder()
        if self.compiled_encoder is None or self.model.encoder.training:
            return encoder
        runner = self._encoder_runner  # kept, so that hooks on it (gmsa bench's phase timing) stay on
        if runner is None or runner.stack is not encoder or runner.compiled is not self.compiled_encoder:
            runner = self._encoder_runner = StackRunner(encoder, self.compiled_encoder)
        return runner

    def compile(self, directory: str | os.PathLike | None = None) -> GMSA:
        """Run the encoder compiled ahead of time on the CPU (:class:`gmsa.aot.CompiledStack`: built once per
        encoder shape and machine, 10-20 s, then loaded from gmsa's cache or ``directory``; the same numbers up to
        float rounding, windows read 15-25 % faster here). Where it cannot be built the encoder runs eagerly,
        with a warning. Returns ``self``."""
        self.compiled_encoder = CompiledStack(directory)
        return self

    @torch.inference_mode()
    def uncompressed(self, texts: str | list[str]) -> Compressed:
        """The baseline: each text's own token embeddings as its "soft tokens" (rate 1, no encoder).

        ``generate`` on it reads ``[context tokens; question]`` exactly like the original prompt.
        """
        texts = _as_text_list(texts, "texts")
        self.hold_inference_dtype()
        ids = self.tokenize_contexts(texts)
        embeddings = [self.model.embed(torch.tensor(row, device=self.device)) for row in ids]
        lengths = [len(row) for row in ids]
        return Compressed.from_embeddings(embeddings, 1, lengths, self.config.backbone_fingerprint, self.checkpoint_id)

    # ----------------------------------------------------------------- decode
    def prompt_ids_for(self, prompt: str) -> list[int]:
        if prompt not in self._prompt_cache:
            self._prompt_cache[prompt] = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return self._prompt_cache[prompt]

    def decoder_prompt(self, compressed: Compressed, prompts: list[str]) -> Packed:
        """``[soft tokens; prompt tokens]`` per sample, left-padded: ``(B, T, H)`` embeds + ``(B, T)`` mask."""
        compressed.check_compatible(self.config.backbone_fingerprint, self.checkpoint_id)
        self.hold_inference_dtype()
        soft, soft_mask = compressed.padded(self.device)
        soft = soft.to(self.model.decoder.dtype)  # stored soft tokens may come from a run in another dtype
        prompt_ids, prompt_mask = pad([self.prompt_ids_for(p) for p in prompts], self.tokenizer.pad_token_id)
        packed = self.model.decoder_inputs(
            soft, soft_mask, [(prompt_ids.to(self.device), prompt_mask.to(self.device))], left_pad=True
        )
        packed.inputs_embeds = packed.inputs_embeds.to(self.model.decoder.dtype)
        return packed

    @torch.inference_mode()
    def prompt_embeds(self, compressed: Compressed, questions: str | list[str]) -> list[torch.Tensor]:
        """What :meth:`generate` feeds the decoder, per question, without padding (for an inference engine).

        Row ``i`` is ``[soft tokens of context i; question i's tokens]`` embedded: a
        ``(n_soft_i + n_prompt_i, H)`` tensor in the decoder's dtype, on the model's device.
        """
        questions = _as_text_list(questions, "questions")
        return self._prompt_rows(self._paired(compressed, questions), questions)

    def _prompt_rows(self, compressed: Compressed, prompts: list[str]) -> list[torch.Tensor]:
        packed = self.decoder_prompt(compressed, prompts)
        return [row[mask.bool()] for row, mask in zip(packed.inputs_embeds, packed.attention_mask)]

    @torch.inference_mode()
    def _decode(
        self,
        compressed: Compressed,
        prompts: list[str],
        max_new_tokens: list[int],
        repetition_penalty: float,
        min_new_tokens: int = 0,
        **local,
    ) -> list[str]:
        """Greedy texts; ``local``: ``repeat_ngram`` and ``streamer`` (passed to an engine that streams)."""
        if self.engine is not None:
            rows = self._prompt_rows(compressed, prompts)
            streams = getattr(self.engine, "streams", False)
            options = {"streamer": local["streamer"]} if streams and "streamer" in local else {}
            repeat_ngram = local.get("repeat_ngram", 0)
            return self.engine.generate(
                rows, max_new_tokens, repetition_penalty, min_new_tokens, repeat_ngram, **options
            )
        packed = self.decoder_prompt(compressed, prompts)
        return greedy_texts(
            self.fast_decoder.of(self.model.decoder),
            self.tokenizer,
            packed.inputs_embeds,
            packed.attention_mask,
            max_new_tokens,
            repetition_penalty,
            min_new_tokens=min_new_tokens,
            **local,
        )

    @staticmethod
    def _paired(compressed: Compressed, questions: list[str]) -> Compressed:
        """One compressed context per question (a single context is shared by all of them)."""
        if len(compressed) == 1 and len(questions) > 1:
            compressed = Compressed.concat([compressed] * len(questions))
        if len(compressed) != len(questions):
            raise ValueError(f"{len(questions)} questions for {len(compressed)} compressed contexts")
        return compressed

    def generate(
        self,
        compressed: Compressed,
        questions: str | list[str],
        max_new_tokens: int = 100,
        repetition_penalty: float = 1.3,
        batch_size: int = 8,
        streamer=None,
    ) -> list[str]:
        """Answer questions from compressed contexts (greedy).

        ``questions[i]`` is asked of context ``i``; a single compressed context is shared by
        all questions (compress once, ask many). With ``self.engine`` set (see :mod:`gmsa.engines`)
        the decoding runs there, from :meth:`prompt_embeds`; otherwise in this process. A ``streamer``
        (e.g. ``transformers.TextStreamer``) gets the answers' tokens one question at a time, in this
        process or from an engine that streams (``engine.streams``: llama.cpp's does; vLLM's do not).
        """
        questions = _as_text_list(questions, "questions")
        compressed = self._paired(compressed, questions)
        batch_size = batch_size if self.engine is None else len(questions)  # an engine batches by itself
        batch_size = 1 if streamer is not None and self.engine is None else batch_size
        local = {} if streamer is None else {"streamer": streamer}
        answers: list[str] = []
        for start in range(0, len(questions), batch_size):
            part = slice(start, start + batch_size)
            limits = [max_new_tokens] * len(questions[part])
            answers += self._decode(compressed[part], questions[part], limits, repetition_penalty, **local)
        return answers

    def reconstruct(
        self,
        compressed: Compressed,
        batch_size: int = 8,
        slack: float = 1.25,
        max_new_tokens: int | None = None,
        repeat_ngram: int = 8,
        streamer=None,
    ) -> list[str]:
        """Ask the decoder to restate each compressed text (AE prompt, greedy, no penalty).

        A restatement has at least one token and at most ``slack`` times its source's token
        count (+ 8), or ``max_new_tokens``; it stops once its last ``repeat_ngram`` tokens repeat
        (0: never; the vLLM engines ignore it); a ``streamer`` gets one text at a time (as in :meth:`generate`).
        A KEFT decoder LoRA is switched off meanwhile: restating is the AE stage's task.
        """
        if streamer is not None and self.engine is None:
            batch_size = 1
        texts: list[str] = []
        with autoencoder_decoder(self.model):
            for start in range(0, len(compressed), batch_size):
                part = compressed[start : start + batch_size]
                limits = [int(n * slack) + 8 for n in part.n_tokens]
                limits = limits if max_new_tokens is None else [min(n, max_new_tokens) for n in limits]
                local = {"repeat_ngram": repeat_ngram} | ({} if streamer is None else {"streamer": streamer})
                texts += self._decode(part, [self.config.ae_prompt] * len(part), limits, 1.0, 1, **local)
        return texts


def _load_decoder(
    backbone: str | os.PathLike, dtype: str | torch.dtype, device: str | torch.device = "cpu"
) -> tuple[nn.Module, PreTrainedTokenizerBase, DtypeChoice]:
    """The backbone (fp32, so its fingerprint does not depend on the dtype), its tokenizer and the
    inference dtype: ``"auto"`` is measured on ``device`` (:func:`gmsa.precision.resolve_dtype`) and logged.

    A ``torch.dtype`` loads the backbone in that dtype directly (e.g. a large backbone in bf16).
    """
    if isinstance(dtype, torch.dtype):
        decoder, tokenizer = load_backbone(backbone, dtype=dtype)
        return decoder, tokenizer, DtypeChoice(dtype, "requested")
    choice = resolve_dtype(dtype, device)
    log_choice(choice, "inference")
    decoder, tokenizer = load_backbone(backbone, dtype=torch.float32)
    return decoder, tokenizer, choice
