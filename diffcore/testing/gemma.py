"""A tiny Gemma 3 text encoder and tokenizer, built offline (the Hub's tiny test models cannot be fetched).

``tiny_gemma_tokenizer``: a real ``GemmaTokenizer`` over single characters (no merges), deterministic.
``tiny_gemma3``: a ``Gemma3ForConditionalGeneration`` (text model plus a minimal vision tower, as the LTX-2
checkpoints store it) with perturbed random weights.
"""
from __future__ import annotations

import string

import torch

from .weights import perturb_


def tiny_gemma_tokenizer():
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for c in "▁" + string.ascii_letters + string.digits + string.punctuation:
        vocab.setdefault(c, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[])


def tiny_gemma3(vocab_size: int, seed: int = 0, hidden: int = 16, layers: int = 2, heads: int = 2, kv_heads: int = 1,
                head_dim: int = 8, intermediate: int = 32):
    """``layers + 1`` hidden states of width ``hidden`` (what LTX-2's connectors stack)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    config = Gemma3Config(
        text_config=dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=intermediate,
                         vocab_size=vocab_size, max_position_embeddings=2048, sliding_window=16),
        vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           image_size=16, patch_size=8),
        mm_tokens_per_image=4, image_token_index=4, boi_token_index=2, eoi_token_index=1)
    torch.manual_seed(seed)
    return perturb_(Gemma3ForConditionalGeneration(config).eval(), seed=seed)
