"""`python -m fsre_lightning.evaluate` (the command: `fsre_lightning.cli.evaluate`)."""

import sys

from fsre_lightning.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
