# The worker image: torch + torchvision, with the ImageNet checkpoint fetched at build time
# so workers start offline.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY api api
COPY shared shared
COPY client client
COPY stack stack
COPY worker worker
RUN pip install --no-cache-dir '.[worker,gpu]'
ENV TORCH_HOME=/opt/torch
RUN python -c "from torchvision.models import ResNet18_Weights as W; W.IMAGENET1K_V1.get_state_dict(progress=False)"
ENV FEATUREMAPS_WEIGHTS=imagenet
# One process per GPU: compose pins each replica's GPU; the launcher runs one worker for it.
CMD ["featuremaps-worker", "--gpus", "auto"]
