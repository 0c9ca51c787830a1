"""`python -m app.cli ...`, as the tests and the worker processes the CLI starts run it."""
import sys

from app.cli import main

sys.exit(main())
