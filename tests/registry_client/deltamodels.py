"""Synthetic GGUF-like model files for the delta tests: a header (magic, a chat template
string whose length the tests change, tensor infos) followed by the tensors' data with no
alignment padding, so that a header that grows by a few bytes shifts every tensor by
exactly that many bytes."""

from __future__ import annotations

import random
import struct

MiB = 1 << 20


def tensor(seed: int, i: int, size: int) -> bytes:
    return random.Random(seed * 100_003 + i).randbytes(size)


def gguf_like(*, seed: int, n_tensors: int, tensor_size: int, template: str = "{{ .Prompt }}",
              changed: dict[int, int] | None = None) -> bytes:
    """``changed``: tensor index -> the seed its data comes from instead of ``seed``."""
    changed = changed or {}
    tpl = template.encode()
    head = [b"GGUF", struct.pack("<IQQ", 3, n_tensors, 1),
            struct.pack("<Q", 23), b"tokenizer.chat_template", struct.pack("<IQ", 8, len(tpl)),
            tpl]
    for i in range(n_tensors):
        name = f"blk.{i}.weight".encode()
        head.append(struct.pack("<Q", len(name)) + name
                    + struct.pack("<IQIQ", 1, tensor_size, 0, i * tensor_size))
    body = [tensor(changed.get(i, seed), i, tensor_size) for i in range(n_tensors)]
    return b"".join(head + body)
