# Same install and start steps as CI and `make run`: requirements.txt into a venv, then `python app.py`.
FROM python:3.11-slim AS build
WORKDIR /app
RUN python -m venv /venv
COPY requirements.txt .
RUN /venv/bin/pip install --no-cache-dir --disable-pip-version-check -r requirements.txt

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home wallet
WORKDIR /app
COPY --from=build /venv /venv
COPY *.py wallet.proto openapi.json ./
COPY static ./static
ENV PATH="/venv/bin:$PATH" PYTHONUNBUFFERED=1 HOST=0.0.0.0 HTTP_PORT=8080 GRPC_PORT=9090
USER wallet
EXPOSE 8080 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request as u; p = os.environ.get('HTTP_PORT', '8080'); sys.exit(u.urlopen(f'http://127.0.0.1:{p}/healthz', timeout=2).status != 200)"]
# Exec form, so SIGTERM from `docker stop` reaches app.py itself.
CMD ["python", "app.py"]
