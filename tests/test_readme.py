"""The README's Python example runs as written (on the shipped checkpoint)."""

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"
PASSAGE = (
    "The Treaty of Paris was signed on 3 September 1783 by representatives of King George III and of the "
    "United States. It ended the American Revolutionary War and recognised the independence of the United States."
)


def test_the_python_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1 and "from gmsa import" in blocks[0]
    (tmp_path / "passage.txt").write_text(PASSAGE)
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("[") and (tmp_path / "ctx.safetensors").is_file()
    assert printed[-1].startswith("[")
