"""The README's Python examples run and print what they say they print."""

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'


def test_python_examples_run_and_print_what_their_comments_say():
  text = README.read_text(encoding='utf-8')
  blocks = re.findall(r'```python\n(.*?)```', text, re.S)
  assert blocks
  for code in blocks:
    prints = [line for line in code.splitlines()
              if line.lstrip().startswith('print(')]
    missing = [line for line in prints if '#' not in line]
    assert not missing, f'README prints without their output: {missing}'
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      exec(compile(code, str(README), 'exec'), {})  # pylint: disable=exec-used
    expected = [line.split('#', 1)[1].strip() for line in prints]
    assert out.getvalue().splitlines() == expected
