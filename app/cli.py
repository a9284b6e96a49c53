"""The `seqguard` command line."""
import typer

cli = typer.Typer(no_args_is_help=True)


def main() -> None:
    cli()
