# The worker image: torch + torchvision, with the ImageNet checkpoint fetched at build time
# so workers start offline.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY api api
COPY shared shared
COPY keeper keeper
COPY client client
COPY stack stack
COPY worker worker
RUN pip install --no-cache-dir '.[worker,gpu]'
ENV TORCH_HOME=/opt/torch
# Workers never download: the ImageNet checkpoint of every architecture the deployment
# enables is baked in here (ResNet-18 always; --build-arg FEATUREMAPS_MODELS=resnet50,vgg16).
ARG FEATUREMAPS_MODELS=resnet18
RUN python -c "import sys; from torchvision.models import get_model_weights as w; [w(n)['IMAGENET1K_V1'].get_state_dict(progress=False) for n in {'resnet18', *filter(None, sys.argv[1].split(','))}]" "$FEATUREMAPS_MODELS"
ENV FEATUREMAPS_WEIGHTS=imagenet
# One process per GPU: compose pins each replica's GPU; the launcher runs one worker for it.
CMD ["featuremaps-worker", "--gpus", "auto"]
