"""The accelerator image's library versions (transformers 5.17): a tiny AE + KEFT run in a second venv.

Skipped unless ``GMSA_COMPAT_PYTHON`` names that venv's python (``bash benchmarks/compat_venv.sh``).
"""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYTHON = os.environ.get("GMSA_COMPAT_PYTHON", "")
TESTS = [
    "tests/training/test_train.py::test_keft_from_ae_checkpoint_trains_only_the_decoder",
    "tests/training/test_train.py::test_resume_continues_exactly",
    "tests/training/test_resume.py::test_fresh_clone_resumes_from_committed_weights_without_writing_there",
    "tests/test_model.py",
]

pytestmark = pytest.mark.skipif(not PYTHON, reason="set GMSA_COMPAT_PYTHON (bash benchmarks/compat_venv.sh)")


def test_the_image_versions_are_the_ones_tested():
    code = "import transformers, huggingface_hub; print(transformers.__version__, huggingface_hub.__version__)"
    done = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["5.17.0", "1.33.0"]


def test_tiny_ae_and_keft_train_under_the_image_versions():
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [PYTHON, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *TESTS],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
