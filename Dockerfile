# autobatch image: the daemon (`autobatch serve`) and the Ray head/worker pods share it, so
# the workers import exactly the launcher code the daemon ships them.
#
# Base: the official Ray image of the Ray version this project runs with (pyproject pins
# ray[default]>=2.40; the dev venv has 2.60.0). rayproject/ray tags are
# <ray-version>-py<python>-<flavor>; "-gpu" is the CUDA flavor (Ray's default CUDA build),
# "-cu12x" pins a specific CUDA. We take -py311-gpu: Python 3.11 matches the dev venv (Ray
# Client requires the same Python and Ray on both sides) and -gpu carries the CUDA runtime
# that the GPU workers need. tests/test_k8s.py checks this tag against the installed ray.
FROM rayproject/ray:2.60.0-py311-gpu

# The Ray images do not ship torch (the old ray-ml images did); `pip install .` pulls the
# default PyPI torch wheel (CUDA-enabled on linux x86_64) to satisfy torch>=2.4. Ray itself
# is already in the image at the pinned version, so pip keeps it.
WORKDIR /home/ray/autobatch
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users autobatch ./autobatch
COPY --chown=ray:users launcher ./launcher
COPY --chown=ray:users configs ./configs
RUN pip install --no-cache-dir . \
    && mkdir -p /home/ray/autobatch-state

EXPOSE 8470

# The daemon refuses a non-loopback address without a token: it reads it from
# AUTOBATCH_TOKEN (set it from a Secret; see k8s/daemon.yaml). RAY_ADDRESS selects the
# cluster (unset: an embedded local Ray). KubeRay replaces this command in Ray pods.
CMD ["autobatch", "serve", "--host", "0.0.0.0", "--port", "8470", "--state-dir", "/home/ray/autobatch-state"]
