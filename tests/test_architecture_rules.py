"""Rules of the architecture that code review alone would let slip: the core names no model family, and no
runtime module imports diffusers (the test oracle)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "diffcore"

# A family's name, or a config key only one family has (checkpoint configs and sampling parameters).
FAMILY = re.compile(r"(?i)flux|qwen|kontext|(?<![a-z])wan(?![a-z])|(?-i:(?<![a-z])Wan(?![a-z]))|wan\d|wan_|_wan|klwan|"
                    r"boundary_ratio|guidance_scale_2|"
                    r"transformer_2|temperal|expand_timesteps|guidance_embeds|cfg_norm_rescale|zero_cond_t")
# Named on purpose: the 3-D causal VAE that two families share is a core building block, and its Diffusers
# class names are the checkpoint format's (as "AutoencoderKL" is); transformers' class names of text
# encoders the fast loader knows are that library's names.
ALLOWED_FILES = {"models/autoencoder_kl_wan.py", "models/wan_vae_blocks.py"}
ALLOWED = re.compile(r"^(AutoencoderKLWan|AutoencoderKLQwenImage|diffcore\.models\.autoencoder_kl_wan:\w+|"
                     r"autoencoder_kl_wan|Qwen2_5_VL\w*|Qwen3ForCausalLM|Qwen3Model)$")
# The testing kit also builds tiny transformers Qwen2 / Qwen2-VL / Qwen2.5-VL objects (tokenizer, vision
# processor, text encoder): a text stack that several families share (Qwen-Image, Z-Image), named by the
# library's versioned model types ("qwen2"), not a family. Family helpers live in the plugins' own testing.
TESTING_ALLOWED = re.compile(r"^(\w*(?i:qwen2)\w*|transformers\.models\.qwen2\w*(\.\w+)*)$")


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _words(node: ast.AST, docstrings: set[int]) -> list[str]:
    """Identifiers and string literals of ``node`` (docstrings and comments are prose, not code)."""
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Attribute):
        return [node.attr]
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.arg):
        return [node.arg]
    if isinstance(node, ast.keyword):
        return [node.arg or ""]
    if isinstance(node, ast.alias):
        return [node.name, node.asname or ""]
    if isinstance(node, ast.ImportFrom):
        return [node.module or ""]
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
        return [node.value]
    return []


def family_names(source: str, path: str) -> list[str]:
    tree = ast.parse(source)
    docstrings = _docstrings(tree)
    allowed = [ALLOWED, TESTING_ALLOWED] if path.startswith("testing/") else [ALLOWED]
    found = []
    for node in ast.walk(tree):
        for word in _words(node, docstrings):
            if word and FAMILY.search(word) and not any(a.match(word) for a in allowed):
                found.append(f"{path}:{getattr(node, 'lineno', '?')}: {word[:80]!r}")
    return found


def test_the_core_names_no_family():
    found = []
    for path in sorted(CORE.rglob("*.py")):
        rel = path.relative_to(CORE).as_posix()
        if rel in ALLOWED_FILES:
            continue
        found += family_names(path.read_text(), rel)
    assert not found, "family names or family config keys in the core (move them behind a hook):\n" + "\n".join(found)


def test_the_family_check_can_fail():
    assert family_names('x = cfg.get("boundary_ratio")', "a.py")
    assert family_names("for name in ('transformer', 'transformer_2'): pass", "a.py")
    assert family_names("class WanThing: pass", "a.py")
    assert not family_names('def f():\n    """FLUX, Qwen-Image and Wan do this."""\n    want = 1', "a.py")
    # the testing kit is checked too: transformers' Qwen2 classes pass there, a family's names do not
    assert not family_names("from transformers import Qwen2Tokenizer\ndef tiny_qwen2_tokenizer(): pass", "testing/t.py")
    assert family_names("def write_tiny_flux(): pass", "testing/checkpoints.py")
    assert family_names("QWEN_IMAGE_SYSTEM_PROMPT = 'Describe'", "testing/tokenizers.py")
    assert family_names("def tiny_qwen2_tokenizer(): pass", "engine/x.py")  # outside the testing kit: still refused


def test_no_runtime_module_imports_diffusers():
    # diffcore.testing ships in the wheel (and its pytest plugin loads in users' test runs): it is runtime too
    runtime = [*CORE.rglob("*.py"), *ROOT.glob("plugins/*/diffcore_*/**/*.py")]
    offenders = []
    for path in runtime:
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "diffusers" or n.startswith("diffusers.") for n in names):
                offenders.append(f"{rel}:{node.lineno}")
    assert len(runtime) > 40
    assert not offenders, f"runtime modules import diffusers (it is the test oracle only): {offenders}"
