"""Regenerate the README's `train` flags table from the declarations (declare.markdown_table of config.train_flags):
``.venv/bin/python scripts/readme_flags.py`` (a test keeps the two equal)."""

from pathlib import Path

from cifar10_resnet50.config import train_flags
from cifar10_resnet50.declare import markdown_table

readme = Path(__file__).resolve().parents[1] / "README.md"
head, rest = readme.read_text().split("<!-- flags:start -->\n")
_, tail = rest.split("\n<!-- flags:end -->")
readme.write_text(
    f"{head}<!-- flags:start -->\n{markdown_table(train_flags())}\n<!-- flags:end -->{tail}"
)
