"""``python -m ulsam_deploy``: the CLI (also what ``torchrun -m ulsam_deploy train ...`` starts)."""

from .cli import main

if __name__ == "__main__":
    main()
