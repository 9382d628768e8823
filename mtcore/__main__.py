"""``python -m mtcore`` and ``torchrun -m mtcore``: the same command line as ``mtcore``."""

from mtcore.cli import app

if __name__ == "__main__":
    app(prog_name="mtcore")
