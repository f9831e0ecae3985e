# The API image: Flask + gunicorn, no torch.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY api api
COPY shared shared
COPY keeper keeper
COPY client client
COPY stack stack
COPY worker/__init__.py worker/__init__.py
RUN pip install --no-cache-dir '.[api]'
ENV PROMETHEUS_MULTIPROC_DIR=/tmp/prometheus
RUN mkdir -p /tmp/prometheus
EXPOSE 8000
CMD ["gunicorn", "--config", "python:api.gunicorn_conf", "--bind", "0.0.0.0:8000", "--workers", "2", "--threads", "4", "api:create_app()"]
