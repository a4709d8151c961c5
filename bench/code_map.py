"""The shape of the code: which top-level module imports which, and the longest functions.

    python bench/code_map.py            # import graph, cycles, longest functions, long files
    python bench/code_map.py --json     # the same as JSON

Reads the sources with `ast` (nothing is imported or run). Imports inside functions count as
edges, since a cycle through a lazy import is still a cycle to a reader. tests/test_layout.py
holds the code to the limits printed here.
"""
from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 60
MAX_FILE_LINES = 800
# Imports that may sit inside a function: optional dependencies, and main.py's per-mode dispatch.
OPTIONAL_IMPORTS = frozenset({"wandb", "torch.utils.tensorboard", "datasets", "pycocoevalcap",
                              "huggingface_hub", "safetensors", "uvicorn", "fastapi", "selenium", "timm"})


def top_level_modules(root: Path = ROOT) -> dict[str, Path]:
    return {p.stem: p for p in sorted(root.glob("*.py"))}


def _imported_names(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module]
    return []


def _functions(tree: ast.AST):
    """Every function and method with its qualified name."""
    stack = [(tree, "")]
    while stack:
        node, prefix = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    yield name, child
                stack.append((child, name + "."))
            else:
                stack.append((child, prefix))


def analyse(root: Path = ROOT) -> dict:
    modules = top_level_modules(root)
    graph: dict[str, list[str]] = {}
    functions, inner_imports, file_lines = [], [], {}
    for name, path in modules.items():
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
        file_lines[path.name] = len(text.splitlines())
        deps = set()
        for node in ast.walk(tree):
            for imported in _imported_names(node):
                if imported.split(".")[0] in modules and imported.split(".")[0] != name:
                    deps.add(imported.split(".")[0])
        graph[name] = sorted(deps)
        for fname, fn in _functions(tree):
            functions.append({"file": path.name, "function": fname,
                              "lines": fn.end_lineno - fn.lineno + 1})
            for node in ast.walk(fn):
                for imported in _imported_names(node):
                    base = imported.split(".")[0]
                    if name != "main" and not any(imported == o or imported.startswith(o + ".")
                                                  or base == o for o in OPTIONAL_IMPORTS):
                        inner_imports.append(f"{path.name}:{node.lineno} {fname}: {imported}")
    functions.sort(key=lambda f: -f["lines"])
    return {"graph": graph, "cycles": find_cycles(graph), "longest": functions[:5],
            "too_long": [f for f in functions if f["lines"] > MAX_FUNCTION_LINES],
            "long_files": {k: v for k, v in file_lines.items() if v > MAX_FILE_LINES},
            "file_lines": file_lines, "inner_imports": inner_imports}


def find_cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Every elementary cycle found by depth-first search, each reported once."""
    cycles, seen = [], set()

    def walk(node: str, path: list[str]) -> None:
        for nxt in graph.get(node, []):
            if nxt in path:
                cycle = path[path.index(nxt):]
                key = frozenset(cycle)
                if key not in seen:
                    seen.add(key)
                    cycles.append(cycle + [nxt])
            elif len(path) < len(graph):
                walk(nxt, path + [nxt])

    for start in graph:
        walk(start, [start])
    return cycles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print JSON")
    report = analyse()
    if ap.parse_args().json:
        print(json.dumps(report, indent=2))
        return
    print("imports among top-level modules (including imports inside functions):")
    for name, deps in report["graph"].items():
        print(f"  {name:<12} -> {', '.join(deps) or '-'}")
    print(f"cycles: {report['cycles'] or 'none'}")
    print("five longest functions:")
    for f in report["longest"]:
        print(f"  {f['lines']:4d}  {f['file']}:{f['function']}")
    print(f"functions over {MAX_FUNCTION_LINES} lines: {len(report['too_long'])}")
    print(f"files over {MAX_FILE_LINES} lines: {report['long_files'] or 'none'}")
    print(f"imports inside functions (not optional dependencies, not main.py): "
          f"{len(report['inner_imports'])}")
    for line in report["inner_imports"]:
        print(f"  {line}")


if __name__ == "__main__":
    main()
