"""main.py with a bug planted in the data-loading workers: resizing an image raises. For the
test that a failed run with worker processes exits instead of waiting for them forever."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import dataset  # noqa: E402
import main  # noqa: E402


def broken_resize(self, image):
    raise RuntimeError("probe: a bug in a data-loading worker")


if __name__ == "__main__":
    dataset.ResizeUint8.__call__ = broken_resize
    sys.exit(main.main())
