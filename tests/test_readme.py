"""The README's Python example runs and prints what it says it prints."""

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'


def test_python_example_runs_and_matches_its_comments():
  text = README.read_text(encoding='utf-8')
  code = re.search(r'```python\n(.*?)```', text, re.S).group(1)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(code, str(README), 'exec'), {})  # pylint: disable=exec-used
  printed = out.getvalue().splitlines()
  expected = [line.split('#', 1)[1].strip() for line in code.splitlines()
              if line.startswith('print(') and '#' in line]
  assert printed[:len(expected)] == expected
