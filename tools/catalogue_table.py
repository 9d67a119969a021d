"""Print the README's catalogue of bad input (input -> error class -> message) from the test table itself.

The rows are `tests/test_catalogue.py`'s ``ROWS``, so the README and the tests cannot drift; the other
table-driven bad-input tests of the suite are counted at the end. Run: ``python tools/catalogue_table.py``
(from the repository root, with the test extra installed).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import test_adapters  # noqa: E402
import test_config  # noqa: E402
from test_catalogue import ROWS  # noqa: E402


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def main() -> None:
    print("| input | error | message contains |")
    print("| --- | --- | --- |")
    for row in ROWS:
        print(f"| `{_cell(row.input)}` | `{row.error.__name__}` | {_cell(row.message)} |")
    others = {
        "tests/test_adapters.py BAD_INPUT": len(test_adapters.BAD_INPUT),
        "tests/test_config.py INVALID": len(test_config.INVALID),
        "tests/test_config.py REFUSALS": len(test_config.REFUSALS),
    }
    listed = ", ".join(f"{count} in {name}" for name, count in others.items())
    print(f"\n{len(ROWS)} rows here; the suite has {sum(others.values())} more bad-input rows ({listed}).")


if __name__ == "__main__":
    main()
