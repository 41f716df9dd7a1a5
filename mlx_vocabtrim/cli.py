"""The `mlx-vocabtrim` command group."""

import click

from . import __version__
from .generate import main as generate


@click.group()
@click.version_option(__version__)
def cli():
    """VocabTrim speculative decoding for MLX."""


cli.add_command(generate)
