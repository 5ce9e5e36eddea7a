"""Freezing a serving process's long-lived objects out of the garbage collector."""

from __future__ import annotations

import gc


def freeze_alive() -> None:
    """Collect, then move every object alive into the permanent generation, which no later collection
    scans. A serving process does it once its model is loaded (``server.__main__.load_model``) and once
    it has started serving (``server.api.app``, ``freeze_gc``): the model, the tokenizer, the libraries
    and the app live as long as the process, and every full collection under load would scan them all
    (220-250 ms stalls with the model unfrozen; 58-64 ms in a front-end process: BENCHMARKS.md, runs N
    and O, RELIABILITY.md). Benchmarks that stand in for a served core call it too."""
    gc.collect()
    gc.freeze()
