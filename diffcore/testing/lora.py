"""LoRA oracles for the plugins' tests: adapters made and saved with diffusers + PEFT, run by both sides.

``save_peft_lora`` adds a PEFT LoRA (random A and B, ``alpha != rank``, optional per-layer patterns)
to a diffusers denoiser loaded from a tiny checkpoint, saves it with the pipeline class's
``save_lora_weights`` (weights plus the LoraConfig metadata, as trainers do) and returns the file.
``diffusers_with_loras`` loads files into a diffusers pipeline with ``load_lora_weights`` +
``set_adapters``. ``probe_deltas`` compares converted layouts without building full weight deltas.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

__all__ = ["diffusers_with_loras", "kohya_name", "probe_deltas", "save_peft_lora"]


def save_peft_lora(pipeline_cls, model_cls, checkpoint: str | Path, out: str | Path, targets: Sequence[str], *,
                   rank: int, alpha: float, seed: int, std: float = 0.1, rank_pattern: Optional[dict] = None,
                   alpha_pattern: Optional[dict] = None, subfolder: str = "transformer") -> Path:
    """Make, randomise and save one LoRA for the ``subfolder`` denoiser of ``checkpoint``; returns its file."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = model_cls.from_pretrained(str(checkpoint), subfolder=subfolder, torch_dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False,
                        rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {})
    model.add_adapter(config, adapter_name="made")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".made." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    state = get_peft_model_state_dict(model, adapter_name="made")
    pipeline_cls.save_lora_weights(str(out), transformer_lora_layers=state,
                                   transformer_lora_adapter_metadata=model.peft_config["made"].to_dict())
    return Path(out) / "pytorch_lora_weights.safetensors"


def diffusers_with_loras(pipe, loras: Mapping[str, tuple[str | Path, float]], **load_kwargs):
    """``pipe`` with ``{name: (file, weight)}`` loaded and active (``set_adapters``)."""
    for name, (path, _) in loras.items():
        pipe.load_lora_weights(str(path), adapter_name=name, **load_kwargs)
    pipe.set_adapters(list(loras), [w for _, w in loras.values()])
    return pipe


def probe_deltas(state: Mapping[str, torch.Tensor], probes: Mapping[int, torch.Tensor],
                 prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    """``{module: (B @ A) @ probes[in]}`` for a diffusers-layout state dict whose alphas are baked in
    (what diffusers' community converters return): layer deltas seen through random probe vectors."""
    out = {}
    for key, down in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")].removeprefix(prefix)
        up = state[key.replace(".lora_A.", ".lora_B.")]
        out[module] = up.double() @ (down.double() @ probes[down.shape[1]])
    return out


def kohya_name(key: str, prefix: str = "lora_unet_") -> str:
    """A dotted LoRA key in kohya's flat spelling: ``a.b.0.lora_down.weight`` -> ``lora_unet_a_b_0.lora_down.weight``."""
    part = next(p for p in (".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight", ".alpha",
                            ".diff_b", ".diff") if key.endswith(p))
    return prefix + key[: -len(part)].replace(".", "_") + part
