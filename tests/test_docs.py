"""The docs cannot rot: every example runs, every hook and parameter is documented, tables match the code.

Fenced blocks in docs/*.md (and README.md):
  ```python                 executed, in order, in one namespace per file (cwd: a folder holding `model`,
                            a tiny FLUX.1-dev checkpoint, `edit-model`, a tiny FLUX.1-Kontext one, and
                            `input.png`); hook functions a block defines are registered in a fresh strict
                            plugin manager and every record they return is resolved
  ```python no-run          compiled only (needs real weights or a pytest fixture)
  ```python excerpt=PATH    must appear verbatim in PATH (lines in order; a line "..." skips code)
  ```console                each `$ diffcore ...` line is run through diffcore.cli.main
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import shutil
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DOC_FILES = sorted(DOCS.glob("*.md"))
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)


@dataclass
class Block:
    doc: Path
    line: int
    lang: str
    code: str
    flags: set = field(default_factory=set)
    options: dict = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        info = m.group(1).split()
        words = info[1:]
        out.append(Block(path, text.count("\n", 0, m.start()) + 2, info[0] if info else "", m.group(2),
                         {w for w in words if "=" not in w}, dict(w.split("=", 1) for w in words if "=" in w)))
    return out


def _section(text: str, heading: str) -> str:
    """The text under a ``## heading`` up to the next heading of the same or a higher level."""
    m = re.search(rf"^(#+)\s+`?{re.escape(heading)}`?\s*$", text, re.M)
    assert m, f"no heading {heading!r}"
    level = len(m.group(1))
    nxt = re.compile(rf"^#{{1,{level}}}\s", re.M).search(text, m.end())
    return text[m.end(): nxt.start() if nxt else len(text)]


