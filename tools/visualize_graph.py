"""Draw the LN-tuned graph of a Hugging Face model directory: ``fx-lntune visualize`` as a script, same options.

Run: ``python tools/visualize_graph.py MODEL_DIR -o graph.svg [--diff] [--filter REGEX] [--hops N] [--depth K]``
(``--help`` lists them). Writes the picture and a ``.dot`` beside it and prints the table of adapted modules; the
work is `fx_lntune.visualize.visualize_graph`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's fx_lntune

from fx_lntune.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["visualize", *sys.argv[1:]]))
