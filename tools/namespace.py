"""Move quantlab's import names under one namespace: `methods`, `experiments` and `kernels` become
`quantlab.methods`, `quantlab.experiments` and `quantlab.kernels` in every tracked text file.
namespace: skip-file (this file names the old imports on purpose)

    python tools/namespace.py            # rewrite the checkout it lives in (idempotent)
    python tools/namespace.py --check    # list what would change; exit 1 if anything would

The folders stay where they are (pyproject / setup.py map `quantlab.methods` onto `methods/`); only
names change, and only where they name a module:

- Python (tokenized, so prose never matches a code rule): the module of `import X...` and
  `from X... import`; code references `X.name` in files that bind `X` with `import X[.sub]`; in
  strings and comments, dotted paths as below.
- Every text file (and each cell of a notebook): a dotted path `X.name` where `name` is a
  sub-module of X or a name X's `__init__.py` defines (so `methods.append(...)` on a list called
  `methods`, `kernels.values()` or `methods.md` stay), and `from X import` / a line `import X`.

A path preceded by `.` or a word character is left alone, which makes a second run a no-op. Files
holding the marker `namespace: skip-file` are skipped (this script, its test). Module paths
built at run time (`f"methods.{name}"`, `"methods." + name`) cannot be rewritten safely: they
are listed as warnings. Standard library only.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import re
import subprocess
import sys
import tokenize
from pathlib import Path

NAMESPACE = "quantlab"
PACKAGES = ("methods", "experiments", "kernels")
SKIP_MARKER = "namespace: " + "skip-file"  # split so that the marker line above is the only match here
_HEAD = r"(?<![\w.])(?P<pkg>" + "|".join(PACKAGES) + r")"
DOTTED = re.compile(_HEAD + r"\.(?P<next>\w+)")
TEXT_IMPORTS = (
    re.compile(r"(?<![\w.])from\s+" + _HEAD + r"(?=\s+import\b)"),
    re.compile(r"(?m)(?:^[ \t]*(?:>>>[ \t]*)?|`)import[ \t]+" + _HEAD + r"(?=[ \t]*(?:$|`|#|;|as\b))"),
)
DYNAMIC = re.compile(_HEAD + r"\.(?=[{'\"+])")
STRING_TOKENS = {tokenize.STRING, tokenize.COMMENT} | {
    getattr(tokenize, name) for name in ("FSTRING_MIDDLE", "TSTRING_MIDDLE") if hasattr(tokenize, name)
}


def known_names(root: Path) -> dict[str, frozenset[str]]:
    """Per package, the names that may follow `X.` in a module path: its sub-modules and
    sub-packages, and the names its `__init__.py` defines or imports."""
    known = {}
    for package in PACKAGES:
        folder = root / package
        if not (folder / "__init__.py").is_file():
            raise SystemExit(f"namespace.py: {folder}/__init__.py not found: run it on a quantlab checkout")
        names = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
        names |= {p.parent.name for p in folder.glob("*/__init__.py")}
        for node in ast.parse((folder / "__init__.py").read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names |= {t.id for t in targets if isinstance(t, ast.Name)}
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        known[package] = frozenset(names)
    return known


def rewrite_text(text: str, known: dict[str, frozenset[str]]) -> str:
    """Prose, configs, strings and comments: dotted module paths and import lines."""
    text = DOTTED.sub(
        lambda m: f"{NAMESPACE}.{m[0]}" if m["next"] in known[m["pkg"]] else m[0], text
    )
    for pattern in TEXT_IMPORTS:
        text = pattern.sub(lambda m: m[0][: m.start("pkg") - m.start()] + f"{NAMESPACE}.{m['pkg']}", text)
    return text


def _bound_packages(tree: ast.AST) -> set[str]:
    """Packages a module binds by name (`import methods`, `import experiments.run.flow`)."""
    bound = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bound |= {a.name.split(".")[0] for a in node.names if a.asname is None}
    return bound & set(PACKAGES)


def _python_edits(source: str, known: dict[str, frozenset[str]]) -> list[tuple[int, int, str]]:
    """(start, end, replacement) character spans for one Python source, found with tokenize."""
    bound = _bound_packages(ast.parse(source))
    starts = [0]
    for line in source.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline)
              if t.type not in (tokenize.NL, tokenize.INDENT, tokenize.DEDENT)]
    edits = []
    statement: list[str] = []  # the names and operators of the current logical line so far
    for i, tok in enumerate(tokens):
        offset = starts[tok.start[0] - 1] + tok.start[1]
        if tok.type in STRING_TOKENS:  # sliced from the source: f-string parts unescape braces
            end = starts[tok.end[0] - 1] + tok.end[1]
            new = rewrite_text(source[offset:end], known)
            if new != source[offset:end]:
                edits.append((offset, end, new))
        elif tok.type == tokenize.NAME and tok.string in PACKAGES and not (statement and statement[-1] == "."):
            nxt = tokens[i + 1].string if i + 1 < len(tokens) else ""
            after = tokens[i + 2].string if i + 2 < len(tokens) else ""
            head = statement[0] if statement else ""
            in_import = (head == "from" and "import" not in statement) or (
                head == "import" and statement[-1] in ("import", ",")
            )
            if in_import or (tok.string in bound and nxt == "." and after in known[tok.string]):
                edits.append((offset, offset, f"{NAMESPACE}."))
        if tok.type in (tokenize.NEWLINE, tokenize.ENDMARKER) or tok.string == ";":
            statement = []
        elif tok.type in (tokenize.NAME, tokenize.OP):
            statement.append(tok.string)
    return edits


def rewrite_python(source: str, known: dict[str, frozenset[str]]) -> str:
    """One Python source; falls back to the text rules where it does not tokenize (notebook magics)."""
    try:
        edits = _python_edits(source, known)
    except (SyntaxError, tokenize.TokenError):
        return rewrite_text(source, known)
    for start, end, new in sorted(edits, reverse=True):
        source = source[:start] + new + source[end:]
    return source


def rewrite_notebook(text: str, known: dict[str, frozenset[str]]) -> str:
    """Each cell's source: code cells as Python, the others as text. nbformat's own layout kept."""
    notebook = json.loads(text)
    for cell in notebook.get("cells", []):
        source = cell.get("source", "")
        joined = "".join(source) if isinstance(source, list) else source
        rule = rewrite_python if cell.get("cell_type") == "code" else rewrite_text
        new = rule(joined, known)
        if new != joined:
            cell["source"] = new.splitlines(keepends=True) if isinstance(source, list) else new
    return json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"


def tracked_files(root: Path) -> list[Path]:
    """The checkout's tracked files (git ls-files)."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    return [root / name for name in listed.decode().split("\0") if name]


def rewrite_file(path: Path, known: dict[str, frozenset[str]]) -> tuple[str, str] | None:
    """(old, new) text of one file, or None for binary files and files that skip themselves."""
    try:
        text = path.read_bytes().decode("utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    if "\0" in text or SKIP_MARKER in text:
        return None
    if path.suffix == ".py":
        return text, rewrite_python(text, known)
    if path.suffix == ".ipynb":
        new = rewrite_notebook(text, known)
        return text, (text if json.loads(new) == json.loads(text) else new)
    return text, rewrite_text(text, known)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file would change")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    known = known_names(root)
    changed = []
    for path in tracked_files(root):
        result = rewrite_file(path, known)
        if result is None:
            continue
        old, new = result
        for number, line in enumerate(new.splitlines(), 1):
            if DYNAMIC.search(line):
                print(f"warning: {path.relative_to(root)}:{number}: a module path built at run time, "
                      f"not rewritten: {line.strip()}", file=sys.stderr)
        if new != old:
            changed.append(path.relative_to(root))
            if not args.check:
                path.write_text(new, encoding="utf-8")
    verb = "would change" if args.check else "changed"
    for path in changed:
        print(f"{verb}: {path}")
    print(f"namespace.py: {len(changed)} file(s) {verb}")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
