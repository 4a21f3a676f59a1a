"""Rewrite a saved tiny Diffusers folder into the other layouts real checkpoints use.

transformers 5 ``save_pretrained`` writes a tokenizer as ``tokenizer.json`` + ``tokenizer_config.json``;
hub checkpoints written by older releases (or converted from the original repos) hold the model files
the slow tokenizers read instead: ``spiece.model`` (sentencepiece: T5, UMT5) or ``vocab.json`` +
``merges.txt`` (byte-level BPE: CLIP, Qwen2). A Qwen2-VL processor is stored either with the image
processor in ``preprocessor_config.json`` (the hub layout) or inside ``processor_config.json`` (what
transformers 5 ``ProcessorMixin.save_pretrained`` writes). Each function rewrites one component folder
in place, from the files already there, so both diffcore and diffusers read the same bytes.
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["to_sentencepiece_tokenizer", "to_vocab_merges_tokenizer", "to_processor_config", "shard_text_encoder",
           "to_legacy_files", "write_all_layouts"]


def _tokenizer_json(folder: Path) -> dict:
    return json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))


def to_sentencepiece_tokenizer(folder: str | Path) -> None:
    """A Unigram ``tokenizer.json`` -> ``spiece.model`` (same pieces, scores and special ids); removes
    ``tokenizer.json``. Writing the model file needs ``protobuf`` (as reading it does in transformers)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    folder = Path(folder)
    model = _tokenizer_json(folder)["model"]
    if model.get("type") != "Unigram":
        raise ValueError(f"{folder}: a sentencepiece file needs a Unigram tokenizer, found {model.get('type')}")
    pieces = [p for p, _ in model["vocab"]]
    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
    special = {"<pad>": "pad_id", "</s>": "eos_id", "<unk>": "unk_id", "<s>": "bos_id"}
    for token, field in special.items():
        setattr(proto.trainer_spec, field, pieces.index(token) if token in pieces else -1)
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = True
    proto.normalizer_spec.remove_extra_whitespaces = True
    proto.normalizer_spec.escape_whitespaces = True
    kinds = {"<unk>": pb.ModelProto.SentencePiece.UNKNOWN, "<pad>": pb.ModelProto.SentencePiece.CONTROL,
             "</s>": pb.ModelProto.SentencePiece.CONTROL, "<s>": pb.ModelProto.SentencePiece.CONTROL}
    for piece, score in model["vocab"]:
        entry = proto.pieces.add()
        entry.piece, entry.score = piece, score
        entry.type = kinds.get(piece, pb.ModelProto.SentencePiece.NORMAL)
    (folder / "spiece.model").write_bytes(proto.SerializeToString())
    (folder / "tokenizer.json").unlink()


def to_vocab_merges_tokenizer(folder: str | Path) -> None:
    """A byte-level BPE ``tokenizer.json`` -> ``vocab.json`` + ``merges.txt``; removes ``tokenizer.json``.
    The added (special) tokens, which transformers 5 keeps in tokenizer.json only, go where transformers 4
    wrote them: ``added_tokens.json`` and ``tokenizer_config.json``'s ``added_tokens_decoder``."""
    folder = Path(folder)
    data = _tokenizer_json(folder)
    model = data["model"]
    added = data.get("added_tokens", [])
    if added:
        keys = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        config["added_tokens_decoder"] = {str(t["id"]): {k: t[k] for k in keys if k in t} for t in added}
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
        beyond = {t["content"]: t["id"] for t in added if t["content"] not in model["vocab"]}
        if beyond:  # transformers 4 listed the tokens past the base vocabulary here too
            (folder / "added_tokens.json").write_text(json.dumps(beyond, ensure_ascii=False), encoding="utf-8")
    if model.get("type") != "BPE":
        raise ValueError(f"{folder}: vocab.json + merges.txt need a BPE tokenizer, found {model.get('type')}")
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "tokenizer.json").unlink()


