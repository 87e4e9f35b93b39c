"""Benchmark history: the reader and writer live in :mod:`blobstore.benchlog` (the
server's web page reads it too, and may not import catalog); re-exported here."""

from __future__ import annotations

from blobstore.benchlog import KEEP, LOCK_TIMEOUT, BenchRun, History, LlamaPerf

__all__ = ["KEEP", "LOCK_TIMEOUT", "BenchRun", "History", "LlamaPerf"]
