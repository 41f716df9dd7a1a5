"""`python -m mlx_vocabtrim` and the `mlx-vocabtrim` command, on a system OpenBLAS where that helps."""

from .blas import use_system_openblas


def main() -> None:
    use_system_openblas()  # first: the switch re-runs the process, before MLX and the commands are imported
    from .cli import cli

    cli()


if __name__ == "__main__":
    main()
