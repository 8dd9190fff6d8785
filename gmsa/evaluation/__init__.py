"""Evaluation and measurement: ``gmsa eval``, ``gmsa bench`` and ``gmsa demo`` (the ``[eval]`` extra).

``gmsa eval reconstruct|qa``: ``cli`` (the command), ``baselines`` (the compared methods), ``common``
(examples, models, cache, the run loop), ``reconstruct`` and ``qa`` (the two tasks), ``information``
(nats per token the soft tokens carry), ``metrics``, ``report`` (markdown, JSON, plots). ``gmsa bench``:
``bench`` (the command), ``timing`` (instruments), ``passages`` (text of exact token counts),
``bench_report``; both reports draw with ``render``. ``gmsa demo``: ``demo``.
"""
