"""`python -m jobs ...` is the `psp` command."""
import sys

from jobs.cli import main

sys.exit(main())