def to_processor_config(folder: str | Path, processor_class: str = "Qwen2VLProcessor") -> None:
    """``preprocessor_config.json`` -> ``processor_config.json`` holding it under ``image_processor`` (the
    transformers 5 ``ProcessorMixin.save_pretrained`` layout); the tokenizer files stay."""
    folder = Path(folder)
    image = json.loads((folder / "preprocessor_config.json").read_text(encoding="utf-8"))
    config = {"image_processor": image, "processor_class": processor_class}
    (folder / "processor_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "preprocessor_config.json").unlink()


def shard_text_encoder(folder: str | Path, max_shard_size: str = "100KB", variant: str | None = None) -> list[str]:
    """Re-save a transformers model folder sharded (``model-0000k-of-0000n[.variant].safetensors`` + its
    ``model.safetensors.index[.variant].json``) with transformers' own ``save_pretrained``; returns the shards."""
    import transformers

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    cls = getattr(transformers, config["architectures"][0])
    model = cls.from_pretrained(folder, local_files_only=True, variant=variant)
    for f in folder.glob("model*.safetensors"):
        f.unlink()
    model.save_pretrained(folder, max_shard_size=max_shard_size, variant=variant)
    shards = sorted(p.name for p in folder.glob("model*-of-*.safetensors"))
    index = "model.safetensors.index.json" if variant is None else f"model.safetensors.index.{variant}.json"
    if len(shards) < 2 or not (folder / index).is_file():
        raise RuntimeError(f"{folder}: expected a sharded checkpoint with {index}, got {shards}")
    return shards


def _transformers_components(folder: Path) -> dict[str, str]:
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    return {name: entry[1] for name, entry in index.items()
            if isinstance(entry, list) and len(entry) == 2 and entry[0] == "transformers" and entry[1]}


def to_legacy_files(folder: str | Path, variant: str | None = None) -> dict[str, str]:
    """Rewrite a saved pipeline folder into the layouts older hub checkpoints use, all at once (they are
    independent): every tokenizer as its slow files, every processor with ``processor_config.json``, every
    transformers model sharded (as ``variant`` files when the folder holds that variant). Returns
    ``{component: what changed}``."""
    folder = Path(folder)
    changes: dict[str, str] = {}
    for name, cls in _transformers_components(folder).items():
        sub, done = folder / name, []
        if (sub / "tokenizer.json").is_file():
            kind = _tokenizer_json(sub)["model"].get("type")
            if kind == "Unigram":
                to_sentencepiece_tokenizer(sub)
                done.append("spiece.model")
            elif kind == "BPE":
                to_vocab_merges_tokenizer(sub)
                done.append("vocab.json + merges.txt")
        if cls.endswith("Processor") and not cls.endswith("ImageProcessor") and (sub / "preprocessor_config.json").is_file():
            to_processor_config(sub, cls)
            done.append("processor_config.json")
        config = sub / "config.json"
        if config.is_file() and "architectures" in json.loads(config.read_text(encoding="utf-8")):
            done.append(f"{len(shard_text_encoder(sub, variant=variant))} shards")
        if done:
            changes[name] = ", ".join(done)
    return changes


def write_all_layouts(pipe, folder: str | Path, variant: str = "fp16") -> dict[str, str]:
    """The compatibility-matrix folder: diffusers' ``pipe.save_pretrained(folder, variant=variant)`` (every
    weight file named ``*.<variant>.safetensors``), then :func:`to_legacy_files` (slow tokenizer files,
    ``processor_config.json``, sharded variant text encoders). Load it with ``variant=variant``."""
    folder = Path(folder)
    pipe.save_pretrained(folder, variant=variant)
    plain = [p.relative_to(folder) for p in folder.glob("*/*.safetensors") if f".{variant}" not in p.name]
    if plain:
        raise RuntimeError(f"save_pretrained(variant={variant!r}) wrote plain weight files: {plain}")
    return to_legacy_files(folder, variant)

