#!/usr/bin/env bash
# Run PEFT's own generic tests (tests/test_custom_models.py and tests/test_decoder_models.py of the installed peft
# release) against the SEFT method, on tiny local models, offline.
#
# Usage, from the repository root with the project's virtual environment active:
#   bash tests/peft_suite/run.sh [extra pytest args]
#
# Steps: download the peft sdist from PyPI (pip download), unpack it into .peft_suite/ (gitignored), add
# tests/__init__.py, append tests/peft_suite/conftest_seft.py to the suite's tests/conftest.py, install the suite's
# extra imports (the `peft-suite` extra of pyproject.toml), run pytest -k SEFT. Exits with pytest's status.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"

# The suite of the installed peft (import peft_seft fails on a peft outside the supported range).
PEFT_VERSION="$(python -c 'import peft_seft, peft; print(peft.__version__)')"

SUITE_PARENT="$REPO_ROOT/.peft_suite"
SUITE="$SUITE_PARENT/peft-$PEFT_VERSION"
SDIST="$SUITE_PARENT/download/peft-$PEFT_VERSION.tar.gz"

if [[ ! -f "$SDIST" ]]; then
    python -m pip download "peft==$PEFT_VERSION" --no-binary :all: --no-deps -d "$SUITE_PARENT/download"
fi

# A fresh copy of the tests every run, so that the conftest additions are never appended twice; the tiny models are
# rebuilt too (a few seconds), so that they always match conftest_seft.py.
rm -rf "$SUITE/tests" "$SUITE/tiny_models"
mkdir -p "$SUITE"
tar -xzf "$SDIST" -C "$SUITE_PARENT" "peft-$PEFT_VERSION/tests"
touch "$SUITE/tests/__init__.py"
cat tests/peft_suite/conftest_seft.py >> "$SUITE/tests/conftest.py"
cp tests/peft_suite/pytest.ini "$SUITE/pytest.ini"

# The suite's own imports (diffusers, ...): the `peft-suite` extra (CI pins them with PIP_CONSTRAINT).
sed -n 's/^peft-suite = \[\(.*\)\]$/\1/p' pyproject.toml | tr -d '" ' | tr ',' '\n' > "$SUITE_PARENT/requirements.txt"
if [[ ! -s "$SUITE_PARENT/requirements.txt" ]]; then
    echo "pyproject.toml has no one-line \`peft-suite = [...]\` optional dependency list" >&2
    exit 2
fi
python -m pip install --quiet -r "$SUITE_PARENT/requirements.txt"

cd "$SUITE"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
python -m pytest tests/test_custom_models.py tests/test_decoder_models.py -k SEFT -q -p no:cacheprovider "$@"
