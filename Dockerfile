# syntax=docker/dockerfile:1
# autobatch image: the daemon (`autobatch serve`) and the Ray head/worker pods share it, so
# the workers import exactly the launcher code the daemon ships them.
#
# Base: the official Ray image of the Ray version this project runs with (pyproject pins
# ray[default]>=2.40; the dev venv has 2.60.0). rayproject/ray tags are
# <ray-version>-py<python>-<platform>: -cpu, -cuXY (an NVIDIA CUDA X.Y base image), and -gpu,
# an alias of one -cuXY that Ray's CI chooses (-cu121 when this was written). We name the CUDA
# explicitly, -cu126 (CUDA 12.6), so that torch below can be built for the same one, and the
# tag says which. Python 3.11 matches the dev venv (Ray Client requires the same Python and
# Ray on both sides). tests/test_k8s.py checks the tag against the installed ray, and its
# CUDA against torch's below.
#
# GPU nodes need an NVIDIA driver that supports CUDA 12.6: branch R560 or newer (>= 560.35.05
# for CUDA 12.6 Update 3, the base image's); `nvidia-smi` on a node shows its version.
FROM rayproject/ray:2.60.0-py311-cu126

# torch: the version the tests run (the Makefile's TORCH_CPU; tests/test_k8s.py checks they
# agree), built for the base image's CUDA, from the PyTorch wheel index of that CUDA. PyTorch
# publishes 2.13 for cu126 (the index this installs from), and the default torch wheel
# on PyPI is a CUDA 13 build (cuda-toolkit 13.0.3): it would need driver R580+ and put a
# second CUDA major version in the image. torch's wheel brings its own CUDA 12.6 user-space
# libraries (nvidia-*-cu12); they match the base image's CUDA, so the driver requirement is
# the one above. pyproject's torch>=2.4 is satisfied, so `pip install .` keeps this torch,
# and the check below fails the build if anything replaced it.
WORKDIR /home/ray/autobatch
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cu126 \
        "torch==2.13.0+cu126"
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users autobatch ./autobatch
COPY --chown=ray:users launcher ./launcher
COPY --chown=ray:users configs ./configs
RUN pip install --no-cache-dir . && mkdir -p /home/ray/autobatch-state

# The build fails unless torch is the CUDA 12.6 build with kernels for every supported card.
# get_arch_list() reads what torch was compiled for: no GPU is needed here. A cubin for sm_XY
# runs on cards of the same major version X with minor >= Y (NVIDIA's binary compatibility;
# an sm_XYa/f one only on X.Y), PTX for compute_XY on any card >= X.Y. So the L4 (8.9) runs
# the sm_86 kernels of the cu126 wheel, which has no sm_89. tests/test_k8s.py runs this check
# against the arch lists PyTorch builds its wheels with.
RUN python - <<'EOF'
import re

import torch

CARDS = {"T4": "sm_75", "A100": "sm_80", "L4": "sm_89", "H100": "sm_90"}
assert torch.version.cuda == '12.6', f"torch {torch.__version__}: CUDA {torch.version.cuda}"
archs = torch.cuda.get_arch_list()


def runs_on(card: str) -> bool:
    major, minor = int(card[3:-1]), int(card[-1])
    for arch in archs:
        m = re.fullmatch(r"(sm|compute)_(\d+)(\d)([af]?)", arch)
        if not m:
            continue
        kind, a_major, a_minor, variant = m[1], int(m[2]), int(m[3]), m[4]
        if variant:
            ok = (a_major, a_minor) == (major, minor)
        elif kind == "sm":
            ok = a_major == major and a_minor <= minor
        else:
            ok = (a_major, a_minor) <= (major, minor)
        if ok:
            return True
    return False


missing = [f"{name} ({sm})" for name, sm in CARDS.items() if not runs_on(sm)]
assert not missing, f"torch {torch.__version__} has no kernels for {missing}; it has {archs}"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, kernels {archs}")
EOF

EXPOSE 8470

# The daemon refuses a non-loopback address without a token: it reads it from
# AUTOBATCH_TOKEN (set it from a Secret; see k8s/daemon.yaml). RAY_ADDRESS selects the
# cluster (unset: an embedded local Ray). KubeRay replaces this command in Ray pods.
CMD ["autobatch", "serve", "--host", "0.0.0.0", "--port", "8470", "--state-dir", "/home/ray/autobatch-state"]
