"""The code keeps the shape ARCHITECTURE.md promises: imports one way, short functions, short files.

bench/code_map.py computes the figures (and prints them for a reader); these tests hold the code
to them, so a change that adds an import cycle or a 100-line function fails here, by name.
"""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("code_map", ROOT / "bench" / "code_map.py")
code_map = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(code_map)


def test_find_cycles_sees_a_cycle_through_three_modules():
    graph = {"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}
    assert [sorted(c[:-1]) for c in code_map.find_cycles(graph)] == [["a", "b", "c"]]
    assert code_map.find_cycles({"a": ["b"], "b": []}) == []


def test_no_import_cycle_among_top_level_modules():
    report = code_map.analyse()
    assert report["cycles"] == [], f"import cycles: {report['cycles']}"


def test_no_function_longer_than_the_limit():
    too_long = [f"{f['file']}:{f['function']} ({f['lines']} lines)" for f in code_map.analyse()["too_long"]]
    assert not too_long, f"over {code_map.MAX_FUNCTION_LINES} lines: {too_long}"


def test_no_file_longer_than_the_limit():
    long_files = code_map.analyse()["long_files"]
    assert not long_files, f"over {code_map.MAX_FILE_LINES} lines: {long_files}"


def test_imports_sit_at_the_top_except_optional_dependencies_and_main_dispatch():
    inner = code_map.analyse()["inner_imports"]
    assert not inner, "imports inside functions (move them to the top of the module):\n" + "\n".join(inner)


def test_config_module_does_not_import_torch():
    # main.py builds its parser from config.py: --help and bad flags must answer without torch.
    text = (ROOT / "config.py").read_text(encoding="utf-8")
    assert "import torch" not in text
