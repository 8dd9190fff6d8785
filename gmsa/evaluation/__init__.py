"""Evaluation harness: ``gmsa eval reconstruct|qa`` with baselines, caching and reports.

Modules: ``baselines`` (the compared methods), ``common`` (examples, models, cache),
``reconstruct`` and ``qa`` (the two tasks), ``information`` (nats per
token the soft tokens carry, against mismatched soft tokens), ``report`` (markdown, JSON, plots), ``cli``.
"""
