"""`anemll-chat` entry point. The daemon it talks to is not built yet; until
it is, this says so instead of failing obscurely."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("anemll-chat: the anemlld daemon and its chat protocol are not available in this version yet.\n"
          "  -> convert a model with `anemlld convert SRC --out DIR` meanwhile.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