# ---- the tiny models the examples use ---------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    import numpy as np
    from PIL import Image

    from diffcore.testing.checkpoints import save_component, tiny_autoencoder_kl
    from diffcore_flux.testing import write_tiny_flux

    root = tmp_path_factory.mktemp("docs")
    write_tiny_flux(root / "model")
    # Kontext: the same components, but an 8x VAE, as it encodes its input at ~1 MP (64x64 latent patches)
    shutil.copytree(root / "model", root / "edit-model")
    shutil.rmtree(root / "edit-model" / "vae")
    save_component(tiny_autoencoder_kl(block_out_channels=(4, 4, 4, 4), seed=2), root / "edit-model" / "vae")
    index = json.loads((root / "edit-model" / "model_index.json").read_text())
    (root / "edit-model" / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxKontextPipeline"}))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(root / "input.png")
    mask = np.zeros((24, 40), dtype=np.uint8)
    mask[:, 20:] = 255  # an inpainting mask for input.png: repaint the right half (white = repaint)
    Image.fromarray(mask).save(root / "mask.png")
    return root


@pytest.fixture
def in_workdir(workdir, monkeypatch):
    from diffcore.models import attention
    from diffcore.plugins import set_plugin_manager

    monkeypatch.chdir(workdir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    previous = set_plugin_manager(None)  # the installed plugins, as users have them
    yield workdir
    set_plugin_manager(previous)
    assert attention.get_backend() == "sdpa"  # no example leaves an engine choice behind


# ---- running the examples ---------------------------------------------------------------------


def _check_excerpt(block: Block) -> None:
    source = ROOT / block.options["excerpt"]
    assert source.is_file(), f"{block.where}: excerpt source {block.options['excerpt']} does not exist"
    lines = [ln.rstrip() for ln in source.read_text(encoding="utf-8").splitlines()]
    chunks, chunk = [], []
    for ln in block.code.splitlines():
        if ln.strip() == "...":
            chunks.append(chunk)
            chunk = []
        else:
            chunk.append(ln.rstrip())
    chunks.append(chunk)
    pos = 0
    for chunk in (c for c in chunks if c):
        for start in range(pos, len(lines) - len(chunk) + 1):
            if lines[start:start + len(chunk)] == chunk:
                pos = start + len(chunk)
                break
        else:
            raise AssertionError(f"{block.where}: this excerpt is no longer in {block.options['excerpt']} "
                                 f"(in this order):\n" + "\n".join(chunk))


def is_serve_example(block: Block) -> bool:
    """``python serve`` / ``bash serve`` (``serve=edit``) blocks need a running server: test_serve_docs.py."""
    return "serve" in block.flags or "serve" in block.options


def _register_hooks(block: Block, defined: dict) -> None:
    """Register the hook functions a block defined in a strict manager and resolve every record."""
    from diffcore.plugins import PluginManager
    from diffcore.records import resolve_ref

    hooks = {k: v for k, v in defined.items() if callable(v) and hasattr(v, "diffcore_impl")}
    if not hooks:
        return
    plugin = types.ModuleType("docs_example")
    for name, fn in hooks.items():
        setattr(plugin, name, fn)
    manager = PluginManager(load_entrypoints=False, strict=True, plugins=[("docs-example", plugin)])
    registry = manager.registry
    assert not manager.errors, f"{block.where}: {manager.errors}"
    returned = sum(len(fn() or []) for fn in hooks.values())
    ours = [(kind, name, entry) for kind, table in registry.tables.items() for name, entry in table.items()
            if entry.plugin == "docs-example"]
    assert len(ours) == returned, f"{block.where}: {returned} records returned, {len(ours)} registered"
    for kind, name, entry in ours:
        if kind == "configs":  # resolve what the loader will import
            for ref in (entry.record.pipeline_config, entry.record.sampling_params, entry.record.detector):
                if ref is not None:
                    resolve_ref(ref)
        else:
            registry.get(kind, name)


def _run_python(block: Block, namespace: dict) -> None:
    code = compile(block.code, block.where, "exec")
    if "no-run" in block.flags:
        return
    before = dict(namespace)
    try:
        exec(code, namespace)
    except Exception:
        pytest.fail(f"example at {block.where} failed:\n{traceback.format_exc()}", pytrace=False)
    _register_hooks(block, {k: v for k, v in namespace.items() if before.get(k) is not v})


def _python_docs():
    return [p for p in [*DOC_FILES, ROOT / "README.md"] if p.is_file() and any(b.lang == "python" for b in blocks(p))]


@pytest.mark.parametrize("doc", _python_docs(), ids=lambda p: p.name)
def test_python_examples_run(doc, in_workdir):
    namespace = {"__name__": f"docs_{doc.stem.replace('-', '_')}"}
    for block in blocks(doc):
        if block.lang != "python":
            continue
        if "excerpt" not in block.options and not is_serve_example(block):  # both tested elsewhere
            _run_python(block, namespace)


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: p.name)
def test_excerpts_match_their_sources(doc):
    for block in blocks(doc):
        if "excerpt" in block.options:
            _check_excerpt(block)


def _console_docs():
    return [p for p in DOC_FILES if any(b.lang == "console" for b in blocks(p))]


def _commands(block: Block) -> list[tuple[str, list[str]]]:
    out, current = [], None
    for ln in block.code.splitlines():
        if ln.startswith("$ "):
            current = (ln[2:], [])
            out.append(current)
        elif current is not None:
            current[1].append(ln)
    return out


@pytest.mark.parametrize("doc", _console_docs(), ids=lambda p: p.name)
def test_console_examples_run(doc, in_workdir):
    from diffcore.cli import main

    for block in (b for b in blocks(doc) if b.lang == "console"):
        for command, shown in _commands(block):
            argv = shlex.split(command)
            assert argv[0] == "diffcore", f"{block.where}: only diffcore commands belong in console blocks"
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    rc = main(argv[1:])
                except SystemExit as exc:  # argparse errors
                    rc = exc.code
            where = f"{block.where}: `{command}`"
            expected = "\n".join(shown)
            if expected.startswith("error:"):
                assert rc == 2 and expected in err.getvalue(), f"{where}: rc={rc}, stderr={err.getvalue()!r}"
                continue
            assert rc == 0, f"{where}: rc={rc}\n{out.getvalue()}\n{err.getvalue()}"
            if expected.startswith("wrote "):
                target = expected.split()[1]
                assert out.getvalue().startswith(f"wrote {target} ("), f"{where}: {out.getvalue()!r}"
                assert (in_workdir / target).is_file()
            elif expected.lstrip().startswith("{"):
                actual = {p["name"]: p for p in json.loads(out.getvalue())["plugins"]}
                for p in json.loads(expected)["plugins"]:
                    assert actual.get(p["name"]) == p, f"{where}: shows {p}, got {actual.get(p['name'])}"
            else:  # every shown line is a whole line of the output
                lines = [ln.rstrip() for ln in out.getvalue().splitlines()]
                for ln in shown:
                    assert ln.rstrip() in lines, f"{where}: {ln!r} is not a line of {out.getvalue()!r}"


# ---- the docs cover the code ------------------------------------------------------------------


def test_every_hookspec_has_a_section_with_its_record_fields():
    import attrs

    from diffcore import hookspecs
    from diffcore.registry import _HOOKS

    text = (DOCS / "plugin-hooks.md").read_text()
    specs = sorted(n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "diffcore_spec"))
    assert specs, "no hook specs found"
    documented = set(re.findall(r"^##\s+`?(\w+)`?\s*$", text, re.M))
    missing = [s for s in specs if s not in documented]
    assert not missing, f"hook specs without a '## name' section in docs/plugin-hooks.md: {missing}"
    stale = sorted(n for n in documented if n.startswith("register_") and n not in specs)
    assert not stale, f"docs/plugin-hooks.md documents hooks that do not exist: {stale}"
    records = {hook: record for hook, record in _HOOKS.values()}
    for spec in specs:
        section = _section(text, spec)
        assert "```python" in section, f"{spec}: no example"
        if spec in records:
            assert records[spec].__name__ in section, f"{spec}: record class {records[spec].__name__} not named"
            undocumented = [f.name for f in attrs.fields(records[spec]) if f"`{f.name}`" not in section]
            assert not undocumented, f"{spec}: fields {undocumented} of {records[spec].__name__} not described"


