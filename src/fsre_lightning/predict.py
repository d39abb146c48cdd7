"""`python -m fsre_lightning.predict` (the command: `fsre_lightning.cli.predict`)."""

import sys

from fsre_lightning.cli.predict import main

if __name__ == "__main__":
    sys.exit(main())
