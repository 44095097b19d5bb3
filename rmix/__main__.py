"""`python -m rmix ...` is the `rmix` command (and `torchrun ... -m rmix train ...` its distributed form)."""
from rmix.cli import main

if __name__ == "__main__":
    main()
