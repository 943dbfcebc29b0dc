"""The README states facts that are generated from the code; they must stay true."""

import pathlib

from repvgg_jax import model_table

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_model_table_is_generated_from_the_code():
  readme = (ROOT / 'README.md').read_text()
  assert model_table.replace_table(readme, model_table.markdown_table()) == readme


def test_readme_quick_start_is_make_train_and_make_test():
  readme = (ROOT / 'README.md').read_text()
  quick_start = readme.split('## Quick start', 1)[1].split('##', 1)[0]
  commands = [line.split('#')[0].strip() for line in quick_start.splitlines()
              if line.startswith('make ')]
  assert commands == ['make train', 'make test']
