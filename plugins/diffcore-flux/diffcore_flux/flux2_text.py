"""FLUX.2 prompt encoding: chat-templated prompts through a transformers LM, three hidden states stacked.

[dev] uses Mistral-Small-3.2 (``Mistral3ForConditionalGeneration``) with a system message and no
generation prompt, hidden states (10, 20, 30); [klein] uses Qwen3 (``Qwen3ForCausalLM``) with the user
turn only, the generation prompt and an empty think block, hidden states (9, 18, 27). Both pad to
``max_sequence_length`` and give the DiT every position (no text mask), as diffusers does. Hidden state
``k`` is the output of decoder layer ``k`` (0: embeddings); in transformers 5 the last entry is the
final-normed one, so a checkpoint must have more layers than the highest index used.

The [dev] tokenizer folder is a ``PixtralProcessor``; without torchvision transformers replaces that
class by a stub, and only its tokenizer is needed, so ``load_pixtral_tokenizer`` loads the tokenizer
(and the processor's chat template) from the folder directly.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

# diffusers pipelines/flux2/system_messages.py (BFL's text encoder system prompt)
# (with its line break after "object", as BFL's source has it: it is part of the tokenized prompt)
SYSTEM_MESSAGE = ("You are an AI that reasons about image descriptions. You give structured responses focusing on "
                  "object relationships, object\nattribution and actions without speculation.")
MISTRAL_LAYERS = (10, 20, 30)
QWEN3_LAYERS = (9, 18, 27)


def mistral_inputs(tokenizer, prompts: list[str], max_length: int) -> dict:
    """[dev]: system + user messages (``[IMG]`` removed, as BFL/diffusers do), no generation prompt."""
    messages = [[{"role": "system", "content": [{"type": "text", "text": SYSTEM_MESSAGE}]},
                 {"role": "user", "content": [{"type": "text", "text": p.replace("[IMG]", "")}]}] for p in prompts]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True, return_dict=True,
                                         return_tensors="pt", padding="max_length", truncation=True,
                                         max_length=max_length)


def qwen3_inputs(tokenizer, prompts: list[str], max_length: int) -> dict:
    """[klein]: one user turn, generation prompt, thinking off; each prompt tokenized on its own (as diffusers)."""
    ids, masks = [], []
    for p in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=False)
        enc = tokenizer(text, return_tensors="pt", padding="max_length", truncation=True, max_length=max_length)
        ids.append(enc["input_ids"])
        masks.append(enc["attention_mask"])
    return {"input_ids": torch.cat(ids), "attention_mask": torch.cat(masks)}


class _Enough(Exception):
    """Raised by the hook on the last decoder layer whose output is needed: the layers above it do not run."""


def stacked_hidden_states(encoder, inputs: dict, layers) -> torch.Tensor:
    """``cat(hidden_states[k] for k in layers)`` per token -> (B, L, len(layers) * hidden).

    Runs the LM's inner model (``encoder.model``: a direct child, so offload hooks still fire), takes hidden
    state ``k`` as the output of decoder layer ``k - 1`` (a forward hook) and stops after the last one needed:
    the layers above it, the final norm and the LM head's logits are never computed (FLUX.2 [dev] reads
    layer 30 of Mistral-Small's 40, [klein] layer 27 of Qwen3's 36: a quarter of the encoder saved), and no
    other hidden state is kept. The hooks act only for the calling thread."""
    inner = getattr(encoder, "model", encoder)
    n_layers = _num_layers(encoder)
    if n_layers is not None and max(layers) >= n_layers:
        from diffcore.errors import ConfigError

        raise ConfigError(f"the text encoder has {n_layers} layers; FLUX.2 reads hidden states {tuple(layers)}, "
                          f"which needs more than {max(layers)}")
    device = encoder.device
    kwargs = dict(input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device),
                  use_cache=False)
    blocks = getattr(getattr(inner, "language_model", inner), "layers", None)
    if not isinstance(blocks, torch.nn.ModuleList) or min(layers) < 1 or max(layers) > len(blocks):
        out = inner(**kwargs, output_hidden_states=True)  # an unusual layout: every hidden state, as transformers gives
        states = [out.hidden_states[k] for k in layers]
    else:
        states = _run_until(inner, blocks, kwargs, layers)
    stacked = torch.stack(states, dim=1)  # (B, n, L, D)
    b, n, length, d = stacked.shape
    return stacked.permute(0, 2, 1, 3).reshape(b, length, n * d)


def _run_until(inner, blocks, kwargs: dict, layers) -> list:
    import threading

    me, wanted, taken = threading.get_ident(), set(layers), {}

    def tap(k):
        def hook(_module, _args, out):
            if threading.get_ident() != me:
                return  # another thread's forward through the same encoder
            taken[k] = out[0] if isinstance(out, tuple) else out
            if len(taken) == len(wanted):
                raise _Enough

        return hook

    handles = [blocks[k - 1].register_forward_hook(tap(k)) for k in wanted]
    try:
        inner(**kwargs)
    except _Enough:
        pass
    finally:
        for h in handles:
            h.remove()
    return [taken[k] for k in layers]


def _num_layers(encoder):
    cfg = getattr(encoder, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    return getattr(cfg, "num_hidden_layers", None)


def _chat_template(folder: Path):
    """The processor's chat template when the tokenizer files carry none (``chat_template.json`` / ``.jinja``)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    js = folder / "chat_template.json"
    if js.is_file():
        return json.loads(js.read_text(encoding="utf-8")).get("chat_template")
    return None


def load_pixtral_tokenizer(path: Path, spec, dtype, device):
    """diffcore custom loader for FLUX.2 [dev]'s ``tokenizer`` component (``PixtralProcessor``): its tokenizer."""
    from transformers import AutoTokenizer

    from diffcore.errors import LoaderError, MissingFileError

    path = Path(path)
    what = f"component {spec.name!r} ({spec.class_name})"
    if not path.is_dir():
        raise MissingFileError(f"{what}: folder {path} does not exist")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise MissingFileError(f"{what}: {path} has no tokenizer.json / tokenizer_config.json; re-download the folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises many kinds; name the component and the folder
        raise LoaderError(f"{what} cannot be loaded from {path}: {type(e).__name__}: {e}") from e
    if getattr(tokenizer, "chat_template", None) is None:
        tokenizer.chat_template = _chat_template(path)
    if getattr(tokenizer, "chat_template", None) is None:
        raise MissingFileError(f"{what}: {path} has no chat template (chat_template.jinja / chat_template.json or "
                               "tokenizer_config.json's chat_template); FLUX.2 [dev] prompts need it")
    return tokenizer
