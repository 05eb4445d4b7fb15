"""Regenerate the README's `train` flags table from the declarations (config.flags_markdown):
``.venv/bin/python scripts/readme_flags.py`` (a test keeps the two equal)."""

from pathlib import Path

from cifar10_resnet50.config import flags_markdown

readme = Path(__file__).resolve().parents[1] / "README.md"
head, rest = readme.read_text().split("<!-- flags:start -->\n")
_, tail = rest.split("\n<!-- flags:end -->")
readme.write_text(f"{head}<!-- flags:start -->\n{flags_markdown()}\n<!-- flags:end -->{tail}")
