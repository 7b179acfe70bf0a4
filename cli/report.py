"""`headscope report DIR`: a static index.html for any headscope output folder."""
from __future__ import annotations

from pathlib import Path

import click


@click.command("report", epilog="""
\b
Examples:
  headscope report out/study-pos
  headscope report out/demo --title "The demo prompt"
""")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--title", default=None, help="Page title [default: the study's title, else the folder name].")
def report(folder, title):
    """Write FOLDER/index.html: its figures, images, CSV/JSON tables and the command that made them.

    Relative links only and nothing from the network: open it from disk, or copy the folder anywhere.
    """
    from headscope.errors import HeadscopeError
    from headscope.report import write_report

    if not folder.is_dir():
        raise HeadscopeError(f"{folder} is not a folder; give an output folder (e.g. the --out of a study)")
    page = write_report(folder, title=title)
    click.echo(f"wrote {page}")
