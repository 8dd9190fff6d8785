"""Splitting long contexts into encoder windows, and ordering windows into padded batches.

A context longer than the encoder window is cut into windows of ``window`` tokens that start
every ``window - overlap`` tokens; the last window ends at the last token. Each window is
compressed on its own and the soft tokens are concatenated in order.

Overlap: a window after the first re-reads the last ``overlap`` tokens of the previous one, so
its encoder sees some left context. The soft tokens made from those re-read tokens are dropped
(``overlap`` must be a multiple of the rate, so they are exactly the first ``overlap / rate``
soft tokens of the window): every context token is represented exactly once, in order.

Everything here is pure (lists of ints in, plain values out), so it is tested without a model.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    """One encoder window of one text.

    Attributes:
        text: index of the text the window belongs to.
        start: first token of the window (inclusive), as an index into the text's tokens.
        stop: end of the window (exclusive).
        first_new: first token no earlier window covered (``start`` for a text's first window,
            ``start + overlap`` after it).
    """

    text: int
    start: int
    stop: int
    first_new: int

    @property
    def length(self) -> int:
        return self.stop - self.start

    @property
    def n_reread(self) -> int:
        """Tokens at the front of the window that the previous window already covered."""
        return self.first_new - self.start


def check_window(
    window: int, overlap: int, max_window: int | None = None, names: tuple[str, str] = ("window", "overlap")
) -> None:
    """Raise unless ``1 <= window`` (``<= max_window``, the encoder window, when given) and ``0 <= overlap < window``.

    The one check of window settings (the config's, a call's, the command line's); ``names`` are
    the settings' names in the error message.
    """
    window_name, overlap_name = names
    for name, value in ((window_name, window), (overlap_name, overlap)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an integer, got {value!r}")
    if max_window is not None and not 1 <= window <= max_window:
        raise ValueError(f"{window_name} must be between 1 and max_context_tokens ({max_window}), got {window}")
    if window < 1:
        raise ValueError(f"{window_name} must be >= 1 token, got {window}")
    if not 0 <= overlap < window:
        raise ValueError(f"{overlap_name} must be >= 0 and smaller than the window ({window}), got {overlap}")


def window_spans(n_tokens: int, window: int, overlap: int = 0) -> list[tuple[int, int, int]]:
    """``(start, stop, first_new)`` of the windows that cover ``n_tokens`` tokens.

    A text that fits gives one window ``(0, n, 0)`` (an empty text gives ``(0, 0, 0)``).
    Windows start every ``window - overlap`` tokens; the last one may be shorter.
    """
    check_window(window, overlap)
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    stride = window - overlap
    spans = [(0, min(window, n_tokens), 0)]
    while spans[-1][1] < n_tokens:
        start = spans[-1][0] + stride
        spans.append((start, min(start + window, n_tokens), start + overlap))
    return spans


def split_ids(ids: list[int], window: int, overlap: int = 0) -> list[list[int]]:
    """The token ids of each window of ``ids`` (see :func:`window_spans`)."""
    return [ids[start:stop] for start, stop, _ in window_spans(len(ids), window, overlap)]


def plan_windows(lengths: list[int], window: int, overlap: int = 0) -> list[Window]:
    """All windows of all texts, text by text and in order within a text."""
    return [
        Window(text, start, stop, first_new)
        for text, n_tokens in enumerate(lengths)
        for start, stop, first_new in window_spans(n_tokens, window, overlap)
    ]


CPU_BATCH_TOKENS = 4096  # padded tokens per encoder batch on a CPU (docs/speed.md, "Compression throughput")


def length_sorted_batches(lengths: list[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices into ``lengths`` grouped into batches of similar length (longest first).

    Sorting before batching means each padded batch wastes little compute on padding;
    the caller puts results back in their original order by index. ``max_tokens`` caps a batch's
    padded size (rows x its longest row; a longer row goes alone): on a CPU, batching many short
    texts pays, but batching long windows is slower than reading them one after another.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens must be an integer >= 1 or None, got {max_tokens!r}")
    batches: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        current = batches[-1] if batches else None
        full = current is None or len(current) == batch_size
        if full or (max_tokens is not None and (len(current) + 1) * lengths[current[0]] > max_tokens):
            batches.append([index])
        else:
            current.append(index)
    return batches


def soft_tokens_to_drop(item: Window, rate: int) -> int:
    """How many leading soft tokens of ``item`` stand for re-read (overlap) tokens.

    Raises a ValueError when the overlap is not a multiple of ``rate`` (the groups of re-read
    tokens would then straddle new tokens).
    """
    if item.n_reread % rate:
        raise ValueError(
            f"window overlap ({item.n_reread} tokens) must be a multiple of the compression rate ({rate}), "
            "so the soft tokens of the re-read tokens can be dropped exactly"
        )
    return item.n_reread // rate
