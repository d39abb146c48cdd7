"""`python -m fsre_lightning.export_reference` (the command: cli.export_reference)."""

import sys

from fsre_lightning.cli.export_reference import main

if __name__ == "__main__":
    sys.exit(main())
