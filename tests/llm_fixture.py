"""A tiny random-weight llama GGUF that llama.cpp really loads and generates from.

Written at test time with the ``gguf`` package: llama architecture, 64-dim, 2 layers,
4 heads, a 300-token byte-level SPM vocabulary (``<unk>``, ``<s>``, ``</s>``, the 256
byte tokens ``<0x00>``…``<0xFF>`` typed BYTE, and 41 unique word pieces), F32 random
weights. About 0.5 MB; loads in milliseconds.

What llama.cpp needs (found the hard way, see issue 12): ``general.architecture``,
``llama.context_length``, ``embedding_length``, ``block_count``, ``feed_forward_length``,
``attention.head_count``, ``attention.layer_norm_rms_epsilon``, ``tokenizer.ggml.model``,
``tokenizer.ggml.tokens`` (unique strings) and ``token_type`` (else byte tokens come back
as text like ``<0x63>``); tensors ``token_embd``, ``output_norm`` and per block
``attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

N_VOCAB = 300
N_EMBD = 64
N_FF = 128
N_HEAD = 4
N_LAYER = 2
N_CTX_TRAIN = 512

_WORDS = ["▁the", "▁a", "▁and", "▁of", "▁to", "▁in", "▁is", "▁it", "▁you", "▁that",
          "▁he", "▁was", "▁for", "▁on", "▁are", "▁as", "▁with", "▁his", "▁they", "▁I",
          "▁at", "▁be", "▁this", "▁have", "▁from", "▁or", "▁one", "▁had", "▁by", "▁word",
          "▁but", "▁not", "▁what", "▁all", "▁were", "▁we", "▁when", "▁your", "▁can",
          "▁said", "▁there"]


N_TENSORS = 2 + 9 * N_LAYER


def make_llama_gguf(path: Path, *, seed: int = 0) -> Path:
    """The tiny model in one file at ``path``."""
    return make_llama_split(path, 1, seed=seed)[0]


def make_llama_split(path: Path, parts: int, *, seed: int = 0) -> list[Path]:
    """The tiny model in ``parts`` files (1 to N_TENSORS), written by the ``gguf``
    package's split writer (as ``llama-gguf-split --split-max-tensors`` makes them):
    ``STEM-0000i-of-0000N.gguf`` beside ``path``, each with ``split.no``,
    ``split.count`` and ``split.tensors.count``; one part is ``path`` itself, with no
    split keys. The same bytes of weights for every ``parts``."""
    import gguf

    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + _WORDS
    assert len(tokens) == N_VOCAB and len(set(tokens)) == N_VOCAB
    types = ([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
             + [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * len(_WORDS))
    scores = [0.0, 0.0, 0.0] + [-1000.0] * 256 + [-float(i) for i in range(len(_WORDS))]

    per_part = -(-N_TENSORS // parts)
    assert -(-N_TENSORS // per_part) == parts, f"{N_TENSORS} tensors do not make {parts} parts"
    wr = gguf.GGUFWriter(str(path), "llama",
                         split_max_tensors=per_part if parts > 1 else 0)
    wr.add_name("blobctl-tiny-llama")
    wr.add_file_type(0)  # ALL_F32
    wr.add_context_length(N_CTX_TRAIN)
    wr.add_embedding_length(N_EMBD)
    wr.add_block_count(N_LAYER)
    wr.add_feed_forward_length(N_FF)
    wr.add_head_count(N_HEAD)
    wr.add_head_count_kv(N_HEAD)
    wr.add_layer_norm_rms_eps(1e-5)
    wr.add_rope_dimension_count(N_EMBD // N_HEAD)
    wr.add_tokenizer_model("llama")
    wr.add_token_list(tokens)
    wr.add_token_scores(scores)
    wr.add_token_types(types)
    wr.add_bos_token_id(1)
    wr.add_eos_token_id(2)
    wr.add_unk_token_id(0)
    wr.add_add_bos_token(True)
    wr.add_tensor("token_embd.weight", w(N_VOCAB, N_EMBD))
    wr.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    for i in range(N_LAYER):
        wr.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        for t in ("attn_q", "attn_k", "attn_v", "attn_output"):
            wr.add_tensor(f"blk.{i}.{t}.weight", w(N_EMBD, N_EMBD))
        wr.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        wr.add_tensor(f"blk.{i}.ffn_gate.weight", w(N_FF, N_EMBD))
        wr.add_tensor(f"blk.{i}.ffn_up.weight", w(N_FF, N_EMBD))
        wr.add_tensor(f"blk.{i}.ffn_down.weight", w(N_EMBD, N_FF))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    if parts == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i:05d}-of-{parts:05d}.gguf")
            for i in range(1, parts + 1)]
