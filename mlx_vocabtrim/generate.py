"""`python -m mlx_vocabtrim.generate`: the `generate` command, with mlx_lm.generate's flag names.

Only run as a module: the package never imports it, so `mlx_vocabtrim.generate` stays the
function (as in mlx-lm) and running it prints no warning.
"""

if __name__ == "__main__":
    from mlx_vocabtrim.blas import use_system_openblas

    use_system_openblas()  # first: the switch re-runs the process, before MLX is imported
    from mlx_vocabtrim.cli import generate

    generate(prog_name="python -m mlx_vocabtrim.generate")
