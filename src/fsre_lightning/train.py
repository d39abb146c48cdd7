"""`python -m fsre_lightning.train` (the command: `fsre_lightning.cli.train`)."""

import sys

from fsre_lightning.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
