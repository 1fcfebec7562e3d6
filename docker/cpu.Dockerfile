# kvsqueeze on a CPU machine: the set-up this project's CI uses (SGLang on CPU, torch_native attention,
# the embedded SmolLM2-135M-Instruct). Default command: the main job, `kvsqueeze bench`.
#   docker build -f docker/cpu.Dockerfile -t kvsqueeze:cpu .
#   docker run --rm -v "$PWD/results:/opt/kvsqueeze/results" kvsqueeze:cpu              # bench + report
#   docker run --rm -p 30000:30000 kvsqueeze:cpu serve --engine sglang --host 0.0.0.0 --port 30000
FROM python:3.11-slim-bookworm

# CPU wheels of torch (the default PyPI torch is the CUDA build)
ENV PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu \
    PIP_NO_CACHE_DIR=1 \
    KVSQUEEZE_HOME=/opt/kvsqueeze-home \
    PYTHONUNBUFFERED=1


WORKDIR /opt/kvsqueeze
COPY . .
RUN bash scripts/install.sh

EXPOSE 30000
ENTRYPOINT ["/opt/kvsqueeze/.venv/bin/kvsqueeze"]
CMD ["bench"]
