"""`python -m anemlld` is the `anemlld` command (the LaunchAgent runs it so)."""
import sys

from anemlld.cli import main

sys.exit(main())
