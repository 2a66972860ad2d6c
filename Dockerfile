# GLM trainer on a CUDA PyTorch image. The devel flavour carries nvcc, which DeepSpeed needs to build
# its fused ops (Adam, communication) at first use.
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-devel

ENV PYTHONUNBUFFERED=1 \
    GLM_CACHE_DIR=/workspace/.cache/glm-trainer

WORKDIR /opt/glm-trainer
# Install the dependencies first so code changes do not invalidate the layer. torch is already in the
# image and satisfies setup.cfg's range, so pip keeps the image's CUDA build.
COPY setup.cfg pyproject.toml README.md ./
COPY trainer/__init__.py trainer/__init__.py
COPY launch/__init__.py launch/__init__.py
RUN pip install --no-cache-dir -e '.[test]'
COPY . .
RUN pip install --no-cache-dir --no-deps -e .

WORKDIR /workspace
CMD ["glm-train", "--config", "/opt/glm-trainer/configs/glm-debug.yaml"]
