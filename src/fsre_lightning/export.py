"""`python -m fsre_lightning.export` (the command: `fsre_lightning.cli.export`)."""

import sys

from fsre_lightning.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
