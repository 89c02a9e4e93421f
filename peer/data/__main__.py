"""``python -m peer.data …`` — the corpus and data-dir tools of :mod:`peer.data.pages`."""

import sys

from peer.data.pages import main

if __name__ == "__main__":
    sys.exit(main())
