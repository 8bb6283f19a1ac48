# autobatch image: the daemon (`autobatch serve`) and the Ray head/worker pods share it, so
# the workers import exactly the launcher code the daemon ships them.
#
# Base: the official Ray image of the Ray version this project runs with (pyproject pins
# ray[default]>=2.40; the dev venv has 2.60.0). rayproject/ray tags are
# <ray-version>-py<python>-<platform>: -cpu, -cuXY (an NVIDIA CUDA X.Y base image), and -gpu,
# an alias of one -cuXY that Ray's CI chooses (-cu121 when this was written). We name the CUDA
# explicitly, -cu128 (CUDA 12.8), so that torch below can be built for the same one, and the
# tag says which. Python 3.11 matches the dev venv (Ray Client requires the same Python and
# Ray on both sides). tests/test_k8s.py checks the tag against the installed ray, and its
# CUDA against torch's below.
#
# GPU nodes need an NVIDIA driver that supports CUDA 12.8: branch R570 or newer (>= 570.124.06
# for CUDA 12.8 Update 1, the base image's); `nvidia-smi` on a node shows its version.
FROM rayproject/ray:2.60.0-py311-cu128

# torch built for the base image's CUDA, from the PyTorch wheel index of that CUDA (cu128).
# The Ray images ship no torch, and the default torch wheel on PyPI is now a CUDA 13 build
# (torch 2.13.0 depends on cuda-toolkit 13.0.3): it would need driver R580+ and put a second
# CUDA major version in the image. torch's wheel still brings its own CUDA 12.8 user-space
# libraries (nvidia-*-cu12); they match the base image's CUDA, so the driver requirement is
# the one above. This pin is the image's only: tests and CPU machines use the Makefile's
# TORCH_CPU. pyproject's torch>=2.4 is satisfied, so `pip install .` keeps this torch, and
# the check after it fails the build if anything replaced it.
WORKDIR /home/ray/autobatch
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cu128 \
        "torch==2.9.1+cu128"
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users autobatch ./autobatch
COPY --chown=ray:users launcher ./launcher
COPY --chown=ray:users configs ./configs
RUN pip install --no-cache-dir . \
    && python -c "import torch; assert torch.version.cuda == '12.8', torch.__version__" \
    && mkdir -p /home/ray/autobatch-state

EXPOSE 8470

# The daemon refuses a non-loopback address without a token: it reads it from
# AUTOBATCH_TOKEN (set it from a Secret; see k8s/daemon.yaml). RAY_ADDRESS selects the
# cluster (unset: an embedded local Ray). KubeRay replaces this command in Ray pods.
CMD ["autobatch", "serve", "--host", "0.0.0.0", "--port", "8470", "--state-dir", "/home/ray/autobatch-state"]