def test_stage_table_matches_the_stage_declarations():
    from diffcore.stages import STANDARD_STAGES

    rows = {}
    for line in (DOCS / "architecture.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and re.fullmatch(r"`\w+Stage`", cells[0]):
            rows[cells[0].strip("`")] = cells

    def names(cell: str) -> list[str]:
        return re.findall(r"`(\w+\??)`", cell)

    def declared(fields) -> list[str]:
        return [f.name + ("" if f.required else "?") for f in fields]

    assert sorted(rows) == sorted(STANDARD_STAGES), "the stage table must list exactly the standard stages"
    for name, cls in STANDARD_STAGES.items():
        assert names(rows[name][1]) == declared(cls.inputs), f"{name} reads {declared(cls.inputs)}"
        assert names(rows[name][2]) == declared(cls.outputs), f"{name} writes {declared(cls.outputs)}"


def test_api_documents_every_parameter_and_attribute():
    import attrs

    from diffcore import EngineArgs, GenerationResult, SamplingParams

    text = (DOCS / "api.md").read_text()
    for cls in (SamplingParams, EngineArgs):
        missing = [f.name for f in attrs.fields(cls) if not re.search(rf"`{f.name}`", text)]
        assert not missing, f"docs/api.md does not describe {cls.__name__} fields {missing}"
    public = [n for n in dir(GenerationResult) if not n.startswith("_")]
    public += [f.name for f in attrs.fields(GenerationResult) if not f.name.startswith("_")]
    missing = sorted({n for n in public if not re.search(rf"`{n}[`(]", text)})
    assert not missing, f"docs/api.md does not describe GenerationResult.{missing}"
    for name in ("from_pretrained", "generate", "run", "pipeline", "config", "components"):
        assert name in text


def test_cli_documents_every_subcommand_and_option():
    from diffcore.cli import build_parser

    text = (DOCS / "cli.md").read_text()
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    for name, subparser in sub.choices.items():
        assert re.search(rf"^##\s+diffcore {name}\s*$", text, re.M), f"no section for `diffcore {name}`"
        section = _section(text, f"diffcore {name}")
        for action in subparser._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help":
                    assert f"`{option}`" in section, f"`diffcore {name} {option}` is not documented"


def _slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_resolve():
    """Links between the docs (and from README.md into docs/) point at existing files and headings."""
    for doc in [*DOC_FILES, ROOT / "README.md"]:
        if not doc.is_file():
            continue
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", target) or (doc.parent == ROOT and not target.startswith("docs/")):
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            assert dest.exists(), f"{doc.name}: link to {target} is broken"
            if anchor and dest.suffix == ".md":
                slugs = {_slug(h) for h in re.findall(r"^#+\s+(.*)$", dest.read_text(), re.M)}
                assert anchor in slugs, f"{doc.name}: anchor #{anchor} not in {dest.name}"


def test_readme_links_every_doc():
    readme = ROOT / "README.md"
    if not readme.is_file():
        pytest.skip("no README.md yet")
    text = readme.read_text()
    missing = [p.name for p in DOC_FILES if f"docs/{p.name}" not in text]
    assert not missing, f"README.md does not link {missing}"
